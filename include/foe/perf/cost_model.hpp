#pragma once
// Cost model: the per-layer time of an FoE layer and of the two standard-MoE baselines on G ranks
// (R per node), from a hardware profile (foe/perf/hardware.hpp) and, where measured, kernel rates.
//
// What it answers: "for this model, this many tokens and this many GPUs, which layer is faster,
// and where does the time go?" Each layer cost is split into attention, experts (with the
// router), all-reduce and all-to-all, and every collective reports the bytes its busiest rank
// sends per link class (intra-node, inter-node), so that a counting communicator's measurements
// (foe/comm/counting_comm.hpp) can be compared with the prediction for the same placement.
//
// The model, in one paragraph (DESIGN.md 2 and 2.1 for the placements and byte counts):
// - A layer's time is that of its busiest rank. Compute is a roofline, max(FLOPs / FLOP/s,
//   bytes / HBM bytes/s); a collective costs latency (steps x per-step latency of the link) plus
//   the bytes sent over each link class divided by that link's bandwidth, the classes one after
//   the other, as the paper's Table 4 adds them.
// - Sequences are the unit of data parallelism: a rank that holds a share of the batch holds
//   whole sequences, and the busiest one holds ceil(B / shards) of the B sequences. With the
//   default workload (one sequence of S tokens) data-parallel attention therefore runs on one
//   rank, which is what data-parallel attention does with one long sequence.
// - Expert parallelism never goes below one expert per rank: on G > E ranks the layer is
//   replicated G / E times (data parallelism over copies of the experts), each copy on E ranks.
// - Every dispatch over more than one rank is scaled by the profile's load imbalance (busiest
//   rank over mean), in its expert compute and its all-to-all. FoE with G <= H has no dispatch
//   and so no imbalance; FoE with G > H dispatches inside a group and pays it there.
// - Both totals are reported: serial_time (no overlap: attention, all-reduce, all-to-all and
//   experts one after the other, as in the paper's timing diagrams) and overlapped_time (the
//   bound max(compute, communication) that perfect micro-batch overlap would reach).
// - Not costed: norms, RoPE, the embedding, the first layer's broadcast, the last layer's
//   average and the LM head; flash attention's re-reads of K and V (its memory term is a floor).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/parallel/dispatch_plan.hpp"
#include "foe/parallel/placement.hpp"
#include "foe/perf/hardware.hpp"

namespace foe::perf {

/// Bytes of one activation element on the wire and in HBM: bf16 (DESIGN.md 2.1, b = 2).
inline constexpr double activation_bytes = 2.0;
/// Bytes of one weight in HBM: the paper's models keep bfloat16 parameters (PAPER.md 3.1).
inline constexpr double weight_bytes = 2.0;

/// How a layer is spread over ranks: the three layouts the library runs (parallel::Placement).
using Strategy = parallel::Strategy;

/// How the expert all-to-all packs tokens (DESIGN.md 2.1): one row per (token, expert) on
/// another rank, or one per (token, destination rank) as DeepEP sends them. The library runs
/// both (parallel::AllToAllEP); the model counts d elements per row (not the row header).
using Dispatch = parallel::Dispatch;

/// How an all-reduce over ranks on several nodes crosses them.
enum class CrossNodeAllReduce : std::uint8_t {
    /// Reduce-scatter in the node, all-reduce across nodes among the ranks with the same local
    /// index, all-gather in the node (comm::HierarchicalComm; NCCL's rings over one NIC per GPU
    /// spread the inter-node bytes the same way): every rank sends 2 (N-1)/N n/q across nodes.
    hierarchical,
    /// One ring over all members, as a flat MPI or NCCL ring with one NIC: the members at the
    /// node boundaries send all their 2 (P-1)/P n across nodes, and the ring runs at their pace.
    ring,
};

/// Short names for tables and JSON keys ("foe", "moe-dp", "moe-tp").
[[nodiscard]] constexpr std::string_view short_name(Strategy s) noexcept
{
    switch (s) {
    case Strategy::foe: return "foe";
    case Strategy::moe_data_parallel: return "moe-dp";
    case Strategy::moe_head_parallel: return "moe-tp";
    }
    return "?";
}
[[nodiscard]] constexpr std::string_view to_string(CrossNodeAllReduce a) noexcept
{
    return a == CrossNodeAllReduce::ring ? "ring" : "hierarchical";
}

/// G ranks, R per node; ranks are numbered node by node (rank p is on node p / R).
struct Cluster {
    index_t ranks = 1;           ///< G
    index_t ranks_per_node = 1;  ///< R; a placement of G < R ranks uses one node

