#pragma once
// The CUDA backend of MoeHeadParallelLayer (layer/moe_head_parallel_layer.hpp): its forward runs
// the same head_parallel_forward as the host, through layer_exec<CudaBackend>
// (cuda/layer_exec.cuh), with device policies: a CudaGqaAttention over one group, this rank's
// share of the heads (its forward_partial writes the fp32 o_proj output the ranks sum), a
// CudaRouter with global top-k, CudaSwiGluExperts, an expert-parallel policy (CudaExchangeExperts)
// and a device communicator (NcclComm, CudaSelfComm) whose collectives are enqueued on the
// layer's stream. Included by moe_head_parallel_layer.hpp when nvcc compiles it.
//
// Numerics, as foe::cuda::Layer's head-parallel path: the partial attention outputs are summed
// over the ranks in fp32 and added to x with one bf16 rounding; the slices are gathered in bf16.
//
// Scratch: head_parallel_forward's tensors (r, the fp32 partial, u, y, the slice, the gathered
// slices) are taken from ctx.scratch in that order; each policy call gets what is left at that
// moment (as for ComposedLayer), so a forward needs the tensors plus the largest policy scratch.

#include <algorithm>
#include <array>
#include <cstddef>

#include "foe/core/error.hpp"
#include "foe/cuda/context.cuh"
#include "foe/cuda/layer_exec.cuh"
#include "foe/layer/moe_head_parallel_layer.hpp"

namespace foe {

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
std::size_t MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::scratch_bytes() const
    requires std::same_as<backend_of_t<Attention>, CudaBackend>
{
    const index_t t = options_.max_tokens, d = config_.hidden_size;
    const std::size_t policies = std::max({attention_.scratch_bytes(), router_.scratch_bytes(),
                                           detail::experts_scratch_bytes(experts_, ep_)});
    return detail::layer_exec<CudaBackend>::head_parallel_tensor_bytes(t, d, config_.num_experts_per_tok,
                                                                       comm_.size()) +
           policies;
}

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
void MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::forward(const cuda::DeviceBatch& batch,
                                                                                   TensorView<const bfloat16, 3> in,
                                                                                   TensorView<bfloat16, 3> out,
                                                                                   const cuda::DeviceContext& ctx)
    requires std::same_as<backend_of_t<Attention>, CudaBackend>
{
    static_assert(detail::PartialDeviceAttention<Attention>,
                  "MoeHeadParallelLayer's device attention must write one group's fp32 partial output "
                  "(forward_partial, as attention::CudaGqaAttention does): the ranks sum it in fp32");
    static_assert(detail::Bf16GatherComm<C>,
                  "MoeHeadParallelLayer's device communicator must all-gather bf16 device spans "
                  "(all_gather(span<const bfloat16>, span<bfloat16>, cudaStream_t), as comm::NcclComm does)");
    constexpr std::string_view name = "MoeHeadParallelLayer";
    const index_t t = batch.tokens, d = config_.hidden_size;
    require(in.shape() == std::array<index_t, 3>{1, t, d} && out.shape() == in.shape(), name, " input is ",
            format_shape(in.shape()), " and output ", format_shape(out.shape()), ", expected [1, ", t, ", ", d, "]");
    detail::begin_device_forward(name, batch, in, out, options_, ctx, scratch_bytes());
    detail::layer_exec<CudaBackend> exec(ctx);
    // T = 0 (the same on every rank) runs the same steps, each empty: nothing is enqueued but the
    // expert exchange, which serves its peers (a collective), and the comm skips empty collectives.
    const VectorView<const bfloat16> post_norm(exec_.post_norm.data(), {d});
    detail::head_parallel_forward(exec, batch, in[0], out[0], attention_, router_, experts_, ep_, comm_, post_norm,
                                  static_cast<float>(config_.rms_norm_eps), routing_result_);
}

}  // namespace foe
