// FoE and standard-MoE layers on the host, side by side in one run: one prefill of T tokens
// through one layer of the same shape (the foe-small/moe-small and foe-1b/moe-1b configs).
//
//   cmake -S . -B build -DFOE_BUILD_BENCHMARKS=ON && cmake --build build --target bench_layers
//   build/bench/bench_layers --benchmark_counters_tabular=true
//
// Counters: tokens/s, and FLOP/s from the layer's useful arithmetic (projections, attention
// scores and values, router, the k selected experts per token).

#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <vector>

#include "foe/foe.hpp"

namespace {

double layer_flops(const foe::ModelConfig& c, foe::index_t tokens)
{
    const double t = static_cast<double>(tokens), d = static_cast<double>(c.hidden_size);
    const double qw = static_cast<double>(c.q_width()), kw = static_cast<double>(c.kv_width());
    const double projections = 2.0 * t * d * (qw + 2.0 * kw) + 2.0 * t * qw * d;
    const double attention = 2.0 * 2.0 * (t * (t + 1) / 2.0) * qw;  // causal q k^T and p v
    const double router = 2.0 * t * d * static_cast<double>(c.num_experts);
    const double experts = 2.0 * t * static_cast<double>(c.num_experts_per_tok) * 3.0 * d *
                           static_cast<double>(c.intermediate_size);
    return projections + attention + router + experts;
}

template <class Layer>
void bench_layer(benchmark::State& state, const char* config_name)
{
    const auto config = foe::named_config(config_name);
    const foe::index_t tokens = state.range(0), d = config.hidden_size;
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 1));
    foe::LayerOptions options;
    options.cache_capacity = tokens;
    Layer layer(config, foe::layer_weights(*weights, 1), options);
    std::vector<float> x(static_cast<std::size_t>(layer.streams() * tokens * d));
    foe::CounterRng(2, 3).fill_uniform(x, -1.0f, 1.0f);
    std::vector<float> y(x.size());
    const foe::Batch batch = foe::Batch::single(0, tokens);
    for (auto _ : state) {
        layer.forward(batch, {x.data(), {layer.streams(), tokens, d}}, {y.data(), {layer.streams(), tokens, d}});
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["FLOP/s"] = benchmark::Counter(layer_flops(config, tokens), benchmark::Counter::kIsIterationInvariantRate);
}

void token_counts(benchmark::internal::Benchmark* b)
{
    for (int t : {1, 8, 128, 512}) b->Arg(t);
    b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

// BENCHMARK_CAPTURE pastes the function name into identifiers: it needs plain names.
void foe_layer(benchmark::State& state, const char* config) { bench_layer<foe::HostFoeLayer<>>(state, config); }
void moe_layer(benchmark::State& state, const char* config) { bench_layer<foe::HostMoeLayer<>>(state, config); }

BENCHMARK_CAPTURE(foe_layer, small, "foe-small")->Apply(token_counts);
BENCHMARK_CAPTURE(moe_layer, small, "moe-small")->Apply(token_counts);
BENCHMARK_CAPTURE(foe_layer, 1b, "foe-1b")->Apply(token_counts);
BENCHMARK_CAPTURE(moe_layer, 1b, "moe-1b")->Apply(token_counts);

BENCHMARK_MAIN();
