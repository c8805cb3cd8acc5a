#pragma once
// Model configuration, with the Hugging Face OLMoE key names, and its validation.
//
// One struct describes both architectures: the standard MoE (OlmoeForCausalLM, one stream, global
// top-k, full-width q/k norm) and FoE (FoeForCausalLM, H expert groups each with its own residual
// stream and top-(k/H) routing inside the group). validate() is the single place that decides
// whether a configuration can run; every layer and loader calls it.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"

namespace foe {

enum class Architecture : std::uint8_t {
    olmoe,  ///< standard MoE, Hugging Face "OlmoeForCausalLM"
    foe,    ///< Federation of Experts, "FoeForCausalLM"
};

/// Where q/k RMS norms are applied, before RoPE.
enum class QkNorm : std::uint8_t {
    none,
    per_head,    ///< weight of size head_dim applied to every head (Qwen3 style)
    full_width,  ///< weight over the whole q (k) projection, before the split into heads (OLMoE)
};

/// The router's score function.
enum class ScoreFunction : std::uint8_t {
    softmax,  ///< softmax over all experts (OLMoE)
    sigmoid,  ///< sigmoid per expert; selection adds a per-expert bias (DeepSeek-V3 style)
};

[[nodiscard]] constexpr std::string_view to_string(Architecture a) noexcept
{
    return a == Architecture::foe ? "FoeForCausalLM" : "OlmoeForCausalLM";
}
[[nodiscard]] constexpr std::string_view to_string(QkNorm n) noexcept
{
    return n == QkNorm::none ? "none" : n == QkNorm::per_head ? "per_head" : "full_width";
}
[[nodiscard]] constexpr std::string_view to_string(ScoreFunction s) noexcept
{
    return s == ScoreFunction::softmax ? "softmax" : "sigmoid";
}

struct ModelConfig {
    Architecture architecture = Architecture::foe;
    index_t hidden_size = 0;              ///< d
    index_t intermediate_size = 0;        ///< expert FFN size f
    index_t num_attention_heads = 0;      ///< query heads
    index_t num_key_value_heads = 0;      ///< KV heads
    index_t head_dim = 0;                 ///< per-head size (HF default: hidden_size / heads)
    index_t num_hidden_layers = 0;        ///< L
    index_t num_experts = 0;              ///< E
    index_t num_experts_per_tok = 0;      ///< k
    index_t vocab_size = 0;
    index_t num_expert_groups = 1;        ///< H; FoE only (OLMoE is always 1)
    index_t max_position_embeddings = 4096;  ///< longest sequence; sizes the KV cache
    double rope_theta = 10000.0;
    double rms_norm_eps = 1e-5;
    bool norm_topk_prob = false;          ///< renormalise the selected weights to sum to 1
    bool tie_word_embeddings = false;     ///< LM head shares the embedding matrix
    QkNorm qk_norm = QkNorm::full_width;
    ScoreFunction scoring_func = ScoreFunction::softmax;
    /// Token ids that end a generation (config.json's eos_token_id: one id or a list). Not part of
    /// the model's math: runners stop at them unless told not to.
    std::vector<std::int32_t> eos_token_ids;

    /// Number of expert groups H, which is also the number of residual streams.
    [[nodiscard]] constexpr index_t groups() const noexcept
    {
        return architecture == Architecture::foe ? num_expert_groups : 1;
    }
    [[nodiscard]] constexpr index_t q_heads_per_group() const noexcept { return num_attention_heads / groups(); }
    [[nodiscard]] constexpr index_t kv_heads_per_group() const noexcept { return num_key_value_heads / groups(); }
    [[nodiscard]] constexpr index_t experts_per_group() const noexcept { return num_experts / groups(); }
    [[nodiscard]] constexpr index_t top_k_per_group() const noexcept { return num_experts_per_tok / groups(); }
    [[nodiscard]] constexpr index_t q_width() const noexcept { return num_attention_heads * head_dim; }
    [[nodiscard]] constexpr index_t kv_width() const noexcept { return num_key_value_heads * head_dim; }

    /// Throws ConfigError naming the first value that cannot work, and the limit it breaks.
    void validate() const;

    /// Total parameter count (embeddings, attention, norms, router, experts, LM head). Exact for
    /// every config validate() accepts; saturates at the largest index_t for one it would refuse.
    [[nodiscard]] index_t parameter_count() const noexcept;

