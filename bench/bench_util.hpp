#pragma once
// Shared pieces of foe's host benchmarks: random data, FLOP counts, and counters.

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "foe/foe.hpp"

namespace bench {

using foe::index_t;

/// Random floats in [-1, 1).
inline std::vector<float> random(std::size_t n, std::uint64_t seed)
{
    std::vector<float> v(n);
    foe::CounterRng(seed, 17).fill_uniform(v, -1.0f, 1.0f);
    return v;
}

/// A named config cut to one layer with a small vocabulary: a layer benchmark needs neither the
/// other layers' weights nor the embedding (foe-7b's 16 layers would be 27 GB of fp32).
inline foe::ModelConfig one_layer(const char* name)
{
    foe::ModelConfig c = foe::named_config(name);
    c.num_hidden_layers = 1;
    c.vocab_size = 256;
    return c;
}

/// FLOP/s and bytes/s counters, per iteration.
inline void set_rates(benchmark::State& state, double flops, double bytes)
{
    if (flops > 0) state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
    if (bytes > 0) state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

/// Useful arithmetic of one layer on T tokens of one sequence: projections, causal attention
/// (q k^T and p v), router, and the k selected SwiGLU experts of every token.
inline double layer_flops(const foe::ModelConfig& c, index_t tokens, index_t context = 0)
{
    const double t = static_cast<double>(tokens), d = static_cast<double>(c.hidden_size);
    const double qw = static_cast<double>(c.q_width()), kw = static_cast<double>(c.kv_width());
    const double projections = 2.0 * t * d * (qw + 2.0 * kw) + 2.0 * t * qw * d;
    const double keys = context > 0 ? t * static_cast<double>(context) : t * (t + 1.0) / 2.0;
    const double attention = 2.0 * 2.0 * keys * qw;
    const double router = 2.0 * t * d * static_cast<double>(c.num_experts);
    const double experts = 2.0 * t * static_cast<double>(c.num_experts_per_tok) * 3.0 * d *
                           static_cast<double>(c.intermediate_size);
    return projections + attention + router + experts;
}

}  // namespace bench
