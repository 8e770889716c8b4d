//! The frozen base linear `y = x Wᵀ (+ bias)`.
//!
//! `W` stays in its storage format (4-bit blockwise, bf16 or f32) and is
//! expanded to f32 one tile of rows at a time right before the product (the
//! forward's tile written transposed), so a 4-bit model never holds more
//! than one tile of full-precision weights. The
//! backward returns only the input gradient `dy W`: the base is frozen, so a
//! weight gradient would be pure waste (candle's stock matmul backward would
//! compute one).

use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use super::{gemm_view, View};

/// Elements of W expanded per tile (4 MiB of f32), unless
/// [`TILE_MIN_ROWS`] rows take more.
pub const TILE_ELEMS: usize = 1 << 20;

/// The fewest rows a tile holds (where the weight has them): the forward's
/// product is `t x rows x cols` per tile and packs `x` again for each, which
/// at TinyLlama's down projection (cols 5632, 186 rows in 4 MiB) cost a
/// fifth of its rate (Zen 4, t 512: 129-145 GFLOP/s at 186 rows, 163-183
/// at 256).
pub const TILE_MIN_ROWS: usize = 256;

/// An f32 weight's forward reads it in place, as a transposed view, below
/// both of these (fewer positions than this, rows shorter than that); else
/// through a transposed tile like every other storage: copying costs a pass
/// over the weight, the row-major product saves more where the product is
/// long or the rows are (Zen 4, f32 `[o, i]` weight, in place vs tile,
/// GFLOP/s: t 512: 576x576 165-181 vs 199-202, 2048x2048 149-152 vs
/// 179-189, 5632x2048 160-164 vs 195-196, 2048x5632 171-172 vs 172-174;
/// the head at t 128: 49152x576 166-167 vs 158-160, 32000x2048 96-97 vs
/// 151-158).
pub const F32_IN_PLACE_BELOW_T: usize = 256;
/// See [`F32_IN_PLACE_BELOW_T`].
pub const F32_IN_PLACE_BELOW_COLS: usize = 1024;

/// Rows of a `[rows, cols]` weight expanded per tile: [`TILE_ELEMS`]
/// worth, in whole groups of [`T_GROUP`], at least [`TILE_MIN_ROWS`].
pub fn tile_rows(rows: usize, cols: usize) -> usize {
    let fit = TILE_ELEMS / cols.max(1) / T_GROUP * T_GROUP;
    fit.max(TILE_MIN_ROWS).min(rows).max(1)
}

thread_local! {
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A group of rows expanded before [`FrozenWeight::rows_f32_t`] writes them transposed.
    static ROW_GROUP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows expanded per task of [`FrozenWeight::rows_f32_t`]: each column of
/// the group lands as one 64-byte line of the transposed tile.
pub const T_GROUP: usize = super::transpose::GROUP_ROWS;

/// Runs `f` with this thread's f32 tile of at least `n` elements, kept from
/// call to call: every user overwrites the rows it reads (`rows_f32`), and a
/// fresh zeroed tile per call (up to [`TILE_ELEMS`], 4 MiB) was a `memset`
/// of every f32 weight's bytes on every product. The planner counts it as
/// the dequantization workspace, which is alive at the peak anyway.
fn with_tile<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    super::with_thread_local(&TILE, |tile| {
        if tile.len() < n {
            tile.resize(n, 0.0);
        }
        f(&mut tile[..n])
    })
}

/// How a frozen weight `[rows, cols]` is held.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    F32(Arc<Vec<f32>>),
    BF16(Arc<Vec<bf16>>),
    /// bnb-layout 4-bit (NF4/FP4), read from a pre-quantized checkpoint as stored
    /// or quantized while loading; expanded by `qlora-quant`'s kernels.
    Quant(Arc<qlora_quant::Quantized4>),
    /// A GGUF file's own ggml blocks (Q4_0 … Q6_K, F16, BF16), kept as stored
    /// (`--quant native`); expanded by [`super::ggml`]'s decoders.
    Ggml(Arc<super::ggml::GgmlWeight>),
}

