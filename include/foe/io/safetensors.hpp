#pragma once
// Reader and writer of the safetensors format, the weight files of Hugging Face models.
//
// Layout: an 8-byte little-endian u64 header length N, N bytes of JSON header
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value"}}
// (trailing spaces allowed), then the data region; offsets are relative to its start.
//
// A weight file is untrusted input. The reader validates it like Hugging Face's reference
// implementation before handing out a single byte: the header length is capped and must fit in
// the file, every entry has exactly the expected fields and types, the element count is computed
// with overflow checks and must match the byte range, and the ranges, sorted, must tile the data
// region exactly (no overlap, no gap, nothing after the last tensor). Only F32, BF16 and F16 are
// accepted, the dtypes foe computes with. Every error names the file, the tensor and the value.
//
// All multi-byte values are assembled byte by byte, so the code is independent of the host's
// endianness and never performs an unaligned load.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "foe/core/dtype.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"

namespace foe {

/// Largest header a reader accepts, as in Hugging Face's reader: the header is parsed in memory
/// before anything is checked, so its size must be bounded independently of the file's.
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

/// The optional "__metadata__" of a safetensors header: string keys to string values.
using SafetensorsMetadata = std::map<std::string, std::string>;

/// One tensor of a safetensors file, as its header describes it (validated).
struct TensorInfo {
    std::string name;
    DType dtype = DType::f32;
    std::vector<index_t> shape;  ///< empty for a scalar
    index_t begin = 0;           ///< first byte, relative to the start of the data region
    index_t end = 0;             ///< one past the last byte

    /// Number of elements (the product of the shape; 1 for a scalar).
    [[nodiscard]] index_t numel() const noexcept;
    /// Number of bytes, end - begin == numel() * dtype_size(dtype).
    [[nodiscard]] index_t byte_size() const noexcept { return end - begin; }
};

/// A validated safetensors file held in memory.
class SafetensorsFile {
public:
    /// Reads and validates the whole file; IoError if it cannot be read, FormatError if it is
    /// malformed. Messages name the path.
    [[nodiscard]] static SafetensorsFile open(const std::filesystem::path& path);

    /// Validates bytes already in memory; source_name stands for the file in messages.
    [[nodiscard]] static SafetensorsFile from_bytes(std::vector<std::byte> bytes, std::string source_name);

    [[nodiscard]] const std::string& source_name() const noexcept { return source_; }

    /// The tensors in header order.
    [[nodiscard]] const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }

    /// The tensor named name, or nullptr (O(log n)).
    [[nodiscard]] const TensorInfo* find(std::string_view name) const noexcept;
    [[nodiscard]] bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }

    /// The tensor named name; FormatError naming the file and the tensor if it is missing, since a
    /// weight file that lacks a tensor the model needs is malformed for that model.
    [[nodiscard]] const TensorInfo& at(std::string_view name) const;

    [[nodiscard]] const SafetensorsMetadata& metadata() const noexcept { return metadata_; }

    /// The raw little-endian bytes of a tensor of this file. InvalidArgument if info's range is
    /// not inside this file's data region (an info taken from another file).
    [[nodiscard]] std::span<const std::byte> bytes(const TensorInfo& info) const;

    /// The tensor converted to float (exact for all three dtypes).
    [[nodiscard]] Tensor<float> read_float(std::string_view name) const;

    /// Like read_float(name), and FormatError unless the stored shape is expected_shape: a weight
    /// of the wrong shape must fail at load time, with both shapes in the message, rather than as
    /// an out-of-bounds access later.
    [[nodiscard]] Tensor<float> read_float(std::string_view name, std::span<const index_t> expected_shape) const;
    [[nodiscard]] Tensor<float> read_float(std::string_view name, std::initializer_list<index_t> expected_shape) const
    {
        return read_float(name, std::span<const index_t>(expected_shape.begin(), expected_shape.size()));
    }

private:
    SafetensorsFile() = default;

    std::string source_;
    std::vector<std::byte> bytes_;        ///< the whole file
    std::size_t data_start_ = 0;          ///< 8 + header length
    std::vector<TensorInfo> tensors_;     ///< header order
    std::vector<std::size_t> by_name_;    ///< indices into tensors_, sorted by name
    SafetensorsMetadata metadata_;
};

