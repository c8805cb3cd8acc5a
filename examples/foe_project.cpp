// foe_project: projects FoE against the standard-MoE baselines from one node to many, with the
// cost model of foe/perf/cost_model.hpp.
//
//   foe_project [--config foe-1b] [--hardware h100] [--ranks 8,16,...] [--tokens 2048,...] [--json]
//   foe_project --bandwidth-only [--ratio 20]      the paper's bandwidth-only limit (Table 4)
//
// For every rank count G and token count S it prints the per-layer time of each phase on the
// busiest rank, the whole forward pass (L layers, no overlap), and how much slower each MoE
// baseline is than FoE. Each baseline appears with naive expert dispatch (one row per
// (token, expert)) and deduplicated dispatch (one row per (token, rank), DeepEP-style) side by
// side; FoE's own dispatch inside a group (G > H) is deduplicated when dedup is listed. Errors
// go to stderr with exit status 1 (2 for a usage error).

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/io/json.hpp"
#include "foe/perf/cost_model.hpp"
#include "foe/perf/hardware.hpp"

namespace {

namespace perf = foe::perf;
using foe::index_t;

constexpr std::string_view usage_text =
    "usage: foe_project [options]\n"
    "\n"
    "  --config NAME         named model configuration (default foe-1b; foe-7b, moe-1b, ... as foe_run --init)\n"
    "  --hardware NAME       h100 or h200: 8 GPUs per node, NVLink, one 400 Gb/s IB NIC per GPU (default h100)\n"
    "  --ranks LIST          rank counts G, comma separated (default 8,16,32,64,128,256,512,1024)\n"
    "  --tokens LIST         tokens per forward S (default the paper's Table 9: 2048,4096,...,24576)\n"
    "  --ranks-per-node R    ranks per node (default: the profile's GPUs per node)\n"
    "  --seq-len N           tokens per sequence (default: one sequence of S tokens)\n"
    "  --dispatch LIST       naive, dedup or both: the MoE baselines' expert all-to-all packing\n"
    "                        (default naive,dedup: both side by side)\n"
    "  --all-reduce ALGO     ring or in-switch (NVLS) inside a node (default: the profile's, ring)\n"
    "  --cross-node ALGO     hierarchical or ring: how an all-reduce crosses nodes (default\n"
    "                        hierarchical: reduce-scatter, all-reduce across nodes, all-gather)\n"
    "  --imbalance X         expert-parallel load imbalance, busiest/mean (default: the profile's, 1.64;\n"
    "                        1 with --bandwidth-only)\n"
    "  --measured FILE       Google Benchmark JSON whose kernel rates replace the roofline rates\n"
    "  --bandwidth-only      the paper's bandwidth-only limit: model vs Table 4 vs the asymptote\n"
    "  --ratio R             B_intra / B_inter for --bandwidth-only (default 20)\n"
    "  --json                print JSON instead of a table\n"
    "  --help                this text\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The paper's synthetic forward sweep (PAPER.md 4.4, Table 9), from the batch size at which FoE
// starts to win.
const std::vector<index_t> paper_token_counts{2048, 4096, 8192, 12288, 16384, 20480, 24576};
const std::vector<index_t> default_rank_counts{8, 16, 32, 64, 128, 256, 512, 1024};
constexpr double default_bandwidth_ratio = 20.0;  // the paper's r for H100-class hardware (PAPER.md 1.5)
constexpr double micro = 1e-6, milli = 1e-3;

struct Options {
    std::string config = "foe-1b";
    std::string hardware = "h100";
    std::vector<index_t> ranks = default_rank_counts;
    std::vector<index_t> tokens = paper_token_counts;
    std::optional<index_t> ranks_per_node, seq_len;
    std::vector<perf::Dispatch> dispatch{perf::Dispatch::naive, perf::Dispatch::dedup};
    perf::CrossNodeAllReduce cross_node = perf::CrossNodeAllReduce::hierarchical;
    std::optional<perf::AllReduceAlgorithm> all_reduce;
    std::optional<double> imbalance;
    std::optional<std::string> measured;
    bool bandwidth_only = false;
    double ratio = default_bandwidth_ratio;
    bool json = false;
};

template <class T>
T parse_number(std::string_view text, std::string_view flag)
{
    T value{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc{} || end != text.data() + text.size() || text.empty())
        throw UsageError(foe::detail::concat(flag, ": \"", text, "\" is not a valid number"));
    return value;
}

std::vector<index_t> parse_list(std::string_view text, std::string_view flag)
{
    std::vector<index_t> out;
    std::size_t begin = 0;
    while (begin <= text.size()) {
        const std::size_t comma = std::min(text.find(',', begin), text.size());
        const auto v = parse_number<index_t>(text.substr(begin, comma - begin), flag);
        if (v <= 0) throw UsageError(foe::detail::concat(flag, ": ", v, " is not positive"));
        out.push_back(v);
        begin = comma + 1;
    }
    return out;
}

Options parse_args(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::cout << usage_text;
            std::exit(0);
        }
        if (flag == "--json") {
            o.json = true;
            continue;
        }
        if (flag == "--bandwidth-only") {
            o.bandwidth_only = true;
            continue;
        }
        if (i + 1 >= argc) throw UsageError(foe::detail::concat(flag, " needs a value (or is unknown)"));
        const std::string_view value = argv[++i];
        if (flag == "--config") {
            o.config = value;
        } else if (flag == "--hardware") {
            o.hardware = value;
        } else if (flag == "--ranks") {
            o.ranks = parse_list(value, flag);
        } else if (flag == "--tokens") {
            o.tokens = parse_list(value, flag);
        } else if (flag == "--ranks-per-node") {
            o.ranks_per_node = parse_number<index_t>(value, flag);
        } else if (flag == "--seq-len") {
            o.seq_len = parse_number<index_t>(value, flag);
        } else if (flag == "--dispatch") {
            o.dispatch.clear();
            for (std::size_t begin = 0; begin <= value.size();) {
                const std::size_t comma = std::min(value.find(',', begin), value.size());
                const std::string_view mode = value.substr(begin, comma - begin);
                if (mode == "naive") o.dispatch.push_back(perf::Dispatch::naive);
                else if (mode == "dedup") o.dispatch.push_back(perf::Dispatch::dedup);
                else throw UsageError(foe::detail::concat("--dispatch: \"", mode, "\" is not one of naive, dedup"));
                begin = comma + 1;
            }
        } else if (flag == "--cross-node") {
            if (value == "hierarchical") o.cross_node = perf::CrossNodeAllReduce::hierarchical;
            else if (value == "ring") o.cross_node = perf::CrossNodeAllReduce::ring;
            else throw UsageError(foe::detail::concat("--cross-node: \"", value, "\" is not one of hierarchical, ring"));
        } else if (flag == "--all-reduce") {
            if (value == "ring") o.all_reduce = perf::AllReduceAlgorithm::ring;
            else if (value == "in-switch") o.all_reduce = perf::AllReduceAlgorithm::in_switch;
            else throw UsageError(foe::detail::concat("--all-reduce: \"", value, "\" is not one of ring, in-switch"));
        } else if (flag == "--imbalance") {
            o.imbalance = parse_number<double>(value, flag);
        } else if (flag == "--measured") {
            o.measured = std::string(value);
        } else if (flag == "--ratio") {
            o.ratio = parse_number<double>(value, flag);
        } else {
            throw UsageError(foe::detail::concat("unknown option ", flag));
        }
    }
    return o;
}