impl FrozenWeight {
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::F32(v) => v.len() * 4,
            FrozenWeight::BF16(v) => v.len() * 2,
            FrozenWeight::Quant(q) => {
                q.packed.len()
                    + match &q.absmax {
                        qlora_quant::Absmax::Plain(v) => v.len() * 4,
                        qlora_quant::Absmax::Double(d) => {
                            d.codes.len() + 4 * (d.nested_absmax.len() + d.nested_map.len() + 1)
                        }
                    }
            }
            FrozenWeight::Ggml(g) => g.bytes(),
        }
    }
    /// Elements `start .. start + out.len()` of the row-major flattening as
    /// bf16 bits (round to nearest even; 4-bit weights dequantize straight to
    /// bf16 as bitsandbytes does for a bf16 compute dtype).
    pub fn elems_bf16(&self, start: usize, out: &mut [u16]) {
        let n = out.len();
        match self {
            FrozenWeight::F32(w) => super::fastmath::to_bf16(&w[start..start + n], out),
            FrozenWeight::BF16(w) => out
                .iter_mut()
                .zip(&w[start..start + n])
                .for_each(|(o, v)| *o = v.to_bits()),
            FrozenWeight::Quant(q) => {
                q.dequantize_range::<bf16>(start, bytemuck::cast_slice_mut(out))
            }
            FrozenWeight::Ggml(g) => g.elems_bf16(start, out),
        }
    }

    /// Whether `self` and `other` are the same stored weight (a tied embedding).
    pub fn same_storage(&self, other: &FrozenWeight) -> bool {
        match (self, other) {
            (FrozenWeight::F32(a), FrozenWeight::F32(b)) => Arc::ptr_eq(a, b),
            (FrozenWeight::BF16(a), FrozenWeight::BF16(b)) => Arc::ptr_eq(a, b),
            (FrozenWeight::Quant(a), FrozenWeight::Quant(b)) => Arc::ptr_eq(a, b),
            (FrozenWeight::Ggml(a), FrozenWeight::Ggml(b)) => Arc::ptr_eq(a, b),
            _ => false,
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
            FrozenWeight::Quant(q) => q.dequantize_rows_f32(r0, r1, out),
            FrozenWeight::Ggml(g) => {
                assert_eq!(cols, g.cols(), "ggml weight: row length");
                g.rows_f32(r0, r1, out)
            }
        }
    }
}

