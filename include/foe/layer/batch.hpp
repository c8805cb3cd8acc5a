#pragma once
// A ragged batch: B sequences, each contributing a run of new tokens at known positions and
// owning one KV-cache slot (the varlen layout of FlashAttention and FlashInfer). Prefill of some
// requests and decode of others share one forward call: a prefill chunk starts at position 0,
// a decode chunk is one token at the sequence's current length.
//
// Tokens are laid out sequence after sequence: rows [offset(b), offset(b) + length) of every
// activation matrix belong to sequence b.

#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"

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

private:
    std::vector<SequenceChunk> chunks_;
    std::vector<index_t> offsets_{0};
    std::vector<index_t> positions_;
};

}  // namespace foe
