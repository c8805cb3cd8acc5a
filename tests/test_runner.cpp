// Model directories (config.json + model.safetensors) and the foe_run command-line runner.

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <string>

#include "foe/io/model_dir.hpp"
#include "oracle.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

/// A fresh directory under the system temp dir, removed at scope exit.
struct TempDir {
    fs::path path;
    explicit TempDir(const std::string& tag)
    {
        path = fs::temp_directory_path() / ("foe-test-" + tag + "-" + std::to_string(::getpid()));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() { fs::remove_all(path); }
};

struct Result {
    int status = -1;
    std::string output;  // stdout and stderr
};

Result run(const std::string& args)
{
    const std::string command = std::string(FOE_RUN_PATH) + " " + args + " 2>&1";
    Result r;
    FILE* pipe = popen(command.c_str(), "r");
    REQUIRE(pipe != nullptr);
    std::array<char, 4096> buf{};
    while (const std::size_t n = std::fread(buf.data(), 1, buf.size(), pipe)) r.output.append(buf.data(), n);
    const int status = pclose(pipe);
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return r;
}

std::string json_list(const std::vector<std::int32_t>& v)
{
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

}  // namespace

TEST_CASE("model directory round trip: config and every tensor, f32 exactly, bf16 and f16 as rounded")
{
    TempDir dir("roundtrip");
    for (const char* name : {"foe-tiny", "moe-tiny"}) {
        CAPTURE(name);
        const auto w = foe::random_weights(foe::named_config(name), 4);
        foe::save_model_dir(dir.path / name, w);
        const auto back = foe::load_model_dir(dir.path / name);
        CHECK(back.config.architecture == w.config.architecture);
        CHECK(back.config.num_expert_groups == w.config.num_expert_groups);
        CHECK(back.config.qk_norm == w.config.qk_norm);
        REQUIRE(back.tensors.size() == w.tensors.size());
        for (const auto& entry : w.tensors) {  // no structured binding: clang 14 cannot capture one in CAPTURE
            const std::string& tensor_name = entry.first;
            CAPTURE(tensor_name);
            CHECK(back.at(tensor_name).shape() == entry.second.shape());
            CHECK(back.at(tensor_name).to_float().values() == entry.second.to_float().values());
        }
    }
    const auto w = foe::random_weights(test::tiny(foe::Architecture::foe, 4, foe::ScoreFunction::sigmoid), 4);
    for (auto dtype : {foe::DType::bf16, foe::DType::f16}) {
        foe::save_model_dir(dir.path / "half", w, dtype);
        const auto back = foe::load_model_dir(dir.path / "half");
        CHECK(back.config.scoring_func == foe::ScoreFunction::sigmoid);
        for (const auto& [tensor_name, t] : w.tensors)
            for (std::size_t i = 0; i < t.floats().size(); i += 97) {
                const float v = t.floats()[i];
                const float rounded = dtype == foe::DType::bf16 ? static_cast<float>(foe::bfloat16(v))
                                                                : static_cast<float>(foe::float16(v));
                CHECK(back.at(tensor_name).to_float().values()[i] == rounded);
            }
    }
}

TEST_CASE("mapped weights: used in place, the same logits as read ones; bf16/fp16 kept in their type equal widened")
{
    TempDir dir("mapped");
    for (const std::string name : {"foe-tiny", "moe-tiny"}) {
        CAPTURE(name);
        const auto w = foe::random_weights(foe::named_config(name), 4);
        const auto prompt = test::random_tokens(9, w.config.vocab_size, 3);
        const auto logits_of = [&](foe::ModelWeights weights) {
            return foe::make_model(std::make_shared<const foe::ModelWeights>(std::move(weights)))->prefill(prompt).values();
        };
        const auto in_memory = logits_of(w);

        foe::save_model_dir(dir.path / name, w);
        foe::LoadOptions read;
        read.map_files = false;
        CHECK(logits_of(foe::load_model_dir(dir.path / name)) == in_memory);
        CHECK(logits_of(foe::load_model_dir(dir.path / name, {}, read)) == in_memory);

        for (auto dtype : {foe::DType::bf16, foe::DType::f16}) {
            CAPTURE(foe::dtype_name(dtype));
            const auto half = dir.path / (name + "-half");
            foe::save_model_dir(half, w, dtype);
            const auto kept = foe::load_model_dir(half);
            // Matrices stay in the file's dtype; vectors and the router's gate are fp32.
            CHECK(kept.at(foe::names::layer(0, "self_attn.q_proj.weight")).dtype() == dtype);
            CHECK(kept.at(foe::names::expert(0, 1, "down_proj")).dtype() == dtype);
            CHECK(kept.at("model.embed_tokens.weight").dtype() == dtype);
            CHECK(kept.at(foe::names::layer(0, "mlp.gate.weight")).dtype() == foe::DType::f32);
            CHECK(kept.at(foe::names::layer(0, "input_layernorm.weight")).dtype() == foe::DType::f32);
            foe::LoadOptions widen;
            widen.widen_to_f32 = true;
            const auto widened = foe::load_model_dir(half, {}, widen);
            CHECK(widened.at(foe::names::layer(0, "self_attn.q_proj.weight")).dtype() == foe::DType::f32);
            // Widening is exact and the GEMM widens as it reads: the same bits, kept or widened,
            // mapped or read, or rounded in memory (stored_as).
            const auto want = logits_of(widened);
            CHECK(logits_of(kept) == want);
            read.widen_to_f32 = false;
            CHECK(logits_of(foe::load_model_dir(half, {}, read)) == want);
            CHECK(logits_of(foe::stored_as(w, dtype)) == want);
            CHECK(oracle::relative_error(want, oracle::to_double(in_memory)) < (dtype == foe::DType::bf16 ? 5e-2 : 5e-3));
        }
    }
}

#if defined(FOE_WITH_CBLAS)
TEST_CASE("mapped bf16 weights with a GEMM policy that cannot read bf16 (Cblas): widened per call, the same bits")
{
    TempDir dir("mapped-cblas");
    const auto w = foe::random_weights(foe::named_config("foe-tiny"), 5);
    foe::save_model_dir(dir.path, w, foe::DType::bf16);
    foe::LoadOptions widen;
    widen.widen_to_f32 = true;
    const auto prompt = test::random_tokens(6, w.config.vocab_size, 4);
    const auto kept = foe::make_model<foe::gemm::Cblas>(std::make_shared<const foe::ModelWeights>(foe::load_model_dir(dir.path)));
    const auto wide = foe::make_model<foe::gemm::Cblas>(
        std::make_shared<const foe::ModelWeights>(foe::load_model_dir(dir.path, {}, widen)));
    CHECK(kept->prefill(prompt).values() == wide->prefill(prompt).values());
}
#endif

TEST_CASE("mapped weights: a tensor not aligned for its dtype in the file is copied, with the right values")
{
    TempDir dir("unaligned");
    // 3 fp16 values (6 bytes) put the fp32 tensor after them at an offset of 2 mod 4.
    const std::vector<float> a = {1.5f, -2.0f, 0.25f}, b = {3.0f, -4.5f, 6.0f, 7.25f};
    const foe::TensorToWrite tensors[] = {{"a", foe::DType::f16, {3}, a}, {"b", foe::DType::f32, {2, 2}, b}};
    foe::save_safetensors(dir.path / "x.safetensors", tensors);
    const auto file = foe::SafetensorsFile::open(dir.path / "x.safetensors");
    const foe::index_t shape[] = {2, 2};
    const auto t = file.weight("b", shape, {});
    CHECK(t.dtype() == foe::DType::f32);
    CHECK(std::vector<float>(t.floats().begin(), t.floats().end()) == b);
    const foe::index_t a_shape[] = {3};
    CHECK(file.weight("a", a_shape, {}).to_float().values() == a);
    const foe::index_t wrong[] = {4};
    CHECK_THROWS_WITH_AS((void)file.weight("a", wrong, {}), doctest::Contains("has shape [3], expected [4]"),
                         foe::FormatError);
}

TEST_CASE("model directory: a missing file or tensor, and a tensor of the wrong shape, are named")
{
    TempDir dir("broken");
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path / "nope"), doctest::Contains("does not exist"), foe::IoError);
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains("has no config.json"), foe::IoError);

    auto w = foe::random_weights(foe::named_config("foe-tiny"), 1);
    foe::save_model_dir(dir.path, w);
    fs::remove(dir.path / "model.safetensors");
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains("has neither model.safetensors"),
                         foe::IoError);

    // A file without one tensor the config needs.
    const std::string dropped = "model.layers.1.self_attn.k_norm.weight";
    std::vector<foe::TensorToWrite> tensors;
    for (const auto& spec : foe::expected_tensors(w.config))
        if (spec.name != dropped) tensors.push_back({spec.name, foe::DType::f32, spec.shape, w.at(spec.name).floats()});
    foe::save_safetensors(dir.path / "model.safetensors", tensors);
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains(dropped.c_str()), foe::FormatError);

    // The same name with a wrong shape.
    const foe::Tensor<float> wrong({3});
    tensors.push_back({dropped, foe::DType::f32, wrong.shape(), wrong.span()});
    foe::save_safetensors(dir.path / "model.safetensors", tensors);
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains("expected [8]"), foe::FormatError);
}