impl FrozenWeight {
    /// Rows `r0..r1` as f32, transposed: element `(r, c)` at
    /// `out[c * (r1 - r0) + r - r0]`, the `[cols, rows]` layout the forward's
    /// product `x Wᵀ` reads row by row. `gemm` runs 5-45% slower on f32 at
    /// the models' shapes when its right operand is a transposed view
    /// (Zen 4, t 512, NF4 forward through the row-major tile vs this one:
    /// 576x1536 140 -> 190, 2048x2048 115-130 -> 175-185, 5632x2048 115-120
    /// -> 175-190 GFLOP/s); writing the tile transposed costs a pass over
    /// each group of rows in cache (f32 weights: see [`F32_IN_PLACE_BELOW_T`]).
    pub fn rows_f32_t(&self, r0: usize, r1: usize, cols: usize, out: &mut [f32]) {
        let nr = r1 - r0;
        assert_eq!(out.len(), nr * cols, "rows_f32_t: output length");
        let dst = super::amx::SendPtr(out.as_mut_ptr());
        let group = |g: usize| {
            let (a, b) = (r0 + g * T_GROUP, (r0 + (g + 1) * T_GROUP).min(r1));
            super::with_thread_local(&ROW_GROUP, |buf| {
                buf.resize((b - a) * cols, 0.0);
                super::in_task(|| self.rows_f32(a, b, cols, buf));
                // SAFETY: group g alone writes rows a..b of every column,
                // `out[c*nr + (a - r0) ..][..b - a]` for `c < cols`: inside
                // `out` as `b - r0 <= nr`.
                unsafe {
                    super::transpose::write_transposed(
                        super::fastmath::Isa::best(),
                        buf,
                        b - a,
                        cols,
                        dst.get().add(a - r0),
                        nr,
                    )
                }
            })
        };
        let groups = nr.div_ceil(T_GROUP);
        if nr * cols >= 1 << 16 && super::may_parallelize() {
            (0..groups).into_par_iter().for_each(group);
        } else {
            (0..groups).for_each(group);
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

impl BaseCompute {
    /// What this setting runs on here, for a run's header: the base
    /// products' arithmetic and instructions on this CPU (in this process:
    /// `QLORA_NO_AMX` / `QLORA_TILE_ISA` count), and, where f32 was asked
    /// for on a CPU that has bf16 products, how to get them (on a Zen 4 the
    /// bf16 products run twice as fast as the f32 ones; on AMX more). The
    /// CPU backend's products only; a GPU run describes its own device.
    pub fn describe_on_cpu(self) -> String {
        let f32_isa = match super::fastmath::Isa::best() {
            super::fastmath::Isa::V4 => "AVX-512",
            super::fastmath::Isa::V3 => "AVX2",
            super::fastmath::Isa::Generic => "baseline SIMD",
        };
        let tiles = |t: super::amx::TileIsa| match t {
            super::amx::TileIsa::Amx => "AMX tiles",
            super::amx::TileIsa::Avx512Bf16 => "AVX512-BF16",
            super::amx::TileIsa::Reference => "the plain reference of the bf16 tile products",
        };
        match (self, super::amx::isa()) {
            (BaseCompute::Bf16, Some(t)) => format!("base products bf16 on {}", tiles(t)),
            (BaseCompute::Bf16, None) => format!(
                "base products f32 on {f32_isa}: bf16 asked for, but no bf16 products in this \
                 process (the CPU has neither AMX nor AVX512-BF16, or QLORA_NO_AMX / QLORA_TILE_ISA \
                 turned them off)"
            ),
            (BaseCompute::F32, Some(t)) => format!(
                "base products f32 on {f32_isa} (--compute-dtype bf16 runs them on {}: faster, \
                 bf16 operands)",
                tiles(t)
            ),
            (BaseCompute::F32, None) => format!("base products f32 on {f32_isa}"),
        }
    }
}

/// The packed bf16 copy [`FrozenLinear::packed_for_amx`] makes of an f32 or
/// ggml weight, once, shared by the linear's clones (the weight is frozen).
#[derive(Debug, Clone, Default)]
pub struct Bf16Copy(Arc<std::sync::OnceLock<Arc<super::amx::PackedWeight>>>);

/// A frozen linear layer: `weight` is `[out, in]` (PyTorch layout).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: FrozenWeight,
    pub bias: Option<Vec<f32>>,
    /// How the products with `weight` are computed.
    pub compute: BaseCompute,
    /// Lazily made bf16 copy of `weight` (AMX heads); `Default` when built.
    pub bf16_copy: Bf16Copy,
}

impl FrozenLinear {
    /// Whether this call goes through the AMX bf16 kernels.
    pub(crate) fn use_amx(&self, t: usize) -> bool {
        self.compute == BaseCompute::Bf16
            && t > 0
            && self.in_features > 0
            && self.out_features > 0
            && super::amx::available()
    }

    /// The weight rounded to bf16 and packed for both AMX directions
    /// ([`super::amx::PackedWeight`]), for a caller about to run several
    /// products with it (the lm_head, or the f32 tied embedding as the head:
    /// a forward and an input gradient per chunk of positions); `None` when
    /// there is nothing to gain (not on the AMX path, a bias, a bf16 or 4-bit
    /// weight, which stays as stored). Made once and kept ([`Bf16Copy`]):
    /// converting SmolLM2's 49152 × 576 head took ~25-40 ms per step, and
    /// packing its panels per chunk and direction about as long as the
    /// products. Twice the bf16 weight's bytes.
    pub fn packed_for_amx(&self, t: usize) -> Option<Arc<super::amx::PackedWeight>> {
        if !self.use_amx(t)
            || self.bias.is_some()
            || !matches!(self.weight, FrozenWeight::F32(_) | FrozenWeight::Ggml(_))
        {
            return None;
        }
        let p = self.bf16_copy.0.get_or_init(|| {
            Arc::new(super::amx::PackedWeight::new(
                self.out_features,
                self.in_features,
                &Bf16Source(self),
            ))
        });
        Some(p.clone())
    }

    /// Runs `f` with this weight as the tile products' bf16 source.
    pub(crate) fn with_bf16_source<R>(&self, f: impl FnOnce(&super::amx::WeightBf16) -> R) -> R {
        f(&Bf16Source(self))
    }

    fn tile_rows(&self) -> usize {
        tile_rows(self.out_features, self.in_features)
    }

    /// `y[t, out] = x[t, in] Wᵀ + bias`.
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        if self.use_amx(t) {
            // a fresh vector the product writes (no zeroing first)
            return Self::forward_many(&[self], x, t)
                .pop()
                .expect("one linear, one output");
        }
        let mut y = vec![0f32; t * self.out_features];
        self.forward_into(x, t, &mut y);
        y
    }

    /// [`Self::forward`] of several linears on the same input (a layer's
    /// q/k/v, or gate/up): on AMX one bf16 pack of `x` and one parallel
    /// region for all of them; otherwise one after the other.
    pub fn forward_many(ws: &[&FrozenLinear], x: &[f32], t: usize) -> Vec<Vec<f32>> {
        let i = ws.first().map_or(0, |w| w.in_features);
        if !ws.iter().all(|w| w.use_amx(t) && w.in_features == i) {
            return ws.iter().map(|w| w.forward(x, t)).collect();
        }
        assert_eq!(x.len(), t * i, "linear forward: input size");
        let mut ys =
            Self::with_bf16_sources(ws, |outs| super::amx::linear_forward_multi(i, t, x, outs));
        for (w, y) in ws.iter().zip(&mut ys) {
            w.add_bias(y);
        }
        ys
    }

    /// `(out_features, bf16 source)` of each linear, for the AMX products.
    fn with_bf16_sources<R>(
        ws: &[&FrozenLinear],
        f: impl FnOnce(&[(usize, &super::amx::WeightBf16)]) -> R,
    ) -> R {
        let sources: Vec<Bf16Source> = ws.iter().map(|w| Bf16Source(w)).collect();
        let outs: Vec<(usize, &super::amx::WeightBf16)> = ws
            .iter()
            .zip(&sources)
            .map(|(w, f)| (w.out_features, f as &super::amx::WeightBf16))
            .collect();
        f(&outs)
    }

    /// Whether the LoRA terms can go inside these linears' products
    /// ([`Self::forward_many_lora`], [`Self::backward_input_up`]): all on
    /// the AMX path with one input width, and none with a bias (a LoRA term
    /// is added after the bias elsewhere; here it would come first).
    pub fn can_add_low_rank(ws: &[&FrozenLinear], t: usize) -> bool {
        let i = ws.first().map_or(0, |w| w.in_features);
        ws.iter()
            .all(|w| w.use_amx(t) && w.in_features == i && w.bias.is_none())
    }

    /// [`Self::forward_many`] with each LoRA module's down-projection made
    /// during the input's pack and its up-projection added inside the
    /// product ([`super::amx::linear_forward_lora`]): returns the outputs
    /// and each module's `x·Aᵀ`, bit for bit the separate passes.
    ///
    /// # Panics
    /// Unless [`Self::can_add_low_rank`]; if the sizes do not match.
    pub fn forward_many_lora(
        ws: &[&FrozenLinear],
        x: &[f32],
        t: usize,
        terms: Vec<Option<super::amx::LoraTerm>>,
    ) -> (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) {
        assert!(
            Self::can_add_low_rank(ws, t),
            "forward_many_lora: not on the AMX path, or a bias"
        );
        let i = ws.first().map_or(0, |w| w.in_features);
        Self::with_bf16_sources(ws, |outs| {
            super::amx::linear_forward_lora(i, t, x, outs, terms)
        })
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            y.par_chunks_mut(self.out_features)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
    }

    /// [`Self::forward`] into `y` (`t·out` values, overwritten).
    pub fn forward_into(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        assert_eq!(x.len(), t * i, "linear forward: input size");
        assert_eq!(y.len(), t * o, "linear forward: output size");
        let xv = View::mat(x, t, i, false);
        if self.use_amx(t) {
            super::amx::linear_forward(o, i, t, x, y, &Bf16Source(self));
        } else {
            self.forward_f32(xv, t, y);
        }
        self.add_bias(y);
    }

    fn forward_f32(&self, xv: View, t: usize, y: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        match &self.weight {
            FrozenWeight::F32(w) if t < F32_IN_PLACE_BELOW_T && i < F32_IN_PLACE_BELOW_COLS => {
                gemm_view(t, o, i, xv, View::mat(w, i, o, true), y, 0, o, false, 1.0)
            }
            w => with_tile(self.tile_rows() * i, |tile| {
                let tr = self.tile_rows();
                let mut r0 = 0;
                while r0 < o {
                    let r1 = (r0 + tr).min(o);
                    let buf = &mut tile[..(r1 - r0) * i];
                    w.rows_f32_t(r0, r1, i, buf);
                    let wv = View::mat(buf, i, r1 - r0, false);
                    gemm_view(t, r1 - r0, i, xv, wv, y, r0, o, false, 1.0);
                    r0 = r1;
                }
            }),
        }
    }

    /// `dy W` as a fresh vector, on the AMX path: written whole without
    /// zeroing it first; bit for bit [`Self::backward_input`] into zeros.
    ///
    /// # Panics
    /// Off the AMX path; if the sizes do not match.
    pub fn backward_input_new(&self, dy: &[f32], t: usize) -> Vec<f32> {
        let (o, i) = (self.out_features, self.in_features);
        assert!(self.use_amx(t), "backward_input_new: not on the AMX path");
        super::amx::linear_backward_new(o, i, t, dy, &Bf16Source(self))
    }

    /// The input gradient with a LoRA module's term `dxa·A` in the same
    /// products ([`super::amx::linear_backward_up`]): into `dx` (added) or
    /// a fresh vector, returned.
    ///
    /// # Panics
    /// Off the AMX path; if the sizes do not match.
    pub fn backward_input_up(
        &self,
        dy: &[f32],
        t: usize,
        dx: Option<&mut [f32]>,
        up: super::amx::InputUpTerm,
    ) -> Option<Vec<f32>> {
        let (o, i) = (self.out_features, self.in_features);
        assert!(self.use_amx(t), "backward_input_up: not on the AMX path");
        super::amx::linear_backward_up(o, i, t, dy, dx, &Bf16Source(self), up)
    }

    /// The input gradient with a LoRA module's whole `dy` side on the tile
    /// unit ([`super::amx::linear_backward_lora`]): `dx` (+)= `dy·W +
    /// s·dy·B·A`, into `dx` or a fresh vector (returned first), and the
    /// module's `dxa`, `dB`.
    ///
    /// # Panics
    /// Off the AMX path; if the sizes do not match.
    pub fn backward_input_lora(
        &self,
        dy: &[f32],
        t: usize,
        dx: Option<&mut [f32]>,
        lora: super::amx::LowRankBackward,
    ) -> (Option<Vec<f32>>, super::amx::LowRankGrads) {
        let (o, i) = (self.out_features, self.in_features);
        assert!(self.use_amx(t), "backward_input_lora: not on the AMX path");
        super::amx::linear_backward_lora(o, i, t, dy, dx, &Bf16Source(self), lora)
    }

    /// The MLP's gate (`wg`) and up (`wu`) input gradient from SwiGLU's
    /// backward of `dm` at `g`, `u`, with their LoRA modules' `dy` side
    /// ([`super::amx::linear_backward_swiglu_pair`]): a fresh `dx` and each
    /// module's `dxa`, `dB`.
    ///
    /// # Panics
    /// Off the AMX path; if the shapes do not match.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_swiglu_pair(
        wg: &FrozenLinear,
        wu: &FrozenLinear,
        dm: &[f32],
        g: &[f32],
        u: &[f32],
        t: usize,
        lg: Option<super::amx::LowRankBackward>,
        lu: Option<super::amx::LowRankBackward>,
    ) -> (
        Vec<f32>,
        Option<super::amx::LowRankGrads>,
        Option<super::amx::LowRankGrads>,
    ) {
        let (o, i) = (wg.out_features, wg.in_features);
        assert!(
            Self::can_add_low_rank(&[wg, wu], t) && wu.out_features == o,
            "backward_swiglu_pair: not a gate/up pair on the AMX path"
        );
        super::amx::linear_backward_swiglu_pair(
            o,
            i,
            t,
            dm,
            g,
            u,
            &Bf16Source(wg),
            &Bf16Source(wu),
            lg,
            lu,
        )
    }

