//! Frozen weights held as a GGUF file's own ggml blocks (`--quant native`).
//!
//! A GGUF model is usually already quantized (Q4_1, Q4_K, Q8_0, …). Requantizing
//! it to NF4 adds a second rounding; holding it in f32 costs 4 bytes a weight.
//! [`GgmlWeight`] keeps the stored blocks as they are (the bytes of the file's
//! memory map, or a copy) and expands them to f32 one tile of rows at a time
//! right before the product, exactly as the NF4 weights are: the model that
//! trains is the model in the file, in the memory of the file.
//!
//! Decoding is bit-identical to `qlora_gguf::dequant` (ggml's reference
//! `dequantize_row_*`): [`decode_row_reference`] calls it, and the AVX2 kernels
//! of the common types ([`decode_row`], chosen at run time) are tested against
//! it on random blocks. q/k weights of llama GGUFs, whose rows llama.cpp's
//! converter permuted, are read through a row map (rows are whole blocks).

use std::sync::Arc;

use qlora_gguf::{GgmlType, MappedBytes};
use rayon::prelude::*;

use super::linear::FrozenWeight;

/// The ggml types a frozen weight can be held in natively (F32 tensors are held as
/// plain f32).
pub const NATIVE_TYPES: [GgmlType; 12] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Where the stored blocks live.
#[derive(Debug, Clone)]
pub enum GgmlBytes {
    /// A range of the GGUF file's memory map (shared with the page cache).
    Mapped(MappedBytes),
    /// A copy in memory (tests, sources without a map).
    Owned(Vec<u8>),
}

impl GgmlBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            GgmlBytes::Mapped(m) => m.as_slice(),
            GgmlBytes::Owned(v) => v,
        }
    }
}

/// A `[rows, cols]` weight (HF layout) held as ggml blocks.
#[derive(Debug, Clone)]
pub struct GgmlWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: GgmlBytes,
    /// HF row → stored row (llama q/k: the converter's RoPE permutation).
    row_map: Option<Vec<u32>>,
}

