#pragma once
// CudaGqaAttention: the device implementation of the attention policy, over every group of an FoE
// layer that this rank holds (the host's GqaAttention is one instance per group; on one GPU the
// G groups run as one, so a forward costs the launches of one group, not G times them).
//
// For the batch's T tokens and the held groups g = 0..G-1 (x has 1 stream, shared by every group,
// or G streams):
//   xn        = RMSNorm(x[g])                 one launch over every stream (1 stream: T rows)
//   q|k|v     = xn [q_g; k_g; v_g]^T          one GEMM: 1 stream with one input norm shared by
//                                              the groups: xn [T, d] times the groups' stacked
//                                              [G row, d] weights gives [T, G row], group g's
//                                              q|k|v at column g row; otherwise one batched GEMM
//                                              [G, T, row] (row = q width + 2 kv width)
//   QK-norm   per head or full width          one launch for q, one for k (every group)
//   RoPE      q and k at each position         one launch (a group's k heads follow its q heads)
//   append    k, v to group g's KV cache       one launch
//   attention causal GQA (prefill / decode)    one launch (decode: split-KV, two)
//   out[g]   += attn[g] o_g^T                  one batched GEMM, beta 1
//
// forward_partial() is the head-parallel form (MoeHeadParallelLayer: one instance over a rank's
// share of the heads, G = 1): the same steps, but out = attn o^T is written in fp32 (one GEMM,
// beta 0) for the ranks to sum before anything is rounded to bf16.
//
// The kernels take the group as a grid dimension or a folded head index (foe/cuda/groups.cuh):
// group g reads its q|k|v columns, its cache and its weights at fixed strides from group 0's, so
// each group computes exactly what a launch of its own would (the host replays of these index
// rules are in tests/cuda/test_cuda_attention.cu). With foe's tensor-core GEMM (TcGemm), whose
// sums do not depend on N or the batch, the output is bit for bit what a loop over the groups
// gives; through cuBLASLt it is equal within bf16 tolerance.
//
// Memory: the weights (bf16) and the held groups' KV caches are planned at construction, each in
// one DeviceArena; a forward takes scratch_bytes() from the context's scratch and allocates
// nothing, so a decode step is capturable in a CUDA graph. The KV cache is the Cache policy:
// ContiguousKvCache, [G][slots, kv heads, capacity, head_dim], or PagedKvCache, G pools
// [pages, kv heads, page_size, head_dim] addressed through DeviceBatch::block_table ([slots,
// ceil(capacity / page_size)], shared by the groups).

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/attention/decode_attention.cuh"
#include "foe/attention/kv_append.cuh"
#include "foe/attention/kv_cache.hpp"
#include "foe/attention/kv_layout.cuh"
#include "foe/attention/prefill_attention.cuh"
#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/groups.cuh"
#include "foe/cuda/upload.cuh"
#include "foe/ops/rmsnorm.cuh"
#include "foe/ops/rope.cuh"

namespace foe::attention {

/// Where one forward's operands of G groups lie, from the input's streams and whether the groups
/// share one input norm: plain C++, so the host tests check it against the per-group layout.
struct GqaGroupPlan {
    bool fused = false;        ///< one GEMM over the stacked weights: qkv [T, G row]; else [G, T, row]
    index_t qkv_row = 0;       ///< elements between consecutive tokens' rows in qkv
    index_t qkv_group = 0;     ///< elements between group g's and g + 1's q|k|v of one token
    index_t normed_group = 0;  ///< elements between groups' normed rows (0: one normed x for all)

    /// For G groups of `row` q|k|v elements each, T tokens of width d, `streams` input streams.
    [[nodiscard]] static constexpr GqaGroupPlan make(index_t groups, index_t row, index_t tokens, index_t d,
                                                     index_t streams, bool shared_norm) noexcept
    {
        if (streams == 1 && shared_norm) return {true, groups * row, row, 0};
        return {false, row, tokens * row, tokens * d};
    }
    /// Element offset of group g's q|k|v row of token t, column c (c < row).
    [[nodiscard]] constexpr index_t qkv_at(index_t g, index_t t, index_t c) const noexcept
    {
        return g * qkv_group + t * qkv_row + c;
    }
};

/// Grouped-query attention of the held groups of one layer on the device.
template <cuda::DeviceBatchedGemmPolicy Gemm = cuda::LtGemm, class Cache = ContiguousKvCache>
class CudaGqaAttention {
    static_assert(std::is_same_v<Cache, ContiguousKvCache> || std::is_same_v<Cache, PagedKvCache>,
                  "CudaGqaAttention's Cache is ContiguousKvCache or PagedKvCache (the layout of the device caches)");

public:
    using backend = CudaBackend;
    using cache_type = Cache;
    static constexpr bool covers_groups = true;  ///< one instance runs every held group
    static constexpr bool paged = std::is_same_v<Cache, PagedKvCache>;

