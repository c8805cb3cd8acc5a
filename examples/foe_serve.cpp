// foe_serve: replays a request trace against a model with continuous batching on the host, and
// the same trace against the standard-MoE model of the same size in the same run.
//
//   foe_serve --config foe-small [--baseline-config moe-small]        random weights of named configs
//   foe_serve --model DIR [--baseline DIR]                             model directories
//     [--requests 32] [--rate 4] [--seed 1] [--prompt-len uniform:16:128] [--output-len uniform:4:32]
//     [--trace FILE] [--slots 8] [--page-size 16] [--pages N] [--token-budget 256] [--json FILE]
//
// Requests arrive as a Poisson process at --rate per second (or as the CSV --trace says:
// arrival_s,prompt_tokens,output_tokens), with seeded random prompt tokens; each generates
// exactly its output length (greedy, no stop token). The scheduler (foe/serve/scheduler.hpp)
// batches prefill chunks and decode tokens under --token-budget over a paged KV cache of --pages
// pages of --page-size positions (default: --slots sequences of the longest request). It prints
// TTFT, TBT (each request's mean gap between tokens) and end-to-end latency (mean, p50, p90,
// p99) and throughput for both models, and the baseline over FoE. A progress line goes to
// stderr. The CUDA backend has no paged KV cache yet, so foe_serve runs on the host only.
//
// Errors go to stderr with exit status 1 (2 for a usage error).

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "foe/foe.hpp"
#include "foe/io/model_dir.hpp"
#include "foe/serve/trace.hpp"

namespace {

using foe::index_t;
namespace serve = foe::serve;

constexpr std::string_view usage =
    "usage: foe_serve (--config NAME [--baseline-config NAME] | --model DIR [--baseline DIR])\n"
    "                 [--requests N] [--rate R] [--seed S] [--prompt-len DIST] [--output-len DIST] [--trace FILE]\n"
    "                 [--slots N] [--page-size P] [--pages N] [--token-budget T] [--json FILE]\n"
    "  DIST: fixed:N, uniform:A:B or longbench (see foe/serve/trace.hpp)\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string config, baseline_config;
    std::string model, baseline;
    serve::TraceSpec trace;
    std::string trace_file;
    index_t slots = 8, page_size = 16, pages = 0, token_budget = 256;
    std::string json;
};

index_t positive(std::string_view flag, std::string_view v)
{
    try {
        std::size_t used = 0;
        const long long n = std::stoll(std::string(v), &used);
        if (used == v.size() && n > 0) return n;
    } catch (const std::exception&) {
    }
    throw UsageError(foe::detail::concat(flag, ": \"", v, "\" is not a positive integer"));
}

Options parse(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::cout << usage;
            std::exit(0);
        }
        if (i + 1 >= argc) throw UsageError(foe::detail::concat(flag, " needs a value (or is unknown)"));
        const std::string_view v = argv[++i];
        if (flag == "--config") o.config = v;
        else if (flag == "--baseline-config") o.baseline_config = v;
        else if (flag == "--model") o.model = v;
        else if (flag == "--baseline") o.baseline = v;
        else if (flag == "--requests") o.trace.requests = positive(flag, v);
        else if (flag == "--rate") {
            try {
                o.trace.rate = std::stod(std::string(v));
            } catch (const std::exception&) {
                throw UsageError(foe::detail::concat("--rate: \"", v, "\" is not a number"));
            }
        } else if (flag == "--seed") o.trace.seed = static_cast<std::uint64_t>(positive(flag, v));
        else if (flag == "--prompt-len") o.trace.prompt = serve::LengthDistribution::parse(v);
        else if (flag == "--output-len") o.trace.output = serve::LengthDistribution::parse(v);
        else if (flag == "--trace") o.trace_file = v;
        else if (flag == "--slots") o.slots = positive(flag, v);
        else if (flag == "--page-size") o.page_size = positive(flag, v);
        else if (flag == "--pages") o.pages = positive(flag, v);
        else if (flag == "--token-budget") o.token_budget = positive(flag, v);
        else if (flag == "--json") o.json = v;
        else throw UsageError(foe::detail::concat("unknown option ", flag));
    }
    if (o.config.empty() == o.model.empty()) throw UsageError("give exactly one of --config and --model");
    if (!o.config.empty() && !o.baseline.empty()) throw UsageError("--baseline goes with --model; use --baseline-config");
    if (!o.model.empty() && !o.baseline_config.empty()) throw UsageError("--baseline-config goes with --config");
    return o;
}

