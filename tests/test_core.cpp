// Core: 16-bit float types, tensor views, configuration validation, reference configs, RNG.

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "foe/foe.hpp"

using foe::ConfigError;
using foe::ModelConfig;

// --- bf16 / fp16 ------------------------------------------------------------------------------

TEST_CASE("float16: every one of the 65536 bit patterns round-trips through float")
{
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const auto h = foe::float16::from_bits(static_cast<std::uint16_t>(b));
        const float f = static_cast<float>(h);
        if (std::isnan(f)) {
            CHECK(std::isnan(static_cast<float>(foe::float16(f))));
            continue;
        }
        CHECK_MESSAGE(foe::float16(f).bits == b, "bits ", b);
    }
}

#if defined(__FLT16_MAX__) && !defined(__clang__)
TEST_CASE("float16: conversion from float rounds like the compiler's _Float16 (nearest, ties to even)")
{
    const foe::CounterRng rng(1, 2);
    for (std::uint64_t i = 0; i < 200000; ++i) {
        // Random bit patterns cover normals, subnormals, overflow and the rounding boundaries.
        const float f = std::bit_cast<float>(static_cast<std::uint32_t>(rng.bits(i)));
        if (std::isnan(f)) continue;
        const auto expected = std::bit_cast<std::uint16_t>(static_cast<_Float16>(f));
        CHECK_MESSAGE(foe::float16(f).bits == expected, "float bits ", std::bit_cast<std::uint32_t>(f));
    }
}
#endif

TEST_CASE("bfloat16: round to nearest even, NaN stays NaN, every pattern round-trips")
{
    CHECK(foe::bfloat16(1.0f).bits == 0x3f80);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
    CHECK(foe::bfloat16(1.0f + 0x1.0p-8f).bits == 0x3f80);
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
    CHECK(foe::bfloat16(1.0f + 3 * 0x1.0p-8f).bits == 0x3f82);
    CHECK(foe::bfloat16(1.0f + 0x1.0p-8f + 0x1.0p-20f).bits == 0x3f81);
    CHECK(std::isnan(static_cast<float>(foe::bfloat16(std::numeric_limits<float>::quiet_NaN()))));
    CHECK(std::isinf(static_cast<float>(foe::bfloat16(std::numeric_limits<float>::max()))));
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const float f = static_cast<float>(foe::bfloat16::from_bits(static_cast<std::uint16_t>(b)));
        if (!std::isnan(f)) CHECK(foe::bfloat16(f).bits == b);
    }
}

// --- tensor views --------------------------------------------------------------------------------

TEST_CASE("TensorView: row-major strides, sub-views, column slices without copies")
{
    std::vector<float> data(24);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
    const foe::TensorView<float, 3> t(data.data(), {2, 3, 4});
    CHECK(t.strides() == std::array<foe::index_t, 3>{12, 4, 1});
    CHECK(t(1, 2, 3) == 23.0f);
    CHECK(t[1](0, 1) == 13.0f);
    const auto m = foe::MatrixView<float>(data.data(), {4, 6});
    const auto cols = m.slice(1, 2, 3);  // columns [2, 5)
    CHECK(cols.shape() == std::array<foe::index_t, 2>{4, 3});
    CHECK(cols(3, 0) == 20.0f);
    CHECK(!cols.is_contiguous());
    CHECK(m.slice(0, 1, 2).is_contiguous());
    CHECK_THROWS_AS((void)m.slice(1, 4, 3), foe::InvalidArgument);
    CHECK_THROWS_AS((void)cols.span(), foe::InvalidArgument);
    const foe::MatrixView<const float> read_only = m;
    CHECK(read_only(0, 5) == 5.0f);
}

TEST_CASE("Tensor: owning storage, shape checks")
{
    foe::Tensor<float> t({3, 4});
    CHECK(t.size() == 12);
    CHECK(t.view<2>().extent(1) == 4);
    CHECK_THROWS_AS((void)t.view<3>(), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::Tensor<float>({2, -1}), foe::InvalidArgument);
    CHECK(foe::format_shape(t.shape()) == "[3, 4]");
}

// --- configuration ----------------------------------------------------------------------------

