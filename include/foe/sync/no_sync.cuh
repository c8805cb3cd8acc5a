#pragma once
// CudaNoSync: the device residual sync of a single stream held on one rank (H = 1, the standard
// MoE), beside the host NoSync (sync/no_sync.hpp). rf = r[0]: `identity` tells a layer that it
// may read r[0] as rf and skip the call; sync() itself is one device-to-device copy (nothing
// when rf already is r[0]).

#include <cuda_runtime.h>

#include <cstddef>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/sync/residual_sync.hpp"

namespace foe::sync {

struct CudaNoSync {
    using backend = CudaBackend;
    static constexpr bool identity = true;

    [[nodiscard]] std::size_t scratch_bytes(index_t /*max_tokens*/, index_t /*hidden_size*/) const noexcept { return 0; }

    /// residuals [1, T, d], groups 1; rf [T, d]: a copy of r[0] on ctx.stream (none when rf is r[0]).
    void sync(TensorView<const bfloat16, 3> residuals, index_t groups, MatrixView<bfloat16> rf,
              const cuda::DeviceContext& ctx) const
    {
        require<ConfigError>(residuals.extent(0) == 1 && groups == 1, "CudaNoSync needs exactly one group on one rank, got ",
                             residuals.extent(0), " held of ", groups);
        require(rf.extent(0) == residuals.extent(1) && rf.extent(1) == residuals.extent(2), "residual stream is [",
                residuals.extent(1), ", ", residuals.extent(2), "], synchronised residual is ", format_shape(rf.shape()));
        const auto n = static_cast<std::size_t>(rf.extent(0) * rf.extent(1));
        if (n == 0 || rf.data() == residuals.data()) return;
        require(residuals.is_contiguous() && rf.is_contiguous(), "CudaNoSync: r and rf must be contiguous");
        cuda::check(cudaMemcpyAsync(rf.data(), residuals.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToDevice,
                                    ctx.stream),
                    "cudaMemcpyAsync (CudaNoSync)");
    }
};
static_assert(DeviceResidualSyncPolicy<CudaNoSync>);

}  // namespace foe::sync
