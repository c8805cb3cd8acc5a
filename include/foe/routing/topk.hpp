#pragma once
// Top-k selection: FoE's per-group top-(k/H) and the standard global top-k.

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "foe/routing/routing.hpp"

namespace foe::routing {

/// Top-(k/H) inside each expert group [h E/H, (h+1) E/H): every group serves every token.
struct PerGroupTopK {
    static constexpr bool per_group = true;
};
static_assert(SelectionPolicy<PerGroupTopK>);

/// Top-k over all experts: the standard MoE router (needs H = 1).
struct GlobalTopK {
    static constexpr bool per_group = false;
};
static_assert(SelectionPolicy<GlobalTopK>);

/// Writes to out the `out.size()` experts of [begin, end) with the largest keys, best first;
/// equal keys go to the lower index, and a NaN key ranks below every number, so the order is
/// total and the result deterministic whatever the input.
inline void top_k(std::span<const float> keys, index_t begin, index_t end, std::span<std::int32_t> out)
{
    auto rank_key = [&](index_t e) {
        const float k = keys[static_cast<std::size_t>(e)];
        return std::isnan(k) ? -std::numeric_limits<float>::infinity() : k;
    };
    // k/H is small (1 to 8 in every known model): a selection scan beats sorting.
    for (std::size_t s = 0; s < out.size(); ++s) {
        index_t best = -1;
        for (index_t e = begin; e < end; ++e) {
            bool taken = false;
            for (std::size_t p = 0; p < s; ++p) taken = taken || out[p] == e;
            if (taken) continue;
            // Strictly greater wins: an equal key keeps the lower index found first. A NaN ranks
            // as -inf, and an -inf candidate still beats "nothing chosen yet".
            if (best < 0 || rank_key(e) > rank_key(best)) best = e;
        }
        out[s] = static_cast<std::int32_t>(best);
    }
}

}  // namespace foe::routing
