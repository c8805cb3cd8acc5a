#pragma once
// CudaExchangeExperts: the device expert-parallel policy over ranks. The experts live on several
// ranks and a cuda::ExpertExchange (parallel/expert_exchange.cuh; over NCCL parallel::
// NcclExpertExchange, parallel/all_to_all_ep.cuh) sends the routed rows to the ranks that hold
// their experts and brings the outputs back: run() is the exchange's run() with this rank's held
// weights (experts.grouped()), combine() the exchange's combine() into the layer's one stream,
// as foe::cuda::Layer does with its `experts` argument (the same calls, so the same bits).

#include <concepts>
#include <cstddef>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/context.cuh"
#include "foe/experts/experts.hpp"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/parallel/expert_exchange.cuh"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

/// An experts policy whose held weights an exchange can run: grouped() as cuda::grouped_swiglu
/// takes them.
template <class X>
concept DeviceGroupedExperts = experts::DeviceExpertsPolicy<X> && requires(const X& x) {
    { x.grouped() } -> std::convertible_to<cuda::GroupedExpertWeights>;
};

/// Expert parallelism through a cuda::ExpertExchange that the caller owns (it must outlive the
/// policy; one exchange may serve every layer, since layers run one after another). The layer
/// holds one stream, and its experts policy holds exactly the exchange's experts.
///
/// run() is a collective over the exchange's ranks: every rank calls it for every layer of every
/// step in the same order, with its own token count, including T = 0 (collective == true tells
/// the layer so). For T = 0 u, y and the routing may be empty (null pointers): the exchange
/// still serves the peers' rows with this rank's held weights. combine() is local (the rows came
/// back in run()); with T = 0 it enqueues nothing.
class CudaExchangeExperts {
public:
    using backend = CudaBackend;
    static constexpr bool collective = true;

    /// No exchange: run() and combine() throw (a layer's default-constructed policy).
    CudaExchangeExperts() = default;
    explicit CudaExchangeExperts(cuda::ExpertExchange& exchange) noexcept : exchange_(&exchange) {}

    /// The exchange plans and owns its own buffers (and runs the experts in them): no scratch.
    template <experts::DeviceExpertsPolicy X>
    [[nodiscard]] std::size_t scratch_bytes(const X& /*experts*/) const noexcept
    {
        return 0;
    }

    template <DeviceGroupedExperts X>
    void run(X& experts, MatrixView<const bfloat16> u, const routing::DeviceRoutingResult& r, MatrixView<bfloat16> y,
             const cuda::DeviceContext& ctx)
    {
        cuda::ExpertExchange& ex = exchange("run");
        const auto& s = experts.spec();
        const index_t t = r.tokens;
        require(ex.expert_begin() == s.expert_begin && ex.expert_count() == s.expert_end - s.expert_begin,
                "CudaExchangeExperts: the exchange holds experts [", ex.expert_begin(), ", ",
                ex.expert_begin() + ex.expert_count(), "), the experts policy [", s.expert_begin, ", ", s.expert_end,
                ")");
        require(t >= 0 && t <= ex.max_tokens(), "CudaExchangeExperts: ", t, " tokens exceed the exchange's ",
                ex.max_tokens());
        if (t > 0) {
            require(r.slots_per_token == ex.slots(), "CudaExchangeExperts: the routing has ", r.slots_per_token,
                    " slots per token, the exchange was planned for ", ex.slots());
            require(u.extent(0) == t && u.extent(1) == s.hidden_size && u.is_contiguous() &&
                        y.extent(0) == t * r.slots_per_token && y.extent(1) == s.hidden_size && y.is_contiguous(),
                    "CudaExchangeExperts: u is ", format_shape(u.shape()), " and y ", format_shape(y.shape()),
                    "; expected contiguous [", t, ", ", s.hidden_size, "] and [", t * r.slots_per_token, ", ",
                    s.hidden_size, "]");
        }
        ex.run(experts.grouped(), t > 0 ? r.experts : nullptr, t > 0 ? r.weights : nullptr, t > 0 ? u.data() : nullptr,
               t, t > 0 ? y.data() : nullptr, ctx.stream);
    }

    template <experts::DeviceExpertsPolicy X>
    void combine(const X& experts, const routing::DeviceRoutingResult& r, MatrixView<const bfloat16> y,
                 MatrixView<const bfloat16> residual, TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) const
    {
        cuda::ExpertExchange& ex = exchange("combine");
        const index_t t = r.tokens, d = experts.spec().hidden_size;
        require(out.extent(0) == 1, "CudaExchangeExperts: expert parallelism combines into one stream, the output has ",
                out.extent(0));
        if (t == 0) return;
        require(out.extent(1) == t && out.extent(2) == d && out.is_contiguous() && residual.extent(0) == t &&
                    residual.extent(1) == d && residual.is_contiguous() && y.extent(1) == d && y.is_contiguous(),
                "CudaExchangeExperts combine: shapes disagree with the routing of ", t, " tokens of width ", d,
                ": y is ", format_shape(y.shape()), ", residual ", format_shape(residual.shape()), ", out ",
                format_shape(out.shape()));
        ex.combine(y.data(), r.weights, residual.data(), t, out.data(), ctx.stream);
    }

    [[nodiscard]] cuda::ExpertExchange* exchange() const noexcept { return exchange_; }

private:
    [[nodiscard]] cuda::ExpertExchange& exchange(const char* call) const
    {
        require(exchange_ != nullptr, "CudaExchangeExperts::", call,
                ": no expert exchange (construct the policy from the cuda::ExpertExchange of this rank)");
        return *exchange_;
    }

    cuda::ExpertExchange* exchange_ = nullptr;
};
static_assert(DeviceExpertParallelPolicy<CudaExchangeExperts, experts::CudaSwiGluExperts<>>);

}  // namespace foe::parallel
