#pragma once
// The model's small memory-bound kernels: the embedding lookup, the gather of each sequence's last
// row (LogitRows::last_per_chunk), and the two halves of a residual sync whose sum crosses ranks (sum the held streams in fp32; scale and round once to bf16).
// Each output element is written by one thread that adds its terms in a fixed order, so results
// are bit-identical run to run.

#include <algorithm>
#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// Grid-stride elementwise kernels: 256 threads, at most 1056 blocks (8 per SM on an H200).
struct ElementwiseLaunch {
    static constexpr int block_threads = 256;
    static constexpr index_t max_blocks = 1056;
};

inline namespace kernels_v0_1 {

/// out[i, :] = table[ids[i], :]; ids were validated on the host before they were copied.
template <class Launch = ElementwiseLaunch>
FOE_KERNEL(Launch::block_threads)
void embedding_kernel(const bfloat16* __restrict__ table, const std::int32_t* __restrict__ ids, int d, bfloat16* out)
{
    const bfloat16* src = table + static_cast<std::size_t>(ids[blockIdx.x]) * static_cast<std::size_t>(d);
    bfloat16* dst = out + static_cast<std::size_t>(blockIdx.x) * static_cast<std::size_t>(d);
    for (int j = static_cast<int>(threadIdx.x); j < d; j += Launch::block_threads) dst[j] = src[j];
}

/// out[b, :] = x[row_offsets[b + 1] - 1, :]: each sequence's last row (every sequence has one).
template <class Launch = ElementwiseLaunch>
FOE_KERNEL(Launch::block_threads)
void gather_last_rows_kernel(const bfloat16* __restrict__ x, const std::int32_t* __restrict__ row_offsets, int d,
                             bfloat16* __restrict__ out)
{
    const bfloat16* src = x + static_cast<std::size_t>(row_offsets[blockIdx.x + 1] - 1) * static_cast<std::size_t>(d);
    bfloat16* dst = out + static_cast<std::size_t>(blockIdx.x) * static_cast<std::size_t>(d);
    for (int j = static_cast<int>(threadIdx.x); j < d; j += Launch::block_threads) dst[j] = src[j];
}

/// out[i] = sum over s of x[s n + i] in s order, fp32.
template <class Launch = ElementwiseLaunch>
FOE_KERNEL(Launch::block_threads)
void stream_sum_kernel(const bfloat16* __restrict__ x, std::size_t n, int streams, float* __restrict__ out)
{
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        float acc = static_cast<float>(x[i]);
        for (int s = 1; s < streams; ++s) acc += static_cast<float>(x[static_cast<std::size_t>(s) * n + i]);
        out[i] = acc;
    }
}

/// out[i] = bf16(x[i] * scale).
template <class Launch = ElementwiseLaunch>
FOE_KERNEL(Launch::block_threads)
void scale_round_kernel(const float* __restrict__ x, std::size_t n, float scale, bfloat16* __restrict__ out)
{
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        out[i] = bfloat16(x[i] * scale);
}

/// out[i] = bf16(x[i] + a[i]), the sum in fp32.
template <class Launch = ElementwiseLaunch>
FOE_KERNEL(Launch::block_threads)
void add_round_kernel(const bfloat16* __restrict__ x, const float* __restrict__ a, std::size_t n,
                      bfloat16* __restrict__ out)
{
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        out[i] = bfloat16(static_cast<float>(x[i]) + a[i]);
}

}  // namespace kernels_v0_1

namespace detail {
[[nodiscard]] inline unsigned grid_stride_blocks(std::size_t n)
{
    const auto per_block = static_cast<std::size_t>(ElementwiseLaunch::block_threads);
    return static_cast<unsigned>(std::clamp<std::size_t>((n + per_block - 1) / per_block, 1,
                                                         static_cast<std::size_t>(ElementwiseLaunch::max_blocks)));
}
}  // namespace detail

/// out [tokens, d] = rows ids[0..tokens) of table [vocab, d] (ids on the device, already valid).
inline void embedding(const bfloat16* table, const std::int32_t* ids, index_t tokens, index_t d, bfloat16* out,
                      cudaStream_t stream)
{
    require(tokens >= 0 && tokens <= 0x7fffffff && d > 0 && d <= 0x7fffffff, "embedding: bad shape [", tokens, ", ",
            d, "]");
    if (tokens == 0) return;
    embedding_kernel<<<static_cast<unsigned>(tokens), ElementwiseLaunch::block_threads, 0, stream>>>(
        table, ids, static_cast<int>(d), out);
    check_launch("embedding_kernel");
}

/// out [sequences, d] = the last row of each sequence of x [tokens, d], from the batch's device
/// row offsets [sequences + 1] (the host checked that no sequence is empty). out must not overlap x.
inline void gather_last_rows(const bfloat16* x, const std::int32_t* row_offsets, index_t sequences, index_t d,
                             bfloat16* out, cudaStream_t stream)
{
    require(sequences >= 0 && sequences <= 0x7fffffff && d > 0 && d <= 0x7fffffff, "gather_last_rows: bad shape [",
            sequences, ", ", d, "]");
    if (sequences == 0) return;
    gather_last_rows_kernel<<<static_cast<unsigned>(sequences), ElementwiseLaunch::block_threads, 0, stream>>>(
        x, row_offsets, static_cast<int>(d), out);
    check_launch("gather_last_rows_kernel");
}

/// out [n] (fp32) = sum of the `streams` consecutive blocks of n elements of x, in order.
inline void stream_sum(const bfloat16* x, index_t streams, std::size_t n, float* out, cudaStream_t stream)
{
    require(streams > 0 && streams <= 0x7fffffff, "stream_sum: bad stream count ", streams);
    if (n == 0) return;
    stream_sum_kernel<<<detail::grid_stride_blocks(n), ElementwiseLaunch::block_threads, 0, stream>>>(
        x, n, static_cast<int>(streams), out);
    check_launch("stream_sum_kernel");
}

/// out [n] (bf16) = x [n] (fp32) * scale, one rounding.
inline void scale_round(const float* x, std::size_t n, float scale, bfloat16* out, cudaStream_t stream)
{
    if (n == 0) return;
    scale_round_kernel<<<detail::grid_stride_blocks(n), ElementwiseLaunch::block_threads, 0, stream>>>(x, n, scale,
                                                                                                        out);
    check_launch("scale_round_kernel");
}

/// out [n] (bf16) = x [n] (bf16) + a [n] (fp32), added in fp32, one rounding (a residual plus an
/// fp32 sum over ranks). out must not overlap x or a.
inline void add_round(const bfloat16* x, const float* a, std::size_t n, bfloat16* out, cudaStream_t stream)
{
    if (n == 0) return;
    add_round_kernel<<<detail::grid_stride_blocks(n), ElementwiseLaunch::block_threads, 0, stream>>>(x, a, n, out);
    check_launch("add_round_kernel");
}

}  // namespace foe::cuda
