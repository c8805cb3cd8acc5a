// The whole model: against the float64 oracle, decode against prefill, causality, batching,
// greedy generation and bad input.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "oracle.hpp"
#include "test_util.hpp"

using foe::Architecture;
using foe::QkNorm;
using foe::ScoreFunction;

namespace {

void check_against_oracle(const foe::ModelConfig& c, std::size_t prompt)
{
    const auto w = test::weights(c, 11);
    auto model = foe::make_model(w);
    const auto tokens = test::random_tokens(prompt, c.vocab_size, 3);
    const auto logits = model->prefill(tokens);
    const auto expected = oracle::model_logits(*w, tokens);
    REQUIRE(logits.size() == static_cast<foe::index_t>(expected.size()));
    CHECK(oracle::relative_error(logits.values(), expected) < 2e-5);
}

}  // namespace

TEST_CASE("model prefill matches the float64 oracle: FoE, every score function and QK-norm, several H")
{
    for (foe::index_t h : {1, 2, 4})
        for (auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid})
            for (auto qk : {QkNorm::none, QkNorm::per_head})
                for (bool renorm : {false, true}) {
                    CAPTURE(h);
                    CAPTURE(static_cast<int>(score));
                    CAPTURE(static_cast<int>(qk));
                    CAPTURE(renorm);
                    check_against_oracle(test::tiny(Architecture::foe, h, score, qk, renorm), 9);
                }
}

TEST_CASE("model prefill matches the float64 oracle: standard MoE (OLMoE, full-width QK-norm)")
{
    check_against_oracle(test::tiny(Architecture::olmoe), 1);
    check_against_oracle(test::tiny(Architecture::olmoe), 13);
    auto c = test::tiny(Architecture::olmoe, 1, ScoreFunction::softmax, QkNorm::full_width, true);
    c.tie_word_embeddings = true;
    check_against_oracle(c, 7);
}

TEST_CASE("decode steps (the GEMM's one-row path) match the float64 oracle, fp32 and bf16 weights")
{
    for (auto arch : {Architecture::foe, Architecture::olmoe})
        for (auto dtype : {foe::DType::f32, foe::DType::bf16}) {
            CAPTURE(static_cast<int>(arch));
            CAPTURE(foe::dtype_name(dtype));
            const auto c = test::tiny(arch);
            const auto w = std::make_shared<const foe::ModelWeights>(foe::stored_as(*test::weights(c, 13), dtype));
            const auto tokens = test::random_tokens(9, c.vocab_size, 8);
            auto model = foe::make_model(w);
            (void)model->prefill(std::span(tokens).first(1));
            const auto expected = oracle::model_logits(*w, tokens);
            const auto v = static_cast<std::size_t>(c.vocab_size);
            for (std::size_t t = 1; t < tokens.size(); ++t) {
                CAPTURE(t);
                const auto got = model->decode(tokens[t]);
                const oracle::Vec want(expected.begin() + static_cast<std::ptrdiff_t>(t * v),
                                       expected.begin() + static_cast<std::ptrdiff_t>((t + 1) * v));
                CHECK(oracle::relative_error(got, want) < 2e-5);
            }
        }
}

TEST_CASE("decoding token t after a prefill of t tokens equals a prefill of t+1 tokens at its last position")
{
    for (auto arch : {Architecture::foe, Architecture::olmoe}) {
        const auto c = test::tiny(arch);
        const auto w = test::weights(c);
        const auto tokens = test::random_tokens(12, c.vocab_size, 5);
        auto full = foe::make_model(w);
        const auto reference = full->prefill(tokens);
        auto incremental = foe::make_model(w);
        (void)incremental->prefill(std::span(tokens).first(6));
        for (std::size_t t = 6; t < tokens.size(); ++t) {
            const auto next = incremental->decode(tokens[t]);
            const std::vector<float> row(reference.values().begin() + static_cast<std::ptrdiff_t>(t * c.vocab_size),
                                         reference.values().begin() + static_cast<std::ptrdiff_t>((t + 1) * c.vocab_size));
            double worst = 0.0, scale = 0.0;
            for (std::size_t i = 0; i < row.size(); ++i) {
                worst = std::max(worst, std::abs(static_cast<double>(next[i]) - row[i]));
                scale = std::max(scale, std::abs(static_cast<double>(row[i])));
            }
            CAPTURE(t);
            CHECK(worst / scale < 1e-5);
            // With the batch-invariant GEMM every step of a position's computation is the same
            // whether it runs in a prefill of t+1 rows or a decode of one: the same bits.
            CHECK(worst == 0.0);
        }
        CHECK(incremental->sequence_length(0) == static_cast<foe::index_t>(tokens.size()));
    }
}

