#pragma once
// Decode attention on the device: one query token per sequence against its KV-cache slot,
// GQA, split over the KV length (split-KV / flash-decoding) with a deterministic second pass.
//
//   pass 1, block (chunk c, query head, sequence b): scores of the chunk's positions, its max m_c,
//           l_c = sum exp(s - m_c), o_c = sum exp(s - m_c) v   -> fp32 workspace
//   pass 2, block (query head, sequence b): M = max m_c; out = sum_c exp(m_c - M) o_c /
//           sum_c exp(m_c - M) l_c, chunks added in order: bit-identical run to run.
//
// Cache layout: a policy (foe/attention/kv_layout.cuh). Contiguous: [slots, kv_heads, capacity,
// head_dim] bf16, head-major as the host's KV cache (foe/attention/kv_cache.hpp): one head's
// positions are contiguous, so the warps of a block stream consecutive positions of one head.
// Paged: the same rows in pages of a pool, found through a device block table; a page's rows
// are contiguous too. Sequence b attends to positions [0, lengths[b]) of slot slots[b]; positions
// the layout does not map (an unassigned page) are masked out and never read, as if absent.
// Query head q uses KV head q / (query_heads / kv_heads). The oracle is the host GqaAttention's
// decode (a float64 loop in the test); paged and contiguous caches of the same rows give the
// same bits (each block reads the same rows and adds them in the same order).
//
// Groups (foe/cuda/groups.cuh): one launch may cover the G groups of an FoE layer, each with its
// query_heads and kv_heads. The grid's head dimension then runs over the folded heads g x
// query_heads + h, and group g reads q + g * groups.in, its caches + g * groups.cache, and writes
// out + g * groups.out; the workspace holds the partials of all G x query_heads heads.

#include <cstdint>

#include "foe/attention/kv_layout.cuh"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/groups.cuh"

