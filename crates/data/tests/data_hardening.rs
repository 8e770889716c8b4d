//! Data files from the internet: every row is checked against the model at
//! load time (ids below the vocabulary, a loss target left after truncation),
//! bad rows are skipped or fatal per `--on-bad-line` with file:line, invalid
//! UTF-8 names its line, and byte-mutated files never panic.

use std::path::Path;

use anyhow::Result;
use proptest::prelude::*;
use qlora_data::formats::{load, DatasetOptions, Message, OnBadLine, TextTokenizer};

/// Bytes as tokens (+3), EOS 2, a ChatML-like template.
struct ByteTok;

impl TextTokenizer for ByteTok {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(|b| b as u32 + 3).collect())
    }
    fn bos_id(&self) -> Option<u32> {
        None
    }
    fn eos_id(&self) -> Option<u32> {
        Some(2)
    }
    fn render_chat(&self, m: &[Message], gen: bool) -> Result<String> {
        let mut s = String::new();
        for x in m {
            s += &format!("<{}>{}</>", x.role, x.content);
        }
        if gen {
            s += "<assistant>";
        }
        Ok(s)
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn rows_are_checked_against_the_model_at_load_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        b"{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,99,3]}\n{\"input_ids\":[5,6],\"labels\":[-100,-100]}\n{\"input_ids\":[7]}\n{\"input_ids\":[1,2,3,4],\"labels\":[-100,-100,-100,4]}\n{\"input_ids\":[1,2],\"labels\":[1,70]}\n",
    );
    let mut o = DatasetOptions {
        on_bad_line: OnBadLine::Skip,
        vocab_size: Some(64),
        max_len: Some(3),
        ..Default::default()
    };
    let l = load(&p, &o, None).unwrap();
    assert_eq!(l.examples.len(), 1, "{:?}", l.skipped);
    let s = l.skipped.join("\n");
    assert!(
        s.contains("d.jsonl:2") && s.contains("token id 99") && s.contains("vocabulary size 64"),
        "{s}"
    );
    assert!(
        s.contains("d.jsonl:3") && s.contains("no loss target"),
        "{s}"
    );
    assert!(s.contains("d.jsonl:4") && s.contains("one token"), "{s}");
    // the only target of row 5 is cut off by max_len 3
    assert!(
        s.contains("d.jsonl:5") && s.contains("first 3 tokens"),
        "{s}"
    );
    assert!(s.contains("d.jsonl:6") && s.contains("label 70"), "{s}");
    o.on_bad_line = OnBadLine::Error;
    let e = format!("{:#}", load(&p, &o, None).unwrap_err());
    assert!(e.contains("d.jsonl:2"), "{e}");
}

#[test]
fn invalid_utf8_names_the_line_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "t.jsonl",
        b"{\"text\":\"ok\"}\n{\"text\":\"bad \xff\xfe\"}\n{\"text\":\"fine\"}\n",
    );
    let mut o = DatasetOptions {
        on_bad_line: OnBadLine::Skip,
        ..Default::default()
    };
    let l = load(&p, &o, Some(&ByteTok)).unwrap();
    assert_eq!(l.examples.len(), 2);
    assert!(
        l.skipped[0].contains("t.jsonl:2") && l.skipped[0].contains("UTF-8"),
        "{:?}",
        l.skipped
    );
    o.on_bad_line = OnBadLine::Error;
    let e = format!("{:#}", load(&p, &o, Some(&ByteTok)).unwrap_err());
    assert!(e.contains("t.jsonl:2") && e.contains("UTF-8"), "{e}");
    // pre-tokenized reader (eval) and JSON arrays name the line too
    let q = write(
        dir.path(),
        "p.jsonl",
        b"{\"input_ids\":[1,2]}\n\n{\"input_ids\":[1,2]}\xff\n",
    );
    let e = format!("{:#}", qlora_data::pretokenized::read(&q).unwrap_err());
    assert!(e.contains("p.jsonl:3") && e.contains("UTF-8"), "{e}");
    let q = write(
        dir.path(),
        "a.json",
        b"[{\"text\":\"a\"},\n{\"text\":\"\xc3\"}]",
    );
    let e = format!("{:#}", load(&q, &o, Some(&ByteTok)).unwrap_err());
    assert!(e.contains("a.json") && e.contains("line 2"), "{e}");
}

const BASE: &[u8] = b"{\"prompt\":\"Q1\",\"completion\":\"A1\"}\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n{\"instruction\":\"do\",\"input\":\"x\",\"output\":\"y\"}\n{\"text\":\"plain\"}\n{\"input_ids\":[4,5,6],\"labels\":[-100,5,6]}\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated JSONL in every format (and as pre-tokenized rows): examples
    /// or a file:line error, never a panic; with `skip`, every kept example
    /// passes the model checks.
    #[test]
    fn mutated_data_files_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        skip in any::<bool>(),
        array in any::<bool>(),
    ) {
        let mut b = BASE.to_vec();
        if array {
            let text = String::from_utf8(b).unwrap();
            b = format!("[{}]", text.trim_end().replace('\n', ",\n")).into_bytes();
        }
        for (i, x) in edits {
            let n = b.len();
            b[i % n] = x;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.jsonl", &b);
        let o = DatasetOptions {
            on_bad_line: if skip { OnBadLine::Skip } else { OnBadLine::Error },
            vocab_size: Some(300),
            max_len: Some(64),
            ..Default::default()
        };
        match load(&p, &o, Some(&ByteTok)) {
            Ok(l) => {
                for e in &l.examples {
                    prop_assert!(qlora_data::formats::check_example(e, Some(300), Some(64)).is_ok());
                }
                for s in &l.skipped {
                    prop_assert!(s.starts_with(p.to_str().unwrap()), "{s}");
                }
            }
            Err(e) => prop_assert!(format!("{e:#}").contains("m.jsonl"), "{e:#}"),
        }
        if let Err(e) = qlora_data::pretokenized::read(&p) {
            prop_assert!(format!("{e:#}").contains("m.jsonl"), "{e:#}");
        }
    }
}
