// Writes the seed corpora of the fuzz targets: small real files written by foe, and hostile
// variants that each break one rule the readers enforce (so the fuzzer starts next to every
// check). The committed tests/fuzz/corpus/ was made with
//
//   build-fuzz/tests/fuzz/make_corpus tests/fuzz/corpus
//
// and is regenerated the same way when foe's writers change. Files are named by what they hold.

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "foe/io/config_json.hpp"
#include "foe/io/json.hpp"
#include "foe/io/safetensors.hpp"
#include "foe/model/weights.hpp"

namespace {

namespace fs = std::filesystem;

void write(const fs::path& path, std::string_view bytes)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw foe::IoError("cannot write " + path.string());
}

void write(const fs::path& path, const std::vector<std::byte>& bytes)
{
    write(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

/// A safetensors file as a hostile writer makes it: the length prefix (default: the header's
/// size), the header, then data_bytes bytes.
std::string raw_safetensors(std::string_view header, std::size_t data_bytes, std::uint64_t header_len = UINT64_MAX)
{
    const std::uint64_t n = header_len == UINT64_MAX ? header.size() : header_len;
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
    out += header;
    out.append(data_bytes, '\x3f');
    return out;
}

/// The smallest config with every kind of tensor: two groups, per-head QK norm, sigmoid routing.
foe::ModelConfig micro_config()
{
    foe::ModelConfig c = foe::named_config("foe-tiny");
    c.hidden_size = 8;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 2;
    c.head_dim = 4;
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.num_expert_groups = 2;
    c.intermediate_size = 4;
    c.num_hidden_layers = 1;
    c.vocab_size = 11;
    c.max_position_embeddings = 16;
    c.scoring_func = foe::ScoreFunction::sigmoid;
    c.validate();
    return c;
}

void safetensors_corpus(const fs::path& dir)
{
    fs::create_directories(dir);
    const std::vector<float> six{1.0f, -2.5f, 0.0f, 3.25f, -0.0f, 65504.0f};
    const std::vector<float> one{42.0f};
    const std::vector<float> none;
    {
        const std::vector<foe::TensorToWrite> t{{"a.f32", foe::DType::f32, {2, 3}, six},
                                                {"b.bf16", foe::DType::bf16, {6}, six},
                                                {"c.f16", foe::DType::f16, {3, 1, 2}, six}};
        write(dir / "three_dtypes_with_metadata.safetensors", foe::serialize_safetensors(t, {{"format", "pt"}}));
    }
    {
        const std::vector<foe::TensorToWrite> t{{"scalar", foe::DType::f32, {}, one},
                                                {"empty", foe::DType::bf16, {0, 3}, none}};
        write(dir / "scalar_and_empty.safetensors", foe::serialize_safetensors(t));
    }
    write(dir / "no_tensors.safetensors", foe::serialize_safetensors({}));
    {
        const auto w = foe::random_weights(micro_config(), 1);
        std::vector<foe::TensorToWrite> t;
        for (const auto& spec : foe::expected_tensors(w.config))
            t.push_back({spec.name, foe::DType::bf16, spec.shape, w.at(spec.name).floats()});
        write(dir / "micro_model_bf16.safetensors", foe::serialize_safetensors(t, {{"format", "pt"}}));
    }

    // Hostile: each breaks one rule.
    const std::string ok_entry = R"("x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
    write(dir / "hostile_header_length_2e63.safetensors", raw_safetensors("{" + ok_entry + "}", 8, 1ull << 63));
    write(dir / "hostile_header_past_end.safetensors", raw_safetensors("{" + ok_entry + "}", 8, 4096));
    write(dir / "hostile_truncated_data.safetensors", raw_safetensors("{" + ok_entry + "}", 5));
    write(dir / "hostile_overlap.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12));
    write(dir / "hostile_gap.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F16", "shape": [1], "data_offsets": [2, 4]}})", 4));
    write(dir / "hostile_shape_overflow.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})", 0));
    write(dir / "hostile_shape_mismatch.safetensors",
          raw_safetensors(R"({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}})", 8));
    write(dir / "hostile_dtype_f64.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", 8));
    write(dir / "hostile_duplicate_key.safetensors", raw_safetensors("{" + ok_entry + ", " + ok_entry + "}", 8));
    write(dir / "hostile_deep_nesting.safetensors",
          raw_safetensors(R"({"__metadata__": )" + std::string(200, '[') + std::string(200, ']') + "}", 0));
    write(dir / "hostile_negative_offset.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [0], "data_offsets": [-8, -8]}})", 0));
    // The header reader walks the JSON instead of building a tree: its own paths.
    write(dir / "hostile_duplicate_field.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [2], "dtype": "F16", "data_offsets": [0, 8]}})", 8));
    write(dir / "hostile_duplicate_metadata.safetensors",
          raw_safetensors(R"({"__metadata__": {"k": "a", "k": "b"}, "__metadata__": null})", 0));
    write(dir / "hostile_three_offsets.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}})", 8));
    write(dir / "hostile_nested_extent.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [[2], {"a": 1}], "data_offsets": [0, 8]}})", 8));
    std::string zeros = "0";
    for (int i = 1; i < 1000; ++i) zeros += ",0";
    write(dir / "hostile_zeros_array.safetensors", raw_safetensors(R"({"a": [)" + zeros + "]}", 0));
    write(dir / "rank_1000_zeros.safetensors",
          raw_safetensors(R"({"x": {"dtype": "F32", "shape": [)" + zeros + R"(], "data_offsets": [0, 0]}})", 0));
    write(dir / "hostile_control_names.safetensors",
          raw_safetensors(R"({"\u001b[31m\u0007\r\n\u0000\u009b\u202e": {"dtype": "\u001bF32", "shape": [0],)"
                          R"( "data_offsets": [0, 0]}})", 0));
}

