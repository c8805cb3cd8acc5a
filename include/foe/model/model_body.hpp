#pragma once
// The equations of the whole model, written once for every backend, as the layer's are
// (layer/layer_body.hpp). Model<Layer> (host) and cuda::CudaModel run this body; how each step
// runs lives in model_exec<Backend, Gemm>:
//
//   model_exec<HostBackend, Gemm>  below: fp32 host buffers grown as batches come, the weights
//                                  read in place, the LM head through the host GEMM policy
//   model_exec<CudaBackend, Gemm>  cuda/model_exec.cuh: bf16 buffers planned once, every step
//                                  enqueued on the model's stream (a decode graph captures them)
//
// An exec provides: element, batch_type; embed, layer_output, run_layer, layer_boundary,
// check_layer, mean_streams, keep_rows, final_norm, lm_head. It calls kernels and policies and
// holds no equation. What is not an equation stays in the models: checking the input, staging it,
// graphs, downloading the logits, committing the sequences' lengths (CacheSlots below).

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/weight.hpp"
#include "foe/layer/batch.hpp"
#include "foe/ops/gemm.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/ops/weight_gemm.hpp"

namespace foe::detail {

template <class Backend, class Gemm>
struct model_exec;

/// ModelOptions::check_finite: throws NumericalError for the first non-finite value of
/// `values`, [streams, rows, width] row-major, in token-row order (the earliest position of the
/// batch first); `where` says what the values are ("the hidden state after layer 3").
/// token_row_of maps each of the `rows` rows to its token row of the batch (empty: row i is token
/// row i), for logits of kept rows only.
inline void check_finite(std::span<const float> values, index_t streams, index_t rows, index_t width,
                         const Batch& batch, std::string_view where, std::string_view column,
                         std::span<const index_t> token_row_of = {})
{
    // Fast path: is any value's exponent all ones (NaN, +-inf)? An integer OR-reduction
    // vectorises; an early-exit search, or a float reduction without -ffast-math, does not.
    constexpr std::uint32_t exponent = 0x7f800000u;
    std::uint32_t non_finite = 0;
    for (float v : values) non_finite |= (std::bit_cast<std::uint32_t>(v) & exponent) == exponent ? 1u : 0u;
    if (non_finite == 0) return;
    for (index_t i = 0; i < rows; ++i)
        for (index_t s = 0; s < streams; ++s)
            for (index_t j = 0; j < width; ++j) {
                const float v = values[static_cast<std::size_t>((s * rows + i) * width + j)];
                if (std::isfinite(v)) continue;
                const index_t row = token_row_of.empty() ? i : token_row_of[static_cast<std::size_t>(i)];
                index_t b = 0;
                while (batch.offset(b + 1) <= row) ++b;
                const SequenceChunk& chunk = batch.chunks()[static_cast<std::size_t>(b)];
                raise<NumericalError>("non-finite value ", v, " in ", where,
                                      streams > 1 ? concat(" (stream ", s, " of ", streams, ")") : std::string(),
                                      " at token row ", row, " of the batch: sequence ", b, " (KV-cache slot ",
                                      chunk.slot, "), position ", batch.positions()[static_cast<std::size_t>(row)],
                                      ", ", column, " ", j);
            }
}

/// Every layer in order on x, [1, T, d] (the embedding, which the first layer broadcasts to its
/// groups); returns the last layer's streams [held, T, d]. T may be 0: an expert-parallel layer
/// still serves the peers' routed rows.
template <class Exec, class LayerPtr>
TensorView<const typename Exec::element, 3> model_layers(Exec& exec, const typename Exec::batch_type& batch,
                                                         std::span<LayerPtr> layers,
                                                         TensorView<const typename Exec::element, 3> x)
{
    for (std::size_t l = 0; l < layers.size(); ++l) {
        exec.layer_boundary(l);
        const auto y = exec.layer_output(l, *layers[l], x.extent(1), x.extent(2));
        exec.run_layer(*layers[l], batch, x, y);
        exec.check_layer(l, y, batch);
        x = y;
    }
    exec.layer_boundary(layers.size());
    return x;
}

/// The model body: logits [kept.size(), vocab] of the batch's kept token rows (ascending).
///
///   x0     = Embed(tokens)                                  one stream
///   x_l    = Layer_l(x_{l-1})                               H streams (the held ones here)
///   h      = (1/H) sum_h x_L[h]                             in stream order, then over the ranks
///                                                           holding the other groups
///   logits = LMHead(RMSNorm(h[kept]))
///
/// Each kept row's norm and logits are functions of its own row, so a row's logits do not depend
/// on which other rows are kept (whether they are the same bits also depends on the GEMM policy).
template <class Exec, class LayerPtr, class Tokens>
void model_forward(Exec& exec, const typename Exec::batch_type& batch, Tokens tokens, std::span<LayerPtr> layers,
                   index_t groups, std::span<const index_t> kept, MatrixView<float> logits)
{
    const auto x = model_layers(exec, batch, layers, exec.embed(batch, tokens));
    const auto h = exec.keep_rows(exec.mean_streams(x, groups), batch, kept);
    exec.final_norm(h);
    exec.lm_head(h, logits);
}

/// The host backend's execution: fp32, buffers grown to the largest batch seen, the embedding and
/// LM head read in place from the model's weights.
template <class Gemm>
struct model_exec<HostBackend, Gemm> {
    using element = float;
    using batch_type = Batch;
    /// Sums, in place, the per-rank sums of the streams over the ranks holding the other groups.
    using StreamReduce = std::function<void(std::span<float>)>;

