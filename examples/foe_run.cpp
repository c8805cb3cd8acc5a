// foe_run: run a model directory (config.json + model.safetensors) on the host, or write a
// seeded random one.
//
//   foe_run --model DIR [--backend host|cuda] [--gemm foe|cblas|cublaslt] [--tokens 1,2,3]
//           [--max-new-tokens N] [--logits-out FILE] [--temperature T --top-k K --top-p P --seed S]
//           [--threads N] [--timings] [--ignore-eos]
//       prints {"prompt": [...], "generated": [...]} as one JSON line on stdout; --logits-out
//       writes a safetensors file with the float32 tensor "logits" [prompt_len, vocab_size].
//       Greedy by default; generation stops after the config's eos_token_id unless --ignore-eos.
//       --timings prints load time, prefill and decode tokens/s and peak RSS on stderr.
//   foe_run --init CONFIG_NAME --out DIR [--seed S] [--dtype f32|bf16|f16]
//       writes a random model directory of a named configuration (foe-1b, moe-tiny, ...)
//
// --gemm picks the dense GEMM policy: on the host foe's batch-invariant GEMM (foe, the default) or
// CBLAS (cblas, when built with it). --backend cuda runs the model on the current GPU
// (foe::cuda::CudaModel, bf16; examples/foe_run_cuda.cu, built when nvcc is found), with cuBLASLt
// (cublaslt, the default) or foe's own tensor-core GEMM (foe) for the dense projections. Under mpirun (when built with MPI) the model is spread over the ranks: an FoE model by its
// groups (foe::parallel::Strategy::foe), a standard MoE by expert parallelism with data-parallel
// attention; rank 0 prints. --ranks-per-node defaults to the launcher's local size.
//
// Generation checks every hidden state and the logits for NaN and infinity (--check-finite on,
// the default): the first one found is an error naming its layer and position, never a run of
// garbage tokens.
//
// Under mpirun every rank parses the same command line, and the ranks agree before any work: a
// usage error on any rank is reported by rank 0 naming that rank; a request that differs between
// ranks (--tokens, --max-new-tokens, --gemm, --check-finite) is an error naming the flag and the
// ranks. A collective that waits longer than --comm-timeout seconds (default 60) fails the job;
// a failed job ends (MpiSession gives MPI_Finalize a few seconds, then exits). Unless
// OMP_NUM_THREADS is set, each rank uses its share of the node's cores for OpenMP.
// FOE_RUN_FAULT_STOP_RANK=R (tests only) makes rank R stop itself with SIGSTOP before its first
// forward, as a hung rank would.
//
// Errors go to stderr with exit status 1 (2 for a usage error).

#include <sys/resource.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "foe/foe.hpp"
#include "foe/io/model_dir.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(FOE_WITH_CUDA)
#include "foe_run_cuda.hpp"
#endif
#if defined(FOE_WITH_MPI)
#include <sched.h>

#include "foe/comm/mpi_comm.hpp"
#include "foe/model/distributed.hpp"
#endif

