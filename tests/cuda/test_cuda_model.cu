// The CUDA backend of the layers and the model against the host model on the same weights (the
// host computes in fp32 on weights rounded to bf16, so the only difference is the device's bf16
// activations): FoE with several H, both score functions, per-head and full-width QK-norm, the
// standard MoE; both dense GEMM policies; decode against prefill; ragged batches; bit-identical
// runs; a decode step replayed from a captured CUDA graph equal to the same step run eagerly; and
// bad input. Without a CUDA device every test case says so and passes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_test_util.hpp"
#include "model_test_util.hpp"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/model.cuh"
#include "foe/model/host_model.hpp"
#include "foe/serve/block_manager.hpp"

using namespace foe::cuda::testing;
using foe::Batch;
using foe::ModelConfig;
using foe::ModelWeights;

namespace {

/// A shape that takes the tensor-core attention path (head_dim 32) with GQA and H = 4 groups.
ModelConfig small_config(foe::Architecture arch, foe::index_t groups, foe::ScoreFunction score, foe::QkNorm norm)
{
    ModelConfig c = foe::named_config(arch == foe::Architecture::foe ? "foe-small" : "moe-small");
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
    c.num_expert_groups = groups;
    c.scoring_func = score;
    c.qk_norm = norm;
    c.validate();
    return c;
}

template <class Gemm = fc::LtGemm>
std::unique_ptr<fc::CudaModel<Gemm>> device_model(std::shared_ptr<const ModelWeights> w, bool graphs = true,
                                                  foe::index_t slots = 2)
{
    fc::CudaModelOptions o;
    o.cache_slots = slots;
    o.cache_capacity = w->config.max_position_embeddings;
    o.max_batch_tokens = 160;
    o.cuda_graphs = graphs;
    return std::make_unique<fc::CudaModel<Gemm>>(std::move(w), o);
}

}  // namespace

TEST_CASE("cuda: the batch layout the kernels read: offsets, slots, starts, lengths, rows' slots and positions, ids")
{
    // Host code: runs without a GPU.
    const fc::BatchLayout layout(4, 10);
    CHECK(layout.size() == 5 + 3 * 4 + 3 * 10);
    const Batch batch({foe::SequenceChunk{2, 0, 3}, foe::SequenceChunk{0, 7, 0}, foe::SequenceChunk{1, 5, 2}});
    const std::vector<std::int32_t> ids{10, 11, 12, 13, 14};
    std::vector<std::int32_t> buffer(layout.size(), -7);
    const auto used = layout.fill(batch, ids, buffer);
    auto section = [&](fc::BatchLayout::Section s) {
        const auto first = buffer.begin() + static_cast<std::ptrdiff_t>(layout.offset(s));
        return std::vector<std::int32_t>(first, first + static_cast<std::ptrdiff_t>(used[static_cast<std::size_t>(s)]));
    };
    using L = fc::BatchLayout;
    CHECK(section(L::row_offsets) == std::vector<std::int32_t>{0, 3, 3, 5});
    CHECK(section(L::slots) == std::vector<std::int32_t>{2, 0, 1});
    CHECK(section(L::starts) == std::vector<std::int32_t>{0, 7, 5});
    CHECK(section(L::lengths) == std::vector<std::int32_t>{3, 7, 7});
    CHECK(section(L::token_slots) == std::vector<std::int32_t>{2, 2, 2, 1, 1});
    CHECK(section(L::positions) == std::vector<std::int32_t>{0, 1, 2, 5, 6});
    CHECK(section(L::ids) == ids);
    const int fake_device = 0;
    const auto* base = reinterpret_cast<const std::int32_t*>(&fake_device);
    const fc::DeviceBatch view = layout.view(base, batch);
    CHECK(view.sequences == 3);
    CHECK(view.tokens == 5);
    CHECK(view.max_new_tokens == 3);
    CHECK(view.positions == base + layout.offset(L::positions));
    CHECK_THROWS_AS((void)layout.fill(Batch::single(0, 11), std::vector<std::int32_t>(11), buffer), foe::InvalidArgument);
}

