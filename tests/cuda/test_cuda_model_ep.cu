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
    const ModelConfig c = moe_config();  // 4 KV heads: 2 per rank
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
