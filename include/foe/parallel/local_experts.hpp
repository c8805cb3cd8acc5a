#pragma once
// LocalExperts: every expert a token selected is on this rank; no communication. This is FoE's
// placement whenever G <= H (each rank holds whole groups with all their experts) and the
// single-process standard MoE.

#include "foe/core/backend.hpp"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/parallel/expert_parallel.hpp"

namespace foe::parallel {

struct LocalExperts {
    using backend = HostBackend;

    template <experts::ExpertsPolicy Experts>
    void run(Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y)
    {
        x.compute(u, r, y);
    }
};
static_assert(ExpertParallelPolicy<LocalExperts, experts::SwiGluExperts<>>);

}  // namespace foe::parallel