namespace {

/// max |a - b| / max |b| over two float logit tensors; 0 exactly when they are bit-identical
/// (no NaN in either).
double relative_difference(std::span<const float> a, std::span<const float> b)
{
    REQUIRE(a.size() == b.size());
    return oracle::relative_error(a, oracle::to_double(b));
}

/// Changing token 7 must not change the logits of positions 0..6 (by more than `tolerance`
/// relative; 0 means bit for bit) and must change those of positions 7..9.
template <foe::gemm::GemmPolicy Gemm>
void check_causality(double tolerance)
{
    for (auto arch : {Architecture::foe, Architecture::olmoe}) {
        CAPTURE(static_cast<int>(arch));
        const auto c = test::tiny(arch);
        const auto w = test::weights(c);
        auto tokens = test::random_tokens(10, c.vocab_size, 9);
        auto model = foe::make_model<Gemm>(w);
        const auto before = model->prefill(tokens);
        tokens[7] = (tokens[7] + 1) % static_cast<std::int32_t>(c.vocab_size);
        const auto after = model->prefill(tokens);
        // The changed token also regroups the expert rows, so every expert GEMM gets another M.
        const auto prefix = static_cast<std::size_t>(7 * c.vocab_size);
        const auto b = std::span(before.values()), a = std::span(after.values());
        if (tolerance == 0.0)
            CHECK(std::equal(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(prefix), a.begin()));
        else
            CHECK(relative_difference(a.first(prefix), b.first(prefix)) <= tolerance);
        CHECK(relative_difference(a.subspan(prefix), b.subspan(prefix)) > 1e-3);
    }
}

/// A prefill of a (slot 0) and a decode of b (slot 1) in one ragged batch give the logits each
/// gets alone (within `tolerance` relative; 0 means bit for bit).
template <foe::gemm::GemmPolicy Gemm>
void check_batch_against_alone(double tolerance)
{
    const auto c = test::tiny();
    const auto w = test::weights(c);
    const auto a = test::random_tokens(5, c.vocab_size, 1), b = test::random_tokens(4, c.vocab_size, 2);

    foe::ModelOptions two_slots;
    two_slots.cache_slots = 2;
    auto batched = foe::make_model<Gemm>(w, two_slots);
    (void)batched->prefill(std::span(b).first(3), 1);  // sequence b already holds 3 tokens
    std::vector<std::int32_t> ids(a.begin(), a.end());
    ids.push_back(b[3]);
    const foe::Batch batch({{0, 0, 5}, {1, 3, 1}});  // prefill of a in slot 0, decode of b in slot 1
    const auto logits = batched->forward(batch, ids);

    auto alone = foe::make_model<Gemm>(w);
    const auto la = alone->prefill(a);
    const auto lb = alone->prefill(b);
    const auto v = static_cast<std::size_t>(c.vocab_size);
    const auto got = std::span(logits.values());
    const auto got_a = got.first(5 * v), got_b = got.subspan(5 * v);
    const auto want_b = std::span(lb.values()).subspan(3 * v);
    if (tolerance == 0.0) {
        CHECK(std::equal(got_a.begin(), got_a.end(), la.values().begin()));
        CHECK(std::equal(got_b.begin(), got_b.end(), want_b.begin()));
    } else {
        CHECK(relative_difference(got_a, la.values()) <= tolerance);
        CHECK(relative_difference(got_b, want_b) <= tolerance);
    }
}

}  // namespace

