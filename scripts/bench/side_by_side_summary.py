#!/usr/bin/env python3
"""The #15 goal table from the logs of scripts/bench/amx_side_by_side.sh (its WORK folder).

Per configuration: our tokens/s (bench_compute's median, `qlora train`'s median of steps 3+),
the peer's (eager median over its runs, torch.compile once), the ratio to the peer's best,
peak RSS (ours from `qlora train`, the best peer run's), and the share of the machine's bf16
matmul peak (bench_compute's `peak 2048`, same run) our step reaches in model FLOPs.

    python3 scripts/bench/side_by_side_summary.py /tmp/qlora-amx-side-by-side
"""
import glob
import json
import os
import re
import statistics
import sys


def rss_mib(log):
    try:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(log).read())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def ours(work, names):
    """bench_compute runs: tokens/s, model GFLOP/s (medians) and model GFLOP a token."""
    tok, gf, per_tok = [], [], None
    for n in names:
        try:
            text = open(os.path.join(work, f"ours-{n}.log")).read()
        except OSError:
            continue
        m = re.search(r"forward\+backward (\d+) tok/s", text)
        if m:
            tok.append(float(m.group(1)))
        m = re.search(r"model FLOPs ([\d.]+) GFLOP a step: (\d+) GFLOP/s", text)
        if m:
            gf.append(float(m.group(2)))
            per_tok = float(m.group(1)) / 512  # bench_compute's batch: 2 x 256 tokens
    med = lambda v: statistics.median(v) if v else None
    return med(tok), med(gf), per_tok


def train(work, name):
    try:
        rows = [json.loads(line) for line in open(os.path.join(work, f"tr-{name}", "metrics.jsonl"))]
    except OSError:
        return None, None
    steps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return (statistics.median(steps) if steps else None), rss_mib(os.path.join(work, f"tr-{name}.log"))


def peer(work, prefix, names):
    """(median tok/s, the peak RSS of the run nearest the median) over the runs that exist."""
    runs = []
    for n in names:
        try:
            tok = json.load(open(os.path.join(work, f"{prefix}-{n}.json")))["tokens_per_s_median"]
        except (OSError, KeyError, ValueError):
            continue
        runs.append((tok, rss_mib(os.path.join(work, f"{prefix}-{n}.log"))))
    if not runs:
        return None, None
    med = statistics.median(t for t, _ in runs)
    return med, min(runs, key=lambda r: abs(r[0] - med))[1]


def main(work):
    peak = None
    try:
        m = re.search(r"bf16 tiles \((\w+)\) \d+\^3.*?: (\d+) GFLOP/s", open(os.path.join(work, "peak.log")).read())
        peak = (m.group(1), float(m.group(2))) if m else None
    except OSError:
        pass
    # (label, our bench runs, our train run, the peer's eager runs, its compiled run); a shape's
    # model FLOPs come from its no-checkpointing bench runs (shape_runs)
    configs = [
        ("SmolLM2, no checkpointing", ["s1", "s2", "s3", "s4"], "smol", ["s1", "s2", "s3"], "s"),
        ("SmolLM2, checkpointing", ["c1", "c2", "c3"], "smolck", ["c1", "c2"], "c"),
        ("TinyLlama, no checkpointing", ["t1"], "tiny", ["t1"], "t"),
        ("TinyLlama, checkpointing", [], "tinyck", ["tck"], "tck"),
    ]
    shape_runs = {"smol": ["s1", "s2", "s3", "s4"], "tiny": ["t1"]}
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"
    print("| shape | ours bench / train tok/s | peer eager / compiled tok/s | speed vs the best | peak RSS ours / best peer MiB | memory | model GFLOP/s bench / train, share of the bf16 peak | goal |")
    print("|---|---|---|---|---|---|---|---|")
    met_all = True
    for label, bench_runs, tr, eager_runs, comp in configs:
        b_tok, b_gf, _ = ours(work, bench_runs)
        per_tok = ours(work, shape_runs["smol" if tr.startswith("smol") else "tiny"])[2]
        t_tok, t_rss = train(work, tr)
        t_gf = t_tok * per_tok if t_tok and per_tok else None
        e_tok, e_rss = peer(work, "peer", eager_runs)
        c_tok, c_rss = peer(work, "peerc", [comp])
        cands = [(t, r) for t, r in ((e_tok, e_rss), (c_tok, c_rss)) if t]
        best_tok, best_rss = max(cands) if cands else (None, None)
        ours_tok = [x for x in (b_tok, t_tok) if x]
        speed = [x / best_tok for x in ours_tok] if best_tok else []
        mem = t_rss / best_rss if t_rss and best_rss else None
        share = "-"
        if peak and (b_gf or t_gf):
            pct = lambda x: f"{x / peak[1]:.0%}" if x else "-"
            share = f"{f(b_gf)} / {f(t_gf)}, {pct(b_gf)} / {pct(t_gf)} of {peak[1]:.0f}"
        ok = bool(speed) and min(speed) >= 2.0 and mem is not None and mem <= 0.5
        met_all &= ok
        print(
            f"| {label} | {f(b_tok)} / {f(t_tok, 1)} | {f(e_tok, 1)} / {f(c_tok, 1)} | "
            f"{' / '.join(f'{x:.2f}x' for x in speed) or '-'} | {f(t_rss)} / {f(best_rss)} | "
            f"{f(mem, 2)}x | {share} | {'met' if ok else 'not met'} |"
        )
    if peak:
        print(f"(bf16 peak: bench_compute peak 2048 on {peak[0]}, this run; model FLOPs count no checkpointing recompute)")
    print("goal met in every configuration" if met_all else "goal NOT met in every configuration")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qlora-amx-side-by-side")
