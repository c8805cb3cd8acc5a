#pragma once
// Element types that weights may be stored in, with their safetensors names.

#include <cstdint>
#include <optional>
#include <string_view>

#include "foe/core/half.hpp"

namespace foe {

enum class DType : std::uint8_t { f32, bf16, f16 };

/// Bytes per element.
[[nodiscard]] constexpr std::int64_t dtype_size(DType t) noexcept { return t == DType::f32 ? 4 : 2; }

/// The dtype's name in a safetensors header ("F32", "BF16", "F16").
[[nodiscard]] constexpr std::string_view dtype_name(DType t) noexcept
{
    switch (t) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    }
    return "?";
}

/// Parses a safetensors dtype name; nullopt for every dtype the library does not accept.
[[nodiscard]] constexpr std::optional<DType> parse_dtype(std::string_view name) noexcept
{
    if (name == "F32") return DType::f32;
    if (name == "BF16") return DType::bf16;
    if (name == "F16") return DType::f16;
    return std::nullopt;
}

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<bfloat16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<float16> { static constexpr DType value = DType::f16; };

}  // namespace foe
