#pragma once
// MoeHeadParallelLayer: the second standard-MoE baseline, head-parallel (tensor-parallel)
// attention followed by expert parallelism, over P ranks (Megatron's TP + EP pattern):
//
//   a_p = Attn over rank p's share of the KV heads (and their query heads, o_proj columns)
//   a   = all_reduce_sum(a_p)              every rank has every token's attention output
//   r   = x + a
//   rank p takes its slice of the tokens, routes it (global top-k) and runs the experts through
//   ExpertParallel (all-to-all over all ranks), x' = r + sum w FFN(u) for its slice
//   all_gather of the slices: every rank has x' for every token (the next layer's attention
//   needs them all)
//
// Per layer that is one all-reduce, two all-to-alls and one all-gather, against FoE's one
// all-reduce. One stream in, one out; every rank holds every token's KV for its heads.
//
// The equations above are written once (detail::head_parallel_forward below) for both backends,
// as FoeLayer's are (layer/layer_body.hpp); the steps that differ run in layer_exec<Backend>:
//
//   host    fp32: the attention writes a_p, the comm sums it in place, x is added
//   CUDA    bf16 streams on a CUDA stream: the attention writes a_p in fp32
//           (CudaGqaAttention::forward_partial, one group over the rank's heads), the device comm
//           sums it in fp32 (all_reduce_sum), r = bf16(x + a) in one rounding; the slices are
//           all-gathered in bf16 (cuda/moe_head_parallel_layer.cuh: forward, scratch_bytes)
//
// Every rank runs the same batch, so every rank has the same T and the same collectives. With
// T > 0 a rank whose slice is empty (T < P) still routes 0 rows, calls the expert exchange and
// joins the all-gather; with T = 0 every step is empty and an expert exchange that is a
// collective is still called (ExpertParallel::collective), so no peer waits.

#include <algorithm>
#include <concepts>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/comm/comm.hpp"
#include "foe/core/config.hpp"
#include "foe/experts/experts.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/layer_body.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe {

namespace detail {

/// Rows [first, first + rows) of T are rank `rank`'s slice of P: equal chunks of ceil(T / P)
/// rows (so that the all-gather moves equal blocks); the last ranks' may be short or empty.
struct TokenSlice {
    index_t chunk = 0, first = 0, rows = 0;

    [[nodiscard]] static constexpr TokenSlice of(index_t tokens, index_t rank, index_t parts) noexcept
    {
        const index_t chunk = (tokens + parts - 1) / parts, first = std::min(tokens, rank * chunk);
        return {chunk, first, std::min(tokens, first + chunk) - first};
    }
};

/// The equations of one head-parallel MoE layer (see the file comment), for every backend. x, out:
/// [T, d], every token of the batch (the same on every rank); comm joins the ranks sharing the
/// heads. An exec provides, beside what layer_forward uses (matrix, rms_norm, route, run_experts,
/// combine): attend_head_share (r = x + the ranks' summed attention shares), slice_buffer and
/// gather_slices.
template <class Exec, class Attention, class Routing, class Experts, class ExpertParallel, class C, class NormWeight>
void head_parallel_forward(Exec& exec, const typename Exec::batch_type& batch,
                           MatrixView<const typename Exec::element> x, MatrixView<typename Exec::element> out,
                           Attention& attention, Routing& router, Experts& experts, ExpertParallel& ep, C& comm,
                           NormWeight post_norm, float eps, typename Exec::routing_type& routing)
{
    using E = typename Exec::element;
    const index_t t = x.extent(0), d = x.extent(1);

    // r = x + sum_p a_p: this rank's heads, summed over the ranks.
    const auto r = exec.matrix(LayerBuffer::residual, t, d);
    exec.attend_head_share(attention, comm, batch, x, r);

    // This rank's slice of the tokens: u = RMSNorm(r[slice]), routed over all experts.
    const auto s = TokenSlice::of(t, comm.rank(), comm.size());
    const MatrixView<const E> rs(r.data() + s.first * d, {s.rows, d});
    const auto u = exec.matrix(LayerBuffer::normed, s.rows, d);
    exec.rms_norm(rs, post_norm, eps, u);
    exec.route(router, u, routing);

    // x'[slice] = r[slice] + sum w FFN(u), the experts wherever ExpertParallel keeps them (a
    // collective: called with 0 rows too).
    const auto y = exec.matrix(LayerBuffer::expert_out, s.rows * routing.slots_per_token, d);
    exec.run_experts(ep, experts, u, routing, y);
    const auto slice = exec.slice_buffer(s.chunk, d);
    exec.combine(ep, experts, routing, y, rs, TensorView<E, 3>(slice.data(), {1, s.rows, d}));

    // Every rank's slice to every rank.
    exec.gather_slices(comm, MatrixView<const E>(slice), out);
}

/// A device attention policy that writes one group's fp32 partial output (what head-parallel
/// attention sums over the ranks): attention::CudaGqaAttention::forward_partial.
template <class A>
concept PartialDeviceAttention = requires(A& a, const cuda::DeviceBatch& batch, MatrixView<const bfloat16> x,
                                          MatrixView<float> out, const cuda::DeviceContext& ctx) {
    { a.forward_partial(batch, x, out, ctx) } -> std::same_as<void>;
};

/// A device communicator with the bf16 all-gather the slices take (comm::NcclComm, CudaSelfComm).
template <class C>
concept Bf16GatherComm = requires(C& c, std::span<const bfloat16> in, std::span<bfloat16> out,
                                  typename C::stream_type stream) {
    { c.all_gather(in, out, stream) } -> std::same_as<void>;
};

}  // namespace detail

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
class MoeHeadParallelLayer {
    static_assert(detail::moe_policies_share_backend<Attention, Routing, Experts, ExpertParallel> &&
                  detail::policy_on_backend<detail::PolicyKind::communicator, C, backend_of_t<Attention>>::value);
    // After the backend check, as in FoeLayer: a policy of the other backend is named there first.
    static_assert(parallel::ExpertParallelPolicy<ExpertParallel, Experts>,
                  "the expert-parallel policy cannot run these experts (parallel/expert_parallel.hpp)");

public:
    using backend = backend_of_t<Attention>;
    using attention_type = Attention;
    using routing_type = Routing;
    using experts_type = Experts;
    using expert_parallel_type = ExpertParallel;
    using comm_type = C;
    using routing_result_type =
        std::conditional_t<std::same_as<backend, HostBackend>, routing::RoutingResult, routing::DeviceRoutingResult>;

