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

#include <cstdint>
#include <source_location>

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
        check(cublasLtMatmulPreferenceCreate(&d.pref), "cublasLtMatmulPreferenceCreate");
        const std::size_t ws = workspace_bytes;
        check(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
              "set MAX_WORKSPACE_BYTES");
        // The heuristic assumes 256-byte aligned pointers unless told otherwise; per-expert slices
        // of a grouped buffer are often only 16- or 32-byte aligned, and an algorithm chosen for
        // more would fault with a misaligned address.
        const std::uint32_t align_a = alignment(b), align_b = alignment(a), align_c = alignment(c);
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
            throw CudaError(::foe::detail::concat("cuBLASLt has no algorithm for bf16 GEMM M ", m, ", N ", n, ", K ", k));
        const float alpha = 1.0f;
        check(cublasLtMatmul(handle_, d.op, &alpha, b, d.a, a, d.b, &beta, c, d.c, c, d.c, &heuristic.algo,
                             workspace_.data(), workspace_bytes, stream),
              "cublasLtMatmul");
    }

private:
    /// Largest power of two (at most 256) that divides the address.
    [[nodiscard]] static std::uint32_t alignment(const void* p) noexcept
    {
        const auto addr = reinterpret_cast<std::uintptr_t>(p);
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

}  // namespace foe::cuda
