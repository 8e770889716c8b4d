//! f32 kernels for products with one skinny side (LoRA's rank `r`, a few
//! vector lanes wide), where a general GEMM spends its time packing and on
//! edge tiles. Two shapes cover LoRA's six products (see `ops::lora`):
//!
//! - [`nn`]: `C[m,n] (+)= A[m,kk] · P[kk,n]`, `P` pre-packed with rows padded
//!   to whole 16-lane vectors ([`pack_rows`], [`pack_transposed`]); each `k`
//!   step loads one row piece of `P` and FMAs it, times a broadcast `A`
//!   element, into a block of rows' accumulators.
//! - [`tn`]: `C[m,n] (+)= Σ_k L[k,m] · R[k,n]` with `m` small (`r`): a sum of
//!   outer products of a row of `L` with a row of `R`, over `k`.
//!
//! f32 inputs, f32 accumulation in a fixed order (no dependence on threads).
//! Each kernel is compiled for AVX-512, AVX2+FMA and the plain target, picked
//! at run time ([`Isa::best`]); `*_isa` runs a given level (the tests run all).

use super::fastmath::Isa;

/// Lanes of one accumulator "vector" (one zmm, two ymm, four xmm).
pub const W: usize = 16;

/// `n` rounded up to whole vectors.
pub fn padded(n: usize) -> usize {
    n.div_ceil(W) * W
}

/// `src` `[rows, n]` times `s`, rows padded with zeros to [`padded`]`(n)`.
pub fn pack_rows(src: &[f32], rows: usize, n: usize, s: f32) -> Vec<f32> {
    let np = padded(n);
    let mut p = vec![0f32; rows * np];
    for (d, s_row) in p
        .chunks_exact_mut(np.max(1))
        .zip(src.chunks_exact(n.max(1)))
    {
        for (d, v) in d.iter_mut().zip(s_row) {
            *d = v * s;
        }
    }
    p
}

/// The transpose of `src` `[n, rows]` times `s`, as `[rows, padded(n)]`.
/// In 16 x 16 blocks: either loop order alone walks one side a whole row
/// stride per element, and LoRA's `Aᵀ` (`n` = r = 16) wrote 16 floats a
/// line apart per source row, its `s·Bᵀ` 16 rows a multiple of 4 KiB apart
/// (one L1 set) per element, on the forward's serial path (the other
/// thread waiting): 0.64 -> 0.32% of a TinyLlama step's samples.
pub fn pack_transposed(src: &[f32], n: usize, rows: usize, s: f32) -> Vec<f32> {
    const B: usize = 16;
    let np = padded(n);
    let mut p = vec![0f32; rows * np];
    for j0 in (0..n).step_by(B) {
        let j1 = (j0 + B).min(n);
        for k0 in (0..rows).step_by(B) {
            for k in k0..(k0 + B).min(rows) {
                let dst = &mut p[k * np + j0..k * np + j1];
                for (d, j) in dst.iter_mut().zip(j0..j1) {
                    *d = src[j * rows + k] * s;
                }
            }
        }
    }
    p
}

/// [`pack_transposed`] element by element, for the tests.
#[cfg(test)]
pub(crate) fn pack_transposed_ref(src: &[f32], n: usize, rows: usize, s: f32) -> Vec<f32> {
    let np = padded(n);
    let mut p = vec![0f32; rows * np];
    for j in 0..n {
        for k in 0..rows {
            p[k * np + j] = src[j * rows + k] * s;
        }
    }
    p
}

