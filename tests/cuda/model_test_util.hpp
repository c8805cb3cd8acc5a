#pragma once
// Shared helpers of the CUDA model tests (test_cuda_model.cu, test_cuda_model_ep.cu): bf16
// weights, random token ids, and the comparison of a device model's logits with a reference
// model's that tolerates the rare token routed differently on bf16 activations.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/model/host_model.hpp"

namespace foe::cuda::testing {

/// Activations are bf16 on the device through every layer: a logit carries a few bf16 roundings
/// (2^-8 relative each) per layer. Measured as max |diff| / max |want| over a row's logits.
constexpr double model_tolerance = 4e-2;

/// Checks `dev`'s logits `got` against `ref`'s `want` ([rows, vocab]) row by row. A routing
/// decision between two nearly equal experts may go the other way on bf16 activations; a row whose
/// experts differ in some layer is then not comparable, so those rows are counted (they must be
/// rare) and skipped.
inline void check_logits_close(const foe::ModelInterface& ref, const foe::ModelInterface& dev,
                               const std::vector<float>& want, const std::vector<float>& got,
                               double tolerance = model_tolerance)
{
    const foe::index_t vocab = ref.config().vocab_size;
    REQUIRE(want.size() == got.size());
    const auto rows = static_cast<foe::index_t>(want.size()) / vocab;
    std::vector<bool> flipped(sz(rows), false);
    for (foe::index_t l = 0; l < ref.config().num_hidden_layers; ++l) {
        const auto& a = ref.last_routing(l);
        const auto& b = dev.last_routing(l);
        REQUIRE(a.tokens == b.tokens);
        REQUIRE(a.slots_per_token == b.slots_per_token);
        for (foe::index_t t = 0; t < a.tokens && t < rows; ++t) {
            std::vector<std::int32_t> x, y;
            for (foe::index_t s = 0; s < a.slots_per_token; ++s) {
                x.push_back(a.expert(t, s));
                y.push_back(b.expert(t, s));
            }
            std::sort(x.begin(), x.end());
            std::sort(y.begin(), y.end());
            if (x != y) flipped[sz(t)] = true;
        }
    }
    const auto flips = std::count(flipped.begin(), flipped.end(), true);
    CHECK_MESSAGE(flips <= rows / 10 + 1, flips, " of ", rows, " rows were routed differently");
    double scale = 0.0, worst = 0.0;
    for (float v : want) scale = std::max(scale, std::abs(static_cast<double>(v)));
    for (foe::index_t t = 0; t < rows; ++t) {
        if (flipped[sz(t)]) continue;
        for (foe::index_t j = 0; j < vocab; ++j) {
            const auto g = static_cast<double>(got[sz(t * vocab + j)]);
            worst = std::isfinite(g) ? std::max(worst, std::abs(g - static_cast<double>(want[sz(t * vocab + j)])))
                                     : std::numeric_limits<double>::infinity();
        }
    }
    CHECK(worst / scale < tolerance);
}

/// Seeded random weights, every value rounded to bf16 (what the device holds; the host model
/// reads the bf16 matrices as they are).
inline std::shared_ptr<const foe::ModelWeights> bf16_weights(const foe::ModelConfig& c, std::uint64_t seed)
{
    return std::make_shared<const foe::ModelWeights>(foe::stored_as(foe::random_weights(c, seed), foe::DType::bf16));
}

/// n token ids drawn uniformly from [0, vocab).
inline std::vector<std::int32_t> random_tokens(foe::index_t n, foe::index_t vocab, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(vocab - 1));
    std::vector<std::int32_t> t(sz(n));
    for (auto& v : t) v = d(rng);
    return t;
}

}  // namespace foe::cuda::testing
