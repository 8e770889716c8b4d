//! Pre-tokenized rows: `{"input_ids": [..], "labels": [..]}` per JSONL line, or
//! a JSON array of such objects. Nothing is added (no BOS/EOS): the ids are used
//! exactly as written, which is what parity checks against Python need.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{Example, IGNORE_INDEX};

#[derive(Deserialize)]
struct Row {
    input_ids: Vec<i64>,
    #[serde(default)]
    labels: Option<Vec<i64>>,
}

fn row_to_example(row: Row) -> Result<Example> {
    if row.input_ids.is_empty() {
        bail!("`input_ids` is empty");
    }
    let mut ids = Vec::with_capacity(row.input_ids.len());
    for (i, &t) in row.input_ids.iter().enumerate() {
        if t < 0 || t > u32::MAX as i64 {
            bail!("`input_ids[{i}]` = {t} is not a valid token id");
        }
        ids.push(t as u32);
    }
    let labels = match row.labels {
        None => ids.iter().map(|&t| t as i64).collect(),
        Some(l) => {
            if l.len() != ids.len() {
                bail!(
                    "`labels` has {} entries but `input_ids` has {}",
                    l.len(),
                    ids.len()
                );
            }
            if let Some((i, &v)) = l
                .iter()
                .enumerate()
                .find(|(_, &v)| v < 0 && v != IGNORE_INDEX)
            {
                bail!("`labels[{i}]` = {v}: negative labels must be -100");
            }
            l
        }
    };
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// Parse JSONL text; `name` is used in error messages (`name:line: problem`).
/// Blank lines are skipped; any malformed line is an error.
pub fn parse_jsonl(text: &str, name: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let lineno = i + 1;
        let row: Row = serde_json::from_str(line)
            .with_context(|| format!("{name}:{lineno}: not a pre-tokenized row"))?;
        out.push(row_to_example(row).with_context(|| format!("{name}:{lineno}"))?);
    }
    Ok(out)
}

/// Read a pre-tokenized JSONL file.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&text, &path.display().to_string())
}

/// Parse a JSON array of pre-tokenized rows; errors name the array index.
pub fn parse_json_array(text: &str, name: &str) -> Result<Vec<Example>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text)
        .with_context(|| format!("{name}: not a JSON array of pre-tokenized rows"))?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let row: Row = serde_json::from_value(v)
                .with_context(|| format!("{name}: element {i}: not a pre-tokenized row"))?;
            row_to_example(row).with_context(|| format!("{name}: element {i}"))
        })
        .collect()
}

/// Read a JSON-array file of pre-tokenized rows.
pub fn read_json_array(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_json_array(&text, &path.display().to_string())
}

/// Read either format: a file whose first non-blank character is `[` is a JSON
/// array, anything else JSONL.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!("{name}:{line}: invalid UTF-8 (byte offset {at})")
    })?;
    if text.trim_start().starts_with('[') {
        parse_json_array(&text, &name)
    } else {
        parse_jsonl(&text, &name)
    }
}

/// Write examples as JSONL (used by tests and `qlora data` to hand rows to Python).
pub fn to_jsonl(examples: &[Example]) -> String {
    let mut s = String::new();
    for e in examples {
        s.push_str(&serde_json::json!({"input_ids": e.input_ids, "labels": e.labels}).to_string());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_default_to_input_ids() {
        let ex = parse_jsonl("{\"input_ids\": [5, 6, 7]}\n\n", "t").unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].input_ids, vec![5, 6, 7]);
        assert_eq!(ex[0].labels, vec![5, 6, 7]);
        assert_eq!(ex[0].num_targets(), 2);
    }

    #[test]
    fn masked_labels_kept() {
        let ex = parse_jsonl(
            "{\"input_ids\": [1,2,3,4], \"labels\": [-100,-100,3,4]}\n{\"input_ids\": [9]}",
            "t",
        )
        .unwrap();
        assert_eq!(ex[0].labels, vec![-100, -100, 3, 4]);
        assert_eq!(ex[0].num_targets(), 2);
        assert_eq!(ex[1].input_ids, vec![9]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse_jsonl(
            "{\"input_ids\": [1]}\n{\"input_ids\": [1,2], \"labels\": [1]}\n",
            "f.jsonl",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("f.jsonl:2"), "{e:#}");
        let e = parse_jsonl("{\"input_ids\": [1]}\n\nnot json\n", "f.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("f.jsonl:3"), "{e:#}");
        let e = parse_jsonl("{\"input_ids\": [-3]}\n", "f.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("f.jsonl:1"), "{e:#}");
        let e = parse_jsonl("{\"input_ids\": [1,2], \"labels\": [1,-5]}\n", "f.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("-100"), "{e:#}");
        let e = parse_jsonl("{\"text\": \"hi\"}\n", "f.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("f.jsonl:1"), "{e:#}");
    }

    #[test]
    fn json_array_and_autodetect_roundtrip() {
        let rows = vec![
            Example {
                input_ids: vec![1, 2, 3],
                labels: vec![-100, 2, 3],
            },
            Example::unmasked(vec![4, 5]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, to_jsonl(&rows)).unwrap();
        assert_eq!(read_jsonl(&p).unwrap(), rows);
        assert_eq!(read(&p).unwrap(), rows);
        let q = dir.path().join("a.json");
        std::fs::write(
            &q,
            "[{\"input_ids\":[1,2,3],\"labels\":[-100,2,3]},{\"input_ids\":[4,5]}]",
        )
        .unwrap();
        assert_eq!(read_json_array(&q).unwrap(), rows);
        assert_eq!(read(&q).unwrap(), rows);
        let e = parse_json_array("[{\"input_ids\":[1]}, {}]", "x.json").unwrap_err();
        assert!(format!("{e:#}").contains("element 1"), "{e:#}");
        let e = read_jsonl(dir.path().join("missing.jsonl")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.jsonl"), "{e:#}");
    }
}
