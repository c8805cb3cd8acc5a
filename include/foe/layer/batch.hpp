#pragma once
// A ragged batch: B sequences, each contributing a run of new tokens at known positions and
// owning one KV-cache slot (the varlen layout of FlashAttention and FlashInfer). Prefill of some
// requests and decode of others share one forward call: a prefill chunk starts at position 0,
// a decode chunk is one token at the sequence's current length.
//
// Tokens are laid out sequence after sequence: rows [offset(b), offset(b) + length) of every
// activation matrix belong to sequence b. A batch for a paged KV cache also carries the block
// tables that map its sequences' positions to pages (with_block_tables; a view, never owned).

#include <optional>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/layer/block_table.hpp"

namespace foe {

struct SequenceChunk {
    index_t slot = 0;    ///< KV-cache slot of the sequence
    index_t start = 0;   ///< position of the chunk's first token; the cache keeps [0, start)
    index_t length = 0;  ///< number of new tokens
};

class Batch {
public:
    Batch() = default;
    explicit Batch(std::vector<SequenceChunk> chunks) : chunks_(std::move(chunks))
    {
        offsets_.reserve(chunks_.size() + 1);
        // Positions and token counts stay below 2^31, far past any KV cache a valid config plans
        // (2^24 positions at most), so that a caller's absurd count is an error here instead of a
        // signed overflow or an allocation of the positions below. Compared without adding.
        constexpr index_t limit = index_t{1} << 31;
        for (const auto& c : chunks_) {
            require(c.slot >= 0 && c.start >= 0 && c.length >= 0, "sequence chunk has a negative slot (", c.slot,
                    "), start (", c.start, ") or length (", c.length, ")");
            require(c.start <= limit && c.length <= limit - c.start, "sequence chunk at position ", c.start,
                    " of length ", c.length, " ends past 2^31 positions");
            require(c.length <= limit - offsets_.back(), "the batch's chunks add up to more than 2^31 tokens");
            offsets_.push_back(offsets_.back() + c.length);
        }
        positions_.reserve(static_cast<std::size_t>(offsets_.back()));
        for (const auto& c : chunks_)
            for (index_t i = 0; i < c.length; ++i) positions_.push_back(c.start + i);
    }

    /// One sequence in slot `slot`: tokens [start, start + length).
    [[nodiscard]] static Batch single(index_t start, index_t length, index_t slot = 0)
    {
        return Batch({SequenceChunk{slot, start, length}});
    }

    [[nodiscard]] const std::vector<SequenceChunk>& chunks() const noexcept { return chunks_; }
    [[nodiscard]] index_t sequences() const noexcept { return static_cast<index_t>(chunks_.size()); }
    [[nodiscard]] index_t tokens() const noexcept { return offsets_.empty() ? 0 : offsets_.back(); }
    /// First row of sequence b.
    [[nodiscard]] index_t offset(index_t b) const { return offsets_.at(static_cast<std::size_t>(b)); }
    /// Position of every token in its sequence, row by row.
    [[nodiscard]] const std::vector<index_t>& positions() const noexcept { return positions_; }

    /// This batch with the block tables of a paged KV cache (the view must outlive the forward).
    Batch& with_block_tables(const BlockTableView& tables)
    {
        require(tables.page_size > 0 && tables.slots >= 0 && tables.max_pages >= 0 &&
                    (tables.pages != nullptr || tables.slots * tables.max_pages == 0),
                "block tables need a positive page size and a table of slots x max_pages entries (got page size ",
                tables.page_size, ", ", tables.slots, " x ", tables.max_pages, ")");
        block_tables_ = tables;
        return *this;
    }
    /// The block tables, or null for a contiguous KV cache.
    [[nodiscard]] const BlockTableView* block_tables() const noexcept
    {
        return block_tables_ ? &*block_tables_ : nullptr;
    }

    /// Throws CapacityError if a chunk does not fit `slots` slots of `capacity` positions.
    void check_fits(index_t slots, index_t capacity) const
    {
        for (std::size_t b = 0; b < chunks_.size(); ++b) {
            const auto& c = chunks_[b];
            for (std::size_t a = 0; a < b; ++a)
                require<InvalidArgument>(chunks_[a].slot != c.slot, "sequences ", a, " and ", b,
                                         " of the batch both use KV-cache slot ", c.slot);
            require<InvalidArgument>(c.slot < slots, "sequence ", b, " uses KV-cache slot ", c.slot, " but the cache has ",
                                     slots, " slot(s)");
            require<CapacityError>(c.start + c.length <= capacity, "KV cache full: sequence ", b, " (slot ", c.slot,
                                   ") needs positions up to ", c.start + c.length, " but the cache holds ", capacity,
                                   " positions per sequence");
        }
    }

    /// Throws unless the block tables map every position [0, start + length) of every chunk to a
    /// page of a pool of `pool_pages` pages: InvalidArgument for no tables, rows past 2^31 - 1
    /// positions, a slot outside the tables or a page outside the pool, CapacityError for a
    /// position without a page.
    void check_pages(index_t pool_pages) const
    {
        require<InvalidArgument>(block_tables_.has_value(), "the batch has no block tables to check (Batch::with_block_tables)");
        const BlockTableView& t = *block_tables_;
        // The layouts narrow the row length to int32 (a longer row would address the wrong
        // entries), and capacity() must not overflow.
        require<InvalidArgument>(t.max_pages <= 0x7fffffff / t.page_size, "block table rows of ", t.max_pages,
                                 " pages of ", t.page_size, " positions exceed the 2^31 - 1 positions a sequence may hold");
        for (std::size_t b = 0; b < chunks_.size(); ++b) {
            const auto& c = chunks_[b];
            for (std::size_t a = 0; a < b; ++a)
                require<InvalidArgument>(chunks_[a].slot != c.slot, "sequences ", a, " and ", b,
                                         " of the batch both use KV-cache slot ", c.slot);
            require<InvalidArgument>(c.slot < t.slots, "sequence ", b, " uses slot ", c.slot, " but the block tables have ",
                                     t.slots, " slot(s)");
            const index_t end = c.start + c.length;
            require<CapacityError>(end <= t.capacity(), "KV cache full: sequence ", b, " (slot ", c.slot,
                                   ") needs positions up to ", end, " but a block table row holds ", t.max_pages,
                                   " pages of ", t.page_size, " positions");
            for (index_t i = 0; i * t.page_size < end; ++i) {
                const index_t page = t.page(c.slot, i);
                require<CapacityError>(page >= 0, "KV cache: sequence ", b, " (slot ", c.slot, ") has no page for positions [",
                                       i * t.page_size, ", ", (i + 1) * t.page_size, "); allocate pages up to position ",
                                       end, " before the forward");
                require<InvalidArgument>(page < pool_pages, "block table of slot ", c.slot, " names page ", page,
                                         " but the pool has ", pool_pages, " pages");
            }
        }
    }

private:
    std::vector<SequenceChunk> chunks_;
    std::vector<index_t> offsets_{0};
    std::vector<index_t> positions_;
    std::optional<BlockTableView> block_tables_;
};

}  // namespace foe
