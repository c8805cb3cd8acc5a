#pragma once
// Score functions of the router.

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>

#include "foe/routing/routing.hpp"

namespace foe::routing {

/// Softmax over all experts (OLMoE, Mixtral); the selection ranks the probabilities themselves.
struct Softmax {
    static constexpr bool uses_bias = false;
    static void apply(std::span<const float> logits, std::span<const float> /*bias*/, std::span<float> scores,
                      std::span<float> keys)
    {
        // A NaN logit (a broken input) gets score 0 and a NaN key, which top_k ranks last: one bad
        // expert must not turn every other expert's score into NaN.
        float max_logit = -std::numeric_limits<float>::infinity();
        for (float l : logits)
            if (!std::isnan(l)) max_logit = std::max(max_logit, l);
        double sum = 0.0;
        for (std::size_t e = 0; e < logits.size(); ++e) {
            scores[e] = std::isnan(logits[e]) ? 0.0f : std::exp(logits[e] - max_logit);
            sum += scores[e];
        }
        const float inv = sum > 0.0 ? static_cast<float>(1.0 / sum) : 0.0f;
        for (std::size_t e = 0; e < logits.size(); ++e) {
            scores[e] *= inv;
            keys[e] = std::isnan(logits[e]) ? logits[e] : scores[e];
        }
    }
};
static_assert(ScoreFunctionPolicy<Softmax>);

/// Independent sigmoid per expert (DeepSeek-V3): the weights are the sigmoids, the selection
/// ranks sigmoid + bias, where the bias (model.layers.{l}.mlp.gate.e_score_correction_bias)
/// steers load balance without changing the weights.
struct Sigmoid {
    static constexpr bool uses_bias = true;
    static void apply(std::span<const float> logits, std::span<const float> bias, std::span<float> scores,
                      std::span<float> keys)
    {
        for (std::size_t e = 0; e < logits.size(); ++e) {
            scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
            keys[e] = bias.empty() ? scores[e] : scores[e] + bias[e];
        }
    }
};
static_assert(ScoreFunctionPolicy<Sigmoid>);

}  // namespace foe::routing
