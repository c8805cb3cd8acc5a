#pragma once
// The KV-cache layouts the device kernels are templated on (append_kv, decode_attention,
// prefill_attention, attention). The index rules are plain C++ in foe/attention/kv_layout.hpp,
// FOE_HOST_DEVICE, so the host's PagedKvCache and the host tests use the same definition; this
// header names them in foe::cuda.
//
//   ContiguousKvLayout{capacity}                        caches [slots, kv_heads, capacity, head_dim]
//   PagedKvLayout{page_size, max_pages, table, pages}   pools [pages, kv_heads, page_size, head_dim],
//                                                       table: device int32 [slots, max_pages]
//
// A layout is a kernel argument by value. For a paged cache the block table is a device pointer:
// a CUDA graph captured with it replays with whatever the table holds at replay time, so a decode
// step updates the table with cudaMemcpyAsync before the replay (as it updates the batch arrays,
// foe/cuda/batch.cuh) and never recaptures. Positions a layout does not map are not written by
// append_kv, and are masked out of (never read by) the attention kernels.

#include "foe/attention/kv_layout.hpp"

namespace foe::cuda {

using foe::attention::ContiguousKvLayout;
using foe::attention::KvLayout;
using foe::attention::PagedKvLayout;

}  // namespace foe::cuda
