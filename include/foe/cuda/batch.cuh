#pragma once
// A ragged batch (foe::Batch) as the device kernels read it: int32 arrays in device memory,
// written once per forward by the model (from pinned host memory, stream-ordered) so that the
// kernels of a decode step take no host-side per-token arguments and can be replayed from a CUDA
// graph with new contents.
//
// Rows are laid out sequence after sequence, as foe::Batch lays them out: rows
// [row_offsets[b], row_offsets[b+1]) are sequence b's new tokens, at positions
// starts[b], starts[b] + 1, ... of KV-cache slot slots[b].

#include <cstdint>

#include "foe/core/types.hpp"

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
};

}  // namespace foe::cuda
