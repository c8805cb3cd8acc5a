#pragma once
// The CUDA backend of an FoE or standard-MoE transformer layer: the host FoeLayer / MoeLayer math
// (foe/layer/foe_layer.hpp) with bf16 storage and fp32 accumulation, every step a stream-ordered
// kernel over buffers planned once.
//
// For the held groups h and the batch's T tokens (MoE is the case H = 1):
//   r[h]  = x[h] + o_h(Attn_h(RMSNorm(x[h])))   one fused q|k|v GEMM, QK-norm, RoPE, KV append, attention,
//                                                o GEMM (beta 1)
//   rf    = (1/H) sum_h r[h]                      stream mean, or fp32 partial sum + the caller's cross-rank reduce
//   u     = RMSNorm(rf)
//   route u inside every held group (top-k/H) or globally (MoE): fp32 logits GEMM + one warp per token
//   x'[h] = rf + sum_{e chosen in h} w_e FFN_e(u)  permute (CUB), gather, grouped SwiGLU, deterministic combine
//
// Expert parallelism (the standard-MoE baselines, LayerSpec::expert_parallel): the layer holds
// only experts [expert_begin, expert_end) and one stream; forward() takes an ExpertExchange that
// replaces permute / gather / grouped SwiGLU / combine by its run() and combine(), a collective
// over the ranks holding the other experts. Attention stays this rank's own (data-parallel:
// each rank runs its own sequences). With no exchange every path is as before.
//
// Head-parallel attention + expert parallelism (the second MoE baseline, LayerSpec::head_parts >
// 1, as the host MoeHeadParallelLayer): every rank runs every token through its share of the KV
// heads; the partial attention outputs are summed over the ranks in fp32 (HeadParallelComm::
// reduce), r = x + sum; the rank's slice of the tokens (ceil(T/P) rows) is normed, routed and sent
// through the exchange; the slices are all-gathered so that every rank has x' for every token.
//
// What makes a decode step capturable in a CUDA graph: the kernels read the batch (positions,
// slots, lengths) from device memory; every buffer comes from an arena sized by the LayerSpec;
// the grouped expert GEMM reads the expert offsets on the device; nothing here synchronises with
// the host or allocates. The attention policy, routing and experts are chosen from the config at
// construction (the host backend composes them at compile time; on the device they are kernels
// either way); the dense GEMM policy (cuBLASLt or foe's tensor-core kernel) is a template
// parameter.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/combine.cuh"
#include "foe/cuda/decode_attention.cuh"
#include "foe/cuda/elementwise.cuh"
#include "foe/cuda/expert_exchange.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/grouped_swiglu.cuh"
#include "foe/cuda/kv_cache.cuh"
#include "foe/cuda/kv_layout.cuh"
#include "foe/cuda/permute.cuh"
#include "foe/cuda/prefill_attention.cuh"
#include "foe/cuda/rmsnorm.cuh"
#include "foe/cuda/rope.cuh"
#include "foe/cuda/router.cuh"
#include "foe/layer/layer_weights.hpp"

namespace foe::cuda {

/// Sums n fp32 device values in place over the ranks that hold the other expert groups
/// (NcclComm::all_reduce_sum on the given stream). Empty when one rank holds every group.
using DeviceReduce = std::function<void(float* values, std::size_t n, cudaStream_t stream)>;

/// out [ranks * n] = the n bf16 device values `in` of every rank, in rank order
/// (NcclComm::all_gather on the given stream).
using DeviceGather = std::function<void(const bfloat16* in, std::size_t n, bfloat16* out, cudaStream_t stream)>;

/// The collectives of head-parallel attention over the ranks sharing the heads: the fp32 sum of
/// the partial attention outputs, and the all-gather of the ranks' token slices.
struct HeadParallelComm {
    DeviceReduce reduce;
    DeviceGather gather;
};

/// What a layer is planned for: its buffers hold `max_tokens` rows of a batch of at most
/// `max_sequences` sequences, and its KV caches `cache_slots` sequences of `cache_capacity`
/// positions (contiguous; with page_size > 0, a pool of pages that those sequences share). The held groups are [group_begin, group_end) (group_end -1: all). With
/// expert_parallel the layer holds experts [expert_begin, expert_end) of its one held group and
/// reaches the others through the ExpertExchange its forward() is given; otherwise it holds every
/// expert of its held groups and the expert range is ignored.
struct LayerSpec {
    index_t max_tokens = 0;
    index_t max_sequences = 1;
    index_t cache_slots = 1;
    index_t cache_capacity = 0;
    index_t group_begin = 0;
    index_t group_end = -1;
    bool expert_parallel = false;
    index_t expert_begin = 0;
    index_t expert_end = 0;
    /// Head-parallel attention (needs expert_parallel and one group): this rank's share
    /// head_part of head_parts equal shares of the KV heads (with their query heads and o_proj
    /// columns); 1 share: all heads.
    index_t head_part = 0;
    index_t head_parts = 1;
    /// Paged KV cache: page_size > 0 makes each held group's cache a pool of cache_pages pages of
    /// page_size positions ([pages, kv heads, page_size, head_dim]), addressed through the block
    /// table DeviceBatch::block_table ([cache_slots, page_table_width()], shared by every layer
    /// and group). 0: contiguous [cache_slots, kv heads, cache_capacity, head_dim].
    index_t page_size = 0;
    index_t cache_pages = 0;  ///< pages in each pool; 0: cache_slots x page_table_width()