    [[nodiscard]] index_t nodes() const noexcept { return (ranks + ranks_per_node - 1) / ranks_per_node; }
    /// InvalidArgument for a non-positive count or R above the profile's GPUs per node;
    /// ConfigError when G ranks do not fill whole nodes.
    void validate(const HardwareProfile& hardware) const;
};

/// The global batch of one layer: `tokens` (S) in sequences of `sequence_length` tokens.
struct Workload {
    index_t tokens = 0;           ///< S, every token of the batch, all ranks together
    index_t sequence_length = 0;  ///< tokens per sequence; 0 means one sequence of `tokens`

    [[nodiscard]] index_t tokens_per_sequence() const noexcept { return sequence_length > 0 ? sequence_length : tokens; }
    [[nodiscard]] index_t sequences() const noexcept { return tokens / tokens_per_sequence(); }
    /// InvalidArgument unless tokens > 0 and tokens is a multiple of sequence_length.
    void validate() const;
};

struct CostOptions {
    Dispatch dispatch = Dispatch::naive;
    CrossNodeAllReduce cross_node_all_reduce = CrossNodeAllReduce::hierarchical;
    KernelRates rates;  ///< measured rates; empty fields keep the profile's roofline rates
};

/// Bytes one rank sends, by the class of link they cross.
struct LinkBytes {
    double intra = 0.0;  ///< to ranks on the same node (NVLink)
    double inter = 0.0;  ///< to ranks on other nodes (InfiniBand)
    [[nodiscard]] double total() const noexcept { return intra + inter; }
};

/// One kind of collective in one layer, on the busiest rank.
struct CollectiveCost {
    index_t calls = 0;      ///< collectives of this kind per layer (all-to-all: dispatch + combine)
    index_t ranks = 1;      ///< members of the communicator
    index_t nodes = 1;      ///< nodes the communicator spans
    LinkBytes bytes;        ///< bytes sent per layer, all calls together
    double latency = 0.0;   ///< seconds of per-step latency
    double transfer = 0.0;  ///< seconds of bytes / bandwidth
    [[nodiscard]] double time() const noexcept { return latency + transfer; }
};

/// One compute phase of one layer, on the busiest rank.
struct ComputeCost {
    double flops = 0.0;
    double hbm_bytes = 0.0;  ///< a floor: weights read once, activations read and written once
    double time = 0.0;       ///< max(compute time, memory time)
};

/// The cost of one layer.
struct LayerCost {
    Strategy strategy = Strategy::foe;
    index_t expert_parallel_size = 1;  ///< ranks sharing one copy of the experts: min(G, E)
    index_t replicas = 1;              ///< copies of the layer: G / expert_parallel_size
    index_t busiest_tokens = 0;        ///< tokens whose attention the busiest rank computes
    ComputeCost attention;             ///< q/k/v/o projections and the causal attention core
    ComputeCost experts;               ///< router and expert FFNs
    CollectiveCost all_reduce;         ///< FoE: residual sync; MoE head-parallel: after attention
    CollectiveCost all_to_all;         ///< expert dispatch and combine
    double overhead = 0.0;             ///< KernelRates::layer_overhead: fixed seconds per layer

