#pragma once
// Hugging Face config.json <-> foe::ModelConfig.
//
// The keys are those of Hugging Face's OlmoeConfig, so that an OLMoE checkpoint's config.json
// loads as is, plus three FoE keys (num_expert_groups, qk_norm, scoring_func) for
// "FoeForCausalLM". Defaults follow Hugging Face: num_key_value_heads defaults to
// num_attention_heads, head_dim to hidden_size / num_attention_heads; a null value means the
// default, as None does in Python.
//
// The reader is strict where leniency would silently change the model's math: options foe does
// not implement (rope_scaling, clip_qkv, attention or MLP biases, an activation other than silu)
// are rejected, not ignored. Keys foe has no use for (token ids, dropout, initializer_range,
// torch_dtype, ...) are ignored, since real configs carry many. The result is validated with
// ModelConfig::validate(); its ConfigErrors are re-thrown with the file's name in front.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"

namespace foe {

/// Parses a config.json text. FormatError for malformed JSON, a missing required key, a value of
/// the wrong type or an unsupported option; ConfigError for values that cannot work together.
/// Messages start with source_name.
[[nodiscard]] ModelConfig parse_config_json(std::string_view text, std::string_view source_name);

/// Reads and parses path (IoError when it cannot be read; files above 16 MiB are refused).
[[nodiscard]] ModelConfig load_config_json(const std::filesystem::path& path);

/// The config as a config.json text (two-space indent, trailing newline) that Hugging Face tools
/// can read: it includes "architectures", "model_type", "hidden_act" and "torch_dtype", and
/// parse_config_json() reads it back to an equal ModelConfig.
[[nodiscard]] std::string to_config_json(const ModelConfig& config);

/// Validates config (ConfigError), then writes to_config_json() to path through a temporary file
/// and a rename (IoError on failure), so that no file is written that could not be read back.
void save_config_json(const std::filesystem::path& path, const ModelConfig& config);

/// Largest config.json load_config_json() reads; real ones are a few kilobytes.
inline constexpr std::uintmax_t config_json_max_bytes = 16u << 20;

// =============================================================================================
// Definitions
// =============================================================================================

namespace detail::config_json {

/// Typed, file-aware access to the members of the top-level object.
class Reader {
public:
    Reader(const json::Value& root, std::string_view src) : root_(root), src_(src) {}

    /// The member, or nullptr when it is absent or null (null means "the default").
    [[nodiscard]] const json::Value* get(std::string_view key) const
    {
        const json::Value* v = root_.find(key);
        return v == nullptr || v->is_null() ? nullptr : v;
    }

    [[nodiscard]] const json::Value& required(std::string_view key) const
    {
        const json::Value* v = get(key);
        if (v == nullptr) raise<FormatError>(src_, ": missing required key \"", key, "\"");
        return *v;
    }

    [[nodiscard]] index_t integer(std::string_view key) const { return as_integer(key, required(key)); }
    [[nodiscard]] index_t integer(std::string_view key, index_t fallback) const
    {
        const json::Value* v = get(key);
        return v ? as_integer(key, *v) : fallback;
    }
    [[nodiscard]] double number(std::string_view key, double fallback) const
    {
        const json::Value* v = get(key);
        if (v == nullptr) return fallback;
        if (!v->is_number()) wrong_type(key, *v, "a number");
        return v->as_double();
    }
    [[nodiscard]] bool boolean(std::string_view key, bool fallback) const
    {
        const json::Value* v = get(key);
        if (v == nullptr) return fallback;
        if (!v->is_bool()) wrong_type(key, *v, "true or false");
        return v->as_bool();
    }
    [[nodiscard]] std::optional<std::string> string(std::string_view key) const
    {
        const json::Value* v = get(key);
        if (v == nullptr) return std::nullopt;
        if (!v->is_string()) wrong_type(key, *v, "a string");
        return v->as_string();
    }

