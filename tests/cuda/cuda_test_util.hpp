#pragma once
// Shared helpers of foe's CUDA tests: the device-present check (tests skip, and say so, without a
// GPU), random bf16 data with the float values the oracles see, and error measures.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda::testing {

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

constexpr double bf16_tolerance = 1e-2;

/// True when a device is present; otherwise says so once per test case, which then passes.
inline bool have_device()
{
    if (fc::cuda_device_count() > 0) return true;
    MESSAGE("no CUDA device: skipped");
    return false;
}

inline std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

/// bf16 values drawn uniformly from [lo, hi), and their float values (what the oracle sees).
struct Bf16Data {
    std::vector<bfloat16> bits;
    std::vector<float> values;
};
inline Bf16Data random_bf16(std::size_t n, std::mt19937_64& rng, float lo = -1.0f, float hi = 1.0f)
{
    std::uniform_real_distribution<float> dist(lo, hi);
    Bf16Data d;
    d.bits.resize(n);
    d.values.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        d.bits[i] = bfloat16(dist(rng));
        d.values[i] = static_cast<float>(d.bits[i]);
    }
    return d;
}

inline std::vector<float> to_float(const std::vector<bfloat16>& v)
{
    std::vector<float> f(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
    return f;
}

/// max |got - want| / max |want|; +inf when got holds a NaN or an infinity (an unwritten, poisoned
/// element or a broken kernel).
template <class Got, class Want>
double rel_error(const Got& got, const Want& want)
{
    REQUIRE(got.size() == want.size());
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        const auto g = static_cast<double>(got[i]);
        if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
        num = std::max(num, std::abs(g - static_cast<double>(want[i])));
        den = std::max(den, std::abs(static_cast<double>(want[i])));
    }
    return den > 0.0 ? num / den : num;
}

/// "index i: got x, want y" for the first difference (doctest cannot print vectors).
template <class A, class B>
std::string first_mismatch(const A& got, const B& want)
{
    if (got.size() != want.size()) return "sizes differ: " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(got[i] == want[i]))
            return "index " + std::to_string(i) + ": got " + std::to_string(got[i]) + ", want " + std::to_string(want[i]);
    return "equal";
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}


}  // namespace foe::cuda::testing
