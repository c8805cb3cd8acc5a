// Tests of foe/io: the JSON parser and writer, safetensors reader and writer, config.json, model
// directories.
//
// Every hostile input has its own test case and checks both the exception type and the words of
// its message (file, item, value), since a message that does not say what is wrong is a bug.

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "foe/io/config_json.hpp"
#include "foe/io/json.hpp"
#include "foe/io/model_dir.hpp"
#include "foe/io/safetensors.hpp"
#include "foe/model/weights.hpp"

namespace {

namespace fs = std::filesystem;
namespace json = foe::json;
using foe::index_t;

// --- helpers -----------------------------------------------------------------------------------

/// Runs f and checks that it throws exactly E (or a subclass) with every word in its message.
template <class E, class F>
void check_error(F&& f, std::initializer_list<std::string_view> words, const char* expr, const char* file, int line)
{
    try {
        f();
    } catch (const E& e) {
        const std::string message = e.what();
        for (std::string_view w : words)
            if (message.find(w) == std::string::npos)
                ADD_FAIL_CHECK_AT(file, line, expr << ": message \"" << message << "\" lacks \"" << w << "\"");
        return;
    } catch (const std::exception& e) {
        ADD_FAIL_CHECK_AT(file, line, expr << ": threw the wrong type, with message \"" << e.what() << "\"");
        return;
    }
    ADD_FAIL_CHECK_AT(file, line, expr << ": did not throw");
}

#define CHECK_ERROR(Type, expr, ...) \
    check_error<Type>([&] { (void)(expr); }, {__VA_ARGS__}, #expr, __FILE__, __LINE__)

/// A unique path under the temporary directory, removed (with anything under it) on destruction.
class TempPath {
public:
    explicit TempPath(std::string_view suffix)
    {
        static std::atomic<int> counter{0};
        const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
        path_ = fs::temp_directory_path() /
                ("foe_test_io_" + std::to_string(ticks) + "_" + std::to_string(counter++) + std::string(suffix));
    }
    TempPath(const TempPath&) = delete;
    TempPath& operator=(const TempPath&) = delete;
    ~TempPath()
    {
        std::error_code ignored;
        fs::remove_all(path_, ignored);
    }
    [[nodiscard]] const fs::path& path() const noexcept { return path_; }

private:
    fs::path path_;
};

std::vector<std::byte> to_bytes(std::string_view s)
{
    std::vector<std::byte> out(s.size());
    std::memcpy(out.data(), s.data(), s.size());
    return out;
}

/// A safetensors file as a hostile writer makes it: header_len (default: the header's size) as
/// the length prefix, the header text, then data_bytes bytes of data.
std::vector<std::byte> raw_safetensors(std::string_view header, std::size_t data_bytes,
                                       std::optional<std::uint64_t> header_len = std::nullopt)
{
    const std::uint64_t n = header_len.value_or(header.size());
    std::vector<std::byte> out(8);
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
    const auto h = to_bytes(header);
    out.insert(out.end(), h.begin(), h.end());
    out.resize(out.size() + data_bytes, std::byte{0x5a});
    return out;
}

foe::SafetensorsFile load_raw(std::string_view header, std::size_t data_bytes)
{
    return foe::SafetensorsFile::from_bytes(raw_safetensors(header, data_bytes), "model.safetensors");
}

std::vector<float> iota_values(std::size_t n, float start = 0.0f, float step = 1.0f)
{
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = start + step * static_cast<float>(i);
    return v;
}

void check_same_config(const foe::ModelConfig& a, const foe::ModelConfig& b)
{
    CHECK(a.architecture == b.architecture);
    CHECK(a.hidden_size == b.hidden_size);
    CHECK(a.intermediate_size == b.intermediate_size);
    CHECK(a.num_attention_heads == b.num_attention_heads);
    CHECK(a.num_key_value_heads == b.num_key_value_heads);
    CHECK(a.head_dim == b.head_dim);
    CHECK(a.num_hidden_layers == b.num_hidden_layers);
    CHECK(a.num_experts == b.num_experts);
    CHECK(a.num_experts_per_tok == b.num_experts_per_tok);
    CHECK(a.vocab_size == b.vocab_size);
    CHECK(a.num_expert_groups == b.num_expert_groups);
    CHECK(a.max_position_embeddings == b.max_position_embeddings);
    CHECK(a.rope_theta == b.rope_theta);
    CHECK(a.rms_norm_eps == b.rms_norm_eps);
    CHECK(a.norm_topk_prob == b.norm_topk_prob);
    CHECK(a.tie_word_embeddings == b.tie_word_embeddings);
    CHECK(a.qk_norm == b.qk_norm);
    CHECK(a.scoring_func == b.scoring_func);
}

/// The foe-tiny config.json as a JSON object, for tests that change one key.
json::Value tiny_config_object(std::string_view name = "foe-tiny")
{
    return json::parse(foe::to_config_json(foe::named_config(name)), "config.json");
}

std::string tiny_config_with(std::string_view key, json::Value value, std::string_view name = "foe-tiny")
{
    json::Value v = tiny_config_object(name);
    v.set(key, std::move(value));
    return json::dump(v);
}

std::string tiny_config_without(std::string_view key, std::string_view name = "foe-tiny")
{
    json::Value v = tiny_config_object(name);
    std::erase_if(v.as_object(), [&](const auto& member) { return member.first == key; });
    return json::dump(v);
}

constexpr std::string_view olmoe_1b_7b_config = R"({
  "architectures": [
    "OlmoeForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "clip_qkv": null,
  "eos_token_id": 50279,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 1024,
  "max_position_embeddings": 4096,
  "model_type": "olmoe",
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts": 64,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 16,
  "num_key_value_heads": 16,
  "output_router_logits": false,
  "pad_token_id": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "router_aux_loss_coef": 0.01,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 50304
}
)";

/// What transformers 5.25's save_pretrained writes for an OlmoeForCausalLM, verbatim: the RoPE
/// base is under rope_parameters, there is no top-level rope_theta, and torch_dtype is now dtype.
constexpr std::string_view olmoe_transformers5_config = R"({
  "architectures": [
    "OlmoeForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "clip_qkv": null,
  "dtype": "float32",
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 32,
  "max_position_embeddings": 64,
  "model_type": "olmoe",
  "norm_topk_prob": false,
  "num_attention_heads": 4,
  "num_experts": 8,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "output_router_logits": false,
  "pad_token_id": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "rope_theta": 500000.0,
    "rope_type": "default"
  },
  "router_aux_loss_coef": 0.01,
  "tie_word_embeddings": false,
  "transformers_version": "5.25.0",
  "use_cache": true,
  "vocab_size": 300
}
)";

/// olmoe_transformers5_config with key set to value (or removed when value is absent).
std::string transformers5_config_with(std::string_view key, std::optional<json::Value> value)
{
    json::Value v = json::parse(olmoe_transformers5_config, "config.json");
    if (value)
        v.set(key, std::move(*value));
    else
        std::erase_if(v.as_object(), [&](const auto& member) { return member.first == key; });
    return json::dump(v);
}

/// A RoPE dict {type_key: type, extra...} as transformers writes one for a scaled RoPE.
json::Value rope_dict(std::string_view type_key, std::string_view type,
                      std::initializer_list<std::pair<std::string_view, json::Value>> extra = {})
{
    json::Value d(json::Object{});
    d.set(type_key, json::Value(type));
    for (const auto& [k, v] : extra) d.set(k, v);
    return d;
}

/// The smallest FoE config.json: required keys only.
constexpr std::string_view minimal_foe_config = R"({
  "architectures": ["FoeForCausalLM"],
  "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 8, "num_hidden_layers": 2,
  "num_experts": 16, "num_experts_per_tok": 8, "vocab_size": 97
})";

}  // namespace

// =============================================================================================
// JSON
// =============================================================================================

TEST_CASE("json: parses literals, numbers, strings, arrays and objects")
{
    const json::Value v = json::parse(R"( {"n": null, "t": true, "f": false, "i": -12, "d": 2.5,
                                         "s": "hi", "a": [1, [], {}], "o": {"k": "v"}} )",
                                      "test");
    REQUIRE(v.is_object());
    CHECK(v.find("n")->is_null());
    CHECK(v.find("t")->as_bool());
    CHECK_FALSE(v.find("f")->as_bool());
    CHECK(v.find("i")->as_int() == -12);
    CHECK(v.find("d")->as_double() == 2.5);
    CHECK(v.find("s")->as_string() == "hi");
    REQUIRE(v.find("a")->as_array().size() == 3);
    CHECK(v.find("a")->as_array()[1].as_array().empty());
    CHECK(v.find("a")->as_array()[2].as_object().empty());
    CHECK(v.find("o")->find("k")->as_string() == "v");
    CHECK(v.find("missing") == nullptr);
    CHECK(json::parse("7", "test").as_int() == 7);  // any value may be the document
    CHECK(json::parse("\"x\"", "test").as_string() == "x");
}

TEST_CASE("json: integer literals that fit stay exact int64, other numbers become doubles")
{
    const auto num = [](std::string_view s) { return json::parse(s, "test"); };
    CHECK(num("9007199254740993").as_int() == 9007199254740993);  // 2^53 + 1: a double would round it
    CHECK(num("9223372036854775807").as_int() == std::numeric_limits<std::int64_t>::max());
    CHECK(num("-9223372036854775808").as_int() == std::numeric_limits<std::int64_t>::min());
    CHECK(num("-0").is_integer());
    CHECK(num("-0").as_int() == 0);

    CHECK(num("9223372036854775808").kind() == json::Kind::floating);  // 2^63 does not fit
    CHECK(num("9223372036854775808").as_double() == 9223372036854775808.0);
    CHECK(num("1.0").kind() == json::Kind::floating);
    CHECK(num("1e2").kind() == json::Kind::floating);
    CHECK(num("1e2").as_double() == 100.0);
    CHECK(num("-2.5E-3").as_double() == -2.5e-3);
    CHECK(num("1E+2").as_double() == 100.0);
    CHECK(num("1e-400").as_double() == 0.0);  // below the smallest double: zero, as Python reads it
    CHECK(std::signbit(num("-1e-400").as_double()));
    CHECK(num("0.00000000000000000000000000001e-300").as_double() == 0.0);
    CHECK(num("4.9e-324").as_double() > 0.0);  // the smallest subnormal
    CHECK(num("1e-99999999999999999999").as_double() == 0.0);

    CHECK(num("3").as_double() == 3.0);  // an integer reads as a double too
    CHECK(num("3").is_number());
    CHECK(num("3.5").is_number());
}

