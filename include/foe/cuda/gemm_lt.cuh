#pragma once
// Dense GEMM policy on the device through cuBLASLt: C[M, N] = A[M, K] B[N, K]^T (+ beta C),
// every matrix row-major and contiguous, B stored [out, in] as the host's weights are (the
// host's Gemm::nt). A and B bf16, fp32 compute, C bf16 or fp32.
//
// cuBLASLt is column-major: a row-major [R, C] matrix is a column-major C x R one. So the call
// computes C^T (N x M) = B A^T with cuBLASLt's "A" = our B (K x N, transposed) and "B" = our A
// (K x M, not transposed).
//
// The handle and a 32 MiB workspace (what NVIDIA recommends for Hopper's cuBLASLt kernels) live
// in the LtGemm object; descriptors and the heuristic query are made per call (host cost of a few
// microseconds; caching them per shape is future work).

#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <source_location>
#include <string>
#include <utility>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm.cuh"

namespace foe::cuda {

/// Throws foe::CudaError if a cuBLAS(Lt) call failed.
inline void check(cublasStatus_t status, const char* what, std::source_location where = std::source_location::current())
{
    if (status == CUBLAS_STATUS_SUCCESS) return;
    (void)cudaGetLastError();
    throw CudaError(::foe::detail::concat(where.file_name(), ":", where.line(), ": ", what, " failed: cuBLAS status ",
                                   static_cast<int>(status), " (", cublasLtGetStatusString(status), ")"));
}

class LtGemm {
public:
    static constexpr std::size_t workspace_bytes = std::size_t{32} << 20;

    LtGemm() : workspace_(workspace_bytes) { check(cublasLtCreate(&handle_), "cublasLtCreate"); }
    LtGemm(const LtGemm&) = delete;
    LtGemm& operator=(const LtGemm&) = delete;
    ~LtGemm() { (void)cublasLtDestroy(handle_); }

    /// C[M, N] = A[M, K] B[N, K]^T + beta C. c is bf16 or fp32 as `out` says. M, N, K may be 0.
    void nt(const bfloat16* a, const bfloat16* b, void* c, OutType out, index_t m, index_t n, index_t k,
            cudaStream_t stream, float beta = 0.0f)
    {
        matmul(a, 0, b, 0, c, 0, 1, out, m, n, k, stream, beta);
    }

