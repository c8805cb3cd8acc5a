#pragma once
// SwiGluExperts: the host experts policy. FFN_e(u) = down_e( silu(gate_e u) * (up_e u) ).
//
// Tokens are grouped by expert (a counting sort of the (token, slot) pairs, stable, so the
// grouping is deterministic), each expert runs three dense GEMMs over its rows, and the outputs
// are scattered back to the (token, slot) rows of y.

#include <cmath>
#include <cstdint>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/experts/experts.hpp"
#include "foe/experts/permute.hpp"
#include "foe/ops/gemm.hpp"

namespace foe::experts {

/// silu(x) = x * sigmoid(x), as torch.nn.SiLU.
[[nodiscard]] inline float silu(float x) noexcept { return x / (1.0f + std::exp(-x)); }

template <gemm::GemmPolicy Gemm = gemm::Default>
class SwiGluExperts {
public:
    using backend = HostBackend;

    SwiGluExperts(const ExpertsSpec& spec, std::vector<ExpertWeights> weights);

    void compute(MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y);

    static void combine(const routing::RoutingResult& r, MatrixView<const float> y, MatrixView<const float> residual,
                        index_t first_slot, index_t slot_count, MatrixView<float> out);

    [[nodiscard]] const ExpertsSpec& spec() const noexcept { return spec_; }
    /// Rows each held expert received in the last compute(), for load statistics.
    [[nodiscard]] const std::vector<index_t>& tokens_per_expert() const noexcept { return counts_; }

private:
    ExpertsSpec spec_;
    std::vector<ExpertWeights> w_;
    Permutation by_expert_;        // (token * slots + slot) rows grouped by expert
    std::vector<index_t> counts_;
    std::vector<float> x_, gate_, up_, out_;
};
static_assert(ExpertsPolicy<SwiGluExperts<>>);

// ---------------------------------------------------------------------------------------------

template <gemm::GemmPolicy Gemm>
SwiGluExperts<Gemm>::SwiGluExperts(const ExpertsSpec& spec, std::vector<ExpertWeights> weights)
    : spec_(spec), w_(std::move(weights))
{
    detail::check_expert_weights(spec_, w_);
}

template <gemm::GemmPolicy Gemm>
void SwiGluExperts<Gemm>::compute(MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y)
{
    const index_t d = spec_.hidden_size, f = spec_.intermediate_size;
    const index_t held = spec_.expert_end - spec_.expert_begin, pairs = r.tokens * r.slots_per_token;
    require(u.extent(0) == r.tokens && u.extent(1) == d, "experts input is ", format_shape(u.shape()), ", expected [",
            r.tokens, ", ", d, "]");
    require(y.extent(0) == pairs && y.extent(1) == d, "experts output is ", format_shape(y.shape()), ", expected [",
            pairs, ", ", d, "]");

    // (token, slot) pairs grouped by held expert, in row order within each expert.
    group_rows(pairs, held, [&](index_t p) { return r.experts[static_cast<std::size_t>(p)] - spec_.expert_begin; }, by_expert_);
    counts_.resize(static_cast<std::size_t>(held));
    for (index_t e = 0; e < held; ++e) counts_[static_cast<std::size_t>(e)] = by_expert_.count(e);

    for (index_t e = 0; e < held; ++e) {
        const index_t n = counts_[static_cast<std::size_t>(e)];
        if (n == 0) continue;
        const index_t* rows = by_expert_.begin(e);
        x_.resize(static_cast<std::size_t>(n * d));
        gate_.resize(static_cast<std::size_t>(n * f));
        up_.resize(gate_.size());
        out_.resize(x_.size());
        for (index_t i = 0; i < n; ++i) std::copy_n(&u(rows[i] / r.slots_per_token, 0), d, &x_[static_cast<std::size_t>(i * d)]);

        const MatrixView<const float> x(x_.data(), {n, d});
        const MatrixView<float> g(gate_.data(), {n, f}), up(up_.data(), {n, f});
        gemm::nt<Gemm>(x, w_[static_cast<std::size_t>(e)].gate_proj, g, false);
        gemm::nt<Gemm>(x, w_[static_cast<std::size_t>(e)].up_proj, up, false);
        for (std::size_t i = 0; i < gate_.size(); ++i) gate_[i] = silu(gate_[i]) * up_[i];
        gemm::nt<Gemm>(MatrixView<const float>(gate_.data(), {n, f}), w_[static_cast<std::size_t>(e)].down_proj,
                 MatrixView<float>(out_.data(), {n, d}), false);
        for (index_t i = 0; i < n; ++i) std::copy_n(&out_[static_cast<std::size_t>(i * d)], d, &y(rows[i], 0));
    }
}

template <gemm::GemmPolicy Gemm>
void SwiGluExperts<Gemm>::combine(const routing::RoutingResult& r, MatrixView<const float> y,
                                  MatrixView<const float> residual, index_t first_slot, index_t slot_count,
                                  MatrixView<float> out)
{
    const index_t t = r.tokens, d = residual.extent(1), slots = r.slots_per_token;
    require(first_slot >= 0 && slot_count >= 0 && first_slot + slot_count <= slots, "combine slots [", first_slot,
            ", ", first_slot + slot_count, ") are outside the ", slots, " slots per token");
    require(residual.extent(0) == t && out.extent(0) == t && out.extent(1) == d && y.extent(0) == t * slots &&
                y.extent(1) == d,
            "combine shapes disagree with the routing of ", t, " tokens of width ", d, ": y is ",
            format_shape(y.shape()), ", residual ", format_shape(residual.shape()), ", out ", format_shape(out.shape()));
    require(y.stride(1) == 1 && residual.stride(1) == 1 && out.stride(1) == 1, "combine needs unit-stride rows");
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < t; ++i) {
        float* o = &out(i, 0);
        const float* res = &residual(i, 0);
        for (index_t j = 0; j < d; ++j) o[j] = res[j];
        for (index_t s = first_slot; s < first_slot + slot_count; ++s) {
            const float w = r.weight(i, s);
            const float* ys = &y(i * slots + s, 0);
            for (index_t j = 0; j < d; ++j) o[j] += w * ys[j];
        }
    }
}

}  // namespace foe::experts
