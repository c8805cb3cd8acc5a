#pragma once
// Seeded, counter-based random numbers for weights and inputs.
//
// Element i of a stream is a pure function of (seed, stream, i): filling a tensor gives the same
// values whatever the thread count, the order in which tensors are made, or the rank that makes
// them. Streams are usually derived from a tensor's name (stream_id), so a rank that holds only
// some groups' weights gets exactly the values a single process would.

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

#include "foe/core/types.hpp"

namespace foe {

/// SplitMix64 finaliser: a bijective 64-bit mix with good avalanche (Steele et al., 2014).
[[nodiscard]] constexpr std::uint64_t mix64(std::uint64_t z) noexcept
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/// A stream id from a name (FNV-1a), so that tensors are seeded by what they are.
[[nodiscard]] constexpr std::uint64_t stream_id(std::string_view name) noexcept
{
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (char c : name) {
        h ^= static_cast<unsigned char>(c);
        h *= 0x100000001b3ull;
    }
    return h;
}

class CounterRng {
public:
    constexpr CounterRng(std::uint64_t seed, std::uint64_t stream) noexcept
        : key_(mix64(seed ^ mix64(stream)))
    {
    }

    /// 64 random bits for counter i.
    [[nodiscard]] constexpr std::uint64_t bits(std::uint64_t i) const noexcept { return mix64(key_ ^ mix64(i)); }

    /// Uniform in [0, 1), 24 bits of resolution (every value exact in float).
    [[nodiscard]] constexpr float uniform01(std::uint64_t i) const noexcept
    {
        return static_cast<float>(bits(i) >> 40) * 0x1.0p-24f;
    }

    /// Uniform in [lo, hi).
    [[nodiscard]] constexpr float uniform(std::uint64_t i, float lo, float hi) const noexcept
    {
        return lo + (hi - lo) * uniform01(i);
    }

    /// Standard normal (Box-Muller on two independent draws of counter i).
    [[nodiscard]] float normal(std::uint64_t i) const noexcept
    {
        const std::uint64_t b = bits(i);
        const double u1 = (static_cast<double>(b >> 40) + 0.5) * 0x1.0p-24;
        const double u2 = static_cast<double>(mix64(b) >> 40) * 0x1.0p-24;
        return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }

    /// Fills out with uniform values in [lo, hi).
    void fill_uniform(std::span<float> out, float lo, float hi) const noexcept
    {
        const index_t n = static_cast<index_t>(out.size());
        FOE_OMP_PARALLEL_FOR
        for (index_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = uniform(static_cast<std::uint64_t>(i), lo, hi);
    }

private:
    std::uint64_t key_;
};

}  // namespace foe