TEST_CASE("causality: changing a later token never changes earlier logits, bit for bit (BatchInvariant GEMM)")
{
    check_causality<foe::gemm::BatchInvariant>(0.0);
}

TEST_CASE("a ragged batch of a prefill and a decode gives each sequence's own logits bit for bit (BatchInvariant GEMM)")
{
    check_batch_against_alone<foe::gemm::BatchInvariant>(0.0);
}

TEST_CASE("LogitRows::last_per_chunk gives each chunk's last row, the same bits as with every row kept")
{
    for (auto arch : {Architecture::foe, Architecture::olmoe}) {
        CAPTURE(static_cast<int>(arch));
        const auto c = test::tiny(arch);
        const auto w = test::weights(c);
        const auto v = static_cast<std::size_t>(c.vocab_size);
        foe::ModelOptions three_slots;
        three_slots.cache_slots = 3;
        auto all = foe::make_model(w, three_slots), last = foe::make_model(w, three_slots);
        const auto ids = test::random_tokens(12, c.vocab_size, 5);
        // A prefill of 7, one of 4 and a decode of 1: then a decode step of all three.
        const foe::Batch first({{0, 0, 7}, {2, 0, 4}, {1, 0, 1}});
        const auto full = all->forward(first, ids);
        const auto kept = last->forward(first, ids, foe::LogitRows::last_per_chunk);
        REQUIRE(kept.shape() == std::vector<foe::index_t>{3, c.vocab_size});
        const std::size_t rows[] = {6, 10, 11};
        for (std::size_t r = 0; r < 3; ++r) {
            CAPTURE(r);
            const auto want = std::span(full.values()).subspan(rows[r] * v, v);
            CHECK(std::equal(want.begin(), want.end(), kept.values().begin() + static_cast<std::ptrdiff_t>(r * v)));
        }
        // The caches are the same: the next step agrees too.
        const foe::Batch step({{0, 7, 1}, {1, 1, 1}, {2, 4, 1}});
        const std::int32_t next[] = {ids[1], ids[2], ids[3]};
        CHECK(all->forward(step, next).values() == last->forward(step, next, foe::LogitRows::last_per_chunk).values());
        // generate() keeps only the last row of the prompt, and chooses the same tokens.
        auto g1 = foe::make_model(w), g2 = foe::make_model(w);
        foe::Tensor<float> prompt_logits;
        CHECK(g1->generate(std::span(ids).first(6), 4) == g2->generate(std::span(ids).first(6), 4, 0, &prompt_logits));
        CHECK(prompt_logits.shape() == std::vector<foe::index_t>{6, c.vocab_size});
    }
}

TEST_CASE("bad input: LogitRows::last_per_chunk with an empty chunk is refused, and nothing changes")
{
    const auto c = test::tiny();
    foe::ModelOptions two_slots;
    two_slots.cache_slots = 2;
    auto model = foe::make_model(test::weights(c), two_slots);
    const auto ids = test::random_tokens(3, c.vocab_size, 5);
    CHECK_THROWS_WITH_AS((void)model->forward(foe::Batch({{0, 0, 3}, {1, 0, 0}}), ids, foe::LogitRows::last_per_chunk),
                         doctest::Contains("chunk 1 of the batch is empty"), foe::InvalidArgument);
    CHECK(model->sequence_length(0) == 0);
}

#if defined(FOE_WITH_CBLAS)
// A vendor BLAS promises neither: the same row may round differently in a batch of another size.
// The bound is what fp32 rounding gives through two layers (the decode-against-prefill bound).
TEST_CASE("causality with the Cblas GEMM: earlier logits unchanged within 1e-5 relative")
{
    check_causality<foe::gemm::Cblas>(1e-5);
}

TEST_CASE("a ragged batch with the Cblas GEMM gives each sequence's own logits within 1e-5 relative")
{
    check_batch_against_alone<foe::gemm::Cblas>(1e-5);
}
#endif