TEST_CASE("cuda: model prefill matches the host model on the same bf16 weights: FoE and MoE, policies and H")
{
    if (!have_device()) return;
    using foe::Architecture;
    using foe::QkNorm;
    using foe::ScoreFunction;
    struct Case {
        Architecture arch;
        foe::index_t groups;
        ScoreFunction score;
        QkNorm norm;
    };
    for (const Case k : {Case{Architecture::foe, 4, ScoreFunction::softmax, QkNorm::per_head},
                         Case{Architecture::foe, 2, ScoreFunction::sigmoid, QkNorm::per_head},
                         Case{Architecture::foe, 4, ScoreFunction::sigmoid, QkNorm::none},
                         Case{Architecture::foe, 1, ScoreFunction::softmax, QkNorm::full_width},
                         Case{Architecture::olmoe, 1, ScoreFunction::softmax, QkNorm::full_width}}) {
        CAPTURE(k.groups);
        CAPTURE(static_cast<int>(k.score));
        CAPTURE(static_cast<int>(k.norm));
        const auto w = bf16_weights(small_config(k.arch, k.groups, k.score, k.norm), 11);
        const auto tokens = random_tokens(37, w->config.vocab_size, 3);
        const auto host = foe::make_model(w);
        const auto want = host->prefill(tokens);
        auto dev = device_model(w);
        const auto got = dev->prefill(tokens);
        check_logits_close(*host, *dev, want.values(), got.values());
    }
}

TEST_CASE("cuda: the model with foe's own tensor-core GEMM matches the host model, and the cuBLASLt one")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 12);
    const auto tokens = random_tokens(65, w->config.vocab_size, 4);
    const auto host = foe::make_model(w);
    const auto want = host->prefill(tokens);
    auto tc = device_model<fc::TcGemm>(w);
    auto lt = device_model<fc::LtGemm>(w);
    const auto got_tc = tc->prefill(tokens);
    const auto got_lt = lt->prefill(tokens);
    check_logits_close(*host, *tc, want.values(), got_tc.values());
    check_logits_close(*host, *lt, want.values(), got_lt.values());
}

TEST_CASE("cuda: the tiny test model (head_dim 8: the attention fallback path) matches the host model")
{
    if (!have_device()) return;
    const auto w = bf16_weights(foe::named_config("foe-tiny"), 13);
    const auto tokens = random_tokens(20, w->config.vocab_size, 5);
    const auto host = foe::make_model(w);
    const auto want = host->prefill(tokens);
    fc::CudaModelOptions o;
    o.max_batch_tokens = 32;
    fc::CudaModel<> dev(w, o);
    const auto got = dev.prefill(tokens);
    check_logits_close(*host, dev, want.values(), got.values());
}

TEST_CASE("cuda: decoding after a prefill equals the prefill of the longer prompt at its last position")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 14);
    const auto tokens = random_tokens(30, w->config.vocab_size, 6);
    const foe::index_t vocab = w->config.vocab_size;
    auto full = device_model(w)->prefill(tokens);
    const std::vector<float> want(full.values().end() - vocab, full.values().end());
    auto dev = device_model(w);
    (void)dev->prefill(std::span(tokens).first(tokens.size() - 1));
    const auto got = dev->decode(tokens.back());
    CHECK(rel_error(got, want) < model_tolerance);
    CHECK(dev->sequence_length(0) == static_cast<foe::index_t>(tokens.size()));
}

TEST_CASE("cuda: a ragged batch (one prefill, one decode) gives each sequence its own logits")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 15);
    const foe::index_t vocab = w->config.vocab_size;
    const auto a = random_tokens(9, vocab, 7), b = random_tokens(12, vocab, 8);
    // The host model on the same batch is the oracle.
    auto host = foe::make_model(w, foe::ModelOptions{2, 0, false});
    auto dev = device_model(w);
    (void)host->prefill(b, 1);
    (void)dev->prefill(b, 1);
    std::vector<std::int32_t> ids(a);
    ids.push_back(b.front());
    const Batch batch({foe::SequenceChunk{0, 0, 9}, foe::SequenceChunk{1, 12, 1}});
    const auto want = host->forward(batch, ids);
    const auto got = dev->forward(batch, ids);
    check_logits_close(*host, *dev, want.values(), got.values());
}

