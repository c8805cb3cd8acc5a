#pragma once
// ExpertExchange: how a CUDA layer reaches experts that other ranks hold (expert parallelism).
//
// A layer given an exchange routes its tokens as usual, then hands the routing and the normed
// activations u to the exchange instead of running its local permute / gather / grouped SwiGLU /
// combine: run() sends every routed (token, expert) to the rank holding the expert and brings
// the results back into y, combine() adds them to the residual. The layer holds only the experts
// the exchange says this rank holds.
//
// This header is the interface alone, so that the CUDA layers and foe/cuda/model.cuh need
// neither NCCL nor a communicator. The implementation over NCCL is parallel::NcclExpertExchange
// (foe/parallel/all_to_all_ep.cuh, a DeviceAllToAllEP bound to an NcclComm).

#include <cstdint>

#include "foe/core/half.hpp"
#include "foe/core/types.hpp"
#include "foe/experts/grouped_swiglu.cuh"

namespace foe::cuda {

/// A collective over the ranks that share the experts: every rank calls run() and combine() for
/// every layer of every step in the same order, each with its own token count (possibly 0).
class ExpertExchange {
public:
    virtual ~ExpertExchange() = default;

    /// y [tokens * slots(), d] receives the experts' outputs of the routing (experts, weights
    /// [tokens, slots()] on the device) of u [tokens, d]; `held` are this rank's experts
    /// [expert_begin(), expert_begin() + expert_count()). Stream-ordered on `stream`.
    virtual void run(const GroupedExpertWeights& held, const std::int32_t* experts, const float* weights,
                     const bfloat16* u, index_t tokens, bfloat16* y, cudaStream_t stream) = 0;
    /// out [tokens, d] = base + the routed outputs in y, weighted (fp32, one bf16 rounding).
    virtual void combine(const bfloat16* y, const float* weights, const bfloat16* base, index_t tokens, bfloat16* out,
                         cudaStream_t stream) = 0;

    /// Tokens one run() takes at most.
    [[nodiscard]] virtual index_t max_tokens() const noexcept = 0;
    /// Routed slots per token the exchange was planned for.
    [[nodiscard]] virtual index_t slots() const noexcept = 0;
    /// The experts this rank holds: [expert_begin(), expert_begin() + expert_count()).
    [[nodiscard]] virtual index_t expert_begin() const noexcept = 0;
    [[nodiscard]] virtual index_t expert_count() const noexcept = 0;
    /// True when run() and combine() neither synchronise with the host nor allocate, so that a
    /// CUDA graph may capture them (the fixed-capacity variant).
    [[nodiscard]] virtual bool capturable() const noexcept = 0;
};

}  // namespace foe::cuda
