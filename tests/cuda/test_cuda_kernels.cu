// foe's CUDA kernels against the host kernels (the oracles) on fresh random inputs: RMSNorm,
// QK-norm, RoPE, router scores + top-k, permutation by expert, weighted combine, stream mean,
// decode attention, the cuBLASLt GEMM and the grouped SwiGLU experts; and the device policies
// built from them (CudaRouter, CudaSwiGluExperts, AllReduceMean over a device communicator,
// CudaNoSync) against their host policies. Outputs are poisoned
// (0xff bytes: NaN in bf16/fp32, -1 in int32) before every run, so an unwritten element fails.
// Without a CUDA device every test case says so and passes: the file builds and runs in CI.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
// The host policies here (the oracles) use gemm::Default, foe's own GEMM; without CBLAS, since
// OpenBLAS's cblas.h declares a global `bfloat16` that collides with this file's foe::bfloat16.
#undef FOE_WITH_CBLAS
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "foe/cuda/check.cuh"
#include "cuda_test_util.hpp"
#include "foe/attention/decode_attention.cuh"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/experts/combine.cuh"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/permute.cuh"
#include "foe/experts/permute.hpp"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/experts/swiglu_reference.cuh"
#include "foe/ops/rmsnorm.cuh"
#include "foe/ops/rmsnorm.hpp"
#include "foe/ops/rope.cuh"
#include "foe/ops/rope.hpp"
#include "foe/parallel/exchange_experts.cuh"
#include "foe/parallel/local_experts.cuh"
#include "foe/routing/router.cuh"
#include "foe/routing/router.hpp"
#include "foe/routing/router_kernel.cuh"
#include "foe/routing/scores.hpp"
#include "foe/routing/topk.hpp"
#include "foe/sync/all_reduce_mean.cuh"
#include "foe/sync/all_reduce_mean.hpp"
#include "foe/sync/no_sync.cuh"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

using namespace foe::cuda::testing;

TEST_CASE("cuda: rms_norm and per-head QK-norm match foe::ops::rms_norm")
{
    if (!have_device()) return;
    std::mt19937_64 rng(1);
    for (auto [rows, n] : {std::pair<index_t, index_t>{1, 768}, {7, 96}, {33, 2048}, {130, 100}, {40, 128}}) {
        CAPTURE(rows);
        CAPTURE(n);
        const auto x = random_bf16(sz(rows * n), rng, -3.0f, 3.0f);
        const auto w = random_bf16(sz(n), rng, 0.8f, 1.2f);
        std::vector<float> want(x.values.size());
        foe::ops::rms_norm(foe::MatrixView<const float>(x.values.data(), {rows, n}),
                           foe::VectorView<const float>(w.values.data(), {n}), 1e-5f,
                           foe::MatrixView<float>(want.data(), {rows, n}));
        auto dx = fc::upload(x.bits);
        auto dw = fc::upload(w.bits);
        fc::DeviceBuffer<bfloat16> dy(x.bits.size());
        fc::fill_bytes(dy, 0xff);
        fc::rms_norm(dx.data(), dw.data(), dy.data(), rows, n, 1e-5f, nullptr);
        CHECK(rel_error(to_float(fc::download(dy)), want) < bf16_tolerance);
        // QK-norm: the same rows seen as [tokens, heads, head_dim], in place.
        fc::rms_norm_qk(dx.data(), dw.data(), rows, 1, n, 1e-5f, nullptr);
        CHECK(rel_error(to_float(fc::download(dx)), want) < bf16_tolerance);
    }
}

TEST_CASE("cuda: rope matches foe::ops::Rope")
{
    if (!have_device()) return;
    std::mt19937_64 rng(2);
    struct Shape { index_t tokens, heads, head_dim; };
    for (auto s : {Shape{1, 8, 96}, Shape{13, 2, 128}, Shape{64, 8, 96}, Shape{5, 3, 10}}) {
        CAPTURE(s.tokens);
        CAPTURE(s.head_dim);
        auto x = random_bf16(sz(s.tokens * s.heads * s.head_dim), rng);
        std::vector<index_t> pos(sz(s.tokens));
        std::vector<std::int32_t> pos32(pos.size());
        std::uniform_int_distribution<int> pd(0, 8191);
        for (std::size_t t = 0; t < pos.size(); ++t) pos32[t] = static_cast<std::int32_t>(pos[t] = pd(rng));
        std::vector<float> want = x.values;
        foe::ops::Rope(s.head_dim, 500000.0).apply(foe::TensorView<float, 3>(want.data(), {s.tokens, s.heads, s.head_dim}), pos);
        auto dx = fc::upload(x.bits);
        auto dpos = fc::upload(pos32);
        fc::rope(dx.data(), dpos.data(), s.tokens, s.heads, s.head_dim, 500000.0, nullptr);
        CHECK(rel_error(to_float(fc::download(dx)), want) < bf16_tolerance);
    }
}

TEST_CASE("cuda: QK-norm and rope on the q part of fused q|k|v rows equal them on contiguous rows, the rest untouched")
{
    if (!have_device()) return;
    std::mt19937_64 rng(12);
    struct Shape { index_t tokens, heads, head_dim, row; };  // row: elements per fused token row
    for (auto s : {Shape{1, 1, 96, 288}, Shape{37, 8, 32, 520}, Shape{5, 2, 128, 512}}) {
        CAPTURE(s.tokens);
        CAPTURE(s.head_dim);
        const index_t width = s.heads * s.head_dim;
        const auto fused = random_bf16(sz(s.tokens * s.row), rng, -2.0f, 2.0f);
        const auto w = random_bf16(sz(s.head_dim), rng, 0.8f, 1.2f);
        std::vector<bfloat16> packed(sz(s.tokens * width));
        for (index_t t = 0; t < s.tokens; ++t)
            std::copy_n(fused.bits.begin() + static_cast<std::ptrdiff_t>(t * s.row), width,
                        packed.begin() + static_cast<std::ptrdiff_t>(t * width));
        std::vector<std::int32_t> pos(sz(s.tokens));
        std::uniform_int_distribution<int> pd(0, 4095);
        for (auto& p : pos) p = pd(rng);
        auto dfused = fc::upload(fused.bits);
        auto dpacked = fc::upload(packed);
        auto dw = fc::upload(w.bits);
        auto dpos = fc::upload(pos);
        fc::rms_norm_qk(dfused.data(), dw.data(), s.tokens, s.heads, s.head_dim, s.row, 1e-5f, nullptr);
        fc::rope(dfused.data(), dpos.data(), s.tokens, s.heads, s.head_dim, s.row, 10000.0, nullptr);
        fc::rms_norm_qk(dpacked.data(), dw.data(), s.tokens, s.heads, s.head_dim, 1e-5f, nullptr);
        fc::rope(dpacked.data(), dpos.data(), s.tokens, s.heads, s.head_dim, 10000.0, nullptr);
        const auto got = fc::download(dfused), want = fc::download(dpacked);
        bool same = true, rest_untouched = true;
        for (index_t t = 0; t < s.tokens; ++t)
            for (index_t j = 0; j < s.row; ++j) {
                const auto& g = got[sz(t * s.row + j)];
                if (j < width) same = same && std::memcmp(&g, &want[sz(t * width + j)], sizeof g) == 0;
                else rest_untouched = rest_untouched && std::memcmp(&g, &fused.bits[sz(t * s.row + j)], sizeof g) == 0;
            }
        CHECK(same);
        CHECK(rest_untouched);
    }
    fc::DeviceBuffer<bfloat16> buf(64);
    CHECK_THROWS_AS(fc::rope(buf.data(), nullptr, 2, 2, 16, 31, 10000.0, nullptr), foe::InvalidArgument);
}

