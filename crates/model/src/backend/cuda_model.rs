//! A [`Model`]'s frozen weights copied to a CUDA device.

use anyhow::Result;

use super::cuda::{CudaBackend, CudaEmbed, CudaLinear};
use super::{Backend, LayerW, Weights};
use crate::model::{Model, Net};

/// The device copies of every frozen weight plus the backend that holds them.
pub(crate) struct CudaModel {
    pub be: CudaBackend,
    embed: CudaEmbed,
    layers: Vec<LayerW<CudaBackend>>,
    norm: <CudaBackend as Backend>::Buf,
    lm_head: CudaLinear,
    ordinal: usize,
}

impl CudaModel {
    pub fn new(m: &Model, ordinal: usize) -> Result<Self> {
        let be = super::cuda::open(ordinal)?;
        let (v, h) = (m.vocab_size(), m.hidden_size());
        let embed = be.prepare_embed(&m.embed_tokens, v, h)?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let lin: Vec<CudaLinear> = l
                .linears
                .iter()
                .map(|w| be.prepare_linear(w))
                .collect::<Result<_>>()?;
            layers.push(LayerW {
                input_layernorm: be.upload(&l.input_layernorm)?,
                post_attention_layernorm: be.upload(&l.post_attention_layernorm)?,
                qk_norm: match &l.qk_norm {
                    Some((q, k)) => Some((be.upload(q)?, be.upload(k)?)),
                    None => None,
                },
                linears: lin
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("seven linears"))?,
            });
        }
        let norm = be.upload(&m.norm)?;
        let lm_head = be.prepare_linear(&m.lm_head)?;
        Ok(CudaModel {
            be,
            embed,
            layers,
            norm,
            lm_head,
            ordinal,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn net<'a>(&'a self, m: &'a Model) -> Net<'a, CudaBackend> {
        Net {
            m,
            be: &self.be,
            w: Weights {
                embed: &self.embed,
                layers: &self.layers,
                norm: &self.norm,
                lm_head: &self.lm_head,
            },
            gather: None,
        }
    }
}
