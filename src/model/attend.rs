//! Inference attention on the CPU: a KV cache that grows in place and a causal attention kernel
//! whose every output row is computed the same way however many rows a call holds.
//!
//! Training builds attention from candle ops (matmul, causal softmax) for their backward. For
//! generation that has two costs this module removes: the cache was extended with
//! `Tensor::cat` (a copy of every cached key and value, per layer, per token), and candle's
//! f32 matmul picks its blocking from the shape, so a one-row decode step and a full
//! recomputation round differently; the quantized matmuls then round those 1e-7 differences
//! to 8 bits, and greedy decoding could pick another token at a near-tie. Here each query row
//! runs the same instruction sequence (scores key by key, softmax, weighted sum of values in
//! key order) in a decode step and in a prefill of any length, so KV-cached decoding gives
//! exactly the logits of recomputing the sequence (`tests/chat.rs`).
//!
//! RoPE is applied while the projections' output is copied into the kernel's layout (the same
//! formula as `ops::rope`). AVX2 + FMA when the CPU has them and `head_dim` is a multiple of 8,
//! a scalar loop otherwise; the choice is made once per process.

use rayon::prelude::*;

/// One layer's cached keys (rotated) and values: per batch row and KV head, `cap` slots of
/// `head_dim` floats, the first `len` filled.
#[derive(Clone, Debug, Default)]
pub struct HostKv {
    k: Vec<f32>,
    v: Vec<f32>,
    b: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
    len: usize,
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Batch rows.
    pub b: usize,
    /// New positions in this call.
    pub s: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv: usize,
    /// Head dimension (even).
    pub head_dim: usize,
}

/// Rotates one head vector in place by the angles whose cosines and sines are `c`, `s`
/// (`head_dim / 2` each): HF's rotate-half convention, as `ops::rope`.
fn rope_in_place(x: &mut [f32], c: &[f32], s: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
    }
}

impl HostKv {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn grow(&mut self, h: &Heads, need: usize) {
        if self.cap == 0 {
            *self = HostKv {
                b: h.b,
                n_kv: h.n_kv,
                hd: h.head_dim,
                ..Default::default()
            };
        }
        if need <= self.cap {
            return;
        }
        let cap = need.next_power_of_two().max(64);
        let (lanes, hd) = (self.b * self.n_kv, self.hd);
        let mut k = vec![0f32; lanes * cap * hd];
        let mut v = vec![0f32; lanes * cap * hd];
        for l in 0..lanes {
            let (src, dst) = (l * self.cap * hd, l * cap * hd);
            let n = self.len * hd;
            k[dst..dst + n].copy_from_slice(&self.k[src..src + n]);
            v[dst..dst + n].copy_from_slice(&self.v[src..src + n]);
        }
        (self.k, self.v, self.cap) = (k, v, cap);
    }

    /// Appends `h.s` positions: `k`, `v` are the projections' output, (b, s, n_kv·head_dim);
    /// keys are rotated with `cos`, `sin` ((s, head_dim/2), the new positions' rows).
    pub fn append(&mut self, h: &Heads, k: &[f32], v: &[f32], cos: &[f32], sin: &[f32]) {
        self.put(h, k, v, Some((cos, sin)));
    }

    /// Appends `h.s` positions whose keys are already rotated (or carry no position: prefix
    /// tuning's learned keys), in the layout of [`append`](Self::append).
    pub fn append_rotated(&mut self, h: &Heads, k: &[f32], v: &[f32]) {
        self.put(h, k, v, None);
    }

