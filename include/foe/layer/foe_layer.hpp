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
// The equations above are written once (layer/layer_body.hpp) for both backends: with host
// policies the layer runs in fp32 on the host; with device policies (attention/gqa_attention.cuh,
// routing/router.cuh, experts/swiglu_experts.cuh, parallel/local_experts.cuh, sync/*.cuh) it runs
// in bf16 on a CUDA stream, every step one launch over all held groups. The policies of one layer
// share a backend: mixing them is a compile error naming the policy that does not fit.
//
//   using Layer = foe::FoeLayer<foe::attention::GqaAttention<>,
//                               foe::routing::Router<foe::routing::Sigmoid, foe::routing::PerGroupTopK>,
//                               foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts,
//                               foe::sync::AllReduceMean<>>;

#include <algorithm>
#include <concepts>
#include <type_traits>
#include <numeric>
#include <string_view>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"
#include "foe/layer/backend_check.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/layer_body.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe {

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
                           group_end * c.experts_per_group(),
                           o.max_tokens * (group_end - group_begin) * c.top_k_per_group()};
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


inline LayerOptions validated_options(const LayerOptions& o, index_t held, bool device)
{
    LayerOptions v = o;
    v.compute_order = compute_order(o, held);
    if (device)
        require<InvalidArgument>(o.max_tokens > 0 && o.max_sequences > 0,
                                 "a CUDA layer plans its memory from LayerOptions::max_tokens (", o.max_tokens,
                                 ") and max_sequences (", o.max_sequences, "): both must be positive");
    return v;
}

inline VectorView<const float> checked_post_norm(const ModelConfig& c, const LayerWeights& w)
{
    require<InvalidArgument>(w.post_norm.extent(0) == c.hidden_size, "post_attention_layernorm has ",
                             w.post_norm.extent(0), " elements, expected hidden_size ", c.hidden_size);
    return w.post_norm;
}

inline routing::RoutingSpec routing_spec(const ModelConfig& c, const LayerOptions& o, index_t group_begin,
                                         index_t group_end)
{
    return routing::RoutingSpec{c.num_experts,  c.num_experts_per_tok, c.groups(), group_begin,
                                group_end,      c.norm_topk_prob,      o.max_tokens};
}

/// One attention instance per held group, or one covering them all (a group-batched policy).
template <class Attention>
attention_set_t<Attention> make_attention(const ModelConfig& c, const LayerWeights& w, const LayerOptions& o,
                                          index_t group_begin, index_t group_end)
{
    const auto spec = attention::AttentionSpec::for_group(c, o, cache_capacity(c, o));
    if constexpr (covers_groups<Attention>) {
        std::vector<attention::AttentionWeights> groups;
        for (index_t h = group_begin; h < group_end; ++h) groups.push_back(group_attention_weights(c, w, h));
        return Attention(spec, std::span<const attention::AttentionWeights>(groups));
    } else {
        std::vector<Attention> groups;
        groups.reserve(static_cast<std::size_t>(group_end - group_begin));
        for (index_t h = group_begin; h < group_end; ++h) groups.emplace_back(spec, group_attention_weights(c, w, h));
        return groups;
    }
}

inline void check_streams(std::string_view layer, const std::array<index_t, 3>& in, const std::array<index_t, 3>& out,
                          index_t tokens, index_t d, index_t held)
{
    require(in[0] == 1 || in[0] == held, layer, " input has ", in[0],
            " streams; it takes 1 (broadcast to every group) or one per held group (", held, ")");
    require(in[1] == tokens && in[2] == d, layer, " input streams are [", in[1], ", ", in[2], "], expected [", tokens,
            ", ", d, "]");
    require(out == std::array<index_t, 3>{held, tokens, d}, layer, " output is ", format_shape(out), ", expected [",
            held, ", ", tokens, ", ", d, "]");
}

/// The residual sync of a layer with one stream and no peers (MoeLayer): rf is r itself.
template <class Backend>
struct OneStream {
    using backend = Backend;
    static constexpr bool identity = true;
};

/// What a layer keeps for its backend's execution: the host's buffers and compute order (the
/// exec itself); the CUDA backend's is in cuda/layer_exec.cuh.
template <class Backend>
struct layer_exec_state;
template <>
struct layer_exec_state<HostBackend> : layer_exec<HostBackend> {};

/// A layer composed from policies; FoeLayer and MoeLayer are its two faces. Everything here runs
/// layer_forward (layer_body.hpp), once for both backends.
template <class Attention, class Routing, class Experts, class ExpertParallel, class Sync>
class ComposedLayer {
public:
    using backend = backend_of_t<Attention>;
    using attention_type = Attention;
    using routing_type = Routing;
    using experts_type = Experts;
    using expert_parallel_type = ExpertParallel;
    using sync_type = Sync;
    using routing_result_type =
        std::conditional_t<std::same_as<backend, HostBackend>, routing::RoutingResult, routing::DeviceRoutingResult>;

