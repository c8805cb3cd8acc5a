#pragma once
// The experts policy kind: the FFNs of the experts a rank holds, applied to grouped tokens, and
// the weighted combine of their outputs into the residual stream(s).

#include <concepts>
#include <vector>

#include "foe/core/tensor.hpp"
#include "foe/core/weight.hpp"
#include "foe/routing/routing.hpp"

namespace foe::experts {

/// Views of one SwiGLU expert's weights, in Hugging Face's [out, in] layout and stored dtype.
struct ExpertWeights {
    WeightMatrix gate_proj;  ///< [intermediate, hidden]
    WeightMatrix up_proj;    ///< [intermediate, hidden]
    WeightMatrix down_proj;  ///< [hidden, intermediate]
};

/// The experts one instance holds: global ids [expert_begin, expert_end).
struct ExpertsSpec {
    index_t hidden_size = 0;
    index_t intermediate_size = 0;
    index_t expert_begin = 0;
    index_t expert_end = 0;
};

/// An experts policy is built from a spec and the weights of its experts (in id order), and
///  - compute(u, routing, y): for every (token i, slot s) whose expert it holds,
///    y[i * slots + s, :] = FFN_expert(u[i, :]); other rows of y are left alone;
///  - combine(routing, y, residual, first_slot, slot_count, out): for every token,
///    out[i] = residual[i] + sum over the slot range of weight * y[i * slots + s], in slot order
///    (a fixed order: deterministic, no atomics).
template <class X>
concept ExpertsPolicy =
    std::constructible_from<X, const ExpertsSpec&, std::vector<ExpertWeights>> &&
    requires(X& x, MatrixView<const float> u, MatrixView<float> y, const routing::RoutingResult& r, index_t n) {
        { x.compute(u, r, y) } -> std::same_as<void>;
        { X::combine(r, MatrixView<const float>(y), u, n, n, y) } -> std::same_as<void>;
        { x.spec() } -> std::convertible_to<const ExpertsSpec&>;
    };

}  // namespace foe::experts
