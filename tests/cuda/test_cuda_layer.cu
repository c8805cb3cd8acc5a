// Layers composed at compile time from the device policies (FoeLayer / MoeLayer over
// attention::CudaGqaAttention, routing::CudaRouter, experts::CudaSwiGluExperts,
// parallel::CudaLocalExperts, sync::AllReduceMean<comm::CudaSelfComm>) against the same layers
// composed from the host policies, on the same bf16-rounded weights and random bf16 inputs (the
// host computes in fp32, so the difference is the device's bf16 activations): FoE with H = 4
// groups from 1 input stream and from H, the standard MoE, both GEMM policies (LtGemm, TcGemm),
// both score functions, a contiguous KV cache; a ragged prefill of two sequences, a decode step,
// then a second chunk beside a decode. Outputs and routing are compared; the experts may differ
// only at near ties. A decode step replayed from a captured CUDA graph equals the eager step bit
// for bit, over several steps. The memory plan (scratch_bytes(), max_tokens) is checked too.
// Host-only cases (concepts, options refused before any device work) run without a GPU; the
// others say "no CUDA device: skipped" and pass.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
// The host layers here (the oracles) use gemm::Default, foe's own GEMM; without CBLAS, since
// OpenBLAS's cblas.h declares a global `bfloat16` that collides with this file's foe::bfloat16.
#undef FOE_WITH_CBLAS
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "cuda_test_util.hpp"
#include "model_test_util.hpp"
#include "foe/attention/gqa_attention.cuh"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/stream.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/model/host_model.hpp"
#include "foe/parallel/local_experts.cuh"
#include "foe/routing/router.cuh"
#include "foe/sync/all_reduce_mean.cuh"

using namespace foe::cuda::testing;
using foe::Batch;
using foe::ModelConfig;
using foe::routing::Sigmoid;
using foe::routing::Softmax;

