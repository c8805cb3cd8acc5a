// libFuzzer target: foe::SafetensorsFile::from_bytes on arbitrary bytes.
//
// The contract under test: any input either reads as a valid file or throws a foe::Error, and
// nothing else happens (no crash, no sanitizer report, no other exception, no allocation larger
// than the input justifies). A file that reads is also checked for what the validation promises:
// every tensor's bytes lie in the file and convert, and writing the tensors back and reading
// them again gives the same names, shapes, dtypes and values.

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "foe/io/safetensors.hpp"

namespace {

/// A broken promise of the reader: abort so that libFuzzer records the input as a crash.
void check(bool ok)
{
    if (!ok) std::abort();
}

/// Equal bits, or both NaN (a NaN's payload may change on the way through float).
bool same_value(float a, float b)
{
    return std::isnan(a) ? std::isnan(b) : std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    std::vector<std::byte> bytes(size);
    if (size > 0) std::memcpy(bytes.data(), data, size);
    std::optional<foe::SafetensorsFile> file;
    try {
        file.emplace(foe::SafetensorsFile::from_bytes(std::move(bytes), "fuzz.safetensors"));
    } catch (const foe::Error&) {
        return 0;  // rejected with a typed error: the expected outcome for most inputs
    }

    std::vector<foe::Tensor<float>> values;
    std::vector<foe::TensorToWrite> back;
    foe::index_t total = 0;
    for (const foe::TensorInfo& t : file->tensors()) {
        check(file->find(t.name) == &t);
        check(t.byte_size() == t.numel() * foe::dtype_size(t.dtype));
        total += t.byte_size();
        check(static_cast<foe::index_t>(file->read_bytes(t).size()) == t.byte_size());
        values.push_back(file->read_float(t.name, t.shape));
        check(values.back().size() == t.numel());
    }
    check(total <= static_cast<foe::index_t>(size));

    // Round trip: what was read writes and reads back unchanged (BF16 and F16 are exact in float,
    // and converting back rounds to the same bits, NaNs aside).
    for (std::size_t i = 0; i < values.size(); ++i) {
        const foe::TensorInfo& t = file->tensors()[i];
        back.push_back({t.name, t.dtype, t.shape, values[i].span()});
    }
    const auto again = foe::SafetensorsFile::from_bytes(foe::serialize_safetensors(back, file->metadata()), "again");
    check(again.tensors().size() == file->tensors().size() && again.metadata() == file->metadata());
    for (std::size_t i = 0; i < values.size(); ++i) {
        const foe::TensorInfo& t = again.tensors()[i];
        check(t.name == file->tensors()[i].name && t.shape == file->tensors()[i].shape &&
              t.dtype == file->tensors()[i].dtype);
        const auto v = again.read_float(t.name);
        check(v.size() == values[i].size());
        for (std::size_t j = 0; j < v.values().size(); ++j) check(same_value(v.values()[j], values[i].values()[j]));
    }
    return 0;
}
