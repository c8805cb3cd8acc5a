#pragma once
// Hugging Face config.json <-> foe::ModelConfig.
//
// The keys are those of Hugging Face's OlmoeConfig, so that an OLMoE checkpoint's config.json
// loads as is, whether transformers 4 or 5 wrote it, plus three FoE keys (num_expert_groups,
// qk_norm, scoring_func) for "FoeForCausalLM". Defaults follow Hugging Face: num_key_value_heads
// defaults to num_attention_heads, head_dim to hidden_size / num_attention_heads, the RoPE base
// to 10000 (transformers' default_theta); a null value means the default, as None does in Python.
//
// The reader is strict where leniency would silently change the model's math. Every key of
// transformers 5's OlmoeConfig (and of what its save_pretrained writes) is either honoured or,
// for a value foe does not implement, refused with a message naming the key, the value and what
// foe supports: a RoPE type other than "default", clip_qkv, attention or MLP biases, an
// activation other than silu, partial rotary, a sliding window, quantization, a model_type of
// another model. Keys that cannot change an inference result are ignored: token ids (foe does
// not stop generating at EOS), dropout, initializer_range, router_aux_loss_coef,
// output_router_logits, use_cache, transformers_version, and unknown keys, since real configs
// carry many. README.md ("config.json keys") lists them all.
//
// Where transformers renamed a key (rope_theta/rope_scaling -> rope_parameters, torch_dtype ->
// dtype, num_experts has the alias num_local_experts) both spellings are read, and a file that
// gives both with different values is refused: which one wins differs between readers.
//
// FormatError for malformed input and unsupported options; ConfigError for values that cannot
// work together (including two spellings that disagree). The result is validated with
// ModelConfig::validate(); its ConfigErrors are re-thrown with the file's name in front.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"

namespace foe {

/// Parses a config.json text. FormatError for malformed JSON, a missing required key, a value of
/// the wrong type or an unsupported option; ConfigError for values that cannot work together.
/// Messages start with source_name.
[[nodiscard]] ModelConfig parse_config_json(std::string_view text, std::string_view source_name);

/// Reads and parses path (IoError when it cannot be read; files above 1 MiB are refused: real
/// ones are a few KB, and the JSON tree costs up to about 20 times the file's size).
[[nodiscard]] ModelConfig load_config_json(const std::filesystem::path& path);

/// The config as a config.json text (two-space indent, trailing newline) that Hugging Face tools
/// can read: it includes "architectures", "model_type", "hidden_act" and "torch_dtype", and
/// parse_config_json() reads it back to an equal ModelConfig.
[[nodiscard]] std::string to_config_json(const ModelConfig& config);

/// Validates config (ConfigError), then writes to_config_json() to path through a temporary file
/// and a rename (IoError on failure), so that no file is written that could not be read back.
void save_config_json(const std::filesystem::path& path, const ModelConfig& config);

/// Largest config.json load_config_json() reads; real ones are a few kilobytes.
inline constexpr std::uintmax_t config_json_max_bytes = 1u << 20;

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

    /// A key under either of its two spellings (transformers renamed some keys; a file may carry
    /// both). nullptr when both are absent or null; ConfigError naming both values when both are
    /// given and differ, since readers disagree on which one wins.
    [[nodiscard]] const json::Value* either(std::string_view key, std::string_view alias) const
    {
        const json::Value* a = get(key);
        const json::Value* b = get(alias);
        if (a != nullptr && b != nullptr && !(*a == *b))
            raise<ConfigError>(src_, ": ", key, " ", json::detail::describe(*a), " and ", alias, " ",
                               json::detail::describe(*b), " disagree (two spellings of one key: give one, or the "
                               "same value in both)");
        return a != nullptr ? a : b;
    }

    /// A required integer under either of two spellings.
    [[nodiscard]] index_t integer_either(std::string_view key, std::string_view alias) const
    {
        const json::Value* v = either(key, alias);
        if (v == nullptr) raise<FormatError>(src_, ": missing required key \"", key, "\" (or \"", alias, "\")");
        return as_integer(get(key) != nullptr ? key : alias, *v);
    }

    [[nodiscard]] std::string_view source() const noexcept { return src_; }

    [[nodiscard]] index_t as_integer(std::string_view key, const json::Value& v) const
    {
        if (!v.is_integer()) wrong_type(key, v, "an integer");
        return v.as_int();
    }

private:
    const json::Value& root_;
    std::string_view src_;
};

