// Tunebench's fused training kernels for NVIDIA GPUs (the `cuda` feature). build.rs compiles
// this file to PTX with nvcc; src/model/fused.rs loads it into candle's CUDA device and
// launches the kernels, and holds a CPU twin of each (the same arithmetic, in Rust) that the
// op checks run on machines without a GPU.
//
// Every kernel reads its operands in their dtype (f32, f16, bf16), computes in f32 and rounds
// its result once (round to nearest even). Row kernels run one thread block per row (a
// multiple of 32 threads); elementwise kernels use a grid-stride loop.
//
// What each replaces (on the GPU, where every candle op is a kernel launch and a pass over
// memory):
//   swiglu_fwd / swiglu_bwd   silu(g)·u and its two input gradients, one pass each (candle's
//                             composed silu and mul keep silu(g) alive for the backward);
//   rmsnorm_bwd               RMSNorm's input gradient in one row pass (was ~10 tensor ops);
//   causal_softmax            softmax(scale·x) with the causal mask taken from the row index
//                             (was a mask built on the host and copied for every block);
//   ce_stats / ce_grad        cross-entropy of one chunk of logits: per-row loss and
//                             log-sum-exp, then softmax − onehot in the logits' dtype;
//   attention_ds              attention's dS = scale·P∘(dP − rowsum(dO∘O)) for one block;
//   dropout                   inverted dropout whose mask comes from the element's index and
//                             the seed (the CPU's splitmix64 stream, bit for bit), so no mask
//                             is copied from the host or kept for the backward (the backward
//                             is the same kernel on the gradient);
//   split_heads[_rope]        a projection's (b, s, heads·hd) output to per-head (b, heads, s,
//                             hd) blocks, RoPE applied, and back (rotating by −θ) for the
//                             backward (was a reshape, transpose, copy, RoPE and reshape, each a
//                             zero-filled gradient and an add in the backward);
//   adamw_moments / adamw_param
//                             one AdamW step of one f32 variable in two launches (was ~16
//                             tensor ops per variable: thousands of launches per step with
//                             LoRA on every projection of a 1B model);
//   dequant_{q4_0,q4_1,q8_0,q4k}
//                             a frozen weight held as quantized blocks (QLoRA's base) to the
//                             activations' dtype in one pass, for each product that needs it
//                             (was candle's dequantize to f32, then a cast: two passes and an
//                             f32 copy of the weight).

#ifdef TB_HOST_EMULATION
// kernels/host_emulation.hpp runs these kernels on the CPU, one std::thread per CUDA thread
// (tests/cuda_kernels_emulated.rs).
#include "host_emulation.hpp"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

namespace {

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum (or max) of `v` over the thread block, returned to every thread. blockDim.x must be
// a multiple of 32 (at most 1024). Safe to call several times in a row: the shared buffer is
// guarded by barriers on both sides.
template <bool MAX> __device__ float block_reduce(float v) {
    __shared__ float buf[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? buf[lane] : (MAX ? neg_inf() : 0.f);
        w = MAX ? warp_max(w) : warp_sum(w);
        if (lane == 0) buf[0] = w;
    }
    __syncthreads();
    const float r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ size_t first_index() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)blockDim.x * gridDim.x; }

// out = silu(g)·u.
template <typename T> __device__ void swiglu_fwd(const T* g, const T* u, T* out, size_t n) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float x = load(g[i]);
        out[i] = store<T>(x / (1.f + expf(-x)) * load(u[i]));
    }
}

// grads[0..n] = dg = d·u·s·(1 + g·(1 − s)), grads[n..2n] = du = d·g·s, with s = σ(g).
template <typename T> __device__ void swiglu_bwd(const T* g, const T* u, const T* d, T* grads, size_t n) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float x = load(g[i]), y = load(u[i]), dy = load(d[i]);
        const float s = 1.f / (1.f + expf(-x));
        grads[i] = store<T>(dy * y * s * (1.f + x * (1.f - s)));
        grads[n + i] = store<T>(dy * x * s);
    }
}

// dx = r·(g∘w) − x·r³/n·Σ(g∘w∘x) for one row of width n, r = 1/√(mean(x²) + eps).
template <typename T> __device__ void rmsnorm_bwd(const T* x, const T* g, const T* w, T* dx, int n, float eps) {
    const size_t off = (size_t)blockIdx.x * n;
    float ss = 0.f, dot = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float xv = load(x[off + c]);
        ss += xv * xv;
        dot += xv * load(g[off + c]) * load(w[c]);
    }
    ss = block_reduce<false>(ss);
    dot = block_reduce<false>(dot);
    const float r = 1.f / sqrtf(ss / n + eps);
    const float k = r * r * r * dot / n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        dx[off + c] = store<T>(r * load(g[off + c]) * load(w[c]) - load(x[off + c]) * k);
    }
}

