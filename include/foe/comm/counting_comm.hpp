#pragma once
// CountingComm<C>: a decorator that forwards every collective to C and records, per operation,
// the number of calls, the payload (elements handed to the call) and the bytes this rank sends
// over the wire under the algorithm the operation is costed with.
//
// Wire bytes per rank, for P ranks and a payload of n bytes:
//   all_reduce_sum  ring algorithm: reduce-scatter + all-gather, 2 (P-1)/P * n
//   all_to_all_v    what this rank sends to other ranks (its own block stays local)
//   all_gather      ring: (P-1) * n_in (each rank forwards every other rank's block once)
// These are the counts of DESIGN.md 2.1; a library whose all-reduce uses another algorithm
// (tree, in-switch reduction) moves different bytes, which the cost model accounts for.

#include <array>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>

#include "foe/comm/comm.hpp"

namespace foe::comm {

enum class Op : std::uint8_t { all_reduce_sum, all_to_all_v, all_gather };
inline constexpr int op_count = 3;

[[nodiscard]] constexpr std::string_view to_string(Op op) noexcept
{
    switch (op) {
    case Op::all_reduce_sum: return "all_reduce_sum";
    case Op::all_to_all_v: return "all_to_all_v";
    case Op::all_gather: return "all_gather";
    }
    return "?";
}

struct OpCounts {
    std::int64_t calls = 0;
    std::int64_t payload_bytes = 0;  ///< bytes of the buffer handed to the call
    std::int64_t wire_bytes = 0;     ///< bytes this rank sends to other ranks
};

template <Comm C>
class CountingComm {
public:
    using stream_type = typename C::stream_type;

    CountingComm() = default;
    explicit CountingComm(C inner) : inner_(std::move(inner)) {}

    [[nodiscard]] int rank() const noexcept { return inner_.rank(); }
    [[nodiscard]] int size() const noexcept { return inner_.size(); }

    void all_reduce_sum(std::span<float> buf, stream_type stream = {})
    {
        const std::int64_t n = bytes(buf.size());
        const std::int64_t p = size();
        record(Op::all_reduce_sum, n, 2 * (p - 1) * n / p);
        inner_.all_reduce_sum(buf, stream);
    }

    void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                      std::span<const index_t> recv_counts, stream_type stream = {})
    {
        const index_t total = std::accumulate(send_counts.begin(), send_counts.end(), index_t{0});
        const index_t self = rank() < static_cast<int>(send_counts.size()) ? send_counts[static_cast<std::size_t>(rank())] : 0;
        record(Op::all_to_all_v, bytes(static_cast<std::size_t>(total)), bytes(static_cast<std::size_t>(total - self)));
        inner_.all_to_all_v(send, send_counts, recv, recv_counts, stream);
    }

    void all_gather(std::span<const float> in, std::span<float> out, stream_type stream = {})
    {
        const std::int64_t n = bytes(in.size());
        record(Op::all_gather, n, (size() - 1) * n);
        inner_.all_gather(in, out, stream);
    }

    /// The sub-communicator counts on its own, from zero.
    [[nodiscard]] CountingComm split(int color, int key) const { return CountingComm(inner_.split(color, key)); }

    [[nodiscard]] const OpCounts& counts(Op op) const noexcept { return counts_[static_cast<std::size_t>(op)]; }
    [[nodiscard]] std::int64_t total_wire_bytes() const noexcept
    {
        std::int64_t t = 0;
        for (const auto& c : counts_) t += c.wire_bytes;
        return t;
    }
    void reset() noexcept { counts_ = {}; }
    [[nodiscard]] C& inner() noexcept { return inner_; }

private:
    static constexpr std::int64_t bytes(std::size_t elements) noexcept
    {
        return static_cast<std::int64_t>(elements * sizeof(float));
    }
    void record(Op op, std::int64_t payload, std::int64_t wire) noexcept
    {
        auto& c = counts_[static_cast<std::size_t>(op)];
        ++c.calls;
        c.payload_bytes += payload;
        c.wire_bytes += wire;
    }

    C inner_{};
    std::array<OpCounts, op_count> counts_{};
};

}  // namespace foe::comm
