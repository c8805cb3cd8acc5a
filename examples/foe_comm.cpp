// foe_comm: measured communication of one layer, FoE against the standard-MoE baselines with
// naive and deduplicated expert dispatch, on the ranks of an mpirun, next to the formulas of
// DESIGN.md 2.1 and the bytes the routing actually made implies.
//
//   mpirun -np G foe_comm [--config foe-1b] [--tokens 2048] [--ranks-per-node R] [--json]
//
// One global batch of S tokens (G sequences of S/G tokens) goes through one layer of the named
// config in each architecture:
//   FoE                     groups on ranks (G <= H: all ranks see all tokens; G > H: a group's
//                           m = G/H ranks split the sequences and its experts), its all-reduce a
//                           flat ring, and again hierarchical (reduce-scatter in the node,
//                           all-reduce across nodes, all-gather in the node)
//   MoE (DP attention + EP) sequences split over the G ranks, experts E/G per rank
//   MoE (TP attention + EP) heads split over the ranks, then tokens split for the experts
// and each MoE baseline with naive dispatch (one row per (token, expert)) and deduplicated
// dispatch (one row per (token, rank), expanded at the receiver).
// The MoE baselines use the same sizes with one expert group and per-head QK-norm (head-parallel
// attention cannot apply OLMoE's full-width norm to a share of the heads).
// Bytes are what each rank's CountingComm recorded (mean and max over ranks), fp32 on the host:
// the formulas use b = 4 bytes too; a bf16 device backend sends half of every number. The
// "routing" column is exact: the bytes the rows each rank sent and received imply, headers and
// row counts included; it must equal the measured mean.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "foe/comm/mpi_comm.hpp"
#include "foe/io/json.hpp"
#include "foe/model/distributed.hpp"

namespace {

using foe::index_t;
using foe::comm::Op;
using foe::parallel::Dispatch;
using foe::parallel::Strategy;

struct Options {
    std::string config = "foe-1b";
    index_t tokens = 2048;
    int ranks_per_node = 0;  // 0: all ranks on one node
    bool json = false;
};

/// One architecture of the comparison: a placement and how its collectives run.
struct Variant {
    Strategy strategy;
    Dispatch dispatch;
    bool hierarchical;  ///< FoE's all-reduce: reduce-scatter / all-reduce across nodes / all-gather

