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
//   adamw_moment_inplace / adamw_param_inplace
//                             the same step in place (three launches, nothing allocated; the
//                             trainer's: two launches allocate 3 copies of the variable, 12
//                             bytes a parameter at once for full fine-tuning);
//   adamw_multi               the in-place step of every variable in one launch (a table of
//                             their addresses; was three launches per variable);
//   flash_fwd / flash_bwd_dq / flash_bwd_dkv (f16, bf16; head_dim 64 or 128)
//                             causal attention in one launch forward and two backward, on the
//                             tensor cores (nvcuda::wmma), the scores of one tile at a time in
//                             shared memory (was, per layer and per query block, copies of the
//                             block's rows, two matmuls and a softmax forward, ~20 ops backward);
//   dequant_{q4_0,q4_1,q8_0,q4k}
//                             a frozen weight held as quantized blocks (QLoRA's base) to the
//                             activations' dtype in one pass, for each product that needs it
//                             (was candle's dequantize to f32, then a cast: two passes and an
//                             f32 copy of the weight).

#ifdef TB_HOST_EMULATION
// kernels/host_emulation.hpp runs these kernels on the CPU, one std::thread per CUDA thread
// (tests/cuda_kernels_emulated.rs).
#include "host_emulation.hpp"
#define TB_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>
#define TB_UNROLL _Pragma("unroll")
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