    /// Floats in the KV cache of one sequence at full context (keys and values of every layer),
    /// saturating like parameter_count().
    [[nodiscard]] index_t kv_cache_elements_per_sequence() const noexcept;
};

/// The reference configurations by name: "foe-1b", "foe-7b" (the paper's), "moe-1b", "moe-7b"
/// (same sizes, standard MoE), "foe-small"/"moe-small" (the demo's), "foe-tiny"/"moe-tiny" (tests).
[[nodiscard]] ModelConfig named_config(std::string_view name);

/// The names named_config accepts, for help texts and error messages.
[[nodiscard]] std::vector<std::string> named_config_names();

// ---------------------------------------------------------------------------------------------

namespace detail {

/// Non-negative index arithmetic that records overflow instead of committing it (signed overflow
/// is undefined behaviour): how validate() proves that the sizes derived from a config fit.
class CheckedIndex {
public:
    // Implicit, so that checked expressions read like the plain ones they replace.
    constexpr CheckedIndex(index_t v) noexcept : value_(v), ok_(v >= 0) {}

    [[nodiscard]] constexpr bool ok() const noexcept { return ok_; }
    /// The value, or the largest index_t after an overflow.
    [[nodiscard]] constexpr index_t value_or_max() const noexcept
    {
        return ok_ ? value_ : std::numeric_limits<index_t>::max();
    }

    friend constexpr CheckedIndex operator*(CheckedIndex a, CheckedIndex b) noexcept
    {
        if (!a.ok_ || !b.ok_ || (a.value_ != 0 && b.value_ > std::numeric_limits<index_t>::max() / a.value_))
            return overflow();
        return CheckedIndex(a.value_ * b.value_);
    }
    friend constexpr CheckedIndex operator+(CheckedIndex a, CheckedIndex b) noexcept
    {
        if (!a.ok_ || !b.ok_ || b.value_ > std::numeric_limits<index_t>::max() - a.value_) return overflow();
        return CheckedIndex(a.value_ + b.value_);
    }

private:
    [[nodiscard]] static constexpr CheckedIndex overflow() noexcept
    {
        CheckedIndex c(0);
        c.ok_ = false;
        return c;
    }

