#pragma once
// A model directory in the Hugging Face layout: config.json and the weights, either one
// model.safetensors or shards listed by model.safetensors.index.json ("weight_map": name -> file).
//
// Loading reads exactly the tensors the config needs (expected_tensors), converts them to fp32,
// and fails with the file and tensor named when one is missing, has another shape or an
// unsupported dtype. Tensors the config does not need are ignored, as Hugging Face does.

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "foe/core/dtype.hpp"
#include "foe/core/error.hpp"
#include "foe/io/config_json.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"
#include "foe/io/safetensors.hpp"
#include "foe/model/weights.hpp"

namespace foe {

inline constexpr std::string_view config_file_name = "config.json";
inline constexpr std::string_view weights_file_name = "model.safetensors";
inline constexpr std::string_view weights_index_file_name = "model.safetensors.index.json";

/// Reads config.json and the weights of a model directory: every tensor the config needs, or
/// those `holds` accepts (a rank's share).
[[nodiscard]] ModelWeights load_model_dir(const std::filesystem::path& dir, TensorFilter holds = {});

/// Writes config.json and model.safetensors (tensors in expected_tensors order, stored as dtype).
/// The directory is created if needed; existing files are replaced.
void save_model_dir(const std::filesystem::path& dir, const ModelWeights& weights, DType dtype = DType::f32);

// ---------------------------------------------------------------------------------------------

namespace detail {

/// tensor name -> shard file, from model.safetensors.index.json.
inline std::map<std::string, std::string, std::less<>> read_weight_map(const std::filesystem::path& index_path)
{
    const std::string source = index_path.string();
    const auto bytes = io::read_whole_file(index_path, 64u << 20, "model.safetensors.index.json");
    const std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    const json::Value root = json::parse(text, source);
    const json::Value* map = root.is_object() ? root.find("weight_map") : nullptr;
    require<FormatError>(map != nullptr && map->is_object(), source, ": \"weight_map\" must be an object of tensor name -> file");
    std::map<std::string, std::string, std::less<>> out;
    for (const auto& [name, file] : map->as_object()) {
        require<FormatError>(file.is_string(), source, ": weight_map entry \"", name, "\" must be a file name string");
        const std::filesystem::path p(file.as_string());
        // Shards live beside the index: no directories, no way out of the model directory.
        require<FormatError>(p.has_filename() && p.filename() == p && p != "." && p != "..", source,
                             ": weight_map entry \"", name, "\" names \"", file.as_string(),
                             "\", which is not a plain file name in the model directory");
        out.emplace(name, file.as_string());
    }
    return out;
}

}  // namespace detail

inline ModelWeights load_model_dir(const std::filesystem::path& dir, TensorFilter holds)
{
    std::error_code ec;
    require<IoError>(std::filesystem::is_directory(dir, ec), "model directory \"", dir.string(),
                     "\" does not exist or is not a directory");
    const auto config_path = dir / config_file_name;
    require<IoError>(std::filesystem::exists(config_path, ec), "model directory \"", dir.string(), "\" has no ",
                     config_file_name);
    ModelWeights w{load_config_json(config_path), {}, std::move(holds)};

    const auto single = dir / weights_file_name;
    const auto index = dir / weights_index_file_name;
    std::map<std::string, std::string, std::less<>> weight_map;
    if (!std::filesystem::exists(single, ec)) {
        require<IoError>(std::filesystem::exists(index, ec), "model directory \"", dir.string(), "\" has neither ",
                         weights_file_name, " nor ", weights_index_file_name);
        weight_map = detail::read_weight_map(index);
    }

    std::map<std::string, SafetensorsFile, std::less<>> open_files;
    auto file_for = [&](const std::string& tensor) -> const SafetensorsFile& {
        std::string file(weights_file_name);
        if (!weight_map.empty()) {
            const auto it = weight_map.find(tensor);
            if (it == weight_map.end())
                raise<FormatError>(index.string(), ": missing tensor \"", tensor, "\" (not in weight_map)");
            file = it->second;
        }
        auto it = open_files.find(file);
        if (it == open_files.end()) {
            try {
                it = open_files.emplace(file, SafetensorsFile::open(dir / file)).first;
            } catch (const IoError& e) {
                if (weight_map.empty()) throw;
                // A shard the index names but the directory lacks: say which tensor needed it.
                raise<IoError>(e.what(), " (", index.string(), " maps tensor \"", tensor, "\" to it)");
            }
        }
        return it->second;
    };
    for (const auto& spec : expected_tensors(w.config))
        if (w.held(spec.name)) w.tensors.emplace(spec.name, file_for(spec.name).read_float(spec.name, spec.shape));
    return w;
}

inline void save_model_dir(const std::filesystem::path& dir, const ModelWeights& weights, DType dtype)
{
    require<InvalidArgument>(!weights.holds, "save_model_dir needs every tensor; these weights hold a rank's share");
    check_weights(weights);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    require<IoError>(!ec, "cannot create model directory \"", dir.string(), "\": ", ec.message());
    std::vector<TensorToWrite> tensors;
    for (const auto& spec : expected_tensors(weights.config))
        tensors.push_back({spec.name, dtype, spec.shape, weights.at(spec.name).span()});
    save_safetensors(dir / weights_file_name, tensors, {{"format", "pt"}});
    save_config_json(dir / config_file_name, weights.config);
}

}  // namespace foe