/// The standard-MoE twin of a named FoE config ("foe-small" -> "moe-small"), or none.
std::string twin(const std::string& name)
{
    if (name.rfind("foe-", 0) == 0) return "moe-" + name.substr(4);
    return {};
}

std::shared_ptr<const foe::ModelWeights> load(const std::string& config, const std::string& dir)
{
    if (!config.empty()) return std::make_shared<const foe::ModelWeights>(foe::random_weights(foe::named_config(config), 1));
    return std::make_shared<const foe::ModelWeights>(foe::load_model_dir(dir));
}

struct Run {
    std::string name;
    serve::ServingSummary summary;
    index_t steps = 0;
};

Run serve_model(const std::string& name, std::shared_ptr<const foe::ModelWeights> weights,
                const std::vector<serve::TraceEntry>& trace, const Options& o)
{
    const foe::ModelConfig& c = weights->config;
    index_t longest = 0;
    for (const auto& e : trace) longest = std::max(longest, e.prompt_tokens + e.output_tokens);
    foe::require<foe::CapacityError>(longest <= c.max_position_embeddings, "the trace's longest request needs ", longest,
                                     " positions; ", name, " holds ", c.max_position_embeddings,
                                     " (max_position_embeddings)");
    foe::ModelOptions mo;
    mo.cache_slots = o.slots;
    mo.cache_capacity = longest;
    mo.page_size = o.page_size;
    const index_t per_slot = (longest + o.page_size - 1) / o.page_size;
    mo.cache_pages = o.pages > 0 ? o.pages : o.slots * per_slot;
    auto model = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(weights, mo);
    serve::BlockManager pages(mo.cache_pages, o.page_size, o.slots, per_slot);
    serve::SchedulerOptions so;
    so.token_budget = o.token_budget;
    serve::Scheduler scheduler(pages, so);
    for (std::size_t i = 0; i < trace.size(); ++i)
        scheduler.submit({static_cast<index_t>(i), trace[i].arrival,
                          [&] {
                              std::vector<std::int32_t> p(static_cast<std::size_t>(trace[i].prompt_tokens));
                              const foe::CounterRng rng(o.trace.seed, 1000 + i);
                              for (std::size_t j = 0; j < p.size(); ++j)
                                  p[j] = static_cast<std::int32_t>(rng.bits(j) % static_cast<std::uint64_t>(c.vocab_size));
                              return p;
                          }(),
                          trace[i].output_tokens});

    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto now = [&] { return std::chrono::duration<double>(clock::now() - start).count(); };
    Run run{name, {}, 0};
    serve::run(
        scheduler, now,
        [&](double t) { std::this_thread::sleep_until(start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(t))); },
        [&](const serve::StepPlan& step) {
            ++run.steps;
            return model->forward(step.batch, step.tokens, foe::LogitRows::last_per_chunk);
        },
        [&](std::size_t done, std::size_t total) {
            std::fprintf(stderr, "\rfoe_serve: %s: %zu/%zu requests done, %.1f s", name.c_str(), done, total, now());
            if (done == total) std::fprintf(stderr, "\n");
        });
    run.summary = serve::ServingSummary::of(scheduler.records());
    return run;
}

