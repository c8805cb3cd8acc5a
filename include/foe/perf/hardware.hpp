#pragma once
// Hardware profiles for the cost model (foe/perf/cost_model.hpp), and the measured kernel rates
// that can replace a profile's roofline rates.
//
// A profile is what the datasheets promise for one GPU and its links; the cost model turns it
// into times. Every number below names its source; numbers that no datasheet gives (latencies,
// the routing imbalance) are marked as assumptions. Units are SI throughout: FLOP/s, bytes/s,
// seconds.
//
// Measured rates come from Google Benchmark JSON (bench/results/*.json, written with
// --benchmark_out_format=json): each run's "FLOP/s" or "bytes/s" counter. They replace the
// roofline rate of the kernel class they measure, so a projection can start from datasheets and
// move to measurements kernel by kernel.

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"

namespace foe::perf {

/// How an all-reduce moves its bytes inside a node.
enum class AllReduceAlgorithm : std::uint8_t {
    ring,       ///< reduce-scatter + all-gather around a ring: 2 (P-1)/P n bytes sent per rank
    in_switch,  ///< NVLink SHARP (NCCL's NVLS): each rank sends n to the switch and receives n back
};

/// How an all-to-all is scheduled.
enum class AllToAllAlgorithm : std::uint8_t {
    pairwise,  ///< P-1 rounds, one peer per round; each round pays the latency of its peer's link
};

[[nodiscard]] constexpr std::string_view to_string(AllReduceAlgorithm a) noexcept
{
    return a == AllReduceAlgorithm::ring ? "ring" : "in_switch";
}
[[nodiscard]] constexpr std::string_view to_string(AllToAllAlgorithm) noexcept { return "pairwise"; }

/// One class of link, as seen by one GPU.
struct Link {
    double bandwidth = 0.0;  ///< bytes/s one GPU can send (and, at the same time, receive)
    double latency = 0.0;    ///< seconds per step of a collective algorithm over this link
};

/// One GPU model in a node of identical GPUs, and the links between them.
struct HardwareProfile {
    std::string name;
    double peak_flops = 0.0;     ///< dense bf16 tensor-core FLOP/s per GPU (infinite: compute is free)
    double hbm_bandwidth = 0.0;  ///< bytes/s per GPU (infinite: memory traffic is free)
    Link intra_node;             ///< GPU to GPU inside a node (NVLink through NVSwitch)
    Link inter_node;             ///< GPU to GPU across nodes (InfiniBand, one NIC per GPU)
    index_t gpus_per_node = 0;
    AllReduceAlgorithm all_reduce = AllReduceAlgorithm::ring;
    AllToAllAlgorithm all_to_all = AllToAllAlgorithm::pairwise;
    /// Expert parallelism's routing imbalance: tokens on the busiest rank over the mean. It scales
    /// the expert compute and the all-to-all of every expert-parallel dispatch over more than one
    /// rank. 1 is perfectly balanced routing (the paper's formulas assume it).
    double load_imbalance = 1.0;