    [[nodiscard]] double compute_time() const noexcept { return attention.time + experts.time + overhead; }
    [[nodiscard]] double communication_time() const noexcept { return all_reduce.time() + all_to_all.time(); }
    /// No overlap: every phase after the previous one. What foe_project reports.
    [[nodiscard]] double serial_time() const noexcept { return compute_time() + communication_time(); }
    /// Perfect overlap of communication with compute (e.g. two interleaved micro-batches): a bound.
    [[nodiscard]] double overlapped_time() const noexcept { return std::max(compute_time(), communication_time()); }
    /// Bytes the busiest rank sends per layer, all collectives together.
    [[nodiscard]] LinkBytes bytes() const noexcept
    {
        return {all_reduce.bytes.intra + all_to_all.bytes.intra, all_reduce.bytes.inter + all_to_all.bytes.inter};
    }
};

/// The cost of one layer of `config` under `strategy`. FoE uses the config's expert groups
/// (config.groups(): an OlmoeForCausalLM config is FoE with H = 1, which costs exactly what
/// moe_data_parallel costs); the MoE strategies cost the standard MoE layer of the config's
/// sizes and ignore its groups. Throws ConfigError when the placement cannot hold the layer
/// (G not valid for H or E, groups that do not tile nodes), InvalidArgument for bad values.
[[nodiscard]] LayerCost layer_cost(const ModelConfig& config, Strategy strategy, const Workload& workload,
                                   const Cluster& placement, const HardwareProfile& hardware,
                                   const CostOptions& options = {});

/// One chunk of a serving step: `tokens` new tokens appended after `context` cached positions
/// (a prefill chunk, or a decode token with context = the sequence's length).
struct ChunkShape {
    index_t context = 0;
    index_t tokens = 0;
};

/// The cost of one layer in one step of a continuous-batching server (foe/serve/scheduler.hpp):
/// a ragged batch of chunks, each reading its cached context. The placement spreads sequences as
/// layer_cost's does (a data-parallel rank holds whole sequences: chunk i goes to rank i mod
/// shards), the busiest rank sets the time, attention reads every chunk's K and V once, and the
/// collectives move the step's tokens. G must not exceed E (no replicated experts here).
/// Throws as layer_cost does; InvalidArgument for an empty step or a negative chunk.
[[nodiscard]] LayerCost step_cost(const ModelConfig& config, Strategy strategy, std::span<const ChunkShape> chunks,
                                  const Cluster& placement, const HardwareProfile& hardware,
                                  const CostOptions& options = {});

/// The whole forward pass as L identical layers (serial or overlapped), without the embedding
/// and the LM head.
[[nodiscard]] inline double forward_time(const LayerCost& layer, const ModelConfig& config, bool overlapped = false)
{
    return static_cast<double>(config.num_hidden_layers) * (overlapped ? layer.overlapped_time() : layer.serial_time());
}

/// The paper's own communication analysis (PAPER.md 1.5), reproduced for comparison. Its units
/// are the paper's: volumes in units of S d, the all-to-all summed over all G ranks but the
/// all-reduce counted per rank (DESIGN.md 2.1 points out the mix); times in units of
/// S d / B_intra, intra-node and inter-node terms added.
namespace paper {

struct Table4 {
    double moe_intra = 0.0, moe_inter = 0.0, moe_time = 0.0;
    double foe_intra = 0.0, foe_inter = 0.0, foe_time = 0.0;
    [[nodiscard]] double speedup() const noexcept { return moe_time / foe_time; }
};

/// Table 4 for top-k k, H groups, G ranks on N nodes and r = B_intra / B_inter (with N = 1 and
/// G <= H it is Table 3). InvalidArgument for non-positive values or G not a multiple of N.
[[nodiscard]] Table4 table4(index_t k, index_t groups, index_t ranks, index_t nodes, double r);

/// The limit of Table 4's T_moe / T_foe as N grows: k H r / (k H + r (H - 1)).
[[nodiscard]] double asymptote(index_t k, index_t groups, double r);

}  // namespace paper

// =============================================================================================
// Definitions
// =============================================================================================

inline void Cluster::validate(const HardwareProfile& hardware) const
{
    require<InvalidArgument>(ranks > 0, "the number of ranks G (", ranks, ") must be positive");
    require<InvalidArgument>(ranks_per_node > 0, "ranks per node R (", ranks_per_node, ") must be positive");
    require<InvalidArgument>(ranks_per_node <= hardware.gpus_per_node, "ranks per node R (", ranks_per_node,
                             ") exceeds the GPUs per node of \"", hardware.name, "\" (", hardware.gpus_per_node, ")");
    require<ConfigError>(ranks <= ranks_per_node || ranks % ranks_per_node == 0, "G (", ranks,
                         ") ranks do not fill whole nodes of R (", ranks_per_node, ") ranks");
}

inline void Workload::validate() const
{
    require<InvalidArgument>(tokens > 0, "the token count S (", tokens, ") must be positive");
    require<InvalidArgument>(sequence_length >= 0, "sequence_length (", sequence_length,
                             ") must be positive, or 0 for one sequence of all tokens");
    require<InvalidArgument>(tokens % tokens_per_sequence() == 0, "the token count S (", tokens,
                             ") is not a multiple of sequence_length (", sequence_length, ")");
}

namespace detail {

[[nodiscard]] constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }

/// The members of a communicator: `size` ranks with stride `stride` from a node-aligned rank,
/// on nodes of R consecutive ranks. The caller has checked that stride and R tile each other.
struct CommShape {
    index_t size = 1;
    index_t per_node = 1;  ///< members on each node the communicator spans
    [[nodiscard]] index_t nodes() const noexcept { return size / per_node; }

    [[nodiscard]] static CommShape of(index_t size, index_t stride, index_t ranks_per_node) noexcept
    {
        if (size <= 1) return {};
        if (stride >= ranks_per_node) return {size, 1};
        return {size, std::min(size, ranks_per_node / stride)};
    }
};

/// Probability that a token's top-k, spread uniformly over `pool` experts, picks at least one
/// of `held` given ones: 1 - C(pool - held, k) / C(pool, k), as a product to stay in range.
[[nodiscard]] inline double hit_probability(index_t pool, index_t held, index_t k) noexcept
{
    double miss = 1.0;
    for (index_t i = 0; i < k; ++i) {
        const index_t left = pool - held - i;
        if (left <= 0) return 1.0;
        miss *= static_cast<double>(left) / static_cast<double>(pool - i);
    }
    return 1.0 - miss;
}

/// The rates one layer is timed with: measured where given, the profile's roofline otherwise.
struct Rates {
    double dense, attention, expert, memory, overhead;

