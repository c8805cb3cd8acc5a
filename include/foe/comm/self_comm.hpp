#pragma once
// SelfComm: the one-rank communicator, the embedded default (all groups on one device).

#include <algorithm>
#include <span>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"

namespace foe::comm {

class SelfComm {
public:
    using stream_type = HostStream;

    [[nodiscard]] int rank() const noexcept { return 0; }
    [[nodiscard]] int size() const noexcept { return 1; }

    /// The sum over one rank is the buffer itself.
    void all_reduce_sum(std::span<float>, HostStream = {}) {}

    void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                      std::span<const index_t> recv_counts, HostStream = {})
    {
        require<CommError>(send_counts.size() == 1 && recv_counts.size() == 1,
                           "SelfComm::all_to_all_v needs one count per rank (1), got ", send_counts.size(), " and ",
                           recv_counts.size());
        require<CommError>(send_counts[0] == recv_counts[0], "SelfComm::all_to_all_v sends ", send_counts[0],
                           " elements to itself but expects to receive ", recv_counts[0]);
        require<CommError>(static_cast<index_t>(send.size()) >= send_counts[0] &&
                               static_cast<index_t>(recv.size()) >= recv_counts[0],
                           "SelfComm::all_to_all_v buffers are smaller than their counts");
        std::copy_n(send.begin(), send_counts[0], recv.begin());
    }

    void all_gather(std::span<const float> in, std::span<float> out, HostStream = {})
    {
        require<CommError>(out.size() == in.size(), "SelfComm::all_gather output holds ", out.size(),
                           " elements, expected ", in.size());
        std::copy(in.begin(), in.end(), out.begin());
    }

    [[nodiscard]] SelfComm split(int /*color*/, int /*key*/) const { return {}; }
};
static_assert(Comm<SelfComm>);

}  // namespace foe::comm