TEST_CASE("json: decodes every escape, including surrogate pairs, to UTF-8")
{
    const json::Value v = json::parse(R"("\"\\\/\b\f\n\r\t\u0041\u00e9\u20AC\ud83d\ude00\u0000")", "test");
    CHECK(v.as_string() == std::string("\"\\/\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 18) + '\0');
}

TEST_CASE("json: accepts raw multi-byte UTF-8 in strings")
{
    const std::string text = "\"\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"";
    CHECK(json::parse(text, "test").as_string() == text.substr(1, text.size() - 2));
}

TEST_CASE("json: objects keep insertion order, and find() and set() see the members")
{
    json::Value v = json::parse(R"({"z": 1, "a": 2, "m": 3})", "test");
    const auto& members = v.as_object();
    REQUIRE(members.size() == 3);
    CHECK(members[0].first == "z");
    CHECK(members[1].first == "a");
    CHECK(members[2].first == "m");
    v.set("a", "replaced").set("new", json::Array{1, 2});
    CHECK(v.as_object().size() == 4);
    CHECK(v.as_object()[1].second.as_string() == "replaced");
    CHECK(v.as_object()[3].first == "new");
    CHECK(json::dump(v) == R"({"z":1,"a":"replaced","m":3,"new":[1,2]})");
}

TEST_CASE("json: rejects leading zeros")
{
    for (const char* text : {"01", "-01", "00", "[012]", "00.5"}) {
        INFO(text);
        CHECK_ERROR(foe::FormatError, json::parse(text, "lz.json"), "lz.json", "leading zero");
    }
}

TEST_CASE("json: rejects NaN, Infinity and other number forms RFC 8259 does not allow")
{
    for (const char* text :
         {"NaN", "Infinity", "-Infinity", "+1", ".5", "1.", "1.e3", "1e", "1e+", "-", "0x10", "- 1"}) {
        INFO(text);
        CHECK_ERROR(foe::FormatError, json::parse(text, "num.json"), "num.json", "invalid JSON at byte");
    }
}

TEST_CASE("json: rejects numbers beyond the range of a double")
{
    CHECK_ERROR(foe::FormatError, json::parse("1e400", "big.json"), "big.json", "byte 0", "1e400",
                "outside the range of a double");
    CHECK_ERROR(foe::FormatError, json::parse("[-1e99999999999999999999]", "big.json"), "byte 1",
                "outside the range of a double");
}

TEST_CASE("json: rejects unescaped control characters in strings")
{
    CHECK_ERROR(foe::FormatError, json::parse("\"a\nb\"", "ctl.json"), "ctl.json", "byte 2", "0x0a",
                "must be escaped");
    CHECK_ERROR(foe::FormatError, json::parse(std::string("\"a\0b\"", 5), "ctl.json"), "byte 2", "0x00");
}

TEST_CASE("json: rejects invalid escapes")
{
    CHECK_ERROR(foe::FormatError, json::parse(R"("\x41")", "esc.json"), "esc.json", "byte 1", "invalid escape",
                "'x'");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\'")", "esc.json"), "invalid escape");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\u12G4")", "esc.json"), "hex digit", "'G'");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\u12)", "esc.json"), "truncated \\u escape");
    CHECK_ERROR(foe::FormatError, json::parse(R"("abc\)", "esc.json"), "unterminated string");
}

TEST_CASE("json: rejects lone and mismatched surrogate escapes")
{
    CHECK_ERROR(foe::FormatError, json::parse(R"("\ude00")", "sur.json"), "sur.json", "lone low surrogate",
                "ude00");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\ud83d")", "sur.json"), "high surrogate", "ud83d",
                "not followed by a low surrogate");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\ud83dx")", "sur.json"), "not followed by a low surrogate");
    CHECK_ERROR(foe::FormatError, json::parse(R"("\ud83d\u0041")", "sur.json"), "u0041",
                "not by a low surrogate");
}

TEST_CASE("json: rejects invalid UTF-8 in strings")
{
    const char* samples[] = {
        "\"\xc0\xaf\"",          // overlong '/'
        "\"\xe0\x80\xaf\"",      // overlong, 3 bytes
        "\"\xed\xa0\x80\"",      // UTF-16 surrogate encoded in UTF-8
        "\"\xf4\x90\x80\x80\"",  // above U+10FFFF
        "\"\xf5\x80\x80\x80\"",  // invalid lead byte
        "\"\x80\"",              // lone continuation byte
        "\"\xe2\x82\"",          // truncated sequence
        "\"\xff\"",
    };
    for (const char* text : samples) {
        INFO(json::detail::describe_text(text));
        CHECK_ERROR(foe::FormatError, json::parse(text, "utf8.json"), "utf8.json", "byte 1", "invalid UTF-8");
    }
    CHECK_ERROR(foe::FormatError, json::parse("\xef\xbb\xbf{}", "bom.json"), "byte 0", "0xef");  // no BOM
}

TEST_CASE("json: rejects trailing commas and missing separators")
{
    CHECK_ERROR(foe::FormatError, json::parse("[1, 2,]", "sep.json"), "sep.json", "byte 6", "expected a value",
                "']'");
    CHECK_ERROR(foe::FormatError, json::parse(R"({"a": 1,})", "sep.json"), "byte 8", "expected a string key");
    CHECK_ERROR(foe::FormatError, json::parse("[1 2]", "sep.json"), "byte 3", "expected ']' or ','");
    CHECK_ERROR(foe::FormatError, json::parse(R"({"a" 1})", "sep.json"), "byte 5", "expected ':'");
    CHECK_ERROR(foe::FormatError, json::parse(R"({a: 1})", "sep.json"), "byte 1", "expected a string key");
    CHECK_ERROR(foe::FormatError, json::parse("[1,,2]", "sep.json"), "byte 3", "expected a value");
}

TEST_CASE("json: rejects content after the document")
{
    CHECK_ERROR(foe::FormatError, json::parse("{} {}", "trail.json"), "trail.json", "byte 3",
                "after the end of the document");
    CHECK_ERROR(foe::FormatError, json::parse("1 2", "trail.json"), "byte 2");
    CHECK_ERROR(foe::FormatError, json::parse("truex", "trail.json"), "byte 4");
    CHECK_ERROR(foe::FormatError, json::parse("nul", "trail.json"), "byte 0", "invalid literal");
    CHECK_ERROR(foe::FormatError, json::parse("", "empty.json"), "empty.json", "byte 0", "end of input");
    CHECK_ERROR(foe::FormatError, json::parse("  ", "empty.json"), "byte 2", "end of input");
    CHECK_ERROR(foe::FormatError, json::parse("// comment\n1", "c.json"), "byte 0");
}

TEST_CASE("json: rejects every truncation of a document")
{
    const std::string doc = R"({"a": [1, -2.5e3, "x\u00e9y", true, null], "b": {"c": false}})";
    REQUIRE_NOTHROW((void)json::parse(doc, "doc.json"));
    for (std::size_t n = 0; n < doc.size(); ++n) {
        INFO("prefix of ", n, " bytes");
        CHECK_ERROR(foe::FormatError, json::parse(std::string_view(doc).substr(0, n), "doc.json"), "doc.json");
    }
}

TEST_CASE("json: rejects nesting deeper than the limit")
{
    const auto nested = [](int depth) { return std::string(static_cast<std::size_t>(depth), '[') +
                                               std::string(static_cast<std::size_t>(depth), ']'); };
    CHECK_NOTHROW((void)json::parse(nested(json::max_depth), "deep.json"));
    CHECK_ERROR(foe::FormatError, json::parse(nested(json::max_depth + 1), "deep.json"), "deep.json",
                "byte 128", "nesting deeper than 128 levels");
    // Far deeper than any stack could recurse: must stop at the limit, not crash.
    CHECK_ERROR(foe::FormatError, json::parse(std::string(1'000'000, '['), "deep.json"), "nesting deeper");
    std::string objects;
    for (int i = 0; i <= json::max_depth; ++i) objects += "{\"a\":";
    CHECK_ERROR(foe::FormatError, json::parse(objects, "deep.json"), "nesting deeper");
}

TEST_CASE("json: rejects duplicate object keys")
{
    CHECK_ERROR(foe::FormatError, json::parse(R"({"a": 1, "b": 2, "a": 3})", "dup.json"), "dup.json", "byte 17",
                "duplicate object key \"a\"");
    // The same key spelled with an escape is still the same key.
    CHECK_ERROR(foe::FormatError, json::parse(R"({"a": 1, "\u0061": 2})", "dup.json"), "byte 9",
                "duplicate object key \"a\"");
    CHECK_ERROR(foe::FormatError, json::parse(R"([{"x": {"y": 1, "y": 2}}])", "dup.json"), "\"y\"");
    CHECK_NOTHROW((void)json::parse(R"({"a": {"a": 1}, "b": {"a": 2}})", "dup.json"));  // other objects
}

