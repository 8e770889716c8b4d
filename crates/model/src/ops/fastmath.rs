//! A branch-free f32 `exp` that vectorizes (libm's `expf` is a call per
//! element), and slice kernels built on it with run-time selected AVX-512 /
//! AVX2 code paths. Relative error below 3·2⁻²³ on the whole range (tested
//! against f64 `exp`); `exp(x) = 0` for `x < -87.3` (and for −∞); inputs above 88.3 (near f32 overflow) are clamped there.

/// `exp(x)` in f32 (Cephes `expf` polynomial, exponent via bit assembly).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let biased = xc * LOG2E + ROUND;
    let n = biased - ROUND;
    // The integer n read from the mantissa of `biased` (|n| < 2²²), not by
    // `n as i32`: Rust's saturating float→int cast does not vectorize (it
    // was one scalar `cvttss2si` + NaN/overflow fix-up per element).
    let ni = (biased.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// An instruction-set level a [`multiversion!`] kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VL (+ AVX2, FMA).
    V4,
    /// AVX2 + FMA.
    V3,
    /// Whatever the target's baseline is (SSE2 on x86_64).
    Generic,
}

impl Isa {
    /// Whether this CPU can run code compiled for `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::V4 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && Isa::V3.available()
                }
                Isa::V3 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Isa::Generic => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Generic
        }
    }

    /// The best level this CPU runs (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::V4, Isa::V3]
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Generic)
        })
    }
}

/// Dispatches a slice kernel to an AVX-512 / AVX2 compilation of the same
/// generic body (the body must be `#[inline(always)]`). With a second name
/// (`fn name / name_isa(...)`), also defines `name_isa(isa, ...)`, which runs
/// the given level (panics if this CPU lacks it): the tests run every level.
macro_rules! multiversion {
    (@dispatch $isa:expr; ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {{
        #[inline(always)]
        fn body($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) -> $ret { body($($arg),*) }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) -> $ret { body($($arg),*) }
            match $isa {
                // SAFETY: callers pass a level this CPU has (detected at run time).
                Isa::V4 => return unsafe { v4($($arg),*) },
                // SAFETY: as above.
                Isa::V3 => return unsafe { v3($($arg),*) },
                Isa::Generic => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = $isa;
        body($($arg),*)
    }};
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            multiversion!(@dispatch Isa::best(); ($($arg: $ty),*) -> $ret $body)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident / $isa_name:ident($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            multiversion!(@dispatch Isa::best(); ($($arg: $ty),*) -> $ret $body)
        }

        /// The same kernel compiled for `isa` (panics if this CPU lacks it).
        #[allow(dead_code)]
        $vis fn $isa_name(isa: Isa, $($arg: $ty),*) -> $ret {
            assert!(isa.available(), "{isa:?} is not available on this CPU");
            multiversion!(@dispatch isa; ($($arg: $ty),*) -> $ret $body)
        }
    };
}

multiversion! {
    /// `row[j] = exp(row[j] - shift)`; returns the sum of the new values (in
    /// f32 lanes of 16, then f64: a fixed order, independent of threads).
    pub fn exp_shift_sum / exp_shift_sum_isa(row: &mut [f32], shift: f32) -> f64 {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - shift);
                *a += *v;
            }
        }
        let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            s += *v as f64;
        }
        s
    }
}

/// `dst[j] = src[j]·f_j` (`add`: `dst[j] += src[j]·f_j`) with `f_j` =
/// [`super::lora::dropout_factor`]`(key, base + j, p)`, bit for bit: the
/// same hash and comparison (`u < p` as `u·2²⁴ < p·2²⁴`, both exact), the
/// product and the sum rounded apart. Sixteen mask draws at a time in vector
/// lanes instead of one scalar hash per element: the scalar masks were ~23%
/// of a SmolLM2 training step with LoRA dropout on (each module masks its
/// input in the forward, and again for `dA` and its input gradient in the
/// backward). The hash's 64-bit products want AVX512-DQ's `VPMULLQ`
/// (without it, AVX-512 F emulates each one with three 32-bit products and
/// the draws were still 14% of that step).
pub fn dropout_mul(key: u64, base: usize, p: f32, src: &[f32], dst: &mut [f32], add: bool) {
    dropout_mul_isa(dropout_isa(), key, base, p, src, dst, add)
}

