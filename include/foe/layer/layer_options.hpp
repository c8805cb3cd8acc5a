#pragma once
// Run-time options shared by the layer templates.

#include <vector>

#include "foe/core/types.hpp"

namespace foe {

struct LayerOptions {
    index_t cache_slots = 1;     ///< sequences whose KV caches the layer holds at once
    index_t cache_capacity = 0;  ///< positions per sequence; 0 means max_position_embeddings
    /// Paged KV caches (attention::PagedKvCache): positions per page, and pages in each
    /// attention instance's pool (0: cache_slots x cache_capacity worth). Contiguous caches
    /// ignore both.
    index_t page_size = 16;
    index_t cache_pages = 0;
    index_t group_begin = 0;     ///< the expert groups this rank holds: [group_begin, group_end)
    index_t group_end = -1;      ///< -1 means every group
    /// The experts this rank holds: [expert_begin, expert_end); -1 means every expert of the
    /// held groups (a rank that shares its groups' experts with others holds fewer).
    index_t expert_begin = -1;
    index_t expert_end = -1;
    /// The order in which the held groups' attention runs (a permutation of [0, held)); empty
    /// means ascending. Results never depend on it: a test runs groups in reverse to prove it.
    std::vector<index_t> compute_order;
    /// CUDA backend only (the host grows its buffers as batches come): the most tokens one
    /// forward takes and the most sequences in it. Device policies plan their memory from these
    /// once, so nothing is allocated in a forward (what lets a decode step replay as a CUDA graph).
    index_t max_tokens = 0;
    index_t max_sequences = 1;
};

}  // namespace foe
