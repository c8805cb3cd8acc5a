#pragma once
// Block tables: which pages of a paged KV cache hold each sequence's positions. Position p of
// the sequence in slot s lives in page pages[s * max_pages + p / page_size], at row
// p % page_size; -1 marks a page not assigned. Dense int32 [slots, max_pages], the layout a
// device kernel reads (FlashInfer's and vLLM's block tables are the same).
//
// A BlockTableView never owns the table: the engine's block manager (or foe's,
// serve/block_manager.hpp) keeps it, and a Batch carries the view for one forward. The same
// table serves every layer and every expert group (their positions are the same); each
// attention instance has its own pool of pages, indexed alike.

#include <cstdint>

#include "foe/core/types.hpp"

namespace foe {

struct BlockTableView {
    index_t page_size = 16;
    index_t slots = 0;
    index_t max_pages = 0;  ///< pages per sequence, at most (the table's row length)
    const std::int32_t* pages = nullptr;

    /// Page i of slot `slot` (-1 when none is assigned).
    [[nodiscard]] index_t page(index_t slot, index_t i) const noexcept { return pages[slot * max_pages + i]; }
    /// Positions a sequence can hold at most.
    [[nodiscard]] index_t capacity() const noexcept { return max_pages * page_size; }
};

}  // namespace foe
