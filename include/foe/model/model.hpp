#pragma once
// Model<Layer>: embedding, L layers, the average of the H streams, final RMSNorm and LM head,
// with one KV cache slot per sequence.
//
//   prefill(tokens)  -> logits for every prompt position      [S, vocab]
//   decode(token)    -> logits of the next position            [vocab]
//   forward(batch, tokens) -> logits of a ragged batch         [T, vocab]
//   forward(batch, tokens, LogitRows::last_per_chunk) -> the last row of each chunk only
//                                                            [chunks, vocab]
//   generate(prompt, n)    -> n greedy tokens
//
// The first layer takes the embedding as one stream (broadcast to the groups); every later layer
// takes the previous layer's streams. ModelInterface is the type-erased face the runner and
// make_model() use; Model<Layer> is the composed, fully inlined implementation. Its equations are
// model/model_body.hpp's, which cuda::CudaModel runs as well.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/layer/batch.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/model/model_body.hpp"
#include "foe/model/sampling.hpp"
#include "foe/model/weights.hpp"
#include "foe/ops/gemm.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/routing/routing.hpp"

namespace foe {

struct ModelOptions {
    index_t cache_slots = 1;     ///< sequences held at once
    index_t cache_capacity = 0;  ///< positions per sequence; 0 means max_position_embeddings
    /// Paged KV caches (a layer whose attention uses attention::PagedKvCache): positions per
    /// page and pages per pool; every forward's batch then carries the block tables.
    index_t page_size = 16;
    index_t cache_pages = 0;  ///< 0: cache_slots x cache_capacity worth of pages
    /// Check the hidden state after every layer, and the logits, for NaN and infinity: the first
    /// one found throws NumericalError naming the layer, the stream, the token row, its sequence
    /// and position (one extra read of each activation). The forward then changes no sequence's
    /// length, as for every error. When off (the default), a non-finite value propagates: through
    /// the residual stream, through causal attention to every later position of its sequence
    /// (never to other sequences of the batch), and into the logits; routing stays well defined
    /// (routing::top_k ranks a NaN key below every number, and Softmax gives a NaN logit score 0).
    bool check_finite = false;
};

/// What generate() does beyond greedy decoding to a fixed length.
struct GenerateOptions {
    SamplingOptions sampling;               ///< default: greedy
    std::vector<std::int32_t> stop_tokens;  ///< generation ends after any of these (e.g. the config's EOS ids)
};

/// Which rows of logits a forward computes. The LM head is the largest GEMM of a small model
/// (vocab x hidden per row), and generation needs one row per sequence: a prompt of 512 tokens
/// with every row kept spends most of its LM-head time on logits no one reads (transformers'
/// `logits_to_keep`, llama.cpp's `logits` flags per token).
enum class LogitRows {
    all,             ///< one row per token of the batch: [batch.tokens(), vocab]
    last_per_chunk,  ///< one row per chunk, its last token's: [batch.sequences(), vocab]; a
                     ///< zero-length chunk has no row to give and is refused
};

namespace detail {
/// The token rows of the batch whose logits `rows` keeps, in output order.
[[nodiscard]] inline std::vector<index_t> kept_logit_rows(const Batch& batch, LogitRows rows)
{
    std::vector<index_t> kept;
    if (rows == LogitRows::all) {
        kept.resize(static_cast<std::size_t>(batch.tokens()));
        for (index_t i = 0; i < batch.tokens(); ++i) kept[static_cast<std::size_t>(i)] = i;
        return kept;
    }
    kept.reserve(static_cast<std::size_t>(batch.sequences()));
    for (index_t b = 0; b < batch.sequences(); ++b) {
        require(batch.offset(b + 1) > batch.offset(b), "LogitRows::last_per_chunk: chunk ", b,
                " of the batch is empty, so it has no last token to give logits for");
        kept.push_back(batch.offset(b + 1) - 1);
    }
    return kept;
}
}  // namespace detail

class ModelInterface {
public:
    virtual ~ModelInterface() = default;

