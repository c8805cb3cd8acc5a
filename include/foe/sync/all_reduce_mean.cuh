#pragma once
// AllReduceMean<C> over a device communicator (NcclComm, CudaSelfComm): FoE's residual sync on
// the CUDA backend, the partial specialization of the host policy in sync/all_reduce_mean.hpp
// (selected whenever comm::comm_backend_t<C> is CudaBackend).
//
//   one rank:   rf = (sum of the held streams in order) * (1/H)   one launch (cuda::stream_mean)
//   otherwise:  fp32 sum of the held streams in order (cuda::stream_sum) into scratch, the
//               communicator's all_reduce_sum on ctx.stream, then * (1/H) rounded once to bf16
//               (cuda::scale_round)
//
// Bits: the paths of foe::cuda::Layer (stream_mean when one rank holds every group, stream_sum +
// the caller's reduce + scale_round otherwise). On one rank the two paths give the same bits (the
// same fp32 sum in stream order, the same scale, one rounding), so the one-launch path is taken
// whenever the communicator has one rank, whatever share of the groups it holds.

#include <cstddef>
#include <span>
#include <utility>

#include "foe/comm/comm.hpp"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/context.cuh"
#include "foe/experts/combine.cuh"
#include "foe/ops/elementwise.cuh"
#include "foe/sync/all_reduce_mean.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe::sync {

template <comm::Comm C>
    requires detail::device_comm<C>
class AllReduceMean<C> {
public:
    using backend = CudaBackend;
    /// rf is a new buffer: the mean of H streams (even H = 1 goes through sync()).
    static constexpr bool identity = false;

    AllReduceMean() = default;
    /// Takes the communicator of the ranks that hold the other groups (moved in: NcclComm is
    /// move-only).
    explicit AllReduceMean(C comm) : comm_(std::move(comm)) {}

    /// The fp32 partial sum [max_tokens, hidden] of the cross-rank path; none on one rank.
    [[nodiscard]] std::size_t scratch_bytes(index_t max_tokens, index_t hidden_size) const
    {
        return comm_.size() == 1 ? 0
                                 : cuda::align_up(static_cast<std::size_t>(max_tokens * hidden_size) * sizeof(float));
    }

    /// residuals [held, T, d] (the held groups' r[h], contiguous, device), groups = H (all
    /// groups over all ranks), rf [T, d] (contiguous, device, not overlapping residuals).
    /// Enqueued on ctx.stream; the cross-rank path is a collective: every rank of the
    /// communicator calls it with the same T (FoE ranks run the same batch), and with T = 0
    /// nobody enqueues anything.
    void sync(TensorView<const bfloat16, 3> residuals, index_t groups, MatrixView<bfloat16> rf,
              const cuda::DeviceContext& ctx)
    {
        const index_t held = residuals.extent(0), t = residuals.extent(1), d = residuals.extent(2);
        require<ConfigError>(groups > 0 && held > 0 && held <= groups, "residual sync: ", held, " held of ", groups,
                             " groups; needs 1 <= held <= groups");
        require(rf.extent(0) == t && rf.extent(1) == d, "residual streams are [", t, ", ", d,
                "], synchronised residual is ", format_shape(rf.shape()));
        const auto n = static_cast<std::size_t>(t * d);
        if (n == 0) return;
        require(residuals.is_contiguous() && rf.is_contiguous(),
                "residual sync: the streams and rf must be contiguous device buffers");
        if (comm_.size() == 1) {
            cuda::stream_mean(residuals.data(), held, t, d, groups, rf.data(), ctx.stream);
            return;
        }
        float* sum = ctx.take<float>(n);
        cuda::stream_sum(residuals.data(), held, n, sum, ctx.stream);
        comm_.all_reduce_sum(std::span<float>(sum, n), ctx.stream);
        cuda::scale_round(sum, n, 1.0f / static_cast<float>(groups), rf.data(), ctx.stream);
    }

    [[nodiscard]] C& comm() noexcept { return comm_; }

private:
    C comm_{};
};

static_assert(DeviceResidualSyncPolicy<AllReduceMean<comm::CudaSelfComm>>);

}  // namespace foe::sync
