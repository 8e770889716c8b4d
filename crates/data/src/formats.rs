//! Text datasets in the formats people already have, turned into token ids
//! and labels:
//!
//! | format | record | trained on (default) |
//! |---|---|---|
//! | alpaca | `instruction`, optional `input`, `output` | the output |
//! | chat | `messages: [{role, content}]` (rendered by the chat template) | assistant turns |
//! | prompt-completion | `prompt`, `completion` | the completion |
//! | text | `text` | everything |
//! | pretokenized | `input_ids`, optional `labels` | as labelled |
//!
//! The format is detected from the first record's keys unless given. With
//! `train_on_inputs` every token counts. EOS is appended (unless the text
//! already ends with it) so the model learns to stop. A malformed record is
//! reported as `file:line: problem` and either skipped (counted) or fatal.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{Example, IGNORE_INDEX};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the data pipeline needs from a tokenizer (implemented by the CLI over
/// `qlora_tokenizer`, and by a toy tokenizer in tests).
pub trait TextTokenizer {
    /// Token ids of `text`, without any special tokens added.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Token prepended to every example (Llama's `<s>`), if the model uses one.
    fn bos_id(&self) -> Option<u32>;
    /// End-of-sequence token appended to every example.
    fn eos_id(&self) -> Option<u32>;
    /// The chat template applied to `messages`; with `add_generation_prompt`
    /// the text ends where the assistant's reply would start.
    fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Pretokenized,
    Alpaca,
    Chat,
    PromptCompletion,
    Text,
}

impl FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Format::Auto,
            "pretokenized" | "tokens" => Format::Pretokenized,
            "alpaca" => Format::Alpaca,
            "chat" | "messages" => Format::Chat,
            "prompt-completion" | "prompt_completion" | "completion" => Format::PromptCompletion,
            "text" => Format::Text,
            o => bail!(
                "unknown data format `{o}` (auto, pretokenized, alpaca, chat, prompt-completion, text)"
            ),
        })
    }
}

impl Format {
    /// Detect from one record's keys.
    pub fn detect(v: &Value) -> Option<Format> {
        let has = |k: &str| v.get(k).is_some();
        if has("input_ids") {
            Some(Format::Pretokenized)
        } else if has("messages") || has("conversations") {
            Some(Format::Chat)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// What to do with a malformed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBadLine {
    Skip,
    Error,
}

impl FromStr for OnBadLine {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(OnBadLine::Skip),
            "error" => Ok(OnBadLine::Error),
            o => bail!("--on-bad-line must be skip or error, got `{o}`"),
        }
    }
}

/// How a dataset file is read.
#[derive(Debug, Clone, Copy)]
pub struct DatasetOptions {
    pub format: Format,
    pub train_on_inputs: bool,
    pub on_bad_line: OnBadLine,
    /// The model's vocabulary size: a record with an id at or above it is a
    /// bad record (found at load time, not when its batch is reached).
    pub vocab_size: Option<usize>,
    /// Rows are truncated to this many tokens: a record with no loss target
    /// left in its first `max_len` tokens (after the one-token shift) is a bad record.
    pub max_len: Option<usize>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            format: Format::Auto,
            train_on_inputs: false,
            on_bad_line: OnBadLine::Error,
            vocab_size: None,
            max_len: None,
        }
    }
}

