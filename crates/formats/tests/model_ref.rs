//! The one model-reference resolver over the whole class of inputs: every source kind,
//! what is missing or ambiguous, and hub ids (cached, not cached offline, `@revision`,
//! config-only), with a local path winning over a hub id of the same spelling.

use std::fs;
use std::path::{Path, PathBuf};

use qlora_formats::model_ref::{
    Fetch, ModelRef, ModelSource, RefErrorKind, Resolve, SourceKind, Weights,
};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn write(p: &Path, body: &str) -> PathBuf {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
    p.to_path_buf()
}

/// A hub cache entry `models--org--name` with `refs/<branch>` -> `commit` and its files.
fn fake_hub(cache: &Path, id: &str, branch: &str, commit: &str, files: &[&str]) -> PathBuf {
    let base = cache.join(format!("models--{}", id.replace('/', "--")));
    write(&base.join("refs").join(branch), commit);
    let snap = base.join("snapshots").join(commit);
    fs::create_dir_all(&snap).unwrap();
    for f in files {
        write(&snap.join(f), "{}");
    }
    snap
}

fn how(cache: &Path, fetch: Fetch) -> Resolve {
    Resolve {
        allow_network: false,
        hub_cache: cache.to_path_buf(),
        fetch,
    }
}

fn any(spec: &Path, cache: &Path) -> ModelRef {
    ModelRef::resolve_with(spec.to_str().unwrap(), &how(cache, Fetch::Model)).unwrap()
}

#[test]
fn every_local_kind_resolves_to_its_source_and_kind() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let root = t.path();

    // A GGUF file, by extension and by magic alone.
    let g = write(&root.join("m.Q4_0.gguf"), "GGUF....");
    let r = any(&g, &cache);
    assert_eq!(r.source, ModelSource::Gguf(g.clone()));
    assert_eq!(
        (r.kind(), r.weights(), r.config_path()),
        (SourceKind::Gguf, None, None)
    );
    let g2 = write(&root.join("model.bin"), "GGUFxxxx");
    assert_eq!(any(&g2, &cache).source, ModelSource::Gguf(g2));

    // An HF folder, single file (adapter files are not weights).
    let hf = root.join("hf");
    write(&hf.join("config.json"), "{}");
    let st = write(&hf.join("model.safetensors"), "");
    write(&hf.join("adapter_model.safetensors"), "");
    let r = any(&hf, &cache);
    assert_eq!(r.source, ModelSource::Folder(hf.clone()));
    assert_eq!(r.kind(), SourceKind::HfFolder { sharded: false });
    assert_eq!(r.weights(), Some(Weights::Files(vec![st.clone()])));
    assert_eq!(r.config_path(), Some(hf.join("config.json")));
    r.require_model().unwrap();

    // Sharded: the index wins over the shard files.
    let sh = root.join("sharded");
    write(&sh.join("config.json"), "{}");
    write(&sh.join("model-00001-of-00002.safetensors"), "");
    let idx = write(&sh.join("model.safetensors.index.json"), "{}");
    let r = any(&sh, &cache);
    assert_eq!(r.kind(), SourceKind::HfFolder { sharded: true });
    assert_eq!(r.weights(), Some(Weights::Sharded { index: idx.clone() }));

    // bitsandbytes 4-bit: transformers' quantization_config in config.json.
    let bnb = root.join("bnb");
    write(
        &bnb.join("config.json"),
        r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": "nf4"}}"#,
    );
    write(&bnb.join("model.safetensors"), "");
    assert_eq!(
        any(&bnb, &cache).kind(),
        SourceKind::Bnb4Folder { sharded: false }
    );
    // 8-bit is not 4-bit.
    let b8 = root.join("bnb8");
    write(
        &b8.join("config.json"),
        r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true}}"#,
    );
    write(&b8.join("model.safetensors"), "");
    assert_eq!(
        any(&b8, &cache).kind(),
        SourceKind::HfFolder { sharded: false }
    );

    // Bare safetensors: a file, an index file, a folder of weights without config.json.
    let r = any(&st, &cache);
    assert_eq!(r.source, ModelSource::Safetensors(st.clone()));
    assert_eq!(r.kind(), SourceKind::BareSafetensors);
    assert_eq!(r.weights(), Some(Weights::Files(vec![st.clone()])));
    let r = any(&idx, &cache);
    assert_eq!(r.source, ModelSource::Safetensors(idx.clone()));
    assert_eq!(r.weights(), Some(Weights::Sharded { index: idx }));
    let w = root.join("weights");
    let w1 = write(&w.join("b.safetensors"), "");
    let w0 = write(&w.join("a.safetensors"), "");
    let r = any(&w, &cache);
    assert_eq!(r.source, ModelSource::Weights(w.clone()));
    assert_eq!(r.kind(), SourceKind::BareSafetensors);
    assert_eq!(r.weights(), Some(Weights::Files(vec![w0, w1])));

    // Config only: a config.json file, or a folder with config.json and no weights.
    let c = write(&root.join("cfg/config.json"), "{}");
    let r = any(&c, &cache);
    assert_eq!(r.source, ModelSource::Config(c.clone()));
    assert_eq!(
        (r.kind(), r.config_path()),
        (SourceKind::ConfigOnly, Some(c))
    );
    assert_eq!(
        any(&root.join("cfg"), &cache).kind(),
        SourceKind::ConfigOnly
    );

    // A folder holding a single .gguf (and no config.json) is that file.
    let gd = root.join("gdir");
    let only = write(&gd.join("x.gguf"), "GGUF");
    assert_eq!(any(&gd, &cache).source, ModelSource::Gguf(only));
}

