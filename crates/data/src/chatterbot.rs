//! The demo corpus: `chatterbot-corpus` (PyPI, 1.3.3) YAML files
//! (`conversations: [[q, a, q, a, …], …]`) → chat records
//! `{"messages": [{"role": "user", …}, {"role": "assistant", …}, …]}`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// What a conversion produced.
#[derive(Debug, Default)]
pub struct Converted {
    pub records: Vec<Value>,
    pub files: usize,
    /// `file: problem` for every conversation or file left out.
    pub skipped: Vec<String>,
}

fn yaml_scalar(v: &yaml_serde::Value) -> Option<String> {
    match v {
        yaml_serde::Value::String(s) => Some(s.trim().to_string()),
        yaml_serde::Value::Number(n) => Some(n.to_string()),
        yaml_serde::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Convert one YAML file's text.
pub fn convert_yaml(text: &str, name: &str, out: &mut Converted) -> Result<()> {
    let doc: yaml_serde::Value =
        yaml_serde::from_str(text).with_context(|| format!("{name}: invalid YAML"))?;
    let convs = doc
        .get("conversations")
        .and_then(|c| c.as_sequence())
        .with_context(|| format!("{name}: no `conversations` list"))?;
    for (i, c) in convs.iter().enumerate() {
        let Some(turns) = c.as_sequence() else {
            out.skipped
                .push(format!("{name}: conversation {i} is not a list"));
            continue;
        };
        let texts: Option<Vec<String>> = turns.iter().map(yaml_scalar).collect();
        let Some(texts) = texts.filter(|t| t.len() >= 2 && t.iter().all(|s| !s.is_empty())) else {
            out.skipped.push(format!(
                "{name}: conversation {i} needs at least two non-empty text turns"
            ));
            continue;
        };
        // an odd last user turn has no answer: drop it
        let n = texts.len() / 2 * 2;
        let messages: Vec<Value> = texts[..n]
            .iter()
            .enumerate()
            .map(|(j, t)| json!({"role": if j % 2 == 0 {"user"} else {"assistant"}, "content": t}))
            .collect();
        out.records.push(json!({ "messages": messages }));
    }
    out.files += 1;
    Ok(())
}

/// Every `*.yml` under `root` (or under `root/…/data/<lang>` for each language
/// given), converted in sorted path order.
pub fn convert_dir(root: &Path, languages: &[String]) -> Result<Converted> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
                files.push(p);
            }
        }
    }
    if !languages.is_empty() {
        files.retain(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|l| languages.iter().any(|x| x.as_str() == l))
        });
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no chatterbot YAML files{}",
            root.display(),
            if languages.is_empty() {
                String::new()
            } else {
                format!(" for languages {languages:?}")
            }
        );
    }
    let mut out = Converted::default();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        if let Err(e) = convert_yaml(&text, &name, &mut out) {
            out.skipped.push(format!("{e:#}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_conversations() {
        let y = "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - How are you?\n  - Fine.\n  - Sure?\n  - Yes.\n  - dangling\n- - only one\n- - 42\n  - true\n";
        let mut out = Converted::default();
        convert_yaml(y, "g.yml", &mut out).unwrap();
        assert_eq!(out.records.len(), 3);
        assert_eq!(out.records[0]["messages"][1]["content"], "Hi");
        assert_eq!(out.records[0]["messages"][1]["role"], "assistant");
        assert_eq!(out.records[1]["messages"].as_array().unwrap().len(), 4);
        assert_eq!(out.records[2]["messages"][0]["content"], "42");
        assert_eq!(out.skipped.len(), 1);
        assert!(out.skipped[0].contains("g.yml: conversation 2"));
        let mut o2 = Converted::default();
        assert!(convert_yaml("a: [", "bad.yml", &mut o2).is_err());
    }

    #[test]
    fn converts_a_folder_by_language() {
        let d = tempfile::tempdir().unwrap();
        for (lang, f) in [
            ("english", "a.yml"),
            ("english", "b.yml"),
            ("french", "c.yml"),
        ] {
            let p = d.path().join("data").join(lang);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join(f), "conversations:\n- - q\n  - a\n").unwrap();
        }
        let c = convert_dir(d.path(), &["english".into()]).unwrap();
        assert_eq!((c.files, c.records.len()), (2, 2));
        assert_eq!(convert_dir(d.path(), &[]).unwrap().records.len(), 3);
        assert!(convert_dir(d.path(), &["klingon".into()]).is_err());
    }
}