    /// spec: ONE group's shape (its q_heads and kv_heads, head_dim, qk_norm, eps, rope_theta, the
    /// cache's slots and capacity, page_size / cache_pages for a paged cache, max_tokens,
    /// max_sequences). groups: the held groups' weights (host views of any dtype, uploaded as
    /// bf16), in held order. Throws ConfigError for a shape the kernels cannot run, InvalidArgument
    /// naming the tensor and its expected shape for a weight of the wrong shape.
    CudaGqaAttention(const AttentionSpec& spec, std::span<const AttentionWeights> groups);

    /// Transient device bytes one forward takes from ctx.scratch (for spec.max_tokens tokens and
    /// spec.max_sequences sequences, whichever input streams).
    [[nodiscard]] std::size_t scratch_bytes() const;

    /// x: [1 or G, T, d] bf16 device (1 stream: every group reads it); out: [G, T, d]; rows
    /// contiguous, streams any stride. ACCUMULATES out[g] += o_g(Attn_g(RMSNorm(x[g]))) (the o_proj
    /// GEMM with beta 1: a layer that copied x into out gets the residual x + Attn(x)). Appends the
    /// batch's keys and values to every group's cache. T = batch.tokens <= spec.max_tokens
    /// (CapacityError otherwise), batch.sequences <= spec.max_sequences. Enqueued on ctx.stream;
    /// no host synchronisation, no allocation.
    void forward(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x, TensorView<bfloat16, 3> out,
                 const cuda::DeviceContext& ctx);

    /// One group only (a rank's share of the heads in head-parallel attention, MoeHeadParallelLayer):
    /// the same steps as forward() on x [T, d], but the o_proj GEMM WRITES its fp32 output,
    /// out [T, d] = o(Attn(RMSNorm(x))) (beta 0, no bf16 rounding): the partial attention output
    /// that the ranks sum in fp32 before it is added to the residual. x and out row-major with
    /// contiguous rows; appends the batch's keys and values to the cache; same scratch as
    /// forward() (scratch_bytes()). InvalidArgument for an instance of several groups, the
    /// capacity and shape errors of forward(). T = 0 enqueues nothing.
    void forward_partial(const cuda::DeviceBatch& batch, MatrixView<const bfloat16> x, MatrixView<float> out,
                         const cuda::DeviceContext& ctx);

    [[nodiscard]] const AttentionSpec& spec() const noexcept { return spec_; }
    [[nodiscard]] index_t groups() const noexcept { return groups_; }
    [[nodiscard]] std::size_t weight_bytes() const noexcept { return weights_.bytes(); }
    [[nodiscard]] std::size_t cache_bytes() const noexcept { return cache_.bytes(); }
    /// Whether every group has the same input norm (then one stream needs one norm and one GEMM).
    [[nodiscard]] bool shared_input_norm() const noexcept { return shared_norm_; }

    /// Device caches: group g's keys at kcache() + g * group_cache_elements() (values alike),
    /// [slots, kv heads, capacity, head_dim] or a pool [pages, kv heads, page_size, head_dim].
    [[nodiscard]] const bfloat16* kcache() const noexcept { return kcache_; }
    [[nodiscard]] const bfloat16* vcache() const noexcept { return vcache_; }
    [[nodiscard]] index_t group_cache_elements() const noexcept { return per_cache_; }
    /// Pool pages of each group's paged cache; block-table row length.
    [[nodiscard]] index_t pool_pages() const noexcept { return pool_pages_; }
    [[nodiscard]] index_t page_table_width() const noexcept { return table_width_; }

private:
    /// forward()'s steps up to the o_proj GEMM for x [1 or G, T > 0, d] (checked by the caller):
    /// input norm, q|k|v, QK-norm, RoPE, KV append and attention. Returns attn [G, T, q width],
    /// taken from ctx.scratch.
    const bfloat16* attend(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x,
                           const cuda::DeviceContext& ctx);

