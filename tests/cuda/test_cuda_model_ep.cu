// Expert parallelism in the CUDA layer and model (CudaModelOptions::expert_exchange, a
// parallel::NcclExpertExchange): the standard-MoE model whose experts go through DeviceAllToAllEP
// over a one-rank NcclComm equals the same model with local experts and the host model, for naive
// and deduplicated dispatch, dynamic and fixed capacity; a decode step replayed from a CUDA graph
// with the fixed-capacity exchange equals the eager step; an empty batch still runs the
// exchanges. With two GPUs, two ranks of a data-parallel MoE (each its own sequence, half the
// experts, naive dispatch) equal the one-rank model on each sequence, and so do two ranks of
// head-parallel attention + EP (half the KV heads and experts each, both sequences on both).
// Without a CUDA device every test case says so and passes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "cuda_test_util.hpp"
#include "model_test_util.hpp"
#include "foe/comm/nccl_comm.cuh"
#include "foe/cuda/model.cuh"
#include "foe/model/host_model.hpp"
#include "foe/parallel/all_to_all_ep.cuh"

using namespace foe::cuda::testing;
using foe::Batch;
using foe::ModelConfig;
using foe::ModelWeights;
using foe::comm::NcclComm;
using foe::parallel::Dispatch;
using foe::parallel::NcclExpertExchange;

namespace {

/// The standard MoE (one group, global top-k) in a shape the tensor-core attention takes.
ModelConfig moe_config(foe::ScoreFunction score = foe::ScoreFunction::softmax)
{
    ModelConfig c = foe::named_config("moe-small");
    c.hidden_size = 256;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 32;
    c.num_hidden_layers = 2;
    c.num_experts = 16;
    c.num_experts_per_tok = 4;
    c.intermediate_size = 128;
    c.vocab_size = 512;
    c.max_position_embeddings = 256;
    c.scoring_func = score;
    c.validate();
    return c;
}

/// The weights rank p of `ranks` holds: every tensor but the other ranks' experts.
std::shared_ptr<const ModelWeights> held_weights(const ModelConfig& c, std::uint64_t seed, int p, int ranks)
{
    const foe::index_t per = c.num_experts / ranks;
    return std::make_shared<const ModelWeights>(foe::stored_as(
        foe::random_weights(c, seed,
                            [=](std::string_view name) {
                                const auto at = name.find(".mlp.experts.");
                                if (at == std::string_view::npos) return true;
                                const auto e = std::stoll(std::string(name.substr(at + 13)));
                                return p * per <= e && e < (p + 1) * per;
                            }),
        foe::DType::bf16));
}

/// Runs body(p) on GPU p for p < ranks, each in its own thread, and reports what any threw.
template <class Body>
void on_ranks(int ranks, Body body)
{
    std::vector<std::exception_ptr> failed(sz(ranks));
    std::vector<std::thread> threads;
    for (int p = 0; p < ranks; ++p)
        threads.emplace_back([&, p] {
            try {
                fc::check(cudaSetDevice(p), "cudaSetDevice");
                body(p);
            } catch (...) {
                failed[sz(p)] = std::current_exception();
            }
        });
    for (auto& t : threads) t.join();
    for (int p = 0; p < ranks; ++p) {
        if (!failed[sz(p)]) continue;
        try {
            std::rethrow_exception(failed[sz(p)]);
        } catch (const std::exception& e) {
            FAIL("rank ", p, ": ", e.what());
        } catch (...) {
            FAIL("rank ", p, ": a REQUIRE failed (see above)");
        }
    }
}

constexpr foe::index_t max_tokens = 96;

fc::CudaModelOptions base_options(const ModelConfig& c, bool graphs, foe::index_t slots = 2)
{
    fc::CudaModelOptions o;
    o.cache_slots = slots;
    o.cache_capacity = c.max_position_embeddings;
    o.max_batch_tokens = max_tokens;
    o.cuda_graphs = graphs;
    return o;
}

std::shared_ptr<NcclExpertExchange> exchange(NcclComm& comm, const ModelConfig& c, Dispatch mode, bool fixed,
                                             foe::index_t tokens, int members = 1, int rank = 0)
{
    return std::make_shared<NcclExpertExchange>(comm, foe::parallel::moe_ep_spec(c, members, rank, mode, fixed, tokens));
}

}  // namespace