namespace {

constexpr std::string_view usage_text =
    "usage:\n"
    "  foe_run --model DIR [--backend host|cuda] [--gemm G] [--tokens 1,2,3] [--max-new-tokens N]\n"
    "          [--logits-out FILE] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--ignore-eos]\n"
    "          [--threads N] [--timings] [--mmap on|off] [--check-finite on|off] [--comm-timeout S]\n"
    "  foe_run --init CONFIG_NAME --out DIR [--seed S] [--dtype f32|bf16|f16]\n"
    "\n"
    "  --model DIR           model directory with config.json and model.safetensors\n"
    "  --backend B           host (fp32, default) or cuda (bf16 on the current GPU; one process)\n"
    "  --gemm G              dense GEMMs: host foe (batch-invariant, default) or cblas;\n"
    "                        cuda cublaslt (default) or foe (own tensor-core kernel)\n"
    "  --tokens LIST         prompt token ids, comma separated (default: 0)\n"
    "  --max-new-tokens N    tokens to generate at most (default: 8)\n"
    "  --temperature T       sampling temperature (default: 0, greedy)\n"
    "  --top-k K             sample among the K most likely tokens (default: 0, all)\n"
    "  --top-p P             sample among the most likely tokens whose probability reaches P (default: 1)\n"
    "  --ignore-eos          generate --max-new-tokens even past the config's eos_token_id\n"
    "  --threads N           OpenMP threads (default: OMP_NUM_THREADS, else every core; under mpirun a share)\n"
    "  --timings             print load time, prefill and decode tokens/s, peak RSS and the weights'\n"
    "                        bytes the process holds on stderr (under mpirun: every rank's)\n"
    "  --mmap on|off         use the weight files in place, mapped (default: on), or read them into memory\n"
    "  --logits-out FILE     write the prompt's logits as safetensors tensor \"logits\" [prompt, vocab]\n"
    "  --init NAME           write a random model of a named configuration\n"
    "  --out DIR             where --init writes\n"
    "  --seed S              with --init the weights' seed, with --model the sampling seed (default: 0)\n"
    "  --dtype T             storage type of the written weights (default: f32)\n"
    "  --check-finite on|off check hidden states and logits for NaN/infinity (default: on)\n"
    "  --ranks-per-node R    under mpirun: ranks per node (default: the launcher's local size)\n"
    "  --comm-timeout S      under mpirun: seconds a rank waits in one collective (default: 60)\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::optional<std::string> model, init, out, logits_out;
    std::vector<std::int32_t> tokens{0};
    foe::index_t max_new_tokens = 8;
    std::uint64_t seed = 0;
    foe::DType dtype = foe::DType::f32;
    int ranks_per_node = 0;  // 0: from the launcher
    bool cuda = false;
    std::string gemm;        // --gemm; empty: the backend's default
    bool check_finite = true;
    double comm_timeout = 60.0;  // seconds
    bool help = false;
    foe::SamplingOptions sampling;  // its seed is --seed
    bool ignore_eos = false;
    int threads = 0;  // 0: OpenMP's default
    bool timings = false;
    bool mmap = true;
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

Options parse_args(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            o.help = true;
            return o;
        }
        if (flag == "--timings" || flag == "--ignore-eos") {  // switches without a value
            (flag == "--timings" ? o.timings : o.ignore_eos) = true;
            continue;
        }
        if (i + 1 >= argc) throw UsageError(foe::detail::concat(flag, " needs a value (or is unknown)"));
        const std::string_view value = argv[++i];
        if (flag == "--model") {
            o.model = std::string(value);
        } else if (flag == "--tokens") {
            o.tokens.clear();
            std::size_t begin = 0;
            while (begin <= value.size()) {
                const std::size_t comma = std::min(value.find(',', begin), value.size());
                std::string_view item = value.substr(begin, comma - begin);  // "1, 2, 3" is fine too
                while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
                while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
                o.tokens.push_back(parse_number<std::int32_t>(item, "--tokens"));
                begin = comma + 1;
            }
        } else if (flag == "--max-new-tokens") {
            o.max_new_tokens = parse_number<foe::index_t>(value, flag);
            if (o.max_new_tokens < 0) throw UsageError("--max-new-tokens must not be negative");
        } else if (flag == "--logits-out") {
            o.logits_out = std::string(value);
        } else if (flag == "--init") {
            o.init = std::string(value);
        } else if (flag == "--out") {
            o.out = std::string(value);
        } else if (flag == "--backend") {
            if (value != "host" && value != "cuda")
                throw UsageError(foe::detail::concat("--backend: \"", value, "\" is not one of host, cuda"));
            o.cuda = value == "cuda";
        } else if (flag == "--gemm") {
            o.gemm = std::string(value);
        } else if (flag == "--temperature") {
            o.sampling.temperature = parse_number<double>(value, flag);
        } else if (flag == "--top-k") {
            o.sampling.top_k = parse_number<foe::index_t>(value, flag);
        } else if (flag == "--top-p") {
            o.sampling.top_p = parse_number<double>(value, flag);
        } else if (flag == "--threads") {
            o.threads = parse_number<int>(value, flag);
            if (o.threads <= 0 || o.threads > 4096) throw UsageError("--threads must be in [1, 4096]");
        } else if (flag == "--mmap") {
            if (value != "on" && value != "off")
                throw UsageError(foe::detail::concat("--mmap: \"", value, "\" is not one of on, off"));
            o.mmap = value == "on";
        } else if (flag == "--check-finite") {
            if (value != "on" && value != "off")
                throw UsageError(foe::detail::concat("--check-finite: \"", value, "\" is not one of on, off"));
            o.check_finite = value == "on";
        } else if (flag == "--comm-timeout") {
            o.comm_timeout = parse_number<double>(value, flag);
            if (!(o.comm_timeout > 0.0 && o.comm_timeout <= 1e6))
                throw UsageError(foe::detail::concat("--comm-timeout (", value, ") must be in (0, 1e6] seconds"));
        } else if (flag == "--ranks-per-node") {
            o.ranks_per_node = parse_number<int>(value, flag);
            if (o.ranks_per_node <= 0) throw UsageError("--ranks-per-node must be positive");
        } else if (flag == "--seed") {
            o.seed = parse_number<std::uint64_t>(value, flag);
        } else if (flag == "--dtype") {
            if (value == "f32") o.dtype = foe::DType::f32;
            else if (value == "bf16") o.dtype = foe::DType::bf16;
            else if (value == "f16") o.dtype = foe::DType::f16;
            else throw UsageError(foe::detail::concat("--dtype: \"", value, "\" is not one of f32, bf16, f16"));
        } else {
            throw UsageError(foe::detail::concat("unknown option ", flag));
        }
    }
    if (o.model.has_value() == o.init.has_value()) throw UsageError("give exactly one of --model and --init");
    o.sampling.seed = o.seed;
    try {
        o.sampling.validate();
    } catch (const foe::InvalidArgument& e) {
        throw UsageError(e.what());
    }
    if (o.init && !o.out) throw UsageError("--init needs --out DIR");
    if (o.cuda && !o.gemm.empty() && o.gemm != "cublaslt" && o.gemm != "foe")
        throw UsageError(foe::detail::concat("--gemm: \"", o.gemm, "\" is not one of cublaslt, foe (--backend cuda)"));