/// The level [`dropout_mul`] runs at here: AVX-512 only with DQ (every
/// AVX-512 CPU since Skylake-SP has it), else AVX2, else plain code.
fn dropout_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if dropout_level_available(Isa::V4) {
        return Isa::V4;
    }
    // V4 implies V3 (`Isa::available`)
    match Isa::best() {
        Isa::Generic => Isa::Generic,
        _ => Isa::V3,
    }
}

/// Whether [`dropout_mul_isa`] can run `isa` here (`V4` with AVX512-DQ).
pub fn dropout_level_available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::V4 {
        return isa.available() && std::arch::is_x86_feature_detected!("avx512dq");
    }
    isa.available()
}

/// [`dropout_mul`] at a given level (`V4` needs AVX512-DQ too; panics if
/// this CPU lacks the level).
pub fn dropout_mul_isa(
    isa: Isa,
    key: u64,
    base: usize,
    p: f32,
    src: &[f32],
    dst: &mut [f32],
    add: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq")]
        unsafe fn v4(key: u64, base: usize, p: f32, src: &[f32], dst: &mut [f32], add: bool) {
            use std::arch::x86_64::*;
            let n = dst.len();
            let src = &src[..n];
            let keep = 1.0 / (1.0 - p);
            let thr = p * 16_777_216.0;
            let q = |v: u64| _mm512_set1_epi64(v as i64);
            let (kv, mul) = (q(key), q(super::lora::MASK_INDEX_MUL));
            let (gold, m1, m2) = (
                q(0x9E37_79B9_7F4A_7C15),
                q(0xBF58_476D_1CE4_E5B9),
                q(0x94D0_49BB_1331_11EB),
            );
            let lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
            let (thr_v, keep_v) = (_mm512_set1_ps(thr), _mm512_set1_ps(keep));
            // the 24-bit draws of 8 indices, as i32 (splitmix64 lane by lane)
            let draws = |idx: __m512i| {
                let mut z = _mm512_xor_si512(kv, _mm512_mullo_epi64(idx, mul));
                z = _mm512_add_epi64(z, gold);
                z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<30>(z)), m1);
                z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<27>(z)), m2);
                z = _mm512_xor_si512(z, _mm512_srli_epi64::<31>(z));
                _mm512_cvtepi64_epi32(_mm512_srli_epi64::<40>(z))
            };
            let mut j = 0;
            // every load and store below is of 16 floats at j..j + 16 <= n,
            // inside `src` (cut to n) and `dst`
            while j + 16 <= n {
                let i0 = _mm512_add_epi64(q((base + j) as u64), lanes);
                let i1 = _mm512_add_epi64(i0, q(8));
                let u = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(draws(i0)), draws(i1));
                // dropped where u < p·2²⁴ (false for a NaN p, as the scalar `<`)
                let drop = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_cvtepi32_ps(u), thr_v);
                let f = _mm512_mask_blend_ps(drop, keep_v, _mm512_setzero_ps());
                let v = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(j)), f);
                let out = if add {
                    _mm512_add_ps(_mm512_loadu_ps(dst.as_ptr().add(j)), v)
                } else {
                    v
                };
                _mm512_storeu_ps(dst.as_mut_ptr().add(j), out);
                j += 16;
            }
            dropout_mul_body(key, base + j, p, &src[j..], &mut dst[j..], add)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(key: u64, base: usize, p: f32, src: &[f32], dst: &mut [f32], add: bool) {
            dropout_mul_body(key, base, p, src, dst, add)
        }
        match isa {
            Isa::V4 => {
                assert!(
                    dropout_level_available(isa),
                    "AVX-512 with DQ is not available on this CPU"
                );
                // SAFETY: AVX-512 F/BW/VL/DQ, AVX2 and FMA were checked above.
                return unsafe { v4(key, base, p, src, dst, add) };
            }
            Isa::V3 => {
                assert!(isa.available(), "AVX2 is not available on this CPU");
                // SAFETY: AVX2 and FMA were checked above.
                return unsafe { v3(key, base, p, src, dst, add) };
            }
            Isa::Generic => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    dropout_mul_body(key, base, p, src, dst, add)
}