TEST_CASE("model directory: sharded weights through model.safetensors.index.json")
{
    TempDir dir("sharded");
    const auto w = foe::random_weights(foe::named_config("moe-tiny"), 2);
    foe::save_config_json(dir.path / "config.json", w.config);
    std::vector<foe::TensorToWrite> a, b;
    std::string map;
    int i = 0;
    for (const auto& spec : foe::expected_tensors(w.config)) {
        const bool first = i++ % 2 == 0;
        (first ? a : b).push_back({spec.name, foe::DType::f32, spec.shape, w.at(spec.name).floats()});
        map += (map.empty() ? "" : ", ") + ("\"" + spec.name + "\": \"" + (first ? "a.safetensors" : "b.safetensors") + "\"");
    }
    foe::save_safetensors(dir.path / "a.safetensors", a);
    foe::save_safetensors(dir.path / "b.safetensors", b);
    std::ofstream(dir.path / "model.safetensors.index.json") << "{\"metadata\": {}, \"weight_map\": {" << map << "}}";
    const auto back = foe::load_model_dir(dir.path);
    CHECK(back.at("lm_head.weight").to_float().values() == w.at("lm_head.weight").to_float().values());

    // A shard name may not leave the model directory.
    std::ofstream(dir.path / "model.safetensors.index.json") << "{\"weight_map\": {\"x\": \"../a.safetensors\"}}";
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains("not a plain file name"), foe::FormatError);
}

