#pragma once
// NoSync: the residual sync of a single stream held on one rank (H = 1, the standard MoE).

#include "foe/core/backend.hpp"
#include "foe/sync/residual_sync.hpp"

namespace foe::sync {

/// No sync: one stream, held locally (H = 1, or the standard MoE). rf = r.
struct NoSync {
    using backend = HostBackend;

    void sync(std::span<const MatrixView<const float>> residuals, index_t groups, MatrixView<float> rf)
    {
        require<ConfigError>(residuals.size() == 1 && groups == 1, "NoSync needs exactly one group on one rank, got ",
                             residuals.size(), " held of ", groups);
        detail::sum_in_order(residuals, rf);
    }
};
static_assert(ResidualSyncPolicy<NoSync>);

}  // namespace foe::sync
