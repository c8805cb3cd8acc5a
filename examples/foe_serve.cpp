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
// stderr. --backend cuda serves on the current GPU (foe::cuda::CudaModel over the same paged KV
// cache and block tables, bf16, decode steps from CUDA graphs; examples/foe_serve_cuda.cu, built
// when nvcc is found; --gemm foe|cublaslt picks its dense GEMM).
//
//   foe_serve ... --predict
// then also predicts the run: it first replays a held-out trace (the same distributions, seed + 1)
// and fits a linear host step model (HostStepModel below) to that replay's measured forwards,
// then replays the measured trace through the same scheduler on a virtual clock with the
// model's step times (foe/serve/simulate.hpp), and prints predicted against measured TTFT and TBT.
//
//   foe_serve --simulate [--config foe-1b] [--hardware h100] [--ranks 8,16] [--ranks-per-node 8]
//             [--loads 0.25,0.5,0.75,0.9] [--requests 200] [--prompt-len longbench] [--output-len longbench]
//             [--slots 64] [--token-budget 8192] [--compute-tflops T] [--layer-overhead-ms M] [--json FILE]
// simulates serving at GPU scale with no weights: the scheduler driven by the cost model's step
// times for FoE and the MoE baselines (data-parallel attention + EP, naive and dedup dispatch;
// head-parallel + EP where the KV heads divide), at arrival rates that are the given fractions
// of the naive baseline's saturated throughput (measured by the same simulation with every
// request arriving at once), in the shape of the paper's Tables 5 and 6. Compute runs at the
// profile's roofline unless --compute-tflops gives an achieved rate for the GEMMs and attention,
// and --layer-overhead-ms adds fixed milliseconds per layer and step (launches, synchronisation):
// the knobs that put the simulation in the paper's regime, where compute was far from peak.
//
// Errors go to stderr with exit status 1 (2 for a usage error).

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <span>
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
#include "foe/serve/simulate.hpp"
#include "foe/serve/trace.hpp"

#if defined(FOE_WITH_CUDA)
#include "foe_serve_cuda.hpp"
#endif

namespace {

using foe::index_t;
namespace serve = foe::serve;

constexpr std::string_view usage =
    "usage: foe_serve (--config NAME [--baseline-config NAME] | --model DIR [--baseline DIR])\n"
    "                 [--requests N] [--rate R] [--seed S] [--prompt-len DIST] [--output-len DIST] [--trace FILE]\n"
    "                 [--slots N] [--page-size P] [--pages N] [--token-budget T] [--backend host|cuda] [--gemm foe|cublaslt]\n"
    "                 [--predict] [--json FILE]\n"
    "       foe_serve --simulate [--config foe-1b] [--hardware h100] [--ranks 8,16] [--ranks-per-node 8]\n"
    "                 [--loads 0.25,0.5,0.75,0.9] [--requests N] [--prompt-len DIST] [--output-len DIST]\n"
    "                 [--compute-tflops T] [--layer-overhead-ms M] [--json FILE]\n"
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
    bool predict = false;
    bool cuda = false;  ///< --backend cuda
    bool foe_gemm = false;  ///< --gemm foe (cuda): foe's tensor-core GEMM instead of cuBLASLt
    // --simulate
    bool simulate = false;
    std::string hardware = "h100";
    std::vector<index_t> ranks{8, 16};
    index_t ranks_per_node = 8;
    std::vector<double> loads{0.25, 0.5, 0.75, 0.9};
    foe::perf::KernelRates rates;  ///< --compute-tflops, --layer-overhead-ms; empty: the roofline
    bool gemm_given = false;
    bool slots_given = false, budget_given = false, requests_given = false, prompt_given = false, output_given = false;
};

