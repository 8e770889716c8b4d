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
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// Dispatches a slice kernel to an AVX-512 / AVX2 compilation of the same
/// generic body (the body must be `#[inline(always)]`).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected at run time.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// `row[j] = exp(row[j] - shift)`; returns the sum of the new values (in
    /// f32 lanes of 16, then f64: a fixed order, independent of threads).
    pub fn exp_shift_sum(row: &mut [f32], shift: f32) -> f64 {
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

multiversion! {
    /// Maximum of a slice (−∞ when empty).
    pub fn max(row: &[f32]) -> f32 {
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

multiversion! {
    /// `dst[j] = bf16(src[j])` as bits, round to nearest even (see [`bf16_bits`]).
    pub fn to_bf16(src: &[f32], dst: &mut [u16]) -> () {
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
        let mut b = v.clone();
        scale(&mut b, 0.5);
        assert!(b.iter().zip(&v).all(|(x, y)| *x == y * 0.5));
    }
}
