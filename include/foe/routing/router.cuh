#pragma once
// CudaRouter<Score, Selection, Gemm>: the device routing policy, beside the host Router
// (routing/router.hpp) that is its oracle.
//
//   logits = u W_gate^T           [T, E] fp32: one dense GEMM (bf16 in, fp32 out) through Gemm
//   scores, keys, top-k, weights  one warp per token (routing/router_kernel.cuh), the same total
//                                 order as the host: larger key first, ties to the lower expert,
//                                 NaN last
//
// Score picks the kernel's score function (routing::Softmax or routing::Sigmoid; device_score
// below maps them), Selection picks per-group top-(k/H) over the held groups or global top-k over
// one group. The gate (bf16) and the sigmoid bias (fp32) are uploaded once at construction; the
// routing arrays [max_tokens, slots] are the router's own, so the result of route() stays valid
// until the next route(). The fp32 logits live in the call's scratch.
//
// Bits: the same GEMM policy and the same kernel arguments as foe::cuda::Layer's routing step,
// so both give identical experts and weights for the same u.

#include <cstdint>
#include <type_traits>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/routing/router_kernel.cuh"
#include "foe/routing/routing.hpp"
#include "foe/routing/scores.hpp"
#include "foe/routing/topk.hpp"

namespace foe::routing {

/// The device kernel's score function for a host score policy. Only the scores the kernel
/// computes have one; CudaRouter refuses any other Score at compile time.
template <class Score>
struct device_score {
    static constexpr bool available = false;
};
template <>
struct device_score<Softmax> {
    static constexpr bool available = true;
    static constexpr cuda::RouterScore value = cuda::RouterScore::softmax;
};
template <>
struct device_score<Sigmoid> {
    static constexpr bool available = true;
    static constexpr cuda::RouterScore value = cuda::RouterScore::sigmoid;
};

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, cuda::DeviceGemmPolicy Gemm = cuda::LtGemm>
class CudaRouter {
    static_assert(device_score<Score>::available,
                  "CudaRouter: this score function has no device kernel; the CUDA router computes "
                  "routing::Softmax and routing::Sigmoid (routing/router_kernel.cuh). Use one of them, "
                  "or route on the host");

public:
    using backend = CudaBackend;
    static constexpr bool per_group = Selection::per_group;
    using score_type = Score;
    using selection_type = Selection;
    using gemm_type = Gemm;

    /// gate [E, d] and bias [E] are host views, read once here (gate rounded to bf16, bias kept
    /// fp32 and uploaded only when Score::uses_bias and the view is not empty). Throws
    /// ConfigError for a spec the kernel cannot route (E > 256, k not a multiple of H, global
    /// top-k over several groups, ...) and InvalidArgument for bad shapes or max_tokens < 1.
    CudaRouter(const RoutingSpec& spec, MatrixView<const float> gate, VectorView<const float> bias);

    /// Bytes of DeviceContext scratch one route() takes at most: the fp32 logits [max_tokens, E].
    [[nodiscard]] std::size_t scratch_bytes() const noexcept
    {
        return cuda::align_up(static_cast<std::size_t>(spec_.max_tokens * spec_.num_experts) * sizeof(float));
    }

    /// u: [T, d] bf16, device, row-major contiguous, T <= spec().max_tokens. Enqueues the logits
    /// GEMM and the route kernel on ctx.stream (no host synchronisation, no allocation); out
    /// points at this router's arrays, which the next route() overwrites. T = 0 enqueues nothing.
    void route(MatrixView<const bfloat16> u, DeviceRoutingResult& out, const cuda::DeviceContext& ctx);

    [[nodiscard]] const RoutingSpec& spec() const noexcept { return spec_; }
    [[nodiscard]] index_t hidden_size() const noexcept { return hidden_; }
    /// Selected experts per token: held groups x k/H (FoE), or k (global top-k).
    [[nodiscard]] index_t slots_per_token() const noexcept
    {
        return (args_.group_end - args_.group_begin) * (args_.top_k / args_.groups);
    }
    /// Device bytes this router holds: the bf16 gate, the bias and the routing arrays.
    [[nodiscard]] std::size_t device_bytes() const noexcept { return store_.bytes(); }

private:
    static const RoutingSpec& validated(const RoutingSpec& spec, MatrixView<const float> gate,
                                        VectorView<const float> bias);