    /// comm joins the P ranks sharing the heads; options' expert range says which experts this
    /// rank holds (and ExpertParallel must agree). Host policies read the weights in place (they
    /// must outlive the layer); device policies upload them, planned for options.max_tokens and
    /// max_sequences (InvalidArgument unless both are positive): the attention for
    /// every token, the router and experts for a slice of ceil(max_tokens / P) tokens.
    MoeHeadParallelLayer(const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options, C comm,
                         ExpertParallel ep);

    /// Host: in, out [1, T, d] with every token of the batch (the same on every rank).
    void forward(const Batch& batch, TensorView<const float, 3> in, TensorView<float, 3> out)
        requires std::same_as<backend_of_t<Attention>, HostBackend>;

    /// CUDA: the same on bf16 device tensors [1, T, d] (contiguous, not overlapping), enqueued on
    /// ctx.stream, the comm's collectives on that stream too (cuda/moe_head_parallel_layer.cuh);
    /// ctx.scratch must hold scratch_bytes(). T = batch.tokens <= options.max_tokens (CapacityError
    /// otherwise). Nothing is allocated.
    void forward(const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> in, TensorView<bfloat16, 3> out,
                 const cuda::DeviceContext& ctx)
        requires std::same_as<backend_of_t<Attention>, CudaBackend>;

    /// CUDA: the device scratch one forward takes at options.max_tokens.
    [[nodiscard]] std::size_t scratch_bytes() const
        requires std::same_as<backend_of_t<Attention>, CudaBackend>;

    [[nodiscard]] static constexpr index_t streams() noexcept { return 1; }
    [[nodiscard]] const ModelConfig& config() const noexcept { return config_; }
    [[nodiscard]] const LayerOptions& options() const noexcept { return options_; }
    /// The attention over this rank's share of the heads.
    [[nodiscard]] const Attention& attention() const noexcept { return attention_; }
    [[nodiscard]] const Routing& router() const noexcept { return router_; }
    [[nodiscard]] const Experts& experts() const noexcept { return experts_; }
    [[nodiscard]] ExpertParallel& expert_parallel_policy() noexcept { return ep_; }
    /// The last forward's routing of this rank's slice of the tokens (on the device for a CUDA
    /// layer, valid until the next forward).
    [[nodiscard]] const routing_result_type& last_routing() const noexcept { return routing_result_; }

private:
    static constexpr bool device = std::same_as<backend, CudaBackend>;

