#pragma once
// gemm::nt over a weight in its stored dtype: the one call every layer makes for "activations
// times a weight", whatever the weight's dtype and whichever GEMM policy is chosen.
//
// A policy that reads bf16/fp16 B directly (gemm::BatchInvariant widens while it packs or
// streams B, exactly) gets the stored view; any other policy (gemm::Cblas, a user's BLAS) gets
// the weight widened into a per-thread scratch buffer first, which costs a pass over the weight
// per call: load weights widened (LoadOptions::widen_to_f32) when such a policy runs a bf16
// checkpoint often.

#include <cstddef>
#include <vector>

#include "foe/core/tensor.hpp"
#include "foe/core/weight.hpp"
#include "foe/ops/gemm_policy.hpp"

namespace foe::gemm {

/// c = a * w^T (accumulate false) or c += a * w^T (accumulate true), w in its stored dtype.
template <GemmPolicy G>
void nt(MatrixView<const float> a, const WeightMatrix& w, MatrixView<float> c, bool accumulate)
{
    w.visit([&]<class T>(MatrixView<const T> b) {
        if constexpr (GemmPolicyFor<G, T>) {
            G::nt(a, b, c, accumulate);
        } else {
            thread_local std::vector<float> widened;
            const index_t rows = b.extent(0), cols = b.extent(1);
            widened.resize(static_cast<std::size_t>(rows * cols));
            for (index_t i = 0; i < rows; ++i) w.widen_row(i, widened.data() + i * cols);
            G::nt(a, MatrixView<const float>(widened.data(), {rows, cols}), c, accumulate);
        }
    });
}

}  // namespace foe::gemm