    /// `dx[t, in] += dy[t, out] W`: the input gradient only.
    pub fn backward_input(&self, dy: &[f32], t: usize, dx: &mut [f32]) {
        let (o, i) = (self.out_features, self.in_features);
        assert_eq!(dy.len(), t * o, "linear backward: dy size");
        assert_eq!(dx.len(), t * i, "linear backward: dx size");
        if self.use_amx(t) {
            super::amx::linear_backward(o, i, t, dy, dx, &Bf16Source(self));
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
            w => with_tile(self.tile_rows() * i, |tile| {
                let tr = self.tile_rows();
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
            }),
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

/// A frozen linear's weight as the AMX products read it: bf16 elements
/// from any storage, and for 4-bit weights the interleaved rows writer
/// straight from the codes (no row-major bf16 copy between).
struct Bf16Source<'a>(&'a FrozenLinear);

impl Bf16Source<'_> {
    /// The 4-bit weight, when it is stored so (2-D, `[out, in]`).
    fn quant(&self) -> Option<&qlora_quant::Quantized4> {
        match &self.0.weight {
            FrozenWeight::Quant(q)
                if q.shape.as_slice() == [self.0.out_features, self.0.in_features] =>
            {
                Some(q)
            }
            _ => None,
        }
    }
}

impl super::amx::WeightSource for Bf16Source<'_> {
    fn elems(&self, start: usize, out: &mut [u16]) {
        self.0.weight.elems_bf16(start, out)
    }

