// Runs every kernel of kernels/fused.cu under host emulation (host_emulation.hpp) in f32, f16
// and bf16, with the launch shapes src/model/fused.rs uses (256 threads per elementwise block,
// 256 or 1024 per row), on sizes that exercise the strides: rows longer and shorter than a
// block, widths that are not multiples of 32, a grid capped below the element count. Each
// result is held to a double-precision reference computed here from the same (rounded)
// inputs. The flash-attention kernels (f16, bf16) run as fused.rs launches them (128 threads,
// one block per tile of 64 positions) on shapes with grouped queries and earlier keys. Prints
// one line per kernel and dtype; exits 1 when one is off.
// The dequantization kernels are held to another implementation: given a folder, for each
// format F it reads F.blocks (quantized blocks written by candle) and F.f32 (candle's CPU
// dequantization of them, little-endian f32) and checks the kernel against those values.
// Built and run by tests/cuda_kernels_emulated.rs:
//   c++ -std=c++20 -O1 -pthread -DTB_HOST_EMULATION kernels/emulated_test.cpp -o emulated_test
//   ./emulated_test [FOLDER]

#include <cstdio>
#include <random>
#include <string>

#include "fused.cu"

namespace {

float value(float v) { return v; }
float value(__half v) { return __half2float(v); }
float value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> T make(float v);
template <> float make<float>(float v) { return v; }
template <> __half make<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 make<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> std::vector<T> random_vec(size_t n, unsigned seed, float scale) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(-scale, scale);
    std::vector<T> v(n);
    for (auto& x : v) x = make<T>(d(rng));
    return v;
}

int failures = 0;

