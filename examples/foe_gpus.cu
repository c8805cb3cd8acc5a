// foe_gpus: FoE over the GPUs of an mpirun, one MPI rank per GPU, and the paper's comparison.
//
// Generation: an FoE model spread over the GPUs, each rank holding H / ranks of the expert groups
// (their attention heads, KV caches and experts); the one sum per layer of the groups' residual
// streams is an NCCL all-reduce, and nothing else crosses GPUs.
//
//   mpirun -np 8 build/examples/foe_gpus --model DIR [--tokens 1,2,3] [--max-new-tokens N]
//
// Every rank runs every token (FoE with G <= H: no rank waits for another's routing); rank 0
// prints {"prompt": [...], "generated": [...]} as foe_run does.
//
// Comparison (the shape of the paper's Table 9): random weights of a named config, each rank
// generating only the tensors it holds, and for each token count S of the sweep the prefill of
// one batch of S tokens (examples/foe_gpus_compare.hpp: min(G, S) sequences of S/G tokens):
//
//   mpirun -np 8 build/examples/foe_gpus --compare [--config foe-1b] [--tokens 1,128,2048,24576]
//                                        [--ranks-per-node 8] [--json FILE] [--repeats 5]
//
//   FoE           groups on ranks (G <= H): every rank every sequence, one all-reduce per layer
//   DP+EP naive   the standard MoE (the same sizes, one group, per-head QK-norm as foe_comm):
//   DP+EP dedup   rank p runs sequence p, experts E/G per rank, DeviceAllToAllEP over NCCL with
//                 naive or deduplicated dispatch (dynamic variant: one host sync per layer)
//   TP+EP naive   head-parallel attention (KV heads / G per rank, every rank every sequence, an
//   TP+EP dedup   all-reduce), then each rank's slice of the tokens through EP, an all-gather
// Timed with CUDA events around model.forward (every rank at a barrier first), warm-up runs
// first; per run the slowest rank's time, then the median over runs. "One layer" is the mean over
// the layers of the same forwards (events between layers). Rank 0 prints the tables and writes
// --json FILE (date, device, G, R, config, the command line). FoE with G > H is not on GPUs yet,
// nor TP+EP where G does not divide the KV heads: their rows say so.
//
// Rank r uses GPU (local rank) mod (visible GPUs), local rank from OMPI_COMM_WORLD_LOCAL_RANK (so
// 2 nodes x 8 GPUs work as 16 ranks); --compare refuses more ranks on a node than GPUs unless
// --allow-shared-gpus is given. A failing rank makes the others fail within the communicator's
// timeout instead of hanging. Built when nvcc, NCCL and MPI are all found.
//
// Compile-checked only so far: it has not run on a GPU.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "foe/comm/mpi_comm.hpp"
#include "foe/comm/nccl_mpi.cuh"
#include "foe/cuda/model.cuh"
#include "foe/io/config_json.hpp"
#include "foe/io/model_dir.hpp"
#include "foe/model/distributed.hpp"
#include "foe/parallel/all_to_all_ep.cuh"
#include "foe/parallel/placement.hpp"
#include "foe_gpus_compare.hpp"

namespace {

struct Options {
    std::filesystem::path model;
    std::vector<std::int32_t> tokens{0};
    foe::index_t max_new_tokens = 8;
};

Options parse(int argc, char** argv)
{
    Options o;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string_view flag = argv[i], value = argv[i + 1];
        if (flag == "--model") {
            o.model = std::string(value);
        } else if (flag == "--max-new-tokens") {
            o.max_new_tokens = std::stoll(std::string(value));
        } else if (flag == "--tokens") {
            o.tokens.clear();
            std::size_t begin = 0;
            while (begin <= value.size()) {
                const std::size_t comma = std::min(value.find(',', begin), value.size());
                o.tokens.push_back(static_cast<std::int32_t>(std::stol(std::string(value.substr(begin, comma - begin)))));
                begin = comma + 1;
            }
        } else {
            throw foe::InvalidArgument(foe::detail::concat("unknown option ", flag));
        }
    }
    if (argc % 2 == 0 || o.model.empty())
        throw foe::InvalidArgument("usage: foe_gpus --model DIR [--tokens 1,2,3] [--max-new-tokens N]\n"
                                   "   or: foe_gpus --compare ... (foe_gpus --compare --help)");
    return o;
}