/// A tensor to write: float values converted to dtype (round to nearest even for BF16/F16).
struct TensorToWrite {
    std::string name;
    DType dtype = DType::f32;
    std::vector<index_t> shape;
    std::span<const float> values;  ///< row-major, exactly the product of shape
};

/// The bytes of a safetensors file holding tensors in the given order, contiguous, after a header
/// padded with spaces to a multiple of 8 bytes (as Hugging Face writes it, so that the data region
/// is 8-byte aligned). InvalidArgument for a duplicate or reserved name, a negative extent, or a
/// value count that does not match the shape.
[[nodiscard]] std::vector<std::byte> serialize_safetensors(std::span<const TensorToWrite> tensors,
                                                           const SafetensorsMetadata& metadata = {});

/// serialize_safetensors() written to path through a temporary file and a rename. IoError on failure.
void save_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                      const SafetensorsMetadata& metadata = {});

// =============================================================================================
// Definitions
// =============================================================================================

namespace detail::safetensors {

inline constexpr std::string_view metadata_key = "__metadata__";

/// "[2, 3]", for messages.
[[nodiscard]] inline std::string shape_string(std::span<const index_t> shape)
{
    std::ostringstream os;
    os << '[';
    for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << ']';
    return os.str();
}

/// a * b, or nullopt if it overflows index_t (both non-negative).
[[nodiscard]] inline std::optional<index_t> checked_mul(index_t a, index_t b) noexcept
{
    if (a != 0 && b > std::numeric_limits<index_t>::max() / a) return std::nullopt;
    return a * b;
}

/// The product of the extents, or nullopt if it overflows.
[[nodiscard]] inline std::optional<index_t> checked_numel(std::span<const index_t> shape) noexcept
{
    index_t n = 1;
    for (index_t e : shape) {
        const auto p = checked_mul(n, e);
        if (!p) return std::nullopt;
        n = *p;
    }
    return n;
}

[[nodiscard]] inline std::uint64_t load_u64_le(const std::byte* p) noexcept
{
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
    return v;
}
[[nodiscard]] inline std::uint32_t load_u32_le(const std::byte* p) noexcept
{
    std::uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint32_t>(p[i]);
    return v;
}
[[nodiscard]] inline std::uint16_t load_u16_le(const std::byte* p) noexcept
{
    return static_cast<std::uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
}
inline void store_le(std::byte* p, std::uint64_t v, int n) noexcept
{
    for (int i = 0; i < n; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffu);
}

/// Checks the header's entries and fills tensors and metadata. data_size is the size of the data
/// region. Errors are FormatErrors prefixed with src.
inline void parse_header(const json::Value& header, std::string_view src, index_t data_size,
                         std::vector<TensorInfo>& tensors, SafetensorsMetadata& metadata)
{
    using json::detail::describe;
    using json::detail::describe_text;
    if (!header.is_object())
        raise<FormatError>(src, ": header must be a JSON object, got ", json::kind_name(header.kind()));

    for (const auto& [name, entry] : header.as_object()) {
        if (name == metadata_key) {
            if (entry.is_null()) continue;  // Hugging Face writes no metadata as absent, reads null too
            if (!entry.is_object())
                raise<FormatError>(src, ": ", metadata_key, " must be an object of strings, got ", describe(entry));
            for (const auto& [key, value] : entry.as_object()) {
                if (!value.is_string())
                    raise<FormatError>(src, ": ", metadata_key, " value of key ", describe_text(key),
                                       " must be a string, got ", describe(value));
                metadata.emplace(key, value.as_string());
            }
            continue;
        }

        const std::string tensor = "tensor " + describe_text(name);
        if (!entry.is_object())
            raise<FormatError>(src, ": ", tensor, ": entry must be an object with dtype, shape and data_offsets, got ",
                               describe(entry));
        const json::Value* dtype = nullptr;
        const json::Value* shape = nullptr;
        const json::Value* offsets = nullptr;
        for (const auto& [field, value] : entry.as_object()) {
            if (field == "dtype") dtype = &value;
            else if (field == "shape") shape = &value;
            else if (field == "data_offsets") offsets = &value;
            else
                raise<FormatError>(src, ": ", tensor, ": unknown field ", describe_text(field),
                                   " (expected dtype, shape and data_offsets)");
        }
        const auto require_field = [&](const json::Value* value, std::string_view field) {
            if (value == nullptr) raise<FormatError>(src, ": ", tensor, ": missing field \"", field, "\"");
        };
        require_field(dtype, "dtype");
        require_field(shape, "shape");
        require_field(offsets, "data_offsets");

        TensorInfo info;
        info.name = name;

        if (!dtype->is_string())
            raise<FormatError>(src, ": ", tensor, ": dtype must be a string, got ", describe(*dtype));
        const auto parsed = parse_dtype(dtype->as_string());
        if (!parsed)
            raise<FormatError>(src, ": ", tensor, ": dtype ", describe_text(dtype->as_string()),
                               " is not supported (supported dtypes: F32, BF16, F16)");
        info.dtype = *parsed;

        if (!shape->is_array())
            raise<FormatError>(src, ": ", tensor, ": shape must be an array of non-negative integers, got ",
                               describe(*shape));
        const json::Array& extents = shape->as_array();
        info.shape.reserve(extents.size());
        for (std::size_t d = 0; d < extents.size(); ++d) {
            const json::Value& e = extents[d];
            if (!e.is_integer() || e.as_int() < 0)
                raise<FormatError>(src, ": ", tensor, ": shape ", describe(*shape), " has extent ", describe(e),
                                   " at dimension ", d, "; extents must be non-negative integers");
            info.shape.push_back(e.as_int());
        }

        if (!offsets->is_array() || offsets->as_array().size() != 2 ||
            !std::all_of(offsets->as_array().begin(), offsets->as_array().end(),
                         [](const json::Value& v) { return v.is_integer() && v.as_int() >= 0; }))
            raise<FormatError>(src, ": ", tensor, ": data_offsets must be an array of two non-negative integers, got ",
                               describe(*offsets));
        info.begin = offsets->as_array()[0].as_int();
        info.end = offsets->as_array()[1].as_int();
        const std::string range = "data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ")";
        if (info.begin > info.end) raise<FormatError>(src, ": ", tensor, ": ", range, " end before they begin");

        const auto numel = checked_numel(info.shape);
        const auto nbytes = numel ? checked_mul(*numel, dtype_size(info.dtype)) : std::nullopt;
        if (!nbytes)
            raise<FormatError>(src, ": ", tensor, ": shape ", shape_string(info.shape), " of ", dtype_name(info.dtype),
                               " needs more bytes than fit in 64 bits");
        if (info.end - info.begin != *nbytes)
            raise<FormatError>(src, ": ", tensor, ": ", range, " hold ", info.end - info.begin, " bytes but shape ",
                               shape_string(info.shape), " of ", dtype_name(info.dtype), " needs ", *nbytes);
        if (info.end > data_size)
            raise<FormatError>(src, ": ", tensor, ": ", range, " extend past the end of the data region, which holds ",
                               data_size, " bytes (is the file truncated?)");
        tensors.push_back(std::move(info));
    }

