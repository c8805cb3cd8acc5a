#pragma once
// Dense GEMM policies of the host backend: C = A * B^T (+ C).
//
// Every projection in the model multiplies activations [M, K] by a weight stored as Hugging Face
// does, [out, in] row-major, so the one operation needed is "NT": C[M, N] = A[M, K] * B[N, K]^T.
// A GEMM policy is a type with a static nt(); layers take it as a template argument so a user
// can swap in their own BLAS. Both policies are deterministic: the same inputs give the same bits
// whatever the thread count (threads split rows of C, never the K reduction).

#include <algorithm>
#include <concepts>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"

#if defined(FOE_WITH_CBLAS)
#include <cblas.h>
#endif

namespace foe::gemm {

/// What a GEMM policy provides.
template <class G>
concept GemmPolicy = requires(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool acc) {
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
/// reassociating (no -ffast-math), and the summation order is fixed.
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

/// Plain C++ GEMM; the fallback when no BLAS is available. The output is cut into tiles of one
/// row by up to 64 columns (64 rows of B, which stay in cache while they are used) and OpenMP
/// shares out the tiles, so a decode step (one row) is as parallel as a prefill.
struct Portable {
    static void nt(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool accumulate)
    {
        detail::check_nt_shapes(a, b, c);
        const index_t m = a.extent(0), n = b.extent(0), k = a.extent(1);
        constexpr index_t tile_n = 64;
        const index_t tiles_n = (n + tile_n - 1) / tile_n;
        // Tiles ordered column block first: consecutive tiles share their block of B.
        FOE_OMP_PARALLEL_FOR
        for (index_t tile = 0; tile < m * tiles_n; ++tile) {
            const index_t i = tile % m, j0 = tile / m * tile_n, j1 = std::min(n, j0 + tile_n);
            // Pointer arithmetic, not a(i, 0): with K = 0 there is no element 0 to index.
            const float* ai = a.data() + i * a.stride(0);
            float* ci = c.data() + i * c.stride(0);
            for (index_t j = j0; j < j1; ++j) {
                const float v = detail::dot(ai, b.data() + j * b.stride(0), k);
                ci[j] = accumulate ? ci[j] + v : v;
            }
        }
    }
};
static_assert(GemmPolicy<Portable>);

#if defined(FOE_WITH_CBLAS)
/// CBLAS sgemm (OpenBLAS when found); the consumer links a CBLAS and defines FOE_WITH_CBLAS.
struct Cblas {
    static void nt(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool accumulate)
    {
        detail::check_nt_shapes(a, b, c);
        const index_t m = a.extent(0), n = b.extent(0), k = a.extent(1);
        if (m == 0 || n == 0) return;
        if (k == 0) {
            if (!accumulate)
                for (index_t i = 0; i < m; ++i) std::fill_n(&c(i, 0), n, 0.0f);
            return;
        }
        // CBLAS takes int dimensions; the config's extent cap keeps each operand far below 2^31
        // rows, but a caller's view might not.
        constexpr index_t max_int = 2147483647;
        require(m <= max_int && n <= max_int && k <= max_int && a.stride(0) <= max_int && b.stride(0) <= max_int &&
                    c.stride(0) <= max_int,
                "GEMM extent exceeds CBLAS's int range");
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                    static_cast<int>(k), 1.0f, a.data(), static_cast<int>(a.stride(0)), b.data(),
                    static_cast<int>(b.stride(0)), accumulate ? 1.0f : 0.0f, c.data(), static_cast<int>(c.stride(0)));
    }
};
static_assert(GemmPolicy<Cblas>);
using Default = Cblas;
#else
using Default = Portable;
#endif

}  // namespace foe::gemm