TEST_CASE("model directory: a shard the index names but the directory lacks is named, with a tensor that needs it")
{
    TempDir dir("missing-shard");
    const auto w = foe::random_weights(foe::named_config("moe-tiny"), 2);
    foe::save_config_json(dir.path / "config.json", w.config);
    std::vector<foe::TensorToWrite> tensors;
    std::string map;
    for (const auto& spec : foe::expected_tensors(w.config)) {
        const bool head = spec.name == "lm_head.weight";
        if (!head) tensors.push_back({spec.name, foe::DType::f32, spec.shape, w.at(spec.name).floats()});
        map += (map.empty() ? "" : ", ") + ("\"" + spec.name + "\": \"" + (head ? "b.safetensors" : "a.safetensors") + "\"");
    }
    foe::save_safetensors(dir.path / "a.safetensors", tensors);
    std::ofstream(dir.path / "model.safetensors.index.json") << "{\"weight_map\": {" << map << "}}";
    const std::string expected = "b.safetensors: cannot open: No such file or directory (" +
                                 (dir.path / "model.safetensors.index.json").string() +
                                 " maps tensor \"lm_head.weight\" to it)";
    CHECK_THROWS_WITH_AS((void)foe::load_model_dir(dir.path), doctest::Contains(expected.c_str()), foe::IoError);
}

TEST_CASE("foe_run on a saved random model reproduces the in-process logits and generation")
{
    TempDir dir("runner");
    const auto model_dir = dir.path / "model";
    const auto init = run("--init foe-tiny --out " + model_dir.string() + " --seed 3");
    REQUIRE_MESSAGE(init.status == 0, init.output);

    const std::vector<std::int32_t> prompt{1, 2, 3, 50, 96};
    const foe::index_t new_tokens = 4;
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::load_model_dir(model_dir));
    CHECK(weights->at("lm_head.weight").to_float().values() == foe::random_weights(foe::named_config("foe-tiny"), 3).at("lm_head.weight").to_float().values());
    foe::ModelOptions options;
    options.cache_capacity = static_cast<foe::index_t>(prompt.size()) + new_tokens;
    foe::Tensor<float> logits;
    const auto generated = foe::make_model(weights, options)->generate(prompt, new_tokens, 0, &logits);

    const auto logits_file = dir.path / "logits.safetensors";
    const auto r = run("--model " + model_dir.string() + " --tokens 1,2,3,50,96 --max-new-tokens 4 --logits-out " +
                       logits_file.string());
    REQUIRE_MESSAGE(r.status == 0, r.output);
    CHECK(r.output == "{\"prompt\": " + json_list(prompt) + ", \"generated\": " + json_list(generated) + "}\n");

    const auto file = foe::SafetensorsFile::open(logits_file);
    CHECK(file.at("logits").dtype == foe::DType::f32);
    const auto from_runner = file.read_float("logits", {static_cast<foe::index_t>(prompt.size()), 97});
    CHECK(from_runner.values() == logits.values());
}