    [[nodiscard]] static attention::AttentionSpec share_spec(const ModelConfig& c, const LayerOptions& o, index_t parts)
    {
        auto spec = attention::AttentionSpec::for_group(c, o, detail::cache_capacity(c, o));
        spec.q_heads = c.num_attention_heads / parts;
        spec.kv_heads = c.num_key_value_heads / parts;
        return spec;
    }

    /// The attention over share `part` of `parts`: a host policy from its weights, a device policy
    /// as one group of a group-batched instance.
    [[nodiscard]] static Attention share_attention(const ModelConfig& c, const LayerWeights& w, const LayerOptions& o,
                                                   index_t part, index_t parts)
    {
        if constexpr (device)  // (the host attention refuses the norm's width in its own words)
            require<InvalidArgument>(parts == 1 || c.qk_norm != QkNorm::full_width,
                                     "head-parallel attention cannot apply a full-width q/k norm to a share of the "
                                     "heads (", parts, " shares); use per-head QK-norm or one share");
        const auto spec = share_spec(c, o, parts);
        const attention::AttentionWeights share = head_share_weights(c, w, part, parts);
        if constexpr (detail::covers_groups<Attention>)
            return Attention(spec, std::span<const attention::AttentionWeights>(&share, 1));
        else
            return Attention(spec, share);
    }

    /// The most tokens of one rank's slice.
    [[nodiscard]] static index_t max_slice(const LayerOptions& o, index_t parts)
    {
        return detail::TokenSlice::of(o.max_tokens, 0, parts).chunk;
    }

    /// The options a device layer plans from (validated); a host layer's as given.
    [[nodiscard]] static const LayerOptions& checked_options(const LayerOptions& o)
    {
        if constexpr (device) (void)detail::validated_options(o, 1, true);
        return o;
    }

    [[nodiscard]] static experts::ExpertsSpec experts_spec(const ModelConfig& c, const LayerOptions& o, index_t parts)
    {
        auto spec = detail::held_experts(c, o, 0, 1);
        spec.max_rows = max_slice(o, parts) * c.num_experts_per_tok;
        return spec;
    }

    ModelConfig config_;
    LayerOptions options_;
    C comm_;
    VectorView<const float> post_norm_;
    Attention attention_;
    Routing router_;
    Experts experts_;
    ExpertParallel ep_;
    routing_result_type routing_result_;
    /// Host: the buffers of a forward; CUDA: the uploaded post-attention norm.
    detail::layer_exec_state<backend> exec_;
};

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::MoeHeadParallelLayer(
    const ModelConfig& config, const LayerWeights& weights, const LayerOptions& options, C comm, ExpertParallel ep)
    : config_(detail::single_group(config, "MoeHeadParallelLayer")),
      options_(checked_options(options)),
      comm_(std::move(comm)),
      post_norm_(weights.post_norm),
      attention_(share_attention(config, weights, options_, comm_.rank(), comm_.size())),
      router_(routing::RoutingSpec{config.num_experts, config.num_experts_per_tok, 1, 0, 1, config.norm_topk_prob,
                                   max_slice(options_, comm_.size())},
              weights.gate, weights.gate_bias),
      experts_(experts_spec(config, options_, comm_.size()),
               expert_range(weights, detail::held_experts(config, options_, 0, 1))),
      ep_(std::move(ep))
{
    if constexpr (device) exec_.upload_post_norm(detail::checked_post_norm(config, weights));
}

template <attention::AttentionPolicy Attention, routing::RoutingPolicy Routing, experts::ExpertsPolicy Experts,
          class ExpertParallel, comm::Comm C>
void MoeHeadParallelLayer<Attention, Routing, Experts, ExpertParallel, C>::forward(const Batch& batch,
                                                                                   TensorView<const float, 3> in,
                                                                                   TensorView<float, 3> out)
    requires std::same_as<backend_of_t<Attention>, HostBackend>
{
    const index_t t = batch.tokens(), d = config_.hidden_size;
    require(in.shape() == std::array<index_t, 3>{1, t, d} && out.shape() == in.shape(), "MoE layer input is ",
            format_shape(in.shape()), " and output ", format_shape(out.shape()), ", expected [1, ", t, ", ", d, "]");
    detail::head_parallel_forward(exec_, batch, in[0], out[0], attention_, router_, experts_, ep_, comm_, post_norm_,
                                  static_cast<float>(config_.rms_norm_eps), routing_result_);
}

}  // namespace foe

#if defined(__CUDACC__)
#include "foe/cuda/moe_head_parallel_layer.cuh"  // the CUDA backend's forward of the same equations
#endif
