#pragma once
// RMSNorm on the device: y[i, :] = w * (x[i, :] * rsqrt(mean(x[i, :]^2) + eps)), bf16 in and out,
// fp32 accumulation; the host oracle is foe::ops::rms_norm. Per-head QK-norm is the same kernel
// over [tokens * heads, head_dim] rows (rms_norm_qk below). Rows may sit inside wider token rows
// (the q or k part of a fused q|k|v projection): row i is element (i / parts) * token_stride +
// (i % parts) * n.

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// Launch configuration: one block per row. 256 threads = 8 warps: a d = 768..2048 row is 3..8
/// elements per thread, enough loads in flight per SM with several blocks resident, and the
/// block reduction is one shared-memory step over 8 warp partials.
struct RmsNormLaunch {
    static constexpr int block_threads = 256;
    static constexpr int warps = block_threads / 32;
};

inline namespace kernels_v0_1 {

template <class Launch = RmsNormLaunch>
FOE_KERNEL(Launch::block_threads)
void rms_norm_kernel(const bfloat16* x, const bfloat16* __restrict__ w, bfloat16* y, int n, int parts,
                     std::size_t token_stride, float eps)  // x may be y
{
    __shared__ float partial[Launch::warps];
    const auto row = static_cast<std::size_t>(blockIdx.x / static_cast<unsigned>(parts)) * token_stride +
                     static_cast<std::size_t>(blockIdx.x % static_cast<unsigned>(parts)) * static_cast<std::size_t>(n);
    const bfloat16* xi = x + row;
    float ss = 0.0f;
    for (int j = static_cast<int>(threadIdx.x); j < n; j += Launch::block_threads) {
        const float v = static_cast<float>(xi[j]);
        ss = fmaf(v, v, ss);
    }
    ss = detail::warp_sum(ss);
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int k = 0; k < Launch::warps; ++k) total += partial[k];  // fixed order: deterministic
    const float r = rsqrtf(total / static_cast<float>(n) + eps);
    bfloat16* yi = y + row;  // may alias x: each element is read before it is written, by one thread
    for (int j = static_cast<int>(threadIdx.x); j < n; j += Launch::block_threads)
        yi[j] = bfloat16(static_cast<float>(w[j]) * (static_cast<float>(xi[j]) * r));
}

}  // namespace kernels_v0_1

/// RMSNorm of `parts` consecutive rows of n elements in each of `tokens` token rows that start
/// token_stride elements apart (>= parts * n); y may equal x (in place), and shares the layout.
inline void rms_norm_strided(const bfloat16* x, const bfloat16* w, bfloat16* y, index_t tokens, index_t parts, index_t n,
                             index_t token_stride, float eps, cudaStream_t stream)
{
    require(tokens >= 0 && parts > 0 && n > 0 && n <= (index_t{1} << 30), "rms_norm: bad shape [", tokens, ", ", parts,
            ", ", n, "]");
    require(token_stride >= parts * n, "rms_norm: token_stride ", token_stride, " is less than the ", parts, " x ", n,
            " elements of a token row");
    require(tokens * parts <= 0x7fffffff, "rms_norm: ", tokens * parts, " rows exceed the grid");
    if (tokens == 0) return;
    rms_norm_kernel<<<static_cast<unsigned>(tokens * parts), RmsNormLaunch::block_threads, 0, stream>>>(
        x, w, y, static_cast<int>(n), static_cast<int>(parts), static_cast<std::size_t>(token_stride), eps);
    check_launch("rms_norm_kernel");
}

/// RMSNorm of `rows` contiguous rows of n elements; y may equal x (in place).
inline void rms_norm(const bfloat16* x, const bfloat16* w, bfloat16* y, index_t rows, index_t n, float eps,
                     cudaStream_t stream)
{
    rms_norm_strided(x, w, y, rows, 1, n, n, eps, stream);
}

/// Per-head QK-norm, in place: q or k [tokens, heads, head_dim] with token rows token_stride
/// elements apart, normalised per head with one head_dim weight shared by every head.
inline void rms_norm_qk(bfloat16* qk, const bfloat16* w, index_t tokens, index_t heads, index_t head_dim,
                        index_t token_stride, float eps, cudaStream_t stream)
{
    rms_norm_strided(qk, w, qk, tokens, heads, head_dim, token_stride, eps, stream);
}

/// Per-head QK-norm of contiguous [tokens, heads, head_dim].
inline void rms_norm_qk(bfloat16* qk, const bfloat16* w, index_t tokens, index_t heads, index_t head_dim, float eps,
                        cudaStream_t stream)
{
    rms_norm_qk(qk, w, tokens, heads, head_dim, heads * head_dim, eps, stream);
}

}  // namespace foe::cuda