#if defined(FOE_WITH_CBLAS)
    if (!o.cuda && !o.gemm.empty() && o.gemm != "foe" && o.gemm != "cblas")
        throw UsageError(foe::detail::concat("--gemm: \"", o.gemm, "\" is not one of foe, cblas (--backend host)"));
#else
    if (!o.cuda && !o.gemm.empty() && o.gemm != "foe")
        throw UsageError(foe::detail::concat("--gemm: \"", o.gemm, "\" is not one of foe (--backend host; this "
                                             "foe_run was built without CBLAS)"));
#endif
    return o;
}

int init_model(const Options& o)
{
    const foe::ModelConfig config = foe::named_config(*o.init);
    std::cerr << "foe_run: writing " << *o.init << " (" << config.parameter_count() << " parameters, seed " << o.seed
              << ", " << foe::dtype_name(o.dtype) << ") to " << *o.out << "\n";
    foe::save_model_dir(*o.out, foe::random_weights(config, o.seed), o.dtype);
    return 0;
}

/// The KV cache this request needs; throws when the config cannot hold it. Checked identically
/// on every rank before any collective.
foe::ModelOptions request_options(const Options& o, const foe::ModelConfig& c)
{
    // Compared without adding first: --max-new-tokens may be anything up to INT64_MAX.
    const auto prompt = static_cast<foe::index_t>(o.tokens.size());
    if (prompt > c.max_position_embeddings || o.max_new_tokens > c.max_position_embeddings - prompt)
        throw foe::CapacityError(foe::detail::concat("prompt (", o.tokens.size(), " tokens) plus --max-new-tokens (",
                                                     o.max_new_tokens, ") exceed max_position_embeddings (",
                                                     c.max_position_embeddings, ")"));
    for (std::size_t i = 0; i < o.tokens.size(); ++i)
        if (o.tokens[i] < 0 || o.tokens[i] >= c.vocab_size)
            throw foe::InvalidArgument(foe::detail::concat("token id ", o.tokens[i], " (at position ", i,
                                                           " of --tokens) is outside the vocabulary [0, ", c.vocab_size, ")"));
    foe::ModelOptions options;
    options.cache_capacity = prompt + o.max_new_tokens;  // sized for this request only
    options.check_finite = o.check_finite;
    return options;
}

