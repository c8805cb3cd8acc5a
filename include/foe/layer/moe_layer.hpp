#pragma once
// MoeLayer: the standard MoE transformer layer (OLMoE), composed from the same policies.
//
//   r  = x + Attn(RMSNorm_attn(x))                  all heads
//   u  = RMSNorm_moe(r)
//   I, w = top-k of Router(u) over all experts
//   x' = r + sum_{e in I} w[e] FFN_e(u)
// One stream in, one stream out: the FoE body (layer/layer_body.hpp) with one group whose residual
// needs no sync, so an FoeLayer with H = 1 computes the same bits (a test checks). Host or CUDA
// policies, like FoeLayer.

#include "foe/layer/backend_check.hpp"
#include "foe/layer/foe_layer.hpp"

namespace foe {

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel>
class MoeLayer
    : public detail::ComposedLayer<Attention, Routing, Experts, ExpertParallel,
                                   detail::OneStream<backend_of_t<Attention>>> {
    static_assert(detail::moe_policies_share_backend<Attention, Routing, Experts, ExpertParallel>);
    static_assert(parallel::ExpertParallelPolicy<ExpertParallel, Experts>,
                  "the expert-parallel policy cannot run these experts (parallel/expert_parallel.hpp)");
    using Base =
        detail::ComposedLayer<Attention, Routing, Experts, ExpertParallel, detail::OneStream<backend_of_t<Attention>>>;

public:
    /// The config must have one expert group (OlmoeForCausalLM, or FoE with H = 1).
    MoeLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options = {},
             ExpertParallel ep = {})
        : Base("MoE layer", detail::single_group(config, "MoeLayer"), weights, options, {}, std::move(ep))
    {
    }

    [[nodiscard]] static constexpr index_t streams() noexcept { return 1; }
    /// The layer's one attention instance (all heads).
    [[nodiscard]] const Attention& attention() const noexcept
    {
        if constexpr (detail::covers_groups<Attention>)
            return Base::attention();
        else
            return Base::attention(0);
    }
};

}  // namespace foe