    fn has_rows_interleaved(&self) -> bool {
        self.quant().is_some_and(|q| q.rows_interleaved_fast())
    }

    fn rows_interleaved(
        &self,
        width: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [u16],
        stride: usize,
    ) {
        match self.quant() {
            Some(q) if width.is_multiple_of(16) => q.dequantize_rows_interleaved_bf16_cols(
                rows.start,
                rows.len(),
                cols.start,
                cols.len(),
                out,
                stride,
            ),
            _ => super::amx::rows_interleaved_via_elems(self, width, rows, cols, out, stride),
        }
    }

    fn forward_panel(&self, cols: usize, r0: usize, nr: usize, ksteps: usize, out: &mut [u16]) {
        match self.quant() {
            Some(q) if q.rows_as_tile_columns_fast() => {
                q.dequantize_rows_as_tile_columns_bf16(r0, nr, ksteps, out)
            }
            _ => super::amx::forward_panel_via_elems(self, cols, r0, nr, ksteps, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul_ref;
    use super::super::testutil::*;
    use super::*;

    /// A random double-quantized NF4 weight `[rows, cols]` (through `qlora-quant`).
    fn quantized(rows: usize, cols: usize, seed: u64) -> qlora_quant::Quantized4 {
        let w = rand_vec(rows * cols, seed, 1.0);
        let opts = qlora_quant::QuantOptions::default();
        qlora_quant::quantize_4bit(qlora_quant::Input::F32(&w), &[rows, cols], &opts).unwrap()
    }

    #[test]
    fn the_run_header_says_which_products_run_and_how_to_get_bf16_ones() {
        let (f32d, bf16d) = (
            BaseCompute::F32.describe_on_cpu(),
            BaseCompute::Bf16.describe_on_cpu(),
        );
        let f32_isa = match crate::ops::fastmath::Isa::best() {
            crate::ops::fastmath::Isa::V4 => "AVX-512",
            crate::ops::fastmath::Isa::V3 => "AVX2",
            crate::ops::fastmath::Isa::Generic => "baseline SIMD",
        };
        assert!(
            f32d.starts_with(&format!("base products f32 on {f32_isa}")),
            "{f32d}"
        );
        match super::super::amx::isa() {
            Some(t) => {
                let on = match t {
                    super::super::amx::TileIsa::Amx => "AMX tiles",
                    super::super::amx::TileIsa::Avx512Bf16 => "AVX512-BF16",
                    super::super::amx::TileIsa::Reference => "reference",
                };
                assert!(bf16d.starts_with("base products bf16 on"), "{bf16d}");
                assert!(bf16d.contains(on), "{bf16d}");
                // f32 asked for where bf16 products exist: the header says how
                assert!(f32d.contains("--compute-dtype bf16 runs them on"), "{f32d}");
                assert!(f32d.contains(on), "{f32d}");
            }
            None => {
                eprintln!("no bf16 tile products here: the f32 fallback's wording checked");
                assert!(
                    bf16d.starts_with(&format!("base products f32 on {f32_isa}: bf16 asked for"))
                );
                assert_eq!(f32d, format!("base products f32 on {f32_isa}"));
            }
        }
    }

    #[test]
    fn rows_written_transposed_match_the_rows() {
        // partial groups, ranges not starting at 0, serial and parallel sizes
        for &(rows, cols, r0, r1) in &[
            (70, 64, 0, 70),
            (70, 64, 5, 38),
            (1, 64, 0, 1),
            (300, 576, 17, 300),
            (129, 1024, 0, 129),
        ] {
            let q = Arc::new(quantized(rows, cols, 11));
            let dense = qlora_quant::reference::dequantize_f32_rounded(&q);
            let kinds = [
                FrozenWeight::Quant(q),
                FrozenWeight::F32(Arc::new(dense.clone())),
                FrozenWeight::BF16(Arc::new(dense.iter().map(|&v| bf16::from_f32(v)).collect())),
            ];
            for w in &kinds {
                let nr = r1 - r0;
                let mut plain = vec![0f32; nr * cols];
                w.rows_f32(r0, r1, cols, &mut plain);
                let mut t = vec![f32::NAN; nr * cols];
                w.rows_f32_t(r0, r1, cols, &mut t);
                for r in 0..nr {
                    for c in 0..cols {
                        assert_eq!(
                            t[c * nr + r].to_bits(),
                            plain[r * cols + c].to_bits(),
                            "{rows}x{cols} rows {r0}..{r1}: ({r}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_hold_whole_groups_and_enough_rows() {
        assert_eq!(tile_rows(1536, 576), 1536);
        assert_eq!(tile_rows(4096, 576), 1808); // 2^20 / 576 = 1820, in groups of 16
        assert_eq!(tile_rows(5632, 2048), 512);
        assert_eq!(tile_rows(2048, 5632), TILE_MIN_ROWS); // 186 would fit in 2^20
        assert_eq!(tile_rows(100, 5632), 100);
        assert_eq!(tile_rows(0, 64), 1);
    }

    #[test]
    fn the_products_expand_tiles_by_the_rule_the_planner_mirrors() {
        for (o, i) in [(300, 5632), (70, 64), (2048, 576), (5632, 2048)] {
            let l = FrozenLinear {
                out_features: o,
                in_features: i,
                weight: FrozenWeight::F32(Arc::new(vec![0.0; o * i])),
                bias: None,
                compute: BaseCompute::F32,
                bf16_copy: Default::default(),
            };
            assert_eq!(l.tile_rows(), tile_rows(o, i), "{o} x {i}");
        }
        // 2^20 / 5632 = 186 rows would fit; the floor is 256
        assert_eq!(tile_rows(300, 5632), 256);
    }

    #[test]
    fn forward_over_several_tiles_matches_dense_reference() {
        // 300 rows of 4096: a tile of 256 rows, then 44
        let (o, i, t) = (300, 4096, 3);
        assert_eq!(tile_rows(o, i), 256);
        let p = quantized(o, i, 21);
        let w = qlora_quant::reference::dequantize_f32_rounded(&p);
        let q = FrozenLinear {
            out_features: o,
            in_features: i,
            weight: FrozenWeight::Quant(Arc::new(p)),
            bias: None,
            compute: BaseCompute::F32,
            bf16_copy: Default::default(),
        };
        let x = rand_vec(t * i, 22, 1.0);
        let mut yr = vec![0f32; t * o];
        matmul_ref(t, o, i, &x, false, &w, true, &mut yr, false, 1.0);
        assert!(max_abs_diff(&q.forward(&x, t), &yr) < 1e-3);
        // an f32 weight with rows this long goes through the tiles too
        assert!(i >= F32_IN_PLACE_BELOW_COLS);
        let d = FrozenLinear {
            weight: FrozenWeight::F32(Arc::new(w.clone())),
            ..q.clone()
        };
        assert_eq!(d.forward(&x, t), q.forward(&x, t));
        let dy = rand_vec(t * o, 23, 1.0);
        let mut dx = vec![0f32; t * i];
        q.backward_input(&dy, t, &mut dx);
        let mut dxr = vec![0f32; t * i];
        matmul_ref(t, i, o, &dy, false, &w, false, &mut dxr, false, 1.0);
        assert!(max_abs_diff(&dx, &dxr) < 1e-3);
    }

    #[test]
    fn tiled_q4_forward_and_backward_match_dense_reference() {
        let (o, i, t) = (70, 64, 9);
        let p = quantized(o, i, 3);
        let w = qlora_quant::reference::dequantize_f32_rounded(&p);
        let bias = rand_vec(o, 4, 1.0);
        let q = FrozenLinear {
            out_features: o,
            in_features: i,
            weight: FrozenWeight::Quant(Arc::new(p)),
            bias: Some(bias.clone()),
            compute: BaseCompute::F32,
            bf16_copy: Default::default(),
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

    /// The once-packed bf16 copy (the lm_head's) gives bit-identical
    /// products to converting per call; it is made once and shared by
    /// clones, and not made off the bf16 path or for a linear with a bias.
    #[test]
    fn packed_copy_for_amx_gives_the_same_products() {
        let (o, i, t) = (70, 96, 40);
        let lin = FrozenLinear {
            out_features: o,
            in_features: i,
            weight: FrozenWeight::F32(Arc::new(rand_vec(o * i, 41, 1.0))),
            bias: None,
            compute: BaseCompute::Bf16,
            bf16_copy: Default::default(),
        };
        let Some(copy) = lin.packed_for_amx(t) else {
            assert!(!super::super::amx::available());
            eprintln!("SKIPPED: no AMX here, so no packed copy is made");
            return;
        };
        // made once, then kept: a second call (or a clone's) gives the same copy
        assert!(Arc::ptr_eq(&copy, &lin.packed_for_amx(t).unwrap()));
        assert!(Arc::ptr_eq(&copy, &lin.clone().packed_for_amx(t).unwrap()));
        let f32_lin = FrozenLinear {
            compute: BaseCompute::F32,
            bf16_copy: Default::default(),
            ..lin.clone()
        };
        assert!(f32_lin.packed_for_amx(t).is_none());
        let biased = FrozenLinear {
            bias: Some(vec![1.0; o]),
            bf16_copy: Default::default(),
            ..lin.clone()
        };
        assert!(biased.packed_for_amx(t).is_none());
        use super::super::amx::{pack_a, round_up, TileBuf};
        let (kpi, kpo, mp) = (round_up(i, 32), round_up(o, 32), round_up(t, 32));
        let x = rand_vec(t * i, 42, 1.0);
        let mut xa = TileBuf::new();
        pack_a(&x, t, i, i, 0, kpi, &mut xa);
        let mut y = vec![f32::NAN; t * o];
        copy.forward_block(&xa, mp, t, 0, o, &mut y, o);
        assert_eq!(y, lin.forward(&x, t));
        let dy = rand_vec(t * o, 43, 1.0);
        let mut dya = TileBuf::new();
        pack_a(&dy, t, o, o, 0, kpo, &mut dya);
        let (mut a, mut b) = (vec![0.5f32; t * i], vec![0.5f32; t * i]);
        copy.backward_block(&dya, kpo, mp, t, 0, kpo / 32, &mut a);
        lin.backward_input(&dy, t, &mut b);
        assert_eq!(a, b);
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
            bf16_copy: Default::default(),
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