std::string format(const char* fmt, double v)
{
    char buf[64];
    std::snprintf(buf, sizeof buf, fmt, v);
    return buf;
}

/// A JSON number, or null where the model has none (a ratio with a zero denominator).
foe::json::Value number(double v) { return std::isfinite(v) ? foe::json::Value(v) : foe::json::Value(nullptr); }

foe::json::Value link_json(const perf::LinkBytes& b)
{
    return foe::json::Object{{"intra_node", number(b.intra)}, {"inter_node", number(b.inter)}};
}

foe::json::Value cost_json(const perf::LayerCost& c, const foe::ModelConfig& config)
{
    using foe::json::Object;
    return Object{
        {"attention_s", number(c.attention.time)},
        {"experts_s", number(c.experts.time)},
        {"all_reduce_s", number(c.all_reduce.time())},
        {"all_to_all_s", number(c.all_to_all.time())},
        {"layer_serial_s", number(c.serial_time())},
        {"layer_overlapped_s", number(c.overlapped_time())},
        {"forward_serial_s", number(perf::forward_time(c, config))},
        {"forward_overlapped_s", number(perf::forward_time(c, config, true))},
        {"attention_flops", number(c.attention.flops)},
        {"experts_flops", number(c.experts.flops)},
        {"all_reduce_bytes", link_json(c.all_reduce.bytes)},
        {"all_to_all_bytes", link_json(c.all_to_all.bytes)},
        {"expert_parallel_size", c.expert_parallel_size},
        {"replicas", c.replicas},
        {"busiest_tokens", c.busiest_tokens},
    };
}

