#pragma once
// The attention policy kind: pre-RMSNorm, q/k/v projections, optional QK-norm, RoPE, causal GQA
// softmax attention over a KV cache, and the output projection of the heads the policy owns.
//
// In an FoE layer each group owns one attention instance: its KV head(s), the query heads that
// share them and the matching columns of o_proj, so forward() returns that group's additive
// contribution Attn_h(RMSNorm(x[h])) in R^d. A standard MoE layer owns one instance with all heads.

#include <concepts>
#include <cstddef>
#include <span>

#include "foe/core/backend.hpp"
#include "foe/core/config.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/weight.hpp"
#include "foe/layer/batch.hpp"

namespace foe::attention {

/// The shape of one attention instance and of its KV cache.
struct AttentionSpec {
    index_t hidden_size = 0;
    index_t q_heads = 0;   ///< query heads this instance owns
    index_t kv_heads = 0;  ///< KV heads this instance owns; q_heads is a multiple of it
    index_t head_dim = 0;
    QkNorm qk_norm = QkNorm::none;
    float rms_norm_eps = 1e-5f;
    double rope_theta = 10000.0;
    index_t cache_slots = 1;     ///< sequences the KV cache holds at once
    index_t cache_capacity = 0;  ///< positions per sequence
    index_t page_size = 16;      ///< paged KV cache: positions per page
    index_t cache_pages = 0;     ///< paged KV cache: pages in the pool (0: slots x capacity worth)
    index_t max_tokens = 0;      ///< device policies: the most tokens of one forward (plans memory)
    index_t max_sequences = 1;   ///< device policies: the most sequences of one forward

    /// The spec of group `group` of H for a model config.
    [[nodiscard]] static AttentionSpec for_group(const ModelConfig& c, index_t cache_slots, index_t cache_capacity)
    {
        return AttentionSpec{c.hidden_size,
                             c.q_heads_per_group(),
                             c.kv_heads_per_group(),
                             c.head_dim,
                             c.qk_norm,
                             static_cast<float>(c.rms_norm_eps),
                             c.rope_theta,
                             cache_slots,
                             cache_capacity};
    }

    /// The same with the KV-cache options of a layer (paged caches' page size and pool).
    template <class Options>
    [[nodiscard]] static AttentionSpec for_group(const ModelConfig& c, const Options& o, index_t cache_capacity)
    {
        AttentionSpec s = for_group(c, o.cache_slots, cache_capacity);
        s.page_size = o.page_size;
        s.cache_pages = o.cache_pages;
        s.max_tokens = o.max_tokens;
        s.max_sequences = o.max_sequences;
        return s;
    }
};

/// Views of the weights one attention instance reads (never owned).
struct AttentionWeights {
    VectorView<const float> input_norm;  ///< [hidden]
    WeightMatrix q_proj;                 ///< [q_heads * head_dim, hidden]
    WeightMatrix k_proj;                 ///< [kv_heads * head_dim, hidden]
    WeightMatrix v_proj;                 ///< [kv_heads * head_dim, hidden]
    WeightMatrix o_proj;                 ///< [hidden, q_heads * head_dim], a column block of the full o_proj
    VectorView<const float> q_norm;      ///< [head_dim] per head, [q_heads * head_dim] full width, empty for none
    VectorView<const float> k_norm;      ///< [head_dim] per head, [kv_heads * head_dim] full width, empty for none
};

/// A host attention policy is built from a spec and weight views, and adds nothing to the
/// residual itself: forward writes out[t, :] = o_proj(Attention(RMSNorm(x))[t, :]) for the batch's
/// tokens, appending their keys and values to the KV cache at the batch's positions. The layer
/// holds one per held group.
template <class A>
concept HostAttentionPolicy =
    std::same_as<backend_of_t<A>, HostBackend> &&
    std::constructible_from<A, const AttentionSpec&, const AttentionWeights&> &&
    requires(A& a, const A& ca, const Batch& batch, MatrixView<const float> x, MatrixView<float> out) {
        { a.forward(batch, x, out) } -> std::same_as<void>;
        { ca.spec() } -> std::convertible_to<const AttentionSpec&>;
    };

/// A device attention policy (attention/gqa_attention.cuh) runs every held group of a layer in one
/// instance, so each step is one launch over groups x heads. Built from one group's spec and the
/// held groups' weights; forward takes bf16 device streams x [1 or G, T, d] and ACCUMULATES
/// out[g] += o_g(Attn_g(RMSNorm(x[g]))) (the output GEMM adds into the residual the layer put
/// there: one pass less), enqueued on the context's stream; scratch_bytes() is the transient memory
/// one forward takes from the context at spec().max_tokens.
template <class A>
concept DeviceAttentionPolicy =
    std::same_as<backend_of_t<A>, CudaBackend> && A::covers_groups &&
    std::constructible_from<A, const AttentionSpec&, std::span<const AttentionWeights>> &&
    requires(A& a, const A& ca, const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x,
             TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) {
        { a.forward(batch, x, out, ctx) } -> std::same_as<void>;
        { ca.spec() } -> std::convertible_to<const AttentionSpec&>;
        { ca.scratch_bytes() } -> std::convertible_to<std::size_t>;
    };

/// The attention policy kind: the same layer body runs either backend's.
template <class A>
concept AttentionPolicy = HostAttentionPolicy<A> || DeviceAttentionPolicy<A>;

}  // namespace foe::attention
