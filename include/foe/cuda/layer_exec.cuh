#pragma once
// The CUDA backend's execution of the layer body (layer/layer_body.hpp): bf16 buffers carved from
// the context's scratch, every step one stream-ordered launch over all held groups, the policies
// called with a DeviceContext. Included by layer/foe_layer.hpp when nvcc compiles it; holds no
// equation of its own.
//
// Scratch: the body's tensors (residual streams, rf, u, expert outputs) are taken from ctx.scratch
// in the body's order; each policy call gets what is left at that moment as its transient scratch.
// A later body tensor may reuse a policy's bytes: the policy's kernels are done with them by then,
// in stream order. So a layer needs its tensors plus the largest policy scratch, planned once
// (scratch_bytes()), and the same calls on the same shapes take the same addresses (graphs).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/layer/foe_layer.hpp"
#include "foe/ops/elementwise.cuh"
#include "foe/ops/rmsnorm.cuh"

namespace foe::cuda {

namespace detail {
/// out[s] = in[streams_in == 1 ? 0 : s] for s < streams_out, each `count` elements: the residual
/// streams start as the inputs (one launch; the attention's output GEMM then adds into them).
__global__ void broadcast_streams_kernel(const std::uint16_t* __restrict__ in, std::size_t count, int streams_in,
                                         int streams_out, std::uint16_t* __restrict__ out)
{
    const std::size_t total = count * static_cast<std::size_t>(streams_out);
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        const std::size_t s = i / count, j = i % count;
        out[i] = in[(streams_in == 1 ? 0 : s) * count + j];
    }
}
}  // namespace detail

inline void broadcast_streams(const bfloat16* in, index_t streams_in, std::size_t count, index_t streams_out,
                              bfloat16* out, cudaStream_t stream)
{
    const std::size_t total = count * static_cast<std::size_t>(streams_out);
    if (total == 0) return;
    const int threads = 256;
    const auto blocks = static_cast<unsigned>(std::min<std::size_t>((total + threads - 1) / threads, 65535u * 8u));
    detail::broadcast_streams_kernel<<<blocks, threads, 0, stream>>>(
        reinterpret_cast<const std::uint16_t*>(in), count, static_cast<int>(streams_in), static_cast<int>(streams_out),
        reinterpret_cast<std::uint16_t*>(out));
    check(cudaGetLastError(), "broadcast_streams launch");
}

}  // namespace foe::cuda

namespace foe::detail {

/// What a CUDA layer keeps for the body: its post-attention norm in bf16 on the device.
template <>
struct layer_exec_state<CudaBackend> {
    cuda::DeviceBuffer<bfloat16> post_norm;

    void upload_post_norm(VectorView<const float> w)
    {
        std::vector<bfloat16> bf(static_cast<std::size_t>(w.extent(0)));
        for (index_t i = 0; i < w.extent(0); ++i) bf[static_cast<std::size_t>(i)] = bfloat16(w(i));
        post_norm = cuda::DeviceBuffer<bfloat16>(bf.size());
        cuda::check(cudaMemcpy(post_norm.data(), bf.data(), bf.size() * sizeof(bfloat16), cudaMemcpyHostToDevice),
                    "cudaMemcpy (post_attention_layernorm)");
        // The policies uploaded their weights the same way, on the legacy stream. A copy from
        // pageable memory may still be in flight when cudaMemcpy returns, and a forward on a
        // non-blocking stream is not ordered after it: the layer is ready when that stream is done.
        cuda::check(cudaStreamSynchronize(cudaStreamLegacy), "cudaStreamSynchronize (layer weights uploaded)");
    }
};

/// The CUDA backend's execution of one forward (see the file comment).
template <>
struct layer_exec<CudaBackend> {
    using element = bfloat16;
    using batch_type = cuda::DeviceBatch;
    using routing_type = routing::DeviceRoutingResult;

    explicit layer_exec(const cuda::DeviceContext& ctx) : ctx_(ctx)
    {
        require(ctx.scratch != nullptr, "a CUDA layer's forward needs a context with scratch memory");
    }

    /// The bf16 bytes of the body's own tensors for T tokens.
    [[nodiscard]] static std::size_t tensor_bytes(index_t held, index_t t, index_t d, index_t slots, bool synced)
    {
        const auto td = static_cast<std::size_t>(t * d) * sizeof(bfloat16);
        return cuda::align_up(static_cast<std::size_t>(held) * td) + (synced ? cuda::align_up(td) : 0) +
               cuda::align_up(td) + cuda::align_up(static_cast<std::size_t>(slots) * td);
    }

    TensorView<bfloat16, 3> streams(LayerBuffer, index_t n, index_t t, index_t d)
    {
        return TensorView<bfloat16, 3>(ctx_.scratch->take<bfloat16>(static_cast<std::size_t>(n * t * d)), {n, t, d});
    }
    MatrixView<bfloat16> matrix(LayerBuffer b, index_t rows, index_t cols) { return streams(b, 1, rows, cols)[0]; }

