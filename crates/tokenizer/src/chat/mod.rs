//! Hugging Face chat templates (Jinja) rendered with minijinja.
//!
//! transformers renders with `trim_blocks=True, lstrip_blocks=True`, the loop-controls
//! extension, a `raise_exception(msg)` global and `strftime_now(fmt)`; templates also
//! call Python string methods (`.strip()`, `.startswith()`, …), which minijinja-contrib's
//! pycompat callback provides. Variables: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`.

use minijinja::machinery::{self, Vm};
use minijinja::{Environment, Error, ErrorKind, Value};

mod bounded;
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

/// Memory one render may use: every value and byte of output the template
/// makes is charged against this budget before it is made (see
/// [`bounded`]), on top of a budget proportional to the messages' text.
pub const TEMPLATE_MEMORY_BASE: usize = 64 << 20;
/// Budget per byte of the messages' text (templates copy, trim and
/// concatenate the messages a few times each).
pub const TEMPLATE_MEMORY_PER_TEXT_BYTE: usize = 64;

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
        let text: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        // Bounded rendering: see `bounded` for what is charged and why.
        let budget = bounded::Budget::new(
            TEMPLATE_MEMORY_BASE.saturating_add(text.saturating_mul(TEMPLATE_MEMORY_PER_TEXT_BYTE)),
        );
        bounded::precheck(&self.source, "chat").map_err(|e| self.err(e))?;
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL_BASE.saturating_add(
            TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64 + 1),
        )));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        bounded::install(&mut env, &budget);
        env.add_template("chat", &self.source)
            .map_err(|e| self.err(e))?;
        let tpl = env.get_template("chat").map_err(|e| self.err(e))?;
        let compiled = machinery::get_compiled_template(&tpl);
        let instructions = bounded::rewrite(&compiled.instructions);
        let blocks = bounded::rewrite_blocks(&compiled.blocks);
        let root = Value::from_serialize(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        });
        let mut out = String::new();
        let res = Vm::new(&env)
            .eval(
                &instructions,
                root,
                &blocks,
                &mut machinery::make_string_output(&mut out),
                compiled.initial_auto_escape,
            )
            .map(|_| ());
        let limit = TEMPLATE_OUTPUT_BASE.saturating_add(text.saturating_mul(4));
        match res {
            Ok(()) if out.len() > limit => Err(TokenizerError::Template {
                origin: self.origin.clone(),
                msg: format!(
                    "the rendered chat exceeds {limit} bytes (four times the messages' text plus 1 MiB); \
                     the template is not a usable chat template"
                ),
            }),
            Ok(()) => Ok(out),
            Err(_) if budget.exceeded() => Err(TokenizerError::Template {
                origin: self.origin.clone(),
                msg: format!(
                    "rendering the chat template would make more than {} bytes of strings, lists and output \
                     (runaway string growth?); the template is not a usable chat template",
                    budget.limit()
                ),
            }),
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

    /// The same template rendered by plain minijinja (the settings of
    /// `render`, no budget).
    fn plain(src: &str, msgs: &[ChatMessage]) -> String {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.template_from_str(src)
            .unwrap()
            .render(minijinja::context! {
                messages => msgs, add_generation_prompt => true,
                bos_token => "<s>", eos_token => "</s>",
            })
            .unwrap()
    }

    /// The bounded renderer (rewritten operators, checked filters, methods
    /// and output) renders what minijinja renders: operators on numbers,
    /// strings and lists, slicing, jumps of loops/ifs/macros/short-circuits,
    /// captured blocks, filters with keyword arguments, Python methods.
    #[test]
    fn bounded_rendering_matches_minijinja() {
        let msgs = [
            ChatMessage::system("  be brief  "),
            ChatMessage::user("2+2?"),
            ChatMessage::assistant("4"),
        ];
        for src in [
            "{{ 1 + 2 }} {{ 2 * 3 }} {{ 1.5 + 1 }} {{ 'a' + 'b' }} {{ 'ab' * 3 }} {{ 3 * 'x' }} {{ [1] + [2, 3] }} {{ [1, 2] * 2 }} {{ 'a' ~ 1 ~ none }}",
            "{{ messages[1:] | map(attribute='role') | join(',') }} {{ 'hello'[1:3] }} {{ 'hello'[::-1] }} {{ messages[::2] | length }}",
            "{% for m in messages %}{% if loop.first %}[{% elif loop.last %}]{% else %}|{% endif %}{{ m.role }}{% else %}none{% endfor %}",
            "{% macro f(x, y='d') %}<{{ x ~ y }}>{% endmacro %}{{ f('a') }}{{ f('b', 'c') }}{% for m in messages if m.role != 'system' %}{{ f(m.content) }}{% endfor %}",
            "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s ~ m.content %}{% endfor %}{{ ns.n }}:{{ ns.s }}",
            "{% set x %}{% for m in messages %}{{ m.content|trim }};{% endfor %}{% endset %}{{ x|upper }}{% filter upper %}low{% endfilter %}",
            "{{ messages[0].content.strip() }}|{{ 'a-b'.replace('-', '+') }}|{{ ','.join(['x', 'y']) }}|{{ messages | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}",
            "{{ true and 'y' }} {{ false or 'z' }} {{ 'x' if messages else 'y' }} {{ 'lo'|indent(2) }} {{ '%s-%d'|format('a', 3) }} {{ [3,1,2]|sort|list }} {{ range(3)|batch(2)|list }}",
            "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}{{ m.role }}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}",
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ] {
            assert_eq!(render(src, &msgs).unwrap(), plain(src, &msgs), "{src}");
        }
    }

    /// Templates that double a value within their step budget fail fast
    /// with the budget error naming the template, whatever the growth path.
    #[test]
    fn exponential_growth_fails_fast_in_bounded_memory() {
        let msgs = [ChatMessage::user("hi")];
        let t = std::time::Instant::now();
        let loop60 = |body: &str| {
            // (a `set` inside a loop is local to the iteration: a namespace
            // carries the value from one iteration to the next)
            format!("{{% set ns = namespace(s='xy', l=[1]) %}}{{% for i in range(60) %}}{{% set s = ns.s %}}{{% set l = ns.l %}}{body}{{% set ns.s = s %}}{{% set ns.l = l %}}{{% endfor %}}{{{{ ns.s|length }}}}{{{{ ns.l|length }}}}")
        };
        for body in [
            "{% set s = s ~ s %}",
            "{% set s = s + s %}",
            "{% set s = s * 2 %}",
            "{% set s = 2 * s %}",
            "{% set s = [s, s]|join %}",
            "{% set s = [s, s]|join(s) %}",
            "{% set s = s|replace('x', 'xx') %}",
            "{% set s = s.replace('x', 'xx') %}",
            "{% set s = s.join([s, s]) %}",
            "{% set s = '%s%s'|format(s, s) %}",
            "{% set s = '{}{}'.format(s, s) %}",
            "{% set s %}{{ s }}{{ s }}{% endset %}",
            "{% set s = s|indent(s|length, true) %}",
            "{% set s = s|tojson|tojson %}",
            "{% set l = l + l %}",
            "{% set l = l * 2 %}",
            "{% set l = [l, l] %}{% set s = l|string %}",
            "{% set l = [l, l] %}{% set s = l|tojson %}",
            "{% set l = [l, l] %}{% set s = l ~ '' %}",
            "{% set l = [l, l] %}{% set s = l|pprint %}",
            "{% macro d(x) %}{{ x }}{{ x }}{% endmacro %}{% set s = d(s) %}",
        ] {
            let src = loop60(body);
            let e = match render(&src, &msgs) {
                Ok(out) => panic!("{body}: rendered {out:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("t.jinja") && (e.contains("more than") || e.contains("nested")),
                "{body}: {e}"
            );
        }
        // one call asking for a huge width, count or repetition
        for src in [
            "{{ 'x'|indent(1000000000000) }}",
            "{{ [1]|batch(1000000000000, 'x')|list }}",
            "{{ [1]|slice(1000000000000, 'x')|list }}",
            "{{ '%1000000000000s'|format('x') }}",
            "{% set n = 100000000 %}{{ 'x' * n }}",
            "{% set n = 1000000000000 %}{{ [1] * n }}",
            "{{ [] * 1000000000000 }}{{ 'x' * 4 }}",
        ] {
            match render(src, &msgs) {
                Ok(out) => assert!(out.len() < 1 << 20, "{src}"),
                Err(e) => assert!(e.to_string().contains("t.jinja"), "{src}: {e}"),
            }
        }
        // constant folding happens while compiling: checked before
        let e = render("{{ ('x' * 100000000) ~ ('x' * 100000000) }}", &msgs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.jinja") && e.contains("constant expressions"),
            "{e}"
        );
        let e = render("{{ ([1] * 100000) * 100000 ~ '' }}", &msgs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("constant expressions"), "{e}");
        // debug() would format the whole state
        assert!(render("{{ debug() }}", &msgs).is_err());
        assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());
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
