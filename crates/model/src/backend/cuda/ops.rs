//! The [`Backend`] operations on the device: uploads, frozen and LoRA linears,
//! RMSNorm, RoPE, flash-style attention, SwiGLU, chunked cross-entropy, AdamW.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{
    bf16_bits, f32_to_bf16_bits, grid_for, orig_dtype_code, CudaBackend, CudaEmbed, CudaLinear,
    DevWeight, LinearInner,
};
use super::{ATTN_THREADS, CE_CHUNK_BYTES, MAX_HEAD_DIM, ROW_THREADS};
use crate::backend::{AdamWStep, Backend, CeOut, LoraOp};
use crate::ops::attention::AttnShape;
use crate::ops::linear::{FrozenLinear, FrozenWeight};

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<u32>;
    type Linear = CudaLinear;
    type Embed = CudaEmbed;

    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.cc.0, self.cc.1
        )
    }

    fn upload(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        self.up(x)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<CudaSlice<u32>> {
        self.up(ids)
    }
    fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(x)
            .map_err(|e| anyhow!("cuda:{}: download: {e:?}", self.ordinal))
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.alloc::<f32>(n)
    }
    fn len(&self, x: &CudaSlice<f32>) -> usize {
        x.len()
    }
    fn add_assign(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        assert_eq!(acc.len(), x.len(), "add_assign: sizes");
        let (a, b, n) = (self.ptr(acc), self.ptr(x), x.len() as i64);
        self.launch("add_inplace", grid_for(x.len(), 256), &[&a, &b, &n])
    }
    fn scale(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
        let (a, n) = (self.ptr(x), x.len() as i64);
        self.launch("scale_inplace", grid_for(x.len(), 256), &[&a, &s, &n])
    }
    fn rows(
        &self,
        x: &CudaSlice<f32>,
        cols: usize,
        r0: usize,
        r1: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.alloc_raw::<f32>((r1 - r0) * cols)?;
        self.stream
            .memcpy_dtod(&x.slice(r0 * cols..r1 * cols), &mut out)
            .map_err(|e| anyhow!("{e:?}"))?;
        Ok(out)
    }
    fn append(&self, cache: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        let old = cache.len();
        let mut out = self.alloc_raw::<f32>(old + x.len())?;
        if old > 0 {
            self.stream
                .memcpy_dtod(&*cache, &mut out.slice_mut(0..old))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        self.stream
            .memcpy_dtod(x, &mut out.slice_mut(old..old + x.len()))
            .map_err(|e| anyhow!("{e:?}"))?;
        *cache = out;
        Ok(())
    }

    fn prepare_linear(&self, w: &FrozenLinear) -> Result<CudaLinear> {
        let weight = match &w.weight {
            FrozenWeight::F32(v) => DevWeight::Bf16(self.up(&f32_to_bf16_bits(v))?),
            FrozenWeight::BF16(v) => DevWeight::Bf16(self.up(&bf16_bits(v))?),
            FrozenWeight::Ggml(g) => bail!(
                "native GGUF weights ({}) are CPU-only for now; use --quant nf4 (or none/bf16) \
                 with --device cuda",
                g.ggml_type()
            ),
            FrozenWeight::Quant(q) => {
                let (absmax, codes, nabs, nmap, offset, nbs) = match &q.absmax {
                    qlora_quant::Absmax::Plain(a) => (Some(self.up(a)?), None, None, None, 0.0, 1),
                    qlora_quant::Absmax::Double(d) => (
                        None,
                        Some(self.up(&d.codes)?),
                        Some(self.up(&d.nested_absmax)?),
                        Some(self.up(&d.nested_map)?),
                        d.offset,
                        d.nested_blocksize as i32,
                    ),
                };
                DevWeight::Q4 {
                    packed: self.up(&q.packed)?,
                    absmax,
                    codes,
                    nested_absmax: nabs,
                    nested_map: nmap,
                    offset,
                    nested_bs: nbs,
                    table: self.up(&qlora_quant::code_table(q.quant_type))?,
                    blocksize: q.blocksize as i32,
                    // rounded through the recorded dtype, as the CPU path does
                    dtype: orig_dtype_code(q.dtype),
                }
            }
        };
        let bias = w.bias.as_deref().map(|b| self.up(b)).transpose()?;
        Ok(CudaLinear(Arc::new(LinearInner {
            out_features: w.out_features,
            in_features: w.in_features,
            weight,
            bias,
        })))
    }

    fn prepare_embed(&self, w: &FrozenWeight, rows: usize, cols: usize) -> Result<CudaEmbed> {
        Ok(match w {
            FrozenWeight::F32(v) => CudaEmbed::F32(self.up(v)?),
            FrozenWeight::BF16(v) => CudaEmbed::Bf16(self.up(&bf16_bits(v))?),
            other => {
                let mut buf = vec![0f32; rows * cols];
                other.rows_f32(0, rows, cols, &mut buf);
                CudaEmbed::F32(self.up(&buf)?)
            }
        })
    }

    fn embed(&self, e: &CudaEmbed, ids: &[u32], h: usize) -> Result<CudaSlice<f32>> {
        let t = ids.len();
        let out = self.alloc_raw::<f32>(t * h)?;
        let idp = self.up(ids)?;
        let (ip, op, hh, tt) = (self.ptr(&idp), self.ptr(&out), h as i32, t as i64);
        let (name, tp) = match e {
            CudaEmbed::F32(s) => ("embed_f32", self.ptr(s)),
            CudaEmbed::Bf16(s) => ("embed_bf16", self.ptr(s)),
        };
        self.launch(name, grid_for(t * h, 256), &[&tp, &ip, &hh, &op, &tt])?;
        Ok(out)
    }

    fn linear_forward(
        &self,
        w: &CudaLinear,
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let w = &*w.0;
        assert_eq!(x.len(), t * w.in_features, "linear forward: input size");
        let y = self.alloc_raw::<f32>(t * w.out_features)?;
        self.linear_fwd_ptr(w, self.ptr(x), t, self.ptr(&y))?;
        Ok(y)
    }

    fn linear_backward_input(
        &self,
        w: &CudaLinear,
        dy: &CudaSlice<f32>,
        t: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let w = &*w.0;
        assert_eq!(dy.len(), t * w.out_features, "linear backward: dy size");
        assert_eq!(dx.len(), t * w.in_features, "linear backward: dx size");
        self.linear_bwd_ptr(w, self.ptr(dy), t, self.ptr(dx))
    }

    fn lora_forward(
        &self,
        op: &LoraOp<Self>,
        x: &CudaSlice<f32>,
        t: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let (r, i, o) = (op.r, op.in_features, op.out_features);
        let xd = self.dropped(op, x)?;
        let xin = self.ptr(xd.as_ref().unwrap_or(x));
        let xa = self.alloc_raw::<f32>(t * r)?;
        let (ap, bp, xap, yp) = (self.ptr(op.a), self.ptr(op.b), self.ptr(&xa), self.ptr(y));
        self.sgemm(t, r, i, xin, false, ap, true, xap, 0.0, 1.0)?;
        self.sgemm(t, o, r, xap, false, bp, true, yp, 1.0, op.scale)?;
        Ok(xa)
    }

    fn lora_backward(
        &self,
        op: &LoraOp<Self>,
        x: &CudaSlice<f32>,
        xa: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        t: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (r, i, o) = (op.r, op.in_features, op.out_features);
        let db = self.alloc_raw::<f32>(o * r)?;
        let dxa = self.alloc_raw::<f32>(t * r)?;
        let da = self.alloc_raw::<f32>(r * i)?;
        let (dyp, xap, bp, ap) = (self.ptr(dy), self.ptr(xa), self.ptr(op.b), self.ptr(op.a));
        let (dbp, dxap, dap, dxp) = (self.ptr(&db), self.ptr(&dxa), self.ptr(&da), self.ptr(dx));
        self.sgemm(o, r, t, dyp, true, xap, false, dbp, 0.0, op.scale)?;
        self.sgemm(t, r, o, dyp, false, bp, false, dxap, 0.0, op.scale)?;
        let xd = self.dropped(op, x)?;
        let xin = self.ptr(xd.as_ref().unwrap_or(x));
        self.sgemm(r, i, t, dxap, true, xin, false, dap, 0.0, 1.0)?;
        if op.dropout <= 0.0 {
            self.sgemm(t, i, r, dxap, false, ap, false, dxp, 1.0, 1.0)?;
        } else {
            let tmp = self.alloc_raw::<f32>(t * i)?;
            let tp = self.ptr(&tmp);
            self.sgemm(t, i, r, dxap, false, ap, false, tp, 0.0, 1.0)?;
            let (n, acc) = ((t * i) as i64, 1i32);
            let (mp, inf) = (op.mask_ids.map_or(0, |m| self.ptr(m)), i as i32);
            self.launch(
                "dropout",
                grid_for(t * i, 256),
                &[&tp, &dxp, &op.dropout_key, &op.dropout, &mp, &inf, &acc, &n],
            )?;
        }
        Ok((da, db))
    }

    fn rmsnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let h = w.len();
        let t = x.len() / h;
        let y = self.alloc_raw::<f32>(x.len())?;
        let rstd = self.alloc_raw::<f32>(t)?;
        let (xp, wp, yp, rp, hh) = (
            self.ptr(x),
            self.ptr(w),
            self.ptr(&y),
            self.ptr(&rstd),
            h as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("rmsnorm_fwd", cfg, &[&xp, &wp, &eps, &hh, &yp, &rp])?;
        Ok((y, rstd))
    }

    fn rmsnorm_backward_add(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let h = w.len();
        let t = x.len() / h;
        let (dyp, xp, wp, rp, dxp, hh) = (
            self.ptr(dy),
            self.ptr(x),
            self.ptr(w),
            self.ptr(rstd),
            self.ptr(dx),
            h as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("rmsnorm_bwd_add", cfg, &[&dyp, &xp, &wp, &rp, &hh, &dxp])
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        heads: usize,
        d: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        inverse: bool,
    ) -> Result<()> {
        let rows = x.len() / (heads * d);
        let (xp, cp, sp) = (self.ptr(x), self.ptr(cos), self.ptr(sin));
        let (hh, dd, inv, rr) = (heads as i32, d as i32, inverse as i32, rows as i64);
        self.launch(
            "rope",
            grid_for(rows * heads * d / 2, 256),
            &[&xp, &hh, &dd, &cp, &sp, &inv, &rr],
        )
    }

    fn attention_forward(
        &self,
        sh: &AttnShape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        seg: Option<&CudaSlice<u32>>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        ensure!(
            sh.d <= MAX_HEAD_DIM,
            "head_dim {} is above the CUDA attention kernel's limit {MAX_HEAD_DIM}",
            sh.d
        );
        let out = self.alloc_raw::<f32>(sh.b * sh.q_len * sh.heads * sh.d)?;
        let lse = self.alloc_raw::<f32>(sh.b * sh.heads * sh.q_len)?;
        let segp = seg.map_or(0, |s| self.ptr(s));
        let (qp, kp, vp, op, lp) = (
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(&out),
            self.ptr(&lse),
        );
        let ints = [
            sh.q_len as i32,
            sh.k_len as i32,
            sh.q_offset as i32,
            sh.heads as i32,
            sh.kv_heads as i32,
            sh.d as i32,
            sh.window.map_or(0, |w| w as i32),
        ];
        let scale = (sh.d as f32).powf(-0.5);
        let cfg = LaunchConfig {
            grid_dim: (sh.q_len as u32, sh.heads as u32, sh.b as u32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: ATTN_THREADS * 4,
        };
        self.launch(
            "attn_fwd",
            cfg,
            &[
                &qp, &kp, &vp, &segp, &ints[0], &ints[1], &ints[2], &ints[3], &ints[4], &ints[5],
                &ints[6], &scale, &op, &lp,
            ],
        )?;
        Ok((out, lse))
    }

    fn attention_backward(
        &self,
        sh: &AttnShape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        saved: &CudaSlice<f32>,
        seg: Option<&CudaSlice<u32>>,
        dout: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let delta = self.alloc_raw::<f32>(sh.b * sh.heads * sh.q_len)?;
        let dq = self.alloc_raw::<f32>(q.len())?;
        let dk = self.alloc::<f32>(k.len())?;
        let dv = self.alloc::<f32>(v.len())?;
        let (op, dop, deltap) = (self.ptr(out), self.ptr(dout), self.ptr(&delta));
        let (ql, hh, dd) = (sh.q_len as i32, sh.heads as i32, sh.d as i32);
        let grid = (sh.q_len as u32, sh.heads as u32, sh.b as u32);
        self.launch(
            "attn_bwd_delta",
            LaunchConfig {
                grid_dim: grid,
                block_dim: (32 * (sh.d.div_ceil(32).min(8)) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[&op, &dop, &ql, &hh, &dd, &deltap],
        )?;
        let segp = seg.map_or(0, |s| self.ptr(s));
        let (qp, kp, vp, lp) = (self.ptr(q), self.ptr(k), self.ptr(v), self.ptr(saved));
        let (dqp, dkp, dvp) = (self.ptr(&dq), self.ptr(&dk), self.ptr(&dv));
        let ints = [
            sh.q_len as i32,
            sh.k_len as i32,
            sh.q_offset as i32,
            sh.heads as i32,
            sh.kv_heads as i32,
            sh.d as i32,
            sh.window.map_or(0, |w| w as i32),
        ];
        let scale = (sh.d as f32).powf(-0.5);
        self.launch(
            "attn_bwd",
            LaunchConfig {
                grid_dim: grid,
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 2 * ATTN_THREADS * 4,
            },
            &[
                &qp, &kp, &vp, &segp, &dop, &lp, &deltap, &ints[0], &ints[1], &ints[2], &ints[3],
                &ints[4], &ints[5], &ints[6], &scale, &dqp, &dkp, &dvp,
            ],
        )?;
        Ok((dq, dk, dv))
    }

    fn swiglu_forward(&self, g: &CudaSlice<f32>, u: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let m = self.alloc_raw::<f32>(g.len())?;
        let (gp, up, mp, n) = (self.ptr(g), self.ptr(u), self.ptr(&m), g.len() as i64);
        self.launch("swiglu_fwd", grid_for(g.len(), 256), &[&gp, &up, &mp, &n])?;
        Ok(m)
    }

    fn swiglu_backward(
        &self,
        dm: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let dg = self.alloc_raw::<f32>(g.len())?;
        let du = self.alloc_raw::<f32>(g.len())?;
        let (dmp, gp, up, dgp, dup, n) = (
            self.ptr(dm),
            self.ptr(g),
            self.ptr(u),
            self.ptr(&dg),
            self.ptr(&du),
            g.len() as i64,
        );
        self.launch(
            "swiglu_bwd",
            grid_for(g.len(), 256),
            &[&dmp, &gp, &up, &dgp, &dup, &n],
        )?;
        Ok((dg, du))
    }

    fn cross_entropy(
        &self,
        lm_head: &CudaLinear,
        x: &CudaSlice<f32>,
        labels: &[i64],
        s: usize,
        grad_denominator: Option<f32>,
    ) -> Result<CeOut<Self>> {
        let w = &*lm_head.0;
        let (t, vocab, h) = (labels.len(), w.out_features, w.in_features);
        assert_eq!(x.len(), t * h, "cross_entropy: x size");
        // Shifted targets (position p predicts labels[p+1] within its row).
        let targets: Vec<i32> = (0..t)
            .map(|p| {
                if (p + 1) % s == 0 {
                    -1
                } else {
                    let l = labels[p + 1];
                    if l < 0 {
                        -1
                    } else {
                        l as i32
                    }
                }
            })
            .collect();
        let count = targets.iter().filter(|&&v| v >= 0).count();
        let tgt = self.up(&targets)?;
        let losses = self.alloc::<f64>(t)?;
        let dx = match grad_denominator {
            Some(_) => Some(self.alloc::<f32>(t * h)?),
            None => None,
        };
        let chunk = (CE_CHUNK_BYTES / 4 / vocab.max(1)).clamp(1, t.max(1));
        let logits = self.alloc_raw::<f32>(chunk * vocab)?;
        let lp = self.ptr(&logits);
        let (xp, tp, lossp) = (self.ptr(x), self.ptr(&tgt), self.ptr(&losses));
        let inv = grad_denominator.map_or(0.0, |d| 1.0 / d);
        let want = grad_denominator.is_some() as i32;
        let vv = vocab as i32;
        let mut r0 = 0;
        while r0 < t {
            let rows = chunk.min(t - r0);
            self.linear_fwd_ptr(w, xp + (r0 * h * 4) as u64, rows, lp)?;
            let (tpr, lossr) = (tp + (r0 * 4) as u64, lossp + (r0 * 8) as u64);
            self.launch(
                "cross_entropy_rows",
                LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (ROW_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[&lp, &tpr, &vv, &inv, &want, &lossr],
            )?;
            if let Some(dx) = &dx {
                self.linear_bwd_ptr(w, lp, rows, self.ptr(dx) + (r0 * h * 4) as u64)?;
            }
            r0 += rows;
        }
        let per_row = self
            .stream
            .clone_dtoh(&losses)
            .map_err(|e| anyhow!("{e:?}"))?;
        let sum: f64 = per_row[..t].iter().sum();
        Ok(CeOut { sum, count, dx })
    }

    fn adamw(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        st: &AdamWStep,
    ) -> Result<()> {
        let n = p.len();
        let (pp, gp, mp, vp, nn) = (self.ptr(p), self.ptr(g), self.ptr(m), self.ptr(v), n as i64);
        self.launch(
            "adamw",
            grid_for(n, 256),
            &[
                &pp,
                &gp,
                &mp,
                &vp,
                &st.decay,
                &st.w1,
                &st.beta2,
                &st.w2,
                &st.step_size,
                &st.bc2_sqrt,
                &st.eps,
                &nn,
            ],
        )
    }

    fn sq_norm(&self, x: &CudaSlice<f32>) -> Result<f64> {
        let out = self.alloc::<f64>(1)?;
        let (xp, op, n) = (self.ptr(x), self.ptr(&out), x.len() as i64);
        let blocks = x.len().div_ceil(256).clamp(1, 1024) as u32;
        self.launch(
            "sq_sum",
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[&xp, &n, &op],
        )?;
        let v = self.stream.clone_dtoh(&out).map_err(|e| anyhow!("{e:?}"))?;
        Ok(v[0])
    }
}