TEST_CASE("cuda: LogitRows::last_per_chunk gives each chunk's last row: the same bits with TcGemm, close with cuBLASLt")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 18);
    const foe::index_t vocab = w->config.vocab_size;
    const auto a = random_tokens(9, vocab, 10), b = random_tokens(14, vocab, 11);
    std::vector<std::int32_t> ids(a);
    ids.insert(ids.end(), b.begin(), b.end());
    const Batch batch({foe::SequenceChunk{0, 0, 9}, foe::SequenceChunk{1, 0, 14}});
    // The rows' last tokens: 8 and 22; their logits from a model that kept every row.
    auto last_rows = [&](const foe::Tensor<float>& all) {
        std::vector<float> rows(all.values().begin() + 8 * vocab, all.values().begin() + 9 * vocab);
        rows.insert(rows.end(), all.values().begin() + 22 * vocab, all.values().begin() + 23 * vocab);
        return rows;
    };
    {
        auto all = device_model<fc::TcGemm>(w), last = device_model<fc::TcGemm>(w);
        const auto want = last_rows(all->forward(batch, ids));
        const auto got = last->forward(batch, ids, foe::LogitRows::last_per_chunk);
        CHECK(got.shape()[0] == 2);
        CHECK(same_bits(got.values(), want));  // foe's GEMM: no result bit depends on the row count
        CHECK(last->sequence_length(1) == 14);
    }
    auto all = device_model<fc::LtGemm>(w), last = device_model<fc::LtGemm>(w);
    const auto want = last_rows(all->forward(batch, ids));
    const auto got = last->forward(batch, ids, foe::LogitRows::last_per_chunk);
    CHECK(rel_error(got.values(), want) < 1e-3);  // cuBLASLt may pick another algorithm for 2 rows
}

TEST_CASE("cuda: a CudaModel of layers composed by the user (make_layer) runs them: the same bits as the type it picks")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::sigmoid,
                                             foe::QkNorm::per_head), 19);
    using Gemm = fc::TcGemm;
    // What CudaModel<TcGemm> picks for this config, written out as a user composes it.
    using Layer = foe::FoeLayer<foe::attention::CudaGqaAttention<Gemm>,
                                foe::routing::CudaRouter<foe::routing::Sigmoid, foe::routing::PerGroupTopK, Gemm>,
                                foe::experts::CudaSwiGluExperts<Gemm>, foe::parallel::CudaLocalExperts,
                                foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>;
    fc::CudaModelOptions o;
    o.cache_slots = 2;
    o.max_batch_tokens = 160;
    o.make_layer = [&](foe::index_t, const foe::LayerWeights& lw, const foe::LayerOptions& lo) {
        return fc::model_layer<Layer>(w->config, lw, lo);
    };
    fc::CudaModel<Gemm> mine(w, o);
    auto picked = device_model<Gemm>(w);
    const auto prompt = random_tokens(21, w->config.vocab_size, 12);
    CHECK(same_bits(mine.prefill(prompt).values(), picked->prefill(prompt).values()));
    for (int step = 0; step < 2; ++step) CHECK(same_bits(mine.decode(prompt[sz(step)]), picked->decode(prompt[sz(step)])));
    CHECK(mine.memory().total() == picked->memory().total());

    // A layer that writes other streams than the model holds is refused at construction.
    o.make_layer = [&](foe::index_t, const foe::LayerWeights& lw, const foe::LayerOptions& lo) {
        foe::LayerOptions one = lo;
        one.group_end = one.group_begin + 1;
        return fc::model_layer<Layer>(w->config, lw, one);
    };
    CHECK_THROWS_WITH_AS(fc::CudaModel<Gemm>(w, o), doctest::Contains("writes 1 streams; the model holds 4 groups"),
                         foe::ConfigError);
}

TEST_CASE("cuda: results are bit-identical run to run, and a graph-replayed decode equals the eager one")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::sigmoid,
                                             foe::QkNorm::per_head), 16);
    const auto prompt = random_tokens(17, w->config.vocab_size, 9);
    auto graphed = device_model(w, true);
    auto eager = device_model(w, false);
    const auto p1 = graphed->prefill(prompt);
    const auto p2 = eager->prefill(prompt);
    CHECK(same_bits(p1.values(), p2.values()));
    std::int32_t next = prompt.back();
    for (int step = 0; step < 4; ++step) {
        CAPTURE(step);
        const auto g = graphed->decode(next);
        const auto e = eager->decode(next);
        CHECK(same_bits(g, e));
        next = static_cast<std::int32_t>(std::max_element(g.begin(), g.end()) - g.begin());
    }
    CHECK(graphed->captured_graphs() == 1);  // one decode batch size: captured once, replayed
    CHECK(eager->captured_graphs() == 0);
}