    // Sorted by range, the tensors must tile [0, data_size) exactly: an overlap lets one write
    // alias another, and a gap or a tail hides bytes no one checks (Hugging Face rejects both).
    std::vector<const TensorInfo*> sorted;
    sorted.reserve(tensors.size());
    for (const auto& t : tensors) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(), [](const TensorInfo* a, const TensorInfo* b) {
        return std::pair{a->begin, a->end} < std::pair{b->begin, b->end};
    });
    index_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* t : sorted) {
        if (t->begin < covered)
            raise<FormatError>(src, ": tensors ", describe_text(previous->name), " [", previous->begin, ", ",
                               previous->end, ") and ", describe_text(t->name), " [", t->begin, ", ", t->end,
                               ") overlap");
        if (t->begin > covered)
            raise<FormatError>(src, ": bytes [", covered, ", ", t->begin, ") of the data region belong to no tensor (",
                               previous ? "between " + describe_text(previous->name) + " and " : "before ",
                               describe_text(t->name), ")");
        covered = t->end;
        previous = t;
    }
    if (covered != data_size)
        raise<FormatError>(src, ": bytes [", covered, ", ", data_size, ") of the data region belong to no tensor (",
                           previous ? "after the last tensor " + describe_text(previous->name)
                                    : "the header lists no tensors",
                           ")");
}

}  // namespace detail::safetensors

inline index_t TensorInfo::numel() const noexcept
{
    index_t n = 1;
    for (index_t e : shape) n *= e;  // validated not to overflow when read from a file
    return n;
}

