#pragma once
// A model directory in the Hugging Face layout: config.json and the weights, either one
// model.safetensors or shards listed by model.safetensors.index.json ("weight_map": name -> file).
//
// Loading takes exactly the tensors the config needs (expected_tensors) and the caller's filter
// accepts, and fails with the file and tensor named when one is missing, has another shape or an
// unsupported dtype. By default the weight files are memory-mapped and the tensors used in place:
// fp32 matrices and bf16/fp16 ones alike stay in the file's bytes (the host GEMM reads bf16/fp16
// directly), so loading costs no copy and the process holds the bytes of the tensors it uses
// (pages of other ranks' experts are never touched). Vectors and the router's gate are widened
// to fp32 (see model/weights.hpp). Every header is validated before any tensor is touched. Tensors the config does not need are ignored, as
// Hugging Face does: their bytes are not read, and a shard holding none that are needed is not
// opened. Shard names from the index must be plain file names in the directory.

#include <algorithm>
#include <cstddef>
#include <deque>
#include <filesystem>
#include <map>
#include <new>
#include <optional>
#include <string>
#include <string_view>
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

/// How load_model_dir() takes the weights.
struct LoadOptions {
    /// Map the weight files and use the tensors in place (false: read them into memory).
    bool map_files = true;
    /// Convert bf16/fp16 matrices to fp32 (twice the memory of bf16): for a GEMM policy that
    /// cannot read them (gemm::Cblas widens them on every call otherwise).
    bool widen_to_f32 = false;
    /// With map_files: read every held tensor's pages during the load, so that the load time is
    /// the whole cost and the first forward is as fast as the next (false: on first use).
    bool prefetch = true;
};

/// Reads config.json and the weights of a model directory: every tensor the config needs, or
/// those `holds` accepts (a rank's share).
[[nodiscard]] ModelWeights load_model_dir(const std::filesystem::path& dir, TensorFilter holds = {},
                                          const LoadOptions& options = {});

/// Writes config.json and model.safetensors (tensors in expected_tensors order, stored as dtype).
/// The directory is created if needed; existing files are replaced.
void save_model_dir(const std::filesystem::path& dir, const ModelWeights& weights, DType dtype = DType::f32);

// ---------------------------------------------------------------------------------------------

namespace detail {

/// Longest shard file name accepted, in bytes: NAME_MAX of Linux file systems, so no longer name
/// can be a file there (Hugging Face's shard names are about 30 bytes).
inline constexpr std::size_t max_shard_name_bytes = 255;

/// Refuses a shard file name that is not a plain file name inside the model directory: empty,
/// ".", "..", a path separator (which could leave the directory), a NUL (which would cut the name
/// where the file system reads it, opening another file), or longer than any file name.
inline void check_shard_name(std::string_view index, std::string_view tensor, std::string_view file)
{
    using json::detail::describe_text;
    const auto refuse = [&](std::string_view why) {
        raise<FormatError>(index, ": weight_map entry ", describe_text(tensor), " names ", describe_text(file),
                           ", which is not a plain file name in the model directory (", why, ")");
    };
    if (file.empty()) refuse("it is empty");
    if (file == "." || file == "..") refuse("it names a directory");
    if (file.find_first_of("/\\") != std::string_view::npos) refuse("it holds a path separator");
    if (file.find('\0') != std::string_view::npos) refuse("it holds a NUL character");
    if (file.size() > max_shard_name_bytes)
        refuse(concat("it is ", file.size(), " bytes long; file names are at most ", max_shard_name_bytes));
}

/// The shard file of each tensor `wanted` accepts, from model.safetensors.index.json. Every
/// entry is checked (a string naming a plain file) but only wanted ones are kept, and the index
/// is walked rather than parsed into a JSON tree: the memory it takes is set by what the model
/// needs, not by what the index holds. So a tensor listed twice is refused when it is wanted (or
/// the two entries are neighbours), as it decides which file is read; other duplicates are
/// entries foe never reads. FormatError for an index without entries: it would describe a
/// model without weights.
template <class Wanted>
[[nodiscard]] std::map<std::string, std::string, std::less<>> read_weight_map(const std::filesystem::path& index_path,
                                                                            Wanted&& wanted)
{
    using json::detail::describe_text;
    const std::string source = io::display(index_path);
    const auto bytes = io::read_whole_file(index_path, 64u << 20, "model.safetensors.index.json");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    std::map<std::string, std::string, std::less<>> out;
    try {
        (void)json::detail::Parser(text, source).check_document();
        json::detail::Parser p(text, source);
        p.skip_whitespace();
        const auto not_a_map = [&] {
            raise<FormatError>(source, ": \"weight_map\" must be an object of tensor name -> file");
        };
        if (!p.at_object()) not_a_map();
        std::optional<std::size_t> map_at;
        std::size_t entries = 0;
        std::string last;  // the previous entry's name: most duplicates are neighbours
        p.members(1, [&](std::string_view key, std::size_t key_offset) {
            if (key != "weight_map") {
                p.skip(1);  // "metadata" and anything else: not needed to load
                return;
            }
            if (map_at) p.fail(key_offset, "duplicate object key \"weight_map\"");
            map_at = key_offset;
            if (!p.at_object()) not_a_map();
            p.members(2, [&](std::string_view name_view, std::size_t name_offset) {
                std::string name(name_view);
                if (!p.at_string())
                    raise<FormatError>(source, ": weight_map entry ", describe_text(name),
                                       " must be a file name string, got ", p.describe_value());
                std::string file = p.string();
                check_shard_name(source, name, file);
                ++entries;
                if (name == last || out.contains(name)) p.fail(name_offset, "duplicate object key ", describe_text(name));
                if (wanted(std::string_view(name))) out.emplace(name, std::move(file));
                last = std::move(name);
            });
        });
        if (!map_at) not_a_map();
        if (entries == 0)
            raise<FormatError>(source, ": weight_map is empty; it must map each tensor name to the shard file "
                                       "that holds it");
    } catch (const std::bad_alloc&) {
        raise<IoError>(source, ": out of memory while reading it");
    }
    return out;
}

}  // namespace detail