    [[nodiscard]] std::string name() const
    {
        if (strategy == Strategy::foe) return hierarchical ? "FoE, hierarchical AR" : "FoE, ring AR";
        return foe::detail::concat(strategy == Strategy::moe_data_parallel ? "MoE DP+EP, " : "MoE TP+EP, ",
                                   foe::parallel::to_string(dispatch));
    }
};

/// One row of the report: an operation and link class of one architecture, over all ranks.
struct Row {
    std::string op;
    double intra_mean = 0, intra_max = 0, inter_mean = 0, inter_max = 0;
    double routing = -1;  ///< bytes per rank the routing made implies (mean), or -1 when not derived
    double formula = -1;  ///< bytes per rank by DESIGN.md 2.1 (b = 4), or -1 when none applies
    std::string formula_text;
};

struct Report {
    std::string architecture;
    std::string skipped;  ///< why this architecture cannot run on this layout (empty: it ran)
    std::vector<Row> rows;
};

double binomial_ratio(index_t e, index_t per_rank, index_t k)
{
    // C(E - E/G, k) / C(E, k): the chance that a rank holds none of a token's k experts.
    double r = 1.0;
    for (index_t i = 0; i < k; ++i) r *= static_cast<double>(e - per_rank - i) / static_cast<double>(e - i);
    return std::max(0.0, r);
}

/// Bytes this rank's expert all-to-all sends by the routing it made and the rows the others
/// sent it: row counts, dispatched rows (header + d floats) and returned rows (d floats), to
/// every member but itself. Collective over `world` (every rank calls it).
double routed_bytes(foe::comm::MpiComm& world, const foe::parallel::Placement& p, const foe::routing::RoutingResult& r,
                    Dispatch dispatch, index_t d)
{
    const std::vector<int> members = p.expert_members();
    const auto n = static_cast<int>(members.size());
    const int g = world.size();
    const index_t per_member = p.expert_end - p.expert_begin;
    const index_t first = p.strategy == Strategy::foe ? p.group_begin * (per_member * p.shards) : 0;
    const foe::parallel::ExpertOwners owners{first, per_member, n};
    foe::parallel::DispatchPlan plan;
    std::vector<float> rows_to(static_cast<std::size_t>(g), 0.0f), all(static_cast<std::size_t>(g * g));
    if (n > 1) {
        foe::parallel::plan_dispatch(r, owners, dispatch, plan);
        for (int j = 0; j < n; ++j) rows_to[static_cast<std::size_t>(members[static_cast<std::size_t>(j)])] =
            static_cast<float>(plan.rows_to[static_cast<std::size_t>(j)]);
    }
    world.all_gather(rows_to, all);
    if (n <= 1) return 0.0;
    const double header = static_cast<double>(foe::parallel::header_floats(dispatch, r.slots_per_token, per_member));
    const auto me = static_cast<std::size_t>(world.rank());
    double bytes = 4.0 * (n - 1);  // one row count per other member
    for (int peer : members) {
        if (peer == world.rank()) continue;
        const auto q = static_cast<std::size_t>(peer);
        bytes += 4.0 * (header + static_cast<double>(d)) * all[me * static_cast<std::size_t>(g) + q];  // dispatch
        bytes += 4.0 * static_cast<double>(d) * all[q * static_cast<std::size_t>(g) + me];           // results back
    }
    return bytes;
}

/// Runs one prefill of the global batch through one layer and gathers every rank's counts.
Report measure(foe::comm::MpiComm world, const Variant& v, const foe::ModelConfig& config, const Options& o)
{
    const Strategy strategy = v.strategy;
    Report report{v.name(), "", {}};
    const int g = world.size(), r = o.ranks_per_node > 0 ? o.ranks_per_node : g;
    foe::parallel::Placement placement;
    try {
        placement = foe::parallel::Placement::make(strategy, config, g, r, world.rank());
    } catch (const foe::ConfigError& e) {
        report.skipped = e.what();  // the same on every rank: every rank skips
        return report;
    }
    // G sequences of S/G tokens; this rank runs all of them or its shard.
    const index_t sequences = g, length = o.tokens / g;
    const bool split = strategy == Strategy::moe_data_parallel || (strategy == Strategy::foe && placement.shards > 1);
    const auto mine = split ? foe::shard_of(sequences, placement.shard, placement.shards) : foe::SequenceRange{0, sequences};
    std::vector<foe::SequenceChunk> chunks;
    for (index_t s = 0; s < mine.count; ++s) chunks.push_back({s, 0, length});
    const foe::Batch batch(chunks);
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(batch.tokens()));
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<std::int32_t>((i * 7 + 3) % 256);
    foe::ModelOptions options;
    options.cache_slots = std::max<index_t>(1, mine.count);
    options.cache_capacity = length;
    const auto weights = std::make_shared<const foe::ModelWeights>(
        foe::random_weights(config, 1, foe::held_tensors(placement)));
    auto dm = foe::make_distributed_model(world, placement, weights, options, {v.dispatch, v.hierarchical});
    (void)dm.model->forward(batch, tokens);
    const double routed = routed_bytes(world, placement, dm.model->last_routing(0), v.dispatch, config.hidden_size);