/// 16 f32 lanes in registers: one zmm, two ymm, or a plain array.
///
/// SAFETY (all methods): pointers are valid for the lanes they touch; the
/// intrinsic implementations run only where their [`Isa`] was detected.
trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// `self + a·b`, fused where the instruction set has FMA.
    unsafe fn fma(self, a: f32, b: Self) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add_to(self, p: *mut f32);
    /// Hints that the cache line at `p` (any address, never read here) is
    /// needed soon.
    #[inline(always)]
    fn prefetch(_p: *const f32) {}
    /// The first `w < W` lanes from `p`, zeros after.
    #[inline(always)]
    unsafe fn load_part(p: *const f32, w: usize) -> Self {
        let mut t = [0f32; W];
        std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), w);
        Self::load(t.as_ptr())
    }
    /// Writes (or adds) the first `w <= W` lanes at `p`.
    #[inline(always)]
    unsafe fn put(self, p: *mut f32, w: usize, accumulate: bool) {
        if w == W {
            if accumulate {
                self.add_to(p)
            } else {
                self.store(p)
            }
        } else {
            let mut t = [0f32; W];
            self.store(t.as_mut_ptr());
            for (q, v) in t[..w].iter().enumerate() {
                *p.add(q) = if accumulate { *p.add(q) + v } else { *v };
            }
        }
    }
}

/// Plain fallback (no FMA: one rounding per multiply and per add).
#[derive(Clone, Copy)]
struct Plain([f32; W]);

impl Lanes for Plain {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Plain([0.0; W])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Plain(*(p as *const [f32; W]))
    }
    #[inline(always)]
    unsafe fn fma(mut self, a: f32, b: Self) -> Self {
        for (c, b) in self.0.iter_mut().zip(b.0) {
            *c += a * b;
        }
        self
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *(p as *mut [f32; W]) = self.0;
    }
    #[inline(always)]
    unsafe fn add_to(self, p: *mut f32) {
        for (q, v) in self.0.iter().enumerate() {
            *p.add(q) += v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// AVX-512F: one zmm.
    #[derive(Clone, Copy)]
    pub struct Z(__m512);

    impl Lanes for Z {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Z(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Z(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn fma(self, a: f32, b: Self) -> Self {
            Z(_mm512_fmadd_ps(_mm512_set1_ps(a), b.0, self.0))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn add_to(self, p: *mut f32) {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), self.0))
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
    }

    /// AVX2 + FMA: two ymm.
    #[derive(Clone, Copy)]
    pub struct Y(__m256, __m256);

    impl Lanes for Y {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Y(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Y(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn fma(self, a: f32, b: Self) -> Self {
            let a = _mm256_set1_ps(a);
            Y(
                _mm256_fmadd_ps(a, b.0, self.0),
                _mm256_fmadd_ps(a, b.1, self.1),
            )
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
        #[inline(always)]
        unsafe fn add_to(self, p: *mut f32) {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), self.0));
            let q = p.add(8);
            _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), self.1));
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
    }
}

/// One `MR x NV·W` tile of [`nn`] at rows `i0..`, columns `j0..`.
///
/// SAFETY (caller): rows `i0..i0+MR` of `a` hold `kk` elements at stride
/// `lda`; `p` holds `kk` rows of `np >= j0 + NV·W` columns.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn nn_tile<L: Lanes, const MR: usize, const NV: usize>(
    i0: usize,
    j0: usize,
    n: usize,
    kk: usize,
    a: &[f32],
    lda: usize,
    p: &[f32],
    np: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[L::zero(); NV]; MR];
    let ap = a.as_ptr().add(i0 * lda);
    let pp = p.as_ptr().add(j0);
    if accumulate {
        // the destination lines of the tile after next in these rows
        for rr in 0..MR {
            for v in 0..NV {
                L::prefetch(
                    c.cast_const()
                        .wrapping_add((i0 + rr) * ldc + j0 + (2 * NV + v) * W),
                );
            }
        }
    }
    for k in 0..kk {
        if k % W == 0 {
            // each row of `a`, four cache lines ahead
            for rr in 0..MR {
                L::prefetch(ap.wrapping_add(rr * lda + k + 4 * W));
            }
        }
        let pk = pp.add(k * np);
        let mut pv = [L::zero(); NV];
        for (v, pv) in pv.iter_mut().enumerate() {
            *pv = L::load(pk.add(v * W));
        }
        for (rr, acc_r) in acc.iter_mut().enumerate() {
            let av = *ap.add(rr * lda + k);
            for (acc_v, pv) in acc_r.iter_mut().zip(&pv) {
                *acc_v = acc_v.fma(av, *pv);
            }
        }
    }
    let cp = c;
    for (rr, acc_r) in acc.iter().enumerate() {
        for (v, acc_v) in acc_r.iter().enumerate() {
            let c0 = j0 + v * W;
            if c0 >= n {
                break;
            }
            acc_v.put(cp.add((i0 + rr) * ldc + c0), (n - c0).min(W), accumulate);
        }
    }
}