namespace {
/// The host router's selection on given logits (foe::routing::Router after its gate GEMM).
void host_route(const fc::RouterArgs& a, const std::vector<float>& logits, const std::vector<float>& bias, index_t tokens,
                std::vector<std::int32_t>& experts, std::vector<float>& weights)
{
    const index_t e = a.num_experts, kpg = a.top_k / a.groups, epg = e / a.groups, held = a.group_end - a.group_begin;
    const index_t slots = held * kpg;
    experts.assign(sz(tokens * slots), -1);
    weights.assign(experts.size(), 0.0f);
    std::vector<float> scores(sz(e)), keys(sz(e));
    for (index_t t = 0; t < tokens; ++t) {
        const std::span<const float> row(logits.data() + t * e, sz(e));
        if (a.score == fc::RouterScore::softmax) foe::routing::Softmax::apply(row, {}, scores, keys);
        else foe::routing::Sigmoid::apply(row, bias, scores, keys);
        for (index_t g = 0; g < held; ++g) {
            const auto first = sz(t * slots + g * kpg);
            const std::span<std::int32_t> picked(experts.data() + first, sz(kpg));
            foe::routing::top_k(keys, (a.group_begin + g) * epg, (a.group_begin + g + 1) * epg, picked);
            float sum = 0.0f;
            for (index_t s = 0; s < kpg; ++s) sum += weights[first + sz(s)] = scores[sz(picked[sz(s)])];
            if (a.renormalize)
                for (index_t s = 0; s < kpg; ++s) weights[first + sz(s)] /= sum;
        }
    }
}
}  // namespace

TEST_CASE("cuda: router scores and top-k match the host router, deterministically")
{
    if (!have_device()) return;
    std::mt19937_64 rng(3);
    struct Case { fc::RouterArgs args; const char* name; };
    std::vector<Case> cases;
    for (auto score : {fc::RouterScore::softmax, fc::RouterScore::sigmoid})
        for (bool renorm : {false, true}) {
            cases.push_back({{score, 64, 8, 8, 0, 8, renorm}, "foe-1b per-group top-1"});
            cases.push_back({{score, 64, 1, 8, 0, 1, renorm}, "global top-8"});
            cases.push_back({{score, 256, 8, 16, 2, 5, renorm}, "E 256, groups [2, 5) held"});
            cases.push_back({{score, 40, 4, 12, 0, 4, renorm}, "E 40 (not a multiple of 32), top-3 per group"});
        }
    for (const auto& c : cases)
        for (index_t tokens : {index_t{1}, index_t{37}, index_t{1000}})
            for (int input = 0; input < 3; ++input) {  // 0 random, 1 many ties, 2 with NaN logits
                CAPTURE(c.name);
                CAPTURE(tokens);
                CAPTURE(input);
                CAPTURE(static_cast<int>(c.args.score));
                CAPTURE(c.args.renormalize);
                const index_t e = c.args.num_experts;
                std::normal_distribution<float> nd(0.0f, 2.0f);
                std::vector<float> logits(sz(tokens * e)), bias(sz(e));
                for (auto& l : logits) l = input == 1 ? std::round(nd(rng)) : nd(rng);
                if (input == 2)
                    for (std::size_t i = 0; i < logits.size(); i += 7) logits[i] = std::numeric_limits<float>::quiet_NaN();
                for (auto& b : bias) b = input == 1 ? 0.0f : 0.1f * nd(rng);
                std::vector<std::int32_t> want_e;
                std::vector<float> want_w;
                host_route(c.args, logits, bias, tokens, want_e, want_w);

                auto dl = fc::upload(logits);
                auto db = fc::upload(bias);
                fc::DeviceBuffer<std::int32_t> de(want_e.size());
                fc::DeviceBuffer<float> dw(want_w.size());
                std::vector<std::int32_t> got_e[2];
                std::vector<float> got_w[2];
                for (int run = 0; run < 2; ++run) {
                    fc::fill_bytes(de, 0xff);
                    fc::fill_bytes(dw, 0xff);
                    fc::route(c.args, dl.data(), db.data(), tokens, de.data(), dw.data(), nullptr);
                    got_e[run] = fc::download(de);
                    got_w[run] = fc::download(dw);
                }
                CHECK_MESSAGE(got_e[0] == want_e, first_mismatch(got_e[0], want_e));
                CHECK(same_bits(got_e[0], got_e[1]));
                CHECK(same_bits(got_w[0], got_w[1]));
                // Weights: fp32 scores; NaN where the host has NaN (sigmoid of a NaN logit).
                std::string bad_weight;
                for (std::size_t i = 0; i < want_w.size() && bad_weight.empty(); ++i) {
                    const float g = got_w[0][i], w = want_w[i];
                    if (std::isnan(w) ? !std::isnan(g) : !(std::abs(g - w) <= 1e-5f * std::max(1.0f, std::abs(w))))
                        bad_weight = "index " + std::to_string(i) + ": got " + std::to_string(g) + ", want " + std::to_string(w);
                }
                CHECK_MESSAGE(bad_weight.empty(), bad_weight);
            }
}

