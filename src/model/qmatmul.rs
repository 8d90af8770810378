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
        let (xs, qs) = (&x[b * QK..(b + 1) * QK], &mut q[b * QK..(b + 1) * QK]);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked); both blocks hold 32 values.
        let (scale, sum) = if has_avx2() { unsafe { quantize_block_avx2(xs, qs) } } else { quantize_block(xs, qs) };
        #[cfg(not(target_arch = "x86_64"))]
        let (scale, sum) = quantize_block(xs, qs);
        d.push(scale);
        // The sum of the *quantized* block: then the block's product is Σ wᵢ·x̃ᵢ for the
        // quantized x̃ as a whole; the exact Σ xᵢ would leave the (uncentred) dw·qᵢ part alone
        // with the rounding error, measured ~3x worse on the default model's projections.
        s.push(scale * sum as f32);
    }
    Q8Row { d, s, q }
}

/// One block of 32 activations to 8 bits (`x ≈ scale·q`, rounded to nearest, ties to even):
/// returns the scale and the sum of the quantized values.
fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(xs) {
        *o = (v * inv).round_ties_even() as i8;
        sum += *o as i32;
    }
    (scale, sum)
}

/// [`quantize_block`] on AVX2, bit-identical to it.
///
/// # Safety
/// The CPU must have AVX2; `xs` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() == QK && q.len() == QK);
    // SAFETY: 32 floats in, 32 bytes out (caller); unaligned loads and store.
    unsafe {
        let p = xs.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        // cvtps rounds to nearest, ties to even (the default MXCSR mode).
        let r = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)));
        let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        // Pack 4×8 i32 to 32 i8; the packs work per 128-bit lane, the permute restores order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
        (scale, _mm_cvtsi128_si32(s1))
    }
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
    let block = |b: usize, acc: __m256| -> (__m256, f32) {
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
            (_mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc), mw * *xs.add(b))
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        let (a0, m0) = block(b, acc0);
        let (a1, m1) = block(b + 1, acc1);
        (acc0, acc1) = (a0, a1);
        mins += m0 + m1;
        b += 2;
    }
    if b < nb {
        let (a0, m0) = block(b, acc0);
        acc0 = a0;
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
    let block = |b: usize, acc: __m256| -> __m256 {
        // SAFETY (caller): block b exists in `w` (34 bytes: f16 scale, 32 signed bytes) and in
        // `x`; loads are unaligned.
        unsafe {
            let p = wp.add(b * Q8_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
            let w8 = _mm256_loadu_si256(p.add(2) as *const __m256i);
            let x8 = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w8, w8), _mm256_sign_epi8(x8, w8));
            let p32 = _mm256_madd_epi16(p16, ones);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d * *xd.add(b)), acc)
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        acc0 = block(b, acc0);
        acc1 = block(b + 1, acc1);
        b += 2;
    }
    if b < nb {
        acc0 = block(b, acc0);
    }
    // SAFETY: same target features as this function.
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
}

/// Activation rows a weight row is applied to at once in prefill (multi-row) products.
const TILE: usize = 4;