TEST_CASE("json: the duplicate-key check handles large objects")
{
    std::string text = "{";
    for (int i = 0; i < 100'000; ++i) text += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
    const std::string unique = text + "}";
    CHECK(json::parse(unique, "big.json").as_object().size() == 100'000);
    CHECK_ERROR(foe::FormatError, json::parse(text + ",\"k77\":1}", "big.json"), "duplicate object key \"k77\"");
}

TEST_CASE("json: error messages name the source and the byte offset")
{
    CHECK_ERROR(foe::FormatError, json::parse("{\n  \"a\": tru\n}", "my/config.json"),
                "my/config.json: invalid JSON at byte 9: invalid literal (expected true)");
}

TEST_CASE("json: accessors of the wrong kind throw FormatError")
{
    const json::Value v = json::parse(R"({"s": "64", "d": 1.5, "i": 3})", "test");
    CHECK_ERROR(foe::FormatError, (void)v.find("s")->as_int(), "\"64\"", "a string", "not an integer");
    CHECK_ERROR(foe::FormatError, (void)v.find("d")->as_int(), "1.5", "not an integer");
    CHECK_ERROR(foe::FormatError, (void)v.find("i")->as_string(), "not a string");
    CHECK_ERROR(foe::FormatError, (void)v.as_array(), "not an array");
    CHECK_ERROR(foe::FormatError, (void)v.find("i")->as_bool(), "not a boolean");
    CHECK_ERROR(foe::FormatError, (void)v.find("s")->as_double(), "\"64\" is a string, not a number");
    CHECK(v.find("i")->find("x") == nullptr);  // find on a non-object is not an error
}

TEST_CASE("json: dump is compact and round-trips")
{
    const std::string text =
        R"({"a":[1,-2,3.5,true,false,null,"x"],"b":{"c":{},"d":[]},"e":-9223372036854775808,"f":1e-05})";
    const json::Value v = json::parse(text, "test");
    CHECK(json::dump(v) == text);
    CHECK(json::parse(json::dump(v), "test") == v);
    CHECK(json::parse(json::dump_pretty(v), "test") == v);
}

TEST_CASE("json: dump escapes quotes, backslashes and control characters")
{
    const json::Value v(std::string("q\"b\\n\nt\tc\x01\x1f\x7f u\xc3\xa9", 16));
    CHECK(json::dump(v) == "\"q\\\"b\\\\n\\nt\\tc\\u0001\\u001f\\u007f u\xc3\xa9\"");
    CHECK(json::parse(json::dump(v), "test") == v);
    CHECK(json::quote("a\"b") == "\"a\\\"b\"");
}

TEST_CASE("json: dump writes doubles that read back exactly, as doubles")
{
    for (double d : {0.1, 1e-5, 1.0 / 3.0, 1e300, 5e-324, -0.0, 10000.0, 500000.0, 123456789012345680.0,
                     std::numeric_limits<double>::max(), std::numeric_limits<double>::min()}) {
        INFO(d);
        const std::string text = json::dump(json::Value(d));
        const json::Value back = json::parse(text, "test");
        CHECK(back.kind() == json::Kind::floating);
        CHECK(std::bit_cast<std::uint64_t>(back.as_double()) == std::bit_cast<std::uint64_t>(d));
    }
    CHECK(json::dump(json::Value(10000.0)) == "10000.0");
    CHECK(json::dump(json::Value(1e-5)) == "1e-05");
    CHECK(json::dump(json::Value(0.5)) == "0.5");
}

TEST_CASE("json: dump rejects strings that are not UTF-8")
{
    CHECK_ERROR(foe::InvalidArgument, (void)json::dump(json::Value("bad\xff")), "not valid UTF-8", "\\xff");
    json::Value key_object{json::Object{}};
    key_object.set("k\xc0", 1);
    CHECK_ERROR(foe::InvalidArgument, (void)json::dump(key_object), "not valid UTF-8");
}

TEST_CASE("json: Value rejects NaN and infinity")
{
    CHECK_ERROR(foe::InvalidArgument, json::Value(std::nan("")), "cannot represent");
    CHECK_ERROR(foe::InvalidArgument, json::Value(-std::numeric_limits<double>::infinity()), "cannot represent",
                "inf");
}

TEST_CASE("json: builders make values of each kind")
{
    CHECK(json::Value().is_null());
    CHECK(json::Value(nullptr).is_null());
    CHECK(json::Value(true).is_bool());
    CHECK(json::Value(3).is_integer());
    CHECK(json::Value(std::uint64_t{1} << 63).kind() == json::Kind::floating);  // above INT64_MAX
    CHECK(json::Value("s").is_string());  // not bool
    CHECK(json::Value(std::string_view("s")).is_string());
    json::Value a{json::Array{}};
    a.push_back(1).push_back("two");
    CHECK(json::dump(a) == R"([1,"two"])");
    CHECK_ERROR(foe::FormatError, json::Value(1).push_back(2), "not an array");
    CHECK_ERROR(foe::FormatError, json::Value(1).set("k", 2), "not an object");
    CHECK(json::Value(1) != json::Value(1.0));
}

TEST_CASE("json: dump_pretty puts one item per line")
{
    const json::Value v = json::parse(R"({"a":[1,2],"b":{},"c":[],"d":{"e":null}})", "test");
    CHECK(json::dump_pretty(v) ==
          "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {},\n  \"c\": [],\n  \"d\": {\n    \"e\": null\n  }\n}");
}

TEST_CASE("json: random mutations of a document parse or throw FormatError")
{
    const std::string doc =
        R"({"a": [1, -2.5e3, "x\u00e9y\ud83d\ude00", true, null], "b": {"c": false, "d": "\u00e9"}})";
    const std::string alphabet = "{}[]\":,\\-+.0123456789eEutrfalsn \x80\xc3\xe2\xf0";
    std::mt19937_64 rng(12345);
    int parsed = 0;
    for (int trial = 0; trial < 20000; ++trial) {
        std::string text = doc;
        const int edits = 1 + static_cast<int>(rng() % 3);
        for (int e = 0; e < edits; ++e) {
            const std::size_t at = rng() % text.size();
            switch (rng() % 3) {
            case 0: text[at] = alphabet[rng() % alphabet.size()]; break;
            case 1: text.erase(at, 1); break;
            default: text.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
            }
        }
        try {
            const json::Value v = json::parse(text, "fuzz.json");
            ++parsed;
            CHECK(json::parse(json::dump(v), "fuzz.json") == v);
        } catch (const foe::FormatError&) {
        }
    }
    CHECK(parsed > 0);
}

// =============================================================================================
// safetensors
// =============================================================================================

TEST_CASE("safetensors: F32 round trip through a file, with shapes of every rank")
{
    const std::vector<float> scalar{-7.25f};
    const std::vector<float> vec = iota_values(5, -2.0f, 0.5f);
    const std::vector<float> mat = iota_values(6, 1.0f, 1e-3f);
    const std::vector<float> cube{std::numeric_limits<float>::denorm_min(), -0.0f, 1e30f,
                                  std::numeric_limits<float>::infinity()};
    const std::vector<foe::TensorToWrite> tensors{
        {"scalar", foe::DType::f32, {}, scalar},
        {"empty", foe::DType::f32, {0, 4}, {}},
        {"model.vec", foe::DType::f32, {5}, vec},
        {"model.layers.0.mat", foe::DType::f32, {2, 3}, mat},
        {"cube", foe::DType::f32, {2, 1, 2}, cube},
    };
    const TempPath tmp(".safetensors");
    foe::save_safetensors(tmp.path(), tensors);
    const auto file = foe::SafetensorsFile::open(tmp.path());

    CHECK(file.source_name() == tmp.path().string());
    REQUIRE(file.tensors().size() == tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const auto& want = tensors[i];
        INFO(want.name);
        const foe::TensorInfo& info = file.tensors()[i];  // header order is the order written
        CHECK(info.name == want.name);
        CHECK(info.dtype == foe::DType::f32);
        CHECK(info.shape == want.shape);
        CHECK(info.numel() == static_cast<index_t>(want.values.size()));
        CHECK(info.byte_size() == 4 * info.numel());
        const foe::Tensor<float> t = file.read_float(want.name, want.shape);
        CHECK(t.shape() == want.shape);
        REQUIRE(t.values().size() == want.values.size());
        for (std::size_t j = 0; j < want.values.size(); ++j)
            CHECK(std::bit_cast<std::uint32_t>(t.values()[j]) == std::bit_cast<std::uint32_t>(want.values[j]));
    }
    CHECK(file.read_float("scalar").size() == 1);
    CHECK(file.read_float("model.layers.0.mat", {2, 3}).values() == mat);
    CHECK(file.contains("model.vec"));
    CHECK_FALSE(file.contains("model.ve"));
    CHECK(file.find("nope") == nullptr);
    CHECK(file.metadata().empty());
}

TEST_CASE("safetensors: BF16 and F16 round trip exactly representable values")
{
    // Small integers, powers of two and short binary fractions are exact in both formats.
    const std::vector<float> values{0.0f, -0.0f, 1.0f, -2.0f, 0.5f, 0.375f, 96.0f, -0.0078125f, 3.0f, 1.5f};
    const std::vector<float> f16_only{65504.0f, 6.103515625e-05f, 5.9604644775390625e-08f, 1.0009765625f};
    // The largest bf16, minus the smallest normal float, 1 + 2^-7, a subnormal.
    const std::vector<float> bf16_only{std::bit_cast<float>(0x7f7f0000u), -std::numeric_limits<float>::min(),
                                       1.00781250f, std::bit_cast<float>(0x00010000u)};
    const std::vector<foe::TensorToWrite> tensors{
        {"bf16", foe::DType::bf16, {2, 5}, values},
        {"f16", foe::DType::f16, {10}, values},
        {"f16_edges", foe::DType::f16, {4}, f16_only},
        {"bf16_edges", foe::DType::bf16, {4}, bf16_only},
    };
    const auto file = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors(tensors), "half.safetensors");
    for (const auto& want : tensors) {
        INFO(want.name);
        const foe::TensorInfo* info = file.find(want.name);
        REQUIRE(info != nullptr);
        CHECK(info->dtype == want.dtype);
        CHECK(info->byte_size() == 2 * info->numel());
        const auto got = file.read_float(want.name).values();
        REQUIRE(got.size() == want.values.size());
        for (std::size_t i = 0; i < got.size(); ++i)
            CHECK(std::bit_cast<std::uint32_t>(got[i]) == std::bit_cast<std::uint32_t>(want.values[i]));
    }
}

TEST_CASE("safetensors: BF16 and F16 writes round to nearest even")
{
    const float one_plus_half_ulp_bf16 = 1.0f + 1.0f / 256.0f;   // halfway between 1 and 1 + 2^-7: even is 1
    const float one_plus_half_ulp_f16 = 1.0f + 1.0f / 2048.0f;   // halfway between 1 and 1 + 2^-10
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> bf{one_plus_half_ulp_bf16, nan};
    const std::vector<float> h{one_plus_half_ulp_f16, 1e6f};
    const std::vector<foe::TensorToWrite> tensors{{"bf", foe::DType::bf16, {2}, bf}, {"h", foe::DType::f16, {2}, h}};
    const auto file = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors(tensors), "round.safetensors");
    const auto got_bf = file.read_float("bf").values();
    CHECK(got_bf[0] == 1.0f);
    CHECK(std::isnan(got_bf[1]));
    const auto got_h = file.read_float("h").values();
    CHECK(got_h[0] == 1.0f);
    CHECK(std::isinf(got_h[1]));  // above the largest half
}

TEST_CASE("safetensors: metadata round trip")
{
    const std::vector<float> v{1.0f, 2.0f};
    const std::vector<foe::TensorToWrite> tensors{{"w", foe::DType::f32, {2}, v}};
    const foe::SafetensorsMetadata meta{{"format", "pt"}, {"note", "caf\xc3\xa9 \"quoted\"\n"}, {"", "empty key"}};
    const TempPath tmp(".safetensors");
    foe::save_safetensors(tmp.path(), tensors, meta);
    const auto file = foe::SafetensorsFile::open(tmp.path());
    CHECK(file.metadata() == meta);
    CHECK(file.tensors().size() == 1);  // __metadata__ is not a tensor
    CHECK_FALSE(file.contains("__metadata__"));
}

TEST_CASE("safetensors: layout is little-endian with a header padded to a multiple of 8")
{
    const std::vector<float> v{1.0f};
    const std::vector<float> h{1.0f};
    const std::vector<foe::TensorToWrite> tensors{{"a", foe::DType::f32, {1}, v}, {"b", foe::DType::bf16, {1}, h}};
    const std::vector<std::byte> bytes = foe::serialize_safetensors(tensors);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
    CHECK(n % 8 == 0);
    REQUIRE(bytes.size() == 8 + n + 4 + 2);
    const std::string header(reinterpret_cast<const char*>(bytes.data() + 8), n);
    CHECK(header.find_last_not_of(' ') == header.rfind('}'));
    CHECK(header.substr(0, header.rfind('}') + 1) ==
          R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
          R"("b":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]}})");
    const std::byte* data = bytes.data() + 8 + n;
    // 1.0f is 0x3f800000; bf16 1.0 is 0x3f80.
    CHECK(data[0] == std::byte{0x00});
    CHECK(data[1] == std::byte{0x00});
    CHECK(data[2] == std::byte{0x80});
    CHECK(data[3] == std::byte{0x3f});
    CHECK(data[4] == std::byte{0x80});
    CHECK(data[5] == std::byte{0x3f});
}

TEST_CASE("safetensors: reads a file laid out as Hugging Face writes it")
{
    // Metadata first, tensors listed out of offset order, header padded with trailing spaces.
    std::string header =
        R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},)"
        R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    header.append((8 - header.size() % 8) % 8 + 8, ' ');
    std::vector<std::byte> bytes = raw_safetensors(header, 0);
    for (unsigned b : {0x00u, 0x00u, 0x80u, 0xbfu, 0x00u, 0x00u, 0x20u, 0x41u, 0x00u, 0x3cu, 0x00u, 0xc0u})
        bytes.push_back(static_cast<std::byte>(b));  // F32 -1, 10; F16 1, -2
    const auto file = foe::SafetensorsFile::from_bytes(std::move(bytes), "hf.safetensors");
    CHECK(file.metadata().at("format") == "pt");
    CHECK(file.tensors()[0].name == "b");
    CHECK(file.read_float("a").values() == std::vector<float>{-1.0f, 10.0f});
    CHECK(file.read_float("b").values() == std::vector<float>{1.0f, -2.0f});
    CHECK(file.read_bytes(*file.find("b")).size() == 4);
}

TEST_CASE("safetensors: a file without tensors is valid")
{
    const auto file = load_raw("{}", 0);
    CHECK(file.tensors().empty());
    const auto with_null_metadata = load_raw(R"({"__metadata__": null})", 0);
    CHECK(with_null_metadata.metadata().empty());
    const auto written = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors({}), "none.safetensors");
    CHECK(written.tensors().empty());
}

TEST_CASE("safetensors: rejects a file shorter than 8 bytes")
{
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes(to_bytes("abcde"), "short.safetensors"),
                "short.safetensors", "file is 5 bytes", "8-byte header length");
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes({}, "empty.safetensors"), "file is 0 bytes");
}

TEST_CASE("safetensors: rejects a truncated data region")
{
    const std::vector<float> v = iota_values(4);
    const std::vector<foe::TensorToWrite> tensors{{"model.norm.weight", foe::DType::f32, {4}, v}};
    std::vector<std::byte> bytes = foe::serialize_safetensors(tensors);
    bytes.erase(bytes.end() - 3, bytes.end());  // not resize(): GCC 12 misreads it under ASan (-Warray-bounds)
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes(bytes, "trunc.safetensors"), "trunc.safetensors",
                "tensor \"model.norm.weight\"", "data_offsets [0, 16)", "past the end of the data region",
                "holds 13 bytes", "truncated");
}

TEST_CASE("safetensors: rejects a header length pointing past the end of the file")
{
    const auto bytes = raw_safetensors("{}", 0, 3000);
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes(bytes, "len.safetensors"), "len.safetensors",
                "header length 3000", "past the end of the file", "only 2 bytes follow");
    const auto huge = raw_safetensors("{}", 0, std::numeric_limits<std::uint64_t>::max());
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes(huge, "len.safetensors"),
                "header length 18446744073709551615");
}

TEST_CASE("safetensors: rejects a header length above the 100 MB cap")
{
    const auto bytes = raw_safetensors("{}", 0, 100'000'001);
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::from_bytes(bytes, "cap.safetensors"), "cap.safetensors",
                "header length 100000001", "limit of 100000000 bytes");
}

TEST_CASE("safetensors: rejects a header that is not JSON")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"a": {"dtype": "F32",)", 0), "model.safetensors (header)",
                "invalid JSON at byte 22");
    CHECK_ERROR(foe::FormatError, load_raw("\xff\xfe", 0), "model.safetensors (header)", "byte 0");
}

TEST_CASE("safetensors: rejects a header that is not a JSON object")
{
    CHECK_ERROR(foe::FormatError, load_raw("[1, 2]", 0), "model.safetensors", "header must be a JSON object",
                "an array");
    CHECK_ERROR(foe::FormatError, load_raw("   ", 0), "model.safetensors (header)", "end of input");
}

