#pragma once
// The weighted combine of expert outputs into the H residual streams, and the stream mean.
//
//   out[g, t, :] = base[t, :] + sum over the k/H slots s of held group g, in slot order,
//                  of w[t, g k/H + s] * y[inverse[t slots + g k/H + s], :]
//   mean[t, :]   = (sum_h x[h, t, :], added in h order) * (1/H)
//
// Every output element is written by one thread that adds its terms in a fixed order, in fp32,
// and rounds once to bf16: no atomics, so results are bit-identical run to run. The host
// oracles are SwiGluExperts::combine and sync::detail::sum_in_order.

#include <algorithm>
#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// One block per (token, group) output row, threads over d: 256 threads are 3 (d = 768) to 8
/// (d = 2048) elements each, and the row's k/H slot indices and weights are read once per thread
/// from L1.
struct CombineLaunch {
    static constexpr int block_threads = 256;
};

inline namespace kernels_v0_1 {

template <class Launch = CombineLaunch>
FOE_KERNEL(Launch::block_threads)
void combine_kernel(const bfloat16* __restrict__ y, const std::int32_t* __restrict__ inverse,
                    const float* __restrict__ weights, const bfloat16* __restrict__ base, int tokens, int d,
                    int slots_per_token, int k_per_group, bfloat16* out)
{
    const int t = static_cast<int>(blockIdx.x), g = static_cast<int>(blockIdx.y);
    const std::size_t first = static_cast<std::size_t>(t) * static_cast<std::size_t>(slots_per_token) +
                              static_cast<std::size_t>(g) * static_cast<std::size_t>(k_per_group);
    bfloat16* o = out + (static_cast<std::size_t>(g) * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t)) *
                            static_cast<std::size_t>(d);
    for (int j = static_cast<int>(threadIdx.x); j < d; j += Launch::block_threads) {
        float acc = base != nullptr ? static_cast<float>(base[static_cast<std::size_t>(t) * static_cast<std::size_t>(d) + j]) : 0.0f;
        for (int s = 0; s < k_per_group; ++s) {
            const int row = inverse[first + static_cast<std::size_t>(s)];
            if (row < 0) continue;  // an expert this rank does not hold
            acc = fmaf(weights[first + static_cast<std::size_t>(s)],
                       static_cast<float>(y[static_cast<std::size_t>(row) * static_cast<std::size_t>(d) + j]), acc);
        }
        o[j] = bfloat16(acc);
    }
}

template <class Launch = CombineLaunch>
FOE_KERNEL(Launch::block_threads)
void stream_mean_kernel(const bfloat16* __restrict__ x, std::size_t n, int streams, float scale, bfloat16* out)
{
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        float acc = static_cast<float>(x[i]);
        for (int h = 1; h < streams; ++h) acc += static_cast<float>(x[static_cast<std::size_t>(h) * n + i]);
        out[i] = bfloat16(acc * scale);
    }
}

}  // namespace kernels_v0_1

/// Combines expert outputs y [rows, d] (bf16, in sorted order; `inverse` from permute()) with the
/// router weights [tokens, slots_per_token] into out [held_groups, tokens, d], held_groups =
/// slots_per_token / k_per_group; base [tokens, d] (the synchronised residual rf) is added when not null.
inline void combine(const bfloat16* y, const std::int32_t* inverse, const float* weights, const bfloat16* base,
                    index_t tokens, index_t d, index_t slots_per_token, index_t k_per_group, bfloat16* out,
                    cudaStream_t stream)
{
    require(k_per_group > 0 && slots_per_token % k_per_group == 0, "combine: ", slots_per_token,
            " slots per token are not whole groups of ", k_per_group);
    require(tokens >= 0 && tokens <= 0x7fffffff && d > 0 && slots_per_token / k_per_group <= 65535,
            "combine: bad shape");
    if (tokens == 0) return;
    const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(slots_per_token / k_per_group));
    combine_kernel<<<grid, CombineLaunch::block_threads, 0, stream>>>(y, inverse, weights, base, static_cast<int>(tokens),
                                                                      static_cast<int>(d), static_cast<int>(slots_per_token),
                                                                      static_cast<int>(k_per_group), out);
    check_launch("combine_kernel");
}

/// out [tokens, d] = (sum of the `streams` streams of x [streams, tokens, d], in order) * (1/H):
/// the last layer's average (H = streams), or a sync over streams held on one device.
inline void stream_mean(const bfloat16* x, index_t streams, index_t tokens, index_t d, index_t groups, bfloat16* out,
                        cudaStream_t stream)
{
    require(streams > 0 && groups > 0 && tokens >= 0 && d > 0, "stream_mean: bad shape");
    const auto n = static_cast<std::size_t>(tokens * d);
    if (n == 0) return;
    const auto blocks = static_cast<unsigned>(std::min<std::size_t>((n + CombineLaunch::block_threads - 1) / CombineLaunch::block_threads, 4096));
    stream_mean_kernel<<<blocks, CombineLaunch::block_threads, 0, stream>>>(x, n, static_cast<int>(streams),
                                                                            1.0f / static_cast<float>(groups), out);
    check_launch("stream_mean_kernel");
}

}  // namespace foe::cuda
