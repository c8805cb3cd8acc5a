#pragma once
// A model spread over the ranks of a communicator: FoE groups on ranks (G <= H and G > H), or one
// of the two standard-MoE baselines, from the same weights and policies as the one-process model.
//
//   auto config    = load_config_json(dir / "config.json");
//   agree(world, model_digest(config, strategy, R), "");            // all ranks run the same thing
//   auto placement = parallel::Placement::make(strategy, config, world.size(), R, world.rank());
//   auto weights   = load_model_dir(dir, held_tensors(placement)); // only this rank's experts
//   auto dm        = make_distributed_model(world, placement, weights);
//   dm.model->forward(local_batch, local_tokens);                   // this rank's sequences
//
// Which sequences a rank runs: every rank all of them for FoE with G <= H and for the
// head-parallel MoE; shard `placement.shard` of `placement.shards` for FoE with G > H and for the
// data-parallel MoE (shard_of() splits a list of sequences). Every collective here is called by
// every rank of `world` in the same order, so a rank never waits for a call that will not come.
// A rank that fails on its own later (an exception the others do not see) must say so with
// MpiComm::abort_peers, which makes the others' collectives throw instead of wait (foe_run does).

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "foe/attention/gqa_attention.hpp"
#include "foe/comm/counting_comm.hpp"
#include "foe/comm/hierarchical_comm.hpp"
#include "foe/core/error.hpp"
#include "foe/core/rng.hpp"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/moe_head_parallel_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/model/model.hpp"
#include "foe/parallel/all_to_all_ep.hpp"
#include "foe/parallel/dispatch_plan.hpp"
#include "foe/parallel/local_experts.hpp"
#include "foe/parallel/placement.hpp"
#include "foe/routing/router.hpp"
#include "foe/sync/all_reduce_mean.hpp"

