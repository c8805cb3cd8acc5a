#pragma once
// CudaModel: the whole FoE or MoE model on one GPU (or one rank's share of the groups, with a
// cross-rank reduce), behind the same ModelInterface as the host model, so foe_run, generation
// and the tests drive either backend.
//
//   foe::cuda::CudaModel<> model(weights, {.cache_slots = 4, .max_batch_tokens = 2048});
//   foe::Tensor<float> logits = model.prefill(prompt);      // [prompt, vocab] on the host
//   std::vector<float> next = model.decode(token);           // a replayed CUDA graph
//
// Memory is planned at construction from CudaModelOptions and reported by memory(): weights
// (bf16), KV caches (bf16, head-major per group), and one scratch arena shared by the layers;
// nothing is allocated afterwards. A forward copies the batch description (positions, slots,
// token ids) from pinned host memory into fixed device buffers, enqueues every layer on the
// model's stream, and copies the logits back. A decode step (every sequence one new token) is
// captured once per batch size into a CUDA graph and replayed: the kernels read the batch from
// those fixed buffers, so a replay with new tokens and positions needs no new capture.
//
// Paged KV cache (CudaModelOptions::page_size > 0): each layer's group caches are pools of pages,
// and every forward's Batch carries the block tables (Batch::with_block_tables) that an engine's
// allocator or foe::serve::BlockManager keeps; the model copies them, like the batch arrays, into
// a device table at a fixed address before each forward, so decode graphs replay with new tables.
//
// Expert parallelism (the standard-MoE baseline with data-parallel attention): give the model an
// ExpertExchange (parallel::NcclExpertExchange) and it holds only that exchange's experts; every
// layer sends its routed rows through it. Each rank runs its own sequences, and every rank calls
// forward() for every step (an empty Batch when it has nothing to run: its layers still serve the
// peers' rows). The dynamic exchange synchronises with the host once per layer, so it is not
// capturable: decode steps replay CUDA graphs only with a second, fixed-capacity exchange
// (decode_expert_exchange, sized for max_sequences tokens), and otherwise run eagerly.
// With head_parts > 1 attention is head-parallel as well (the second MoE baseline): every rank
// runs every sequence over its share of the KV heads, and only its slice of the tokens goes
// through the exchange (ceil(T / head_parts) rows).
//
// The model's equations are the host model's: one body, model/model_body.hpp, run here by
// model_exec<CudaBackend> (cuda/model_exec.cuh). What this file adds is the backend's framing:
// the memory plan, staging the batch, decode graphs, the expert exchanges, downloading the logits.
// The layers are the library's composed layer types over the device policies, as the host model's
// are over host ones: FoeLayer / MoeLayer (layer/foe_layer.hpp, one body for both backends) or
// MoeHeadParallelLayer, with CudaGqaAttention<Gemm, Cache>, CudaRouter<Score, Selection, Gemm>,
// CudaSwiGluExperts<Gemm>, CudaLocalExperts or CudaExchangeExperts, and AllReduceMean over
// CudaSelfComm or the options' reduce hook. The config's score function and the options' cache
// layout and parallelism pick the type at construction (make_device_layer below), unless
// CudaModelOptions::make_layer builds layers of your own composition (cuda::model_layer<Layer>).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "foe/attention/gqa_attention.cuh"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/comm/function_comm.cuh"
#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/model_exec.cuh"
#include "foe/cuda/stream.cuh"
#include "foe/cuda/upload.cuh"
#include "foe/experts/combine.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/layer/moe_head_parallel_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/model/model.hpp"
#include "foe/model/weights.hpp"
#include "foe/ops/elementwise.cuh"
#include "foe/ops/rmsnorm.cuh"
#include "foe/parallel/exchange_experts.cuh"
#include "foe/parallel/expert_exchange.cuh"
#include "foe/parallel/local_experts.cuh"
#include "foe/routing/router.cuh"
#include "foe/routing/scores.hpp"
#include "foe/routing/topk.hpp"
#include "foe/sync/all_reduce_mean.cuh"