    fn put(&mut self, h: &Heads, k: &[f32], v: &[f32], rope: Option<(&[f32], &[f32])>) {
        let hd = h.head_dim;
        debug_assert_eq!(k.len(), h.b * h.s * h.n_kv * hd);
        if self.cap > 0 {
            assert_eq!(
                (self.b, self.n_kv, self.hd),
                (h.b, h.n_kv, hd),
                "cache shape changed"
            );
        }
        self.grow(h, self.len + h.s);
        let half = hd / 2;
        for bi in 0..h.b {
            for p in 0..h.s {
                for g in 0..h.n_kv {
                    let src = ((bi * h.s + p) * h.n_kv + g) * hd;
                    let dst = ((bi * h.n_kv + g) * self.cap + self.len + p) * hd;
                    self.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    if let Some((cos, sin)) = rope {
                        rope_in_place(
                            &mut self.k[dst..dst + hd],
                            &cos[p * half..(p + 1) * half],
                            &sin[p * half..(p + 1) * half],
                        );
                    }
                    self.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
        }
        self.len += h.s;
    }
}

/// Causal attention of `h.s` new query rows against the cache (which already holds them):
/// `q` is the query projection's output, (b, s, n_heads·head_dim), rotated here with `cos`,
/// `sin`; the new rows sit at positions `cache.len() - s ..`. Returns (b, s, n_heads·head_dim),
/// ready for the output projection.
pub fn attend(h: &Heads, q: &[f32], cache: &HostKv, cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let hd = h.head_dim;
    let half = hd / 2;
    let rep = h.n_heads / h.n_kv;
    let pos = cache.len - h.s;
    let scale = 1.0 / (hd as f32).sqrt();
    let avx = use_avx2(hd);
    let mut out = vec![0f32; h.b * h.s * h.n_heads * hd];
    // One task per (batch row, position, head) output row of head_dim floats.
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || (Vec::new(), vec![0f32; hd]),
        |(scores, qr), (c, o)| {
            let (bp, head) = (c / h.n_heads, c % h.n_heads);
            let (bi, p) = (bp / h.s, bp % h.s);
            qr.copy_from_slice(&q[c * hd..(c + 1) * hd]);
            rope_in_place(
                qr,
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            let lane = (bi * h.n_kv + head / rep) * cache.cap * hd;
            let n = pos + p + 1;
            let keys = &cache.k[lane..lane + n * hd];
            let vals = &cache.v[lane..lane + n * hd];
            scores.resize(n, 0.0);
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2 and FMA are present and head_dim is a multiple of 8 (use_avx2);
                // keys/vals hold n rows of head_dim, scores n, qr and o head_dim.
                unsafe { attend_row_avx2(qr, keys, vals, scale, scores, o) };
                return;
            }
            let _ = avx;
            attend_row_scalar(qr, keys, vals, scale, scores, o);
        },
    );
    out
}

fn use_avx2(hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        hd % 8 == 0
            && *HAS
                .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = hd;
        false
    }
}

/// Softmax of `scores` in place (max subtracted); returns 1 / the sum of the exponentials,
/// summed in key order.
fn softmax_unnormalized(scores: &mut [f32]) -> f32 {
    let m = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in scores.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    1.0 / sum
}

fn attend_row_scalar(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, scores: &mut [f32], o: &mut [f32]) {
    let hd = q.len();
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = q.iter().zip(k).fold(0f32, |a, (x, y)| a + x * y) * scale;
    }
    let inv = softmax_unnormalized(scores);
    o.fill(0.0);
    for (&p, v) in scores.iter().zip(vals.chunks_exact(hd)) {
        for (o, &x) in o.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    for o in o.iter_mut() {
        *o *= inv;
    }
}