#if defined(FOE_WITH_CBLAS)
TEST_CASE("foe_run --gemm cblas agrees with the default batch-invariant GEMM within 1e-5 relative")
{
    TempDir dir("runner-gemm");
    const auto model_dir = dir.path / "model";
    REQUIRE(run("--init moe-tiny --out " + model_dir.string() + " --seed 4").status == 0);
    foe::Tensor<float> logits[2];
    std::string outputs[2];
    const char* gemms[2] = {"foe", "cblas"};
    for (int i = 0; i < 2; ++i) {
        const auto file = dir.path / (std::string(gemms[i]) + ".safetensors");
        const auto r = run("--model " + model_dir.string() + " --gemm " + gemms[i] +
                           " --tokens 5,6,7,8 --max-new-tokens 3 --logits-out " + file.string());
        REQUIRE_MESSAGE(r.status == 0, r.output);
        outputs[i] = r.output;
        logits[i] = foe::SafetensorsFile::open(file).read_float("logits", {4, 97});
    }
    CHECK(outputs[0] == outputs[1]);  // greedy tokens: no near-tie on this seed
    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < logits[0].values().size(); ++i) {
        worst = std::max(worst, static_cast<double>(std::abs(logits[0].values()[i] - logits[1].values()[i])));
        scale = std::max(scale, static_cast<double>(std::abs(logits[0].values()[i])));
    }
    CHECK(worst / scale < 1e-5);
}
#endif

TEST_CASE("foe_run: errors go to stderr with a non-zero exit status")
{
    TempDir dir("runner-errors");
    auto r = run("--model " + (dir.path / "missing").string());
    CHECK(r.status == 1);
    CHECK(r.output.find("foe_run: error:") != std::string::npos);
    CHECK(r.output.find("does not exist") != std::string::npos);

    r = run("--init foe-3b --out " + dir.path.string());
    CHECK(r.status == 1);
    CHECK(r.output.find("unknown configuration name") != std::string::npos);

    REQUIRE(run("--init foe-tiny --out " + (dir.path / "m").string()).status == 0);
    r = run("--model " + (dir.path / "m").string() + " --tokens 1,97");
    CHECK(r.status == 1);
    CHECK(r.output.find("token id 97") != std::string::npos);
    r = run("--model " + (dir.path / "m").string() + " --tokens 1 --max-new-tokens 64");
    CHECK(r.status == 1);
    CHECK(r.output.find("max_position_embeddings (64)") != std::string::npos);

    for (const char* usage : {"", "--tokens 1", "--model a --init b --out c", "--model m --tokens 1,x", "--bogus 1",
                              "--init foe-tiny", "--model m --dtype f64", "--model m --backend tpu",
                              "--model m --gemm cublaslt", "--model m --backend cuda --gemm cblas"}) {
        CAPTURE(usage);
        r = run(usage);
        CHECK(r.status == 2);
        CHECK(r.output.find("usage:") != std::string::npos);
    }
}

TEST_CASE("foe_run stops after the config's eos_token_id unless --ignore-eos; a seed reproduces a sampled run")
{
    TempDir dir("runner-eos");
    auto w = foe::random_weights(foe::named_config("moe-tiny"), 3);
    foe::save_model_dir(dir.path / "plain", w);
    const std::string args = " --tokens 4,5,6 --max-new-tokens 6";
    const auto plain = run("--model " + (dir.path / "plain").string() + args);
    REQUIRE(plain.status == 0);
    // The third generated token becomes the EOS id: generation ends right after it.
    const auto list_start = plain.output.find("\"generated\": [") + 14;
    std::vector<std::int32_t> generated;
    for (std::size_t at = list_start; at < plain.output.size() && plain.output[at] != ']';) {
        std::size_t used = 0;
        generated.push_back(std::stoi(plain.output.substr(at), &used));
        at += used;
        while (at < plain.output.size() && (plain.output[at] == ',' || plain.output[at] == ' ')) ++at;
    }
    REQUIRE(generated.size() == 6);
    w.config.eos_token_ids = {generated[2]};
    foe::save_model_dir(dir.path / "eos", w);
    const auto first = std::find(generated.begin(), generated.end(), generated[2]);
    const auto stopped = run("--model " + (dir.path / "eos").string() + args);
    CHECK(stopped.output == "{\"prompt\": [4, 5, 6], \"generated\": " +
                                json_list(std::vector<std::int32_t>(generated.begin(), first + 1)) + "}\n");
    CHECK(run("--model " + (dir.path / "eos").string() + args + " --ignore-eos").output == plain.output);

    const std::string sampled = "--model " + (dir.path / "plain").string() + args + " --temperature 1.2 --top-k 20";
    CHECK(run(sampled + " --seed 11").output == run(sampled + " --seed 11").output);
    CHECK(run(sampled + " --seed 11 --threads 1").output == run(sampled + " --seed 11").output);
}