void print_result(const Options& o, const std::vector<std::int32_t>& generated, const foe::Tensor<float>& logits)
{
    if (o.logits_out) {
        const foe::TensorToWrite t{"logits", foe::DType::f32, logits.shape(), logits.span()};
        foe::save_safetensors(*o.logits_out, std::span(&t, 1));
    }
    auto list = [](const std::vector<std::int32_t>& v) {
        std::string s = "[";
        for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + "]";
    };
    std::cout << "{\"prompt\": " << list(o.tokens) << ", \"generated\": " << list(generated) << "}" << std::endl;
}

/// While a model loads for more than two seconds, a line on stderr every five saying so.
class LoadProgress {
public:
    LoadProgress(std::string what, bool enabled) : what_(std::move(what))
    {
        if (!enabled) return;
        thread_ = std::thread([this] {
            std::unique_lock lock(mutex_);
            auto next = std::chrono::seconds(2);
            while (!done_cv_.wait_for(lock, next - elapsed(), [this] { return done_; })) {
                std::cerr << "foe_run: loading " << what_ << " (" << std::chrono::duration_cast<std::chrono::seconds>(elapsed()).count()
                          << " s)\n";
                next += std::chrono::seconds(5);
            }
        });
    }
    LoadProgress(const LoadProgress&) = delete;
    LoadProgress& operator=(const LoadProgress&) = delete;
    ~LoadProgress()
    {
        {
            std::lock_guard lock(mutex_);
            done_ = true;
        }
        done_cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }

private:
    [[nodiscard]] std::chrono::steady_clock::duration elapsed() const { return std::chrono::steady_clock::now() - start_; }

    std::string what_;
    std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
    std::mutex mutex_;
    std::condition_variable done_cv_;
    bool done_ = false;
    std::thread thread_;
};

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

/// --timings: what llama.cpp's tools print, on stderr.
/// This process's peak resident set, in MB.
double peak_rss_mb()
{
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports kilobytes
}

/// The bytes of the weights the process holds, in MB (what its peak RSS is measured against).
double weights_mb(const foe::ModelWeights& w)
{
    double bytes = 0.0;
    for (const auto& entry : w.tensors) bytes += static_cast<double>(entry.second.byte_size());
    return bytes / (1024.0 * 1024.0);
}

void print_timings(double load_s, foe::index_t prompt, double prefill_s, foe::index_t decoded, double decode_s,
                   double held_mb)
{
    std::fprintf(stderr, "foe_run: load %.3f s; prefill %lld tokens in %.3f s (%.1f tokens/s); decode %lld tokens in %.3f s "
                         "(%.2f tokens/s, %.2f ms/token); peak RSS %.1f MB; weights held %.1f MB\n",
                 load_s, static_cast<long long>(prompt), prefill_s, static_cast<double>(prompt) / prefill_s,
                 static_cast<long long>(decoded), decode_s, decoded > 0 ? static_cast<double>(decoded) / decode_s : 0.0,
                 decoded > 0 ? 1e3 * decode_s / static_cast<double>(decoded) : 0.0, peak_rss_mb(), held_mb);
}

/// How foe_run loads weights: mapped unless --mmap off; widened to fp32 for a GEMM that cannot
/// read bf16/fp16 (it would widen every weight on every call).
foe::LoadOptions load_options(const Options& o)
{
    foe::LoadOptions l;
    l.map_files = o.mmap;
    l.widen_to_f32 = o.gemm == "cblas";
    return l;
}

/// The tokens that end this generation: the config's EOS ids unless --ignore-eos.
std::vector<std::int32_t> stop_tokens(const Options& o, const foe::ModelConfig& c)
{
    return o.ignore_eos ? std::vector<std::int32_t>{} : c.eos_token_ids;
}

/// --threads, over OMP_NUM_THREADS and the share of the cores under mpirun.
void apply_threads(const Options& o)
{
#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(o.threads);
#else
    (void)o;
#endif
}