// ---- Flash attention: f16/bf16 operands on the tensor cores (nvcuda::wmma 16×16×16 tiles) ----
//
// Shapes as src/model/ops.rs's causal attention holds them: q (b, nkv, rep·s, hd), the rep
// query heads of a KV head stacked on the row axis (row j·s + position); k, v (b, nkv, keys, hd)
// with keys ≥ s, the first keys − s before the first query (a prefix or a cache); the output and
// its gradient (b, s, heads·hd), query head h = g·rep + j; lse and dot one f32 per q row.
// Query position p sees keys 0 ..= keys − s + p. A block is 4 warps; each warp owns 16 rows of
// the block's tile (queries, or keys in flash_bwd_dkv) and keeps their operands and
// accumulators in wmma fragments; scores go through shared memory (f32, rows padded against
// bank conflicts), where the lane pair (r, r + 16) of a warp reduces row r, each half of the
// columns. The forward makes two passes over the keys: the rows' maxima and sums first (so the
// log-sum-exp is known), then P·V with P = exp(scale·S − lse) rounded to the dtype (as the
// tensor-op path's softmax is), so no accumulator is ever rescaled. The backward recomputes P
// from lse: flash_bwd_dq per query tile (dQ = dS·K; it also writes dot = rowsum(dO∘O) for
// flash_bwd_dkv), flash_bwd_dkv per key tile over every query that sees it (dV = Pᵀ·dO,
// dK = dSᵀ·Q), with dS = scale·P∘(dO·Vᵀ − dot); no atomics, so the result is deterministic.
// Global operands move 16 bytes at a time: their first elements and row strides are multiples
// of 8 values (src/model/fused.rs copies an operand that is not). The tensor cores take f16
// from compute capability 7.0 and bf16 from 8.0: below 8.0 (build.rs targets 8.0 unless
// CUDA_COMPUTE_CAP says otherwise, and tells src/model/fused.rs) these kernels are left out.
#if defined(TB_HOST_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TB_FLASH_KERNELS 1
namespace flash {
using namespace nvcuda;

constexpr int WARPS = 4, THREADS = 32 * WARPS, ROWS = 16 * WARPS;

template <typename T> using frag_a = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using frag_b_row = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using frag_b_col = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using frag_acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// 8 16-bit values (16 bytes).
template <typename T> __device__ __forceinline__ void copy8(T* dst, const T* src) {
#ifdef TB_HOST_EMULATION
    check_vector_address(dst);
    check_vector_address(src);
    std::memcpy(dst, src, 16);
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// A (rows × HD) shared tile from global rows src + r·stride; rows from `valid` on are zeros.
// The whole block takes part.
template <typename T, int HD> __device__ __forceinline__ void load_tile(T* dst, const T* src, size_t stride, int rows, int valid) {
    constexpr int CHUNKS = HD / 8;
    for (int i = threadIdx.x; i < rows * CHUNKS; i += blockDim.x) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        if (r < valid) {
            copy8(dst + r * HD + c, src + (size_t)r * stride + c);
        } else {
            for (int e = 0; e < 8; ++e) dst[r * HD + c + e] = store<T>(0.f);
        }
    }
}

// The warp's 16 rows of a shared (· × HD) tile as matrix_a fragments.
template <typename T, int HD> __device__ __forceinline__ void load_rows(frag_a<T>* a, const T* tile) {
    TB_UNROLL for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(a[kk], tile + kk * 16, HD);
}

// The warp's 16 rows of ROWS global rows (src + r·stride; from `valid` on zeros) as matrix_a
// fragments, through the shared `stage` (ROWS × HD), which is free again on return.
template <typename T, int HD> __device__ __forceinline__ void stage_rows(frag_a<T>* a, T* stage, const T* src, size_t stride, int valid) {
    load_tile<T, HD>(stage, src, stride, ROWS, valid);
    __syncthreads();
    load_rows<T, HD>(a, stage + (threadIdx.x >> 5) * 16 * HD);
    __syncthreads();
}

// Key/value tile t0 (BC rows each; past `keys` zeros) into shared ks and vs, for the block.
template <typename T, int HD, int BC>
__device__ __forceinline__ void load_kv(T* ks, T* vs, const T* kb, const T* vb, int t0, int keys) {
    load_tile<T, HD>(ks, kb + (size_t)t0 * HD, HD, BC, keys - t0);
    load_tile<T, HD>(vs, vb + (size_t)t0 * HD, HD, BC, keys - t0);
    __syncthreads();
}

template <int HD> __device__ __forceinline__ void zero(frag_acc* acc) {
    TB_UNROLL for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
}

// out (16 × NC, row stride ldo) = A·Bᵀ: A the warp's 16 rows (fragments), B the NC rows of a
// shared (NC × HD) tile.
template <typename T, int HD, int NC> __device__ __forceinline__ void times_t(const frag_a<T>* a, const T* b, float* out, int ldo) {
    TB_UNROLL for (int n = 0; n < NC / 16; ++n) {
        frag_acc acc;
        wmma::fill_fragment(acc, 0.f);
        TB_UNROLL for (int kk = 0; kk < HD / 16; ++kk) {
            frag_b_col<T> bf;
            wmma::load_matrix_sync(bf, b + n * 16 * HD + kk * 16, HD);
            wmma::mma_sync(acc, a[kk], bf, acc);
        }
        wmma::store_matrix_sync(out + n * 16, acc, ldo, wmma::mem_row_major);
    }
}

// acc (16 × HD) += P·B: P the warp's (16 × NK) shared tile (row stride ldp), B a shared
// (NK × HD) tile.
template <typename T, int HD, int NK> __device__ __forceinline__ void accumulate(frag_acc* acc, const T* p, int ldp, const T* b) {
    TB_UNROLL for (int kk = 0; kk < NK / 16; ++kk) {
        frag_a<T> pf;
        wmma::load_matrix_sync(pf, p + kk * 16, ldp);
        TB_UNROLL for (int n = 0; n < HD / 16; ++n) {
            frag_b_row<T> bf;
            wmma::load_matrix_sync(bf, b + kk * 16 * HD + n * 16, HD);
            wmma::mma_sync(acc[n], pf, bf, acc[n]);
        }
    }
}

// The warp's 16 × HD accumulators to global rows dst + r·stride, rows from `valid` on skipped,
// through the warp's 256 floats of `scratch`.
template <typename T, int HD> __device__ __forceinline__ void store_rows(T* dst, size_t stride, int valid, const frag_acc* acc, float* scratch) {
    const int lane = threadIdx.x & 31;
    TB_UNROLL for (int n = 0; n < HD / 16; ++n) {
        wmma::store_matrix_sync(scratch, acc[n], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            if (e / 16 < valid) dst[(size_t)(e / 16) * stride + n * 16 + e % 16] = store<T>(scratch[e]);
        }
        __syncwarp();
    }
}

// The query tile a block of flash::fwd or flash::bwd_dq owns: blocks run from the last tile
// (the longest) to the first, then over (batch row, query head).
struct QueryTile {
    int heads, valid, last0, kend;
    size_t row0;   // q's row (and lse's, dot's) of position p0
    size_t kv0;    // the KV head's first key row
    size_t orow0;  // the (b, s, heads) output row of position p0

