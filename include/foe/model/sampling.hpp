#pragma once
// Choosing the next token from a row of logits: greedy, or sampled with temperature, top-k and
// top-p (nucleus), seeded and reproducible.
//
//   Sampler s({.temperature = 0.8, .top_k = 40, .top_p = 0.95, .seed = 7});
//   std::int32_t next = s.next(logits);   // draw n of the sequence uses counter n of the seed
//
// Greedy (temperature 0, or top_k 1) takes the largest logit, ties toward the lower id, as
// ModelInterface::generate does. Sampling follows the order transformers' and llama.cpp's
// samplers use: the top_k largest logits (ties toward the lower id), then the smallest prefix of
// them whose probabilities at the temperature add up to top_p, renormalised, then one draw. The
// draw is a pure function of (seed, draw index): the same seed and logits give the same tokens
// on every run, thread count and rank. A NaN logit is never chosen while a number is there.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/rng.hpp"
#include "foe/core/types.hpp"

namespace foe {

struct SamplingOptions {
    double temperature = 0.0;  ///< 0: greedy
    index_t top_k = 0;         ///< keep the k largest logits; 0: all
    double top_p = 1.0;        ///< keep the smallest set of tokens whose probability reaches top_p; 1: all
    std::uint64_t seed = 0;

    /// InvalidArgument naming the value unless temperature is finite and >= 0, top_k >= 0 and
    /// top_p is in (0, 1].
    void validate() const
    {
        require(std::isfinite(temperature) && temperature >= 0.0, "sampling temperature (", temperature,
                ") must be a finite number >= 0 (0 is greedy)");
        require(top_k >= 0, "sampling top_k (", top_k, ") must be >= 0 (0 keeps every token)");
        require(std::isfinite(top_p) && top_p > 0.0 && top_p <= 1.0, "sampling top_p (", top_p,
                ") must be in (0, 1] (1 keeps every token)");
    }
    [[nodiscard]] bool greedy() const noexcept { return temperature == 0.0 || top_k == 1; }
};

/// The index of the largest logit, ties toward the lower index; a NaN ranks below every number.
[[nodiscard]] inline std::int32_t argmax(std::span<const float> logits)
{
    require(!logits.empty(), "argmax of an empty row of logits");
    std::size_t best = 0;
    for (std::size_t i = 1; i < logits.size(); ++i)
        if (logits[i] > logits[best] || (std::isnan(logits[best]) && !std::isnan(logits[i]))) best = i;
    return static_cast<std::int32_t>(best);
}

class Sampler {
public:
    explicit Sampler(const SamplingOptions& options = {}) : options_(options) { options_.validate(); }

    [[nodiscard]] const SamplingOptions& options() const noexcept { return options_; }

    /// The next token for this row of logits; each call is the next draw of the seed's stream.
    [[nodiscard]] std::int32_t next(std::span<const float> logits)
    {
        const std::uint64_t draw = draws_++;
        if (options_.greedy()) return argmax(logits);
        require(!logits.empty(), "sampling from an empty row of logits");

        // Candidates by logit, largest first, ties toward the lower id, NaNs last.
        const auto n = logits.size();
        const auto k = options_.top_k > 0 ? std::min(n, static_cast<std::size_t>(options_.top_k)) : n;
        order_.resize(n);
        std::iota(order_.begin(), order_.end(), 0u);
        const auto before = [&](std::uint32_t a, std::uint32_t b) {
            const bool nan_a = std::isnan(logits[a]), nan_b = std::isnan(logits[b]);
            if (nan_a != nan_b) return nan_b;  // numbers before NaNs
            if (!nan_a && logits[a] != logits[b]) return logits[a] > logits[b];
            return a < b;
        };
        std::partial_sort(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k), order_.end(), before);
        order_.resize(k);
        if (std::isnan(logits[order_.front()])) return static_cast<std::int32_t>(order_.front());

        // Probabilities at the temperature, in double, relative to the largest logit.
        const double top = logits[order_.front()];
        probs_.resize(k);
        double total = 0.0;
        for (std::size_t i = 0; i < k; ++i) {
            const float x = logits[order_[i]];
            probs_[i] = std::isnan(x) ? 0.0 : std::exp((static_cast<double>(x) - top) / options_.temperature);
            total += probs_[i];
        }
        // top-p: the smallest prefix whose probability reaches top_p (at least one token).
        std::size_t keep = k;
        if (options_.top_p < 1.0) {
            double sum = 0.0;
            for (std::size_t i = 0; i < k; ++i) {
                sum += probs_[i] / total;
                if (sum >= options_.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        double kept = 0.0;
        for (std::size_t i = 0; i < keep; ++i) kept += probs_[i];
        // One uniform draw in [0, 1) with 53 bits, from (seed, draw).
        const double u = static_cast<double>(CounterRng(options_.seed, 0x5a3b1e).bits(draw) >> 11) * 0x1.0p-53;
        double acc = 0.0;
        const double target = u * kept;
        for (std::size_t i = 0; i < keep; ++i) {
            acc += probs_[i];
            if (target < acc) return static_cast<std::int32_t>(order_[i]);
        }
        return static_cast<std::int32_t>(order_[keep - 1]);  // u * kept rounded up to the total
    }

private:
    SamplingOptions options_;
    std::uint64_t draws_ = 0;
    std::vector<std::uint32_t> order_;
    std::vector<double> probs_;
};

}  // namespace foe
