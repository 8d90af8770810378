//! Causal attention's forward and backward on the CPU in f32, one query tile at a time (flash
//! attention's scheme, shaped for a CPU's caches).
//!
//! What [`super::ops::causal_attention`] runs for f32 operands on the CPU. A task takes one
//! query head (forward) or one query head's gradients (backward) and walks its queries in tiles
//! of [`TILE`] positions. A tile's scores against the keys it may see stay in one buffer of
//! (tile × keys) floats, small enough to stay in cache while the softmax (or, backward, the
//! probabilities and their gradient) passes over them, and the products around them are gemm
//! calls (candle's CPU matmul kernel) reading q, k, v, the output and its gradient in place,
//! with strides. Keys after a tile's last position are never scored. The forward keeps each
//! query row's log-sum-exp of its scaled scores (one float per row), from which the backward
//! makes the probabilities again instead of keeping them.
//!
//! On tensor ops the same attention made every block's scores, probabilities, their gradient
//! and the head copies as separate (batch, heads, block, keys) tensors, each pass over them a
//! trip through memory.

use rayon::prelude::*;

use super::cpu_math::exp_shifted;
use super::ops::cpu_gemm;

type CResult<T> = candle_core::Result<T>;

/// Query positions per tile: each task's buffers are two (tile × keys) f32 matrices.
pub const TILE: usize = 64;

/// The operands' shapes. `q` is (b, nkv, rep·s, hd): the `rep` query heads that share a KV head
/// stacked on the row axis (row j·s + position); `k`, `v` are (b, nkv, keys, hd), `keys ≥ s`,
/// the first `keys − s` before the first query (a prefix or a cache). The output and its
/// gradient are (b, s, nkv·rep·hd), heads merged (query head h = g·rep + j).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch rows.
    pub b: usize,
    /// Key/value heads.
    pub nkv: usize,
    /// Query heads per key/value head.
    pub rep: usize,
    /// Query positions.
    pub s: usize,
    /// Key positions (≥ s).
    pub keys: usize,
    /// Head dimension.
    pub hd: usize,
}

impl Dims {
    fn heads(&self) -> usize {
        self.nkv * self.rep
    }

    /// Keys before the first query position.
    fn offset(&self) -> usize {
        self.keys - self.s
    }

    fn check(&self, q: usize, k: usize, v: usize) -> CResult<()> {
        let Dims { b, nkv, rep, s, keys, hd } = *self;
        if keys < s || q != b * nkv * rep * s * hd || k != b * nkv * keys * hd || v != k {
            candle_core::bail!("attention-cpu: q of {q}, k of {k}, v of {v} floats do not fit {self:?}");
        }
        Ok(())
    }
}

/// Attention's output `softmax(scale · q·kᵀ, causal) · v`, (b, s, heads·hd), and each query
/// row's log-sum-exp of its scaled visible scores, (b, nkv, rep·s) as q's rows.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32, tile: usize) -> CResult<(Vec<f32>, Vec<f32>)> {
    d.check(q.len(), k.len(), v.len())?;
    let Dims { s, keys, hd, .. } = d;
    let tile = tile.clamp(1, s.max(1));
    // The output in q's layout, one query head per task; merged after.
    let mut o = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / hd.max(1)];
    if s == 0 || hd == 0 {
        return Ok((o, lse));
    }
    o.par_chunks_mut(s * hd).zip(lse.par_chunks_mut(s)).enumerate().try_for_each(|(item, (o, lse))| -> CResult<()> {
        let unit = item / d.rep;
        let q = &q[item * s * hd..(item + 1) * s * hd];
        let (k, v) = (&k[unit * keys * hd..(unit + 1) * keys * hd], &v[unit * keys * hd..(unit + 1) * keys * hd]);
        let mut p = vec![0f32; tile * keys];
        for start in (0..s).step_by(tile) {
            let n = tile.min(s - start);
            let seen = d.offset() + start + n;
            let p = &mut p[..n * seen];
            cpu_gemm(p, (n, seen, hd), false, (&q[start * hd..], hd, 1), (k, 1, hd), 1.0, false)?;
            for (i, row) in p.chunks_mut(seen).enumerate() {
                lse[start + i] = softmax_row(row, d.offset() + start + i + 1, scale);
            }
            cpu_gemm(&mut o[start * hd..(start + n) * hd], (n, hd, seen), false, (p, seen, 1), (v, hd, 1), 1.0, false)?;
        }
        Ok(())
    })?;
    Ok((merge_heads(&o, d), lse))
}

