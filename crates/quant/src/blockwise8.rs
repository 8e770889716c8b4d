//! bnb's general 8-bit blockwise quantizer with the **CPU** semantics of bitsandbytes
//! 0.50.2 (`csrc/cpu_ops.cpp`), which is what writes the double-quant statistics on CPU
//! (fixtures README §2.3 step 6). It is *not* exact-nearest: per block
//!
//! * `am = max|x|`; if `am == 0` every code is 0 and the stored absmax is 0;
//! * otherwise `v = clamp(x * (1.0f/am), -1, 1)`, `t = ((v + 1) * 0.5f) * 65535 + 0.5f`
//!   (four separate f32 operations), `i = trunc(t)` as u16, `code = LUT[i]`, where
//!   `LUT[i] = #{k : mid[k] < (-1.0f + (2.0f*i)/65535.0f)}` and
//!   `mid[k] = 0.5f * (map[k] + map[k+1])`.
//!
//! Exact nearest rounding (CUDA) differs for values within ~1.5e-5 of a midpoint; reading
//! is unaffected (`code[q] * absmax[i / bs]`).

use std::sync::OnceLock;

use crate::tables::dynamic_map;

/// Number of uniform bins of bnb's CPU LUT.
pub const LUT_SIZE: usize = 65536;

/// The 65,536-entry bin → code table for a 256-entry code (sorted ascending in practice).
#[derive(Clone)]
pub struct Lut8(Box<[u8]>);

impl Lut8 {
    /// Builds the LUT for `code` by a single sweep over the sorted midpoints (equivalent to
    /// counting, since the bin centres increase monotonically with `i`).
    pub fn new(code: &[f32; 256]) -> Lut8 {
        let mut mids: Vec<f32> = (0..255)
            .map(|k| 0.5f32 * (code[k] + code[k + 1]))
            .filter(|m| !m.is_nan())
            .collect();
        mids.sort_by(f32::total_cmp);
        let mut lut = vec![0u8; LUT_SIZE].into_boxed_slice();
        let mut count = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let x = bin_centre(i);
            while count < mids.len() && mids[count] < x {
                count += 1;
            }
            // At most 255 midpoints, so the count fits in a byte.
            *slot = count as u8;
        }
        Lut8(lut)
    }

    /// The shared LUT of the dynamic map (built once).
    pub fn dynamic() -> &'static Lut8 {
        static LUT: OnceLock<Lut8> = OnceLock::new();
        LUT.get_or_init(|| Lut8::new(&dynamic_map()))
    }

    /// Cached LUT when `code` is the dynamic map, else a freshly built one.
    fn for_code(code: &[f32; 256]) -> std::borrow::Cow<'static, Lut8> {
        let dynmap = dynamic_map();
        if code
            .iter()
            .zip(dynmap.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            std::borrow::Cow::Borrowed(Lut8::dynamic())
        } else {
            std::borrow::Cow::Owned(Lut8::new(code))
        }
    }

    #[inline]
    pub fn get(&self, bin: u16) -> u8 {
        self.0[bin as usize]
    }
}

/// The value bin `i` stands for: `-1.0f + (2.0f*i)/65535.0f`.
#[inline]
pub(crate) fn bin_centre(i: usize) -> f32 {
    -1.0f32 + (2.0f32 * i as f32) / 65535.0f32
}

/// The LUT bin of a scaled value `v` in [-1, 1]: `trunc(((v + 1) * 0.5f) * 65535 + 0.5f)`.
#[inline]
pub(crate) fn bin_of(v: f32) -> u16 {
    let t = ((v + 1.0f32) * 0.5f32) * 65535.0f32 + 0.5f32;
    t as u16
}

/// Quantizes one block (`out.len() == x.len()`) and returns its stored absmax.
fn quantize_block(x: &[f32], lut: &Lut8, out: &mut [u8]) -> f32 {
    let am = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if am == 0.0 {
        out.fill(0);
        return am;
    }
    let r = 1.0f32 / am;
    for (o, &v) in out.iter_mut().zip(x) {
        let s = (v * r).clamp(-1.0, 1.0);
        *o = lut.get(bin_of(s));
    }
    am
}

/// bnb CPU `quantize_blockwise(x, code, blocksize)`: one code byte per element and one f32
/// absmax per block of `blocksize` elements (last block partial).
///
/// # Panics
/// If `blocksize == 0`.
pub fn quantize_blockwise8(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    assert!(blocksize > 0, "quantize_blockwise8: blocksize must be > 0");
    let lut = Lut8::for_code(code);
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    // Whole blocks per rayon task (~64 K elements); results do not depend on the split.
    let blocks_per_task = (crate::quantize::CHUNK_ELEMS / blocksize).max(1);
    let elems_per_task = blocks_per_task * blocksize;
    q.par_chunks_mut(elems_per_task)
        .zip(x.par_chunks(elems_per_task))
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .for_each(|((qt, xt), at)| {
            for ((qb, xb), a) in qt.chunks_mut(blocksize).zip(xt.chunks(blocksize)).zip(at) {
                *a = quantize_block(xb, &lut, qb);
            }
        });
    (q, absmax)
}

/// `out[i] = code[q[i]] * absmax[i / blocksize]` (f32).
///
/// # Panics
/// If `blocksize == 0`, `out.len() != q.len()` or `absmax` has fewer than
/// `ceil(q.len() / blocksize)` entries.
pub fn dequantize_blockwise8(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
    out: &mut [f32],
) {
    assert!(
        blocksize > 0,
        "dequantize_blockwise8: blocksize must be > 0"
    );
    assert_eq!(out.len(), q.len(), "dequantize_blockwise8: output length");
    assert!(
        absmax.len() >= q.len().div_ceil(blocksize),
        "dequantize_blockwise8: absmax too short"
    );
    for ((qb, ob), &a) in q
        .chunks(blocksize)
        .zip(out.chunks_mut(blocksize))
        .zip(absmax)
    {
        for (o, &c) in ob.iter_mut().zip(qb) {
            *o = code[c as usize] * a;
        }
    }
}
