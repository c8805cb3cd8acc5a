#pragma once
// GqaAttention: the host implementation of the attention policy.
//
// Steps, for the batch's T new tokens:
//   xn = RMSNorm(x)                           [T, d]
//   q, k, v = xn q_proj^T, xn k_proj^T, ...   [T, heads * head_dim]
//   QK-norm (none / per head / full width), then RoPE at each token's position
//   append k, v to the KV cache of the token's sequence slot
//   ctx[t, head] = softmax(q k_cache^T / sqrt(head_dim)) v_cache over positions <= pos(t)
//   out = ctx o_proj^T                        [T, d]
// Query head j uses KV head j / (q_heads / kv_heads), as Hugging Face's repeat_kv arranges.
// The KV-cache layout is the Cache policy (attention/kv_cache.hpp): contiguous slots or a pool
// of pages behind the batch's block tables; the sums run in the same order either way.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "foe/attention/attention.hpp"
#include "foe/attention/kv_cache.hpp"
#include "foe/core/backend.hpp"
#include "foe/ops/gemm.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/ops/rope.hpp"

namespace foe::attention {

template <gemm::GemmPolicy Gemm = gemm::Default, KvCachePolicy Cache = ContiguousKvCache>
class GqaAttention {
public:
    using backend = HostBackend;

    GqaAttention(const AttentionSpec& spec, const AttentionWeights& w);

    /// out = o_proj(attention(RMSNorm(x))) for the batch's tokens; appends their K/V to the cache.
    /// x and out are [batch.tokens(), hidden]. Throws CapacityError when a chunk overflows its slot
    /// (or, paged, has no page for a position), before anything is written.
    void forward(const Batch& batch, MatrixView<const float> x, MatrixView<float> out);

    [[nodiscard]] const AttentionSpec& spec() const noexcept { return spec_; }
    [[nodiscard]] const Cache& cache() const noexcept { return cache_; }

private:
    void project(MatrixView<const float> xn, index_t tokens);
    void attend(const Batch& batch);