TEST_CASE("cuda ep model: one-rank expert parallelism (naive, dedup; dynamic, fixed) equals local experts and the host")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    for (const auto score : {foe::ScoreFunction::softmax, foe::ScoreFunction::sigmoid}) {
        const ModelConfig c = moe_config(score);
        const auto w = bf16_weights(c, 31);
        const auto tokens = random_tokens(41, c.vocab_size, 32);
        const auto host = foe::make_model(w);
        const auto want = host->prefill(tokens);
        fc::CudaModel<> local(w, base_options(c, false));
        for (const Dispatch mode : {Dispatch::naive, Dispatch::dedup})
            for (const bool fixed : {false, true}) {
                CAPTURE(static_cast<int>(score));
                CAPTURE(foe::parallel::to_string(mode));
                CAPTURE(fixed);
                const auto plain = local.prefill(tokens);  // (its routing is what check_close compares)
                auto o = base_options(c, false);
                o.expert_exchange = exchange(comm, c, mode, fixed, max_tokens);
                fc::CudaModel<> ep(w, o);
                const auto got = ep.prefill(tokens);
                check_logits_close(local, ep, plain.values(), got.values(), bf16_tolerance);
                check_logits_close(*host, ep, want.values(), got.values(), model_tolerance);
                // Again, and a ragged batch of two sequences: the exchange's buffers are reused.
                CHECK(same_bits(ep.prefill(tokens).values(), got.values()));
                const auto a = random_tokens(9, c.vocab_size, 33), b = random_tokens(14, c.vocab_size, 34);
                std::vector<std::int32_t> ids(a);
                ids.insert(ids.end(), b.begin(), b.end());
                const Batch batch({foe::SequenceChunk{0, 0, 9}, foe::SequenceChunk{1, 0, 14}});
                const auto want_ragged = local.forward(batch, ids);
                const auto got_ragged = ep.forward(batch, ids);
                check_logits_close(local, ep, want_ragged.values(), got_ragged.values(), bf16_tolerance);
                // An empty batch still runs every layer's exchange (0 tokens) and changes nothing.
                CHECK(ep.forward(Batch{}, {}).values().empty());
                CHECK(ep.sequence_length(1) == 14);
            }
    }
    CHECK_FALSE(comm.aborted());
}

TEST_CASE("cuda ep model: a decode step replayed from a graph with the fixed-capacity exchange equals the eager step")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    const ModelConfig c = moe_config();
    const auto w = bf16_weights(c, 35);
    const foe::index_t vocab = c.vocab_size, slots = 3;
    for (const Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
        CAPTURE(foe::parallel::to_string(mode));
        auto graphed_o = base_options(c, true, slots);
        graphed_o.expert_exchange = exchange(comm, c, mode, false, max_tokens);
        graphed_o.decode_expert_exchange = exchange(comm, c, mode, true, slots);
        auto eager_o = base_options(c, false, slots);
        eager_o.expert_exchange = exchange(comm, c, mode, true, max_tokens);  // eager, fixed capacity
        fc::CudaModel<> graphed(w, graphed_o), eager(w, eager_o), local(w, base_options(c, false, slots));
        for (foe::index_t s = 0; s < slots; ++s) {
            const auto prompt = random_tokens(6 + 5 * s, vocab, 40 + static_cast<std::uint64_t>(s));
            (void)graphed.prefill(prompt, s);
            (void)eager.prefill(prompt, s);
            (void)local.prefill(prompt, s);
        }
        for (int step = 0; step < 3; ++step) {  // one graph of 3 tokens, captured once, replayed
            CAPTURE(step);
            std::vector<foe::SequenceChunk> chunks;
            for (const foe::index_t s : {2, 0, 1}) chunks.push_back({s, graphed.sequence_length(s), 1});
            const Batch batch(chunks);
            const auto ids = random_tokens(3, vocab, 50 + static_cast<std::uint64_t>(step));
            const auto g = graphed.forward(batch, ids);
            const auto e = eager.forward(batch, ids);
            const auto l = local.forward(batch, ids);
            check_logits_close(eager, graphed, e.values(), g.values(), bf16_tolerance);
            check_logits_close(local, graphed, l.values(), g.values(), bf16_tolerance);
        }
        CHECK(graphed.captured_graphs() == 1);
        CHECK(eager.captured_graphs() == 0);
    }
    CHECK_FALSE(comm.aborted());
}