// One row of softmax(scale·x) over k_len keys, row r seeing keys 0..=(r % q_len) + offset;
// the keys after it get probability 0.
template <typename T> __device__ void causal_softmax(const T* x, T* y, int k_len, int q_len, int offset, float scale) {
    const size_t row = blockIdx.x;
    const size_t off = row * k_len;
    const int visible = (int)(row % q_len) + offset + 1;
    float m = neg_inf();
    for (int c = threadIdx.x; c < visible; c += blockDim.x) m = fmaxf(m, load(x[off + c]) * scale);
    m = block_reduce<true>(m);
    float s = 0.f;
    for (int c = threadIdx.x; c < visible; c += blockDim.x) s += expf(load(x[off + c]) * scale - m);
    s = block_reduce<false>(s);
    const float inv = 1.f / s;
    for (int c = threadIdx.x; c < k_len; c += blockDim.x) {
        y[off + c] = store<T>(c < visible ? expf(load(x[off + c]) * scale - m) * inv : 0.f);
    }
}

// One row of logits: stats[2·row] = loss = lse − logit[target], stats[2·row + 1] = lse.
template <typename T> __device__ void ce_stats(const T* logits, const uint32_t* targets, float* stats, int vocab) {
    const size_t row = blockIdx.x;
    const size_t off = row * vocab;
    float m = neg_inf();
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, load(logits[off + c]));
    m = block_reduce<true>(m);
    float s = 0.f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += expf(load(logits[off + c]) - m);
    s = block_reduce<false>(s);
    if (threadIdx.x == 0) {
        const float ls = logf(s);
        stats[2 * row] = ls - (load(logits[off + targets[row]]) - m);
        stats[2 * row + 1] = m + ls;
    }
}

// grad = softmax(logits) − onehot(target), in the logits' dtype (the loss's gradient with
// respect to the logits).
template <typename T> __device__ void ce_grad(const T* logits, const uint32_t* targets, const float* stats, T* grad, int vocab) {
    const size_t row = blockIdx.x;
    const size_t off = row * vocab;
    const float lse = stats[2 * row + 1];
    const int t = (int)targets[row];
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        grad[off + c] = store<T>(expf(load(logits[off + c]) - lse) - (c == t ? 1.f : 0.f));
    }
}

// ds = scale·p∘(dp − rowdot[row]) over rows of k_len.
template <typename T> __device__ void attention_ds(const T* p, const T* dp, const float* rowdot, T* ds, size_t n, int k_len, float scale) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        ds[i] = store<T>(scale * load(p[i]) * (load(dp[i]) - rowdot[i / k_len]));
    }
}

// The splitmix64 output for a state (the CPU's `fused::dropout_mask` draws the same stream).
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// out = x·scale where the element is kept, x·0 where dropped. Element i is draw i % 4096 of the
// stream seeded with seed ^ (i / 4096)·0xD1B54A32D192ED03 (a draw adds 0x9E3779B97F4A7C15 to
// the state, then mixes); kept when the draw is at least `threshold` (= p·2⁶⁴).
template <typename T> __device__ void dropout(const T* x, T* out, size_t n, uint64_t seed, uint64_t threshold, float scale) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const uint64_t chunk = i / 4096, draw = i % 4096;
        const uint64_t state = (seed ^ (chunk * 0xD1B54A32D192ED03ull)) + (draw + 1) * 0x9E3779B97F4A7C15ull;
        out[i] = store<T>(load(x[i]) * (splitmix64(state) >= threshold ? scale : 0.f));
    }
}

