#pragma once
// The dense GEMM policy kind of foe's CUDA backend: C[M, N] = A[M, K] B[N, K]^T + beta C, every
// matrix row-major and contiguous, B stored [out, in] as the weights are (the device counterpart
// of the host's Gemm::nt). A and B bf16, fp32 accumulation, C bf16 or fp32.
//
// Implementations, each checked against the concept beside its definition:
//   LtGemm (gemm_lt.cuh)  cuBLASLt; owns a handle and a workspace
//   TcGemm (gemm_tc.cuh)  foe's own tensor-core kernel; no state, no handle

#include <cuda_runtime.h>

#include <concepts>

#include "foe/core/half.hpp"
#include "foe/core/types.hpp"

namespace foe::cuda {

/// Element type of C (and of the beta C read back).
enum class OutType { bf16, fp32 };

/// g.nt(a, b, c, out, m, n, k, stream, beta): C[M, N] = A[M, K] B[N, K]^T + beta C, enqueued on
/// `stream` (no host synchronisation); c points to bf16 or fp32 as `out` says; M, N, K may be 0.
template <class G>
concept DeviceGemmPolicy = requires(G& g, const bfloat16* a, const bfloat16* b, void* c, OutType out, index_t m,
                                    index_t n, index_t k, cudaStream_t stream, float beta) {
    { g.nt(a, b, c, out, m, n, k, stream, beta) } -> std::same_as<void>;
};

}  // namespace foe::cuda