/// [`dot_q4_1_avx2`] for [`TILE`] activation rows at once: each weight block is unpacked once
/// and used four times. Every row's result goes through exactly the operations of the one-row
/// kernel, in the same order, so it is bit-identical to it (a prefill and a decode step agree).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `x[r].d.len()` Q4_1 blocks for each row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q4_1_avx2(w: &[u8], x: &[Q8Row; TILE], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x[0].d.len();
    debug_assert!(w.len() == nb * Q4_1_BLOCK_BYTES && out.len() == TILE);
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc0 = [_mm256_setzero_ps(); TILE];
    let mut acc1 = [_mm256_setzero_ps(); TILE];
    let mut mins = [0f32; TILE];
    let wp = w.as_ptr();
    // Block b's nibbles as 32 bytes, its scale and minimum.
    let unpack = |b: usize| -> (__m256i, f32, f32) {
        // SAFETY (caller): block b exists in `w`; unaligned loads.
        unsafe {
            let p = wp.add(b * Q4_1_BLOCK_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let packed = _mm_loadu_si128(p.add(4) as *const __m128i);
            let w8 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
            (w8, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)))
        }
    };
    let prod = |w8: __m256i, dw: f32, r: &Q8Row, b: usize, acc: __m256| -> __m256 {
        // SAFETY (caller): block b exists in the row; unaligned load.
        unsafe {
            let x8 = _mm256_loadu_si256(r.q.as_ptr().add(b * QK) as *const __m256i);
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(w8, x8), ones);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(dw * *r.d.get_unchecked(b)), acc)
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        let (w0, d0, m0) = unpack(b);
        let (w1, d1, m1) = unpack(b + 1);
        for (t, r) in x.iter().enumerate() {
            acc0[t] = prod(w0, d0, r, b, acc0[t]);
            acc1[t] = prod(w1, d1, r, b + 1, acc1[t]);
            mins[t] += m0 * r.s[b] + m1 * r.s[b + 1];
        }
        b += 2;
    }
    if b < nb {
        let (w0, d0, m0) = unpack(b);
        for (t, r) in x.iter().enumerate() {
            acc0[t] = prod(w0, d0, r, b, acc0[t]);
            mins[t] += m0 * r.s[b];
        }
    }
    for t in 0..TILE {
        // SAFETY: same target features as this function.
        out[t] = unsafe { hsum(_mm256_add_ps(acc0[t], acc1[t])) } + mins[t];
    }
}

/// [`dot_q8_0_avx2`] for [`TILE`] activation rows at once (bit-identical per row, as
/// [`dot4_q4_1_avx2`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `x[r].d.len()` Q8_0 blocks for each row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q8_0_avx2(w: &[u8], x: &[Q8Row; TILE], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x[0].d.len();
    debug_assert!(w.len() == nb * Q8_0_BLOCK_BYTES && out.len() == TILE);
    let ones = _mm256_set1_epi16(1);
    let mut acc0 = [_mm256_setzero_ps(); TILE];
    let mut acc1 = [_mm256_setzero_ps(); TILE];
    let wp = w.as_ptr();
    let load = |b: usize| -> (__m256i, f32) {
        // SAFETY (caller): block b exists in `w`; unaligned loads.
        unsafe {
            let p = wp.add(b * Q8_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
            (_mm256_loadu_si256(p.add(2) as *const __m256i), d)
        }
    };
    let prod = |w8: __m256i, d: f32, r: &Q8Row, b: usize, acc: __m256| -> __m256 {
        // SAFETY (caller): block b exists in the row; unaligned load.
        unsafe {
            let x8 = _mm256_loadu_si256(r.q.as_ptr().add(b * QK) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w8, w8), _mm256_sign_epi8(x8, w8));
            let p32 = _mm256_madd_epi16(p16, ones);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d * *r.d.get_unchecked(b)), acc)
        }
    };
    let mut b = 0;
    while b + 1 < nb {
        let (w0, d0) = load(b);
        let (w1, d1) = load(b + 1);
        for (t, r) in x.iter().enumerate() {
            acc0[t] = prod(w0, d0, r, b, acc0[t]);
            acc1[t] = prod(w1, d1, r, b + 1, acc1[t]);
        }
        b += 2;
    }
    if b < nb {
        let (w0, d0) = load(b);
        for (t, r) in x.iter().enumerate() {
            acc0[t] = prod(w0, d0, r, b, acc0[t]);
        }
    }
    for t in 0..TILE {
        // SAFETY: same target features as this function.
        out[t] = unsafe { hsum(_mm256_add_ps(acc0[t], acc1[t])) };
    }
}

