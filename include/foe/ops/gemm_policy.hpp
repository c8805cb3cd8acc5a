#pragma once
// The GEMM policy concept of the host backend: C = A * B^T, or C += A * B^T.
//
// Every projection in the model multiplies activations [M, K] by a weight stored as Hugging Face
// does, [out, in] row-major, so the one operation needed is "NT": C[M, N] = A[M, K] * B[N, K]^T.
// A GEMM policy is a type with a static nt(); layers take it as a template argument so a user
// can swap in their own BLAS. The policies foe ships: gemm::BatchInvariant (foe's own, the same
// bits for a row whatever the batch, the thread count or the CPU) and gemm::Cblas (a vendor
// BLAS: fast, deterministic run to run, equal to BatchInvariant within fp32 rounding only).

#include <concepts>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"

namespace foe::gemm {

/// What a GEMM policy provides: nt(a, b, c, accumulate) computes c = a * b^T (accumulate false)
/// or c += a * b^T (accumulate true) for a [M, K], b [N, K], c [M, N], rows unit-stride.
template <class G>
concept GemmPolicy = requires(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool acc) {
    { G::nt(a, b, c, acc) } -> std::same_as<void>;
};

/// A GEMM policy that also reads B of element type BElem directly (bf16 or fp16 weights, widened
/// as they are read): nt(a, b, c, accumulate) with b a view of const BElem. gemm::BatchInvariant
/// does for foe::bfloat16 and foe::float16; a vendor BLAS policy (gemm::Cblas) does not, and its
/// callers widen such a B to fp32 first.
template <class G, class BElem>
concept GemmPolicyFor = GemmPolicy<G> && requires(MatrixView<const float> a, MatrixView<const BElem> b,
                                                  MatrixView<float> c, bool acc) {
    { G::nt(a, b, c, acc) } -> std::same_as<void>;
};

namespace detail {

inline void check_nt_shapes(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c)
{
    require(a.extent(1) == b.extent(1), "GEMM inner dimensions differ: A is [", a.extent(0), ", ", a.extent(1),
            "], B is [", b.extent(0), ", ", b.extent(1), "]");
    require(c.extent(0) == a.extent(0) && c.extent(1) == b.extent(0), "GEMM output is [", c.extent(0), ", ",
            c.extent(1), "] but A * B^T is [", a.extent(0), ", ", b.extent(0), "]");
    require(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
            "GEMM operands must have unit stride along their rows");
}

/// Dot product with 8 independent partial sums, so the compiler vectorises it without
/// reassociating (no -ffast-math), and the summation order is fixed (attention's q.k uses it).
inline float dot(const float* x, const float* y, index_t n) noexcept
{
    float lanes[8] = {};
    index_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += x[k + l] * y[k + l];
    float tail = 0.0f;
    for (; k < n; ++k) tail += x[k] * y[k];
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}

}  // namespace detail
}  // namespace foe::gemm