TEST_CASE("safetensors: rejects a tensor entry that is not an object")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": [1, 2]})", 0), "model.safetensors", "tensor \"w\"",
                "entry must be an object", "[1,2]");
}

TEST_CASE("safetensors: rejects a tensor entry with a missing field")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": "F32", "shape": [1]}})", 4), "model.safetensors",
                "tensor \"w\"", "missing field \"data_offsets\"");
}

TEST_CASE("safetensors: rejects a tensor entry with an unknown field")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "strides": [1]}})", 4),
                "model.safetensors", "tensor \"w\"", "unknown field \"strides\"");
}

TEST_CASE("safetensors: rejects fields of the wrong JSON type")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}})", 4),
                "tensor \"w\"", "dtype must be a string", "got 5");
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}})", 4),
                "tensor \"w\"", "shape must be an array", "\"1\"");
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4),
                "tensor \"w\"", "data_offsets must be an array of two non-negative integers", "[0]");
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4),
                "data_offsets must be", "[-4,0]");
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}})", 4),
                "data_offsets must be", "[0,4.0]");
}

TEST_CASE("safetensors: rejects an unknown dtype, listing the supported ones")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8),
                "model.safetensors", "tensor \"w\"", "dtype \"I64\" is not supported", "F32, BF16, F16");
}

TEST_CASE("safetensors: rejects a negative shape extent")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 0]}})", 0),
                "model.safetensors", "tensor \"w\"", "shape [2,-3]", "extent -3 at dimension 1",
                "non-negative integers");
}

TEST_CASE("safetensors: rejects a non-integer shape extent")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}})", 10),
                "tensor \"w\"", "extent 2.5 at dimension 0");
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1e30], "data_offsets": [0, 4]}})", 4),
                "tensor \"w\"", "extent 1e+30");
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}})", 16),
                "tensor \"w\"", "extent \"4\"");
}

TEST_CASE("safetensors: rejects a shape whose element count overflows")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 0]}})",
                         0),
                "model.safetensors", "tensor \"w\"", "shape [1099511627776, 1099511627776] of F32",
                "more bytes than fit in 64 bits");
    // A zero extent after the overflow does not save it (Hugging Face rejects it too).
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})",
                         0),
                "more bytes than fit in 64 bits");
}

TEST_CASE("safetensors: rejects a byte count that overflows although the element count fits")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", 0),
                "tensor \"w\"", "shape [4611686018427387904] of F32", "more bytes than fit in 64 bits");
}

TEST_CASE("safetensors: rejects data_offsets that do not match the shape")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"model.norm.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 12]}})", 12),
                "model.safetensors: tensor \"model.norm.weight\": data_offsets [0, 12) hold 12 bytes but shape [4] "
                "of BF16 needs 8");
}

TEST_CASE("safetensors: rejects data_offsets that end before they begin")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8),
                "tensor \"w\"", "data_offsets [8, 4) end before they begin");
}

TEST_CASE("safetensors: rejects overlapping tensors")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                         R"( "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                         24),
                "model.safetensors", "tensors \"a\" [0, 16) and \"b\" [8, 24) overlap");
    // The same range twice.
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                         4),
                "overlap");
}

TEST_CASE("safetensors: rejects data_offsets outside the data region")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [1000000, 1000008]}})",
                         4),
                "model.safetensors", "tensor \"b\"", "data_offsets [1000000, 1000008)",
                "past the end of the data region, which holds 4 bytes");
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"b": {"dtype": "F32", "shape": [0],)"
                         R"( "data_offsets": [9223372036854775807, 9223372036854775807]}})",
                         4),
                "tensor \"b\"", "past the end of the data region");
}

TEST_CASE("safetensors: rejects a gap between tensors")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                         12),
                "model.safetensors", "bytes [4, 8) of the data region belong to no tensor",
                "between \"a\" and \"b\"");
}

TEST_CASE("safetensors: rejects a gap before the first tensor")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8),
                "bytes [0, 4) of the data region belong to no tensor", "before \"a\"");
}

TEST_CASE("safetensors: rejects bytes after the last tensor")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 7),
                "model.safetensors", "bytes [4, 7) of the data region belong to no tensor",
                "after the last tensor \"a\"");
    CHECK_ERROR(foe::FormatError, load_raw("{}", 16), "bytes [0, 16)", "the header lists no tensors");
}

TEST_CASE("safetensors: rejects duplicate tensor names")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         8),
                "model.safetensors (header)", "duplicate object key \"w\"");
}

TEST_CASE("safetensors: rejects metadata that is not an object of strings")
{
    CHECK_ERROR(foe::FormatError, load_raw(R"({"__metadata__": {"format": 1}})", 0), "model.safetensors",
                "__metadata__ value of key \"format\" must be a string", "got 1");
    CHECK_ERROR(foe::FormatError, load_raw(R"({"__metadata__": ["pt"]})", 0), "__metadata__ must be an object");
}

TEST_CASE("safetensors: messages about hostile values stay short")
{
    const auto message_of = [](const std::string& header) {
        try {
            (void)load_raw(header, 0);
        } catch (const foe::FormatError& e) {
            return std::string(e.what());
        }
        return std::string("no exception");
    };
    const std::string long_name = message_of(R"({")" + std::string(100'000, 'n') +
                                             R"(": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}})");
    CHECK(long_name.size() < 400);
    CHECK(long_name.find("nnn...\"") != std::string::npos);
    CHECK(long_name.find("dtype \"I64\"") != std::string::npos);

    std::string extents;
    for (int i = 0; i < 50'000; ++i) extents += "1,";
    const std::string long_shape =
        message_of(R"({"w": {"dtype": "F32", "shape": [)" + extents + R"(-1], "data_offsets": [0, 0]}})");
    CHECK(long_shape.size() < 400);
    CHECK(long_shape.find("extent -1 at dimension 50000") != std::string::npos);
}

TEST_CASE("safetensors: read_float of a missing tensor names the file and the tensor")
{
    const std::vector<float> v{1.0f};
    const std::vector<foe::TensorToWrite> tensors{{"present", foe::DType::f32, {1}, v}};
    const auto file = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors(tensors), "model.safetensors");
    CHECK_ERROR(foe::FormatError, (void)file.read_float("model.layers.3.mlp.gate.weight"),
                "model.safetensors: missing tensor \"model.layers.3.mlp.gate.weight\"");
    CHECK_ERROR(foe::FormatError, (void)file.at("absent"), "model.safetensors", "missing tensor \"absent\"");
}

TEST_CASE("safetensors: read_float with an expected shape rejects a different shape")
{
    const std::vector<float> v = iota_values(32);
    const std::vector<foe::TensorToWrite> tensors{{"w", foe::DType::f32, {4, 8}, v}};
    const auto file = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors(tensors), "model.safetensors");
    CHECK_ERROR(foe::FormatError, (void)file.read_float("w", {8, 4}),
                "model.safetensors: tensor \"w\" has shape [4, 8], expected [8, 4]");
    const std::vector<index_t> rank3{4, 8, 1};
    CHECK_ERROR(foe::FormatError, (void)file.read_float("w", rank3), "has shape [4, 8], expected [4, 8, 1]");
    CHECK(file.read_float("w", {4, 8}).size() == 32);
}

TEST_CASE("safetensors: read_bytes() rejects a TensorInfo of another file")
{
    const auto file = load_raw(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 4);
    foe::TensorInfo foreign{"x", foe::DType::f32, {4}, 0, 16};
    CHECK_ERROR(foe::InvalidArgument, (void)file.read_bytes(foreign), "model.safetensors", "tensor \"x\"",
                "not a tensor of this file");
}

TEST_CASE("safetensors: open of a missing file is an IoError")
{
    const TempPath tmp(".safetensors");
    CHECK_ERROR(foe::IoError, foe::SafetensorsFile::open(tmp.path()), tmp.path().string(), "cannot open");
}

TEST_CASE("safetensors: open of a directory is an IoError")
{
    const TempPath tmp("_dir");
    fs::create_directories(tmp.path());
    CHECK_ERROR(foe::IoError, foe::SafetensorsFile::open(tmp.path()), tmp.path().string(), "not a regular file");
}

TEST_CASE("safetensors: serialize rejects a value count that does not match the shape")
{
    const std::vector<float> v(5);
    const std::vector<foe::TensorToWrite> tensors{{"w", foe::DType::bf16, {2, 3}, v}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(tensors), "tensor \"w\"",
                "shape [2, 3] holds 6 elements but 5 values were given");
    const std::vector<foe::TensorToWrite> huge{{"h", foe::DType::f32, {1 << 30, 1 << 30, 1 << 30}, v}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(huge), "tensor \"h\"", "more than 2^63");
}

TEST_CASE("safetensors: serialize rejects duplicate names")
{
    const std::vector<float> v{1.0f};
    const std::vector<foe::TensorToWrite> tensors{
        {"a", foe::DType::f32, {1}, v}, {"b", foe::DType::f32, {1}, v}, {"a", foe::DType::f16, {1}, v}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(tensors), "duplicate tensor name \"a\"");
}

TEST_CASE("safetensors: serialize rejects the reserved name __metadata__")
{
    const std::vector<float> v{1.0f};
    const std::vector<foe::TensorToWrite> tensors{{"__metadata__", foe::DType::f32, {1}, v}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(tensors), "\"__metadata__\"", "reserved");
}

TEST_CASE("safetensors: serialize rejects a negative extent")
{
    const std::vector<foe::TensorToWrite> tensors{{"w", foe::DType::f32, {2, -1}, {}}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(tensors), "tensor \"w\"",
                "negative extent -1 at dimension 1");
}

TEST_CASE("safetensors: serialize rejects a name that is not UTF-8")
{
    const std::vector<float> v{1.0f};
    const std::vector<foe::TensorToWrite> tensors{{"w\xff", foe::DType::f32, {1}, v}};
    CHECK_ERROR(foe::InvalidArgument, (void)foe::serialize_safetensors(tensors), "not valid UTF-8", "w\\xff");
}

TEST_CASE("safetensors: save into a missing directory is an IoError and leaves no file")
{
    const TempPath dir("_missing_dir");
    const fs::path target = dir.path() / "model.safetensors";
    const std::vector<float> v{1.0f};
    const std::vector<foe::TensorToWrite> tensors{{"w", foe::DType::f32, {1}, v}};
    CHECK_ERROR(foe::IoError, foe::save_safetensors(target, tensors), "model.safetensors", "cannot create");
    CHECK_FALSE(fs::exists(dir.path()));
}

TEST_CASE("safetensors: save replaces an existing file and leaves no temporary file")
{
    const TempPath dir("_dir");
    fs::create_directories(dir.path());
    const fs::path target = dir.path() / "model.safetensors";
    const std::vector<float> a{1.0f}, b{2.0f, 3.0f};
    foe::save_safetensors(target, std::vector<foe::TensorToWrite>{{"w", foe::DType::f32, {1}, a}});
    foe::save_safetensors(target, std::vector<foe::TensorToWrite>{{"w", foe::DType::f32, {2}, b}});
    CHECK(foe::SafetensorsFile::open(target).read_float("w").values() == b);
    CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);
}

TEST_CASE("safetensors: every truncation of a valid file is rejected cleanly")
{
    const std::vector<float> v = iota_values(6);
    const std::vector<foe::TensorToWrite> tensors{{"a", foe::DType::f32, {2, 3}, v}, {"b", foe::DType::bf16, {6}, v}};
    const std::vector<std::byte> bytes = foe::serialize_safetensors(tensors, {{"k", "v"}});
    for (std::size_t n = 0; n < bytes.size(); ++n) {
        INFO("truncated to ", n, " bytes");
        std::vector<std::byte> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
        CHECK_THROWS_AS((void)foe::SafetensorsFile::from_bytes(std::move(cut), "cut.safetensors"), foe::FormatError);
    }
}