TEST_CASE("cuda: graph-replayed decode of several sequences (slots out of order, MoE too) equals eager decode")
{
    if (!have_device()) return;
    for (const auto arch : {foe::Architecture::foe, foe::Architecture::olmoe}) {
        CAPTURE(static_cast<int>(arch));
        const auto w = bf16_weights(small_config(arch, arch == foe::Architecture::foe ? 4 : 1,
                                                 foe::ScoreFunction::softmax,
                                                 arch == foe::Architecture::foe ? foe::QkNorm::per_head
                                                                                : foe::QkNorm::full_width),
                                    19);
        const foe::index_t vocab = w->config.vocab_size;
        auto graphed = device_model(w, true, 3);
        auto eager = device_model(w, false, 3);
        for (foe::index_t slot = 0; slot < 3; ++slot) {
            const auto prompt = random_tokens(5 + 7 * slot, vocab, 20 + static_cast<std::uint64_t>(slot));
            (void)graphed->prefill(prompt, slot);
            (void)eager->prefill(prompt, slot);
        }
        // Three decode steps of the sequences in slots 2, 0, 1 (one graph of 3 tokens, replayed),
        // then one of slots 1 and 2 only (a second graph), then a batch with an empty chunk,
        // which must not take a graph path.
        const auto step = [&](const std::vector<foe::index_t>& slots, std::vector<std::int32_t> ids) {
            std::vector<foe::SequenceChunk> chunks;
            for (auto s : slots) chunks.push_back({s, graphed->sequence_length(s), 1});
            const Batch batch(chunks);
            const auto g = graphed->forward(batch, ids);
            const auto e = eager->forward(batch, ids);
            CHECK(same_bits(g.values(), e.values()));
        };
        for (int n = 0; n < 3; ++n) step({2, 0, 1}, random_tokens(3, vocab, 30 + static_cast<std::uint64_t>(n)));
        step({1, 2}, random_tokens(2, vocab, 40));
        CHECK(graphed->captured_graphs() == 2);
        const Batch with_empty({foe::SequenceChunk{0, graphed->sequence_length(0), 0},
                                foe::SequenceChunk{1, graphed->sequence_length(1), 1}});
        const auto ids = random_tokens(1, vocab, 50);
        CHECK(same_bits(graphed->forward(with_empty, ids).values(), eager->forward(with_empty, ids).values()));
        CHECK(graphed->captured_graphs() == 2);
        // An empty batch changes nothing but the lengths it names, as on the host.
        const Batch empty({foe::SequenceChunk{2, 3, 0}});
        CHECK(graphed->forward(empty, {}).values().empty());
        CHECK(graphed->sequence_length(2) == 3);
    }
}

TEST_CASE("cuda: a paged KV cache gives the contiguous cache's logits bit for bit, pages of 16, 5 and 1, graphs too")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 23);
    const foe::index_t vocab = w->config.vocab_size, slots = 3, capacity = w->config.max_position_embeddings;
    for (const foe::index_t page : {16, 5, 1}) {
        CAPTURE(page);
        auto contiguous = device_model(w, true, slots);
        fc::CudaModelOptions o = contiguous->options();
        o.page_size = page;
        auto paged = std::make_unique<fc::CudaModel<>>(w, o);
        REQUIRE(paged->options().cache_pages == slots * ((capacity + page - 1) / page));
        foe::serve::BlockManager pages(paged->options().cache_pages, page, slots, (capacity + page - 1) / page);
        std::uint64_t seed = 60;
        const auto step = [&](const std::vector<std::pair<foe::index_t, foe::index_t>>& slot_tokens) {
            std::vector<foe::SequenceChunk> chunks;
            for (const auto& [s, n] : slot_tokens) chunks.push_back({s, contiguous->sequence_length(s), n});
            // Grow a page at a time, sequence after sequence: each one's pages are not consecutive.
            for (bool grew = true; grew;) {
                grew = false;
                for (const auto& c : chunks) {
                    const foe::index_t have = pages.pages_of(c.slot) * page;
                    if (have < c.start + c.length) {
                        pages.grow(c.slot, have + page);
                        grew = true;
                    }
                }
            }
            Batch batch(chunks);
            const auto ids = random_tokens(batch.tokens(), vocab, seed++);
            const auto want = contiguous->forward(batch, ids);
            batch.with_block_tables(pages.view());
            const auto got = paged->forward(batch, ids);
            CHECK(same_bits(got.values(), want.values()));
        };
        step({{0, 13}, {1, 7}, {2, 20}});                             // ragged prefill
        for (int n = 0; n < 3; ++n) step({{2, 1}, {0, 1}, {1, 1}});   // decode graph, replayed
        step({{1, 9}});                                               // chunked prefill
        step({{0, 1}, {1, 1}, {2, 12}});                              // decode mixed with a prefill chunk
        for (int n = 0; n < 2; ++n) step({{2, 1}, {0, 1}, {1, 1}});   // replays over grown tables
        CHECK(paged->captured_graphs() == 1);
        CHECK(contiguous->captured_graphs() == 1);

        // A batch without block tables, or short of a page, is refused before anything changes.
        const Batch plain({foe::SequenceChunk{0, paged->sequence_length(0), 1}});
        CHECK_THROWS_AS((void)paged->forward(plain, random_tokens(1, vocab, 99)), foe::InvalidArgument);
        Batch beyond({foe::SequenceChunk{0, paged->sequence_length(0), pages.pages_of(0) * page + 1 - paged->sequence_length(0)}});
        beyond.with_block_tables(pages.view());
        CHECK_THROWS_AS((void)paged->forward(beyond, random_tokens(beyond.tokens(), vocab, 98)), foe::CapacityError);
        CHECK(paged->sequence_length(0) == contiguous->sequence_length(0));
    }
}

