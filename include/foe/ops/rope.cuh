#pragma once
// Rotary position embedding on the device, rotate-half convention, in place on bf16
// [tokens, heads, head_dim]. Angles match the host's foe::ops::Rope: inv_freq and the angle in
// float (as Hugging Face forms them), cos and sin of that float angle in double, the rotation in
// float, one rounding to bf16. One launch may cover the groups of an FoE layer (gridDim.y =
// groups; group g rotates x + g * groups.in: foe/cuda/groups.cuh).

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/groups.cuh"

namespace foe::cuda {

/// One block per token; its threads walk the heads x head_dim/2 pairs (128 threads: 8 heads of
/// 96 are 384 pairs, 3 per thread; the kernel is bandwidth bound and short rows favour small
/// blocks and many of them).
struct RopeLaunch {
    static constexpr int block_threads = 128;
};

inline namespace kernels_v0_1 {

template <class Launch = RopeLaunch>
FOE_KERNEL(Launch::block_threads)
void rope_kernel(bfloat16* x, const std::int32_t* __restrict__ positions, int heads, int head_dim,
                 std::size_t token_stride, double theta, long long group_stride)
{
    const int half = head_dim / 2;
    const float pos = static_cast<float>(positions[blockIdx.x]);
    bfloat16* xt = x + GroupStrides::at(group_stride, static_cast<int>(blockIdx.y)) +
                   static_cast<std::size_t>(blockIdx.x) * token_stride;
    for (int p = static_cast<int>(threadIdx.x); p < heads * half; p += Launch::block_threads) {
        const int h = p / half, j = p % half;
        const float exponent = static_cast<float>(2 * j) / static_cast<float>(head_dim);
        const auto inv_freq = static_cast<float>(1.0 / pow(theta, static_cast<double>(exponent)));
        const float angle = pos * inv_freq;
        double s = 0.0, c = 0.0;
        sincos(static_cast<double>(angle), &s, &c);
        const auto cf = static_cast<float>(c), sf = static_cast<float>(s);
        bfloat16* v = xt + h * head_dim;
        const float a = static_cast<float>(v[j]), b = static_cast<float>(v[j + half]);
        v[j] = bfloat16(a * cf - b * sf);
        v[j + half] = bfloat16(b * cf + a * sf);
    }
}

}  // namespace kernels_v0_1

/// Rotates x [tokens, heads, head_dim] in place, token rows token_stride elements apart (>= heads
/// x head_dim: the q or k part of a fused q|k|v row); positions[t] (device, int32) is token t's
/// position in its sequence. `groups`: one launch over groups.count groups, group g's rows at
/// x + g * groups.in (the other strides are ignored); every group sees the same positions.
inline void rope(bfloat16* x, const std::int32_t* positions, index_t tokens, index_t heads, index_t head_dim,
                 index_t token_stride, double theta, cudaStream_t stream, const GroupStrides& groups = {})
{
    require(groups.count >= 1 && groups.count <= 65535, "rope: ", groups.count, " groups outside [1, 65535]");
    require(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even, got ", head_dim);
    require(tokens >= 0 && tokens <= 0x7fffffff && heads > 0, "rope: bad shape [", tokens, ", ", heads, ", ", head_dim, "]");
    require(token_stride >= heads * head_dim, "rope: token_stride ", token_stride, " is less than the ", heads, " x ",
            head_dim, " elements of a token row");
    if (tokens == 0) return;
    const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(groups.count));
    rope_kernel<<<grid, RopeLaunch::block_threads, 0, stream>>>(x, positions, static_cast<int>(heads),
                                                                static_cast<int>(head_dim),
                                                                static_cast<std::size_t>(token_stride), theta, groups.in);
    check_launch("rope_kernel");
}

/// rope() of contiguous [tokens, heads, head_dim].
inline void rope(bfloat16* x, const std::int32_t* positions, index_t tokens, index_t heads, index_t head_dim,
                 double theta, cudaStream_t stream)
{
    rope(x, positions, tokens, heads, head_dim, heads * head_dim, theta, stream);
}

}  // namespace foe::cuda
