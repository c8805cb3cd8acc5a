#pragma once
// Where a KV-cache row lives: the element offset of the head_dim values of (slot, KV head,
// position), for the two layouts of kv_cache.hpp. Plain C++ marked FOE_HOST_DEVICE, so the host
// cache (PagedKvCache), the device kernels (foe/attention/kv_append.cuh, decode_attention.cuh,
// prefill_attention.cuh) and the host tests share one definition of the index rule.
//
//   ContiguousKvLayout  [slots, kv_heads, capacity, head_dim]: row ((slot * kv_heads + kv) *
//                       capacity + pos); positions [0, capacity) are mapped.
//   PagedKvLayout       a pool [pages, kv_heads, page_size, head_dim] and a dense int32 block
//                       table [slots, max_pages] (foe::BlockTableView's layout): position pos of
//                       slot s is row pos % page_size of page table[s * max_pages + pos /
//                       page_size]. A position is mapped when its table entry lies in
//                       [0, pages): -1 (no page assigned), a position past the table's row and an
//                       entry outside the pool are all unmapped.
//
// offset() returns -1 for an unmapped position, and never reads outside the block table's row
// to find out (the kernels treat such positions as they treat positions past a contiguous
// cache's capacity: not written, masked out of attention, never read). The table is read through
// a pointer held by value: on the device it is device memory whose contents the caller may
// rewrite (cudaMemcpyAsync) between replays of a captured graph, as it rewrites the batch arrays.

#include <concepts>
#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"

namespace foe::attention {

/// A KV-cache layout the kernels are templated on: offset(slot, kv, pos, kv_heads, head_dim) is
/// the element offset of that row, or -1 when the position is not mapped; positions() bounds the
/// positions any sequence can hold (what sizes the attention's loops and masks).
template <class L>
concept KvLayout = std::copyable<L> && requires(const L& l, int i, index_t j) {
    { l.offset(i, i, i, i, i) } -> std::same_as<std::int64_t>;
    { l.offset(j, j, j, j, j) } -> std::same_as<std::int64_t>;
    { l.positions() } -> std::same_as<std::int64_t>;
};

struct ContiguousKvLayout {
    std::int32_t capacity = 0;  ///< positions per slot

    [[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t positions() const noexcept { return capacity; }

    /// Row (slot, kv, pos) of [slots, kv_heads, capacity, head_dim], in elements; -1 for a
    /// position outside [0, capacity) or a negative slot.
    template <std::signed_integral I>
    [[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t offset(I slot, I kv, I pos, I kv_heads, I head_dim) const noexcept
    {
        if (slot < 0 || pos < 0 || pos >= capacity) return -1;
        return ((static_cast<std::int64_t>(slot) * kv_heads + kv) * capacity + pos) * head_dim;
    }

    /// Throws InvalidArgument unless the capacity is positive; `who` names the caller.
    void check(const char* who) const
    {
        require<InvalidArgument>(capacity > 0, who, ": KV cache capacity ", capacity, " must be positive");
    }
};

struct PagedKvLayout {
    std::int32_t page_size = 16;                ///< positions per page
    std::int32_t max_pages = 0;                 ///< block-table row length: pages per sequence, at most
    const std::int32_t* block_table = nullptr;  ///< [slots, max_pages]; -1: no page
    std::int64_t pages = 0;                     ///< pages in the pool; entries outside [0, pages) are unmapped

    /// Positions a sequence can hold at most (max_pages x page_size).
    [[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t positions() const noexcept
    {
        return static_cast<std::int64_t>(max_pages) * page_size;
    }

    /// The pool page holding position pos of slot `slot`, or -1 when it is not mapped.
    template <std::signed_integral I>
    [[nodiscard]] FOE_HOST_DEVICE constexpr std::int32_t page(I slot, I pos) const noexcept
    {
        if (slot < 0 || pos < 0) return -1;
        const I i = pos / static_cast<I>(page_size);
        if (i >= max_pages) return -1;  // checked before the table is read: never past the row
        const std::int32_t p = block_table[static_cast<std::int64_t>(slot) * max_pages + i];
        return p < pages ? p : -1;  // a negative entry stays negative
    }

    /// Row (page, kv, pos % page_size) of the pool [pages, kv_heads, page_size, head_dim], in
    /// elements; -1 when the position is not mapped.
    template <std::signed_integral I>
    [[nodiscard]] FOE_HOST_DEVICE constexpr std::int64_t offset(I slot, I kv, I pos, I kv_heads, I head_dim) const noexcept
    {
        const std::int32_t p = page(slot, pos);
        if (p < 0) return -1;
        const I row = pos % static_cast<I>(page_size);
        return ((static_cast<std::int64_t>(p) * kv_heads + kv) * page_size + row) * head_dim;
    }

    /// Throws InvalidArgument unless the shape can address a pool: a positive page size, a
    /// table (unless it has no columns), a non-negative pool, and positions that fit int32.
    void check(const char* who) const
    {
        require<InvalidArgument>(page_size > 0, who, ": KV page size ", page_size, " must be positive");
        require<InvalidArgument>(max_pages >= 0 && pages >= 0, who, ": block tables of ", max_pages,
                                 " pages per sequence over a pool of ", pages, " pages: both must be non-negative");
        require<InvalidArgument>(block_table != nullptr || max_pages == 0, who,
                                 ": a paged KV layout of ", max_pages, " pages per sequence needs a block table");
        require<InvalidArgument>(positions() <= 0x7fffffff, who, ": ", max_pages, " pages of ", page_size,
                                 " positions exceed the 2^31 - 1 positions a sequence may hold");
    }
};

static_assert(KvLayout<ContiguousKvLayout>);
static_assert(KvLayout<PagedKvLayout>);

}  // namespace foe::attention
