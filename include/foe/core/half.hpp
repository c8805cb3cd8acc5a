#pragma once
// 16-bit floating-point storage types usable in plain C++ (host code and tests).
//
// bfloat16 and float16 hold only the bits; arithmetic is done in float. Conversions from float
// round to nearest even and keep NaN a NaN, Inf an Inf, so a weight file round-trips exactly
// through float (every 16-bit value is exactly representable in float).

#include <cstdint>
#include <cstring>

#include "foe/core/types.hpp"

namespace foe {

namespace detail {

/// std::bit_cast that CUDA device code may call too (std::bit_cast is a host-only constexpr
/// function to nvcc; the builtin behind it is available on both sides).
template <class To, class From>
[[nodiscard]] FOE_HOST_DEVICE constexpr To bit_cast(const From& from) noexcept
{
    static_assert(sizeof(To) == sizeof(From));
    return __builtin_bit_cast(To, from);
}

}  // namespace detail

/// Brain floating point: 1 sign, 8 exponent, 7 mantissa bits (the top half of a float).
struct bfloat16 {
    std::uint16_t bits = 0;

    constexpr bfloat16() = default;
    FOE_HOST_DEVICE explicit bfloat16(float f) : bits(from_float(f)) {}

    [[nodiscard]] static constexpr bfloat16 from_bits(std::uint16_t b)
    {
        bfloat16 h;
        h.bits = b;
        return h;
    }
    [[nodiscard]] FOE_HOST_DEVICE explicit operator float() const
    {
        return detail::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
    }

private:
    [[nodiscard]] FOE_HOST_DEVICE static std::uint16_t from_float(float f)
    {
        const std::uint32_t u = detail::bit_cast<std::uint32_t>(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
        const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        return static_cast<std::uint16_t>((u + rounding) >> 16);
    }
};

/// IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits, with subnormals.
struct float16 {
    std::uint16_t bits = 0;

    constexpr float16() = default;
    FOE_HOST_DEVICE explicit float16(float f) : bits(from_float(f)) {}

    [[nodiscard]] static constexpr float16 from_bits(std::uint16_t b)
    {
        float16 h;
        h.bits = b;
        return h;
    }

    [[nodiscard]] FOE_HOST_DEVICE explicit operator float() const
    {
        const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
        const std::uint32_t exp = (bits >> 10) & 0x1fu;
        std::uint32_t mant = bits & 0x3ffu;
        if (exp == 0x1fu) return detail::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // Inf/NaN
        if (exp == 0) {
            if (mant == 0) return detail::bit_cast<float>(sign);  // signed zero
            // Subnormal half: value = mant * 2^-24, exact in float.
            const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
            return sign ? -mag : mag;
        }
        return detail::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
    }

private:
    [[nodiscard]] FOE_HOST_DEVICE static std::uint16_t from_float(float f)
    {
        const std::uint32_t u = detail::bit_cast<std::uint32_t>(f);
        const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
        const std::uint32_t abs = u & 0x7fffffffu;
        if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
        if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to Inf
        if (abs < 0x38800000u) {
            // Result is subnormal or zero: round abs * 2^24 to an integer, ties to even.
            // Adding 0.5f (as float 2^-1 scaled) is done exactly by the magic-number trick:
            // a float with exponent 2^(-1) absorbs the bits below the half ulp.
            const float magic = detail::bit_cast<float>(0x3f000000u);  // 0.5
            const float r = detail::bit_cast<float>(abs) + magic;     // rounds to nearest even at 2^-24
            return static_cast<std::uint16_t>(sign | (detail::bit_cast<std::uint32_t>(r) - 0x3f000000u));
        }
        const std::uint32_t mant_odd = (abs >> 13) & 1u;
        const std::uint32_t rounded = abs + 0xfffu + mant_odd - (112u << 23);  // rebias 127 -> 15
        return static_cast<std::uint16_t>(sign | (rounded >> 13));
    }
};

}  // namespace foe
