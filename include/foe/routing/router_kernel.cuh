#pragma once
// Router scores and top-k selection on the device, one warp per token. The host oracle is
// foe::routing::Router (Softmax or Sigmoid scores, PerGroupTopK or GlobalTopK selection); this
// kernel starts from the fp32 logits (u W_gate^T, a dense GEMM with fp32 output).
//
// Selection order is total, as on the host: a larger key wins, equal keys go to the lower expert
// index, a NaN key ranks as -inf (below every number), and an -inf candidate still beats
// "nothing chosen". Sums use a fixed warp-butterfly order, so results are bit-identical run to run.

#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

enum class RouterScore { softmax, sigmoid };

/// What the router computes; group_begin/group_end are the groups this rank holds.
struct RouterArgs {
    RouterScore score = RouterScore::softmax;
    index_t num_experts = 0;
    index_t groups = 1;       ///< H; 1 with global top-k
    index_t top_k = 0;        ///< over all groups: k/H per group
    index_t group_begin = 0;
    index_t group_end = 1;
    bool renormalize = false;
};

/// One warp per token; every lane holds up to experts_per_lane experts in registers, so E <= 256.
/// 4 warps per block: small blocks keep many tokens in flight with little register pressure.
struct RouterLaunch {
    static constexpr int warps_per_block = 4;
    static constexpr int block_threads = 32 * warps_per_block;
    static constexpr int experts_per_lane = 8;
    static constexpr int max_experts = 32 * experts_per_lane;
};

namespace detail {
/// Candidate (key, expert) with expert = INT32_MAX for "none"; better() is the total order above.
struct Candidate {
    float key;
    std::int32_t expert;
};
[[nodiscard]] __device__ inline bool better(Candidate a, Candidate b)
{
    if (b.expert == 0x7fffffff) return a.expert != 0x7fffffff;
    if (a.expert == 0x7fffffff) return false;
    return a.key > b.key || (a.key == b.key && a.expert < b.expert);
}
}  // namespace detail

inline namespace kernels_v0_1 {

template <class Launch = RouterLaunch>
FOE_KERNEL(Launch::block_threads)
void router_topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias, std::int32_t* experts_out,
                        float* weights_out, int tokens, int num_experts, int experts_per_group, int k_per_group,
                        int group_begin, int held_groups, RouterScore score, bool renormalize)
{
    constexpr int per_lane = Launch::experts_per_lane;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int token = static_cast<int>(blockIdx.x) * Launch::warps_per_block + static_cast<int>(threadIdx.x) / 32;
    if (token >= tokens) return;  // whole warps leave together: the shuffles below stay full-warp
    const float* row = logits + static_cast<std::size_t>(token) * static_cast<std::size_t>(num_experts);
    const float inf = __int_as_float(0x7f800000);

    // Expert e = lane + 32 i lives in lane (e % 32), slot i.
    float s[per_lane], key[per_lane];
#pragma unroll
    for (int i = 0; i < per_lane; ++i) {
        const int e = lane + 32 * i;
        s[i] = e < num_experts ? row[e] : 0.0f;
    }
    if (score == RouterScore::softmax) {
        float m = -inf;
#pragma unroll
        for (int i = 0; i < per_lane; ++i)
            if (lane + 32 * i < num_experts && !isnan(s[i])) m = fmaxf(m, s[i]);
        m = detail::warp_max(m);
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < per_lane; ++i) {
            const bool nan = isnan(s[i]);
            key[i] = nan ? -inf : 0.0f;  // a NaN logit: score 0, ranked last
            s[i] = (lane + 32 * i < num_experts && !nan) ? expf(s[i] - m) : 0.0f;
            sum += s[i];
        }
        sum = detail::warp_sum(sum);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
        for (int i = 0; i < per_lane; ++i) {
            const bool nan = key[i] == -inf;
            s[i] *= inv;
            key[i] = (nan || isnan(s[i])) ? -inf : s[i];  // +inf logits make NaN scores, as on the host
        }
    } else {
#pragma unroll
        for (int i = 0; i < per_lane; ++i) {
            const int e = lane + 32 * i;
            s[i] = 1.0f / (1.0f + expf(-s[i]));
            const float k = (bias != nullptr && e < num_experts) ? s[i] + bias[e] : s[i];
            key[i] = isnan(k) ? -inf : k;
        }
    }

    const int slots_per_token = held_groups * k_per_group;
    std::int32_t* out_e = experts_out + static_cast<std::size_t>(token) * static_cast<std::size_t>(slots_per_token);
    float* out_w = weights_out + static_cast<std::size_t>(token) * static_cast<std::size_t>(slots_per_token);
    unsigned taken = 0;  // bit i: this lane's slot i was already chosen
    for (int g = 0; g < held_groups; ++g) {
        const int begin = (group_begin + g) * experts_per_group, end = begin + experts_per_group;
        float sum = 0.0f;
        for (int slot = 0; slot < k_per_group; ++slot) {
            detail::Candidate best{0.0f, 0x7fffffff};
#pragma unroll
            for (int i = 0; i < per_lane; ++i) {
                const int e = lane + 32 * i;
                const detail::Candidate c{key[i], (e >= begin && e < end && !(taken >> i & 1u)) ? e : 0x7fffffff};
                if (detail::better(c, best)) best = c;
            }
            for (int off = 16; off > 0; off /= 2) {
                const detail::Candidate other{__shfl_xor_sync(0xffffffffu, best.key, off),
                                              __shfl_xor_sync(0xffffffffu, best.expert, off)};
                if (detail::better(other, best)) best = other;
            }
            // Every lane now holds the same winner; its owner marks it taken and publishes it.
            const int owner = best.expert % 32, i_owner = best.expert / 32;
            float w = 0.0f;
#pragma unroll
            for (int i = 0; i < per_lane; ++i)
                if (i == i_owner) w = s[i];
            w = __shfl_sync(0xffffffffu, w, owner);
            if (lane == owner) taken |= 1u << i_owner;
            if (lane == 0) {
                out_e[g * k_per_group + slot] = best.expert;
                out_w[g * k_per_group + slot] = w;
            }
            sum += w;  // in slot order, as the host adds them
        }
        if (renormalize && lane == 0)
            for (int slot = 0; slot < k_per_group; ++slot) out_w[g * k_per_group + slot] /= sum;
    }
}

}  // namespace kernels_v0_1

