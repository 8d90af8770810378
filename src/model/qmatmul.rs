//! CPU matmul against Q4_1 and Q8_0 blocks (`x·Wᵀ` with W held as llama.cpp blocks), for
//! generation.
//!
//! candle 0.11's CPU path for Q4_1 is its portable scalar loop (it has SIMD only for Q4_0,
//! Q8_0 and the k-quants), which made decoding the default model (a Q4_1 GGUF) several times
//! slower than it should be; its Q8_0 kernel (the default model's tied LM head) is SIMD but
//! runs on its own spin-wait pool next to ours. These kernels follow ggml's scheme: each row of `x` is quantized to
//! 8-bit blocks of 32 (scale `d`, `s` = d × the sum of the block's quantized values), and a weight block (scale `dw`, minimum
//! `mw`, 32 unsigned nibbles `q`) contributes `dw·d·Σ qᵢ·xqᵢ + mw·s`. The inner product runs on
//! AVX2 (`maddubs`/`madd`, 32 products per instruction pair) when the CPU has it, with a scalar
//! fallback that computes the same integers. Output rows are split across rayon's threads.

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;
const QK: usize = 32;

/// One row of activations quantized to 8-bit blocks.
struct Q8Row {
    /// Per block: scale.
    d: Vec<f32>,
    /// Per block: scale × the sum of the quantized values.
    s: Vec<f32>,
    /// 32 quantized values per block.
    q: Vec<i8>,
}

fn quantize_row(x: &[f32]) -> Q8Row {
    let nb = x.len() / QK;
    let mut d = Vec::with_capacity(nb);
    let mut s = Vec::with_capacity(nb);
    let mut q = vec![0i8; x.len()];
    for b in 0..nb {
        let xs = &x[b * QK..(b + 1) * QK];
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in q[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            *o = (v * inv).round() as i8;
            sum += *o as i32;
        }
        d.push(scale);
        // The sum of the *quantized* block: then the block's product is Σ wᵢ·x̃ᵢ for the
        // quantized x̃ as a whole; the exact Σ xᵢ would leave the (uncentred) dw·qᵢ part alone
        // with the rounding error, measured ~3x worse on the default model's projections.
        s.push(scale * sum as f32);
    }
    Q8Row { d, s, q }
}

/// The block formats this module multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// f16 scale, f16 minimum, 32 nibbles: `w = d·q + m`.
    Q4_1,
    /// f16 scale, 32 signed bytes: `w = d·q`.
    Q8_0,
}

impl BlockKind {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockKind::Q4_1 => Q4_1_BLOCK_BYTES,
            BlockKind::Q8_0 => Q8_0_BLOCK_BYTES,
        }
    }
}

/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 34;

fn dot_scalar(kind: BlockKind, w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(kind.block_bytes()).enumerate() {
        let dw = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let xq = &x.q[b * QK..(b + 1) * QK];
        let mut acc = 0i32;
        match kind {
            BlockKind::Q4_1 => {
                let qs = &block[4..20];
                for j in 0..QK / 2 {
                    acc += (qs[j] & 0x0F) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + QK / 2] as i32;
                }
                let mw = f16::from_le_bytes([block[2], block[3]]).to_f32();
                sum += mw * x.s[b];
            }
            BlockKind::Q8_0 => {
                for (w, x) in block[2..34].iter().zip(xq) {
                    acc += (*w as i8) as i32 * *x as i32;
                }
            }
        }
        sum += dw * x.d[b] * acc as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// Q4_1 row · quantized activations, two blocks per iteration (two independent chains).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `x.d.len()` Q4_1 blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_avx2(w: &[u8], x: &Q8Row) -> f32 {
    use std::arch::x86_64::*;
    let nb = x.d.len();
    debug_assert_eq!(w.len(), nb * Q4_1_BLOCK_BYTES);
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut mins = 0f32;
    let (wp, xq, xd, xs) = (w.as_ptr(), x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
    // One block: (dw·dx)·Σ q·xq as 8 lanes, and the minimum's contribution.
    let block = |b: usize| -> (__m256, f32) {
        // SAFETY (caller): block b exists in `w` (20 bytes: f16 scale, f16 minimum, 16 bytes of
        // nibbles) and in `x` (32 bytes); loads are unaligned.
        unsafe {
            let p = wp.add(b * Q4_1_BLOCK_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let packed = _mm_loadu_si128(p.add(4) as *const __m128i);
            let w8 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
            let x8 = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
            // u8 × i8 pairs summed to i16 (≤ 2·15·127), then pairs of i16 to i32.
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(w8, x8), ones);
            let scale = _mm256_set1_ps(_mm_cvtss_f32(dm) * *xd.add(b));
            let mw = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            (_mm256_mul_ps(_mm256_cvtepi32_ps(p32), scale), mw * *xs.add(b))
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        let (v0, m0) = block(b);
        let (v1, m1) = block(b + 1);
        acc0 = _mm256_add_ps(acc0, v0);
        acc1 = _mm256_add_ps(acc1, v1);
        mins += m0 + m1;
        b += 2;
    }
    if b < nb {
        let (v0, m0) = block(b);
        acc0 = _mm256_add_ps(acc0, v0);
        mins += m0;
    }
    // SAFETY: same target features as this function.
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) + mins }
}

