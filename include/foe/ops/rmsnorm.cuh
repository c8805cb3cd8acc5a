#pragma once
// RMSNorm on the device: y[i, :] = w * (x[i, :] * rsqrt(mean(x[i, :]^2) + eps)), bf16 in and out,
// fp32 accumulation; the host oracle is foe::ops::rms_norm. Per-head QK-norm is the same kernel
// over [tokens * heads, head_dim] rows (rms_norm_qk below). Rows may sit inside wider token rows
// (the q or k part of a fused q|k|v projection): row i is element (i / parts) * token_stride +
// (i % parts) * n. One launch may cover the groups of an FoE layer (gridDim.y = groups; group g
// reads x + g * groups.in, w + g * groups.weight and writes y + g * groups.out: foe/cuda/groups.cuh).

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/groups.cuh"

namespace foe::cuda {

/// Launch configuration: one block per row. 256 threads = 8 warps: a d = 768..2048 row is 3..8
/// elements per thread, enough loads in flight per SM with several blocks resident, and the
/// block reduction is one shared-memory step over 8 warp partials.
struct RmsNormLaunch {
    static constexpr int block_threads = 256;
    static constexpr int warps = block_threads / 32;
};

namespace detail {
/// Element offset of row `block` (token block / parts, part block % parts) inside one group.
[[nodiscard]] FOE_HOST_DEVICE constexpr std::size_t rms_norm_row(unsigned block, int parts, int n,
                                                                 std::size_t token_stride) noexcept
{
    return static_cast<std::size_t>(block / static_cast<unsigned>(parts)) * token_stride +
           static_cast<std::size_t>(block % static_cast<unsigned>(parts)) * static_cast<std::size_t>(n);
}
}  // namespace detail

inline namespace kernels_v0_1 {

template <class Launch = RmsNormLaunch>
FOE_KERNEL(Launch::block_threads)
void rms_norm_kernel(const bfloat16* x, const bfloat16* __restrict__ w, bfloat16* y, int n, int parts,
                     std::size_t token_stride, float eps, GroupStrides groups)  // x may be y
{
    __shared__ float partial[Launch::warps];
    const int g = static_cast<int>(blockIdx.y);
    x += GroupStrides::at(groups.in, g);
    y += GroupStrides::at(groups.out, g);
    w += GroupStrides::at(groups.weight, g);
    const auto row = detail::rms_norm_row(blockIdx.x, parts, n, token_stride);
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
/// `groups`: one launch over groups.count groups (x, w, y shifted by groups.in, .weight, .out per
/// group; in place needs in == out).
inline void rms_norm_strided(const bfloat16* x, const bfloat16* w, bfloat16* y, index_t tokens, index_t parts, index_t n,
                             index_t token_stride, float eps, cudaStream_t stream, const GroupStrides& groups = {})
{
    require(groups.count >= 1 && groups.count <= 65535, "rms_norm: ", groups.count, " groups outside [1, 65535]");
    require(tokens >= 0 && parts > 0 && n > 0 && n <= (index_t{1} << 30), "rms_norm: bad shape [", tokens, ", ", parts,
            ", ", n, "]");
    require(token_stride >= parts * n, "rms_norm: token_stride ", token_stride, " is less than the ", parts, " x ", n,
            " elements of a token row");
    require(tokens * parts <= 0x7fffffff, "rms_norm: ", tokens * parts, " rows exceed the grid");
    if (tokens == 0) return;
    const dim3 grid(static_cast<unsigned>(tokens * parts), static_cast<unsigned>(groups.count));
    rms_norm_kernel<<<grid, RmsNormLaunch::block_threads, 0, stream>>>(
        x, w, y, static_cast<int>(n), static_cast<int>(parts), static_cast<std::size_t>(token_stride), eps, groups);
    check_launch("rms_norm_kernel");
}

/// RMSNorm of `rows` contiguous rows of n elements; y may equal x (in place). `groups` as above.
inline void rms_norm(const bfloat16* x, const bfloat16* w, bfloat16* y, index_t rows, index_t n, float eps,
                     cudaStream_t stream, const GroupStrides& groups = {})
{
    rms_norm_strided(x, w, y, rows, 1, n, n, eps, stream, groups);
}

/// Per-head QK-norm, in place: q or k [tokens, heads, head_dim] with token rows token_stride
/// elements apart, normalised per head with one head_dim weight shared by every head (of a group:
/// `groups` shifts qk by groups.in and w by groups.weight per group; groups.out is ignored).
inline void rms_norm_qk(bfloat16* qk, const bfloat16* w, index_t tokens, index_t heads, index_t head_dim,
                        index_t token_stride, float eps, cudaStream_t stream, GroupStrides groups = {})
{
    groups.out = groups.in;  // in place
    rms_norm_strided(qk, w, qk, tokens, heads, head_dim, token_stride, eps, stream, groups);
}

/// Per-head QK-norm of contiguous [tokens, heads, head_dim].
inline void rms_norm_qk(bfloat16* qk, const bfloat16* w, index_t tokens, index_t heads, index_t head_dim, float eps,
                        cudaStream_t stream)
{
    rms_norm_qk(qk, w, tokens, heads, head_dim, heads * head_dim, eps, stream);
}

}  // namespace foe::cuda