namespace foe::cuda {

/// Sums n fp32 device values in place over the ranks that hold the other expert groups
/// (NcclComm::all_reduce_sum on the given stream).
using DeviceReduce = comm::FunctionComm::Reduce;

/// out [ranks * n] = the n bf16 device values `in` of every rank, in rank order
/// (NcclComm::all_gather on the given stream).
using DeviceGather = comm::FunctionComm::Gather;

/// The collectives of head-parallel attention over the ranks sharing the heads: the fp32 sum of
/// the partial attention outputs, and the all-gather of the ranks' token slices.
struct HeadParallelComm {
    DeviceReduce reduce;
    DeviceGather gather;
};

/// A CudaModel's handle on one of its layers, whichever composed type it is: one virtual call per
/// layer per forward; the layer's own steps are direct calls. model_layer<Layer>(...) makes one.
class ModelLayer {
public:
    virtual ~ModelLayer() = default;
    virtual void forward(const DeviceBatch& batch, TensorView<const bfloat16, 3> in, TensorView<bfloat16, 3> out,
                         const DeviceContext& ctx) = 0;
    /// The streams the layer writes (its held groups).
    [[nodiscard]] virtual index_t streams() const = 0;
    [[nodiscard]] virtual std::size_t scratch_bytes() const = 0;
    /// Device bytes of the policies: weights, and state kept between a forward's calls (the
    /// experts' inverse permutation); 0 for a policy that does not say.
    [[nodiscard]] virtual std::size_t weight_bytes() const = 0;
    [[nodiscard]] virtual std::size_t cache_bytes() const = 0;
    /// The last forward's routing, on the device.
    [[nodiscard]] virtual routing::DeviceRoutingResult routing() const = 0;
    /// Expert-parallel layers: the exchange of the next forwards (the model switches between the
    /// dynamic one and the capturable one of decode steps). Others ignore it.
    virtual void use_exchange(ExpertExchange*) {}
};

namespace detail {
/// A policy's device bytes as it reports them (device_bytes() or weight_bytes()), else 0.
template <class Policy>
[[nodiscard]] std::size_t policy_device_bytes(const Policy& p)
{
    if constexpr (requires { p.device_bytes(); })
        return p.device_bytes();
    else if constexpr (requires { p.weight_bytes(); })
        return p.weight_bytes();
    else
        return 0;
}

template <class Layer>
class ModelLayerOf final : public ModelLayer {
public:
    template <class... Args>
    explicit ModelLayerOf(Args&&... args) : layer_(std::forward<Args>(args)...)
    {
    }
    void forward(const DeviceBatch& batch, TensorView<const bfloat16, 3> in, TensorView<bfloat16, 3> out,
                 const DeviceContext& ctx) override
    {
        layer_.forward(batch, in, out, ctx);
    }
    [[nodiscard]] index_t streams() const override { return layer_.streams(); }
    [[nodiscard]] std::size_t scratch_bytes() const override { return layer_.scratch_bytes(); }
    [[nodiscard]] std::size_t weight_bytes() const override
    {
        return policy_device_bytes(layer_.attention()) + policy_device_bytes(layer_.router()) +
               policy_device_bytes(layer_.experts());
    }
    [[nodiscard]] std::size_t cache_bytes() const override
    {
        if constexpr (requires { layer_.attention().cache_bytes(); })
            return layer_.attention().cache_bytes();
        else
            return 0;
    }
    [[nodiscard]] routing::DeviceRoutingResult routing() const override { return layer_.last_routing(); }
    void use_exchange(ExpertExchange* exchange) override
    {
        if constexpr (std::same_as<typename Layer::expert_parallel_type, parallel::CudaExchangeExperts>) {
            require(exchange != nullptr, "an expert-parallel layer needs an expert exchange");
            layer_.expert_parallel_policy() = parallel::CudaExchangeExperts(*exchange);
        }
    }

private:
    Layer layer_;
};
}  // namespace detail

/// A CudaModel layer of the composed device layer type Layer (FoeLayer, MoeLayer or
/// MoeHeadParallelLayer over device policies), built from Layer's constructor arguments: what a
/// CudaModelOptions::make_layer factory returns.
template <class Layer, class... Args>
    requires std::same_as<backend_of_t<typename Layer::attention_type>, CudaBackend>
[[nodiscard]] std::unique_ptr<ModelLayer> model_layer(Args&&... args)
{
    return std::make_unique<detail::ModelLayerOf<Layer>>(std::forward<Args>(args)...);
}

struct CudaModelOptions {
    index_t cache_slots = 1;       ///< sequences held at once
    index_t cache_capacity = 0;    ///< positions per sequence; 0: max_position_embeddings
    /// Largest batch.tokens() of one forward; 0: min(cache_capacity, 4096). It sizes every
    /// activation buffer, the [tokens, vocab] fp32 logits among them (a longer prompt is a
    /// CapacityError naming this option).
    index_t max_batch_tokens = 0;
    index_t max_sequences = 0;     ///< largest batch.sequences(); 0: cache_slots
    /// Replay decode steps (every sequence of the batch one new token) from CUDA graphs, one
    /// captured per batch size. A reduce_streams hook must then be capturable (NcclComm's
    /// collectives are; a hook that synchronises with the host is not: turn graphs off).
    bool cuda_graphs = true;
    int device = -1;               ///< CUDA device to use; -1: the current one
    index_t group_begin = 0;       ///< held groups [group_begin, group_end) (a multi-rank FoE model)
    index_t group_end = -1;        ///< -1: every group
    /// Sums fp32 device values over the ranks holding the other groups; required exactly when
    /// this model does not hold every group (bind NcclComm::all_reduce_sum). The communicator
    /// must outlive the model: NCCL waits for the graphs that captured its collectives before it
    /// destroys a communicator, so destroy the model first.
    DeviceReduce reduce_streams;
    /// Waits for the model's stream at the end of a forward; empty: cudaStreamSynchronize. With a
    /// cross-rank reduce bind NcclComm::synchronize, whose wait is bounded by the communicator's
    /// timeout and notices a peer's failure: a dead peer is then a CommError, not a hang.
    std::function<void(cudaStream_t)> synchronize;
    /// Called after each replay of a decode graph is enqueued (bind NcclComm::watch, so that
    /// the collectives inside the graph are watched like eager ones).
    std::function<void(cudaStream_t)> after_graph_launch;
    bool check_finite = false;     ///< throw NumericalError for a non-finite logit (checked on the host)
    /// Expert parallelism: the model holds the experts this exchange says this rank holds and
    /// reaches the others through it, in every forward but a captured decode step. Needs a config
    /// of one expert group (the standard MoE) and max_tokens() >= max_batch_tokens. The exchange
    /// (and its communicator) must outlive the model; its device memory is not in memory().
    std::shared_ptr<ExpertExchange> expert_exchange;
    /// The exchange of decode steps replayed from CUDA graphs: capturable() (fixed capacity), the
    /// same experts, max_tokens() >= max_sequences. Every rank must then make the same kind of step
    /// at the same time (all decode steps, or none), since the two exchanges do not talk to each
    /// other. Null: with an expert_exchange, decode steps run eagerly (no graphs).
    std::shared_ptr<ExpertExchange> decode_expert_exchange;
    /// Called while a forward is enqueued, before layer l (l = 0 .. L-1) and after the last
    /// (l = L), with the model's stream: e.g. to record CUDA events that time the layers. Also
    /// called during a decode graph's capture (what it enqueues is captured).
    std::function<void(index_t layer, cudaStream_t)> layer_boundary;
    /// Head-parallel attention (with expert_exchange; the second MoE baseline): this rank holds
    /// KV-head share head_part of head_parts (and their KV caches), every rank runs the same
    /// batch, and head_comm's reduce (fp32 sum, NcclComm::all_reduce_sum) and gather
    /// (NcclComm::all_gather) join the shares; the exchanges then take ceil(tokens / head_parts)
    /// tokens. last_routing() then holds the routing of this rank's token slice.
    index_t head_part = 0;
    index_t head_parts = 1;
    HeadParallelComm head_comm;
    /// Paged KV cache: page_size > 0 makes every group cache of every layer a pool of cache_pages
    /// pages of page_size positions (as the host's PagedKvCache). Each forward's batch must then
    /// carry block tables of that page size (Batch::with_block_tables) mapping every position its
    /// sequences hold or append to a page in [0, cache_pages); the model never allocates or frees
    /// a page. Sequences still hold at most cache_capacity positions. 0: contiguous caches.
    index_t page_size = 0;
    index_t cache_pages = 0;  ///< 0: cache_slots x ceil(cache_capacity / page_size), as much as contiguous
    /// Builds layer l from its weights and the planned LayerOptions (cache, held groups,
    /// max_tokens = max_batch_tokens, max_sequences): a layer type of your own composition,
    ///   [&](foe::index_t, const foe::LayerWeights& w, const foe::LayerOptions& lo) {
    ///       return foe::cuda::model_layer<MyLayer>(config, w, lo); }
    /// Its layers must write every held group's stream (ConfigError otherwise), and should use
    /// the model's GEMM policy: that one is made at construction, another at its first use,
    /// which must then be an eager forward (a decode step's graph capture cannot create a cuBLASLt
    /// handle), and its workspace is not in memory(). Empty: the layer type the config and these
    /// options pick (make_device_layer).
    std::function<std::unique_ptr<ModelLayer>(index_t layer, const LayerWeights&, const LayerOptions&)> make_layer;
};

namespace detail {

/// Throws ConfigError for a valid config that the CUDA kernels cannot run.
inline void require_device_config(const ModelConfig& c)
{
    c.validate();
    require<ConfigError>(c.num_experts <= RouterLaunch::max_experts, "the CUDA router handles at most ",
                         RouterLaunch::max_experts, " experts; the config has ", c.num_experts);
    require<ConfigError>(c.head_dim % 2 == 0, "the CUDA RoPE needs an even head_dim, got ", c.head_dim);
    require<ConfigError>(c.head_dim <= DecodeAttentionLaunch::max_head_dim, "the CUDA attention handles head_dim up to ",
                         DecodeAttentionLaunch::max_head_dim, ", got ", c.head_dim);
    require<ConfigError>(c.hidden_size % 8 == 0 && c.intermediate_size % 8 == 0 && c.head_dim % 8 == 0,
                         "the CUDA GEMMs need hidden_size (", c.hidden_size, "), intermediate_size (",
                         c.intermediate_size, ") and head_dim (", c.head_dim,
                         ") to be multiples of 8 (16-byte bf16 rows)");
}

/// The composed layer type of a CudaModel with these options, built for layer l's weights.
template <DeviceBatchedGemmPolicy Gemm, class Score, class Cache>
std::unique_ptr<ModelLayer> make_device_layer(const ModelConfig& c, const LayerWeights& w, const LayerOptions& lo,
                                               const CudaModelOptions& o)
{
    using Attention = attention::CudaGqaAttention<Gemm, Cache>;
    using Experts = experts::CudaSwiGluExperts<Gemm>;
    using GlobalRouter = routing::CudaRouter<Score, routing::GlobalTopK, Gemm>;
    using GroupRouter = routing::CudaRouter<Score, routing::PerGroupTopK, Gemm>;
    if (o.head_parts > 1) {
        using Layer = MoeHeadParallelLayer<Attention, GlobalRouter, Experts, parallel::CudaExchangeExperts,
                                           comm::FunctionComm>;
        return model_layer<Layer>(
            c, w, lo,
            comm::FunctionComm(static_cast<int>(o.head_part), static_cast<int>(o.head_parts), o.head_comm.reduce,
                               o.head_comm.gather),
            parallel::CudaExchangeExperts(*o.expert_exchange));
    }
    if (o.expert_exchange) {
        using Layer = MoeLayer<Attention, GlobalRouter, Experts, parallel::CudaExchangeExperts>;
        return model_layer<Layer>(c, w, lo, parallel::CudaExchangeExperts(*o.expert_exchange));
    }
    if (o.reduce_streams) {
        // Other ranks hold the other groups: the sync all-reduces over them through the hook. Only
        // the sync reads the communicator, and only its size > 1 (the ranks the held groups imply).
        const index_t held = lo.group_end - lo.group_begin;
        const auto ranks = static_cast<int>((c.groups() + held - 1) / held);
        using Layer =
            FoeLayer<Attention, GroupRouter, Experts, parallel::CudaLocalExperts, sync::AllReduceMean<comm::FunctionComm>>;
        return model_layer<Layer>(
            c, w, lo,
            sync::AllReduceMean<comm::FunctionComm>(
                comm::FunctionComm(std::min(ranks - 1, static_cast<int>(lo.group_begin / held)), std::max(ranks, 2),
                                   o.reduce_streams)));
    }
    if (c.groups() == 1) {  // the standard MoE: one stream, no sync
        using Layer = MoeLayer<Attention, GlobalRouter, Experts, parallel::CudaLocalExperts>;
        return model_layer<Layer>(c, w, lo);
    }
    using Layer = FoeLayer<Attention, GroupRouter, Experts, parallel::CudaLocalExperts,
                           sync::AllReduceMean<comm::CudaSelfComm>>;
    return model_layer<Layer>(c, w, lo);
}

template <DeviceBatchedGemmPolicy Gemm>
std::unique_ptr<ModelLayer> make_device_layer(const ModelConfig& c, const LayerWeights& w, const LayerOptions& lo,
                                               const CudaModelOptions& o)
{
    const bool sigmoid = c.scoring_func == ScoreFunction::sigmoid;
    if (o.page_size > 0)
        return sigmoid ? make_device_layer<Gemm, routing::Sigmoid, attention::PagedKvCache>(c, w, lo, o)
                       : make_device_layer<Gemm, routing::Softmax, attention::PagedKvCache>(c, w, lo, o);
    return sigmoid ? make_device_layer<Gemm, routing::Sigmoid, attention::ContiguousKvCache>(c, w, lo, o)
                   : make_device_layer<Gemm, routing::Softmax, attention::ContiguousKvCache>(c, w, lo, o);
}

}  // namespace detail

/// Device bytes a CudaModel holds, by purpose. Not counted: the CUDA context, cuBLASLt's handle,
/// the captured graphs, and an expert exchange's buffers (the exchange's own).
struct CudaMemory {
    std::size_t weights = 0;         ///< bf16 weights (and the experts' inverse permutations, int32 per row)
    std::size_t kv_cache = 0;        ///< every layer's K and V (bf16)
    std::size_t scratch = 0;         ///< activations, logits, the batch's device copy
    std::size_t gemm_workspace = 0;  ///< the GEMM policy's own (32 MiB for cuBLASLt; none for TcGemm)
    [[nodiscard]] std::size_t total() const noexcept { return weights + kv_cache + scratch + gemm_workspace; }
};

template <DeviceBatchedGemmPolicy Gemm = LtGemm>
class CudaModel final : public ModelInterface {
public:
    /// Uploads the weights (bf16) and plans every buffer. Throws ConfigError / InvalidArgument
    /// for a config or options it cannot run, CudaError when the device is missing or full.
    explicit CudaModel(std::shared_ptr<const ModelWeights> weights, CudaModelOptions options = {});
    CudaModel(const CudaModel&) = delete;
    CudaModel& operator=(const CudaModel&) = delete;
    ~CudaModel() override;

