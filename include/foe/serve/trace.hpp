#pragma once
// Request traces for serving runs and simulations, and the latency statistics of a run.
//
// A trace is a list of (arrival, prompt tokens, output tokens). make_trace() draws one: Poisson
// arrivals at `rate` requests per second (exponential gaps), prompt and output lengths from a
// LengthDistribution:
//   fixed:N        every request N tokens
//   uniform:A:B    uniform in [A, B]
//   longbench      a LongBench-like mix (below)
// read_trace() reads one from a CSV file: `arrival_s,prompt_tokens,output_tokens` per line, '#'
// comments; every value is checked.
//
// The LongBench-like mix. The paper serves "LongBench requests" without saying which tasks,
// lengths or output lengths (PAPER.md 4.1). Ours picks one of LongBench's 15 English and code
// tasks uniformly; its prompt is the task's average length in words (THUDM/LongBench task.md)
// x 1.3 tokens per word x a log-normal factor (sigma 0.5, median 1), clipped to
// [64, max_prompt]; its output is the task's generation limit (config/dataset2maxlen.json), as
// LongBench's pred.py asks for. Mean prompt before clipping: 11,370 tokens; outputs 32 to 512.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/rng.hpp"
#include "foe/core/types.hpp"
#include "foe/serve/scheduler.hpp"

namespace foe::serve {

struct TraceEntry {
    double arrival = 0.0;
    index_t prompt_tokens = 0;
    index_t output_tokens = 0;
};

/// One LongBench task: its average prompt length in words and its generation limit in tokens.
struct LongBenchTask {
    std::string_view name;
    index_t words;
    index_t max_new_tokens;
};

/// LongBench's English and code tasks (task.md; dataset2maxlen.json).
inline constexpr LongBenchTask longbench_tasks[] = {
    {"hotpotqa", 9149, 32},       {"2wikimqa", 4885, 32},      {"musique", 7798, 32},
    {"multifieldqa_en", 4559, 64}, {"narrativeqa", 18405, 128}, {"qasper", 3619, 128},
    {"gov_report", 8169, 512},    {"qmsum", 10546, 512},       {"triviaqa", 8015, 32},
    {"nq", 8210, 32},             {"trec", 5176, 64},          {"passage_retrieval_en", 9288, 32},
    {"passage_count", 11141, 32}, {"lcc", 1235, 64},           {"repobench-p", 5622, 64},
};
inline constexpr double longbench_tokens_per_word = 1.3;
inline constexpr double longbench_sigma = 0.5;

struct LengthDistribution {
    enum class Kind : std::uint8_t { fixed, uniform, longbench } kind = Kind::fixed;
    index_t low = 1, high = 1;

