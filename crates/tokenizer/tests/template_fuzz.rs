//! Chat templates from downloaded files: random templates built from Jinja
//! pieces (loops, recursion, string growth, filters) and byte-mutated real
//! templates render or fail with an error naming the template — never a
//! panic, a hang or unbounded memory (fuel, recursion and output limits).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use qlora_tokenizer::{ChatMessage, ChatTemplate};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const PIECES: &[&str] = &[
    "{% for a in range(1000) %}",
    "{% for b in messages %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{% endif %}",
    "{{ m }}",
    "{{ messages[0]['content'] * 1000 }}",
    "{{ 'x' * 100000 }}",
    "{% set s = s ~ s %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}",
    "{{ f(0) }}",
    "{{ raise_exception('no') }}",
    "{{ bos_token }}",
    "{{ messages | length }}",
    "{{ (messages | tojson) * 50 }}",
    "{% for m in messages %}{{ m.role }}{% endfor %}",
    "{{ strftime_now('%Y') }}",
    "{{ m.content.strip() }}",
    "text",
    "{%",
    "}}",
];

fn msgs() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("be brief"),
        ChatMessage::user("hello there"),
        ChatMessage::assistant("hi"),
    ]
}

fn render(src: String) -> (Result<String, String>, Duration) {
    let t = Instant::now();
    let r = ChatTemplate::new(src, "chat_template.jinja".into())
        .render(&msgs(), true, "<s>", "</s>")
        .map_err(|e| e.to_string());
    (r, t.elapsed())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_templates_are_bounded(parts in prop::collection::vec(prop::sample::select(PIECES), 1..12)) {
        let (r, dt) = render(parts.concat());
        match r {
            Ok(s) => prop_assert!(s.len() <= (1 << 20) + 4 * 64, "{} bytes", s.len()),
            Err(e) => prop_assert!(e.contains("chat_template.jinja"), "{e}"),
        }
        prop_assert!(dt < Duration::from_secs(10), "took {dt:?}");
    }

    #[test]
    fn mutated_templates_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut b = CHATML.as_bytes().to_vec();
        for (i, x) in edits {
            let n = b.len();
            b[i % n] = x;
        }
        let (r, dt) = render(String::from_utf8_lossy(&b).into_owned());
        if let Err(e) = r {
            prop_assert!(e.contains("chat_template.jinja"), "{e}");
        }
        prop_assert!(dt < Duration::from_secs(10), "took {dt:?}");
    }
}
