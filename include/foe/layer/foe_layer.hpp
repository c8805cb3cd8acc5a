#pragma once
// FoeLayer: one Federation-of-Experts transformer layer, composed at compile time from policies.
//
// For the held groups h (all H when one rank holds the model) and the batch's tokens:
//   r[h]  = x[h] + Attn_h(RMSNorm_attn(x[h]))        group h's heads and o_proj slice
//   rf    = (1/H) sum_h r[h]                         Sync: the only cross-group collective
//   u     = RMSNorm_moe(rf)
//   I_h, w_h = top-(k/H) of Router(u) inside group h  Routing
//   x'[h] = rf + sum_{e in I_h} w_h[e] FFN_e(u)       Experts, placed by ExpertParallel
// The input holds 1 stream (the embedding, broadcast to every group: first layer) or one per
// held group; the output holds one stream per held group. With H = 1 this is exactly MoeLayer.
//
//   using Layer = foe::FoeLayer<foe::attention::GqaAttention<>,
//                               foe::routing::Router<foe::routing::Sigmoid, foe::routing::PerGroupTopK>,
//                               foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts,
//                               foe::sync::AllReduceMean<>>;

#include <algorithm>
#include <numeric>
#include <string_view>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"
#include "foe/layer/backend_check.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe {

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, sync::ResidualSyncPolicy Sync>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
class FoeLayer {
    static_assert(detail::foe_policies_share_backend<Attention, Routing, Experts, ExpertParallel, Sync>);
    static_assert(Routing::per_group, "an FoE layer routes top-(k/H) inside every group: use a per-group selection "
                                      "(routing::PerGroupTopK)");

public:
    using backend = backend_of_t<Attention>;
    using attention_type = Attention;
    using routing_type = Routing;
    using experts_type = Experts;
    using expert_parallel_type = ExpertParallel;
    using sync_type = Sync;

    /// Builds the held groups' attention, the router and the held experts from views of the
    /// layer's weights (which must outlive the layer). Throws ConfigError for an invalid config.
    FoeLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options = {}, Sync sync = {},
             ExpertParallel ep = {});

    /// in: [1 or streams(), T, d]; out: [streams(), T, d], T = batch.tokens(). in and out must
    /// not overlap. Appends the batch's keys and values to the held groups' KV caches.
    void forward(const Batch& batch, TensorView<const float, 3> in, TensorView<float, 3> out);

    /// Residual streams this layer produces: the number of held groups.
    [[nodiscard]] index_t streams() const noexcept { return group_end_ - group_begin_; }
    [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
    [[nodiscard]] const Attention& attention(index_t held_group) const { return attention_.at(static_cast<std::size_t>(held_group)); }
    [[nodiscard]] const routing::RoutingResult& last_routing() const noexcept { return routing_result_; }
    [[nodiscard]] Sync& sync_policy() noexcept { return sync_; }

private:
    ModelConfig config_;
    index_t group_begin_, group_end_;
    std::vector<index_t> order_;
    VectorView<const float> post_norm_;
    std::vector<Attention> attention_;
    Routing router_;
    Experts experts_;
    Sync sync_;
    ExpertParallel ep_;
    routing::RoutingResult routing_result_;
    std::vector<float> residual_, synced_, normed_, expert_out_;
};

// ---------------------------------------------------------------------------------------------

