#pragma once
// The Comm concept: the collectives one communicator offers.
//
// A communicator connects size() ranks; every collective is called by all of them with matching
// arguments. Each implementation names its stream_type: host communicators (SelfComm, MpiComm)
// use HostStream, an empty tag, and complete a collective before returning; a device
// communicator (NcclComm) enqueues on a CUDA stream. Buffers are spans of float: the residual
// sync and expert dispatch move fp32 activations on the host.

#include <concepts>
#include <cstdint>
#include <span>

#include "foe/core/backend.hpp"
#include "foe/core/types.hpp"

namespace foe::comm {

/// The stream type of host communicators: collectives complete before they return.
struct HostStream {};

template <class C>
concept Comm = requires(C& c, const C& cc, std::span<float> buf, std::span<const float> in,
                        std::span<const index_t> counts, typename C::stream_type stream, int color, int key) {
    typename C::stream_type;
    { cc.rank() } -> std::convertible_to<int>;
    { cc.size() } -> std::convertible_to<int>;
    /// In place: buf = sum over ranks of buf.
    { c.all_reduce_sum(buf, stream) } -> std::same_as<void>;
    /// Rank r sends in[send offsets of r..] to rank j (send_counts[j] elements, packed in rank
    /// order) and receives recv_counts[j] elements from rank j, packed in rank order.
    { c.all_to_all_v(in, counts, buf, counts, stream) } -> std::same_as<void>;
    /// out = concatenation over ranks of every rank's in (all of equal size).
    { c.all_gather(in, buf, stream) } -> std::same_as<void>;
    /// A new communicator of the ranks that passed the same color, ordered by key.
    { c.split(color, key) } -> std::same_as<C>;
};

/// A communicator's backend: host when its collectives take HostStream (they complete on the
/// host, on host memory), CUDA otherwise (they are enqueued on a stream and read device memory).
template <Comm C>
using comm_backend_t = backend_of_t<C>;

}  // namespace foe::comm
