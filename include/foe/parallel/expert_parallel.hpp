#pragma once
// The expert-parallel policy kind: where the experts a token selected live, and how tokens reach
// them. Given the normalised hidden states u and the routing of this rank's tokens, run() must
// leave in y[i * slots + s] the output of the expert in slot s of token i, for every slot.
// LocalExperts holds every selected expert on this rank (no communication); policies that spread
// experts over ranks dispatch rows with an all-to-all and combine them back.

#include <concepts>

#include "foe/core/tensor.hpp"
#include "foe/experts/experts.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

template <class P, class Experts>
concept ExpertParallelPolicy =
    experts::ExpertsPolicy<Experts> &&
    requires(P& p, Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y) {
        { p.run(x, u, r, y) } -> std::same_as<void>;
    };

}  // namespace foe::parallel