namespace foe {

/// How the communication of a distributed model runs (the placement says where things are).
struct ParallelOptions {
    /// Expert dispatch of the MoE baselines and of FoE with G > H: one row per (token, expert),
    /// or one per (token, rank) expanded at the receiver (parallel/dispatch_plan.hpp).
    parallel::Dispatch dispatch = parallel::Dispatch::naive;
    /// FoE's residual sync and output sum as reduce-scatter in the node, all-reduce across
    /// nodes, all-gather in the node (comm/hierarchical_comm.hpp), instead of one flat ring.
    bool hierarchical_all_reduce = false;
};

/// A model on this rank and the communicators its layers use (copies share their counters).
template <comm::Comm C>
struct DistributedModel {
    parallel::Placement placement;
    comm::CountingComm<C> sync;     ///< FoE residual sync; head-parallel attention's all-reduce/all-gather
    comm::CountingComm<C> experts;  ///< expert dispatch and combine
    comm::CountingComm<C> output;   ///< the once-per-forward sum of the last layer's streams
    /// With hierarchical_all_reduce: the residual sync's communicators inside this rank's node
    /// (reduce-scatter and all-gather) and across nodes (all-reduce); default (unused) otherwise.
    comm::CountingComm<C> sync_node, sync_cross;
    std::unique_ptr<ModelInterface> model;
};

/// A 64-bit digest of what every rank must agree on: the config, the strategy, R, and the name
/// and shape of every tensor the config implies.
[[nodiscard]] std::uint64_t model_digest(const ModelConfig& config, parallel::Strategy strategy, int ranks_per_node);

/// Collective: every rank reports `error` (empty when it is fine) and its digest. If any rank
/// failed, every rank throws the same CommError naming the first failing rank and its message;
/// if digests differ, every rank throws naming the ranks that differ from rank 0. This is how a
/// bad file or a mismatched launch becomes an error on every rank instead of a hang.
template <comm::Comm C>
void agree(C& world, std::uint64_t digest, std::string_view error);

/// A named value every rank must hold alike (its digest), for agree_on().
struct AgreedValue {
    std::string_view name;  ///< how the user sets it, e.g. "--tokens"
    std::uint64_t digest;
};

/// Collective: every rank passes the same names in the same order (at most 16). If any value's
/// digest differs from rank 0's, every rank throws the same CommError naming each differing value
/// and the ranks that differ ("ranks disagree on the request: --tokens differs on rank(s) 2 from
/// rank 0"), so that a launch with mismatched per-rank options fails before the first collective
/// of the work, on every rank alike.
template <comm::Comm C>
void agree_on(C& world, std::string_view subject, std::span<const AgreedValue> values);

/// The tensors rank `placement` holds: every non-expert tensor, and its own experts.
[[nodiscard]] TensorFilter held_tensors(const parallel::Placement& placement);

/// The sequences of shard `shard` of `shards` out of `count`: [first, first + n), balanced.
struct SequenceRange {
    index_t first = 0, count = 0;
};
[[nodiscard]] inline SequenceRange shard_of(index_t sequences, int shard, int shards)
{
    const index_t base = sequences / shards, extra = sequences % shards;
    return {shard * base + std::min<index_t>(shard, extra), base + (shard < extra ? 1 : 0)};
}

/// Collective over `world`: builds this rank's part of the model. Splits `world` into the sync,
/// expert and output communicators (CountingComm, with member nodes from the placement) and
/// checks with agree() that every rank built the same thing.
template <comm::Comm C>
[[nodiscard]] DistributedModel<C> make_distributed_model(C world, const parallel::Placement& placement,
                                                         std::shared_ptr<const ModelWeights> weights,
                                                         const ModelOptions& options = {},
                                                         const ParallelOptions& parallel_options = {});

// ---------------------------------------------------------------------------------------------

inline std::uint64_t model_digest(const ModelConfig& c, parallel::Strategy strategy, int ranks_per_node)
{
    std::string text = detail::concat(to_string(c.architecture), '|', c.hidden_size, '|', c.intermediate_size, '|',
                                      c.num_attention_heads, '|', c.num_key_value_heads, '|', c.head_dim, '|',
                                      c.num_hidden_layers, '|', c.num_experts, '|', c.num_experts_per_tok, '|',
                                      c.vocab_size, '|', c.groups(), '|', c.max_position_embeddings, '|', c.rope_theta,
                                      '|', c.rms_norm_eps, '|', c.norm_topk_prob, '|', c.tie_word_embeddings, '|',
                                      to_string(c.qk_norm), '|', to_string(c.scoring_func), '|',
                                      parallel::to_string(strategy), '|', ranks_per_node);
    try {
        for (const auto& spec : expected_tensors(c)) text += spec.name + format_shape(spec.shape);
    } catch (const ConfigError& e) {
        text += e.what();  // an invalid config still has a digest; validation reports it later
    }
    return stream_id(text);
}

namespace detail {

/// A 64-bit digest as 4 floats of 16 bits each (every integer below 2^16 is exact in float), so
/// that it can travel through a float collective; and whether two such quadruples are equal.
inline void put_digest(std::uint64_t digest, float* out) noexcept
{
    for (int i = 0; i < 4; ++i) out[i] = static_cast<float>((digest >> (16 * i)) & 0xffffu);
}
[[nodiscard]] inline bool same_digest(const float* a, const float* b) noexcept
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

}  // namespace detail

template <comm::Comm C>
void agree(C& world, std::uint64_t digest, std::string_view error)
{
    // Per rank: [failed, 4 x 16 bits of the digest, message length, message bytes]. Every value
    // is an integer below 2^16, exact in float.
    constexpr std::size_t max_message = 250, width = 6 + max_message;
    std::vector<float> mine(width, 0.0f);
    mine[0] = error.empty() ? 0.0f : 1.0f;
    detail::put_digest(digest, mine.data() + 1);
    const std::size_t n = std::min(error.size(), max_message);
    mine[5] = static_cast<float>(n);
    for (std::size_t i = 0; i < n; ++i) mine[6 + i] = static_cast<float>(static_cast<unsigned char>(error[i]));
    std::vector<float> all(width * static_cast<std::size_t>(world.size()));
    world.all_gather(mine, all, typename C::stream_type{});

    auto at = [&](int r, std::size_t i) { return all[static_cast<std::size_t>(r) * width + i]; };
    int failed = 0, first_failed = -1;
    for (int r = 0; r < world.size(); ++r)
        if (at(r, 0) != 0.0f && failed++ == 0) first_failed = r;
    if (failed > 0) {
        std::string message;
        for (std::size_t i = 0; i < static_cast<std::size_t>(at(first_failed, 5)); ++i)
            message += static_cast<char>(static_cast<unsigned char>(at(first_failed, 6 + i)));
        raise<CommError>("rank ", first_failed, (failed > 1 ? detail::concat(" (and ", failed - 1, " other rank(s))") : ""),
                         " failed: ", message);
    }
    std::string differ;
    for (int r = 1; r < world.size(); ++r)
        if (!detail::same_digest(&all[static_cast<std::size_t>(r) * width + 1], &all[1]))
            differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    require<CommError>(differ.empty(), "ranks disagree on the model: rank(s) ", differ,
                       " have a different config, strategy, ranks per node or weight shapes than rank 0 (launch "
                       "every rank with the same model and options)");
}

template <comm::Comm C>
void agree_on(C& world, std::string_view subject, std::span<const AgreedValue> values)
{
    constexpr std::size_t max_values = 16;
    require(values.size() <= max_values, "agree_on takes at most ", max_values, " values, got ", values.size());
    const std::size_t width = 4 * values.size();
    std::vector<float> mine(width);
    for (std::size_t v = 0; v < values.size(); ++v)
        detail::put_digest(values[v].digest, mine.data() + 4 * v);
    std::vector<float> all(width * static_cast<std::size_t>(world.size()));
    world.all_gather(mine, all, typename C::stream_type{});
    std::string differences;
    for (std::size_t v = 0; v < values.size(); ++v) {
        std::string ranks;
        for (int r = 1; r < world.size(); ++r)
            if (!detail::same_digest(&all[static_cast<std::size_t>(r) * width + 4 * v], &all[4 * v]))
                ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
        if (!ranks.empty())
            differences += detail::concat(differences.empty() ? "" : "; ", values[v].name, " differs on rank(s) ",
                                          ranks, " from rank 0");
    }
    require<CommError>(differences.empty(), "ranks disagree on ", subject, ": ", differences,
                       " (every rank must be given the same)");
}

inline TensorFilter held_tensors(const parallel::Placement& p)
{
    return [first = p.expert_begin, last = p.expert_end](std::string_view name) {
        constexpr std::string_view marker = ".mlp.experts.";
        const auto at = name.find(marker);
        if (at == std::string_view::npos) return true;
        index_t e = 0;
        for (std::size_t i = at + marker.size(); i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i)
            e = e * 10 + (name[i] - '0');
        return first <= e && e < last;
    };
}

namespace detail {

/// Calls f with a default-constructed score policy matching the config (softmax or sigmoid).
template <class F>
decltype(auto) with_score(const ModelConfig& c, F&& f)
{
    if (c.scoring_func == ScoreFunction::sigmoid) return f(routing::Sigmoid{});
    return f(routing::Softmax{});
}

}  // namespace detail

template <comm::Comm C>
DistributedModel<C> make_distributed_model(C world, const parallel::Placement& placement,
                                           std::shared_ptr<const ModelWeights> weights, const ModelOptions& options,
                                           const ParallelOptions& parallel_options)
{
    using CC = comm::CountingComm<C>;
    using parallel::Strategy;
    const ModelConfig& config = weights->config;
    const parallel::Placement& p = placement;
    require<CommError>(world.size() == p.ranks && world.rank() == p.rank, "the placement is for rank ", p.rank, " of ",
                       p.ranks, " but the communicator is rank ", world.rank(), " of ", world.size());
    agree(world,
          model_digest(config, p.strategy, p.ranks_per_node) ^
              stream_id(detail::concat(parallel::to_string(parallel_options.dispatch), '|',
                                   parallel_options.hierarchical_all_reduce)),
          "");

    // Three communicators, split by every rank in the same order.
    const bool foe = p.strategy == Strategy::foe;
    const int sync_color = foe ? p.shard : (p.strategy == Strategy::moe_head_parallel ? 0 : p.rank);
    DistributedModel<C> dm{p,
                           CC(world.split(sync_color, p.rank),
                              p.nodes_of(p.strategy == Strategy::moe_head_parallel ? p.expert_members() : p.sync_members())),
                           CC(world.split(foe ? static_cast<int>(p.group_begin) : 0, p.rank), p.nodes_of(p.expert_members())),
                           CC(world.split(foe ? p.shard : p.rank, p.rank), p.nodes_of(foe ? p.sync_members() : std::vector<int>{p.rank})),
                           CC{}, CC{}, nullptr};

    LayerOptions base;
    base.group_begin = p.group_begin;
    base.group_end = p.group_end;
    base.expert_begin = p.expert_begin;
    base.expert_end = p.expert_end;
    const index_t experts_per_member = p.expert_end - p.expert_begin;

    const parallel::Dispatch dispatch = parallel_options.dispatch;
    const bool hierarchical = foe && parallel_options.hierarchical_all_reduce;
    using Hierarchical = comm::HierarchicalComm<CC>;
    std::optional<Hierarchical> hier_sync, hier_output;
    if (hierarchical) {
        hier_sync.emplace(dm.sync, p.nodes_of(p.sync_members()));
        hier_output.emplace(dm.output, p.nodes_of(p.sync_members()));
        dm.sync_node = hier_sync->node_comm();
        dm.sync_cross = hier_sync->cross_node_comm();
    }

    dm.model = detail::with_score(config, [&]<class Score>(Score) -> std::unique_ptr<ModelInterface> {
        using Attention = attention::GqaAttention<>;
        using Experts = experts::SwiGluExperts<>;
        using EP = parallel::AllToAllEP<CC>;
        auto with_options = [base](const LayerOptions& lo) {
            LayerOptions o = lo;
            o.group_begin = base.group_begin;
            o.group_end = base.group_end;
            o.expert_begin = base.expert_begin;
            o.expert_end = base.expert_end;
            return o;
        };
        if (p.strategy == Strategy::foe) {
            // The residual sync and the output sum over a flat or a hierarchical communicator.
            auto build = [&]<class SyncComm>(SyncComm sync_comm, SyncComm output_comm) -> std::unique_ptr<ModelInterface> {
                using Sync = sync::AllReduceMean<SyncComm>;
                std::function<void(std::span<float>)> reduce = [out = std::move(output_comm)](std::span<float> s) mutable {
                    out.all_reduce_sum(s);
                };
                if (p.shards == 1) {
                    using Layer = FoeLayer<Attention, routing::Router<Score, routing::PerGroupTopK>, Experts,
                                           parallel::LocalExperts, Sync>;
                    return std::make_unique<Model<Layer>>(
                        weights, options,
                        [&](index_t, const LayerWeights& lw, const LayerOptions& lo) {
                            return std::make_unique<Layer>(config, lw, with_options(lo), Sync(sync_comm));
                        },
                        reduce);
                }
                using Layer = FoeLayer<Attention, routing::Router<Score, routing::PerGroupTopK>, Experts, EP, Sync>;
                const index_t first = p.group_begin * config.experts_per_group();
                return std::make_unique<Model<Layer>>(
                    weights, options,
                    [&, ex = dm.experts, first](index_t, const LayerWeights& lw, const LayerOptions& lo) {
                        return std::make_unique<Layer>(config, lw, with_options(lo), Sync(sync_comm),
                                                       EP(ex, first, experts_per_member, dispatch));
                    },
                    reduce);
            };
            if (hierarchical) return build(*hier_sync, *hier_output);
            return build(dm.sync, dm.output);
        }
        using Routing = routing::Router<Score, routing::GlobalTopK>;
        if (p.strategy == Strategy::moe_data_parallel) {
            using Layer = MoeLayer<Attention, Routing, Experts, EP>;
            return std::make_unique<Model<Layer>>(
                weights, options, [&, ex = dm.experts](index_t, const LayerWeights& lw, const LayerOptions& lo) {
                    return std::make_unique<Layer>(config, lw, with_options(lo), EP(ex, 0, experts_per_member, dispatch));
                });
        }
        using Layer = MoeHeadParallelLayer<Attention, Routing, Experts, EP, CC>;
        return std::make_unique<Model<Layer>>(
            weights, options, [&, sync = dm.sync, ex = dm.experts](index_t, const LayerWeights& lw, const LayerOptions& lo) {
                return std::make_unique<Layer>(config, lw, with_options(lo), sync,
                                               EP(ex, 0, experts_per_member, dispatch));
            });
    });
    return dm;
}

}  // namespace foe