    [[nodiscard]] static Rates of(const HardwareProfile& hw, const KernelRates& measured)
    {
        auto check = [](std::string_view what, const std::optional<double>& v) {
            require<InvalidArgument>(!v || (std::isfinite(*v) && *v > 0.0), "measured ", what, " (", v.value_or(0.0),
                                     ") must be a positive finite rate");
        };
        check("dense_flops", measured.dense_flops);
        check("attention_flops", measured.attention_flops);
        check("expert_flops", measured.expert_flops);
        check("memory_bandwidth", measured.memory_bandwidth);
        require<InvalidArgument>(!measured.layer_overhead || (std::isfinite(*measured.layer_overhead) && *measured.layer_overhead >= 0.0),
                                 "measured layer_overhead (", measured.layer_overhead.value_or(0.0),
                                 " s) must be finite and not negative");
        return {measured.dense_flops.value_or(hw.peak_flops), measured.attention_flops.value_or(hw.peak_flops),
                measured.expert_flops.value_or(hw.peak_flops), measured.memory_bandwidth.value_or(hw.hbm_bandwidth),
                measured.layer_overhead.value_or(0.0)};
    }
};

[[nodiscard]] inline double transfer_time(const LinkBytes& b, const HardwareProfile& hw) noexcept
{
    return b.intra / hw.intra_node.bandwidth + b.inter / hw.inter_node.bandwidth;
}

/// One all-reduce of `n` bytes per member. Across nodes it is hierarchical by default:
/// reduce-scatter among the node's members, all-reduce of each 1/q shard across the nodes (q
/// rings in parallel, one NIC each), all-gather inside the node. With a ring inside the node the
/// bytes sent add up to the flat ring's 2 (P-1)/P n, what CountingComm counts. A flat ring
/// across nodes costs what its boundary members send: 2 (P-1)/P n over the inter-node link.
[[nodiscard]] inline CollectiveCost all_reduce_cost(CommShape c, double n, const HardwareProfile& hw,
                                                    CrossNodeAllReduce across = CrossNodeAllReduce::hierarchical)
{
    CollectiveCost out;
    out.ranks = c.size;
    out.nodes = c.nodes();
    if (c.size <= 1) return out;
    out.calls = 1;
    const auto q = static_cast<double>(c.per_node), nodes = static_cast<double>(c.nodes());
    if (c.nodes() > 1 && across == CrossNodeAllReduce::ring) {
        const auto p = static_cast<double>(c.size);
        out.bytes.inter = 2.0 * (p - 1.0) / p * n;
        out.latency = 2.0 * (p - 1.0) * hw.inter_node.latency;
        out.transfer = transfer_time(out.bytes, hw);
        return out;
    }
    if (c.per_node > 1) {
        if (hw.all_reduce == AllReduceAlgorithm::ring) {
            out.bytes.intra = 2.0 * (q - 1.0) / q * n;
            out.latency += 2.0 * (q - 1.0) * hw.intra_node.latency;
        } else {
            // Assumption: NVLS costs two switch traversals (push-reduce, multicast) of n bytes.
            constexpr double in_switch_steps = 2.0;
            out.bytes.intra = n;
            out.latency += in_switch_steps * hw.intra_node.latency;
        }
    }
    if (c.nodes() > 1) {
        out.bytes.inter = 2.0 * (nodes - 1.0) / nodes * n / q;
        out.latency += 2.0 * (nodes - 1.0) * hw.inter_node.latency;
    }
    out.transfer = transfer_time(out.bytes, hw);
    return out;
}

/// Dispatch and combine of a pairwise all-to-all in which the busiest rank sends `per_peer`
/// bytes to every other member in each of the two.
[[nodiscard]] inline CollectiveCost all_to_all_cost(CommShape c, double per_peer, const HardwareProfile& hw)
{
    constexpr double phases = 2.0;  // dispatch, then combine
    CollectiveCost out;
    out.ranks = c.size;
    out.nodes = c.nodes();
    if (c.size <= 1) return out;
    out.calls = static_cast<index_t>(phases);
    const auto local_peers = static_cast<double>(c.per_node - 1), remote_peers = static_cast<double>(c.size - c.per_node);
    out.bytes = {phases * per_peer * local_peers, phases * per_peer * remote_peers};
    out.latency = phases * (local_peers * hw.intra_node.latency + remote_peers * hw.inter_node.latency);
    out.transfer = transfer_time(out.bytes, hw);
    return out;
}

/// The attention a rank computes: its heads over its whole sequences.
struct AttentionShare {
    index_t q_heads = 0, kv_heads = 0;
    index_t streams = 1;  ///< residual streams read and written (FoE: groups held)
    index_t sequences = 0, sequence_length = 0;
};

[[nodiscard]] inline ComputeCost attention_cost(const ModelConfig& c, const AttentionShare& s, const Rates& r)
{
    const auto d = static_cast<double>(c.hidden_size), hd = static_cast<double>(c.head_dim);
    const auto t = static_cast<double>(s.sequence_length), tokens = static_cast<double>(s.sequences) * t;
    const double qkv_width = static_cast<double>(s.q_heads + 2 * s.kv_heads) * hd;
    const double o_width = static_cast<double>(s.q_heads) * hd;
    const double projections = 2.0 * tokens * d * (qkv_width + o_width);
    // Causal: each sequence has t (t + 1) / 2 query-key pairs; QK^T and PV each cost 2 FLOPs
    // per pair per query-head dimension.
    const double core = static_cast<double>(s.sequences) * 2.0 * 2.0 * (t * (t + 1.0) / 2.0) * o_width;
    ComputeCost out;
    out.flops = projections + core;
    out.hbm_bytes = weight_bytes * d * (qkv_width + o_width) +
                    activation_bytes * tokens * (2.0 * d * static_cast<double>(s.streams) + 2.0 * (qkv_width + o_width));
    out.time = std::max(projections / r.dense + core / r.attention, out.hbm_bytes / r.memory);
    return out;
}

/// Router and experts on a rank: the router scores `router_tokens` over all E experts (FoE's
/// top-(k/H) per group needs the softmax over all of them); the experts process `pairs`
/// (token, expert) pairs with `experts_held` experts, of which those some token of the
/// `routed_tokens` in their dispatch domain picks are read from HBM.
[[nodiscard]] inline ComputeCost moe_cost(const ModelConfig& c, double router_tokens, double pairs, double experts_held,
                                          double routed_tokens, const Rates& r)
{
    const auto d = static_cast<double>(c.hidden_size), f = static_cast<double>(c.intermediate_size);
    const auto e = static_cast<double>(c.num_experts), k = static_cast<double>(c.num_experts_per_tok);
    constexpr double swiglu_matrices = 3.0;  // gate, up, down
    const double router = 2.0 * router_tokens * d * e;
    const double experts = 2.0 * pairs * swiglu_matrices * d * f;
    // Each expert is picked by a token with probability k / E (also in FoE: k/H of E/H).
    const double touched = experts_held * (1.0 - std::pow(1.0 - k / e, routed_tokens));
    ComputeCost out;
    out.flops = router + experts;
    out.hbm_bytes = weight_bytes * (e * d + touched * swiglu_matrices * d * f) +
                    activation_bytes * (router_tokens * d + 2.0 * pairs * d);
    out.time = std::max(router / r.dense + experts / r.expert, out.hbm_bytes / r.memory);
    return out;
}

}  // namespace detail

