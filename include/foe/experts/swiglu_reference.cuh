#pragma once
// Grouped SwiGLU experts on the device, the cuBLASLt per-expert reference: per expert, over the
// rows permute() grouped to it,
//   h = x_e [gate_e; up_e]^T      one cuBLASLt GEMM against the concatenated [2f, d] weight, fp32 out
//   a = silu(h[:, :f]) * h[:, f:] a small kernel, one bf16 rounding
//   y_e = a down_e^T              one cuBLASLt GEMM, bf16 out [rows_e, d]
// That is two GEMM launches per expert with rows, driven from the host: the expert row counts
// are read back (one device-to-host copy and stream synchronisation per call), so this version
// is not CUDA-graph capturable and pays launch overhead at small batches.
// grouped_swiglu.cuh is the device-offset version (foe's tensor-core kernels reading the offsets
// on the device: no host synchronisation, graph-capturable); this one is kept as the cuBLASLt
// reference it is tested and benchmarked against.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm_lt.cuh"

namespace foe::cuda {

/// Elementwise: 256 threads, grid-stride over rows x f.
struct SwiGluLaunch {
    static constexpr int block_threads = 256;
};

/// Device weights of one expert: gate_up [2f, d] (gate rows first, then up rows), down [d, f].
struct DeviceExpertWeights {
    const bfloat16* gate_up = nullptr;
    const bfloat16* down = nullptr;
};

inline namespace kernels_v0_1 {

template <class Launch = SwiGluLaunch>
FOE_KERNEL(Launch::block_threads)
void silu_mul_kernel(const float* __restrict__ h, std::size_t rows, int f, bfloat16* a)
{
    const std::size_t n = rows * static_cast<std::size_t>(f);
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        const std::size_t r = i / static_cast<std::size_t>(f), j = i % static_cast<std::size_t>(f);
        const float g = h[r * 2 * static_cast<std::size_t>(f) + j], u = h[r * 2 * static_cast<std::size_t>(f) + static_cast<std::size_t>(f) + j];
        a[i] = bfloat16(g / (1.0f + expf(-g)) * u);
    }
}

}  // namespace kernels_v0_1

/// Workspace of swiglu_experts for up to `rows` grouped rows of intermediate size f, in bytes.
[[nodiscard]] inline std::size_t swiglu_workspace_bytes(index_t rows, index_t f)
{
    return static_cast<std::size_t>(rows * 2 * f) * sizeof(float) + static_cast<std::size_t>(rows * f) * sizeof(bfloat16);
}

/// y [rows, d] (bf16, grouped order) = FFN_e(x) for the rows [offsets[e], offsets[e+1]) of every
/// local expert e; x [rows, d] is gather_rows()'s output, host_offsets the device offsets read back.
inline void swiglu_experts(LtGemm& gemm, const std::vector<DeviceExpertWeights>& weights,
                           const std::vector<std::int32_t>& host_offsets, const bfloat16* x, index_t d, index_t f,
                           void* workspace, bfloat16* y, cudaStream_t stream)
{
    require(host_offsets.size() == weights.size() + 1, "swiglu_experts: ", host_offsets.size(), " offsets for ",
            weights.size(), " experts");
    const index_t rows = host_offsets.empty() ? 0 : host_offsets.back();
    auto* h = static_cast<float*>(workspace);
    auto* act = reinterpret_cast<bfloat16*>(static_cast<unsigned char*>(workspace) +
                                            static_cast<std::size_t>(rows * 2 * f) * sizeof(float));
    for (std::size_t e = 0; e < weights.size(); ++e) {
        const index_t begin = host_offsets[e], n = host_offsets[e + 1] - begin;
        if (n <= 0) continue;
        const bfloat16* xe = x + begin * d;
        float* he = h + begin * 2 * f;
        bfloat16* ae = act + begin * f;
        gemm.nt(xe, weights[e].gate_up, he, OutType::fp32, n, 2 * f, d, stream);
        const auto total = static_cast<std::size_t>(n * f);
        const auto blocks = static_cast<unsigned>(std::min<std::size_t>((total + SwiGluLaunch::block_threads - 1) / SwiGluLaunch::block_threads, 4096));
        silu_mul_kernel<<<blocks, SwiGluLaunch::block_threads, 0, stream>>>(he, static_cast<std::size_t>(n),
                                                                           static_cast<int>(f), ae);
        check_launch("silu_mul_kernel");
        gemm.nt(ae, weights[e].down, y + begin * d, OutType::bf16, n, d, f, stream);
    }
}

}  // namespace foe::cuda