namespace {
/// Runs the device permutation and checks it against foe::experts::group_rows.
void check_permutation(const std::vector<std::int32_t>& experts, index_t expert_begin, index_t local)
{
    const auto rows = static_cast<index_t>(experts.size());
    foe::experts::Permutation want;
    foe::experts::group_rows(rows, local, [&](index_t r) { return index_t{experts[sz(r)]} - expert_begin; }, want);
    std::vector<std::int32_t> want_inverse(sz(rows), -1);
    for (std::size_t i = 0; i < want.rows.size(); ++i) want_inverse[sz(want.rows[i])] = static_cast<std::int32_t>(i);

    const fc::PermutePlan plan(rows, local);
    fc::DeviceBuffer<unsigned char> ws(plan.workspace_bytes());
    auto dexperts = fc::upload(experts);
    fc::DeviceBuffer<std::int32_t> sorted(sz(rows)), offsets(sz(local + 1)), inverse(sz(rows));
    std::vector<std::int32_t> first_sorted;
    for (int run = 0; run < 2; ++run) {
        fc::fill_bytes(sorted, 0xff);
        fc::fill_bytes(offsets, 0xff);
        fc::fill_bytes(inverse, 0xff);
        fc::permute(plan, dexperts.data(), expert_begin, ws.data(), {sorted.data(), offsets.data(), inverse.data()}, nullptr);
        const auto got_sorted = fc::download(sorted);
        const auto got_offsets = fc::download(offsets);
        const auto got_inverse = fc::download(inverse);
        REQUIRE(got_offsets.size() == want.offsets.size());
        bool offsets_ok = true;
        for (std::size_t g = 0; g < want.offsets.size(); ++g) offsets_ok = offsets_ok && got_offsets[g] == want.offsets[g];
        CHECK_MESSAGE(offsets_ok, first_mismatch(got_offsets, want.offsets));
        bool rows_ok = true;
        for (std::size_t i = 0; i < want.rows.size(); ++i) rows_ok = rows_ok && got_sorted[i] == want.rows[i];
        CHECK(rows_ok);
        CHECK_MESSAGE(got_inverse == want_inverse, first_mismatch(got_inverse, want_inverse));
        if (run == 0) first_sorted = got_sorted;
        else CHECK(same_bits(first_sorted, got_sorted));
    }
}
}  // namespace

TEST_CASE("cuda: permute groups rows by expert as foe::experts::group_rows does")
{
    if (!have_device()) return;
    std::mt19937_64 rng(4);
    for (index_t rows : {index_t{1}, index_t{100}, index_t{2049 * 8}}) {
        CAPTURE(rows);
        std::uniform_int_distribution<int> ed(0, 63);
        std::vector<std::int32_t> experts(sz(rows));
        for (auto& e : experts) e = ed(rng);
        check_permutation(experts, 0, 64);   // every expert local
        check_permutation(experts, 16, 8);   // experts [16, 24) local, the rest left out
        std::fill(experts.begin(), experts.end(), 5);
        check_permutation(experts, 0, 64);   // all rows to one expert
        check_permutation(experts, 0, 1);    // nothing routed to the one local expert
    }
}

TEST_CASE("cuda: combine into H streams and stream mean match the host order, bit-identically across runs")
{
    if (!have_device()) return;
    std::mt19937_64 rng(5);
    struct Shape { index_t tokens, d, held, kpg; };
    for (auto s : {Shape{1, 768, 8, 1}, Shape{37, 96, 8, 2}, Shape{300, 200, 1, 8}, Shape{65, 768, 3, 1}}) {
        CAPTURE(s.tokens);
        CAPTURE(s.held);
        const index_t slots = s.held * s.kpg, rows = s.tokens * slots;
        // A random permutation of the rows, with every 5th row not local (inverse -1).
        std::vector<std::int32_t> inverse(sz(rows));
        for (index_t r = 0; r < rows; ++r) inverse[sz(r)] = static_cast<std::int32_t>(r);
        std::shuffle(inverse.begin(), inverse.end(), rng);
        for (std::size_t r = 0; r < inverse.size(); r += 5) inverse[r] = -1;
        const auto y = random_bf16(sz(rows * s.d), rng);
        const auto base = random_bf16(sz(s.tokens * s.d), rng);
        std::vector<float> w(sz(rows));
        std::uniform_real_distribution<float> wd(0.0f, 1.0f);
        for (auto& v : w) v = wd(rng);
        std::vector<double> want(sz(s.held * s.tokens * s.d));
        for (index_t g = 0; g < s.held; ++g)
            for (index_t t = 0; t < s.tokens; ++t)
                for (index_t j = 0; j < s.d; ++j) {
                    double acc = base.values[sz(t * s.d + j)];
                    for (index_t k = 0; k < s.kpg; ++k) {
                        const auto slot = sz(t * slots + g * s.kpg + k);
                        if (inverse[slot] >= 0) acc += double{w[slot]} * y.values[sz(inverse[slot] * s.d + j)];
                    }
                    want[sz((g * s.tokens + t) * s.d + j)] = acc;
                }
        auto dy = fc::upload(y.bits);
        auto dbase = fc::upload(base.bits);
        auto dinv = fc::upload(inverse);
        auto dw = fc::upload(w);
        fc::DeviceBuffer<bfloat16> out(want.size()), mean(sz(s.tokens * s.d));
        std::vector<bfloat16> runs[2], means[2];
        for (int run = 0; run < 2; ++run) {
            fc::fill_bytes(out, 0xff);
            fc::fill_bytes(mean, 0xff);
            fc::combine(dy.data(), dinv.data(), dw.data(), dbase.data(), s.tokens, s.d, slots, s.kpg, out.data(), nullptr);
            fc::stream_mean(out.data(), s.held, s.tokens, s.d, s.held, mean.data(), nullptr);
            runs[run] = fc::download(out);
            means[run] = fc::download(mean);
        }
        CHECK(rel_error(to_float(runs[0]), want) < bf16_tolerance);
        CHECK(same_bits(runs[0], runs[1]));
        CHECK(same_bits(means[0], means[1]));
        // Stream mean of what the device combined: the host's sum in group order, times 1/H.
        const auto streams = to_float(runs[0]);
        std::vector<float> want_mean(sz(s.tokens * s.d));
        for (std::size_t i = 0; i < want_mean.size(); ++i) {
            float acc = streams[i];
            for (index_t g = 1; g < s.held; ++g) acc += streams[sz(g) * want_mean.size() + i];
            want_mean[i] = acc * (1.0f / static_cast<float>(s.held));
        }
        CHECK(rel_error(to_float(means[0]), want_mean) < bf16_tolerance);
    }
}