impl GgmlWeight {
    /// `bytes` are `rows` stored rows of `cols` values of `ty`; `permuted` is
    /// `Some((n_heads, head_dim))` when the stored rows are in llama.cpp's q/k order
    /// (HF row `r` is then stored row `qlora_gguf::llama::gguf_row(r, head_dim)`).
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: GgmlBytes,
        permuted: Option<(usize, usize)>,
    ) -> Result<GgmlWeight, String> {
        if !NATIVE_TYPES.contains(&ty) {
            return Err(format!(
                "ggml type {ty} cannot be held natively (supported: {}); use --quant nf4 or none",
                NATIVE_TYPES.map(|t| t.to_string()).join(", ")
            ));
        }
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(format!(
                "{ty} rows of {cols} values are not whole blocks of {}",
                ty.block_size()
            ));
        }
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let got = bytes.as_slice().len();
        if got != rows * row_bytes {
            return Err(format!(
                "{ty} [{rows}, {cols}] needs {} bytes, got {got}",
                rows * row_bytes
            ));
        }
        let row_map = match permuted {
            None => None,
            Some((heads, d)) => {
                if heads * d != rows || !d.is_multiple_of(2) {
                    return Err(format!(
                        "q/k permutation of {heads} heads of {d} rows does not fit {rows} rows"
                    ));
                }
                Some(
                    (0..rows)
                        .map(|r| qlora_gguf::llama::gguf_row(r, d) as u32)
                        .collect(),
                )
            }
        };
        Ok(GgmlWeight {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
            row_map,
        })
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: the blocks (mapped or owned) and the row map.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes + self.row_map.as_ref().map_or(0, |m| m.len() * 4)
    }

    /// Whether the blocks are a view of the file's memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, GgmlBytes::Mapped(_))
    }

    /// The stored blocks of HF row `r`.
    pub fn row_data(&self, r: usize) -> &[u8] {
        assert!(r < self.rows, "row {r} outside {} rows", self.rows);
        let s = match &self.row_map {
            Some(m) => m[r] as usize,
            None => r,
        };
        &self.bytes.as_slice()[s * self.row_bytes..(s + 1) * self.row_bytes]
    }

    /// HF row `r` decoded into `out` (`cols` values).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        decode_row(self.ty, self.row_data(r), out);
    }

    /// Rows `r0..r1` as f32 into `out` (`(r1 - r0)·cols` values), on the rayon pool
    /// when called from outside it and the tile is large.
    pub fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        assert!(
            r0 <= r1 && r1 <= self.rows,
            "rows {r0}..{r1} outside {}",
            self.rows
        );
        assert_eq!(out.len(), (r1 - r0) * c, "ggml rows_f32: output length");
        if c == 0 {
            return;
        }
        if (r1 - r0) * c >= 1 << 16 && super::may_parallelize() {
            let per = (1usize << 14).div_ceil(c).max(1);
            out.par_chunks_mut(per * c)
                .enumerate()
                .for_each(|(k, chunk)| {
                    for (j, row) in chunk.chunks_exact_mut(c).enumerate() {
                        self.row_f32(r0 + k * per + j, row);
                    }
                });
        } else {
            for (j, row) in out.chunks_exact_mut(c).enumerate() {
                self.row_f32(r0 + j, row);
            }
        }
    }

    /// Elements `start..start + out.len()` of the row-major flattening as bf16 bits
    /// (decoded to f32, then rounded to nearest even).
    pub fn elems_bf16(&self, start: usize, out: &mut [u16]) {
        let c = self.cols;
        if out.is_empty() {
            return;
        }
        assert!(start + out.len() <= self.rows * c, "ggml elems_bf16: range");
        let mut row = vec![0f32; c];
        let mut done = 0;
        while done < out.len() {
            let e = start + done;
            let (r, col) = (e / c, e % c);
            let n = (c - col).min(out.len() - done);
            self.row_f32(r, &mut row);
            super::fastmath::to_bf16(&row[col..col + n], &mut out[done..done + n]);
            done += n;
        }
    }

    /// The whole weight as f32 `[rows, cols]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        self.rows_f32(0, self.rows, &mut w);
        w
    }
}

/// One row through `qlora_gguf`'s reference decoder (ggml's `dequantize_row_*`).
pub fn decode_row_reference(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    qlora_gguf::dequant::dequantize_into(ty, src, out)
        .unwrap_or_else(|e| panic!("ggml row decode: {e}"));
}