int run_model(const Options& o)
{
    const auto load_start = clock_type::now();
    std::shared_ptr<const foe::ModelWeights> weights;
    {
        const LoadProgress progress(*o.model, true);
        weights = std::make_shared<const foe::ModelWeights>(foe::load_model_dir(*o.model, {}, load_options(o)));
    }
    const auto options = request_options(o, weights->config);
    std::unique_ptr<foe::ModelInterface> model;
    if (o.cuda) {
#if defined(FOE_WITH_CUDA)
        model = make_cuda_model(weights, options.cache_capacity, o.gemm == "foe");
#else
        throw foe::InvalidArgument("--backend cuda: this foe_run was built without CUDA (no nvcc was found when it "
                                   "was configured)");
#endif
    } else {
#if defined(FOE_WITH_CBLAS)
        if (o.gemm == "cblas") model = foe::make_model<foe::gemm::Cblas>(weights, options);
#endif
        if (!model) model = foe::make_model(weights, options);
    }
    const double load_s = seconds_since(load_start);

    // generate(), spelled out so that prefill and decode are timed apart.
    const auto stops = stop_tokens(o, weights->config);
    foe::Sampler sampler(o.sampling);
    const auto prefill_start = clock_type::now();
    // Every prompt position's logits only when --logits-out writes them; otherwise the last.
    const auto rows = o.logits_out ? foe::LogitRows::all : foe::LogitRows::last_per_chunk;
    const foe::Tensor<float> logits = model->prefill(o.tokens, 0, rows);
    const double prefill_s = seconds_since(prefill_start);
    const auto vocab = static_cast<std::size_t>(weights->config.vocab_size);
    std::vector<float> last(logits.values().end() - static_cast<std::ptrdiff_t>(vocab), logits.values().end());
    std::vector<std::int32_t> generated;
    const auto decode_start = clock_type::now();
    foe::index_t decoded = 0;
    for (foe::index_t n = 0; n < o.max_new_tokens; ++n) {
        generated.push_back(sampler.next(last));
        if (std::find(stops.begin(), stops.end(), generated.back()) != stops.end() || n + 1 == o.max_new_tokens) break;
        last = model->decode(generated.back());
        ++decoded;
    }
    const double decode_s = seconds_since(decode_start);
    print_result(o, generated, logits);
    if (o.timings)
        print_timings(load_s, static_cast<foe::index_t>(o.tokens.size()), prefill_s, decoded, decode_s, weights_mb(*weights));
    return 0;
}

#if defined(FOE_WITH_MPI)
/// A digest of the bytes of v (for agree_on).
template <class T>
std::uint64_t digest_of(const std::vector<T>& v)
{
    return foe::stream_id(std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)));
}

