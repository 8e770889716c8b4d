//! Run-time selection of the SIMD kernels.
//!
//! [`Backend::detect`] picks the best kernel set the CPU supports once per process
//! (`is_x86_feature_detected!`); everything compiles on every architecture and falls back
//! to the portable scalar kernels (which the compiler auto-vectorizes where it can). The
//! environment variable `QLORA_QUANT_BACKEND=scalar` forces the portable kernels (for
//! comparisons and benchmarks).
//!
//! AVX-512 (F + BW) adds one kernel: whole blocks dequantized to bf16, a word permute
//! per 32 elements from the block's 16-entry table (the AMX training path dequantizes
//! every frozen weight to bf16 twice a step, and there the AVX2 kernel's per-block table
//! and lookups cost 0.12-0.17 ns per element). Everything else runs the AVX2 kernels on
//! that backend. Every backend the CPU has is run by the same tests against the reference.

use std::sync::OnceLock;

/// A kernel set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Portable scalar kernels.
    Scalar,
    /// x86-64 AVX2 (+ F16C) kernels.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernels plus AVX-512 F + BW ones where they exist (bf16 dequantization).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Backend {
    /// The best backend of this CPU (cached; `QLORA_QUANT_BACKEND=scalar` forces scalar).
    pub fn detect() -> Backend {
        static DETECTED: OnceLock<Backend> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if std::env::var("QLORA_QUANT_BACKEND").is_ok_and(|v| v.eq_ignore_ascii_case("scalar"))
            {
                return Backend::Scalar;
            }
            Backend::available()
                .into_iter()
                .last()
                .unwrap_or(Backend::Scalar)
        })
    }

    /// Every backend this CPU can run, worst first.
    pub fn available() -> Vec<Backend> {
        #[allow(unused_mut)]
        let mut v = vec![Backend::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            v.push(Backend::Avx2);
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                v.push(Backend::Avx512);
            }
        }
        v
    }

    /// Whether this is the AVX-512 (F + BW) backend.
    pub fn has_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Backend::Avx512 {
            return true;
        }
        false
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => "avx512",
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 kernels. Callers must have checked `avx2` and `f16c` (see [`super::Backend`]).
    //! Every arithmetic step is the same IEEE f32 operation as in the scalar path (no FMA),
    //! so results are bit-identical.

    use std::arch::x86_64::*;

    use crate::quantize::{
        absmax_scalar, block_scale, encode_scalar, quantize_block_scalar, Elem, ElemKind,
        EncodeTables, Scale,
    };
    use crate::DType;

    /// Loads 8 elements as f32 (bf16: widen and shift; f16: F16C, exact).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        match T::KIND {
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
            ElemKind::BF16 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }

    /// Max |x| over the block and whether every element is finite.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn absmax_avx2<T: Elem>(x: &[T]) -> (f32, bool) {
        let sign = _mm256_set1_ps(-0.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut m0 = _mm256_setzero_ps();
        let mut m1 = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let chunks = x.chunks_exact(16);
        let rem = chunks.remainder();
        for c in chunks {
            let a = _mm256_andnot_ps(sign, load8(c.as_ptr()));
            let b = _mm256_andnot_ps(sign, load8(c.as_ptr().add(8)));
            // NLT_UQ: true for +inf and for NaN.
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(b, inf));
            m0 = _mm256_max_ps(m0, a);
            m1 = _mm256_max_ps(m1, b);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(m0, m1));
        let (tail_max, tail_finite) = absmax_scalar(rem);
        let am = lanes.iter().fold(tail_max, |m, &v| m.max(v));
        (am, tail_finite && _mm256_movemask_ps(bad) == 0)
    }

    /// Threshold tables of the 4-level binary search: level 1 compares with `th[7]`, level
    /// 2 with `th[i + 3]` (i in {0, 8}), level 3 `th[i + 1]` (i in {0, 4, 8, 12}), level 4
    /// `th[i]` (i even); each table is indexed by `i >> shift` with `permutevar8x32`.
    pub(crate) struct SearchTables {
        t1: __m256,
        t2: __m256,
        t3: __m256,
        t4: __m256,
    }

    impl SearchTables {
        #[target_feature(enable = "avx2")]
        #[inline]
        pub(crate) fn new(t: &EncodeTables) -> SearchTables {
            // SAFETY: each `levels` row is 8 f32 (unaligned loads).
            unsafe {
                SearchTables {
                    t1: _mm256_set1_ps(t.th[7]),
                    t2: _mm256_loadu_ps(t.levels[0].as_ptr()),
                    t3: _mm256_loadu_ps(t.levels[1].as_ptr()),
                    t4: _mm256_loadu_ps(t.levels[2].as_ptr()),
                }
            }
        }
    }

    /// Sorted-table index of 8 scaled values: `#{k : th[k] < s}` by a branchless binary
    /// search (the same steps as `EncodeTables::code`), strict `<` so ties go low.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn index8(x: __m256, scale: __m256, div: bool, st: &SearchTables) -> __m256i {
        let s = if div {
            _mm256_div_ps(x, scale)
        } else {
            _mm256_mul_ps(x, scale)
        };
        let s = _mm256_min_ps(_mm256_max_ps(s, _mm256_set1_ps(-1.0)), _mm256_set1_ps(1.0));
        let lt = |t: __m256| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(t, s));
        let mut i = _mm256_and_si256(lt(st.t1), _mm256_set1_epi32(8));
        let t = _mm256_permutevar8x32_ps(st.t2, _mm256_srli_epi32::<3>(i));
        i = _mm256_or_si256(i, _mm256_and_si256(lt(t), _mm256_set1_epi32(4)));
        let t = _mm256_permutevar8x32_ps(st.t3, _mm256_srli_epi32::<2>(i));
        i = _mm256_or_si256(i, _mm256_and_si256(lt(t), _mm256_set1_epi32(2)));
        let t = _mm256_permutevar8x32_ps(st.t4, _mm256_srli_epi32::<1>(i));
        _mm256_or_si256(i, _mm256_and_si256(lt(t), _mm256_set1_epi32(1)))
    }

    /// Quantizes one block (see `quantize_block_scalar` for the contract).
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn quantize_block_avx2<T: Elem>(
        x: &[T],
        partial: bool,
        t: &EncodeTables,
        out: &mut [u8],
    ) -> (f32, bool) {
        let (am, finite) = absmax_avx2(x);
        if !finite {
            // Rare (and an error unless allowed): the scalar kernel has the semantics.
            return quantize_block_scalar(x, partial, t, out);
        }
        let (stored, scale) = block_scale(am, partial);
        let (sv, div) = match scale {
            Scale::Mul(r) => (_mm256_set1_ps(r), false),
            Scale::Div(a) => (_mm256_set1_ps(a), true),
        };
        let th = SearchTables::new(t);
        let ord = _mm_loadu_si128(t.ord.as_ptr() as *const __m128i);
        let ord = _mm256_set_m128i(ord, ord);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let low_byte = _mm256_set1_epi16(0x00ff);
        let chunks = x.chunks_exact(32);
        let rem = chunks.remainder();
        let mut o = out.as_mut_ptr();
        for c in chunks {
            let p = c.as_ptr();
            let a = index8(load8(p), sv, div, &th);
            let b = index8(load8(p.add(8)), sv, div, &th);
            let cc = index8(load8(p.add(16)), sv, div, &th);
            let d = index8(load8(p.add(24)), sv, div, &th);
            // 32 indices -> 32 bytes in element order.
            let ab = _mm256_packs_epi32(a, b);
            let cd = _mm256_packs_epi32(cc, d);
            let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
            let v = _mm256_shuffle_epi8(ord, v);
            // Byte pairs (v[2j], v[2j+1]) -> v[2j] << 4 | v[2j+1].
            let w = _mm256_or_si256(_mm256_slli_epi16::<4>(v), _mm256_srli_epi16::<8>(v));
            let w = _mm256_and_si256(w, low_byte);
            let packed = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(w, w));
            _mm_storeu_si128(o as *mut __m128i, _mm256_castsi256_si128(packed));
            o = o.add(16);
        }
        let done = (x.len() - rem.len()) / 2;
        encode_scalar(rem, scale, t, &mut out[done..]);
        (stored, true)
    }

    /// Nibble indices of 16 packed bytes in element order: (elements 0..16, 16..32).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
        let b = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
        let lo = _mm_and_si128(b, m);
        (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo))
    }

    /// f32 dequantization of whole bytes of one block (`out.len() == 2 * bytes.len()`),
    /// the table optionally rounded through bf16/f16 first.
    /// With `stream`, 16-byte aligned outputs are written with non-temporal stores (no
    /// read-for-ownership; the caller issues the `sfence`).
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn expand_f32_avx2(
        bytes: &[u8],
        map: &[f32; 16],
        absmax: f32,
        round: DType,
        stream: bool,
        out: &mut [f32],
    ) {
        debug_assert_eq!(out.len(), 2 * bytes.len());
        let a = _mm256_set1_ps(absmax);
        let mut lo = _mm256_mul_ps(_mm256_loadu_ps(map.as_ptr()), a);
        let mut hi = _mm256_mul_ps(_mm256_loadu_ps(map.as_ptr().add(8)), a);
        match round {
            DType::F32 => {}
            DType::BF16 => {
                lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bf16_rne(lo)));
                hi = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bf16_rne(hi)));
            }
            DType::F16 => {
                lo = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(lo));
                hi = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(hi));
            }
        }
        let nt = stream && (out.as_ptr() as usize).is_multiple_of(16);
        let chunks = bytes.chunks_exact(16);
        let rem = chunks.remainder();
        let mut o = out.as_mut_ptr();
        for c in chunks {
            let (i0, i1) = nibbles(c.as_ptr());
            for idx8 in [
                i0,
                _mm_unpackhi_epi64(i0, i0),
                i1,
                _mm_unpackhi_epi64(i1, i1),
            ] {
                let idx = _mm256_cvtepu8_epi32(idx8);
                let vlo = _mm256_permutevar8x32_ps(lo, idx);
                let vhi = _mm256_permutevar8x32_ps(hi, idx);
                // Bit 3 of the index moved to the sign bit selects the upper half.
                let sel = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                store32(
                    o as *mut u8,
                    _mm256_castps_si256(_mm256_blendv_ps(vlo, vhi, sel)),
                    nt,
                );
                o = o.add(8);
            }
        }
        let done = bytes.len() - rem.len();
        crate::dequantize::expand_scalar(rem, map, absmax, round, &mut out[2 * done..]);
    }

    /// Stores 32 bytes: unaligned, or as two 16-byte non-temporal stores (`p` 16-aligned).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store32(p: *mut u8, v: __m256i, nt: bool) {
        if nt {
            _mm_stream_si128(p as *mut __m128i, _mm256_castsi256_si128(v));
            _mm_stream_si128(p.add(16) as *mut __m128i, _mm256_extracti128_si256::<1>(v));
        } else {
            _mm256_storeu_si256(p as *mut __m256i, v);
        }
    }

    /// Orders earlier non-temporal stores before later stores (end of a streamed task).
    pub(crate) fn store_fence() {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { _mm_sfence() }
    }

    /// Splits 16 u16 table entries (in element order) into byte planes broadcast to both
    /// lanes: (low bytes, high bytes).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn planes(entries: __m256i) -> (__m256i, __m256i) {
        let split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
            5, 7, 9, 11, 13, 15,
        );
        let q = _mm256_shuffle_epi8(entries, split);
        // qwords: [lo 0-7, hi 0-7, lo 8-15, hi 8-15] -> [lo 0-7, lo 8-15, hi 0-7, hi 8-15]
        let q = _mm256_permute4x64_epi64::<0b11_01_10_00>(q);
        (
            _mm256_permute2x128_si256::<0x00>(q, q),
            _mm256_permute2x128_si256::<0x11>(q, q),
        )
    }

    /// bf16 table `bf16(map[k] * absmax)` (round to nearest even, NaN quieted like `half`).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn lut_bf16_avx2(map: &[f32; 16], absmax: f32) -> (__m256i, __m256i) {
        let a = _mm256_set1_ps(absmax);
        let f_lo = _mm256_mul_ps(_mm256_loadu_ps(map.as_ptr()), a);
        let f_hi = _mm256_mul_ps(_mm256_loadu_ps(map.as_ptr().add(8)), a);
        let u_lo = bf16_rne(f_lo);
        let u_hi = bf16_rne(f_hi);
        // packus: [lo0-3, hi0-3 | lo4-7, hi4-7] -> qwords [0, 2, 1, 3] = entries 0..16.
        let e = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(u_lo, u_hi));
        planes(e)
    }

    /// f32 -> bf16 bits (in the low half of each i32 lane), exactly `half::bf16::from_f32`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn bf16_rne(f: __m256) -> __m256i {
        let bits = _mm256_castps_si256(f);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
        let r = _mm256_srli_epi32::<16>(rounded);
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(f, f));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
        _mm256_blendv_epi8(r, quiet, nan)
    }

    /// f16 table `f16(map[k] * absmax)` (F16C, round to nearest even).
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn lut_f16_avx2(map: &[f32; 16], absmax: f32) -> (__m256i, __m256i) {
        let a = _mm256_set1_ps(absmax);
        let h_lo = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(
            _mm256_loadu_ps(map.as_ptr()),
            a,
        ));
        let h_hi = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(
            _mm256_loadu_ps(map.as_ptr().add(8)),
            a,
        ));
        planes(_mm256_set_m128i(h_hi, h_lo))
    }

    /// 16-bit dequantization of whole bytes of one block from a byte-plane table
    /// (`out.len() == 2 * bytes.len()`; `T` is bf16 or f16, both plain u16 bit patterns).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn expand_u16_avx2<T: Copy>(
        bytes: &[u8],
        tab: (__m256i, __m256i),
        stream: bool,
        out: &mut [T],
    ) {
        let nt = stream && (out.as_ptr() as usize).is_multiple_of(16);
        debug_assert_eq!(std::mem::size_of::<T>(), 2);
        debug_assert_eq!(out.len(), 2 * bytes.len());
        let (lo_tab, hi_tab) = tab;
        let chunks = bytes.chunks_exact(16);
        let rem = chunks.remainder();
        let mut o = out.as_mut_ptr() as *mut u8;
        for c in chunks {
            let (i0, i1) = nibbles(c.as_ptr());
            let idx = _mm256_set_m128i(i1, i0);
            let l = _mm256_shuffle_epi8(lo_tab, idx);
            let h = _mm256_shuffle_epi8(hi_tab, idx);
            let u_lo = _mm256_unpacklo_epi8(l, h); // elements 0-7 | 16-23
            let u_hi = _mm256_unpackhi_epi8(l, h); // elements 8-15 | 24-31
            store32(o, _mm256_permute2x128_si256::<0x20>(u_lo, u_hi), nt);
            store32(o.add(32), _mm256_permute2x128_si256::<0x31>(u_lo, u_hi), nt);
            o = o.add(64);
        }
        if rem.is_empty() {
            return;
        }
        // Tail (< 16 bytes): look the codes up in the same table, read back from the planes.
        let mut lo_b = [0u8; 32];
        let mut hi_b = [0u8; 32];
        _mm256_storeu_si256(lo_b.as_mut_ptr() as *mut __m256i, lo_tab);
        _mm256_storeu_si256(hi_b.as_mut_ptr() as *mut __m256i, hi_tab);
        let done = bytes.len() - rem.len();
        let o = out.as_mut_ptr().add(2 * done) as *mut u16;
        for (j, &b) in rem.iter().enumerate() {
            let h = (b >> 4) as usize;
            let l = (b & 0x0f) as usize;
            o.add(2 * j)
                .write_unaligned(u16::from_le_bytes([lo_b[h], hi_b[h]]));
            o.add(2 * j + 1)
                .write_unaligned(u16::from_le_bytes([lo_b[l], hi_b[l]]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_512 {
    //! AVX-512 F + BW kernels. Callers must have checked both (see [`super::Backend`]).

    use std::arch::x86_64::*;

    /// A block's 16-entry table: `bf16(map[k] · a)` rounded to nearest even
    /// (the same f32 product and rounding as `half::bf16::from_f32`, for a
    /// finite `a`), one word per entry.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn bf16_table(map: __m512, a: f32) -> __m256i {
        let f = _mm512_castps_si512(_mm512_mul_ps(map, _mm512_set1_ps(a)));
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(f), _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            _mm512_add_epi32(f, _mm512_set1_epi32(0x7fff)),
            lsb,
        ));
        _mm512_cvtepi32_epi16(r)
    }

    /// Stores the 16 × 16 matrix of u32 whose row `k` is `r[k]` transposed:
    /// row `q` of the result (16 u32 at `dst + 16q`) is lane `q` of every
    /// `r[k]`. Three rounds of in-lane unpacks and 128-bit shuffles (64
    /// shuffles for the 16 rows).
    ///
    /// # Safety
    /// AVX-512 F is available; `dst` is valid for writes of 256 u32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16x16_u32(r: &[__m512i; 16], dst: *mut u32) {
        let mut t = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
        }
        // u[4g + m]: column 4L + m of rows 4g .. 4g+4, in 128-bit lane L.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_unpacklo_epi64(a, c);
            u[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
            u[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
            u[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
        }
        for m in 0..4 {
            let a = _mm512_shuffle_i32x4::<0x88>(u[m], u[4 + m]);
            let b = _mm512_shuffle_i32x4::<0xdd>(u[m], u[4 + m]);
            let c = _mm512_shuffle_i32x4::<0x88>(u[8 + m], u[12 + m]);
            let d = _mm512_shuffle_i32x4::<0xdd>(u[8 + m], u[12 + m]);
            _mm512_storeu_si512(
                dst.add(m * 16) as *mut _,
                _mm512_shuffle_i32x4::<0x88>(a, c),
            );
            _mm512_storeu_si512(
                dst.add((8 + m) * 16) as *mut _,
                _mm512_shuffle_i32x4::<0xdd>(a, c),
            );
            _mm512_storeu_si512(
                dst.add((4 + m) * 16) as *mut _,
                _mm512_shuffle_i32x4::<0x88>(b, d),
            );
            _mm512_storeu_si512(
                dst.add((12 + m) * 16) as *mut _,
                _mm512_shuffle_i32x4::<0xdd>(b, d),
            );
        }
    }

    /// Whole blocks of `bs` elements (`bs` a multiple of 32) dequantized to bf16 bits:
    /// block `k` is `bytes[k·bs/2 ..][.. bs/2]` with absmax `absmax[k]`, written to
    /// `out[k·bs ..][.. bs]`. Element `2j` is the high nibble of byte `j`, `2j + 1` the
    /// low one (bnb's order). Values are `bf16(map[code] · absmax)` rounded to nearest
    /// even, the same f32 product and rounding as `half::bf16::from_f32`; a block whose
    /// absmax is not finite (its products could be NaN, which `half` quiets differently)
    /// goes through the scalar kernel.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn expand_blocks_bf16(
        bytes: &[u8],
        absmax: &[f32],
        bs: usize,
        map: &[f32; 16],
        out: &mut [half::bf16],
    ) {
        assert!(bs.is_multiple_of(32));
        assert!(bytes.len() >= absmax.len() * bs / 2 && out.len() >= absmax.len() * bs);
        let m = _mm512_loadu_ps(map.as_ptr());
        let low = _mm512_set1_epi32(0x0f);
        for (k, &a) in absmax.iter().enumerate() {
            let src = &bytes[k * bs / 2..(k + 1) * bs / 2];
            let dst = &mut out[k * bs..(k + 1) * bs];
            if !a.is_finite() {
                crate::dequantize::expand_scalar(src, map, a, crate::DType::F32, dst);
                continue;
            }
            // The block's table in the first 16 words (a word permute of
            // them reads only lanes 0..16).
            let lut = _mm512_castsi256_si512(bf16_table(m, a));
            for (c, o) in src.chunks_exact(16).zip(dst.chunks_exact_mut(32)) {
                // dword j = high nibble | low nibble << 16: words 2j, 2j+1 in order
                let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.as_ptr() as *const __m128i));
                let idx = _mm512_or_si512(
                    _mm512_srli_epi32::<4>(d),
                    _mm512_slli_epi32::<16>(_mm512_and_si512(d, low)),
                );
                let v = _mm512_permutexvar_epi16(idx, lut);
                _mm512_storeu_si512(o.as_mut_ptr() as *mut _, v);
            }
        }
    }
}