#[test]
fn missing_ambiguous_and_empty_inputs_are_errors_naming_what_is_wrong() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let h = how(&cache, Fetch::Model);

    for spec in ["nothing-here", "a/b/c", "org/name@"] {
        let e = ModelRef::resolve_with(spec, &h).unwrap_err();
        assert_eq!(e.kind, RefErrorKind::NotFound, "{spec}: {e}");
        assert!(
            e.to_string().contains(spec) && e.to_string().contains("no such file"),
            "{e}"
        );
    }
    // Path-like spellings are never hub ids.
    let missing = t.path().join("missing/model");
    let e = ModelRef::resolve_with(missing.to_str().unwrap(), &h).unwrap_err();
    assert_eq!(e.kind, RefErrorKind::NotFound);
    assert!(e.msg.contains("no such file or folder"), "{e}");
    let e = ModelRef::resolve_with("./org/name", &h).unwrap_err();
    assert_eq!(e.kind, RefErrorKind::NotFound, "{e}");

    let two = t.path().join("two");
    write(&two.join("a.gguf"), "GGUF");
    write(&two.join("b.gguf"), "GGUF");
    let e = ModelRef::resolve_with(two.to_str().unwrap(), &h).unwrap_err();
    assert_eq!(e.kind, RefErrorKind::Unusable);
    assert!(
        e.msg.contains(two.to_str().unwrap()) && e.msg.contains("2 .gguf files; name one"),
        "{e}"
    );

    let empty = t.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let e = ModelRef::resolve_with(empty.to_str().unwrap(), &h).unwrap_err();
    assert!(e.msg.contains(empty.to_str().unwrap()) && e.msg.contains("neither config.json"));

    // Loading a model refuses what holds no model, with the loaders' messages.
    let st = write(&t.path().join("w.safetensors"), "");
    let e = ModelRef::resolve_in(st.to_str().unwrap(), false, &cache).unwrap_err();
    assert!(
        e.to_string().contains("is a file but not a GGUF file"),
        "{e}"
    );
    let w = t.path().join("weights");
    write(&w.join("model.safetensors"), "");
    let e = ModelRef::resolve_in(w.to_str().unwrap(), false, &cache).unwrap_err();
    assert!(
        e.to_string()
            .contains("neither config.json nor a .gguf file"),
        "{e}"
    );
}

#[test]
fn hub_ids_resolve_from_the_cache_and_never_download_offline() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let snap = fake_hub(
        &cache,
        "org/tiny",
        "main",
        COMMIT,
        &["config.json", "model.safetensors"],
    );
    let dev = fake_hub(&cache, "org/tiny", "dev", OTHER, &["config.json"]);
    let h = how(&cache, Fetch::Model);

    let r = ModelRef::resolve_with("org/tiny", &h).unwrap();
    assert_eq!(r.source, ModelSource::Folder(snap.clone()));
    assert_eq!(r.hub_id.as_deref(), Some("org/tiny"));
    assert_eq!(r.kind(), SourceKind::HfFolder { sharded: false });
    // @revision: a branch (through refs/) or a commit.
    let r = ModelRef::resolve_with("org/tiny@dev", &h).unwrap();
    assert_eq!(
        (r.path(), r.hub_id.as_deref()),
        (dev.as_path(), Some("org/tiny"))
    );
    let r = ModelRef::resolve_with(&format!("org/tiny@{COMMIT}"), &h).unwrap();
    assert_eq!(r.path(), snap);
    // A revision the cache does not hold is not found offline.
    let e = ModelRef::resolve_with("org/tiny@v9", &h).unwrap_err();
    assert_eq!(e.kind, RefErrorKind::Hub, "{e}");

    // Config only (the memory planner): the snapshot's config.json.
    let r = ModelRef::resolve_with("org/tiny", &how(&cache, Fetch::Config)).unwrap();
    assert_eq!(r.source, ModelSource::Config(snap.join("config.json")));

    // A GGUF-only repo.
    let gsnap = fake_hub(&cache, "org/ggufs", "main", COMMIT, &["m.Q4_0.gguf"]);
    let r = ModelRef::resolve_with("org/ggufs", &h).unwrap();
    assert_eq!(r.source, ModelSource::Gguf(gsnap.join("m.Q4_0.gguf")));

    // Not cached, network off: a clear error naming the id and the cache, for both fetches.
    for fetch in [Fetch::Model, Fetch::Config] {
        let e = ModelRef::resolve_with("org/absent", &how(&cache, fetch)).unwrap_err();
        assert_eq!(e.kind, RefErrorKind::Hub);
        assert!(
            e.msg.contains("`org/absent`")
                && e.msg.contains("not in the Hugging Face cache")
                && e.msg.contains(cache.to_str().unwrap()),
            "{e}"
        );
    }
}

/// The only test that changes the working directory (the others use absolute paths).
#[test]
fn an_existing_path_wins_over_a_hub_id_of_the_same_spelling() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    fake_hub(&cache, "org/name", "main", COMMIT, &["config.json"]);
    let work = t.path().join("work");
    let g = write(&work.join("org/name"), "GGUF");
    std::env::set_current_dir(&work).unwrap();
    let r = ModelRef::resolve_with("org/name", &how(&cache, Fetch::Model)).unwrap();
    assert_eq!(r.source, ModelSource::Gguf(PathBuf::from("org/name")));
    assert_eq!(r.hub_id, None);
    assert!(g.is_file());
}
