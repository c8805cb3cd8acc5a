#pragma once
// The weights of a whole model: named fp32 host tensors with Hugging Face's OLMoE names, the
// list of names and shapes a config implies, seeded random initialisation, and per-layer views.

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
    std::map<std::string, Tensor<float>, std::less<>> tensors;
    TensorFilter holds;  ///< the tensors present; empty means every tensor of the config

    [[nodiscard]] bool held(std::string_view name) const { return !holds || holds(name); }

    /// The tensor `name`; throws FormatError naming it when absent.
    [[nodiscard]] const Tensor<float>& at(std::string_view name) const
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
        w.tensors.emplace(spec.name, std::move(t));
    }
    return w;
}

/// Views of layer l's weights (all groups; the experts w holds, empty views for the others).
/// The views point into w.
[[nodiscard]] inline LayerWeights layer_weights(const ModelWeights& w, index_t l)
{
    const ModelConfig& c = w.config;
    require<InvalidArgument>(l >= 0 && l < c.num_hidden_layers, "layer ", l, " is outside [0, ", c.num_hidden_layers, ")");
    auto vec = [&](const std::string& name) { return w.at(name).view<1>(); };
    auto mat = [&](const std::string& name) { return w.at(name).view<2>(); };
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
    lw.gate = mat(names::layer(l, "mlp.gate.weight"));
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