TEST_CASE("greedy generation is deterministic and follows the argmax of the logits")
{
    const auto c = test::tiny();
    const auto w = test::weights(c);
    const auto prompt = test::random_tokens(4, c.vocab_size, 4);
    auto m1 = foe::make_model(w);
    auto m2 = foe::make_model(w);
    const auto g1 = m1->generate(prompt, 6);
    const auto g2 = m2->generate(prompt, 6);
    CHECK(g1 == g2);
    REQUIRE(g1.size() == 6);
    // The first generated token is the argmax of the prompt's last logits.
    const auto logits = m2->prefill(prompt);
    const auto last = std::span(logits.values()).last(static_cast<std::size_t>(c.vocab_size));
    CHECK(g1[0] == std::max_element(last.begin(), last.end()) - last.begin());
}

TEST_CASE("bad input: a token id outside the vocabulary is an InvalidArgument naming the id and the limit")
{
    const auto c = test::tiny();
    auto model = foe::make_model(test::weights(c));
    const std::vector<std::int32_t> tokens{1, 2, static_cast<std::int32_t>(c.vocab_size)};
    CHECK_THROWS_WITH_AS((void)model->prefill(tokens), doctest::Contains("token id 97"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS((void)model->decode(-1), doctest::Contains("outside the vocabulary [0, 97)"),
                         foe::InvalidArgument);
}

TEST_CASE("bad input: decoding past the KV cache's capacity is a CapacityError naming both positions")
{
    const auto c = test::tiny();
    foe::ModelOptions options;
    options.cache_capacity = 4;
    auto model = foe::make_model(test::weights(c), options);
    (void)model->prefill(test::random_tokens(4, c.vocab_size, 1));
    CHECK_THROWS_WITH_AS((void)model->decode(3), doctest::Contains("KV cache full"), foe::CapacityError);
    CHECK_THROWS_WITH_AS((void)model->decode(3), doctest::Contains("holds 4 positions"), foe::CapacityError);
    // The failed step changed nothing: the sequence still holds 4 positions.
    CHECK(model->sequence_length(0) == 4);
    CHECK_THROWS_AS((void)model->prefill(test::random_tokens(5, c.vocab_size, 1)), foe::CapacityError);
}

TEST_CASE("bad input: a cache larger than max_position_embeddings is refused")
{
    const auto c = test::tiny();
    foe::ModelOptions options;
    options.cache_capacity = c.max_position_embeddings + 1;
    CHECK_THROWS_WITH_AS((void)foe::make_model(test::weights(c), options), doctest::Contains("max_position_embeddings"),
                         foe::InvalidArgument);
}

TEST_CASE("bad input: weights missing a tensor name it")
{
    const auto c = test::tiny();
    auto w = foe::random_weights(c, 1);
    w.tensors.erase("model.layers.1.mlp.experts.3.up_proj.weight");
    CHECK_THROWS_WITH_AS((void)foe::make_model(std::make_shared<const foe::ModelWeights>(std::move(w))),
                         doctest::Contains("model.layers.1.mlp.experts.3.up_proj.weight"), foe::FormatError);
}

TEST_CASE("weights: random init is a pure function of (seed, tensor name)")
{
    const auto c = test::tiny();
    const auto a = foe::random_weights(c, 5), b = foe::random_weights(c, 5), other = foe::random_weights(c, 6);
    CHECK(a.at("lm_head.weight").to_float().values() == b.at("lm_head.weight").to_float().values());
    CHECK(a.at("lm_head.weight").to_float().values() != other.at("lm_head.weight").to_float().values());
    // No zeros, so a kernel that skips an element cannot hide.
    for (const auto& entry : a.tensors) {  // no structured binding: clang 14 cannot capture one in CHECK_MESSAGE
        const auto values = entry.second.to_float().values();
        CHECK_MESSAGE(std::none_of(values.begin(), values.end(), [](float v) { return v == 0.0f; }), entry.first);
    }
}

// =============================================================================================
// Sampling
// =============================================================================================

TEST_CASE("sampling: temperature 0 and top-k 1 are greedy; a seed reproduces its tokens, another seed differs")
{
    const auto c = test::tiny();
    const auto w = test::weights(c);
    const auto prompt = test::random_tokens(5, c.vocab_size, 6);
    const auto greedy = foe::make_model(w)->generate(prompt, 8);
    foe::GenerateOptions zero_t;
    zero_t.sampling.temperature = 0.0;
    zero_t.sampling.top_k = 5;
    CHECK(foe::make_model(w)->generate(prompt, 8, zero_t) == greedy);
    foe::GenerateOptions top1;
    top1.sampling.temperature = 1.5;
    top1.sampling.top_k = 1;
    top1.sampling.seed = 99;
    CHECK(foe::make_model(w)->generate(prompt, 8, top1) == greedy);

    foe::GenerateOptions hot;
    hot.sampling.temperature = 2.0;  // flat enough that two seeds surely differ over 8 draws
    hot.sampling.seed = 1;
    const auto a = foe::make_model(w)->generate(prompt, 8, hot);
    CHECK(foe::make_model(w)->generate(prompt, 8, hot) == a);
    hot.sampling.seed = 2;
    CHECK(foe::make_model(w)->generate(prompt, 8, hot) != a);
}

TEST_CASE("sampling: draws follow softmax(logits / T); top-k and top-p cut the tail; NaN is never drawn")
{
    const std::vector<float> logits{1.0f, 3.0f, std::nanf(""), 2.0f, 0.0f};
    const double t = 1.5;
    std::vector<double> p(logits.size(), 0.0);
    double total = 0.0;
    for (std::size_t i = 0; i < logits.size(); ++i)
        if (!std::isnan(logits[i])) total += p[i] = std::exp(logits[i] / t);
    for (auto& x : p) x /= total;

    const auto histogram = [&](foe::SamplingOptions o) {
        foe::Sampler s(o);
        std::vector<double> h(logits.size(), 0.0);
        constexpr int draws = 40000;
        for (int i = 0; i < draws; ++i) h[static_cast<std::size_t>(s.next(logits))] += 1.0 / draws;
        return h;
    };
    foe::SamplingOptions o;
    o.temperature = t;
    o.seed = 5;
    const auto all = histogram(o);
    for (std::size_t i = 0; i < p.size(); ++i) {
        CAPTURE(i);
        CHECK(std::abs(all[i] - p[i]) < 0.01);
    }
    CHECK(all[2] == 0.0);  // the NaN

    o.top_k = 2;  // tokens 1 and 3 only, in the ratio of their probabilities
    const auto top2 = histogram(o);
    CHECK(top2[0] + top2[2] + top2[4] == 0.0);
    CHECK(top2[1] / top2[3] == doctest::Approx(p[1] / p[3]).epsilon(0.05));

    o.top_k = 0;
    o.top_p = p[1] + 0.01;  // token 1 alone is short of top_p: tokens 1 and 3 reach it
    const auto nucleus = histogram(o);
    CHECK(nucleus[0] + nucleus[2] + nucleus[4] == 0.0);
    CHECK(nucleus[1] > 0.0);
    CHECK(nucleus[3] > 0.0);

    CHECK(foe::argmax(std::vector<float>{std::nanf(""), 1.0f, 1.0f}) == 1);  // NaN last, ties to the lower id
    CHECK_THROWS_WITH_AS(foe::Sampler({.temperature = -1.0}), doctest::Contains("temperature (-1)"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(foe::Sampler({.top_p = 0.0}), doctest::Contains("top_p (0)"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(foe::Sampler({.top_k = -2}), doctest::Contains("top_k (-2)"), foe::InvalidArgument);
}

TEST_CASE("generate stops after a stop token, which it keeps")
{
    const auto c = test::tiny();
    const auto w = test::weights(c);
    const auto prompt = test::random_tokens(5, c.vocab_size, 6);
    const auto greedy = foe::make_model(w)->generate(prompt, 8);
    foe::GenerateOptions stop;
    stop.stop_tokens = {greedy[2], -1};
    const auto until = foe::make_model(w)->generate(prompt, 8, stop);
    const auto first = std::find(greedy.begin(), greedy.end(), greedy[2]);
    CHECK(until == std::vector<std::int32_t>(greedy.begin(), first + 1));
}