inline SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path)
{
    return from_bytes(detail::io::read_whole_file(path), path.string());
}

inline SafetensorsFile SafetensorsFile::from_bytes(std::vector<std::byte> bytes, std::string source_name)
{
    namespace st = detail::safetensors;
    SafetensorsFile f;
    f.source_ = std::move(source_name);
    f.bytes_ = std::move(bytes);
    const std::string& src = f.source_;
    const std::uint64_t file_size = f.bytes_.size();

    if (file_size < 8)
        raise<FormatError>(src, ": file is ", file_size, " bytes, too short for the 8-byte header length");
    const std::uint64_t header_size = st::load_u64_le(f.bytes_.data());
    if (header_size > safetensors_max_header_bytes)
        raise<FormatError>(src, ": header length ", header_size, " exceeds the limit of ",
                           safetensors_max_header_bytes, " bytes");
    if (header_size > file_size - 8)
        raise<FormatError>(src, ": header length ", header_size, " points past the end of the file: only ",
                           file_size - 8, " bytes follow the 8-byte length");
    f.data_start_ = static_cast<std::size_t>(8 + header_size);

    const std::string_view header_text(reinterpret_cast<const char*>(f.bytes_.data() + 8),
                                       static_cast<std::size_t>(header_size));
    const json::Value header = json::parse(header_text, src + " (header)");
    // The data region is at most file_size bytes, which a std::vector holds, so it fits in index_t.
    const auto data_size = static_cast<index_t>(file_size - 8 - header_size);
    st::parse_header(header, src, data_size, f.tensors_, f.metadata_);

    f.by_name_.resize(f.tensors_.size());
    for (std::size_t i = 0; i < f.by_name_.size(); ++i) f.by_name_[i] = i;
    std::sort(f.by_name_.begin(), f.by_name_.end(),
              [&](std::size_t a, std::size_t b) { return f.tensors_[a].name < f.tensors_[b].name; });
    return f;
}

inline const TensorInfo* SafetensorsFile::find(std::string_view name) const noexcept
{
    const auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name,
                                     [&](std::size_t i, std::string_view n) { return tensors_[i].name < n; });
    if (it == by_name_.end() || tensors_[*it].name != name) return nullptr;
    return &tensors_[*it];
}

inline const TensorInfo& SafetensorsFile::at(std::string_view name) const
{
    const TensorInfo* info = find(name);
    if (info == nullptr)
        raise<FormatError>(source_, ": missing tensor ", json::detail::describe_text(name), " (the file holds ",
                           tensors_.size(), " tensors)");
    return *info;
}

inline std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& info) const
{
    const auto data_size = static_cast<index_t>(bytes_.size() - data_start_);
    require<InvalidArgument>(info.begin >= 0 && info.begin <= info.end && info.end <= data_size, source_,
                             ": tensor ", json::detail::describe_text(info.name), " with byte range [", info.begin,
                             ", ", info.end, ") is not a tensor of this file (data region of ", data_size, " bytes)");
    return std::span<const std::byte>(bytes_).subspan(data_start_ + static_cast<std::size_t>(info.begin),
                                                      static_cast<std::size_t>(info.end - info.begin));
}