inline LayerCost layer_cost(const ModelConfig& config, Strategy strategy, const Workload& workload,
                            const Cluster& placement, const HardwareProfile& hardware, const CostOptions& options)
{
    using detail::CommShape;
    config.validate();
    workload.validate();
    hardware.validate();
    placement.validate(hardware);
    const detail::Rates rates = detail::Rates::of(hardware, options.rates);
    const CrossNodeAllReduce across = options.cross_node_all_reduce;

    const index_t g = placement.ranks, r = std::min(placement.ranks_per_node, g);
    const index_t e = config.num_experts, k = config.num_experts_per_tok;
    const auto d = static_cast<double>(config.hidden_size);
    const double token_bytes = d * activation_bytes;

    // Expert parallelism over p = min(G, E) ranks; beyond E ranks, copies of the layer.
    LayerCost out;
    out.strategy = strategy;
    out.overhead = rates.overhead;
    const index_t p = std::min(g, e);
    require<ConfigError>(g % p == 0, "G (", g, ") ranks cannot hold whole copies of the ", e,
                         " experts: with G > E, G must be a multiple of E");
    require<ConfigError>(e % p == 0, "the ", e, " experts do not split evenly over G (", g, ") ranks");
    require<ConfigError>(p % r == 0 || r % p == 0, "a copy of the experts on ", p, " ranks does not tile nodes of R (",
                         r, ") ranks");
    out.expert_parallel_size = p;
    out.replicas = g / p;

    // Sequences are split over the copies; the busiest copy holds ceil(B / copies) of them.
    const index_t seq_len = workload.tokens_per_sequence();
    const index_t replica_sequences = detail::ceil_div(workload.sequences(), out.replicas);
    const auto replica_tokens = static_cast<double>(replica_sequences * seq_len);
    const auto pd = static_cast<double>(p), kd = static_cast<double>(k);
    const double imbalance = hardware.load_imbalance;

    // Tokens per peer and rank that a dispatch sends, for a token choosing k_pool of `pool`
    // experts spread evenly over `members` ranks.
    auto per_peer_fraction = [&](index_t pool, index_t k_pool, index_t members) {
        return options.dispatch == Dispatch::naive
                   ? static_cast<double>(k_pool) / static_cast<double>(members)
                   : detail::hit_probability(pool, pool / members, k_pool);
    };

    if (strategy == Strategy::foe) {
        const index_t h = config.groups(), k_group = config.top_k_per_group();
        if (p <= h) {
            require<ConfigError>(h % p == 0, "FoE on G (", p, ") ranks holds H/G whole groups each, but H (", h,
                                 ") is not a multiple of G");
            const index_t held = h / p;
            out.busiest_tokens = replica_sequences * seq_len;
            out.attention = detail::attention_cost(
                config, {config.q_heads_per_group() * held, config.kv_heads_per_group() * held, held, replica_sequences, seq_len},
                rates);
            out.all_reduce = detail::all_reduce_cost(CommShape::of(p, 1, r), replica_tokens * token_bytes, hardware, across);
            out.all_to_all = detail::all_to_all_cost(CommShape{}, 0.0, hardware);
            const double pairs = replica_tokens * static_cast<double>(k_group * held);
            out.experts = detail::moe_cost(config, replica_tokens, pairs, static_cast<double>(e / p), replica_tokens, rates);
            return out;
        }
        require<ConfigError>(p % h == 0, "FoE on G (", p, ") > H (", h, ") ranks spreads each group over G/H ranks, but G is "
                             "not a multiple of H");
        const index_t m = p / h;
        require<ConfigError>(m % r == 0 || r % m == 0, "an FoE group of G/H = ", m, " ranks does not tile nodes of R (", r,
                             ") ranks");
        const index_t shard_sequences = detail::ceil_div(replica_sequences, m);
        const auto shard_tokens = static_cast<double>(shard_sequences * seq_len), mean_tokens = replica_tokens / static_cast<double>(m);
        out.busiest_tokens = shard_sequences * seq_len;
        out.attention = detail::attention_cost(
            config, {config.q_heads_per_group(), config.kv_heads_per_group(), 1, shard_sequences, seq_len}, rates);
        // The sync communicator: the H ranks with the same shard index, one per group.
        out.all_reduce = detail::all_reduce_cost(CommShape::of(h, m, r), shard_tokens * token_bytes, hardware, across);
        const double bound = std::max(shard_tokens / mean_tokens, imbalance);
        const double per_peer = bound * mean_tokens * per_peer_fraction(config.experts_per_group(), k_group, m) * token_bytes;
        out.all_to_all = detail::all_to_all_cost(CommShape::of(m, 1, r), per_peer, hardware);
        const double pairs = imbalance * replica_tokens * kd / pd;
        out.experts = detail::moe_cost(config, shard_tokens, pairs, static_cast<double>(e / p), replica_tokens, rates);
        return out;
    }

    // The MoE baselines: attention on `attention_ranks` ranks per copy of the heads (1 for data
    // parallel, t for head parallel), then a dispatch over all p ranks in which every rank sends
    // its share of its attention replica's tokens.
    index_t tp = 1;
    if (strategy == Strategy::moe_head_parallel) {
        tp = std::min(p, config.num_key_value_heads);
        require<ConfigError>(config.num_key_value_heads % tp == 0 && p % tp == 0, "head-parallel attention over ",
                             tp, " ranks needs the KV heads (", config.num_key_value_heads, ") and G (", p,
                             ") to be multiples of it");
    }
    const index_t attention_sequences = detail::ceil_div(replica_sequences, p / tp);
    const auto attention_tokens = static_cast<double>(attention_sequences * seq_len);
    out.busiest_tokens = attention_sequences * seq_len;
    out.attention = detail::attention_cost(
        config, {config.num_attention_heads / tp, config.num_key_value_heads / tp, 1, attention_sequences, seq_len}, rates);
    out.all_reduce = detail::all_reduce_cost(CommShape::of(tp, 1, r), attention_tokens * token_bytes, hardware, across);
    const double dispatch_tokens = attention_tokens / static_cast<double>(tp), mean_tokens = replica_tokens / pd;
    const double ep_imbalance = p > 1 ? imbalance : 1.0;
    const double bound = std::max(dispatch_tokens / mean_tokens, ep_imbalance);
    const double per_peer = bound * mean_tokens * per_peer_fraction(e, k, p) * token_bytes;
    out.all_to_all = detail::all_to_all_cost(CommShape::of(p, 1, r), per_peer, hardware);
    const double pairs = ep_imbalance * replica_tokens * kd / pd;
    out.experts = detail::moe_cost(config, dispatch_tokens, pairs, static_cast<double>(e / p), replica_tokens, rates);
    return out;
}