/// [`nn`] with `MR`-row tiles of `NV` vectors (then of 2 and 1) where `P`
/// is wider than one vector, `MR1`-row tiles of one vector where it is one
/// vector wide. The tiles only group the work: every element is the same
/// `Σ_k` in `k` order whatever tile computes it.
///
/// SAFETY (caller): rows `0..m` of `a` hold `kk` elements at stride `lda`;
/// `p` holds `kk` rows of stride `np` with columns up to `padded(n)`; `c`
/// is valid for reads and writes of rows `0..m`, columns `0..n` at stride
/// `ldc`, not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn nn_body<L: Lanes, const MR1: usize, const MR: usize, const NV: usize>(
    m: usize,
    n: usize,
    kk: usize,
    a: &[f32],
    lda: usize,
    p: &[f32],
    np: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let npad = padded(n);
    let mut i = 0;
    if npad == W {
        while i + MR1 <= m {
            nn_tile::<L, MR1, 1>(i, 0, n, kk, a, lda, p, np, c, ldc, accumulate);
            i += MR1;
        }
        // the rest in MR-row tiles before single rows (a block of 16 rows
        // is 12 + 4: four single-row tiles ran at a sixth of the rate)
        while i + MR <= m {
            nn_tile::<L, MR, 1>(i, 0, n, kk, a, lda, p, np, c, ldc, accumulate);
            i += MR;
        }
    } else {
        while i + MR <= m {
            let mut j = 0;
            while j + NV * W <= npad {
                nn_tile::<L, MR, NV>(i, j, n, kk, a, lda, p, np, c, ldc, accumulate);
                j += NV * W;
            }
            if NV > 2 && j + 2 * W <= npad {
                nn_tile::<L, MR, 2>(i, j, n, kk, a, lda, p, np, c, ldc, accumulate);
                j += 2 * W;
            }
            while j < npad {
                nn_tile::<L, MR, 1>(i, j, n, kk, a, lda, p, np, c, ldc, accumulate);
                j += W;
            }
            i += MR;
        }
    }
    for i in i..m {
        let mut j = 0;
        while j < npad {
            nn_tile::<L, 1, 1>(i, j, n, kk, a, lda, p, np, c, ldc, accumulate);
            j += W;
        }
    }
}

