#pragma once
// The equations of one FoE layer, written once for every backend. FoeLayer and MoeLayer (its
// one-group case, rf = r) run this body; what differs between the backends is how a step is
// executed, not which steps there are, and that lives in layer_exec<Backend>:
//
//   layer_exec<HostBackend>  below: fp32 host buffers grown as batches come; one attention
//                            instance per held group, run in the layer's compute order
//   layer_exec<CudaBackend>  cuda/layer_exec.cuh: bf16 buffers carved from the context's planned
//                            scratch, every step one stream-ordered launch over all held groups
//
// An exec provides: element, batch_type, routing_type; streams()/matrix() scratch views; attend,
// sync, rms_norm, route, run_experts, combine; and for the head-parallel MoE body
// (layer/moe_head_parallel_layer.hpp, head_parallel_forward) attend_head_share, slice_buffer and
// gather_slices. It calls the policies and holds no equation.

#include <algorithm>
#include <span>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/tensor.hpp"
#include "foe/layer/batch.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe::detail {

template <class Backend>
struct layer_exec;

/// The scratch tensors of one forward (slice, gathered: head-parallel attention's token slices,
/// layer/moe_head_parallel_layer.hpp).
enum class LayerBuffer { residual, synced, normed, expert_out, slice, gathered };
inline constexpr int layer_buffer_count = 6;

/// How the held groups' attention is held: one instance per group on the host, one instance for
/// all of them when the policy covers groups (the device's group-batched attention).
template <class Attention>
inline constexpr bool covers_groups = requires { requires Attention::covers_groups; };

template <class Attention>
using attention_set_t = std::conditional_t<covers_groups<Attention>, Attention, std::vector<Attention>>;

/// A residual sync that leaves rf = r[0] (one stream, no peers): the layer skips it and aliases.
template <class Sync>
inline constexpr bool identity_sync = requires { requires Sync::identity; };

/// The layer body. in: [1 or held, T, d] (1: the embedding, shared by every group); out: [held, T,
/// d]. An identity sync (one stream, no peers: MoE) leaves rf = r[0] without a copy.
template <class Exec, class AttentionSet, class Routing, class Experts, class ExpertParallel, class Sync,
          class NormWeight>
void layer_forward(Exec& exec, const typename Exec::batch_type& batch,
                   TensorView<const typename Exec::element, 3> in, TensorView<typename Exec::element, 3> out,
                   AttentionSet& attention, Routing& router, Experts& experts, ExpertParallel& ep, Sync& sync,
                   index_t groups, NormWeight post_norm, float eps, typename Exec::routing_type& routing)
{
    const index_t held = out.extent(0), t = out.extent(1), d = out.extent(2);

    // r[h] = x[h] + Attn_h(RMSNorm(x[h])): each group's heads and o_proj slice.
    const auto r = exec.streams(LayerBuffer::residual, held, t, d);
    exec.attend(attention, batch, in, r);

    // rf = (1/H) sum_h r[h]: the only collective between groups (one stream: rf = r).
    auto rf = r[0];
    if constexpr (!identity_sync<Sync>) {
        rf = exec.matrix(LayerBuffer::synced, t, d);
        exec.sync(sync, r, groups, rf);
    }

    // u = RMSNorm(rf); I_h, w_h = top-(k/H) of Router(u) inside every held group h.
    const auto u = exec.matrix(LayerBuffer::normed, t, d);
    exec.rms_norm(rf, post_norm, eps, u);
    exec.route(router, u, routing);

    // x'[h] = rf + sum_{e in I_h} w_h[e] FFN_e(u), the experts run wherever ExpertParallel keeps them.
    const auto y = exec.matrix(LayerBuffer::expert_out, t * routing.slots_per_token, d);
    exec.run_experts(ep, experts, u, routing, y);
    exec.combine(ep, experts, routing, y, rf, out);
}

/// The host backend's execution: fp32, buffers grown to the largest batch seen, one attention
/// instance per held group run in `order`, OpenMP inside the policies.
template <>
struct layer_exec<HostBackend> {
    using element = float;
    using batch_type = Batch;
    using routing_type = routing::RoutingResult;

    std::vector<index_t> order;  ///< the compute order of the held groups (a permutation)
    std::vector<float> buffers[layer_buffer_count];