/// The checks of [`DatasetOptions::vocab_size`] and [`DatasetOptions::max_len`] on one example.
pub fn check_example(e: &Example, vocab_size: Option<usize>, max_len: Option<usize>) -> Result<()> {
    if let Some(v) = vocab_size {
        if let Some((i, &t)) = e
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= v)
        {
            bail!("token id {t} at position {i} is not below the model's vocabulary size {v}");
        }
        if let Some((i, &l)) = e
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l != IGNORE_INDEX && (l < 0 || l as u64 >= v as u64))
        {
            bail!("label {l} at position {i} is not below the model's vocabulary size {v}");
        }
    }
    let n = max_len.unwrap_or(usize::MAX).min(e.labels.len());
    if !e.labels[..n].iter().skip(1).any(|&l| l != IGNORE_INDEX) {
        bail!(
            "no loss target{} (every label after the first token is -100{})",
            match max_len {
                Some(m) if m < e.labels.len() => format!(" in the first {m} tokens"),
                _ => String::new(),
            },
            if e.len() < 2 {
                ", or the row has one token"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// The result of loading a dataset file.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// `file:line: problem` for every skipped record.
    pub skipped: Vec<String>,
    /// The format used (detected or given).
    pub format: Option<Format>,
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

fn field<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    v.get(k)
        .with_context(|| format!("missing field `{k}`"))?
        .as_str()
        .with_context(|| format!("field `{k}` must be a string"))
}

/// Segments of text: (text, is_response).
fn segments(v: &Value, fmt: Format, tok: &dyn TextTokenizer) -> Result<Vec<(String, bool)>> {
    Ok(match fmt {
        Format::Alpaca => {
            let ins = field(v, "instruction")?;
            let input = match v.get("input") {
                None | Some(Value::Null) => "",
                Some(x) => x.as_str().context("field `input` must be a string")?,
            };
            let prompt = if input.is_empty() {
                ALPACA_NO_INPUT.replace("{instruction}", ins)
            } else {
                ALPACA_WITH_INPUT
                    .replace("{instruction}", ins)
                    .replace("{input}", input)
            };
            vec![(prompt, false), (field(v, "output")?.to_string(), true)]
        }
        Format::PromptCompletion => vec![
            (field(v, "prompt")?.to_string(), false),
            (field(v, "completion")?.to_string(), true),
        ],
        Format::Text => vec![(field(v, "text")?.to_string(), true)],
        Format::Chat => {
            let msgs = v
                .get("messages")
                .or_else(|| v.get("conversations"))
                .and_then(Value::as_array)
                .context("`messages` must be a list of {role, content}")?;
            let mut m = Vec::with_capacity(msgs.len());
            for (i, x) in msgs.iter().enumerate() {
                let role = x
                    .get("role")
                    .or_else(|| x.get("from"))
                    .and_then(Value::as_str)
                    .with_context(|| format!("message {i} has no string `role`"))?;
                let content = x
                    .get("content")
                    .or_else(|| x.get("value"))
                    .and_then(Value::as_str)
                    .with_context(|| format!("message {i} has no string `content`"))?;
                let role = match role {
                    "human" => "user",
                    "gpt" => "assistant",
                    r => r,
                };
                m.push(Message {
                    role: role.to_string(),
                    content: content.to_string(),
                });
            }
            if !m.iter().any(|x| x.role == "assistant") {
                bail!("the conversation has no assistant message");
            }
            chat_segments(&m, tok)?
        }
        Format::Auto | Format::Pretokenized => unreachable!(),
    })
}

/// Split a rendered conversation into prompt and assistant parts by rendering
/// growing prefixes: the text between "history + generation prompt" and
/// "history + this assistant turn" is the assistant's.
fn chat_segments(m: &[Message], tok: &dyn TextTokenizer) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut done = String::new();
    for (i, msg) in m.iter().enumerate() {
        if msg.role != "assistant" {
            continue;
        }
        let prompt = tok.render_chat(&m[..i], true)?;
        let full = tok.render_chat(&m[..=i], false)?;
        let Some(p_rest) = prompt.strip_prefix(done.as_str()) else {
            bail!("the chat template does not render conversations prefix-consistently");
        };
        let Some(reply) = full.strip_prefix(prompt.as_str()) else {
            bail!("the chat template's generation prompt is not a prefix of the rendered reply");
        };
        if !p_rest.is_empty() {
            out.push((p_rest.to_string(), false));
        }
        out.push((reply.to_string(), true));
        done = full;
    }
    // trailing non-assistant turns are not trained on and dropped
    Ok(out)
}

/// Tokenize one record into an example.
pub fn record_to_example(
    v: &Value,
    fmt: Format,
    tok: &dyn TextTokenizer,
    train_on_inputs: bool,
) -> Result<Example> {
    let segs = segments(v, fmt, tok)?;
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    // A chat template writes its own BOS (if any) into the text.
    if fmt != Format::Chat {
        if let Some(b) = tok.bos_id() {
            ids.push(b);
            labels.push(IGNORE_INDEX);
        }
    }
    let mut last_response: Vec<u32> = Vec::new();
    for (text, resp) in &segs {
        let t = tok.encode(text)?;
        let train = *resp || train_on_inputs;
        labels.extend(
            t.iter()
                .map(|&x| if train { x as i64 } else { IGNORE_INDEX }),
        );
        if *resp {
            last_response = t.clone();
        }
        ids.extend(t);
    }
    // EOS so the model learns to stop, unless the reply already ends its turn
    // with it (chat templates close turns with e.g. `<|im_end|>` + newline).
    if let Some(e) = tok.eos_id() {
        if ids.last() != Some(&e) && !last_response.contains(&e) {
            ids.push(e);
            labels.push(e as i64);
        }
    }
    if ids.is_empty() {
        bail!("the record tokenizes to nothing");
    }
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// Records of a JSONL file or JSON array with their line numbers (for a JSON
/// array: the element index + 1). Unparseable JSONL lines (bad JSON or
/// invalid UTF-8) come back as `Err`, so `--on-bad-line skip` can skip them.
fn records(bytes: &[u8]) -> Result<Vec<(usize, Result<Value>)>> {
    if bytes.trim_ascii_start().starts_with(b"[") {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let at = e.valid_up_to();
            let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
            anyhow::anyhow!("line {line}: invalid UTF-8 (byte offset {at})")
        })?;
        let arr: Vec<Value> = serde_json::from_str(text).context("invalid JSON array")?;
        return Ok(arr
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect());
    }
    Ok(bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.trim_ascii().is_empty())
        .map(|(i, l)| {
            let v = std::str::from_utf8(l)
                .map_err(|e| {
                    anyhow::anyhow!("invalid UTF-8 at byte {} of the line", e.valid_up_to())
                })
                .and_then(|l| {
                    serde_json::from_str::<Value>(l)
                        .map_err(|e| anyhow::anyhow!("invalid JSON: {e}"))
                });
            (i + 1, v)
        })
        .collect())
}

