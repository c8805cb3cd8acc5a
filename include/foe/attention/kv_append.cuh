#pragma once
// Appending a batch's new keys and values to the device KV cache.
//
// The cache layout is a policy (foe/attention/kv_layout.cuh): contiguous, [slots, kv_heads,
// capacity, head_dim] bf16, head-major as the host's foe::attention::ContiguousKvCache; or paged,
// a pool [pages, kv_heads, page_size, head_dim] addressed through a block table, as the host's
// PagedKvCache. Either way one head's positions within a slot (a page) are contiguous, which is
// what prefill and decode attention stream. Row i of the batch (slot token_slots[i], position
// positions[i]) writes the layout's row (slot, h, position) for every KV head h. The copy is exact
// (bits). One launch may cover the groups of an FoE layer (gridDim.y = groups; group g copies from
// k, v + g * groups.in into kcache, vcache + g * groups.cache: foe/cuda/groups.cuh).

#include <algorithm>
#include <cstdint>

#include "foe/attention/kv_layout.cuh"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/groups.cuh"

namespace foe::cuda {

/// Copies k and v, [tokens, kv_heads, head_dim] rows whose starts are row_stride elements apart
/// (row_stride >= kv_heads * head_dim: k and v may be column slices of one fused qkv buffer),
/// into the caches [slots, kv_heads, capacity, head_dim] at each row's slot and position. Rows
/// whose position lies outside [0, capacity) are not written (foe::Batch::check_fits rejects such
/// batches on the host; the kernel never writes outside the cache). Stream-ordered; no workspace.
inline void append_kv(const DeviceBatch& batch, const bfloat16* k, const bfloat16* v, index_t row_stride,
                      index_t kv_heads, index_t head_dim, index_t capacity, bfloat16* kcache, bfloat16* vcache,
                      cudaStream_t stream);

/// The same into a cache of any layout (ContiguousKvLayout, or PagedKvLayout: kcache and vcache
/// are then the pools [pages, kv_heads, page_size, head_dim] and the layout's block table is
/// device memory). Rows whose position the layout does not map (a -1 block-table entry, a
/// position past the table's row, an entry outside the pool; for a contiguous cache a position
/// outside [0, capacity)) are not written: the host's PagedKvCache::check_fits rejects such
/// batches, and the kernel neither writes outside the pool nor reads past a table row.
/// `groups`: one launch over groups.count groups, group g's k and v rows at k, v + g * groups.in
/// and its caches at kcache, vcache + g * groups.cache (every group shares the layout, block table
/// included; groups.out and .weight are ignored).
template <KvLayout Layout>
void append_kv(const DeviceBatch& batch, const bfloat16* k, const bfloat16* v, index_t row_stride, index_t kv_heads,
               index_t head_dim, const Layout& layout, bfloat16* kcache, bfloat16* vcache, cudaStream_t stream,
               const GroupStrides& groups = {});

/// 256 threads, one 16-byte vector (8 bf16 of one head) of k and one of v per thread: a
/// bandwidth-bound copy. Consecutive threads take consecutive vectors of a token's row, so a warp
/// reads 512 contiguous bytes of k and writes runs of head_dim * 2 contiguous bytes of the cache
/// (one run per head it touches).
struct AppendKvLaunch {
    static constexpr int block_threads = 256;
    static constexpr int vector = 8;            ///< bf16 per 16-byte access
    static constexpr unsigned max_blocks = 65536;  ///< grid-stride beyond this (any token count fits)
};

inline namespace kernels_v0_1 {

/// VEC = 8 moves 16-byte vectors (head_dim, row_stride and all pointers 16-byte aligned), VEC = 1
/// single elements.
template <int VEC, class Layout, class Launch = AppendKvLaunch>
FOE_KERNEL(Launch::block_threads)
void append_kv_kernel(const bfloat16* __restrict__ k, const bfloat16* __restrict__ v, long long row_stride,
                      const std::int32_t* __restrict__ token_slots, const std::int32_t* __restrict__ positions,
                      long long tokens, int kv_heads, int head_dim, Layout layout, bfloat16* __restrict__ kcache,
                      bfloat16* __restrict__ vcache, long long in_group_stride, long long cache_group_stride)
{
    const int group = static_cast<int>(blockIdx.y);
    k += GroupStrides::at(in_group_stride, group);
    v += GroupStrides::at(in_group_stride, group);
    kcache += GroupStrides::at(cache_group_stride, group);
    vcache += GroupStrides::at(cache_group_stride, group);
    const int per_row = kv_heads * head_dim / VEC;  // vectors per token; a vector never spans two heads
    const long long total = tokens * per_row;
    const long long step = static_cast<long long>(gridDim.x) * Launch::block_threads;
    for (long long idx = static_cast<long long>(blockIdx.x) * Launch::block_threads + threadIdx.x; idx < total;
         idx += step) {
        const long long row = idx / per_row;
        const int e = static_cast<int>(idx % per_row) * VEC;  // element within the row's kv_heads * head_dim
        const int h = e / head_dim, d = e % head_dim;
        const std::int64_t at = layout.offset(token_slots[row], h, positions[row], kv_heads, head_dim);
        if (at < 0) continue;  // not mapped: not written
        const auto src = static_cast<std::size_t>(row * row_stride + e);
        const auto dst = static_cast<std::size_t>(at) + static_cast<std::size_t>(d);
        if constexpr (VEC == 8) {
            *reinterpret_cast<uint4*>(kcache + dst) = *reinterpret_cast<const uint4*>(k + src);
            *reinterpret_cast<uint4*>(vcache + dst) = *reinterpret_cast<const uint4*>(v + src);
        } else {
            static_assert(VEC == 1, "append_kv_kernel moves 16-byte vectors or single elements");
            kcache[dst] = k[src];
            vcache[dst] = v[src];
        }
    }
}

}  // namespace kernels_v0_1

template <KvLayout Layout>
void append_kv(const DeviceBatch& batch, const bfloat16* k, const bfloat16* v, index_t row_stride, index_t kv_heads,
               index_t head_dim, const Layout& layout, bfloat16* kcache, bfloat16* vcache, cudaStream_t stream,
               const GroupStrides& groups)
{
    require(groups.count >= 1 && groups.count <= 65535, "append_kv: ", groups.count, " groups outside [1, 65535]");
    require(kv_heads > 0 && head_dim > 0 && kv_heads * head_dim <= 0x7fffffff, "append_kv: kv_heads (", kv_heads,
            ") and head_dim (", head_dim, ") must be positive, with a product below 2^31");
    require(row_stride >= kv_heads * head_dim, "append_kv: row_stride ", row_stride,
            " is less than kv_heads * head_dim = ", kv_heads * head_dim);
    layout.check("append_kv");
    require(batch.tokens >= 0, "append_kv: negative token count ", batch.tokens);
    if (batch.tokens == 0) return;

    constexpr int vec = AppendKvLaunch::vector;
    auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
    // Every group's rows and caches 16-byte aligned too: strides of whole vectors.
    const bool vectorised = head_dim % vec == 0 && row_stride % vec == 0 && groups.in % vec == 0 &&
                            groups.cache % vec == 0 && aligned(k) && aligned(v) && aligned(kcache) && aligned(vcache);
    const index_t total = batch.tokens * kv_heads * head_dim / (vectorised ? vec : 1);
    const auto blocks = static_cast<unsigned>(
        std::min<index_t>(detail::ceil_div(total, AppendKvLaunch::block_threads), AppendKvLaunch::max_blocks));
    const auto stride = static_cast<long long>(row_stride), tokens = static_cast<long long>(batch.tokens);
    const auto heads = static_cast<int>(kv_heads), dim = static_cast<int>(head_dim);
    const dim3 grid(blocks, static_cast<unsigned>(groups.count));
    if (vectorised)
        append_kv_kernel<vec, Layout><<<grid, AppendKvLaunch::block_threads, 0, stream>>>(
            k, v, stride, batch.token_slots, batch.positions, tokens, heads, dim, layout, kcache, vcache, groups.in,
            groups.cache);
    else
        append_kv_kernel<1, Layout><<<grid, AppendKvLaunch::block_threads, 0, stream>>>(
            k, v, stride, batch.token_slots, batch.positions, tokens, heads, dim, layout, kcache, vcache, groups.in,
            groups.cache);
    check_launch("append_kv_kernel");
}

inline void append_kv(const DeviceBatch& batch, const bfloat16* k, const bfloat16* v, index_t row_stride,
                      index_t kv_heads, index_t head_dim, index_t capacity, bfloat16* kcache, bfloat16* vcache,
                      cudaStream_t stream)
{
    require(capacity > 0 && capacity <= 0x7fffffff, "append_kv: capacity ", capacity, " outside [1, 2^31)");
    append_kv(batch, k, v, row_stride, kv_heads, head_dim, ContiguousKvLayout{static_cast<std::int32_t>(capacity)},
              kcache, vcache, stream);
}

}  // namespace foe::cuda