/// The gradients of q, k and v (in their layouts) from the output's gradient `g`, the output
/// `o` (both (b, s, heads·hd)) and the forward's log-sum-exps: per tile, P = exp(scale·S − lse)
/// made again, dV += Pᵀ·dO, dS = scale · P ∘ (dO·Vᵀ − rowsum(dO ∘ O)), dK += dSᵀ·Q, dQ = dS·K.
/// A task takes one query head; the query heads sharing a KV head add their dK and dV after.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], g: &[f32], d: Dims, scale: f32, tile: usize) -> CResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    d.check(q.len(), k.len(), v.len())?;
    let Dims { b, nkv, rep, s, keys, hd } = d;
    let width = d.heads() * hd;
    if o.len() != q.len() || g.len() != q.len() || lse.len() * hd != q.len() {
        candle_core::bail!("attention-cpu: output {}, its gradient {}, {} log-sum-exps do not fit {d:?}", o.len(), g.len(), lse.len());
    }
    let tile = tile.clamp(1, s.max(1));
    let mut dq = vec![0f32; q.len()];
    // Each query head's dK and dV, summed per KV head below.
    let mut dk_parts = vec![0f32; b * nkv * rep * keys * hd];
    let mut dv_parts = vec![0f32; b * nkv * rep * keys * hd];
    if s == 0 || hd == 0 {
        return Ok((dq, vec![0f32; k.len()], vec![0f32; v.len()]));
    }
    dq.par_chunks_mut(s * hd)
        .zip(dk_parts.par_chunks_mut(keys * hd))
        .zip(dv_parts.par_chunks_mut(keys * hd))
        .enumerate()
        .try_for_each(|(item, ((dq, dk), dv))| -> CResult<()> {
            let unit = item / rep;
            let (bi, h) = (item / d.heads(), item % d.heads());
            let q = &q[item * s * hd..(item + 1) * s * hd];
            let lse = &lse[item * s..(item + 1) * s];
            let (k, v) = (&k[unit * keys * hd..(unit + 1) * keys * hd], &v[unit * keys * hd..(unit + 1) * keys * hd]);
            let (mut p, mut dp) = (vec![0f32; tile * keys], vec![0f32; tile * keys]);
            for start in (0..s).step_by(tile) {
                let n = tile.min(s - start);
                let seen = d.offset() + start + n;
                let (p, ds) = (&mut p[..n * seen], &mut dp[..n * seen]);
                // This tile's rows of dO and O: position start + i of head h, `width` apart.
                let at = (bi * s + start) * width + h * hd;
                let (gt, ot) = (&g[at..], &o[at..]);
                let qt = &q[start * hd..];
                cpu_gemm(p, (n, seen, hd), false, (qt, hd, 1), (k, 1, hd), 1.0, false)?;
                cpu_gemm(ds, (n, seen, hd), false, (gt, width, 1), (v, 1, hd), 1.0, false)?;
                for (i, (pr, dr)) in p.chunks_mut(seen).zip(ds.chunks_mut(seen)).enumerate() {
                    let visible = d.offset() + start + i + 1;
                    let row = (&gt[i * width..i * width + hd]).iter().zip(&ot[i * width..i * width + hd]).map(|(a, b)| a * b).sum::<f32>();
                    exp_shifted(&mut pr[..visible], scale, lse[start + i]);
                    for (p, dp) in pr[..visible].iter().zip(&mut dr[..visible]) {
                        *dp = scale * p * (*dp - row);
                    }
                    pr[visible..].fill(0.0);
                    dr[visible..].fill(0.0);
                }
                cpu_gemm(&mut dv[..seen * hd], (seen, hd, n), true, (p, 1, seen), (gt, width, 1), 1.0, false)?;
                cpu_gemm(&mut dk[..seen * hd], (seen, hd, n), true, (ds, 1, seen), (qt, hd, 1), 1.0, false)?;
                cpu_gemm(&mut dq[start * hd..(start + n) * hd], (n, hd, seen), false, (ds, seen, 1), (k, hd, 1), 1.0, false)?;
            }
            Ok(())
        })?;
    let sum_heads = |parts: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; b * nkv * keys * hd];
        out.par_chunks_mut(keys * hd).zip(parts.par_chunks(rep * keys * hd)).for_each(|(out, parts)| {
            for part in parts.chunks(keys * hd) {
                out.iter_mut().zip(part).for_each(|(o, x)| *o += x);
            }
        });
        out
    };
    Ok((dq, sum_heads(&dk_parts), sum_heads(&dv_parts)))
}

/// Row `row` of scores made probabilities in place (the first `visible` entries; 0 after):
/// softmax of `scale · row`; returns the log-sum-exp of the scaled visible scores.
fn softmax_row(row: &mut [f32], visible: usize, scale: f32) -> f32 {
    let (seen, hidden) = row.split_at_mut(visible);
    let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let sum = exp_shifted(seen, scale, max);
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|x| *x *= inv);
    hidden.fill(0.0);
    max + sum.ln()
}

/// Per-head rows in q's layout, (b, nkv, rep·s, hd) → (b, s, heads·hd).
fn merge_heads(o: &[f32], d: Dims) -> Vec<f32> {
    let (s, hd, heads) = (d.s, d.hd, d.heads());
    let mut out = vec![0f32; o.len()];
    out.par_chunks_mut(heads * hd).enumerate().for_each(|(row, out)| {
        let (bi, p) = (row / s, row % s);
        for (h, dst) in out.chunks_mut(hd).enumerate() {
            let at = ((bi * heads + h) * s + p) * hd;
            dst.copy_from_slice(&o[at..at + hd]);
        }
    });
    out
}