// max |got − want| / max |want|, against `limit`.
template <typename T> void report(const char* kernel, const char* dtype, const std::vector<T>& got, const std::vector<double>& want, double limit) {
    double worst = 0, scale = 1e-12;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs(static_cast<double>(value(got[i])) - want[i]);
        worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
    const bool ok = worst / scale <= limit;
    if (!ok) ++failures;
    std::printf("%-16s %-5s %10.2e %8.0e %s\n", kernel, dtype, worst / scale, limit, ok ? "ok" : "FAILED");
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T> std::vector<double> wide(const std::vector<T>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = value(v[i]);
    return out;
}

unsigned elementwise_grid(size_t n) { return static_cast<unsigned>(std::min<size_t>(std::max<size_t>((n + 255) / 256, 1), 1 << 16)); }

template <typename T> void run_all(const char* dtype, double limit,
                                   void (*swiglu_fwd)(const T*, const T*, T*, size_t),
                                   void (*swiglu_bwd)(const T*, const T*, const T*, T*, size_t),
                                   void (*rmsnorm_bwd)(const T*, const T*, const T*, T*, int, float),
                                   void (*causal_softmax)(const T*, T*, int, int, int, float),
                                   void (*ce_stats)(const T*, const uint32_t*, float*, int),
                                   void (*ce_grad)(const T*, const uint32_t*, const float*, T*, int),
                                   void (*attention_ds)(const T*, const T*, const float*, T*, size_t, int, float),
                                   void (*dropout)(const T*, T*, size_t, uint64_t, uint64_t, float)) {
    // SwiGLU, 1000 elements: 4 blocks, then a grid capped at 2 blocks (the grid-stride loop).
    {
        const size_t n = 1000;
        auto g = random_vec<T>(n, 1, 4.f), u = random_vec<T>(n, 2, 2.f), d = random_vec<T>(n, 3, 1.f);
        const auto gw = wide(g), uw = wide(u), dw = wide(d);
        std::vector<double> want(n), want_grads(2 * n);
        for (size_t i = 0; i < n; ++i) {
            const double s = sigmoid(gw[i]);
            want[i] = gw[i] * s * uw[i];
            want_grads[i] = dw[i] * uw[i] * s * (1 + gw[i] * (1 - s));
            want_grads[n + i] = dw[i] * gw[i] * s;
        }
        for (unsigned grid : {elementwise_grid(n), 2u}) {
            std::vector<T> out(n, make<T>(NAN)), grads(2 * n, make<T>(NAN));
            emu::launch(grid, 256, [&] { swiglu_fwd(g.data(), u.data(), out.data(), n); });
            emu::launch(grid, 256, [&] { swiglu_bwd(g.data(), u.data(), d.data(), grads.data(), n); });
            report(grid == 2 ? "swiglu_fwd/2blk" : "swiglu_fwd", dtype, out, want, limit);
            report(grid == 2 ? "swiglu_bwd/2blk" : "swiglu_bwd", dtype, grads, want_grads, limit);
        }
    }
    // RMSNorm's input gradient: 5 rows of 300 (more than a block's 256 threads, not a multiple
    // of 32).
    {
        const int rows = 5, n = 300;
        const float eps = 1e-5f;
        auto x = random_vec<T>(rows * n, 4, 2.f), g = random_vec<T>(rows * n, 5, 1.f), w = random_vec<T>(n, 6, 1.f);
        const auto xw = wide(x), gw = wide(g), ww = wide(w);
        std::vector<double> want(rows * n);
        for (int r = 0; r < rows; ++r) {
            double ss = 0, dot = 0;
            for (int c = 0; c < n; ++c) ss += xw[r * n + c] * xw[r * n + c], dot += xw[r * n + c] * gw[r * n + c] * ww[c];
            const double inv = 1 / std::sqrt(ss / n + eps), k = inv * inv * inv * dot / n;
            for (int c = 0; c < n; ++c) want[r * n + c] = inv * gw[r * n + c] * ww[c] - xw[r * n + c] * k;
        }
        std::vector<T> out(rows * n, make<T>(NAN));
        emu::launch(rows, 256, [&] { rmsnorm_bwd(x.data(), g.data(), w.data(), out.data(), n, eps); });
        report("rmsnorm_bwd", dtype, out, want, limit);
    }
    // Causal softmax: 2 heads × 7 positions stacked per (batch · kv head) of 2, 10 keys (3 of
    // them ahead of the queries), and one long row set of 300 keys.
    for (auto [stacks, q_len, k_len] : {std::tuple{2, 7, 10}, std::tuple{1, 5, 300}}) {
        const int rows = stacks * 2 * q_len, offset = k_len - q_len;
        const float scale = 0.37f;
        auto x = random_vec<T>(rows * k_len, 7, 6.f);
        const auto xw = wide(x);
        std::vector<double> want(rows * k_len, 0.0);
        for (int r = 0; r < rows; ++r) {
            const int visible = r % q_len + offset + 1;
            double m = -INFINITY, s = 0;
            for (int c = 0; c < visible; ++c) m = std::max(m, xw[r * k_len + c] * scale);
            for (int c = 0; c < visible; ++c) s += std::exp(xw[r * k_len + c] * scale - m);
            for (int c = 0; c < visible; ++c) want[r * k_len + c] = std::exp(xw[r * k_len + c] * scale - m) / s;
        }
        std::vector<T> out(rows * k_len, make<T>(NAN));
        emu::launch(rows, 256, [&] { causal_softmax(x.data(), out.data(), k_len, q_len, offset, scale); });
        report(k_len == 10 ? "causal_softmax" : "causal_softmax/L", dtype, out, want, limit);
        // The masked keys are exactly 0.
        for (int r = 0; r < rows; ++r) {
            for (int c = r % q_len + offset + 1; c < k_len; ++c) {
                if (value(out[r * k_len + c]) != 0.f) {
                    std::printf("causal_softmax   %-5s row %d key %d: %g where the mask is FAILED\n", dtype, r, c, value(out[r * k_len + c]));
                    ++failures;
                }
            }
        }
    }
    // Cross-entropy: 3 rows of a 2500-word vocabulary (more than the 1024 threads of a row's
    // block), targets at the ends and inside.
    {
        const int rows = 3, vocab = 2500;
        auto logits = random_vec<T>(rows * vocab, 8, 8.f);
        const std::vector<uint32_t> targets = {0, 2499, 1234};
        const auto lw = wide(logits);
        std::vector<double> want_stats(2 * rows), want_grad(rows * vocab);
        for (int r = 0; r < rows; ++r) {
            double m = -INFINITY, s = 0;
            for (int c = 0; c < vocab; ++c) m = std::max(m, lw[r * vocab + c]);
            for (int c = 0; c < vocab; ++c) s += std::exp(lw[r * vocab + c] - m);
            const double lse = m + std::log(s);
            want_stats[2 * r] = lse - lw[r * vocab + targets[r]];
            want_stats[2 * r + 1] = lse;
            for (int c = 0; c < vocab; ++c) want_grad[r * vocab + c] = std::exp(lw[r * vocab + c] - lse) - (c == static_cast<int>(targets[r]) ? 1 : 0);
        }
        std::vector<float> stats(2 * rows, NAN);
        std::vector<T> grad(rows * vocab, make<T>(NAN));
        emu::launch(rows, 1024, [&] { ce_stats(logits.data(), targets.data(), stats.data(), vocab); });
        emu::launch(rows, 1024, [&] { ce_grad(logits.data(), targets.data(), stats.data(), grad.data(), vocab); });
        report("ce_stats", dtype, stats, want_stats, 1e-5);  // f32 sums of the rounded logits
        report("ce_grad", dtype, grad, want_grad, limit);
    }
    // Attention's dS: 6 rows of 37 keys.
    {
        const int rows = 6, k_len = 37;
        const size_t n = rows * k_len;
        const float scale = 0.125f;
        auto p = random_vec<T>(n, 9, 1.f), dp = random_vec<T>(n, 10, 2.f);
        std::vector<float> rowdot(rows);
        for (int r = 0; r < rows; ++r) rowdot[r] = 0.3f * r - 0.7f;
        const auto pw = wide(p), dw = wide(dp);
        std::vector<double> want(n);
        for (size_t i = 0; i < n; ++i) want[i] = scale * pw[i] * (dw[i] - rowdot[i / k_len]);
        std::vector<T> out(n, make<T>(NAN));
        emu::launch(elementwise_grid(n), 256, [&] { attention_ds(p.data(), dp.data(), rowdot.data(), out.data(), n, k_len, scale); });
        report("attention_ds", dtype, out, want, limit);
    }
    // Dropout: 10,000 elements (3 chunks of the stream) over a grid capped at 3 blocks; the
    // reference draws the stream the way the CPU does (one state per chunk, advanced per draw).
    {
        const size_t n = 10000;
        const uint64_t seed = 0x0123456789abcdefull;
        const double p = 0.3;
        const uint64_t threshold = static_cast<uint64_t>(p * 18446744073709551615.0);
        const float scale = static_cast<float>(1.0 / (1.0 - p));
        auto x = random_vec<T>(n, 15, 2.f);
        std::vector<double> want(n);
        uint64_t kept = 0, hash = 0;
        for (size_t chunk = 0; chunk * 4096 < n; ++chunk) {
            uint64_t state = seed ^ (chunk * 0xD1B54A32D192ED03ull);
            for (size_t i = chunk * 4096; i < std::min(n, (chunk + 1) * 4096); ++i) {
                state += 0x9E3779B97F4A7C15ull;
                uint64_t z = state;
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
                z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
                z ^= z >> 31;
                const bool keep = z >= threshold;
                want[i] = keep ? static_cast<double>(value(x[i])) * scale : 0.0;
                kept += keep;
                hash += keep ? (i + 1) * (i + 1) : 0;
            }
        }
        std::vector<T> out(n, make<T>(NAN));
        emu::launch(3, 256, [&] { dropout(x.data(), out.data(), n, seed, threshold, scale); });
        report("dropout", dtype, out, want, limit);
        // For tests/cuda_kernels_emulated.rs to compare with the CPU's mask (fused::dropout_mask).
        if (std::string(dtype) == "f32") std::printf("dropout mask n=%zu seed=%llu p=%g: kept %llu hash %llu\n", n,
                                                      static_cast<unsigned long long>(seed), p, static_cast<unsigned long long>(kept),
                                                      static_cast<unsigned long long>(hash));
    }
}

// Heads moved between (b, s, heads·hd) rows and (b, heads, s, hd) blocks, both ways, rotated
// by RoPE (+θ into the heads, −θ out) and plain: 600 values over a grid capped at 2 blocks.
template <typename T> void heads_all(const char* dtype, double limit, void (*plain)(const T*, T*, size_t, int, int, int, int),
                                     void (*rope)(const T*, const float*, T*, size_t, int, int, int, int)) {
    const int b = 2, s = 5, heads = 6, hd = 10, half = hd / 2, width = heads * hd;
    const size_t n = static_cast<size_t>(b) * s * width;
    auto x = random_vec<T>(n, 16, 2.f);
    auto table = random_vec<float>(static_cast<size_t>(s) * hd, 17, 1.f);
    const auto xw = wide(x);
    for (int rotate = 0; rotate < 2; ++rotate) {
        for (int into = 1; into >= 0; --into) {
            std::vector<double> want(n);
            for (int bi = 0; bi < b; ++bi)
                for (int h = 0; h < heads; ++h)
                    for (int p = 0; p < s; ++p) {
                        const size_t rows = (static_cast<size_t>(bi) * s + p) * width + h * hd;
                        const size_t blocks = ((static_cast<size_t>(bi) * heads + h) * s + p) * hd;
                        const size_t from = into ? rows : blocks, to = into ? blocks : rows;
                        for (int d = 0; d < hd; ++d) {
                            if (!rotate) {
                                want[to + d] = xw[from + d];
                                continue;
                            }
                            const int j = d % half;
                            const double c = table[p * hd + j], sn = (into ? 1.0 : -1.0) * table[p * hd + half + j];
                            want[to + d] = d < half ? xw[from + d] * c - xw[from + d + half] * sn : xw[from + d] * c + xw[from + d - half] * sn;
                        }
                    }
            std::vector<T> out(n, make<T>(NAN));
            if (rotate) {
                emu::launch(2, 256, [&] { rope(x.data(), table.data(), out.data(), n, s, heads, hd, into); });
            } else {
                emu::launch(2, 256, [&] { plain(x.data(), out.data(), n, s, heads, hd, into); });
            }
            report(rotate ? (into ? "split_heads_rope" : "merge_heads_rope") : (into ? "split_heads" : "merge_heads"), dtype, out, want, limit);
        }
    }
}

// AdamW (f32 only): 700 elements over a grid capped at 2 blocks, with weight decay.
void adamw() {
    const size_t n = 700;
    auto g = random_vec<float>(n, 11, 1.f), m = random_vec<float>(n, 12, 0.1f), v = random_vec<float>(n, 13, 0.01f), p = random_vec<float>(n, 14, 1.f);
    for (auto& x : v) x = std::fabs(x);
    const double b1 = 0.9, b2 = 0.999, lr = 1e-2, wd = 0.01, eps = 1e-8, bc1 = 1 - std::pow(b1, 3), bc2 = 1 - std::pow(b2, 3);
    std::vector<double> want_mv(2 * n), want_p(n);
    for (size_t i = 0; i < n; ++i) {
        want_mv[i] = m[i] * b1 + g[i] * (1 - b1);
        want_mv[n + i] = v[i] * b2 + g[i] * g[i] * (1 - b2);
        want_p[i] = p[i] * (1 - lr * wd) - lr * (want_mv[i] / bc1) / (std::sqrt(want_mv[n + i] / bc2) + eps);
    }
    std::vector<float> mv(2 * n, NAN), out(n, NAN);
    emu::launch(2, 256, [&] { tb_adamw_moments_f32(g.data(), m.data(), v.data(), mv.data(), n, b1, 1 - b1, b2, 1 - b2); });
    emu::launch(2, 256, [&] { tb_adamw_param_f32(p.data(), mv.data(), out.data(), n, 1 - lr * wd, 1 / bc1, 1 / bc2, eps, lr); });
    report("adamw_moments", "f32", mv, want_mv, 1e-6);
    // The update is ~lr: hold the change of p to the reference's change.
    std::vector<double> want_step(n);
    std::vector<float> step(n);
    for (size_t i = 0; i < n; ++i) want_step[i] = want_p[i] - p[i], step[i] = out[i] - p[i];
    report("adamw_param", "f32", step, want_step, 1e-4);
    // The in-place twins (the trainer's): m, v, then p overwritten where they are, the same
    // values as the two kernels above.
    auto m2 = m, v2 = v, p2 = p;
    emu::launch(2, 256, [&] { tb_adamw_moment_inplace_f32(m2.data(), g.data(), n, b1, 1 - b1, 0); });
    emu::launch(2, 256, [&] { tb_adamw_moment_inplace_f32(v2.data(), g.data(), n, b2, 1 - b2, 1); });
    emu::launch(2, 256, [&] { tb_adamw_param_inplace_f32(p2.data(), m2.data(), v2.data(), n, 1 - lr * wd, 1 / bc1, 1 / bc2, eps, lr); });
    std::vector<double> got_mv(2 * n);
    for (size_t i = 0; i < n; ++i) got_mv[i] = mv[i], got_mv[n + i] = mv[n + i];
    std::vector<float> mv2(2 * n);
    for (size_t i = 0; i < n; ++i) mv2[i] = m2[i], mv2[n + i] = v2[i];
    report("adamw_moment_inplace", "f32", mv2, got_mv, 0.0);
    std::vector<double> want_out(out.begin(), out.end());
    report("adamw_param_inplace", "f32", p2, want_out, 0.0);
    // Every variable in one launch: three variables (700, 1 and 300 elements, in chunks of 256:
    // 3 + 1 + 2 blocks), each updated as the in-place kernels update it alone.
    const size_t sizes[3] = {n, 1, 300};
    std::vector<std::vector<float>> ps, gs, ms, vs;
    std::vector<unsigned long long> table;
    unsigned long long first = 0;
    const unsigned chunk = 256;
    for (int t = 0; t < 3; ++t) {
        const size_t k = sizes[t];
        ps.push_back(std::vector<float>(p.begin(), p.begin() + k));
        gs.push_back(std::vector<float>(g.begin() + (n - k), g.end()));
        ms.push_back(std::vector<float>(m.begin(), m.begin() + k));
        vs.push_back(std::vector<float>(v.begin() + (n - k), v.end()));
    }
    for (int t = 0; t < 3; ++t) {
        for (auto* ptr : {(void*)ps[t].data(), (void*)gs[t].data(), (void*)ms[t].data(), (void*)vs[t].data()})
            table.push_back((unsigned long long)(uintptr_t)ptr);
        table.push_back(sizes[t]);
        table.push_back(first);
        first += (sizes[t] + chunk - 1) / chunk;
    }
    emu::launch((unsigned)first, 128, [&] {
        tb_adamw_multi_f32(table.data(), 3, chunk, b1, 1 - b1, b2, 1 - b2, 1 - lr * wd, 1 / bc1, 1 / bc2, eps, lr);
    });
    std::vector<float> got_all, want_all;
    for (int t = 0; t < 3; ++t) {
        const size_t k = sizes[t];
        auto pt = std::vector<float>(p.begin(), p.begin() + k), mt = std::vector<float>(m.begin(), m.begin() + k);
        auto gt = std::vector<float>(g.begin() + (n - k), g.end()), vt = std::vector<float>(v.begin() + (n - k), v.end());
        emu::launch(1, 256, [&] { tb_adamw_moment_inplace_f32(mt.data(), gt.data(), k, b1, 1 - b1, 0); });
        emu::launch(1, 256, [&] { tb_adamw_moment_inplace_f32(vt.data(), gt.data(), k, b2, 1 - b2, 1); });
        emu::launch(1, 256, [&] { tb_adamw_param_inplace_f32(pt.data(), mt.data(), vt.data(), k, 1 - lr * wd, 1 / bc1, 1 / bc2, eps, lr); });
        for (auto* pair : {&pt, &mt, &vt}) want_all.insert(want_all.end(), pair->begin(), pair->end());
        for (auto* pair : {&ps[t], &ms[t], &vs[t]}) got_all.insert(got_all.end(), pair->begin(), pair->end());
    }
    report("adamw_multi", "f32", got_all, std::vector<double>(want_all.begin(), want_all.end()), 0.0);
}


// Flash attention (f16, bf16; head_dim 64 and 128): the forward, then the two backward kernels
// fed the forward's own output and log-sum-exp, as src/model/fused.rs runs them, against
// attention and its gradients computed here in double from the same rounded inputs. Shapes
// with grouped queries (rep query heads per KV head), keys ahead of the queries (a prefix),
// and query and key counts that are not multiples of the tiles. Every output has a tail of
// NaN past its end that must stay untouched (no write out of bounds).
template <typename T, int HD> struct FlashKernels {
    void (*fwd)(const T*, const T*, const T*, T*, float*, int, int, int, int, int, float);
    void (*dq)(const T*, const T*, const T*, const T*, const T*, const float*, float*, T*, int, int, int, int, int, float);
    void (*dkv)(const T*, const T*, const T*, const T*, const float*, const float*, T*, T*, int, int, int, int, int, float);
};

template <typename V> bool tail_intact(const V& v, size_t n) {
    for (size_t i = n; i < v.size(); ++i)
        if (!std::isnan(value(v[i]))) return false;
    return true;
}

template <typename T, int HD> void flash_case(const char* dtype, double fwd_limit, double bwd_limit, FlashKernels<T, HD> kern, int b, int nkv,
                                              int rep, int s, int keys) {
    const int heads = nkv * rep, offset = keys - s, tail = 64;
    const float scale = 1.f / std::sqrt(static_cast<float>(HD));
    const size_t nq = static_cast<size_t>(b) * heads * s * HD, nk = static_cast<size_t>(b) * nkv * keys * HD, rows = static_cast<size_t>(b) * heads * s;
    auto q = random_vec<T>(nq, 21, 2.f), k = random_vec<T>(nk, 22, 2.f), v = random_vec<T>(nk, 23, 1.f), dout = random_vec<T>(nq, 24, 1.f);
    const auto qw = wide(q), kw = wide(k), vw = wide(v), gw = wide(dout);
    std::vector<double> want_o(nq, 0.0), want_lse(rows), want_dot(rows), want_dq(nq, 0.0), want_dk(nk, 0.0), want_dv(nk, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int g = 0; g < nkv; ++g)
            for (int j = 0; j < rep; ++j)
                for (int p = 0; p < s; ++p) {
                    const size_t qrow = ((static_cast<size_t>(bi) * nkv + g) * rep + j) * s + p;
                    const size_t orow = (static_cast<size_t>(bi) * s + p) * heads + g * rep + j;
                    const size_t kv0 = (static_cast<size_t>(bi) * nkv + g) * keys;
                    const int seen = offset + p + 1;
                    std::vector<double> sc(seen), pr(seen), dp(seen);
                    double m = -INFINITY, sum = 0;
                    for (int t = 0; t < seen; ++t) {
                        double dotqk = 0;
                        for (int d = 0; d < HD; ++d) dotqk += qw[qrow * HD + d] * kw[(kv0 + t) * HD + d];
                        sc[t] = scale * dotqk;
                        m = std::max(m, sc[t]);
                    }
                    for (int t = 0; t < seen; ++t) sum += std::exp(sc[t] - m);
                    const double lse = m + std::log(sum);
                    want_lse[qrow] = lse;
                    double rowdot = 0;
                    for (int t = 0; t < seen; ++t) {
                        pr[t] = std::exp(sc[t] - lse);
                        double x = 0;
                        for (int d = 0; d < HD; ++d) {
                            want_o[orow * HD + d] += pr[t] * vw[(kv0 + t) * HD + d];
                            x += gw[orow * HD + d] * vw[(kv0 + t) * HD + d];
                        }
                        dp[t] = x;
                        rowdot += pr[t] * x;
                    }
                    want_dot[qrow] = rowdot;
                    for (int t = 0; t < seen; ++t) {
                        const double ds = scale * pr[t] * (dp[t] - rowdot);
                        for (int d = 0; d < HD; ++d) {
                            want_dq[qrow * HD + d] += ds * kw[(kv0 + t) * HD + d];
                            want_dk[(kv0 + t) * HD + d] += ds * qw[qrow * HD + d];
                            want_dv[(kv0 + t) * HD + d] += pr[t] * gw[orow * HD + d];
                        }
                    }
                }
    const T nan = make<T>(NAN);
    std::vector<T> o(nq + tail, nan), dq(nq + tail, nan), dk(nk + tail, nan), dv(nk + tail, nan);
    std::vector<float> lse(rows + tail, NAN), dot(rows + tail, NAN);
    const unsigned q_tiles = static_cast<unsigned>((s + flash::ROWS - 1) / flash::ROWS), k_tiles = static_cast<unsigned>((keys + flash::ROWS - 1) / flash::ROWS);
    emu::launch(b * heads * q_tiles, flash::THREADS, [&] { kern.fwd(q.data(), k.data(), v.data(), o.data(), lse.data(), b, nkv, rep, s, keys, scale); });
    emu::launch(b * heads * q_tiles, flash::THREADS, [&] {
        kern.dq(q.data(), k.data(), v.data(), o.data(), dout.data(), lse.data(), dot.data(), dq.data(), b, nkv, rep, s, keys, scale);
    });
    emu::launch(b * nkv * k_tiles, flash::THREADS, [&] {
        kern.dkv(q.data(), k.data(), v.data(), dout.data(), lse.data(), dot.data(), dk.data(), dv.data(), b, nkv, rep, s, keys, scale);
    });
    char name[64];
    const auto check = [&](const char* what, const auto& got, size_t n, const std::vector<double>& want, double limit) {
        std::snprintf(name, sizeof name, "flash%d_%s/%d", HD, what, s);
        report(name, dtype, std::vector(got.begin(), got.begin() + static_cast<long>(n)), want, limit);
        if (!tail_intact(got, n)) {
            std::printf("%-16s %-5s wrote past its output FAILED\n", name, dtype);
            ++failures;
        }
    };
    check("o", o, nq, want_o, fwd_limit);
    check("lse", lse, rows, want_lse, 1e-5);  // f32 sums of exact products
    check("dot", dot, rows, want_dot, fwd_limit);
    check("dq", dq, nq, want_dq, bwd_limit);
    check("dk", dk, nk, want_dk, bwd_limit);
    check("dv", dv, nk, want_dv, bwd_limit);
}

template <typename T, int HD> void flash_all(const char* dtype, double fwd_limit, double bwd_limit, FlashKernels<T, HD> kern) {
    // Two query tiles (the second partial), keys five ahead, two query heads per KV head; then
    // one partial tile, three query heads sharing one KV head, no earlier keys.
    flash_case<T, HD>(dtype, fwd_limit, bwd_limit, kern, 2, 2, 2, 70, 75);
    flash_case<T, HD>(dtype, fwd_limit, bwd_limit, kern, 1, 1, 3, 20, 20);
}

std::vector<uint8_t> read_file(const std::string& path) {
    std::vector<uint8_t> bytes;
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
        uint8_t buf[65536];
        for (size_t got; (got = std::fread(buf, 1, sizeof buf, f)) > 0;) bytes.insert(bytes.end(), buf, buf + got);
        std::fclose(f);
    }
    return bytes;
}