    [[nodiscard]] bool paged() const noexcept { return page_size > 0; }
    /// Block-table row length: pages a sequence of cache_capacity positions needs.
    [[nodiscard]] index_t page_table_width() const noexcept
    {
        return paged() ? (cache_capacity + page_size - 1) / page_size : 0;
    }
    [[nodiscard]] index_t pool_pages() const noexcept
    {
        return cache_pages > 0 ? cache_pages : cache_slots * page_table_width();
    }
};

/// The scratch buffers of one layer's forward. Layers run one after another, so a model shares
/// one LayerScratch among all of them.
struct LayerScratch {
    bfloat16* residual = nullptr;       ///< [held, T, d] r[h]
    bfloat16* normed = nullptr;         ///< [T, d] RMSNorm of a group's stream
    bfloat16* qkv = nullptr;            ///< [T, q width + 2 kv width of a group]: q | k | v per token
    bfloat16* attn = nullptr;           ///< [T, q width of a group]
    float* synced32 = nullptr;          ///< [T, d] fp32 partial stream sum (cross-rank sync only)
    bfloat16* synced = nullptr;         ///< [T, d] rf
    bfloat16* u = nullptr;              ///< [T, d] RMSNorm(rf)
    float* router_logits = nullptr;     ///< [T, E]
    std::int32_t* sorted_rows = nullptr;  ///< [T slots]
    std::int32_t* offsets = nullptr;    ///< [held experts + 1]
    std::int32_t* inverse = nullptr;    ///< [T slots]
    bfloat16* gathered = nullptr;       ///< [T slots, d] (none with expert parallelism)
    bfloat16* expert_out = nullptr;     ///< [T slots, d] (the exchange's y with expert parallelism)
    bfloat16* slice = nullptr;          ///< [ceil(T/P), d] head-parallel: this rank's token slice of x'
    bfloat16* slices = nullptr;         ///< [P ceil(T/P), d] head-parallel: every rank's slice
    void* permute_ws = nullptr;
    void* attention_ws = nullptr;
    void* experts_ws = nullptr;

