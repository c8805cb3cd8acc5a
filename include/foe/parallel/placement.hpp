#pragma once
// Placement: which groups, experts and sequences each of G ranks holds, and which ranks its
// sub-communicators join (DESIGN.md 2).
//
// FoE, G <= H (H % G == 0): rank p holds groups [p H/G, (p+1) H/G) with all their experts and
//   every token. Sync communicator: all G ranks. No all-to-all.
// FoE, G > H (G % H == 0, m = G/H ranks per group, a group never spans two nodes): rank p is
//   group p / m, shard p % m; shard j of every group holds the same sequences (the batch is
//   split over the m shards). Its E/G experts are [group E/H + shard E/G, + E/G). Sync
//   communicator: the H ranks with the same shard, in group order. Group communicator: the m
//   ranks of the group, in shard order (expert dispatch stays inside it, so inside a node).
// MoE baselines: E/G experts per rank over all G ranks; data-parallel attention (each rank its
//   own sequences) or head-parallel attention (each rank its share of the KV heads).
//
// Ranks are numbered node by node: rank p is on node p / R.

#include <string>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"

namespace foe::parallel {

/// How a model is spread over ranks.
enum class Strategy : std::uint8_t {
    foe,               ///< FoE groups on ranks (needs an FoE config; G <= H or G > H)
    moe_data_parallel, ///< standard MoE: data-parallel attention + expert parallelism over all ranks
    moe_head_parallel, ///< standard MoE: head-parallel attention (all-reduce) + expert parallelism
};

[[nodiscard]] constexpr std::string_view to_string(Strategy s) noexcept
{
    switch (s) {
    case Strategy::foe: return "FoE";
    case Strategy::moe_data_parallel: return "MoE (DP attention + EP)";
    case Strategy::moe_head_parallel: return "MoE (TP attention + EP)";
    }
    return "?";
}

struct Placement {
    Strategy strategy = Strategy::foe;
    int ranks = 1;           ///< G
    int ranks_per_node = 1;  ///< R
    int rank = 0;
    index_t group_begin = 0, group_end = 1;    ///< FoE groups held (MoE: [0, 1))
    index_t expert_begin = 0, expert_end = 0;  ///< experts held
    int shard = 0, shards = 1;  ///< FoE G > H: which of the m sequence shards; MoE DP: rank of G
    index_t head_part = 0, head_parts = 1;     ///< MoE TP: this rank's share of the KV heads

    [[nodiscard]] int node() const noexcept { return rank / ranks_per_node; }
    [[nodiscard]] int node_of(int r) const noexcept { return r / ranks_per_node; }

    /// World ranks of the residual-sync communicator (FoE) in member order, and this rank's color.
    [[nodiscard]] std::vector<int> sync_members() const;
    /// World ranks of the expert-dispatch communicator in member order: the group's ranks (FoE
    /// G > H), this rank alone (FoE G <= H), every rank (MoE).
    [[nodiscard]] std::vector<int> expert_members() const;
    /// The nodes of a list of world ranks (for CountingComm's link classes).
    [[nodiscard]] std::vector<int> nodes_of(const std::vector<int>& members) const
    {
        std::vector<int> n;
        for (int r : members) n.push_back(node_of(r));
        return n;
    }
    /// One line for logs and digests: "FoE G=8 R=8 rank 3: groups [3, 4), experts [24, 32), shard 0/1".
    [[nodiscard]] std::string describe() const;