    __device__ QueryTile(int b, int nkv, int rep, int s, int keys) {
        heads = nkv * rep;
        const int tiles = (s + ROWS - 1) / ROWS, total = b * heads;
        const int hh = (int)(blockIdx.x % total), tile = tiles - 1 - (int)(blockIdx.x / total);
        const int bi = hh / heads, h = hh % heads, g = h / rep, j = h % rep;
        const int p0 = tile * ROWS;
        valid = imin(ROWS, s - p0);
        last0 = keys - s + p0;  // the last key position p0 sees
        kend = imin(keys, last0 + valid);
        row0 = ((size_t)(bi * nkv + g) * rep + j) * s + p0;
        kv0 = (size_t)(bi * nkv + g) * keys;
        orow0 = ((size_t)bi * s + p0) * heads + h;
    }
};

// One tile of ROWS query positions of one query head (block = tile, from the last tile, the
// longest, to the first; then head): o and lse of its rows.
template <typename T, int HD>
__device__ void fwd(const T* q, const T* k, const T* v, T* o, float* lse, int b, int nkv, int rep, int s, int keys, float scale) {
    constexpr int BC = HD == 128 ? 32 : 64, LDS = BC + 4, LDP = BC + 8;
    constexpr int Q_BYTES = ROWS * HD * (int)sizeof(T), KV_BYTES = 2 * BC * HD * (int)sizeof(T);
    constexpr int A_BYTES = Q_BYTES > KV_BYTES ? Q_BYTES : KV_BYTES;
    __shared__ __align__(128) unsigned char smem[A_BYTES + ROWS * LDS * 4 + ROWS * LDP * (int)sizeof(T)];
    T* const qs = reinterpret_cast<T*>(smem);
    T* const ks = qs;
    T* const vs = ks + BC * HD;
    float* const ss = reinterpret_cast<float*>(smem + A_BYTES);
    T* const ps = reinterpret_cast<T*>(smem + A_BYTES + ROWS * LDS * 4);

    const QueryTile qt(b, nkv, rep, s, keys);
    const int heads = qt.heads, valid = qt.valid, kend = qt.kend;
    const size_t row0 = qt.row0, orow0 = qt.orow0;
    const T* kb = k + qt.kv0 * HD;
    const T* vb = v + qt.kv0 * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane & 15, c0 = (lane >> 4) * (BC / 2);
    const int last = qt.last0 + warp * 16 + r;  // the last key this lane's row sees
    float* const sw = ss + warp * 16 * LDS;
    T* const pw = ps + warp * 16 * LDP;

    frag_a<T> qf[HD / 16];
    stage_rows<T, HD>(qf, qs, q + row0 * HD, HD, valid);

    // Pass 1: each row's maximum m and sum l of exp(scale·S − m), tile by tile.
    float m = neg_inf(), l = 0.f;
    for (int t0 = 0; t0 < kend; t0 += BC) {
        load_tile<T, HD>(ks, kb + (size_t)t0 * HD, HD, BC, keys - t0);
        __syncthreads();
        times_t<T, HD, BC>(qf, ks, sw, LDS);
        __syncwarp();
        float mt = neg_inf();
        for (int c = c0; c < c0 + BC / 2; ++c) {
            if (t0 + c <= last) mt = fmaxf(mt, sw[r * LDS + c] * scale);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 16));
        const float mn = fmaxf(m, mt);
        float sum = 0.f;
        for (int c = c0; c < c0 + BC / 2; ++c) {
            if (t0 + c <= last) sum += expf(sw[r * LDS + c] * scale - mn);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        l = l * expf(m - mn) + sum;
        m = mn;
        __syncthreads();
    }
    const float row_lse = m + logf(l);
    if (c0 == 0 && warp * 16 + r < valid) lse[row0 + warp * 16 + r] = row_lse;

    // Pass 2: O = P·V.
    frag_acc of[HD / 16];
    zero<HD>(of);
    for (int t0 = 0; t0 < kend; t0 += BC) {
        load_kv<T, HD, BC>(ks, vs, kb, vb, t0, keys);
        times_t<T, HD, BC>(qf, ks, sw, LDS);
        __syncwarp();
        for (int c = c0; c < c0 + BC / 2; ++c) {
            pw[r * LDP + c] = store<T>(t0 + c <= last ? expf(sw[r * LDS + c] * scale - row_lse) : 0.f);
        }
        __syncwarp();
        accumulate<T, HD, BC>(of, pw, LDP, vs);
        __syncthreads();
    }
    store_rows<T, HD>(o + (orow0 + (size_t)warp * 16 * heads) * HD, (size_t)heads * HD, valid - warp * 16, of, sw);
}

// dQ of one tile of ROWS query positions of one query head (blocks as fwd); first dot =
// rowsum(dO∘O) of its rows, for flash_bwd_dkv.
template <typename T, int HD>
__device__ void bwd_dq(const T* q, const T* k, const T* v, const T* o, const T* dout, const float* lse, float* dot, T* dq, int b, int nkv,
                       int rep, int s, int keys, float scale) {
    constexpr int BC = 32, LDS = BC + 4, LDP = BC + 8;
    constexpr int Q_BYTES = ROWS * HD * (int)sizeof(T), KV_BYTES = 2 * BC * HD * (int)sizeof(T);
    constexpr int A_BYTES = Q_BYTES > KV_BYTES ? Q_BYTES : KV_BYTES;
    __shared__ __align__(128) unsigned char smem[A_BYTES + 2 * ROWS * LDS * 4 + ROWS * LDP * (int)sizeof(T)];
    T* const stage = reinterpret_cast<T*>(smem);
    T* const ks = stage;
    T* const vs = ks + BC * HD;
    float* const ss = reinterpret_cast<float*>(smem + A_BYTES);
    float* const dps = ss + ROWS * LDS;
    T* const dss = reinterpret_cast<T*>(smem + A_BYTES + 2 * ROWS * LDS * 4);

    const QueryTile qt(b, nkv, rep, s, keys);
    const int heads = qt.heads, valid = qt.valid, kend = qt.kend;
    const size_t row0 = qt.row0, orow0 = qt.orow0;
    const size_t ostride = (size_t)heads * HD;
    const T* kb = k + qt.kv0 * HD;
    const T* vb = v + qt.kv0 * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane & 15, c0 = (lane >> 4) * (BC / 2);
    const int row = warp * 16 + r;
    const int last = qt.last0 + row;
    float* const sw = ss + warp * 16 * LDS;
    float* const dpw = dps + warp * 16 * LDS;
    T* const dsw = dss + warp * 16 * LDP;

    // dot and lse of this lane's row (its half of the head dimension, then the pair's sum).
    float d = 0.f, row_lse = 0.f;
    if (row < valid) {
        const T* orow = o + (orow0 + (size_t)row * heads) * HD;
        const T* grow = dout + (orow0 + (size_t)row * heads) * HD;
        for (int e = (lane >> 4) * (HD / 2); e < (lane >> 4 ? HD : HD / 2); ++e) d += load(orow[e]) * load(grow[e]);
        row_lse = lse[row0 + row];
    }
    d += __shfl_xor_sync(0xffffffffu, d, 16);
    if (c0 == 0 && row < valid) dot[row0 + row] = d;

    frag_a<T> qf[HD / 16], gf[HD / 16];
    stage_rows<T, HD>(qf, stage, q + row0 * HD, HD, valid);
    stage_rows<T, HD>(gf, stage, dout + orow0 * HD, ostride, valid);

    frag_acc acc[HD / 16];
    zero<HD>(acc);
    for (int t0 = 0; t0 < kend; t0 += BC) {
        load_kv<T, HD, BC>(ks, vs, kb, vb, t0, keys);
        times_t<T, HD, BC>(qf, ks, sw, LDS);
        times_t<T, HD, BC>(gf, vs, dpw, LDS);
        __syncwarp();
        for (int c = c0; c < c0 + BC / 2; ++c) {
            const float p = t0 + c <= last ? expf(sw[r * LDS + c] * scale - row_lse) : 0.f;
            dsw[r * LDP + c] = store<T>(scale * p * (dpw[r * LDS + c] - d));
        }
        __syncwarp();
        accumulate<T, HD, BC>(acc, dsw, LDP, ks);
        __syncthreads();
    }
    store_rows<T, HD>(dq + (row0 + warp * 16) * HD, HD, valid - warp * 16, acc, sw);
}

// dK and dV of one tile of ROWS keys of one KV head (block = tile, first keys first, as they
// see the most queries; then batch row and KV head), over the query tiles of each of its rep
// query heads that see one of its keys.
template <typename T, int HD>
__device__ void bwd_dkv(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dot, T* dk, T* dv, int b, int nkv,
                        int rep, int s, int keys, float scale) {
    constexpr int BQ = 32, LDS = BQ + 4, LDP = BQ + 8;
    constexpr int K_BYTES = ROWS * HD * (int)sizeof(T), QG_BYTES = 2 * BQ * HD * (int)sizeof(T);
    constexpr int A_BYTES = K_BYTES > QG_BYTES ? K_BYTES : QG_BYTES;
    constexpr int S_BYTES = 2 * ROWS * LDS * 4, P_BYTES = 2 * ROWS * LDP * (int)sizeof(T);
    __shared__ __align__(128) unsigned char smem[A_BYTES + S_BYTES + P_BYTES + 2 * BQ * 4];
    T* const stage = reinterpret_cast<T*>(smem);
    T* const qs = stage;
    T* const gs = qs + BQ * HD;
    float* const sts = reinterpret_cast<float*>(smem + A_BYTES);
    float* const dpts = sts + ROWS * LDS;
    T* const pts = reinterpret_cast<T*>(smem + A_BYTES + S_BYTES);
    T* const dsts = pts + ROWS * LDP;
    float* const lse_s = reinterpret_cast<float*>(smem + A_BYTES + S_BYTES + P_BYTES);
    float* const dot_s = lse_s + BQ;

    const int heads = nkv * rep, total = b * nkv;
    const int kvh = (int)(blockIdx.x % total), tile = (int)(blockIdx.x / total);
    const int bi = kvh / nkv, g = kvh % nkv;
    const int k0 = tile * ROWS, valid = imin(ROWS, keys - k0), offset = keys - s;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane & 15, c0 = (lane >> 4) * (BQ / 2);
    const int key = k0 + warp * 16 + r;  // this lane's row: a key
    float* const stw = sts + warp * 16 * LDS;
    float* const dptw = dpts + warp * 16 * LDS;
    T* const ptw = pts + warp * 16 * LDP;
    T* const dstw = dsts + warp * 16 * LDP;

    const size_t krow0 = (size_t)kvh * keys + k0;
    frag_a<T> kf[HD / 16], vf[HD / 16];
    stage_rows<T, HD>(kf, stage, k + krow0 * HD, HD, valid);
    stage_rows<T, HD>(vf, stage, v + krow0 * HD, HD, valid);

    frag_acc dka[HD / 16], dva[HD / 16];
    zero<HD>(dka);
    zero<HD>(dva);
    const int first = imax(0, k0 - offset);  // the first query position that sees key k0
    for (int j = 0; j < rep; ++j) {
        for (int p0 = first; p0 < s; p0 += BQ) {
            const int nq = imin(BQ, s - p0);
            const size_t qrow0 = ((size_t)kvh * rep + j) * s + p0;
            load_tile<T, HD>(qs, q + qrow0 * HD, HD, BQ, nq);
            load_tile<T, HD>(gs, dout + (((size_t)bi * s + p0) * heads + g * rep + j) * HD, (size_t)heads * HD, BQ, nq);
            for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
                lse_s[i] = i < nq ? lse[qrow0 + i] : 0.f;
                dot_s[i] = i < nq ? dot[qrow0 + i] : 0.f;
            }
            __syncthreads();
            times_t<T, HD, BQ>(kf, qs, stw, LDS);   // Sᵀ = K·Qᵀ
            times_t<T, HD, BQ>(vf, gs, dptw, LDS);  // dPᵀ = V·dOᵀ
            __syncwarp();
            for (int c = c0; c < c0 + BQ / 2; ++c) {
                const bool seen = c < nq && key <= offset + p0 + c;
                const float p = seen ? expf(stw[r * LDS + c] * scale - lse_s[c]) : 0.f;
                ptw[r * LDP + c] = store<T>(p);
                dstw[r * LDP + c] = store<T>(scale * p * (dptw[r * LDS + c] - dot_s[c]));
            }
            __syncwarp();
            accumulate<T, HD, BQ>(dva, ptw, LDP, gs);
            accumulate<T, HD, BQ>(dka, dstw, LDP, qs);
            __syncthreads();
        }
    }
    store_rows<T, HD>(dk + (krow0 + warp * 16) * HD, HD, valid - warp * 16, dka, stw);
    store_rows<T, HD>(dv + (krow0 + warp * 16) * HD, HD, valid - warp * 16, dva, stw);
}
}  // namespace flash
#endif
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