/// "dict.member" for messages, with member quoted and escaped unless it is a plain identifier:
/// member is a key of the file, so it may hold anything (terminal controls, 50 MB).
[[nodiscard]] inline std::string member_name(std::string_view dict, std::string_view member)
{
    const bool plain = !member.empty() && member.size() <= 64 &&
                       std::all_of(member.begin(), member.end(), [](char c) {
                           return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
                       });
    return detail::concat(dict, ".", plain ? std::string(member) : json::detail::describe_text(member));
}

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

/// A partial_rotary_factor must mean "rotate the whole head": foe's RoPE (and transformers'
/// default RoPE for OLMoE, which does not read it) rotates every dimension, so a checkpoint that
/// asks for less was trained with something neither computes.
inline void require_full_rotation(const Reader& r, std::string_view key, const json::Value& v)
{
    if (!v.is_number()) r.wrong_type(key, v, "a number");
    if (v.as_double() != 1.0)
        r.unsupported(key, v, "foe rotates every dimension of a head; it must be 1.0, null or absent");
}

/// RoPE's base from every spelling Hugging Face has used, refusing any RoPE variant foe does not
/// compute. transformers 4 writes a top-level rope_theta and rope_scaling (null for plain RoPE,
/// else {"type" or "rope_type": "linear", "factor": ...}); transformers 5 writes rope_parameters
/// {"rope_type": "default", "rope_theta": ...} and no top-level rope_theta, and reads the old
/// spelling too (rope_scaling winning over rope_parameters, the dict's rope_theta over the
/// top-level one). foe takes the base only when every spelling present gives the same value, so
/// that no file reads one way here and another way there. Neither present: 10000, transformers'
/// default_theta.
[[nodiscard]] inline double parse_rope_theta(const Reader& r)
{
    struct Theta {
        std::string key;
        const json::Value* value;
    };
    std::vector<Theta> thetas;
    if (const json::Value* v = r.get("rope_theta")) {
        if (!v->is_number()) r.wrong_type("rope_theta", *v, "a number");
        thetas.push_back({"rope_theta", v});
    }
    if (const json::Value* v = r.get("partial_rotary_factor")) require_full_rotation(r, "partial_rotary_factor", *v);

    for (const std::string_view dict : {std::string_view("rope_scaling"), std::string_view("rope_parameters")}) {
        const json::Value* d = r.get(dict);
        if (d == nullptr) continue;
        if (!d->is_object()) r.wrong_type(dict, *d, "an object or null");
        // The type first, so that {"rope_type": "linear", "factor": 4.0} is refused for "linear",
        // the cause, not for "factor". "type" is transformers 4's older name of "rope_type".
        for (const std::string_view type_key : {std::string_view("rope_type"), std::string_view("type")}) {
            const json::Value* t = d->find(type_key);
            if (t == nullptr || t->is_null()) continue;
            const std::string name = detail::concat(dict, ".", type_key);
            if (!t->is_string()) r.wrong_type(name, *t, "a string");
            if (t->as_string() != "default")
                r.unsupported(name, *t,
                              "foe implements only RoPE type \"default\", without scaling; it must be "
                              "\"default\", null or absent");
        }
        for (const auto& [member, value] : d->as_object()) {
            if (member == "rope_type" || member == "type" || value.is_null()) continue;
            const std::string name = member_name(dict, member);
            if (member == "rope_theta") {
                if (!value.is_number()) r.wrong_type(name, value, "a number");
                thetas.push_back({name, &value});
            } else if (member == "partial_rotary_factor") {
                require_full_rotation(r, name, value);
            } else {
                r.unsupported(name, value,
                              "RoPE type \"default\" takes only rope_type and rope_theta; foe implements no "
                              "other RoPE parameter");
            }
        }
    }
    if (thetas.empty()) return 10000.0;
    for (const Theta& t : thetas)
        if (t.value->as_double() != thetas.front().value->as_double())
            raise<ConfigError>(r.source(), ": ", thetas.front().key, " ", json::detail::describe(*thetas.front().value),
                               " and ", t.key, " ", json::detail::describe(*t.value),
                               " disagree (the transformers 4 and 5 spellings of RoPE's base: give one, or the "
                               "same value in both)");
    return thetas.front().value->as_double();
}

/// model_type, when given, must name the architecture's model: transformers builds the model
/// that model_type names (architectures is only a hint), so another value is another model.
inline void check_model_type(const Reader& r, Architecture a)
{
    const std::string_view expected = a == Architecture::olmoe ? "olmoe" : "foe";
    if (const auto type = r.string("model_type"); type && *type != expected)
        r.unsupported("model_type", *r.get("model_type"),
                      detail::concat(to_string(a), " has model_type \"", expected,
                                     "\"; another model_type is another model, which foe does not implement"));
}

