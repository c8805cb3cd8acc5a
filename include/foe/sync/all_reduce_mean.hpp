#pragma once
// AllReduceMean<Comm>: FoE's residual sync. The groups held locally are summed first (so a rank
// with several groups sends one buffer, not one per group), then one all-reduce(sum) over the
// ranks of the sync communicator, then a scale by 1/H.

#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/comm/self_comm.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe::sync {

template <comm::Comm C = comm::SelfComm>
class AllReduceMean {
public:
    /// The communicator's: over NcclComm the all-reduce reads device memory, so a host layer
    /// cannot take AllReduceMean<NcclComm> (layer/backend_check.hpp refuses it at compile time).
    using backend = comm::comm_backend_t<C>;

    AllReduceMean() = default;
    explicit AllReduceMean(C comm) : comm_(std::move(comm)) {}

    void sync(std::span<const MatrixView<const float>> residuals, index_t groups, MatrixView<float> rf)
    {
        require<ConfigError>(groups > 0, "residual sync needs a positive number of groups, got ", groups);
        detail::sum_in_order(residuals, rf);
        require(rf.is_contiguous(), "the synchronised residual must be contiguous to be all-reduced");
        comm_.all_reduce_sum(rf.span(), typename C::stream_type{});
        if (groups == 1) return;  // r itself: keeps H = 1 bit-identical to a standard MoE layer
        const float scale = 1.0f / static_cast<float>(groups);
        for (float& v : rf.span()) v *= scale;
    }

    [[nodiscard]] C& comm() noexcept { return comm_; }

private:
    C comm_{};
};
static_assert(ResidualSyncPolicy<AllReduceMean<>>);

}  // namespace foe::sync