    // Gather [intra, inter] of each op of the sync and expert communicators from every rank.
    struct Source {
        const char* name;
        const foe::comm::CountingComm<foe::comm::MpiComm>* comm;
        Op op;
    };
    const std::vector<Source> sources =
        v.hierarchical ? std::vector<Source>{{"reduce_scatter", &dm.sync_node, Op::all_to_all_v},
                                             {"all_reduce", &dm.sync_cross, Op::all_reduce_sum},
                                             {"all_gather", &dm.sync_node, Op::all_gather},
                                             {"all_to_all", &dm.experts, Op::all_to_all_v}}
                       : std::vector<Source>{{"all_reduce", &dm.sync, Op::all_reduce_sum},
                                             {"all_to_all", &dm.experts, Op::all_to_all_v},
                                             {"all_gather", &dm.sync, Op::all_gather}};
    std::vector<float> mine_counts;
    for (const auto& s : sources) {
        mine_counts.push_back(static_cast<float>(s.comm->counts(s.op).intra_node_bytes));
        mine_counts.push_back(static_cast<float>(s.comm->counts(s.op).inter_node_bytes));
    }
    mine_counts.push_back(static_cast<float>(routed));
    std::vector<float> all(mine_counts.size() * static_cast<std::size_t>(g));
    world.all_gather(mine_counts, all);

    const double s_tokens = static_cast<double>(o.tokens), d = static_cast<double>(config.hidden_size), b = 4.0;
    const double k = static_cast<double>(config.num_experts_per_tok), gg = g;
    for (std::size_t i = 0; i < sources.size(); ++i) {
        Row row;
        row.op = sources[i].name;
        for (int rank = 0; rank < g; ++rank) {
            const double intra = all[static_cast<std::size_t>(rank) * mine_counts.size() + 2 * i];
            const double inter = all[static_cast<std::size_t>(rank) * mine_counts.size() + 2 * i + 1];
            row.intra_mean += intra / gg;
            row.inter_mean += inter / gg;
            row.intra_max = std::max(row.intra_max, intra);
            row.inter_max = std::max(row.inter_max, inter);
            if (row.op == "all_to_all") row.routing = std::max(0.0, row.routing) + all[(rank + 1) * mine_counts.size() - 1] / gg;
        }
        if (row.intra_max + row.inter_max == 0 && row.op == "all_gather") continue;
        if (strategy == Strategy::foe) {
            const double h = static_cast<double>(config.groups()), m = placement.shards;
            const double members = std::min(gg, h), n = (s_tokens / m) * d * b;
            const double per_node = static_cast<double>(dm.sync_node.size()), nodes = members / std::max(1.0, per_node);
            if (row.op == "all_reduce" && !v.hierarchical) {
                row.formula = 2.0 * (members - 1.0) / members * n;
                row.formula_text = "2 (min(G,H)-1)/min(G,H) (S/m) d b";
            } else if (row.op == "reduce_scatter") {
                row.formula = (per_node - 1.0) / per_node * n;
                row.formula_text = "(L-1)/L (S/m) d b, L sync ranks per node";
            } else if (row.op == "all_reduce") {
                row.formula = 2.0 * (nodes - 1.0) / nodes * n / per_node;
                row.formula_text = "2 (N-1)/N (S/m) d b / L across N nodes";
            } else if (row.op == "all_gather") {
                row.formula = (per_node - 1.0) * std::ceil(n / b / per_node) * b;
                row.formula_text = "(L-1) ceil((S/m) d / L) b";
            } else if (row.op == "all_to_all") {
                row.formula = 2.0 * (s_tokens / m) * (k / h) * (m - 1.0) / m * d * b;
                row.formula_text = "2 (S/m) (k/H) (m-1)/m d b";
            }
        } else {
            if (row.op == "all_to_all" && v.dispatch == Dispatch::naive) {
                row.formula = 2.0 * (s_tokens / gg) * k * (gg - 1.0) / gg * d * b;
                row.formula_text = "2 (S/G) k (G-1)/G d b";
            } else if (row.op == "all_to_all") {
                row.formula = 2.0 * (s_tokens / gg) * (gg - 1.0) *
                              (1.0 - binomial_ratio(config.num_experts, config.num_experts / g, config.num_experts_per_tok)) *
                              d * b;
                row.formula_text = "2 (S/G) (G-1) (1 - C(E-E/G,k)/C(E,k)) d b";
            } else if (row.op == "all_reduce" && strategy == Strategy::moe_head_parallel) {
                row.formula = 2.0 * (gg - 1.0) / gg * s_tokens * d * b;
                row.formula_text = "2 (G-1)/G S d b";
            } else if (row.op == "all_gather") {
                row.formula = (gg - 1.0) * std::ceil(s_tokens / gg) * d * b;
                row.formula_text = "(G-1) (S/G) d b";
            }
        }
        if (row.op == "all_reduce" && strategy == Strategy::moe_data_parallel) continue;  // it has none
        report.rows.push_back(row);
    }
    return report;
}

