#pragma once
// The weights of a whole model: named host tensors with Hugging Face's OLMoE names, the list of
// names and shapes a config implies, seeded random initialisation, and per-layer views.
//
// Matrices are kept in their stored dtype (fp32, bf16 or fp16; in memory or in a mapped file):
// the GEMMs read them as they are. Vectors (norm weights, the router's bias) and the router's
// gate are always fp32: they are a tiny share of the bytes, and the router's scores decide
// which experts run, so they are computed from the same fp32 weights on every path.

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/rng.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/weight.hpp"
#include "foe/layer/layer_weights.hpp"

namespace foe {

/// A tensor a model needs: its Hugging Face name and shape.
struct TensorSpec {
    std::string name;
    std::vector<index_t> shape;
};

/// Which tensors a rank holds (all when empty): a rank of a multi-rank model loads only the
/// experts it runs.
using TensorFilter = std::function<bool(std::string_view name)>;

struct ModelWeights {
    ModelConfig config;
    std::map<std::string, WeightTensor, std::less<>> tensors;
    TensorFilter holds;  ///< the tensors present; empty means every tensor of the config

    [[nodiscard]] bool held(std::string_view name) const { return !holds || holds(name); }

    /// The tensor `name`; throws FormatError naming it when absent.
    [[nodiscard]] const WeightTensor& at(std::string_view name) const
    {
        const auto it = tensors.find(name);
        if (it == tensors.end()) raise<FormatError>("model weights: missing tensor \"", name, "\"");
        return it->second;
    }
};

namespace names {
inline std::string layer(index_t l, std::string_view rest) { return detail::concat("model.layers.", l, ".", rest); }
inline std::string expert(index_t l, index_t e, std::string_view proj)
{
    return detail::concat("model.layers.", l, ".mlp.experts.", e, ".", proj, ".weight");
}
}  // namespace names

/// True for the tensors kept in fp32 whatever their stored dtype: vectors and the router's gate
/// (see the file comment).
[[nodiscard]] inline bool kept_in_f32(std::string_view name, std::size_t rank)
{
    return rank < 2 || name.ends_with("mlp.gate.weight");
}

/// Every tensor the config needs, in a stable order (the order files are written in).
[[nodiscard]] inline std::vector<TensorSpec> expected_tensors(const ModelConfig& c)
{
    c.validate();
    const index_t d = c.hidden_size, f = c.intermediate_size, qw = c.q_width(), kw = c.kv_width();
    std::vector<TensorSpec> out;
    out.push_back({"model.embed_tokens.weight", {c.vocab_size, d}});
    for (index_t l = 0; l < c.num_hidden_layers; ++l) {
        out.push_back({names::layer(l, "input_layernorm.weight"), {d}});
        out.push_back({names::layer(l, "self_attn.q_proj.weight"), {qw, d}});
        out.push_back({names::layer(l, "self_attn.k_proj.weight"), {kw, d}});
        out.push_back({names::layer(l, "self_attn.v_proj.weight"), {kw, d}});
        out.push_back({names::layer(l, "self_attn.o_proj.weight"), {d, qw}});
        if (c.qk_norm == QkNorm::per_head) {
            out.push_back({names::layer(l, "self_attn.q_norm.weight"), {c.head_dim}});
            out.push_back({names::layer(l, "self_attn.k_norm.weight"), {c.head_dim}});
        } else if (c.qk_norm == QkNorm::full_width) {
            out.push_back({names::layer(l, "self_attn.q_norm.weight"), {qw}});
            out.push_back({names::layer(l, "self_attn.k_norm.weight"), {kw}});
        }
        out.push_back({names::layer(l, "post_attention_layernorm.weight"), {d}});
        out.push_back({names::layer(l, "mlp.gate.weight"), {c.num_experts, d}});
        if (c.scoring_func == ScoreFunction::sigmoid)
            out.push_back({names::layer(l, "mlp.gate.e_score_correction_bias"), {c.num_experts}});
        for (index_t e = 0; e < c.num_experts; ++e) {
            out.push_back({names::expert(l, e, "gate_proj"), {f, d}});
            out.push_back({names::expert(l, e, "up_proj"), {f, d}});
            out.push_back({names::expert(l, e, "down_proj"), {d, f}});
        }
    }
    out.push_back({"model.norm.weight", {d}});
    if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, d}});
    return out;
}

/// Throws FormatError if a tensor the config needs is missing or has another shape.
inline void check_weights(const ModelWeights& w, std::string_view source = "model weights")
{
    for (const auto& spec : expected_tensors(w.config)) {
        if (!w.held(spec.name)) continue;
        const auto it = w.tensors.find(spec.name);
        if (it == w.tensors.end()) raise<FormatError>(source, ": missing tensor \"", spec.name, "\"");
        require<FormatError>(it->second.shape() == spec.shape, source, ": tensor \"", spec.name, "\" has shape ",
                             format_shape(it->second.shape()), ", expected ", format_shape(spec.shape));
        require<FormatError>(it->second.dtype() == DType::f32 || !kept_in_f32(spec.name, spec.shape.size()), source,
                             ": tensor \"", spec.name, "\" is stored as ", dtype_name(it->second.dtype()),
                             "; vectors and the router's gate must be F32 in memory (load_model_dir widens them)");
    }
}

