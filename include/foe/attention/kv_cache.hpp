#pragma once
// The KV-cache layout is a policy of the attention (GqaAttention<Gemm, Cache>): where the key and
// value of (sequence, KV head, position) live. Two layouts:
//
//   ContiguousKvCache  [slots, kv_heads, capacity, head_dim], one fixed capacity per slot,
//                      allocated once (foe's default).
//   PagedKvCache       a pool of pages of P positions, [pages, kv_heads, P, head_dim]; each
//                      sequence's positions map to pages through a block table the batch
//                      carries (layer/block_table.hpp), so an engine (vLLM, SGLang, ...) hands
//                      foe its block tables and memory goes to the positions sequences use.
//
// Both are head-major inside their unit (slot or page): one head's keys for consecutive
// positions are contiguous, so attention streams them instead of striding over the other heads
// (measured: a 8192-token prefill of the 8-head moe-small took 3x longer position-major).
// The attention reads a key or value row through key(batch, slot, kv, pos) / value(...), and
// adds in the same order whatever the layout: paged and contiguous give the same bits.

#include <concepts>
#include <cstdint>
#include <vector>

#include "foe/attention/kv_layout.hpp"
#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/layer/batch.hpp"

namespace foe::attention {

/// What an attention instance's cache is built for: its heads, and either `slots` sequences of
/// `capacity` positions (contiguous) or a pool of `pages` pages of `page_size` positions (paged).
struct KvCacheShape {
    index_t kv_heads = 0;
    index_t head_dim = 0;
    index_t slots = 1;
    index_t capacity = 0;
    index_t page_size = 16;
    index_t pages = 0;  ///< paged: pages in the pool; 0: enough for slots x capacity
};

/// A KV-cache layout: built from its shape; check_fits() says whether a batch can be appended
/// (CapacityError or InvalidArgument otherwise, before anything is written); key()/value() give
/// the head_dim floats of one (slot, KV head, position), for positions the batch's sequences
/// hold or are appending.
template <class C>
concept KvCachePolicy = std::constructible_from<C, const KvCacheShape&> &&
                        requires(C& c, const C& cc, const Batch& b, index_t i) {
                            { cc.check_fits(b) } -> std::same_as<void>;
                            { c.key(b, i, i, i) } -> std::same_as<float*>;
                            { c.value(b, i, i, i) } -> std::same_as<float*>;
                            { cc.key(b, i, i, i) } -> std::same_as<const float*>;
                            { cc.bytes() } -> std::convertible_to<index_t>;
                        };

class ContiguousKvCache {
public:
    ContiguousKvCache() = default;
    explicit ContiguousKvCache(const KvCacheShape& s)
        : shape_{s.slots, s.kv_heads, s.capacity, s.head_dim},
          keys_(static_cast<std::size_t>(s.slots * s.capacity * s.kv_heads * s.head_dim)),
          values_(keys_.size())
    {
        require<ConfigError>(s.slots > 0 && s.capacity > 0, "KV cache needs at least one slot (got ", s.slots,
                             ") and one position (got ", s.capacity, ")");
    }
    ContiguousKvCache(index_t slots, index_t capacity, index_t kv_heads, index_t head_dim)
        : ContiguousKvCache(KvCacheShape{kv_heads, head_dim, slots, capacity})
    {
    }

    [[nodiscard]] index_t slots() const noexcept { return shape_[0]; }
    [[nodiscard]] index_t capacity() const noexcept { return shape_[2]; }
    [[nodiscard]] index_t bytes() const noexcept { return static_cast<index_t>(2 * keys_.size() * sizeof(float)); }

    void check_fits(const Batch& batch) const { batch.check_fits(slots(), capacity()); }
    [[nodiscard]] float* key(const Batch&, index_t slot, index_t kv, index_t pos) noexcept { return &keys()(slot, kv, pos, 0); }
    [[nodiscard]] float* value(const Batch&, index_t slot, index_t kv, index_t pos) noexcept { return &values()(slot, kv, pos, 0); }
    [[nodiscard]] const float* key(const Batch&, index_t slot, index_t kv, index_t pos) const noexcept { return &keys()(slot, kv, pos, 0); }
    [[nodiscard]] const float* value(const Batch&, index_t slot, index_t kv, index_t pos) const noexcept { return &values()(slot, kv, pos, 0); }