    /// Places rank `rank` of G ranks (R per node) for `strategy`; throws ConfigError saying why
    /// an impossible layout is impossible and what would work.
    [[nodiscard]] static Placement make(Strategy strategy, const ModelConfig& config, int ranks, int ranks_per_node,
                                        int rank);
};

// ---------------------------------------------------------------------------------------------

namespace detail {

inline std::string divisors_up_to(index_t n)
{
    std::string s;
    for (index_t d = 1; d <= n; ++d)
        if (n % d == 0) s += (s.empty() ? "" : ", ") + std::to_string(d);
    return s;
}

}  // namespace detail

inline Placement Placement::make(Strategy strategy, const ModelConfig& config, int ranks, int ranks_per_node, int rank)
{
    config.validate();
    require<ConfigError>(ranks > 0, "the number of ranks G (", ranks, ") must be positive");
    require<ConfigError>(ranks_per_node > 0, "ranks per node R (", ranks_per_node, ") must be positive");
    require<ConfigError>(0 <= rank && rank < ranks, "rank ", rank, " is outside [0, ", ranks, ")");
    require<ConfigError>(ranks <= ranks_per_node || ranks % ranks_per_node == 0, "G (", ranks,
                         ") ranks do not fill whole nodes of R (", ranks_per_node, ") ranks");

    Placement p;
    p.strategy = strategy;
    p.ranks = ranks;
    p.ranks_per_node = ranks_per_node;
    p.rank = rank;
    const index_t g = ranks, e = config.num_experts;

    if (strategy != Strategy::foe) {
        require<ConfigError>(config.groups() == 1, "the standard-MoE baselines need a config with one expert group, got ",
                             config.groups(), " (", to_string(config.architecture), ")");
        require<ConfigError>(e >= g, "the MoE baseline spreads ", e, " experts over ", g,
                             " ranks: every rank needs at least one expert (use G <= ", e, ")");
        require<ConfigError>(e % g == 0, "the MoE baseline spreads ", e, " experts over ", g,
                             " ranks unevenly; use G in {", detail::divisors_up_to(e), "}");
        p.expert_begin = rank * (e / g);
        p.expert_end = p.expert_begin + e / g;
        if (strategy == Strategy::moe_data_parallel) {
            p.shard = rank;
            p.shards = ranks;
        } else {
            const index_t kv = config.num_key_value_heads;
            require<ConfigError>(kv % g == 0, "head-parallel attention splits ", kv, " KV heads over ", g,
                                 " ranks unevenly; use G in {", detail::divisors_up_to(kv), "}");
            require<ConfigError>(config.qk_norm != QkNorm::full_width || g == 1,
                                 "head-parallel attention cannot apply a full-width q/k norm (OLMoE's) to a share of "
                                 "the heads; use a config with qk_norm per_head or none for G > 1");
            p.head_part = rank;
            p.head_parts = g;
        }
        return p;
    }

    require<ConfigError>(config.architecture == Architecture::foe, "FoE placement needs an FoeForCausalLM config");
    const index_t h = config.groups();
    if (g <= h) {
        require<ConfigError>(h % g == 0, "with G <= H every rank holds H/G whole groups, but H (", h,
                             ") is not a multiple of G (", g, "); use G in {", detail::divisors_up_to(h), "}");
        p.group_begin = rank * (h / g);
        p.group_end = p.group_begin + h / g;
        p.expert_begin = p.group_begin * config.experts_per_group();
        p.expert_end = p.group_end * config.experts_per_group();
        return p;
    }
    require<ConfigError>(g % h == 0, "with G > H every group spans G/H ranks, but G (", g,
                         ") is not a multiple of H (", h, "); use G in {", h, ", ", 2 * h, ", ", 4 * h, ", ...}");
    const index_t m = g / h, per_group = config.experts_per_group();
    require<ConfigError>(per_group >= m, "a group has ", per_group, " experts but would span ", m,
                         " ranks (G/H): every rank needs at least one expert; use G <= ", per_group * h);
    require<ConfigError>(per_group % m == 0, "a group's ", per_group, " experts do not split evenly over its ", m,
                         " ranks (G/H)");
    for (index_t group = 0; group < h; ++group) {
        const index_t first = group * m, last = first + m - 1;
        require<ConfigError>(first / ranks_per_node == last / ranks_per_node, "group ", group, " would span ranks ",
                             first, "..", last, " on nodes ", first / ranks_per_node, " and ", last / ranks_per_node,
                             " (R = ", ranks_per_node, " ranks per node); a group must stay inside one node: use R a "
                             "multiple of G/H = ", m);
    }
    p.group_begin = rank / m;
    p.group_end = p.group_begin + 1;
    p.shard = static_cast<int>(rank % m);
    p.shards = static_cast<int>(m);
    p.expert_begin = p.group_begin * per_group + p.shard * (per_group / m);
    p.expert_end = p.expert_begin + per_group / m;
    return p;
}

inline std::vector<int> Placement::sync_members() const
{
    std::vector<int> members;
    if (strategy != Strategy::foe) return {rank};
    for (int r = 0; r < ranks; ++r)
        if (r % shards == shard) members.push_back(r);
    return members;
}

inline std::vector<int> Placement::expert_members() const
{
    std::vector<int> members;
    if (strategy != Strategy::foe) {
        for (int r = 0; r < ranks; ++r) members.push_back(r);
    } else {
        const int first = static_cast<int>(group_begin) * shards;
        for (int s = 0; s < shards; ++s) members.push_back(shards > 1 ? first + s : rank);
    }
    return members;
}

inline std::string Placement::describe() const
{
    return foe::detail::concat(to_string(strategy), " G=", ranks, " R=", ranks_per_node, " rank ", rank, " (node ",
                               node(), "): groups [", group_begin, ", ", group_end, "), experts [", expert_begin, ", ",
                               expert_end, "), sequence shard ", shard, "/", shards, ", heads part ", head_part, "/",
                               head_parts);
}

}  // namespace foe::parallel