    using ModelInterface::forward;
    /// LogitRows::last_per_chunk runs the final norm and the LM head over the kept rows only (a
    /// decode step keeps every row). A kept row's logits are the same bits as with every row kept
    /// with TcGemm, and close with cuBLASLt, which may pick another algorithm for another row
    /// count (see ModelInterface::forward).
    [[nodiscard]] Tensor<float> forward(const Batch& batch, std::span<const std::int32_t> tokens, LogitRows rows) override;
    [[nodiscard]] const ModelConfig& config() const noexcept override { return config_; }
    [[nodiscard]] index_t sequence_length(index_t slot) const override { return slots_.length(slot); }
    [[nodiscard]] index_t cache_capacity() const noexcept override { return slots_.capacity(); }
    /// Downloads layer l's routing of the last forward (synchronises the model's stream).
    [[nodiscard]] const routing::RoutingResult& last_routing(index_t layer) const override;

    [[nodiscard]] CudaMemory memory() const noexcept { return memory_; }
    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_->get(); }
    [[nodiscard]] int device() const noexcept { return device_; }
    [[nodiscard]] const CudaModelOptions& options() const noexcept { return options_; }
    /// Decode graphs captured so far (one per decode batch size).
    [[nodiscard]] std::size_t captured_graphs() const noexcept { return graphs_.size(); }

private:
    /// Enqueues the model body (model/model_body.hpp) for the batch staged in the device batch
    /// buffers, logits of the kept rows into logits_: the part of a forward a graph captures.
    void enqueue_forward(const DeviceBatch& batch, std::span<const index_t> kept, ExpertExchange* experts);
    void stage(const Batch& batch, std::span<const std::int32_t> tokens);
    void run_decode_graph(const DeviceBatch& batch, std::span<const index_t> kept);