TEST_CASE("cuda ep model: bad expert-parallel options are typed errors")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    const ModelConfig c = moe_config();
    const auto w = bf16_weights(c, 36);
    auto o = base_options(c, true);
    o.expert_exchange = exchange(comm, c, Dispatch::naive, false, max_tokens - 1);  // below max_batch_tokens
    CHECK_THROWS_AS(fc::CudaModel<>(w, o), foe::InvalidArgument);
    o.expert_exchange = exchange(comm, c, Dispatch::naive, false, max_tokens);
    o.decode_expert_exchange = exchange(comm, c, Dispatch::naive, false, 2);  // not capturable
    CHECK_THROWS_AS(fc::CudaModel<>(w, o), foe::InvalidArgument);
    // An FoE config of several groups is not the MoE baseline.
    ModelConfig foe_c = c;
    foe_c.architecture = foe::Architecture::foe;
    foe_c.num_expert_groups = 4;
    foe_c.qk_norm = foe::QkNorm::per_head;
    CHECK_THROWS_AS((void)foe::parallel::moe_ep_spec(foe_c, 1, 0, Dispatch::naive, false, 8), foe::ConfigError);
    CHECK_THROWS_AS((void)foe::parallel::moe_ep_spec(c, 3, 0, Dispatch::naive, false, 8), foe::ConfigError);
    CHECK_FALSE(comm.aborted());
}

TEST_CASE("cuda ep model: two ranks of a data-parallel MoE (a sequence and half the experts each) equal one rank")
{
    if (fc::cuda_device_count() < 2) {
        MESSAGE("fewer than two CUDA devices (", fc::cuda_device_count(), "): the two-rank EP model is skipped");
        return;
    }
    constexpr int ranks = 2;
    const ModelConfig c = moe_config();
    const auto w = bf16_weights(c, 37);
    const std::vector<std::vector<std::int32_t>> prompts{random_tokens(19, c.vocab_size, 60),
                                                         random_tokens(27, c.vocab_size, 61)};
    std::vector<foe::Tensor<float>> want(ranks), got(ranks);
    {
        fc::CudaModel<> whole(w, base_options(c, false));
        for (int p = 0; p < ranks; ++p) want[sz(p)] = whole.prefill(prompts[sz(p)], p);
    }
    const ncclUniqueId id = NcclComm::make_unique_id();
    on_ranks(ranks, [&](int p) {
        auto comm = NcclComm::from_unique_id(id, p, ranks, p);
        auto o = base_options(c, false);
        o.device = p;
        o.expert_exchange = exchange(comm, c, Dispatch::naive, false, max_tokens, ranks, p);
        o.synchronize = [&comm](cudaStream_t s) { comm.synchronize(s); };
        fc::CudaModel<> model(held_weights(c, 37, p, ranks), o);  // this rank's experts only
        got[sz(p)] = model.prefill(prompts[sz(p)], 0);
        // Rank 1 idles (an empty batch) while rank 0 runs its sequence again.
        const auto again = p == 0 ? model.prefill(prompts[0], 0) : model.forward(Batch{}, {});
        if (p == 0) CHECK(same_bits(again.values(), got[0].values()));
    });
    for (int p = 0; p < ranks; ++p) {
        CAPTURE(p);
        CHECK(rel_error(got[sz(p)].values(), want[sz(p)].values()) < model_tolerance);
    }
}