/// The same request on the ranks of an mpirun. Every step that can fail on one rank only (reading
/// files) ends in foe::agree, so a failure is reported by every rank instead of leaving the others
/// waiting in a collective.
int run_model_distributed(const Options& o, foe::comm::MpiComm world)
{
    using foe::parallel::Strategy;
    // The request first: ranks given another prompt would run collectives of other sizes.
    const foe::AgreedValue request[] = {
        {"--tokens", digest_of(o.tokens)},
        {"--max-new-tokens", static_cast<std::uint64_t>(o.max_new_tokens)},
        {"--gemm", foe::stream_id(o.gemm)},
        {"--check-finite", o.check_finite ? 1u : 0u},
    };
    foe::agree_on(world, "the request", request);

    const auto load_start = clock_type::now();
    const std::filesystem::path dir(*o.model);
    foe::ModelConfig config;
    std::string error;
    try {
        config = foe::load_config_json(dir / foe::config_file_name);
    } catch (const foe::Error& e) {
        error = e.what();
    }
    int ranks_per_node = o.ranks_per_node;
    if (ranks_per_node == 0) {
        const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
        ranks_per_node = local != nullptr ? std::atoi(local) : world.size();
    }
    const Strategy strategy = config.architecture == foe::Architecture::foe ? Strategy::foe : Strategy::moe_data_parallel;
    foe::agree(world, error.empty() ? foe::model_digest(config, strategy, ranks_per_node) : 0, error);

    // The same verdict on every rank; agreed, so that rank 0 alone reports it.
    foe::ModelOptions options;
    try {
        options = request_options(o, config);
    } catch (const foe::Error& e) {
        error = e.what();
    }
    foe::agree(world, 0, error);
    const auto placement = foe::parallel::Placement::make(strategy, config, world.size(), ranks_per_node, world.rank());
    std::shared_ptr<const foe::ModelWeights> weights;
    try {
        const LoadProgress progress(*o.model, world.rank() == 0);
        weights = std::make_shared<const foe::ModelWeights>(
            foe::load_model_dir(dir, foe::held_tensors(placement), load_options(o)));
    } catch (const foe::Error& e) {
        error = e.what();
    }
    foe::agree(world, foe::model_digest(config, strategy, ranks_per_node), error);
    auto dm = foe::make_distributed_model(world, placement, weights, options);
    if (const char* stop = std::getenv("FOE_RUN_FAULT_STOP_RANK"); stop != nullptr && std::atoi(stop) == world.rank())
        std::raise(SIGSTOP);  // a hung rank, for the fault tests

    // The one sequence runs on every rank (FoE, G <= H) or on shard 0 (FoE G > H, the MoE
    // baseline); the other ranks join every step with an empty batch. World rank 0 always runs
    // it and chooses each token; one small all-reduce gives its choice (and whether it ends the
    // generation) to every rank, so the ranks never disagree on what comes next.
    const bool runs = strategy == Strategy::foe ? placement.shard == 0 : world.rank() == 0;
    const auto n = static_cast<foe::index_t>(o.tokens.size());
    const auto stops = stop_tokens(o, config);
    foe::Sampler sampler(o.sampling);
    const double load_s = seconds_since(load_start);
    const auto prefill_start = clock_type::now();
    // Every prompt position's logits only when --logits-out writes them; otherwise the last.
    const auto rows = o.logits_out ? foe::LogitRows::all : foe::LogitRows::last_per_chunk;
    foe::Tensor<float> logits = dm.model->forward(runs ? foe::Batch::single(0, n) : foe::Batch(),
                                                  runs ? std::span<const std::int32_t>(o.tokens) : std::span<const std::int32_t>{},
                                                  rows);
    const double prefill_s = seconds_since(prefill_start);
    std::vector<std::int32_t> generated;
    std::vector<float> last;
    if (runs && o.max_new_tokens > 0) last.assign(logits.values().end() - config.vocab_size, logits.values().end());
    const auto decode_start = clock_type::now();
    foe::index_t decoded = 0;
    for (foe::index_t step = 0; step < o.max_new_tokens; ++step) {
        float choice[2] = {0.0f, 0.0f};  // token id (< 2^24, exact in float), stop
        if (world.rank() == 0) {
            const std::int32_t token = sampler.next(last);
            choice[0] = static_cast<float>(token);
            choice[1] = std::find(stops.begin(), stops.end(), token) != stops.end() ? 1.0f : 0.0f;
        }
        world.all_reduce_sum(choice);
        generated.push_back(static_cast<std::int32_t>(choice[0]));
        if (choice[1] != 0.0f || step + 1 == o.max_new_tokens) break;
        const std::int32_t token[1] = {generated.back()};
        const auto next = dm.model->forward(runs ? foe::Batch::single(n + step, 1) : foe::Batch(),
                                            runs ? std::span<const std::int32_t>(token) : std::span<const std::int32_t>{});
        if (runs) last = next.values();
        ++decoded;
    }
    const double decode_s = seconds_since(decode_start);
    // Every rank's peak RSS and weights held, gathered by one sum (each rank fills its slots).
    std::vector<float> memory;
    if (o.timings) {
        memory.assign(2 * static_cast<std::size_t>(world.size()), 0.0f);
        memory[2 * static_cast<std::size_t>(world.rank())] = static_cast<float>(peak_rss_mb());
        memory[2 * static_cast<std::size_t>(world.rank()) + 1] = static_cast<float>(weights ? weights_mb(*weights) : 0.0);
        world.all_reduce_sum(memory);
    }
    if (world.rank() == 0) {
        print_result(o, generated, logits);
        if (o.timings) {
            print_timings(load_s, n, prefill_s, decoded, decode_s, memory[1]);
            for (int r = 0; r < world.size(); ++r)
                std::fprintf(stderr, "foe_run: rank %d: peak RSS %.1f MB; weights held %.1f MB\n", r,
                             static_cast<double>(memory[2 * static_cast<std::size_t>(r)]),
                             static_cast<double>(memory[2 * static_cast<std::size_t>(r) + 1]));
        }
    }
    return 0;
}
#endif