/// One row of `ty` blocks into `out`: the AVX2 kernel of the type where there is one
/// and the CPU has AVX2 + F16C, else [`decode_row_reference`]. Bit-identical either way.
pub fn decode_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() && x86::decode_row(ty, src, out) {
            return;
        }
    }
    decode_row_reference(ty, src, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 decoders: the same operations in the same order as the reference
    //! (integer offsets, one f32 multiply, then one f32 add: never fused), so
    //! every value is bit-identical.
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use qlora_gguf::GgmlType;

    pub fn available() -> bool {
        static AVAIL: OnceLock<bool> = OnceLock::new();
        *AVAIL.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("f16c")
                && std::env::var_os("QLORA_NO_SIMD").is_none()
        })
    }

    /// Decode with a kernel of `ty`; `false` when there is none (nothing written).
    pub fn decode_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> bool {
        let (bs, ts) = (ty.block_size(), ty.type_size());
        let f: unsafe fn(*const u8, *mut f32) = match ty {
            GgmlType::Q4_0 => q4_0,
            GgmlType::Q4_1 => q4_1,
            GgmlType::Q8_0 => q8_0,
            GgmlType::F16 => f16x8,
            _ => return false,
        };
        let step = if ty == GgmlType::F16 { 8 } else { bs };
        assert_eq!(
            src.len() / ts * bs,
            out.len(),
            "ggml decode: {} bytes of {ty} for {} values",
            src.len(),
            out.len()
        );
        let n = out.len();
        let whole = n / step * step;
        for k in (0..whole).step_by(step) {
            // SAFETY: `available()` checked AVX2 + F16C; block k/step covers bytes
            // k/bs·ts .. + step/bs·ts (F16: 16 bytes for 8 values) and values k..k+step,
            // inside `src` and `out` by the length check above.
            unsafe { f(src.as_ptr().add(k / bs * ts), out.as_mut_ptr().add(k)) }
        }
        if whole < n {
            // F16 rows whose length is not a multiple of 8.
            super::decode_row_reference(ty, &src[whole * ts..], &mut out[whole..]);
        }
        true
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn half(p: *const u8) -> __m256 {
        let h = u16::from_le_bytes([*p, *p.add(1)]);
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16))))
    }

    /// 8 unsigned bytes at `p` (low 64 bits of `v`) as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// `block_q4_0`: y = (q - 8)·d.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q4_0(x: *const u8, y: *mut f32) {
        let d = half(x);
        let qs = _mm_loadu_si128(x.add(2) as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, m);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
        let eight = _mm256_set1_epi32(8);
        for (k, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(v), eight);
            _mm256_storeu_ps(y.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }

    /// `block_q4_1`: y = q·d + m.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q4_1(x: *const u8, y: *mut f32) {
        let d = half(x);
        let mn = half(x.add(2));
        let qs = _mm_loadu_si128(x.add(4) as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, m);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
        for (k, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let p = _mm256_mul_ps(u8x8(v), d);
            _mm256_storeu_ps(y.add(8 * k), _mm256_add_ps(p, mn));
        }
    }

    /// `block_q8_0`: y = q·d.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q8_0(x: *const u8, y: *mut f32) {
        let d = half(x);
        for k in 0..4 {
            let v = _mm_loadl_epi64(x.add(2 + 8 * k) as *const __m128i);
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            _mm256_storeu_ps(y.add(8 * k), _mm256_mul_ps(q, d));
        }
    }

    /// 8 f16 values (exact conversion).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16x8(x: *const u8, y: *mut f32) {
        let v = _mm_loadu_si128(x as *const __m128i);
        _mm256_storeu_ps(y, _mm256_cvtph_ps(v));
    }
}