    /// The kernels' shape. Its capacity sizes the split-KV decode's chunks and workspace, so for a
    /// paged cache it is every position a block-table row can map (width x page_size, which the
    /// host's Batch::check_pages admits), not only cache_capacity: a sequence grown past
    /// cache_capacity in its last page must not make the decode read past its partials.
    [[nodiscard]] cuda::AttentionShape shape() const noexcept
    {
        return {spec_.q_heads, spec_.kv_heads, spec_.head_dim,
                paged ? table_width_ * spec_.page_size : spec_.cache_capacity};
    }

    AttentionSpec spec_;
    index_t groups_ = 0;
    index_t qw_ = 0, kw_ = 0, row_ = 0;  // q width, kv width, q|k|v row of one group
    index_t qk_norm_width_ = 0, k_norm_width_ = 0;
    index_t per_cache_ = 0, pool_pages_ = 0, table_width_ = 0;
    bool shared_norm_ = true;
    cuda::DeviceArena weights_, cache_;
    bfloat16* input_norm_ = nullptr;  // [1 or G, d]
    bfloat16* q_norm_ = nullptr;      // [G, head_dim or q width]
    bfloat16* k_norm_ = nullptr;      // [G, head_dim or kv width]
    bfloat16* qkv_ = nullptr;         // [G, row, d]: q_proj, k_proj, v_proj rows of each group
    bfloat16* o_ = nullptr;           // [G, d, q width]
    bfloat16* kcache_ = nullptr;      // [G, per_cache_]
    bfloat16* vcache_ = nullptr;
};

// ---------------------------------------------------------------------------------------------

namespace detail {


}  // namespace detail

template <cuda::DeviceBatchedGemmPolicy Gemm, class Cache>
CudaGqaAttention<Gemm, Cache>::CudaGqaAttention(const AttentionSpec& spec, std::span<const AttentionWeights> groups)
    : spec_(spec), groups_(static_cast<index_t>(groups.size()))
{
    const index_t d = spec.hidden_size, hd = spec.head_dim, qh = spec.q_heads, kvh = spec.kv_heads;
    require<ConfigError>(groups_ > 0 && groups_ <= 65535, "device attention: ", groups_,
                         " held groups; between 1 and 65535");
    require<ConfigError>(kvh > 0 && qh > 0 && qh % kvh == 0, "device attention: ", qh,
                         " query heads are not a positive multiple of ", kvh, " KV heads");
    require<ConfigError>(groups_ * qh <= 65535, "device attention: ", groups_, " groups x ", qh,
                         " query heads exceed the 65535 heads one launch covers");
    require<ConfigError>(hd > 0 && hd % 8 == 0 && hd <= cuda::DecodeAttentionLaunch::max_head_dim,
                         "device attention: head_dim ", hd, " must be a multiple of 8 (16-byte rows, even for RoPE) "
                         "and at most ", cuda::DecodeAttentionLaunch::max_head_dim);
    require<ConfigError>(d > 0 && d % 8 == 0, "device attention: hidden_size ", d,
                         " must be a positive multiple of 8 (16-byte bf16 rows)");
    require<ConfigError>(spec.cache_slots > 0 && spec.cache_capacity > 0 && spec.cache_capacity <= 0x7fffffff,
                         "device attention: the KV cache needs at least one slot (got ", spec.cache_slots,
                         ") and a capacity in [1, 2^31) (got ", spec.cache_capacity, ")");
    require<ConfigError>(spec.max_tokens > 0 && spec.max_tokens <= 0x7fffffff && spec.max_sequences > 0 &&
                             spec.max_sequences <= 65535,
                         "device attention: max_tokens (", spec.max_tokens, ") must be in [1, 2^31) and max_sequences (",
                         spec.max_sequences, ") in [1, 65535]");
    qw_ = qh * hd;
    kw_ = kvh * hd;
    row_ = qw_ + 2 * kw_;

    // Weights, each checked by name against the shape it must have.
    auto require_vector = [](VectorView<const float> v, index_t n, index_t g, const char* name) {
        require<InvalidArgument>(v.extent(0) == n, "group ", g, " attention weight ", name, " has shape [",
                                 v.extent(0), "], expected [", n, "]");
    };
    auto require_matrix = [](const WeightMatrix& m, index_t rows, index_t cols, index_t g, const char* name) {
        require<InvalidArgument>(m.extent(0) == rows && m.extent(1) == cols, "group ", g, " attention weight ", name,
                                 " has shape [", m.extent(0), ", ", m.extent(1), "], expected [", rows, ", ", cols, "]");
    };
    qk_norm_width_ = spec.qk_norm == QkNorm::per_head ? hd : spec.qk_norm == QkNorm::full_width ? qw_ : 0;
    k_norm_width_ = spec.qk_norm == QkNorm::per_head ? hd : spec.qk_norm == QkNorm::full_width ? kw_ : 0;
    std::vector<bfloat16> input_norm, q_norm, k_norm, qkv, o;
    for (index_t g = 0; g < groups_; ++g) {
        const AttentionWeights& w = groups[static_cast<std::size_t>(g)];
        require_vector(w.input_norm, d, g, "input_layernorm");
        require_matrix(w.q_proj, qw_, d, g, "q_proj");
        require_matrix(w.k_proj, kw_, d, g, "k_proj");
        require_matrix(w.v_proj, kw_, d, g, "v_proj");
        require_matrix(w.o_proj, d, qw_, g, "o_proj");
        if (spec.qk_norm != QkNorm::none) {
            require_vector(w.q_norm, qk_norm_width_, g, "q_norm");
            require_vector(w.k_norm, k_norm_width_, g, "k_norm");
            cuda::append_bf16(q_norm, w.q_norm);
            cuda::append_bf16(k_norm, w.k_norm);
        }
        cuda::append_bf16(input_norm, w.input_norm);
        // q, k and v stacked: [row, d] per group, [G row, d] for all (one GEMM's weights).
        cuda::append_bf16(qkv, w.q_proj);
        cuda::append_bf16(qkv, w.k_proj);
        cuda::append_bf16(qkv, w.v_proj);
        cuda::append_bf16(o, w.o_proj);
    }
    // One input norm for every group when their bf16 weights are equal (an FoE layer's groups
    // share input_layernorm): one stream then needs one norm and one q|k|v GEMM.
    const auto du = static_cast<std::size_t>(d);
    shared_norm_ = true;
    for (std::size_t g = 1; g < groups.size() && shared_norm_; ++g)
        for (std::size_t j = 0; j < du; ++j)
            if (input_norm[g * du + j].bits != input_norm[j].bits) {
                shared_norm_ = false;
                break;
            }
    if (shared_norm_) input_norm.resize(du);

    cuda::ArenaPlan plan;
    for (const auto* h : {&input_norm, &q_norm, &k_norm, &qkv, &o}) plan.add<bfloat16>(h->size());
    weights_ = cuda::DeviceArena(plan.bytes());
    input_norm_ = cuda::upload_to(weights_, input_norm);
    q_norm_ = cuda::upload_to(weights_, q_norm);
    k_norm_ = cuda::upload_to(weights_, k_norm);
    qkv_ = cuda::upload_to(weights_, qkv);
    o_ = cuda::upload_to(weights_, o);

    // KV caches: G equal caches back to back, keys then values.
    if constexpr (paged) {
        require<ConfigError>(spec.page_size > 0 && spec.page_size <= 0x7fffffff && spec.cache_pages >= 0,
                             "device attention: KV page size (", spec.page_size, ") must be positive and pages (",
                             spec.cache_pages, ") not negative");
        table_width_ = (spec.cache_capacity + spec.page_size - 1) / spec.page_size;
        pool_pages_ = spec.cache_pages > 0 ? spec.cache_pages : spec.cache_slots * table_width_;
        require<ConfigError>(pool_pages_ <= 0x7fffffff && table_width_ * spec.page_size <= 0x7fffffff &&
                                 spec.cache_slots * table_width_ <= 0x7fffffff,
                             "device attention: a paged cache of ", pool_pages_, " pages of ", spec.page_size,
                             " positions for ", spec.cache_slots, " slots of ", spec.cache_capacity,
                             " positions exceeds int32 block tables");
        per_cache_ = pool_pages_ * kvh * spec.page_size * hd;
    } else {
        per_cache_ = spec.cache_slots * kvh * spec.cache_capacity * hd;
    }
    const auto all = static_cast<std::size_t>(groups_ * per_cache_);
    cuda::ArenaPlan cache_plan;
    cache_plan.add<bfloat16>(all);
    cache_plan.add<bfloat16>(all);
    cache_ = cuda::DeviceArena(cache_plan.bytes());
    kcache_ = cache_.take<bfloat16>(all);
    vcache_ = cache_.take<bfloat16>(all);
}

template <cuda::DeviceBatchedGemmPolicy Gemm, class Cache>
std::size_t CudaGqaAttention<Gemm, Cache>::scratch_bytes() const
{
    // The unfused plan's sizes (normed per group), which bound the fused plan's.
    const auto t = static_cast<std::size_t>(spec_.max_tokens), g = static_cast<std::size_t>(groups_);
    const std::size_t bf = sizeof(bfloat16);
    return cuda::align_up(g * t * static_cast<std::size_t>(spec_.hidden_size) * bf) +
           cuda::align_up(g * t * static_cast<std::size_t>(row_) * bf) +
           cuda::align_up(g * t * static_cast<std::size_t>(qw_) * bf) +
           cuda::align_up(cuda::attention_workspace_bytes(shape(), spec_.max_sequences, groups_));
}

template <cuda::DeviceBatchedGemmPolicy Gemm, class Cache>
void CudaGqaAttention<Gemm, Cache>::forward(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x,
                                            TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx)
{
    const index_t t = batch.tokens, d = spec_.hidden_size, g = groups_;
    require<CapacityError>(t <= spec_.max_tokens && batch.sequences <= spec_.max_sequences, "device attention: ", t,
                           " tokens in ", batch.sequences, " sequences exceed the plan's ", spec_.max_tokens,
                           " tokens and ", spec_.max_sequences, " sequences");
    const index_t streams = x.extent(0);
    require<InvalidArgument>((streams == 1 || streams == g) && x.extent(1) == t && x.extent(2) == d,
                             "device attention input is [", x.extent(0), ", ", x.extent(1), ", ", x.extent(2),
                             "], expected [1 or ", g, ", ", t, ", ", d, "]");
    require<InvalidArgument>(out.extent(0) == g && out.extent(1) == t && out.extent(2) == d,
                             "device attention output is [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2),
                             "], expected [", g, ", ", t, ", ", d, "]");
    require<InvalidArgument>((t <= 1 || (x.stride(1) == d && out.stride(1) == d)) && x.stride(2) == 1 &&
                                 out.stride(2) == 1 && x.stride(0) >= 0 && out.stride(0) >= 0,
                             "device attention: input and output rows must be contiguous (row strides ", x.stride(1),
                             " and ", out.stride(1), ", expected ", d, ")");
    if (t == 0) return;
    const bfloat16* attn = attend(batch, x, ctx);

    // out[g] += attn[g] o_g^T, every group in one GEMM.
    ctx.template gemm<Gemm>().nt_batched(attn, t * qw_, o_, d * qw_, out.data(), out.stride(0), g, cuda::OutType::bf16,
                                         t, d, qw_, ctx.stream, 1.0f);
}

template <cuda::DeviceBatchedGemmPolicy Gemm, class Cache>
void CudaGqaAttention<Gemm, Cache>::forward_partial(const cuda::DeviceBatch& batch, MatrixView<const bfloat16> x,
                                                    MatrixView<float> out, const cuda::DeviceContext& ctx)
{
    const index_t t = batch.tokens, d = spec_.hidden_size;
    require<InvalidArgument>(groups_ == 1, "device attention: forward_partial runs one group (a rank's share of the "
                                           "heads); this instance holds ", groups_);
    require<CapacityError>(t <= spec_.max_tokens && batch.sequences <= spec_.max_sequences, "device attention: ", t,
                           " tokens in ", batch.sequences, " sequences exceed the plan's ", spec_.max_tokens,
                           " tokens and ", spec_.max_sequences, " sequences");
    require<InvalidArgument>(x.extent(0) == t && x.extent(1) == d && out.extent(0) == t && out.extent(1) == d,
                             "device attention: the partial forward's input is ", format_shape(x.shape()),
                             " and output ", format_shape(out.shape()), ", expected [", t, ", ", d, "]");
    require<InvalidArgument>((t <= 1 || (x.stride(0) == d && out.stride(0) == d)) && x.stride(1) == 1 &&
                                 out.stride(1) == 1,
                             "device attention: input and output rows must be contiguous (row strides ", x.stride(0),
                             " and ", out.stride(0), ", expected ", d, ")");
    if (t == 0) return;
    const bfloat16* attn = attend(batch, TensorView<const bfloat16, 3>(x.data(), {1, t, d}), ctx);

    // out = attn o^T in fp32 (beta 0): one plain GEMM, what the layer's head-parallel path ran.
    ctx.template gemm<Gemm>().nt(attn, o_, out.data(), cuda::OutType::fp32, t, d, qw_, ctx.stream, 0.0f);
}

template <cuda::DeviceBatchedGemmPolicy Gemm, class Cache>
const bfloat16* CudaGqaAttention<Gemm, Cache>::attend(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x,
                                                      const cuda::DeviceContext& ctx)
{
    const index_t t = batch.tokens, d = spec_.hidden_size, g = groups_, hd = spec_.head_dim;
    const index_t qh = spec_.q_heads, kvh = spec_.kv_heads;
    const index_t streams = x.extent(0);
    require<InvalidArgument>(!paged || batch.block_table != nullptr, "device attention: the KV cache is paged (pages of ",
                             spec_.page_size, " positions) but the batch carries no device block table");
    require<InvalidArgument>(ctx.scratch != nullptr, "device attention: the context has no scratch");

    const cudaStream_t stream = ctx.stream;
    const auto eps = spec_.rms_norm_eps;
    const GqaGroupPlan plan = GqaGroupPlan::make(g, row_, t, d, streams, shared_norm_);
    Gemm& gemm = ctx.template gemm<Gemm>();
    bfloat16* normed = ctx.take<bfloat16>(static_cast<std::size_t>((plan.fused ? 1 : g) * t * d));
    bfloat16* qkv = ctx.take<bfloat16>(static_cast<std::size_t>(g * t * row_));
    bfloat16* attn = ctx.take<bfloat16>(static_cast<std::size_t>(g * t * qw_));
    void* workspace = ctx.take<unsigned char>(cuda::attention_workspace_bytes(shape(), batch.sequences, g));

    // RMSNorm of every stream, one launch: 1 stream and a shared norm, T rows; otherwise group g
    // normalises its stream (stream 0 when there is one) with its own weight.
    const index_t x_stream = streams == 1 ? 0 : x.stride(0);
    cuda::rms_norm(x.data(), input_norm_, normed, t, d, eps, stream,
                   plan.fused ? cuda::GroupStrides{}
                              : cuda::GroupStrides{static_cast<int>(g), x_stream, plan.normed_group, 0,
                                                   shared_norm_ ? 0 : d});
    // q|k|v of every group, one GEMM.
    if (plan.fused)
        gemm.nt(normed, qkv_, qkv, cuda::OutType::bf16, t, g * row_, d, stream, 0.0f);
    else
        gemm.nt_batched(normed, plan.normed_group, qkv_, row_ * d, qkv, plan.qkv_group, g, cuda::OutType::bf16, t,
                        row_, d, stream, 0.0f);

    bfloat16* q = qkv;
    bfloat16* k = qkv + qw_;
    const bfloat16* v = qkv + qw_ + kw_;
    const index_t stride = plan.qkv_row;
    const cuda::GroupStrides rows{static_cast<int>(g), plan.qkv_group, plan.qkv_group, 0, 0};
    if (spec_.qk_norm == QkNorm::per_head) {
        cuda::GroupStrides qs = rows, ks = rows;
        qs.weight = hd;
        ks.weight = hd;
        cuda::rms_norm_qk(q, q_norm_, t, qh, hd, stride, eps, stream, qs);
        cuda::rms_norm_qk(k, k_norm_, t, kvh, hd, stride, eps, stream, ks);
    } else if (spec_.qk_norm == QkNorm::full_width) {
        cuda::GroupStrides qs = rows, ks = rows;
        qs.weight = qw_;
        ks.weight = kw_;
        cuda::rms_norm_strided(q, q_norm_, q, t, 1, qw_, stride, eps, stream, qs);
        cuda::rms_norm_strided(k, k_norm_, k, t, 1, kw_, stride, eps, stream, ks);
    }
    // A group's k heads follow its q heads in its row: one rotation over qh + kvh heads (each
    // head's rotation is independent, so this is what two launches give).
    cuda::rope(q, batch.positions, t, qh + kvh, hd, stride, spec_.rope_theta, stream, rows);

    cuda::GroupStrides at = rows;
    at.cache = per_cache_;
    at.out = t * qw_;  // attn [G, T, q width]
    const auto run = [&](const auto& layout) {
        cuda::append_kv(batch, k, v, stride, kvh, hd, layout, kcache_, vcache_, stream, at);
        cuda::attention(shape(), layout, batch, q, stride, kcache_, vcache_, workspace, attn, stream, at);
    };
    if constexpr (paged)
        run(cuda::PagedKvLayout{static_cast<std::int32_t>(spec_.page_size), static_cast<std::int32_t>(table_width_),
                                batch.block_table, pool_pages_});
    else
        run(cuda::ContiguousKvLayout{static_cast<std::int32_t>(spec_.cache_capacity)});
    return attn;
}

}  // namespace foe::attention