TEST_CASE("cuda ep model: two ranks of head-parallel attention + EP (half the heads and experts each) equal one rank")
{
    if (fc::cuda_device_count() < 2) {
        MESSAGE("fewer than two CUDA devices (", fc::cuda_device_count(), "): the two-rank TP+EP model is skipped");
        return;
    }
    constexpr int ranks = 2;
    // 4 KV heads, 2 per rank; a per-head QK-norm, since a full-width one (OLMoE's) normalises
    // across the head shares and is refused for head_parts > 1.
    ModelConfig c = moe_config();
    c.qk_norm = foe::QkNorm::per_head;
    c.validate();
    const auto w = bf16_weights(c, 38);
    const auto a = random_tokens(13, c.vocab_size, 70), b = random_tokens(20, c.vocab_size, 71);
    std::vector<std::int32_t> ids(a);
    ids.insert(ids.end(), b.begin(), b.end());
    const Batch batch({foe::SequenceChunk{0, 0, 13}, foe::SequenceChunk{1, 0, 20}});  // 33 rows: slices 17 and 16
    foe::Tensor<float> want;
    {
        fc::CudaModel<> whole(w, base_options(c, false));
        want = whole.forward(batch, ids);
    }
    for (const Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
        CAPTURE(foe::parallel::to_string(mode));
        std::vector<foe::Tensor<float>> got(ranks);
        const ncclUniqueId id = NcclComm::make_unique_id();
        on_ranks(ranks, [&](int p) {
            auto comm = NcclComm::from_unique_id(id, p, ranks, p);
            auto o = base_options(c, false);
            o.device = p;
            o.expert_exchange = exchange(comm, c, mode, false, (max_tokens + ranks - 1) / ranks, ranks, p);
            o.synchronize = [&comm](cudaStream_t s) { comm.synchronize(s); };
            o.head_part = p;
            o.head_parts = ranks;
            o.head_comm.reduce = [&comm](float* v, std::size_t n, cudaStream_t s) {
                comm.all_reduce_sum(std::span<float>(v, n), s);
            };
            o.head_comm.gather = [&comm](const foe::bfloat16* in, std::size_t n, foe::bfloat16* out, cudaStream_t s) {
                comm.all_gather(std::span<const foe::bfloat16>(in, n), std::span<foe::bfloat16>(out, 2 * n), s);
            };
            fc::CudaModel<> model(held_weights(c, 38, p, ranks), o);
            got[sz(p)] = model.forward(batch, ids);
            // A decode step of both sequences (2 rows: one per rank's slice).
            const Batch step({foe::SequenceChunk{0, 13, 1}, foe::SequenceChunk{1, 20, 1}});
            const std::vector<std::int32_t> next{ids[3], ids[5]};
            (void)model.forward(step, next);
        });
        CHECK(same_bits(got[0].values(), got[1].values()));  // every rank has every token's x'
        for (int p = 0; p < ranks; ++p) {
            CAPTURE(p);
            CHECK(rel_error(got[sz(p)].values(), want.values()) < model_tolerance);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MoeHeadParallelLayer (layer/moe_head_parallel_layer.hpp) with device policies: one layer of
// head-parallel attention + expert parallelism against the host MoeHeadParallelLayer on the same
// bf16 weights, over a one-rank device comm (comm::CudaSelfComm) and over a two-rank comm faked on
// one GPU (two host threads, each rank half the KV heads; its collectives meet on the host), with
// the experts behind a one-rank NcclExpertExchange (CudaExchangeExperts). The instantiation over
// NcclComm is compile-checked below without a device.

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "foe/attention/gqa_attention.cuh"
#include "foe/attention/gqa_attention.hpp"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/comm/self_comm.hpp"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/layer/moe_head_parallel_layer.hpp"
#include "foe/model/weights.hpp"
#include "foe/parallel/exchange_experts.cuh"
#include "foe/parallel/local_experts.hpp"
#include "foe/routing/router.cuh"
#include "foe/routing/router.hpp"

namespace head_parallel_test {

namespace fa = foe::attention;
namespace fr = foe::routing;
namespace fx = foe::experts;
namespace fp = foe::parallel;
using bfloat16 = foe::bfloat16;  // not CUDA's
using index_t = foe::index_t;

using HostLayer = foe::MoeHeadParallelLayer<fa::GqaAttention<>, fr::Router<fr::Softmax, fr::GlobalTopK>,
                                            fx::SwiGluExperts<>, fp::LocalExperts, foe::comm::SelfComm>;
template <class C>
using DeviceLayer = foe::MoeHeadParallelLayer<fa::CudaGqaAttention<fc::TcGemm>,
                                              fr::CudaRouter<fr::Softmax, fr::GlobalTopK, fc::TcGemm>,
                                              fx::CudaSwiGluExperts<fc::TcGemm>, fp::CudaExchangeExperts, C>;

/// Two ranks on one device, one host thread each: every collective is a rendezvous on the host
/// (each rank's stream synchronised, then the peer's device buffer read in place, then a second
/// rendezvous before either rank goes on). A rank that waits 60 s for its peer throws instead of
/// hanging the test.
class PairHub {
public:
    void arrive()
    {
        std::unique_lock lock(mutex_);
        const auto generation = generation_;
        if (++arrived_ == 2) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
            return;
        }
        if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; }))
            throw foe::CommError("PairComm: the peer rank did not join the collective within 60 s");
    }
    const void* posted[2] = {nullptr, nullptr};

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    int arrived_ = 0;
    unsigned generation_ = 0;
};