TEST_CASE("cuda: split-KV decode attention matches a float64 GQA decode")
{
    if (!have_device()) return;
    std::mt19937_64 rng(6);
    struct Shape { index_t batch, nq, nkv, hd, capacity; };
    for (auto s : {Shape{3, 8, 2, 96, 600}, Shape{1, 8, 8, 128, 2048}, Shape{4, 16, 8, 128, 300}, Shape{2, 4, 1, 64, 1}}) {
        CAPTURE(s.batch);
        CAPTURE(s.nq);
        CAPTURE(s.capacity);
        const index_t slots = s.batch + 1;
        const auto q = random_bf16(sz(s.batch * s.nq * s.hd), rng, -2.0f, 2.0f);
        const auto k = random_bf16(sz(slots * s.capacity * s.nkv * s.hd), rng, -2.0f, 2.0f);
        const auto v = random_bf16(k.bits.size(), rng);
        std::vector<std::int32_t> slot(sz(s.batch)), len(sz(s.batch));
        std::uniform_int_distribution<index_t> ld(1, s.capacity);
        for (index_t b = 0; b < s.batch; ++b) {
            slot[sz(b)] = static_cast<std::int32_t>(slots - 1 - b);  // not the identity
            len[sz(b)] = static_cast<std::int32_t>(b == 0 ? s.capacity : b == 1 ? 1 : ld(rng));
        }
        const double scale = 1.0 / std::sqrt(static_cast<double>(s.hd));
        std::vector<double> want(q.bits.size());
        for (index_t b = 0; b < s.batch; ++b)
            for (index_t h = 0; h < s.nq; ++h) {
                const index_t kvh = h / (s.nq / s.nkv), n = len[sz(b)];
                // Head-major cache [slots, kv_heads, capacity, head_dim], as foe::attention::KvCache.
                auto at = [&](index_t pos) { return sz(((slot[sz(b)] * s.nkv + kvh) * s.capacity + pos) * s.hd); };
                std::vector<double> p(sz(n));
                double m = -std::numeric_limits<double>::infinity(), sum = 0.0;
                for (index_t i = 0; i < n; ++i) {
                    double dot = 0.0;
                    for (index_t j = 0; j < s.hd; ++j) dot += double{q.values[sz((b * s.nq + h) * s.hd + j)]} * k.values[at(i) + sz(j)];
                    m = std::max(m, p[sz(i)] = dot * scale);
                }
                for (auto& x : p) sum += x = std::exp(x - m);
                for (index_t j = 0; j < s.hd; ++j) {
                    double acc = 0.0;
                    for (index_t i = 0; i < n; ++i) acc += p[sz(i)] * v.values[at(i) + sz(j)];
                    want[sz((b * s.nq + h) * s.hd + j)] = acc / sum;
                }
            }
        const fc::DecodeAttentionShape shape{s.batch, s.nq, s.nkv, s.hd, s.capacity};
        auto dq = fc::upload(q.bits);
        auto dk = fc::upload(k.bits);
        auto dv = fc::upload(v.bits);
        auto dslot = fc::upload(slot);
        auto dlen = fc::upload(len);
        fc::DeviceBuffer<unsigned char> ws(fc::decode_attention_workspace_bytes(shape));
        fc::DeviceBuffer<bfloat16> out(want.size());
        std::vector<bfloat16> runs[2];
        for (int run = 0; run < 2; ++run) {
            fc::fill_bytes(out, 0xff);
            fc::fill_bytes(ws, 0xff);
            fc::decode_attention(shape, dq.data(), dk.data(), dv.data(), dslot.data(), dlen.data(), ws.data(), out.data(), nullptr);
            runs[run] = fc::download(out);
        }
        CHECK(rel_error(to_float(runs[0]), want) < bf16_tolerance);
        CHECK(same_bits(runs[0], runs[1]));
    }
}

TEST_CASE("cuda: cuBLASLt GEMM C = A B^T matches a float64 GEMM, bf16 and fp32 output")
{
    if (!have_device()) return;
    std::mt19937_64 rng(7);
    fc::LtGemm gemm;
    struct Shape { index_t m, n, k; };
    for (auto s : {Shape{1, 96, 64}, Shape{37, 768, 768}, Shape{256, 384, 768}, Shape{130, 768, 384}, Shape{5, 50, 24}}) {
        CAPTURE(s.m);
        CAPTURE(s.n);
        CAPTURE(s.k);
        const auto a = random_bf16(sz(s.m * s.k), rng);
        const auto b = random_bf16(sz(s.n * s.k), rng);
        std::vector<double> want(sz(s.m * s.n));
        for (index_t i = 0; i < s.m; ++i)
            for (index_t j = 0; j < s.n; ++j) {
                double acc = 0.0;
                for (index_t l = 0; l < s.k; ++l) acc += double{a.values[sz(i * s.k + l)]} * b.values[sz(j * s.k + l)];
                want[sz(i * s.n + j)] = acc;
            }
        auto da = fc::upload(a.bits);
        auto db = fc::upload(b.bits);
        fc::DeviceBuffer<float> c32(want.size());
        fc::DeviceBuffer<bfloat16> c16(want.size());
        fc::fill_bytes(c32, 0xff);
        fc::fill_bytes(c16, 0xff);
        gemm.nt(da.data(), db.data(), c32.data(), fc::OutType::fp32, s.m, s.n, s.k, nullptr);
        gemm.nt(da.data(), db.data(), c16.data(), fc::OutType::bf16, s.m, s.n, s.k, nullptr);
        CHECK(rel_error(fc::download(c32), want) < 1e-4);
        CHECK(rel_error(to_float(fc::download(c16)), want) < bf16_tolerance);
    }
}