// One element of a move between (b, s, heads·hd) rows and per-head (b, heads, s, hd) blocks:
// into the heads when into_heads, out of them otherwise; element i is the destination's. With
// ROTATE, each head row is rotated by RoPE (rotate-half): table (s, hd) f32 holds each
// position's hd/2 cosines then hd/2 sines; the sines count +θ into the heads, −θ out of them.
template <typename T, bool ROTATE>
__device__ void split_heads(const T* x, const float* table, T* out, size_t n, int s, int heads, int hd, int into_heads) {
    const int half = hd / 2;
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const int d = (int)(i % hd);
        size_t rest = i / hd;
        int p, h;
        size_t base;
        if (into_heads) {
            p = (int)(rest % s);
            rest /= s;
            h = (int)(rest % heads);
            const size_t bi = rest / heads;
            base = ((bi * s + p) * heads + h) * (size_t)hd;
        } else {
            h = (int)(rest % heads);
            rest /= heads;
            p = (int)(rest % s);
            const size_t bi = rest / s;
            base = ((bi * heads + h) * s + p) * (size_t)hd;
        }
        if (!ROTATE) {
            out[i] = x[base + d];
            continue;
        }
        const int j = d % half;
        const float c = table[(size_t)p * hd + j];
        const float sn = (into_heads ? 1.f : -1.f) * table[(size_t)p * hd + half + j];
        const float v = d < half ? load(x[base + d]) * c - load(x[base + d + half]) * sn
                                 : load(x[base + d]) * c + load(x[base + d - half]) * sn;
        out[i] = store<T>(v);
    }
}

}  // namespace

// AdamW's new moments of one variable: mv[0..n] = m·b1 + g·(1 − b1), mv[n..2n] = v·b2 + g²·(1 − b2).
extern "C" __global__ void tb_adamw_moments_f32(const float* g, const float* m, const float* v, float* mv, size_t n, float b1,
                                                float one_minus_b1, float b2, float one_minus_b2) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float gi = g[i];
        mv[i] = m[i] * b1 + gi * one_minus_b1;
        mv[n + i] = v[i] * b2 + (gi * gi) * one_minus_b2;
    }
}

// AdamW's new parameter from the new moments: p·decay − lr·(m·inv_bc1) / (√(v·inv_bc2) + eps),
// decay = 1 − lr·weight_decay (bias corrections as reciprocals, as the tensor ops multiply).
extern "C" __global__ void tb_adamw_param_f32(const float* p, const float* mv, float* out, size_t n, float decay, float inv_bc1,
                                              float inv_bc2, float eps, float lr) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float denom = sqrtf(mv[n + i] * inv_bc2) + eps;
        out[i] = p[i] * decay - (mv[i] * inv_bc1) / denom * lr;
    }
}

// ---- Quantized blocks to dense values (llama.cpp's block formats, as candle stores them) ----
// Value i of a weight is computed from its block alone, so the kernels are elementwise; the
// headers a warp re-reads come from the cache.

__device__ __forceinline__ float f16_at(const uint8_t* p) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}

// Q4_0, 18 bytes per 32 values: f16 scale d, then 16 bytes of nibbles (value j < 16 in the low
// nibble of byte j, value j ≥ 16 in the high nibble of byte j − 16); w = d·(q − 8).
__device__ __forceinline__ float q4_0_at(const uint8_t* blocks, size_t i) {
    const uint8_t* b = blocks + (i / 32) * 18;
    const unsigned j = i % 32;
    const int q = j < 16 ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
    return f16_at(b) * static_cast<float>(q - 8);
}

// Q4_1, 20 bytes per 32 values: f16 scale d, f16 minimum m, then nibbles as Q4_0; w = d·q + m.
__device__ __forceinline__ float q4_1_at(const uint8_t* blocks, size_t i) {
    const uint8_t* b = blocks + (i / 32) * 20;
    const unsigned j = i % 32;
    const int q = j < 16 ? (b[4 + j] & 0xF) : (b[4 + j - 16] >> 4);
    return f16_at(b) * static_cast<float>(q) + f16_at(b + 2);
}

// Q8_0, 34 bytes per 32 values: f16 scale d, then 32 signed bytes; w = d·q.
__device__ __forceinline__ float q8_0_at(const uint8_t* blocks, size_t i) {
    const uint8_t* b = blocks + (i / 32) * 34;
    return f16_at(b) * static_cast<float>(static_cast<int8_t>(b[2 + i % 32]));
}

