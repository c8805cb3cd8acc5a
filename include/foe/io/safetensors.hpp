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
// The cost of refusing a file is bounded by its header, not by its size: open() reads the 8-byte
// length, then the header alone, and validates it; a tensor's bytes are read only when that
// tensor is asked for, so a rank that needs a tenth of a shard reads a tenth of it. The header is
// walked, not parsed into a JSON tree (json::detail::Parser's token interface): what is kept is
// the tensor list, a small multiple of the header's size, whatever the header holds. Running out
// of memory while reading is an IoError naming the file, not a bare std::bad_alloc.
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
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "foe/core/dtype.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"
#include "foe/core/weight.hpp"
#include "foe/io/detail/file.hpp"
#include "foe/io/json.hpp"

namespace foe {

/// Largest header a reader accepts, Hugging Face's limit (MAX_HEADER_SIZE in the safetensors
/// crate): the header is read into memory before anything is checked, so its size must be bounded
/// independently of the file's. Real headers are far smaller (a few MB for thousands of tensors).
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

/// Most entries "__metadata__" may hold: each costs about 100 bytes of map node for as few as 7
/// bytes of header, so without a cap a 100 MB header could cost 1.5 GB. Files hold a handful.
inline constexpr std::size_t safetensors_max_metadata_entries = 65'536;

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

/// A validated safetensors file: its header in memory, its tensors read on demand.
class SafetensorsFile {
public:
    /// Reads and validates the header of the file at path, and nothing else: the tensors' bytes
    /// are read by read_float() and read_bytes(), from the file kept open. IoError if the file
    /// cannot be read (or memory runs out), FormatError if it is malformed. Messages name the path.
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

    /// The raw little-endian bytes of a tensor of this file, read from it. InvalidArgument if
    /// info's range is not inside this file's data region (an info taken from another file).
    [[nodiscard]] std::vector<std::byte> read_bytes(const TensorInfo& info) const;

    /// The tensor converted to float (exact for all three dtypes), read from the file in chunks
    /// so that only the result is held in full.
    [[nodiscard]] Tensor<float> read_float(std::string_view name) const;

    /// Like read_float(name), and FormatError unless the stored shape is expected_shape: a weight
    /// of the wrong shape must fail at load time, with both shapes in the message, rather than as
    /// an out-of-bounds access later.
    [[nodiscard]] Tensor<float> read_float(std::string_view name, std::span<const index_t> expected_shape) const;
    [[nodiscard]] Tensor<float> read_float(std::string_view name, std::initializer_list<index_t> expected_shape) const
    {
        return read_float(name, std::span<const index_t>(expected_shape.begin(), expected_shape.size()));
    }

    /// How weight() hands out a tensor.
    struct WeightOptions {
        /// Use the bytes in place in a mapping of the file (opened with open(); a tensor whose
        /// bytes are not aligned for its dtype, or a big-endian host, falls back to a copy).
        bool map = true;
        /// Keep bf16/fp16 in their type (false: widen to fp32, twice the memory of bf16).
        bool keep_dtype = true;
        /// With map: read the tensor's pages now rather than at their first use.
        bool prefetch = true;
    };

    /// The tensor as a model weight, checked to have expected_shape (FormatError naming both
    /// shapes otherwise). Mapped, it shares the file's mapping, which stays alive as long as any
    /// tensor taken from it does.
    [[nodiscard]] WeightTensor weight(std::string_view name, std::span<const index_t> expected_shape,
                                      const WeightOptions& options) const;

private:
    SafetensorsFile() = default;

    /// Reads and validates the header from the first bytes of a file of file_size bytes;
    /// read(offset, out) fills out from the file.
    template <class Read>
    void read_header(std::uint64_t file_size, Read&& read);

    /// The bytes [begin, begin + size) of the data region: a view of bytes_, or read from file_
    /// into buffer (resized to size).
    [[nodiscard]] std::span<const std::byte> data(index_t begin, std::size_t size, std::vector<std::byte>& buffer) const;

    /// Checks that info is a tensor of this file (InvalidArgument otherwise).
    void check_range(const TensorInfo& info) const;