    /// Visits every buffer with its element count, in one fixed order: the plan adds the sizes,
    /// the arena carves them, so the two cannot disagree.
    template <class Visit>
    void for_each_buffer(const ModelConfig& c, const LayerSpec& s, std::size_t permute_bytes, Visit&& visit)
    {
        const index_t held = (s.group_end < 0 ? c.groups() : s.group_end) - s.group_begin;
        const auto t = static_cast<std::size_t>(s.max_tokens), d = static_cast<std::size_t>(c.hidden_size);
        const auto slots = static_cast<std::size_t>(held * c.top_k_per_group());
        const auto qw = static_cast<std::size_t>(c.q_heads_per_group() * c.head_dim);
        const auto kw = static_cast<std::size_t>(c.kv_heads_per_group() * c.head_dim);
        const auto held_experts = static_cast<std::size_t>(held * c.experts_per_group());
        const AttentionShape shape{c.q_heads_per_group(), c.kv_heads_per_group(), c.head_dim, s.cache_capacity};
        visit(residual, static_cast<std::size_t>(held) * t * d);
        visit(normed, t * d);
        visit(qkv, t * (qw + 2 * kw));
        visit(attn, t * qw);
        visit(synced32, t * d);
        visit(synced, t * d);
        visit(u, t * d);
        visit(router_logits, t * static_cast<std::size_t>(c.num_experts));
        visit(sorted_rows, t * slots);
        visit(offsets, held_experts + 1);
        visit(inverse, t * slots);
        // With expert parallelism the exchange gathers and runs the experts in its own buffers.
        const bool local = !s.expert_parallel;
        visit(gathered, local ? t * slots * d : 0);
        visit(expert_out, t * slots * d);
        const auto parts = static_cast<std::size_t>(std::max<index_t>(s.head_parts, 1));
        const std::size_t chunk = (t + parts - 1) / parts;
        visit(slice, parts > 1 ? chunk * d : 0);
        visit(slices, parts > 1 ? parts * chunk * d : 0);
        visit_bytes(visit, permute_ws, permute_bytes);
        visit_bytes(visit, attention_ws, attention_workspace_bytes(shape, s.max_sequences));
        visit_bytes(visit, experts_ws,
                    local ? grouped_swiglu_workspace_bytes(static_cast<index_t>(t * slots),
                                                           static_cast<index_t>(held_experts), c.intermediate_size)
                          : 0);
    }

private:
    template <class Visit>
    static void visit_bytes(Visit& visit, void*& p, std::size_t bytes)
    {
        auto* bytes_ptr = static_cast<unsigned char*>(p);
        visit(bytes_ptr, bytes);
        p = bytes_ptr;
    }
};

/// The device memory a layer's forward works in: a LayerScratch carved from one allocation, and
/// the permutation plan sized for it. One per model (layers run one after another).
class LayerWorkspace {
public:
    LayerWorkspace(const ModelConfig& c, const LayerSpec& spec) : spec_(spec)
    {
        const index_t held = (spec.group_end < 0 ? c.groups() : spec.group_end) - spec.group_begin;
        require<InvalidArgument>(held > 0 && spec.max_tokens > 0, "layer workspace: ", held, " held groups and ",
                                 spec.max_tokens, " tokens; both must be positive");
        permute_plan_ = PermutePlan(spec.max_tokens * held * c.top_k_per_group(), held * c.experts_per_group());
        ArenaPlan plan;
        scratch_.for_each_buffer(c, spec, permute_plan_.workspace_bytes(), [&](auto*& p, std::size_t n) {
            plan.add<std::remove_reference_t<decltype(*p)>>(n);
        });
        arena_ = DeviceArena(plan.bytes());
        scratch_.for_each_buffer(c, spec, permute_plan_.workspace_bytes(), [&](auto*& p, std::size_t n) {
            p = arena_.take<std::remove_reference_t<decltype(*p)>>(n);
        });
    }
    [[nodiscard]] LayerScratch& scratch() noexcept { return scratch_; }
    [[nodiscard]] const PermutePlan& permute_plan() const noexcept { return permute_plan_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return arena_.bytes(); }
    /// What the buffers were sized for.
    [[nodiscard]] const LayerSpec& spec() const noexcept { return spec_; }

private:
    LayerSpec spec_;
    PermutePlan permute_plan_{0, 1};
    LayerScratch scratch_;
    DeviceArena arena_;
};

/// One FoE (H >= 1) or MoE (H = 1) layer on the device: its weights (bf16), its held groups'
/// KV caches, and the forward over a LayerScratch.
template <DeviceGemmPolicy Gemm>
class Layer {
public:
    /// Uploads the held groups' attention weights, the router and the held experts from the host
    /// views (converted to bf16), and allocates the KV caches. Throws ConfigError for a config
    /// the CUDA kernels cannot run, InvalidArgument for a bad spec.
    Layer(const ModelConfig& config, const LayerWeights& weights, const LayerSpec& spec);

    /// in: [in_streams, T, d] (in_streams 1: the embedding, shared by every group; or streams());
    /// out: [streams(), T, d], T = batch.tokens <= spec.max_tokens. Appends the batch's keys and
    /// values to the caches. `reduce` must be set exactly when other ranks hold groups.
    /// `experts` must be given exactly when the layer was planned expert-parallel; it is then
    /// called even for an empty batch (T = 0: only the exchange runs, so that the ranks holding
    /// the other experts are not left waiting). `heads` must be given exactly when the layer is
    /// head-parallel (spec.head_parts > 1); every rank sharing the heads runs the same batch.
    void forward(Gemm& gemm, const DeviceBatch& batch, const bfloat16* in, index_t in_streams, bfloat16* out,
                 LayerWorkspace& workspace, const DeviceReduce& reduce, cudaStream_t stream,
                 ExpertExchange* experts = nullptr, const HeadParallelComm* heads = nullptr);

    [[nodiscard]] index_t streams() const noexcept { return group_end_ - group_begin_; }
    [[nodiscard]] index_t slots_per_token() const noexcept { return streams() * config_.top_k_per_group(); }
    /// The experts this layer holds: its groups' (local), or its spec's range (expert-parallel).
    [[nodiscard]] index_t expert_begin() const noexcept { return expert_begin_; }
    [[nodiscard]] index_t held_experts() const noexcept { return held_experts_; }
    [[nodiscard]] bool expert_parallel() const noexcept { return spec_.expert_parallel; }
    [[nodiscard]] bool head_parallel() const noexcept { return spec_.head_parts > 1; }
    /// Tokens of a T-token batch this rank routes: T, or its head-parallel slice ceil(T/P) at most.
    [[nodiscard]] index_t routed_tokens(index_t t) const noexcept
    {
        return head_parallel() ? (t + spec_.head_parts - 1) / spec_.head_parts : t;
    }
    [[nodiscard]] index_t group_begin() const noexcept { return group_begin_; }
    [[nodiscard]] std::size_t weight_bytes() const noexcept { return weights_.bytes(); }
    [[nodiscard]] std::size_t cache_bytes() const noexcept { return cache_.bytes(); }
    /// The last forward's routing: experts [T, slots] int32 and weights [T, slots] fp32 on the device
    /// (head-parallel: the rows of this rank's token slice, first).
    [[nodiscard]] const std::int32_t* routed_experts() const noexcept { return routed_experts_; }
    [[nodiscard]] const float* routed_weights() const noexcept { return routed_weights_; }

private:
    struct GroupWeights {
        bfloat16 *qkv = nullptr, *o = nullptr;  // [qw + 2 kw, d]: q_proj, k_proj, v_proj rows; [d, qw]
        bfloat16 *kcache = nullptr, *vcache = nullptr;  // [slots, kv, capacity, hd] or [pages, kv, page, hd]
    };

