#pragma once
// AllReduceMean<Comm>: FoE's residual sync. The groups held locally are summed first (so a rank
// with several groups sends one buffer, not one per group), then one all-reduce(sum) over the
// ranks of the sync communicator, then a scale by 1/H.
//
// This is the host policy, over a host communicator (SelfComm, MpiComm, ...). Over a device
// communicator (NcclComm, CudaSelfComm) AllReduceMean is the CUDA residual sync, a partial
// specialization in foe/sync/all_reduce_mean.cuh (it needs nvcc); without that header this
// template refuses a device communicator at compile time.

#include <concepts>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/comm/self_comm.hpp"
#include "foe/core/backend.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe::sync {

namespace detail {
/// A communicator whose collectives run on the device (comm::comm_backend_t is CudaBackend):
/// AllReduceMean over it is the specialization in foe/sync/all_reduce_mean.cuh.
template <class C>
concept device_comm = comm::Comm<C> && std::same_as<comm::comm_backend_t<C>, CudaBackend>;
}  // namespace detail

template <comm::Comm C = comm::SelfComm>
class AllReduceMean {
    static_assert(!detail::device_comm<C>,
                  "sync::AllReduceMean over a device communicator (NcclComm, CudaSelfComm) is the CUDA residual "
                  "sync: #include \"foe/sync/all_reduce_mean.cuh\" (compiled by nvcc) before naming it");

public:
    /// The communicator's: over NcclComm the all-reduce reads device memory, so a host layer
    /// cannot take AllReduceMean<NcclComm> (layer/backend_check.hpp refuses it at compile time,
    /// naming the policy, besides the static_assert above when the .cuh was not included).
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