/// One weight row against consecutive activation rows (`out.len() == x.len()`), [`TILE`] at a
/// time where the CPU allows; each result equals [`dot`] of its row bit for bit.
fn dot_rows(kind: BlockKind, w: &[u8], x: &[Q8Row], out: &mut [f32]) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        while i + TILE <= x.len() {
            let tile: &[Q8Row; TILE] = x[i..i + TILE].try_into().expect("a tile of rows");
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `w` is one row of `kind`
            // blocks matching every row of `x` (checked by the caller).
            unsafe {
                match kind {
                    BlockKind::Q4_1 => dot4_q4_1_avx2(w, tile, &mut out[i..i + TILE]),
                    BlockKind::Q8_0 => dot4_q8_0_avx2(w, tile, &mut out[i..i + TILE]),
                }
            }
            i += TILE;
        }
    }
    for (o, r) in out[i..].iter_mut().zip(&x[i..]) {
        *o = dot(kind, w, r);
    }
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
    // Each task owns a contiguous run of weight rows (output columns). Input rows go in groups
    // that stay in L1 while the task's weight rows pass over them, each weight row applied to
    // a group's rows [`TILE`] at a time.
    let mut out = vec![0f32; m * n];
    let per_task = (n / (4 * rayon::current_num_threads().max(1))).clamp(16, 256);
    let group = (16 * 1024 / k).clamp(TILE, 64) / TILE * TILE;
    let dst = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let mut col = vec![0f32; group];
        for i0 in (0..m).step_by(group) {
            let i1 = (i0 + group).min(m);
            for j in t * per_task..((t + 1) * per_task).min(n) {
                let w = &weight[j * row_bytes..(j + 1) * row_bytes];
                dot_rows(kind, w, &rows[i0..i1], &mut col[..i1 - i0]);
                for (ii, v) in col[..i1 - i0].iter().enumerate() {
                    // SAFETY: (i0 + ii, j) is inside the (m, n) output, and column j belongs to
                    // this task alone.
                    unsafe { dst.write((i0 + ii) * n + j, *v) };
                }
            }
        }
    });
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}

/// The output buffer shared by the tasks of [`matmul`], each writing its own columns.
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint elements, and the buffer outlives the parallel loop.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is inside the buffer and no other thread writes it.
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = v };
    }
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
    fn many_rows_give_each_row_the_one_row_result_bit_for_bit() {
        // k = 96: an odd number of blocks (the tail block); m = 9: two tiles and a remainder.
        for (kind, dtype) in [(BlockKind::Q4_1, GgmlDType::Q4_1), (BlockKind::Q8_0, GgmlDType::Q8_0)] {
            for k in [96, 576] {
                let (m, n) = (9, 70);
                let w = Tensor::from_vec(random(n * k, 7), (n, k), &Device::Cpu).unwrap();
                let bytes = QTensor::quantize(&w, dtype).unwrap().data().unwrap().to_vec();
                let x = Tensor::from_vec(random(m * k, 8), (m, k), &Device::Cpu).unwrap();
                let all: Vec<Vec<f32>> = matmul(kind, &x, &bytes, n, k).unwrap().to_vec2().unwrap();
                for (i, row) in all.iter().enumerate() {
                    let one: Vec<f32> = matmul(kind, &x.narrow(0, i, 1).unwrap(), &bytes, n, k).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    assert!(row.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} k={k}: row {i} differs");
                }
            }
        }
    }

    #[test]
    fn simd_quantization_is_the_scalar_one() {
        // Random values, exact halves (ties go to even on both paths) and an all-zero block.
        let mut x = random(32 * 40, 9);
        for (i, v) in x[..64].iter_mut().enumerate() {
            *v = if i % 32 == 0 { 127.0 } else { (i as f32 - 32.0) + 0.5 };
        }
        x[64..96].fill(0.0);
        for b in x.chunks_exact(QK) {
            let (mut q1, mut q2) = ([0i8; QK], [0i8; QK]);
            let a = quantize_block(b, &mut q1);
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 present; 32 values each.
                let c = unsafe { quantize_block_avx2(b, &mut q2) };
                assert_eq!((a.0.to_bits(), a.1, q1), (c.0.to_bits(), c.1, q2));
            }
        }
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