TEST_CASE("foe_run --logits-out refuses a target that is not a regular file and leaves it as it was")
{
    TempDir dir("runner-logits-out");
    REQUIRE(run("--init foe-tiny --out " + (dir.path / "m").string()).status == 0);
    const auto fifo = dir.path / "fifo";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const auto r = run("--model " + (dir.path / "m").string() + " --tokens 1,2 --logits-out " + fifo.string());
    CHECK(r.status == 1);
    CHECK_MESSAGE(r.output.find("is a FIFO: foe writes only regular files") != std::string::npos, r.output);
    CHECK(std::filesystem::is_fifo(std::filesystem::status(fifo)));
}

TEST_CASE("foe_run: --max-new-tokens near INT64_MAX is refused, not wrapped around")
{
    TempDir dir("runner-overflow");
    REQUIRE(run("--init foe-tiny --out " + (dir.path / "m").string()).status == 0);
    for (const char* n : {"9223372036854775807", "9223372036854775806", "9223372036854775744"}) {
        CAPTURE(n);
        const auto r = run("--model " + (dir.path / "m").string() + " --tokens 1,2 --max-new-tokens " + n);
        CHECK(r.status == 1);
        CHECK(r.output.find("exceed max_position_embeddings (64)") != std::string::npos);
    }
}

TEST_CASE("foe_run: a NaN in the weights is an error naming where it appeared; --check-finite off lets it through")
{
    TempDir dir("runner-nan");
    const auto c = foe::named_config("foe-tiny");
    auto w = foe::random_weights(c, 3);
    w.tensors.at("model.layers.1.mlp.experts.2.down_proj.weight").mutable_floats()[5] = std::nanf("");
    foe::save_model_dir(dir.path / "m", w);
    // Expert 2's row 5 is used by the tokens routed to it; over 20 tokens some are.
    const std::string args = "--model " + (dir.path / "m").string() +
                             " --tokens 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20 --max-new-tokens 2";
    const auto checked = run(args);
    CHECK(checked.status == 1);
    CHECK_MESSAGE(checked.output.find("after layer 1") != std::string::npos, checked.output);
    CHECK(checked.output.find("position") != std::string::npos);
    const auto unchecked = run(args + " --check-finite off");
    CHECK(unchecked.status == 0);
}

TEST_CASE("foe_run: a rope_theta whose RoPE frequencies overflow is refused when the model is read")
{
    TempDir dir("runner-rope");
    REQUIRE(run("--init foe-tiny --out " + (dir.path / "m").string()).status == 0);
    const auto config = dir.path / "m" / "config.json";
    std::ifstream in(config);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    const auto at = text.find("\"rope_theta\"");
    REQUIRE(at != std::string::npos);
    const auto value = text.find(':', at) + 1, end = text.find_first_of(",}", value);
    text.replace(value, end - value, " 1e-300");
    std::ofstream(config) << text;
    const auto r = run("--model " + (dir.path / "m").string() + " --tokens 1,2");
    CHECK(r.status == 1);
    CHECK_MESSAGE(r.output.find("rope_theta (1e-300) gives RoPE inverse frequency") != std::string::npos, r.output);
}

TEST_CASE("foe_run --backend cuda runs the model on a GPU, or says why it cannot")
{
    TempDir dir("runner-cuda");
    REQUIRE(run("--init foe-tiny --out " + (dir.path / "m").string() + " --seed 5").status == 0);
    const auto r = run("--model " + (dir.path / "m").string() + " --backend cuda --tokens 1,2,3 --max-new-tokens 3");
    if (r.status == 0) {
        // bf16 on the device against fp32 here: the format, not the tokens, is what must agree.
        CHECK(r.output.starts_with("{\"prompt\": [1, 2, 3], \"generated\": ["));
        return;
    }
    CHECK(r.status == 1);
    const bool no_gpu = r.output.find("no CUDA device") != std::string::npos;
    const bool no_cuda_build = r.output.find("built without CUDA") != std::string::npos;
    CHECK_MESSAGE((no_gpu || no_cuda_build), r.output);
    if (no_gpu) MESSAGE("no CUDA device: foe_run --backend cuda reported it, as it should");
}
