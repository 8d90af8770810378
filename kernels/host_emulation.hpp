// Runs kernels/fused.cu on the CPU: what a machine without a GPU can check of our CUDA kernels.
//
// Compiled with a host C++20 compiler and TB_HOST_EMULATION defined, fused.cu's kernels become
// plain functions; `emu::launch` runs a grid block by block, each block as blockDim.x
// std::threads with `threadIdx`/`blockIdx` thread-local, `__syncthreads` a barrier over the
// block and `__shfl_xor_sync` an exchange through a buffer between two barriers of the warp —
// the CUDA execution model the kernels' index arithmetic, strides, masks and reductions rely on
// (tests/cuda_kernels_emulated.rs, with kernels/emulated_test.cpp). The warp matrix ops the
// flash-attention kernels use (`nvcuda::wmma`: fill, load, mma, store of 16×16×16 tiles) are
// emulated too: each lane holds the whole tile, a load reads all of it, the product is an f32
// sum in every lane, and a store writes only the lane's share of the elements (as on the GPU,
// where each lane stores its own), so a kernel that reads a stored tile before `__syncwarp`
// reads some elements stale. What the hardware requires of addresses (16-byte vector
// accesses, 32-byte aligned wmma tiles with strides of whole 16-byte units) is checked, and
// the emulation aborts where a GPU would fault. __half is GCC's _Float16
// and __nv_bfloat16 the top half of an f32, both rounded to nearest even as CUDA's *_rn
// conversions do. What this cannot show — timing, memory coalescing, the driver's JIT — is
// left to `tunebench check-ops` on a GPU.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 threadIdx;
inline thread_local Dim3 blockIdx;
inline Dim3 blockDim;
inline Dim3 gridDim;

struct __half {
    uint16_t bits;
};

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}

inline __half __float2half_rn(float x) {
    const _Float16 f = static_cast<_Float16>(x);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }

inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

inline float __int_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> warp_buf;

// Runs `body` as a grid of `grid` blocks of `block` threads (a multiple of 32), one block at a
// time (so a kernel's `__shared__` statics belong to the running block).
template <typename F> void launch(unsigned grid, unsigned block, F body) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        block_barrier = &bar;
        warp_barriers.clear();
        for (unsigned w = 0; w < block / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        warp_buf.assign(block, 0.f);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([=] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                body();
            });
        }
        for (auto& t : threads) t.join();
    }
}
}  // namespace emu

// A 16-byte vector load or store (a `uint4` on the GPU) needs a 16-byte aligned address there;
// the emulation's memcpy would not, so an unaligned one stops here.
inline void check_vector_address(const void* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "16-byte vector access at %p: not 16-byte aligned\n", p);
        std::abort();
    }
}

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned lane = threadIdx.x & 31, base = threadIdx.x & ~31u;
    emu::warp_buf[threadIdx.x] = v;
    emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
    const float r = emu::warp_buf[base + (lane ^ static_cast<unsigned>(lane_mask))];
    emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
    return r;
}

// ---- nvcuda::wmma, 16×16×16 tiles of f16/bf16 with f32 accumulators ----
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole 16×16 tile, element (i, j) at x[16·i + j], in every lane.
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
    float x[256];
};

// What the hardware requires of a tile's address (CUDA C++ Programming Guide, warp matrix
// functions): a 256-bit aligned pointer and a stride of whole 16-byte units. The emulated load
// and store would work anyway, so an unaligned tile stops here instead of on the GPU.
template <typename T> void check_tile_address(const T* p, unsigned ldm) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
        std::fprintf(stderr, "wmma tile at %p with stride %u elements of %zu bytes: not 32-byte aligned or stride not a multiple of 16 bytes\n",
                     static_cast<const void*>(p), ldm, sizeof(T));
        std::abort();
    }
}

inline float element(float v) { return v; }
inline float element(__half v) { return __half2float(v); }
inline float element(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename L> void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
    for (float& e : f.x) e = v;
}

// A matrix_a/matrix_b tile from `p` (its layout from the fragment's type, `ldm` elements between
// rows or columns).
template <typename Use, typename T, typename L> void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "matrix_a/b fragments have a layout");
    check_tile_address(p, ldm);
    for (unsigned i = 0; i < 16; ++i)
        for (unsigned j = 0; j < 16; ++j) f.x[16 * i + j] = element(p[std::is_same_v<L, row_major> ? i * ldm + j : i + j * ldm]);
}

// d = a·b + c, summed in f32.
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float s = c.x[16 * i + j];
            for (int k = 0; k < 16; ++k) s += a.x[16 * i + k] * b.x[16 * k + j];
            out[16 * i + j] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}

// This lane's share of the tile (elements e with e mod 32 = lane) to `p`.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
    check_tile_address(p, ldm);
    for (unsigned e = threadIdx.x & 31; e < 256; e += 32) {
        const unsigned i = e / 16, j = e % 16;
        p[layout == mem_row_major ? i * ldm + j : i + j * ldm] = f.x[e];
    }
}
}  // namespace nvcuda::wmma
