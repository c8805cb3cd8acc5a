#pragma once
// Float64 naive oracles, written straight from the equations (DESIGN.md 1.1, 1.2) and from
// Hugging Face's modeling_olmoe.py, sharing no code with the library: dense loops over the full
// weight tensors, indices computed from first principles. Every library kernel and layer is
// compared against these on random inputs.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <map>
#include <span>
#include <vector>

#include "foe/core/config.hpp"
#include "foe/model/weights.hpp"

namespace oracle {

using foe::index_t;
using Vec = std::vector<double>;

inline Vec to_double(std::span<const float> x) { return Vec(x.begin(), x.end()); }

/// A weight's values as floats (bf16/fp16 weights widened exactly). An fp32 weight is viewed in
/// place; a widened copy is cached with a copy of the weight, which keeps its bytes alive, so a
/// cached address is never reused by another weight.
struct Floats {
    std::span<const float> values;
    [[nodiscard]] std::span<const float> span() const { return values; }
};
inline Floats tensor(const foe::ModelWeights& w, const std::string& name)
{
    const foe::WeightTensor& t = w.at(name);
    if (t.dtype() == foe::DType::f32)
        return {{reinterpret_cast<const float*>(t.bytes()), static_cast<std::size_t>(t.size())}};
    thread_local std::map<const std::byte*, std::pair<foe::WeightTensor, foe::Tensor<float>>> widened;
    auto it = widened.find(t.bytes());
    if (it == widened.end()) it = widened.emplace(t.bytes(), std::pair{t, t.to_float()}).first;
    return {it->second.second.span()};
}

/// y[S, N] = x[S, K] W[N, K]^T
inline Vec matmul_nt(const Vec& x, index_t s, index_t k, std::span<const float> w, index_t n)
{
    Vec y(static_cast<std::size_t>(s * n), 0.0);
    for (index_t i = 0; i < s; ++i)
        for (index_t j = 0; j < n; ++j) {
            double acc = 0.0;
            for (index_t p = 0; p < k; ++p) acc += x[static_cast<std::size_t>(i * k + p)] * w[static_cast<std::size_t>(j * k + p)];
            y[static_cast<std::size_t>(i * n + j)] = acc;
        }
    return y;
}

/// RMSNorm of each row of length n.
inline Vec rms_norm(const Vec& x, index_t n, std::span<const float> w, double eps)
{
    Vec y(x.size());
    for (std::size_t r = 0; r < x.size() / static_cast<std::size_t>(n); ++r) {
        double ss = 0.0;
        for (index_t j = 0; j < n; ++j) ss += x[r * n + j] * x[r * n + j];
        const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
        for (index_t j = 0; j < n; ++j) y[r * n + j] = w[static_cast<std::size_t>(j)] * x[r * n + j] * inv;
    }
    return y;
}

/// Rotate-half RoPE of one head vector v (length hd) at position pos.
inline void rope(double* v, index_t hd, index_t pos, double theta)
{
    const index_t half = hd / 2;
    for (index_t j = 0; j < half; ++j) {
        const double angle = static_cast<double>(pos) * std::pow(theta, -2.0 * static_cast<double>(j) / static_cast<double>(hd));
        const double a = v[j], b = v[j + half];
        v[j] = a * std::cos(angle) - b * std::sin(angle);
        v[j + half] = b * std::cos(angle) + a * std::sin(angle);
    }
}

inline double silu(double x) { return x / (1.0 + std::exp(-x)); }

/// Selected experts and weights of one token for the experts [begin, end): the `count` largest
/// keys, ties to the lower index; weights are the scores, renormalised if asked.
inline std::vector<std::pair<index_t, double>> top_k(const Vec& scores, const Vec& keys, index_t begin, index_t end,
                                                     index_t count, bool renormalize)
{
    std::vector<index_t> idx(static_cast<std::size_t>(end - begin));
    std::iota(idx.begin(), idx.end(), begin);
    std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return keys[a] > keys[b]; });
    std::vector<std::pair<index_t, double>> out;
    double sum = 0.0;
    for (index_t s = 0; s < count; ++s) {
        out.emplace_back(idx[s], scores[idx[s]]);
        sum += scores[idx[s]];
    }
    if (renormalize)
        for (auto& p : out) p.second /= sum;
    return out;
}

/// Router scores and selection keys of one token's logits: softmax over all experts, or
/// sigmoid with the selection bias added to the keys only.
inline void score(foe::ScoreFunction f, const Vec& logits, std::span<const float> bias, Vec& scores, Vec& keys)
{
    const auto e = logits.size();
    scores.assign(e, 0.0);
    keys.assign(e, 0.0);
    if (f == foe::ScoreFunction::softmax) {
        const double mx = *std::max_element(logits.begin(), logits.end());
        double sum = 0.0;
        for (std::size_t i = 0; i < e; ++i) sum += scores[i] = std::exp(logits[i] - mx);
        for (std::size_t i = 0; i < e; ++i) keys[i] = scores[i] /= sum;
    } else {
        for (std::size_t i = 0; i < e; ++i) {
            scores[i] = 1.0 / (1.0 + std::exp(-logits[i]));
            keys[i] = scores[i] + (bias.empty() ? 0.0 : bias[i]);
        }
    }
}