/// dtype (transformers 5) or torch_dtype (transformers 4): the precision transformers computes
/// in. foe reads each tensor in the dtype its safetensors header states and computes in fp32
/// whatever this says, so it accepts the float types it can read and refuses others (fp8, int8,
/// float64: another computation than foe's).
inline void check_dtype(const Reader& r)
{
    for (const std::string_view key : {std::string_view("dtype"), std::string_view("torch_dtype")}) {
        const auto name = r.string(key);
        if (name && *name != "float32" && *name != "bfloat16" && *name != "float16")
            r.unsupported(key, *r.get(key),
                          "foe reads float32, bfloat16 or float16 weights and computes in float32; it must be one of "
                          "\"float32\", \"bfloat16\", \"float16\", null or absent");
    }
    (void)r.either("dtype", "torch_dtype");
}

/// eos_token_id: one id, a list of ids (OLMoE-style checkpoints use both), or null. Generation
/// stops at them, so an id outside the vocabulary, which could never be generated, is refused.
[[nodiscard]] inline std::vector<std::int32_t> parse_eos_token_ids(const Reader& r, index_t vocab_size)
{
    std::vector<std::int32_t> ids;
    const json::Value* v = r.get("eos_token_id");
    if (v == nullptr) return ids;
    const auto add = [&](const json::Value& id) {
        const index_t x = r.as_integer("eos_token_id", id);
        if (x < 0 || x >= vocab_size)
            raise<FormatError>(r.source(), ": eos_token_id ", x, " is outside the vocabulary [0, ", vocab_size, ")");
        ids.push_back(static_cast<std::int32_t>(x));
    };
    if (v->is_array()) {
        constexpr std::size_t max_ids = 1024;
        if (v->as_array().size() > max_ids)
            raise<FormatError>(r.source(), ": eos_token_id lists ", v->as_array().size(), " ids; at most ", max_ids);
        for (const json::Value& id : v->as_array()) add(id);
    } else {
        add(*v);
    }
    return ids;
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

    detail::config_json::check_model_type(r, c.architecture);

    // Options that would change the math if they were ignored.
    r.require_null("clip_qkv", "foe does not clip q/k/v; it must be null or absent");
    r.require_false("attention_bias", "foe's attention projections have no bias; it must be false or absent");
    r.require_false("mlp_bias", "foe's expert projections have no bias; it must be false or absent");
    if (const auto act = r.string("hidden_act"); act && *act != "silu")
        r.unsupported("hidden_act", *r.get("hidden_act"), "foe's experts are SwiGLU with silu; it must be \"silu\"");
    r.require_null("sliding_window", "foe's attention sees every earlier position; it must be null or absent");
    r.require_null("quantization_config",
                   "foe reads unquantized float32, bfloat16 or float16 weights; it must be null or absent");
    detail::config_json::check_dtype(r);

    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_attention_heads = r.integer("num_attention_heads");
    c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads);
    c.num_hidden_layers = r.integer("num_hidden_layers");
    c.num_experts = r.integer_either("num_experts", "num_local_experts");  // OlmoeConfig's attribute_map
    c.num_experts_per_tok = r.integer("num_experts_per_tok");
    c.vocab_size = r.integer("vocab_size");
    c.max_position_embeddings = r.integer("max_position_embeddings", 4096);
    c.rope_theta = detail::config_json::parse_rope_theta(r);
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
    c.eos_token_ids = detail::config_json::parse_eos_token_ids(r, c.vocab_size);

    try {
        c.validate();
    } catch (const ConfigError& e) {
        raise<ConfigError>(source_name, ": ", e.what());
    }
    return c;
}

inline ModelConfig load_config_json(const std::filesystem::path& path)
{
    const std::string source = detail::io::display(path);
    const auto bytes = detail::io::read_whole_file(path, config_json_max_bytes, "config.json");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    try {
        return parse_config_json(text, source);
    } catch (const std::bad_alloc&) {
        raise<IoError>(source, ": out of memory while parsing its ", bytes.size(), " bytes");
    }
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
    if (c.eos_token_ids.size() == 1) {
        v.set("eos_token_id", static_cast<index_t>(c.eos_token_ids.front()));
    } else if (!c.eos_token_ids.empty()) {
        json::Array ids;
        for (const std::int32_t id : c.eos_token_ids) ids.emplace_back(static_cast<index_t>(id));
        v.set("eos_token_id", std::move(ids));
    }
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
