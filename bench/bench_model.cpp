// The whole model on the host: time to first token (prefill of a prompt of P tokens, its logits
// included) and time per output token (one decode step after a prompt of 512), FoE against the
// same-size standard MoE, for the demo's foe-small / moe-small (4 layers, d 256). A 1B model's
// 8192-token prefill takes minutes on two cores; the per-layer costs of the paper's shapes are
// in bench_layers.
//
//   build/bench/bench_model --benchmark_counters_tabular=true

#include "bench_util.hpp"

namespace {

using bench::index_t;

std::shared_ptr<const foe::ModelWeights> weights_of(const char* name)
{
    return std::make_shared<const foe::ModelWeights>(foe::random_weights(foe::named_config(name), 2026));
}

std::vector<std::int32_t> prompt(index_t n, index_t vocab)
{
    std::vector<std::int32_t> p(static_cast<std::size_t>(n));
    const foe::CounterRng rng(1, 2);
    for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<std::int32_t>(rng.bits(i) % static_cast<std::uint64_t>(vocab));
    return p;
}

void time_to_first_token(benchmark::State& state, const char* name)
{
    const auto w = weights_of(name);
    const index_t p = state.range(0);
    foe::ModelOptions options;
    options.cache_capacity = p;
    const auto model = foe::make_model(w, options);
    const auto tokens = prompt(p, w->config.vocab_size);
    for (auto _ : state) {
        const auto logits = model->prefill(tokens);
        benchmark::DoNotOptimize(logits.data());
    }
    state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(p), benchmark::Counter::kIsIterationInvariantRate);
    const double head = 2.0 * static_cast<double>(p * w->config.hidden_size * w->config.vocab_size);
    bench::set_rates(state, static_cast<double>(w->config.num_hidden_layers) * bench::layer_flops(w->config, p) + head, 0);
}

void time_per_output_token(benchmark::State& state, const char* name)
{
    const auto w = weights_of(name);
    const index_t context = state.range(0);
    foe::ModelOptions options;
    options.cache_capacity = context + 1;
    const auto model = foe::make_model(w, options);
    (void)model->prefill(prompt(context, w->config.vocab_size));
    const std::int32_t next[1] = {7};
    for (auto _ : state) {  // the step at position `context`, again and again
        const auto logits = model->forward(foe::Batch::single(context, 1), next);
        benchmark::DoNotOptimize(logits.data());
    }
    const double head = 2.0 * static_cast<double>(w->config.hidden_size * w->config.vocab_size);
    bench::set_rates(state, static_cast<double>(w->config.num_hidden_layers) * bench::layer_flops(w->config, 1, context + 1) + head, 0);
}

void foe_ttft(benchmark::State& s, const char* n) { time_to_first_token(s, n); }
void moe_ttft(benchmark::State& s, const char* n) { time_to_first_token(s, n); }
void foe_tpot(benchmark::State& s, const char* n) { time_per_output_token(s, n); }
void moe_tpot(benchmark::State& s, const char* n) { time_per_output_token(s, n); }

void prompts(benchmark::internal::Benchmark* b)
{
    for (int p : {128, 512, 2048, 8192}) b->Arg(p);
    b->ArgName("P")->Unit(benchmark::kMillisecond)->UseRealTime();
}
void contexts(benchmark::internal::Benchmark* b) { b->Arg(512)->ArgName("context")->Unit(benchmark::kMillisecond)->UseRealTime(); }

}  // namespace

BENCHMARK_CAPTURE(foe_ttft, small, "foe-small")->Apply(prompts);
BENCHMARK_CAPTURE(moe_ttft, small, "moe-small")->Apply(prompts);
BENCHMARK_CAPTURE(foe_tpot, small, "foe-small")->Apply(contexts);
BENCHMARK_CAPTURE(moe_tpot, small, "moe-small")->Apply(contexts);

BENCHMARK_MAIN();
