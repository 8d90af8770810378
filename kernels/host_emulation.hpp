// Runs kernels/fused.cu on the CPU: what a machine without a GPU can check of our CUDA kernels.
//
// Compiled with a host C++20 compiler and TB_HOST_EMULATION defined, fused.cu's kernels become
// plain functions; `emu::launch` runs a grid block by block, each block as blockDim.x
// std::threads with `threadIdx`/`blockIdx` thread-local, `__syncthreads` a barrier over the
// block and `__shfl_xor_sync` an exchange through a buffer between two barriers of the warp —
// the CUDA execution model the kernels' index arithmetic, strides, masks and reductions rely on
// (tests/cuda_kernels_emulated.rs, with kernels/emulated_test.cpp). __half is GCC's _Float16
// and __nv_bfloat16 the top half of an f32, both rounded to nearest even as CUDA's *_rn
// conversions do. What this cannot show — timing, memory coalescing, the driver's JIT — is
// left to `tunebench check-ops` on a GPU.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static

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

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned lane = threadIdx.x & 31, base = threadIdx.x & ~31u;
    emu::warp_buf[threadIdx.x] = v;
    emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
    const float r = emu::warp_buf[base + (lane ^ static_cast<unsigned>(lane_mask))];
    emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
    return r;
}