template <class T>
std::vector<T> parse_list(std::string_view flag, std::string_view v, T (*one)(std::string_view, std::string_view))
{
    std::vector<T> out;
    for (std::size_t begin = 0; begin <= v.size();) {
        const std::size_t comma = std::min(v.find(',', begin), v.size());
        out.push_back(one(flag, v.substr(begin, comma - begin)));
        begin = comma + 1;
    }
    return out;
}

double positive_real(std::string_view flag, std::string_view v)
{
    try {
        std::size_t used = 0;
        const double x = std::stod(std::string(v), &used);
        if (used == v.size() && std::isfinite(x) && x > 0.0) return x;
    } catch (const std::exception&) {
    }
    throw UsageError(foe::detail::concat(flag, ": \"", v, "\" is not a positive number"));
}

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

/// A count or size: a positive integer below 2^31 (what block tables and batches address), so
/// that sums and products of the options cannot overflow.
index_t count(std::string_view flag, std::string_view v)
{
    const index_t n = positive(flag, v);
    if (n < (index_t{1} << 31)) return n;
    throw UsageError(foe::detail::concat(flag, ": ", n, " is not below 2^31"));
}

/// A length distribution; its error is a usage error naming the option.
serve::LengthDistribution distribution(std::string_view flag, std::string_view v)
{
    try {
        return serve::LengthDistribution::parse(v);
    } catch (const foe::InvalidArgument& e) {
        throw UsageError(foe::detail::concat(flag, ": ", e.what()));
    }
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
        if (flag == "--predict") {
            o.predict = true;
            continue;
        }
        if (flag == "--simulate") {
            o.simulate = true;
            continue;
        }
        if (i + 1 >= argc) throw UsageError(foe::detail::concat(flag, " needs a value (or is unknown)"));
        const std::string_view v = argv[++i];
        if (flag == "--config") o.config = v;
        else if (flag == "--baseline-config") o.baseline_config = v;
        else if (flag == "--model") o.model = v;
        else if (flag == "--baseline") o.baseline = v;
        else if (flag == "--requests") o.trace.requests = count(flag, v), o.requests_given = true;
        else if (flag == "--rate") o.trace.rate = positive_real(flag, v);
        else if (flag == "--seed") o.trace.seed = static_cast<std::uint64_t>(positive(flag, v));
        else if (flag == "--prompt-len") o.trace.prompt = distribution(flag, v), o.prompt_given = true;
        else if (flag == "--output-len") o.trace.output = distribution(flag, v), o.output_given = true;
        else if (flag == "--trace") o.trace_file = v;
        else if (flag == "--slots") o.slots = count(flag, v), o.slots_given = true;
        else if (flag == "--page-size") o.page_size = count(flag, v);
        else if (flag == "--pages") o.pages = count(flag, v);
        else if (flag == "--token-budget") o.token_budget = count(flag, v), o.budget_given = true;
        else if (flag == "--json") o.json = v;
        else if (flag == "--backend") {
            if (v != "host" && v != "cuda") throw UsageError(foe::detail::concat("--backend: \"", v, "\" is not one of host, cuda"));
            o.cuda = v == "cuda";
        } else if (flag == "--gemm") {
            if (v != "foe" && v != "cublaslt") throw UsageError(foe::detail::concat("--gemm: \"", v, "\" is not one of foe, cublaslt"));
            o.foe_gemm = v == "foe";
            o.gemm_given = true;
        }
        else if (flag == "--hardware") o.hardware = v;
        else if (flag == "--ranks") o.ranks = parse_list<index_t>(flag, v, count);
        else if (flag == "--ranks-per-node") o.ranks_per_node = count(flag, v);
        else if (flag == "--loads") o.loads = parse_list<double>(flag, v, positive_real);
        else if (flag == "--compute-tflops") {
            const double f = positive_real(flag, v) * 1e12;
            o.rates.dense_flops = o.rates.attention_flops = o.rates.expert_flops = f;
        } else if (flag == "--layer-overhead-ms") o.rates.layer_overhead = positive_real(flag, v) * 1e-3;
        else throw UsageError(foe::detail::concat("unknown option ", flag));
    }
    if (o.simulate) {
        // GPU-scale defaults: foe-1b, LongBench-like requests, a large server.
        if (!o.model.empty()) throw UsageError("--simulate needs no weights: use --config NAME");
        if (o.config.empty()) o.config = "foe-1b";
        if (!o.requests_given) o.trace.requests = 200;
        if (!o.prompt_given) o.trace.prompt = serve::LengthDistribution::parse("longbench");
        if (!o.output_given) o.trace.output = serve::LengthDistribution::parse("longbench");
        if (!o.slots_given) o.slots = 64;
        if (!o.budget_given) o.token_budget = 8192;
        return o;
    }
    if (o.config.empty() == o.model.empty()) throw UsageError("give exactly one of --config and --model");
    if (!o.config.empty() && !o.baseline.empty()) throw UsageError("--baseline goes with --model; use --baseline-config");
    if (!o.model.empty() && !o.baseline_config.empty()) throw UsageError("--baseline-config goes with --config");
    if (o.gemm_given && !o.cuda) throw UsageError("--gemm chooses the CUDA backend's dense GEMM: give --backend cuda too");