namespace detail {

inline index_t resolved_group_end(const ModelConfig& c, const LayerOptions& o)
{
    return o.group_end < 0 ? c.groups() : o.group_end;
}

inline index_t validated_group_begin(const ModelConfig& c, const LayerOptions& o)
{
    c.validate();
    const index_t end = resolved_group_end(c, o);
    require<ConfigError>(0 <= o.group_begin && o.group_begin < end && end <= c.groups(), "held groups [",
                         o.group_begin, ", ", end, ") are not a non-empty range inside [0, ", c.groups(), ")");
    return o.group_begin;
}

inline std::vector<index_t> compute_order(const LayerOptions& o, index_t held)
{
    std::vector<index_t> order = o.compute_order;
    if (order.empty()) {
        order.resize(static_cast<std::size_t>(held));
        std::iota(order.begin(), order.end(), index_t{0});
    }
    std::vector<index_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    std::vector<index_t> expected(static_cast<std::size_t>(held));
    std::iota(expected.begin(), expected.end(), index_t{0});
    require<InvalidArgument>(sorted == expected, "compute_order must be a permutation of the ", held, " held groups");
    return order;
}

/// The config of a standard-MoE layer: valid, with one expert group.
inline const ModelConfig& single_group(const ModelConfig& c, std::string_view layer)
{
    c.validate();
    require<ConfigError>(c.groups() == 1, layer, " is a standard-MoE layer with one expert group; the config has ",
                         c.groups(), " expert groups (use FoeLayer)");
    return c;
}

/// The experts a layer holds: the options' range, or every expert of the held groups.
inline experts::ExpertsSpec held_experts(const ModelConfig& c, const LayerOptions& o, index_t group_begin,
                                         index_t group_end)
{
    experts::ExpertsSpec s{c.hidden_size, c.intermediate_size, group_begin * c.experts_per_group(),
                           group_end * c.experts_per_group()};
    if (o.expert_begin >= 0 || o.expert_end >= 0) {
        require<ConfigError>(s.expert_begin <= o.expert_begin && o.expert_begin <= o.expert_end &&
                                 o.expert_end <= s.expert_end,
                             "held experts [", o.expert_begin, ", ", o.expert_end, ") are not inside the held groups' [",
                             s.expert_begin, ", ", s.expert_end, ")");
        s.expert_begin = o.expert_begin;
        s.expert_end = o.expert_end;
    }
    return s;
}

inline index_t cache_capacity(const ModelConfig& c, const LayerOptions& o)
{
    return o.cache_capacity > 0 ? o.cache_capacity : c.max_position_embeddings;
}

}  // namespace detail

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, sync::ResidualSyncPolicy Sync>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
FoeLayer<Attention, Routing, Experts, ExpertParallel, Sync>::FoeLayer(const ModelConfig& config,
                                                                       const LayerWeights& weights,
                                                                       const LayerOptions& options, Sync sync,
                                                                       ExpertParallel ep)
    : config_(config),
      group_begin_(detail::validated_group_begin(config, options)),
      group_end_(detail::resolved_group_end(config, options)),
      order_(detail::compute_order(options, group_end_ - group_begin_)),
      post_norm_(weights.post_norm),
      router_(routing::RoutingSpec{config.num_experts, config.num_experts_per_tok, config.groups(), group_begin_,
                                   group_end_, config.norm_topk_prob},
              weights.gate, weights.gate_bias),
      experts_(detail::held_experts(config, options, group_begin_, group_end_),
               expert_range(weights, detail::held_experts(config, options, group_begin_, group_end_))),
      sync_(std::move(sync)),
      ep_(std::move(ep))
{
    require<InvalidArgument>(post_norm_.extent(0) == config.hidden_size, "post_attention_layernorm has ",
                             post_norm_.extent(0), " elements, expected hidden_size ", config.hidden_size);
    const auto spec = attention::AttentionSpec::for_group(config, options, detail::cache_capacity(config, options));
    attention_.reserve(static_cast<std::size_t>(streams()));
    for (index_t h = group_begin_; h < group_end_; ++h)
        attention_.emplace_back(spec, group_attention_weights(config, weights, h));
}

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, sync::ResidualSyncPolicy Sync>
    requires parallel::ExpertParallelPolicy<ExpertParallel, Experts>
void FoeLayer<Attention, Routing, Experts, ExpertParallel, Sync>::forward(const Batch& batch,
                                                                          TensorView<const float, 3> in,
                                                                          TensorView<float, 3> out)
{
    const index_t t = batch.tokens(), d = config_.hidden_size, held = streams();
    require(in.extent(0) == 1 || in.extent(0) == held, "FoE layer input has ", in.extent(0),
            " streams; it takes 1 (broadcast to every group) or one per held group (", held, ")");
    require(in.extent(1) == t && in.extent(2) == d, "FoE layer input streams are [", in.extent(1), ", ", in.extent(2),
            "], expected [", t, ", ", d, "]");
    require(out.shape() == std::array<index_t, 3>{held, t, d}, "FoE layer output is ", format_shape(out.shape()),
            ", expected [", held, ", ", t, ", ", d, "]");

    // r[h] = x[h] + Attn_h(RMSNorm(x[h])), in the requested order.
    residual_.resize(static_cast<std::size_t>(held * t * d));
    const TensorView<float, 3> residual(residual_.data(), {held, t, d});
    for (index_t g : order_) {
        const auto x = in[in.extent(0) == 1 ? 0 : g];
        const auto r = residual[g];
        attention_[static_cast<std::size_t>(g)].forward(batch, x, r);
        FOE_OMP_PARALLEL_FOR
        for (index_t i = 0; i < t; ++i)
            for (index_t j = 0; j < d; ++j) r(i, j) += x(i, j);
    }

    // rf = (1/H) sum_h r[h]; u = RMSNorm(rf).
    synced_.resize(static_cast<std::size_t>(t * d));
    normed_.resize(synced_.size());
    const MatrixView<float> rf(synced_.data(), {t, d}), u(normed_.data(), {t, d});
    std::vector<MatrixView<const float>> streams_in;
    streams_in.reserve(static_cast<std::size_t>(held));
    for (index_t g = 0; g < held; ++g) streams_in.push_back(residual[g]);
    sync_.sync(streams_in, config_.groups(), rf);
    ops::rms_norm(rf, post_norm_, static_cast<float>(config_.rms_norm_eps), u);

    // Route, run the experts wherever they live, combine each group's experts into its stream.
    router_.route(u, routing_result_);
    const index_t slots = routing_result_.slots_per_token, per_group = routing_result_.slots_per_group;
    expert_out_.resize(static_cast<std::size_t>(t * slots * d));
    const MatrixView<float> y(expert_out_.data(), {t * slots, d});
    ep_.run(experts_, u, routing_result_, y);
    for (index_t g = 0; g < held; ++g)
        parallel::combine<Experts>(ep_, routing_result_, y, rf, g * per_group, per_group, out[g]);
}

}  // namespace foe
