#pragma once
// The host layer and model compositions the library ships, and make_model(), which picks one
// from a config at run time (the runner's path from a model directory to a model).

#include <memory>

#include "foe/attention/gqa_attention.hpp"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/model/model.hpp"
#include "foe/parallel/local_experts.hpp"
#include "foe/routing/router.hpp"
#include "foe/sync/all_reduce_mean.hpp"

namespace foe {

/// FoE layer on one process: every group and expert local, residual sync over SelfComm. Cache is
/// the KV-cache layout (attention::PagedKvCache for block tables).
template <routing::ScoreFunctionPolicy Score = routing::Softmax, gemm::GemmPolicy Gemm = gemm::Default,
          attention::KvCachePolicy Cache = attention::ContiguousKvCache>
using HostFoeLayer = FoeLayer<attention::GqaAttention<Gemm, Cache>, routing::Router<Score, routing::PerGroupTopK, Gemm>,
                              experts::SwiGluExperts<Gemm>, parallel::LocalExperts, sync::AllReduceMean<>>;

/// Standard MoE layer (OLMoE) on one process.
template <routing::ScoreFunctionPolicy Score = routing::Softmax, gemm::GemmPolicy Gemm = gemm::Default,
          attention::KvCachePolicy Cache = attention::ContiguousKvCache>
using HostMoeLayer = MoeLayer<attention::GqaAttention<Gemm, Cache>, routing::Router<Score, routing::GlobalTopK, Gemm>,
                              experts::SwiGluExperts<Gemm>, parallel::LocalExperts>;

/// The host model for the weights' config: OlmoeForCausalLM -> standard MoE layers,
/// FoeForCausalLM -> FoE layers with the config's score function. Every dense product (the
/// projections, the router, the experts and the LM head) goes through Gemm; Cache is the
/// KV-cache layout (with attention::PagedKvCache every batch carries block tables).
template <gemm::GemmPolicy Gemm = gemm::Default, attention::KvCachePolicy Cache = attention::ContiguousKvCache>
[[nodiscard]] std::unique_ptr<ModelInterface> make_model(std::shared_ptr<const ModelWeights> weights,
                                                         const ModelOptions& options = {})
{
    const ModelConfig& c = weights->config;
    c.validate();
    if (c.architecture == Architecture::olmoe)
        return std::make_unique<Model<HostMoeLayer<routing::Softmax, Gemm, Cache>, Gemm>>(std::move(weights), options);
    if (c.scoring_func == ScoreFunction::sigmoid)
        return std::make_unique<Model<HostFoeLayer<routing::Sigmoid, Gemm, Cache>, Gemm>>(std::move(weights), options);
    return std::make_unique<Model<HostFoeLayer<routing::Softmax, Gemm, Cache>, Gemm>>(std::move(weights), options);
}

}  // namespace foe