#if !defined(FOE_WITH_CUDA)
    if (o.cuda)
        throw UsageError("--backend cuda: this foe_serve was built without CUDA (no nvcc was found when it was configured)");
#endif
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
    std::optional<serve::ServingSummary> predicted;  ///< --predict: step model fitted to a held-out replay
    /// --predict: step model fitted to this run's own forwards, which leaves out the machine's
    /// drift between two replays and checks what the simulation itself adds (scheduling, queueing).
    std::optional<serve::ServingSummary> predicted_in_sample;
    std::string calibration;                         ///< --predict: the fitted rates
    /// The measured forward of every step, by its chunks (for --predict's per-step check).
    std::vector<std::pair<std::vector<foe::SequenceChunk>, double>> step_times;
};

/// Median wall time of `repeats` calls of f.
template <class F>
double median_seconds(int repeats, F&& f)
{
    std::vector<double> t;
    for (int i = 0; i < repeats; ++i) {
        const auto start = std::chrono::steady_clock::now();
        f();
        t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

/// The host's step time as a linear function of a step's shape, fitted to timed forwards:
///   t = a + b chunks + c tokens + e attention pairs
/// (a: per-step work, b: per kept row, the LM head; c: per token, projections and experts; e:
/// per query-key pair of the attention core). The GPU cost model (perf::step_cost) is a
/// roofline that a 2-core CPU running a 4-layer model does not follow (its decode steps are
/// dominated by fixed costs), so --predict validates the simulator with this host model.
struct HostStepModel {
    static constexpr std::size_t n = 5;
    using Features = std::array<double, n>;
    std::array<double, n> coef{};

    /// Per step: 1, sequences, tokens, attention (query, key) pairs, and the experts the step
    /// reads: a token picks k of E, so T tokens touch E (1 - (1 - k/E)^T) distinct experts on
    /// average. Weight reads, not tokens, bound a small step, and that count grows sublinearly
    /// (8 experts for one decode token of foe-small, 42 for eight); a fit that is linear in
    /// tokens alone overpredicts the decode steps of a model with many active experts.
    [[nodiscard]] static Features features(const foe::ModelConfig& config, std::span<const foe::SequenceChunk> chunks)
    {
        double tokens = 0.0, pairs = 0.0;
        for (const auto& c : chunks) {
            const auto l = static_cast<double>(c.length), ctx = static_cast<double>(c.start);
            tokens += l;
            pairs += l * ctx + l * (l + 1.0) / 2.0;
        }
        const auto experts = static_cast<double>(config.num_experts), k = static_cast<double>(config.num_experts_per_tok);
        const double touched = experts * (1.0 - std::pow(1.0 - k / experts, tokens));
        return {1.0, static_cast<double>(chunks.size()), tokens, pairs, touched};
    }
    [[nodiscard]] double operator()(const foe::ModelConfig& config, std::span<const foe::SequenceChunk> chunks) const
    {
        const auto f = features(config, chunks);
        double t = 0.0;
        for (std::size_t i = 0; i < f.size(); ++i) t += coef[i] * f[i];
        return std::max(t, 0.0);
    }

    /// Least squares over (features, seconds) samples: normal equations of the features scaled to
    /// unit RMS with a small ridge, so that a short replay whose features are collinear (every
    /// step one token, say) still gives a model instead of a singular system.
    [[nodiscard]] static HostStepModel fit(const std::vector<std::pair<Features, double>>& samples)
    {
        foe::require(!samples.empty(), "--predict: the held-out replay ran no step to fit the host step model to");
        Features scale{};
        for (const auto& [f, t] : samples)
            for (std::size_t i = 0; i < n; ++i) scale[i] += f[i] * f[i];
        for (auto& v : scale) v = v > 0.0 ? std::sqrt(v / static_cast<double>(samples.size())) : 1.0;
        double m[n][n + 1] = {};
        for (const auto& [f, t] : samples)
            for (std::size_t i = 0; i < n; ++i) {
                for (std::size_t j = 0; j < n; ++j) m[i][j] += f[i] / scale[i] * f[j] / scale[j];
                m[i][n] += f[i] / scale[i] * t;
            }
        constexpr double ridge = 1e-6;
        for (std::size_t i = 0; i < n; ++i) m[i][i] += ridge * static_cast<double>(samples.size());
        for (std::size_t col = 0; col < n; ++col) {
            std::size_t pivot = col;
            for (std::size_t r = col + 1; r < n; ++r)
                if (std::abs(m[r][col]) > std::abs(m[pivot][col])) pivot = r;
            std::swap(m[col], m[pivot]);
            for (std::size_t r = 0; r < n; ++r) {
                if (r == col) continue;
                const double k = m[r][col] / m[col][col];
                for (std::size_t j = col; j <= n; ++j) m[r][j] -= k * m[col][j];
            }
        }
        HostStepModel model;
        for (std::size_t i = 0; i < n; ++i) model.coef[i] = m[i][n] / m[i][i] / scale[i];
        return model;
    }
};

/// --predict: fits the host step model to the measured forwards of another replay (`held_out`:
/// a trace of the same distributions with another seed, or the --trace file with other prompt
/// tokens), replays `trace` through the same scheduler on a virtual clock with the model's step
/// times (foe/serve/simulate.hpp), and stores the predicted summary in `measured`; the same
/// with the model fitted to `measured`'s own forwards. The held-out replay runs
/// the real path (paged cache, scheduler, sampling, caches as cold as serving leaves them), which
/// forwards timed in isolation do not (a fit to such forwards, tried first, underpredicted
/// serving's steps).
void predict(const foe::ModelConfig& c, const std::vector<serve::TraceEntry>& trace, const Options& o, const Run& held_out,
             Run& measured)
{
    auto fit = [&](const Run& run) {
        std::vector<std::pair<HostStepModel::Features, double>> samples;
        for (const auto& [chunks, seconds] : run.step_times) samples.emplace_back(HostStepModel::features(c, chunks), seconds);
        return HostStepModel::fit(samples);
    };
    const HostStepModel host = fit(held_out);
    std::string& calibration = measured.calibration;
    calibration = foe::detail::concat("host step model fitted to the ", held_out.step_times.size(), " forwards of a held-out replay: ",
                                      std::round(host.coef[0] * 1e7) / 10, " us + ", std::round(host.coef[1] * 1e7) / 10,
                                      " us per sequence + ", std::round(host.coef[2] * 1e7) / 10, " us per token + ",
                                      std::round(host.coef[3] * 1e10) / 10, " ns per attention pair + ",
                                      std::round(host.coef[4] * 1e7) / 10, " us per expert read");
    // How well it predicts the forwards this run measured (their time, not the latencies).
    double predicted_sum = 0.0, measured_sum = 0.0;
    for (const auto& [chunks, seconds] : measured.step_times) {
        predicted_sum += host(c, chunks);
        measured_sum += seconds;
    }
    if (measured_sum > 0.0)
        calibration += foe::detail::concat("; on this run's ", measured.step_times.size(), " forwards it predicts ",
                                           std::round(1000.0 * predicted_sum / measured_sum) / 10, "% of their time");

    index_t longest = 0;
    for (const auto& e : trace) longest = std::max(longest, e.prompt_tokens + e.output_tokens);
    const index_t per_slot = (longest + o.page_size - 1) / o.page_size;
    serve::SchedulerOptions so;
    so.token_budget = o.token_budget;
    auto replay_on = [&](const HostStepModel& model) {
        serve::BlockManager pages(o.pages > 0 ? o.pages : o.slots * per_slot, o.page_size, o.slots, per_slot);
        return serve::ServingSummary::of(serve::simulate(trace, pages, so, [&](const serve::StepPlan& step) {
            return model(c, std::span<const foe::SequenceChunk>(step.batch.chunks()));
        }));
    };
    measured.predicted = replay_on(host);
    measured.predicted_in_sample = replay_on(fit(measured));
}

/// Serves `trace` on `weights` in real time; prompt tokens are drawn from `prompt_seed`.
Run replay(const std::string& name, std::shared_ptr<const foe::ModelWeights> weights,
           const std::vector<serve::TraceEntry>& trace, const Options& o, std::uint64_t prompt_seed)
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
    std::unique_ptr<foe::ModelInterface> model;
    if (o.cuda) {
#if defined(FOE_WITH_CUDA)
        model = make_cuda_served_model(weights, {o.slots, longest, o.page_size, mo.cache_pages, o.token_budget}, o.foe_gemm);
#endif
    } else {
        model = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(weights, mo);
    }
    serve::BlockManager pages(mo.cache_pages, o.page_size, o.slots, per_slot);
    serve::SchedulerOptions so;
    so.token_budget = o.token_budget;
    serve::Scheduler scheduler(pages, so);
    for (std::size_t i = 0; i < trace.size(); ++i)
        scheduler.submit({static_cast<index_t>(i), trace[i].arrival,
                          [&] {
                              std::vector<std::int32_t> p(static_cast<std::size_t>(trace[i].prompt_tokens));
                              const foe::CounterRng rng(prompt_seed, 1000 + i);
                              for (std::size_t j = 0; j < p.size(); ++j)
                                  p[j] = static_cast<std::int32_t>(rng.bits(j) % static_cast<std::uint64_t>(c.vocab_size));
                              return p;
                          }(),
                          trace[i].output_tokens});

    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto now = [&] { return std::chrono::duration<double>(clock::now() - start).count(); };
    Run run;
    run.name = name;
    serve::run(
        scheduler, now,
        [&](double t) { std::this_thread::sleep_until(start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(t))); },
        [&](const serve::StepPlan& step) {
            ++run.steps;
            const auto t0 = clock::now();
            auto logits = model->forward(step.batch, step.tokens, foe::LogitRows::last_per_chunk);
            if (o.predict)  // --predict fits its step model to these; otherwise nothing is kept per step
                run.step_times.emplace_back(step.batch.chunks(), std::chrono::duration<double>(clock::now() - t0).count());
            return logits;
        },
        [&](std::size_t done, std::size_t total) {
            std::fprintf(stderr, "\rfoe_serve: %s: %zu/%zu requests done, %.1f s", name.c_str(), done, total, now());
            if (done == total) std::fprintf(stderr, "\n");
        });
    run.summary = serve::ServingSummary::of(scheduler.records());
    return run;
}

