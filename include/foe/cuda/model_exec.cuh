#pragma once
// The CUDA backend's execution of the model body (model/model_body.hpp): bf16 buffers planned once
// by CudaModel, every step enqueued on the model's stream, so that a decode step's whole body can
// be captured into a CUDA graph. Holds no equation of its own.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "foe/comm/function_comm.cuh"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/experts/combine.cuh"
#include "foe/model/model_body.hpp"
#include "foe/ops/elementwise.cuh"
#include "foe/ops/rmsnorm.cuh"
#include "foe/parallel/expert_exchange.cuh"

namespace foe::detail {

template <class Gemm>
struct model_exec<CudaBackend, Gemm> {
    using element = bfloat16;
    using batch_type = cuda::DeviceBatch;

    // The model's weights and buffers on the device (CudaModel plans and owns them).
    const bfloat16* embedding = nullptr;  ///< [vocab, d]
    const bfloat16* norm = nullptr;       ///< [d]
    const bfloat16* head = nullptr;       ///< [vocab, d]
    index_t hidden_size = 0, vocab = 0;
    float eps = 0;
    index_t held = 1;                   ///< streams every layer writes (the held groups)
    bfloat16* buffers[2] = {};          ///< [held, max tokens, d] each: the layers' ping-pong
    bfloat16* hidden = nullptr;         ///< [max tokens, d]: the stream mean
    float* hidden32 = nullptr;          ///< [max tokens, d]: its fp32 sum before a cross-rank reduce
    cuda::DeviceContext ctx;            ///< the model's stream, the layers' scratch, the GEMMs
    /// Sums fp32 values over the ranks holding the other groups; empty when this model holds all.
    comm::FunctionComm::Reduce reduce_streams;
    std::function<void(index_t, cudaStream_t)> on_layer_boundary;
    /// The expert exchange of this forward (expert-parallel layers; null otherwise). The model
    /// switches between the dynamic one and the capturable one of decode steps.
    cuda::ExpertExchange* experts = nullptr;

    /// ids: the batch's token ids on the device (staged by the model, already checked).
    TensorView<const bfloat16, 3> embed(const cuda::DeviceBatch& batch, const std::int32_t* ids) const
    {
        const index_t t = batch.tokens, d = hidden_size;
        cuda::embedding(embedding, ids, t, d, buffers[0], ctx.stream);
        return TensorView<const bfloat16, 3>(buffers[0], {1, t, d});
    }

    /// Layer l writes the buffer layer l - 1 (or the embedding) did not.
    template <class Layer>
    TensorView<bfloat16, 3> layer_output(std::size_t l, const Layer&, index_t t, index_t d) const
    {
        return TensorView<bfloat16, 3>(buffers[(l + 1) % 2], {held, t, d});
    }

    template <class Layer>
    void run_layer(Layer& layer, const cuda::DeviceBatch& batch, TensorView<const bfloat16, 3> x,
                   TensorView<bfloat16, 3> y) const
    {
        if constexpr (requires { layer.use_exchange(experts); }) layer.use_exchange(experts);
        layer.forward(batch, x, y, ctx);
    }

    void layer_boundary(std::size_t l) const
    {
        if (on_layer_boundary) on_layer_boundary(static_cast<index_t>(l), ctx.stream);
    }

    /// CudaModelOptions::check_finite covers the logits only (checked on the host after the
    /// download): a per-layer check would synchronise with the host once per layer.
    static void check_layer(std::size_t, TensorView<const bfloat16, 3>, const cuda::DeviceBatch&) {}

    /// fp32 sum in stream order, then over the ranks, one rounding to bf16 of the mean.
    MatrixView<bfloat16> mean_streams(TensorView<const bfloat16, 3> x, index_t groups) const
    {
        const index_t t = x.extent(1), d = x.extent(2);
        const auto n = static_cast<std::size_t>(t * d);
        if (reduce_streams) {
            cuda::stream_sum(x.data(), x.extent(0), n, hidden32, ctx.stream);
            reduce_streams(hidden32, n, ctx.stream);
            cuda::scale_round(hidden32, n, 1.0f / static_cast<float>(groups), hidden, ctx.stream);
        } else {
            cuda::stream_mean(x.data(), x.extent(0), t, d, groups, hidden, ctx.stream);
        }
        return MatrixView<bfloat16>(hidden, {t, d});
    }

    /// The kept rows, [kept, d]: every row (h itself), or each sequence's last
    /// (LogitRows::last_per_chunk), gathered in one launch into the embedding's buffer, which no
    /// later step reads (the rows are read from the batch's device offsets, so a decode graph
    /// would replay it; a decode step keeps every row anyway).
    MatrixView<bfloat16> keep_rows(MatrixView<bfloat16> h, const cuda::DeviceBatch& batch,
                                   std::span<const index_t> kept) const
    {
        const index_t n = static_cast<index_t>(kept.size()), d = h.extent(1);
        if (n == h.extent(0)) return h;  // every row, or one row per one-token chunk: nothing moves
        require(n == batch.sequences, "model_exec<CudaBackend>: kept rows are every row or each chunk's last; got ", n,
                " of ", h.extent(0), " rows for ", batch.sequences, " chunks");
        cuda::gather_last_rows(h.data(), batch.row_offsets, n, d, buffers[0], ctx.stream);
        return MatrixView<bfloat16>(buffers[0], {n, d});
    }

    void final_norm(MatrixView<bfloat16> h) const
    {
        cuda::rms_norm(h.data(), norm, h.data(), h.extent(0), h.extent(1), eps, ctx.stream);
    }

    /// logits [rows, vocab] (fp32, on the device) = h W_head^T.
    void lm_head(MatrixView<const bfloat16> h, MatrixView<float> logits) const
    {
        if (h.extent(0) == 0) return;
        ctx.template gemm<Gemm>().nt(h.data(), head, logits.data(), cuda::OutType::fp32, h.extent(0), vocab,
                                     h.extent(1), ctx.stream, 0.0f);
    }
};

}  // namespace foe::detail