void config_corpus(const fs::path& dir)
{
    fs::create_directories(dir);
    for (const auto& name : foe::named_config_names()) write(dir / (name + ".json"), foe::to_config_json(foe::named_config(name)));
    write(dir / "micro_sigmoid.json", foe::to_config_json(micro_config()));
    // Hugging Face's OLMoE-1B-7B config.json, as published (many keys foe ignores).
    write(dir / "olmoe_1b_7b_hf.json", R"({"architectures": ["OlmoeForCausalLM"], "attention_bias": false,
"attention_dropout": 0.0, "clip_qkv": null, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
"initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe",
"norm_topk_prob": false, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
"num_hidden_layers": 16, "num_key_value_heads": 16, "output_router_logits": false, "pad_token_id": 1,
"rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
"tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
"use_cache": true, "vocab_size": 50304}
)");
    // What transformers 5's save_pretrained writes: the RoPE base under rope_parameters, "dtype".
    write(dir / "olmoe_transformers5.json", R"({"architectures": ["OlmoeForCausalLM"], "attention_bias": false,
"attention_dropout": 0.0, "bos_token_id": null, "clip_qkv": null, "dtype": "float32", "eos_token_id": 2,
"hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 16,
"max_position_embeddings": 64, "model_type": "olmoe", "norm_topk_prob": false, "num_attention_heads": 4,
"num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
"output_router_logits": false, "pad_token_id": 1, "rms_norm_eps": 1e-05,
"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "router_aux_loss_coef": 0.01,
"tie_word_embeddings": false, "transformers_version": "5.25.0", "use_cache": true, "vocab_size": 256}
)");
    write(dir / "minimal_foe.json", R"({"architectures": ["FoeForCausalLM"], "hidden_size": 64, "intermediate_size": 32,
"num_attention_heads": 8, "num_hidden_layers": 2, "num_experts": 16, "num_experts_per_tok": 8, "vocab_size": 97})");

    // Hostile: each breaks one rule, or sits at a limit.
    write(dir / "hostile_extents_at_limit.json", R"({"architectures": ["FoeForCausalLM"], "hidden_size": 16777216,
"intermediate_size": 16777216, "num_attention_heads": 16777216, "num_key_value_heads": 16777216, "head_dim": 16777216,
"num_hidden_layers": 16777216, "num_experts": 16777216, "num_experts_per_tok": 16777216, "num_expert_groups": 16777216,
"vocab_size": 16777216, "max_position_embeddings": 16777216})");
    write(dir / "hostile_int64_extremes.json", R"({"architectures": ["OlmoeForCausalLM"],
"hidden_size": -9223372036854775808, "intermediate_size": 9223372036854775807, "num_attention_heads": -1,
"num_hidden_layers": 1, "num_experts": 1, "num_experts_per_tok": 1, "vocab_size": 1})");
    write(dir / "hostile_rope_scaling.json", R"({"architectures": ["FoeForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2.0},
"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 8, "num_hidden_layers": 2,
"num_experts": 16, "num_experts_per_tok": 8, "vocab_size": 97})");
    write(dir / "hostile_rope_conflict.json", R"({"architectures": ["OlmoeForCausalLM"], "rope_theta": 10000.0,
"rope_scaling": {"type": "default", "rope_theta": 1000.0}, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
"rope_theta": 500000.0}, "num_experts": 8, "num_local_experts": 16, "dtype": "bfloat16", "torch_dtype": "float8_e4m3fn",
"hidden_size": 64, "intermediate_size": 16, "num_attention_heads": 4, "num_hidden_layers": 2,
"num_experts_per_tok": 2, "vocab_size": 256})");
    write(dir / "hostile_float_extents.json", R"({"architectures": ["FoeForCausalLM"], "hidden_size": 64.0,
"intermediate_size": 1e400, "num_attention_heads": 8, "rope_theta": -0.0, "rms_norm_eps": 1e-400})");
    write(dir / "hostile_deep_nesting.json", "{\"architectures\": " + std::string(300, '[') + std::string(300, ']') + "}");
    write(dir / "hostile_invalid_utf8.json", "{\"architectures\": [\"Foe\xc0\xaf\"], \"qk_norm\": \"\\ud800\"}");
    write(dir / "hostile_duplicate_key.json", R"({"hidden_size": 64, "hidden_size": 128})");
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_corpus OUT_DIR (writes OUT_DIR/safetensors and OUT_DIR/config)\n");
        return 2;
    }
    try {
        safetensors_corpus(fs::path(argv[1]) / "safetensors");
        config_corpus(fs::path(argv[1]) / "config");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "make_corpus: %s\n", e.what());
        return 1;
    }
    return 0;
}