/// One `MR x W` tile of [`tn`] at `C` rows `i0..`, columns `j0..j0+w`
/// (`w <= W`; the missing columns of `R` read as zero).
///
/// SAFETY (caller): `l` holds `kk` rows of stride `ldl` with columns up to
/// `i0 + MR`; `rr` holds `kk` rows of stride `ldr` with columns up to `j0 + NV·W`
/// (`j0 + w` when `w < W`, then `NV == 1`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tn_tile<L: Lanes, const MR: usize, const NV: usize>(
    i0: usize,
    j0: usize,
    w: usize,
    kk: usize,
    l: &[f32],
    ldl: usize,
    rr: &[f32],
    ldr: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[L::zero(); NV]; MR];
    let lp = l.as_ptr().add(i0);
    let rp = rr.as_ptr().add(j0);
    for k in 0..kk {
        let rk = rp.add(k * ldr);
        if i0 == 0 {
            // this row of `rr` two column tiles ahead
            for v in 0..NV {
                L::prefetch(rk.wrapping_add((2 * NV + v) * W));
            }
        }

        let mut rv = [L::zero(); NV];
        if w == W {
            for (v, rv) in rv.iter_mut().enumerate() {
                *rv = L::load(rk.add(v * W));
            }
        } else {
            rv[0] = L::load_part(rk, w);
        }
        let lk = lp.add(k * ldl);
        for (ri, acc_r) in acc.iter_mut().enumerate() {
            let lv = *lk.add(ri);
            for (acc_v, rv) in acc_r.iter_mut().zip(&rv) {
                *acc_v = acc_v.fma(lv, *rv);
            }
        }
    }
    let cp = c.as_mut_ptr();
    for (ri, acc_r) in acc.iter().enumerate() {
        for (v, acc_v) in acc_r.iter().enumerate() {
            acc_v.put(cp.add((i0 + ri) * ldc + j0 + v * W), w, accumulate);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tn_body<L: Lanes, const MR: usize, const NV: usize>(
    m: usize,
    n: usize,
    kk: usize,
    l: &[f32],
    ldl: usize,
    rr: &[f32],
    ldr: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldl >= m && ldr >= n && ldc >= n,
        "skinny::tn: leading dimensions"
    );
    assert!(c.len() >= (m - 1) * ldc + n, "skinny::tn: dst too short");
    if kk == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(l.len() >= (kk - 1) * ldl + m, "skinny::tn: lhs too short");
    assert!(rr.len() >= (kk - 1) * ldr + n, "skinny::tn: rhs too short");
    // Blocks of KB rows of `R`, each swept across all its columns: a few
    // rows stream through the cache in order (walking whole columns of a
    // tall `R` instead misses on every row); the `C` tile goes back to
    // memory (cache) between blocks.
    const KB: usize = 16;
    for k0 in (0..kk).step_by(KB) {
        let kb = KB.min(kk - k0);
        let (l, rr) = (&l[k0 * ldl..], &rr[k0 * ldr..]);
        let accumulate = accumulate || k0 > 0;
        let mut j = 0;
        while j + NV * W <= n {
            tn_rows::<L, MR, NV>(m, j, W, kb, l, ldl, rr, ldr, c, ldc, accumulate);
            j += NV * W;
        }
        while j < n {
            let w = (n - j).min(W);
            tn_rows::<L, MR, 1>(m, j, w, kb, l, ldl, rr, ldr, c, ldc, accumulate);
            j += w;
        }
    }
}

/// The tiles of [`tn`] in columns `j0..j0 + NV·W` (`j0..j0 + w` if `w < W`).
/// (A function, not a closure: closures do not inherit `target_feature`.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tn_rows<L: Lanes, const MR: usize, const NV: usize>(
    m: usize,
    j0: usize,
    w: usize,
    kk: usize,
    l: &[f32],
    ldl: usize,
    rr: &[f32],
    ldr: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: `tn_body`'s asserts bound every row and column the tiles touch.
    unsafe {
        let mut i = 0;
        while i + MR <= m {
            tn_tile::<L, MR, NV>(i, j0, w, kk, l, ldl, rr, ldr, c, ldc, accumulate);
            i += MR;
        }
        for i in i..m {
            tn_tile::<L, 1, NV>(i, j0, w, kk, l, ldl, rr, ldr, c, ldc, accumulate);
        }
    }
}

/// Compiles `$body::<lanes, tile sizes..>` for each [`Isa`] and runs `$isa`'s.
macro_rules! per_isa {
    ($isa:expr, $body:ident, [$($v4:tt)*], [$($v3:tt)*], [$($gen:tt)*], ($($arg:ident : $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) { $body::<x86::Z, $($v4)*>($($arg),*) }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) { $body::<x86::Y, $($v3)*>($($arg),*) }
            match $isa {
                // SAFETY: `isa` is one this CPU has (checked by the callers).
                Isa::V4 => return unsafe { v4($($arg),*) },
                // SAFETY: as above.
                Isa::V3 => return unsafe { v3($($arg),*) },
                Isa::Generic => {}
            }
        }
        $body::<Plain, $($gen)*>($($arg),*)
    }};
}

