#pragma once
// The experts policy kind: the FFNs of the experts a rank holds, applied to grouped tokens, and
// the weighted combine of their outputs into the residual stream(s).

#include <array>
#include <concepts>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
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
    index_t max_rows = 0;  ///< device policies: the most (token, slot) rows one compute() takes
};

namespace detail {
/// The checks every experts policy makes of its spec and weights: a valid range, one set of
/// weights per held expert, each [f, d] / [f, d] / [d, f] (ConfigError / InvalidArgument).
inline void check_expert_weights(const ExpertsSpec& spec, const std::vector<ExpertWeights>& w)
{
    const index_t d = spec.hidden_size, f = spec.intermediate_size;
    require<ConfigError>(spec.expert_begin >= 0 && spec.expert_begin <= spec.expert_end, "expert range [",
                         spec.expert_begin, ", ", spec.expert_end, ") is invalid");
    require<InvalidArgument>(static_cast<index_t>(w.size()) == spec.expert_end - spec.expert_begin, "experts [",
                             spec.expert_begin, ", ", spec.expert_end, ") got weights for ", w.size(), " experts");
    for (std::size_t e = 0; e < w.size(); ++e) {
        const auto& x = w[e];
        const bool ok = x.gate_proj.shape() == std::array<index_t, 2>{f, d} &&
                        x.up_proj.shape() == std::array<index_t, 2>{f, d} &&
                        x.down_proj.shape() == std::array<index_t, 2>{d, f};
        require<InvalidArgument>(ok, "expert ", spec.expert_begin + static_cast<index_t>(e), " has gate/up/down shapes ",
                                 format_shape(x.gate_proj.shape()), "/", format_shape(x.up_proj.shape()), "/",
                                 format_shape(x.down_proj.shape()), ", expected [", f, ", ", d, "]/[", f, ", ", d,
                                 "]/[", d, ", ", f, "]");
    }
}
}  // namespace detail

/// A host experts policy is built from a spec and the weights of its experts (in id order), and
///  - compute(u, routing, y): for every (token i, slot s) whose expert it holds,
///    y[i * slots + s, :] = FFN_expert(u[i, :]); other rows of y are left alone;
///  - combine(routing, y, residual, first_slot, slot_count, out): for every token,
///    out[i] = residual[i] + sum over the slot range of weight * y[i * slots + s], in slot order
///    (a fixed order: deterministic, no atomics).
template <class X>
concept HostExpertsPolicy =
    std::same_as<backend_of_t<X>, HostBackend> &&
    std::constructible_from<X, const ExpertsSpec&, std::vector<ExpertWeights>> &&
    requires(X& x, MatrixView<const float> u, MatrixView<float> y, const routing::RoutingResult& r, index_t n) {
        { x.compute(u, r, y) } -> std::same_as<void>;
        { X::combine(r, MatrixView<const float>(y), u, n, n, y) } -> std::same_as<void>;
        { x.spec() } -> std::convertible_to<const ExpertsSpec&>;
    };

/// A device experts policy (experts/swiglu_experts.cuh) is built the same way (spec.max_rows plans
/// its memory); compute leaves the held experts' outputs in y [T * slots, d] in an order of its
/// own (grouped by expert), and combine, which knows that order, writes every held stream in one
/// launch: out[h][i] = residual[i] + sum over group h's slots of weight * FFN(u[i]), in slot order.
template <class X>
concept DeviceExpertsPolicy =
    std::same_as<backend_of_t<X>, CudaBackend> &&
    std::constructible_from<X, const ExpertsSpec&, std::vector<ExpertWeights>> &&
    requires(X& x, const X& cx, MatrixView<const bfloat16> u, MatrixView<bfloat16> y,
             const routing::DeviceRoutingResult& r, TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) {
        { x.compute(u, r, y, ctx) } -> std::same_as<void>;
        { cx.combine(r, MatrixView<const bfloat16>(y), u, out, ctx) } -> std::same_as<void>;
        { cx.spec() } -> std::convertible_to<const ExpertsSpec&>;
        { cx.scratch_bytes() } -> std::convertible_to<std::size_t>;
    };

/// The experts policy kind, on either backend.
template <class X>
concept ExpertsPolicy = HostExpertsPolicy<X> || DeviceExpertsPolicy<X>;

}  // namespace foe::experts