inline ModelWeights load_model_dir(const std::filesystem::path& dir, TensorFilter holds, const LoadOptions& options)
{
    using json::detail::describe_text;
    std::error_code ec;
    const std::string dir_name = json::detail::describe_text(dir.string(), 1024);
    require<IoError>(std::filesystem::is_directory(dir, ec), "model directory ", dir_name,
                     " does not exist or is not a directory");
    const auto config_path = dir / config_file_name;
    require<IoError>(std::filesystem::exists(config_path, ec), "model directory ", dir_name, " has no ",
                     config_file_name);
    ModelWeights w{load_config_json(config_path), {}, std::move(holds)};

    // The tensors to read: those of the config that this rank holds.
    std::vector<TensorSpec> needed;
    for (auto& spec : expected_tensors(w.config))
        if (w.held(spec.name)) needed.push_back(std::move(spec));
    std::vector<std::string_view> needed_names;
    for (const TensorSpec& spec : needed) needed_names.push_back(spec.name);
    std::sort(needed_names.begin(), needed_names.end());

    const auto single = dir / weights_file_name;
    const auto index = dir / weights_index_file_name;
    const std::string index_name = detail::io::display(index);
    std::optional<std::map<std::string, std::string, std::less<>>> weight_map;  // empty: one file
    if (!std::filesystem::exists(single, ec)) {
        require<IoError>(std::filesystem::exists(index, ec), "model directory ", dir_name, " has neither ",
                         weights_file_name, " nor ", weights_index_file_name);
        weight_map = detail::read_weight_map(index, [&](std::string_view name) {
            return std::binary_search(needed_names.begin(), needed_names.end(), name);
        });
    }

    // Each shard is opened when a tensor is first needed from it, and only its header is read
    // then: a shard holding nothing this rank needs is never read, and of the others only the
    // needed tensors' bytes are.
    std::map<std::string, SafetensorsFile, std::less<>> open_files;
    auto file_for = [&](const std::string& tensor) -> const SafetensorsFile& {
        std::string file(weights_file_name);
        if (weight_map) {
            const auto it = weight_map->find(tensor);
            if (it == weight_map->end())
                raise<FormatError>(index_name, ": missing tensor ", describe_text(tensor), " (not in weight_map)");
            file = it->second;
        }
        auto it = open_files.find(file);
        if (it == open_files.end()) {
            try {
                it = open_files.emplace(file, SafetensorsFile::open(dir / file)).first;
            } catch (const IoError& e) {
                if (!weight_map) throw;
                // A shard the index names but the directory lacks: say which tensor needed it.
                raise<IoError>(e.what(), " (", index_name, " maps tensor ", describe_text(tensor), " to it)");
            }
        }
        return it->second;
    };
    // Every needed file's header is validated before any tensor is taken.
    for (const auto& spec : needed) (void)file_for(spec.name).at(spec.name);
    for (const auto& spec : needed) {
        SafetensorsFile::WeightOptions how;
        how.map = options.map_files;
        how.prefetch = options.prefetch;
        how.keep_dtype = !options.widen_to_f32 && !kept_in_f32(spec.name, spec.shape.size());
        w.tensors.emplace(spec.name, file_for(spec.name).weight(spec.name, spec.shape, how));
    }
    return w;
}

inline void save_model_dir(const std::filesystem::path& dir, const ModelWeights& weights, DType dtype)
{
    require<InvalidArgument>(!weights.holds, "save_model_dir needs every tensor; these weights hold a rank's share");
    check_weights(weights);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    require<IoError>(!ec, "cannot create model directory ", json::detail::describe_text(dir.string(), 1024), ": ",
                     ec.message());
    std::vector<TensorToWrite> tensors;
    std::deque<Tensor<float>> values;  // widened copies of the tensors not stored in fp32 (stable addresses)
    for (const auto& spec : expected_tensors(weights.config)) {
        const WeightTensor& t = weights.at(spec.name);
        std::span<const float> v;
        if (t.dtype() == DType::f32) {
            v = {reinterpret_cast<const float*>(t.bytes()), static_cast<std::size_t>(t.size())};
        } else {
            values.push_back(t.to_float());
            v = values.back().span();
        }
        tensors.push_back({spec.name, dtype, spec.shape, v});
    }
    save_safetensors(dir / weights_file_name, tensors, {{"format", "pt"}});
    save_config_json(dir / config_file_name, weights.config);
}

}  // namespace foe
