#pragma once
// The host GEMM policies foe ships, and gemm::Default, the one its layers use unless told.
//
//   BatchInvariant  foe's own (batch_invariant_gemm.hpp): every output one fixed chain of FMAs,
//                   so the same bits whatever the batch, the thread count or the CPU.
//   Cblas           a vendor CBLAS sgemm (OpenBLAS when found): deterministic run to run for the
//                   same shapes and threads, but not bit for bit across shapes, thread counts or
//                   CPUs; equal to BatchInvariant within fp32 rounding.
//
// Default, what layers and models use unless told otherwise, is BatchInvariant: the strongest
// promise at about OpenBLAS's speed on foe's shapes (bench_kernels: gemm_nt/*). Cblas exists
// when the consumer defines FOE_WITH_CBLAS and links a CBLAS (foe's CMake target foe::cblas
// does); name it as a layer's or model's GEMM policy to use it.

#include <algorithm>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"
#include "foe/ops/batch_invariant_gemm.hpp"
#include "foe/ops/gemm_policy.hpp"

#if defined(FOE_WITH_CBLAS)
#include <cblas.h>
#endif

namespace foe::gemm {

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
#endif

using Default = BatchInvariant;

}  // namespace foe::gemm

#include "foe/ops/weight_gemm.hpp"  // gemm::nt over weights in their stored dtype
