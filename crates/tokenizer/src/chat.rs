//! Hugging Face chat templates (Jinja) rendered with minijinja.
//!
//! transformers renders with `trim_blocks=True, lstrip_blocks=True`, the loop-controls
//! extension, a `raise_exception(msg)` global and `strftime_now(fmt)`; templates also
//! call Python string methods (`.strip()`, `.startswith()`, …), which minijinja-contrib's
//! pycompat callback provides. Variables: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`.

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::{Result, TokenizerError};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Bounds for rendering a template from a downloaded file: a template with
/// nested loops must fail with a clear error, never hang or fill memory.
/// Real chat templates use a few thousand units of fuel per turn and render a
/// few KB; these limits are far above that and far below harm.
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 200_000;
/// Base fuel (for the template's own code outside the message loop).
pub const TEMPLATE_FUEL_BASE: u64 = 2_000_000;
/// Nesting depth of macros, includes and blocks.
pub const TEMPLATE_RECURSION_LIMIT: usize = 64;
/// Rendered output beyond the messages' own text.
pub const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// An `io::Write` that refuses to grow past a limit.
struct Bounded {
    out: String,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        // minijinja writes whole UTF-8 pieces of str
        self.out.push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A chat template source and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    source: String,
    origin: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)` for the common directives templates use (%d %m %Y %y %b %B %H %M %S %%), UTC.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    pub fn new(source: String, origin: String) -> Self {
        ChatTemplate { source, origin }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn err(&self, e: Error) -> TokenizerError {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        TokenizerError::Template {
            origin: self.origin.clone(),
            msg,
        }
    }

    /// Render for `messages` the way `tokenizer.apply_chat_template(..., tokenize=False)` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let mut env = Environment::new();
        let text: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        env.set_fuel(Some(TEMPLATE_FUEL_BASE.saturating_add(
            TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64 + 1),
        )));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", &self.source)
            .map_err(|e| self.err(e))?;
        let tpl = env.get_template("chat").map_err(|e| self.err(e))?;
        let limit = TEMPLATE_OUTPUT_BASE.saturating_add(text.saturating_mul(4));
        let mut w = Bounded {
            out: String::new(),
            limit,
            exceeded: false,
        };
        let res = tpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            },
            &mut w,
        );
        if w.exceeded {
            return Err(TokenizerError::Template {
                origin: self.origin.clone(),
                msg: format!(
                    "the rendered chat exceeds {limit} bytes (four times the messages' text plus 1 MiB); \
                     the template is not a usable chat template"
                ),
            });
        }
        match res {
            Ok(_) => Ok(w.out),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(TokenizerError::Template {
                origin: self.origin.clone(),
                msg: "rendering the chat template ran out of its step budget (runaway loops?); \
                      the template is not a usable chat template"
                    .into(),
            }),
            Err(e) => Err(self.err(e)),
        }
    }
}

impl crate::Tokenizer {
    /// Token ids of `input` as `qlora tokenize` shows them. Plain text is encoded with the
    /// tokenizer's own special tokens (BOS where the model adds one), as a prompt is.
    /// With `chat`, the input is a JSON list of `{"role", "content"}` messages (or an object
    /// with such a `messages` list), otherwise the whole text is one user message; it is
    /// rendered with the chat template (with the generation prompt unless the last message
    /// is the assistant's) and encoded as it stands, since the template writes its own
    /// special tokens.
    pub fn tokenize_input(&self, input: &str, chat: bool) -> Result<Vec<u32>> {
        if !chat {
            return self.encode(input, true);
        }
        let messages = parse_messages(input).unwrap_or_else(|| vec![ChatMessage::user(input)]);
        let gen = messages.last().is_none_or(|m| m.role != "assistant");
        let text = self.apply_chat_template(&messages, gen)?;
        self.encode(&text, false)
    }
}

/// `[{"role", "content"}, …]` or `{"messages": [...]}`; `None` if `s` is neither.
fn parse_messages(s: &str) -> Option<Vec<ChatMessage>> {
    let v: serde_json::Value = serde_json::from_str(s.trim()).ok()?;
    let list = match &v {
        serde_json::Value::Array(_) => v,
        serde_json::Value::Object(o) => o.get("messages")?.clone(),
        _ => return None,
    };
    serde_json::from_value(list).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(src.into(), "t.jinja".into()).render(msgs, true, "<s>", "</s>")
    }

    #[test]
    fn runaway_templates_fail_fast_with_a_clear_error() {
        let msgs = [ChatMessage::user("hi")];
        let t = std::time::Instant::now();
        // nested loops: 10^12 iterations if unbounded
        let e = render(
            "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
            &msgs,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("t.jinja") && e.contains("step budget"), "{e}");
        // huge output
        let e = render(
            "{% for a in range(10000) %}{% for b in range(10000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
            &msgs,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds") || e.contains("step budget"), "{e}");
        // unbounded recursion through a macro
        let e = render(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            &msgs,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("t.jinja"), "{e}");
        assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
        // an ordinary template still renders
        let ok = render(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            &msgs,
        )
        .unwrap();
        assert_eq!(ok, "<|user|>hi<|assistant|>");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-23 14:05:09 UTC
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S", 1721743509),
            "23 Jul 2024 14:05:09"
        );
        assert_eq!(strftime("%B %d, %y %%", 0), "January 01, 70 %");
        // Leap day.
        assert_eq!(strftime("%Y-%m-%d", 951782400), "2000-02-29");
    }
}