    /// Logits for a ragged batch: [batch.tokens(), vocab] with LogitRows::all, one row per chunk
    /// (its last token's) with LogitRows::last_per_chunk. A row is the same bits either way with
    /// a GEMM whose results do not depend on the row count (the host's default BatchInvariant, the
    /// device's TcGemm); OpenBLAS and cuBLASLt may pick another kernel for another row count, so
    /// with them a row is close, not always the same bits (and generate() may then break a
    /// near-tie differently with prefill_logits than without).
    /// tokens holds batch.tokens() ids, laid out sequence after sequence. A chunk must start at
    /// or before its slot's current length (starting earlier discards the positions after start).
    [[nodiscard]] virtual Tensor<float> forward(const Batch& batch, std::span<const std::int32_t> tokens,
                                                LogitRows rows) = 0;
    /// Every row's logits: forward(batch, tokens, LogitRows::all).
    [[nodiscard]] Tensor<float> forward(const Batch& batch, std::span<const std::int32_t> tokens)
    {
        return forward(batch, tokens, LogitRows::all);
    }
    [[nodiscard]] virtual const ModelConfig& config() const noexcept = 0;
    /// Positions held in the KV cache of a slot.
    [[nodiscard]] virtual index_t sequence_length(index_t slot) const = 0;
    [[nodiscard]] virtual index_t cache_capacity() const noexcept = 0;
    /// The routing decisions of layer l in the last forward (for load statistics and tests).
    [[nodiscard]] virtual const routing::RoutingResult& last_routing(index_t layer) const = 0;

    /// Starts the sequence of `slot` anew with `tokens`; logits [tokens.size(), vocab], or of the
    /// last token only, [1, vocab], with LogitRows::last_per_chunk.
    [[nodiscard]] Tensor<float> prefill(std::span<const std::int32_t> tokens, index_t slot = 0,
                                        LogitRows rows = LogitRows::all)
    {
        return forward(Batch::single(0, static_cast<index_t>(tokens.size()), slot), tokens, rows);
    }

    /// Appends one token to the sequence of `slot`; the logits of the next position [vocab].
    [[nodiscard]] std::vector<float> decode(std::int32_t token, index_t slot = 0)
    {
        const std::int32_t ids[1] = {token};
        return std::move(forward(Batch::single(sequence_length(slot), 1, slot), ids).values());
    }

    /// Greedy generation: prefill the prompt, then max_new_tokens times take the most likely
    /// token (ties toward the lower id) and decode it. Returns the generated tokens; the prompt's
    /// logits [prompt, vocab] go to *prefill_logits when it is given.
    [[nodiscard]] std::vector<std::int32_t> generate(std::span<const std::int32_t> prompt, index_t max_new_tokens,
                                                     index_t slot = 0, Tensor<float>* prefill_logits = nullptr)
    {
        return generate(prompt, max_new_tokens, GenerateOptions{}, slot, prefill_logits);
    }

    /// Generation with a sampler and stop tokens: as above, each token chosen by a Sampler made
    /// from options.sampling; it ends early after a token of options.stop_tokens (which is kept).
    [[nodiscard]] std::vector<std::int32_t> generate(std::span<const std::int32_t> prompt, index_t max_new_tokens,
                                                     const GenerateOptions& options, index_t slot = 0,
                                                     Tensor<float>* prefill_logits = nullptr)
    {
        require(!prompt.empty(), "generate needs a prompt of at least one token");
        require(max_new_tokens >= 0, "max_new_tokens (", max_new_tokens, ") must not be negative");
        Sampler sampler(options.sampling);
        std::vector<std::int32_t> out;
        // Only the last position's logits unless the caller wants the prompt's.
        Tensor<float> logits = prefill(prompt, slot, prefill_logits != nullptr ? LogitRows::all : LogitRows::last_per_chunk);
        if (prefill_logits != nullptr) *prefill_logits = logits;
        if (max_new_tokens == 0) return out;
        const index_t vocab = config().vocab_size;
        std::vector<float> last(logits.values().end() - vocab, logits.values().end());
        for (index_t n = 0; n < max_new_tokens; ++n) {
            out.push_back(sampler.next(last));
            if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), out.back()) != options.stop_tokens.end())
                break;
            if (n + 1 < max_new_tokens) last = decode(out.back(), slot);
        }
        return out;
    }
};

template <class Layer, gemm::GemmPolicy Gemm = gemm::Default>
class Model final : public ModelInterface {
public:
    using layer_type = Layer;
    /// Builds layer l from views of its weights (a multi-rank model passes its communicators).
    using LayerFactory = std::function<std::unique_ptr<Layer>(index_t layer, const LayerWeights&, const LayerOptions&)>;
    /// Sums, in place, the per-rank sums of the last layer's streams over the ranks that hold the
    /// other groups (a multi-rank FoE model); empty on one rank.
    using StreamReduce = std::function<void(std::span<float>)>;

    /// Builds every layer over views of *weights, which the model keeps alive. The default
    /// factory is Layer(config, layer weights, options).
    explicit Model(std::shared_ptr<const ModelWeights> weights, const ModelOptions& options = {},
                   LayerFactory make_layer = {}, StreamReduce reduce_streams = {});

