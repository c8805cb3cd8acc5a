#pragma once
// The KV cache of one attention instance: keys and values of its KV heads for every position of
// every sequence slot, [slots, kv_heads, capacity, head_dim], allocated once at construction.
// Head-major: one head's keys for a sequence are contiguous, so attention over a long context
// streams them instead of striding over the other heads (measured: a 8192-token prefill of the
// 8-head moe-small took 3x longer position-major).

#include <vector>

#include "foe/core/tensor.hpp"

namespace foe::attention {

class KvCache {
public:
    KvCache() = default;
    KvCache(index_t slots, index_t capacity, index_t kv_heads, index_t head_dim)
        : shape_{slots, kv_heads, capacity, head_dim},
          keys_(static_cast<std::size_t>(slots * capacity * kv_heads * head_dim)),
          values_(keys_.size())
    {
    }

    [[nodiscard]] index_t slots() const noexcept { return shape_[0]; }
    [[nodiscard]] index_t capacity() const noexcept { return shape_[2]; }
    [[nodiscard]] index_t bytes() const noexcept { return static_cast<index_t>(2 * keys_.size() * sizeof(float)); }

    [[nodiscard]] TensorView<float, 4> keys() noexcept { return {keys_.data(), shape_}; }
    [[nodiscard]] TensorView<float, 4> values() noexcept { return {values_.data(), shape_}; }
    [[nodiscard]] TensorView<const float, 4> keys() const noexcept { return {keys_.data(), shape_}; }
    [[nodiscard]] TensorView<const float, 4> values() const noexcept { return {values_.data(), shape_}; }

private:
    std::array<index_t, 4> shape_{};
    std::vector<float> keys_;
    std::vector<float> values_;
};

}  // namespace foe::attention
