#pragma once
// A ragged batch (foe::Batch) as the device kernels read it: int32 arrays in device memory,
// written once per forward by the model (from pinned host memory, stream-ordered) so that the
// kernels of a decode step take no host-side per-token arguments and can be replayed from a CUDA
// graph with new contents.
//
// Rows are laid out sequence after sequence, as foe::Batch lays them out: rows
// [row_offsets[b], row_offsets[b+1]) are sequence b's new tokens, at positions
// starts[b], starts[b] + 1, ... of KV-cache slot slots[b].

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/layer/batch.hpp"

namespace foe::cuda {

struct DeviceBatch {
    const std::int32_t* row_offsets = nullptr;  ///< [sequences + 1] first row of each sequence
    const std::int32_t* slots = nullptr;        ///< [sequences] KV-cache slot of each sequence
    const std::int32_t* starts = nullptr;       ///< [sequences] position of each sequence's first new token
    const std::int32_t* lengths = nullptr;      ///< [sequences] starts + new tokens: keys the last token sees
    const std::int32_t* token_slots = nullptr;  ///< [tokens] KV-cache slot of each row
    const std::int32_t* positions = nullptr;    ///< [tokens] position of each row in its sequence
    index_t sequences = 0;
    index_t tokens = 0;
    /// Host-known bound on any sequence's new tokens (sizes prefill grids; 1 for a decode step).
    index_t max_new_tokens = 0;
    /// A paged KV cache's block table, device int32 [slots, pages per sequence] (the layers know
    /// its width and page size from their plan); null for contiguous caches. Like the arrays
    /// above it lives at a fixed address whose contents change from forward to forward.
    const std::int32_t* block_table = nullptr;
};

/// Where the arrays of a DeviceBatch live in one int32 buffer planned for at most
/// `max_sequences` sequences and `max_tokens` rows, in the order of Section. Fixed offsets keep
/// every array at one address for the model's lifetime (what a captured graph reads); fill() is
/// host code, so the layout is tested without a GPU.
class BatchLayout {
public:
    enum Section { row_offsets, slots, starts, lengths, token_slots, positions, ids, section_count };

    BatchLayout(index_t max_sequences, index_t max_tokens) : max_sequences_(max_sequences), max_tokens_(max_tokens)
    {
        require(max_sequences > 0 && max_tokens > 0 && max_tokens <= 0x7fffffff, "batch layout: max_sequences (",
                max_sequences, ") and max_tokens (", max_tokens, ") must be positive and fit int32");
    }

    /// Elements of each section's capacity.
    [[nodiscard]] std::size_t capacity(Section s) const noexcept
    {
        const auto seqs = static_cast<std::size_t>(max_sequences_), toks = static_cast<std::size_t>(max_tokens_);
        return s == row_offsets ? seqs + 1 : s < token_slots ? seqs : toks;
    }
    [[nodiscard]] std::size_t offset(Section s) const noexcept
    {
        std::size_t off = 0;
        for (int i = 0; i < static_cast<int>(s); ++i) off += capacity(static_cast<Section>(i));
        return off;
    }
    /// int32 elements of the whole buffer.
    [[nodiscard]] std::size_t size() const noexcept { return offset(section_count); }

    /// Writes the batch's arrays (and its token ids) at their offsets in `buffer` (size() ints);
    /// returns how many elements of each section were written, for the copies to the device.
    std::array<std::size_t, section_count> fill(const Batch& batch, std::span<const std::int32_t> tokens,
                                                std::span<std::int32_t> buffer) const
    {
        const auto& chunks = batch.chunks();
        require(batch.sequences() <= max_sequences_ && batch.tokens() <= max_tokens_, "batch layout: ",
                batch.sequences(), " sequences and ", batch.tokens(), " tokens exceed the planned ", max_sequences_,
                " and ", max_tokens_);
        require(static_cast<index_t>(tokens.size()) == batch.tokens() && buffer.size() >= size(),
                "batch layout: ", tokens.size(), " token ids for ", batch.tokens(), " rows, or a buffer of ",
                buffer.size(), " ints below ", size());
        auto put = [&](Section s, std::size_t i, index_t value) {
            buffer[offset(s) + i] = static_cast<std::int32_t>(value);
        };
        for (std::size_t b = 0; b < chunks.size(); ++b) {
            const index_t first = batch.offset(static_cast<index_t>(b));
            put(row_offsets, b, first);
            put(slots, b, chunks[b].slot);
            put(starts, b, chunks[b].start);
            put(lengths, b, chunks[b].start + chunks[b].length);
            for (index_t i = 0; i < chunks[b].length; ++i) {
                const auto row = static_cast<std::size_t>(first + i);
                put(token_slots, row, chunks[b].slot);
                put(positions, row, chunks[b].start + i);
                put(ids, row, tokens[row]);
            }
        }
        put(row_offsets, chunks.size(), batch.tokens());
        const auto b = chunks.size(), t = static_cast<std::size_t>(batch.tokens());
        return {b + 1, b, b, b, t, t, t};
    }

    /// The DeviceBatch of `batch` over a device buffer laid out like this.
    [[nodiscard]] DeviceBatch view(const std::int32_t* device, const Batch& batch) const noexcept
    {
        index_t longest = 0;
        for (const auto& chunk : batch.chunks()) longest = std::max(longest, chunk.length);
        auto at = [&](Section s) { return device + offset(s); };
        return DeviceBatch{at(row_offsets), at(slots),     at(starts),        at(lengths), at(token_slots),
                           at(positions),   batch.sequences(), batch.tokens(), longest};
    }

private:
    index_t max_sequences_, max_tokens_;
};

}  // namespace foe::cuda