/// True when an MPI launcher started this process.
bool under_mpi_launcher()
{
    return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
           std::getenv("PMIX_RANK") != nullptr;
}

#if defined(FOE_WITH_MPI)
/// Unless the user set OMP_NUM_THREADS, each of the node's ranks gets its share of the cores this
/// process may run on (oversubscribed OpenMP threads made a 3 s run take 209 s on 2 cores).
void share_cores_between_local_ranks()
{
#if defined(_OPENMP)
    if (std::getenv("OMP_NUM_THREADS") != nullptr) return;
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    const int local_ranks = local != nullptr ? std::max(1, std::atoi(local)) : 1;
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    const int cores = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus)
                                                                     : static_cast<int>(std::thread::hardware_concurrency());
    // Open MPI binds each rank to a core or a socket by default; the affinity mask then already
    // holds the rank's share, and dividing again would undercount.
    const int per_rank = cores >= static_cast<int>(std::thread::hardware_concurrency()) ? cores / local_ranks : cores;
    omp_set_num_threads(std::max(1, per_rank));
#endif
}
#endif

}  // namespace

int main(int argc, char** argv)
{
#if defined(FOE_WITH_MPI)
    if (under_mpi_launcher()) {
        foe::comm::MpiSession session(&argc, &argv);
        auto world = foe::comm::MpiComm::world();
        share_cores_between_local_ranks();
        try {
            // Every rank parses its own command line; a usage error on any of them reaches all
            // (agree), so no rank waits for one that has already returned.
            Options o;
            std::string usage_error;
            try {
                o = parse_args(argc, argv);
                if (o.cuda && world.size() > 1 && !o.init && !o.help)
                    throw UsageError("--backend cuda runs in one process; under mpirun use the host backend");
                if (o.gemm == "cblas" && world.size() > 1 && !o.init && !o.help)
                    throw UsageError("--gemm cblas runs in one process; under mpirun the model uses foe's GEMM");
            } catch (const UsageError& e) {
                usage_error = e.what();
            }
            world.set_timeout(std::chrono::duration<double>(o.comm_timeout));
            try {
                foe::agree(world, o.help ? 1 : 0, usage_error);
            } catch (const foe::CommError& e) {
                // "rank R failed: <usage error>" or "ranks disagree": one rank asked for --help.
                if (world.rank() == 0) std::cerr << "foe_run: usage error: " << e.what() << "\n\n" << usage_text;
                return 2;
            }
            if (o.help) {
                if (world.rank() == 0) std::cout << usage_text;
                return 0;
            }
            apply_threads(o);
            if (world.size() == 1 || o.init) return world.rank() == 0 ? (o.init ? init_model(o) : run_model(o)) : 0;
            return run_model_distributed(o, world);
        } catch (const foe::CommError& e) {  // agreed failures are the same on every rank: rank 0 reports
            // A failure a peer reported (then this is a no-op), an agreed one (every rank knows;
            // the messages go unread), or a timeout here, which the ranks still waiting must hear.
            world.abort_peers(e.what());
            if (world.rank() == 0) std::cerr << "foe_run: error: " << e.what() << "\n";
            return 1;
        } catch (const foe::ConfigError& e) {  // a layout every rank rejected alike
            if (world.rank() == 0) std::cerr << "foe_run: error: " << e.what() << "\n";
            return 1;
        } catch (const std::exception& e) {
            // Possibly this rank's alone (a file it alone reads, a NaN in its own groups): the
            // others may wait for it in a collective, and must fail naming it, not hang.
            world.abort_peers(e.what());
            std::cerr << "foe_run: error on rank " << world.rank() << ": " << e.what() << "\n";
            return 1;
        }
    }
#endif
    try {
        const Options o = parse_args(argc, argv);
        if (o.help) {
            std::cout << usage_text;
            return 0;
        }
        apply_threads(o);
        return o.init ? init_model(o) : run_model(o);
    } catch (const UsageError& e) {
        std::cerr << "foe_run: " << e.what() << "\n\n" << usage_text;
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "foe_run: error: " << e.what() << "\n";
        return 1;
    }
}