    ModelConfig config_;
    LayerSpec spec_;
    index_t group_begin_, group_end_;
    index_t expert_begin_ = 0, held_experts_ = 0;
    index_t q_heads_ = 0, kv_heads_ = 0;  // of a group, or of this rank's head share
    DeviceArena weights_, cache_;
    bfloat16 *input_norm_ = nullptr, *post_norm_ = nullptr, *q_norm_ = nullptr, *k_norm_ = nullptr;
    bfloat16* gate_ = nullptr;        // [E, d]
    float* gate_bias_ = nullptr;      // [E], sigmoid only
    bfloat16* gate_up_ = nullptr;     // [held experts, 2f, d]
    bfloat16* down_ = nullptr;        // [held experts, d, f]
    std::int32_t* routed_experts_ = nullptr;  // [max_tokens, slots]
    float* routed_weights_ = nullptr;
    std::vector<GroupWeights> groups_;
};

// ---------------------------------------------------------------------------------------------

namespace detail {

/// Row-major bf16 copy of a (possibly strided) host matrix view.
inline void append_bf16(std::vector<bfloat16>& out, const WeightMatrix& m)
{
    out.reserve(out.size() + static_cast<std::size_t>(m.extent(0) * m.extent(1)));
    for (index_t i = 0; i < m.extent(0); ++i)
        for (index_t j = 0; j < m.extent(1); ++j) out.push_back(bfloat16(m(i, j)));
}
inline void append_bf16(std::vector<bfloat16>& out, VectorView<const float> v)
{
    for (index_t i = 0; i < v.extent(0); ++i) out.push_back(bfloat16(v(i)));
}

/// Uploads a host vector into an arena buffer (synchronous: weights load once).
template <class T>
T* upload_to(DeviceArena& arena, const std::vector<T>& host)
{
    T* p = arena.take<T>(host.size());
    if (!host.empty())
        check(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy (weights)");
    return p;
}

inline void require_device_config(const ModelConfig& c)
{
    c.validate();
    require<ConfigError>(c.num_experts <= RouterLaunch::max_experts, "the CUDA router handles at most ",
                         RouterLaunch::max_experts, " experts; the config has ", c.num_experts);
    require<ConfigError>(c.head_dim % 2 == 0, "the CUDA RoPE needs an even head_dim, got ", c.head_dim);
    require<ConfigError>(c.head_dim <= DecodeAttentionLaunch::max_head_dim, "the CUDA attention handles head_dim up to ",
                         DecodeAttentionLaunch::max_head_dim, ", got ", c.head_dim);
    require<ConfigError>(c.hidden_size % 8 == 0 && c.intermediate_size % 8 == 0 && c.head_dim % 8 == 0,
                         "the CUDA GEMMs need hidden_size (", c.hidden_size, "), intermediate_size (",
                         c.intermediate_size, ") and head_dim (", c.head_dim,
                         ") to be multiples of 8 (16-byte bf16 rows)");
}

}  // namespace detail

template <DeviceGemmPolicy Gemm>
Layer<Gemm>::Layer(const ModelConfig& config, const LayerWeights& w, const LayerSpec& spec)
    : config_(config), spec_(spec), group_begin_(spec.group_begin),
      group_end_(spec.group_end < 0 ? config.groups() : spec.group_end)
{
    detail::require_device_config(config);
    require<InvalidArgument>(0 <= group_begin_ && group_begin_ < group_end_ && group_end_ <= config.groups(),
                             "held groups [", group_begin_, ", ", group_end_, ") are not a non-empty range inside [0, ",
                             config.groups(), ")");
    const index_t per_group = config.experts_per_group();
    expert_begin_ = spec.expert_parallel ? spec.expert_begin : group_begin_ * per_group;
    held_experts_ = spec.expert_parallel ? spec.expert_end - spec.expert_begin : streams() * per_group;
    if (spec.expert_parallel) {
        // One stream: the exchange's combine adds every slot of a token into one output row.
        require<InvalidArgument>(streams() == 1, "an expert-parallel layer holds one group (one stream), not ",
                                 streams());
        require<InvalidArgument>(group_begin_ * per_group <= spec.expert_begin && spec.expert_begin < spec.expert_end &&
                                     spec.expert_end <= group_end_ * per_group,
                                 "expert-parallel layer: experts [", spec.expert_begin, ", ", spec.expert_end,
                                 ") are not a non-empty range of the held group's [", group_begin_ * per_group, ", ",
                                 group_end_ * per_group, ")");
    }
    require<InvalidArgument>(spec.head_parts >= 1 && 0 <= spec.head_part && spec.head_part < spec.head_parts,
                             "head share ", spec.head_part, " of ", spec.head_parts, " is not a share");
    if (spec.head_parts > 1) {
        require<InvalidArgument>(spec.expert_parallel && config.groups() == 1,
                                 "head-parallel attention is the standard-MoE baseline's: it needs one expert group and "
                                 "expert parallelism");
        require<InvalidArgument>(config.num_key_value_heads % spec.head_parts == 0, "head-parallel attention splits ",
                                 config.num_key_value_heads, " KV heads over ", spec.head_parts, " ranks unevenly");
        require<InvalidArgument>(config.qk_norm != QkNorm::full_width,
                                 "head-parallel attention cannot apply a full-width q/k norm to a share of the heads");
    }
    q_heads_ = config.num_attention_heads / config.groups() / spec.head_parts;
    kv_heads_ = config.num_key_value_heads / config.groups() / spec.head_parts;
    require<InvalidArgument>(spec.max_tokens > 0 && spec.max_sequences > 0 && spec.cache_slots > 0 &&
                                 spec.cache_capacity > 0,
                             "layer plan: max_tokens (", spec.max_tokens, "), max_sequences (", spec.max_sequences,
                             "), cache_slots (", spec.cache_slots, ") and cache_capacity (", spec.cache_capacity,
                             ") must be positive");
    require<InvalidArgument>(spec.page_size >= 0 && spec.cache_pages >= 0, "layer plan: page_size (", spec.page_size,
                             ") and cache_pages (", spec.cache_pages, ") must not be negative");
    if (spec.paged())
        require<InvalidArgument>(spec.page_size <= 0x7fffffff && spec.pool_pages() <= 0x7fffffff &&
                                     spec.page_table_width() * spec.page_size <= 0x7fffffff &&
                                     spec.cache_slots * spec.page_table_width() <= 0x7fffffff,
                                 "layer plan: a paged cache of ", spec.pool_pages(), " pages of ", spec.page_size,
                                 " positions for ", spec.cache_slots, " slots of ", spec.cache_capacity,
                                 " positions exceeds int32 block tables");
    const index_t d = config.hidden_size, f = config.intermediate_size, hd = config.head_dim;
    const index_t groups = config.groups(), held = streams();
    // The shapes this layer reads without further checks (the attention slices and experts are
    // checked where they are taken).
    auto require_vector = [](VectorView<const float> v, index_t n, const char* name) {
        require<InvalidArgument>(v.extent(0) == n, name, " has ", v.extent(0), " elements, expected ", n);
    };
    require_vector(w.input_norm, d, "input_layernorm");
    require_vector(w.post_norm, d, "post_attention_layernorm");
    require<InvalidArgument>(w.gate.extent(0) == config.num_experts && w.gate.extent(1) == d, "mlp.gate is [",
                             w.gate.extent(0), ", ", w.gate.extent(1), "], expected [", config.num_experts, ", ", d, "]");
    auto require_matrix = [](const auto& m, index_t rows, index_t cols, const std::string& name) {
        require<InvalidArgument>(m.extent(0) == rows && m.extent(1) == cols, name, " is [", m.extent(0), ", ",
                                 m.extent(1), "], expected [", rows, ", ", cols, "]");
    };
    require_matrix(w.q_proj, config.q_width(), d, "q_proj");
    require_matrix(w.k_proj, config.kv_width(), d, "k_proj");
    require_matrix(w.v_proj, config.kv_width(), d, "v_proj");
    require_matrix(w.o_proj, d, config.q_width(), "o_proj");
    if (config.scoring_func == ScoreFunction::sigmoid)
        require_vector(w.gate_bias, config.num_experts, "mlp.gate.e_score_correction_bias");
    if (config.qk_norm == QkNorm::per_head) {
        require_vector(w.q_norm, hd, "q_norm");
        require_vector(w.k_norm, hd, "k_norm");
    } else if (config.qk_norm == QkNorm::full_width) {
        require_vector(w.q_norm, config.q_width(), "q_norm");
        require_vector(w.k_norm, config.kv_width(), "k_norm");
    }

    // Everything the layer uploads, in bf16 on the host first (fp32 for the sigmoid bias).
    std::vector<bfloat16> input_norm, post_norm, q_norm, k_norm, gate, gate_up, down;
    detail::append_bf16(input_norm, w.input_norm);
    detail::append_bf16(post_norm, w.post_norm);
    if (config.qk_norm != QkNorm::none) {
        detail::append_bf16(q_norm, w.q_norm);
        detail::append_bf16(k_norm, w.k_norm);
    }
    detail::append_bf16(gate, w.gate);
    std::vector<float> bias;
    if (config.scoring_func == ScoreFunction::sigmoid)
        for (index_t e = 0; e < w.gate_bias.extent(0); ++e) bias.push_back(w.gate_bias(e));
    const auto experts = expert_range(
        w, experts::ExpertsSpec{d, f, expert_begin(), expert_begin() + held_experts()});
    for (std::size_t i = 0; i < experts.size(); ++i) {
        const auto& e = experts[i];
        const std::string name = ::foe::detail::concat("expert ", expert_begin() + static_cast<index_t>(i));
        require_matrix(e.gate_proj, f, d, name + " gate_proj");
        require_matrix(e.up_proj, f, d, name + " up_proj");
        require_matrix(e.down_proj, d, f, name + " down_proj");
        detail::append_bf16(gate_up, e.gate_proj);
        detail::append_bf16(gate_up, e.up_proj);
        detail::append_bf16(down, e.down_proj);
    }
    // Per group: q, k and v projections stacked into one [qw + 2 kw, d] matrix, so one GEMM
    // makes the token rows q | k | v that QK-norm, RoPE, the KV append and attention read in place.
    std::vector<std::vector<bfloat16>> qkv(static_cast<std::size_t>(held)), o(qkv.size());
    for (index_t g = 0; g < held; ++g) {
        const auto a = spec.head_parts > 1 ? head_share_weights(config, w, spec.head_part, spec.head_parts)
                                           : head_share_weights(config, w, group_begin_ + g, groups);
        auto& stacked = qkv[static_cast<std::size_t>(g)];
        detail::append_bf16(stacked, a.q_proj);
        detail::append_bf16(stacked, a.k_proj);
        detail::append_bf16(stacked, a.v_proj);
        detail::append_bf16(o[static_cast<std::size_t>(g)], a.o_proj);
    }
    const auto slots_total = static_cast<std::size_t>(spec.max_tokens * slots_per_token());

    ArenaPlan plan;
    for (const auto* h : {&input_norm, &post_norm, &q_norm, &k_norm, &gate, &gate_up, &down})
        plan.add<bfloat16>(h->size());
    plan.add<float>(bias.size());
    for (std::size_t g = 0; g < qkv.size(); ++g)
        for (const auto* h : {&qkv[g], &o[g]}) plan.add<bfloat16>(h->size());
    plan.add<std::int32_t>(slots_total);
    plan.add<float>(slots_total);
    weights_ = DeviceArena(plan.bytes());
    input_norm_ = detail::upload_to(weights_, input_norm);
    post_norm_ = detail::upload_to(weights_, post_norm);
    q_norm_ = detail::upload_to(weights_, q_norm);
    k_norm_ = detail::upload_to(weights_, k_norm);
    gate_ = detail::upload_to(weights_, gate);
    gate_up_ = detail::upload_to(weights_, gate_up);
    down_ = detail::upload_to(weights_, down);
    gate_bias_ = bias.empty() ? nullptr : detail::upload_to(weights_, bias);
    groups_.resize(static_cast<std::size_t>(held));
    for (std::size_t g = 0; g < qkv.size(); ++g) {
        groups_[g].qkv = detail::upload_to(weights_, qkv[g]);
        groups_[g].o = detail::upload_to(weights_, o[g]);
    }
    routed_experts_ = weights_.take<std::int32_t>(slots_total);
    routed_weights_ = weights_.take<float>(slots_total);

    // KV caches, head-major per group: [slots, kv heads of the group, capacity, head_dim], or a
    // pool [pages, kv heads of the group, page_size, head_dim].
    const auto per_cache = static_cast<std::size_t>(
        spec.paged() ? spec.pool_pages() * kv_heads_ * spec.page_size * hd : spec.cache_slots * kv_heads_ * spec.cache_capacity * hd);
    ArenaPlan cache_plan;
    for (index_t g = 0; g < 2 * held; ++g) cache_plan.add<bfloat16>(per_cache);
    cache_ = DeviceArena(cache_plan.bytes());
    for (auto& g : groups_) {
        g.kcache = cache_.take<bfloat16>(per_cache);
        g.vcache = cache_.take<bfloat16>(per_cache);
    }
}

template <DeviceGemmPolicy Gemm>
void Layer<Gemm>::forward(Gemm& gemm, const DeviceBatch& batch, const bfloat16* in, index_t in_streams,
                          bfloat16* out, LayerWorkspace& workspace, const DeviceReduce& reduce, cudaStream_t stream,
                          ExpertExchange* experts, const HeadParallelComm* heads)
{
    LayerScratch& s = workspace.scratch();
    const LayerSpec& ws = workspace.spec();
    require(ws.max_tokens >= spec_.max_tokens && ws.max_sequences >= spec_.max_sequences &&
                ws.cache_capacity >= spec_.cache_capacity && ws.group_begin == spec_.group_begin &&
                (ws.group_end < 0 ? config_.groups() : ws.group_end) == group_end_ &&
                ws.expert_parallel == spec_.expert_parallel && ws.head_parts == spec_.head_parts,
            "layer forward: the workspace was planned for ", ws.max_tokens, " tokens, ", ws.max_sequences,
            " sequences, capacity ", ws.cache_capacity, " and groups [", ws.group_begin, ", ", ws.group_end, ")",
            ws.expert_parallel ? ", expert-parallel" : "", "; the layer needs at least ", spec_.max_tokens, ", ",
            spec_.max_sequences, ", ", spec_.cache_capacity, " and groups [", group_begin_, ", ", group_end_, ")",
            spec_.expert_parallel ? ", expert-parallel" : "");
    const ModelConfig& c = config_;
    const index_t t = batch.tokens, d = c.hidden_size, held = streams(), groups = c.groups();
    const index_t qh = q_heads_, kvh = kv_heads_, hd = c.head_dim;
    const bool tp = head_parallel();
    const index_t qw = qh * hd, kw = kvh * hd, row = qw + 2 * kw;
    const auto eps = static_cast<float>(c.rms_norm_eps);
    require(t <= spec_.max_tokens && batch.sequences <= spec_.max_sequences, "layer forward: ", t, " tokens in ",
            batch.sequences, " sequences exceed the plan's ", spec_.max_tokens, " tokens and ", spec_.max_sequences,
            " sequences");
    require(in_streams == 1 || in_streams == held, "layer forward: ", in_streams, " input streams; it takes 1 or ",
            held);
    require(static_cast<bool>(reduce) == (held < groups), "layer forward: this rank holds ", held, " of ", groups,
            " groups, so a cross-rank reduce must be given ", held < groups ? "" : "not ", "(got ",
            reduce ? "one" : "none", ")");
    require((experts != nullptr) == spec_.expert_parallel, "layer forward: the layer was planned ",
            spec_.expert_parallel ? "expert-parallel, so an expert exchange must be given"
                                  : "with local experts, so no expert exchange may be given");
    require((heads != nullptr) == tp && (!tp || (heads->reduce && heads->gather)), "layer forward: the layer was planned ",
            tp ? "head-parallel, so the heads' reduce and gather must be given" : "with all heads, so no head comm may be given");
    const GroupedExpertWeights held_weights{gate_up_, down_, held_experts_, d, c.intermediate_size};
    if (experts != nullptr) {
        require(experts->expert_begin() == expert_begin_ && experts->expert_count() == held_experts_ &&
                    experts->slots() == slots_per_token() && routed_tokens(t) <= experts->max_tokens(),
                "layer forward: the expert exchange holds experts [", experts->expert_begin(), ", ",
                experts->expert_begin() + experts->expert_count(), ") with ", experts->slots(),
                " slots per token for up to ", experts->max_tokens(), " tokens; the layer holds [", expert_begin_, ", ",
                expert_begin_ + held_experts_, "), routes ", slots_per_token(), " slots and ", routed_tokens(t),
                " tokens");
        if (t == 0) {  // nothing of its own to do, but the peers' rows still come here
            experts->run(held_weights, nullptr, nullptr, nullptr, 0, nullptr, stream);
            return;
        }
    }
    if (t == 0) return;
    require<InvalidArgument>(!spec_.paged() || batch.block_table != nullptr,
                             "layer forward: the layer's KV cache is paged (pages of ", spec_.page_size,
                             " positions) but the batch carries no device block table");
    const auto rows = static_cast<std::size_t>(t * d);
    const AttentionShape shape{qh, kvh, hd, spec_.cache_capacity};

    // r[h] = x[h] + o_h(Attn_h(RMSNorm(x[h]))), group by group.
    for (index_t g = 0; g < held; ++g) {
        const GroupWeights& gw = groups_[static_cast<std::size_t>(g)];
        const bfloat16* x = in + (in_streams == 1 ? 0 : static_cast<std::size_t>(g) * rows);
        bfloat16* r = s.residual + static_cast<std::size_t>(g) * rows;
        rms_norm(x, input_norm_, s.normed, t, d, eps, stream);
        gemm.nt(s.normed, gw.qkv, s.qkv, OutType::bf16, t, row, d, stream, 0.0f);
        bfloat16* q = s.qkv;
        bfloat16* k = s.qkv + qw;
        const bfloat16* v = s.qkv + qw + kw;
        if (c.qk_norm == QkNorm::per_head) {
            rms_norm_qk(q, q_norm_, t, qh, hd, row, eps, stream);
            rms_norm_qk(k, k_norm_, t, kvh, hd, row, eps, stream);
        } else if (c.qk_norm == QkNorm::full_width) {  // one group holds every head (validated)
            rms_norm_strided(q, q_norm_, q, t, 1, qw, row, eps, stream);
            rms_norm_strided(k, k_norm_, k, t, 1, kw, row, eps, stream);
        }
        rope(q, batch.positions, t, qh, hd, row, c.rope_theta, stream);
        rope(k, batch.positions, t, kvh, hd, row, c.rope_theta, stream);
        if (spec_.paged()) {
            // The block table is device memory the caller rewrites before each forward (a decode
            // graph reads whatever it holds at replay); positions it leaves unmapped are not
            // written and not attended to.
            const PagedKvLayout layout{static_cast<std::int32_t>(spec_.page_size),
                                       static_cast<std::int32_t>(spec_.page_table_width()), batch.block_table,
                                       spec_.pool_pages()};
            append_kv(batch, k, v, row, kvh, hd, layout, gw.kcache, gw.vcache, stream);
            attention(shape, layout, batch, q, row, gw.kcache, gw.vcache, s.attention_ws, s.attn, stream);
        } else {
            append_kv(batch, k, v, row, kvh, hd, spec_.cache_capacity, gw.kcache, gw.vcache, stream);
            attention(shape, batch, q, row, gw.kcache, gw.vcache, s.attention_ws, s.attn, stream);
        }
        if (tp) {  // r = x + the fp32 sum over the ranks of their heads' o_proj outputs
            gemm.nt(s.attn, gw.o, s.synced32, OutType::fp32, t, d, qw, stream, 0.0f);
            heads->reduce(s.synced32, rows, stream);
            add_round(x, s.synced32, rows, r, stream);
            continue;
        }
        check(cudaMemcpyAsync(r, x, rows * sizeof(bfloat16), cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync (residual)");
        gemm.nt(s.attn, gw.o, r, OutType::bf16, t, d, qw, stream, 1.0f);
    }

    // rf = (1/H) sum_h r[h]: on the device when this rank holds every group, else an fp32 partial
    // sum reduced over the ranks by the caller's communicator.
    const bfloat16* rf = s.residual;
    if (reduce) {
        stream_sum(s.residual, held, rows, s.synced32, stream);
        reduce(s.synced32, rows, stream);
        scale_round(s.synced32, rows, 1.0f / static_cast<float>(groups), s.synced, stream);
        rf = s.synced;
    } else if (groups > 1) {
        stream_mean(s.residual, held, t, d, groups, s.synced, stream);
        rf = s.synced;
    }
    const RouterArgs args{c.scoring_func == ScoreFunction::sigmoid ? RouterScore::sigmoid : RouterScore::softmax,
                          c.num_experts, groups, c.num_experts_per_tok, group_begin_, group_end_, c.norm_topk_prob};
    if (tp) {
        // This rank's slice of the tokens (equal chunks of ceil(T/P) rows; the last ones may be
        // short or empty) through the experts, then every rank's slice to every rank.
        const index_t chunk = routed_tokens(t);
        const index_t first = std::min(t, spec_.head_part * chunk), mine = std::min(t, first + chunk) - first;
        const bfloat16* rs = rf + static_cast<std::size_t>(first * d);
        if (mine > 0) {
            rms_norm(rs, post_norm_, s.u, mine, d, eps, stream);
            gemm.nt(s.u, gate_, s.router_logits, OutType::fp32, mine, c.num_experts, d, stream, 0.0f);
            route(args, s.router_logits, gate_bias_, mine, routed_experts_, routed_weights_, stream);
        }
        experts->run(held_weights, routed_experts_, routed_weights_, s.u, mine, s.expert_out, stream);
        experts->combine(s.expert_out, routed_weights_, rs, mine, s.slice, stream);
        heads->gather(s.slice, static_cast<std::size_t>(chunk * d), s.slices, stream);
        check(cudaMemcpyAsync(out, s.slices, rows * sizeof(bfloat16), cudaMemcpyDeviceToDevice, stream),
              "cudaMemcpyAsync (gathered slices)");
        return;
    }
    rms_norm(rf, post_norm_, s.u, t, d, eps, stream);

    // Route inside the held groups, group the rows by expert, run the experts, combine.
    const index_t slots = slots_per_token();
    gemm.nt(s.u, gate_, s.router_logits, OutType::fp32, t, c.num_experts, d, stream, 0.0f);
    route(args, s.router_logits, gate_bias_, t, routed_experts_, routed_weights_, stream);
    if (experts != nullptr) {  // the routed rows go to the ranks holding their experts and come back
        experts->run(held_weights, routed_experts_, routed_weights_, s.u, t, s.expert_out, stream);
        experts->combine(s.expert_out, routed_weights_, rf, t, out, stream);
        return;
    }
    permute(workspace.permute_plan(), t * slots, routed_experts_, expert_begin(), s.permute_ws,
            PermuteOutputs{s.sorted_rows, s.offsets, s.inverse}, stream);
    gather_rows(s.u, s.sorted_rows, t * slots, slots, d, s.gathered, stream);
    grouped_swiglu(held_weights, s.offsets, s.gathered, t * slots, s.experts_ws, s.expert_out, stream);
    combine(s.expert_out, s.inverse, routed_weights_, rf, t, d, slots, c.top_k_per_group(), out, stream);
}

}  // namespace foe::cuda