inline Tensor<float> SafetensorsFile::read_float(std::string_view name) const
{
    namespace st = detail::safetensors;
    const TensorInfo& info = at(name);
    const std::span<const std::byte> raw = bytes(info);
    Tensor<float> out(info.shape);
    float* dst = out.data();
    const auto n = static_cast<std::size_t>(out.size());
    switch (info.dtype) {
    case DType::f32:
        for (std::size_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(st::load_u32_le(&raw[4 * i]));
        break;
    case DType::bf16:
        for (std::size_t i = 0; i < n; ++i)
            dst[i] = static_cast<float>(bfloat16::from_bits(st::load_u16_le(&raw[2 * i])));
        break;
    case DType::f16:
        for (std::size_t i = 0; i < n; ++i)
            dst[i] = static_cast<float>(float16::from_bits(st::load_u16_le(&raw[2 * i])));
        break;
    }
    return out;
}

inline Tensor<float> SafetensorsFile::read_float(std::string_view name, std::span<const index_t> expected_shape) const
{
    const TensorInfo& info = at(name);
    if (!std::equal(info.shape.begin(), info.shape.end(), expected_shape.begin(), expected_shape.end()))
        raise<FormatError>(source_, ": tensor ", json::detail::describe_text(name), " has shape ",
                           detail::safetensors::shape_string(info.shape), ", expected ",
                           detail::safetensors::shape_string(expected_shape));
    return read_float(name);
}

inline std::vector<std::byte> serialize_safetensors(std::span<const TensorToWrite> tensors,
                                                    const SafetensorsMetadata& metadata)
{
    namespace st = detail::safetensors;
    using json::detail::describe_text;

    // Check the arguments first, so that nothing is built for a call that must fail.
    std::vector<std::string_view> names;
    names.reserve(tensors.size());
    index_t data_size = 0;
    for (const TensorToWrite& t : tensors) {
        const std::string tensor = "tensor " + describe_text(t.name);
        require<InvalidArgument>(t.name != st::metadata_key, "serialize_safetensors: ", tensor,
                                 " uses the name reserved for the metadata");
        for (std::size_t d = 0; d < t.shape.size(); ++d)
            require<InvalidArgument>(t.shape[d] >= 0, "serialize_safetensors: ", tensor, ": shape ",
                                     st::shape_string(t.shape), " has the negative extent ", t.shape[d],
                                     " at dimension ", d);
        const auto numel = st::checked_numel(t.shape);
        require<InvalidArgument>(numel && static_cast<std::uint64_t>(*numel) == t.values.size(),
                                 "serialize_safetensors: ", tensor, ": shape ", st::shape_string(t.shape), " holds ",
                                 numel ? std::to_string(*numel) : std::string("more than 2^63"), " elements but ",
                                 t.values.size(), " values were given");
        const auto bytes = st::checked_mul(*numel, dtype_size(t.dtype));
        require<InvalidArgument>(bytes && *bytes <= std::numeric_limits<index_t>::max() - data_size,
                                 "serialize_safetensors: ", tensor,
                                 ": the tensors up to this one need more than 2^63 bytes");
        data_size += *bytes;
        names.push_back(t.name);
    }
    std::sort(names.begin(), names.end());
    const auto dup = std::adjacent_find(names.begin(), names.end());
    require<InvalidArgument>(dup == names.end(), "serialize_safetensors: duplicate tensor name ",
                             dup == names.end() ? std::string() : describe_text(*dup));

    // Header: metadata first, as Hugging Face writes it, then the tensors in the order given.
    json::Object entries;
    entries.reserve(tensors.size() + 1);
    if (!metadata.empty()) {
        json::Object meta;
        for (const auto& [key, value] : metadata) meta.emplace_back(key, json::Value(value));
        entries.emplace_back(std::string(st::metadata_key), json::Value(std::move(meta)));
    }
    index_t offset = 0;
    for (const TensorToWrite& t : tensors) {
        const index_t size = static_cast<index_t>(t.values.size()) * dtype_size(t.dtype);
        json::Array shape(t.shape.begin(), t.shape.end());
        entries.emplace_back(t.name, json::Value(json::Object{
                                         {"dtype", json::Value(dtype_name(t.dtype))},
                                         {"shape", json::Value(std::move(shape))},
                                         {"data_offsets", json::Value(json::Array{offset, offset + size})},
                                     }));
        offset += size;
    }
    std::string header = json::dump(json::Value(std::move(entries)));
    header.append((8 - header.size() % 8) % 8, ' ');

    std::vector<std::byte> out(8 + header.size() + static_cast<std::size_t>(data_size));
    st::store_le(out.data(), header.size(), 8);
    std::memcpy(out.data() + 8, header.data(), header.size());
    std::byte* p = out.data() + 8 + header.size();
    for (const TensorToWrite& t : tensors) {
        switch (t.dtype) {
        case DType::f32:
            for (float v : t.values) p = (st::store_le(p, std::bit_cast<std::uint32_t>(v), 4), p + 4);
            break;
        case DType::bf16:
            for (float v : t.values) p = (st::store_le(p, bfloat16(v).bits, 2), p + 2);
            break;
        case DType::f16:
            for (float v : t.values) p = (st::store_le(p, float16(v).bits, 2), p + 2);
            break;
        }
    }
    return out;
}

inline void save_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                             const SafetensorsMetadata& metadata)
{
    detail::io::write_file_atomically(path, serialize_safetensors(tensors, metadata));
}

}  // namespace foe
