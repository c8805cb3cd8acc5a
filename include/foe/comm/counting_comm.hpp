#pragma once
// CountingComm<C>: a decorator that forwards every collective to C and records, per operation,
// the number of calls, the payload (bytes handed to the call) and the bytes this rank sends over
// the wire, split into intra-node and inter-node by where each receiving member lives.
//
// Wire bytes per rank, for P members and a payload of n bytes:
//   all_reduce_sum  ring: reduce-scatter + all-gather, 2 (P-1)/P n, all sent to the next member
//   all_to_all_v    exactly what this rank sends to each other member (its own block stays local)
//   all_gather      ring: (P-1) n_in, sent to the next member
// These are the counts of DESIGN.md 2.1. A library whose all-reduce uses another algorithm (tree,
// in-switch reduction) moves different bytes; the cost model (foe/perf) accounts for that.
//
// Copies share their counters (a layer keeps a copy of its communicator; the counts of all
// layers add up in one place); split() starts a new communicator with counters of its own.

#include <array>
#include <cstdint>
#include <memory>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"

namespace foe::comm {

enum class Op : std::uint8_t { all_reduce_sum, all_to_all_v, all_gather };
inline constexpr int op_count = 3;
inline constexpr std::array<Op, op_count> all_ops{Op::all_reduce_sum, Op::all_to_all_v, Op::all_gather};

[[nodiscard]] constexpr std::string_view to_string(Op op) noexcept
{
    switch (op) {
    case Op::all_reduce_sum: return "all_reduce";
    case Op::all_to_all_v: return "all_to_all";
    case Op::all_gather: return "all_gather";
    }
    return "?";
}

struct OpCounts {
    std::int64_t calls = 0;
    std::int64_t payload_bytes = 0;     ///< bytes of the buffers handed to the calls
    std::int64_t intra_node_bytes = 0;  ///< bytes this rank sent to members on its node
    std::int64_t inter_node_bytes = 0;  ///< bytes this rank sent to members on other nodes
    [[nodiscard]] std::int64_t wire_bytes() const noexcept { return intra_node_bytes + inter_node_bytes; }
};

template <Comm C>
class CountingComm {
public:
    using stream_type = typename C::stream_type;

    CountingComm() = default;
    /// member_nodes[j] is the node of member j (empty: every member on one node).
    explicit CountingComm(C inner, std::vector<int> member_nodes = {})
        : inner_(std::move(inner)), nodes_(std::move(member_nodes))
    {
        require<CommError>(nodes_.empty() || static_cast<int>(nodes_.size()) == inner_.size(), "CountingComm got ",
                           nodes_.size(), " member nodes for a communicator of ", inner_.size(), " ranks");
    }

    [[nodiscard]] int rank() const noexcept { return inner_.rank(); }
    [[nodiscard]] int size() const noexcept { return inner_.size(); }

    void all_reduce_sum(std::span<float> buf, stream_type stream = {})
    {
        const std::int64_t n = bytes(buf.size()), p = size();
        record_to(Op::all_reduce_sum, n, next_member(), 2 * (p - 1) * n / p);
        inner_.all_reduce_sum(buf, stream);
    }

    void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                      std::span<const index_t> recv_counts, stream_type stream = {})
    {
        auto& c = counter(Op::all_to_all_v);
        ++c.calls;
        for (std::size_t j = 0; j < send_counts.size(); ++j) {
            const std::int64_t b = bytes(static_cast<std::size_t>(send_counts[j]));
            c.payload_bytes += b;
            if (static_cast<int>(j) != rank()) (same_node(static_cast<int>(j)) ? c.intra_node_bytes : c.inter_node_bytes) += b;
        }
        inner_.all_to_all_v(send, send_counts, recv, recv_counts, stream);
    }

    void all_gather(std::span<const float> in, std::span<float> out, stream_type stream = {})
    {
        const std::int64_t n = bytes(in.size());
        record_to(Op::all_gather, n, next_member(), (size() - 1) * n);
        inner_.all_gather(in, out, stream);
    }

    /// The sub-communicator counts on its own, from zero; member_nodes as in the constructor.
    [[nodiscard]] CountingComm split(int color, int key, std::vector<int> member_nodes) const
    {
        return CountingComm(inner_.split(color, key), std::move(member_nodes));
    }
    [[nodiscard]] CountingComm split(int color, int key) const { return CountingComm(inner_.split(color, key)); }

    [[nodiscard]] const OpCounts& counts(Op op) const noexcept { return (*counters_)[static_cast<std::size_t>(op)]; }
    [[nodiscard]] std::int64_t total_wire_bytes() const noexcept
    {
        std::int64_t t = 0;
        for (const auto& c : *counters_) t += c.wire_bytes();
        return t;
    }
    void reset() noexcept { *counters_ = {}; }
    [[nodiscard]] C& inner() noexcept { return inner_; }
    [[nodiscard]] const C& inner() const noexcept { return inner_; }

private:
    using Counters = std::array<OpCounts, op_count>;

    static constexpr std::int64_t bytes(std::size_t elements) noexcept
    {
        return static_cast<std::int64_t>(elements * sizeof(float));
    }
    [[nodiscard]] int next_member() const noexcept { return (rank() + 1) % size(); }
    [[nodiscard]] bool same_node(int member) const noexcept
    {
        return nodes_.empty() || nodes_[static_cast<std::size_t>(member)] == nodes_[static_cast<std::size_t>(rank())];
    }
    OpCounts& counter(Op op) noexcept { return (*counters_)[static_cast<std::size_t>(op)]; }
    void record_to(Op op, std::int64_t payload, int member, std::int64_t wire) noexcept
    {
        auto& c = counter(op);
        ++c.calls;
        c.payload_bytes += payload;
        if (size() > 1) (same_node(member) ? c.intra_node_bytes : c.inter_node_bytes) += wire;
    }

    C inner_{};
    std::vector<int> nodes_;
    std::shared_ptr<Counters> counters_ = std::make_shared<Counters>();
};

}  // namespace foe::comm