std::string json_list(const std::vector<std::int32_t>& v)
{
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

int env_int(const char* name, int fallback)
{
    const char* v = std::getenv(name);
    return v != nullptr ? std::atoi(v) : fallback;
}

int run(const Options& o, foe::comm::MpiComm& world)
{
    const int rank = world.rank(), ranks = world.size();
    const int device = env_int("OMPI_COMM_WORLD_LOCAL_RANK", rank) % std::max(1, foe::cuda::cuda_device_count());

    const foe::ModelConfig config = foe::load_config_json(o.model / foe::config_file_name);
    foe::require<foe::ConfigError>(config.architecture == foe::Architecture::foe && config.groups() % ranks == 0,
                                   "foe_gpus spreads an FoE model's ", config.groups(), " expert groups over ", ranks,
                                   " ranks: the groups must be a multiple of the ranks");
    auto weights = std::make_shared<const foe::ModelWeights>(foe::load_model_dir(o.model));

    foe::comm::NcclOptions nccl;
    nccl.timeout = std::chrono::seconds(60);
    auto comm = foe::comm::nccl_comm_over_mpi(world.native(), device, nccl);
    const foe::index_t per_rank = config.groups() / ranks;
    foe::cuda::CudaModelOptions options;
    options.device = device;
    options.cache_capacity = static_cast<foe::index_t>(o.tokens.size()) + o.max_new_tokens;
    options.max_batch_tokens = options.cache_capacity;
    options.group_begin = rank * per_rank;
    options.group_end = options.group_begin + per_rank;
    if (ranks > 1) {
        options.reduce_streams = [&](float* v, std::size_t n, cudaStream_t s) { comm.all_reduce_sum(std::span<float>(v, n), s); };
        options.synchronize = [&](cudaStream_t s) { comm.synchronize(s); };
        options.after_graph_launch = [&](cudaStream_t s) { comm.watch(s, "decode graph"); };
    }
    foe::cuda::CudaModel<> model(weights, options);  // after comm: destroyed before it
    weights.reset();                                   // the model holds its groups on its GPU
    const auto generated = model.generate(o.tokens, o.max_new_tokens);
    if (rank == 0)
        std::cout << "{\"prompt\": " << json_list(o.tokens) << ", \"generated\": " << json_list(generated) << "}"
                  << std::endl;
    return 0;
}

// --- --compare ---------------------------------------------------------------------------------

using foe::index_t;
namespace fc = foe::cuda;

/// A CUDA event of the current device.
class Event {
public:
    Event() { fc::check(cudaEventCreate(&event_), "cudaEventCreate"); }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    ~Event() { (void)cudaEventDestroy(event_); }
    void record(cudaStream_t stream) { fc::check(cudaEventRecord(event_, stream), "cudaEventRecord"); }
    /// Seconds from `from` to this event (both recorded and reached).
    [[nodiscard]] double since(const Event& from) const
    {
        float ms = 0.0f;
        fc::check(cudaEventElapsedTime(&ms, from.event_, event_), "cudaEventElapsedTime");
        return ms / 1e3;
    }
    void synchronize() { fc::check(cudaEventSynchronize(event_), "cudaEventSynchronize"); }

private:
    cudaEvent_t event_ = nullptr;
};

/// One architecture of the comparison.
struct Architecture {
    std::string name;
    foe::parallel::Strategy strategy;
    foe::parallel::Dispatch dispatch;
};

struct CompareContext {
    const foe_gpus::CompareOptions& options;
    foe::comm::MpiComm& world;
    foe::comm::NcclComm& comm;
    int device = 0, ranks_per_node = 1;
};

/// Times one architecture over the sweep (collective: every rank calls it alike).
foe_gpus::ArchitectureTimes time_architecture(CompareContext& cx, const Architecture& a, const foe::ModelConfig& config)
{
    using foe::parallel::Strategy;
    const auto& o = cx.options;
    const int rank = cx.world.rank(), g = cx.world.size();
    foe_gpus::ArchitectureTimes times{a.name, "", {}, {}};
    foe::parallel::Placement p;
    try {  // the same answer on every rank: every rank skips alike
        p = foe::parallel::Placement::make(a.strategy, config, g, cx.ranks_per_node, rank);
    } catch (const foe::ConfigError& e) {
        times.skipped = e.what();
        return times;
    }
    if (a.strategy == Strategy::foe && p.shards > 1) {
        times.skipped = foe::detail::concat("G = ", g, " > H = ", config.groups(),
                                            " (a group's ranks splitting its sequences and experts) is not supported "
                                            "on GPUs yet; foe_comm runs it on CPUs");
        return times;
    }
    // FoE and head-parallel attention: every rank every sequence; data-parallel: its own.
    const bool all_sequences = a.strategy != Strategy::moe_data_parallel;
    const index_t max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
    const index_t longest = foe_gpus::longest_sequence(o.tokens, g);
    const index_t sequences = all_sequences ? std::min<index_t>(g, max_tokens) : 1;

    fc::CudaModelOptions mo;
    mo.device = cx.device;
    mo.cache_slots = sequences;
    mo.max_sequences = sequences;
    mo.cache_capacity = longest;
    mo.max_batch_tokens = all_sequences ? max_tokens : longest;
    mo.cuda_graphs = false;  // prefill only
    mo.synchronize = [&comm = cx.comm](cudaStream_t s) { comm.synchronize(s); };
    if (a.strategy == Strategy::foe) {
        mo.group_begin = p.group_begin;
        mo.group_end = p.group_end;
        if (g > 1)
            mo.reduce_streams = [&comm = cx.comm](float* v, std::size_t n, cudaStream_t s) {
                comm.all_reduce_sum(std::span<float>(v, n), s);
            };
    } else {
        // Head-parallel: only this rank's slice of the tokens goes through the exchange.
        const index_t routed = (mo.max_batch_tokens + p.head_parts - 1) / p.head_parts;
        mo.expert_exchange = std::make_shared<foe::parallel::NcclExpertExchange>(
            cx.comm, foe::parallel::moe_ep_spec(config, g, rank, a.dispatch, false, routed));
        if (p.head_parts > 1) {
            mo.head_part = p.head_part;
            mo.head_parts = p.head_parts;
            mo.head_comm.reduce = [&comm = cx.comm](float* v, std::size_t n, cudaStream_t s) {
                comm.all_reduce_sum(std::span<float>(v, n), s);
            };
            mo.head_comm.gather = [&comm = cx.comm](const foe::bfloat16* in, std::size_t n, foe::bfloat16* out,
                                                    cudaStream_t s) {
                comm.all_gather(std::span<const foe::bfloat16>(in, n),
                                std::span<foe::bfloat16>(out, n * static_cast<std::size_t>(comm.size())), s);
            };
        }
    }
    // Events at the first layer's start and the last layer's end (the hook runs while enqueueing).
    Event layers_begin, layers_end, begin, end;
    bool layers_timed = false;
    const index_t layers = config.num_hidden_layers;
    mo.layer_boundary = [&](index_t l, cudaStream_t s) {
        if (l == 0) layers_begin.record(s);
        if (l == layers) {
            layers_end.record(s);
            layers_timed = true;
        }
    };
    std::unique_ptr<fc::CudaModel<>> model;
    {
        auto weights = std::make_shared<const foe::ModelWeights>(
            foe::random_weights(config, 1, foe::held_tensors(p)));
        model = std::make_unique<fc::CudaModel<>>(std::move(weights), mo);  // the host weights go here
    }
    const cudaStream_t stream = model->stream();
    for (index_t s : o.tokens) {
        if (rank == 0) std::fprintf(stderr, "foe_gpus: %s, %lld tokens ...\n", a.name.c_str(), static_cast<long long>(s));
        const foe::Batch batch = foe_gpus::rank_batch(s, g, rank, all_sequences);
        const auto ids = foe_gpus::token_ids(batch.tokens(), config.vocab_size, rank);
        for (int w = 0; w < o.warmup; ++w) {
            cx.world.barrier();
            (void)model->forward(batch, ids, foe::LogitRows::last_per_chunk);
        }
        std::vector<float> forward(static_cast<std::size_t>(o.repeats)), layer(forward.size());
        for (std::size_t i = 0; i < forward.size(); ++i) {
            cx.world.barrier();
            layers_timed = false;
            begin.record(stream);
            (void)model->forward(batch, ids, foe::LogitRows::last_per_chunk);  // returns synchronised
            end.record(stream);
            end.synchronize();
            forward[i] = static_cast<float>(end.since(begin));
            layer[i] = layers_timed ? static_cast<float>(layers_end.since(layers_begin) / static_cast<double>(layers)) : 0.0f;
        }
        cx.world.barrier();
        std::vector<float> all(forward.size() * static_cast<std::size_t>(g));
        cx.world.all_gather(forward, all);
        times.forward.push_back(foe_gpus::median(foe_gpus::slowest_rank(all, g, o.repeats)));
        cx.world.all_gather(layer, all);
        times.layer.push_back(foe_gpus::median(foe_gpus::slowest_rank(all, g, o.repeats)));
    }
    model.reset();  // before its exchange's communicator, and before the next architecture's buffers
    return times;
}

std::string utc_now()
{
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char b[32];
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return b;
}

int run_compare(const foe_gpus::CompareOptions& o, foe::comm::MpiComm& world, const std::string& command)
{
    using foe::parallel::Dispatch;
    using foe::parallel::Strategy;
    const int rank = world.rank(), g = world.size();
    const int local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", rank);
    const int local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", g);
    const int r = o.ranks_per_node > 0 ? o.ranks_per_node : local_size;
    // Every rank must run the same sweep on the same model: a mismatch fails on every rank.
    std::string tokens_text;
    for (index_t s : o.tokens) tokens_text += std::to_string(s) + ",";
    const foe::AgreedValue agreed[] = {
        {"--config", foe::stream_id(o.config)},
        {"--tokens", foe::stream_id(tokens_text)},
        {"--ranks-per-node", static_cast<std::uint64_t>(r)},
        {"--warmup/--repeats/--layers",
         foe::stream_id(foe::detail::concat(o.warmup, '/', o.repeats, '/', o.layers))}};
    foe::agree_on(world, "the --compare options", std::span<const foe::AgreedValue>(agreed));

    const int devices = fc::cuda_device_count();
    foe::require<foe::CudaError>(devices > 0, "rank ", rank, " sees no CUDA device");
    foe::require<foe::ConfigError>(local_size <= devices || o.allow_shared_gpus, "rank ", rank, "'s node runs ",
                                   local_size, " ranks but has ", devices,
                                   " visible GPU(s): start one rank per GPU, or pass --allow-shared-gpus to let ranks "
                                   "share a GPU (the timings then mean little)");
    const int device = local_rank % devices;
    fc::check(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    fc::check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");

    foe::ModelConfig foe_config = foe::named_config(o.config);
    foe::require<foe::InvalidArgument>(foe_config.architecture == foe::Architecture::foe,
                                       "--config must name an FoE configuration (foe-1b, foe-7b, foe-small, foe-tiny); "
                                       "the MoE baselines use its sizes with one group");
    if (o.layers > 0) foe_config.num_hidden_layers = o.layers;
    foe_config.max_position_embeddings =
        std::max(foe_config.max_position_embeddings, foe_gpus::longest_sequence(o.tokens, g));
    foe_config.validate();
    foe::ModelConfig moe_config = foe_config;  // as foe_comm: one group, per-head QK-norm
    moe_config.num_expert_groups = 1;
    moe_config.qk_norm = foe::QkNorm::per_head;
    moe_config.validate();

    foe::comm::NcclOptions nccl;
    nccl.timeout = std::chrono::seconds(300);  // the largest prefill of a slow baseline stays far below
    auto comm = foe::comm::nccl_comm_over_mpi(world.native(), device, nccl);
    CompareContext cx{o, world, comm, device, r};

    foe_gpus::CompareReport report;
    report.config = o.config;
    report.device = prop.name;
    report.date = utc_now();
    report.command = command;
    report.ranks = g;
    report.ranks_per_node = r;
    report.warmup = o.warmup;
    report.repeats = o.repeats;
    report.layers = foe_config.num_hidden_layers;
    report.tokens = o.tokens;
    report.foe = time_architecture(cx, {"FoE", Strategy::foe, Dispatch::naive}, foe_config);
    for (const Architecture& a : {Architecture{"DP+EP naive", Strategy::moe_data_parallel, Dispatch::naive},
                                  Architecture{"DP+EP dedup", Strategy::moe_data_parallel, Dispatch::dedup},
                                  Architecture{"TP+EP naive", Strategy::moe_head_parallel, Dispatch::naive},
                                  Architecture{"TP+EP dedup", Strategy::moe_head_parallel, Dispatch::dedup}})
        report.moe.push_back(time_architecture(cx, a, moe_config));

    if (rank == 0) {
        std::cout << foe_gpus::format_table9(report) << std::flush;
        if (!o.json.empty()) {
            std::ofstream out(o.json);
            out << foe::json::dump_pretty(foe_gpus::report_json(report)) << "\n";
            out.close();
            foe::require<foe::IoError>(static_cast<bool>(out), "could not write ", o.json);
            std::fprintf(stderr, "foe_gpus: wrote %s\n", o.json.c_str());
        }
    }
    world.barrier();
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    foe::comm::MpiSession session(&argc, &argv);
    auto world = foe::comm::MpiComm::world();
    try {
        const std::vector<std::string> args(argv + 1, argv + argc);
        if (std::find(args.begin(), args.end(), "--compare") != args.end()) {
            std::string command = argv[0];
            for (const auto& a : args) command += " " + a;
            const foe_gpus::CompareOptions o = foe_gpus::parse_compare(args);
            if (o.help) {
                if (world.rank() == 0) std::cout << foe_gpus::compare_usage << std::endl;
                return 0;
            }
            return run_compare(o, world, command);
        }
        return run(parse(argc, argv), world);
    } catch (const std::exception& e) {
        world.abort_peers(e.what());  // the others stop waiting for this rank
        std::cerr << "foe_gpus: error on rank " << world.rank() << ": " << e.what() << "\n";
        return 1;
    }
}