TEST_CASE("safetensors: random corruption of a valid file is read or rejected, never crashes")
{
    const std::vector<float> v = iota_values(6, -1.0f, 0.75f);
    const std::vector<foe::TensorToWrite> tensors{{"a", foe::DType::f32, {2, 3}, v},
                                                  {"b", foe::DType::bf16, {3, 2}, v},
                                                  {"c", foe::DType::f16, {6}, v}};
    const std::vector<std::byte> good = foe::serialize_safetensors(tensors, {{"format", "pt"}});
    const std::string alphabet = "{}[]\":,-.0123456789eE FBI \xff";
    std::mt19937_64 rng(2024);
    int accepted = 0;
    for (int trial = 0; trial < 20000; ++trial) {
        std::vector<std::byte> bytes = good;
        const int edits = 1 + static_cast<int>(rng() % 3);
        for (int e = 0; e < edits; ++e) {
            // Mostly the header (where the structure is), sometimes the length prefix.
            const std::size_t at = rng() % 8 == 0 ? rng() % 8 : 8 + rng() % (bytes.size() - 8);
            bytes[at] = at < 8 ? static_cast<std::byte>(rng() & 0xff)
                               : static_cast<std::byte>(alphabet[rng() % alphabet.size()]);
        }
        try {
            const auto file = foe::SafetensorsFile::from_bytes(std::move(bytes), "fuzz.safetensors");
            ++accepted;
            for (const auto& info : file.tensors()) {
                const foe::Tensor<float> t = file.read_float(info.name);
                CHECK(t.size() == info.numel());
            }
        } catch (const foe::FormatError&) {
        }
    }
    CHECK(accepted > 0);
}

// --- reading only what is needed: the cost of a file is set by its header and the tensors read --

namespace {

/// Bytes this process has read through read() and similar calls so far (/proc/self/io's rchar),
/// or nullopt where the kernel does not say.
std::optional<std::uint64_t> bytes_read_so_far()
{
    std::ifstream io("/proc/self/io");
    std::string key;
    std::uint64_t value = 0;
    while (io >> key >> value)
        if (key == "rchar:") return value;
    return std::nullopt;
}

/// The peak resident set of this process in bytes (getrusage).
std::uint64_t peak_rss_bytes()
{
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<std::uint64_t>(usage.ru_maxrss) * 1024;  // kilobytes on Linux
}

/// Writes the bytes of a safetensors file, then extends the file to `size` bytes without writing
/// (a sparse file: no disk, no page cache). False where the file system cannot hold that size.
bool write_sparse(const fs::path& path, const std::vector<std::byte>& head, std::uint64_t size)
{
    {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    }
    std::error_code ec;
    fs::resize_file(path, size, ec);
    return !ec;
}

/// What a read of f costs: the bytes read from files and the growth of the peak resident set.
struct Cost {
    std::optional<std::uint64_t> bytes_read;
    std::uint64_t rss_growth = 0;
};
template <class F>
Cost cost_of(F&& f)
{
    const auto read_before = bytes_read_so_far();
    const std::uint64_t rss_before = peak_rss_bytes();
    f();
    const auto read_after = bytes_read_so_far();
    Cost c;
    if (read_before && read_after) c.bytes_read = *read_after - *read_before;
    c.rss_growth = peak_rss_bytes() - rss_before;
    return c;
}

constexpr std::uint64_t six_gib = std::uint64_t{6} << 30;

}  // namespace

TEST_CASE("safetensors: open of a 6 GiB file with a bad header reads the header only")
{
    // Before, the whole file was read first: 6 GB of memory and 42 s for "invalid JSON at byte 0".
    const TempPath tmp(".safetensors");
    if (!write_sparse(tmp.path(), raw_safetensors("xx", 0), six_gib)) {
        MESSAGE("skipped: the temporary directory's file system holds no sparse 6 GiB file");
        return;
    }
    const Cost c = cost_of([&] {
        CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), tmp.path().string(),
                    "invalid JSON at byte 0");
    });
    CHECK(c.rss_growth < (std::uint64_t{64} << 20));
    if (c.bytes_read) CHECK(*c.bytes_read < (std::uint64_t{1} << 20));
}

TEST_CASE("safetensors: open reads no tensor; read_float reads only the tensor asked for")
{
    // A valid file whose second tensor is 6 GiB of sparse zeros: only its header and the
    // small tensor are ever read.
    const std::vector<float> small{1.0f, 2.0f, 3.0f, 4.0f};
    const std::uint64_t big_bytes = six_gib;
    const std::string header = R"({"small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, )"
                               R"("big": {"dtype": "F32", "shape": [)" +
                               std::to_string(big_bytes / 4) + R"(], "data_offsets": [16, )" +
                               std::to_string(16 + big_bytes) + "]}}";
    std::vector<std::byte> head = raw_safetensors(header, 0);
    const auto values = std::as_bytes(std::span(small));
    head.insert(head.end(), values.begin(), values.end());
    const TempPath tmp(".safetensors");
    if (!write_sparse(tmp.path(), head, head.size() + big_bytes)) {
        MESSAGE("skipped: the temporary directory's file system holds no sparse 6 GiB file");
        return;
    }
    std::optional<foe::SafetensorsFile> file;
    const Cost open_cost = cost_of([&] { file.emplace(foe::SafetensorsFile::open(tmp.path())); });
    REQUIRE(file->tensors().size() == 2);
    CHECK(file->at("big").byte_size() == static_cast<index_t>(big_bytes));
    const Cost read_cost = cost_of([&] { CHECK(file->read_float("small", {4}).values() == small); });
    CHECK(open_cost.rss_growth + read_cost.rss_growth < (std::uint64_t{64} << 20));
    if (open_cost.bytes_read) CHECK(*open_cost.bytes_read < (std::uint64_t{1} << 20));
    if (read_cost.bytes_read) CHECK(*read_cost.bytes_read < (std::uint64_t{1} << 20));
}

TEST_CASE("safetensors: open refuses a header length past the end of the file or above the cap, reading nothing")
{
    const TempPath tmp(".safetensors");
    const auto write = [&](const std::vector<std::byte>& bytes) {
        std::ofstream out(tmp.path(), std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    };
    write(raw_safetensors("{}", 0, 3000));
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), tmp.path().string(), "header length 3000",
                "past the end of the file", "only 2 bytes follow");
    write(raw_safetensors("{}", 0, 100'000'001));
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), tmp.path().string(),
                "header length 100000001", "limit of 100000000 bytes");
    write(raw_safetensors("{}", 0, std::numeric_limits<std::uint64_t>::max()));
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), "header length 18446744073709551615");
    write(to_bytes("abc"));
    CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), "file is 3 bytes");
}

TEST_CASE("safetensors: a huge header of small JSON values costs a small multiple of its size")
{
    // 32 MB of "0," under one key: as a JSON tree that was 40 bytes per 2 of text (over 1 GB at
    // the peak); walked, it is refused holding little more than the header text.
    constexpr std::size_t zeros = 16'000'000;
    std::string header = R"({"a": [)";
    header.reserve(header.size() + 2 * zeros + 2);
    for (std::size_t i = 0; i < zeros; ++i) header += "0,";
    header += "0]}";
    const TempPath tmp(".safetensors");
    {
        const auto bytes = raw_safetensors(header, 0);
        std::ofstream out(tmp.path(), std::ios::binary);
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    }
    const std::size_t header_bytes = header.size();
    header = std::string();  // only the file holds it now
    const Cost c = cost_of([&] {
        CHECK_ERROR(foe::FormatError, foe::SafetensorsFile::open(tmp.path()), "tensor \"a\"",
                    "entry must be an object", "[0,0,0,");
    });
    CHECK(c.rss_growth < 3 * header_bytes);

    // The same zeros as the extents of a valid tensor's shape: kept as 8-byte extents, read twice
    // (check, then a vector of the right size), never as a tree.
    std::string shape_header = R"({"a": {"dtype": "F32", "data_offsets": [0, 0], "shape": [)";
    for (std::size_t i = 0; i < zeros / 4; ++i) shape_header += "0,";
    shape_header += "0]}}";
    const auto file = foe::SafetensorsFile::from_bytes(raw_safetensors(shape_header, 0), "zeros.safetensors");
    CHECK(file.at("a").shape.size() == zeros / 4 + 1);
    CHECK(file.at("a").byte_size() == 0);
}

TEST_CASE("safetensors: __metadata__ holds at most 65536 entries")
{
    std::string header = R"({"__metadata__": {)";
    for (std::size_t i = 0; i <= foe::safetensors_max_metadata_entries; ++i)
        header += (i ? ",\"" : "\"") + std::to_string(i) + "\": \"\"";
    header += "}}";
    CHECK_ERROR(foe::FormatError, load_raw(header, 0), "model.safetensors", "__metadata__ holds more than 65536 entries");
    CHECK_ERROR(foe::FormatError, load_raw(R"({"__metadata__": {"k": "a", "k": "b"}})", 0),
                "model.safetensors (header)", "duplicate object key \"k\"");
    CHECK_ERROR(foe::FormatError, load_raw(R"({"__metadata__": {}, "__metadata__": {}})", 0),
                "duplicate object key \"__metadata__\"");
}

TEST_CASE("safetensors: a field given twice in a tensor entry is a duplicate key")
{
    CHECK_ERROR(foe::FormatError,
                load_raw(R"({"w": {"dtype": "F32", "shape": [1], "dtype": "F16", "data_offsets": [0, 4]}})", 4),
                "model.safetensors (header)", "invalid JSON at byte 37", "duplicate object key \"dtype\"");
}

// =============================================================================================
// config.json
// =============================================================================================

TEST_CASE("config.json: every named config round-trips")
{
    for (const std::string& name : foe::named_config_names()) {
        INFO(name);
        const foe::ModelConfig c = foe::named_config(name);
        const std::string text = foe::to_config_json(c);
        check_same_config(foe::parse_config_json(text, name + ".json"), c);
    }
}

TEST_CASE("config.json: save and load through a file")
{
    const TempPath dir("_model");
    fs::create_directories(dir.path());
    const fs::path path = dir.path() / "config.json";
    foe::ModelConfig c = foe::named_config("foe-small");
    c.scoring_func = foe::ScoreFunction::sigmoid;
    c.norm_topk_prob = true;
    c.tie_word_embeddings = true;
    c.rope_theta = 1234.5;
    c.rms_norm_eps = 1e-6;
    foe::save_config_json(path, c);
    check_same_config(foe::load_config_json(path), c);
}

TEST_CASE("config.json: to_config_json writes the keys Hugging Face tools need")
{
    const json::Value foe_json = json::parse(foe::to_config_json(foe::named_config("foe-tiny")), "config.json");
    CHECK(json::dump(*foe_json.find("architectures")) == R"(["FoeForCausalLM"])");
    CHECK(foe_json.find("model_type")->as_string() == "foe");
    CHECK(foe_json.find("hidden_act")->as_string() == "silu");
    CHECK(foe_json.find("torch_dtype")->as_string() == "float32");
    CHECK(foe_json.find("qk_norm")->as_string() == "per_head");
    CHECK(foe_json.find("num_expert_groups")->as_int() == 4);
    CHECK(foe_json.find("rope_theta")->kind() == json::Kind::floating);  // 500000.0, as Python writes it

    const std::string olmoe_text = foe::to_config_json(foe::named_config("moe-tiny"));
    const json::Value olmoe = json::parse(olmoe_text, "config.json");
    CHECK(json::dump(*olmoe.find("architectures")) == R"(["OlmoeForCausalLM"])");
    CHECK(olmoe.find("model_type")->as_string() == "olmoe");
    CHECK(olmoe.find("num_expert_groups") == nullptr);  // not an OLMoE key
    CHECK(olmoe_text.back() == '\n');
    CHECK(olmoe_text.find("\n  \"hidden_size\": 64,\n") != std::string::npos);
}

TEST_CASE("config.json: reads Hugging Face's OLMoE-1B-7B config")
{
    const foe::ModelConfig c = foe::parse_config_json(olmoe_1b_7b_config, "OLMoE-1B-7B/config.json");
    CHECK(c.architecture == foe::Architecture::olmoe);
    CHECK(c.hidden_size == 2048);
    CHECK(c.intermediate_size == 1024);
    CHECK(c.num_attention_heads == 16);
    CHECK(c.num_key_value_heads == 16);
    CHECK(c.head_dim == 128);  // hidden_size / num_attention_heads
    CHECK(c.num_hidden_layers == 16);
    CHECK(c.num_experts == 64);
    CHECK(c.num_experts_per_tok == 8);
    CHECK(c.vocab_size == 50304);
    CHECK(c.num_expert_groups == 1);
    CHECK(c.groups() == 1);
    CHECK(c.max_position_embeddings == 4096);
    CHECK(c.rope_theta == 10000.0);
    CHECK(c.rms_norm_eps == 1e-5);
    CHECK_FALSE(c.norm_topk_prob);
    CHECK_FALSE(c.tie_word_embeddings);
    CHECK(c.qk_norm == foe::QkNorm::full_width);
    CHECK(c.scoring_func == foe::ScoreFunction::softmax);
    CHECK(c.eos_token_ids == std::vector<std::int32_t>{50279});
}