/// The measured run, and with --predict first a held-out replay to fit the host step model to.
Run serve_model(const std::string& name, std::shared_ptr<const foe::ModelWeights> weights,
                const std::vector<serve::TraceEntry>& trace, const Options& o)
{
    std::optional<Run> held_out;
    if (o.predict) {
        serve::TraceSpec spec = o.trace;
        spec.seed = o.trace.seed + 1;
        held_out = replay(name + " (held-out replay)", weights, o.trace_file.empty() ? serve::make_trace(spec) : trace, o,
                          spec.seed);
    }
    Run run = replay(name, weights, trace, o, o.trace.seed);
    if (held_out) predict(weights->config, trace, o, *held_out, run);
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
                "token budget %lld; %s backend\n",
                trace.size(),
                o.trace_file.empty() ? foe::detail::concat("Poisson arrivals at ", o.trace.rate, "/s, seed ", o.trace.seed).c_str()
                                     : ("trace " + o.trace_file).c_str(),
                static_cast<double>(prompt) / static_cast<double>(trace.size()),
                static_cast<double>(output) / static_cast<double>(trace.size()), static_cast<long long>(o.slots),
                static_cast<long long>(o.page_size), static_cast<long long>(o.token_budget), o.cuda ? "cuda" : "host");
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
    if (runs.front().predicted) {
        std::printf("\npredicted on a virtual clock by the host step model (--predict), against the measurement:\n");
        for (const auto& r : runs) {
            const auto& p = *r.predicted;
            auto err = [](double predicted, double measured) { return 100.0 * (predicted / measured - 1.0); };
            std::printf("  %s: TTFT mean %.4f (%+.0f%% of %.4f), p50 %.4f (%+.0f%% of %.4f); TBT mean %.4f (%+.0f%% of %.4f), "
                        "p50 %.4f (%+.0f%% of %.4f)\n    %s\n",
                        r.name.c_str(), p.ttft.mean, err(p.ttft.mean, r.summary.ttft.mean), r.summary.ttft.mean, p.ttft.p50,
                        err(p.ttft.p50, r.summary.ttft.p50), r.summary.ttft.p50, p.tbt.mean, err(p.tbt.mean, r.summary.tbt.mean),
                        r.summary.tbt.mean, p.tbt.p50, err(p.tbt.p50, r.summary.tbt.p50), r.summary.tbt.p50,
                        r.calibration.c_str());
            const auto& q = *r.predicted_in_sample;
            std::printf("    fitted to this run's own forwards instead (no drift between replays): TTFT mean %+.0f%%, p50 %+.0f%%; "
                        "TBT mean %+.0f%%, p50 %+.0f%%\n",
                        err(q.ttft.mean, r.summary.ttft.mean), err(q.ttft.p50, r.summary.ttft.p50),
                        err(q.tbt.mean, r.summary.tbt.mean), err(q.tbt.p50, r.summary.tbt.p50));
        }
        std::printf("\n");
    }
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