// AdamW in place, as the CPU steps (three launches, nothing allocated; the arithmetic of the two
// kernels above). One moment: d = d·keep + (square ? g² : g)·take.
extern "C" __global__ void tb_adamw_moment_inplace_f32(float* d, const float* g, size_t n, float keep, float take, int square) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float gi = g[i];
        d[i] = d[i] * keep + (square ? gi * gi : gi) * take;
    }
}

// The parameter from the new moments m and v, overwritten where it is.
extern "C" __global__ void tb_adamw_param_inplace_f32(float* p, const float* m, const float* v, size_t n, float decay, float inv_bc1,
                                                      float inv_bc2, float eps, float lr) {
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        const float denom = sqrtf(v[i] * inv_bc2) + eps;
        p[i] = p[i] * decay - (m[i] * inv_bc1) / denom * lr;
    }
}

// AdamW in place for many f32 variables in one launch (the trainer's on a GPU: with LoRA on
// every projection of a 1B model, 224 variables, three launches each were ~670 launches a
// step, each a few microseconds of mostly idle GPU). `table` holds ADAMW_SLOT values per
// variable: the device addresses of p, g, m and v, its element count, and the first block of
// the grid that works on it (blocks in variable order; block b works on elements
// [(b − first)·chunk, +chunk) of the last variable whose first block is ≤ b). Per element the
// arithmetic of the two in-place kernels above, in their order.
#define ADAMW_SLOT 6
extern "C" __global__ void tb_adamw_multi_f32(const unsigned long long* table, int count, unsigned chunk, float b1,
                                              float one_minus_b1, float b2, float one_minus_b2, float decay, float inv_bc1,
                                              float inv_bc2, float eps, float lr) {
    const unsigned long long block = blockIdx.x;
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid * ADAMW_SLOT + 5] <= block) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long* slot = table + lo * ADAMW_SLOT;
    float* p = reinterpret_cast<float*>(slot[0]);
    const float* g = reinterpret_cast<const float*>(slot[1]);
    float* m = reinterpret_cast<float*>(slot[2]);
    float* v = reinterpret_cast<float*>(slot[3]);
    const size_t n = slot[4], start = (size_t)(block - slot[5]) * chunk;
    const size_t end = start + chunk < n ? start + chunk : n;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = g[i];
        const float mi = m[i] * b1 + gi * one_minus_b1;
        const float vi = v[i] * b2 + (gi * gi) * one_minus_b2;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi * inv_bc2) + eps;
        p[i] = p[i] * decay - (mi * inv_bc1) / denom * lr;
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