TEST_CASE("cuda: two models holding two of four groups each, summed through reduce_streams, equal one model holding all")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 18);
    const auto tokens = random_tokens(23, w->config.vocab_size, 10);
    const auto whole = device_model(w)->prefill(tokens);

    // Two "ranks" as two threads on the one GPU, with a host-memory all-reduce as the hook (what
    // NcclComm::all_reduce_sum does across GPUs): copy the partial sums out, wait for the other
    // rank, add both in rank order, copy the sum back. A rank that fails drops out of the barrier
    // so the other cannot wait for it forever; its missing part then fails the other's hook.
    std::barrier sync(2);
    std::vector<float> parts[2];
    auto reduce_of = [&](int rank) {
        return [&, rank](float* values, std::size_t n, cudaStream_t stream) {
            parts[rank].resize(n);
            fc::check(cudaMemcpyAsync(parts[rank].data(), values, n * sizeof(float), cudaMemcpyDeviceToHost, stream),
                      "cudaMemcpyAsync");
            fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
            sync.arrive_and_wait();
            foe::require(parts[1 - rank].size() == n, "the other rank did not contribute");
            std::vector<float> sum(n);
            for (std::size_t i = 0; i < n; ++i) sum[i] = parts[0][i] + parts[1][i];
            sync.arrive_and_wait();  // both have read both parts before either overwrites its own
            fc::check(cudaMemcpyAsync(values, sum.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync");
            fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        };
    };
    foe::Tensor<float> halves[2];
    std::exception_ptr errors[2];
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; ++r)
        ranks.emplace_back([&, r] {
            try {
                fc::CudaModelOptions o;
                o.cache_capacity = w->config.max_position_embeddings;
                o.max_batch_tokens = 64;
                o.cuda_graphs = false;  // the hook synchronises with the host: not capturable
                o.group_begin = 2 * r;
                o.group_end = 2 * r + 2;
                o.reduce_streams = reduce_of(r);
                fc::CudaModel<> half(w, o);
                halves[r] = half.prefill(tokens);
            } catch (...) {
                errors[r] = std::current_exception();
                sync.arrive_and_drop();
            }
        });
    for (auto& t : ranks) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
    CHECK(same_bits(halves[0].values(), halves[1].values()));
    // The same sums in another order (two partial fp32 sums, then their sum): equal up to a rare
    // one-ulp bf16 rounding difference.
    CHECK(rel_error(halves[0].values(), whole.values()) < 1e-2);
}

TEST_CASE("cuda: bad input is a typed error naming the value and the limit")
{
    if (!have_device()) return;
    const auto w = bf16_weights(small_config(foe::Architecture::foe, 4, foe::ScoreFunction::softmax,
                                             foe::QkNorm::per_head), 17);
    auto dev = device_model(w);
    const std::vector<std::int32_t> bad{1, 2, static_cast<std::int32_t>(w->config.vocab_size)};
    CHECK_THROWS_AS((void)dev->prefill(bad), foe::InvalidArgument);
    CHECK(dev->sequence_length(0) == 0);
    const auto long_prompt = random_tokens(161, w->config.vocab_size, 1);
    CHECK_THROWS_WITH_AS((void)dev->prefill(long_prompt), doctest::Contains("max_batch_tokens = 160"),
                         foe::CapacityError);
    fc::CudaModelOptions o;
    o.cache_capacity = w->config.max_position_embeddings + 1;
    CHECK_THROWS_AS(fc::CudaModel<>(w, o), foe::InvalidArgument);
}