/// Q8_0 row · quantized activations (signed × signed through `sign`, as `maddubs` wants an
/// unsigned operand).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `x.d.len()` Q8_0 blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_avx2(w: &[u8], x: &Q8Row) -> f32 {
    use std::arch::x86_64::*;
    let nb = x.d.len();
    debug_assert_eq!(w.len(), nb * Q8_0_BLOCK_BYTES);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (wp, xq, xd) = (w.as_ptr(), x.q.as_ptr(), x.d.as_ptr());
    let block = |b: usize| -> __m256 {
        // SAFETY (caller): block b exists in `w` (34 bytes: f16 scale, 32 signed bytes) and in
        // `x`; loads are unaligned.
        unsafe {
            let p = wp.add(b * Q8_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
            let w8 = _mm256_loadu_si256(p.add(2) as *const __m256i);
            let x8 = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w8, w8), _mm256_sign_epi8(x8, w8));
            let p32 = _mm256_madd_epi16(p16, ones);
            _mm256_mul_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d * *xd.add(b)))
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        acc0 = _mm256_add_ps(acc0, block(b));
        acc1 = _mm256_add_ps(acc1, block(b + 1));
        b += 2;
    }
    if b < nb {
        acc0 = _mm256_add_ps(acc0, block(b));
    }
    // SAFETY: same target features as this function.
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot(kind: BlockKind, w: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `w` is one row of `kind`
        // blocks matching `x` (checked by the caller).
        return unsafe {
            match kind {
                BlockKind::Q4_1 => dot_q4_1_avx2(w, x),
                BlockKind::Q8_0 => dot_q8_0_avx2(w, x),
            }
        };
    }
    dot_scalar(kind, w, x)
}