    /// `batch` GEMMs C_i = A_i B_i^T + beta C_i, A_i = a + i stride_a, B_i = b + i stride_b, C_i =
    /// c + i stride_c (elements; C's in its own type), as one strided-batched cuBLASLt call.
    void nt_batched(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c, index_t stride_c,
                    index_t batch, OutType out, index_t m, index_t n, index_t k, cudaStream_t stream,
                    float beta = 0.0f)
    {
        require(batch >= 0 && batch <= 0x7fffffff && stride_a >= 0 && stride_b >= 0 && stride_c >= 0,
                "LtGemm: bad batch ", batch, " or strides A ", stride_a, ", B ", stride_b, ", C ", stride_c);
        if (batch == 0) return;
        matmul(a, stride_a, b, stride_b, c, stride_c, batch, out, m, n, k, stream, beta);
    }

private:
    /// One cuBLASLt call; batch 1 sets no batch attributes (nt's descriptors as they always were).
    void matmul(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c, index_t stride_c,
                index_t batch, OutType out, index_t m, index_t n, index_t k, cudaStream_t stream, float beta)
    {
        require(m >= 0 && n >= 0 && k >= 0 && m <= 0x7fffffff && n <= 0x7fffffff && k <= 0x7fffffff,
                "LtGemm: bad shape M ", m, ", N ", n, ", K ", k);
        if (m == 0 || n == 0) return;
        const cudaDataType_t ctype = out == OutType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
        Desc d;
        check(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "set TRANSA");
        check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "set TRANSB");
        check(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_16BF, static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(n), k),
              "cublasLtMatrixLayoutCreate(B)");
        check(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_16BF, static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(m), k),
              "cublasLtMatrixLayoutCreate(A)");
        check(cublasLtMatrixLayoutCreate(&d.c, ctype, static_cast<std::uint64_t>(n), static_cast<std::uint64_t>(m), n),
              "cublasLtMatrixLayoutCreate(C)");
        const std::size_t c_size = out == OutType::bf16 ? sizeof(bfloat16) : sizeof(float);
        if (batch > 1) {
            // cuBLASLt's A is our B, its B our A (see the top of this file).
            const auto count = static_cast<std::int32_t>(batch);
            const std::int64_t sa = stride_b, sb = stride_a, sc = stride_c;
            for (auto [layout, stride] : {std::pair{d.a, sa}, std::pair{d.b, sb}, std::pair{d.c, sc}}) {
                check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
                      "set BATCH_COUNT");
                check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                       sizeof(stride)),
                      "set STRIDED_BATCH_OFFSET");
            }
        }
        check(cublasLtMatmulPreferenceCreate(&d.pref), "cublasLtMatmulPreferenceCreate");
        const std::size_t ws = workspace_bytes;
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
              "set MAX_WORKSPACE_BYTES");
        // The heuristic assumes 256-byte aligned pointers unless told otherwise; per-expert slices
        // of a grouped buffer are often only 16- or 32-byte aligned, and an algorithm chosen for
        // more would fault with a misaligned address.
        // Every matrix of a batch counts: its strides' bytes bound the alignment too.
        const auto stride_alignment = [&](index_t stride, std::size_t size) {
            return batch > 1 ? alignment(static_cast<std::uintptr_t>(stride) * size) : std::uint32_t{256};
        };
        const std::uint32_t align_a = std::min(alignment(b), stride_alignment(stride_b, sizeof(bfloat16)));
        const std::uint32_t align_b = std::min(alignment(a), stride_alignment(stride_a, sizeof(bfloat16)));
        const std::uint32_t align_c = std::min(alignment(c), stride_alignment(stride_c, c_size));
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                   sizeof(align_a)), "set MIN_ALIGNMENT_A_BYTES");
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                   sizeof(align_b)), "set MIN_ALIGNMENT_B_BYTES");
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                   sizeof(align_c)), "set MIN_ALIGNMENT_C_BYTES");
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                   sizeof(align_c)), "set MIN_ALIGNMENT_D_BYTES");
        cublasLtMatmulHeuristicResult_t heuristic{};
        int found = 0;
        check(cublasLtMatmulAlgoGetHeuristic(handle_, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found),
              "cublasLtMatmulAlgoGetHeuristic");
        if (found == 0)
            throw CudaError(::foe::detail::concat("cuBLASLt has no algorithm for bf16 GEMM M ", m, ", N ", n, ", K ", k,
                                                  batch > 1 ? ", batch " : "", batch > 1 ? std::to_string(batch) : ""));
        const float alpha = 1.0f;
        check(cublasLtMatmul(handle_, d.op, &alpha, b, d.a, a, d.b, &beta, c, d.c, c, d.c, &heuristic.algo,
                             workspace_.data(), workspace_bytes, stream),
              "cublasLtMatmul");
    }

    /// Largest power of two (at most 256) that divides the address.
    [[nodiscard]] static std::uint32_t alignment(const void* p) noexcept
    {
        return alignment(reinterpret_cast<std::uintptr_t>(p));
    }
    [[nodiscard]] static std::uint32_t alignment(std::uintptr_t addr) noexcept
    {
        std::uint32_t a = 256;
        while (a > 1 && addr % a != 0) a /= 2;
        return a;
    }

    /// Descriptors of one call, destroyed on every path out.
    struct Desc {
        cublasLtMatmulDesc_t op = nullptr;
        cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
        cublasLtMatmulPreference_t pref = nullptr;
        Desc() = default;
        Desc(const Desc&) = delete;
        Desc& operator=(const Desc&) = delete;
        ~Desc()
        {
            if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
            if (c) (void)cublasLtMatrixLayoutDestroy(c);
            if (b) (void)cublasLtMatrixLayoutDestroy(b);
            if (a) (void)cublasLtMatrixLayoutDestroy(a);
            if (op) (void)cublasLtMatmulDescDestroy(op);
        }
    };
    cublasLtHandle_t handle_ = nullptr;
    DeviceBuffer<unsigned char> workspace_;
};
static_assert(DeviceGemmPolicy<LtGemm>);
static_assert(DeviceBatchedGemmPolicy<LtGemm>);

}  // namespace foe::cuda
