//! The token sequences the logit checks (`export-gguf`'s read-back, `merge --requantize`'s
//! requantization error) run through both models.

use qlora_tokenizer::Tokenizer;

/// `texts` through `tok` (no special tokens), cut to one common length of at most
/// `max_len`; `None` without a tokenizer, when a text gives fewer than 4 tokens, or when an
/// id falls outside the model's `vocab` (the caller then uses
/// [`qlora_infer::check::pseudo_random_ids`]).
pub fn text_sequences(
    tok: Option<&Tokenizer>,
    texts: &[&str],
    max_len: usize,
    vocab: usize,
) -> Option<Vec<Vec<u32>>> {
    let tok = tok?;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(t, false).ok())
        .collect::<Option<_>>()?;
    let len = ids.iter().map(Vec::len).min()?.min(max_len);
    if len < 4 || ids.iter().flatten().any(|&i| i as usize >= vocab) {
        return None;
    }
    Some(
        ids.into_iter()
            .map(|mut v| {
                v.truncate(len);
                v
            })
            .collect(),
    )
}