#[inline(always)]
fn dropout_mul_body(key: u64, base: usize, p: f32, src: &[f32], dst: &mut [f32], add: bool) {
    const LANES: usize = 16;
    let n = dst.len();
    let src = &src[..n];
    let keep = 1.0 / (1.0 - p);
    let thr = p * 16_777_216.0;
    // One draw: the hash of mask index `idx` against the threshold.
    #[inline(always)]
    fn draw(key: u64, idx: u64, thr: f32, keep: f32) -> f32 {
        let h = super::lora::splitmix64(key ^ idx.wrapping_mul(super::lora::MASK_INDEX_MUL));
        if ((h >> 40) as u32 as f32) < thr {
            0.0
        } else {
            keep
        }
    }
    // whole blocks of 16: the draws over a fixed-size array of lane
    // indices, then contiguous products (indexed loads/stores vectorized
    // into gathers and scatters: 1.2 ns an element)
    let mut dc = dst.chunks_exact_mut(LANES);
    let mut sc = src.chunks_exact(LANES);
    for (c, (d, s)) in (&mut dc).zip(&mut sc).enumerate() {
        let b0 = (base + c * LANES) as u64;
        let mut f = [0f32; LANES];
        for (l, fl) in f.iter_mut().enumerate() {
            *fl = draw(key, b0 + l as u64, thr, keep);
        }
        if add {
            for ((d, s), f) in d.iter_mut().zip(s).zip(&f) {
                *d += s * f;
            }
        } else {
            for ((d, s), f) in d.iter_mut().zip(s).zip(&f) {
                *d = s * f;
            }
        }
    }
    let done = n - n % LANES;
    for (e, (d, s)) in dc
        .into_remainder()
        .iter_mut()
        .zip(sc.remainder())
        .enumerate()
    {
        let v = s * draw(key, (base + done + e) as u64, thr, keep);
        if add {
            *d += v;
        } else {
            *d = v;
        }
    }
}

multiversion! {
    /// One key row of attention's backward: the probabilities `s[c] =
    /// exp(s[c] − shift[c])` (the scores minus each query's log-sum-exp) and
    /// the scores' gradient `dp[c] = s[c]·(dp[c] − dsum[c])`, in place.
    pub fn exp_sub_grad(s: &mut [f32], shift: &[f32], dp: &mut [f32], dsum: &[f32]) -> () {
        for (((x, l), g), d) in s.iter_mut().zip(shift).zip(dp.iter_mut()).zip(dsum) {
            let p = exp(*x - l);
            *x = p;
            *g = p * (*g - d);
        }
    }
}

multiversion! {
    /// `Σ a[j]·b[j]` over 16 interleaved f32 partial sums, then those in
    /// order: a fixed order, the same bits on every instruction-set level
    /// (a sequential sum's chain of dependent adds does not vectorize).
    pub fn dot / dot_isa(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: sizes");
        let mut acc = [0f32; 16];
        let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
        for (x, y) in (&mut ca).zip(&mut cb) {
            for ((s, p), q) in acc.iter_mut().zip(x).zip(y) {
                *s += p * q;
            }
        }
        for ((s, p), q) in acc.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
            *s += p * q;
        }
        acc.iter().sum()
    }
}

multiversion! {
    /// Maximum of a slice (−∞ when empty; NaNs skipped, as `f32::max`).
    pub fn max / max_isa(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a = a.max(*v);
            }
        }
        let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in chunks.remainder() {
            m = m.max(*v);
        }
        m
    }
}

