#pragma once
// Rotary position embedding, rotate-half convention (GPT-NeoX, Llama, OLMoE).
//
// For head dimension D and j < D/2, with angle = pos * theta^(-2j/D):
//   out[j]       = x[j] * cos - x[j + D/2] * sin
//   out[j + D/2] = x[j + D/2] * cos + x[j] * sin
// The angle is formed in float as Hugging Face does (inv_freq in float32, times the position in
// float32); only cos and sin of that float angle are evaluated in double. Matching the float
// angle matters at long positions, where its rounding dominates the difference.

#include <cmath>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"

namespace foe::ops {

class Rope {
public:
    Rope() = default;
    Rope(index_t head_dim, double theta) : head_dim_(head_dim)
    {
        require(head_dim > 0 && head_dim % 2 == 0, "RoPE needs an even head_dim, got ", head_dim);
        inv_freq_.resize(static_cast<std::size_t>(head_dim / 2));
        for (index_t j = 0; j < head_dim / 2; ++j) {
            const float exponent = static_cast<float>(2 * j) / static_cast<float>(head_dim);
            inv_freq_[static_cast<std::size_t>(j)] = static_cast<float>(1.0 / std::pow(theta, static_cast<double>(exponent)));
        }
    }

    [[nodiscard]] index_t head_dim() const noexcept { return head_dim_; }

    /// Rotates every head of x in place: x is [tokens, heads, head_dim], positions[t] is token
    /// t's position in its sequence.
    void apply(TensorView<float, 3> x, std::span<const index_t> positions) const
    {
        const index_t tokens = x.extent(0), heads = x.extent(1), half = head_dim_ / 2;
        require(x.extent(2) == head_dim_, "RoPE built for head_dim ", head_dim_, " applied to head_dim ", x.extent(2));
        require(static_cast<index_t>(positions.size()) == tokens, "RoPE got ", positions.size(), " positions for ",
                tokens, " tokens");
        require(x.stride(2) == 1, "RoPE needs unit stride along head_dim");
        FOE_OMP_PARALLEL_FOR
        for (index_t t = 0; t < tokens; ++t) {
            std::vector<float> cos_t(static_cast<std::size_t>(half)), sin_t(static_cast<std::size_t>(half));
            const float pos = static_cast<float>(positions[static_cast<std::size_t>(t)]);
            for (index_t j = 0; j < half; ++j) {
                const float angle = pos * inv_freq_[static_cast<std::size_t>(j)];
                cos_t[static_cast<std::size_t>(j)] = static_cast<float>(std::cos(static_cast<double>(angle)));
                sin_t[static_cast<std::size_t>(j)] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
            for (index_t h = 0; h < heads; ++h) {
                float* v = &x(t, h, 0);
                for (index_t j = 0; j < half; ++j) {
                    const float c = cos_t[static_cast<std::size_t>(j)], s = sin_t[static_cast<std::size_t>(j)];
                    const float a = v[j], b = v[j + half];
                    v[j] = a * c - b * s;
                    v[j + half] = b * c + a * s;
                }
            }
        }
    }

private:
    index_t head_dim_ = 0;
    std::vector<float> inv_freq_;
};

}  // namespace foe::ops
