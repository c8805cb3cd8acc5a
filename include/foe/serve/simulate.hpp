#pragma once
// Simulated serving: the scheduler of foe/serve/scheduler.hpp on a virtual clock whose steps take
// what a step-time function says (the cost model's, perf::step_cost), with no model and no
// weights. The scheduler is the one foe_serve runs, so batching, chunked prefill, page
// allocation and preemption are the same; only the time of a step is predicted instead of
// measured. Generated tokens are all 0 (no stop token): every request runs to its length.

#include <span>
#include <vector>

#include "foe/core/tensor.hpp"
#include "foe/perf/cost_model.hpp"
#include "foe/serve/block_manager.hpp"
#include "foe/serve/scheduler.hpp"
#include "foe/serve/trace.hpp"

namespace foe::serve {

/// The chunks of a step as the cost model sees them: (cached context, new tokens) each.
[[nodiscard]] inline std::vector<perf::ChunkShape> chunk_shapes(const StepPlan& step)
{
    std::vector<perf::ChunkShape> out;
    out.reserve(step.batch.chunks().size());
    for (const auto& c : step.batch.chunks()) out.push_back({c.start, c.length});
    return out;
}

/// Serves `trace` on a virtual clock; step_time(step) gives each step's seconds.
template <class StepTime>
[[nodiscard]] std::vector<RequestRecord> simulate(const std::vector<TraceEntry>& trace, BlockManager& pages,
                                                  const SchedulerOptions& options, StepTime&& step_time)
{
    Scheduler scheduler(pages, options);
    for (std::size_t i = 0; i < trace.size(); ++i) {
        // Before its prompt is built: an absurd length is refused, not allocated.
        require<CapacityError>(trace[i].prompt_tokens <= pages.max_positions(), "request ", i, " can never be served: "
                               "its ", trace[i].prompt_tokens, " prompt tokens exceed the ", pages.max_positions(),
                               " positions a sequence holds here");
        scheduler.submit({static_cast<index_t>(i), trace[i].arrival,
                          std::vector<std::int32_t>(static_cast<std::size_t>(trace[i].prompt_tokens), 0),
                          trace[i].output_tokens});
    }
    double now = 0.0;
    run(
        scheduler, [&] { return now; }, [&](double t) { now = t; },
        [&](const StepPlan& step) {
            now += step_time(step);
            return Tensor<float>({step.batch.sequences(), 1});  // one-token vocabulary: every token is 0
        });
    return scheduler.records();
}

/// The step time of a model of `config.num_hidden_layers` layers by the cost model: L x one
/// layer's serial time for the step's chunks (the embedding and LM head are not costed).
[[nodiscard]] inline double cost_model_step_time(const ModelConfig& config, perf::Strategy strategy,
                                                 const StepPlan& step, const perf::Cluster& cluster,
                                                 const perf::HardwareProfile& hardware, const perf::CostOptions& options)
{
    const auto chunks = chunk_shapes(step);
    return perf::forward_time(perf::step_cost(config, strategy, chunks, cluster, hardware, options), config);
}

}  // namespace foe::serve
