#pragma once
// MoeHeadParallelLayer: the second standard-MoE baseline, head-parallel (tensor-parallel)
// attention followed by expert parallelism, over P ranks (Megatron's TP + EP pattern):
//
//   a_p = Attn over rank p's share of the KV heads (and their query heads, o_proj columns)
//   a   = all_reduce_sum(a_p)              every rank has every token's attention output
//   r   = x + a
//   rank p takes its slice of the tokens, routes it (global top-k) and runs the experts through
//   ExpertParallel (all-to-all over all ranks), x' = r + sum w FFN(u) for its slice
//   all_gather of the slices: every rank has x' for every token (the next layer's attention
//   needs them all)
//
// Per layer that is one all-reduce, two all-to-alls and one all-gather, against FoE's one
// all-reduce. One stream in, one out; every rank holds every token's KV for its heads.

#include <algorithm>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/comm/comm.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe {

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
class MoeHeadParallelLayer {
    static_assert(detail::moe_policies_share_backend<Attention, Routing, Experts, ExpertParallel> &&
                  detail::policy_on_backend<detail::PolicyKind::communicator, C, backend_of_t<Attention>>::value);

public:
    using backend = backend_of_t<Attention>;

    /// comm joins the P ranks sharing the heads; options' expert range says which experts this
    /// rank holds (and ExpertParallel must agree).
    MoeHeadParallelLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options, C comm,
                         ExpertParallel ep);

    /// in, out: [1, T, d] with every token of the batch (the same on every rank).
    void forward(const Batch& batch, TensorView<const float, 3> in, TensorView<float, 3> out);

    [[nodiscard]] static constexpr index_t streams() noexcept { return 1; }
    [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
    [[nodiscard]] const routing::RoutingResult& last_routing() const noexcept { return routing_result_; }

private:
    [[nodiscard]] static attention::AttentionSpec share_spec(const ModelConfig& c, const LayerOptions& o, index_t parts)
    {
        auto spec = attention::AttentionSpec::for_group(c, o, detail::cache_capacity(c, o));
        spec.q_heads = c.num_attention_heads / parts;
        spec.kv_heads = c.num_key_value_heads / parts;
        return spec;
    }

    ModelConfig config_;
    C comm_;
    VectorView<const float> post_norm_;
    Attention attention_;
    Routing router_;
    Experts experts_;
    ExpertParallel ep_;
    routing::RoutingResult routing_result_;
    std::vector<float> attn_, normed_, expert_out_, slice_out_, gathered_;
};

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::MoeHeadParallelLayer(
    const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options, C comm, ExpertParallel ep)
    : config_(detail::single_group(config, "MoeHeadParallelLayer")),
      comm_(std::move(comm)),
      post_norm_(weights.post_norm),
      attention_(share_spec(config, options, comm_.size()),
                 head_share_weights(config, weights, comm_.rank(), comm_.size())),
      router_(routing::RoutingSpec{config.num_experts, config.num_experts_per_tok, 1, 0, 1, config.norm_topk_prob},
              weights.gate, weights.gate_bias),
      experts_(detail::held_experts(config, options, 0, 1), expert_range(weights, detail::held_experts(config, options, 0, 1))),
      ep_(std::move(ep))
{
}

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
void MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::forward(const Batch& batch,
                                                                                   TensorView<const float, 3> in,
                                                                                   TensorView<float, 3> out)
{
    const index_t t = batch.tokens(), d = config_.hidden_size, parts = comm_.size();
    require(in.shape() == std::array<index_t, 3>{1, t, d} && out.shape() == in.shape(), "MoE layer input is ",
            format_shape(in.shape()), " and output ", format_shape(out.shape()), ", expected [1, ", t, ", ", d, "]");
    const auto x = in[0];
    const auto stream = typename C::stream_type{};

    // Attention over this rank's heads, summed over the ranks: r = x + sum_p a_p.
    attn_.resize(static_cast<std::size_t>(t * d));
    const MatrixView<float> a(attn_.data(), {t, d});
    attention_.forward(batch, x, a);
    comm_.all_reduce_sum(attn_, stream);
    for (index_t i = 0; i < t; ++i)
        for (index_t j = 0; j < d; ++j) a(i, j) += x(i, j);

    // This rank's slice of the tokens: rows [first, first + rows), the slices padded to `chunk`
    // rows so that the all-gather moves equal blocks.
    const index_t chunk = (t + parts - 1) / parts, first = std::min(t, comm_.rank() * chunk),
                  rows = std::min(t, first + chunk) - first;
    const MatrixView<const float> r(attn_.data() + first * d, {rows, d});
    normed_.resize(static_cast<std::size_t>(rows * d));
    const MatrixView<float> u(normed_.data(), {rows, d});
    ops::rms_norm(r, post_norm_, static_cast<float>(config_.rms_norm_eps), u);
    router_.route(u, routing_result_);
    const index_t slots = routing_result_.slots_per_token;
    expert_out_.resize(static_cast<std::size_t>(rows * slots * d));
    const MatrixView<float> y(expert_out_.data(), {rows * slots, d});
    ep_.run(experts_, u, routing_result_, y);
    slice_out_.assign(static_cast<std::size_t>(chunk * d), 0.0f);
    parallel::combine<Experts>(ep_, routing_result_, y, r, 0, slots, MatrixView<float>(slice_out_.data(), {rows, d}));

    gathered_.resize(static_cast<std::size_t>(parts * chunk * d));
    comm_.all_gather(slice_out_, gathered_, stream);
    std::copy_n(gathered_.begin(), t * d, out.data());
}

}  // namespace foe