/// `dst[j] = bf16(src[j])` as bits, round to nearest even (see
/// [`bf16_bits`]): on CPUs with AVX512-BF16 through its conversion
/// instruction (16 values per instruction), else [`to_bf16_plain`].
pub fn to_bf16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: AVX-512 F and BF16 were detected at run time.
        unsafe { to_bf16_avx512bf16(src, dst) };
        return;
    }
    to_bf16_plain(src, dst)
}

/// Whether [`to_bf16`] uses the AVX512-BF16 conversion (the best ISA level
/// is AVX-512 and the CPU has AVX512-BF16).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::best() == Isa::V4 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`to_bf16`] with `VCVTNEPS2BF16`: the same round to nearest even and the
/// same quiet NaNs as [`bf16_bits`], but the instruction treats subnormal
/// inputs as zero, so a vector holding one is converted by [`bf16_bits`]
/// instead (bit for bit [`to_bf16_plain`] on every input).
///
/// # Safety
/// AVX-512 F and AVX512-BF16 are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16_avx512bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let exp_mask = _mm512_set1_epi32(0x7f80_0000);
    let man_mask = _mm512_set1_epi32(0x007f_ffff);
    let zero = _mm512_setzero_si512();
    let mut j = 0;
    while j + 16 <= n {
        let v = _mm512_loadu_ps(src.as_ptr().add(j));
        let b = _mm512_castps_si512(v);
        // subnormal: exponent 0, mantissa not 0
        let sub = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, exp_mask), zero)
            & _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, man_mask), zero);
        if sub == 0 {
            let h = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(j) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        } else {
            for k in j..j + 16 {
                dst[k] = bf16_bits(src[k]);
            }
        }
        j += 16;
    }
    for k in j..n {
        dst[k] = bf16_bits(src[k]);
    }
}

multiversion! {
    /// [`to_bf16`] without the AVX512-BF16 instruction (a loop over
    /// [`bf16_bits`] that vectorizes).
    pub fn to_bf16_plain(src: &[f32], dst: &mut [u16]) -> () {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = bf16_bits(*v);
        }
    }
}

/// f32 → bf16 bits, round to nearest even (NaN stays a quiet NaN); the same
/// as `half::bf16::from_f32`, written so that loops over it vectorize.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// Rows ahead that the readers and writers of strided rows prefetch (a
/// head's row of q, k or v is a few lines a whole row stride from the next,
/// in a new page every row or two, which the hardware prefetchers do not
/// follow; 8 rows: a few hundred cycles of work ahead).
pub(crate) const PREFETCH_ROWS: usize = 8;

/// Hints the cache lines of `n` floats from `p` into L1 (a prefetch never
/// faults, whatever the address).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(p, n);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// [`prefetch`] with intent to write (the lines come in exclusive: the
/// stores that follow do not wait on them).
#[inline(always)]
pub(crate) fn prefetch_w(p: *const f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_ET0 }>(p, n);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// One `_mm_prefetch` with `HINT` per cache line of `n` floats from `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32>(p: *const f32, n: usize) {
    for k in (0..n).step_by(16) {
        // SAFETY: a hint only; `wrapping_add` keeps the address arithmetic defined.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(k) as *const i8) };
    }
}

multiversion! {
    /// SwiGLU forward: `m[j] = silu(g[j]) · u[j]` with torch's
    /// `silu(z) = z / (1 + e^{-z})`, on the vectorized [`exp`].
    pub fn swiglu_forward / swiglu_forward_isa(g: &[f32], u: &[f32], m: &mut [f32]) -> () {
        assert!(g.len() == m.len() && u.len() == m.len(), "swiglu: sizes");
        for ((o, gv), uv) in m.iter_mut().zip(g).zip(u) {
            *o = *gv / (1.0 + exp(-*gv)) * *uv;
        }
    }
}