/// Load and tokenize a dataset file. `tok` may be `None` only for pre-tokenized data.
pub fn load(
    path: &Path,
    opts: &DatasetOptions,
    tok: Option<&dyn TextTokenizer>,
) -> Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display().to_string();
    let recs = records(&bytes).with_context(|| name.clone())?;
    let mut fmt = opts.format;
    let mut out = Dataset::default();
    for (line, rec) in recs {
        let res = rec.and_then(|v| {
            if fmt == Format::Auto {
                fmt = Format::detect(&v).with_context(|| {
                    "cannot detect the data format from this record's keys (expected input_ids, \
                     messages, instruction+output, prompt+completion or text; or pass --data-format)"
                })?;
            }
            if fmt == Format::Pretokenized {
                return crate::pretokenized::parse_jsonl(&v.to_string(), "record")
                    .map(|mut e| e.remove(0));
            }
            let t = tok.context("this data format needs a tokenizer")?;
            record_to_example(&v, fmt, t, opts.train_on_inputs)
        })
        .and_then(|e| check_example(&e, opts.vocab_size, opts.max_len).map(|()| e));
        match res {
            Ok(e) => out.examples.push(e),
            Err(e) => {
                let msg = format!("{name}:{line}: {e:#}");
                match opts.on_bad_line {
                    OnBadLine::Error => bail!(msg),
                    OnBadLine::Skip => out.skipped.push(msg),
                }
            }
        }
    }
    out.format = Some(fmt);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes as tokens (+3), BOS 1, EOS 2; a ChatML-like template.
    pub struct ByteTok {
        pub bos: bool,
    }

    impl TextTokenizer for ByteTok {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(|b| b as u32 + 3).collect())
        }
        fn bos_id(&self) -> Option<u32> {
            self.bos.then_some(1)
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

    fn decode_trained(e: &Example) -> String {
        e.labels
            .iter()
            .filter(|&&l| l >= 3)
            .map(|&l| (l - 3) as u8 as char)
            .collect()
    }

    #[test]
    fn formats_mask_prompts_and_append_eos() {
        let tok = ByteTok { bos: true };
        let v: Value = serde_json::from_str(r#"{"prompt":"Q?","completion":"A."}"#).unwrap();
        let e = record_to_example(&v, Format::PromptCompletion, &tok, false).unwrap();
        assert_eq!(e.input_ids[0], 1);
        assert_eq!(*e.input_ids.last().unwrap(), 2);
        assert_eq!(*e.labels.last().unwrap(), 2);
        assert_eq!(decode_trained(&e), "A.");
        assert_eq!(e.labels[..3], [-100, -100, -100]);
        let e = record_to_example(&v, Format::PromptCompletion, &tok, true).unwrap();
        assert_eq!(decode_trained(&e), "Q?A.");

        let v: Value = serde_json::from_str(
            r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"x"},{"role":"assistant","content":"z"}]}"#,
        )
        .unwrap();
        assert_eq!(Format::detect(&v), Some(Format::Chat));
        let e = record_to_example(&v, Format::Chat, &tok, false).unwrap();
        assert_eq!(decode_trained(&e), "yo</>z</>");
        assert_eq!(e.input_ids[0], b'<' as u32 + 3, "no BOS added to chat text");
        let all: String = e.input_ids[..e.len() - 1]
            .iter()
            .map(|&t| (t - 3) as u8 as char)
            .collect();
        assert_eq!(
            all,
            tok.render_chat(
                &[
                    Message {
                        role: "system".into(),
                        content: "S".into()
                    },
                    Message {
                        role: "user".into(),
                        content: "hi".into()
                    },
                    Message {
                        role: "assistant".into(),
                        content: "yo".into()
                    },
                    Message {
                        role: "user".into(),
                        content: "x".into()
                    },
                    Message {
                        role: "assistant".into(),
                        content: "z".into()
                    },
                ],
                false
            )
            .unwrap()
        );

        let v: Value =
            serde_json::from_str(r#"{"instruction":"Do","input":"","output":"ok"}"#).unwrap();
        assert_eq!(Format::detect(&v), Some(Format::Alpaca));
        let e = record_to_example(&v, Format::Alpaca, &ByteTok { bos: false }, false).unwrap();
        assert_eq!(decode_trained(&e), "ok");
        assert!(
            !String::from_utf8(e.input_ids.iter().map(|&t| (t.max(3) - 3) as u8).collect())
                .unwrap()
                .contains("### Input")
        );
        let v: Value = serde_json::from_str(r#"{"text":"abc"}"#).unwrap();
        let e = record_to_example(&v, Format::Text, &ByteTok { bos: false }, false).unwrap();
        assert_eq!(e.input_ids, [100, 101, 102, 2]);
    }

    #[test]
    fn bad_lines_are_reported_and_skipped_or_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\":\"a\",\"completion\":\"b\"}\n{oops\n\n{\"prompt\":\"a\"}\n{\"prompt\":\"c\",\"completion\":\"d\"}\n",
        )
        .unwrap();
        let tok = ByteTok { bos: false };
        let mut o = DatasetOptions {
            on_bad_line: OnBadLine::Skip,
            ..Default::default()
        };
        let l = load(&p, &o, Some(&tok)).unwrap();
        assert_eq!(l.examples.len(), 2);
        assert_eq!(l.skipped.len(), 2);
        assert!(l.skipped[0].contains("d.jsonl:2"), "{:?}", l.skipped);
        assert!(l.skipped[1].contains("d.jsonl:4") && l.skipped[1].contains("completion"));
        assert_eq!(l.format, Some(Format::PromptCompletion));
        o.on_bad_line = OnBadLine::Error;
        let e = load(&p, &o, Some(&tok)).unwrap_err();
        assert!(format!("{e:#}").contains("d.jsonl:2"), "{e:#}");
        // pre-tokenized needs no tokenizer
        std::fs::write(&p, "{\"input_ids\":[1,2]}\n").unwrap();
        let l = load(&p, &o, None).unwrap();
        assert_eq!(l.examples[0].labels, [1, 2]);
        std::fs::write(&p, "{\"foo\":1}\n").unwrap();
        assert!(format!("{:#}", load(&p, &o, None).unwrap_err()).contains("detect"));
    }
}
