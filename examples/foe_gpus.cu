// foe_gpus: an FoE model spread over GPUs, one MPI rank per GPU, each rank holding H / ranks of
// the expert groups (their attention heads, KV caches and experts); the one sum per layer of the
// groups' residual streams is an NCCL all-reduce, and nothing else crosses GPUs.
//
//   mpirun -np 8 build/examples/foe_gpus --model DIR [--tokens 1,2,3] [--max-new-tokens N]
//
// Every rank runs every token (FoE with G <= H: no rank waits for another's routing); rank 0
// prints {"prompt": [...], "generated": [...]} as foe_run does. Rank r uses GPU (local rank) mod
// (visible GPUs). A failing rank makes the others fail within the communicator's timeout (60 s
// here) instead of hanging. Built when nvcc, NCCL and MPI are all found.
//
// Compile-checked only so far: it has not run on a GPU.

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
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
        throw foe::InvalidArgument("usage: foe_gpus --model DIR [--tokens 1,2,3] [--max-new-tokens N]");
    return o;
}

std::string json_list(const std::vector<std::int32_t>& v)
{
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

int run(const Options& o, foe::comm::MpiComm& world)
{
    const int rank = world.rank(), ranks = world.size();
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    const int device = (local != nullptr ? std::atoi(local) : rank) % std::max(1, foe::cuda::cuda_device_count());

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

}  // namespace

int main(int argc, char** argv)
{
    foe::comm::MpiSession session(&argc, &argv);
    auto world = foe::comm::MpiComm::world();
    try {
        return run(parse(argc, argv), world);
    } catch (const std::exception& e) {
        world.abort_peers(e.what());  // the others stop waiting for this rank
        std::cerr << "foe_gpus: error on rank " << world.rank() << ": " << e.what() << "\n";
        return 1;
    }
}
