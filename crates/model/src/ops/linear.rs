//! The frozen base linear `y = x Wᵀ (+ bias)`.
//!
//! `W` stays in its storage format (4-bit blockwise, bf16 or f32) and is
//! expanded to f32 one tile of rows at a time right before the product, so a
//! 4-bit model never holds more than one tile of full-precision weights. The
//! backward returns only the input gradient `dy W`: the base is frozen, so a
//! weight gradient would be pure waste (candle's stock matmul backward would
//! compute one).

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use super::{gemm_view, View};

/// Elements of W expanded per tile (4 MiB of f32).
const TILE_ELEMS: usize = 1 << 20;

/// The dtype a 4-bit weight dequantizes to before use (bitsandbytes' recorded
/// `dtype`): values are computed in f32 and rounded to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrigDType {
    F32,
    F16,
    BF16,
}

impl OrigDType {
    #[inline]
    fn round(self, v: f32) -> f32 {
        match self {
            OrigDType::F32 => v,
            OrigDType::F16 => f16::from_f32(v).to_f32(),
            OrigDType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }
}

/// Per-block scales of a 4-bit weight, plain or double-quantized (FORMATS §1.5).
#[derive(Debug, Clone)]
pub enum Absmax {
    F32(Vec<f32>),
    Double {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        nested_map: Vec<f32>,
        offset: f32,
        nested_blocksize: usize,
    },
}

impl Absmax {
    #[inline]
    pub fn get(&self, block: usize) -> f32 {
        match self {
            Absmax::F32(v) => v[block],
            Absmax::Double {
                codes,
                nested_absmax,
                nested_map,
                offset,
                nested_blocksize,
            } => {
                nested_map[codes[block] as usize] * nested_absmax[block / nested_blocksize]
                    + *offset
            }
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double { codes, .. } => codes.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len() * 4,
            Absmax::Double {
                codes,
                nested_absmax,
                nested_map,
                ..
            } => codes.len() + 4 * (nested_absmax.len() + nested_map.len() + 1),
        }
    }
}

/// A bitsandbytes-layout 4-bit weight `[rows, cols]` (NF4 or FP4 code table):
/// element `i` of the row-major flattening is `code[nibble(i)] · absmax[i / blocksize]`,
/// nibble(i) the high nibble of byte i/2 for even i (FORMATS §1.3-1.4).
#[derive(Debug, Clone)]
pub struct Packed4 {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
    pub code: [f32; 16],
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub dtype: OrigDType,
}

impl Packed4 {
    /// Check the internal sizes; `what` names the tensor in the error.
    pub fn validate(&self, what: &str) -> anyhow::Result<()> {
        let n = self.rows * self.cols;
        anyhow::ensure!(self.blocksize > 0, "{what}: blocksize 0");
        anyhow::ensure!(
            self.packed.len() == n.div_ceil(2),
            "{what}: {} packed bytes for {n} elements (expected {})",
            self.packed.len(),
            n.div_ceil(2)
        );
        anyhow::ensure!(
            self.absmax.len() == n.div_ceil(self.blocksize),
            "{what}: {} absmax blocks for {n} elements of blocksize {} (expected {})",
            self.absmax.len(),
            self.blocksize,
            n.div_ceil(self.blocksize)
        );
        if let Absmax::Double {
            codes,
            nested_absmax,
            nested_map,
            nested_blocksize,
            ..
        } = &self.absmax
        {
            anyhow::ensure!(*nested_blocksize > 0, "{what}: nested blocksize 0");
            anyhow::ensure!(
                nested_map.len() == 256,
                "{what}: nested_quant_map has {} entries (expected 256)",
                nested_map.len()
            );
            anyhow::ensure!(
                nested_absmax.len() == codes.len().div_ceil(*nested_blocksize),
                "{what}: nested_absmax has {} entries (expected {})",
                nested_absmax.len(),
                codes.len().div_ceil(*nested_blocksize)
            );
        }
        Ok(())
    }

    /// Dequantize rows `r0..r1` into `out` (`(r1-r0)·cols` values).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let cols = self.cols;
        assert!(r1 <= self.rows && out.len() == (r1 - r0) * cols);
        let bs = self.blocksize;
        let chunk_len = cols.max(1) * (4096 / cols.max(1)).max(1);
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let start = r0 * cols + ci * chunk_len;
                let mut i = start;
                let end = start + chunk.len();
                while i < end {
                    let block = i / bs;
                    let scale = self.absmax.get(block);
                    let bend = ((block + 1) * bs).min(end);
                    for j in i..bend {
                        let byte = self.packed[j / 2];
                        let nib = if j % 2 == 0 { byte >> 4 } else { byte & 15 };
                        chunk[j - start] = self.dtype.round(self.code[nib as usize] * scale);
                    }
                    i = bend;
                }
            });
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes() + 64
    }
}