Options parse(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw foe::InvalidArgument(foe::detail::concat(a, " needs a value"));
            return argv[++i];
        };
        if (a == "--config") o.config = value();
        else if (a == "--tokens") o.tokens = std::stoll(value());
        else if (a == "--ranks-per-node") o.ranks_per_node = std::stoi(value());
        else if (a == "--json") o.json = true;
        else if (a == "--help" || a == "-h") {
            std::puts("usage: mpirun -np G foe_comm [--config foe-1b] [--tokens 2048] [--ranks-per-node R] [--json]");
            std::exit(0);
        } else throw foe::InvalidArgument(foe::detail::concat("unknown option ", a, " (see --help)"));
    }
    return o;
}

void print_table(const std::vector<Report>& reports, const Options& o, int g, int r)
{
    std::printf("foe_comm: %s, one layer, S = %lld tokens (%d sequences), G = %d ranks, R = %d per node\n",
                o.config.c_str(), static_cast<long long>(o.tokens), g, g, r);
    std::printf("bytes sent per rank per layer (fp32, b = 4; bf16 halves them), MB = 1e6 bytes; 'routing': exact bytes\n"
                "the rows each rank sent imply (equals the measured mean); 'formula': balanced routing, d floats per row\n\n");
    std::printf("%-22s %-14s %10s %10s %10s %10s %9s %9s  %s\n", "architecture", "operation", "intra mean", "intra max",
                "inter mean", "inter max", "routing", "formula", "formula (DESIGN.md 2.1)");
    for (const auto& rep : reports) {
        if (!rep.skipped.empty()) {
            std::printf("%-22s skipped: %s\n", rep.architecture.c_str(), rep.skipped.c_str());
            continue;
        }
        for (const auto& row : rep.rows) {
            char formula[32] = "-", routing[32] = "-";
            if (row.formula >= 0) std::snprintf(formula, sizeof formula, "%.3f", row.formula / 1e6);
            if (row.routing >= 0) std::snprintf(routing, sizeof routing, "%.3f", row.routing / 1e6);
            std::printf("%-22s %-14s %10.3f %10.3f %10.3f %10.3f %9s %9s  %s\n", rep.architecture.c_str(), row.op.c_str(),
                        row.intra_mean / 1e6, row.intra_max / 1e6, row.inter_mean / 1e6, row.inter_max / 1e6, routing,
                        formula, row.formula_text.c_str());
        }
        double total = 0, inter_max = 0;
        for (const auto& row : rep.rows) {
            total += row.intra_mean + row.inter_mean;
            inter_max += row.inter_max;
        }
        std::printf("%-22s %-14s %10.3f MB per rank in all; inter-node, the busiest rank of each op: %.3f MB\n\n",
                    rep.architecture.c_str(), "total", total / 1e6, inter_max / 1e6);
    }
}

