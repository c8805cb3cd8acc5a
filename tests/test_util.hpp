#pragma once
// Shared helpers of foe's tests: small configurations and seeded random inputs.

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "foe/foe.hpp"

// The tests that compare results bit for bit (batch against alone, thread counts, twins, FoE with
// H = 1 against MoE) rely on it: models and layers built without naming a GEMM policy use foe's
// batch-invariant GEMM. Tests of the Cblas policy name it and assert a tolerance instead.
static_assert(std::is_same_v<foe::gemm::Default, foe::gemm::BatchInvariant>,
              "the exact-equality tests assume the default GEMM policy is foe::gemm::BatchInvariant");

namespace test {

/// The tiny test shape with H groups and the given policies (GQA: 8 query heads, 4 KV heads).
inline foe::ModelConfig tiny(foe::Architecture arch = foe::Architecture::foe, foe::index_t groups = 4,
                             foe::ScoreFunction score = foe::ScoreFunction::softmax,
                             foe::QkNorm qk = foe::QkNorm::per_head, bool renormalize = false)
{
    foe::ModelConfig c = foe::named_config(arch == foe::Architecture::foe ? "foe-tiny" : "moe-tiny");
    if (arch == foe::Architecture::foe) {
        c.num_expert_groups = groups;
        c.scoring_func = score;
        c.qk_norm = qk;
    }
    c.norm_topk_prob = renormalize;
    c.validate();
    return c;
}

inline std::shared_ptr<const foe::ModelWeights> weights(const foe::ModelConfig& c, std::uint64_t seed = 7)
{
    return std::make_shared<const foe::ModelWeights>(foe::random_weights(c, seed));
}

/// Random floats in [-1, 1): never zeros, never a pattern.
inline std::vector<float> random_floats(std::size_t n, std::uint64_t seed)
{
    std::vector<float> v(n);
    foe::CounterRng(seed, 0xabcdef).fill_uniform(v, -1.0f, 1.0f);
    return v;
}

/// Random token ids in [0, vocab).
inline std::vector<std::int32_t> random_tokens(std::size_t n, foe::index_t vocab, std::uint64_t seed)
{
    std::vector<std::int32_t> t(n);
    const foe::CounterRng rng(seed, 0x70c3);
    for (std::size_t i = 0; i < n; ++i) t[i] = static_cast<std::int32_t>(rng.bits(i) % static_cast<std::uint64_t>(vocab));
    return t;
}

}  // namespace test