void print(const std::vector<Run>& runs, const std::vector<serve::TraceEntry>& trace, const Options& o)
{
    index_t prompt = 0, output = 0;
    for (const auto& e : trace) {
        prompt += e.prompt_tokens;
        output += e.output_tokens;
    }
    std::printf("foe_serve: %zu requests, %s, mean prompt %.0f tokens, mean output %.1f tokens; %lld slots, pages of %lld, "
                "token budget %lld; host backend\n",
                trace.size(),
                o.trace_file.empty() ? foe::detail::concat("Poisson arrivals at ", o.trace.rate, "/s, seed ", o.trace.seed).c_str()
                                     : ("trace " + o.trace_file).c_str(),
                static_cast<double>(prompt) / static_cast<double>(trace.size()),
                static_cast<double>(output) / static_cast<double>(trace.size()), static_cast<long long>(o.slots),
                static_cast<long long>(o.page_size), static_cast<long long>(o.token_budget));
    std::printf("latencies in seconds; TBT = each request's mean gap between its tokens\n\n");
    std::printf("%-14s", "metric");
    for (const auto& r : runs) std::printf(" %14s", r.name.c_str());
    if (runs.size() == 2) std::printf(" %14s", "baseline/FoE");
    std::printf("\n");
    auto row = [&](const char* metric, auto get) {
        std::printf("%-14s", metric);
        for (const auto& r : runs) std::printf(" %14.4f", get(r.summary));
        if (runs.size() == 2) std::printf(" %13.2fx", get(runs[1].summary) / get(runs[0].summary));
        std::printf("\n");
    };
    using S = serve::ServingSummary;
    row("TTFT mean", [](const S& s) { return s.ttft.mean; });
    row("TTFT p50", [](const S& s) { return s.ttft.p50; });
    row("TTFT p90", [](const S& s) { return s.ttft.p90; });
    row("TTFT p99", [](const S& s) { return s.ttft.p99; });
    row("TBT mean", [](const S& s) { return s.tbt.mean; });
    row("TBT p50", [](const S& s) { return s.tbt.p50; });
    row("TBT p90", [](const S& s) { return s.tbt.p90; });
    row("TBT p99", [](const S& s) { return s.tbt.p99; });
    row("E2E mean", [](const S& s) { return s.e2e.mean; });
    row("E2E p99", [](const S& s) { return s.e2e.p99; });
    row("tokens/s", [](const S& s) { return s.tokens_per_second; });
    std::printf("%-14s", "preemptions");
    for (const auto& r : runs) std::printf(" %14lld", static_cast<long long>(r.summary.preemptions));
    std::printf("\n%-14s", "steps");
    for (const auto& r : runs) std::printf(" %14lld", static_cast<long long>(r.steps));
    std::printf("\n");
}

foe::json::Value distribution_json(const serve::Distribution& d)
{
    return foe::json::Object{{"mean", d.mean}, {"p50", d.p50}, {"p90", d.p90}, {"p99", d.p99},
                             {"count", static_cast<index_t>(d.count)}};
}

void write_json(const std::string& path, const std::vector<Run>& runs, const Options& o, int argc, char** argv)
{
    std::string command;
    for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
    foe::json::Array models;
    for (const auto& r : runs)
        models.push_back(foe::json::Object{{"name", r.name},
                                           {"ttft_s", distribution_json(r.summary.ttft)},
                                           {"tbt_s", distribution_json(r.summary.tbt)},
                                           {"e2e_s", distribution_json(r.summary.e2e)},
                                           {"tokens_per_second", r.summary.tokens_per_second},
                                           {"duration_s", r.summary.duration},
                                           {"preemptions", r.summary.preemptions},
                                           {"steps", r.steps}});
    const foe::json::Value doc = foe::json::Object{{"command", command},
                                                   {"requests", o.trace.requests},
                                                   {"rate", o.trace.rate},
                                                   {"slots", o.slots},
                                                   {"page_size", o.page_size},
                                                   {"token_budget", o.token_budget},
                                                   {"models", std::move(models)}};
    std::ofstream out(path);
    foe::require<foe::IoError>(static_cast<bool>(out), "cannot write ", path);
    out << foe::json::dump_pretty(doc) << "\n";
    foe::require<foe::IoError>(static_cast<bool>(out), "writing ", path, " failed");
}

}  // namespace

int main(int argc, char** argv)
{
    try {
        Options o = parse(argc, argv);
        const auto trace = o.trace_file.empty() ? serve::make_trace(o.trace) : serve::read_trace(o.trace_file);
        if (!o.trace_file.empty()) o.trace.requests = static_cast<index_t>(trace.size());
        std::vector<Run> runs;
        const std::string name = !o.config.empty() ? o.config : o.model;
        runs.push_back(serve_model(name, load(o.config, o.model), trace, o));
        const std::string baseline_config = !o.config.empty() && o.baseline_config.empty() ? twin(o.config) : o.baseline_config;
        if (!baseline_config.empty() || !o.baseline.empty())
            runs.push_back(serve_model(!baseline_config.empty() ? baseline_config : o.baseline,
                                       load(baseline_config, o.baseline), trace, o));
        print(runs, trace, o);
        if (!o.json.empty()) write_json(o.json, runs, o, argc, argv);
        return 0;
    } catch (const UsageError& e) {
        std::cerr << "foe_serve: " << e.what() << "\n\n" << usage;
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "foe_serve: error: " << e.what() << "\n";
        return 1;
    }
}