    /// Owns an instantiated graph.
    struct GraphExec {
        cudaGraphExec_t exec = nullptr;
        GraphExec() = default;
        explicit GraphExec(cudaGraphExec_t e) : exec(e) {}
        GraphExec(GraphExec&& o) noexcept : exec(std::exchange(o.exec, nullptr)) {}
        GraphExec& operator=(GraphExec&&) = delete;
        GraphExec(const GraphExec&) = delete;
        ~GraphExec()
        {
            if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
        }
    };


    ModelConfig config_;
    CudaModelOptions options_;
    index_t held_;
    ::foe::detail::CacheSlots slots_;
    int device_ = 0;
    std::unique_ptr<Stream> stream_;
    std::vector<std::unique_ptr<ModelLayer>> layers_;
    DeviceArena head_weights_, scratch_arena_, layer_scratch_arena_;
    Scratch layer_scratch_;  // the layers' shared scratch (they run one after another)
    GemmSet gemms_;          // the layers' and the head's GEMM: made here, outlives every graph
    // The body's execution: the head's weights and the body's buffers (in the arenas above), the
    // stream, the layers' scratch and the GEMMs.
    ::foe::detail::model_exec<CudaBackend, Gemm> exec_;
    float* logits_ = nullptr;  // [T, vocab]
    // Batch metadata: pinned staging and a device buffer at fixed addresses, laid out alike.
    std::unique_ptr<BatchLayout> batch_layout_;
    std::int32_t* batch_device_ = nullptr;
    PinnedBuffer<std::int32_t> batch_host_;
    // Paged caches: the block table [cache_slots, page_table_width], pinned staging and device.
    index_t table_width_ = 0;  // pages per sequence in the block table; 0: contiguous caches
    std::int32_t* table_device_ = nullptr;
    PinnedBuffer<std::int32_t> table_host_;
    std::map<index_t, GraphExec> graphs_;
    std::set<index_t> uncapturable_;  // decode sizes whose capture failed: run eagerly
    CudaMemory memory_;
    mutable std::vector<routing::RoutingResult> routing_cache_;
    mutable std::vector<bool> routing_fresh_;
    index_t last_tokens_ = 0;  // of the last forward (a replayed graph updates no layer's host state)
};

