//! Incremental decoding with a KV cache (batch 1): feed the prompt, then one
//! token at a time; each call returns the logits of its last position.

use anyhow::{ensure, Result};
use qlora_lora::Adapter;

use crate::model::{AdapterView, Batch, LayerKv, Model};

/// Keys/values of every layer for the positions fed so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    /// The adapter of this sequence, converted once (keyed by its address).
    adapter: Option<(usize, AdapterView)>,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forget everything (start a new sequence).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::default());
        self.len = 0;
        self.adapter = None;
    }
}

impl Model {
    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); self.layers.len()],
            len: 0,
            adapter: None,
        }
    }

    /// Run `tokens` at positions `cache.len()..` and return the logits `[vocab]`
    /// of the last one. The adapter must be the same on every call of a sequence.
    pub fn forward_step(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "forward_step needs at least one token");
        ensure!(
            cache.layers.len() == self.layers.len(),
            "KV cache was made for another model ({} layers, this one has {})",
            cache.layers.len(),
            self.layers.len()
        );
        let start = cache.len as u32;
        let batch = Batch {
            input_ids: vec![tokens.to_vec()],
            labels: vec![vec![-100; tokens.len()]],
            position_ids: Some(vec![(start..start + tokens.len() as u32).collect()]),
            segment_ids: None,
        };
        let key = adapter.map(|a| a as *const Adapter as usize);
        if cache.adapter.as_ref().map(|c| c.0) != key {
            cache.adapter = match adapter {
                Some(a) => Some((a as *const Adapter as usize, self.adapter_view(a)?)),
                None => None,
            };
        }
        let ad = cache.adapter.as_ref().map(|c| &c.1);
        let ctx = self.ctx(&batch, None)?;
        let mut x = self.embed(tokens.iter().copied());
        for (l, kv) in cache.layers.iter_mut().enumerate() {
            x = self.layer_forward(l, &x, &ctx, ad, false, Some(kv)).0;
        }
        cache.len += tokens.len();
        let h = self.hidden_size();
        let last = &x[(tokens.len() - 1) * h..];
        let (logits, _, _) = self.head(last, 1);
        Ok(logits)
    }
}