    std::string source_;
    std::filesystem::path path_;                            ///< for the mapping; empty for from_bytes()
    std::shared_ptr<const detail::io::ReadOnlyFile> file_;  ///< the open file; null for from_bytes()
    mutable std::shared_ptr<const detail::io::MappedFile> mapping_;  ///< made by the first mapped weight()
    std::vector<std::byte> bytes_;        ///< the whole file, for from_bytes() only
    std::uint64_t data_start_ = 0;        ///< 8 + header length
    index_t data_size_ = 0;               ///< bytes in the data region
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

/// What a validated header holds.
struct Header {
    std::vector<TensorInfo> tensors;  ///< header order
    std::vector<std::size_t> by_name; ///< indices into tensors, sorted by name
    SafetensorsMetadata metadata;
};

/// Smallest text of a tensor entry, `"":{"dtype":"F32","shape":[],"data_offsets":[0,0]}`: with
/// it, the count of a header's members bounds the tensors it can describe.
inline constexpr std::size_t min_entry_bytes = 50;

/// True when the parser is at a non-negative integer literal; consumes it into *out if so.
[[nodiscard]] inline bool read_count(json::detail::Parser& p, index_t* out)
{
    if (!p.at_number()) return false;
    const json::Value v = p.number();
    if (!v.is_integer() || v.as_int() < 0) return false;
    *out = v.as_int();
    return true;
}

/// "__metadata__": null, or an object of strings.
inline void read_metadata(json::detail::Parser& p, std::string_view src, SafetensorsMetadata& metadata)
{
    using json::detail::describe_text;
    if (p.at_null()) {  // Hugging Face writes no metadata as absent, reads null too
        p.skip(1);
        return;
    }
    if (!p.at_object())
        raise<FormatError>(src, ": ", metadata_key, " must be an object of strings, got ", p.describe_value());
    p.members(2, [&](std::string_view key_view, std::size_t key_offset) {
        std::string key(key_view);
        if (!p.at_string())
            raise<FormatError>(src, ": ", metadata_key, " value of key ", describe_text(key),
                               " must be a string, got ", p.describe_value());
        if (metadata.contains(key)) p.fail(key_offset, "duplicate object key ", describe_text(key));
        if (metadata.size() >= safetensors_max_metadata_entries)
            raise<FormatError>(src, ": ", metadata_key, " holds more than ", safetensors_max_metadata_entries,
                               " entries (the limit; files written by Hugging Face hold one or a few)");
        metadata.emplace(std::move(key), p.string());
    });
}

/// One tensor entry, at p (after its key); checks it and fills info (whose name is set).
inline void read_entry(json::detail::Parser& p, std::string_view src, index_t data_size, TensorInfo& info)
{
    using json::detail::describe_text;
    const std::string tensor = "tensor " + describe_text(info.name);
    if (!p.at_object())
        raise<FormatError>(src, ": ", tensor, ": entry must be an object with dtype, shape and data_offsets, got ",
                           p.describe_value());
    // Where each field's value starts: they are read in a fixed order below, so that a file with
    // two faults reports the same one whatever the order of its fields.
    std::optional<std::size_t> dtype_at, shape_at, offsets_at;
    p.members(2, [&](std::string_view field, std::size_t field_offset) {
        std::optional<std::size_t>* slot = field == "dtype"          ? &dtype_at
                                           : field == "shape"        ? &shape_at
                                           : field == "data_offsets" ? &offsets_at
                                                                     : nullptr;
        if (slot == nullptr)
            raise<FormatError>(src, ": ", tensor, ": unknown field ", describe_text(field),
                               " (expected dtype, shape and data_offsets)");
        if (*slot) p.fail(field_offset, "duplicate object key ", describe_text(field));
        *slot = p.pos();
        p.skip(2);
    });
    const auto require_field = [&](const std::optional<std::size_t>& at, std::string_view field) {
        if (!at) raise<FormatError>(src, ": ", tensor, ": missing field \"", field, "\"");
    };
    require_field(dtype_at, "dtype");
    require_field(shape_at, "shape");
    require_field(offsets_at, "data_offsets");

    json::detail::Parser dtype = p.at(*dtype_at);
    if (!dtype.at_string())
        raise<FormatError>(src, ": ", tensor, ": dtype must be a string, got ", dtype.describe_value());
    const std::string dtype_text = dtype.string();
    const auto parsed = parse_dtype(dtype_text);
    if (!parsed)
        raise<FormatError>(src, ": ", tensor, ": dtype ", describe_text(dtype_text),
                           " is not supported (supported dtypes: F32, BF16, F16)");
    info.dtype = *parsed;

    // The shape twice: once to check every extent and count them, once to keep them in a vector
    // of exactly that size (growing it would cost up to 3 times as much at the peak).
    const json::detail::Parser shape = p.at(*shape_at);
    if (!shape.at_array())
        raise<FormatError>(src, ": ", tensor, ": shape must be an array of non-negative integers, got ",
                           shape.describe_value());
    std::size_t rank = 0;
    {
        json::detail::Parser count = shape;
        count.elements(3, [&](std::size_t d) {
            const std::size_t extent_at = count.pos();
            index_t extent = 0;
            if (!read_count(count, &extent))
                raise<FormatError>(src, ": ", tensor, ": shape ", shape.describe_value(), " has extent ",
                                   count.at(extent_at).describe_value(), " at dimension ", d,
                                   "; extents must be non-negative integers");
            ++rank;
        });
    }
    info.shape.reserve(rank);
    {
        json::detail::Parser fill = shape;
        fill.elements(3, [&](std::size_t) {
            index_t extent = 0;
            (void)read_count(fill, &extent);  // checked above
            info.shape.push_back(extent);
        });
    }

    const json::detail::Parser offsets = p.at(*offsets_at);
    index_t range[2] = {0, 0};
    std::size_t count = 0;
    const auto bad_offsets = [&] {
        raise<FormatError>(src, ": ", tensor, ": data_offsets must be an array of two non-negative integers, got ",
                           offsets.describe_value());
    };
    if (!offsets.at_array()) bad_offsets();
    {
        json::detail::Parser walk = offsets;
        walk.elements(3, [&](std::size_t i) {
            if (i >= 2 || !read_count(walk, &range[i])) bad_offsets();
            ++count;
        });
    }
    if (count != 2) bad_offsets();
    info.begin = range[0];
    info.end = range[1];
    const std::string range_text =
        "data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ")";
    if (info.begin > info.end) raise<FormatError>(src, ": ", tensor, ": ", range_text, " end before they begin");

