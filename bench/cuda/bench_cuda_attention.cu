// Google Benchmark suite of foe's device attention, timed with CUDA events (manual time):
//   - causal prefill attention (tensor-core kernel, head_dim 96) of one sequence of 2048 and 16384
//     tokens, for one foe-1b group (1 query head, 1 KV head: 8 + 8 heads over H = 8 groups) and
//     for the whole foe-1b layer (8 query heads, 8 KV heads); TFLOP/s counts the causal FLOPs
//     2 * 2 * heads * head_dim * T (T + 1) / 2 (QK^T and PV over the unmasked half);
//   - decode through the attention() dispatcher (split-KV), 32 sequences at contexts 2048 and 8192;
//   - the KV-cache append of 2048 and 16384 tokens from a fused qkv buffer.
// Without a CUDA device every benchmark is skipped with a message.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_bench_util.hpp"
#include "foe/attention/kv_append.cuh"
#include "foe/attention/prefill_attention.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;
using namespace foe::cuda::bench;

namespace {

constexpr index_t bench_head_dim = 96;  // foe-1b

/// A ragged batch on the device: sequence b brings new[b] tokens after starts[b] cached ones, in slot b.
struct BatchOnDevice {
    fc::DeviceBuffer<std::int32_t> row_offsets, slots, starts, lengths, token_slots, positions;
    fc::DeviceBatch view;

    BatchOnDevice(const std::vector<index_t>& start, const std::vector<index_t>& fresh)
    {
        std::vector<std::int32_t> ro{0}, sl, st, le, ts, po;
        index_t max_new = 0;
        for (std::size_t b = 0; b < start.size(); ++b) {
            sl.push_back(static_cast<std::int32_t>(b));
            st.push_back(static_cast<std::int32_t>(start[b]));
            le.push_back(static_cast<std::int32_t>(start[b] + fresh[b]));
            for (index_t i = 0; i < fresh[b]; ++i) {
                ts.push_back(static_cast<std::int32_t>(b));
                po.push_back(static_cast<std::int32_t>(start[b] + i));
            }
            ro.push_back(ro.back() + static_cast<std::int32_t>(fresh[b]));
            max_new = std::max(max_new, fresh[b]);
        }
        row_offsets = fc::upload(ro);
        slots = fc::upload(sl);
        starts = fc::upload(st);
        lengths = fc::upload(le);
        token_slots = fc::upload(ts);
        positions = fc::upload(po);
        view = fc::DeviceBatch{row_offsets.data(),
                               slots.data(),
                               starts.data(),
                               lengths.data(),
                               token_slots.data(),
                               positions.data(),
                               static_cast<index_t>(start.size()),
                               static_cast<index_t>(ts.size()),
                               max_new};
    }
};

/// Prefill of one sequence of `tokens` tokens from position 0 (its keys already in the cache).
void BM_PrefillAttention(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t tokens = state.range(0), nq = state.range(1), nkv = state.range(2), hd = bench_head_dim;
    const fc::AttentionShape s{nq, nkv, hd, tokens};
    auto q = random_device(static_cast<std::size_t>(tokens * nq * hd), 1, 1.0f);
    auto k = random_device(static_cast<std::size_t>(nkv * tokens * hd), 2, 1.0f);
    auto v = random_device(static_cast<std::size_t>(nkv * tokens * hd), 3, 1.0f);
    fc::DeviceBuffer<bfloat16> out(static_cast<std::size_t>(tokens * nq * hd));
    const BatchOnDevice batch({0}, {tokens});
    const double t = time_with_events(state, [&] {
        fc::prefill_attention(s, batch.view, q.data(), nq * hd, k.data(), v.data(), out.data(), nullptr);
    });
    const auto T = static_cast<double>(tokens);
    set_tflops(state, 2.0 * 2.0 * static_cast<double>(nq * hd) * T * (T + 1.0) / 2.0, t);
}
BENCHMARK(BM_PrefillAttention)
    ->ArgNames({"tokens", "q_heads", "kv_heads"})
    ->Args({2048, 1, 1})
    ->Args({16384, 1, 1})
    ->Args({2048, 8, 8})
    ->Args({16384, 8, 8})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// A decode step through attention(): 32 sequences, each one token at position context - 1.
void BM_AttentionDecode(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t ctx = state.range(0), batch = 32, nq = 8, nkv = 8, hd = bench_head_dim;
    const fc::AttentionShape s{nq, nkv, hd, ctx};
    const auto cache = static_cast<std::size_t>(batch * nkv * ctx * hd);
    auto q = random_device(static_cast<std::size_t>(batch * nq * hd), 4, 1.0f);
    auto k = random_device(cache, 5, 1.0f);
    auto v = random_device(cache, 6, 1.0f);
    const BatchOnDevice b(std::vector<index_t>(static_cast<std::size_t>(batch), ctx - 1),
                          std::vector<index_t>(static_cast<std::size_t>(batch), 1));
    fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(s, batch));
    fc::DeviceBuffer<bfloat16> out(static_cast<std::size_t>(batch * nq * hd));
    const double t = time_with_events(state, [&] {
        fc::attention(s, b.view, q.data(), nq * hd, k.data(), v.data(), ws.data(), out.data(), nullptr);
    });
    state.counters["KV GB/s"] = t > 0.0 ? 2.0 * static_cast<double>(cache) * sizeof(bfloat16) * 1e-9 / t : 0.0;
}
BENCHMARK(BM_AttentionDecode)->ArgName("context")->Arg(2048)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// append_kv of one sequence's tokens (8 KV heads of 96) from a fused qkv buffer.
void BM_AppendKv(benchmark::State& state)
{
    if (skip_without_device(state)) return;
    const index_t tokens = state.range(0), nq = 8, nkv = 8, hd = bench_head_dim, stride = (nq + 2 * nkv) * hd;
    auto qkv = random_device(static_cast<std::size_t>(tokens * stride), 7, 1.0f);
    fc::DeviceBuffer<bfloat16> k(static_cast<std::size_t>(nkv * tokens * hd)), v(k.size());
    const BatchOnDevice batch({0}, {tokens});
    const double t = time_with_events(state, [&] {
        fc::append_kv(batch.view, qkv.data() + nq * hd, qkv.data() + (nq + nkv) * hd, stride, nkv, hd, tokens, k.data(),
                      v.data(), nullptr);
    });
    // Read k and v, write them: 4 bytes moved per bf16 element of each.
    state.counters["GB/s"] = t > 0.0 ? 2.0 * 2.0 * static_cast<double>(k.bytes()) * 1e-9 / t : 0.0;
}
BENCHMARK(BM_AppendKv)->ArgName("tokens")->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