TEST_CASE("config.json: eos_token_id is one id, a list or null; ids outside the vocabulary are refused")
{
    using ids = std::vector<std::int32_t>;
    CHECK(foe::parse_config_json(tiny_config_with("eos_token_id", 5), "config.json").eos_token_ids == ids{5});
    CHECK(foe::parse_config_json(tiny_config_with("eos_token_id", json::Array{2, 3}), "config.json").eos_token_ids ==
          ids{2, 3});
    CHECK(foe::parse_config_json(tiny_config_with("eos_token_id", nullptr), "config.json").eos_token_ids.empty());
    CHECK(foe::parse_config_json(tiny_config_without("eos_token_id"), "config.json").eos_token_ids.empty());
    CHECK_THROWS_WITH_AS((void)foe::parse_config_json(tiny_config_with("eos_token_id", 97), "config.json"),
                         doctest::Contains("eos_token_id 97 is outside the vocabulary [0, 97)"), foe::FormatError);
    CHECK_THROWS_WITH_AS((void)foe::parse_config_json(tiny_config_with("eos_token_id", json::Array{1, -1}), "config.json"),
                         doctest::Contains("eos_token_id -1"), foe::FormatError);
    CHECK_THROWS_AS((void)foe::parse_config_json(tiny_config_with("eos_token_id", "2"), "config.json"), foe::FormatError);
    // Written back as it was read.
    foe::ModelConfig c = foe::named_config("moe-tiny");
    for (const ids& e : {ids{}, ids{7}, ids{7, 9}}) {
        c.eos_token_ids = e;
        CHECK(foe::parse_config_json(foe::to_config_json(c), "config.json").eos_token_ids == e);
    }
}

TEST_CASE("config.json: defaults of the optional keys")
{
    const foe::ModelConfig c = foe::parse_config_json(minimal_foe_config, "config.json");
    CHECK(c.architecture == foe::Architecture::foe);
    CHECK(c.num_key_value_heads == 8);  // = num_attention_heads
    CHECK(c.head_dim == 8);             // = hidden_size / num_attention_heads
    CHECK(c.num_expert_groups == 8);    // = num_key_value_heads
    CHECK(c.max_position_embeddings == 4096);
    CHECK(c.rope_theta == 10000.0);
    CHECK(c.rms_norm_eps == 1e-5);
    CHECK_FALSE(c.norm_topk_prob);
    CHECK_FALSE(c.tie_word_embeddings);
    CHECK(c.qk_norm == foe::QkNorm::none);
    CHECK(c.scoring_func == foe::ScoreFunction::softmax);

    json::Value with_kv = json::parse(minimal_foe_config, "config.json");
    with_kv.set("num_key_value_heads", 4);
    const foe::ModelConfig g = foe::parse_config_json(json::dump(with_kv), "config.json");
    CHECK(g.num_key_value_heads == 4);
    CHECK(g.num_expert_groups == 4);  // follows num_key_value_heads
}

TEST_CASE("config.json: null means the default")
{
    json::Value v = json::parse(minimal_foe_config, "config.json");
    v.set("head_dim", nullptr).set("num_key_value_heads", nullptr).set("rope_theta", nullptr).set("qk_norm", nullptr);
    const foe::ModelConfig c = foe::parse_config_json(json::dump(v), "config.json");
    CHECK(c.head_dim == 8);
    CHECK(c.num_key_value_heads == 8);
    CHECK(c.rope_theta == 10000.0);
    CHECK(c.qk_norm == foe::QkNorm::none);
}

TEST_CASE("config.json: unknown keys are ignored")
{
    const std::string text = tiny_config_with("some_future_key", json::Value(json::Object{{"x", json::Value(1)}}));
    check_same_config(foe::parse_config_json(text, "config.json"), foe::named_config("foe-tiny"));
}

TEST_CASE("config.json: FoE options qk_norm and scoring_func")
{
    json::Value v = json::parse(minimal_foe_config, "config.json");
    v.set("qk_norm", "per_head").set("scoring_func", "sigmoid").set("num_expert_groups", 2);
    const foe::ModelConfig c = foe::parse_config_json(json::dump(v), "config.json");
    CHECK(c.qk_norm == foe::QkNorm::per_head);
    CHECK(c.scoring_func == foe::ScoreFunction::sigmoid);
    CHECK(c.num_expert_groups == 2);
    v.set("qk_norm", "full_width").set("num_expert_groups", 1);
    CHECK(foe::parse_config_json(json::dump(v), "config.json").qk_norm == foe::QkNorm::full_width);
}

TEST_CASE("config.json: rejects malformed JSON")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(R"({"hidden_size": 64,})", "bad/config.json"),
                "bad/config.json", "invalid JSON at byte 19");
}

TEST_CASE("config.json: rejects a top level that is not an object")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json("[]", "config.json"), "config.json",
                "top level must be a JSON object", "an array");
}

TEST_CASE("config.json: rejects a missing required key")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_without("num_experts"), "tiny/config.json"),
                "tiny/config.json", "missing required key \"num_experts\"");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("vocab_size", nullptr), "config.json"),
                "missing required key \"vocab_size\"");
}

TEST_CASE("config.json: rejects a string where an integer is expected")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("hidden_size", "64"), "config.json"),
                "config.json", "hidden_size must be an integer, got \"64\"");
}

TEST_CASE("config.json: rejects a fractional number where an integer is expected")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("num_experts", 1.5), "config.json"),
                "config.json", "num_experts must be an integer, got 1.5");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("head_dim", 16.0), "config.json"),
                "head_dim must be an integer, got 16.0");
}

TEST_CASE("config.json: rejects a wrong type for a number, a flag or an option name")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("rope_theta", "1e4"), "config.json"),
                "config.json", "rope_theta must be a number, got \"1e4\"");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("norm_topk_prob", 1), "config.json"),
                "norm_topk_prob must be true or false, got 1");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("qk_norm", true), "config.json"),
                "qk_norm must be a string, got true");
}

TEST_CASE("config.json: negative sizes are left to validate()")
{
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(tiny_config_with("intermediate_size", -32), "config.json"),
                "config.json: intermediate_size (-32) must be positive");
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(tiny_config_with("num_attention_heads", 0), "config.json"),
                "num_attention_heads (0) must be positive");
}

TEST_CASE("config.json: reads transformers 5's rope_parameters")
{
    // The bug this guards against: the base under rope_parameters was not read, and foe silently
    // used 10000 for a model trained with 500000.
    const foe::ModelConfig c = foe::parse_config_json(olmoe_transformers5_config, "hf5/config.json");
    CHECK(c.rope_theta == 500000.0);
    CHECK(c.architecture == foe::Architecture::olmoe);
    CHECK(c.num_key_value_heads == 2);
    CHECK(c.head_dim == 16);
    CHECK(c.num_experts == 8);
    CHECK(c.vocab_size == 300);
    CHECK(c.max_position_embeddings == 64);

    // rope_type may be missing (default), and the base too (transformers' default_theta).
    json::Value only_theta(json::Object{});
    only_theta.set("rope_theta", 250000);
    CHECK(foe::parse_config_json(transformers5_config_with("rope_parameters", only_theta), "config.json").rope_theta ==
          250000.0);
    CHECK(foe::parse_config_json(transformers5_config_with("rope_parameters", rope_dict("rope_type", "default")),
                                 "config.json")
              .rope_theta == 10000.0);
    CHECK(foe::parse_config_json(transformers5_config_with("rope_parameters", nullptr), "config.json").rope_theta ==
          10000.0);
    // transformers 4's older "type" for "rope_type".
    CHECK(foe::parse_config_json(transformers5_config_with("rope_parameters",
                                                           rope_dict("type", "default", {{"rope_theta", 3.0}})),
                                 "config.json")
              .rope_theta == 3.0);
}

TEST_CASE("config.json: reads transformers 4's rope_theta and rope_scaling")
{
    json::Value v = json::parse(olmoe_transformers5_config, "config.json");
    std::erase_if(v.as_object(), [](const auto& member) { return member.first == "rope_parameters"; });
    v.set("rope_theta", 500000.0).set("rope_scaling", nullptr);
    CHECK(foe::parse_config_json(json::dump(v), "hf4/config.json").rope_theta == 500000.0);
    // A rope_scaling dict is read as transformers 5 reads it: as rope_parameters.
    v.set("rope_scaling", rope_dict("rope_type", "default", {{"rope_theta", 500000.0}}));
    CHECK(foe::parse_config_json(json::dump(v), "hf4/config.json").rope_theta == 500000.0);
}

TEST_CASE("config.json: both RoPE spellings must agree")
{
    json::Value v = json::parse(olmoe_transformers5_config, "config.json");
    v.set("rope_theta", 500000.0).set("rope_scaling", nullptr);
    CHECK(foe::parse_config_json(json::dump(v), "config.json").rope_theta == 500000.0);
    v.set("rope_theta", 500000);  // an integer literal is the same number
    CHECK(foe::parse_config_json(json::dump(v), "config.json").rope_theta == 500000.0);

    v.set("rope_theta", 10000.0);
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(json::dump(v), "both/config.json"), "both/config.json",
                "rope_theta 10000.0 and rope_parameters.rope_theta 5e+05 disagree");

    v.set("rope_theta", nullptr).set("rope_scaling", rope_dict("type", "default", {{"rope_theta", 1000.0}}));
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(json::dump(v), "config.json"),
                "rope_scaling.rope_theta 1000.0 and rope_parameters.rope_theta 5e+05 disagree");
}

TEST_CASE("config.json: refuses every RoPE type but \"default\", under either spelling, naming it")
{
    for (const char* type : {"linear", "dynamic", "yarn", "longrope", "llama3"}) {
        INFO(type);
        const auto scaled = [&](std::string_view type_key) {
            return rope_dict(type_key, type, {{"factor", 4.0}, {"rope_theta", 500000.0}});
        };
        // transformers 5
        CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("rope_parameters",
                                                                                       scaled("rope_type")),
                                                             "config.json"),
                    "config.json: rope_parameters.rope_type \"" + std::string(type) + "\" is not supported",
                    "only RoPE type \"default\"");
        // transformers 4, with the newer and the older key of the type
        for (const char* type_key : {"rope_type", "type"}) {
            json::Value v = json::parse(olmoe_transformers5_config, "config.json");
            std::erase_if(v.as_object(), [](const auto& member) { return member.first == "rope_parameters"; });
            v.set("rope_theta", 500000.0).set("rope_scaling", scaled(type_key));
            CHECK_ERROR(foe::FormatError, foe::parse_config_json(json::dump(v), "config.json"),
                        "rope_scaling." + std::string(type_key) + " \"" + std::string(type) + "\" is not supported",
                        "only RoPE type \"default\"");
        }
    }
    // The foe-written (transformers 4) layout too.
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(tiny_config_with("rope_scaling", rope_dict("type", "linear", {{"factor", 2.0}})),
                                       "config.json"),
                "config.json", "rope_scaling.type \"linear\" is not supported");
}

TEST_CASE("config.json: refuses RoPE parameters that RoPE type \"default\" does not have")
{
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(transformers5_config_with("rope_parameters",
                                                                 rope_dict("rope_type", "default", {{"factor", 4.0}})),
                                       "config.json"),
                "rope_parameters.factor 4.0 is not supported", "only rope_type and rope_theta");
    // Nested per layer type (a layout transformers 5 has for other models) is not OLMoE's.
    const json::Value nested(json::Object{{"full_attention", rope_dict("rope_type", "default")}});
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("rope_parameters", nested), "config.json"),
                "rope_parameters.full_attention {\"rope_type\":\"default\"} is not supported");
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(transformers5_config_with("rope_parameters", "default"), "config.json"),
                "rope_parameters must be an object or null, got \"default\"");
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(transformers5_config_with("rope_parameters", rope_dict("rope_type", "default",
                                                                                              {{"rope_theta", "1e4"}})),
                                       "config.json"),
                "rope_parameters.rope_theta must be a number, got \"1e4\"");
}