namespace {

template <class Gemm, class Score>
using DeviceFoe = foe::FoeLayer<foe::attention::CudaGqaAttention<Gemm>,
                                foe::routing::CudaRouter<Score, foe::routing::PerGroupTopK, Gemm>,
                                foe::experts::CudaSwiGluExperts<Gemm>, foe::parallel::CudaLocalExperts,
                                foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>;
template <class Gemm, class Score>
using DeviceMoe = foe::MoeLayer<foe::attention::CudaGqaAttention<Gemm>,
                                foe::routing::CudaRouter<Score, foe::routing::GlobalTopK, Gemm>,
                                foe::experts::CudaSwiGluExperts<Gemm>, foe::parallel::CudaLocalExperts>;

// The device layers are device compositions: their policies satisfy the device concepts, they run
// on the CUDA backend and keep their routing on the device.
static_assert(foe::attention::DeviceAttentionPolicy<foe::attention::CudaGqaAttention<fc::LtGemm>>);
static_assert(foe::attention::DeviceAttentionPolicy<foe::attention::CudaGqaAttention<fc::TcGemm>>);
static_assert(!foe::attention::HostAttentionPolicy<foe::attention::CudaGqaAttention<fc::TcGemm>>);
static_assert(
    foe::routing::DeviceRoutingPolicy<foe::routing::CudaRouter<Sigmoid, foe::routing::PerGroupTopK, fc::TcGemm>>);
static_assert(foe::experts::DeviceExpertsPolicy<foe::experts::CudaSwiGluExperts<fc::TcGemm>>);
static_assert(foe::parallel::DeviceExpertParallelPolicy<foe::parallel::CudaLocalExperts,
                                                        foe::experts::CudaSwiGluExperts<fc::TcGemm>>);
static_assert(foe::sync::DeviceResidualSyncPolicy<foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>);
static_assert(std::same_as<DeviceFoe<fc::LtGemm, Softmax>::backend, foe::CudaBackend>);
static_assert(std::same_as<DeviceMoe<fc::TcGemm, Sigmoid>::backend, foe::CudaBackend>);
static_assert(std::same_as<DeviceFoe<fc::TcGemm, Sigmoid>::routing_result_type, foe::routing::DeviceRoutingResult>);
static_assert(std::same_as<foe::HostFoeLayer<>::routing_result_type, foe::routing::RoutingResult>);

/// Outputs: max |got - want| / max |want| over the tokens both backends routed alike. The device
/// rounds to bf16 (relative error <= 2^-8) at r = x + Attn (one rounding after the fp32 o_proj
/// accumulation), at rf (the mean) and at the output (one rounding after the fp32 combine): three
/// roundings on the path of the largest outputs, <= 1.2e-2 even if they all add up, plus the
/// attention's and experts' own bf16 intermediates (normed x, q|k|v, the KV cache, u, the SwiGLU
/// hidden state) on terms smaller than the residual. 2e-2 leaves room above that and is far below
/// what a wrong group, head, position or expert gives (differences of the order of the outputs).
constexpr double layer_tolerance = 2e-2;
/// Routing: the selection keys (the weights, plus the bias under sigmoid) slot by slot, and the
/// weights of the slots that chose the same expert, absolute. A logit carries the bf16 error of u
/// (a few 2^-8 relative over d terms of size ~1/sqrt(d): ~3e-3); softmax weights ~1/E and sigmoid's
/// slope <= 1/4 shrink it further. 1e-2 is several times that.
constexpr double routing_tolerance = 1e-2;

/// The layer shape of the CUDA model tests: head_dim 32 (the tensor-core attention path), GQA
/// (2 query heads per KV head), E 16, k 4; FoE with H = 4 groups (one KV head, 4 experts and one
/// selected expert each) or the standard MoE (OLMoE for softmax, FoE with H = 1 for sigmoid).
ModelConfig layer_config(bool moe, foe::ScoreFunction score)
{
    ModelConfig c = foe::named_config(moe && score == foe::ScoreFunction::softmax ? "moe-small" : "foe-small");
    c.hidden_size = 256;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 32;
    c.num_hidden_layers = 1;
    c.num_experts = 16;
    c.num_experts_per_tok = 4;
    c.intermediate_size = 128;
    c.vocab_size = 64;
    c.max_position_embeddings = 64;
    c.num_expert_groups = moe ? 1 : 4;
    c.qk_norm = moe ? foe::QkNorm::full_width : foe::QkNorm::per_head;
    c.scoring_func = score;
    c.validate();
    return c;
}

foe::LayerOptions layer_options()
{
    foe::LayerOptions o;
    o.cache_slots = 2;
    o.cache_capacity = 64;
    o.max_tokens = 32;
    o.max_sequences = 2;
    return o;
}

/// A batch's arrays in device memory at one address for the object's lifetime (what a captured
/// graph reads), rewritten by each stage().
class StagedBatch {
public:
    StagedBatch(index_t max_sequences, index_t max_tokens)
        : layout_(max_sequences, max_tokens), device_(layout_.size())
    {
    }

