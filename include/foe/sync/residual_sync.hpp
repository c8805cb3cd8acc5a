#pragma once
// The residual-sync policy kind: how the post-attention residuals r[h] of the groups meet.
// sync(residuals, total_groups, rf) receives the residuals of the groups this rank holds and
// writes the synchronised residual rf = (1/H) sum over all H groups of r[h].

#include <concepts>
#include <span>

#include "foe/core/backend.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"

namespace foe::sync {

template <class S>
concept HostResidualSyncPolicy =
    std::same_as<backend_of_t<S>, HostBackend> &&
    requires(S& s, std::span<const MatrixView<const float>> residuals, index_t groups, MatrixView<float> rf) {
        { s.sync(residuals, groups, rf) } -> std::same_as<void>;
    };

/// On the device (sync/all_reduce_mean.cuh, sync/no_sync.cuh) the held streams come as one bf16
/// tensor [held, T, d] and the work goes on the context's stream. A policy with
/// `static constexpr bool identity = true` (one stream, no peers) lets the layer use r[0] as rf.
template <class S>
concept DeviceResidualSyncPolicy =
    std::same_as<backend_of_t<S>, CudaBackend> &&
    requires(S& s, TensorView<const bfloat16, 3> residuals, index_t groups, MatrixView<bfloat16> rf,
             const cuda::DeviceContext& ctx) {
        { s.sync(residuals, groups, rf, ctx) } -> std::same_as<void>;
    };

template <class S>
concept ResidualSyncPolicy = HostResidualSyncPolicy<S> || DeviceResidualSyncPolicy<S>;

namespace detail {

/// rf = sum of the residuals, added in group order (a fixed order: deterministic).
inline void sum_in_order(std::span<const MatrixView<const float>> residuals, MatrixView<float> rf)
{
    require(!residuals.empty(), "residual sync needs at least one stream");
    const index_t t = rf.extent(0), d = rf.extent(1);
    for (const auto& r : residuals)
        require(r.extent(0) == t && r.extent(1) == d, "residual stream is ", format_shape(r.shape()),
                ", synchronised residual is ", format_shape(rf.shape()));
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < t; ++i) {
        float* out = &rf(i, 0);
        const float* first = &residuals[0](i, 0);
        for (index_t j = 0; j < d; ++j) out[j] = first[j];
        for (std::size_t h = 1; h < residuals.size(); ++h) {
            const float* r = &residuals[h](i, 0);
            for (index_t j = 0; j < d; ++j) out[j] += r[j];
        }
    }
}

}  // namespace detail
}  // namespace foe::sync