    /// Builds the held groups' attention, the router and the held experts from views of the
    /// layer's weights (host memory: a host layer reads them in place, so they must outlive it; a
    /// CUDA layer uploads them, planned for options.max_tokens). Throws ConfigError for an invalid
    /// config, InvalidArgument for bad options or weights.
    ComposedLayer(std::string_view name, const ModelConfig& config, const LayerWeights& weights,
                  const LayerOptions& options, Sync sync, ExpertParallel ep)
        : name_(name),
          config_(config),
          group_begin_(validated_group_begin(config, options)),
          group_end_(resolved_group_end(config, options)),
          options_(validated_options(options, group_end_ - group_begin_, std::same_as<backend, CudaBackend>)),
          post_norm_(checked_post_norm(config, weights)),
          attention_(make_attention<Attention>(config, weights, options_, group_begin_, group_end_)),
          router_(routing_spec(config, options_, group_begin_, group_end_), weights.gate, weights.gate_bias),
          experts_(held_experts(config, options_, group_begin_, group_end_),
                   expert_range(weights, held_experts(config, options_, group_begin_, group_end_))),
          sync_(std::move(sync)),
          ep_(std::move(ep))
    {
        // An identity sync is never called (rf is r[0]): it holds only for one stream and no peers.
        if constexpr (identity_sync<Sync>)
            require<ConfigError>(streams() == 1 && config.groups() == 1, name, " with a residual sync that leaves rf = "
                                 "r[0] needs one group on one rank; it holds ", streams(), " of ", config.groups(),
                                 " groups (use sync::AllReduceMean)");
        if constexpr (std::same_as<backend, HostBackend>)
            exec_.order = options_.compute_order;
        else
            exec_.upload_post_norm(post_norm_);
    }

    /// Host: in [1 or streams(), T, d]; out [streams(), T, d], T = batch.tokens(). in and out must
    /// not overlap. Appends the batch's keys and values to the held groups' KV caches. The held
    /// groups' attention runs in options.compute_order (the device runs them in one launch and
    /// ignores it: results never depend on it).
    void forward(const Batch& batch, TensorView<const float, 3> in, TensorView<float, 3> out)
        requires std::same_as<backend_of_t<Attention>, HostBackend>
    {
        check_streams(name_, in.shape(), out.shape(), batch.tokens(), config_.hidden_size, streams());
        layer_forward(exec_, batch, in, out, attention_, router_, experts_, ep_, sync_, config_.groups(),
                      post_norm_, static_cast<float>(config_.rms_norm_eps), routing_result_);
    }

    /// CUDA: the same on bf16 device streams, enqueued on ctx.stream (cuda/layer_exec.cuh);
    /// ctx.scratch must hold scratch_bytes() (a model shares one scratch among its layers, which
    /// run one after another). Nothing is allocated: a decode step is capturable in a CUDA graph.
    void forward(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> in, TensorView<bfloat16, 3> out,
                 const cuda::DeviceContext& ctx)
        requires std::same_as<backend_of_t<Attention>, CudaBackend>;

    /// CUDA: the device scratch one forward takes at options.max_tokens (cuda/layer_exec.cuh).
    [[nodiscard]] std::size_t scratch_bytes() const
        requires std::same_as<backend_of_t<Attention>, CudaBackend>;

    /// Residual streams this layer produces: the number of held groups.
    [[nodiscard]] index_t streams() const noexcept { return group_end_ - group_begin_; }
    [[nodiscard]] index_t group_begin() const noexcept { return group_begin_; }
    [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
    [[nodiscard]] const LayerOptions& options() const noexcept { return options_; }
    /// Host: held group g's attention instance.
    [[nodiscard]] const Attention& attention(index_t held_group) const
        requires(!covers_groups<Attention>)
    {
        return attention_.at(static_cast<std::size_t>(held_group));
    }
    /// A group-batched (device) attention policy: the one instance covering every held group.
    [[nodiscard]] const Attention& attention() const noexcept
        requires covers_groups<Attention>
    {
        return attention_;
    }
    [[nodiscard]] const Routing& router() const noexcept { return router_; }
    [[nodiscard]] const Experts& experts() const noexcept { return experts_; }
    /// The last forward's routing (on the device for a CUDA layer, valid until the next forward).
    [[nodiscard]] const routing_result_type& last_routing() const noexcept { return routing_result_; }
    [[nodiscard]] Sync& sync_policy() noexcept { return sync_; }
    [[nodiscard]] ExpertParallel& expert_parallel_policy() noexcept { return ep_; }

private:
    std::string_view name_;
    ModelConfig config_;
    index_t group_begin_, group_end_;
    LayerOptions options_;
    VectorView<const float> post_norm_;
    attention_set_t<Attention> attention_;
    Routing router_;
    Experts experts_;
    Sync sync_;
    ExpertParallel ep_;
    routing_result_type routing_result_;
    /// Host: the buffers and compute order; CUDA: the uploaded post-attention norm.
    layer_exec_state<backend> exec_;
};

}  // namespace detail

// Sync and ExpertParallel are checked in the body, after the backend check: a policy built for the
// other backend fails that check first, with the policy named, rather than as an unsatisfied concept.
template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, class Sync>
class FoeLayer : public detail::ComposedLayer<Attention, Routing, Experts, ExpertParallel, Sync> {
    static_assert(detail::foe_policies_share_backend<Attention, Routing, Experts, ExpertParallel, Sync>);
    static_assert(parallel::ExpertParallelPolicy<ExpertParallel, Experts>,
                  "the expert-parallel policy cannot run these experts (parallel/expert_parallel.hpp)");
    static_assert(sync::ResidualSyncPolicy<Sync>, "the residual sync is not a residual-sync policy of the layer's "
                                                  "backend (sync/residual_sync.hpp)");
    static_assert(Routing::per_group, "an FoE layer routes top-(k/H) inside every group: use a per-group selection "
                                      "(routing::PerGroupTopK)");
    using Base = detail::ComposedLayer<Attention, Routing, Experts, ExpertParallel, Sync>;

public:
    /// See ComposedLayer: the held groups are options.group_begin .. group_end.
    FoeLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options = {}, Sync sync = {},
             ExpertParallel ep = {})
        : Base("FoE layer", config, weights, options, std::move(sync), std::move(ep))
    {
    }
};

}  // namespace foe

#if defined(__CUDACC__)
#include "foe/cuda/layer_exec.cuh"  // the CUDA backend's execution of the same body
#endif