/// Seeded random weights for a config. Each tensor is drawn from its own stream, keyed by its
/// name, so any subset of tensors (a rank's groups) gets the values a full init would give.
/// Projections are uniform in +-1/sqrt(fan_in), norm weights in [0.8, 1.2] (never all ones, so
/// a test notices a norm weight applied wrongly), embeddings in [-1, 1].
[[nodiscard]] inline ModelWeights random_weights(const ModelConfig& c, std::uint64_t seed, TensorFilter holds = {})
{
    ModelWeights w{c, {}, std::move(holds)};
    for (const auto& spec : expected_tensors(c)) {
        if (!w.held(spec.name)) continue;
        Tensor<float> t(spec.shape);
        const CounterRng rng(seed, stream_id(spec.name));
        const bool is_vector = spec.shape.size() == 1;
        if (spec.name.ends_with("e_score_correction_bias")) {
            rng.fill_uniform(t.span(), -0.05f, 0.05f);
        } else if (is_vector) {
            rng.fill_uniform(t.span(), 0.8f, 1.2f);
        } else if (spec.name == "model.embed_tokens.weight") {
            rng.fill_uniform(t.span(), -1.0f, 1.0f);
        } else {
            const float bound = 1.0f / std::sqrt(static_cast<float>(spec.shape[1]));
            rng.fill_uniform(t.span(), -bound, bound);
        }
        w.tensors.emplace(spec.name, WeightTensor(std::move(t)));
    }
    return w;
}

/// The weights as a checkpoint stored in `dtype` gives them when loaded: every value rounded to
/// `dtype` (to nearest even; exact when widening), matrices kept in `dtype`, vectors and the
/// router's gate in fp32 (see the file comment).
[[nodiscard]] inline ModelWeights stored_as(const ModelWeights& w, DType dtype)
{
    ModelWeights out{w.config, {}, w.holds};
    const auto round = [dtype](float v) {
        return dtype == DType::bf16 ? static_cast<float>(bfloat16(v))
               : dtype == DType::f16 ? static_cast<float>(float16(v))
                                     : v;
    };
    for (const auto& [name, t] : w.tensors) {
        if (t.dtype() == dtype) {
            out.tensors.emplace(name, t);
            continue;
        }
        Tensor<float> f = t.to_float();
        const auto n = static_cast<std::size_t>(f.size());
        if (kept_in_f32(name, t.shape().size())) {
            for (float& v : f.values()) v = round(v);
            out.tensors.emplace(name, WeightTensor(std::move(f)));
        } else if (dtype == DType::f32) {
            out.tensors.emplace(name, WeightTensor(f));
        } else {
            auto bits = std::make_shared<std::vector<std::uint16_t>>(n);
            for (std::size_t i = 0; i < n; ++i)
                (*bits)[i] = dtype == DType::bf16 ? bfloat16(f.values()[i]).bits : float16(f.values()[i]).bits;
            const auto* data = reinterpret_cast<const std::byte*>(bits->data());
            out.tensors.emplace(name, WeightTensor(dtype, t.shape(), data, std::move(bits)));
        }
    }
    return out;
}

/// Views of layer l's weights (all groups; the experts w holds, empty views for the others).
/// The views point into w.
[[nodiscard]] inline LayerWeights layer_weights(const ModelWeights& w, index_t l)
{
    const ModelConfig& c = w.config;
    require<InvalidArgument>(l >= 0 && l < c.num_hidden_layers, "layer ", l, " is outside [0, ", c.num_hidden_layers, ")");
    auto vec = [&](const std::string& name) { return w.at(name).view<1>(); };
    auto mat = [&](const std::string& name) { return w.at(name).matrix(); };
    LayerWeights lw;
    lw.input_norm = vec(names::layer(l, "input_layernorm.weight"));
    lw.q_proj = mat(names::layer(l, "self_attn.q_proj.weight"));
    lw.k_proj = mat(names::layer(l, "self_attn.k_proj.weight"));
    lw.v_proj = mat(names::layer(l, "self_attn.v_proj.weight"));
    lw.o_proj = mat(names::layer(l, "self_attn.o_proj.weight"));
    if (c.qk_norm != QkNorm::none) {
        lw.q_norm = vec(names::layer(l, "self_attn.q_norm.weight"));
        lw.k_norm = vec(names::layer(l, "self_attn.k_norm.weight"));
    }
    lw.post_norm = vec(names::layer(l, "post_attention_layernorm.weight"));
    lw.gate = w.at(names::layer(l, "mlp.gate.weight")).view<2>();
    if (c.scoring_func == ScoreFunction::sigmoid) lw.gate_bias = vec(names::layer(l, "mlp.gate.e_score_correction_bias"));
    lw.experts.reserve(static_cast<std::size_t>(c.num_experts));
    for (index_t e = 0; e < c.num_experts; ++e) {
        const std::string gate = names::expert(l, e, "gate_proj");
        if (!w.held(gate)) {
            lw.experts.emplace_back();  // held by another rank: empty views
            continue;
        }
        lw.experts.push_back({mat(gate), mat(names::expert(l, e, "up_proj")), mat(names::expert(l, e, "down_proj"))});
    }
    return lw;
}

}  // namespace foe