// ---------------------------------------------------------------------------------------------

template <DeviceBatchedGemmPolicy Gemm>
CudaModel<Gemm>::CudaModel(std::shared_ptr<const ModelWeights> weights, CudaModelOptions options)
    : config_((require(weights != nullptr, "CudaModel: no weights"), weights->config)), options_(std::move(options))
{
    const ModelConfig& c = config_;
    detail::require_device_config(c);
    check_weights(*weights);
    auto& o = options_;
    if (o.cache_capacity <= 0) o.cache_capacity = c.max_position_embeddings;
    if (o.max_batch_tokens <= 0) o.max_batch_tokens = std::min<index_t>(o.cache_capacity, 4096);
    if (o.max_sequences <= 0) o.max_sequences = o.cache_slots;
    if (o.group_end < 0) o.group_end = c.groups();
    require<InvalidArgument>(o.cache_slots > 0, "cache_slots (", o.cache_slots, ") must be positive");
    require<InvalidArgument>(o.cache_capacity <= c.max_position_embeddings, "cache_capacity (", o.cache_capacity,
                             ") exceeds max_position_embeddings (", c.max_position_embeddings, ")");
    require<InvalidArgument>(o.max_sequences <= o.cache_slots, "max_sequences (", o.max_sequences,
                             ") exceeds cache_slots (", o.cache_slots, "): a batch holds each slot at most once");
    require<InvalidArgument>(o.max_batch_tokens <= 0x7fffffff / std::max<index_t>(c.num_experts_per_tok, 1),
                             "max_batch_tokens (", o.max_batch_tokens, ") times top-k exceeds int32 row indices");
    require<InvalidArgument>(0 <= o.group_begin && o.group_begin < o.group_end && o.group_end <= c.groups(),
                             "held groups [", o.group_begin, ", ", o.group_end, ") are not inside [0, ", c.groups(), ")");
    held_ = o.group_end - o.group_begin;
    require<InvalidArgument>(static_cast<bool>(o.reduce_streams) == (held_ < c.groups()), "this model holds ", held_,
                             " of ", c.groups(), " groups: reduce_streams must be set exactly when other ranks hold "
                             "groups");
    require<InvalidArgument>(o.head_parts >= 1, "head_parts (", o.head_parts, ") must be positive");
    require<InvalidArgument>(o.page_size >= 0 && o.cache_pages >= 0, "page_size (", o.page_size, ") and cache_pages (",
                             o.cache_pages, ") must not be negative");
    if (o.expert_exchange) {
        const ExpertExchange& ep = *o.expert_exchange;
        require<InvalidArgument>(c.groups() == 1, "expert parallelism in CudaModel is the standard-MoE baseline's: the "
                                 "config needs one expert group, it has ", c.groups());
        const index_t routed = (o.max_batch_tokens + o.head_parts - 1) / std::max<index_t>(o.head_parts, 1);
        require<InvalidArgument>(ep.max_tokens() >= routed, "the expert exchange takes ", ep.max_tokens(),
                                 " tokens; the model routes up to ", routed, " (max_batch_tokens = ", o.max_batch_tokens,
                                 " over ", o.head_parts, " head shares)");
        require<InvalidArgument>(ep.expert_count() > 0 && ep.expert_begin() >= 0 &&
                                     ep.expert_begin() + ep.expert_count() <= c.num_experts,
                                 "the expert exchange holds experts [", ep.expert_begin(), ", ",
                                 ep.expert_begin() + ep.expert_count(), "), not a range of the config's ",
                                 c.num_experts);
    }
    if (o.decode_expert_exchange) {
        const ExpertExchange& dec = *o.decode_expert_exchange;
        require<InvalidArgument>(o.expert_exchange != nullptr && o.cuda_graphs,
                                 "decode_expert_exchange is for captured decode steps: it needs an expert_exchange and "
                                 "cuda_graphs");
        require<InvalidArgument>(dec.capturable(), "decode_expert_exchange must be capturable (fixed capacity)");
        require<InvalidArgument>(dec.expert_begin() == o.expert_exchange->expert_begin() &&
                                     dec.expert_count() == o.expert_exchange->expert_count() &&
                                     dec.slots() == o.expert_exchange->slots() &&
                                     dec.max_tokens() >= (o.max_sequences + o.head_parts - 1) / o.head_parts,
                                 "decode_expert_exchange must hold the expert_exchange's experts and take "
                                 "max_sequences (", o.max_sequences, ") tokens (over ", o.head_parts,
                                 " head shares); it takes ", dec.max_tokens());
    }
    require<InvalidArgument>(o.head_parts >= 1 && 0 <= o.head_part && o.head_part < o.head_parts, "head share ",
                             o.head_part, " of ", o.head_parts, " is not a share");
    require<InvalidArgument>(o.head_parts == 1 || (o.expert_exchange && o.head_comm.reduce && o.head_comm.gather),
                             "head-parallel attention (head_parts ", o.head_parts,
                             ") needs an expert_exchange and head_comm's reduce and gather");
    slots_ = ::foe::detail::CacheSlots(o.cache_slots, o.cache_capacity);
    const int devices = cuda_device_count();
    require<CudaError>(devices > 0, "CudaModel: no CUDA device is available");
    require<InvalidArgument>(o.device < devices, "CudaModel: device ", o.device, " requested but only ", devices,
                             " CUDA device(s) are visible");
    device_ = o.device >= 0 ? o.device : current_device();
    const DeviceGuard on_device(device_);
    stream_ = std::make_unique<Stream>();
    (void)gemms_.template get<Gemm>();  // on this device, now: never inside a decode graph's capture
    if constexpr (requires { Gemm::workspace_bytes; }) memory_.gemm_workspace = Gemm::workspace_bytes;
    // The layers: composed types over the device policies, planned for max_batch_tokens.
    LayerOptions lo;
    lo.cache_slots = o.cache_slots;
    lo.cache_capacity = o.cache_capacity;
    lo.page_size = o.page_size > 0 ? o.page_size : lo.page_size;
    lo.cache_pages = o.cache_pages;
    lo.group_begin = o.group_begin;
    lo.group_end = o.group_end;
    if (o.expert_exchange) {
        lo.expert_begin = o.expert_exchange->expert_begin();
        lo.expert_end = lo.expert_begin + o.expert_exchange->expert_count();
    }
    lo.max_tokens = o.max_batch_tokens;
    lo.max_sequences = o.max_sequences;
    if (o.page_size > 0) {
        table_width_ = (o.cache_capacity + o.page_size - 1) / o.page_size;
        if (o.cache_pages <= 0) o.cache_pages = lo.cache_pages = o.cache_slots * table_width_;
    }
    std::size_t layer_scratch = 0;
    for (index_t l = 0; l < c.num_hidden_layers; ++l) {
        const LayerWeights lw = layer_weights(*weights, l);
        layers_.push_back(o.make_layer ? o.make_layer(l, lw, lo) : detail::make_device_layer<Gemm>(c, lw, lo, o));
        require<ConfigError>(layers_.back() != nullptr && layers_.back()->streams() == held_, "CudaModel: layer ", l,
                             " writes ", layers_.back() ? layers_.back()->streams() : 0, " streams; the model holds ",
                             held_, " groups");
        // The policies' bytes, and the post-attention norm (bf16 [d]) that every composed layer keeps.
        memory_.weights += layers_.back()->weight_bytes() + static_cast<std::size_t>(c.hidden_size) * sizeof(bfloat16);
        memory_.kv_cache += layers_.back()->cache_bytes();
        layer_scratch = std::max(layer_scratch, layers_.back()->scratch_bytes());
    }

    // Embedding, final norm and LM head.
    const index_t d = c.hidden_size, vocab = c.vocab_size;
    std::vector<bfloat16> embed, norm, head;
    append_bf16(embed, weights->at("model.embed_tokens.weight").matrix());
    append_bf16(norm, weights->at("model.norm.weight").view<1>());
    if (!c.tie_word_embeddings) append_bf16(head, weights->at("lm_head.weight").matrix());
    ArenaPlan head_plan;
    for (const auto* h : {&embed, &norm, &head}) head_plan.add<bfloat16>(h->size());
    head_weights_ = DeviceArena(head_plan.bytes());
    exec_.embedding = upload_to(head_weights_, embed);
    exec_.norm = upload_to(head_weights_, norm);
    exec_.head = c.tie_word_embeddings ? exec_.embedding : upload_to(head_weights_, head);
    exec_.hidden_size = d;
    exec_.vocab = vocab;
    exec_.eps = static_cast<float>(c.rms_norm_eps);
    exec_.held = held_;
    exec_.ctx = DeviceContext{stream_->get(), &layer_scratch_, &gemms_};
    exec_.reduce_streams = o.reduce_streams;
    exec_.on_layer_boundary = o.layer_boundary;
    memory_.weights += head_weights_.bytes();

    // Scratch: the layers' shared workspace; the ping-pong streams, the head's and the batch's.
    const index_t t = o.max_batch_tokens;
    layer_scratch_arena_ = DeviceArena(layer_scratch);
    layer_scratch_ = Scratch(layer_scratch_arena_.take_bytes(layer_scratch), layer_scratch);
    const auto td = static_cast<std::size_t>(t * d);
    batch_layout_ = std::make_unique<BatchLayout>(o.max_sequences, o.max_batch_tokens);
    const std::size_t batch_ints = batch_layout_->size();
    ArenaPlan plan;
    plan.add<bfloat16>(static_cast<std::size_t>(held_) * td);
    plan.add<bfloat16>(static_cast<std::size_t>(held_) * td);
    plan.add<bfloat16>(td);
    plan.add<float>(td);
    plan.add<float>(static_cast<std::size_t>(t * vocab));
    plan.add<std::int32_t>(batch_ints);
    const auto table_ints = static_cast<std::size_t>(o.cache_slots * table_width_);
    plan.add<std::int32_t>(table_ints);
    scratch_arena_ = DeviceArena(plan.bytes());
    exec_.buffers[0] = scratch_arena_.take<bfloat16>(static_cast<std::size_t>(held_) * td);
    exec_.buffers[1] = scratch_arena_.take<bfloat16>(static_cast<std::size_t>(held_) * td);
    exec_.hidden = scratch_arena_.take<bfloat16>(td);
    exec_.hidden32 = scratch_arena_.take<float>(td);
    logits_ = scratch_arena_.take<float>(static_cast<std::size_t>(t * vocab));
    batch_device_ = scratch_arena_.take<std::int32_t>(batch_ints);
    batch_host_ = PinnedBuffer<std::int32_t>(batch_ints);
    if (table_ints > 0) {
        table_device_ = scratch_arena_.take<std::int32_t>(table_ints);
        table_host_ = PinnedBuffer<std::int32_t>(table_ints);
    }
    memory_.scratch = layer_scratch_arena_.bytes() + scratch_arena_.bytes();
    routing_cache_.resize(layers_.size());
    routing_fresh_.assign(layers_.size(), false);
    // The fp32 host weights are not kept: everything the model reads is on the device now.
}

