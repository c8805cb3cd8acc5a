#pragma once
// The routing policy kind: router logits -> scores -> the experts each token uses, with weights.
//
// A routing policy is Router<Score, Selection>: the score function (softmax or sigmoid with a
// selection bias) and the selection (top-(k/H) inside every expert group for FoE, top-k over all
// experts for a standard MoE) are each a small policy, so sigmoid routing is one template
// argument away. The result lists, for every token, its selected experts in slots: slot s of a
// token belongs to group group_begin + s / slots_per_group, ordered by descending score inside
// the group (ties toward the lower expert index).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"

namespace foe::routing {

/// Which experts every token uses and with what weight.
struct RoutingResult {
    index_t tokens = 0;
    index_t slots_per_token = 0;  ///< selected experts per token, over the held groups
    index_t slots_per_group = 0;  ///< k / H for FoE, k for a standard MoE
    index_t group_begin = 0;      ///< first group the slots belong to
    std::vector<std::int32_t> experts;  ///< [tokens * slots_per_token], global expert ids
    std::vector<float> weights;         ///< [tokens * slots_per_token]

    [[nodiscard]] std::int32_t expert(index_t token, index_t slot) const
    {
        return experts[static_cast<std::size_t>(token * slots_per_token + slot)];
    }
    [[nodiscard]] float weight(index_t token, index_t slot) const
    {
        return weights[static_cast<std::size_t>(token * slots_per_token + slot)];
    }
};

/// The routing of a device policy: the slots of RoutingResult, in device memory that the router
/// owns (valid until its next route()): experts int32 and weights fp32, [tokens, slots_per_token].
struct DeviceRoutingResult {
    index_t tokens = 0;
    index_t slots_per_token = 0;
    index_t slots_per_group = 0;
    index_t group_begin = 0;
    const std::int32_t* experts = nullptr;
    const float* weights = nullptr;
};

/// What the router needs to know about the layer and the rank.
struct RoutingSpec {
    index_t num_experts = 0;    ///< E, all experts (the score vector spans all of them)
    index_t top_k = 0;          ///< k over all groups
    index_t groups = 1;         ///< H
    index_t group_begin = 0;    ///< the groups this rank routes for: [group_begin, group_end)
    index_t group_end = 1;
    bool renormalize = false;   ///< scale each group's selected weights to sum to 1 (norm_topk_prob)
    index_t max_tokens = 0;     ///< device policies: the most tokens one route() takes (plans memory)
};

namespace detail {
/// The checks every router makes of its spec (ConfigError): k/H experts of each group's E/H, the
/// routed groups inside [0, H), and a global selection only over one group.
inline void check_routing_spec(const RoutingSpec& spec, bool per_group)
{
    const index_t e = spec.num_experts, h = spec.groups;
    require<ConfigError>(e > 0 && h > 0 && e % h == 0, "num_experts (", e, ") must be a positive multiple of the ",
                         h, " expert groups");
    require<ConfigError>(spec.top_k > 0 && spec.top_k % h == 0, "num_experts_per_tok (", spec.top_k,
                         ") must be a positive multiple of num_expert_groups (", h, ")");
    require<ConfigError>(spec.top_k / h <= e / h, "top-k per group (", spec.top_k / h, ") exceeds the ", e / h,
                         " experts of a group");
    require<ConfigError>(0 <= spec.group_begin && spec.group_begin < spec.group_end && spec.group_end <= h,
                         "routed groups [", spec.group_begin, ", ", spec.group_end, ") are not inside [0, ", h, ")");
    require<ConfigError>(per_group || h == 1, "global top-k routing selects over all experts and so needs one "
                                              "expert group, got ", h, "; use PerGroupTopK for FoE");
}
}  // namespace detail

/// A score function turns logits into scores (the weights) and selection keys (what top-k ranks).
template <class S>
concept ScoreFunctionPolicy = requires(std::span<const float> logits, std::span<const float> bias,
                                       std::span<float> scores, std::span<float> keys) {
    { S::apply(logits, bias, scores, keys) } -> std::same_as<void>;
    { S::uses_bias } -> std::convertible_to<bool>;
};

/// A selection says whether top-k runs inside every expert group or over all experts.
template <class S>
concept SelectionPolicy = requires {
    { S::per_group } -> std::convertible_to<bool>;
};

/// A host routing policy is built from a spec, the gate weight [E, d] and a bias [E] (empty when
/// the score function takes none), and routes a batch of normalised hidden states u [T, d].
template <class R>
concept HostRoutingPolicy =
    std::same_as<backend_of_t<R>, HostBackend> &&
    std::constructible_from<R, const RoutingSpec&, MatrixView<const float>, VectorView<const float>> &&
    requires(R& r, MatrixView<const float> u, RoutingResult& out) {
        { r.route(u, out) } -> std::same_as<void>;
        { R::per_group } -> std::convertible_to<bool>;
    };

/// A device routing policy (routing/router.cuh) is built the same way (host weight views, uploaded;
/// spec.max_tokens plans its memory) and routes bf16 device u [T, d] on the context's stream into
/// arrays it owns.
template <class R>
concept DeviceRoutingPolicy =
    std::same_as<backend_of_t<R>, CudaBackend> &&
    std::constructible_from<R, const RoutingSpec&, MatrixView<const float>, VectorView<const float>> &&
    requires(R& r, const R& cr, MatrixView<const bfloat16> u, DeviceRoutingResult& out, const cuda::DeviceContext& ctx) {
        { r.route(u, out, ctx) } -> std::same_as<void>;
        { R::per_group } -> std::convertible_to<bool>;
        { cr.scratch_bytes() } -> std::convertible_to<std::size_t>;
    };

/// The routing policy kind, on either backend.
template <class R>
concept RoutingPolicy = HostRoutingPolicy<R> || DeviceRoutingPolicy<R>;

}  // namespace foe::routing