    /// Throws InvalidArgument naming the first field that cannot work and its value.
    void validate() const;
};

/// 8x H100 SXM5 (80 GB) per node with NVSwitch, one 400 Gb/s InfiniBand NIC per GPU: the
/// paper's testbed (PAPER.md 4.1), as NVIDIA's DGX H100 / HGX H100 reference design.
[[nodiscard]] HardwareProfile h100_sxm_8x_ib();

/// 8x H200 SXM (141 GB) per node: H100's compute and NVLink, faster HBM3e.
[[nodiscard]] HardwareProfile h200_8x_ib();

/// The paper's bandwidth-only limit: no compute or memory time, no latency, balanced routing,
/// ring all-reduce, and B_intra / B_inter = intra_over_inter (r; the paper uses 15 to 20). The
/// intra-node bandwidth is kept from `base`, so times stay in seconds.
[[nodiscard]] HardwareProfile bandwidth_only(HardwareProfile base, double intra_over_inter);

/// A shipped profile by name: "h100" (h100_sxm_8x_ib) or "h200" (h200_8x_ib); InvalidArgument
/// listing the names otherwise.
[[nodiscard]] HardwareProfile hardware_profile(std::string_view name);

/// The names hardware_profile() accepts.
[[nodiscard]] std::vector<std::string> hardware_profile_names();

// --- measured kernel rates ---------------------------------------------------------------------

/// Achieved rates of the kernels the cost model times. An empty field keeps the profile's
/// roofline rate (peak_flops, hbm_bandwidth) for that kernel class.
struct KernelRates {
    std::optional<double> dense_flops;       ///< FLOP/s of dense GEMMs: q/k/v/o projections, router
    std::optional<double> attention_flops;   ///< FLOP/s of the causal attention core (QK^T and PV)
    std::optional<double> expert_flops;      ///< FLOP/s of the grouped SwiGLU expert GEMMs
    std::optional<double> memory_bandwidth;  ///< bytes/s of memory-bound kernels (norms, permute, combine)
    /// Seconds every layer costs per forward whatever its size (kernel launches, thread
    /// synchronisation): what dominates a small model's decode step. Not read from benchmark
    /// JSON; calibrated from whole forwards (foe_serve --predict).
    std::optional<double> layer_overhead;

