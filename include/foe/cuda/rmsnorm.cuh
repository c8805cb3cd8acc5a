#pragma once
// RMSNorm on the device: y[i, :] = w * (x[i, :] * rsqrt(mean(x[i, :]^2) + eps)), bf16 in and out,
// fp32 accumulation; the host oracle is foe::ops::rms_norm. Per-head QK-norm is the same kernel
// over [tokens * heads, head_dim] rows (rms_norm_qk below).

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
void rms_norm_kernel(const bfloat16* x, const bfloat16* __restrict__ w, bfloat16* y, int n, float eps)  // x may be y
{
    __shared__ float partial[Launch::warps];
    const auto row = static_cast<std::size_t>(blockIdx.x) * static_cast<std::size_t>(n);
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

/// RMSNorm of `rows` contiguous rows of n elements; y may equal x (in place).
inline void rms_norm(const bfloat16* x, const bfloat16* w, bfloat16* y, index_t rows, index_t n, float eps,
                     cudaStream_t stream)
{
    require(rows >= 0 && n > 0 && n <= (index_t{1} << 30), "rms_norm: bad shape [", rows, ", ", n, "]");
    require(rows <= 0x7fffffff, "rms_norm: ", rows, " rows exceed the grid");
    if (rows == 0) return;
    rms_norm_kernel<<<static_cast<unsigned>(rows), RmsNormLaunch::block_threads, 0, stream>>>(x, w, y, static_cast<int>(n), eps);
    check_launch("rms_norm_kernel");
}

/// Per-head QK-norm: q or k [tokens, heads, head_dim] normalised per head with one head_dim
/// weight shared by every head, in place.
inline void rms_norm_qk(bfloat16* qk, const bfloat16* w, index_t tokens, index_t heads, index_t head_dim, float eps,
                        cudaStream_t stream)
{
    rms_norm(qk, w, qk, tokens * heads, head_dim, eps, stream);
}

}  // namespace foe::cuda
