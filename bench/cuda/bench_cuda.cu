// Google Benchmark suite of foe's CUDA kernels, timed with CUDA events (manual time):
//   - the dense GEMM at foe-1b's expert shapes: cuBLASLt (LtGemm) and foe's tensor-core kernel
//     (TcGemm), the latter with cuBLASLt's rate on the same shape measured in the same run beside
//     it ("vs cuBLASLt" = TcGemm / cuBLASLt TFLOP/s);
//   - the grouped SwiGLU experts over 2048 and 16384 tokens (E 64, k 8, d 768, f 384, routed
//     uniformly at random with a fixed seed): the host-driven per-expert cuBLASLt version
//     (swiglu_experts), with one cuBLASLt GEMM of the same FLOPs beside it; and the device-offset
//     version (grouped_swiglu, foe's tensor-core kernels), with a cuBLASLt bf16 GEMM pair of the
//     same FLOPs (M = rows, N = 2f, K = d, then M = rows, N = d, K = f) measured in the same run
//     ("vs cuBLASLt pair" = grouped / pair TFLOP/s);
//   - split-KV decode attention at contexts 2048 and 8192.
// Without a CUDA device every benchmark is skipped with a message.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cuda_bench_util.hpp"
#include "foe/attention/decode_attention.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/permute.cuh"
#include "foe/experts/swiglu_reference.cuh"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

namespace {

using foe::cuda::bench::random_device;
using foe::cuda::bench::time_with_events;

/// Mean seconds of fn() over `iterations` back-to-back calls between two CUDA events, after one
/// warm-up call: the rate of a second kernel measured inside another benchmark's run.
template <class Fn>
double time_events(Fn&& fn, int iterations = 20)
{
    cudaEvent_t start{}, stop{};
    fc::check(cudaEventCreate(&start), "cudaEventCreate");
    fc::check(cudaEventCreate(&stop), "cudaEventCreate");
    fn();
    fc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    fc::check(cudaEventRecord(start, nullptr), "cudaEventRecord");
    for (int i = 0; i < iterations; ++i) fn();
    fc::check(cudaEventRecord(stop, nullptr), "cudaEventRecord");
    fc::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.0f;
    fc::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    return static_cast<double>(ms) * 1e-3 / iterations;
}

bool skip_without_device(benchmark::State& state)
{
    if (fc::cuda_device_count() > 0) return false;
    state.SkipWithError("no CUDA device: skipped");
    for (auto _ : state) {
    }
    return true;
}

void set_tflops(benchmark::State& state, double flops, double seconds)
{
    state.counters["TFLOP/s"] = seconds > 0.0 ? flops * 1e-12 / seconds : 0.0;
}

void BM_LtGemm(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t m = state.range(0), n = state.range(1), k = state.range(2);
    auto a = random_device(static_cast<std::size_t>(m * k), 1, 1.0f);
    auto b = random_device(static_cast<std::size_t>(n * k), 2, 0.05f);
    fc::DeviceBuffer<bfloat16> c(static_cast<std::size_t>(m * n));
    fc::LtGemm gemm;
    const double t = time_with_events(state, [&] { gemm.nt(a.data(), b.data(), c.data(), fc::OutType::bf16, m, n, k, nullptr); });
    set_tflops(state, 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k), t);
}
// foe-1b experts at 2048 tokens: 256 rows per expert; gate+up [2f = 768, d = 768], down [d, f = 384];
// and the same over 16384 tokens (2048 rows per expert).
BENCHMARK(BM_LtGemm)->Args({256, 768, 768})->Args({256, 768, 384})->Args({2048, 768, 768})->Args({2048, 768, 384})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

/// foe's tensor-core GEMM on the same shapes, with cuBLASLt's rate measured beside it.
void BM_TcGemm(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t m = state.range(0), n = state.range(1), k = state.range(2);
    auto a = random_device(static_cast<std::size_t>(m * k), 1, 1.0f);
    auto b = random_device(static_cast<std::size_t>(n * k), 2, 0.05f);
    fc::DeviceBuffer<bfloat16> c(static_cast<std::size_t>(m * n));
    const fc::TcGemm tc;
    fc::LtGemm lt;
    const double t = time_with_events(state, [&] { tc.nt(a.data(), b.data(), c.data(), fc::OutType::bf16, m, n, k, nullptr); });
    const double t_lt = time_events([&] { lt.nt(a.data(), b.data(), c.data(), fc::OutType::bf16, m, n, k, nullptr); });
    const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    set_tflops(state, flops, t);
    state.counters["cuBLASLt TFLOP/s"] = t_lt > 0.0 ? flops * 1e-12 / t_lt : 0.0;
    state.counters["vs cuBLASLt"] = t > 0.0 ? t_lt / t : 0.0;
}
BENCHMARK(BM_TcGemm)->Args({256, 768, 768})->Args({256, 768, 384})->Args({2048, 768, 768})->Args({2048, 768, 384})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