    [[noreturn]] void wrong_type(std::string_view key, const json::Value& v, std::string_view expected) const
    {
        raise<FormatError>(src_, ": ", key, " must be ", expected, ", got ", json::detail::describe(v));
    }

    [[noreturn]] void unsupported(std::string_view key, const json::Value& v, std::string_view why) const
    {
        raise<FormatError>(src_, ": ", key, " ", json::detail::describe(v), " is not supported (", why, ")");
    }

    /// An option foe does not implement: it must be absent or null.
    void require_null(std::string_view key, std::string_view why) const
    {
        if (const json::Value* v = get(key)) unsupported(key, *v, why);
    }

    /// A boolean option foe implements only as false.
    void require_false(std::string_view key, std::string_view why) const
    {
        if (boolean(key, false)) unsupported(key, *get(key), why);
    }

    [[nodiscard]] std::string_view source() const noexcept { return src_; }

private:
    [[nodiscard]] index_t as_integer(std::string_view key, const json::Value& v) const
    {
        if (!v.is_integer()) wrong_type(key, v, "an integer");
        return v.as_int();
    }

    const json::Value& root_;
    std::string_view src_;
};

[[nodiscard]] inline Architecture parse_architecture(const Reader& r)
{
    const json::Value& v = r.required("architectures");
    if (v.is_array() && v.as_array().size() == 1 && v.as_array()[0].is_string()) {
        const std::string& name = v.as_array()[0].as_string();
        if (name == to_string(Architecture::olmoe)) return Architecture::olmoe;
        if (name == to_string(Architecture::foe)) return Architecture::foe;
    }
    raise<FormatError>(r.source(), ": architectures must be [\"", to_string(Architecture::olmoe), "\"] or [\"",
                       to_string(Architecture::foe), "\"], got ", json::detail::describe(v));
}

[[nodiscard]] inline QkNorm parse_qk_norm(const Reader& r, QkNorm fallback)
{
    const auto name = r.string("qk_norm");
    if (!name) return fallback;
    for (QkNorm n : {QkNorm::none, QkNorm::per_head, QkNorm::full_width})
        if (*name == to_string(n)) return n;
    raise<FormatError>(r.source(), ": qk_norm ", json::detail::describe_text(*name),
                       " is not one of \"none\", \"per_head\", \"full_width\"");
}

[[nodiscard]] inline ScoreFunction parse_scoring_func(const Reader& r)
{
    const auto name = r.string("scoring_func");
    if (!name) return ScoreFunction::softmax;
    for (ScoreFunction s : {ScoreFunction::softmax, ScoreFunction::sigmoid})
        if (*name == to_string(s)) return s;
    raise<FormatError>(r.source(), ": scoring_func ", json::detail::describe_text(*name),
                       " is not one of \"softmax\", \"sigmoid\"");
}

}  // namespace detail::config_json

inline ModelConfig parse_config_json(std::string_view text, std::string_view source_name)
{
    using detail::config_json::Reader;
    const json::Value root = json::parse(text, source_name);
    if (!root.is_object())
        raise<FormatError>(source_name, ": the top level must be a JSON object, got ", json::kind_name(root.kind()));
    const Reader r(root, source_name);

    ModelConfig c;
    c.architecture = detail::config_json::parse_architecture(r);

    // Options that would change the math if they were ignored.
    r.require_null("rope_scaling", "foe implements plain RoPE; it must be null or absent");
    r.require_null("clip_qkv", "foe does not clip q/k/v; it must be null or absent");
    r.require_false("attention_bias", "foe's attention projections have no bias");
    r.require_false("mlp_bias", "foe's expert projections have no bias");
    if (const auto act = r.string("hidden_act"); act && *act != "silu")
        r.unsupported("hidden_act", *r.get("hidden_act"), "foe's experts are SwiGLU with silu");

    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_attention_heads = r.integer("num_attention_heads");
    c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads);
    c.num_hidden_layers = r.integer("num_hidden_layers");
    c.num_experts = r.integer("num_experts");
    c.num_experts_per_tok = r.integer("num_experts_per_tok");
    c.vocab_size = r.integer("vocab_size");
    c.max_position_embeddings = r.integer("max_position_embeddings", 4096);
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-5);
    c.norm_topk_prob = r.boolean("norm_topk_prob", false);
    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);

    if (r.get("head_dim") != nullptr) {
        c.head_dim = r.integer("head_dim");
    } else if (c.hidden_size > 0 && c.num_attention_heads > 0) {
        require<ConfigError>(c.hidden_size % c.num_attention_heads == 0, source_name, ": hidden_size (",
                             c.hidden_size, ") is not a multiple of num_attention_heads (", c.num_attention_heads,
                             "), so head_dim must be given");
        c.head_dim = c.hidden_size / c.num_attention_heads;
    }  // else validate() reports the non-positive size

    if (c.architecture == Architecture::foe) {
        c.num_expert_groups = r.integer("num_expert_groups", c.num_key_value_heads);
        c.qk_norm = detail::config_json::parse_qk_norm(r, QkNorm::none);
    } else {
        c.num_expert_groups = r.integer("num_expert_groups", 1);
        require<ConfigError>(c.num_expert_groups == 1, source_name, ": num_expert_groups (", c.num_expert_groups,
                             ") must be 1 for ", to_string(Architecture::olmoe),
                             "; expert groups need FoeForCausalLM");
        c.qk_norm = detail::config_json::parse_qk_norm(r, QkNorm::full_width);  // validate() rejects others
    }
    c.scoring_func = detail::config_json::parse_scoring_func(r);

    try {
        c.validate();
    } catch (const ConfigError& e) {
        raise<ConfigError>(source_name, ": ", e.what());
    }
    return c;
}