/// One query row on AVX2: scores four keys at a time (each key's dot product is the same
/// chain of FMAs as when it is scored alone), then the weighted sum of values in key order,
/// 64 output floats in registers at a time.
///
/// # Safety
/// AVX2 and FMA present; `q.len()` (= `o.len()`) a multiple of 8; `keys`/`vals` hold
/// `scores.len()` rows of `q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, scores: &mut [f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let n = scores.len();
    debug_assert!(hd % 8 == 0 && keys.len() >= n * hd && vals.len() >= n * hd && o.len() == hd);
    let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), vals.as_ptr());
    let hsum = |v: __m256| -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    };
    // SAFETY (all loads and stores below): j < n and d + 8 <= hd, inside keys/vals/q/o
    // (caller contract); unaligned loads.
    unsafe {
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for d in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(qp.add(d));
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + t) * hd + d)), *a);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                scores[j + t] = hsum(*a) * scale;
            }
            j += 4;
        }
        while j < n {
            let mut a = _mm256_setzero_ps();
            for d in (0..hd).step_by(8) {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(d)),
                    _mm256_loadu_ps(kp.add(j * hd + d)),
                    a,
                );
            }
            scores[j] = hsum(a) * scale;
            j += 1;
        }
        let inv = _mm256_set1_ps(softmax_unnormalized(scores));
        let op = o.as_mut_ptr();
        for d0 in (0..hd).step_by(64) {
            let w = (hd - d0).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (jj, &p) in scores.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                let row = vp.add(jj * hd + d0);
                for (t, a) in acc.iter_mut().enumerate().take(w) {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * t)), *a);
                }
            }
            for (t, a) in acc.iter().enumerate().take(w) {
                _mm256_storeu_ps(op.add(d0 + 8 * t), _mm256_mul_ps(*a, inv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn tables(positions: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let mut c = Vec::new();
        let mut s = Vec::new();
        for p in 0..positions {
            for i in 0..hd / 2 {
                let a = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        (c, s)
    }

    /// Candle ops on the whole sequence: RoPE, QKᵀ, causal softmax, ·V (the training path).
    fn reference(h: &Heads, q: &[f32], k: &[f32], v: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let dev = Device::Cpu;
        let (b, s, nh, nkv, hd) = (h.b, h.s, h.n_heads, h.n_kv, h.head_dim);
        let ct = Tensor::from_slice(cos, (s, hd / 2), &dev).unwrap();
        let st = Tensor::from_slice(sin, (s, hd / 2), &dev).unwrap();
        let heads = |x: &[f32], n: usize| {
            Tensor::from_slice(x, (b, s, n, hd), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let qt = crate::model::ops::rope_composed(&heads(q, nh), &ct, &st).unwrap();
        let kt = crate::model::ops::rope_composed(&heads(k, nkv), &ct, &st).unwrap();
        let rep = nh / nkv;
        // Each KV head repeated for the `rep` query heads that share it.
        let expand = |t: Tensor| t.unsqueeze(2).unwrap().broadcast_as((b, nkv, rep, s, hd)).unwrap().reshape((b, nh, s, hd)).unwrap();
        let (kt, vt) = (expand(kt), expand(heads(v, nkv)));
        let scores = qt.matmul(&kt.t().unwrap()).unwrap();
        let p = crate::model::ops::causal_softmax_composed(&scores, s, 1.0 / (hd as f64).sqrt())
            .unwrap();
        let o = p
            .matmul(&vt)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap();
        o.to_vec1().unwrap()
    }

    #[test]
    fn matches_candle_ops_and_is_the_same_row_by_row() {
        for (hd, seed) in [(64, 1u64), (12, 2), (136, 3)] {
            let h = Heads {
                b: 2,
                s: 7,
                n_heads: 6,
                n_kv: 2,
                head_dim: hd,
            };
            let q = random(h.b * h.s * h.n_heads * hd, seed);
            let k = random(h.b * h.s * h.n_kv * hd, seed + 10);
            let v = random(h.b * h.s * h.n_kv * hd, seed + 20);
            let (cos, sin) = tables(h.s, hd);
            let mut cache = HostKv::default();
            cache.append(&h, &k, &v, &cos, &sin);
            let all = attend(&h, &q, &cache, &cos, &sin);
            let want = reference(&h, &q, &k, &v, &cos, &sin);
            let err = all
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "head_dim {hd}: max |Δ| {err}");

            // Prefill 3 positions, then one at a time (the cache grows past its first capacity
            // only for long sequences; the rows must not depend on how they were grouped).
            let one = |x: &[f32], n: usize, lo: usize, len: usize| -> Vec<f32> {
                (0..h.b)
                    .flat_map(|bi| {
                        x[(bi * h.s + lo) * n * hd..(bi * h.s + lo + len) * n * hd].to_vec()
                    })
                    .collect()
            };
            let mut cache = HostKv::default();
            let mut got = vec![Vec::new(); h.b];
            let mut lo = 0;
            for len in [3, 1, 1, 2] {
                let hh = Heads { s: len, ..h };
                let (c, s) = (
                    &cos[lo * hd / 2..(lo + len) * hd / 2],
                    &sin[lo * hd / 2..(lo + len) * hd / 2],
                );
                cache.append(
                    &hh,
                    &one(&k, h.n_kv, lo, len),
                    &one(&v, h.n_kv, lo, len),
                    c,
                    s,
                );
                let o = attend(&hh, &one(&q, h.n_heads, lo, len), &cache, c, s);
                let per = len * h.n_heads * hd;
                for (bi, g) in got.iter_mut().enumerate() {
                    g.extend_from_slice(&o[bi * per..(bi + 1) * per]);
                }
                lo += len;
            }
            let got: Vec<f32> = got.concat();
            assert!(
                got.iter()
                    .zip(&all)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "head_dim {hd}: split calls differ from one call"
            );
        }
    }

    #[test]
    fn cache_grows_keeping_its_contents() {
        let h = Heads {
            b: 1,
            s: 50,
            n_heads: 2,
            n_kv: 1,
            head_dim: 8,
        };
        let (cos, sin) = tables(200, 8);
        let mut cache = HostKv::default();
        let mut outs = Vec::new();
        for i in 0..4 {
            let k = random(50 * 8, 100 + i);
            let v = random(50 * 8, 200 + i);
            let q = random(50 * 16, 300 + i);
            let r = (i as usize * 50 * 4)..((i as usize + 1) * 50 * 4);
            cache.append(&h, &k, &v, &cos[r.clone()], &sin[r.clone()]);
            outs.push(attend(&h, &q, &cache, &cos[r.clone()], &sin[r]));
        }
        assert_eq!(cache.len(), 200);
        assert!(cache.cap >= 200);
        assert!(outs.iter().flatten().all(|x| x.is_finite()));
        // The first position only sees itself: its output is its own value vector.
        let v0 = random(50 * 8, 200);
        assert!(
            outs[0][..8]
                .iter()
                .zip(&v0[..8])
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }
}