TEST_CASE("config.json: refuses a partial rotary factor other than 1")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("partial_rotary_factor", 0.5),
                                                         "config.json"),
                "partial_rotary_factor 0.5 is not supported", "rotates every dimension");
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(transformers5_config_with(
                                           "rope_parameters",
                                           rope_dict("rope_type", "default", {{"partial_rotary_factor", 0.25}})),
                                       "config.json"),
                "rope_parameters.partial_rotary_factor 0.25 is not supported");
    CHECK(foe::parse_config_json(transformers5_config_with("partial_rotary_factor", 1.0), "config.json").rope_theta ==
          500000.0);
}

TEST_CASE("config.json: refuses a model_type of another model")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("model_type", "qwen2_moe"),
                                                         "config.json"),
                "model_type \"qwen2_moe\" is not supported", "OlmoeForCausalLM has model_type \"olmoe\"");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("model_type", "olmoe"), "config.json"),
                "model_type \"olmoe\" is not supported", "FoeForCausalLM has model_type \"foe\"");
    CHECK_NOTHROW((void)foe::parse_config_json(transformers5_config_with("model_type", std::nullopt), "config.json"));
}

TEST_CASE("config.json: dtype and torch_dtype: float types accepted, others refused, spellings must agree")
{
    for (const char* ok : {"float32", "bfloat16", "float16"}) {
        INFO(ok);
        CHECK_NOTHROW((void)foe::parse_config_json(transformers5_config_with("dtype", ok), "config.json"));
        json::Value v = json::parse(transformers5_config_with("dtype", std::nullopt), "config.json");
        v.set("torch_dtype", ok);
        CHECK_NOTHROW((void)foe::parse_config_json(json::dump(v), "config.json"));
        v.set("dtype", ok);  // both spellings, the same value
        CHECK_NOTHROW((void)foe::parse_config_json(json::dump(v), "config.json"));
    }
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("dtype", "float8_e4m3fn"),
                                                         "config.json"),
                "dtype \"float8_e4m3fn\" is not supported", "\"float32\", \"bfloat16\", \"float16\"");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("torch_dtype", "float64"),
                                                         "config.json"),
                "torch_dtype \"float64\" is not supported");
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(transformers5_config_with("torch_dtype", "bfloat16"),
                                                         "config.json"),
                "dtype \"float32\" and torch_dtype \"bfloat16\" disagree");
}

TEST_CASE("config.json: num_local_experts is another spelling of num_experts")
{
    json::Value v = json::parse(olmoe_transformers5_config, "config.json");
    std::erase_if(v.as_object(), [](const auto& member) { return member.first == "num_experts"; });
    v.set("num_local_experts", 8);
    CHECK(foe::parse_config_json(json::dump(v), "config.json").num_experts == 8);
    v.set("num_experts", 16);
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(json::dump(v), "config.json"),
                "num_experts 16 and num_local_experts 8 disagree");
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("num_experts", std::nullopt),
                                                         "config.json"),
                "missing required key \"num_experts\" (or \"num_local_experts\")");
}

TEST_CASE("config.json: refuses sliding_window and quantization_config")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("sliding_window", 4096),
                                                         "config.json"),
                "sliding_window 4096 is not supported", "every earlier position");
    CHECK_NOTHROW((void)foe::parse_config_json(transformers5_config_with("sliding_window", nullptr), "config.json"));
    const json::Value quant(json::Object{{"quant_method", json::Value("fp8")}});
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(transformers5_config_with("quantization_config", quant),
                                                         "config.json"),
                "quantization_config {\"quant_method\":\"fp8\"} is not supported", "unquantized");
}

TEST_CASE("config.json: keys that cannot change an inference result are accepted with any value")
{
    // Training-only, generation-loop or bookkeeping keys: foe computes the same logits whatever
    // they say (README "config.json keys").
    const std::pair<std::string_view, json::Value> keys[] = {
        {"attention_dropout", 0.1},      {"router_aux_loss_coef", 0.5}, {"output_router_logits", true},
        {"initializer_range", 1.0},      {"use_cache", false},          {"pad_token_id", 0},
        {"bos_token_id", 5},             {"transformers_version", "6.0.0"},
    };
    for (const auto& key_value : keys) {  // not a structured binding: INFO captures it in a lambda
        INFO(key_value.first);
        CHECK(foe::parse_config_json(transformers5_config_with(key_value.first, key_value.second), "config.json")
                  .rope_theta == 500000.0);
    }
}

TEST_CASE("config.json: rejects clip_qkv")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("clip_qkv", 8.0), "config.json"),
                "config.json", "clip_qkv 8.0 is not supported");
}

TEST_CASE("config.json: rejects attention_bias true")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("attention_bias", true), "config.json"),
                "config.json", "attention_bias true is not supported");
}

TEST_CASE("config.json: rejects mlp_bias true")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("mlp_bias", true), "config.json"),
                "config.json", "mlp_bias true is not supported");
    CHECK_NOTHROW((void)foe::parse_config_json(tiny_config_with("mlp_bias", false), "config.json"));
}

TEST_CASE("config.json: rejects hidden_act other than silu")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("hidden_act", "gelu"), "config.json"),
                "config.json", "hidden_act \"gelu\" is not supported", "silu");
}

TEST_CASE("config.json: rejects a missing architectures")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_without("architectures"), "config.json"),
                "config.json", "missing required key \"architectures\"");
}

TEST_CASE("config.json: rejects an unknown architecture")
{
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(tiny_config_with("architectures", json::Array{"LlamaForCausalLM"}),
                                       "config.json"),
                "config.json", "architectures must be [\"OlmoeForCausalLM\"] or [\"FoeForCausalLM\"]",
                "got [\"LlamaForCausalLM\"]");
}

TEST_CASE("config.json: rejects architectures with more than one entry")
{
    const json::Array two{"FoeForCausalLM", "OlmoeForCausalLM"};
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("architectures", two), "config.json"),
                "architectures must be", "got [\"FoeForCausalLM\",\"OlmoeForCausalLM\"]");
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(tiny_config_with("architectures", json::Array{}), "config.json"),
                "architectures must be", "got []");
}

TEST_CASE("config.json: rejects architectures that is not an array")
{
    CHECK_ERROR(foe::FormatError,
                foe::parse_config_json(tiny_config_with("architectures", "FoeForCausalLM"), "config.json"),
                "architectures must be", "got \"FoeForCausalLM\"");
}

TEST_CASE("config.json: head_dim must be given when hidden_size is not a multiple of the heads")
{
    json::Value v = json::parse(minimal_foe_config, "config.json");
    v.set("hidden_size", 60);
    CHECK_ERROR(foe::ConfigError, foe::parse_config_json(json::dump(v), "odd/config.json"), "odd/config.json",
                "hidden_size (60) is not a multiple of num_attention_heads (8)", "head_dim must be given");
    v.set("head_dim", 8);
    CHECK(foe::parse_config_json(json::dump(v), "odd/config.json").head_dim == 8);
}

TEST_CASE("config.json: rejects an unknown qk_norm")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("qk_norm", "layer"), "config.json"),
                "config.json", "qk_norm \"layer\" is not one of \"none\", \"per_head\", \"full_width\"");
}

TEST_CASE("config.json: rejects an unknown scoring_func")
{
    CHECK_ERROR(foe::FormatError, foe::parse_config_json(tiny_config_with("scoring_func", "relu"), "config.json"),
                "config.json", "scoring_func \"relu\" is not one of \"softmax\", \"sigmoid\"");
}

TEST_CASE("config.json: rejects expert groups for OLMoE")
{
    CHECK_ERROR(foe::ConfigError,
                foe::parse_config_json(tiny_config_with("num_expert_groups", 4, "moe-tiny"), "config.json"),
                "config.json", "num_expert_groups (4) must be 1 for OlmoeForCausalLM");
    CHECK_ERROR(foe::ConfigError,
                foe::parse_config_json(tiny_config_with("qk_norm", "none", "moe-tiny"), "config.json"),
                "config.json", "qk_norm (none) is only configurable for FoeForCausalLM");
}

TEST_CASE("config.json: validate() errors propagate as ConfigError naming the file")
{
    // foe-tiny has H = 4 groups; top-k 6 is not a multiple of 4.
    CHECK_ERROR(foe::ConfigError,
                foe::parse_config_json(tiny_config_with("num_experts_per_tok", 6), "tiny/config.json"),
                "tiny/config.json: num_experts_per_tok (6) must be a multiple of num_expert_groups (4)");
}

TEST_CASE("config.json: load of a missing file is an IoError")
{
    const TempPath tmp("_config.json");
    CHECK_ERROR(foe::IoError, (void)foe::load_config_json(tmp.path()), tmp.path().string(), "cannot open");
}

TEST_CASE("config.json: load reports malformed content with the path")
{
    const TempPath tmp("_config.json");
    {
        std::ofstream out(tmp.path(), std::ios::binary);
        out << R"({"architectures": ["FoeForCausalLM"], "hidden_size": "big"})";
    }
    CHECK_ERROR(foe::FormatError, (void)foe::load_config_json(tmp.path()), tmp.path().string(),
                "hidden_size must be an integer, got \"big\"");
}

TEST_CASE("config.json: save refuses an invalid config and writes nothing")
{
    const TempPath tmp("_config.json");
    foe::ModelConfig c = foe::named_config("foe-tiny");
    c.num_experts_per_tok = 6;
    CHECK_ERROR(foe::ConfigError, foe::save_config_json(tmp.path(), c), "num_experts_per_tok (6)");
    CHECK_FALSE(fs::exists(tmp.path()));
}

// =============================================================================================
// Model directories: sharded weights, reading only what a rank holds
// =============================================================================================

namespace {

/// A model directory with config.json, for tests that write its weights themselves.
struct ModelDir {
    TempPath dir{"_model"};
    foe::ModelConfig config = foe::named_config("foe-tiny");

    ModelDir()
    {
        fs::create_directories(dir.path());
        foe::save_config_json(dir.path() / "config.json", config);
    }
    [[nodiscard]] fs::path path(std::string_view file) const { return dir.path() / file; }
    void write_index(std::string_view text) const
    {
        std::ofstream(path("model.safetensors.index.json"), std::ios::binary | std::ios::trunc) << text;
    }
};

/// The tensors of weights that pick accepts, as TensorToWrite (views into weights).
template <class Pick>
std::vector<foe::TensorToWrite> tensors_of(const foe::ModelWeights& weights, Pick&& pick)
{
    std::vector<foe::TensorToWrite> out;
    for (const auto& spec : foe::expected_tensors(weights.config))
        if (pick(spec.name)) out.push_back({spec.name, foe::DType::f32, spec.shape, weights.at(spec.name).floats()});
    return out;
}

bool in_layer_0(std::string_view name)
{
    return name.find("layers.") == std::string_view::npos || name.find("layers.0.") != std::string_view::npos;
}

/// Every byte of s is printable: no ASCII or C1 control reaches a terminal through a message.
bool printable(std::string_view s)
{
    for (std::size_t i = 0; i < s.size(); ++i) {
        const auto u = static_cast<unsigned char>(s[i]);
        if (u < 0x20 || u == 0x7f) return false;
        if (u == 0xc2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
            static_cast<unsigned char>(s[i + 1]) <= 0x9f)
            return false;
    }
    return true;
}

/// The message of the foe::Error f throws ("no exception" if none).
template <class F>
std::string message_of(F&& f)
{
    try {
        f();
    } catch (const foe::Error& e) {
        return e.what();
    }
    return "no exception";
}

}  // namespace