/// How a frozen weight `[rows, cols]` is held.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    F32(Arc<Vec<f32>>),
    BF16(Arc<Vec<bf16>>),
    /// Read from a bnb-4bit checkpoint as stored.
    Q4(Arc<Packed4>),
    /// Quantized while loading by `qlora-quant` (bnb-exact NF4/FP4).
    Quant(Arc<qlora_quant::Quantized4>),
}

impl FrozenWeight {
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::F32(v) => v.len() * 4,
            FrozenWeight::BF16(v) => v.len() * 2,
            FrozenWeight::Q4(p) => p.bytes(),
            FrozenWeight::Quant(q) => {
                q.packed.len()
                    + match &q.absmax {
                        qlora_quant::Absmax::Plain(v) => v.len() * 4,
                        qlora_quant::Absmax::Double(d) => {
                            d.codes.len() + 4 * (d.nested_absmax.len() + d.nested_map.len() + 1)
                        }
                    }
            }
        }
    }
    /// Elements `start .. start + out.len()` of the row-major flattening as
    /// bf16 bits (round to nearest even; 4-bit weights dequantize straight to
    /// bf16 as bitsandbytes does for a bf16 compute dtype).
    pub fn elems_bf16(&self, start: usize, out: &mut [u16]) {
        use super::amx::bf16_bits;
        let n = out.len();
        match self {
            FrozenWeight::F32(w) => super::fastmath::to_bf16(&w[start..start + n], out),
            FrozenWeight::BF16(w) => out
                .iter_mut()
                .zip(&w[start..start + n])
                .for_each(|(o, v)| *o = v.to_bits()),
            FrozenWeight::Q4(p) => {
                let cols = p.cols.max(1);
                let (r0, r1) = (start / cols, (start + n).div_ceil(cols));
                let mut tmp = vec![0f32; (r1 - r0) * cols];
                p.dequantize_rows(r0, r1, &mut tmp);
                let off = start - r0 * cols;
                out.iter_mut()
                    .zip(&tmp[off..off + n])
                    .for_each(|(o, v)| *o = bf16_bits(*v));
            }
            FrozenWeight::Quant(q) => {
                q.dequantize_range::<bf16>(start, bytemuck::cast_slice_mut(out))
            }
        }
    }

    /// Rows `r0..r1` as f32 (`cols` per row) into `out`.
    pub fn rows_f32(&self, r0: usize, r1: usize, cols: usize, out: &mut [f32]) {
        match self {
            FrozenWeight::F32(w) => out.copy_from_slice(&w[r0 * cols..r1 * cols]),
            FrozenWeight::BF16(w) => out
                .iter_mut()
                .zip(&w[r0 * cols..r1 * cols])
                .for_each(|(o, v)| *o = v.to_f32()),
            FrozenWeight::Q4(p) => p.dequantize_rows(r0, r1, out),
            FrozenWeight::Quant(q) => q.dequantize_range_f32(r0 * cols, out),
        }
    }
}

/// The arithmetic of the frozen base products (like torch's
/// `set_float32_matmul_precision`: `Bf16` trades precision for speed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseCompute {
    /// f32 operands, f32 accumulation: follows the f32 reference exactly.
    #[default]
    F32,
    /// Weight and activations rounded to bf16, products accumulated in f32, on
    /// AMX tiles when the CPU has them (the f32 path otherwise).
    Bf16,
}

impl std::str::FromStr for BaseCompute {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "f32" | "fp32" => Ok(BaseCompute::F32),
            "bf16" => Ok(BaseCompute::Bf16),
            _ => anyhow::bail!("unknown compute dtype `{s}` (expected f32 or bf16)"),
        }
    }
}

/// A frozen linear layer: `weight` is `[out, in]` (PyTorch layout).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: FrozenWeight,
    pub bias: Option<Vec<f32>>,
    /// How the products with `weight` are computed.
    pub compute: BaseCompute,
}