/// Routes `tokens` rows of fp32 logits [tokens, E] (device). Writes experts [tokens, slots] int32
/// (global expert ids) and weights [tokens, slots] fp32 with slots = held groups * k/H, group by
/// group, best first. bias (device, E floats) is used only by the sigmoid score; may be null.
inline void route(const RouterArgs& a, const float* logits, const float* bias, index_t tokens,
                  std::int32_t* experts, float* weights, cudaStream_t stream)
{
    require<ConfigError>(a.num_experts > 0 && a.groups > 0 && a.num_experts % a.groups == 0, "num_experts (",
                         a.num_experts, ") must be a positive multiple of the ", a.groups, " expert groups");
    require<ConfigError>(a.num_experts <= RouterLaunch::max_experts, "the CUDA router handles at most ",
                         RouterLaunch::max_experts, " experts, got ", a.num_experts);
    require<ConfigError>(a.top_k > 0 && a.top_k % a.groups == 0, "num_experts_per_tok (", a.top_k,
                         ") must be a positive multiple of num_expert_groups (", a.groups, ")");
    require<ConfigError>(a.top_k / a.groups <= a.num_experts / a.groups, "top-k per group (", a.top_k / a.groups,
                         ") exceeds the ", a.num_experts / a.groups, " experts of a group");
    require<ConfigError>(0 <= a.group_begin && a.group_begin < a.group_end && a.group_end <= a.groups,
                         "routed groups [", a.group_begin, ", ", a.group_end, ") are not inside [0, ", a.groups, ")");
    require(tokens >= 0 && tokens <= 0x7fffffff, "route: bad token count ", tokens);
    if (tokens == 0) return;
    const auto blocks = static_cast<unsigned>(detail::ceil_div(tokens, RouterLaunch::warps_per_block));
    router_topk_kernel<<<blocks, RouterLaunch::block_threads, 0, stream>>>(
        logits, a.score == RouterScore::sigmoid ? bias : nullptr, experts, weights, static_cast<int>(tokens),
        static_cast<int>(a.num_experts), static_cast<int>(a.num_experts / a.groups),
        static_cast<int>(a.top_k / a.groups), static_cast<int>(a.group_begin),
        static_cast<int>(a.group_end - a.group_begin), a.score, a.renormalize);
    check_launch("router_topk_kernel");
}

}  // namespace foe::cuda