TEST_CASE("model directory: a rank reads only the tensors it holds; shards it does not need are not opened")
{
    const ModelDir m;
    const auto weights = foe::random_weights(m.config, 5);
    // Shard a: what layer 0's rank needs, then a 6 GiB tensor no one needs (sparse zeros). Shard
    // b: the other layers, but not a safetensors file at all, so opening it would fail.
    const auto needed = tensors_of(weights, in_layer_0);
    const std::vector<std::byte> base = foe::serialize_safetensors(needed);
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<std::uint64_t>(base[static_cast<std::size_t>(i)]);
    const std::string_view base_header(reinterpret_cast<const char*>(base.data()) + 8, header_len);
    json::Value header = json::parse(base_header, "base");
    const auto data_size = static_cast<index_t>(base.size() - 8 - header_len);
    header.set("unused.big", json::Object{{"dtype", "F32"},
                                          {"shape", json::Array{static_cast<index_t>(six_gib / 4)}},
                                          {"data_offsets", json::Array{data_size, data_size + static_cast<index_t>(six_gib)}}});
    std::vector<std::byte> head = raw_safetensors(json::dump(header), 0);
    head.insert(head.end(), base.begin() + static_cast<std::ptrdiff_t>(8 + header_len), base.end());
    if (!write_sparse(m.path("a.safetensors"), head, head.size() + six_gib)) {
        MESSAGE("skipped: the temporary directory's file system holds no sparse 6 GiB file");
        return;
    }
    std::ofstream(m.path("b.safetensors")) << "not a safetensors file";
    std::string map;
    for (const auto& spec : foe::expected_tensors(m.config))
        map += (map.empty() ? "\"" : ", \"") + spec.name + "\": \"" + (in_layer_0(spec.name) ? "a" : "b") +
               ".safetensors\"";
    m.write_index(R"({"metadata": {"total_size": 1}, "weight_map": {)" + map + "}}");

    std::optional<foe::ModelWeights> loaded;
    const Cost c = cost_of([&] { loaded.emplace(foe::load_model_dir(m.dir.path(), in_layer_0)); });
    std::uint64_t needed_bytes = 0;
    for (const auto& t : needed) {
        CHECK(loaded->at(t.name).to_float().values() == weights.at(t.name).to_float().values());
        needed_bytes += 4 * t.values.size();
    }
    CHECK(loaded->tensors.size() == needed.size());
    CHECK(c.rss_growth < (std::uint64_t{64} << 20));
    // Only the needed bytes, headers, config and index were read (1 MiB covers the rest).
    if (c.bytes_read) CHECK(*c.bytes_read < needed_bytes + (std::uint64_t{1} << 20));

    // Every rank's share together is the model: the shard b is refused once someone needs it.
    CHECK_ERROR(foe::FormatError, (void)foe::load_model_dir(m.dir.path()), m.path("b.safetensors").string());
}

TEST_CASE("model directory: an empty weight_map is refused naming the index, not model.safetensors")
{
    const ModelDir m;
    m.write_index(R"({"metadata": {}, "weight_map": {}})");
    const std::string message = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
    CHECK(message.find(m.path("model.safetensors.index.json").string() + ": weight_map is empty") != std::string::npos);
    CHECK(message.find("model.safetensors:") == std::string::npos);
    m.write_index(R"({"metadata": {}})");
    CHECK_ERROR(foe::FormatError, (void)foe::load_model_dir(m.dir.path()), "model.safetensors.index.json",
                "\"weight_map\" must be an object");
    m.write_index(R"({"weight_map": {"a": "a.safetensors"}, "weight_map": {"a": "a.safetensors"}})");
    CHECK_ERROR(foe::FormatError, (void)foe::load_model_dir(m.dir.path()), "duplicate object key \"weight_map\"");
    m.write_index(R"({"weight_map": {"model.norm.weight": "a.safetensors", "model.norm.weight": "b.safetensors"}})");
    CHECK_ERROR(foe::FormatError, (void)foe::load_model_dir(m.dir.path()), "duplicate object key \"model.norm.weight\"");
}

TEST_CASE("model directory: a shard name must be a plain file name in the directory")
{
    const ModelDir m;
    const std::string index = m.path("model.safetensors.index.json").string();
    for (const char* bad : {R"("")", R"(".")", R"("..")", R"("../a.safetensors")", R"("sub/a.safetensors")",
                            R"("/etc/passwd")", R"("a\\b.safetensors")", R"("a.safetensors\u0000.txt")"}) {
        CAPTURE(bad);
        m.write_index(std::string(R"({"weight_map": {"model.norm.weight": )") + bad + "}}");
        const std::string message = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
        CHECK(message.find(index + ": weight_map entry \"model.norm.weight\" names ") != std::string::npos);
        CHECK(message.find("not a plain file name in the model directory") != std::string::npos);
        CHECK(printable(message));
    }
    m.write_index(R"({"weight_map": {"model.norm.weight": "a.safetensors\u0000.txt"}})");
    CHECK_ERROR(foe::FormatError, (void)foe::load_model_dir(m.dir.path()), "\"a.safetensors\\u0000.txt\"",
                "NUL character");
    m.write_index(R"({"weight_map": {"model.norm.weight": ")" + std::string(50'000'000, 'f') + "\"}}");
    const std::string long_name = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
    CHECK(long_name.size() < 2048);
    CHECK(long_name.find("(50000000 bytes)") != std::string::npos);
    CHECK(long_name.find("file names are at most 255") != std::string::npos);
}

TEST_CASE("model directory: names from the index reach messages escaped and cut")
{
    const ModelDir m;
    // ESC, BEL, CR and LF in a shard name: a file the directory lacks, named in an IoError.
    m.write_index(R"({"weight_map": {"model.embed_tokens.weight": "\u001b]0;owned\u0007\r\n.safetensors"}})");
    const std::string shard = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
    CHECK(printable(shard));
    CHECK(shard.find("\\u001b]0;owned\\u0007\\r\\n.safetensors: cannot open") != std::string::npos);
    CHECK(shard.find("maps tensor \"model.embed_tokens.weight\" to it") != std::string::npos);

    // The same in a tensor name, and a NUL, which must be shown, not end the message.
    m.write_index(R"({"weight_map": {"x\u001b[2J\u0007\r\ny\u0000z": 5}})");
    const std::string tensor = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
    CHECK(printable(tensor));
    CHECK(tensor.find(R"(weight_map entry "x\u001b[2J\u0007\r\ny\u0000z" must be a file name string, got 5)") !=
          std::string::npos);
    CHECK(tensor.find('\0') == std::string::npos);

    // A 5 MB tensor name (the cut does not depend on the size; the 50 MB case is a shard name's,
    // above): the message stays short and says how long the name was.
    m.write_index(R"({"weight_map": {")" + std::string(5'000'000, 'n') + R"(": 5}})");
    const std::string long_name = message_of([&] { (void)foe::load_model_dir(m.dir.path()); });
    CHECK(long_name.size() < 2048);
    CHECK(long_name.find("nnn...\" (5000000 bytes)") != std::string::npos);
}

TEST_CASE("safetensors: tensor names reach messages escaped and cut")
{
    const std::string entry = R"(": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}})";
    const std::string controls = message_of([&] { (void)load_raw(R"({"w\u001b[31m\u0007\r\n\u009b\u202e)" + entry, 0); });
    CHECK(printable(controls));
    CHECK(controls.find(R"(tensor "w\u001b[31m\u0007\r\n\u009b\u202e": dtype "I64")") != std::string::npos);

    const std::string nul = message_of([&] { (void)load_raw(R"({"a\u0000b)" + entry, 0); });
    CHECK(nul.find(R"(tensor "a\u0000b")") != std::string::npos);
    CHECK(nul.find('\0') == std::string::npos);

    const std::string long_name = message_of([&] { (void)load_raw("{\"" + std::string(5'000'000, 'n') + entry, 0); });
    CHECK(long_name.size() < 1024);
    CHECK(long_name.find("nnn...\" (5000000 bytes): dtype \"I64\"") != std::string::npos);

    // A dtype string and a metadata key are file content too.
    const std::string dtype = message_of([&] {
        (void)load_raw(R"({"w": {"dtype": "\u001b[31mF32", "shape": [0], "data_offsets": [0, 0]}})", 0);
    });
    CHECK(printable(dtype));
    CHECK(dtype.find(R"(dtype "\u001b[31mF32" is not supported)") != std::string::npos);
    const std::string key = message_of([&] { (void)load_raw(R"({"__metadata__": {"\u0007": 1}})", 0); });
    CHECK(key.find(R"(value of key "\u0007" must be a string)") != std::string::npos);
}

TEST_CASE("safetensors: a path with control characters is escaped in messages")
{
    const TempPath dir("_dir");
    fs::create_directories(dir.path());
    const fs::path path = dir.path() / "a\x1b[2J\r.safetensors";
    const std::string message = message_of([&] { (void)foe::SafetensorsFile::open(path); });
    CHECK(printable(message));
    CHECK(message.find("a\\u001b[2J\\r.safetensors: cannot open") != std::string::npos);
}

TEST_CASE("config.json: keys of the file reach messages escaped and cut")
{
    json::Value c = tiny_config_object();
    c.set("rope_scaling", json::Object{{"\x1b[31mfactor\r\n", 4.0}});
    const std::string controls = message_of([&] { (void)foe::parse_config_json(json::dump(c), "config.json"); });
    CHECK(printable(controls));
    CHECK(controls.find(R"(rope_scaling."\u001b[31mfactor\r\n" 4.0 is not supported)") != std::string::npos);
    c.set("rope_scaling", json::Object{{std::string(5'000'000, 'k'), 4.0}});
    const std::string long_key = message_of([&] { (void)foe::parse_config_json(json::dump(c), "config.json"); });
    CHECK(long_key.size() < 1024);
    c.set("rope_scaling", json::Object{{"factor", 4.0}});
    CHECK(message_of([&] { (void)foe::parse_config_json(json::dump(c), "config.json"); })
              .find("rope_scaling.factor 4.0 is not supported") != std::string::npos);
}

// =============================================================================================
// Writing: only regular files are replaced
// =============================================================================================

TEST_CASE("writes refuse a device node, a FIFO and a directory, leaving them as they were, and write through a symlink")
{
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("foe-write-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    foe::Tensor<float> t({2});
    t.values() = {1.0f, 2.0f};
    const foe::TensorToWrite w{"logits", foe::DType::f32, t.shape(), t.span()};

    // A character device like /dev/null (mknod needs CAP_MKNOD; a FIFO stands in without it).
    const fs::path device = dir / "null";
    const bool have_device = ::mknod(device.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0;
    if (!have_device) MESSAGE("mknod not permitted here: the device-node case is covered by the FIFO");
    const fs::path fifo = dir / "fifo";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const fs::path sub = dir / "sub";
    fs::create_directory(sub);
    const fs::path link_to_device = dir / "link-to-fifo";
    fs::create_symlink(fifo, link_to_device);
    struct Case {
        fs::path path;
        const char* kind;
    };
    std::vector<Case> cases{{fifo, "is a FIFO"}, {sub, "is a directory"}, {link_to_device, "is a FIFO"}};
    if (have_device) cases.push_back({device, "is a character device"});
    for (const auto& c : cases) {
        CAPTURE(c.path.string());
        CHECK_THROWS_WITH_AS(foe::save_safetensors(c.path, std::span(&w, 1)), doctest::Contains(c.kind), foe::IoError);
    }
    CHECK(fs::is_fifo(fs::status(fifo)));
    CHECK(fs::is_directory(sub));
    CHECK(fs::is_symlink(fs::symlink_status(link_to_device)));
    if (have_device) CHECK(fs::is_character_file(fs::status(device)));
    for (const auto& entry : fs::directory_iterator(dir))  // no temporary file left behind
        CHECK_MESSAGE(entry.path().filename().string().find(".tmp-") == std::string::npos, entry.path().string());

    // A symbolic link to a regular file (or to none yet): the file it names is written, the
    // link stays a link.
    const fs::path real = dir / "real.safetensors", link = dir / "link.safetensors";
    fs::create_symlink(real, link);
    foe::save_safetensors(link, std::span(&w, 1));
    CHECK(fs::is_symlink(fs::symlink_status(link)));
    CHECK(fs::is_regular_file(fs::status(real)));
    CHECK(foe::SafetensorsFile::open(real).read_float("logits", {2}).values() == t.values());
    foe::save_safetensors(link, std::span(&w, 1));  // and again, over the existing file
    CHECK(fs::is_symlink(fs::symlink_status(link)));
    fs::remove_all(dir);
}