    RoutingSpec spec_;
    index_t hidden_ = 0;
    cuda::RouterArgs args_{};
    cuda::DeviceArena store_;
    const bfloat16* gate_ = nullptr;  // [E, d]
    const float* bias_ = nullptr;     // [E], sigmoid with a bias only
    std::int32_t* experts_ = nullptr; // [max_tokens, slots]
    float* weights_ = nullptr;        // [max_tokens, slots]
};

// ---------------------------------------------------------------------------------------------

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, cuda::DeviceGemmPolicy Gemm>
const RoutingSpec& CudaRouter<Score, Selection, Gemm>::validated(const RoutingSpec& spec, MatrixView<const float> gate,
                                                                 VectorView<const float> bias)
{
    // The host Router's checks first (same messages), then what the device kernels add.
    const index_t e = spec.num_experts;
    detail::check_routing_spec(spec, per_group);
    require<ConfigError>(e <= cuda::RouterLaunch::max_experts, "the CUDA router handles at most ",
                         cuda::RouterLaunch::max_experts, " experts; the spec has ", e);
    require<InvalidArgument>(spec.max_tokens > 0 && spec.max_tokens <= 0x7fffffff, "CudaRouter: max_tokens (",
                             spec.max_tokens, ") must be in [1, 2^31 - 1]: the device router plans its arrays for it");
    require<InvalidArgument>(gate.extent(0) == e && gate.extent(1) > 0, "router gate weight is ",
                             format_shape(gate.shape()), ", expected [", e, ", hidden]");
    require<InvalidArgument>(gate.extent(1) % 8 == 0, "the CUDA router's GEMM needs hidden_size (", gate.extent(1),
                             ") to be a multiple of 8 (16-byte bf16 rows)");
    if (Score::uses_bias && !bias.empty())
        require<InvalidArgument>(bias.extent(0) == e, "router bias has ", bias.extent(0), " elements, expected ", e);
    return spec;
}

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, cuda::DeviceGemmPolicy Gemm>
CudaRouter<Score, Selection, Gemm>::CudaRouter(const RoutingSpec& spec, MatrixView<const float> gate,
                                               VectorView<const float> bias)
    : spec_(validated(spec, gate, bias)), hidden_(gate.extent(1))
{
    const index_t e = spec.num_experts, d = hidden_;
    // Global top-k is the kernel over one group [0, 1) of all E experts (validated: H = 1).
    args_ = cuda::RouterArgs{device_score<Score>::value,
                             e,
                             per_group ? spec.groups : 1,
                             spec.top_k,
                             per_group ? spec.group_begin : 0,
                             per_group ? spec.group_end : 1,
                             spec.renormalize};
    std::vector<bfloat16> gate_host;
    gate_host.reserve(static_cast<std::size_t>(e * d));
    for (index_t i = 0; i < e; ++i)
        for (index_t j = 0; j < d; ++j) gate_host.push_back(bfloat16(gate(i, j)));
    std::vector<float> bias_host;
    if (Score::uses_bias && !bias.empty())
        for (index_t i = 0; i < e; ++i) bias_host.push_back(bias(i));
    const auto slots_total = static_cast<std::size_t>(spec.max_tokens * slots_per_token());

    cuda::ArenaPlan plan;
    plan.add<bfloat16>(gate_host.size());
    plan.add<float>(bias_host.size());
    plan.add<std::int32_t>(slots_total);
    plan.add<float>(slots_total);
    store_ = cuda::DeviceArena(plan.bytes());
    auto* g = store_.take<bfloat16>(gate_host.size());
    cuda::check(cudaMemcpy(g, gate_host.data(), gate_host.size() * sizeof(bfloat16), cudaMemcpyHostToDevice),
                "cudaMemcpy (router gate)");
    gate_ = g;
    if (!bias_host.empty()) {
        auto* b = store_.take<float>(bias_host.size());
        cuda::check(cudaMemcpy(b, bias_host.data(), bias_host.size() * sizeof(float), cudaMemcpyHostToDevice),
                    "cudaMemcpy (router bias)");
        bias_ = b;
    }
    experts_ = store_.take<std::int32_t>(slots_total);
    weights_ = store_.take<float>(slots_total);
}

template <ScoreFunctionPolicy Score, SelectionPolicy Selection, cuda::DeviceGemmPolicy Gemm>
void CudaRouter<Score, Selection, Gemm>::route(MatrixView<const bfloat16> u, DeviceRoutingResult& out,
                                               const cuda::DeviceContext& ctx)
{
    const index_t t = u.extent(0), e = spec_.num_experts;
    require(u.extent(1) == hidden_, "router input has ", u.extent(1), " features, the gate expects ", hidden_);
    require(t <= spec_.max_tokens, "router input has ", t, " tokens; the router was planned for at most ",
            spec_.max_tokens);
    require(t == 0 || (u.stride(1) == 1 && u.stride(0) == hidden_), "router input must be a contiguous row-major [",
            t, ", ", hidden_, "] device matrix");
    out.tokens = t;
    out.slots_per_group = args_.top_k / args_.groups;
    out.slots_per_token = slots_per_token();
    out.group_begin = args_.group_begin;
    out.experts = experts_;
    out.weights = weights_;
    if (t == 0) return;
    float* logits = ctx.take<float>(static_cast<std::size_t>(t * e));
    ctx.template gemm<Gemm>().nt(u.data(), gate_, logits, cuda::OutType::fp32, t, e, hidden_, ctx.stream, 0.0f);
    cuda::route(args_, logits, bias_, t, experts_, weights_, ctx.stream);
}

static_assert(DeviceRoutingPolicy<CudaRouter<Softmax, PerGroupTopK>>);
static_assert(DeviceRoutingPolicy<CudaRouter<Sigmoid, GlobalTopK>>);

}  // namespace foe::routing
