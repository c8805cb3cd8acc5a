// foe_run: run a model directory (config.json + model.safetensors) on the host, or write a
// seeded random one.
//
//   foe_run --model DIR [--tokens 1,2,3] [--max-new-tokens N] [--logits-out FILE]
//       prints {"prompt": [...], "generated": [...]} as one JSON line on stdout; --logits-out
//       writes a safetensors file with the float32 tensor "logits" [prompt_len, vocab_size]
//   foe_run --init CONFIG_NAME --out DIR [--seed S] [--dtype f32|bf16|f16]
//       writes a random model directory of a named configuration (foe-1b, moe-tiny, ...)
//
// Errors go to stderr with exit status 1 (2 for a usage error).

#include <charconv>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "foe/foe.hpp"
#include "foe/io/model_dir.hpp"

namespace {

constexpr std::string_view usage_text =
    "usage:\n"
    "  foe_run --model DIR [--tokens 1,2,3] [--max-new-tokens N] [--logits-out FILE]\n"
    "  foe_run --init CONFIG_NAME --out DIR [--seed S] [--dtype f32|bf16|f16]\n"
    "\n"
    "  --model DIR           model directory with config.json and model.safetensors\n"
    "  --tokens LIST         prompt token ids, comma separated (default: 0)\n"
    "  --max-new-tokens N    tokens to generate greedily (default: 8)\n"
    "  --logits-out FILE     write the prompt's logits as safetensors tensor \"logits\" [prompt, vocab]\n"
    "  --init NAME           write a random model of a named configuration\n"
    "  --out DIR             where --init writes\n"
    "  --seed S              seed of the random weights (default: 0)\n"
    "  --dtype T             storage type of the written weights (default: f32)\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::optional<std::string> model, init, out, logits_out;
    std::vector<std::int32_t> tokens{0};
    foe::index_t max_new_tokens = 8;
    std::uint64_t seed = 0;
    foe::DType dtype = foe::DType::f32;
};

template <class T>
T parse_number(std::string_view text, std::string_view flag)
{
    T value{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc{} || end != text.data() + text.size() || text.empty())
        throw UsageError(foe::detail::concat(flag, ": \"", text, "\" is not a valid number"));
    return value;
}

Options parse_args(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::cout << usage_text;
            std::exit(0);
        }
        if (i + 1 >= argc) throw UsageError(foe::detail::concat(flag, " needs a value (or is unknown)"));
        const std::string_view value = argv[++i];
        if (flag == "--model") {
            o.model = std::string(value);
        } else if (flag == "--tokens") {
            o.tokens.clear();
            std::size_t begin = 0;
            while (begin <= value.size()) {
                const std::size_t comma = std::min(value.find(',', begin), value.size());
                o.tokens.push_back(parse_number<std::int32_t>(value.substr(begin, comma - begin), "--tokens"));
                begin = comma + 1;
            }
        } else if (flag == "--max-new-tokens") {
            o.max_new_tokens = parse_number<foe::index_t>(value, flag);
            if (o.max_new_tokens < 0) throw UsageError("--max-new-tokens must not be negative");
        } else if (flag == "--logits-out") {
            o.logits_out = std::string(value);
        } else if (flag == "--init") {
            o.init = std::string(value);
        } else if (flag == "--out") {
            o.out = std::string(value);
        } else if (flag == "--seed") {
            o.seed = parse_number<std::uint64_t>(value, flag);
        } else if (flag == "--dtype") {
            if (value == "f32") o.dtype = foe::DType::f32;
            else if (value == "bf16") o.dtype = foe::DType::bf16;
            else if (value == "f16") o.dtype = foe::DType::f16;
            else throw UsageError(foe::detail::concat("--dtype: \"", value, "\" is not one of f32, bf16, f16"));
        } else {
            throw UsageError(foe::detail::concat("unknown option ", flag));
        }
    }
    if (o.model.has_value() == o.init.has_value()) throw UsageError("give exactly one of --model and --init");
    if (o.init && !o.out) throw UsageError("--init needs --out DIR");
    return o;
}

int init_model(const Options& o)
{
    const foe::ModelConfig config = foe::named_config(*o.init);
    std::cerr << "foe_run: writing " << *o.init << " (" << config.parameter_count() << " parameters, seed " << o.seed
              << ", " << foe::dtype_name(o.dtype) << ") to " << *o.out << "\n";
    foe::save_model_dir(*o.out, foe::random_weights(config, o.seed), o.dtype);
    return 0;
}

int run_model(const Options& o)
{
    auto weights = std::make_shared<const foe::ModelWeights>(foe::load_model_dir(*o.model));
    const auto& c = weights->config;
    // Size the KV cache for this request only.
    foe::ModelOptions options;
    const auto needed = static_cast<foe::index_t>(o.tokens.size()) + o.max_new_tokens;
    if (needed > c.max_position_embeddings)
        throw foe::CapacityError(foe::detail::concat("prompt (", o.tokens.size(), " tokens) plus --max-new-tokens (",
                                                     o.max_new_tokens, ") exceed max_position_embeddings (",
                                                     c.max_position_embeddings, ")"));
    options.cache_capacity = needed;
    const auto model = foe::make_model(weights, options);

    foe::Tensor<float> logits;
    const auto generated = model->generate(o.tokens, o.max_new_tokens, 0, &logits);
    if (o.logits_out) {
        const foe::TensorToWrite t{"logits", foe::DType::f32, logits.shape(), logits.span()};
        foe::save_safetensors(*o.logits_out, std::span(&t, 1));
    }
    auto list = [](const std::vector<std::int32_t>& v) {
        std::string s = "[";
        for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + "]";
    };
    std::cout << "{\"prompt\": " << list(o.tokens) << ", \"generated\": " << list(generated) << "}" << std::endl;
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    try {
        const Options o = parse_args(argc, argv);
        return o.init ? init_model(o) : run_model(o);
    } catch (const UsageError& e) {
        std::cerr << "foe_run: " << e.what() << "\n\n" << usage_text;
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "foe_run: error: " << e.what() << "\n";
        return 1;
    }
}