    AttentionSpec spec_;
    AttentionWeights w_;
    ops::Rope rope_;
    Cache cache_;
    // Activations of the current batch, grown to the largest batch seen and then reused.
    std::vector<float> xn_, q_, k_, v_, ctx_;
    std::vector<index_t> row_slot_;
};
static_assert(AttentionPolicy<GqaAttention<>>);

// ---------------------------------------------------------------------------------------------

template <gemm::GemmPolicy Gemm, KvCachePolicy Cache>
GqaAttention<Gemm, Cache>::GqaAttention(const AttentionSpec& spec, const AttentionWeights& w)
    : spec_(spec), w_(w), rope_(spec.head_dim, spec.rope_theta)
{
    const index_t d = spec.hidden_size, qw = spec.q_heads * spec.head_dim, kw = spec.kv_heads * spec.head_dim;
    require<ConfigError>(spec.kv_heads > 0 && spec.q_heads % spec.kv_heads == 0, "attention owns ", spec.q_heads,
                         " query heads, not a multiple of its ", spec.kv_heads, " KV heads");
    require<ConfigError>(spec.cache_slots > 0 && spec.cache_capacity > 0, "KV cache needs at least one slot (got ",
                         spec.cache_slots, ") and one position (got ", spec.cache_capacity, ")");
    cache_ = Cache(KvCacheShape{spec.kv_heads, spec.head_dim, spec.cache_slots, spec.cache_capacity, spec.page_size,
                                spec.cache_pages});
    auto check = [](const auto& view, const auto& expected, const char* name) {
        require<InvalidArgument>(std::ranges::equal(view.shape(), expected), "attention weight ", name, " has shape ",
                                 format_shape(view.shape()), ", expected ", format_shape(expected));
    };
    using V1 = std::array<index_t, 1>;
    using V2 = std::array<index_t, 2>;
    check(w.input_norm, V1{d}, "input_layernorm");
    check(w.q_proj, V2{qw, d}, "q_proj");
    check(w.k_proj, V2{kw, d}, "k_proj");
    check(w.v_proj, V2{kw, d}, "v_proj");
    check(w.o_proj, V2{d, qw}, "o_proj");
    if (spec.qk_norm == QkNorm::per_head) {
        check(w.q_norm, V1{spec.head_dim}, "q_norm");
        check(w.k_norm, V1{spec.head_dim}, "k_norm");
    } else if (spec.qk_norm == QkNorm::full_width) {
        check(w.q_norm, V1{qw}, "q_norm");
        check(w.k_norm, V1{kw}, "k_norm");
    }
}

template <gemm::GemmPolicy Gemm, KvCachePolicy Cache>
void GqaAttention<Gemm, Cache>::forward(const Batch& batch, MatrixView<const float> x, MatrixView<float> out)
{
    const index_t t = batch.tokens(), d = spec_.hidden_size;
    require(x.extent(0) == t && x.extent(1) == d, "attention input is [", x.extent(0), ", ", x.extent(1),
            "], expected [", t, ", ", d, "]");
    require(out.extent(0) == t && out.extent(1) == d, "attention output is [", out.extent(0), ", ", out.extent(1),
            "], expected [", t, ", ", d, "]");
    cache_.check_fits(batch);
    if (t == 0) return;

    xn_.resize(static_cast<std::size_t>(t * d));
    MatrixView<float> xn(xn_.data(), {t, d});
    ops::rms_norm(x, w_.input_norm, spec_.rms_norm_eps, xn);
    project(xn, t);
    attend(batch);
    const index_t qw = spec_.q_heads * spec_.head_dim;
    gemm::nt<Gemm>(MatrixView<const float>(ctx_.data(), {t, qw}), w_.o_proj, out, false);
}

template <gemm::GemmPolicy Gemm, KvCachePolicy Cache>
void GqaAttention<Gemm, Cache>::project(MatrixView<const float> xn, index_t t)
{
    const index_t hd = spec_.head_dim, qh = spec_.q_heads, kh = spec_.kv_heads;
    q_.resize(static_cast<std::size_t>(t * qh * hd));
    k_.resize(static_cast<std::size_t>(t * kh * hd));
    v_.resize(k_.size());
    MatrixView<float> q(q_.data(), {t, qh * hd}), k(k_.data(), {t, kh * hd}), v(v_.data(), {t, kh * hd});
    gemm::nt<Gemm>(xn, w_.q_proj, q, false);
    gemm::nt<Gemm>(xn, w_.k_proj, k, false);
    gemm::nt<Gemm>(xn, w_.v_proj, v, false);

    const float eps = spec_.rms_norm_eps;
    if (spec_.qk_norm == QkNorm::full_width) {
        ops::rms_norm(q, w_.q_norm, eps, q);
        ops::rms_norm(k, w_.k_norm, eps, k);
    } else if (spec_.qk_norm == QkNorm::per_head) {
        MatrixView<float> qr(q_.data(), {t * qh, hd}), kr(k_.data(), {t * kh, hd});
        ops::rms_norm(qr, w_.q_norm, eps, qr);
        ops::rms_norm(kr, w_.k_norm, eps, kr);
    }
}

template <gemm::GemmPolicy Gemm, KvCachePolicy Cache>
void GqaAttention<Gemm, Cache>::attend(const Batch& batch)
{
    const index_t t = batch.tokens(), hd = spec_.head_dim, qh = spec_.q_heads, kh = spec_.kv_heads;
    const auto& positions = batch.positions();
    rope_.apply(TensorView<float, 3>(q_.data(), {t, qh, hd}), positions);
    rope_.apply(TensorView<float, 3>(k_.data(), {t, kh, hd}), positions);

    // Append the new keys and values to their slots.
    for (index_t b = 0; b < batch.sequences(); ++b) {
        const auto& c = batch.chunks()[static_cast<std::size_t>(b)];
        const index_t row0 = batch.offset(b);
        for (index_t i = 0; i < c.length; ++i) {
            for (index_t h = 0; h < kh; ++h) {
                const auto from = static_cast<std::size_t>(((row0 + i) * kh + h) * hd);
                std::copy_n(&k_[from], hd, cache_.key(batch, c.slot, h, c.start + i));
                std::copy_n(&v_[from], hd, cache_.value(batch, c.slot, h, c.start + i));
            }
        }
    }

    // Which sequence every row belongs to (a member: no allocation per decode step).
    std::vector<index_t>& row_slot = row_slot_;
    row_slot.resize(static_cast<std::size_t>(t));
    for (index_t b = 0; b < batch.sequences(); ++b)
        std::fill_n(row_slot.begin() + batch.offset(b), batch.chunks()[static_cast<std::size_t>(b)].length,
                    batch.chunks()[static_cast<std::size_t>(b)].slot);

    ctx_.resize(static_cast<std::size_t>(t * qh * hd));
    const index_t group = qh / kh;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const Cache& cache = cache_;
    // Each (token, head) pair is independent: one thread computes it whole, so results do not
    // depend on the thread count. Pairs are dealt out one at a time in turn: under the causal
    // mask a later token costs more, and equal contiguous halves would leave one thread with
    // three quarters of the work.
    FOE_OMP_PARALLEL_FOR_CYCLIC
    for (index_t work = 0; work < t * qh; ++work) {
        const index_t row = work / qh, head = work % qh, kv = head / group;
        const index_t slot = row_slot[static_cast<std::size_t>(row)];
        const index_t len = positions[static_cast<std::size_t>(row)] + 1;  // causal: positions [0, pos]
        const float* qv = &q_[static_cast<std::size_t>((row * qh + head) * hd)];
        thread_local std::vector<float> scores;
        scores.resize(static_cast<std::size_t>(len));
        float max_score = -std::numeric_limits<float>::infinity();
        for (index_t j = 0; j < len; ++j) {
            const float s = gemm::detail::dot(qv, cache.key(batch, slot, kv, j), hd) * scale;
            scores[static_cast<std::size_t>(j)] = s;
            max_score = std::max(max_score, s);
        }
        double denom = 0.0;
        for (index_t j = 0; j < len; ++j) {
            const float e = std::exp(scores[static_cast<std::size_t>(j)] - max_score);
            scores[static_cast<std::size_t>(j)] = e;
            denom += e;
        }
        const float inv = static_cast<float>(1.0 / denom);
        float* o = &ctx_[static_cast<std::size_t>((row * qh + head) * hd)];
        std::fill_n(o, hd, 0.0f);
        for (index_t j = 0; j < len; ++j) {
            const float p = scores[static_cast<std::size_t>(j)] * inv;
            const float* vv = cache.value(batch, slot, kv, j);
            for (index_t e = 0; e < hd; ++e) o[e] += p * vv[e];
        }
    }
}

}  // namespace foe::attention
