#pragma once
// One launch over the G attention groups of an FoE layer (foe/attention/gqa_attention.cuh).
//
// Each attention kernel (rms_norm, rope, append_kv, decode_attention, prefill_attention) was
// written for one group: its pointers name that group's q/k/v rows, its caches and its output.
// Group g of a layer sits at the same layout shifted by a fixed number of elements per group (its
// q columns in a fused [T, G x row] buffer, its cache in an arena of G equal caches, its output
// block of [G, T, width]), so a kernel covers every group when it adds g times those strides to
// its pointers. GroupStrides carries them; the default (one group, strides 0) is exactly the
// single-group launch the kernels always made, so existing callers are unchanged.
//
// How each kernel finds g: a grid dimension of its own (gridDim.y for rms_norm, rope and
// append_kv, whose y was unused), or the query-head index folded with the group (attention:
// folded = g x heads + h, so the grid's head dimension runs over all G x heads query heads).
// The index rules are plain C++ (FOE_HOST_DEVICE) so the host tests replay them.

#include <cstdint>

#include "foe/core/types.hpp"

namespace foe::cuda {

/// Element strides between consecutive groups' operands of one launch. Which strides a kernel
/// reads is in its documentation: `in` its input rows (x, q, the new k and v), `out` its output
/// rows, `cache` its KV caches (keys and values alike), `weight` a per-group norm weight (0: one
/// weight shared by every group).
struct GroupStrides {
    int count = 1;
    long long in = 0;
    long long out = 0;
    long long cache = 0;
    long long weight = 0;

    /// Element offset of group g's operand whose stride is `stride`.
    [[nodiscard]] FOE_HOST_DEVICE static constexpr std::int64_t at(long long stride, int g) noexcept
    {
        return static_cast<std::int64_t>(stride) * g;
    }
};

/// A query-head index folded with its group: folded = group x heads + head, heads per group.
struct HeadFold {
    int heads = 1;  ///< query heads per group

    [[nodiscard]] FOE_HOST_DEVICE constexpr int group(int folded) const noexcept { return folded / heads; }
    [[nodiscard]] FOE_HOST_DEVICE constexpr int head(int folded) const noexcept { return folded % heads; }
    [[nodiscard]] FOE_HOST_DEVICE constexpr int fold(int group, int head) const noexcept { return group * heads + head; }
};

}  // namespace foe::cuda