perf::HardwareProfile make_hardware(const Options& o)
{
    perf::HardwareProfile hw = perf::hardware_profile(o.hardware);
    if (o.all_reduce) hw.all_reduce = *o.all_reduce;
    if (o.imbalance) hw.load_imbalance = *o.imbalance;
    hw.validate();
    return hw;
}

std::string describe(const foe::ModelConfig& c)
{
    return foe::detail::concat("d ", c.hidden_size, ", ", c.num_attention_heads, " q / ", c.num_key_value_heads,
                               " kv heads of ", c.head_dim, ", E ", c.num_experts, ", k ", c.num_experts_per_tok, ", f ",
                               c.intermediate_size, ", L ", c.num_hidden_layers, ", H ", c.groups());
}

std::string describe(const perf::HardwareProfile& hw)
{
    return foe::detail::concat(format("%.1f", hw.peak_flops / 1e12), " TFLOP/s bf16, HBM ",
                               format("%.2f", hw.hbm_bandwidth / 1e12), " TB/s, NVLink ",
                               format("%.0f", hw.intra_node.bandwidth / 1e9), " GB/s ",
                               format("%.1f", hw.intra_node.latency / micro), " us/step, IB ",
                               format("%.0f", hw.inter_node.bandwidth / 1e9), " GB/s ",
                               format("%.1f", hw.inter_node.latency / micro), " us/step, ", hw.gpus_per_node,
                               " GPUs/node, all-reduce ", perf::to_string(hw.all_reduce), ", all-to-all ",
                               perf::to_string(hw.all_to_all), ", EP load imbalance ", format("%.2f", hw.load_imbalance));
}

std::string describe(const perf::KernelRates& r)
{
    if (r.empty()) return "roofline (peak rates)";
    std::string s = "measured:";
    auto add = [&](std::string_view what, const std::optional<double>& v, double unit, std::string_view unit_name) {
        if (v) s += foe::detail::concat(" ", what, " ", format("%.3g", *v / unit), " ", unit_name);
    };
    add("dense", r.dense_flops, 1e12, "TFLOP/s");
    add("attention", r.attention_flops, 1e12, "TFLOP/s");
    add("experts", r.expert_flops, 1e12, "TFLOP/s");
    add("memory", r.memory_bandwidth, 1e9, "GB/s");
    return s + " (the rest roofline)";
}

/// One row of the table: a strategy and the dispatch of its experts.
struct Arch {
    perf::Strategy strategy;
    perf::Dispatch dispatch;

    /// "foe", "moe-dp-naive", "moe-tp-dedup", ...: table rows and JSON keys.
    [[nodiscard]] std::string name() const
    {
        if (strategy == perf::Strategy::foe) return "foe";
        return foe::detail::concat(perf::short_name(strategy), "-", foe::parallel::to_string(dispatch));
    }
};