TEST_CASE("reference configs are valid and have the paper's parameter counts")
{
    for (const auto& name : foe::named_config_names()) {
        CAPTURE(name);
        CHECK_NOTHROW(foe::named_config(name).validate());
    }
    // PAPER.md 3.1: 1.022B and 6.852B without norms; per-head QK-norm adds a few thousand.
    CHECK(std::abs(static_cast<double>(foe::named_config("foe-1b").parameter_count()) - 1.022e9) < 1e6);
    CHECK(std::abs(static_cast<double>(foe::named_config("foe-7b").parameter_count()) - 6.852e9) < 1e6);
    const auto c = foe::named_config("foe-1b");
    CHECK(c.groups() == 8);
    CHECK(c.top_k_per_group() == 1);
    CHECK(c.experts_per_group() == 8);
    CHECK(foe::named_config("moe-7b").groups() == 1);
    CHECK_THROWS_WITH_AS((void)foe::named_config("foe-3b"), doctest::Contains("foe-1b"), foe::InvalidArgument);
}

namespace {
ModelConfig valid_foe() { return foe::named_config("foe-tiny"); }  // H = 4, k = 4, E = 16, 8 heads, 4 KV heads
}  // namespace

TEST_CASE("bad config: top-k not a multiple of H")
{
    auto c = valid_foe();
    c.num_experts_per_tok = 6;
    CHECK_THROWS_WITH_AS(c.validate(), "num_experts_per_tok (6) must be a multiple of num_expert_groups (4): every token uses k/H experts in every group",
                         ConfigError);
}

TEST_CASE("bad config: experts not a multiple of H")
{
    auto c = valid_foe();
    c.num_experts = 18;
    CHECK_THROWS_WITH_AS(c.validate(), "num_experts (18) must be a multiple of num_expert_groups (4)", ConfigError);
}

TEST_CASE("bad config: heads not a multiple of KV heads")
{
    auto c = valid_foe();
    c.num_attention_heads = 6;
    CHECK_THROWS_WITH_AS(c.validate(), "num_attention_heads (6) must be a multiple of num_key_value_heads (4)", ConfigError);
}

TEST_CASE("bad config: KV heads not a multiple of H")
{
    auto c = valid_foe();
    c.num_expert_groups = 8;
    c.num_experts_per_tok = 8;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("num_key_value_heads (4) must be a multiple of num_expert_groups (8)"),
                         ConfigError);
}

TEST_CASE("bad config: odd head_dim with RoPE")
{
    auto c = valid_foe();
    c.head_dim = 15;
    CHECK_THROWS_WITH_AS(c.validate(), "head_dim (15) must be even: RoPE rotates pairs of dimensions", ConfigError);
}

TEST_CASE("bad config: zero-sized dimensions")
{
    for (auto field : {&ModelConfig::hidden_size, &ModelConfig::intermediate_size, &ModelConfig::num_attention_heads,
                       &ModelConfig::num_key_value_heads, &ModelConfig::head_dim, &ModelConfig::num_hidden_layers,
                       &ModelConfig::num_experts, &ModelConfig::num_experts_per_tok, &ModelConfig::vocab_size,
                       &ModelConfig::max_position_embeddings, &ModelConfig::num_expert_groups}) {
        auto c = valid_foe();
        c.*field = 0;
        CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("(0) must be positive"), ConfigError);
    }
    auto c = valid_foe();
    c.hidden_size = -3;
    CHECK_THROWS_WITH_AS(c.validate(), "hidden_size (-3) must be positive", ConfigError);
}

TEST_CASE("bad config: more experts per token than experts, non-finite rope_theta, oversized extents")
{
    auto c = foe::named_config("moe-tiny");
    c.num_experts_per_tok = 17;
    CHECK_THROWS_WITH_AS(c.validate(), "num_experts_per_tok (17) must not exceed num_experts (16)", ConfigError);
    c = valid_foe();
    c.rope_theta = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("rope_theta"), ConfigError);
    c = valid_foe();
    c.vocab_size = foe::index_t{1} << 40;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("exceeds the supported maximum"), ConfigError);
}

TEST_CASE("bad config: full-width QK-norm across several groups, and OLMoE options it does not have")
{
    auto c = valid_foe();
    c.qk_norm = foe::QkNorm::full_width;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("needs num_expert_groups == 1, got 4"), ConfigError);
    auto m = foe::named_config("moe-tiny");
    m.qk_norm = foe::QkNorm::per_head;
    CHECK_THROWS_AS(m.validate(), ConfigError);
    m = foe::named_config("moe-tiny");
    m.scoring_func = foe::ScoreFunction::sigmoid;
    CHECK_THROWS_AS(m.validate(), ConfigError);
}

