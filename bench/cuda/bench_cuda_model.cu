// Google Benchmark suite of the CUDA backend's layers and model, timed with CUDA events:
//   - one foe-1b FoE layer (H = 8) and one moe-1b MoE layer (the same sizes, H = 1, global top-8)
//     on one GPU, prefill of one sequence of 128, 2048 and 16384 tokens, with cuBLASLt and with
//     foe's own tensor-core GEMM for the dense projections: the issue's "FoE and MoE on one GPU".
//     Both are the library's composed layers (FoeLayer / MoeLayer over the device policies), the
//     FoE one group-batched: its ratio to the MoE time is what H groups cost on one GPU;
//   - a decode step of a 4-layer foe-1b model (1 and 16 sequences at context 512), eager and
//     replayed from a CUDA graph: what graph capture saves in launch overhead.
// Without a CUDA device every benchmark is skipped with a message.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda_bench_util.hpp"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/model.cuh"
#include "foe/model/weights.hpp"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

namespace {

enum class Arch { foe, moe };

foe::ModelConfig layer_config(Arch arch, index_t layers)
{
    foe::ModelConfig c = foe::named_config(arch == Arch::foe ? "foe-1b" : "moe-1b");
    c.num_hidden_layers = layers;
    return c;
}

/// The device description of one sequence of `tokens` new tokens at positions [0, tokens).
struct OneSequence {
    fc::DeviceBuffer<std::int32_t> ints;
    fc::DeviceBatch batch;
    explicit OneSequence(index_t tokens)
    {
        const fc::BatchLayout layout(1, tokens);
        const foe::Batch one = foe::Batch::single(0, tokens);
        std::vector<std::int32_t> host(layout.size()), ids(static_cast<std::size_t>(tokens), 0);
        (void)layout.fill(one, ids, host);
        ints = fc::upload(host);
        batch = layout.view(ints.data(), one);
    }
};

template <Arch A, class Gemm>
void BM_LayerPrefill(benchmark::State& state)
{
    if (fc::bench::skip_without_device(state)) return;
    const index_t t = state.range(0);
    const foe::ModelConfig c = layer_config(A, 1);
    const foe::ModelWeights w = foe::random_weights(c, 1);
    foe::LayerOptions o;
    o.cache_capacity = t;
    o.max_tokens = t;
    using Attention = foe::attention::CudaGqaAttention<Gemm>;
    using Experts = foe::experts::CudaSwiGluExperts<Gemm>;
    using Layer = std::conditional_t<
        A == Arch::foe,
        foe::FoeLayer<Attention, foe::routing::CudaRouter<foe::routing::Softmax, foe::routing::PerGroupTopK, Gemm>,
                      Experts, foe::parallel::CudaLocalExperts, foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>,
        foe::MoeLayer<Attention, foe::routing::CudaRouter<foe::routing::Softmax, foe::routing::GlobalTopK, Gemm>,
                      Experts, foe::parallel::CudaLocalExperts>>;
    Layer layer(c, foe::layer_weights(w, 0), o);
    fc::DeviceBuffer<unsigned char> scratch_memory(layer.scratch_bytes());
    fc::Scratch scratch(scratch_memory.data(), scratch_memory.size());
    const fc::DeviceContext ctx{nullptr, &scratch};
    OneSequence seq(t);
    std::vector<bfloat16> x(static_cast<std::size_t>(t * c.hidden_size));
    std::mt19937_64 rng(2);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (auto& v : x) v = bfloat16(dist(rng));
    auto in = fc::upload(x);
    fc::DeviceBuffer<bfloat16> out(static_cast<std::size_t>(layer.streams()) * x.size());
    const index_t d = c.hidden_size;
    (void)fc::bench::time_with_events(state, [&] {
        layer.forward(seq.batch, foe::TensorView<const bfloat16, 3>(in.data(), {1, t, d}),
                      foe::TensorView<bfloat16, 3>(out.data(), {layer.streams(), t, d}), ctx);
    });
    state.counters["tokens"] = static_cast<double>(t);
    state.counters["groups_H"] = static_cast<double>(c.groups());
    state.counters["tok_per_s"] = benchmark::Counter(static_cast<double>(t), benchmark::Counter::kIsIterationInvariantRate);
    state.SetLabel(A == Arch::foe ? "FoE foe-1b layer" : "MoE moe-1b layer");
}

template <bool Graphs>
void BM_ModelDecodeStep(benchmark::State& state)
{
    if (fc::bench::skip_without_device(state)) return;
    const index_t sequences = state.range(0), context = 512;
    auto w = std::make_shared<const foe::ModelWeights>(foe::random_weights(layer_config(Arch::foe, 4), 3));
    fc::CudaModelOptions o;
    o.cache_slots = sequences;
    o.cache_capacity = context + 64;
    o.max_batch_tokens = context;
    o.cuda_graphs = Graphs;
    fc::CudaModel<> model(w, o);
    const std::vector<std::int32_t> prompt(static_cast<std::size_t>(context), 7);
    for (index_t s = 0; s < sequences; ++s) (void)model.prefill(prompt, s);
    std::vector<foe::SequenceChunk> chunks;
    std::vector<std::int32_t> ids(static_cast<std::size_t>(sequences), 11);
    auto step = [&] {
        chunks.clear();
        for (index_t s = 0; s < sequences; ++s) chunks.push_back({s, model.sequence_length(s), 1});
        return model.forward(foe::Batch(chunks), ids);
    };
    (void)step();  // warm-up, untimed: cuBLASLt heuristics, and the graph's capture
    for (auto _ : state) {
        chunks.clear();
        for (index_t s = 0; s < sequences; ++s) chunks.push_back({s, model.sequence_length(s), 1});
        if (model.sequence_length(0) >= o.cache_capacity) {
            state.SkipWithError("cache full: raise cache_capacity");
            break;
        }
        benchmark::DoNotOptimize(model.forward(foe::Batch(chunks), ids));  // wall time: host staging included
    }
    state.counters["sequences"] = static_cast<double>(sequences);
    state.SetLabel(Graphs ? "decode step, CUDA graph" : "decode step, eager launches");
}

}  // namespace

BENCHMARK(BM_LayerPrefill<Arch::foe, fc::LtGemm>)->Arg(128)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LayerPrefill<Arch::moe, fc::LtGemm>)->Arg(128)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LayerPrefill<Arch::foe, fc::TcGemm>)->Arg(128)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LayerPrefill<Arch::moe, fc::TcGemm>)->Arg(128)->Arg(2048)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ModelDecodeStep<false>)->Arg(1)->Arg(16)->Iterations(32)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ModelDecodeStep<true>)->Arg(1)->Arg(16)->Iterations(32)->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