int project(const Options& o)
{
    const foe::ModelConfig config = foe::named_config(o.config);
    const perf::HardwareProfile hw = make_hardware(o);
    perf::CostOptions options;
    options.cross_node_all_reduce = o.cross_node;
    if (o.measured) options.rates = perf::load_kernel_rates(*o.measured);
    const index_t per_node = o.ranks_per_node.value_or(hw.gpus_per_node);
    const bool foe_dedup = std::find(o.dispatch.begin(), o.dispatch.end(), perf::Dispatch::dedup) != o.dispatch.end();
    std::vector<Arch> archs{{perf::Strategy::foe, foe_dedup ? perf::Dispatch::dedup : perf::Dispatch::naive}};
    for (auto strategy : {perf::Strategy::moe_data_parallel, perf::Strategy::moe_head_parallel})
        for (auto dispatch : o.dispatch) archs.push_back({strategy, dispatch});

    foe::json::Array rows;
    std::string table;
    for (index_t g : o.ranks) {
        const perf::Cluster placement{g, per_node};
        for (index_t s : o.tokens) {
            const perf::Workload workload{s, o.seq_len.value_or(0)};
            foe::json::Object by_strategy, speedup;
            double foe_time = 0.0;
            for (const Arch& a : archs) {
                options.dispatch = a.dispatch;
                const perf::LayerCost c = perf::layer_cost(config, a.strategy, workload, placement, hw, options);
                const bool first = a.strategy == perf::Strategy::foe;
                if (first) foe_time = c.serial_time();
                const std::string name = a.name();
                by_strategy.emplace_back(name, cost_json(c, config));
                if (!first) speedup.emplace_back(name + "_over_foe", number(c.serial_time() / foe_time));
                char line[256];
                std::snprintf(line, sizeof line, "%6s %6s %7s  %-13s %10.1f %10.1f %11.1f %11.1f %11.1f %11.2f %8.2fx\n",
                              first ? std::to_string(g).c_str() : "", first ? std::to_string(placement.nodes()).c_str() : "",
                              first ? std::to_string(s).c_str() : "", name.c_str(), c.attention.time / micro,
                              c.experts.time / micro, c.all_reduce.time() / micro, c.all_to_all.time() / micro,
                              c.serial_time() / micro, perf::forward_time(c, config) / milli, c.serial_time() / foe_time);
                table += line;
            }
            rows.push_back(foe::json::Object{{"ranks", g},
                                             {"nodes", placement.nodes()},
                                             {"tokens", s},
                                             {"strategies", std::move(by_strategy)},
                                             {"speedup", std::move(speedup)}});
        }
    }

    std::string dispatch;
    for (auto d : o.dispatch) dispatch += (dispatch.empty() ? "" : ",") + std::string(foe::parallel::to_string(d));
    const std::string workload = o.seq_len ? foe::detail::concat("sequences of ", *o.seq_len, " tokens")
                                           : std::string("one sequence of S tokens");
    if (o.json) {
        foe::json::Object doc{
            {"config", foe::json::Object{{"name", o.config}, {"description", describe(config)}}},
            {"hardware", foe::json::Object{{"name", hw.name}, {"description", describe(hw)}}},
            {"rates", describe(options.rates)},
            {"dispatch", dispatch},
            {"foe_dispatch", std::string(foe::parallel::to_string(archs.front().dispatch))},
            {"cross_node_all_reduce", std::string(perf::to_string(o.cross_node))},
            {"ranks_per_node", per_node},
            {"workload", workload},
            {"times", "busiest rank; layer = attention + experts + all-reduce + all-to-all (serial); forward = L layers"},
            {"rows", std::move(rows)},
        };
        std::cout << foe::json::dump_pretty(doc) << "\n";
        return 0;
    }
    std::cout << "foe_project: " << o.config << " (" << describe(config) << ")\n"
              << "on " << hw.name << ": " << describe(hw) << "\n"
              << "kernel rates: " << describe(options.rates) << "; MoE dispatch " << dispatch << ", FoE's in-group dispatch "
              << foe::parallel::to_string(archs.front().dispatch) << "; all-reduce across nodes "
              << perf::to_string(o.cross_node) << "; " << per_node << " ranks per node\n"
              << "workload: " << workload << "; data-parallel ranks hold whole sequences\n"
              << "times: busiest rank, per layer in us; forward = " << config.num_hidden_layers
              << " layers in ms, no overlap; 'vs foe' = time / FoE's time\n\n";
    std::printf("%6s %6s %7s  %-13s %10s %10s %11s %11s %11s %11s %9s\n", "ranks", "nodes", "tokens", "arch", "attention",
                "experts", "all-reduce", "all-to-all", "layer", "forward ms", "vs foe");
    std::cout << table;
    return 0;
}