/// [`per_isa!`] for an `unsafe` `$body` (the caller's contract carries over).
macro_rules! per_isa_unsafe {
    ($isa:expr, $body:ident, [$($v4:tt)*], [$($v3:tt)*], [$($gen:tt)*], ($($arg:ident : $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) { unsafe { $body::<x86::Z, $($v4)*>($($arg),*) } }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) { unsafe { $body::<x86::Y, $($v3)*>($($arg),*) } }
            match $isa {
                // SAFETY: `isa` is one this CPU has (asserted by the caller);
                // the caller's contract covers the operands.
                Isa::V4 => return unsafe { v4($($arg),*) },
                // SAFETY: as above.
                Isa::V3 => return unsafe { v3($($arg),*) },
                Isa::Generic => {}
            }
        }
        // SAFETY: the caller's contract.
        unsafe { $body::<Plain, $($gen)*>($($arg),*) }
    }};
}

/// `c[i·ldc + j] (+)= Σ_k a[i·lda + k] · p[k·padded(n) + j]` for `i < m`,
/// `j < n`, `k < kk` (`p` from [`pack_rows`] / [`pack_transposed`]); adds
/// into `c` when `accumulate`, else overwrites it.
#[allow(clippy::too_many_arguments)]
pub fn nn(
    isa: Isa,
    m: usize,
    n: usize,
    kk: usize,
    a: &[f32],
    lda: usize,
    p: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "skinny::nn: dst too short");
    // SAFETY: `c` is an exclusive slice covering every element written.
    unsafe {
        nn_strided(
            isa,
            m,
            n,
            kk,
            a,
            lda,
            p,
            padded(n),
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// [`nn`] with `P`'s row stride `ldp` given (a column range of a wider
/// packed `P`: pass `&p[j0..]`) and `C` through a pointer, for callers that
/// fill disjoint blocks of one output from several threads (the AMX
/// forward's LoRA down-projections, row groups of `x·Aᵀ` inside the pack).
/// Each element is computed exactly as [`nn`] does.
///
/// # Safety
/// `c` must be valid for reads and writes of rows `0..m`, columns `0..n` at
/// stride `ldc`, and no other thread may access those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn nn_strided(
    isa: Isa,
    m: usize,
    n: usize,
    kk: usize,
    a: &[f32],
    lda: usize,
    p: &[f32],
    ldp: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= kk && ldc >= n, "skinny::nn: leading dimensions");
    assert!(ldp >= padded(n), "skinny::nn: packed rhs stride");
    assert!(a.len() >= (m - 1) * lda + kk, "skinny::nn: lhs too short");
    assert!(
        kk == 0 || p.len() >= (kk - 1) * ldp + padded(n),
        "skinny::nn: packed rhs too short"
    );
    per_isa_unsafe!(isa, nn_body, [12, 4, 4], [6, 3, 2], [2, 1, 2],
        (m: usize, n: usize, kk: usize, a: &[f32], lda: usize, p: &[f32], ldp: usize, c: *mut f32, ldc: usize, accumulate: bool))
}

/// `c[i·ldc + j] (+)= Σ_k l[k·ldl + i] · r[k·ldr + j]` for `i < m`, `j < n`,
/// `k < kk` (`Lᵀ R` with `m` small); adds into `c` when `accumulate`, else
/// overwrites it.
#[allow(clippy::too_many_arguments)]
pub fn tn(
    isa: Isa,
    m: usize,
    n: usize,
    kk: usize,
    l: &[f32],
    ldl: usize,
    r: &[f32],
    ldr: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    per_isa!(isa, tn_body, [8, 2], [4, 1], [2, 1],
        (m: usize, n: usize, kk: usize, l: &[f32], ldl: usize, r: &[f32], ldr: usize, c: &mut [f32], ldc: usize, accumulate: bool))
}

#[cfg(test)]
mod tests;
