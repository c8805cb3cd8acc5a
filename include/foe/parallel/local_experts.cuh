#pragma once
// CudaLocalExperts: the device expert-parallel policy beside the host LocalExperts
// (parallel/local_experts.hpp): every expert a token selected is held by this rank's experts
// policy, no communication; run() is the experts' compute(), combine() theirs (every held stream
// in one launch). Expert parallelism over ranks is CudaExchangeExperts
// (parallel/exchange_experts.cuh).

#include <cstddef>

#include "foe/core/backend.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/context.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/experts/experts.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

struct CudaLocalExperts {
    using backend = CudaBackend;
    /// Local experts: nothing crosses ranks, an empty batch needs no call.
    static constexpr bool collective = false;

    template <experts::DeviceExpertsPolicy X>
    [[nodiscard]] std::size_t scratch_bytes(const X& experts) const
    {
        return experts.scratch_bytes();
    }

    template <experts::DeviceExpertsPolicy X>
    void run(X& experts, MatrixView<const bfloat16> u, const routing::DeviceRoutingResult& r, MatrixView<bfloat16> y,
             const cuda::DeviceContext& ctx)
    {
        experts.compute(u, r, y, ctx);
    }

    template <experts::DeviceExpertsPolicy X>
    void combine(const X& experts, const routing::DeviceRoutingResult& r, MatrixView<const bfloat16> y,
                 MatrixView<const bfloat16> residual, TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) const
    {
        experts.combine(r, y, residual, out, ctx);
    }
};
static_assert(DeviceExpertParallelPolicy<CudaLocalExperts, experts::CudaSwiGluExperts<>>);

}  // namespace foe::parallel
