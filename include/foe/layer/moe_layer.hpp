#pragma once
// MoeLayer: the standard MoE transformer layer (OLMoE), composed from the same policies.
//
//   r  = x + Attn(RMSNorm_attn(x))                  all heads
//   u  = RMSNorm_moe(r)
//   I, w = top-k of Router(u) over all experts
//   x' = r + sum_{e in I} w[e] FFN_e(u)
// One stream in, one stream out. An FoeLayer with H = 1 computes the same bits (a test checks).

#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"
#include "foe/layer/backend_check.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe {

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
class MoeLayer {
    static_assert(detail::moe_policies_share_backend<Attention, Routing, Experts, ExpertParallel>);

public:
    using backend = backend_of_t<Attention>;
    using attention_type = Attention;
    using routing_type = Routing;
    using experts_type = Experts;
    using expert_parallel_type = ExpertParallel;

    /// The config must have one expert group (OlmoeForCausalLM, or FoE with H = 1).
    MoeLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options = {},
             ExpertParallel ep = {});

    /// in, out: [1, T, d], T = batch.tokens(); they must not overlap.
    void forward(const Batch& batch, TensorView<const float, 3> in, TensorView<float, 3> out);

    [[nodiscard]] static constexpr index_t streams() noexcept { return 1; }
    [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
    [[nodiscard]] const Attention& attention() const noexcept { return attention_; }
    [[nodiscard]] const routing::RoutingResult& last_routing() const noexcept { return routing_result_; }

private:
    ModelConfig config_;
    VectorView<const float> post_norm_;
    Attention attention_;
    Routing router_;
    Experts experts_;
    ExpertParallel ep_;
    routing::RoutingResult routing_result_;
    std::vector<float> residual_, normed_, expert_out_;
};

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
MoeLayer<Attention, Routing, Experts, ExpertParallel>::MoeLayer(const ModelConfig& config, const LayerWeights& weights,
                                                                const LayerOptions& options, ExpertParallel ep)
    : config_(detail::single_group(config, "MoeLayer")),
      post_norm_(weights.post_norm),
      attention_(attention::AttentionSpec::for_group(config, options, detail::cache_capacity(config, options)),
                 group_attention_weights(config, weights, 0)),
      router_(routing::RoutingSpec{config.num_experts, config.num_experts_per_tok, 1, 0, 1, config.norm_topk_prob},
              weights.gate, weights.gate_bias),
      experts_(detail::held_experts(config, options, 0, 1), expert_range(weights, detail::held_experts(config, options, 0, 1))),
      ep_(std::move(ep))
{
    require<InvalidArgument>(post_norm_.extent(0) == config.hidden_size, "post_attention_layernorm has ",
                             post_norm_.extent(0), " elements, expected hidden_size ", config.hidden_size);
}

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
void MoeLayer<Attention, Routing, Experts, ExpertParallel>::forward(const Batch& batch, TensorView<const float, 3> in,
                                                                    TensorView<float, 3> out)
{
    const index_t t = batch.tokens(), d = config_.hidden_size;
    require(in.shape() == std::array<index_t, 3>{1, t, d} && out.shape() == in.shape(), "MoE layer input is ",
            format_shape(in.shape()), " and output ", format_shape(out.shape()), ", expected [1, ", t, ", ", d, "]");
    const auto x = in[0];

    residual_.resize(static_cast<std::size_t>(t * d));
    normed_.resize(residual_.size());
    const MatrixView<float> r(residual_.data(), {t, d}), u(normed_.data(), {t, d});
    attention_.forward(batch, x, r);
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < t; ++i)
        for (index_t j = 0; j < d; ++j) r(i, j) += x(i, j);
    ops::rms_norm(r, post_norm_, static_cast<float>(config_.rms_norm_eps), u);

    router_.route(u, routing_result_);
    const index_t slots = routing_result_.slots_per_token;
    expert_out_.resize(static_cast<std::size_t>(t * slots * d));
    const MatrixView<float> y(expert_out_.data(), {t * slots, d});
    ep_.run(experts_, u, routing_result_, y);
    parallel::combine<Experts>(ep_, routing_result_, y, r, 0, slots, out[0]);
}

}  // namespace foe