    index_t value_;
    bool ok_;
};

/// ModelConfig::parameter_count() with overflow recorded.
[[nodiscard]] constexpr CheckedIndex checked_parameter_count(const ModelConfig& c) noexcept
{
    using I = CheckedIndex;
    const I d = c.hidden_size, q_width = I(c.num_attention_heads) * c.head_dim,
            kv_width = I(c.num_key_value_heads) * c.head_dim;
    I qk_norm_params = 0;
    if (c.qk_norm == QkNorm::per_head) qk_norm_params = I(2) * c.head_dim;
    if (c.qk_norm == QkNorm::full_width) qk_norm_params = q_width + kv_width;
    const I attention = d * q_width + I(2) * d * kv_width + q_width * d + qk_norm_params;
    const I router = I(c.num_experts) * d + (c.scoring_func == ScoreFunction::sigmoid ? c.num_experts : 0);
    const I experts = I(c.num_experts) * 3 * d * c.intermediate_size;
    const I layer = attention + router + experts + I(2) * d;
    const I embeddings = I(c.vocab_size) * d * (c.tie_word_embeddings ? 1 : 2);
    return embeddings + I(c.num_hidden_layers) * layer + d;
}

/// ModelConfig::kv_cache_elements_per_sequence() with overflow recorded.
[[nodiscard]] constexpr CheckedIndex checked_kv_cache_elements(const ModelConfig& c) noexcept
{
    return CheckedIndex(2) * c.num_hidden_layers * c.max_position_embeddings * c.num_key_value_heads * c.head_dim;
}

}  // namespace detail

inline void ModelConfig::validate() const
{
    // Extents are bounded so that every product the library forms (weights, activations, caches)
    // fits in 64 bits; 2^24 is far above any real model's dimension.
    constexpr index_t max_extent = index_t{1} << 24;
    auto positive = [&](std::string_view name, index_t v) {
        require<ConfigError>(v > 0, name, " (", v, ") must be positive");
        require<ConfigError>(v <= max_extent, name, " (", v, ") exceeds the supported maximum ", max_extent);
    };
    positive("hidden_size", hidden_size);
    positive("intermediate_size", intermediate_size);
    positive("num_attention_heads", num_attention_heads);
    positive("num_key_value_heads", num_key_value_heads);
    positive("head_dim", head_dim);
    positive("num_hidden_layers", num_hidden_layers);
    positive("num_experts", num_experts);
    positive("num_experts_per_tok", num_experts_per_tok);
    positive("vocab_size", vocab_size);
    positive("max_position_embeddings", max_position_embeddings);
    positive("num_expert_groups", num_expert_groups);

    // Each extent fits, but their products might not: 2^24 experts of three 2^24 x 2^24 weights
    // are 3 x 2^72 parameters. Bound the two totals the library forms, in bytes, so that every
    // product of some of these extents fits too (a weight, a cache, a byte count).
    constexpr index_t max_bytes = index_t{1} << 62;
    const auto fits = [&](detail::CheckedIndex elements) {
        const detail::CheckedIndex bytes = elements * index_t{4};
        return bytes.ok() && bytes.value_or_max() <= max_bytes;
    };
    require<ConfigError>(fits(detail::checked_parameter_count(*this)), "the model's parameters (",
                         "hidden_size ", hidden_size, ", intermediate_size ", intermediate_size, ", num_experts ",
                         num_experts, ", num_hidden_layers ", num_hidden_layers, ", vocab_size ", vocab_size,
                         ") need more than 2^62 bytes");
    require<ConfigError>(fits(detail::checked_kv_cache_elements(*this)), "the KV cache of one sequence (",
                         "num_hidden_layers ", num_hidden_layers, " x max_position_embeddings ",
                         max_position_embeddings, " x num_key_value_heads ", num_key_value_heads, " x head_dim ",
                         head_dim, " x 2) needs more than 2^62 bytes");

    require<ConfigError>(num_attention_heads % num_key_value_heads == 0, "num_attention_heads (",
                         num_attention_heads, ") must be a multiple of num_key_value_heads (",
                         num_key_value_heads, ")");
    require<ConfigError>(head_dim % 2 == 0, "head_dim (", head_dim,
                         ") must be even: RoPE rotates pairs of dimensions");
    require<ConfigError>(num_experts_per_tok <= num_experts, "num_experts_per_tok (", num_experts_per_tok,
                         ") must not exceed num_experts (", num_experts, ")");
    require<ConfigError>(std::isfinite(rope_theta) && rope_theta > 0.0, "rope_theta (", rope_theta,
                         ") must be a positive finite number");
    // RoPE's inverse frequencies, formed as ops/rope.hpp forms them (float32): a base so small or
    // so large that one overflows or vanishes gives NaN rotations (or none) at every position.
    for (index_t j = 0; j < head_dim / 2; ++j) {
        const float exponent = static_cast<float>(2 * j) / static_cast<float>(head_dim);
        const auto inv_freq = static_cast<float>(1.0 / std::pow(rope_theta, static_cast<double>(exponent)));
        require<ConfigError>(std::isfinite(inv_freq) && inv_freq > 0.0f &&
                                 std::isfinite(inv_freq * static_cast<float>(max_position_embeddings)),
                             "rope_theta (", rope_theta, ") gives RoPE inverse frequency ", j, " of ", head_dim / 2,
                             " = ", inv_freq, ", which is not a positive finite float32 over ", max_position_embeddings,
                             " positions (OLMoE-style models use 10000 to 500000)");
    }
    require<ConfigError>(std::isfinite(rms_norm_eps) && rms_norm_eps > 0.0, "rms_norm_eps (", rms_norm_eps,
                         ") must be a positive finite number");

    if (architecture == Architecture::olmoe) {
        // Hugging Face's OlmoeAttention sizes q_norm by hidden_size: its weights only fit when the
        // heads tile the hidden state exactly.
        require<ConfigError>(num_attention_heads * head_dim == hidden_size, "OlmoeForCausalLM needs num_attention_heads (",
                             num_attention_heads, ") * head_dim (", head_dim, ") == hidden_size (", hidden_size,
                             "): its full-width q_norm has hidden_size elements");
        require<ConfigError>(qk_norm == QkNorm::full_width,
                             "OlmoeForCausalLM applies a full-width q/k norm; qk_norm (", to_string(qk_norm),
                             ") is only configurable for FoeForCausalLM");
        require<ConfigError>(scoring_func == ScoreFunction::softmax,
                             "OlmoeForCausalLM routes with softmax; scoring_func (", to_string(scoring_func),
                             ") is only configurable for FoeForCausalLM");
        return;
    }
    const index_t h = num_expert_groups;
    require<ConfigError>(num_key_value_heads % h == 0, "num_key_value_heads (", num_key_value_heads,
                         ") must be a multiple of num_expert_groups (", h, "): each group owns whole KV heads");
    require<ConfigError>(num_experts % h == 0, "num_experts (", num_experts,
                         ") must be a multiple of num_expert_groups (", h, ")");
    require<ConfigError>(num_experts_per_tok % h == 0, "num_experts_per_tok (", num_experts_per_tok,
                         ") must be a multiple of num_expert_groups (", h, "): every token uses k/H experts in every group");
    require<ConfigError>(qk_norm != QkNorm::full_width || h == 1,
                         "qk_norm full_width normalises across all heads and so across groups; it needs "
                         "num_expert_groups == 1, got ", h, " (use \"per_head\" or \"none\")");
}

inline index_t ModelConfig::parameter_count() const noexcept
{
    return detail::checked_parameter_count(*this).value_or_max();
}

inline index_t ModelConfig::kv_cache_elements_per_sequence() const noexcept
{
    return detail::checked_kv_cache_elements(*this).value_or_max();
}

namespace detail {

inline ModelConfig reference_shape(index_t d, index_t heads, index_t kv, index_t hd, index_t experts, index_t k,
                                   index_t f, index_t layers, index_t vocab)
{
    ModelConfig c;
    c.hidden_size = d;
    c.num_attention_heads = heads;
    c.num_key_value_heads = kv;
    c.head_dim = hd;
    c.num_experts = experts;
    c.num_experts_per_tok = k;
    c.intermediate_size = f;
    c.num_hidden_layers = layers;
    c.vocab_size = vocab;
    c.rope_theta = 500000.0;
    c.rms_norm_eps = 1e-5;
    c.max_position_embeddings = 32768;
    c.norm_topk_prob = false;
    return c;
}

inline ModelConfig as_architecture(ModelConfig c, Architecture a)
{
    c.architecture = a;
    if (a == Architecture::foe) {
        c.num_expert_groups = c.num_key_value_heads;
        c.qk_norm = QkNorm::per_head;
    } else {
        c.num_expert_groups = 1;
        c.qk_norm = QkNorm::full_width;
    }
    return c;
}

}  // namespace detail

inline std::vector<std::string> named_config_names()
{
    return {"foe-1b", "moe-1b", "foe-7b", "moe-7b", "foe-small", "moe-small", "foe-tiny", "moe-tiny"};
}

inline ModelConfig named_config(std::string_view name)
{
    using detail::as_architecture;
    using detail::reference_shape;
    const Architecture arch = name.starts_with("moe-") ? Architecture::olmoe : Architecture::foe;
    const std::string_view size = name.substr(name.find('-') == std::string_view::npos ? 0 : name.find('-') + 1);
    ModelConfig c;
    if (!name.starts_with("foe-") && !name.starts_with("moe-")) {
        // fall through to the error below
    } else if (size == "1b") {
        c = reference_shape(768, 8, 8, 96, 64, 8, 384, 16, 50304);  // DESIGN.md 1.3, 1.02B
    } else if (size == "7b") {
        c = reference_shape(2048, 16, 8, 128, 64, 8, 1024, 16, 50304);  // DESIGN.md 1.3, 6.85B
    } else if (size == "small") {
        c = reference_shape(256, 8, 8, 32, 32, 8, 128, 4, 4096);  // demo: runs in seconds on 2 cores
        c.max_position_embeddings = 8192;  // the model benchmark's longest prompt
    } else if (size == "tiny") {
        c = reference_shape(64, 8, 4, 8, 16, 4, 32, 2, 97);  // tests: GQA (2 q heads per KV head), H = 4
        c.max_position_embeddings = 64;
    }
    if (c.hidden_size == 0) {
        std::string names;
        for (const auto& n : named_config_names()) names += (names.empty() ? "" : ", ") + n;
        raise<InvalidArgument>("unknown configuration name \"", name, "\"; known names: ", names);
    }
    return as_architecture(c, arch);
}

}  // namespace foe
