#pragma once
// The host side of `foe_gpus --compare` (examples/foe_gpus.cu): its options, the batches of the
// token sweep, the timing statistics, the Table-9-shaped table and the JSON. Plain C++, no CUDA,
// so tests/cuda/test_gpus_compare.cpp checks it on any machine.
//
// The sweep's batch of S tokens over G ranks: n = min(G, S) sequences, sequence i of
// S / n + (i < S % n ? 1 : 0) tokens (G sequences of S/G tokens when G divides S, as foe_comm
// makes them). FoE (G <= H) runs every sequence on every rank; the data-parallel MoE runs
// sequence p on rank p (ranks p >= n run an empty batch and serve the others' experts).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/io/json.hpp"
#include "foe/layer/batch.hpp"

namespace foe_gpus {

using foe::index_t;

/// `foe_gpus --compare ...`.
struct CompareOptions {
    std::string config = "foe-1b";
    /// Table 9's batch sizes (tokens per forward over all ranks).
    std::vector<index_t> tokens{1, 2, 8, 128, 512, 1024, 2048, 4096, 8192, 12288, 16384, 20480, 24576};
    int ranks_per_node = 0;  ///< 0: OMPI_COMM_WORLD_LOCAL_SIZE, else every rank on one node
    std::string json;        ///< file to write; empty: none
    int warmup = 2;          ///< untimed forwards per token count and architecture
    int repeats = 5;         ///< timed forwards; the median is reported
    bool allow_shared_gpus = false;  ///< let ranks share a GPU (timings then mean little)
    bool help = false;       ///< --help: print compare_usage and stop
    index_t layers = 0;      ///< 0: the config's; else fewer layers (a quicker sweep)
};

inline constexpr std::string_view compare_usage =
    "usage: mpirun -np G foe_gpus --compare [--config foe-1b] [--tokens 1,128,2048,...,24576]\n"
    "           [--ranks-per-node R] [--json FILE] [--warmup 2] [--repeats 5] [--layers L]\n"
    "           [--allow-shared-gpus]";

/// "1,128,2048" -> {1, 128, 2048}; InvalidArgument for an empty item, a non-number, or a value
/// below `least`.
inline std::vector<index_t> parse_list(std::string_view text, std::string_view flag, index_t least)
{
    std::vector<index_t> out;
    std::size_t begin = 0;
    while (begin <= text.size()) {
        const std::size_t comma = std::min(text.find(',', begin), text.size());
        const std::string item(text.substr(begin, comma - begin));
        std::size_t used = 0;
        long long v = 0;
        try {
            v = std::stoll(item, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        foe::require<foe::InvalidArgument>(!item.empty() && used == item.size() && v >= least, flag, ": \"", item,
                                           "\" is not an integer >= ", least, " (in \"", text, "\")");
        out.push_back(static_cast<index_t>(v));
        begin = comma + 1;
    }
    return out;
}

/// Parses the arguments after the program name (one of them "--compare").
inline CompareOptions parse_compare(const std::vector<std::string>& args)
{
    CompareOptions o;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view a = args[i];
        auto value = [&]() -> std::string_view {
            foe::require<foe::InvalidArgument>(i + 1 < args.size(), a, " needs a value\n", compare_usage);
            return args[++i];
        };
        auto number = [&](index_t least) { return parse_list(value(), a, least).at(0); };
        if (a == "--compare") continue;
        if (a == "--config") o.config = std::string(value());
        else if (a == "--tokens") o.tokens = parse_list(value(), a, 1);
        else if (a == "--ranks-per-node") o.ranks_per_node = static_cast<int>(number(1));
        else if (a == "--json") o.json = std::string(value());
        else if (a == "--warmup") o.warmup = static_cast<int>(number(0));
        else if (a == "--repeats") o.repeats = static_cast<int>(number(1));
        else if (a == "--layers") o.layers = number(1);
        else if (a == "--allow-shared-gpus") o.allow_shared_gpus = true;
        else if (a == "--help" || a == "-h") o.help = true;
        else foe::raise<foe::InvalidArgument>("unknown option ", a, "\n", compare_usage);
    }
    return o;
}

/// Token counts of the sweep's sequences for S tokens over G ranks (see the file comment).
inline std::vector<index_t> sequence_lengths(index_t tokens, int ranks)
{
    foe::require<foe::InvalidArgument>(tokens > 0 && ranks > 0, "sequence_lengths: ", tokens, " tokens over ", ranks,
                                       " ranks");
    const index_t n = std::min<index_t>(ranks, tokens);
    std::vector<index_t> lengths(static_cast<std::size_t>(n), tokens / n);
    for (index_t i = 0; i < tokens % n; ++i) ++lengths[static_cast<std::size_t>(i)];
    return lengths;
}

/// The batch rank `rank` runs: every sequence (all_sequences, FoE G <= H), slot i for sequence
/// i; or its own sequence alone in slot 0 (data-parallel), empty when it has none.
inline foe::Batch rank_batch(index_t tokens, int ranks, int rank, bool all_sequences)
{
    const auto lengths = sequence_lengths(tokens, ranks);
    std::vector<foe::SequenceChunk> chunks;
    if (all_sequences) {
        for (std::size_t i = 0; i < lengths.size(); ++i) chunks.push_back({static_cast<index_t>(i), 0, lengths[i]});
    } else if (static_cast<std::size_t>(rank) < lengths.size()) {
        chunks.push_back({0, 0, lengths[static_cast<std::size_t>(rank)]});
    }
    return foe::Batch(chunks);
}

/// The longest sequence of any token count of the sweep (the KV caches' capacity).
inline index_t longest_sequence(const std::vector<index_t>& sweep, int ranks)
{
    index_t longest = 0;
    for (index_t s : sweep) longest = std::max(longest, sequence_lengths(s, ranks).front());
    return longest;
}

/// Token ids of a batch: deterministic, inside the vocabulary.
inline std::vector<std::int32_t> token_ids(index_t count, index_t vocab, int rank)
{
    std::vector<std::int32_t> ids(static_cast<std::size_t>(count));
    for (std::size_t i = 0; i < ids.size(); ++i)
        ids[i] = static_cast<std::int32_t>((i * 7919 + static_cast<std::size_t>(rank) * 104729 + 3) %
                                           static_cast<std::size_t>(vocab));
    return ids;
}

/// Per repeat, the slowest rank's time: all holds `repeats` values per rank, rank after rank
/// (an all-gather of each rank's times). A forward is over when its slowest rank is.
inline std::vector<double> slowest_rank(const std::vector<float>& all, int ranks, int repeats)
{
    foe::require<foe::InvalidArgument>(all.size() == static_cast<std::size_t>(ranks) * static_cast<std::size_t>(repeats),
                                       "slowest_rank: ", all.size(), " values for ", ranks, " ranks x ", repeats,
                                       " repeats");
    std::vector<double> out(static_cast<std::size_t>(repeats), 0.0);
    for (int r = 0; r < ranks; ++r)
        for (int i = 0; i < repeats; ++i)
            out[static_cast<std::size_t>(i)] =
                std::max(out[static_cast<std::size_t>(i)],
                         static_cast<double>(all[static_cast<std::size_t>(r) * static_cast<std::size_t>(repeats) +
                                                 static_cast<std::size_t>(i)]));
    return out;
}

/// The median (the mean of the middle two for an even count); InvalidArgument when empty.
inline double median(std::vector<double> v)
{
    foe::require<foe::InvalidArgument>(!v.empty(), "median of no values");
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// One architecture's medians over the sweep, in seconds ([token count]); `skipped` says why it
/// did not run (empty: it ran).
struct ArchitectureTimes {
    std::string name;
    std::string skipped;
    std::vector<double> forward, layer;
};

struct CompareReport {
    std::string config, device, date, command;
    int ranks = 1, ranks_per_node = 1, warmup = 0, repeats = 0;
    index_t layers = 0;
    std::vector<index_t> tokens;
    ArchitectureTimes foe;
    std::vector<ArchitectureTimes> moe;  ///< the MoE baselines
};

namespace detail {

inline std::string seconds(double s)
{
    char b[32];
    std::snprintf(b, sizeof b, "%.5f", s);
    return b;
}
inline std::string ratio(double moe, double foe)
{
    if (!(foe > 0.0)) return "-";
    char b[32];
    std::snprintf(b, sizeof b, "%.2fx", moe / foe);
    return b;
}
inline std::string pad(std::string s, std::size_t width)
{
    if (s.size() < width) s.insert(0, width - s.size(), ' ');
    return s;
}

/// One table: tokens | each baseline that ran | FoE | each baseline's time over FoE's.
inline std::string table(const CompareReport& r, bool forward)
{
    struct Column {
        std::string head;
        std::vector<std::string> cells;
    };
    std::vector<Column> columns{{"tokens", {}}};
    for (index_t t : r.tokens) columns[0].cells.push_back(std::to_string(t));
    auto times = [&](const ArchitectureTimes& a) -> const std::vector<double>& { return forward ? a.forward : a.layer; };
    const bool foe_ran = r.foe.skipped.empty();
    std::vector<const ArchitectureTimes*> ran;
    for (const auto& m : r.moe)
        if (m.skipped.empty()) ran.push_back(&m);
    for (const auto* m : ran) {
        columns.push_back({m->name, {}});
        for (double v : times(*m)) columns.back().cells.push_back(seconds(v));
    }
    columns.push_back({r.foe.name, {}});
    for (std::size_t i = 0; i < r.tokens.size(); ++i)
        columns.back().cells.push_back(foe_ran ? seconds(times(r.foe).at(i)) : std::string("-"));
    if (foe_ran)
        for (const auto* m : ran) {
            columns.push_back({m->name + " / FoE", {}});
            for (std::size_t i = 0; i < r.tokens.size(); ++i)
                columns.back().cells.push_back(ratio(times(*m).at(i), times(r.foe).at(i)));
        }
    std::string out;
    for (std::size_t row = 0; row <= r.tokens.size(); ++row) {
        for (std::size_t c = 0; c < columns.size(); ++c) {
            std::size_t width = columns[c].head.size();
            for (const auto& cell : columns[c].cells) width = std::max(width, cell.size());
            out += (c == 0 ? "" : "  ") + pad(row == 0 ? columns[c].head : columns[c].cells.at(row - 1), width);
        }
        out += "\n";
    }
    return out;
}

}  // namespace detail

/// The report as text: the whole forward in the shape of the paper's Table 9 (tokens, MoE time
/// per baseline, FoE time, speedup MoE/FoE), the same for one layer, then what was skipped.
inline std::string format_table9(const CompareReport& r)
{
    std::string out = foe::detail::concat("foe_gpus --compare: ", r.config, ", ", r.layers, " layers, G = ", r.ranks,
                                          " GPUs, R = ", r.ranks_per_node, " per node, ", r.device, "\n",
                                          "median of ", r.repeats, " runs after ", r.warmup,
                                          " warm-up runs, the slowest rank's time of each; seconds\n\n");
    out += "whole forward (prefill of the batch, LM head included):\n" + detail::table(r, true);
    out += "\none layer (mean over the layers of the same forwards):\n" + detail::table(r, false);
    std::string skipped;
    for (const ArchitectureTimes* a : [&] {
             std::vector<const ArchitectureTimes*> all{&r.foe};
             for (const auto& m : r.moe) all.push_back(&m);
             return all;
         }())
        if (!a->skipped.empty()) skipped += foe::detail::concat("  ", a->name, ": ", a->skipped, "\n");
    if (!skipped.empty()) out += "\nnot run:\n" + skipped;
    return out;
}

/// The report as JSON (written to --json FILE).
inline foe::json::Value report_json(const CompareReport& r)
{
    using foe::json::Array;
    using foe::json::Object;
    using foe::json::Value;
    Value root{Object{}};
    root.set("date", r.date)
        .set("device", r.device)
        .set("command", r.command)
        .set("config", r.config)
        .set("layers", r.layers)
        .set("ranks", r.ranks)
        .set("ranks_per_node", r.ranks_per_node)
        .set("warmup", r.warmup)
        .set("repeats", r.repeats)
        .set("statistic", "median over repeats of the slowest rank's time, seconds");
    Value tokens{Array{}};
    for (index_t t : r.tokens) tokens.push_back(t);
    root.set("tokens", tokens);
    auto arch = [&](const ArchitectureTimes& a) {
        Value v{Object{}};
        v.set("name", a.name);
        if (!a.skipped.empty()) return v.set("skipped", a.skipped), v;
        Value f{Array{}}, l{Array{}};
        for (double x : a.forward) f.push_back(x);
        for (double x : a.layer) l.push_back(x);
        v.set("forward_s", f).set("layer_s", l);
        return v;
    };
    Value archs{Array{}};
    archs.push_back(arch(r.foe));
    for (const auto& m : r.moe) archs.push_back(arch(m));
    root.set("architectures", archs);
    return root;
}

}  // namespace foe_gpus