template <DeviceBatchedGemmPolicy Gemm>
CudaModel<Gemm>::~CudaModel()
{
    // Work still in flight finishes before its graphs, buffers and stream go.
    try {
        const DeviceGuard on_device(device_);
        if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_->get());
        graphs_.clear();
    } catch (const Error&) {  // the device is gone: what is left is freed as well as it can be
    }
}

template <DeviceBatchedGemmPolicy Gemm>
void CudaModel<Gemm>::stage(const Batch& batch, std::span<const std::int32_t> tokens)
{
    // Writing the pinned staging area is safe: the previous forward synchronised before returning.
    std::int32_t* h = batch_host_.data();
    const auto used = batch_layout_->fill(batch, tokens, std::span<std::int32_t>(h, batch_host_.size()));
    for (int s = 0; s < BatchLayout::section_count; ++s) {
        const std::size_t off = batch_layout_->offset(static_cast<BatchLayout::Section>(s));
        if (used[static_cast<std::size_t>(s)] > 0)
            check(cudaMemcpyAsync(batch_device_ + off, h + off, used[static_cast<std::size_t>(s)] * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream_->get()),
                  "cudaMemcpyAsync (batch)");
    }
    if (table_width_ == 0) return;
    // The whole table, rows past the batch's tables -1 (forward() checked the batch's own rows).
    const BlockTableView& t = *batch.block_tables();
    const index_t width = table_width_;
    std::int32_t* row = table_host_.data();
    for (index_t slot = 0; slot < options_.cache_slots; ++slot, row += width)
        for (index_t i = 0; i < width; ++i)
            row[i] = slot < t.slots && i < t.max_pages ? static_cast<std::int32_t>(t.page(slot, i)) : -1;
    check(cudaMemcpyAsync(table_device_, table_host_.data(), table_host_.size() * sizeof(std::int32_t),
                          cudaMemcpyHostToDevice, stream_->get()),
          "cudaMemcpyAsync (block table)");
}

