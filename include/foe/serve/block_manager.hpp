#pragma once
// BlockManager: foe's own allocator of KV-cache pages, for a paged KV cache
// (attention::PagedKvCache). It owns the block tables (dense int32 [slots, max_pages], what
// BlockTableView reads) and a free list of the pool's pages; an engine with its own allocator
// passes its block tables instead and never uses this class.
//
// Guarantees (tested): a page is in at most one table at a time; release() returns every page of
// a slot; a request that can never fit (more pages than the pool, or than a table row) is refused
// up front with CapacityError; grow() either takes every page it needs or changes nothing. Pages
// are handed out lowest first from a fresh pool and reused last-freed first: deterministic.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/layer/block_table.hpp"

namespace foe::serve {

class BlockManager {
public:
    /// A pool of `pages` pages of `page_size` positions for `slots` sequences of at most
    /// `max_pages` pages each.
    BlockManager(index_t pages, index_t page_size, index_t slots, index_t max_pages)
        : pages_(pages), page_size_(page_size), slots_(slots), max_pages_(max_pages),
          table_(table_entries(pages, page_size, slots, max_pages), -1), held_(static_cast<std::size_t>(slots), 0)
    {
        free_.reserve(static_cast<std::size_t>(pages));
        for (index_t p = pages - 1; p >= 0; --p) free_.push_back(static_cast<std::int32_t>(p));  // page 0 on top
    }

    [[nodiscard]] index_t page_size() const noexcept { return page_size_; }
    [[nodiscard]] index_t total_pages() const noexcept { return pages_; }
    [[nodiscard]] index_t free_pages() const noexcept { return static_cast<index_t>(free_.size()); }
    [[nodiscard]] index_t slots() const noexcept { return slots_; }
    /// Pages the sequence in `slot` holds.
    [[nodiscard]] index_t pages_of(index_t slot) const { return held_.at(static_cast<std::size_t>(slot)); }
    /// Pages that hold `positions` positions.
    [[nodiscard]] index_t pages_for(index_t positions) const noexcept { return (positions + page_size_ - 1) / page_size_; }
    /// The most positions one sequence can ever hold here.
    [[nodiscard]] index_t max_positions() const noexcept { return std::min(pages_, max_pages_) * page_size_; }

    /// Throws CapacityError naming the limit when a sequence of `positions` positions could not
    /// fit even in an empty pool (a request that must be refused, not queued).
    void check_fits_ever(index_t positions) const
    {
        require<CapacityError>(positions <= max_positions(), "a sequence of ", positions, " positions needs ",
                               pages_for(positions), " pages of ", page_size_, " positions; ",
                               pages_ < max_pages_ ? "the pool has " : "a block table row holds ",
                               std::min(pages_, max_pages_), " pages (", max_positions(), " positions)");
    }

    /// Pages `slot` must take to hold `positions` positions (0 when it holds enough).
    [[nodiscard]] index_t pages_needed(index_t slot, index_t positions) const
    {
        return std::max<index_t>(0, pages_for(positions) - pages_of(slot));
    }
    [[nodiscard]] bool can_grow(index_t slot, index_t positions) const
    {
        return positions <= max_pages_ * page_size_ && pages_needed(slot, positions) <= free_pages();
    }

    /// Extends the table of `slot` to hold `positions` positions. CapacityError (nothing taken)
    /// when the free pages or the table row are too few.
    void grow(index_t slot, index_t positions)
    {
        check_slot(slot);
        require<CapacityError>(positions <= max_pages_ * page_size_, "slot ", slot, " cannot hold ", positions,
                               " positions: a block table row holds ", max_pages_, " pages of ", page_size_);
        const index_t need = pages_needed(slot, positions);
        require<CapacityError>(need <= free_pages(), "KV pages exhausted: slot ", slot, " needs ", need,
                               " more page(s) for ", positions, " positions, ", free_pages(), " of ", pages_, " free");
        auto& held = held_[static_cast<std::size_t>(slot)];
        for (index_t i = 0; i < need; ++i) {
            table_[static_cast<std::size_t>(slot * max_pages_ + held++)] = free_.back();
            free_.pop_back();
        }
    }

    /// Returns every page of `slot` to the pool.
    void release(index_t slot)
    {
        check_slot(slot);
        auto& held = held_[static_cast<std::size_t>(slot)];
        for (index_t i = held - 1; i >= 0; --i) {
            auto& entry = table_[static_cast<std::size_t>(slot * max_pages_ + i)];
            free_.push_back(entry);
            entry = -1;
        }
        held = 0;
    }

    /// The tables for a Batch: a view of this manager's table, whose entries follow later grows and
    /// releases.
    [[nodiscard]] BlockTableView view() const noexcept { return {page_size_, slots_, max_pages_, table_.data()}; }

private:
    /// Checks the sizes before anything is allocated (a huge count is an error, not an attempt to
    /// allocate it or a signed overflow) and returns the table's slots x max_pages entries.
    static std::size_t table_entries(index_t pages, index_t page_size, index_t slots, index_t max_pages)
    {
        require<InvalidArgument>(pages > 0 && page_size > 0 && slots > 0 && max_pages > 0, "a block manager needs a "
                                 "positive pool (", pages, " pages), page size (", page_size, "), slot count (", slots,
                                 ") and pages per sequence (", max_pages, ")");
        constexpr index_t limit = index_t{1} << 31;
        require<InvalidArgument>(pages < limit, "a pool of ", pages, " pages exceeds int32 block tables");
        require<InvalidArgument>(page_size < limit && max_pages <= (limit - 1) / page_size, "sequences of ", max_pages,
                                 " pages of ", page_size, " positions exceed the 2^31 - 1 positions a sequence may hold");
        require<InvalidArgument>(max_pages <= limit / slots, "block tables of ", slots, " slots x ", max_pages,
                                 " pages exceed 2^31 entries");
        return static_cast<std::size_t>(slots * max_pages);
    }

    void check_slot(index_t slot) const
    {
        require<InvalidArgument>(slot >= 0 && slot < slots_, "slot ", slot, " is outside [0, ", slots_, ")");
    }

    index_t pages_, page_size_, slots_, max_pages_;
    std::vector<std::int32_t> table_;
    std::vector<index_t> held_;
    std::vector<std::int32_t> free_;  // a stack: the next page handed out is free_.back()
};

}  // namespace foe::serve
