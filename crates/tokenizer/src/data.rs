//! The data pipeline's view of a [`Tokenizer`] ([`qlora_data::formats::TextTokenizer`]):
//! what turning alpaca / chat / prompt-completion / text records into tokens needs.

use anyhow::Result;
use qlora_data::formats::{Message, TextTokenizer};

use crate::{ChatMessage, Tokenizer};

impl TextTokenizer for Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(Tokenizer::encode(self, text, false)?)
    }

    /// The BOS the tokenizer's post-processor would add (Llama's `<s>`; none for SmolLM2).
    fn bos_id(&self) -> Option<u32> {
        let with = Tokenizer::encode(self, "x", true).ok()?;
        let without = Tokenizer::encode(self, "x", false).ok()?;
        (with.len() > without.len() && with.ends_with(&without)).then(|| with[0])
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_to_id(t))
    }

    fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let m: Vec<ChatMessage> = messages
            .iter()
            .map(|x| ChatMessage::new(x.role.clone(), x.content.clone()))
            .collect();
        Ok(self.apply_chat_template(&m, add_generation_prompt)?)
    }
}