multiversion! {
    /// SwiGLU backward: `dg = dm · u · σ(g) · (1 + g (1 − σ(g)))`, `du = dm · silu(g)`.
    pub fn swiglu_backward / swiglu_backward_isa(
        dm: &[f32],
        g: &[f32],
        u: &[f32],
        dg: &mut [f32],
        du: &mut [f32]
    ) -> () {
        let n = dm.len();
        assert!(g.len() == n && u.len() == n && dg.len() == n && du.len() == n, "swiglu: sizes");
        for i in 0..n {
            let gv = g[i];
            let s = 1.0 / (1.0 + exp(-gv));
            du[i] = dm[i] * (gv * s);
            dg[i] = dm[i] * u[i] * s * (1.0 + gv * (1.0 - s));
        }
    }
}

multiversion! {
    /// Whole rows of [`super::rmsnorm::forward`]: `y` (uninitialized, every
    /// element written) and `rstd` from `x`, rows of `w.len()`.
    pub fn rmsnorm_forward_rows / rmsnorm_forward_rows_isa(
        x: &[f32],
        w: &[f32],
        eps: f32,
        y: &mut [std::mem::MaybeUninit<f32>],
        rstd: &mut [f32]
    ) -> () {
        let h = w.len();
        for ((yr, rs), xr) in y.chunks_exact_mut(h).zip(rstd.iter_mut()).zip(x.chunks_exact(h)) {
            let ss = super::rmsnorm::dot_f64(xr, xr, None);
            let var = (ss / h as f64) as f32;
            let r = 1.0 / (var + eps).sqrt();
            *rs = r;
            for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                o.write(wv * (xv * r));
            }
        }
    }
}

multiversion! {
    /// Whole rows of [`super::rmsnorm::backward_add`].
    pub fn rmsnorm_backward_rows / rmsnorm_backward_rows_isa(
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        dx: &mut [f32]
    ) -> () {
        let h = w.len();
        for (((dxr, dyr), xr), &r) in dx
            .chunks_exact_mut(h)
            .zip(dy.chunks_exact(h))
            .zip(x.chunks_exact(h))
            .zip(rstd)
        {
            let m = (super::rmsnorm::dot_f64(dyr, xr, Some(w)) * r as f64 / h as f64) as f32;
            for (((o, d), xv), wv) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                *o += r * (d * wv - xv * r * m);
            }
        }
    }
}