    /// r[h] = x[h] (broadcast), then the attention adds o_h(Attn_h(RMSNorm(x[h]))) for every held
    /// group in its own launches.
    template <class Attention>
    void attend(Attention& attention, const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> in,
                TensorView<bfloat16, 3> r)
    {
        cuda::broadcast_streams(in.data(), in.extent(0), static_cast<std::size_t>(r.extent(1) * r.extent(2)),
                                r.extent(0), r.data(), ctx_.stream);
        attention.forward(batch, in, r, policy_context());
    }

    template <class Sync>
    void sync(Sync& s, TensorView<bfloat16, 3> r, index_t groups, MatrixView<bfloat16> rf)
    {
        s.sync(r, groups, rf, policy_context());
    }

    void rms_norm(MatrixView<const bfloat16> x, VectorView<const bfloat16> w, float eps, MatrixView<bfloat16> y)
    {
        cuda::rms_norm(x.data(), w.data(), y.data(), x.extent(0), x.extent(1), eps, ctx_.stream);
    }

    template <class Routing>
    void route(Routing& router, MatrixView<const bfloat16> u, routing::DeviceRoutingResult& out)
    {
        router.route(u, out, policy_context());
    }

    template <class ExpertParallel, class Experts>
    void run_experts(ExpertParallel& ep, Experts& experts, MatrixView<const bfloat16> u,
                     const routing::DeviceRoutingResult& r, MatrixView<bfloat16> y)
    {
        ep.run(experts, u, r, y, policy_context());
    }

    /// Every held stream in one launch: the policy that placed the rows brings them back.
    template <class ExpertParallel, class Experts>
    void combine(ExpertParallel& ep, Experts& experts, const routing::DeviceRoutingResult& r,
                 MatrixView<const bfloat16> y, MatrixView<const bfloat16> rf, TensorView<bfloat16, 3> out)
    {
        ep.combine(experts, r, y, rf, out, policy_context());
    }

    // Head-parallel attention (layer/moe_head_parallel_layer.hpp, head_parallel_forward).

    /// r = x + sum over the comm's ranks of this rank's heads' o(Attn(RMSNorm(x))), the sum in fp32:
    /// the attention writes its fp32 share (forward_partial, into the body's scratch), the ranks
    /// sum it in place, and x is added with one bf16 rounding.
    template <class Attention, class C>
    void attend_head_share(Attention& attention, C& comm, const cuda::DeviceBatch& batch, MatrixView<const bfloat16> x,
                           MatrixView<bfloat16> r)
    {
        const index_t t = r.extent(0), d = r.extent(1);
        const auto n = static_cast<std::size_t>(t * d);
        float* partial = ctx_.scratch->take<float>(n);
        attention.forward_partial(batch, x, MatrixView<float>(partial, {t, d}), policy_context());
        comm.all_reduce_sum(std::span<float>(partial, n), ctx_.stream);
        cuda::add_round(x.data(), partial, n, r.data(), ctx_.stream);
    }

    /// This rank's slice of x' [chunk, d] (rows past the slice's own are padding, not written).
    MatrixView<bfloat16> slice_buffer(index_t chunk, index_t d) { return matrix(LayerBuffer::slice, chunk, d); }

    /// out [T, d] = the first T rows of every rank's slice [chunk, d], gathered in rank order.
    template <class C>
    void gather_slices(C& comm, MatrixView<const bfloat16> slice, MatrixView<bfloat16> out)
    {
        const index_t chunk = slice.extent(0), d = slice.extent(1), t = out.extent(0);
        const auto n = static_cast<std::size_t>(chunk * d);
        bfloat16* all = ctx_.scratch->take<bfloat16>(static_cast<std::size_t>(comm.size()) * n);
        comm.all_gather(std::span<const bfloat16>(slice.data(), n),
                        std::span<bfloat16>(all, static_cast<std::size_t>(comm.size()) * n), ctx_.stream);
        if (t > 0)
            cuda::check(cudaMemcpyAsync(out.data(), all, static_cast<std::size_t>(t * d) * sizeof(bfloat16),
                                        cudaMemcpyDeviceToDevice, ctx_.stream),
                        "cudaMemcpyAsync (gathered slices)");
    }

    /// The bf16 and fp32 bytes of head_parallel_forward's tensors for T tokens over `parts` ranks
    /// (slices of chunk = ceil(T / parts) rows): r, the fp32 partial, u, y, the slice and the
    /// gathered slices, in the order they are taken.
    [[nodiscard]] static std::size_t head_parallel_tensor_bytes(index_t t, index_t d, index_t slots, index_t parts)
    {
        const index_t chunk = (t + parts - 1) / parts;
        const auto bf = [](index_t n) { return cuda::align_up(static_cast<std::size_t>(n) * sizeof(bfloat16)); };
        return bf(t * d) + cuda::align_up(static_cast<std::size_t>(t * d) * sizeof(float)) + bf(chunk * d) +
               bf(chunk * slots * d) + bf(chunk * d) + bf(parts * chunk * d);
    }

private:
    /// The context of one policy call: the model's stream, and what the body has not taken.
    const cuda::DeviceContext& policy_context()
    {
        rest_ = ctx_.scratch->remaining();
        policy_ctx_ = cuda::DeviceContext{ctx_.stream, &rest_, ctx_.gemms};
        return policy_ctx_;
    }