    const auto numel = checked_numel(info.shape);
    const auto nbytes = numel ? checked_mul(*numel, dtype_size(info.dtype)) : std::nullopt;
    if (!nbytes)
        raise<FormatError>(src, ": ", tensor, ": shape ", shape_string(info.shape), " of ", dtype_name(info.dtype),
                           " needs more bytes than fit in 64 bits");
    if (info.end - info.begin != *nbytes)
        raise<FormatError>(src, ": ", tensor, ": ", range_text, " hold ", info.end - info.begin, " bytes but shape ",
                           shape_string(info.shape), " of ", dtype_name(info.dtype), " needs ", *nbytes);
    if (info.end > data_size)
        raise<FormatError>(src, ": ", tensor, ": ", range_text, " extend past the end of the data region, which holds ",
                           data_size, " bytes (is the file truncated?)");
}

/// Checks the header text and fills h. data_size is the size of the data region. Errors are
/// FormatErrors prefixed with src ("src (header)" for JSON syntax).
inline void parse_header(std::string_view text, const std::string& src, index_t data_size, Header& h)
{
    using json::detail::describe_text;
    const std::string json_src = src + " (header)";
    // The syntax of the whole header first, keeping nothing: a header that is not JSON is
    // reported as such, and costs no memory beyond its text.
    const std::size_t members = json::detail::Parser(text, json_src).check_document();

    json::detail::Parser p(text, json_src);
    p.skip_whitespace();
    if (!p.at_object())
        raise<FormatError>(src, ": header must be a JSON object, got ", json::kind_name(p.peek_kind()));
    // Exactly as many slots as the header can describe tensors: growing the vector instead would
    // hold up to three times as many at the peak.
    h.tensors.reserve(std::min(members, text.size() / min_entry_bytes + 1));
    std::vector<std::size_t> key_offsets;  // of each tensor's name, for a duplicate's message
    key_offsets.reserve(h.tensors.capacity());
    std::optional<std::size_t> metadata_at;
    p.members(1, [&](std::string_view key, std::size_t key_offset) {
        if (key == metadata_key) {
            if (metadata_at) p.fail(key_offset, "duplicate object key ", describe_text(key));
            metadata_at = key_offset;
            read_metadata(p, src, h.metadata);
            return;
        }
        TensorInfo info;
        info.name = std::string(key);
        read_entry(p, src, data_size, info);
        h.tensors.push_back(std::move(info));
        key_offsets.push_back(key_offset);
    });

    // Names must be unique, as keys of one JSON object (two readers could take different ones);
    // reported at the first duplicate in the text, as json::parse() does.
    h.by_name.resize(h.tensors.size());
    for (std::size_t i = 0; i < h.by_name.size(); ++i) h.by_name[i] = i;
    std::sort(h.by_name.begin(), h.by_name.end(), [&](std::size_t a, std::size_t b) {
        return std::pair<std::string_view, std::size_t>{h.tensors[a].name, a} <
               std::pair<std::string_view, std::size_t>{h.tensors[b].name, b};
    });
    std::size_t first_duplicate = h.tensors.size();
    for (std::size_t i = 1; i < h.by_name.size(); ++i)
        if (h.tensors[h.by_name[i]].name == h.tensors[h.by_name[i - 1]].name)
            first_duplicate = std::min(first_duplicate, h.by_name[i]);  // the later of an equal pair
    if (first_duplicate < h.tensors.size())
        p.fail(key_offsets[first_duplicate], "duplicate object key ", describe_text(h.tensors[first_duplicate].name));

    // Sorted by range, the tensors must tile [0, data_size) exactly: an overlap lets one write
    // alias another, and a gap or a tail hides bytes no one checks (Hugging Face rejects both).
    std::vector<const TensorInfo*> sorted;
    sorted.reserve(h.tensors.size());
    for (const auto& t : h.tensors) sorted.push_back(&t);
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

template <class Read>
void SafetensorsFile::read_header(std::uint64_t file_size, Read&& read)
{
    namespace st = detail::safetensors;
    const std::string& src = source_;
    if (file_size < 8)
        raise<FormatError>(src, ": file is ", file_size, " bytes, too short for the 8-byte header length");
    std::byte length[8];
    read(0, std::span<std::byte>(length));
    const std::uint64_t header_size = st::load_u64_le(length);
    if (header_size > safetensors_max_header_bytes)
        raise<FormatError>(src, ": header length ", header_size, " exceeds the limit of ",
                           safetensors_max_header_bytes, " bytes");
    if (header_size > file_size - 8)
        raise<FormatError>(src, ": header length ", header_size, " points past the end of the file: only ",
                           file_size - 8, " bytes follow the 8-byte length");
    data_start_ = 8 + header_size;
    // The data region is at most file_size - 8 bytes, which is below 2^63 for any file a file
    // system holds, so it fits in index_t.
    data_size_ = static_cast<index_t>(file_size - data_start_);

    st::Header h;
    try {
        std::string header(static_cast<std::size_t>(header_size), '\0');
        read(8, std::as_writable_bytes(std::span<char>(header)));
        st::parse_header(header, src, data_size_, h);
    } catch (const std::bad_alloc&) {
        raise<IoError>(src, ": out of memory while reading its header of ", header_size, " bytes");
    }
    tensors_ = std::move(h.tensors);
    by_name_ = std::move(h.by_name);
    metadata_ = std::move(h.metadata);
}

inline SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path)
{
    SafetensorsFile f;
    f.file_ = detail::io::ReadOnlyFile::open(path);
    f.source_ = f.file_->name();
    f.path_ = path;
    const detail::io::ReadOnlyFile& file = *f.file_;
    f.read_header(file.size(), [&](std::uint64_t offset, std::span<std::byte> out) { file.read(offset, out); });
    return f;
}

inline SafetensorsFile SafetensorsFile::from_bytes(std::vector<std::byte> bytes, std::string source_name)
{
    SafetensorsFile f;
    f.source_ = std::move(source_name);
    f.bytes_ = std::move(bytes);
    const std::vector<std::byte>& b = f.bytes_;
    f.read_header(b.size(), [&](std::uint64_t offset, std::span<std::byte> out) {
        std::copy_n(b.begin() + static_cast<std::ptrdiff_t>(offset), out.size(), out.begin());  // checked by read_header
    });
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

inline void SafetensorsFile::check_range(const TensorInfo& info) const
{
    require<InvalidArgument>(info.begin >= 0 && info.begin <= info.end && info.end <= data_size_, source_,
                             ": tensor ", json::detail::describe_text(info.name), " with byte range [", info.begin,
                             ", ", info.end, ") is not a tensor of this file (data region of ", data_size_, " bytes)");
}

inline std::span<const std::byte> SafetensorsFile::data(index_t begin, std::size_t size,
                                                         std::vector<std::byte>& buffer) const
{
    const std::uint64_t offset = data_start_ + static_cast<std::uint64_t>(begin);
    if (!file_) return std::span<const std::byte>(bytes_).subspan(static_cast<std::size_t>(offset), size);
    buffer.resize(size);
    file_->read(offset, buffer);
    return buffer;
}

inline std::vector<std::byte> SafetensorsFile::read_bytes(const TensorInfo& info) const
{
    check_range(info);
    const auto size = static_cast<std::size_t>(info.end - info.begin);
    try {
        std::vector<std::byte> out;
        const std::span<const std::byte> raw = data(info.begin, size, out);
        if (raw.data() != out.data()) out.assign(raw.begin(), raw.end());
        return out;
    } catch (const std::bad_alloc&) {
        raise<IoError>(source_, ": out of memory reading the ", size, " bytes of tensor ",
                       json::detail::describe_text(info.name));
    }
}

inline Tensor<float> SafetensorsFile::read_float(std::string_view name) const
{
    namespace st = detail::safetensors;
    const TensorInfo& info = at(name);
    check_range(info);
    // A bounded chunk at a time: the raw bytes are never held whole next to the floats.
    constexpr std::size_t chunk_bytes = std::size_t{1} << 20;  // a multiple of every dtype size
    const auto total = static_cast<std::size_t>(info.byte_size());
    const auto esize = static_cast<std::size_t>(dtype_size(info.dtype));
    try {
        Tensor<float> out(info.shape);
        float* dst = out.data();
        if (info.dtype == DType::f32 && std::endian::native == std::endian::little && file_) {
            // The stored bytes are the floats: read them where they go, no staging copy.
            file_->read(data_start_ + static_cast<std::uint64_t>(info.begin),
                        std::span<std::byte>(reinterpret_cast<std::byte*>(dst), total));
            return out;
        }
        std::vector<std::byte> buffer;
        for (std::size_t done = 0; done < total;) {
            const std::size_t size = std::min(chunk_bytes, total - done);
            const std::span<const std::byte> raw = data(info.begin + static_cast<index_t>(done), size, buffer);
            const std::size_t n = size / esize;
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
            dst += n;
            done += size;
        }
        return out;
    } catch (const std::bad_alloc&) {
        raise<IoError>(source_, ": out of memory reading tensor ", json::detail::describe_text(name), " as ",
                       info.numel(), " float values");
    } catch (const std::length_error&) {  // more elements than a std::vector can hold
        raise<IoError>(source_, ": out of memory reading tensor ", json::detail::describe_text(name), " as ",
                       info.numel(), " float values");
    }
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

inline WeightTensor SafetensorsFile::weight(std::string_view name, std::span<const index_t> expected_shape,
                                            const WeightOptions& options) const
{
    namespace st = detail::safetensors;
    const TensorInfo& info = at(name);
    if (!std::equal(info.shape.begin(), info.shape.end(), expected_shape.begin(), expected_shape.end()))
        raise<FormatError>(source_, ": tensor ", json::detail::describe_text(name), " has shape ",
                           st::shape_string(info.shape), ", expected ", st::shape_string(expected_shape));
    check_range(info);
    const bool keep = options.keep_dtype || info.dtype == DType::f32;
    const std::uint64_t offset = data_start_ + static_cast<std::uint64_t>(info.begin);
    const bool aligned = offset % static_cast<std::uint64_t>(dtype_size(info.dtype)) == 0;  // mappings are page-aligned
    if (options.map && keep && file_ && aligned && std::endian::native == std::endian::little &&
        detail::io::MappedFile::supported) {
        if (!mapping_) mapping_ = detail::io::MappedFile::map(path_, source_, file_->size());
        if (options.prefetch) mapping_->prefetch(offset, static_cast<std::uint64_t>(info.byte_size()));
        return WeightTensor(info.dtype, info.shape, mapping_->data() + offset, mapping_);
    }
    if (!keep || info.dtype == DType::f32) return WeightTensor(read_float(name));
    // A copy in the stored dtype, assembled little-endian element by element.
    try {
        const std::vector<std::byte> raw = read_bytes(info);
        const auto n = static_cast<std::size_t>(info.numel());
        auto bits = std::make_shared<std::vector<std::uint16_t>>(n);
        for (std::size_t i = 0; i < n; ++i) (*bits)[i] = st::load_u16_le(&raw[2 * i]);
        const auto* data = reinterpret_cast<const std::byte*>(bits->data());
        return WeightTensor(info.dtype, info.shape, data, std::move(bits));
    } catch (const std::bad_alloc&) {
        raise<IoError>(source_, ": out of memory reading tensor ", json::detail::describe_text(name));
    }
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