namespace detail {

/// Attention of a rank over some chunks of a step, with `q_heads`/`kv_heads` of the heads and
/// `streams` residual streams: projections of every new token, the causal core against each
/// chunk's context, and (in the memory floor) one read of every chunk's cached K and V.
[[nodiscard]] inline ComputeCost step_attention_cost(const ModelConfig& c, index_t q_heads, index_t kv_heads,
                                                     index_t streams, std::span<const ChunkShape> chunks, const Rates& r)
{
    const auto d = static_cast<double>(c.hidden_size), hd = static_cast<double>(c.head_dim);
    const double qkv_width = static_cast<double>(q_heads + 2 * kv_heads) * hd, o_width = static_cast<double>(q_heads) * hd;
    double tokens = 0.0, pairs = 0.0, kv_positions = 0.0;
    for (const ChunkShape& ch : chunks) {
        const auto l = static_cast<double>(ch.tokens), ctx = static_cast<double>(ch.context);
        tokens += l;
        pairs += l * ctx + l * (l + 1.0) / 2.0;
        kv_positions += ctx + l;
    }
    const double projections = 2.0 * tokens * d * (qkv_width + o_width);
    const double core = 2.0 * 2.0 * pairs * o_width;
    ComputeCost out;
    out.flops = projections + core;
    out.hbm_bytes = weight_bytes * d * (qkv_width + o_width) +
                    activation_bytes * (tokens * (2.0 * d * static_cast<double>(streams) + 2.0 * (qkv_width + o_width)) +
                                        2.0 * static_cast<double>(kv_heads) * hd * kv_positions);
    out.time = std::max(projections / r.dense + core / r.attention, out.hbm_bytes / r.memory);
    return out;
}

}  // namespace detail