/// --simulate: the scheduler on a virtual clock with the cost model's step times, FoE against
/// the MoE baselines, on G GPUs, at loads relative to the naive baseline's saturated throughput.
int simulate_gpus(const Options& o, int argc, char** argv)
{
    namespace perf = foe::perf;
    const foe::ModelConfig config = foe::named_config(o.config);
    const perf::HardwareProfile hw = perf::hardware_profile(o.hardware);
    struct Arch {
        std::string name;
        perf::Strategy strategy;
        perf::Dispatch dispatch;
    };
    const std::vector<Arch> archs{{"FoE", perf::Strategy::foe, perf::Dispatch::dedup},
                                  {"MoE DP+EP naive", perf::Strategy::moe_data_parallel, perf::Dispatch::naive},
                                  {"MoE DP+EP dedup", perf::Strategy::moe_data_parallel, perf::Dispatch::dedup},
                                  {"MoE TP+EP dedup", perf::Strategy::moe_head_parallel, perf::Dispatch::dedup}};
    const auto base_trace = serve::make_trace(o.trace);
    index_t longest = 0;
    double prompt = 0.0, output = 0.0;
    for (const auto& e : base_trace) {
        longest = std::max(longest, e.prompt_tokens + e.output_tokens);
        prompt += static_cast<double>(e.prompt_tokens) / static_cast<double>(base_trace.size());
        output += static_cast<double>(e.output_tokens) / static_cast<double>(base_trace.size());
    }
    const index_t per_slot = (longest + o.page_size - 1) / o.page_size;
    serve::SchedulerOptions so;
    so.token_budget = o.token_budget;
    auto run_arch = [&](const Arch& a, const perf::Cluster& cluster, const std::vector<serve::TraceEntry>& trace) {
        perf::CostOptions co;
        co.dispatch = a.dispatch;
        co.rates = o.rates;
        serve::BlockManager pages(o.slots * per_slot, o.page_size, o.slots, per_slot);
        return serve::ServingSummary::of(serve::simulate(trace, pages, so, [&](const serve::StepPlan& step) {
            return serve::cost_model_step_time(config, a.strategy, step, cluster, hw, co);
        }));
    };
    auto with_rate = [&](double rate) {
        serve::TraceSpec spec = o.trace;
        spec.rate = rate;
        return serve::make_trace(spec);
    };

    std::printf("foe_serve --simulate: %s on %s, %lld requests (mean prompt %.0f, mean output %.0f tokens; %s), %lld slots, "
                "token budget %lld per step, pages of %lld\n",
                o.config.c_str(), hw.name.c_str(), static_cast<long long>(base_trace.size()), prompt, output,
                o.trace.prompt.kind == serve::LengthDistribution::Kind::longbench ? "LongBench-like" : "as given",
                static_cast<long long>(o.slots), static_cast<long long>(o.token_budget), static_cast<long long>(o.page_size));
    const std::string compute = o.rates.dense_flops
        ? foe::detail::concat(*o.rates.dense_flops / 1e12, " TFLOP/s compute") : std::string("roofline compute");
    const std::string overhead = o.rates.layer_overhead
        ? foe::detail::concat(", ", *o.rates.layer_overhead * 1e3, " ms per layer and step") : std::string();
    std::printf("step times: the cost model (perf::step_cost, %s%s, EP load imbalance %.2f, no overlap), L layers per step; "
                "seconds\n", compute.c_str(), overhead.c_str(), hw.load_imbalance);
    foe::json::Array clusters;
    for (index_t g : o.ranks) {
        const perf::Cluster cluster{g, std::min(o.ranks_per_node, g)};
        // The naive baseline's saturated throughput: every request at once.
        const auto burst = with_rate(1e12);
        const auto saturated = run_arch(archs[1], cluster, burst);
        const double capacity = static_cast<double>(burst.size()) / saturated.duration;
        std::printf("\nG = %lld (%lld node(s)); MoE DP+EP naive saturates at %.2f requests/s\n", static_cast<long long>(g),
                    static_cast<long long>(cluster.nodes()), capacity);
        std::printf("%5s %8s  %-16s %9s %9s %9s %9s %9s %9s %9s\n", "load", "req/s", "arch", "TTFT mean", "p50", "p99",
                    "TBT mean", "p50", "p99", "E2E mean");
        foe::json::Array loads;
        for (double load : o.loads) {
            const double rate = load * capacity;
            const auto trace = with_rate(rate);
            std::vector<std::pair<std::string, serve::ServingSummary>> results;
            for (const Arch& a : archs) {
                try {
                    results.emplace_back(a.name, run_arch(a, cluster, trace));
                } catch (const foe::ConfigError& e) {
                    std::fprintf(stderr, "foe_serve: %s on G = %lld skipped: %s\n", a.name.c_str(), static_cast<long long>(g), e.what());
                }
                std::fprintf(stderr, "\rfoe_serve --simulate: G = %lld, load %.2f, %s done   ", static_cast<long long>(g), load, a.name.c_str());
            }
            std::fprintf(stderr, "\r%80s\r", "");
            foe::json::Object by_arch;
            for (const auto& [name, r] : results) {
                std::printf("%5.2f %8.2f  %-16s %9.3f %9.3f %9.3f %9.4f %9.4f %9.4f %9.2f\n", load, rate, name.c_str(), r.ttft.mean,
                            r.ttft.p50, r.ttft.p99, r.tbt.mean, r.tbt.p50, r.tbt.p99, r.e2e.mean);
                by_arch.emplace_back(name, foe::json::Object{{"ttft_s", distribution_json(r.ttft)},
                                                             {"tbt_s", distribution_json(r.tbt)},
                                                             {"e2e_s", distribution_json(r.e2e)},
                                                             {"preemptions", r.preemptions}});
            }
            const auto& f = results.front().second;
            for (std::size_t i = 1; i < results.size(); ++i) {
                const auto& m = results[i].second;
                std::printf("%5s %8s  %-16s %8.2fx %8.2fx %8.2fx %8.2fx %8.2fx %8.2fx %8.2fx\n", "", "",
                            ("  " + results[i].first.substr(4) + "/FoE").c_str(), m.ttft.mean / f.ttft.mean,
                            m.ttft.p50 / f.ttft.p50, m.ttft.p99 / f.ttft.p99, m.tbt.mean / f.tbt.mean, m.tbt.p50 / f.tbt.p50,
                            m.tbt.p99 / f.tbt.p99, m.e2e.mean / f.e2e.mean);
            }
            loads.push_back(foe::json::Object{{"load", load}, {"rate", rate}, {"architectures", std::move(by_arch)}});
        }
        clusters.push_back(foe::json::Object{{"ranks", g},
                                             {"nodes", cluster.nodes()},
                                             {"naive_capacity_rps", capacity},
                                             {"loads", std::move(loads)}});
    }
    if (!o.json.empty()) {
        std::string command;
        for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
        const foe::json::Value doc = foe::json::Object{{"command", command},
                                                       {"config", o.config},
                                                       {"hardware", hw.name},
                                                       {"requests", o.trace.requests},
                                                       {"mean_prompt_tokens", prompt},
                                                       {"mean_output_tokens", output},
                                                       {"slots", o.slots},
                                                       {"token_budget", o.token_budget},
                                                       {"step_times", compute + overhead},
                                                       {"clusters", std::move(clusters)}};
        std::ofstream out(o.json);
        foe::require<foe::IoError>(static_cast<bool>(out), "cannot write ", o.json);
        out << foe::json::dump_pretty(doc) << "\n";
        foe::require<foe::IoError>(static_cast<bool>(out), "writing ", o.json, " failed");
    }
    return 0;
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
                                           {"steps", r.steps},
                                           {"predicted",
                                            r.predicted ? foe::json::Value(foe::json::Object{
                                                              {"ttft_s", distribution_json(r.predicted->ttft)},
                                                              {"tbt_s", distribution_json(r.predicted->tbt)},
                                                              {"in_sample_ttft_s", distribution_json(r.predicted_in_sample->ttft)},
                                                              {"in_sample_tbt_s", distribution_json(r.predicted_in_sample->tbt)},
                                                              {"calibration", r.calibration}})
                                                        : foe::json::Value(nullptr)}});
    const foe::json::Value doc = foe::json::Object{{"command", command},
                                                   {"requests", o.trace.requests},
                                                   {"rate", o.trace.rate},
                                                   {"slots", o.slots},
                                                   {"page_size", o.page_size},
                                                   {"token_budget", o.token_budget},
                                                   {"backend", o.cuda ? "cuda" : "host"},
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
        if (o.simulate) return simulate_gpus(o, argc, argv);
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
