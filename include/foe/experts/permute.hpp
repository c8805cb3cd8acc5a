#pragma once
// Grouping of (token, slot) rows by a key (the expert, or the rank that holds it): a stable
// counting sort, so rows keep their order inside each group and the grouping is deterministic.
// The experts policy groups rows by expert; the all-to-all expert parallelism by destination.

#include <vector>

#include "foe/core/types.hpp"

namespace foe::experts {

/// rows() of group g are rows[offsets[g], offsets[g + 1]).
struct Permutation {
    std::vector<index_t> offsets;  ///< [groups + 1]
    std::vector<index_t> rows;     ///< row indices, grouped

    [[nodiscard]] index_t count(index_t g) const
    {
        return offsets[static_cast<std::size_t>(g) + 1] - offsets[static_cast<std::size_t>(g)];
    }
    [[nodiscard]] const index_t* begin(index_t g) const { return rows.data() + offsets[static_cast<std::size_t>(g)]; }
};

/// Groups rows [0, n) by key(row) in [0, groups); rows whose key is outside are left out.
/// Storage of `out` is reused across calls.
template <class Key>
void group_rows(index_t n, index_t groups, Key&& key, Permutation& out)
{
    out.offsets.assign(static_cast<std::size_t>(groups) + 1, 0);
    for (index_t r = 0; r < n; ++r) {
        const index_t k = key(r);
        if (k >= 0 && k < groups) ++out.offsets[static_cast<std::size_t>(k) + 1];
    }
    for (index_t g = 0; g < groups; ++g) out.offsets[static_cast<std::size_t>(g) + 1] += out.offsets[static_cast<std::size_t>(g)];
    out.rows.resize(static_cast<std::size_t>(out.offsets.back()));
    std::vector<index_t> fill(out.offsets.begin(), out.offsets.end() - 1);
    for (index_t r = 0; r < n; ++r) {
        const index_t k = key(r);
        if (k >= 0 && k < groups) out.rows[static_cast<std::size_t>(fill[static_cast<std::size_t>(k)]++)] = r;
    }
}

}  // namespace foe::experts