constexpr index_t bench_d = 768, bench_f = 384, bench_e = 64, bench_k = 8;

void BM_GroupedSwiGlu(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t tokens = state.range(0), rows = tokens * bench_k;
    std::mt19937_64 rng(3);
    std::uniform_int_distribution<int> ed(0, static_cast<int>(bench_e) - 1);
    std::vector<std::int32_t> experts(static_cast<std::size_t>(rows));
    for (auto& e : experts) e = ed(rng);  // uniform routing (duplicates within a token do not matter here)
    std::vector<fc::DeviceBuffer<bfloat16>> gu, dn;
    std::vector<fc::DeviceExpertWeights> w;
    for (index_t e = 0; e < bench_e; ++e) {
        gu.push_back(random_device(static_cast<std::size_t>(2 * bench_f * bench_d), 10 + static_cast<std::uint64_t>(e), 0.05f));
        dn.push_back(random_device(static_cast<std::size_t>(bench_d * bench_f), 100 + static_cast<std::uint64_t>(e), 0.05f));
        w.push_back({gu.back().data(), dn.back().data()});
    }
    auto x = random_device(static_cast<std::size_t>(tokens * bench_d), 4, 1.0f);
    auto dexperts = fc::upload(experts);
    const fc::PermutePlan plan(rows, bench_e);
    fc::DeviceBuffer<unsigned char> pws(plan.workspace_bytes()), sws(fc::swiglu_workspace_bytes(rows, bench_f));
    fc::DeviceBuffer<std::int32_t> sorted(static_cast<std::size_t>(rows)), offsets(static_cast<std::size_t>(bench_e + 1)),
        inverse(static_cast<std::size_t>(rows));
    fc::DeviceBuffer<bfloat16> xs(static_cast<std::size_t>(rows * bench_d)), y(static_cast<std::size_t>(rows * bench_d));
    fc::permute(plan, dexperts.data(), 0, pws.data(), {sorted.data(), offsets.data(), inverse.data()}, nullptr);
    fc::gather_rows(x.data(), sorted.data(), rows, bench_k, bench_d, xs.data(), nullptr);
    const auto host_offsets = fc::download(offsets);
    fc::LtGemm gemm;
    const double t = time_with_events(state, [&] {
        fc::swiglu_experts(gemm, w, host_offsets, xs.data(), bench_d, bench_f, sws.data(), y.data(), nullptr);
    });
    set_tflops(state, 6.0 * static_cast<double>(rows) * static_cast<double>(bench_d) * static_cast<double>(bench_f), t);
}
BENCHMARK(BM_GroupedSwiGlu)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// One dense GEMM with the grouped SwiGLU's FLOPs: [tokens k, d] x [3f, d]^T.
void BM_DenseSameFlops(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t m = state.range(0) * bench_k, n = 3 * bench_f, k = bench_d;
    auto a = random_device(static_cast<std::size_t>(m * k), 5, 1.0f);
    auto b = random_device(static_cast<std::size_t>(n * k), 6, 0.05f);
    fc::DeviceBuffer<bfloat16> c(static_cast<std::size_t>(m * n));
    fc::LtGemm gemm;
    const double t = time_with_events(state, [&] { gemm.nt(a.data(), b.data(), c.data(), fc::OutType::bf16, m, n, k, nullptr); });
    set_tflops(state, 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k), t);
}
BENCHMARK(BM_DenseSameFlops)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// grouped_swiglu (device offsets, foe's tensor-core kernels) at foe-1b's expert shapes, with a
/// cuBLASLt bf16 GEMM pair of the same FLOPs measured in the same run: [rows, d] x [2f, d]^T,
/// then [rows, f] x [d, f]^T.
void BM_GroupedSwiGluTc(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t tokens = state.range(0), rows = tokens * bench_k;
    std::mt19937_64 rng(3);
    std::uniform_int_distribution<int> ed(0, static_cast<int>(bench_e) - 1);
    std::vector<std::int32_t> experts(static_cast<std::size_t>(rows));
    for (auto& e : experts) e = ed(rng);  // uniform routing (duplicates within a token do not matter here)
    auto gate_up = random_device(static_cast<std::size_t>(bench_e * 2 * bench_f * bench_d), 10, 0.05f);
    auto down = random_device(static_cast<std::size_t>(bench_e * bench_d * bench_f), 11, 0.05f);
    auto x = random_device(static_cast<std::size_t>(tokens * bench_d), 4, 1.0f);
    auto dexperts = fc::upload(experts);
    const fc::PermutePlan plan(rows, bench_e);
    fc::DeviceBuffer<unsigned char> pws(plan.workspace_bytes()),
        gws(fc::grouped_swiglu_workspace_bytes(rows, bench_e, bench_f));
    fc::DeviceBuffer<std::int32_t> sorted(static_cast<std::size_t>(rows)), offsets(static_cast<std::size_t>(bench_e + 1)),
        inverse(static_cast<std::size_t>(rows));
    fc::DeviceBuffer<bfloat16> xs(static_cast<std::size_t>(rows * bench_d)), y(static_cast<std::size_t>(rows * bench_d));
    fc::permute(plan, dexperts.data(), 0, pws.data(), {sorted.data(), offsets.data(), inverse.data()}, nullptr);
    fc::gather_rows(x.data(), sorted.data(), rows, bench_k, bench_d, xs.data(), nullptr);
    const fc::GroupedExpertWeights w{gate_up.data(), down.data(), bench_e, bench_d, bench_f};
    const double t = time_with_events(state, [&] {
        fc::grouped_swiglu(w, offsets.data(), xs.data(), rows, gws.data(), y.data(), nullptr);
    });

    // The dense pair: the same operands' sizes, one expert's weights standing in for all.
    fc::DeviceBuffer<bfloat16> h(static_cast<std::size_t>(rows * 2 * bench_f));
    fc::LtGemm lt;
    const double t_pair = time_events([&] {
        lt.nt(xs.data(), gate_up.data(), h.data(), fc::OutType::bf16, rows, 2 * bench_f, bench_d, nullptr);
        lt.nt(h.data(), down.data(), y.data(), fc::OutType::bf16, rows, bench_d, bench_f, nullptr);
    });
    const double flops = 6.0 * static_cast<double>(rows) * static_cast<double>(bench_d) * static_cast<double>(bench_f);
    set_tflops(state, flops, t);
    state.counters["cuBLASLt pair TFLOP/s"] = t_pair > 0.0 ? flops * 1e-12 / t_pair : 0.0;
    state.counters["vs cuBLASLt pair"] = t > 0.0 ? t_pair / t : 0.0;
}
BENCHMARK(BM_GroupedSwiGluTc)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// Decode attention, foe-1b's heads (8 query, 8 KV, head_dim 96), 32 sequences at full context.
void BM_DecodeAttention(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t ctx = state.range(0), batch = 32;
    const fc::DecodeAttentionShape s{batch, 8, 8, 96, ctx};
    const auto cache = static_cast<std::size_t>(batch * ctx * s.kv_heads * s.head_dim);
    auto q = random_device(static_cast<std::size_t>(batch * s.query_heads * s.head_dim), 7, 1.0f);
    auto k = random_device(cache, 8, 1.0f);
    auto v = random_device(cache, 9, 1.0f);
    std::vector<std::int32_t> slot(static_cast<std::size_t>(batch)), len(slot.size(), static_cast<std::int32_t>(ctx));
    for (std::size_t b = 0; b < slot.size(); ++b) slot[b] = static_cast<std::int32_t>(b);
    auto dslot = fc::upload(slot);
    auto dlen = fc::upload(len);
    fc::DeviceBuffer<unsigned char> ws(fc::decode_attention_workspace_bytes(s));
    fc::DeviceBuffer<bfloat16> out(static_cast<std::size_t>(batch * s.query_heads * s.head_dim));
    const double t = time_with_events(state, [&] {
        fc::decode_attention(s, q.data(), k.data(), v.data(), dslot.data(), dlen.data(), ws.data(), out.data(), nullptr);
    });
    state.counters["KV GB/s"] = t > 0.0 ? 2.0 * static_cast<double>(cache) * sizeof(bfloat16) * 1e-9 / t : 0.0;
}
BENCHMARK(BM_DecodeAttention)->Arg(2048)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