/// `x·Wᵀ` for `x` (…, k) f32 on the CPU and `weight` = the raw `kind` blocks of W (n, k).
/// Returns (…, n).
pub fn matmul(kind: BlockKind, x: &Tensor, weight: &[u8], n: usize, k: usize) -> Result<Tensor> {
    if !matches!(x.device(), Device::Cpu) {
        return Err(Error::Msg("quantized matmul: this kernel runs on the CPU".into()));
    }
    if k % QK != 0 || weight.len() != n * k / QK * kind.block_bytes() {
        return Err(Error::Msg(format!("{kind:?} weight of {} bytes does not fit ({n}, {k})", weight.len())));
    }
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(Error::Msg(format!("quantized matmul: input {dims:?} does not end in {k}")));
    }
    let m: usize = dims[..dims.len() - 1].iter().product();
    let xs: Vec<f32> = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let rows: Vec<Q8Row> = xs.chunks_exact(k).map(quantize_row).collect();
    let row_bytes = k / QK * kind.block_bytes();
    // Output transposed, (n, m): each task owns a contiguous run of weight rows, reads each
    // weight row once and applies it to every input row.
    let mut out_t = vec![0f32; n * m];
    let per_task = (n / (4 * rayon::current_num_threads().max(1))).clamp(16, 256);
    out_t.par_chunks_mut(per_task * m).enumerate().for_each(|(t, chunk)| {
        let j0 = t * per_task;
        for (jj, col) in chunk.chunks_exact_mut(m).enumerate() {
            let w = &weight[(j0 + jj) * row_bytes..(j0 + jj + 1) * row_bytes];
            for (i, r) in rows.iter().enumerate() {
                col[i] = dot(kind, w, r);
            }
        }
    });
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let t = Tensor::from_vec(out_t, (n, m), &Device::Cpu)?;
    let t = if m == 1 { t.reshape((1, n))? } else { t.t()?.contiguous()? };
    Ok(t.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn matches_dequantized_matmul_and_candles_kernel() {
        let (m, k, n) = (3, 576, 200);
        // Rows with a non-zero mean, as real weights have (the case where the block minimum term
        // matters most).
        let w: Vec<f32> = random(n * k, 1).iter().enumerate().map(|(i, v)| v * 0.1 + 0.02 * ((i / k) % 5) as f32).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let bytes = q.data().unwrap();
        let x = Tensor::from_vec(random(m * k, 2), (1, m, k), &Device::Cpu).unwrap();
        let ours = matmul(BlockKind::Q4_1, &x, &bytes, n, k).unwrap();
        assert_eq!(ours.dims(), &[1, m, n]);
        let dense = x.broadcast_matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap();
        let candle = candle_core::Module::forward(&candle_core::quantized::QMatMul::from_arc(q.clone()).unwrap(), &x).unwrap();
        let err = |a: &Tensor, b: &Tensor| -> f32 {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        // Only the 8-bit rounding of the activations separates us from the exact product, and
        // by no more than it separates candle's kernel (same scheme, f16 scales).
        let (to_dense, candle_to_dense) = (err(&ours, &dense), err(&candle, &dense));
        assert!(to_dense < 1e-2, "vs dequantized: {to_dense}");
        assert!(to_dense < 1.25 * candle_to_dense, "ours {to_dense} vs candle {candle_to_dense} from the exact product");
        assert!(err(&ours, &candle) < 2e-3, "vs candle: {}", err(&ours, &candle));
        // The scalar fallback computes the same integers as the SIMD path.
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let r = quantize_row(&xs[..k]);
        let row = &bytes[..k / QK * Q4_1_BLOCK_BYTES];
        let (a, b) = (dot(BlockKind::Q4_1, row, &r), dot_scalar(BlockKind::Q4_1, row, &r));
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn single_row_and_bad_shapes() {
        let (k, n) = (64, 40);
        let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let bytes = q.data().unwrap();
        let x = Tensor::from_vec(random(k, 4), (1, 1, k), &Device::Cpu).unwrap();
        assert_eq!(matmul(BlockKind::Q4_1, &x, &bytes, n, k).unwrap().dims(), &[1, 1, n]);
        assert!(matmul(BlockKind::Q4_1, &x, &bytes, n + 1, k).is_err());
        assert!(matmul(BlockKind::Q8_0, &x, &bytes, n, k).is_err(), "Q4_1 bytes are not Q8_0 blocks");
        let x = Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matmul(BlockKind::Q4_1, &x, &bytes, n, k).is_err());
    }

    #[test]
    fn q8_0_matches_candles_kernel() {
        let (m, k, n) = (4, 576, 300);
        let w = Tensor::from_vec(random(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let bytes = q.data().unwrap();
        let x = Tensor::from_vec(random(m * k, 6), (m, k), &Device::Cpu).unwrap();
        let ours = matmul(BlockKind::Q8_0, &x, &bytes, n, k).unwrap();
        let candle = candle_core::Module::forward(&candle_core::quantized::QMatMul::from_arc(q.clone()).unwrap(), &x).unwrap();
        let d = (&ours - &candle).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let mx = candle.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d / mx < 1e-3, "{d} of {mx}");
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let r = quantize_row(&xs[..k]);
        let row = &bytes[..k / QK * Q8_0_BLOCK_BYTES];
        let (a, b) = (dot(BlockKind::Q8_0, row, &r), dot_scalar(BlockKind::Q8_0, row, &r));
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}
