//! Vector math for the CPU kernels: `exp` eight lanes at a time on AVX2 + FMA, where the
//! softmax of attention (`attention_cpu`), the LM head's loss (`ops::linear_cross_entropy`)
//! and SiLU (`ops::swiglu`) spend their time (a call per element of `f32::exp` cost more than
//! the products around it), a row's maximum, and RoPE's rotation of one position.

/// `x = exp(x · scale − shift)` for every element, returning their sum: eight at a time on
/// AVX2 + FMA (a polynomial, within 2 ulp of `f32::exp`), `f32::exp` otherwise. On AVX2 the
/// arguments are clamped to [−87.3, 88.3] (e^−87.3 ≈ 1e-38, e^88.3 ≈ 2e38: what a softmax or a
/// sigmoid makes of them does not change); NaN stays NaN.
pub fn exp_shifted(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            // SAFETY: the features were detected above.
            return unsafe { exp_shifted_avx2(xs, scale, shift) };
        }
    }
    exp_shifted_scalar(xs, scale, shift)
}

/// The largest element (−∞ for none); NaN elements are passed over, as `f32::max` does, and
/// left for the `exp` after it to carry. Eight running maxima, which the compiler turns into
/// vector compares.
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// One position's RoPE (rotate-half): `out = x·cos + rotate_half(x)·sign·sin`, `cos`/`sin` the
/// position's d/2 angles (sign −1: the inverse rotation, a rotation's backward).
pub fn rotate_half(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        let s = sign * sin[i];
        o1[i] = x1 * cos[i] - x2 * s;
        o2[i] = x2 * cos[i] + x1 * s;
    }
}

/// [`exp_shifted`] with `f32::exp`.
pub fn exp_shifted_scalar(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x * scale - shift).exp();
        sum += *x;
    }
    sum
}

/// [`exp_shifted`] on AVX2 + FMA: e^a = 2^n · e^r with n = round(a·log2 e) and
/// r = a − n·ln 2 (ln 2 in two parts, so r is exact to f32), e^r by its degree-6 Taylor-like
/// minimax polynomial on |r| ≤ ln2/2, 2^n put in the exponent bits.
///
/// # Safety
/// AVX2 and FMA present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = xs.len();
    let p = xs.as_mut_ptr();
    let (vs, vshift) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
    let (lo, hi) = (_mm256_set1_ps(-87.3), _mm256_set1_ps(88.3));
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let (ln2_hi, ln2_lo) = (_mm256_set1_ps(0.693_359_4), _mm256_set1_ps(-2.121_944_4e-4));
    let c = [1.987_569_1e-4f32, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5].map(|c| _mm256_set1_ps(c));
    let one = _mm256_set1_ps(1.0);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: i + 8 <= n for every load and store.
    unsafe {
        while i + 8 <= n {
            // x·scale rounded before the shift, as the scalar path computes it.
            let a = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vs), vshift);
            // NaN passes through (max/min return their second operand when one is NaN), so a
            // non-finite score still shows in the loss (f16's loss scaling looks for it).
            let a = _mm256_min_ps(hi, _mm256_max_ps(lo, a));
            let k = _mm256_round_ps(_mm256_mul_ps(a, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            let r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, a));
            let mut y = c[0];
            for ci in &c[1..] {
                y = _mm256_fmadd_ps(y, r, *ci);
            }
            let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
            let two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
            let e = _mm256_mul_ps(y, two_k);
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: an 8-float store into an 8-float array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    lanes.iter().sum::<f32>() + exp_shifted_scalar(&mut xs[i..], scale, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector exp against `f32::exp` over the range a softmax feeds it (and beyond, where
    /// it clamps), in value and in the returned sum; lengths not a multiple of 8.
    #[test]
    fn vector_exp_matches_the_scalar_one() {
        let xs: Vec<f32> = (0..2003).map(|i| -95.0 + i as f32 * 0.0513).collect();
        for (scale, shift) in [(1.0f32, 0.0f32), (0.125, 3.5), (0.37, -1.25)] {
            let (mut fast, mut slow) = (xs.clone(), xs.clone());
            let (sf, ss) = (exp_shifted(&mut fast, scale, shift), exp_shifted_scalar(&mut slow, scale, shift));
            assert!(((sf - ss) / ss).abs() < 1e-6, "sum {sf} vs {ss}");
            for ((x, f), s) in xs.iter().zip(&fast).zip(&slow) {
                let a = x * scale - shift;
                if a > -87.3 {
                    assert!(((f - s) / s).abs() < 2.5e-7, "exp({a}) = {f}, f32::exp gives {s}");
                } else {
                    assert!(*f < 1.3e-38 && *s < 1.3e-38, "exp({a}) = {f}, f32::exp gives {s}");
                }
            }
        }
        let mut with_nan = vec![0.5f32; 19];
        with_nan[3] = f32::NAN;
        with_nan[17] = f32::NAN;
        assert!(exp_shifted(&mut with_nan, 1.0, 0.0).is_nan());
        assert!(with_nan[3].is_nan() && with_nan[17].is_nan() && with_nan[4].is_finite());
    }

    /// The running maximum against a fold, at lengths around the eight lanes, with the
    /// largest element in the remainder, in the lanes, and NaNs passed over.
    #[test]
    fn max_matches_a_fold() {
        for n in [0usize, 1, 7, 8, 9, 17, 100, 1003] {
            let mut xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 * -0.37 + 3.0).collect();
            assert_eq!(max(&xs), xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max), "n = {n}");
            if n > 0 {
                xs[n - 1] = 50.0;
                assert_eq!(max(&xs), 50.0);
                xs[n / 2] = 60.0;
                xs[0] = f32::NAN;
                assert_eq!(max(&xs), if n == 1 { f32::NEG_INFINITY } else { 60.0 }, "n = {n}");
            }
        }
    }
}
