#pragma once
// RMSNorm over the rows of a matrix: y = w * (x / sqrt(mean(x^2) + eps)).
//
// Written as Hugging Face's OlmoeRMSNorm computes it (normalise, then scale by the weight); the
// sum of squares is accumulated in double so the host reference is at least as accurate as any
// device kernel it checks.

#include <cmath>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"

namespace foe::ops {

/// y[i, :] = w * x[i, :] * rsqrt(mean(x[i, :]^2) + eps). x and y may be the same view.
inline void rms_norm(MatrixView<const float> x, VectorView<const float> w, float eps, MatrixView<float> y)
{
    const index_t rows = x.extent(0), n = x.extent(1);
    require(w.extent(0) == n, "RMSNorm weight has ", w.extent(0), " elements but rows have ", n);
    require(y.extent(0) == rows && y.extent(1) == n, "RMSNorm output shape differs from its input's");
    require(x.stride(1) == 1 && y.stride(1) == 1 && w.stride(0) == 1, "RMSNorm needs unit-stride rows");
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < rows; ++i) {
        const float* xi = &x(i, 0);
        double ss = 0.0;
        for (index_t j = 0; j < n; ++j) ss += static_cast<double>(xi[j]) * xi[j];
        const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
        float* yi = &y(i, 0);
        for (index_t j = 0; j < n; ++j) yi[j] = w(j) * (xi[j] * r);
    }
}

}  // namespace foe::ops
