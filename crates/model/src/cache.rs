//! Incremental decoding with a KV cache (batch 1): feed the prompt, then one
//! token at a time; each call returns the logits of its last position.

use anyhow::{ensure, Result};
use qlora_lora::Adapter;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::batch::Batch;
use crate::model::{with_net, AdapterView, LayerKv, Model, Net};

/// The cached keys/values and adapter of one sequence on one backend.
pub(crate) struct KvState<B: Backend> {
    layers: Vec<LayerKv<B>>,
    /// The adapter of this sequence, converted once (keyed by its address).
    adapter: Option<(usize, AdapterView<B>)>,
}

impl<B: Backend> Default for KvState<B> {
    fn default() -> Self {
        KvState {
            layers: Vec::new(),
            adapter: None,
        }
    }
}

/// Per-device cache contents.
#[derive(Default)]
pub(crate) enum KvDev {
    #[default]
    Empty,
    Cpu(KvState<CpuBackend>),
    #[cfg(feature = "cuda")]
    Cuda(KvState<crate::backend::cuda::CudaBackend>),
}

/// Keys/values of every layer for the positions fed so far.
#[derive(Default)]
pub struct KvCache {
    n_layers: usize,
    dev: KvDev,
    len: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layers", &self.n_layers)
            .field("len", &self.len)
            .finish()
    }
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
        self.dev = KvDev::Empty;
        self.len = 0;
    }
}

/// The backend-specific state of a cache (created on first use).
pub(crate) trait KvSlot: Backend {
    fn slot(dev: &mut KvDev) -> &mut KvState<Self>;
}

impl KvSlot for CpuBackend {
    fn slot(dev: &mut KvDev) -> &mut KvState<Self> {
        if !matches!(dev, KvDev::Cpu(_)) {
            *dev = KvDev::Cpu(KvState::default());
        }
        match dev {
            KvDev::Cpu(s) => s,
            _ => unreachable!("set above"),
        }
    }
}

#[cfg(feature = "cuda")]
impl KvSlot for crate::backend::cuda::CudaBackend {
    fn slot(dev: &mut KvDev) -> &mut KvState<Self> {
        if !matches!(dev, KvDev::Cuda(_)) {
            *dev = KvDev::Cuda(KvState::default());
        }
        match dev {
            KvDev::Cuda(s) => s,
            _ => unreachable!("set above"),
        }
    }
}

impl Model {
    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            n_layers: self.layers.len(),
            dev: KvDev::Empty,
            len: 0,
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
            cache.n_layers == self.layers.len(),
            "KV cache was made for another model ({} layers, this one has {})",
            cache.n_layers,
            self.layers.len()
        );
        with_net!(self, |net| net.forward_step(cache, tokens, adapter))
    }
}

impl<B: KvSlot> Net<'_, B> {
    fn forward_step(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>> {
        let start = cache.len as u32;
        let batch = Batch {
            input_ids: vec![tokens.to_vec()],
            labels: vec![vec![-100; tokens.len()]],
            position_ids: Some(vec![(start..start + tokens.len() as u32).collect()]),
            segment_ids: None,
        };
        let fresh = cache.len == 0;
        let st = B::slot(&mut cache.dev);
        if fresh || st.layers.len() != self.m.layers.len() {
            st.layers = (0..self.m.layers.len())
                .map(|_| LayerKv::default())
                .collect();
        }
        let key = adapter.map(|a| a as *const Adapter as usize);
        if st.adapter.as_ref().map(|c| c.0) != key {
            st.adapter = match adapter {
                Some(a) => Some((
                    a as *const Adapter as usize,
                    self.m.adapter_view(self.be, a)?,
                )),
                None => None,
            };
        }
        let ad = st.adapter.as_ref().map(|c| &c.1);
        let ctx = self.ctx(&batch, None)?;
        let mut x = self.embed(tokens)?;
        for (l, kv) in st.layers.iter_mut().enumerate() {
            x = self.layer_forward(l, &x, &ctx, ad, false, Some(kv))?.0;
        }
        cache.len += tokens.len();
        let h = self.m.hidden_size();
        let n = tokens.len();
        let last = self.be.rows(&x, h, n - 1, n)?;
        let (nf, _) = self.final_norm(&last)?;
        let logits = self.be.linear_forward(self.w.lm_head, &nf, 1)?;
        self.be.download(&logits)
    }
}