// tb_flash_{fwd,bwd_dq,bwd_dkv}_hd<HD>_<dtype>: flash attention (namespace flash above), one
// block of flash::THREADS threads per tile.
#define TB_FLASH(T, SUFFIX, HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                                        \
        tb_flash_fwd_hd##HD##_##SUFFIX(const T* q, const T* k, const T* v, T* o, float* lse, int b, int nkv, int rep,   \
                                       int s, int keys, float scale) {                                                  \
        flash::fwd<T, HD>(q, k, v, o, lse, b, nkv, rep, s, keys, scale);                                                \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                                        \
        tb_flash_bwd_dq_hd##HD##_##SUFFIX(const T* q, const T* k, const T* v, const T* o, const T* dout,               \
                                          const float* lse, float* dot, T* dq, int b, int nkv, int rep, int s,          \
                                          int keys, float scale) {                                                      \
        flash::bwd_dq<T, HD>(q, k, v, o, dout, lse, dot, dq, b, nkv, rep, s, keys, scale);                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                                        \
        tb_flash_bwd_dkv_hd##HD##_##SUFFIX(const T* q, const T* k, const T* v, const T* dout, const float* lse,        \
                                           const float* dot, T* dk, T* dv, int b, int nkv, int rep, int s, int keys,    \
                                           float scale) {                                                               \
        flash::bwd_dkv<T, HD>(q, k, v, dout, lse, dot, dk, dv, b, nkv, rep, s, keys, scale);                           \
    }

#ifdef TB_FLASH_KERNELS
TB_FLASH(__half, f16, 64)
TB_FLASH(__half, f16, 128)
TB_FLASH(__nv_bfloat16, bf16, 64)
TB_FLASH(__nv_bfloat16, bf16, 128)
#endif