    const cuda::DeviceContext& ctx_;
    cuda::Scratch rest_;
    cuda::DeviceContext policy_ctx_;
};

/// What every device layer checks before its forward, then the context's scratch reset for it: the
/// batch within the plan (CapacityError), contiguous tensors, a scratch of the planned size.
inline void begin_device_forward(std::string_view name, const cuda::DeviceBatch& batch,
                                 TensorView<const bfloat16, 3> in, TensorView<bfloat16, 3> out,
                                 const LayerOptions& options, const cuda::DeviceContext& ctx, std::size_t scratch_bytes)
{
    require(in.is_contiguous() && out.is_contiguous(), name, ": the device input and output must be contiguous");
    require<CapacityError>(batch.tokens <= options.max_tokens && batch.sequences <= options.max_sequences, name, ": ",
                           batch.tokens, " tokens in ", batch.sequences,
                           " sequences exceed the plan's LayerOptions::max_tokens ", options.max_tokens,
                           " and max_sequences ", options.max_sequences);
    require(ctx.scratch != nullptr && ctx.scratch->bytes() >= scratch_bytes, name, ": the context's scratch holds ",
            ctx.scratch == nullptr ? 0 : ctx.scratch->bytes(), " bytes; a forward takes scratch_bytes() = ",
            scratch_bytes);
    ctx.scratch->reset();
}

/// The transient scratch of a policy's calls (0 for one that declares none).
template <class Experts, class ExpertParallel>
std::size_t experts_scratch_bytes(const Experts& experts, const ExpertParallel& ep)
{
    if constexpr (requires { ep.scratch_bytes(experts); })
        return ep.scratch_bytes(experts);
    else
        return experts.scratch_bytes();
}

template <class Sync>
std::size_t sync_scratch_bytes(const Sync& sync, index_t max_tokens, index_t hidden)
{
    if constexpr (requires { sync.scratch_bytes(max_tokens, hidden); })
        return sync.scratch_bytes(max_tokens, hidden);
    else
        return 0;
}

template <class Attention, class Routing, class Experts, class ExpertParallel, class Sync>
std::size_t ComposedLayer<Attention, Routing, Experts, ExpertParallel, Sync>::scratch_bytes() const
    requires std::same_as<backend_of_t<Attention>, CudaBackend>
{
    const index_t t = options_.max_tokens, d = config_.hidden_size;
    const index_t slots = streams() * config_.top_k_per_group();
    const std::size_t policies = std::max({attention_.scratch_bytes(), router_.scratch_bytes(),
                                           experts_scratch_bytes(experts_, ep_), sync_scratch_bytes(sync_, t, d)});
    return layer_exec<CudaBackend>::tensor_bytes(streams(), t, d, slots, !identity_sync<Sync>) + policies;
}

template <class Attention, class Routing, class Experts, class ExpertParallel, class Sync>
void ComposedLayer<Attention, Routing, Experts, ExpertParallel, Sync>::forward(const cuda::DeviceBatch& batch,
                                                                               TensorView<const bfloat16, 3> in,
                                                                               TensorView<bfloat16, 3> out,
                                                                               const cuda::DeviceContext& ctx)
    requires std::same_as<backend_of_t<Attention>, CudaBackend>
{
    const index_t t = batch.tokens, d = config_.hidden_size;
    check_streams(name_, in.shape(), out.shape(), t, d, streams());
    begin_device_forward(name_, batch, in, out, options_, ctx, scratch_bytes());
    layer_exec<CudaBackend> exec(ctx);
    if (t == 0) {
        // Nothing of this rank's own to run; an expert exchange is a collective all the same, so
        // the rows the peers route here are still served.
        if constexpr (requires { requires ExpertParallel::collective; }) {
            const routing::DeviceRoutingResult none{};
            ep_.run(experts_, MatrixView<const bfloat16>(), none, MatrixView<bfloat16>(), ctx);
            ep_.combine(experts_, none, MatrixView<const bfloat16>(), MatrixView<const bfloat16>(), out, ctx);
        }
        return;
    }
    const VectorView<const bfloat16> post_norm(exec_.post_norm.data(), {d});
    layer_forward(exec, batch, in, out, attention_, router_, experts_, ep_, sync_, config_.groups(), post_norm,
                  static_cast<float>(config_.rms_norm_eps), routing_result_);
}

}  // namespace foe::detail
