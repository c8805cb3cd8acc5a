#pragma once
// The expert-parallel policy kind: where the experts a token selected live, and how tokens reach
// them. Given the normalised hidden states u and the routing of this rank's tokens, run() must
// leave in y[i * slots + s] the output of the expert in slot s of token i, for every slot.
// LocalExperts holds every selected expert on this rank (no communication); policies that spread
// experts over ranks dispatch rows with an all-to-all and combine them back.
//
// A policy whose y is not one output per slot (deduplicated dispatch returns one partial sum per
// (token, member)) also provides combine<Experts>(routing, y, residual, first_slot, slot_count,
// out); parallel::combine() calls it, or the experts' own combine when the policy has none.

#include <concepts>

#include "foe/core/backend.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/experts/experts.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

template <class P, class Experts>
concept HostExpertParallelPolicy =
    experts::HostExpertsPolicy<Experts> &&
    requires(P& p, Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y) {
        { p.run(x, u, r, y) } -> std::same_as<void>;
    };

/// On the device (parallel/local_experts.cuh, parallel/exchange_experts.cuh) run() and combine()
/// take the context, and combine() writes every held stream at once: the policy decides where the
/// rows went, so it is the one that knows how to bring them back.
template <class P, class Experts>
concept DeviceExpertParallelPolicy =
    experts::DeviceExpertsPolicy<Experts> && std::same_as<backend_of_t<P>, CudaBackend> &&
    requires(P& p, Experts& x, MatrixView<const bfloat16> u, const routing::DeviceRoutingResult& r,
             MatrixView<bfloat16> y, TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) {
        { p.run(x, u, r, y, ctx) } -> std::same_as<void>;
        { p.combine(x, r, MatrixView<const bfloat16>(y), u, out, ctx) } -> std::same_as<void>;
    };

template <class P, class Experts>
concept ExpertParallelPolicy = HostExpertParallelPolicy<P, Experts> || DeviceExpertParallelPolicy<P, Experts>;

/// out[i] = residual[i] + the weighted expert outputs of token i over the slot range, as the
/// expert-parallel policy returned them in y.
template <experts::HostExpertsPolicy Experts, class P>
void combine(const P& ep, const routing::RoutingResult& r, MatrixView<const float> y, MatrixView<const float> residual,
             index_t first_slot, index_t slot_count, MatrixView<float> out)
{
    if constexpr (requires { ep.template combine<Experts>(r, y, residual, first_slot, slot_count, out); })
        ep.template combine<Experts>(r, y, residual, first_slot, slot_count, out);
    else
        Experts::combine(r, y, residual, first_slot, slot_count, out);
}

}  // namespace foe::parallel