inline ModelConfig load_config_json(const std::filesystem::path& path)
{
    const auto bytes = detail::io::read_whole_file(path, config_json_max_bytes, "config.json");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return parse_config_json(text, path.string());
}

inline std::string to_config_json(const ModelConfig& c)
{
    const bool is_foe = c.architecture == Architecture::foe;
    json::Value v{json::Object{}};
    v.set("architectures", json::Array{json::Value(to_string(c.architecture))})
        .set("model_type", is_foe ? "foe" : "olmoe")
        .set("hidden_act", "silu")
        .set("torch_dtype", "float32")
        .set("hidden_size", c.hidden_size)
        .set("intermediate_size", c.intermediate_size)
        .set("num_attention_heads", c.num_attention_heads)
        .set("num_key_value_heads", c.num_key_value_heads)
        .set("head_dim", c.head_dim)
        .set("num_hidden_layers", c.num_hidden_layers)
        .set("num_experts", c.num_experts)
        .set("num_experts_per_tok", c.num_experts_per_tok)
        .set("vocab_size", c.vocab_size)
        .set("max_position_embeddings", c.max_position_embeddings)
        .set("rope_theta", c.rope_theta)
        .set("rms_norm_eps", c.rms_norm_eps)
        .set("norm_topk_prob", c.norm_topk_prob)
        .set("tie_word_embeddings", c.tie_word_embeddings)
        .set("attention_bias", false)
        .set("rope_scaling", nullptr)
        .set("clip_qkv", nullptr);
    if (is_foe) {
        v.set("num_expert_groups", c.num_expert_groups)
            .set("qk_norm", to_string(c.qk_norm))
            .set("scoring_func", to_string(c.scoring_func));
    }
    return json::dump_pretty(v) + "\n";
}

inline void save_config_json(const std::filesystem::path& path, const ModelConfig& config)
{
    config.validate();
    const std::string text = to_config_json(config);
    detail::io::write_file_atomically(path, std::as_bytes(std::span(text)));
}

}  // namespace foe