inline LayerCost step_cost(const ModelConfig& config, Strategy strategy, std::span<const ChunkShape> chunks,
                           const Cluster& placement, const HardwareProfile& hardware, const CostOptions& options)
{
    using detail::CommShape;
    config.validate();
    hardware.validate();
    placement.validate(hardware);
    require<InvalidArgument>(!chunks.empty(), "a serving step needs at least one chunk");
    for (const ChunkShape& ch : chunks)
        require<InvalidArgument>(ch.context >= 0 && ch.tokens > 0, "a step's chunk has context ", ch.context,
                                 " and ", ch.tokens, " tokens; the context must be >= 0 and the tokens positive");
    const detail::Rates rates = detail::Rates::of(hardware, options.rates);
    const CrossNodeAllReduce across = options.cross_node_all_reduce;
    const index_t g = placement.ranks, r = std::min(placement.ranks_per_node, g);
    const index_t e = config.num_experts, k = config.num_experts_per_tok, h = config.groups();
    require<ConfigError>(g <= e && e % g == 0, "a serving step spreads ", e, " experts over G (", g,
                         ") ranks: G must divide E (replicated experts are not modelled per step)");
    const double token_bytes = static_cast<double>(config.hidden_size) * activation_bytes;
    const double imbalance = hardware.load_imbalance;

    // Which ranks split the chunks (attention groups), and the heads each rank holds.
    index_t shards = 1, q_heads = config.num_attention_heads, kv_heads = config.num_key_value_heads, streams = 1, tp = 1;
    if (strategy == Strategy::foe) {
        if (g <= h) {
            require<ConfigError>(h % g == 0, "FoE on G (", g, ") ranks holds H/G whole groups each, but H (", h,
                                 ") is not a multiple of G");
            streams = h / g;
        } else {
            require<ConfigError>(g % h == 0, "FoE on G (", g, ") > H (", h, ") ranks needs G a multiple of H");
            shards = g / h;
        }
        q_heads = config.q_heads_per_group() * streams;
        kv_heads = config.kv_heads_per_group() * streams;
    } else if (strategy == Strategy::moe_data_parallel) {
        shards = g;
    } else {
        tp = std::min(g, config.num_key_value_heads);
        require<ConfigError>(config.num_key_value_heads % tp == 0 && g % tp == 0, "head-parallel attention over ", tp,
                             " ranks needs the KV heads (", config.num_key_value_heads, ") and G (", g,
                             ") to be multiples of it");
        shards = g / tp;
        q_heads /= tp;
        kv_heads /= tp;
    }

    // Chunk i on shard i mod shards; the busiest shard's attention and tokens.
    std::vector<std::vector<ChunkShape>> by_shard(static_cast<std::size_t>(shards));
    double total = 0.0;
    for (std::size_t i = 0; i < chunks.size(); ++i) {
        by_shard[i % static_cast<std::size_t>(shards)].push_back(chunks[i]);
        total += static_cast<double>(chunks[i].tokens);
    }
    LayerCost out;
    out.strategy = strategy;
    out.overhead = rates.overhead;
    out.expert_parallel_size = g;
    double busiest = 0.0;
    for (const auto& mine : by_shard) {
        if (mine.empty()) continue;
        const ComputeCost a = detail::step_attention_cost(config, q_heads, kv_heads, streams, mine, rates);
        double tokens = 0.0;
        for (const ChunkShape& ch : mine) tokens += static_cast<double>(ch.tokens);
        if (a.time > out.attention.time) out.attention = a;
        busiest = std::max(busiest, tokens);
    }
    out.busiest_tokens = static_cast<index_t>(busiest);
    const double mean = total / static_cast<double>(shards);

    auto per_peer_fraction = [&](index_t pool, index_t k_pool, index_t members) {
        return options.dispatch == Dispatch::naive ? static_cast<double>(k_pool) / static_cast<double>(members)
                                                   : detail::hit_probability(pool, pool / members, k_pool);
    };
    if (strategy == Strategy::foe) {
        const index_t k_group = config.top_k_per_group();
        if (shards == 1) {
            out.all_reduce = detail::all_reduce_cost(CommShape::of(g, 1, r), total * token_bytes, hardware, across);
            out.experts = detail::moe_cost(config, total, total * static_cast<double>(k_group * streams),
                                           static_cast<double>(e / g), total, rates);
            return out;
        }
        const index_t m = shards;
        require<ConfigError>(m % r == 0 || r % m == 0, "an FoE group of G/H = ", m, " ranks does not tile nodes of R (",
                             r, ") ranks");
        out.all_reduce = detail::all_reduce_cost(CommShape::of(h, m, r), busiest * token_bytes, hardware, across);
        const double bound = std::max(busiest / mean, imbalance);
        out.all_to_all = detail::all_to_all_cost(
            CommShape::of(m, 1, r), bound * mean * per_peer_fraction(config.experts_per_group(), k_group, m) * token_bytes,
            hardware);
        out.experts = detail::moe_cost(config, busiest, imbalance * total * static_cast<double>(k) / static_cast<double>(g),
                                       static_cast<double>(e / g), total, rates);
        return out;
    }
    // MoE: head-parallel attention all-reduces its tokens among the tp ranks of its shard; then
    // every rank dispatches its share of its shard's tokens over all G ranks.
    out.all_reduce = detail::all_reduce_cost(CommShape::of(tp, 1, r), busiest * token_bytes, hardware, across);
    const double dispatch_tokens = busiest / static_cast<double>(tp), mean_dispatch = total / static_cast<double>(g);
    const double ep_imbalance = g > 1 ? imbalance : 1.0;
    const double bound = std::max(dispatch_tokens / mean_dispatch, ep_imbalance);
    out.all_to_all = detail::all_to_all_cost(CommShape::of(g, 1, r),
                                             bound * mean_dispatch * per_peer_fraction(e, k, g) * token_bytes, hardware);
    out.experts = detail::moe_cost(config, dispatch_tokens, ep_imbalance * total * static_cast<double>(k) / static_cast<double>(g),
                                   static_cast<double>(e / g), total, rates);
    return out;
}