struct PairComm {
    using stream_type = cudaStream_t;
    PairHub* hub = nullptr;
    int me = 0;

    [[nodiscard]] int rank() const { return me; }
    [[nodiscard]] int size() const { return 2; }

    /// buf = buf(rank 0) + buf(rank 1) in fp32, what a two-rank NCCL sum gives.
    void all_reduce_sum(std::span<float> buf, cudaStream_t stream)
    {
        const std::vector<std::vector<float>> both = exchange(std::span<const float>(buf), stream);
        std::vector<float> sum(buf.size());
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = both[0][i] + both[1][i];
        write(sum, buf.data(), stream);
    }
    void all_gather(std::span<const bfloat16> in, std::span<bfloat16> out, cudaStream_t stream) { gather(in, out, stream); }
    void all_gather(std::span<const float> in, std::span<float> out, cudaStream_t stream) { gather(in, out, stream); }
    void all_to_all_v(std::span<const float>, std::span<const index_t>, std::span<float>, std::span<const index_t>,
                      cudaStream_t)
    {
        throw foe::CommError("PairComm: no all_to_all_v (the experts go through their own exchange)");
    }
    [[nodiscard]] PairComm split(int, int) const { return *this; }

private:
    /// Both ranks' device buffers `in`, read on the host once both streams are done with them.
    template <class T>
    std::vector<std::vector<T>> exchange(std::span<const T> in, cudaStream_t stream)
    {
        fc::check(cudaStreamSynchronize(stream), "PairComm: stream");
        hub->posted[me] = in.data();
        hub->arrive();
        std::vector<std::vector<T>> both(2, std::vector<T>(in.size()));
        for (int p = 0; p < 2; ++p)
            if (!in.empty())
                fc::check(cudaMemcpy(both[sz(p)].data(), hub->posted[p], in.size() * sizeof(T), cudaMemcpyDeviceToHost),
                          "PairComm: read");
        hub->arrive();  // both have read before either writes or posts again
        return both;
    }
    template <class T>
    void gather(std::span<const T> in, std::span<T> out, cudaStream_t stream)
    {
        if (out.size() != 2 * in.size()) throw foe::CommError("PairComm::all_gather: the output is not two inputs");
        const auto both = exchange(in, stream);
        std::vector<T> all(both[0]);
        all.insert(all.end(), both[1].begin(), both[1].end());
        write(all, out.data(), stream);
    }
    /// The host values into device memory, ordered before the stream's later work.
    template <class T>
    static void write(const std::vector<T>& host, T* device, cudaStream_t stream)
    {
        if (host.empty()) return;
        fc::check(cudaMemcpyAsync(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
                  "PairComm: write");
        fc::check(cudaStreamSynchronize(stream), "PairComm: write");
    }
};
static_assert(foe::comm::Comm<PairComm>);
static_assert(std::same_as<foe::backend_of_t<PairComm>, foe::CudaBackend>);

// What the device layer is, checked without a device.
static_assert(std::same_as<DeviceLayer<foe::comm::CudaSelfComm>::backend, foe::CudaBackend>);
static_assert(std::same_as<DeviceLayer<foe::comm::NcclComm>::routing_result_type, fr::DeviceRoutingResult>);
static_assert(std::same_as<HostLayer::backend, foe::HostBackend>);
static_assert(std::same_as<HostLayer::routing_result_type, fr::RoutingResult>);

/// A standard MoE that splits over two ranks' heads: one group, per-head QK-norm (a full-width
/// norm cannot be applied to a share of the heads), 4 KV heads.
ModelConfig layer_config()
{
    ModelConfig c = moe_config();
    c.architecture = foe::Architecture::foe;
    c.num_expert_groups = 1;
    c.qk_norm = foe::QkNorm::per_head;
    c.validate();
    return c;
}

constexpr index_t layer_max_tokens = 40, layer_max_sequences = 2;

foe::LayerOptions layer_options(const ModelConfig& c)
{
    foe::LayerOptions o;
    o.cache_slots = 2;
    o.cache_capacity = c.max_position_embeddings;
    o.max_tokens = layer_max_tokens;
    o.max_sequences = layer_max_sequences;
    return o;
}

/// The batches every layer runs, in order: a ragged prefill of two sequences (33 rows: slices of
/// 17 and 16 over two ranks), a decode step of both (2 rows), one of one sequence (1 row: rank 1's
/// slice is empty), and an empty batch (T = 0: only the exchange runs).
std::vector<foe::Batch> layer_batches()
{
    return {foe::Batch({foe::SequenceChunk{0, 0, 13}, foe::SequenceChunk{1, 0, 20}}),
            foe::Batch({foe::SequenceChunk{0, 13, 1}, foe::SequenceChunk{1, 20, 1}}),
            foe::Batch({foe::SequenceChunk{1, 21, 1}}), foe::Batch{}};
}

/// One device layer's forward of a batch on `stream`: x [T, d] bf16 in, x' [T, d] out (host copies).
template <class Layer>
std::vector<bfloat16> device_forward(Layer& layer, const foe::Batch& batch, const std::vector<bfloat16>& x,
                                     cudaStream_t stream, fc::Scratch& scratch)
{
    const index_t t = batch.tokens(), d = layer.config().hidden_size;
    const fc::BatchLayout layout(layer_max_sequences, std::max(t, layer_max_tokens));
    std::vector<std::int32_t> arrays(layout.size(), 0), ids(sz(t), 0);
    layout.fill(batch, ids, arrays);
    auto device_arrays = fc::upload(arrays);
    auto dx = fc::upload(x);
    fc::DeviceBuffer<bfloat16> out(std::max<std::size_t>(sz(t * d), 1));
    fc::fill_bytes(out, 0xff);
    const fc::DeviceContext ctx{stream, &scratch};
    layer.forward(layout.view(device_arrays.data(), batch), foe::TensorView<const bfloat16, 3>(dx.data(), {1, t, d}),
                  foe::TensorView<bfloat16, 3>(out.data(), {1, t, d}), ctx);
    fc::check(cudaStreamSynchronize(stream), "head-parallel layer forward");
    CHECK(scratch.used() <= layer.scratch_bytes());
    std::vector<bfloat16> got(sz(t * d));
    if (t > 0)
        fc::check(cudaMemcpy(got.data(), out.data(), got.size() * sizeof(bfloat16), cudaMemcpyDeviceToHost), "download");
    return got;
}

template <class T>
std::vector<T> download_n(const T* p, std::size_t n)
{
    std::vector<T> h(n);
    if (n > 0) fc::check(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy (test)");
    return h;
}

/// The experts each token's slots chose, sorted: [T][k].
std::vector<std::vector<std::int32_t>> chosen(const std::vector<std::int32_t>& experts, index_t tokens, index_t slots)
{
    std::vector<std::vector<std::int32_t>> rows(sz(tokens));
    for (index_t i = 0; i < tokens; ++i) {
        rows[sz(i)].assign(experts.begin() + i * slots, experts.begin() + (i + 1) * slots);
        std::sort(rows[sz(i)].begin(), rows[sz(i)].end());
    }
    return rows;
}

/// The device layer's x' against the host layer's, row by row, as check_logits_close does for
/// logits: a token whose experts differ (a near tie decided on bf16 activations) is not
/// comparable, so such rows are counted (rare) and skipped. One layer's bf16 roundings stay far
/// inside 2e-2 of max |x'|.
void check_layer_close(const std::vector<bfloat16>& got, const std::vector<float>& want, index_t d,
                       const std::vector<std::vector<std::int32_t>>& got_experts,
                       const std::vector<std::vector<std::int32_t>>& want_experts)
{
    REQUIRE(got.size() == want.size());
    const auto rows = static_cast<index_t>(want.size()) / d;
    REQUIRE(static_cast<index_t>(got_experts.size()) == rows);
    REQUIRE(static_cast<index_t>(want_experts.size()) == rows);
    double scale = 0.0, worst = 0.0;
    index_t flips = 0;
    for (float v : want) scale = std::max(scale, std::abs(static_cast<double>(v)));
    for (index_t i = 0; i < rows; ++i) {
        if (got_experts[sz(i)] != want_experts[sz(i)]) {
            ++flips;
            continue;
        }
        for (index_t j = 0; j < d; ++j) {
            const auto g = static_cast<double>(static_cast<float>(got[sz(i * d + j)]));
            worst = std::isfinite(g) ? std::max(worst, std::abs(g - static_cast<double>(want[sz(i * d + j)])))
                                     : std::numeric_limits<double>::infinity();
        }
    }
    CHECK_MESSAGE(flips <= rows / 10 + 1, flips, " of ", rows, " rows were routed differently");
    CHECK(worst / std::max(scale, 1e-30) < 2e-2);
}

/// The inputs of every batch (bf16 values, the host reads the same floats), and the host layer's
/// outputs and routing on them: the oracle of every device run.
struct HostReference {
    std::vector<Bf16Data> inputs;
    std::vector<std::vector<float>> outputs;
    std::vector<std::vector<std::vector<std::int32_t>>> experts;
};

HostReference host_reference(const ModelConfig& c, const foe::LayerWeights& lw)
{
    HostReference ref;
    HostLayer host(c, lw, layer_options(c), foe::comm::SelfComm{}, fp::LocalExperts{});
    std::mt19937_64 rng(90);
    const index_t d = c.hidden_size;
    for (const auto& batch : layer_batches()) {
        const index_t t = batch.tokens();
        ref.inputs.push_back(random_bf16(sz(t * d), rng));
        std::vector<float> out(sz(t * d));
        host.forward(batch, foe::TensorView<const float, 3>(ref.inputs.back().values.data(), {1, t, d}),
                     foe::TensorView<float, 3>(out.data(), {1, t, d}));
        ref.outputs.push_back(std::move(out));
        const auto& r = host.last_routing();
        ref.experts.push_back(chosen(r.experts, r.tokens, r.slots_per_token));
    }
    return ref;
}

/// The device routing of the rows [first, first + rows) that this rank routed, as sorted sets.
template <class Layer>
std::vector<std::vector<std::int32_t>> device_experts(const Layer& layer)
{
    const auto& r = layer.last_routing();
    return chosen(download_n(r.experts, sz(r.tokens * r.slots_per_token)), r.tokens, r.slots_per_token);
}

}  // namespace head_parallel_test

// Every device member of the layer over NCCL compiles (no device needed).
template class foe::MoeHeadParallelLayer<foe::attention::CudaGqaAttention<foe::cuda::TcGemm>,
                                         foe::routing::CudaRouter<foe::routing::Softmax, foe::routing::GlobalTopK,
                                                                  foe::cuda::TcGemm>,
                                         foe::experts::CudaSwiGluExperts<foe::cuda::TcGemm>,
                                         foe::parallel::CudaExchangeExperts, foe::comm::NcclComm>;

TEST_CASE("cuda ep layer: the device MoeHeadParallelLayer over one rank (CudaSelfComm) equals the host layer")
{
    using namespace head_parallel_test;
    const ModelConfig c = layer_config();
    const auto w = bf16_weights(c, 81);
    const foe::LayerWeights lw = foe::layer_weights(*w, 0);
    // Without a device: bad plans are typed errors before anything is uploaded.
    {
        auto o = layer_options(c);
        o.max_tokens = 0;
        CHECK_THROWS_AS(DeviceLayer<foe::comm::CudaSelfComm>(c, lw, o, {}, {}), foe::InvalidArgument);
        o = layer_options(c);
        o.max_sequences = 0;
        CHECK_THROWS_AS(DeviceLayer<foe::comm::CudaSelfComm>(c, lw, o, {}, {}), foe::InvalidArgument);
        // OLMoE's full-width QK-norm cannot be split over two ranks' heads.
        const ModelConfig olmoe = moe_config();
        const auto wo = bf16_weights(olmoe, 83);
        PairHub hub;
        CHECK_THROWS_WITH_AS(DeviceLayer<PairComm>(olmoe, foe::layer_weights(*wo, 0), layer_options(olmoe),
                                                   PairComm{&hub, 0}, {}),
                             doctest::Contains("full-width q/k norm"), foe::InvalidArgument);
    }
    if (!have_device()) return;
    const HostReference ref = host_reference(c, lw);
    auto nccl = NcclComm::with_self(0);
    NcclExpertExchange exchange(nccl, foe::parallel::moe_ep_spec(c, 1, 0, Dispatch::naive, false, layer_max_tokens));
    DeviceLayer<foe::comm::CudaSelfComm> layer(c, lw, layer_options(c), {}, fp::CudaExchangeExperts(exchange));
    fc::DeviceBuffer<unsigned char> memory(layer.scratch_bytes());
    fc::Scratch scratch(memory.data(), memory.size());
    const auto batches = layer_batches();
    for (std::size_t b = 0; b < batches.size(); ++b) {
        CAPTURE(b);
        const auto got = device_forward(layer, batches[b], ref.inputs[b].bits, nullptr, scratch);
        check_layer_close(got, ref.outputs[b], c.hidden_size, device_experts(layer), ref.experts[b]);
    }
    // Too many tokens for the plan is a CapacityError, before anything is enqueued.
    const foe::Batch big({foe::SequenceChunk{0, 0, layer_max_tokens + 1}});
    CHECK_THROWS_AS((void)device_forward(layer, big, std::vector<foe::bfloat16>(sz((layer_max_tokens + 1) * c.hidden_size)),
                                         nullptr, scratch),
                    foe::CapacityError);
    CHECK_FALSE(nccl.aborted());
}

TEST_CASE("cuda ep layer: two ranks of the device MoeHeadParallelLayer (half the heads each) equal the host layer")
{
    using namespace head_parallel_test;
    if (!have_device()) return;
    const ModelConfig c = layer_config();  // 4 KV heads: 2 per rank
    const auto w = bf16_weights(c, 82);
    const foe::LayerWeights lw = foe::layer_weights(*w, 0);
    const HostReference ref = host_reference(c, lw);
    const auto batches = layer_batches();
    PairHub hub;
    std::vector<std::vector<std::vector<foe::bfloat16>>> got(2);
    std::vector<std::vector<std::vector<std::vector<std::int32_t>>>> routed(2);
    std::vector<std::exception_ptr> failed(2);
    std::vector<std::thread> threads;
    for (int p = 0; p < 2; ++p)
        threads.emplace_back([&, p] {
            try {
                fc::check(cudaSetDevice(0), "cudaSetDevice");
                cudaStream_t stream = nullptr;
                fc::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
                auto nccl = NcclComm::with_self(0);  // each rank's experts: all of them, behind its own exchange
                NcclExpertExchange exchange(nccl, foe::parallel::moe_ep_spec(c, 1, 0, Dispatch::naive, false,
                                                                             (layer_max_tokens + 1) / 2));
                DeviceLayer<PairComm> layer(c, lw, layer_options(c), PairComm{&hub, p},
                                            fp::CudaExchangeExperts(exchange));
                fc::DeviceBuffer<unsigned char> memory(layer.scratch_bytes());
                fc::Scratch scratch(memory.data(), memory.size());
                for (std::size_t b = 0; b < batches.size(); ++b) {
                    got[sz(p)].push_back(device_forward(layer, batches[b], ref.inputs[b].bits, stream, scratch));
                    routed[sz(p)].push_back(device_experts(layer));
                }
                fc::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
            } catch (...) {
                failed[sz(p)] = std::current_exception();
            }
        });
    for (auto& t : threads) t.join();
    for (int p = 0; p < 2; ++p)
        if (failed[sz(p)]) {
            try {
                std::rethrow_exception(failed[sz(p)]);
            } catch (const std::exception& e) {
                FAIL("rank ", p, ": ", e.what());
            }
        }
    for (std::size_t b = 0; b < batches.size(); ++b) {
        CAPTURE(b);
        CHECK(same_bits(got[0][b], got[1][b]));  // every rank has every token's x'
        // Each rank routed its slice of the tokens: rows [0, 17) and [17, 33) of the prefill.
        std::vector<std::vector<std::int32_t>> experts(routed[0][b]);
        experts.insert(experts.end(), routed[1][b].begin(), routed[1][b].end());
        check_layer_close(got[0][b], ref.outputs[b], c.hidden_size, experts, ref.experts[b]);
    }
}