multiversion! {
    /// Whole rows (`heads·d` values each) of [`super::rope::apply`], with
    /// their rows of the `[.., d/2]` tables.
    pub fn rope_rows / rope_rows_isa(
        x: &mut [f32],
        heads: usize,
        d: usize,
        cos: &[f32],
        sin: &[f32],
        inverse: bool
    ) -> () {
        let half = d / 2;
        for (row, (c, s)) in x
            .chunks_exact_mut(heads * d)
            .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
        {
            for hd in row.chunks_exact_mut(d) {
                let (lo, hi) = hd.split_at_mut(half);
                for j in 0..half {
                    let (x1, x2) = (lo[j], hi[j]);
                    if inverse {
                        lo[j] = x1 * c[j] + x2 * s[j];
                        hi[j] = x2 * c[j] - x1 * s[j];
                    } else {
                        lo[j] = x1 * c[j] - x2 * s[j];
                        hi[j] = x2 * c[j] + x1 * s[j];
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `Σ x²` in f64, over eight interleaved partial sums (a fixed order:
    /// the same bits on every instruction-set level and thread count).
    pub fn sum_squares_f64 / sum_squares_f64_isa(x: &[f32]) -> f64 {
        super::rmsnorm::dot_f64(x, x, None)
    }
}

multiversion! {
    /// `acc[j] += x[j]`.
    pub fn add_assign / add_assign_isa(acc: &mut [f32], x: &[f32]) -> () {
        assert_eq!(acc.len(), x.len(), "add_assign: sizes");
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    }
}

multiversion! {
    /// `row[j] *= k`.
    pub fn scale(row: &mut [f32], k: f32) -> () {
        for v in row.iter_mut() {
            *v *= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `to_bf16` (the AVX512-BF16 instruction where the CPU has it) equals
    /// `half::bf16::from_f32` bit for bit on random bit patterns (NaNs,
    /// infinities and subnormals among them), rounding ties, values that
    /// round to infinity or up out of the subnormals, single subnormals in
    /// otherwise normal vectors, and lengths off the 16 grid.
    #[test]
    fn bf16_conversion_equals_half_on_every_kind_of_value() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut bits: Vec<u32> = (0..1 << 20)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u32
            })
            .collect();
        for b in [
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffbf_ffff,
            0x0000_0001,
            0x807f_ffff,
            0x007f_ff80,
            0x007f_ffff,
            0x0080_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x7f7f_ffff,
            0x7f7f_8000,
            0xff7f_ffff,
            0x3f80_0000,
        ] {
            bits.extend(std::iter::repeat_n(0x3f80_0000, 7));
            bits.push(b);
        }
        let v: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        for len in [v.len(), v.len() - 5, 15, 16, 17, 0] {
            let mut got = vec![0u16; len];
            to_bf16(&v[..len], &mut got);
            for (k, (g, x)) in got.iter().zip(&v).enumerate() {
                assert_eq!(
                    *g,
                    half::bf16::from_f32(*x).to_bits(),
                    "{:#010x} at {k}",
                    x.to_bits()
                );
            }
        }
        println!("to_bf16 through AVX512-BF16: {}", has_avx512_bf16());
    }

    #[test]
    fn exp_is_within_3_ulp_of_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst rel err {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// `max` skips NaNs and treats ±∞ as `f32::max` does, on every
    /// instruction-set level (NaNs in whole 16-lane chunks and the tail).
    #[test]
    fn max_matches_f32_max_with_nans_and_infinities() {
        let mut cases: Vec<Vec<f32>> = vec![vec![], vec![f32::NEG_INFINITY; 40], vec![f32::NAN; 5]];
        for n in [1usize, 15, 16, 17, 33, 63, 64, 65, 79, 100, 128, 200, 257] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
            // a single largest value in every position class: each of the
            // four accumulators, the 16-wide tail, the scalar tail
            for at in [0, n / 3, n / 2, n - 1, n.saturating_sub(17)] {
                let mut one = vec![-5.0f32; n];
                one[at] = 3.5;
                cases.push(one);
            }
            let mut nan_first = v.clone();
            nan_first[0] = f32::NAN;
            let mut nan_last = v.clone();
            nan_last[n - 1] = f32::NAN;
            let mut inf = v.clone();
            inf[n / 2] = f32::INFINITY;
            cases.extend([v, nan_first, nan_last, inf]);
        }
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !isa.available() {
                eprintln!("SKIPPED: {isa:?} is not available on this CPU");
                continue;
            }
            for v in &cases {
                let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let got = max_isa(isa, v);
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "{isa:?} {v:?}: {got} vs {want}"
                );
            }
        }
    }

    /// The vector mask draws equal `v·dropout_factor(key, base + j, p)`
    /// element by element, bit for bit, on every instruction set: rates
    /// from none dropped to all, keys and bases whose index products wrap,
    /// lengths off the 16 grid, signed zeros, infinities and NaNs in the
    /// input (kept as the scalar product keeps them), overwrite and add.
    #[test]
    fn dropout_mask_draws_equal_the_scalar_definition_bit_for_bit() {
        use super::super::lora::dropout_factor;
        let src: Vec<f32> = (0..1000)
            .map(|j| match j % 97 {
                0 => -0.0,
                1 => f32::INFINITY,
                2 => f32::NAN,
                _ => ((j * 7919) % 2001) as f32 / 100.0 - 10.0,
            })
            .collect();
        let acc0: Vec<f32> = (0..1000).map(|j| (j % 13) as f32 * 0.25 - 1.5).collect();
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !dropout_level_available(isa) {
                eprintln!("SKIPPED: {isa:?} (with AVX512-DQ for V4) is not available on this CPU");
                continue;
            }
            let mut dropped = 0usize;
            for (key, base) in [
                (0u64, 0usize),
                (77, 5),
                (u64::MAX, 1 << 40),
                (0x1234_5678_9abc_def0, usize::MAX - 2000),
            ] {
                for p in [0.0f32, 1e-9, 0.05, 0.1, 0.5, 0.999, 1.0] {
                    for n in [0usize, 1, 15, 16, 17, 333, 1000] {
                        for add in [false, true] {
                            let mut got = acc0[..n].to_vec();
                            dropout_mul_isa(isa, key, base, p, &src[..n], &mut got, add);
                            for j in 0..n {
                                let f = dropout_factor(key, base + j, p);
                                dropped += usize::from(f == 0.0);
                                let v = src[j] * f;
                                let want = if add { acc0[j] + v } else { v };
                                assert!(
                                    same(got[j], want),
                                    "{isa:?} key {key} base {base} p {p} n {n} add {add} j {j}: {} vs {}",
                                    got[j],
                                    want
                                );
                            }
                        }
                    }
                }
            }
            assert!(dropped > 0, "{isa:?}: no element was ever dropped");
        }
    }

    #[test]
    fn slice_kernels_match_scalar() {
        let v: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .collect();
        assert_eq!(max(&v), v.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut a = v.clone();
        let s = exp_shift_sum(&mut a, 3.0);
        let want: f64 = v.iter().map(|x| ((x - 3.0) as f64).exp()).sum();
        assert!((s - want).abs() < 1e-5 * want);
        for (x, y) in a.iter().zip(&v) {
            assert_eq!(*x, exp(y - 3.0));
        }
        // every instruction-set level gives the scalar `exp`, bit for bit
        // (the vectorized exponent assembly included), and the same sum
        let mut wide: Vec<f32> = (0..4099).map(|i| i as f32 * 0.047 - 100.0).collect();
        wide.extend([f32::NEG_INFINITY, -87.4, -87.2, 88.2, 88.4, 1e3]);
        let mut sums = vec![];
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !isa.available() {
                eprintln!("SKIPPED: {isa:?} is not available on this CPU");
                continue;
            }
            let mut a = wide.clone();
            sums.push(exp_shift_sum_isa(isa, &mut a, 0.25).to_bits());
            for (x, y) in a.iter().zip(&wide) {
                assert_eq!(
                    x.to_bits(),
                    exp(y - 0.25).to_bits(),
                    "{isa:?} exp({y} - 0.25)"
                );
            }
        }
        assert!(sums.windows(2).all(|w| w[0] == w[1]));
        let mut b = v.clone();
        scale(&mut b, 0.5);
        assert!(b.iter().zip(&v).all(|(x, y)| *x == y * 0.5));
    }

    /// The row kernels of RMSNorm and RoPE, the residual add and the sum of
    /// squares on every instruction-set level this CPU has: bit for bit the
    /// plain compilation, which matches the formulas in f64 (RMSNorm's
    /// statistic and the sum of squares, both in f64 over eight partial
    /// sums) or exactly (RoPE, the add).
    #[test]
    fn row_kernels_are_the_same_bits_on_every_isa() {
        use std::mem::MaybeUninit;
        let mut s = 7u64;
        let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        for (rows, h) in [(1, 1), (3, 7), (5, 64), (9, 576), (2, 1000)] {
            let x = rnd(rows * h, 4.0);
            let w = rnd(h, 2.0);
            let dy = rnd(rows * h, 1.0);
            let dx0 = rnd(rows * h, 1.0);
            let run = |isa: Isa| {
                let mut y = vec![MaybeUninit::new(f32::NAN); rows * h];
                let mut rstd = vec![0f32; rows];
                rmsnorm_forward_rows_isa(isa, &x, &w, 1e-5, &mut y, &mut rstd);
                // SAFETY: every element was written (initialized above anyway)
                let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
                let mut dx = dx0.clone();
                rmsnorm_backward_rows_isa(isa, &dy, &x, &w, &rstd, &mut dx);
                let mut acc = dx0.clone();
                add_assign_isa(isa, &mut acc, &x);
                (y, rstd, dx, acc, sum_squares_f64_isa(isa, &x))
            };
            let want = run(Isa::Generic);
            // the plain compilation against the formulas
            for r in 0..rows {
                let xr = &x[r * h..(r + 1) * h];
                let ss: f64 = xr.iter().map(|v| *v as f64 * *v as f64).sum();
                let rs = 1.0 / ((ss / h as f64) as f32 + 1e-5).sqrt();
                assert!(
                    (want.1[r] - rs).abs() <= 4.0 * f32::EPSILON * rs,
                    "rstd row {r}"
                );
                for j in 0..h {
                    assert_eq!(want.0[r * h + j], w[j] * (xr[j] * want.1[r]));
                    assert_eq!(want.3[r * h + j], dx0[r * h + j] + xr[j]);
                }
            }
            let ss: f64 = x.iter().map(|v| *v as f64 * *v as f64).sum();
            assert!((want.4 - ss).abs() <= 1e-12 * ss);
            for isa in [Isa::V4, Isa::V3] {
                if !isa.available() {
                    eprintln!("SKIPPED: {isa:?} is not available on this CPU");
                    continue;
                }
                assert!(
                    run(isa) == want,
                    "{isa:?} differs from the plain compilation ({rows}x{h})"
                );
            }
        }
        // the dot product (attention's Σ dO ⊙ O): lengths around the 16
        // lanes, within f32 summation of the f64 sum
        for n in [0usize, 1, 15, 16, 17, 64, 80, 1000] {
            let (a, b) = (rnd(n, 4.0), rnd(n, 2.0));
            let want = dot_isa(Isa::Generic, &a, &b);
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mag: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * *y as f64).abs())
                .sum();
            assert!((want as f64 - exact).abs() <= 1e-6 * (1.0 + mag), "dot {n}");
            for isa in [Isa::V4, Isa::V3] {
                if isa.available() {
                    assert_eq!(
                        dot_isa(isa, &a, &b).to_bits(),
                        want.to_bits(),
                        "dot {n} {isa:?}"
                    );
                }
            }
        }
        for (rows, heads, d) in [(3, 2, 8), (5, 9, 64), (2, 4, 128)] {
            let x = rnd(rows * heads * d, 2.0);
            let cos = rnd(rows * d / 2, 2.0);
            let sin = rnd(rows * d / 2, 2.0);
            for inverse in [false, true] {
                let run = |isa: Isa| {
                    let mut y = x.clone();
                    rope_rows_isa(isa, &mut y, heads, d, &cos, &sin, inverse);
                    y
                };
                let want = run(Isa::Generic);
                let half = d / 2;
                for (r, (xr, yr)) in x.chunks(heads * d).zip(want.chunks(heads * d)).enumerate() {
                    let (c, s) = (&cos[r * half..], &sin[r * half..]);
                    for (xh, yh) in xr.chunks(d).zip(yr.chunks(d)) {
                        for j in 0..half {
                            let (x1, x2) = (xh[j], xh[j + half]);
                            let (a, b) = if inverse {
                                (x1 * c[j] + x2 * s[j], x2 * c[j] - x1 * s[j])
                            } else {
                                (x1 * c[j] - x2 * s[j], x2 * c[j] + x1 * s[j])
                            };
                            assert_eq!((yh[j], yh[j + half]), (a, b));
                        }
                    }
                }
                for isa in [Isa::V4, Isa::V3] {
                    if isa.available() {
                        assert!(run(isa) == want, "RoPE {isa:?} ({rows}x{heads}x{d})");
                    }
                }
            }
        }
    }
}