// --- RNG ----------------------------------------------------------------------------------------

TEST_CASE("CounterRng: values depend only on (seed, stream, index)")
{
    const foe::CounterRng a(1, foe::stream_id("x")), b(1, foe::stream_id("x")), c(1, foe::stream_id("y"));
    CHECK(a.bits(5) == b.bits(5));
    CHECK(a.bits(5) != c.bits(5));
    double mean = 0.0;
    for (std::uint64_t i = 0; i < 10000; ++i) {
        const float u = a.uniform01(i);
        CHECK(u >= 0.0f);
        CHECK(u < 1.0f);
        mean += u / 10000.0;
    }
    CHECK(mean == doctest::Approx(0.5).epsilon(0.02));
}

TEST_CASE("bad config: OLMoE heads that do not tile hidden_size (its q_norm is hidden_size wide)")
{
    auto c = foe::named_config("moe-tiny");
    c.head_dim = 16;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("num_attention_heads (8) * head_dim (16) == hidden_size (64)"),
                         ConfigError);
}

TEST_CASE("bad config: extents each within the limit whose products overflow (found by fuzz_config)")
{
    // tests/fuzz/corpus/config/hostile_extents_at_limit.json: every extent 2^24 passed the
    // per-extent check, and parameter_count() then overflowed int64 (undefined behaviour).
    auto c = valid_foe();
    c.num_experts = c.intermediate_size = c.hidden_size = foe::index_t{1} << 24;
    c.num_experts_per_tok = 4;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("the model's parameters"), ConfigError);
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("need more than 2^62 bytes"), ConfigError);
    CHECK(c.parameter_count() == std::numeric_limits<foe::index_t>::max());  // saturates, no overflow

    // The KV cache of one sequence: layers x positions x KV width, keys and values.
    c = valid_foe();
    c.num_hidden_layers = c.max_position_embeddings = foe::index_t{1} << 24;
    c.num_key_value_heads = c.num_attention_heads = c.num_expert_groups = 1 << 10;
    c.num_experts = c.num_experts_per_tok = 1 << 10;
    c.head_dim = 1 << 10;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("the KV cache of one sequence"), ConfigError);

    // The same through config.json, as the fuzzer found it.
    CHECK_THROWS_WITH_AS((void)foe::parse_config_json(R"({"architectures": ["FoeForCausalLM"], "hidden_size": 16777216,
        "intermediate_size": 16777216, "num_attention_heads": 16777216, "num_key_value_heads": 16777216,
        "head_dim": 16777216, "num_hidden_layers": 16777216, "num_experts": 16777216,
        "num_experts_per_tok": 16777216, "num_expert_groups": 16777216, "vocab_size": 16777216,
        "max_position_embeddings": 16777216})", "fuzz/config.json"),
                         doctest::Contains("fuzz/config.json: the model's parameters"), ConfigError);
}

TEST_CASE("bad config: a KV cache of too many slots is refused before anything is allocated")
{
    foe::ModelOptions options;
    options.cache_slots = foe::index_t{1} << 50;
    CHECK_THROWS_WITH_AS((void)foe::make_model(std::make_shared<const foe::ModelWeights>(foe::random_weights(valid_foe(), 1)), options),
                         doctest::Contains("make a KV cache of more than 2^62 bytes"), foe::InvalidArgument);
}

TEST_CASE("Batch: counts near INT64_MAX are an InvalidArgument, not an overflow or a huge allocation")
{
    constexpr foe::index_t max = std::numeric_limits<foe::index_t>::max();
    CHECK_THROWS_WITH_AS(foe::Batch::single(max, 1), doctest::Contains("ends past 2^31 positions"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(foe::Batch::single(0, max), doctest::Contains("ends past 2^31 positions"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(foe::Batch({{0, 0, foe::index_t{1} << 30}, {1, 0, foe::index_t{1} << 30}, {2, 0, 5}}),
                         doctest::Contains("more than 2^31 tokens"), foe::InvalidArgument);
    const foe::Batch fine({{0, 7, 2}, {1, 0, 3}});
    CHECK(fine.tokens() == 5);
    CHECK(fine.positions() == std::vector<foe::index_t>{7, 8, 0, 1, 2});
}