    [[nodiscard]] TensorView<float, 4> keys() noexcept { return {keys_.data(), shape_}; }
    [[nodiscard]] TensorView<float, 4> values() noexcept { return {values_.data(), shape_}; }
    [[nodiscard]] TensorView<const float, 4> keys() const noexcept { return {keys_.data(), shape_}; }
    [[nodiscard]] TensorView<const float, 4> values() const noexcept { return {values_.data(), shape_}; }

private:
    std::array<index_t, 4> shape_{};
    std::vector<float> keys_;
    std::vector<float> values_;
};
static_assert(KvCachePolicy<ContiguousKvCache>);

/// The name it had before layouts were a policy.
using KvCache = ContiguousKvCache;

class PagedKvCache {
public:
    PagedKvCache() = default;
    /// A pool of shape.pages pages (0: slots x ceil(capacity / page_size), what a contiguous cache
    /// of the same shape holds).
    explicit PagedKvCache(const KvCacheShape& s)
        : page_size_(s.page_size), pages_(s.pages > 0 ? s.pages : s.slots * ((s.capacity + s.page_size - 1) / s.page_size)),
          kv_heads_(s.kv_heads), head_dim_(s.head_dim)
    {
        require<ConfigError>(s.page_size > 0 && s.page_size <= 0x7fffffff, "KV page size (", s.page_size,
                             ") must be positive and fit int32");
        require<ConfigError>(pages_ > 0, "a paged KV cache needs at least one page (got ", s.pages,
                             " pages for ", s.slots, " slots of ", s.capacity, " positions)");
        require<ConfigError>(pages_ <= max_pages, "a paged KV cache of ", pages_, " pages exceeds the ", max_pages,
                             " that int32 block tables address");
        keys_.resize(static_cast<std::size_t>(pages_ * kv_heads_ * page_size_ * head_dim_));
        values_.resize(keys_.size());
    }

    static constexpr index_t max_pages = index_t{1} << 31;

    [[nodiscard]] index_t page_size() const noexcept { return page_size_; }
    [[nodiscard]] index_t pages() const noexcept { return pages_; }
    [[nodiscard]] index_t bytes() const noexcept { return static_cast<index_t>(2 * keys_.size() * sizeof(float)); }

    /// The batch must carry block tables of this page size and pool, covering every position its
    /// sequences hold or append.
    void check_fits(const Batch& batch) const
    {
        const BlockTableView* t = batch.block_tables();
        require<InvalidArgument>(t != nullptr, "a paged KV cache needs the batch's block tables (Batch::with_block_tables)");
        require<InvalidArgument>(t->page_size == page_size_, "the block tables have pages of ", t->page_size,
                                 " positions, the KV cache pages of ", page_size_);
        batch.check_pages(pages_);
    }

    [[nodiscard]] float* key(const Batch& b, index_t slot, index_t kv, index_t pos) noexcept { return &keys_[at(b, slot, kv, pos)]; }
    [[nodiscard]] float* value(const Batch& b, index_t slot, index_t kv, index_t pos) noexcept { return &values_[at(b, slot, kv, pos)]; }
    [[nodiscard]] const float* key(const Batch& b, index_t slot, index_t kv, index_t pos) const noexcept { return &keys_[at(b, slot, kv, pos)]; }
    [[nodiscard]] const float* value(const Batch& b, index_t slot, index_t kv, index_t pos) const noexcept { return &values_[at(b, slot, kv, pos)]; }

    /// The layout of this pool under block tables `t` (whose page size check_fits() compares):
    /// the index rule of the device kernels, which key() and value() follow too.
    [[nodiscard]] PagedKvLayout layout(const BlockTableView& t) const noexcept
    {
        return PagedKvLayout{static_cast<std::int32_t>(page_size_), static_cast<std::int32_t>(t.max_pages), t.pages,
                             pages_};
    }

private:
    /// Element offset of (slot, kv, pos): page table[slot][pos / P], row pos % P of head kv, by
    /// the rule the device kernels use (kv_layout.hpp). check_fits() has made every position the
    /// batch touches mapped, so the offset is never -1 here.
    [[nodiscard]] std::size_t at(const Batch& b, index_t slot, index_t kv, index_t pos) const noexcept
    {
        return static_cast<std::size_t>(layout(*b.block_tables()).offset(slot, kv, pos, kv_heads_, head_dim_));
    }

    index_t page_size_ = 16, pages_ = 0, kv_heads_ = 0, head_dim_ = 0;
    std::vector<float> keys_;
    std::vector<float> values_;
};
static_assert(KvCachePolicy<PagedKvCache>);

}  // namespace foe::attention