    using ModelInterface::forward;
    [[nodiscard]] Tensor<float> forward(const Batch& batch, std::span<const std::int32_t> tokens, LogitRows rows) override;
    [[nodiscard]] const ModelConfig& config() const noexcept override { return weights_->config; }
    [[nodiscard]] index_t sequence_length(index_t slot) const override { return slots_.length(slot); }
    [[nodiscard]] index_t cache_capacity() const noexcept override { return slots_.capacity(); }
    [[nodiscard]] const Layer& layer(index_t l) const { return *layers_.at(static_cast<std::size_t>(l)); }
    [[nodiscard]] const routing::RoutingResult& last_routing(index_t l) const override { return layer(l).last_routing(); }

private:
    std::shared_ptr<const ModelWeights> weights_;
    detail::CacheSlots slots_;
    std::vector<std::unique_ptr<Layer>> layers_;
    detail::model_exec<HostBackend, Gemm> exec_;  // the body's buffers, and the head's weights
};

// ---------------------------------------------------------------------------------------------

template <class Layer, gemm::GemmPolicy Gemm>
Model<Layer, Gemm>::Model(std::shared_ptr<const ModelWeights> weights, const ModelOptions& options,
                          LayerFactory make_layer, StreamReduce reduce_streams)
    : weights_(std::move(weights))
{
    const ModelConfig& c = weights_->config;
    check_weights(*weights_);
    const index_t capacity = options.cache_capacity > 0 ? options.cache_capacity : c.max_position_embeddings;
    require<InvalidArgument>(options.cache_slots > 0, "cache_slots (", options.cache_slots, ") must be positive");
    require<InvalidArgument>(capacity <= c.max_position_embeddings, "cache_capacity (", capacity,
                             ") exceeds max_position_embeddings (", c.max_position_embeddings, ")");
    // validate() bounds one sequence's cache; the slot count multiplies it.
    const auto cache_bytes = detail::CheckedIndex(options.cache_slots) * capacity * 2 * c.num_hidden_layers *
                             c.num_key_value_heads * c.head_dim * index_t{sizeof(float)};
    require<InvalidArgument>(cache_bytes.ok() && cache_bytes.value_or_max() <= (index_t{1} << 62), "cache_slots (",
                             options.cache_slots, ") x cache_capacity (", capacity,
                             ") make a KV cache of more than 2^62 bytes");
    slots_ = detail::CacheSlots(options.cache_slots, capacity);
    LayerOptions lo;
    lo.cache_slots = options.cache_slots;
    lo.cache_capacity = capacity;
    lo.page_size = options.page_size;
    lo.cache_pages = options.cache_pages;
    for (index_t l = 0; l < c.num_hidden_layers; ++l) {
        if (make_layer) {
            layers_.push_back(make_layer(l, layer_weights(*weights_, l), lo));
        } else if constexpr (std::is_constructible_v<Layer, const ModelConfig&, const LayerWeights&, const LayerOptions&>) {
            layers_.push_back(std::make_unique<Layer>(c, layer_weights(*weights_, l), lo));
        } else {
            raise<InvalidArgument>("this layer type needs its communicators: build the model with a layer factory");
        }
    }
    exec_.embedding = weights_->at("model.embed_tokens.weight").matrix();
    exec_.head = weights_->at(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight").matrix();
    exec_.norm = weights_->at("model.norm.weight").view<1>();
    exec_.eps = static_cast<float>(c.rms_norm_eps);
    exec_.reduce_streams = std::move(reduce_streams);
    exec_.check_finite = options.check_finite;
}

template <class Layer, gemm::GemmPolicy Gemm>
Tensor<float> Model<Layer, Gemm>::forward(const Batch& batch, std::span<const std::int32_t> tokens, LogitRows rows)
{
    const ModelConfig& c = weights_->config;
    slots_.check(batch, tokens, c.vocab_size);
    const std::vector<index_t> kept = detail::kept_logit_rows(batch, rows);
    Tensor<float> logits({static_cast<index_t>(kept.size()), c.vocab_size});
    detail::model_forward(exec_, batch, tokens, std::span(layers_), c.groups(), kept, logits.view<2>());
    if (exec_.check_finite)
        detail::check_finite(logits.span(), 1, logits.shape()[0], c.vocab_size, batch, "the logits", "vocabulary entry",
                             kept);
    slots_.commit(batch);
    return logits;
}

}  // namespace foe
