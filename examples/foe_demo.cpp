// foe_demo: a small FoE model and the same-size standard MoE model, side by side on the host.
//
// Both models are built from seeded random weights of the "foe-small" / "moe-small" shapes (same
// d, heads, experts, k; FoE splits them into H = 8 groups). Each runs a prefill of the prompt and
// then greedy decode steps; the demo prints time to first token (the prefill) and time per
// output token (one decode step), the median over a few repeats.
//
//   foe_demo [--prompt N] [--new N] [--repeats R]
//
// On one process FoE has nothing to save: its win is communication (DESIGN.md 2), which the
// distributed runs measure. Here the two should take about the same time.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "foe/foe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

struct Timing {
    double ttft_ms = 0.0;  ///< prefill of the prompt, which yields the first token
    double tpot_ms = 0.0;  ///< one decode step
    std::vector<std::int32_t> generated;
};

double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

Timing measure(const std::string& name, foe::index_t prompt_len, foe::index_t new_tokens, int repeats)
{
    // Progress goes to a terminal only, so piped output stays a clean table.
    const bool show_progress = isatty(fileno(stderr)) != 0;
    using clock = std::chrono::steady_clock;
    const auto config = foe::named_config(name);
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 2026));
    foe::ModelOptions options;
    options.cache_capacity = prompt_len + new_tokens;
    const auto model = foe::make_model(weights, options);
    std::vector<std::int32_t> prompt(static_cast<std::size_t>(prompt_len));
    const foe::CounterRng rng(1, 2);
    for (std::size_t i = 0; i < prompt.size(); ++i)
        prompt[i] = static_cast<std::int32_t>(rng.bits(i) % static_cast<std::uint64_t>(config.vocab_size));

    std::vector<double> ttft, tpot;
    Timing t;
    for (int r = 0; r < repeats; ++r) {
        if (show_progress) std::fprintf(stderr, "\r%-10s repeat %d/%d", name.c_str(), r + 1, repeats);
        const auto t0 = clock::now();
        const auto logits = model->prefill(prompt);
        const auto t1 = clock::now();
        ttft.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        const auto last = std::span(logits.values()).last(static_cast<std::size_t>(config.vocab_size));
        std::vector<std::int32_t> generated{static_cast<std::int32_t>(std::max_element(last.begin(), last.end()) - last.begin())};
        for (foe::index_t n = 1; n < new_tokens; ++n) {
            const auto s0 = clock::now();
            const auto next = model->decode(generated.back());
            tpot.push_back(std::chrono::duration<double, std::milli>(clock::now() - s0).count());
            generated.push_back(static_cast<std::int32_t>(std::max_element(next.begin(), next.end()) - next.begin()));
        }
        t.generated = generated;
    }
    if (show_progress) std::fprintf(stderr, "\r%-30s\r", "");
    t.ttft_ms = median(ttft);
    t.tpot_ms = tpot.empty() ? 0.0 : median(tpot);
    return t;
}

foe::index_t parse_positive(const char* text, const char* flag)
{
    char* end = nullptr;
    const long long v = std::strtoll(text, &end, 10);
    if (end == text || *end != '\0' || v <= 0) {
        std::fprintf(stderr, "foe_demo: %s needs a positive integer, got \"%s\"\n", flag, text);
        std::exit(2);
    }
    return v;
}

}  // namespace

int main(int argc, char** argv)
{
    foe::index_t prompt_len = 256, new_tokens = 32;
    int repeats = 3;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::puts("usage: foe_demo [--prompt N (256)] [--new N (32)] [--repeats R (3)]");
            return 0;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "foe_demo: %s needs a value (or is unknown); see --help\n", argv[i]);
            return 2;
        }
        if (flag == "--prompt") prompt_len = parse_positive(argv[++i], "--prompt");
        else if (flag == "--new") new_tokens = parse_positive(argv[++i], "--new");
        else if (flag == "--repeats") repeats = static_cast<int>(parse_positive(argv[++i], "--repeats"));
        else {
            std::fprintf(stderr, "foe_demo: unknown option %s; see --help\n", argv[i]);
            return 2;
        }
    }

    try {
        int threads = 1;
#if defined(_OPENMP)
        threads = omp_get_max_threads();
#endif
        const char* gemm = foe::gemm::BatchInvariant::kernel_name();
        std::printf("foe demo: host backend, %d thread(s), batch-invariant GEMM (%s); prompt %lld tokens, %lld generated, median of %d\n\n",
                    threads, gemm, static_cast<long long>(prompt_len), static_cast<long long>(new_tokens), repeats);
        std::printf("%-10s %12s %4s %4s %12s %12s   %s\n", "model", "parameters", "H", "k/H", "TTFT (ms)",
                    "TPOT (ms)", "first generated tokens");
        Timing results[2];
        const char* names[2] = {"foe-small", "moe-small"};
        for (int m = 0; m < 2; ++m) {
            const auto c = foe::named_config(names[m]);
            results[m] = measure(names[m], prompt_len, new_tokens, repeats);
            std::string first;
            for (std::size_t i = 0; i < std::min<std::size_t>(6, results[m].generated.size()); ++i)
                first += std::to_string(results[m].generated[i]) + " ";
            std::printf("%-10s %12lld %4lld %4lld %12.2f %12.3f   %s\n", names[m],
                        static_cast<long long>(c.parameter_count()), static_cast<long long>(c.groups()),
                        static_cast<long long>(c.top_k_per_group()), results[m].ttft_ms, results[m].tpot_ms,
                        first.c_str());
        }
        std::printf("\nFoE / MoE time: TTFT %.2fx, TPOT %.2fx (below 1 means FoE is faster).\n",
                    results[0].ttft_ms / results[1].ttft_ms,
                    results[1].tpot_ms > 0 ? results[0].tpot_ms / results[1].tpot_ms : 0.0);
        std::printf("On one process both do the same arithmetic; FoE's advantage is in communication across\n"
                    "ranks (one all-reduce per layer instead of two all-to-alls), see README.\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "foe_demo: error: %s\n", e.what());
        return 1;
    }
}
