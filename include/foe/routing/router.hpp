#pragma once
// Router<Score, Selection>: the host routing policy.
//
//   logits = u W_gate^T          [T, E], one score vector over all experts
//   scores, keys = Score(logits, bias)
//   per held group h: the k/H experts of group h with the largest keys (Selection = PerGroupTopK)
//   or the k experts with the largest keys overall (Selection = GlobalTopK, H = 1)
//   weights = scores of the selected experts, renormalised per group when asked
//
// Weights are the scores of the selected experts; the keys only rank them (they differ only for
// a biased sigmoid).

#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/ops/gemm.hpp"
#include "foe/routing/routing.hpp"
#include "foe/routing/scores.hpp"
#include "foe/routing/topk.hpp"

namespace foe::routing {

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, gemm::GemmPolicy Gemm = gemm::Default>
class Router {
public:
    using backend = HostBackend;
    static constexpr bool per_group = Selection::per_group;
    using score_type = Score;
    using selection_type = Selection;

    Router(const RoutingSpec& spec, MatrixView<const float> gate, VectorView<const float> bias);

    /// Routes u [T, hidden]; out is resized (its storage reused across calls).
    void route(MatrixView<const float> u, RoutingResult& out);

    [[nodiscard]] const RoutingSpec& spec() const noexcept { return spec_; }

private:
    RoutingSpec spec_;
    MatrixView<const float> gate_;
    VectorView<const float> bias_;
    std::vector<float> logits_, scores_, keys_;
};

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, gemm::GemmPolicy Gemm>
Router<Score, Selection, Gemm>::Router(const RoutingSpec& spec, MatrixView<const float> gate, VectorView<const float> bias)
    : spec_(spec), gate_(gate), bias_(bias)
{
    const index_t e = spec.num_experts;
    detail::check_routing_spec(spec, per_group);
    require<InvalidArgument>(gate.extent(0) == e && gate.stride(1) == 1, "router gate weight is ",
                             format_shape(gate.shape()), ", expected [", e, ", hidden]");
    if (Score::uses_bias && !bias.empty())
        require<InvalidArgument>(bias.extent(0) == e && bias.stride(0) == 1, "router bias has ", bias.extent(0),
                                 " elements, expected ", e);
}

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, gemm::GemmPolicy Gemm>
void Router<Score, Selection, Gemm>::route(MatrixView<const float> u, RoutingResult& out)
{
    const index_t t = u.extent(0), e = spec_.num_experts;
    require(u.extent(1) == gate_.extent(1), "router input has ", u.extent(1), " features, the gate expects ",
            gate_.extent(1));
    const index_t per_group_k = spec_.top_k / spec_.groups, experts_per_group = e / spec_.groups;
    const index_t held = spec_.group_end - spec_.group_begin;

    out.tokens = t;
    out.slots_per_group = per_group_k;
    out.slots_per_token = held * per_group_k;
    out.group_begin = spec_.group_begin;
    out.experts.resize(static_cast<std::size_t>(t * out.slots_per_token));
    out.weights.resize(out.experts.size());
    logits_.resize(static_cast<std::size_t>(t * e));
    scores_.resize(logits_.size());
    keys_.resize(logits_.size());
    if (t == 0) return;

    Gemm::nt(u, gate_, MatrixView<float>(logits_.data(), {t, e}), false);
    const std::span<const float> bias = (Score::uses_bias && !bias_.empty())
                                            ? std::span<const float>(bias_.data(), static_cast<std::size_t>(e))
                                            : std::span<const float>{};
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < t; ++i) {
        const auto row = static_cast<std::size_t>(i * e);
        const std::span<float> scores(scores_.data() + row, static_cast<std::size_t>(e));
        const std::span<float> keys(keys_.data() + row, static_cast<std::size_t>(e));
        Score::apply(std::span<const float>(logits_.data() + row, static_cast<std::size_t>(e)), bias, scores, keys);
        for (index_t g = 0; g < held; ++g) {
            const index_t group = spec_.group_begin + g;
            const auto first = static_cast<std::size_t>(i * out.slots_per_token + g * per_group_k);
            const std::span<std::int32_t> picked(out.experts.data() + first, static_cast<std::size_t>(per_group_k));
            top_k(keys, group * experts_per_group, (group + 1) * experts_per_group, picked);
            float sum = 0.0f;
            for (index_t s = 0; s < per_group_k; ++s) {
                const float w = scores[static_cast<std::size_t>(picked[static_cast<std::size_t>(s)])];
                out.weights[first + static_cast<std::size_t>(s)] = w;
                sum += w;
            }
            if (spec_.renormalize)
                for (index_t s = 0; s < per_group_k; ++s) out.weights[first + static_cast<std::size_t>(s)] /= sum;
        }
    }
}

}  // namespace foe::routing

namespace foe::routing {
static_assert(RoutingPolicy<Router<Softmax, PerGroupTopK>>);
static_assert(RoutingPolicy<Router<Sigmoid, GlobalTopK>>);
}  // namespace foe::routing
