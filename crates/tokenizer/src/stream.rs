//! Streaming detokenization that never emits half a UTF-8 character.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte character (an emoji is
//! often 2-4 tokens); decoding such a prefix yields U+FFFD. We decode a small window
//! of recent tokens and only emit text once it no longer ends in a replacement
//! character, keeping one earlier chunk of context so tokenizers that strip leading
//! spaces (SentencePiece) still produce the right spacing.

use crate::{Result, Tokenizer};

#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    tokens: Vec<u32>,
    prev: usize,
    cur: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Push one generated token; returns the text that became complete, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        let prev_text = if self.cur > self.prev {
            tok.decode(&self.tokens[self.prev..self.cur], true)?
        } else {
            String::new()
        };
        self.tokens.push(id);
        let text = tok.decode(&self.tokens[self.prev..], true)?;
        if text.len() > prev_text.len() && !text.ends_with('\u{FFFD}') {
            // Byte offsets: prev_text is a prefix of text for the tokenizers we support;
            // fall back to char-boundary search if not.
            let mut at = prev_text.len();
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let out = text[at..].to_string();
            self.prev = self.cur;
            self.cur = self.tokens.len();
            Ok(Some(out))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still pending at the end (possibly with replacement characters).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let prev_text = if self.cur > self.prev {
            tok.decode(&self.tokens[self.prev..self.cur], true)?
        } else {
            String::new()
        };
        let text = tok.decode(&self.tokens[self.prev..], true)?;
        self.prev = self.tokens.len();
        self.cur = self.tokens.len();
        if text.len() > prev_text.len() {
            let mut at = prev_text.len();
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            Ok(Some(text[at..].to_string()))
        } else {
            Ok(None)
        }
    }

    /// All tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}
