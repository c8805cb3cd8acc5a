// FoE and standard-MoE layers on the host, side by side in one run: one prefill of T tokens
// (one sequence) through one layer of the foe-1b / moe-1b and foe-7b / moe-7b shapes. The
// FoE/MoE ratio per shape and T is computed from this run's JSON by bench/plot.py.
//
//   build/bench/bench_layers --benchmark_counters_tabular=true
//
// Counters: tokens/s, and FLOP/s of the layer's useful arithmetic (bench::layer_flops).

#include "bench_util.hpp"

namespace {

using bench::index_t;

template <class Layer>
void layer_prefill(benchmark::State& state, const char* config_name)
{
    const auto config = bench::one_layer(config_name);
    const index_t tokens = state.range(0), d = config.hidden_size;
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 1));
    foe::LayerOptions options;
    options.cache_capacity = tokens;
    Layer layer(config, foe::layer_weights(*weights, 0), options);
    const auto x = bench::random(static_cast<std::size_t>(layer.streams() * tokens * d), 2);
    std::vector<float> y(x.size());
    const foe::Batch batch = foe::Batch::single(0, tokens);
    for (auto _ : state) {
        layer.forward(batch, {x.data(), {layer.streams(), tokens, d}}, {y.data(), {layer.streams(), tokens, d}});
        benchmark::DoNotOptimize(y.data());
    }
    state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
    bench::set_rates(state, bench::layer_flops(config, tokens), 0);
}

// BENCHMARK_CAPTURE pastes the function name into identifiers: it needs plain names.
void foe_layer(benchmark::State& state, const char* config) { layer_prefill<foe::HostFoeLayer<>>(state, config); }
void moe_layer(benchmark::State& state, const char* config) { layer_prefill<foe::HostMoeLayer<>>(state, config); }

/// The paper's token counts that run in seconds on a CPU (up to 2048 for 1b, 512 for 7b).
void tokens_1b(benchmark::internal::Benchmark* b)
{
    for (int t : {1, 8, 128, 512, 1024, 2048}) b->Arg(t);
    b->ArgName("T")->Unit(benchmark::kMillisecond)->UseRealTime();
}
void tokens_7b(benchmark::internal::Benchmark* b)
{
    for (int t : {1, 8, 128, 512}) b->Arg(t);
    b->ArgName("T")->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK_CAPTURE(foe_layer, 1b, "foe-1b")->Apply(tokens_1b);
BENCHMARK_CAPTURE(moe_layer, 1b, "moe-1b")->Apply(tokens_1b);
BENCHMARK_CAPTURE(foe_layer, 7b, "foe-7b")->Apply(tokens_7b);
BENCHMARK_CAPTURE(moe_layer, 7b, "moe-7b")->Apply(tokens_7b);

BENCHMARK_MAIN();