// One format's blocks through its kernel in one dtype (a grid capped at 3 blocks, so the
// grid-stride loop crosses block boundaries), against candle's values rounded to the dtype.
template <typename T> void dequant(const char* kernel, const char* dtype, void (*run)(const uint8_t*, T*, size_t),
                                   const std::vector<uint8_t>& blocks, const std::vector<float>& want_f32, double limit) {
    const size_t n = want_f32.size();
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = value(make<T>(want_f32[i]));
    std::vector<T> out(n, make<T>(NAN));
    emu::launch(3, 256, [&] { run(blocks.data(), out.data(), n); });
    report(kernel, dtype, out, want, limit);
}

void dequant_all(const std::string& dir) {
    struct Format {
        const char* name;
        void (*f32)(const uint8_t*, float*, size_t);
        void (*f16)(const uint8_t*, __half*, size_t);
        void (*bf16)(const uint8_t*, __nv_bfloat16*, size_t);
    };
    const Format formats[] = {
        {"q4_0", tb_dequant_q4_0_f32, tb_dequant_q4_0_f16, tb_dequant_q4_0_bf16},
        {"q4_1", tb_dequant_q4_1_f32, tb_dequant_q4_1_f16, tb_dequant_q4_1_bf16},
        {"q8_0", tb_dequant_q8_0_f32, tb_dequant_q8_0_f16, tb_dequant_q8_0_bf16},
        {"q4k", tb_dequant_q4k_f32, tb_dequant_q4k_f16, tb_dequant_q4k_bf16},
    };
    for (const auto& f : formats) {
        const auto blocks = read_file(dir + "/" + f.name + ".blocks");
        const auto raw = read_file(dir + "/" + f.name + ".f32");
        if (blocks.empty() || raw.empty() || raw.size() % 4 != 0) {
            std::printf("dequant_%s: cannot read %s/%s.blocks and .f32\n", f.name, dir.c_str(), f.name);
            ++failures;
            continue;
        }
        std::vector<float> want(raw.size() / 4);
        std::memcpy(want.data(), raw.data(), raw.size());
        const std::string kernel = std::string("dequant_") + f.name;
        // f32: candle's arithmetic (an FMA may round once where it rounds twice); f16, bf16:
        // the same value rounded to the dtype, where the one ulp of f32 may tip a tie.
        dequant<float>(kernel.c_str(), "f32", f.f32, blocks, want, 1e-6);
        dequant<__half>(kernel.c_str(), "f16", f.f16, blocks, want, 1e-3);
        dequant<__nv_bfloat16>(kernel.c_str(), "bf16", f.bf16, blocks, want, 8e-3);
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::printf("%-16s %-5s %10s %8s\n", "kernel", "dtype", "rel.error", "limit");
    // The results are rounded once to the dtype: half an ulp of f32, f16 (2^-11), bf16 (2^-8),
    // relative to the largest value, with room for f32 sums.
    run_all<float>("f32", 1e-5, tb_swiglu_fwd_f32, tb_swiglu_bwd_f32, tb_rmsnorm_bwd_f32, tb_causal_softmax_f32, tb_ce_stats_f32,
                   tb_ce_grad_f32, tb_attention_ds_f32, tb_dropout_f32);
    run_all<__half>("f16", 1e-3, tb_swiglu_fwd_f16, tb_swiglu_bwd_f16, tb_rmsnorm_bwd_f16, tb_causal_softmax_f16, tb_ce_stats_f16,
                    tb_ce_grad_f16, tb_attention_ds_f16, tb_dropout_f16);
    run_all<__nv_bfloat16>("bf16", 8e-3, tb_swiglu_fwd_bf16, tb_swiglu_bwd_bf16, tb_rmsnorm_bwd_bf16, tb_causal_softmax_bf16,
                           tb_ce_stats_bf16, tb_ce_grad_bf16, tb_attention_ds_bf16, tb_dropout_bf16);
    heads_all<float>("f32", 1e-5, tb_split_heads_f32, tb_split_heads_rope_f32);
    heads_all<__half>("f16", 1e-3, tb_split_heads_f16, tb_split_heads_rope_f16);
    heads_all<__nv_bfloat16>("bf16", 8e-3, tb_split_heads_bf16, tb_split_heads_rope_bf16);
    adamw();
    // P and dS are rounded to the dtype before their products (as the tensor-op path rounds
    // them), so the errors are a few of the dtype's ulps.
    flash_all<__half, 64>("f16", 2e-3, 3e-3, {tb_flash_fwd_hd64_f16, tb_flash_bwd_dq_hd64_f16, tb_flash_bwd_dkv_hd64_f16});
    flash_all<__half, 128>("f16", 2e-3, 3e-3, {tb_flash_fwd_hd128_f16, tb_flash_bwd_dq_hd128_f16, tb_flash_bwd_dkv_hd128_f16});
    flash_all<__nv_bfloat16, 64>("bf16", 1.6e-2, 2.5e-2, {tb_flash_fwd_hd64_bf16, tb_flash_bwd_dq_hd64_bf16, tb_flash_bwd_dkv_hd64_bf16});
    flash_all<__nv_bfloat16, 128>("bf16", 1.6e-2, 2.5e-2, {tb_flash_fwd_hd128_bf16, tb_flash_bwd_dq_hd128_bf16, tb_flash_bwd_dkv_hd128_bf16});
    if (argc > 1) dequant_all(argv[1]);
    std::printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