    /// "fixed:N", "uniform:A:B" or "longbench"; InvalidArgument naming the text otherwise.
    [[nodiscard]] static LengthDistribution parse(std::string_view text)
    {
        auto number = [&](std::string_view s) {
            index_t v = 0;
            require<InvalidArgument>(!s.empty() && s.size() < 12 && s.find_first_not_of("0123456789") == std::string_view::npos,
                                     "length distribution \"", text, "\": \"", s, "\" is not a positive integer");
            for (char c : s) v = 10 * v + (c - '0');
            require<InvalidArgument>(v > 0, "length distribution \"", text, "\": lengths must be positive");
            // The bound read_trace() puts on a file's lengths.
            require<InvalidArgument>(v < (index_t{1} << 31), "length distribution \"", text, "\": ", v,
                                     " tokens is not below 2^31");
            return v;
        };
        LengthDistribution d;
        if (text == "longbench") {
            d.kind = Kind::longbench;
        } else if (text.starts_with("fixed:")) {
            d.low = d.high = number(text.substr(6));
        } else if (text.starts_with("uniform:")) {
            const std::string_view rest = text.substr(8);
            const auto colon = rest.find(':');
            require<InvalidArgument>(colon != std::string_view::npos, "length distribution \"", text,
                                     "\": write uniform:A:B");
            d.kind = Kind::uniform;
            d.low = number(rest.substr(0, colon));
            d.high = number(rest.substr(colon + 1));
            require<InvalidArgument>(d.low <= d.high, "length distribution \"", text, "\": A (", d.low,
                                     ") is larger than B (", d.high, ")");
        } else {
            raise<InvalidArgument>("length distribution \"", text, "\" is not one of fixed:N, uniform:A:B, longbench");
        }
        return d;
    }
};

struct TraceSpec {
    index_t requests = 16;
    double rate = 1.0;  ///< requests per second (Poisson)
    std::uint64_t seed = 1;
    LengthDistribution prompt = LengthDistribution::parse("uniform:16:128");
    LengthDistribution output = LengthDistribution::parse("uniform:4:32");
    index_t max_prompt = 8192;  ///< longbench prompts are clipped to this
};

/// Draws a trace; the same spec gives the same trace on every machine.
[[nodiscard]] inline std::vector<TraceEntry> make_trace(const TraceSpec& spec)
{
    require<InvalidArgument>(spec.requests > 0, "a trace needs at least one request (got ", spec.requests, ")");
    require<InvalidArgument>(std::isfinite(spec.rate) && spec.rate > 0.0, "the arrival rate (", spec.rate,
                             " requests/s) must be positive");
    require<InvalidArgument>(spec.max_prompt >= 64, "max_prompt (", spec.max_prompt, ") must be at least 64");
    const CounterRng rng(spec.seed, 0x7ace);
    std::vector<TraceEntry> out;
    double t = 0.0;
    constexpr auto tasks = static_cast<index_t>(std::size(longbench_tasks));
    for (index_t i = 0; i < spec.requests; ++i) {
        const auto at = [&](std::uint64_t k) { return static_cast<std::uint64_t>(8 * i) + k; };
        // Exponential gap; the first request arrives at 0.
        if (i > 0) t += -std::log(1.0 - static_cast<double>(rng.uniform01(at(0)))) / spec.rate;
        const LongBenchTask& task = longbench_tasks[rng.bits(at(1)) % static_cast<std::uint64_t>(tasks)];
        auto draw = [&](const LengthDistribution& d, std::uint64_t k, bool prompt) -> index_t {
            switch (d.kind) {
            case LengthDistribution::Kind::fixed: return d.low;
            case LengthDistribution::Kind::uniform:
                return d.low + static_cast<index_t>(rng.bits(at(k)) % static_cast<std::uint64_t>(d.high - d.low + 1));
            case LengthDistribution::Kind::longbench:
                if (!prompt) return task.max_new_tokens;
                {
                    const double tokens = static_cast<double>(task.words) * longbench_tokens_per_word *
                                          std::exp(longbench_sigma * static_cast<double>(rng.normal(at(k))));
                    return std::clamp(static_cast<index_t>(std::llround(tokens)), index_t{64}, spec.max_prompt);
                }
            }
            return d.low;
        };
        out.push_back({t, draw(spec.prompt, 2, true), draw(spec.output, 3, false)});
    }
    return out;
}

/// Reads `arrival_s,prompt_tokens,output_tokens` lines ('#' starts a comment). InvalidArgument
/// naming the file and line for anything else, or arrivals that go back in time.
[[nodiscard]] inline std::vector<TraceEntry> read_trace(const std::filesystem::path& path)
{
    std::ifstream in(path);
    require<IoError>(static_cast<bool>(in), "cannot open the trace file ", path.string());
    std::vector<TraceEntry> out;
    std::string line;
    for (index_t n = 1; std::getline(in, line); ++n) {
        if (const auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        TraceEntry e;
        char c1 = 0, c2 = 0;
        long long p = 0, o = 0;
        int used = -1;  // characters read: the rest of the line must be blank ("1,2,3.5" is not 3 tokens)
        const int got = std::sscanf(line.c_str(), " %lf %c %lld %c %lld %n", &e.arrival, &c1, &p, &c2, &o, &used);
        require<InvalidArgument>(got == 5 && c1 == ',' && c2 == ',' && used >= 0 &&
                                     line.find_first_not_of(" \t\r", static_cast<std::size_t>(used)) == std::string::npos,
                                 path.string(), ":", n, ": expected arrival_s,prompt_tokens,output_tokens, got \"", line, "\"");
        require<InvalidArgument>(std::isfinite(e.arrival) && e.arrival >= 0.0, path.string(), ":", n, ": the arrival ",
                                 e.arrival, " is not a finite time >= 0 s, in \"", line, "\"");
        require<InvalidArgument>(p > 0 && o > 0 && p < (1LL << 31) && o < (1LL << 31), path.string(), ":", n,
                                 ": token counts must be in [1, 2^31), got ", p, " and ", o, " in \"", line, "\"");
        // (require's arguments are all evaluated: out.back() only when there is one.)
        if (!out.empty())
            require<InvalidArgument>(e.arrival >= out.back().arrival, path.string(), ":", n,
                                     ": arrivals must not go back in time (", e.arrival, " after ", out.back().arrival, ")");
        e.prompt_tokens = p;
        e.output_tokens = o;
        out.push_back(e);
    }
    require<InvalidArgument>(!out.empty(), "the trace file ", path.string(), " holds no request");
    return out;
}

/// Mean and percentiles of a sample (nearest rank).
struct Distribution {
    double mean = 0.0, p50 = 0.0, p90 = 0.0, p99 = 0.0;
    std::size_t count = 0;

    [[nodiscard]] static Distribution of(std::vector<double> v)
    {
        Distribution d;
        d.count = v.size();
        if (v.empty()) return d;
        std::sort(v.begin(), v.end());
        double sum = 0.0;
        for (double x : v) sum += x;
        d.mean = sum / static_cast<double>(v.size());
        auto rank = [&](double q) {
            const auto i = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size())));
            return v[std::min(v.size() - 1, i == 0 ? 0 : i - 1)];
        };
        d.p50 = rank(0.50);
        d.p90 = rank(0.90);
        d.p99 = rank(0.99);
        return d;
    }
};