void print_json(const std::vector<Report>& reports, const Options& o, int g, int r)
{
    foe::json::Value root{foe::json::Object{}};
    root.set("config", o.config).set("tokens", o.tokens).set("ranks", g).set("ranks_per_node", r).set("bytes_per_element", 4);
    foe::json::Value archs{foe::json::Array{}};
    for (const auto& rep : reports) {
        foe::json::Value a{foe::json::Object{}};
        a.set("architecture", rep.architecture);
        if (!rep.skipped.empty()) a.set("skipped", rep.skipped);
        foe::json::Value ops{foe::json::Array{}};
        for (const auto& row : rep.rows) {
            foe::json::Value v{foe::json::Object{}};
            v.set("operation", row.op)
                .set("intra_node_bytes_mean", row.intra_mean)
                .set("intra_node_bytes_max", row.intra_max)
                .set("inter_node_bytes_mean", row.inter_mean)
                .set("inter_node_bytes_max", row.inter_max);
            if (row.formula >= 0) v.set("formula_bytes", row.formula).set("formula", row.formula_text);
            if (row.routing >= 0) v.set("routing_bytes", row.routing);
            ops.push_back(v);
        }
        a.set("operations", ops);
        archs.push_back(a);
    }
    root.set("architectures", archs);
    std::cout << foe::json::dump(root) << "\n";
}

}  // namespace

int main(int argc, char** argv)
{
    foe::comm::MpiSession session(&argc, &argv);
    auto world = foe::comm::MpiComm::world();
    const bool root = world.rank() == 0;
    try {
        const Options o = parse(argc, argv);
        const int g = world.size(), r = o.ranks_per_node > 0 ? o.ranks_per_node : g;
        if (o.tokens <= 0 || o.tokens % g != 0)
            throw foe::InvalidArgument(foe::detail::concat("--tokens (", o.tokens, ") must be a positive multiple of the ", g, " ranks"));
        // One layer; a small vocabulary keeps the embedding and LM head (not measured) cheap.
        foe::ModelConfig foe_config = foe::named_config(o.config);
        foe_config.num_hidden_layers = 1;
        foe_config.vocab_size = 256;
        foe_config.max_position_embeddings = std::max(foe_config.max_position_embeddings, o.tokens);
        foe::ModelConfig moe_config = foe_config;
        moe_config.architecture = foe::Architecture::foe;
        moe_config.num_expert_groups = 1;
        moe_config.qk_norm = foe::QkNorm::per_head;
        if (foe_config.architecture != foe::Architecture::foe)
            throw foe::InvalidArgument("--config must name an FoE configuration (foe-1b, foe-7b, foe-small, foe-tiny)");

        std::vector<Report> reports;
        const std::vector<Variant> variants{{Strategy::foe, Dispatch::naive, false},
                                            {Strategy::foe, Dispatch::naive, true},
                                            {Strategy::moe_data_parallel, Dispatch::naive, false},
                                            {Strategy::moe_data_parallel, Dispatch::dedup, false},
                                            {Strategy::moe_head_parallel, Dispatch::naive, false},
                                            {Strategy::moe_head_parallel, Dispatch::dedup, false}};
        for (const Variant& v : variants) {
            if (root && !o.json) std::fprintf(stderr, "foe_comm: running %s ...\n", v.name().c_str());
            reports.push_back(measure(world, v, v.strategy == Strategy::foe ? foe_config : moe_config, o));
        }
        if (root) (o.json ? print_json : print_table)(reports, o, g, r);
        // The routing column is exact by construction: a difference is a bug in the dispatch or
        // in the counting, and fails the run (CI runs foe_comm under mpirun).
        for (const auto& rep : reports)
            for (const auto& row : rep.rows)
                if (row.routing >= 0 && std::abs(row.routing - row.intra_mean - row.inter_mean) > 0.5) {
                    if (root) std::fprintf(stderr, "foe_comm: error: %s %s measured %.1f bytes per rank, the routing implies %.1f\n",
                                           rep.architecture.c_str(), row.op.c_str(), row.intra_mean + row.inter_mean, row.routing);
                    return 1;
                }
        return 0;
    } catch (const std::exception& e) {
        if (root) std::fprintf(stderr, "foe_comm: error: %s\n", e.what());
        return 1;
    }
}