TEST_CASE("cuda: routed SwiGLU experts (permute, gather, per-expert GEMMs, combine) match a float64 MoE FFN")
{
    if (!have_device()) return;
    std::mt19937_64 rng(8);
    struct Shape { index_t tokens, d, f, experts, k; bool one_expert; };
    for (auto s : {Shape{50, 64, 48, 4, 2, false}, Shape{1, 96, 40, 8, 8, false}, Shape{129, 128, 96, 16, 4, false},
                   Shape{33, 64, 48, 4, 2, true}}) {
        CAPTURE(s.tokens);
        CAPTURE(s.experts);
        CAPTURE(s.one_expert);
        const index_t rows = s.tokens * s.k;
        const auto x = random_bf16(sz(s.tokens * s.d), rng);
        std::vector<Bf16Data> gate_up, down;
        for (index_t e = 0; e < s.experts; ++e) {
            gate_up.push_back(random_bf16(sz(2 * s.f * s.d), rng, -0.2f, 0.2f));
            down.push_back(random_bf16(sz(s.d * s.f), rng, -0.2f, 0.2f));
        }
        // Routing: k distinct experts per token (or all to expert 0 for the first slot and
        // every expert's rows on expert 0 when one_expert), weights in [0, 1).
        std::vector<std::int32_t> experts(sz(rows));
        std::vector<float> w(sz(rows));
        std::uniform_real_distribution<float> wd(0.0f, 1.0f);
        std::vector<std::int32_t> ids(sz(s.experts));
        for (index_t t = 0; t < s.tokens; ++t) {
            for (index_t e = 0; e < s.experts; ++e) ids[sz(e)] = static_cast<std::int32_t>(e);
            std::shuffle(ids.begin(), ids.end(), rng);
            for (index_t j = 0; j < s.k; ++j) {
                experts[sz(t * s.k + j)] = s.one_expert ? 0 : ids[sz(j)];
                w[sz(t * s.k + j)] = wd(rng);
            }
        }
        // float64 oracle: out[t] = sum_j w * down_e(silu(gate_e x) * up_e x), slot order.
        std::vector<double> want(sz(s.tokens * s.d), 0.0);
        std::vector<double> act(sz(s.f));
        for (index_t t = 0; t < s.tokens; ++t)
            for (index_t j = 0; j < s.k; ++j) {
                const auto e = sz(experts[sz(t * s.k + j)]);
                for (index_t i = 0; i < s.f; ++i) {
                    double g = 0.0, u = 0.0;
                    for (index_t l = 0; l < s.d; ++l) {
                        g += double{gate_up[e].values[sz(i * s.d + l)]} * x.values[sz(t * s.d + l)];
                        u += double{gate_up[e].values[sz((s.f + i) * s.d + l)]} * x.values[sz(t * s.d + l)];
                    }
                    act[sz(i)] = g / (1.0 + std::exp(-g)) * u;
                }
                for (index_t o = 0; o < s.d; ++o) {
                    double acc = 0.0;
                    for (index_t i = 0; i < s.f; ++i) acc += act[sz(i)] * down[e].values[sz(o * s.f + i)];
                    want[sz(t * s.d + o)] += double{w[sz(t * s.k + j)]} * acc;
                }
            }

        std::vector<fc::DeviceBuffer<bfloat16>> dgu, ddown;
        std::vector<fc::DeviceExpertWeights> dweights;
        for (index_t e = 0; e < s.experts; ++e) {
            dgu.push_back(fc::upload(gate_up[sz(e)].bits));
            ddown.push_back(fc::upload(down[sz(e)].bits));
            dweights.push_back({dgu.back().data(), ddown.back().data()});
        }
        auto dx = fc::upload(x.bits);
        auto dexperts = fc::upload(experts);
        auto dw = fc::upload(w);
        const fc::PermutePlan plan(rows, s.experts);
        fc::DeviceBuffer<unsigned char> pws(plan.workspace_bytes()), sws(fc::swiglu_workspace_bytes(rows, s.f));
        fc::DeviceBuffer<std::int32_t> sorted(sz(rows)), offsets(sz(s.experts + 1)), inverse(sz(rows));
        fc::DeviceBuffer<bfloat16> xs(sz(rows * s.d)), y(sz(rows * s.d)), out(sz(s.tokens * s.d));
        fc::LtGemm gemm;
        std::vector<bfloat16> runs[2];
        for (int run = 0; run < 2; ++run) {
            fc::fill_bytes(y, 0xff);
            fc::fill_bytes(out, 0xff);
            fc::permute(plan, dexperts.data(), 0, pws.data(), {sorted.data(), offsets.data(), inverse.data()}, nullptr);
            fc::gather_rows(dx.data(), sorted.data(), rows, s.k, s.d, xs.data(), nullptr);
            const auto host_offsets = fc::download(offsets);
            fc::swiglu_experts(gemm, dweights, host_offsets, xs.data(), s.d, s.f, sws.data(), y.data(), nullptr);
            fc::combine(y.data(), inverse.data(), dw.data(), nullptr, s.tokens, s.d, s.k, s.k, out.data(), nullptr);
            runs[run] = fc::download(out);
        }
        CHECK(rel_error(to_float(runs[0]), want) < bf16_tolerance);
        CHECK(same_bits(runs[0], runs[1]));
    }
}

TEST_CASE("cuda: errors are foe::CudaError with file:line, and cuda_device_count never throws")
{
    const int n = fc::cuda_device_count();
    CHECK(n >= 0);
    try {
        fc::check(cudaErrorInvalidValue, "a deliberately failed call");
        FAIL("check() did not throw");
    } catch (const foe::CudaError& e) {
        const std::string what = e.what();
        CHECK(what.find("test_cuda_kernels.cu:") != std::string::npos);
        CHECK(what.find("a deliberately failed call") != std::string::npos);
    }
    if (n > 0) CHECK(cudaGetLastError() == cudaSuccess);  // nothing left behind for the next call
}

// ---------------------------------------------------------------------------------------------
// Device policies against their host policies.

namespace fr = foe::routing;
namespace fx = foe::experts;
namespace fp = foe::parallel;
namespace fs = foe::sync;

// What each device policy claims, checked at compile time (no device needed).
static_assert(fr::DeviceRoutingPolicy<fr::CudaRouter<fr::Softmax, fr::PerGroupTopK, fc::TcGemm>>);
static_assert(fr::DeviceRoutingPolicy<fr::CudaRouter<fr::Sigmoid, fr::GlobalTopK>>);
static_assert(!fr::HostRoutingPolicy<fr::CudaRouter<fr::Sigmoid, fr::GlobalTopK>>);
static_assert(fr::CudaRouter<fr::Softmax, fr::PerGroupTopK>::per_group && !fr::CudaRouter<fr::Softmax, fr::GlobalTopK>::per_group);
static_assert(fx::DeviceExpertsPolicy<fx::CudaSwiGluExperts<>> && fx::DeviceExpertsPolicy<fx::CudaSwiGluExperts<fc::TcGemm>>);
static_assert(!fx::HostExpertsPolicy<fx::CudaSwiGluExperts<>>);
static_assert(fp::DeviceExpertParallelPolicy<fp::CudaLocalExperts, fx::CudaSwiGluExperts<>>);
static_assert(fp::DeviceExpertParallelPolicy<fp::CudaExchangeExperts, fx::CudaSwiGluExperts<>>);
static_assert(!fp::CudaLocalExperts::collective && fp::CudaExchangeExperts::collective);
static_assert(foe::comm::Comm<foe::comm::CudaSelfComm>);
static_assert(std::same_as<foe::backend_of_t<fs::AllReduceMean<>>, foe::HostBackend>);
static_assert(fs::HostResidualSyncPolicy<fs::AllReduceMean<>>);
static_assert(fs::DeviceResidualSyncPolicy<fs::AllReduceMean<foe::comm::CudaSelfComm>>);
static_assert(fs::DeviceResidualSyncPolicy<fs::CudaNoSync>);
static_assert(fs::CudaNoSync::identity && !fs::AllReduceMean<foe::comm::CudaSelfComm>::identity);