/// One SwiGLU expert applied to a vector u of length d.
inline Vec expert_ffn(const foe::ModelWeights& w, index_t l, index_t e, const double* u)
{
    const auto& c = w.config;
    const index_t d = c.hidden_size, f = c.intermediate_size;
    const auto g = tensor(w, foe::names::expert(l, e, "gate_proj")).span();
    const auto up = tensor(w, foe::names::expert(l, e, "up_proj")).span();
    const auto down = tensor(w, foe::names::expert(l, e, "down_proj")).span();
    Vec act(static_cast<std::size_t>(f));
    for (index_t j = 0; j < f; ++j) {
        double a = 0.0, b = 0.0;
        for (index_t p = 0; p < d; ++p) {
            a += u[p] * g[static_cast<std::size_t>(j * d + p)];
            b += u[p] * up[static_cast<std::size_t>(j * d + p)];
        }
        act[static_cast<std::size_t>(j)] = silu(a) * b;
    }
    Vec y(static_cast<std::size_t>(d), 0.0);
    for (index_t i = 0; i < d; ++i)
        for (index_t j = 0; j < f; ++j) y[static_cast<std::size_t>(i)] += act[static_cast<std::size_t>(j)] * down[static_cast<std::size_t>(i * f + j)];
    return y;
}

/// Attention of group h (or all heads when H = 1) for one sequence of S tokens at positions
/// 0..S-1: returns o_proj(ctx of the group's heads) [S, d].
inline Vec group_attention(const foe::ModelWeights& w, index_t l, index_t h, const Vec& x, index_t s)
{
    const auto& c = w.config;
    const index_t d = c.hidden_size, hd = c.head_dim, nq = c.num_attention_heads, nkv = c.num_key_value_heads;
    const index_t groups = c.groups(), q_per_kv = nq / nkv;
    auto T = [&](const char* rest) { return tensor(w, foe::names::layer(l, rest)).span(); };
    const Vec xn = rms_norm(x, d, T("input_layernorm.weight"), c.rms_norm_eps);
    Vec q = matmul_nt(xn, s, d, T("self_attn.q_proj.weight"), nq * hd);
    Vec k = matmul_nt(xn, s, d, T("self_attn.k_proj.weight"), nkv * hd);
    const Vec v = matmul_nt(xn, s, d, T("self_attn.v_proj.weight"), nkv * hd);
    if (c.qk_norm == foe::QkNorm::full_width) {
        q = rms_norm(q, nq * hd, T("self_attn.q_norm.weight"), c.rms_norm_eps);
        k = rms_norm(k, nkv * hd, T("self_attn.k_norm.weight"), c.rms_norm_eps);
    } else if (c.qk_norm == foe::QkNorm::per_head) {
        q = rms_norm(q, hd, T("self_attn.q_norm.weight"), c.rms_norm_eps);
        k = rms_norm(k, hd, T("self_attn.k_norm.weight"), c.rms_norm_eps);
    }
    for (index_t i = 0; i < s; ++i) {
        for (index_t head = 0; head < nq; ++head) rope(&q[static_cast<std::size_t>((i * nq + head) * hd)], hd, i, c.rope_theta);
        for (index_t head = 0; head < nkv; ++head) rope(&k[static_cast<std::size_t>((i * nkv + head) * hd)], hd, i, c.rope_theta);
    }
    const auto o = T("self_attn.o_proj.weight");  // [d, nq hd]
    Vec out(static_cast<std::size_t>(s * d), 0.0);
    const index_t q_per_group = nq / groups;
    for (index_t head = h * q_per_group; head < (h + 1) * q_per_group; ++head) {
        const index_t kvh = head / q_per_kv;
        for (index_t i = 0; i < s; ++i) {
            Vec p(static_cast<std::size_t>(i + 1));
            double mx = -1e300;
            for (index_t j = 0; j <= i; ++j) {
                double dot = 0.0;
                for (index_t e = 0; e < hd; ++e)
                    dot += q[static_cast<std::size_t>((i * nq + head) * hd + e)] * k[static_cast<std::size_t>((j * nkv + kvh) * hd + e)];
                p[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(hd));
                mx = std::max(mx, p[static_cast<std::size_t>(j)]);
            }
            double sum = 0.0;
            for (auto& x_ : p) sum += x_ = std::exp(x_ - mx);
            Vec ctx(static_cast<std::size_t>(hd), 0.0);
            for (index_t j = 0; j <= i; ++j)
                for (index_t e = 0; e < hd; ++e)
                    ctx[static_cast<std::size_t>(e)] += p[static_cast<std::size_t>(j)] / sum * v[static_cast<std::size_t>((j * nkv + kvh) * hd + e)];
            for (index_t r = 0; r < d; ++r)
                for (index_t e = 0; e < hd; ++e)
                    out[static_cast<std::size_t>(i * d + r)] += ctx[static_cast<std::size_t>(e)] * o[static_cast<std::size_t>(r * nq * hd + head * hd + e)];
        }
    }
    return out;
}