int project_bandwidth_only(const Options& o)
{
    const foe::ModelConfig config = foe::named_config(o.config);
    perf::HardwareProfile hw = perf::bandwidth_only(make_hardware(o), o.ratio);
    if (o.imbalance) hw.load_imbalance = *o.imbalance;  // balanced unless asked otherwise
    const index_t per_node = o.ranks_per_node.value_or(hw.gpus_per_node);
    const index_t k = config.num_experts_per_tok, h = config.groups();
    const double asymptote = perf::paper::asymptote(k, h, o.ratio);
    const index_t s = o.tokens.back();
    // Every token its own sequence: perfectly balanced shards, as the paper's formulas assume.
    const perf::Workload workload{s, o.seq_len.value_or(1)};

    foe::json::Array rows;
    std::string table;
    for (index_t g : o.ranks) {
        const perf::Cluster placement{g, per_node};
        const auto foe_cost = perf::layer_cost(config, perf::Strategy::foe, workload, placement, hw);
        const auto moe_cost = perf::layer_cost(config, perf::Strategy::moe_data_parallel, workload, placement, hw);
        const auto t4 = perf::paper::table4(k, h, g, placement.nodes(), o.ratio);
        const double model_ratio = moe_cost.serial_time() / foe_cost.serial_time();
        rows.push_back(foe::json::Object{{"nodes", placement.nodes()},
                                         {"ranks", g},
                                         {"model_moe_s", number(moe_cost.serial_time())},
                                         {"model_foe_s", number(foe_cost.serial_time())},
                                         {"model_ratio", number(model_ratio)},
                                         {"table4_moe", number(t4.moe_time)},
                                         {"table4_foe", number(t4.foe_time)},
                                         {"table4_ratio", number(t4.speedup())}});
        char line[256];
        std::snprintf(line, sizeof line, "%6lld %6lld %12.1f %12.1f %9.2fx %12.3f %12.3f %9.2fx %9.1f%%\n",
                      static_cast<long long>(placement.nodes()), static_cast<long long>(g), moe_cost.serial_time() / micro,
                      foe_cost.serial_time() / micro, model_ratio, t4.moe_time, t4.foe_time, t4.speedup(),
                      100.0 * (t4.speedup() / asymptote - 1.0));
        table += line;
    }
    if (o.json) {
        foe::json::Object doc{{"config", o.config},
                              {"r", number(o.ratio)},
                              {"tokens", s},
                              {"asymptote", number(asymptote)},
                              {"rows", std::move(rows)}};
        std::cout << foe::json::dump_pretty(doc) << "\n";
        return 0;
    }
    std::cout << "foe_project --bandwidth-only: " << o.config << " (" << describe(config) << "), S = " << s
              << " tokens, r = B_intra/B_inter = " << o.ratio << "\n"
              << "no compute, no latency, load imbalance " << hw.load_imbalance << ", ring all-reduce in the node and hierarchical across nodes, naive dispatch; " << per_node
              << " ranks per node\n"
              << "model: this cost model, busiest rank, per layer in us (MoE = data-parallel attention + EP)\n"
              << "Table 4: the paper's formulas in its units (S d, S d / B_intra; valid for N <= H = " << h << ")\n"
              << "the paper's asymptote k H r / (k H + r (H - 1)) = " << format("%.3f", asymptote) << "\n\n";
    std::printf("%6s %6s %12s %12s %10s %12s %12s %10s %10s\n", "nodes", "ranks", "model MoE", "model FoE", "ratio",
                "Table4 MoE", "Table4 FoE", "ratio", "vs asym.");
    std::cout << table;
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    try {
        const Options o = parse_args(argc, argv);
        return o.bandwidth_only ? project_bandwidth_only(o) : project(o);
    } catch (const UsageError& e) {
        std::cerr << "foe_project: " << e.what() << "\n\n" << usage_text;
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "foe_project: error: " << e.what() << "\n";
        return 1;
    }
}