/// A GGUF tensor as stored ([`qlora_gguf::llama::GgufModel::raw`]) as a frozen
/// weight: ggml blocks and F16/BF16 kept as they are (sharing the file's map), F32
/// decoded to f32 (q/k rows back in HF order either way). Vectors (1-D) are
/// refused: only matrices are frozen weights.
pub fn frozen_from_raw(raw: qlora_gguf::llama::RawTensor) -> Result<FrozenWeight, String> {
    let &[rows, cols] = raw.shape.as_slice() else {
        return Err(format!("shape {:?} is not a matrix", raw.shape));
    };
    if raw.ggml_type == GgmlType::F32 {
        let mut w = vec![0f32; rows * cols];
        qlora_gguf::dequant::dequantize_into(GgmlType::F32, &raw.bytes, &mut w)
            .map_err(|e| e.to_string())?;
        if let Some((heads, d)) = raw.permuted {
            w = qlora_gguf::llama::unpermute_rows(&w, heads, d, cols);
        }
        return Ok(FrozenWeight::F32(Arc::new(w)));
    }
    let g = GgmlWeight::new(
        raw.ggml_type,
        rows,
        cols,
        GgmlBytes::Mapped(raw.bytes),
        raw.permuted,
    )?;
    Ok(FrozenWeight::Ggml(Arc::new(g)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random bytes of `nblocks` blocks of `ty`, with every f16 scale replaced by a
    /// finite random value (random bits would give NaN/inf scales, which decode to
    /// NaN in both paths and compare unequal).
    fn random_blocks(ty: GgmlType, nblocks: usize, seed: u64) -> Vec<u8> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let ts = ty.type_size();
        let mut v: Vec<u8> = (0..nblocks * ts).map(|_| r.random()).collect();
        let scale_offsets: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            GgmlType::F16 => &[0],
            _ => &[],
        };
        for b in 0..nblocks {
            for &o in scale_offsets {
                let h = half::f16::from_f32(r.random_range(-2.0f32..2.0));
                v[b * ts + o..b * ts + o + 2].copy_from_slice(&h.to_le_bytes());
            }
            if ty == GgmlType::BF16 {
                let h = half::bf16::from_f32(r.random_range(-2.0f32..2.0));
                v[b * ts..b * ts + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn fast_decoders_are_bit_identical_to_the_reference() {
        for ty in NATIVE_TYPES {
            for (cols, seed) in [(256usize, 1u64), (512, 2), (1024, 3)] {
                let nb = cols / ty.block_size();
                let src = random_blocks(ty, nb, seed * 31 + ty as u64);
                let mut fast = vec![0f32; cols];
                let mut reference = vec![0f32; cols];
                decode_row(ty, &src, &mut fast);
                decode_row_reference(ty, &src, &mut reference);
                let fb: Vec<u32> = fast.iter().map(|x| x.to_bits()).collect();
                let rb: Vec<u32> = reference.iter().map(|x| x.to_bits()).collect();
                assert_eq!(fb, rb, "{ty} cols {cols}");
                assert!(reference.iter().all(|x| x.is_finite()), "{ty}");
            }
        }
        // F16 rows not a multiple of the 8-wide kernel.
        let src = random_blocks(GgmlType::F16, 13, 9);
        let (mut a, mut b) = (vec![0f32; 13], vec![0f32; 13]);
        decode_row(GgmlType::F16, &src, &mut a);
        decode_row_reference(GgmlType::F16, &src, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn rows_follow_the_qk_row_map_and_tiles_match_the_whole() {
        let (heads, d, cols) = (3usize, 4usize, 64usize);
        let rows = heads * d;
        let ty = GgmlType::Q8_0;
        let src = random_blocks(ty, rows * cols / 32, 5);
        let stored = qlora_gguf::dequant::dequantize(ty, &src, rows * cols).unwrap();
        let hf = qlora_gguf::llama::unpermute_rows(&stored, heads, d, cols);
        let w = GgmlWeight::new(ty, rows, cols, GgmlBytes::Owned(src), Some((heads, d))).unwrap();
        assert_eq!(w.to_f32(), hf);
        let mut tile = vec![0f32; 5 * cols];
        w.rows_f32(4, 9, &mut tile);
        assert_eq!(&tile[..], &hf[4 * cols..9 * cols]);
        // bf16 elements across row boundaries = the f32 values rounded.
        let mut bits = vec![0u16; 100];
        w.elems_bf16(cols - 30, &mut bits);
        let want: Vec<u16> = hf[cols - 30..cols + 70]
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        assert_eq!(bits, want);
        assert_eq!(w.bytes(), rows * cols / 32 * 34 + rows * 4);
    }

    #[test]
    fn inconsistent_inputs_are_refused() {
        let e = GgmlWeight::new(GgmlType::Q4_K, 2, 64, GgmlBytes::Owned(vec![]), None);
        assert!(e.unwrap_err().contains("whole blocks of 256"));
        let e = GgmlWeight::new(GgmlType::Q8_0, 2, 64, GgmlBytes::Owned(vec![0; 10]), None);
        assert!(e.unwrap_err().contains("needs 136 bytes, got 10"));
        let e = GgmlWeight::new(GgmlType::F32, 2, 64, GgmlBytes::Owned(vec![]), None);
        assert!(e.unwrap_err().contains("cannot be held natively"));
    }
}
