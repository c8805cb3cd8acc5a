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
#include <map>
#include <memory>

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

/// g.nt_batched(a, stride_a, b, stride_b, c, stride_c, batch, out, m, n, k, stream, beta): `batch`
/// independent GEMMs of one launch, C_i = A_i B_i^T + beta C_i with A_i = a + i stride_a, B_i =
/// b + i stride_b, C_i = c + i stride_c (strides in elements of each matrix's type; each matrix
/// row-major and contiguous as in nt). What the attention of an FoE layer's groups runs as one
/// call (every group's q|k|v projection, every group's o_proj). batch may be 0.
template <class G>
concept DeviceBatchedGemmPolicy =
    DeviceGemmPolicy<G> && requires(G& g, const bfloat16* a, const bfloat16* b, void* c, OutType out, index_t m,
                                    index_t n, index_t k, index_t stride, index_t batch, cudaStream_t stream,
                                    float beta) {
        { g.nt_batched(a, stride, b, stride, c, stride, batch, out, m, n, k, stream, beta) } -> std::same_as<void>;
    };

/// The GEMM policy instance that device policies share: one per (host thread, CUDA device), made
/// on first use. A cuBLASLt handle and its 32 MiB workspace per policy object would cost every
/// layer three of each; one per device and thread is what a stream-ordered caller needs (two
/// threads never share a workspace).
template <DeviceGemmPolicy Gemm>
[[nodiscard]] Gemm& device_gemm()
{
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) device = 0;
    thread_local std::map<int, std::unique_ptr<Gemm>> per_device;
    auto& g = per_device[device];
    if (!g) g = std::make_unique<Gemm>();
    return *g;
}

}  // namespace foe::cuda