/// One layer over H streams (or 1 input stream broadcast): returns H output streams.
inline std::vector<Vec> layer(const foe::ModelWeights& w, index_t l, const std::vector<Vec>& x, index_t s)
{
    const auto& c = w.config;
    const index_t d = c.hidden_size, groups = c.groups(), e_total = c.num_experts;
    std::vector<Vec> r(static_cast<std::size_t>(groups));
    Vec rf(static_cast<std::size_t>(s * d), 0.0);
    for (index_t h = 0; h < groups; ++h) {
        const Vec& xh = x.size() == 1 ? x[0] : x[static_cast<std::size_t>(h)];
        const Vec a = group_attention(w, l, h, xh, s);
        r[static_cast<std::size_t>(h)].resize(xh.size());
        for (std::size_t i = 0; i < xh.size(); ++i) {
            r[static_cast<std::size_t>(h)][i] = xh[i] + a[i];
            rf[i] += r[static_cast<std::size_t>(h)][i] / static_cast<double>(groups);
        }
    }
    const Vec u = rms_norm(rf, d, tensor(w, foe::names::layer(l, "post_attention_layernorm.weight")).span(), c.rms_norm_eps);
    const Vec logits = matmul_nt(u, s, d, tensor(w, foe::names::layer(l, "mlp.gate.weight")).span(), e_total);
    std::span<const float> bias;
    if (c.scoring_func == foe::ScoreFunction::sigmoid)
        bias = tensor(w, foe::names::layer(l, "mlp.gate.e_score_correction_bias")).span();
    std::vector<Vec> out(static_cast<std::size_t>(groups), rf);
    const index_t per_group = e_total / groups, k_per_group = c.num_experts_per_tok / groups;
    for (index_t i = 0; i < s; ++i) {
        Vec token_logits(logits.begin() + i * e_total, logits.begin() + (i + 1) * e_total), scores, keys;
        score(c.scoring_func, token_logits, bias, scores, keys);
        for (index_t h = 0; h < groups; ++h)
            for (auto [e, weight] : top_k(scores, keys, h * per_group, (h + 1) * per_group, k_per_group, c.norm_topk_prob)) {
                const Vec y = expert_ffn(w, l, e, &u[static_cast<std::size_t>(i * d)]);
                for (index_t j = 0; j < d; ++j) out[static_cast<std::size_t>(h)][static_cast<std::size_t>(i * d + j)] += weight * y[static_cast<std::size_t>(j)];
            }
    }
    return out;
}

/// Logits [S, vocab] of a whole model for one sequence.
inline Vec model_logits(const foe::ModelWeights& w, std::span<const std::int32_t> tokens)
{
    const auto& c = w.config;
    const index_t d = c.hidden_size, s = static_cast<index_t>(tokens.size());
    const auto embed = tensor(w, "model.embed_tokens.weight").span();
    Vec x0(static_cast<std::size_t>(s * d));
    for (index_t i = 0; i < s; ++i)
        for (index_t j = 0; j < d; ++j) x0[static_cast<std::size_t>(i * d + j)] = embed[static_cast<std::size_t>(tokens[static_cast<std::size_t>(i)] * d + j)];
    std::vector<Vec> streams{x0};
    for (index_t l = 0; l < c.num_hidden_layers; ++l) streams = layer(w, l, streams, s);
    Vec mean(static_cast<std::size_t>(s * d), 0.0);
    for (const auto& st : streams)
        for (std::size_t i = 0; i < mean.size(); ++i) mean[i] += st[i] / static_cast<double>(streams.size());
    const Vec h = rms_norm(mean, d, tensor(w, "model.norm.weight").span(), c.rms_norm_eps);
    const char* head = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    return matmul_nt(h, s, d, tensor(w, head).span(), c.vocab_size);
}

/// max |a - b| / max |b|: the relative error of a float result against a double oracle.
template <class A>
double relative_error(const A& a, const Vec& b)
{
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        // std::max ignores a NaN argument: a NaN or Inf result must fail, not vanish.
        if (!std::isfinite(static_cast<double>(a[i]))) return std::numeric_limits<double>::infinity();
        num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
        den = std::max(den, std::abs(b[i]));
    }
    return den == 0.0 ? num : num / den;
}

}  // namespace oracle