    fc::DeviceBatch stage(const Batch& batch, cudaStream_t stream)
    {
        std::vector<std::int32_t> host(layout_.size(), 0);
        (void)layout_.fill(batch, std::vector<std::int32_t>(sz(batch.tokens()), 0), host);  // ids: a layer reads none
        fc::check(cudaMemcpyAsync(device_.data(), host.data(), host.size() * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync (batch)");
        fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        return layout_.view(device_.data(), batch);
    }

private:
    fc::BatchLayout layout_;
    fc::DeviceBuffer<std::int32_t> device_;
};

/// Host data into a device buffer, ordered on `stream` (the layers run on a non-blocking stream).
template <class T>
void copy_to(fc::DeviceBuffer<T>& d, const std::vector<T>& host, cudaStream_t stream)
{
    REQUIRE(host.size() <= d.size());
    fc::check(cudaMemcpyAsync(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync (input)");
    fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

/// The first n elements of a device buffer.
template <class T>
std::vector<T> first(const T* device, std::size_t n, cudaStream_t stream)
{
    std::vector<T> host(n);
    if (n > 0)
        fc::check(cudaMemcpyAsync(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, stream),
                  "cudaMemcpyAsync (download)");
    fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return host;
}

/// A DeviceRoutingResult's slots, downloaded.
struct Routing {
    index_t tokens = 0, slots_per_token = 0, slots_per_group = 0;
    std::vector<std::int32_t> experts;
    std::vector<float> weights;
};
Routing download(const foe::routing::DeviceRoutingResult& r, cudaStream_t stream)
{
    const auto n = sz(r.tokens * r.slots_per_token);
    return {r.tokens, r.slots_per_token, r.slots_per_group, first(r.experts, n, stream), first(r.weights, n, stream)};
}

/// The layer's scratch and stream: one DeviceContext for every forward of a test.
struct DeviceRun {
    explicit DeviceRun(std::size_t scratch_bytes) : memory(scratch_bytes), scratch(memory.data(), memory.size()) {}
    fc::Stream stream;
    fc::DeviceBuffer<unsigned char> memory;
    fc::Scratch scratch;
    [[nodiscard]] fc::DeviceContext context() { return {stream.get(), &scratch}; }
};

/// An instantiated graph, destroyed with its scope.
struct GraphExec {
    cudaGraphExec_t exec = nullptr;
    GraphExec() = default;
    GraphExec(const GraphExec&) = delete;
    GraphExec& operator=(const GraphExec&) = delete;
    ~GraphExec()
    {
        if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
    }
};

/// Checks one forward's routing and outputs against the host layer's; returns how many tokens
/// chose other experts (near ties: their keys must still agree), whose outputs are not compared.
index_t check_forward(const ModelConfig& c, const foe::LayerWeights& w, const foe::routing::RoutingResult& want_r,
                      const Routing& got_r, const std::vector<float>& want, const std::vector<bfloat16>& got,
                      index_t held, index_t t)
{
    const index_t d = c.hidden_size;
    REQUIRE(want_r.tokens == t);
    REQUIRE(got_r.tokens == t);
    REQUIRE(got_r.slots_per_token == want_r.slots_per_token);
    REQUIRE(got_r.slots_per_group == want_r.slots_per_group);
    const index_t slots = want_r.slots_per_token, per_group = want_r.slots_per_group;
    const index_t experts_per_group = c.num_experts / c.groups();
    const bool biased = c.scoring_func == foe::ScoreFunction::sigmoid && !w.gate_bias.empty();
    const auto key = [&](std::int32_t e, float weight) {
        return static_cast<double>(weight) + (biased ? static_cast<double>(w.gate_bias(e)) : 0.0);
    };

    std::vector<bool> flipped(sz(t), false);
    double worst_key = 0.0, worst_weight = 0.0;
    bool in_group = true;
    for (index_t i = 0; i < t; ++i)
        for (index_t g0 = 0; g0 < slots; g0 += per_group) {
            std::vector<std::int32_t> a, b;
            for (index_t s = g0; s < g0 + per_group; ++s) {
                const auto at = sz(i * slots + s);
                const std::int32_t ea = want_r.experts[at], eb = got_r.experts[at];
                in_group = in_group && eb >= 0 && eb < c.num_experts &&
                           eb / experts_per_group == want_r.group_begin + s / per_group;
                if (!in_group) continue;
                a.push_back(ea);
                b.push_back(eb);
                // Slots are ordered by descending key on both sides: the s-th largest keys agree
                // even where a near tie went the other way.
                worst_key = std::max(worst_key, std::abs(key(ea, want_r.weights[at]) - key(eb, got_r.weights[at])));
                if (ea == eb)
                    worst_weight = std::max(worst_weight, std::abs(static_cast<double>(want_r.weights[at]) -
                                                                   static_cast<double>(got_r.weights[at])));
            }
            std::sort(a.begin(), a.end());
            std::sort(b.begin(), b.end());
            if (a != b) flipped[sz(i)] = true;
        }
    CHECK_MESSAGE(in_group, "the device routed a slot to an expert outside the slot's group");
    CHECK(worst_key < routing_tolerance);
    CHECK(worst_weight < routing_tolerance);

    double scale = 0.0, worst = 0.0;
    for (const float v : want) scale = std::max(scale, std::abs(static_cast<double>(v)));
    for (index_t h = 0; h < held; ++h)
        for (index_t i = 0; i < t; ++i)
            for (index_t j = 0; j < d; ++j) {
                const auto at = sz((h * t + i) * d + j);
                const auto g = static_cast<double>(static_cast<float>(got[at]));
                if (!std::isfinite(g)) worst = std::numeric_limits<double>::infinity();
                else if (!flipped[sz(i)]) worst = std::max(worst, std::abs(g - static_cast<double>(want[at])));
            }
    CHECK(worst / scale < layer_tolerance);
    return static_cast<index_t>(std::count(flipped.begin(), flipped.end(), true));
}

/// The host layer and the device layer on the same weights and inputs: a ragged prefill of two
/// sequences, a decode step of both (slots out of order), then a chunk of one beside a decode of
/// the other. in_streams: 1 (the embedding, broadcast) or one per group.
template <class DeviceLayer, class HostLayer>
void check_against_host(const ModelConfig& c, bool one_stream, std::uint64_t seed)
{
    const auto weights = bf16_weights(c, seed);
    const foe::LayerWeights w = foe::layer_weights(*weights, 0);
    const foe::LayerOptions o = layer_options();
    HostLayer host(c, w, o);
    DeviceLayer dev(c, w, o);
    fc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");  // the weights' uploads are done
    const index_t held = dev.streams(), d = c.hidden_size, in_streams = one_stream ? 1 : held;
    REQUIRE(host.streams() == held);
    DeviceRun run(dev.scratch_bytes());
    StagedBatch staged(o.max_sequences, o.max_tokens);
    fc::DeviceBuffer<bfloat16> x_dev(sz(in_streams * o.max_tokens * d)), y_dev(sz(held * o.max_tokens * d));
    std::mt19937_64 rng(seed + 1);

    const Batch steps[] = {Batch({foe::SequenceChunk{0, 0, 13}, foe::SequenceChunk{1, 0, 9}}),
                           Batch({foe::SequenceChunk{1, 9, 1}, foe::SequenceChunk{0, 13, 1}}),
                           Batch({foe::SequenceChunk{0, 14, 6}, foe::SequenceChunk{1, 10, 1}})};
    const char* names[] = {"prefill", "decode", "second chunk"};
    index_t flips = 0, tokens = 0;
    for (int step = 0; step < 3; ++step) {
        CAPTURE(names[step]);
        const Batch& batch = steps[step];
        const index_t t = batch.tokens();
        const Bf16Data x = random_bf16(sz(in_streams * t * d), rng);
        std::vector<float> want(sz(held * t * d));
        host.forward(batch, {x.values.data(), {in_streams, t, d}}, {want.data(), {held, t, d}});

        copy_to(x_dev, x.bits, run.stream.get());
        fc::fill_bytes(y_dev, 0xff, run.stream.get());  // NaN: an unwritten output fails
        dev.forward(staged.stage(batch, run.stream.get()), {x_dev.data(), {in_streams, t, d}},
                    {y_dev.data(), {held, t, d}}, run.context());
        const auto got = first(y_dev.data(), want.size(), run.stream.get());
        flips += check_forward(c, w, host.last_routing(), download(dev.last_routing(), run.stream.get()), want, got,
                               held, t);
        tokens += t;
    }
    // A near tie is rare (a key gap below the ~1e-3 key error); a wrong routing flips most tokens.
    CHECK_MESSAGE(flips <= tokens / 8 + 2, flips, " of ", tokens, " tokens chose other experts");
}

/// Two layers from the same weights, prefilled alike (their caches then hold the same bits): one
/// runs decode steps eagerly, the other replays one captured decode step. Capturing records the
/// step without running it, so the replayed layer's caches get each step's keys and values once,
/// from its launch, as the eager layer's get them from its forward. The graph is launched for
/// several steps, with the batch's positions and the inputs rewritten at their fixed addresses.
template <class Layer>
void check_graph_replay(const ModelConfig& c, bool one_stream, std::uint64_t seed)
{
    const auto weights = bf16_weights(c, seed);
    const foe::LayerWeights w = foe::layer_weights(*weights, 0);
    const foe::LayerOptions o = layer_options();
    Layer eager(c, w, o), replayed(c, w, o);
    fc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const index_t held = eager.streams(), d = c.hidden_size, in_streams = one_stream ? 1 : held;
    REQUIRE(eager.scratch_bytes() == replayed.scratch_bytes());
    DeviceRun run(eager.scratch_bytes());  // shared: the graph and the eager step see the same addresses
    const cudaStream_t stream = run.stream.get();
    StagedBatch staged(o.max_sequences, o.max_tokens);
    fc::DeviceBuffer<bfloat16> x_dev(sz(in_streams * o.max_tokens * d)), y_eager(sz(held * o.max_tokens * d)),
        y_graph(sz(held * o.max_tokens * d));
    std::mt19937_64 rng(seed + 1);
    const auto views = [&](index_t t, fc::DeviceBuffer<bfloat16>& y) {
        return std::pair{foe::TensorView<const bfloat16, 3>(x_dev.data(), {in_streams, t, d}),
                         foe::TensorView<bfloat16, 3>(y.data(), {held, t, d})};
    };

    // The same prefill on both layers: the same bits (what makes the comparison below exact).
    const Batch prefill({foe::SequenceChunk{0, 0, 11}, foe::SequenceChunk{1, 0, 7}});
    copy_to(x_dev, random_bf16(sz(in_streams * prefill.tokens() * d), rng).bits, stream);
    const fc::DeviceBatch db = staged.stage(prefill, stream);
    auto [x, ye] = views(prefill.tokens(), y_eager);
    eager.forward(db, x, ye, run.context());
    auto [x2, yg] = views(prefill.tokens(), y_graph);
    replayed.forward(db, x2, yg, run.context());
    const std::size_t prefill_n = sz(held * prefill.tokens() * d);
    CHECK(same_bits(first(y_eager.data(), prefill_n, stream), first(y_graph.data(), prefill_n, stream)));

    // Capture one decode step of both sequences (slots out of order) on the non-default stream.
    const auto decode = [](index_t step) {
        return Batch({foe::SequenceChunk{1, 7 + step, 1}, foe::SequenceChunk{0, 11 + step, 1}});
    };
    const index_t t = decode(0).tokens();
    const fc::DeviceBatch step_db = staged.stage(decode(0), stream);
    cudaGraph_t graph = nullptr;
    fc::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    auto [xd, yd] = views(t, y_graph);
    try {
        replayed.forward(step_db, xd, yd, run.context());
    } catch (...) {
        (void)cudaStreamEndCapture(stream, &graph);
        if (graph != nullptr) (void)cudaGraphDestroy(graph);
        throw;
    }
    fc::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    GraphExec exec;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec.exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    fc::check(instantiated, "cudaGraphInstantiate");

    const std::size_t n = sz(held * t * d);
    for (index_t step = 0; step < 3; ++step) {
        CAPTURE(step);
        const fc::DeviceBatch now = staged.stage(decode(step), stream);  // same addresses, new positions
        copy_to(x_dev, random_bf16(sz(in_streams * t * d), rng).bits, stream);
        fc::fill_bytes(y_eager, 0xff, stream);
        fc::fill_bytes(y_graph, 0xff, stream);
        auto [xe, ye2] = views(t, y_eager);
        eager.forward(now, xe, ye2, run.context());
        fc::check(cudaGraphLaunch(exec.exec, stream), "cudaGraphLaunch");
        const auto want = first(y_eager.data(), n, stream), got = first(y_graph.data(), n, stream);
        CHECK_MESSAGE(same_bits(got, want), first_mismatch(to_float(got), to_float(want)));
        const Routing re = download(eager.last_routing(), stream), rg = download(replayed.last_routing(), stream);
        CHECK(re.experts == rg.experts);
        CHECK(same_bits(re.weights, rg.weights));
        bool finite = true;
        for (const bfloat16 v : got) finite = finite && std::isfinite(static_cast<float>(v));
        CHECK(finite);
    }
}

}  // namespace

TEST_CASE("cuda layer: a device layer without a memory plan, or an MoE layer over several groups, is refused first")
{
    // Host code only: these checks come before anything is uploaded, so this runs without a GPU.
    using FoeLt = DeviceFoe<fc::LtGemm, Softmax>;
    using MoeLt = DeviceMoe<fc::LtGemm, Softmax>;
    const ModelConfig c = layer_config(false, foe::ScoreFunction::softmax);
    const auto weights = bf16_weights(c, 5);
    const foe::LayerWeights w = foe::layer_weights(*weights, 0);
    foe::LayerOptions o;  // max_tokens 0: no plan
    const auto make_foe = [&] { FoeLt layer(c, w, o); };
    const auto make_moe = [&] { MoeLt layer(c, w, o); };
    CHECK_THROWS_WITH_AS(make_foe(), doctest::Contains("LayerOptions::max_tokens"), foe::InvalidArgument);
    o.max_tokens = 4;
    o.max_sequences = 0;
    CHECK_THROWS_WITH_AS(make_foe(), doctest::Contains("both must be positive"), foe::InvalidArgument);
    o.max_sequences = 1;
    CHECK_THROWS_WITH_AS(make_moe(), doctest::Contains("one expert group"), foe::ConfigError);
    o.group_begin = 2;
    o.group_end = 5;
    CHECK_THROWS_WITH_AS(make_foe(), doctest::Contains("held groups [2, 5)"), foe::ConfigError);
}

TEST_CASE("cuda layer: FoE (H = 4) from device policies matches the host FoE layer: prefill, decode, second chunk; "
          "1 and H input streams, LtGemm and TcGemm, softmax and sigmoid")
{
    if (!have_device()) return;
    const ModelConfig soft = layer_config(false, foe::ScoreFunction::softmax);
    const ModelConfig sig = layer_config(false, foe::ScoreFunction::sigmoid);
    for (const bool one_stream : {true, false}) {
        CAPTURE(one_stream);
        {
            INFO("LtGemm, softmax");
            check_against_host<DeviceFoe<fc::LtGemm, Softmax>, foe::HostFoeLayer<Softmax>>(soft, one_stream, 21);
        }
        {
            INFO("LtGemm, sigmoid");
            check_against_host<DeviceFoe<fc::LtGemm, Sigmoid>, foe::HostFoeLayer<Sigmoid>>(sig, one_stream, 22);
        }
        {
            INFO("TcGemm, softmax");
            check_against_host<DeviceFoe<fc::TcGemm, Softmax>, foe::HostFoeLayer<Softmax>>(soft, one_stream, 23);
        }
        {
            INFO("TcGemm, sigmoid");
            check_against_host<DeviceFoe<fc::TcGemm, Sigmoid>, foe::HostFoeLayer<Sigmoid>>(sig, one_stream, 24);
        }
    }
}

TEST_CASE("cuda layer: MoE from device policies matches the host MoE layer: prefill, decode, second chunk; "
          "LtGemm and TcGemm, softmax and sigmoid")
{
    if (!have_device()) return;
    const ModelConfig soft = layer_config(true, foe::ScoreFunction::softmax);
    const ModelConfig sig = layer_config(true, foe::ScoreFunction::sigmoid);
    {
        INFO("LtGemm, softmax");
        check_against_host<DeviceMoe<fc::LtGemm, Softmax>, foe::HostMoeLayer<Softmax>>(soft, true, 31);
    }
    {
        INFO("LtGemm, sigmoid");
        check_against_host<DeviceMoe<fc::LtGemm, Sigmoid>, foe::HostMoeLayer<Sigmoid>>(sig, true, 32);
    }
    {
        INFO("TcGemm, softmax");
        check_against_host<DeviceMoe<fc::TcGemm, Softmax>, foe::HostMoeLayer<Softmax>>(soft, true, 33);
    }
    {
        INFO("TcGemm, sigmoid");
        check_against_host<DeviceMoe<fc::TcGemm, Sigmoid>, foe::HostMoeLayer<Sigmoid>>(sig, true, 34);
    }
}

TEST_CASE("cuda layer: a decode step replayed from a captured CUDA graph equals the eager step bit for bit, "
          "step after step: FoE and MoE, LtGemm and TcGemm")
{
    if (!have_device()) return;
    const ModelConfig foe_sig = layer_config(false, foe::ScoreFunction::sigmoid);
    const ModelConfig moe_soft = layer_config(true, foe::ScoreFunction::softmax);
    {
        INFO("FoE, LtGemm, H input streams");
        check_graph_replay<DeviceFoe<fc::LtGemm, Sigmoid>>(foe_sig, false, 41);
    }
    {
        INFO("FoE, TcGemm, 1 input stream");
        check_graph_replay<DeviceFoe<fc::TcGemm, Sigmoid>>(foe_sig, true, 42);
    }
    {
        INFO("MoE, LtGemm");
        check_graph_replay<DeviceMoe<fc::LtGemm, Softmax>>(moe_soft, true, 43);
    }
    {
        INFO("MoE, TcGemm");
        check_graph_replay<DeviceMoe<fc::TcGemm, Softmax>>(moe_soft, true, 44);
    }
}

TEST_CASE("cuda layer: the memory plan: scratch_bytes() grows with max_tokens; a forward of max_tokens fits, one "
          "token more or a smaller scratch is refused")
{
    if (!have_device()) return;
    using Layer = DeviceFoe<fc::TcGemm, Sigmoid>;
    const ModelConfig c = layer_config(false, foe::ScoreFunction::sigmoid);
    const auto weights = bf16_weights(c, 51);
    const foe::LayerWeights w = foe::layer_weights(*weights, 0);
    foe::LayerOptions o = layer_options();
    o.max_tokens = 8;
    Layer small(c, w, o);
    o.max_tokens = 32;
    Layer large(c, w, o);
    fc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    CHECK(small.scratch_bytes() < large.scratch_bytes());

    const index_t held = small.streams(), d = c.hidden_size;
    DeviceRun run(small.scratch_bytes());
    StagedBatch staged(2, 32);
    std::mt19937_64 rng(52);
    fc::DeviceBuffer<bfloat16> x_dev(sz(9 * d)), y_dev(sz(held * 9 * d));
    copy_to(x_dev, random_bf16(x_dev.size(), rng).bits, run.stream.get());
    const auto forward = [&](Layer& layer, index_t t, fc::DeviceContext ctx) {
        layer.forward(staged.stage(Batch::single(0, t), run.stream.get()), {x_dev.data(), {1, t, d}},
                      {y_dev.data(), {held, t, d}}, ctx);
        fc::check(cudaStreamSynchronize(run.stream.get()), "cudaStreamSynchronize");
    };
    CHECK_NOTHROW(forward(small, 8, run.context()));
    CHECK_THROWS_AS(forward(small, 9, run.context()), foe::CapacityError);
    fc::Scratch short_scratch(run.memory.data(), small.scratch_bytes() - 1);
    CHECK_THROWS_WITH(forward(small, 8, fc::DeviceContext{run.stream.get(), &short_scratch}),
                      doctest::Contains("scratch_bytes()"));
}