/// A run's latencies: TTFT per request; TBT as each request's mean gap between its tokens (the
/// paper's "mean time per generated token during decode"), over the requests with two tokens or
/// more; E2E from arrival to the last token; throughput in generated tokens per second.
struct ServingSummary {
    Distribution ttft, tbt, e2e;
    double duration = 0.0;  ///< first arrival to last token
    double tokens_per_second = 0.0;
    index_t preemptions = 0;

    [[nodiscard]] static ServingSummary of(const std::vector<RequestRecord>& records)
    {
        ServingSummary s;
        std::vector<double> ttft, tbt, e2e;
        double first = records.empty() ? 0.0 : records.front().arrival, last = first;
        index_t tokens = 0;
        for (const auto& r : records) {
            if (r.token_times.empty()) continue;
            ttft.push_back(r.ttft());
            e2e.push_back(r.token_times.back() - r.arrival);
            if (r.token_times.size() > 1)
                tbt.push_back((r.token_times.back() - r.token_times.front()) / static_cast<double>(r.token_times.size() - 1));
            first = std::min(first, r.arrival);
            last = std::max(last, r.token_times.back());
            tokens += static_cast<index_t>(r.tokens.size());
            s.preemptions += r.preemptions;
        }
        s.ttft = Distribution::of(std::move(ttft));
        s.tbt = Distribution::of(std::move(tbt));
        s.e2e = Distribution::of(std::move(e2e));
        s.duration = last - first;
        s.tokens_per_second = s.duration > 0.0 ? static_cast<double>(tokens) / s.duration : 0.0;
        return s;
    }
};

}  // namespace foe::serve