    WeightMatrix embedding, head;
    VectorView<const float> norm;
    float eps = 0;
    StreamReduce reduce_streams;  ///< empty on one rank
    bool check_finite = false;
    std::vector<float> buffers[2], hidden;

    TensorView<const float, 3> embed(const Batch& batch, std::span<const std::int32_t> tokens)
    {
        const index_t t = batch.tokens(), d = embedding.extent(1);
        auto& x = buffers[0];
        x.resize(static_cast<std::size_t>(t * d));
        for (index_t i = 0; i < t; ++i) embedding.widen_row(tokens[static_cast<std::size_t>(i)], &x[static_cast<std::size_t>(i * d)]);
        return TensorView<const float, 3>(x.data(), {1, t, d});
    }

    /// Layer l writes the buffer layer l - 1 (or the embedding) did not.
    template <class Layer>
    TensorView<float, 3> layer_output(std::size_t l, const Layer& layer, index_t t, index_t d)
    {
        auto& y = buffers[(l + 1) % 2];
        const index_t streams = layer.streams();
        y.resize(static_cast<std::size_t>(streams * t * d));
        return TensorView<float, 3>(y.data(), {streams, t, d});
    }

    template <class Layer>
    static void run_layer(Layer& layer, const Batch& batch, TensorView<const float, 3> x, TensorView<float, 3> y)
    {
        layer.forward(batch, x, y);
    }

    static void layer_boundary(std::size_t) {}

    /// ModelOptions::check_finite: the hidden state after every layer.
    void check_layer(std::size_t l, TensorView<const float, 3> y, const Batch& batch) const
    {
        if (check_finite)
            detail::check_finite(std::span<const float>(y.data(), static_cast<std::size_t>(y.size())), y.extent(0),
                                 y.extent(1), y.extent(2), batch, concat("the hidden state after layer ", l),
                                 "hidden dimension");
    }

    MatrixView<float> mean_streams(TensorView<const float, 3> x, index_t groups)
    {
        const index_t streams = x.extent(0), t = x.extent(1), d = x.extent(2);
        const auto n = static_cast<std::size_t>(t * d);
        hidden.assign(x.data(), x.data() + n);
        for (index_t s = 1; s < streams; ++s) {
            const float* xs = x.data() + static_cast<std::size_t>(s) * n;
            for (std::size_t i = 0; i < n; ++i) hidden[i] += xs[i];
        }
        // Every rank sums every row, kept or not: all take part with the same count.
        if (reduce_streams) reduce_streams(hidden);
        const float scale = 1.0f / static_cast<float>(groups);
        for (float& v : hidden) v *= scale;
        return MatrixView<float>(hidden.data(), {t, d});
    }

    static MatrixView<float> keep_rows(MatrixView<float> h, const Batch&, std::span<const index_t> kept)
    {
        const index_t d = h.extent(1), n = static_cast<index_t>(kept.size());
        for (index_t r = 0; r < n; ++r)  // kept rows ascend, so a row never overwrites one still to move
            if (kept[static_cast<std::size_t>(r)] != r) std::copy_n(&h(kept[static_cast<std::size_t>(r)], 0), d, &h(r, 0));
        return MatrixView<float>(h.data(), {n, d});
    }

    void final_norm(MatrixView<float> h) const { ops::rms_norm(h, norm, eps, h); }

    void lm_head(MatrixView<const float> h, MatrixView<float> logits) const
    {
        gemm::nt<Gemm>(h, head, logits, false);
    }
};

/// The KV-cache slots' lengths: every backend's forward checks a batch against them before it
/// changes anything, and commits the batch's chunks after it succeeded.
class CacheSlots {
public:
    CacheSlots() = default;
    CacheSlots(index_t slots, index_t capacity) : lengths_(static_cast<std::size_t>(slots), 0), capacity_(capacity) {}

    [[nodiscard]] index_t capacity() const noexcept { return capacity_; }
    [[nodiscard]] index_t length(index_t slot) const
    {
        require(slot >= 0 && slot < static_cast<index_t>(lengths_.size()), "slot ", slot, " is outside [0, ",
                lengths_.size(), ")");
        return lengths_[static_cast<std::size_t>(slot)];
    }

    /// One token id per row, each inside the vocabulary; every chunk in a slot, fitting its
    /// capacity, and starting at or before its slot's current length.
    void check(const Batch& batch, std::span<const std::int32_t> tokens, index_t vocab) const
    {
        const index_t t = batch.tokens();
        require(static_cast<index_t>(tokens.size()) == t, "the batch has ", t, " tokens but ", tokens.size(),
                " token ids were given");
        batch.check_fits(static_cast<index_t>(lengths_.size()), capacity_);
        for (const auto& chunk : batch.chunks())
            require(chunk.start <= lengths_[static_cast<std::size_t>(chunk.slot)], "slot ", chunk.slot, " holds ",
                    lengths_[static_cast<std::size_t>(chunk.slot)], " positions; a chunk cannot start at position ",
                    chunk.start, " (positions in between would be missing)");
        for (index_t i = 0; i < t; ++i) {
            const std::int32_t id = tokens[static_cast<std::size_t>(i)];
            require(id >= 0 && id < vocab, "token id ", id, " (at row ", i, " of the batch) is outside the vocabulary [0, ",
                    vocab, ")");
        }
    }

    /// After a successful forward: each chunk's slot holds its positions up to the chunk's end
    /// (an empty chunk still sets its slot's length).
    void commit(const Batch& batch)
    {
        for (const auto& chunk : batch.chunks()) lengths_[static_cast<std::size_t>(chunk.slot)] = chunk.start + chunk.length;
    }

private:
    std::vector<index_t> lengths_;
    index_t capacity_ = 0;
};

}  // namespace foe::detail