template <DeviceBatchedGemmPolicy Gemm>
void CudaModel<Gemm>::enqueue_forward(const DeviceBatch& batch, std::span<const index_t> kept, ExpertExchange* experts)
{
    exec_.experts = experts;
    const auto n_kept = static_cast<index_t>(kept.size());
    ::foe::detail::model_forward(exec_, batch, batch_device_ + batch_layout_->offset(BatchLayout::ids),
                                 std::span(layers_), config_.groups(), kept,
                                 MatrixView<float>(logits_, {n_kept, config_.vocab_size}));
}

template <DeviceBatchedGemmPolicy Gemm>
void CudaModel<Gemm>::run_decode_graph(const DeviceBatch& batch, std::span<const index_t> kept)
{
    // The graph bakes in every host-side argument of the decode step: the token count (= the
    // sequence count) and the buffers' addresses. Positions, slots, lengths and token ids are
    // read on the device, so one graph per batch size serves every later step of that size.
    ExpertExchange* experts = options_.decode_expert_exchange.get();
    if (uncapturable_.contains(batch.tokens)) {
        enqueue_forward(batch, kept, experts);
        return;
    }
    auto it = graphs_.find(batch.tokens);
    if (it == graphs_.end()) {
        cudaGraph_t graph = nullptr;
        check(cudaStreamBeginCapture(stream_->get(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        try {
            enqueue_forward(batch, kept, experts);
        } catch (...) {
            (void)cudaStreamEndCapture(stream_->get(), &graph);  // leaves capture mode; the partial graph is dropped
            if (graph != nullptr) (void)cudaGraphDestroy(graph);
            (void)cudaGetLastError();  // the invalidated capture's error must not surface in a later check
            throw;
        }
        const cudaError_t ended = cudaStreamEndCapture(stream_->get(), &graph);
        if (ended != cudaSuccess) {
            (void)cudaGetLastError();
            if (graph != nullptr) (void)cudaGraphDestroy(graph);
            // With collectives in the step every rank must capture alike (NCCL requires it): a
            // rank cannot quietly fall back on its own, so that is an error for the caller.
            require<CudaError>(!options_.reduce_streams && experts == nullptr, "CudaModel: capturing the decode step of ",
                               batch.tokens, " tokens failed (", cudaGetErrorString(ended),
                               "); with a cross-rank reduce or expert exchange, set cuda_graphs = false on every rank");
            // Something in the step cannot be captured: run this size eagerly from now on.
            uncapturable_.insert(batch.tokens);
            enqueue_forward(batch, kept, experts);
            return;
        }
        cudaGraphExec_t exec = nullptr;
        const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
        (void)cudaGraphDestroy(graph);
        check(status, "cudaGraphInstantiate");
        it = graphs_.emplace(batch.tokens, GraphExec(exec)).first;
    }
    check(cudaGraphLaunch(it->second.exec, stream_->get()), "cudaGraphLaunch");
    if (options_.after_graph_launch) options_.after_graph_launch(stream_->get());
}

template <DeviceBatchedGemmPolicy Gemm>
Tensor<float> CudaModel<Gemm>::forward(const Batch& batch, std::span<const std::int32_t> tokens, LogitRows rows)
{
    const ModelConfig& c = config_;
    const index_t t = batch.tokens(), vocab = c.vocab_size;
    slots_.check(batch, tokens, vocab);
    if (table_width_ > 0 && t > 0) {  // an empty batch writes and reads no cache
        const BlockTableView* tables = batch.block_tables();
        require<InvalidArgument>(tables != nullptr, "this CudaModel's KV cache is paged (pages of ", options_.page_size,
                                 " positions): the batch needs block tables (Batch::with_block_tables)");
        require<InvalidArgument>(tables->page_size == options_.page_size, "the block tables have pages of ",
                                 tables->page_size, " positions, the model's KV cache pages of ", options_.page_size);
        batch.check_pages(options_.cache_pages);
    }
    require<CapacityError>(t <= options_.max_batch_tokens, "the batch has ", t,
                           " tokens; this CudaModel was planned for at most max_batch_tokens = ",
                           options_.max_batch_tokens);
    require<CapacityError>(batch.sequences() <= options_.max_sequences, "the batch has ", batch.sequences(),
                           " sequences; this CudaModel was planned for at most max_sequences = ",
                           options_.max_sequences);
    const std::vector<index_t> kept = ::foe::detail::kept_logit_rows(batch, rows);
    const auto n_kept = static_cast<index_t>(kept.size());
    const DeviceGuard on_device(device_);
    Tensor<float> logits({n_kept, vocab});
    // From here the routing of the last forward is this one's, also if it fails part way.
    routing_fresh_.assign(layers_.size(), false);  // downloaded again on request
    last_tokens_ = t;
    if (t == 0) {  // as on the host: an empty chunk still sets its slot's length
        if (options_.expert_exchange) {
            // The peers' routed rows still come to this rank's experts, layer by layer.
            exec_.experts = options_.expert_exchange.get();
            (void)::foe::detail::model_layers(exec_, DeviceBatch{}, std::span(layers_),
                                              TensorView<const bfloat16, 3>(exec_.buffers[0], {1, 0, c.hidden_size}));
            if (options_.synchronize) options_.synchronize(stream_->get());
            else check(cudaStreamSynchronize(stream_->get()), "forward (cudaStreamSynchronize)");
        }
        slots_.commit(batch);
        return logits;
    }

    stage(batch, tokens);
    DeviceBatch db = batch_layout_->view(batch_device_, batch);
    db.block_table = table_device_;  // null for contiguous caches
    // A graph only for a pure decode step: every sequence exactly one token (a zero-length chunk
    // would change the sequence count, which the graph bakes in).
    const bool decode_step = db.max_new_tokens == 1 && batch.tokens() == batch.sequences();
    // With expert parallelism a graph needs the capturable exchange.
    const bool graphs = options_.cuda_graphs && (!options_.expert_exchange || options_.decode_expert_exchange);
    if (graphs && decode_step) run_decode_graph(db, kept);
    else enqueue_forward(db, kept, options_.expert_exchange.get());
    check(cudaMemcpyAsync(logits.values().data(), logits_, static_cast<std::size_t>(n_kept * vocab) * sizeof(float),
                          cudaMemcpyDeviceToHost, stream_->get()),
          "cudaMemcpyAsync (logits)");
    if (options_.synchronize) options_.synchronize(stream_->get());
    else check(cudaStreamSynchronize(stream_->get()), "forward (cudaStreamSynchronize)");
    if (options_.check_finite)
        ::foe::detail::check_finite(logits.span(), 1, n_kept, vocab, batch, "the logits", "vocabulary entry", kept);

    slots_.commit(batch);
    return logits;
}

template <DeviceBatchedGemmPolicy Gemm>
const routing::RoutingResult& CudaModel<Gemm>::last_routing(index_t layer) const
{
    require(layer >= 0 && layer < static_cast<index_t>(layers_.size()), "layer ", layer, " is outside [0, ",
            layers_.size(), ")");
    routing::RoutingResult& r = routing_cache_[static_cast<std::size_t>(layer)];
    if (routing_fresh_[static_cast<std::size_t>(layer)]) return r;
    const DeviceGuard on_device(device_);
    // The device arrays and the slot layout are the layer's; the row count is the last forward's
    // (the layer's own count is stale after a graph replay): its tokens, or this rank's slice of them.
    const routing::DeviceRoutingResult d = layers_[static_cast<std::size_t>(layer)]->routing();
    r.tokens = options_.head_parts > 1
                   ? ::foe::detail::TokenSlice::of(last_tokens_, options_.head_part, options_.head_parts).rows
                   : last_tokens_;
    r.slots_per_token = d.slots_per_token;
    r.slots_per_group = d.slots_per_group;
    r.group_begin = d.group_begin;
    const auto n = static_cast<std::size_t>(d.tokens * d.slots_per_token);
    r.experts.resize(n);
    r.weights.resize(n);
    if (n > 0) {
        check(cudaMemcpyAsync(r.experts.data(), d.experts, n * sizeof(std::int32_t), cudaMemcpyDeviceToHost,
                              stream_->get()),
              "cudaMemcpyAsync (routing)");
        check(cudaMemcpyAsync(r.weights.data(), d.weights, n * sizeof(float), cudaMemcpyDeviceToHost, stream_->get()),
              "cudaMemcpyAsync (routing)");
        check(cudaStreamSynchronize(stream_->get()), "cudaStreamSynchronize (routing)");
    }
    routing_fresh_[static_cast<std::size_t>(layer)] = true;
    return r;
}

}  // namespace foe::cuda