namespace paper {

inline Table4 table4(index_t k, index_t groups, index_t ranks, index_t nodes, double r)
{
    require<InvalidArgument>(k > 0 && groups > 0 && ranks > 0 && nodes > 0, "Table 4 needs positive k (", k, "), H (",
                             groups, "), G (", ranks, ") and N (", nodes, ")");
    require<InvalidArgument>(ranks % nodes == 0, "G (", ranks, ") is not a multiple of N (", nodes, ")");
    require<InvalidArgument>(std::isfinite(r) && r > 0.0, "r = B_intra/B_inter (", r, ") must be positive");
    const auto kd = static_cast<double>(k), g = static_cast<double>(ranks), n = static_cast<double>(nodes);
    const auto hm = static_cast<double>(std::min(ranks, groups));
    const double moe_volume = 2.0 * kd * (g - 1.0) / g;                                     // V_A2A_moe
    const double foe_a2a = 2.0 * kd * static_cast<double>(std::max(ranks - groups, index_t{0})) / g;  // V_A2A_foe
    const double foe_ar = 2.0 * (hm - 1.0) / hm;                                            // V_AR_foe
    Table4 t;
    t.moe_intra = moe_volume / n;
    t.moe_inter = moe_volume * (n - 1.0) / n;
    t.moe_time = t.moe_intra + r * t.moe_inter;
    t.foe_intra = foe_a2a + foe_ar / n;
    t.foe_inter = foe_ar * (n - 1.0) / n;
    t.foe_time = t.foe_intra + r * t.foe_inter;
    return t;
}

inline double asymptote(index_t k, index_t groups, double r)
{
    require<InvalidArgument>(k > 0 && groups > 0 && std::isfinite(r) && r > 0.0, "the asymptote needs positive k (", k,
                             "), H (", groups, ") and r (", r, ")");
    const auto kh = static_cast<double>(k * groups);
    return kh * r / (kh + r * static_cast<double>(groups - 1));
}

}  // namespace paper

}  // namespace foe::perf