namespace foe::cuda {

/// 128 threads = 4 warps per (chunk, head, sequence); a chunk of 256 positions is 64 per warp.
/// At context 2048 that is 8 chunks x heads x sequences blocks: enough to fill 132 SMs with a
/// handful of sequences, which is the point of splitting decode over the KV length.
struct DecodeAttentionLaunch {
    static constexpr int block_threads = 128;
    static constexpr int warps = block_threads / 32;
    static constexpr int chunk = 256;
    static constexpr int max_head_dim = 256;
};

struct DecodeAttentionShape {
    index_t batch = 0;        ///< sequences (one query token each)
    index_t query_heads = 0;
    index_t kv_heads = 0;
    index_t head_dim = 0;
    index_t capacity = 0;     ///< positions per cache slot (paged: the most a sequence holds); sizes the workspace
};

/// Workspace floats: per (sequence, head, chunk) a max, a sum and head_dim partial outputs; for
/// a launch over `groups` groups, per head of every group.
[[nodiscard]] inline std::size_t decode_attention_workspace_bytes(const DecodeAttentionShape& s, index_t groups = 1)
{
    const index_t chunks = (s.capacity + DecodeAttentionLaunch::chunk - 1) / DecodeAttentionLaunch::chunk;
    return static_cast<std::size_t>(s.batch * groups * s.query_heads * chunks * (s.head_dim + 2)) * sizeof(float);
}

namespace detail::decode {
/// Float offset of the partial of (sequence b, folded head, chunk c) in the workspace, over
/// `heads` folded heads (G x query_heads) and `chunks` chunks per head.
[[nodiscard]] FOE_HOST_DEVICE constexpr std::size_t partial_at(int b, int folded, int c, int heads, int chunks,
                                                               int head_dim) noexcept
{
    return ((static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) + static_cast<std::size_t>(folded)) *
                static_cast<std::size_t>(chunks) +
            static_cast<std::size_t>(c)) *
           static_cast<std::size_t>(head_dim + 2);
}
/// Element offset of sequence b's head h of group g in q (row stride q_row_stride) and in out
/// ([batch, query_heads, head_dim] per group).
[[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t q_at(const GroupStrides& gs, int g, int b, int h,
                                                          long long q_row_stride, int head_dim) noexcept
{
    return GroupStrides::at(gs.in, g) + static_cast<std::int64_t>(b) * q_row_stride +
           static_cast<std::int64_t>(h) * head_dim;
}
[[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t out_at(const GroupStrides& gs, int g, int b, int h,
                                                            int query_heads, int head_dim) noexcept
{
    return GroupStrides::at(gs.out, g) +
           (static_cast<std::int64_t>(b) * query_heads + h) * static_cast<std::int64_t>(head_dim);
}
}  // namespace detail::decode

inline namespace kernels_v0_1 {

template <class Layout, class Launch = DecodeAttentionLaunch>
FOE_KERNEL(Launch::block_threads)
void decode_attention_partial_kernel(const bfloat16* __restrict__ q, long long q_row_stride,
                                     const bfloat16* __restrict__ kcache, const bfloat16* __restrict__ vcache,
                                     const std::int32_t* __restrict__ slots, const std::int32_t* __restrict__ lengths,
                                     int query_heads, int kv_heads, int head_dim, Layout layout, int chunks,
                                     float scale, float* partial, GroupStrides groups)
{
    constexpr int chunk = Launch::chunk;
    constexpr float neg_inf = -__builtin_huge_valf();
    __shared__ float qs[Launch::max_head_dim];
    __shared__ float p[chunk];
    __shared__ long long rows[chunk];  // element offset of each position's K/V row; -1: not mapped
    __shared__ float red[Launch::warps];
    // blockIdx.y: the folded head g x query_heads + h.
    const int c = static_cast<int>(blockIdx.x), folded = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
    const HeadFold fold{query_heads};
    const int g = fold.group(folded), h = fold.head(folded);
    kcache += GroupStrides::at(groups.cache, g);
    vcache += GroupStrides::at(groups.cache, g);
    const int len = lengths[b], begin = c * chunk;
    if (begin >= len) return;  // past this sequence's length: pass 2 never reads this chunk
    const int n = min(chunk, len - begin);
    const int kvh = h / (query_heads / kv_heads), slot = slots[b];
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    // Row addresses once per block (one block-table read per position for a paged cache); in a
    // contiguous cache, or within a page, position i + 1's row follows position i's.
    for (int i = static_cast<int>(threadIdx.x); i < n; i += Launch::block_threads)
        rows[i] = layout.offset(slot, kvh, begin + i, kv_heads, head_dim);
    const bfloat16* qh = q + detail::decode::q_at(groups, g, b, h, q_row_stride, head_dim);
    for (int j = static_cast<int>(threadIdx.x); j < head_dim; j += Launch::block_threads)
        qs[j] = static_cast<float>(qh[j]);
    __syncthreads();

    // Scores: one warp per position, lanes over head_dim; the block's warps take consecutive
    // positions, so together they read one contiguous run of the head's keys. An unmapped
    // position scores -inf (weight 0) and its row is not read.
    for (int i = warp; i < n; i += Launch::warps) {
        const long long at = rows[i];
        if (at < 0) {  // the whole warp takes this branch
            if (lane == 0) p[i] = neg_inf;
            continue;
        }
        const bfloat16* k = kcache + at;
        float dot = 0.0f;
        for (int j = lane; j < head_dim; j += 32) dot = fmaf(qs[j], static_cast<float>(k[j]), dot);
        dot = detail::warp_sum(dot);
        if (lane == 0) p[i] = dot * scale;
    }
    __syncthreads();
    float m = neg_inf;
    for (int i = static_cast<int>(threadIdx.x); i < n; i += Launch::block_threads) m = fmaxf(m, p[i]);
    m = detail::warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < Launch::warps; ++w) m = fmaxf(m, red[w]);
    __syncthreads();  // everyone has read red before it is reused
    // A chunk without any mapped position keeps m = -inf, l = 0 and a zero output (pass 2 gives
    // it weight 0); any other chunk subtracts its finite max as before.
    const float m_use = m == neg_inf ? 0.0f : m;
    float l = 0.0f;
    for (int i = static_cast<int>(threadIdx.x); i < n; i += Launch::block_threads) {
        const float e = expf(p[i] - m_use);
        p[i] = e;
        l += e;
    }
    l = detail::warp_sum(l);
    if (lane == 0) red[warp] = l;
    __syncthreads();
    l = 0.0f;
    for (int w = 0; w < Launch::warps; ++w) l += red[w];

    float* out = partial + detail::decode::partial_at(b, folded, c, static_cast<int>(gridDim.y), chunks, head_dim);
    if (threadIdx.x == 0) {
        out[0] = m;
        out[1] = l;
    }
    // Partial output: thread per dimension, positions in order (adjacent threads read adjacent
    // elements of one V row, and consecutive rows are adjacent within a slot or page: coalesced).
    for (int j = static_cast<int>(threadIdx.x); j < head_dim; j += Launch::block_threads) {
        const bfloat16* v = vcache + j;
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) {
            const long long at = rows[i];
            if (at >= 0) acc = fmaf(p[i], static_cast<float>(v[at]), acc);
        }
        out[2 + j] = acc;
    }
}

template <class Launch = DecodeAttentionLaunch>
FOE_KERNEL(Launch::block_threads)
void decode_attention_reduce_kernel(const float* __restrict__ partial, const std::int32_t* __restrict__ lengths,
                                    int query_heads, int head_dim, int chunks, bfloat16* out, GroupStrides groups)
{
    // blockIdx.x: the folded head g x query_heads + h, as in pass 1.
    const int folded = static_cast<int>(blockIdx.x), b = static_cast<int>(blockIdx.y);
    const HeadFold fold{query_heads};
    const int g = fold.group(folded), h = fold.head(folded);
    // Pass 1 ran `chunks` chunks (the planned capacity): never read a partial past them, even for
    // a length past the capacity (the host refuses one; the device must not read out of bounds).
    const int used = min((lengths[b] + Launch::chunk - 1) / Launch::chunk, chunks);
    const float* part = partial + detail::decode::partial_at(b, folded, 0, static_cast<int>(gridDim.x), chunks, head_dim);
    const std::size_t stride = static_cast<std::size_t>(head_dim + 2);
    float m = -__int_as_float(0x7f800000);
    for (int c = 0; c < used; ++c) m = fmaxf(m, part[c * stride]);
    // No mapped position in any chunk (a paged cache without pages for the sequence) leaves
    // m = -inf: subtract 0 instead, so the weights are 0, not NaN, and the output zeros.
    if (m == -__int_as_float(0x7f800000)) m = 0.0f;
    float l = 0.0f;
    for (int c = 0; c < used; ++c) l += part[c * stride + 1] * expf(part[c * stride] - m);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // an empty sequence (length 0) gets zeros
    bfloat16* o = out + detail::decode::out_at(groups, g, b, h, query_heads, head_dim);
    for (int j = static_cast<int>(threadIdx.x); j < head_dim; j += Launch::block_threads) {
        float acc = 0.0f;
        for (int c = 0; c < used; ++c) acc = fmaf(part[c * stride + 2 + j], expf(part[c * stride] - m), acc);
        o[j] = bfloat16(acc * inv);
    }
}

}  // namespace kernels_v0_1

/// out [batch, query_heads, head_dim] (contiguous) = decode attention of q against the caches
/// of `layout`: for a ContiguousKvLayout [slots, kv_heads, capacity, head_dim], for a
/// PagedKvLayout the pools [pages, kv_heads, page_size, head_dim] read through its device block
/// table. q's row b (sequence b's query_heads x head_dim values) starts at q + b * q_row_stride,
/// q_row_stride >= query_heads * head_dim (a larger stride reads q as the column slice of a fused
/// qkv buffer). slots and lengths are device int32 [batch], 0 <= lengths[b] <= s.capacity
/// (positions the layout does not map are masked out and not read; a sequence with none mapped
/// gets zeros). workspace: decode_attention_workspace_bytes(shape) bytes. Kernel arguments only:
/// capturable in a CUDA graph, and the device arrays (block table included) may change between
/// replays. `groups`: one launch over groups.count groups of s's heads each (q, the caches and
/// out shifted by groups.in, .cache and .out per group; the layout and block table shared); the
/// workspace then holds decode_attention_workspace_bytes(s, groups.count) bytes.
template <KvLayout Layout>
void decode_attention(const DecodeAttentionShape& s, const Layout& layout, const bfloat16* q, index_t q_row_stride,
                      const bfloat16* kcache, const bfloat16* vcache, const std::int32_t* slots,
                      const std::int32_t* lengths, void* workspace, bfloat16* out, cudaStream_t stream,
                      const GroupStrides& groups = {})
{
    require(groups.count >= 1 && static_cast<index_t>(groups.count) * s.query_heads <= 65535, "decode_attention: ",
            groups.count, " groups of ", s.query_heads, " query heads exceed the grid's 65535");
    require(s.kv_heads > 0 && s.query_heads % s.kv_heads == 0, "decode_attention: ", s.query_heads,
            " query heads are not a multiple of ", s.kv_heads, " KV heads");
    require(s.head_dim > 0 && s.head_dim <= DecodeAttentionLaunch::max_head_dim, "decode_attention: head_dim ",
            s.head_dim, " outside [1, ", DecodeAttentionLaunch::max_head_dim, "]");
    require(s.batch >= 0 && s.batch <= 65535 && s.query_heads <= 65535 && s.capacity > 0 && s.capacity <= 0x7fffffff,
            "decode_attention: bad shape");
    require(q_row_stride >= s.query_heads * s.head_dim, "decode_attention: q_row_stride ", q_row_stride,
            " is less than query_heads * head_dim = ", s.query_heads * s.head_dim);
    layout.check("decode_attention");
    if (s.batch == 0) return;
    const auto chunks = static_cast<int>((s.capacity + DecodeAttentionLaunch::chunk - 1) / DecodeAttentionLaunch::chunk);
    const float scale = 1.0f / sqrtf(static_cast<float>(s.head_dim));
    auto* partial = static_cast<float*>(workspace);
    const auto heads = static_cast<unsigned>(groups.count * s.query_heads);  // folded over the groups
    const dim3 grid1(static_cast<unsigned>(chunks), heads, static_cast<unsigned>(s.batch));
    decode_attention_partial_kernel<Layout><<<grid1, DecodeAttentionLaunch::block_threads, 0, stream>>>(
        q, static_cast<long long>(q_row_stride), kcache, vcache, slots, lengths, static_cast<int>(s.query_heads),
        static_cast<int>(s.kv_heads), static_cast<int>(s.head_dim), layout, chunks, scale, partial, groups);
    check_launch("decode_attention_partial_kernel");
    const dim3 grid2(heads, static_cast<unsigned>(s.batch));
    decode_attention_reduce_kernel<<<grid2, DecodeAttentionLaunch::block_threads, 0, stream>>>(
        partial, lengths, static_cast<int>(s.query_heads), static_cast<int>(s.head_dim), chunks, out, groups);
    check_launch("decode_attention_reduce_kernel");
}

/// The same over a contiguous cache [slots, kv_heads, s.capacity, head_dim].
inline void decode_attention(const DecodeAttentionShape& s, const bfloat16* q, index_t q_row_stride,
                             const bfloat16* kcache, const bfloat16* vcache, const std::int32_t* slots,
                             const std::int32_t* lengths, void* workspace, bfloat16* out, cudaStream_t stream)
{
    require(s.capacity > 0 && s.capacity <= 0x7fffffff, "decode_attention: capacity ", s.capacity,
            " outside [1, 2^31)");
    decode_attention(s, ContiguousKvLayout{static_cast<std::int32_t>(s.capacity)}, q, q_row_stride, kcache, vcache,
                     slots, lengths, workspace, out, stream);
}

/// The same with q contiguous [batch, query_heads, head_dim].
inline void decode_attention(const DecodeAttentionShape& s, const bfloat16* q, const bfloat16* kcache,
                             const bfloat16* vcache, const std::int32_t* slots, const std::int32_t* lengths,
                             void* workspace, bfloat16* out, cudaStream_t stream)
{
    decode_attention(s, q, s.query_heads * s.head_dim, kcache, vcache, slots, lengths, workspace, out, stream);
}

}  // namespace foe::cuda