    TensorView<float, 3> streams(LayerBuffer b, index_t n, index_t t, index_t d)
    {
        auto& v = buffers[static_cast<int>(b)];
        v.resize(static_cast<std::size_t>(n * t * d));
        return TensorView<float, 3>(v.data(), {n, t, d});
    }
    MatrixView<float> matrix(LayerBuffer b, index_t rows, index_t cols) { return streams(b, 1, rows, cols)[0]; }

    template <class Attention>
    void attend(std::vector<Attention>& attention, const Batch& batch, TensorView<const float, 3> in,
                TensorView<float, 3> r)
    {
        const index_t t = r.extent(1), d = r.extent(2);
        for (index_t g : order) {
            const auto x = in[in.extent(0) == 1 ? 0 : g];
            const auto rg = r[g];
            attention[static_cast<std::size_t>(g)].forward(batch, x, rg);
            FOE_OMP_PARALLEL_FOR
            for (index_t i = 0; i < t; ++i)
                for (index_t j = 0; j < d; ++j) rg(i, j) += x(i, j);
        }
    }

    template <class Sync>
    void sync(Sync& s, TensorView<float, 3> r, index_t groups, MatrixView<float> rf)
    {
        std::vector<MatrixView<const float>> streams;
        streams.reserve(static_cast<std::size_t>(r.extent(0)));
        for (index_t g = 0; g < r.extent(0); ++g) streams.push_back(r[g]);
        s.sync(std::span<const MatrixView<const float>>(streams), groups, rf);
    }

    static void rms_norm(MatrixView<const float> x, VectorView<const float> w, float eps, MatrixView<float> y)
    {
        ops::rms_norm(x, w, eps, y);
    }

    template <class Routing>
    static void route(Routing& router, MatrixView<const float> u, routing::RoutingResult& out)
    {
        router.route(u, out);
    }

    template <class ExpertParallel, class Experts>
    static void run_experts(ExpertParallel& ep, Experts& experts, MatrixView<const float> u,
                            const routing::RoutingResult& r, MatrixView<float> y)
    {
        ep.run(experts, u, r, y);
    }

    /// Each held group's slots into its own stream.
    template <class ExpertParallel, class Experts>
    static void combine(ExpertParallel& ep, Experts&, const routing::RoutingResult& r, MatrixView<const float> y,
                        MatrixView<const float> rf, TensorView<float, 3> out)
    {
        const index_t per_group = r.slots_per_group;
        for (index_t g = 0; g < out.extent(0); ++g)
            parallel::combine<Experts>(ep, r, y, rf, g * per_group, per_group, out[g]);
    }

    // Head-parallel attention (layer/moe_head_parallel_layer.hpp, head_parallel_forward).

    /// r = x + sum over the comm's ranks of this rank's heads' Attn(RMSNorm(x)): the attention
    /// writes its share into r, the ranks sum r in place, then x is added.
    template <class Attention, class C>
    void attend_head_share(Attention& attention, C& comm, const Batch& batch, MatrixView<const float> x,
                           MatrixView<float> r)
    {
        const index_t t = r.extent(0), d = r.extent(1);
        attention.forward(batch, x, r);
        comm.all_reduce_sum(std::span<float>(r.data(), static_cast<std::size_t>(t * d)), typename C::stream_type{});
        FOE_OMP_PARALLEL_FOR
        for (index_t i = 0; i < t; ++i)
            for (index_t j = 0; j < d; ++j) r(i, j) += x(i, j);
    }

    /// This rank's slice of x' [chunk, d], zeroed (rows past the slice's own are padding).
    MatrixView<float> slice_buffer(index_t chunk, index_t d)
    {
        auto& v = buffers[static_cast<int>(LayerBuffer::slice)];
        v.assign(static_cast<std::size_t>(chunk * d), 0.0f);
        return MatrixView<float>(v.data(), {chunk, d});
    }

    /// out [T, d] = the first T rows of every rank's slice [chunk, d], gathered in rank order.
    template <class C>
    void gather_slices(C& comm, MatrixView<const float> slice, MatrixView<float> out)
    {
        const index_t chunk = slice.extent(0), d = slice.extent(1), t = out.extent(0);
        auto& all = buffers[static_cast<int>(LayerBuffer::gathered)];
        all.resize(static_cast<std::size_t>(comm.size() * chunk * d));
        comm.all_gather(std::span<const float>(slice.data(), static_cast<std::size_t>(chunk * d)), all,
                        typename C::stream_type{});
        for (index_t i = 0; i < t; ++i) std::copy_n(all.data() + i * d, d, &out(i, 0));
    }
};

}  // namespace foe::detail