    [[nodiscard]] bool empty() const noexcept
    {
        return !dense_flops && !attention_flops && !expert_flops && !memory_bandwidth && !layer_overhead;
    }
};

/// Which benchmark runs measure which kernel class: name substrings, matched case-insensitively.
/// A run's "FLOP/s" goes to the first compute class one of whose substrings its name contains,
/// in the order expert, attention, dense ("expert_gemm" is an expert kernel, not a dense one);
/// its "bytes/s" goes to memory_bandwidth when its name matches `memory`. Where several runs
/// match a class, the fastest wins: the large-batch rate, so the projection is optimistic for
/// batches smaller than the benchmark's largest.
struct KernelRateSelectors {
    std::vector<std::string> expert{"expert", "swiglu"};
    std::vector<std::string> attention{"attention"};
    std::vector<std::string> dense{"gemm", "projection", "dense"};
    std::vector<std::string> memory{"rmsnorm", "permute", "combine"};
};

/// The kernel rates in a Google Benchmark JSON document ({"benchmarks": [{"name": ..., "FLOP/s":
/// ...}, ...]}). Runs that failed (error_occurred) and spread aggregates (stddev, cv) are skipped.
/// FormatError (naming source_name and the run) when the text is not such a document, when a
/// matched counter is not a positive finite number, or when no run matches any class.
[[nodiscard]] KernelRates parse_kernel_rates(std::string_view json_text, std::string_view source_name,
                                             const KernelRateSelectors& selectors = {});

/// parse_kernel_rates() of a file; IoError when it cannot be read.
[[nodiscard]] KernelRates load_kernel_rates(const std::filesystem::path& file, const KernelRateSelectors& selectors = {});

// =============================================================================================
// Definitions
// =============================================================================================

namespace detail {

// Unit conversions, so that every datasheet number below reads as printed.
inline constexpr double tera = 1e12;
inline constexpr double giga = 1e9;
inline constexpr double micro = 1e-6;
inline constexpr double bits_per_byte = 8.0;

}  // namespace detail

inline void HardwareProfile::validate() const
{
    // Rates may be infinite (the bandwidth-only limit makes compute free) but never NaN or <= 0.
    auto rate = [&](std::string_view field, double v) {
        require<InvalidArgument>(!std::isnan(v) && v > 0.0, "hardware profile \"", name, "\": ", field, " (", v,
                                 ") must be a positive number");
    };
    auto latency = [&](std::string_view field, double v) {
        require<InvalidArgument>(std::isfinite(v) && v >= 0.0, "hardware profile \"", name, "\": ", field, " (", v,
                                 ") must be a finite number of seconds, zero or more");
    };
    rate("peak_flops", peak_flops);
    rate("hbm_bandwidth", hbm_bandwidth);
    rate("intra_node.bandwidth", intra_node.bandwidth);
    rate("inter_node.bandwidth", inter_node.bandwidth);
    latency("intra_node.latency", intra_node.latency);
    latency("inter_node.latency", inter_node.latency);
    require<InvalidArgument>(gpus_per_node > 0, "hardware profile \"", name, "\": gpus_per_node (", gpus_per_node,
                             ") must be positive");
    require<InvalidArgument>(std::isfinite(load_imbalance) && load_imbalance >= 1.0, "hardware profile \"", name,
                             "\": load_imbalance (", load_imbalance,
                             ") must be a finite ratio max/mean of at least 1");
}

inline HardwareProfile h100_sxm_8x_ib()
{
    using namespace detail;
    HardwareProfile p;
    p.name = "h100-sxm-8x-ib";
    // NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS "with
    // sparsity" (2:4); dense is half of that.
    p.peak_flops = 1979.0 * tera / 2.0;
    // Same datasheet: GPU memory bandwidth 3.35 TB/s (HBM3).
    p.hbm_bandwidth = 3.35 * tera;
    // Same datasheet: NVLink 900 GB/s per GPU, counted in both directions (18 NVLink 4 links x
    // 25 GB/s x 2), so 450 GB/s each way; NVSwitch gives every GPU pair the full rate.
    p.intra_node.bandwidth = 450.0 * giga;
    // Assumption: NCCL's tuning model (NVIDIA/nccl src/graph/tuning.cc, hwLat, Ring/LL128) costs
    // one ring step at 1.9 us over NVLink and 4.0 us over the network. Real latencies depend on
    // the protocol NCCL picks per message size (0.5 to 10 us).
    p.intra_node.latency = 1.9 * micro;
    // NVIDIA DGX H100 datasheet: 8x single-port ConnectX-7, 400 Gb/s InfiniBand (NDR), one per
    // GPU for the compute fabric: 400 Gb/s / 8 = 50 GB/s each way per GPU.
    p.inter_node.bandwidth = 400.0 * giga / bits_per_byte;
    p.inter_node.latency = 4.0 * micro;  // assumption, as intra_node.latency
    p.gpus_per_node = 8;  // DGX H100 / HGX H100 8-GPU; the paper's nodes (PAPER.md 4.1)
    // Ring is what DESIGN.md 2.1 and the counting communicator count; in_switch (NVLS, which
    // H100's third-generation NVSwitch supports) is the alternative a user selects.
    p.all_reduce = AllReduceAlgorithm::ring;
    p.all_to_all = AllToAllAlgorithm::pairwise;
    // The paper's measurement for standard EP, max/median tokens per GPU (PAPER.md 4.5, Fig. 4b),
    // used here as max/mean: an assumption that the two are close.
    p.load_imbalance = 1.64;
    return p;
}

inline HardwareProfile h200_8x_ib()
{
    using namespace detail;
    HardwareProfile p = h100_sxm_8x_ib();  // same compute, NVLink, node and fabric
    p.name = "h200-8x-ib";
    // NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS with sparsity (as
    // H100), GPU memory bandwidth 4.8 TB/s (HBM3e), NVLink 900 GB/s. The fabric (one 400 Gb/s
    // ConnectX-7 per GPU) is HGX H200's reference design, as for H100.
    p.hbm_bandwidth = 4.8 * tera;
    return p;
}

inline HardwareProfile bandwidth_only(HardwareProfile base, double intra_over_inter)
{
    require<InvalidArgument>(std::isfinite(intra_over_inter) && intra_over_inter > 0.0,
                             "the bandwidth ratio B_intra/B_inter (", intra_over_inter,
                             ") must be a positive finite number");
    base.validate();
    constexpr double free = std::numeric_limits<double>::infinity();
    base.name += "-bandwidth-only";
    base.peak_flops = free;
    base.hbm_bandwidth = free;
    base.intra_node.latency = 0.0;
    base.inter_node.latency = 0.0;
    base.inter_node.bandwidth = base.intra_node.bandwidth / intra_over_inter;
    base.all_reduce = AllReduceAlgorithm::ring;
    base.load_imbalance = 1.0;
    return base;
}

inline std::vector<std::string> hardware_profile_names() { return {"h100", "h200"}; }

inline HardwareProfile hardware_profile(std::string_view name)
{
    if (name == "h100") return h100_sxm_8x_ib();
    if (name == "h200") return h200_8x_ib();
    std::string names;
    for (const auto& n : hardware_profile_names()) names += (names.empty() ? "" : ", ") + n;
    raise<InvalidArgument>("unknown hardware profile \"", name, "\"; known profiles: ", names);
}

namespace detail {

[[nodiscard]] inline bool contains_any(std::string_view name, const std::vector<std::string>& needles)
{
    auto lower = [](std::string_view s) {
        std::string out(s);
        for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        return out;
    };
    const std::string haystack = lower(name);
    return std::any_of(needles.begin(), needles.end(), [&](const std::string& n) {
        return !n.empty() && haystack.find(lower(n)) != std::string::npos;
    });
}

/// Raises `best` to the counter `key` of `run`, if the run has it; FormatError if it is not a
/// positive finite number.
inline void take_fastest(std::optional<double>& best, const json::Value& run, std::string_view key,
                         std::string_view run_name, std::string_view source)
{
    const json::Value* v = run.find(key);
    if (v == nullptr) return;
    const double rate = v->is_number() ? v->as_double() : std::numeric_limits<double>::quiet_NaN();
    require<FormatError>(std::isfinite(rate) && rate > 0.0, source, ": benchmark ", json::detail::describe_text(run_name),
                         ": \"", key, "\" is ", json::detail::describe(*v, 40), ", not a positive number");
    best = std::max(best.value_or(0.0), rate);
}

}  // namespace detail

inline KernelRates parse_kernel_rates(std::string_view json_text, std::string_view source_name,
                                      const KernelRateSelectors& selectors)
{
    const json::Value doc = json::parse(json_text, source_name);
    const json::Value* runs = doc.is_object() ? doc.find("benchmarks") : nullptr;
    require<FormatError>(runs != nullptr && runs->is_array(), source_name,
                         ": no \"benchmarks\" array (expected Google Benchmark's JSON output)");
    KernelRates rates;
    for (const json::Value& run : runs->as_array()) {
        const json::Value* name = run.is_object() ? run.find("name") : nullptr;
        require<FormatError>(name != nullptr && name->is_string(), source_name,
                             ": a benchmark entry without a string \"name\": ", json::detail::describe(run, 60));
        const std::string& n = name->as_string();
        const json::Value* failed = run.find("error_occurred");
        if (failed != nullptr && failed->is_bool() && failed->as_bool()) continue;
        // Repetitions add aggregates; only the central ones are rates.
        const json::Value* aggregate = run.find("aggregate_name");
        if (aggregate != nullptr && aggregate->is_string() && aggregate->as_string() != "mean" &&
            aggregate->as_string() != "median")
            continue;
        if (detail::contains_any(n, selectors.expert))
            detail::take_fastest(rates.expert_flops, run, "FLOP/s", n, source_name);
        else if (detail::contains_any(n, selectors.attention))
            detail::take_fastest(rates.attention_flops, run, "FLOP/s", n, source_name);
        else if (detail::contains_any(n, selectors.dense))
            detail::take_fastest(rates.dense_flops, run, "FLOP/s", n, source_name);
        if (detail::contains_any(n, selectors.memory))
            detail::take_fastest(rates.memory_bandwidth, run, "bytes/s", n, source_name);
    }
    require<FormatError>(!rates.empty(), source_name,
                         ": no benchmark run names an expert, attention, dense or memory-bound kernel with a "
                         "\"FLOP/s\" or \"bytes/s\" counter; nothing to replace the roofline rates with");
    return rates;
}

inline KernelRates load_kernel_rates(const std::filesystem::path& file, const KernelRateSelectors& selectors)
{
    // Benchmark result files are small; the limit only guards against pointing at a model file.
    constexpr std::uintmax_t max_bytes = std::uintmax_t{64} << 20;
    const std::vector<std::byte> bytes = foe::detail::io::read_whole_file(file, max_bytes, "benchmark JSON");
    const std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return parse_kernel_rates(text, foe::detail::io::display(file), selectors);
}

}  // namespace foe::perf
