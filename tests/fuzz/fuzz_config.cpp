// libFuzzer target: foe::parse_config_json (and the JSON parser under it) on arbitrary text.
//
// The contract under test: any text either parses or throws a foe::Error, and nothing else
// happens. Two round trips check what a successful parse promises: a JSON document dumps to text
// that parses back to an equal value (dump never throws on a parsed value, which is valid UTF-8
// by construction), and a config writes with to_config_json() and reads back equal.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string_view>

#include "foe/io/config_json.hpp"
#include "foe/io/json.hpp"

namespace {

/// A broken promise of the parser: abort so that libFuzzer records the input as a crash.
void check(bool ok)
{
    if (!ok) std::abort();
}

bool same(const foe::ModelConfig& a, const foe::ModelConfig& b)
{
    return a.architecture == b.architecture && a.hidden_size == b.hidden_size &&
           a.intermediate_size == b.intermediate_size && a.num_attention_heads == b.num_attention_heads &&
           a.num_key_value_heads == b.num_key_value_heads && a.head_dim == b.head_dim &&
           a.num_hidden_layers == b.num_hidden_layers && a.num_experts == b.num_experts &&
           a.num_experts_per_tok == b.num_experts_per_tok && a.vocab_size == b.vocab_size &&
           a.num_expert_groups == b.num_expert_groups && a.max_position_embeddings == b.max_position_embeddings &&
           a.rope_theta == b.rope_theta && a.rms_norm_eps == b.rms_norm_eps && a.norm_topk_prob == b.norm_topk_prob &&
           a.tie_word_embeddings == b.tie_word_embeddings && a.qk_norm == b.qk_norm && a.scoring_func == b.scoring_func;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view text(reinterpret_cast<const char*>(data), size);

    std::optional<foe::json::Value> document;
    try {
        document = foe::json::parse(text, "fuzz.json");
    } catch (const foe::Error&) {
        // Rejected with a typed error: the expected outcome for most inputs.
    }
    if (document) {  // outside the try: the round trip must not throw at all
        check(foe::json::parse(foe::json::dump(*document), "dump") == *document);
        check(foe::json::parse(foe::json::dump_pretty(*document), "dump_pretty") == *document);
    }

    foe::ModelConfig config;
    try {
        config = foe::parse_config_json(text, "fuzz/config.json");
    } catch (const foe::Error&) {
        return 0;
    }
    check(same(foe::parse_config_json(foe::to_config_json(config), "again/config.json"), config));
    // validate() promises that the sizes the library derives from a config fit in 64 bits.
    check(config.parameter_count() > 0);
    return 0;
}