// Q4_K, 144 bytes per 256 values: f16 d, f16 dmin, 12 bytes packing eight 6-bit scales and
// minimums (one pair per sub-block of 32), then 128 bytes of nibbles. Sub-block s takes the low
// (s even) or high (s odd) nibbles of bytes 32·(s/2) … 32·(s/2)+31; w = (d·sc_s)·q − dmin·m_s.
__device__ __forceinline__ float q4k_at(const uint8_t* blocks, size_t i) {
    const uint8_t* b = blocks + (i / 256) * 144;
    const uint8_t* packed = b + 4;
    const unsigned k = i % 256, s = k / 32;
    unsigned sc, m;
    if (s < 4) {
        sc = packed[s] & 63;
        m = packed[s + 4] & 63;
    } else {
        sc = (packed[s + 4] & 0xF) | ((packed[s - 4] >> 6) << 4);
        m = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4);
    }
    const uint8_t byte = b[16 + (s / 2) * 32 + k % 32];
    const unsigned q = (s & 1) ? (byte >> 4) : (byte & 0xF);
    const float scale = f16_at(b) * static_cast<float>(sc), min = f16_at(b + 2) * static_cast<float>(m);
    return scale * static_cast<float>(q) - min;
}

// tb_dequant_<format>_<dtype>(blocks, out, n): the first n values of a block-quantized weight.
#define TB_DEQUANT(FORMAT, T, SUFFIX)                                                                                  \
    extern "C" __global__ void tb_dequant_##FORMAT##_##SUFFIX(const uint8_t* blocks, T* out, size_t n) {             \
        for (size_t i = first_index(); i < n; i += grid_stride()) out[i] = store<T>(FORMAT##_at(blocks, i));           \
    }

#define TB_KERNELS(T, SUFFIX)                                                                                          \
    extern "C" __global__ void tb_swiglu_fwd_##SUFFIX(const T* g, const T* u, T* out, size_t n) {                    \
        swiglu_fwd<T>(g, u, out, n);                                                                                   \
    }                                                                                                                  \
    extern "C" __global__ void tb_swiglu_bwd_##SUFFIX(const T* g, const T* u, const T* d, T* grads, size_t n) {      \
        swiglu_bwd<T>(g, u, d, grads, n);                                                                              \
    }                                                                                                                  \
    extern "C" __global__ void tb_rmsnorm_bwd_##SUFFIX(const T* x, const T* g, const T* w, T* dx, int n, float eps) { \
        rmsnorm_bwd<T>(x, g, w, dx, n, eps);                                                                           \
    }                                                                                                                  \
    extern "C" __global__ void tb_causal_softmax_##SUFFIX(const T* x, T* y, int k_len, int q_len, int offset,        \
                                                          float scale) {                                               \
        causal_softmax<T>(x, y, k_len, q_len, offset, scale);                                                          \
    }                                                                                                                  \
    extern "C" __global__ void tb_ce_stats_##SUFFIX(const T* logits, const uint32_t* targets, float* stats,           \
                                                    int vocab) {                                                       \
        ce_stats<T>(logits, targets, stats, vocab);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void tb_ce_grad_##SUFFIX(const T* logits, const uint32_t* targets, const float* stats,      \
                                                   T* grad, int vocab) {                                               \
        ce_grad<T>(logits, targets, stats, grad, vocab);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void tb_attention_ds_##SUFFIX(const T* p, const T* dp, const float* rowdot, T* ds,          \
                                                        size_t n, int k_len, float scale) {                            \
        attention_ds<T>(p, dp, rowdot, ds, n, k_len, scale);                                                           \
    }                                                                                                                  \
    extern "C" __global__ void tb_split_heads_##SUFFIX(const T* x, T* out, size_t n, int s, int heads, int hd,       \
                                                       int into_heads) {                                               \
        split_heads<T, false>(x, nullptr, out, n, s, heads, hd, into_heads);                                           \
    }                                                                                                                  \
    extern "C" __global__ void tb_split_heads_rope_##SUFFIX(const T* x, const float* table, T* out, size_t n, int s,  \
                                                            int heads, int hd, int into_heads) {                       \
        split_heads<T, true>(x, table, out, n, s, heads, hd, into_heads);                                              \
    }                                                                                                                  \
    extern "C" __global__ void tb_dropout_##SUFFIX(const T* x, T* out, size_t n, uint64_t seed, uint64_t threshold,   \
                                                   float scale) {                                                      \
        dropout<T>(x, out, n, seed, threshold, scale);                                                                 \
    }                                                                                                                  \
    TB_DEQUANT(q4_0, T, SUFFIX)                                                                                        \
    TB_DEQUANT(q4_1, T, SUFFIX)                                                                                        \
    TB_DEQUANT(q8_0, T, SUFFIX)                                                                                        \
    TB_DEQUANT(q4k, T, SUFFIX)

TB_KERNELS(float, f32)
TB_KERNELS(__half, f16)
TB_KERNELS(__nv_bfloat16, bf16)