namespace {

/// Device scratch for one policy call, as a layer hands it out: reset before each call.
struct TestScratch {
    explicit TestScratch(std::size_t bytes) : buffer(std::max<std::size_t>(bytes, 1)), scratch(buffer.data(), bytes) {}
    fc::DeviceContext context(cudaStream_t stream = nullptr)
    {
        scratch.reset();
        return fc::DeviceContext{stream, &scratch};
    }
    fc::DeviceBuffer<unsigned char> buffer;
    fc::Scratch scratch;
};

template <class T>
std::vector<T> download_n(const T* p, std::size_t n)
{
    std::vector<T> h(n);
    if (n > 0) fc::check(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy (test)");
    return h;
}

/// CudaRouter<Score, Selection, Gemm> against routing::Router<Score, Selection> on the same bf16
/// values. The logits of the two differ in the GEMM's summation order only, so an expert may
/// differ only where the host's keys of the two candidates tie to 1e-4; weights agree to 1e-4.
template <class Score, class Selection, class Gemm>
void check_cuda_router(const fr::RoutingSpec& spec, index_t d, index_t tokens, std::mt19937_64& rng)
{
    CAPTURE(spec.num_experts);
    CAPTURE(spec.groups);
    CAPTURE(spec.top_k);
    CAPTURE(tokens);
    const index_t e = spec.num_experts;
    const auto gate = random_bf16(sz(e * d), rng, -0.5f, 0.5f);
    const auto u = random_bf16(sz(tokens * d), rng);
    std::vector<float> bias(sz(e));
    std::uniform_real_distribution<float> bd(-0.1f, 0.1f);
    for (auto& b : bias) b = bd(rng);
    const foe::MatrixView<const float> gv(gate.values.data(), {e, d});
    const foe::VectorView<const float> bv(bias.data(), {e});

    fr::Router<Score, Selection> host(spec, gv, bv);
    fr::RoutingResult want;
    host.route(foe::MatrixView<const float>(u.values.data(), {tokens, d}), want);
    // The host's selection keys, for telling a near-tie from a wrong pick.
    std::vector<float> logits(sz(e)), scores(sz(e)), keys(sz(tokens * e));
    for (index_t t = 0; t < tokens; ++t) {
        for (index_t x = 0; x < e; ++x) {
            double acc = 0.0;
            for (index_t j = 0; j < d; ++j) acc += double{gate.values[sz(x * d + j)]} * u.values[sz(t * d + j)];
            logits[sz(x)] = static_cast<float>(acc);
        }
        Score::apply(logits, Score::uses_bias ? std::span<const float>(bias) : std::span<const float>{}, scores,
                     std::span<float>(keys.data() + t * e, sz(e)));
    }

    fr::CudaRouter<Score, Selection, Gemm> dev(spec, gv, bv);
    TestScratch scratch(dev.scratch_bytes());
    auto du = fc::upload(u.bits);
    std::vector<std::int32_t> got_e[2];
    std::vector<float> got_w[2];
    fr::DeviceRoutingResult got;
    for (int run = 0; run < 2; ++run) {
        dev.route(foe::MatrixView<const bfloat16>(du.data(), {tokens, d}), got, scratch.context());
        const auto n = sz(got.tokens * got.slots_per_token);
        got_e[run] = download_n(got.experts, n);
        got_w[run] = download_n(got.weights, n);
    }
    CHECK(got.tokens == want.tokens);
    CHECK(got.slots_per_token == want.slots_per_token);
    CHECK(got.slots_per_group == want.slots_per_group);
    CHECK(got.group_begin == want.group_begin);
    REQUIRE(got_e[0].size() == want.experts.size());
    CHECK(same_bits(got_e[0], got_e[1]));
    CHECK(same_bits(got_w[0], got_w[1]));
    std::string bad;
    for (std::size_t i = 0; i < want.experts.size() && bad.empty(); ++i) {
        const auto t = static_cast<index_t>(i) / want.slots_per_token;
        const std::int32_t g = got_e[0][i], w = want.experts[i];
        if (g != w) {
            const float kg = g >= 0 && g < e ? keys[sz(t * e + g)] : std::numeric_limits<float>::quiet_NaN();
            const float kw = keys[sz(t * e + w)];
            if (!(std::abs(kg - kw) <= 1e-4f * std::max(1.0f, std::abs(kw))))
                bad = "slot " + std::to_string(i) + ": expert " + std::to_string(g) + ", host " + std::to_string(w);
        } else if (!(std::abs(got_w[0][i] - want.weights[i]) <= 1e-4f * std::max(1.0f, std::abs(want.weights[i])))) {
            bad = "weight " + std::to_string(i) + ": got " + std::to_string(got_w[0][i]) + ", host " +
                  std::to_string(want.weights[i]);
        }
    }
    CHECK_MESSAGE(bad.empty(), bad);

    // An empty batch routes nothing and still describes the slots.
    dev.route(foe::MatrixView<const bfloat16>(du.data(), {0, d}), got, scratch.context());
    CHECK(got.tokens == 0);
    CHECK(got.slots_per_token == want.slots_per_token);
}

}  // namespace

TEST_CASE("cuda policies: CudaRouter (softmax, sigmoid x per-group, global top-k) matches routing::Router")
{
    if (!have_device()) return;
    std::mt19937_64 rng(11);
    // FoE: all 8 groups held, top-1 per group; T below the plan.
    check_cuda_router<fr::Softmax, fr::PerGroupTopK, fc::TcGemm>({64, 8, 8, 0, 8, false, 64}, 64, 37, rng);
    // Sigmoid with the selection bias, two of four groups held, renormalised; T at the plan.
    check_cuda_router<fr::Sigmoid, fr::PerGroupTopK, fc::LtGemm>({64, 16, 4, 1, 3, true, 50}, 128, 50, rng);
    // Standard MoE: one group, global top-8 (and E not a multiple of 32).
    check_cuda_router<fr::Softmax, fr::GlobalTopK, fc::LtGemm>({64, 8, 1, 0, 1, true, 200}, 64, 129, rng);
    check_cuda_router<fr::Sigmoid, fr::GlobalTopK, fc::TcGemm>({40, 6, 1, 0, 1, false, 16}, 96, 1, rng);
}

namespace {

struct ExpertsCase {
    index_t tokens, max_tokens, d, f, groups, experts_per_group, k_per_group, expert_begin, expert_end;
};

/// CudaSwiGluExperts compute + combine against experts::SwiGluExperts compute + per-group combine
/// on the same bf16 values, and bit for bit against foe::cuda::Layer's local-experts kernels.
void check_cuda_experts(const ExpertsCase& c, std::mt19937_64& rng)
{
    CAPTURE(c.tokens);
    CAPTURE(c.groups);
    CAPTURE(c.expert_begin);
    CAPTURE(c.expert_end);
    const index_t d = c.d, f = c.f, t = c.tokens, slots = c.groups * c.k_per_group, rows = t * slots;
    const index_t held = c.expert_end - c.expert_begin;
    std::vector<Bf16Data> gate_up, down;  // per held expert: [2f, d] (gate rows, then up rows), [d, f]
    std::vector<fx::ExpertWeights> weights;
    for (index_t e = 0; e < held; ++e) {
        gate_up.push_back(random_bf16(sz(2 * f * d), rng, -0.2f, 0.2f));
        down.push_back(random_bf16(sz(d * f), rng, -0.2f, 0.2f));
    }
    for (index_t e = 0; e < held; ++e) {
        const float* gu = gate_up[sz(e)].values.data();
        weights.push_back({foe::MatrixView<const float>(gu, {f, d}), foe::MatrixView<const float>(gu + f * d, {f, d}),
                           foe::MatrixView<const float>(down[sz(e)].values.data(), {d, f})});
    }
    const auto u = random_bf16(sz(t * d), rng);
    const auto residual = random_bf16(sz(t * d), rng);
    // Routing over every group: k/H distinct experts of group g per token, weights in (0, 1).
    fr::RoutingResult r;
    r.tokens = t;
    r.slots_per_token = slots;
    r.slots_per_group = c.k_per_group;
    r.group_begin = 0;
    std::uniform_real_distribution<float> wd(0.05f, 1.0f);
    std::vector<std::int32_t> ids(sz(c.experts_per_group));
    for (index_t i = 0; i < t; ++i)
        for (index_t g = 0; g < c.groups; ++g) {
            for (index_t x = 0; x < c.experts_per_group; ++x) ids[sz(x)] = static_cast<std::int32_t>(g * c.experts_per_group + x);
            std::shuffle(ids.begin(), ids.end(), rng);
            for (index_t s = 0; s < c.k_per_group; ++s) {
                r.experts.push_back(ids[sz(s)]);
                r.weights.push_back(wd(rng));
            }
        }

    // Host: y zero where the expert is not held (then it adds nothing, as on the device).
    const fx::ExpertsSpec spec{d, f, c.expert_begin, c.expert_end, c.max_tokens * slots};
    fx::SwiGluExperts<> host(spec, weights);
    std::vector<float> y_host(sz(rows * d), 0.0f), want(sz(c.groups * t * d));
    host.compute(foe::MatrixView<const float>(u.values.data(), {t, d}), r, foe::MatrixView<float>(y_host.data(), {rows, d}));
    const foe::TensorView<float, 3> want_view(want.data(), {c.groups, t, d});
    for (index_t g = 0; g < c.groups; ++g)
        fx::SwiGluExperts<>::combine(r, foe::MatrixView<const float>(y_host.data(), {rows, d}),
                                     foe::MatrixView<const float>(residual.values.data(), {t, d}), g * c.k_per_group,
                                     c.k_per_group, want_view[g]);

    fx::CudaSwiGluExperts<> dev(spec, weights);
    CHECK(dev.weight_bytes() == sz(held * 3 * d * f) * sizeof(bfloat16));
    const fp::CudaLocalExperts local;
    TestScratch scratch(local.scratch_bytes(dev));
    auto du = fc::upload(u.bits);
    auto dres = fc::upload(residual.bits);
    auto dexp = fc::upload(r.experts);
    auto dw = fc::upload(r.weights);
    const fr::DeviceRoutingResult dr{t, slots, c.k_per_group, 0, dexp.data(), dw.data()};
    fc::DeviceBuffer<bfloat16> y(sz(rows * d)), out(sz(c.groups * t * d));
    std::vector<bfloat16> runs[2];
    fp::CudaLocalExperts ep;
    for (int run = 0; run < 2; ++run) {
        fc::fill_bytes(y, 0xff);
        fc::fill_bytes(out, 0xff);
        ep.run(dev, foe::MatrixView<const bfloat16>(du.data(), {t, d}), dr, foe::MatrixView<bfloat16>(y.data(), {rows, d}),
               scratch.context());
        ep.combine(dev, dr, foe::MatrixView<const bfloat16>(y.data(), {rows, d}),
                   foe::MatrixView<const bfloat16>(dres.data(), {t, d}),
                   foe::TensorView<bfloat16, 3>(out.data(), {c.groups, t, d}), scratch.context());
        runs[run] = fc::download(out);
    }
    CHECK(rel_error(to_float(runs[0]), want) < bf16_tolerance);
    CHECK(same_bits(runs[0], runs[1]));

    // foe::cuda::Layer's kernels with the same plan: the same bits.
    const fc::PermutePlan plan(spec.max_rows, held);
    fc::DeviceBuffer<unsigned char> pws(plan.workspace_bytes()),
        sws(fc::grouped_swiglu_workspace_bytes(spec.max_rows, held, f));
    fc::DeviceBuffer<std::int32_t> sorted(sz(spec.max_rows)), offsets(sz(held + 1)), inverse(sz(spec.max_rows));
    fc::DeviceBuffer<bfloat16> gathered(sz(spec.max_rows * d)), y2(sz(rows * d)), out2(sz(c.groups * t * d));
    fc::fill_bytes(out2, 0xff);
    fc::permute(plan, rows, dexp.data(), c.expert_begin, pws.data(), {sorted.data(), offsets.data(), inverse.data()},
                nullptr);
    fc::gather_rows(du.data(), sorted.data(), rows, slots, d, gathered.data(), nullptr);
    fc::grouped_swiglu(dev.grouped(), offsets.data(), gathered.data(), rows, sws.data(), y2.data(), nullptr);
    fc::combine(y2.data(), inverse.data(), dw.data(), dres.data(), t, d, slots, c.k_per_group, out2.data(), nullptr);
    CHECK(same_bits(fc::download(out2), runs[0]));
}

}  // namespace

TEST_CASE("cuda policies: CudaSwiGluExperts compute + combine match experts::SwiGluExperts, bit-identical to the layer's kernels")
{
    if (!have_device()) return;
    std::mt19937_64 rng(12);
    check_cuda_experts({37, 64, 64, 96, 4, 4, 2, 0, 16}, rng);   // FoE: 4 streams in one combine
    check_cuda_experts({1, 8, 128, 64, 1, 8, 4, 0, 8}, rng);     // decode-sized MoE batch
    check_cuda_experts({50, 50, 64, 48, 2, 8, 2, 3, 12}, rng);   // a partial holder: others' slots add nothing
    check_cuda_experts({300, 300, 64, 64, 1, 4, 2, 0, 4}, rng);  // rows past a 128-row tile per expert
}

// Not in an anonymous namespace: the Comm concept needs members that the test never calls.
namespace policy_test {

/// A device communicator of two ranks whose peer contributes zeros (its all-reduce is a no-op):
/// drives AllReduceMean's cross-rank path (fp32 partial sum, all-reduce, scale) on one device.
struct LoopbackPairComm {
    using stream_type = cudaStream_t;
    [[nodiscard]] int rank() const { return 0; }
    [[nodiscard]] int size() const { return 2; }
    void all_reduce_sum(std::span<float> buf, cudaStream_t) { reduced += buf.size(); }
    void all_to_all_v(std::span<const float>, std::span<const index_t>, std::span<float>, std::span<const index_t>,
                      cudaStream_t) {}
    void all_gather(std::span<const float>, std::span<float>, cudaStream_t) {}
    [[nodiscard]] LoopbackPairComm split(int, int) const { return {}; }
    std::size_t reduced = 0;
};
static_assert(foe::comm::Comm<LoopbackPairComm>);
static_assert(fs::DeviceResidualSyncPolicy<fs::AllReduceMean<LoopbackPairComm>>);

/// bf16 of (sum of the held streams in order, fp32) * (1/groups): the host AllReduceMean's sum
/// and scale, rounded once.
std::vector<bfloat16> host_mean(const std::vector<float>& streams, index_t held, std::size_t n, index_t groups)
{
    std::vector<bfloat16> out(n);
    for (std::size_t i = 0; i < n; ++i) {
        float acc = streams[i];
        for (index_t h = 1; h < held; ++h) acc += streams[sz(h) * n + i];
        out[i] = bfloat16(acc * (1.0f / static_cast<float>(groups)));
    }
    return out;
}

}  // namespace policy_test

TEST_CASE("cuda policies: AllReduceMean over a device communicator and CudaNoSync match the host mean bit for bit")
{
    if (!have_device()) return;
    std::mt19937_64 rng(13);
    struct Case { index_t held, groups, tokens, d; };
    for (auto c : {Case{4, 4, 33, 96}, Case{2, 4, 7, 64}, Case{1, 1, 16, 128}, Case{8, 8, 1, 2048}}) {
        CAPTURE(c.held);
        CAPTURE(c.groups);
        const auto n = sz(c.tokens * c.d);
        const auto r = random_bf16(sz(c.held) * n, rng, -3.0f, 3.0f);
        // The host policy on the same values, rounded once at the end.
        std::vector<foe::MatrixView<const float>> views;
        for (index_t h = 0; h < c.held; ++h) views.emplace_back(r.values.data() + sz(h) * n, std::array<index_t, 2>{c.tokens, c.d});
        std::vector<float> host_rf(n);
        fs::AllReduceMean<> host_sync;
        host_sync.sync(views, c.groups, foe::MatrixView<float>(host_rf.data(), {c.tokens, c.d}));
        std::vector<bfloat16> want(n);
        for (std::size_t i = 0; i < n; ++i) want[i] = bfloat16(host_rf[i]);
        CHECK(same_bits(want, policy_test::host_mean(r.values, c.held, n, c.groups)));

        auto dr = fc::upload(r.bits);
        fc::DeviceBuffer<bfloat16> rf(n);
        const foe::TensorView<const bfloat16, 3> streams(dr.data(), {c.held, c.tokens, c.d});
        const foe::MatrixView<bfloat16> rf_view(rf.data(), {c.tokens, c.d});

        fs::AllReduceMean<foe::comm::CudaSelfComm> one_rank;
        CHECK(one_rank.scratch_bytes(c.tokens, c.d) == 0);
        TestScratch none(0);
        fc::fill_bytes(rf, 0xff);
        one_rank.sync(streams, c.groups, rf_view, none.context());
        CHECK_MESSAGE(same_bits(fc::download(rf), want), first_mismatch(to_float(fc::download(rf)), to_float(want)));

        fs::AllReduceMean<policy_test::LoopbackPairComm> pair;
        TestScratch scratch(pair.scratch_bytes(c.tokens, c.d));
        fc::fill_bytes(rf, 0xff);
        pair.sync(streams, c.groups, rf_view, scratch.context());
        CHECK(pair.comm().reduced == n);
        CHECK(same_bits(fc::download(rf), want));

        if (c.held == 1 && c.groups == 1) {
            fs::CudaNoSync no_sync;
            fc::fill_bytes(rf, 0xff);
            no_sync.sync(streams, 1, rf_view, none.context());
            CHECK(same_bits(fc::download(rf), r.bits));
        }
    }
}

TEST_CASE("cuda policies: bad specs and shapes are typed errors before anything touches the device")
{
    // Runs without a device: every check below throws before the first CUDA call.
    std::vector<float> gate(sz(64 * 64), 0.5f), bias(64, 0.0f);
    const foe::MatrixView<const float> gv(gate.data(), {64, 64});
    const foe::VectorView<const float> bv(bias.data(), {64});
    using SoftmaxRouter = fr::CudaRouter<fr::Softmax, fr::PerGroupTopK>;
    CHECK_THROWS_AS(SoftmaxRouter({64, 8, 8, 0, 8, false, 0}, gv, bv), foe::InvalidArgument);  // no max_tokens
    CHECK_THROWS_AS(SoftmaxRouter({64, 9, 8, 0, 8, false, 4}, gv, bv), foe::ConfigError);     // k not a multiple of H
    CHECK_THROWS_AS(SoftmaxRouter({32, 8, 8, 0, 8, false, 4}, gv, bv), foe::InvalidArgument); // gate is [64, d]
    CHECK_THROWS_AS((fr::CudaRouter<fr::Softmax, fr::GlobalTopK>({64, 8, 2, 0, 2, false, 4}, gv, bv)), foe::ConfigError);
    std::vector<float> big(sz(512 * 64), 0.5f);
    CHECK_THROWS_AS(SoftmaxRouter({512, 8, 8, 0, 8, false, 4}, foe::MatrixView<const float>(big.data(), {512, 64}), bv),
                    foe::ConfigError);  // more experts than the kernel's 256
    std::vector<float> narrow(sz(64 * 60), 0.5f);
    CHECK_THROWS_AS(SoftmaxRouter({64, 8, 8, 0, 8, false, 4}, foe::MatrixView<const float>(narrow.data(), {64, 60}), bv),
                    foe::InvalidArgument);  // d not a multiple of 8

    std::vector<float> w(sz(64 * 64), 0.1f);
    const foe::MatrixView<const float> m(w.data(), {64, 64});
    const std::vector<fx::ExpertWeights> two{{m, m, m}, {m, m, m}};
    CHECK_THROWS_AS(fx::CudaSwiGluExperts<>({64, 64, 0, 2, 0}, two), foe::InvalidArgument);  // no max_rows
    CHECK_THROWS_AS(fx::CudaSwiGluExperts<>({64, 64, 0, 3, 8}, two), foe::InvalidArgument);  // 3 experts, 2 weights
    CHECK_THROWS_AS(fx::CudaSwiGluExperts<>({64, 64, 0, 0, 8}, {}), foe::ConfigError);       // holds nothing
    CHECK_THROWS_AS(fx::CudaSwiGluExperts<>({64, 60, 0, 2, 8}, two), foe::ConfigError);      // f not a multiple of 8
    CHECK_THROWS_AS(fx::CudaSwiGluExperts<>({64, 32, 0, 2, 8}, two), foe::InvalidArgument);  // shapes are [64, 64]

    std::vector<bfloat16> r(sz(2 * 4 * 8)), rf(sz(4 * 8));
    const foe::TensorView<const bfloat16, 3> two_streams(r.data(), {2, 4, 8});
    fs::CudaNoSync no_sync;
    CHECK_THROWS_AS(no_sync.sync(two_streams, 2, foe::MatrixView<bfloat16>(rf.data(), {4, 8}), {}), foe::ConfigError);
    fs::AllReduceMean<foe::comm::CudaSelfComm> mean;
    CHECK_THROWS_AS(mean.sync(two_streams, 1, foe::MatrixView<bfloat16>(rf.data(), {4, 8}), {}), foe::ConfigError);

    foe::comm::CudaSelfComm self;
    std::vector<float> a(4), b(4);
    const std::vector<index_t> four{4}, three{3};
    CHECK_THROWS_AS(self.all_to_all_v(a, four, b, three, nullptr), foe::CommError);
    CHECK_THROWS_AS(self.all_gather(a, std::span<float>(b.data(), 3), nullptr), foe::CommError);

    fp::CudaExchangeExperts no_exchange;
    CHECK(no_exchange.exchange() == nullptr);
}