impl FrozenLinear {
    /// Whether this call goes through the AMX bf16 kernels.
    fn use_amx(&self, t: usize) -> bool {
        self.compute == BaseCompute::Bf16
            && t > 0
            && self.in_features > 0
            && self.out_features > 0
            && super::amx::available()
    }

    fn tile_rows(&self) -> usize {
        (TILE_ELEMS / self.in_features.max(1)).clamp(1, self.out_features.max(1))
    }

    /// `y[t, out] = x[t, in] Wᵀ + bias`.
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * self.out_features];
        self.forward_into(x, t, &mut y);
        y
    }

    /// [`Self::forward`] into `y` (`t·out` values, overwritten).
    pub fn forward_into(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        assert_eq!(x.len(), t * i, "linear forward: input size");
        assert_eq!(y.len(), t * o, "linear forward: output size");
        let xv = View::mat(x, t, i, false);
        if self.use_amx(t) {
            super::amx::linear_forward(o, i, t, x, y, &|s, out| self.weight.elems_bf16(s, out));
        } else {
            self.forward_f32(xv, t, y);
        }
        if let Some(b) = &self.bias {
            y.par_chunks_mut(o)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
    }

    fn forward_f32(&self, xv: View, t: usize, y: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        match &self.weight {
            FrozenWeight::F32(w) => {
                gemm_view(t, o, i, xv, View::mat(w, i, o, true), y, 0, o, false, 1.0)
            }
            w => {
                let tr = self.tile_rows();
                let mut tile = vec![0f32; tr * i];
                let mut r0 = 0;
                while r0 < o {
                    let r1 = (r0 + tr).min(o);
                    let buf = &mut tile[..(r1 - r0) * i];
                    w.rows_f32(r0, r1, i, buf);
                    let wv = View::mat(buf, i, r1 - r0, true);
                    gemm_view(t, r1 - r0, i, xv, wv, y, r0, o, false, 1.0);
                    r0 = r1;
                }
            }
        }
    }

    /// `dx[t, in] += dy[t, out] W`: the input gradient only.
    pub fn backward_input(&self, dy: &[f32], t: usize, dx: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        assert_eq!(dy.len(), t * o, "linear backward: dy size");
        assert_eq!(dx.len(), t * i, "linear backward: dx size");
        if self.use_amx(t) {
            super::amx::linear_backward(o, i, t, dy, dx, &|s, out| self.weight.elems_bf16(s, out));
            return;
        }
        match &self.weight {
            FrozenWeight::F32(w) => gemm_view(
                t,
                i,
                o,
                View::mat(dy, t, o, false),
                View::mat(w, o, i, false),
                dx,
                0,
                i,
                true,
                1.0,
            ),
            w => {
                let tr = self.tile_rows();
                let mut tile = vec![0f32; tr * i];
                let mut r0 = 0;
                while r0 < o {
                    let r1 = (r0 + tr).min(o);
                    let buf = &mut tile[..(r1 - r0) * i];
                    w.rows_f32(r0, r1, i, buf);
                    let dyv = View {
                        data: dy,
                        off: r0,
                        rs: o,
                        cs: 1,
                    };
                    gemm_view(
                        t,
                        i,
                        r1 - r0,
                        dyv,
                        View::mat(buf, r1 - r0, i, false),
                        dx,
                        0,
                        i,
                        true,
                        1.0,
                    );
                    r0 = r1;
                }
            }
        }
    }

    /// The whole weight as f32 `[out, in]` (tests, merging).
    pub fn dense_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_features * self.in_features];
        self.weight
            .rows_f32(0, self.out_features, self.in_features, &mut w);
        w
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul_ref;
    use super::super::testutil::*;
    use super::*;

    const NF4: [f32; 16] = [
        -1.0,
        -0.696_192_8,
        -0.525_073_05,
        -0.394_917_5,
        -0.284_441_38,
        -0.184_773_43,
        -0.091_050_036,
        0.0,
        0.079_580_3,
        0.160_930_2,
        0.246_112_3,
        0.337_915_24,
        0.440_709_83,
        0.562_617,
        0.722_956_84,
        1.0,
    ];

    fn packed(rows: usize, cols: usize, seed: u64, double: bool) -> Packed4 {
        let n = rows * cols;
        let bytes: Vec<u8> = rand_vec(n.div_ceil(2), seed, 1.0)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        let nb = n.div_ceil(64);
        let absmax = if double {
            Absmax::Double {
                codes: (0..nb).map(|b| (b * 37 % 256) as u8).collect(),
                nested_absmax: rand_vec(nb.div_ceil(256), seed + 1, 1.0)
                    .iter()
                    .map(|v| v.abs() + 0.1)
                    .collect(),
                nested_map: (0..256).map(|k| (k as f32 - 127.0) / 128.0).collect(),
                offset: 0.5,
                nested_blocksize: 256,
            }
        } else {
            Absmax::F32(
                rand_vec(nb, seed + 2, 1.0)
                    .iter()
                    .map(|v| v.abs())
                    .collect(),
            )
        };
        let p = Packed4 {
            rows,
            cols,
            blocksize: 64,
            code: NF4,
            packed: bytes,
            absmax,
            dtype: OrigDType::F32,
        };
        p.validate("test").unwrap();
        p
    }

    /// Plain element-by-element dequantization.
    fn dequant_ref(p: &Packed4) -> Vec<f32> {
        (0..p.rows * p.cols)
            .map(|i| {
                let b = p.packed[i / 2];
                let nib = if i % 2 == 0 { b >> 4 } else { b & 15 };
                p.code[nib as usize] * p.absmax.get(i / 64)
            })
            .collect()
    }

    #[test]
    fn dequantize_rows_matches_reference_on_odd_shapes() {
        for &(r, c, dq) in &[
            (7, 80, false),
            (33, 160, true),
            (5, 3, false),
            (300, 100, true),
        ] {
            let p = packed(r, c, 9, dq);
            let full = dequant_ref(&p);
            let mut out = vec![0f32; r * c];
            p.dequantize_rows(0, r, &mut out);
            assert_eq!(out, full);
            let mut part = vec![0f32; 2 * c];
            p.dequantize_rows(r - 2, r, &mut part);
            assert_eq!(&part[..], &full[(r - 2) * c..]);
        }
    }

    #[test]
    fn tiled_q4_forward_and_backward_match_dense_reference() {
        let (o, i, t) = (70, 64, 9);
        let p = packed(o, i, 3, true);
        let w = dequant_ref(&p);
        let bias = rand_vec(o, 4, 1.0);
        let q = FrozenLinear {
            out_features: o,
            in_features: i,
            weight: FrozenWeight::Q4(Arc::new(p)),
            bias: Some(bias.clone()),
            compute: BaseCompute::F32,
        };
        let x = rand_vec(t * i, 5, 1.0);
        let y = q.forward(&x, t);
        let mut yr = vec![0f32; t * o];
        matmul_ref(t, o, i, &x, false, &w, true, &mut yr, false, 1.0);
        for r in 0..t {
            for c in 0..o {
                yr[r * o + c] += bias[c];
            }
        }
        assert!(max_abs_diff(&y, &yr) < 1e-4);
        let dy = rand_vec(t * o, 6, 1.0);
        let mut dx = vec![1f32; t * i];
        q.backward_input(&dy, t, &mut dx);
        let mut dxr = vec![1f32; t * i];
        matmul_ref(t, i, o, &dy, false, &w, false, &mut dxr, true, 1.0);
        assert!(max_abs_diff(&dx, &dxr) < 1e-4);
        // Same through the dense f32 path.
        let d = FrozenLinear {
            weight: FrozenWeight::F32(Arc::new(w)),
            ..q.clone()
        };
        assert!(max_abs_diff(&d.forward(&x, t), &yr) < 1e-4);
    }

    #[test]
    fn backward_input_matches_finite_differences() {
        let (o, i, t) = (6, 5, 3);
        let w = rand_vec(o * i, 11, 1.0);
        let lin = FrozenLinear {
            out_features: o,
            in_features: i,
            weight: FrozenWeight::F32(Arc::new(w.clone())),
            bias: None,
            compute: BaseCompute::F32,
        };
        let x = rand_vec(t * i, 12, 1.0);
        let g = rand_vec(t * o, 13, 1.0); // loss = <g, y>
        let mut dx = vec![0f32; t * i];
        lin.backward_input(&g, t, &mut dx);
        let dir = rand_vec(t * i, 14, 1.0);
        let fd = directional_fd(&x, &dir, 1e-3, |xx| {
            let mut s = 0.0;
            for r in 0..t {
                for c in 0..o {
                    let y: f64 = (0..i).map(|k| xx[r * i + k] * w[c * i + k] as f64).sum();
                    s += y * g[r * o + c] as f64;
                }
            }
            s
        });
        assert!((fd - dot(&dx, &dir)).abs() < 1e-4);
    }
}
