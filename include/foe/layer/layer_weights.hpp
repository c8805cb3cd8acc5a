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
    MatrixView<const float> q_proj, k_proj, v_proj;  ///< [nq hd, d], [nkv hd, d], [nkv hd, d]
    MatrixView<const float> o_proj;               ///< [d, nq hd]
    VectorView<const float> q_norm, k_norm;       ///< per the config's qk_norm; empty for none
    VectorView<const float> post_norm;            ///< post_attention_layernorm.weight [d]
    MatrixView<const float> gate;                 ///< mlp.gate.weight [E, d]
    VectorView<const float> gate_bias;            ///< mlp.gate.e_score_correction_bias [E]; sigmoid only
    std::vector<experts::ExpertWeights> experts;  ///< all E experts, or empty where not held
};

/// Attention weights of group `group` of the config's H groups.
[[nodiscard]] inline attention::AttentionWeights group_attention_weights(const ModelConfig& c, const LayerWeights& w,
                                                                         index_t group)
{
    require<InvalidArgument>(group >= 0 && group < c.groups(), "group ", group, " is outside [0, ", c.groups(), ")");
    const index_t qw = c.q_heads_per_group() * c.head_dim, kw = c.kv_heads_per_group() * c.head_dim;
    attention::AttentionWeights a;
    a.input_norm = w.input_norm;
    a.q_proj = w.q_proj.slice(0, group * qw, qw);
    a.k_proj = w.k_proj.slice(0, group * kw, kw);
    a.v_proj = w.v_proj.slice(0, group * kw, kw);
    a.o_proj = w.o_proj.slice(1, group * qw, qw);
    // Per-head norms are shared by all heads; a full-width norm exists only for H = 1 (validated).
    a.q_norm = w.q_norm;
    a.k_norm = w.k_norm;
    return a;
}

/// Weights of the experts [begin, end).
[[nodiscard]] inline std::vector<experts::ExpertWeights> expert_range(const LayerWeights& w, index_t begin, index_t end)
{
    require<InvalidArgument>(0 <= begin && begin <= end && end <= static_cast<index_t>(w.experts.size()),
                             "experts [", begin, ", ", end, ") are not all present (layer holds ", w.experts.size(), ")");
    return {w.experts.begin() + begin, w.experts.begin() + end};
}

}  // namespace foe
