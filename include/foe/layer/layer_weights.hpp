#pragma once
// The weights of one transformer layer as views of the full (unsliced) tensors, and the slices
// an expert group owns.
//
// Group h of H owns query heads [h nq/H, (h+1) nq/H), KV heads [h nkv/H, (h+1) nkv/H), the
// matching rows of q/k/v_proj, the matching columns of o_proj, and experts [h E/H, (h+1) E/H).
// Slicing is by view: nothing is copied.

#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"

namespace foe {

struct LayerWeights {
    VectorView<const float> input_norm;           ///< input_layernorm.weight [d]
    WeightMatrix q_proj, k_proj, v_proj;          ///< [nq hd, d], [nkv hd, d], [nkv hd, d], stored dtype
    WeightMatrix o_proj;                          ///< [d, nq hd], stored dtype
    VectorView<const float> q_norm, k_norm;       ///< per the config's qk_norm; empty for none
    VectorView<const float> post_norm;            ///< post_attention_layernorm.weight [d]
    MatrixView<const float> gate;                 ///< mlp.gate.weight [E, d] (fp32: small, and routing decides on it)
    VectorView<const float> gate_bias;            ///< mlp.gate.e_score_correction_bias [E]; sigmoid only
    std::vector<experts::ExpertWeights> experts;  ///< all E experts, or empty where not held
};

/// Attention weights of part `part` of `parts` equal shares of the KV heads (with their query
/// heads and o_proj columns): an FoE group (parts = H), or a rank of head-parallel attention.
[[nodiscard]] inline attention::AttentionWeights head_share_weights(const ModelConfig& c, const LayerWeights& w,
                                                                    index_t part, index_t parts)
{
    require<InvalidArgument>(parts > 0 && c.num_key_value_heads % parts == 0 && part >= 0 && part < parts,
                             "share ", part, " of ", parts, " does not divide the ", c.num_key_value_heads, " KV heads");
    const index_t qw = c.num_attention_heads / parts * c.head_dim, kw = c.num_key_value_heads / parts * c.head_dim;
    attention::AttentionWeights a;
    a.input_norm = w.input_norm;
    a.q_proj = w.q_proj.slice(0, part * qw, qw);
    a.k_proj = w.k_proj.slice(0, part * kw, kw);
    a.v_proj = w.v_proj.slice(0, part * kw, kw);
    a.o_proj = w.o_proj.slice(1, part * qw, qw);
    // Per-head norms are shared by all heads; a full-width norm only exists with one share
    // (validated by the config and the placement).
    a.q_norm = w.q_norm;
    a.k_norm = w.k_norm;
    return a;
}

/// Attention weights of group `group` of the config's H groups.
[[nodiscard]] inline attention::AttentionWeights group_attention_weights(const ModelConfig& c, const LayerWeights& w,
                                                                         index_t group)
{
    require<InvalidArgument>(group >= 0 && group < c.groups(), "group ", group, " is outside [0, ", c.groups(), ")");
    return head_share_weights(c, w, group, c.groups());
}

/// Weights of the experts a spec holds; each must be present (a rank loads only its experts).
[[nodiscard]] inline std::vector<experts::ExpertWeights> expert_range(const LayerWeights& w, const experts::ExpertsSpec& s)
{
    require<InvalidArgument>(0 <= s.expert_begin && s.expert_begin <= s.expert_end &&
                                 s.expert_end <= static_cast<index_t>(w.experts.size()),
                             "experts [", s.expert_begin, ", ", s.expert_end, ") are outside the layer's ",
                             w.experts.size());
    for (index_t e = s.expert_begin; e < s.expert_end; ++e)
        require<InvalidArgument>(!w.experts[static_cast<std::size_t>(e)].gate_proj.empty(), "expert ", e,
                                 " is held by this layer but its weights were not loaded");
    return {w.experts.begin() + s.expert_begin, w.experts.begin() + s.expert_end};
}

}  // namespace foe
