#pragma once
// Weights on their way to the device: host views rounded to bf16 (row-major), uploaded once into
// a planned arena (the device policies and CudaModel share these).

#include <cuda_runtime.h>

#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/weight.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// Row-major bf16 copy of a (possibly strided, any stored dtype) host matrix view.
inline void append_bf16(std::vector<bfloat16>& out, const WeightMatrix& m)
{
    std::vector<float> row(static_cast<std::size_t>(m.extent(1)));
    out.reserve(out.size() + static_cast<std::size_t>(m.extent(0) * m.extent(1)));
    for (index_t i = 0; i < m.extent(0); ++i) {
        m.widen_row(i, row.data());
        for (const float v : row) out.push_back(bfloat16(v));
    }
}
inline void append_bf16(std::vector<bfloat16>& out, VectorView<const float> v)
{
    for (index_t i = 0; i < v.extent(0); ++i) out.push_back(bfloat16(v(i)));
}

/// Uploads a host vector into an arena buffer (synchronous: weights load once).
template <class T>
T* upload_to(DeviceArena& arena, const std::vector<T>& host)
{
    T* p = arena.take<T>(host.size());
    if (!host.empty())
        check(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy (weights)");
    return p;
}

}  // namespace foe::cuda
