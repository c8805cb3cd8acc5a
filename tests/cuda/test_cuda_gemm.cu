// foe's tensor-core GEMM (TcGemm) and the grouped SwiGLU experts that read their offsets on the
// device (grouped_swiglu), against float64 loops and against cuBLASLt: shapes with tails in M, N
// and K, bf16 and fp32 output, beta accumulation, K = 0, both block tiles, routing that leaves
// experts empty or puts every row on one, rows past the routed total left untouched, bit-identical
// reruns, CUDA-graph capture and replay with new offsets. Outputs are poisoned (0xff bytes: NaN in
// bf16/fp32) before every run, so an unwritten element fails. Without a CUDA device every test
// case says so and passes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/experts/grouped_swiglu.cuh"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

using namespace foe::cuda::testing;

namespace {

constexpr index_t gemm_ms[] = {1, 37, 130, 256, 2049};
constexpr index_t gemm_ns[] = {50, 96, 768, 1000};
constexpr index_t gemm_ks[] = {8, 24, 384, 768};
constexpr fc::TcTileChoice tiles[] = {fc::TcTileChoice::large, fc::TcTileChoice::small};

const char* tile_name(fc::TcTileChoice t) { return t == fc::TcTileChoice::large ? "128x128" : "64x64"; }

/// C = A B^T in float64 (A [m, k], B [n, k]); four partial sums per dot product, so the largest
/// case (2049 x 1000 x 768) is not one long chain of dependent additions.
std::vector<double> gemm_nt_f64(const std::vector<float>& a, const std::vector<float>& b, index_t m, index_t n, index_t k)
{
    const std::vector<double> ad(a.begin(), a.end()), bd(b.begin(), b.end());
    std::vector<double> c(sz(m * n));
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
            const double* x = ad.data() + i * k;
            const double* y = bd.data() + j * k;
            double s[4] = {0.0, 0.0, 0.0, 0.0};
            index_t l = 0;
            for (; l + 4 <= k; l += 4)
                for (int u = 0; u < 4; ++u) s[u] += x[l + u] * y[l + u];
            for (; l < k; ++l) s[0] += x[l] * y[l];
            c[sz(i * n + j)] = (s[0] + s[1]) + (s[2] + s[3]);
        }
    return c;
}

std::vector<float> random_floats(std::size_t n, std::mt19937_64& rng)
{
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

}  // namespace

TEST_CASE("cuda: TcGemm C = A B^T (+ C) matches a float64 GEMM on shapes with tails, bf16 and fp32 output")
{
    if (!have_device()) return;
    std::mt19937_64 rng(11);
    for (index_t m : gemm_ms)
        for (index_t n : gemm_ns)
            for (index_t k : gemm_ks) {
                CAPTURE(m);
                CAPTURE(n);
                CAPTURE(k);
                const auto a = random_bf16(sz(m * k), rng);
                const auto b = random_bf16(sz(n * k), rng);
                const auto want = gemm_nt_f64(a.values, b.values, m, n, k);
                const auto c32 = random_floats(want.size(), rng);
                const auto c16 = random_bf16(want.size(), rng);
                std::vector<double> want32(want.size()), want16(want.size());  // + C (beta = 1)
                for (std::size_t i = 0; i < want.size(); ++i) {
                    want32[i] = want[i] + double{c32[i]};
                    want16[i] = want[i] + double{c16.values[i]};
                }
                auto da = fc::upload(a.bits);
                auto db = fc::upload(b.bits);
                fc::DeviceBuffer<float> d32(want.size());
                fc::DeviceBuffer<bfloat16> d16(want.size());
                for (auto tile : tiles) {
                    CAPTURE(tile_name(tile));
                    const fc::TcGemm gemm(tile);
                    std::vector<float> runs32[2];
                    std::vector<bfloat16> runs16[2];
                    for (int run = 0; run < 2; ++run) {
                        fc::fill_bytes(d32, 0xff);
                        fc::fill_bytes(d16, 0xff);
                        gemm.nt(da.data(), db.data(), d32.data(), fc::OutType::fp32, m, n, k, nullptr);
                        gemm.nt(da.data(), db.data(), d16.data(), fc::OutType::bf16, m, n, k, nullptr);
                        runs32[run] = fc::download(d32);
                        runs16[run] = fc::download(d16);
                    }
                    CHECK(rel_error(runs32[0], want) < 1e-4);
                    CHECK(rel_error(to_float(runs16[0]), want) < bf16_tolerance);
                    CHECK(same_bits(runs32[0], runs32[1]));
                    CHECK(same_bits(runs16[0], runs16[1]));

                    // beta = 1: accumulate onto a random C, read in its own type.
                    auto e32 = fc::upload(c32);
                    auto e16 = fc::upload(c16.bits);
                    gemm.nt(da.data(), db.data(), e32.data(), fc::OutType::fp32, m, n, k, nullptr, 1.0f);
                    gemm.nt(da.data(), db.data(), e16.data(), fc::OutType::bf16, m, n, k, nullptr, 1.0f);
                    CHECK(rel_error(fc::download(e32), want32) < 1e-4);
                    CHECK(rel_error(to_float(fc::download(e16)), want16) < bf16_tolerance);
                }
                // The default (automatic) tile choice gives one of the two results above.
                fc::fill_bytes(d32, 0xff);
                fc::TcGemm{}.nt(da.data(), db.data(), d32.data(), fc::OutType::fp32, m, n, k, nullptr);
                CHECK(rel_error(fc::download(d32), want) < 1e-4);
            }
}

TEST_CASE("cuda: TcGemm matches cuBLASLt's LtGemm on the same shapes")
{
    if (!have_device()) return;
    std::mt19937_64 rng(12);
    fc::LtGemm lt;
    for (index_t m : gemm_ms)
        for (index_t n : gemm_ns)
            for (index_t k : gemm_ks) {
                CAPTURE(m);
                CAPTURE(n);
                CAPTURE(k);
                const auto a = random_bf16(sz(m * k), rng);
                const auto b = random_bf16(sz(n * k), rng);
                auto da = fc::upload(a.bits);
                auto db = fc::upload(b.bits);
                fc::DeviceBuffer<float> l32(sz(m * n)), t32(l32.size());
                fc::DeviceBuffer<bfloat16> l16(l32.size()), t16(l32.size());
                fc::fill_bytes(l32, 0xff);
                fc::fill_bytes(l16, 0xff);
                lt.nt(da.data(), db.data(), l32.data(), fc::OutType::fp32, m, n, k, nullptr);
                lt.nt(da.data(), db.data(), l16.data(), fc::OutType::bf16, m, n, k, nullptr);
                const auto want32 = fc::download(l32);
                const auto want16 = to_float(fc::download(l16));
                for (auto tile : tiles) {
                    CAPTURE(tile_name(tile));
                    fc::fill_bytes(t32, 0xff);
                    fc::fill_bytes(t16, 0xff);
                    const fc::TcGemm tc(tile);
                    tc.nt(da.data(), db.data(), t32.data(), fc::OutType::fp32, m, n, k, nullptr);
                    tc.nt(da.data(), db.data(), t16.data(), fc::OutType::bf16, m, n, k, nullptr);
                    CHECK(rel_error(fc::download(t32), want32) < 1e-4);  // two fp32 summation orders
                    CHECK(rel_error(to_float(fc::download(t16)), want16) < bf16_tolerance);
                }
            }
}

TEST_CASE("cuda: TcGemm gives a row the same bits alone, in any batch and with either tile; cuBLASLt only within fp32 rounding")
{
    // What foe promises on the device (README, determinism table): TcGemm adds each output's
    // k-tiles of 32 in one fixed order whatever the block tile, the grid or M, so a token's
    // projection does not depend on the batch around it. cuBLASLt picks its algorithm (and may
    // split K, most likely for few rows and a long K) per shape: equal within fp32 rounding only.
    if (!have_device()) return;
    std::mt19937_64 rng(21);
    const index_t m = 1000, n = 768, k = 2048;
    const auto a = random_bf16(sz(m * k), rng);
    const auto b = random_bf16(sz(n * k), rng);
    auto da = fc::upload(a.bits);
    auto db = fc::upload(b.bits);
    fc::DeviceBuffer<float> whole(sz(m * n));
    fc::TcGemm(fc::TcTileChoice::large).nt(da.data(), db.data(), whole.data(), fc::OutType::fp32, m, n, k, nullptr);
    const auto tc_whole = fc::download(whole);
    fc::LtGemm lt;
    lt.nt(da.data(), db.data(), whole.data(), fc::OutType::fp32, m, n, k, nullptr);
    const auto lt_whole = fc::download(whole);
    struct Rows {
        index_t begin, count;
    };
    for (const Rows r : {Rows{0, 1}, Rows{17, 1}, Rows{999, 1}, Rows{5, 3}, Rows{100, 64}, Rows{1, 130}, Rows{0, 1000}}) {
        CAPTURE(r.begin);
        CAPTURE(r.count);
        const auto first = tc_whole.begin() + r.begin * n, last = first + r.count * n;
        const std::vector<float> tc_want(first, last);
        const std::vector<float> lt_want(lt_whole.begin() + r.begin * n, lt_whole.begin() + (r.begin + r.count) * n);
        fc::DeviceBuffer<float> part(sz(r.count * n));
        for (auto tile : {fc::TcTileChoice::automatic, fc::TcTileChoice::large, fc::TcTileChoice::small}) {
            fc::fill_bytes(part, 0xff);
            fc::TcGemm(tile).nt(da.data() + r.begin * k, db.data(), part.data(), fc::OutType::fp32, r.count, n, k, nullptr);
            const auto got = fc::download(part);
            CHECK_MESSAGE(same_bits(got, tc_want), first_mismatch(got, tc_want));
        }
        fc::fill_bytes(part, 0xff);
        lt.nt(da.data() + r.begin * k, db.data(), part.data(), fc::OutType::fp32, r.count, n, k, nullptr);
        const auto got = fc::download(part);
        CHECK(rel_error(got, lt_want) < 1e-5);
        MESSAGE("cuBLASLt, rows [", r.begin, ", ", r.begin + r.count, ") alone: ",
                same_bits(got, lt_want) ? "the same bits" : "other bits", " than inside the 1000-row product");
    }
}

TEST_CASE("cuda: TcGemm with K = 0 gives C = beta C; bad shapes and misaligned pointers throw InvalidArgument")
{
    if (!have_device()) return;
    std::mt19937_64 rng(13);
    const index_t m = 37, n = 50;
    const auto c32 = random_floats(sz(m * n), rng);
    const auto c16 = random_bf16(sz(m * n), rng);
    fc::DeviceBuffer<bfloat16> a(sz(m * 16)), b(sz(n * 16));  // contents unused with K = 0
    for (auto tile : {fc::TcTileChoice::automatic, fc::TcTileChoice::large, fc::TcTileChoice::small}) {
        const fc::TcGemm gemm(tile);
        for (float beta : {0.0f, 0.5f, 1.0f}) {
            CAPTURE(beta);
            auto d32 = fc::upload(c32);
            auto d16 = fc::upload(c16.bits);
            gemm.nt(a.data(), b.data(), d32.data(), fc::OutType::fp32, m, n, 0, nullptr, beta);
            gemm.nt(a.data(), b.data(), d16.data(), fc::OutType::bf16, m, n, 0, nullptr, beta);
            std::vector<float> want32(c32.size());
            std::vector<bfloat16> want16(c32.size());
            for (std::size_t i = 0; i < c32.size(); ++i) {
                // beta in {1/2, 1}: exact; beta = 0 does not read C and writes +0.
                want32[i] = beta == 0.0f ? 0.0f : beta * c32[i];
                want16[i] = bfloat16(beta == 0.0f ? 0.0f : beta * c16.values[i]);
            }
            const auto got32 = fc::download(d32);
            const auto got16 = fc::download(d16);
            CHECK_MESSAGE(same_bits(got32, want32), first_mismatch(got32, want32));
            CHECK(same_bits(got16, want16));
        }
    }
    const fc::TcGemm gemm;
    fc::DeviceBuffer<float> c(sz(m * n));
    try {
        gemm.nt(a.data(), b.data(), c.data(), fc::OutType::fp32, m, n, 12, nullptr);
        FAIL("K = 12 did not throw");
    } catch (const foe::InvalidArgument& e) {
        CHECK(std::string(e.what()).find("K (12)") != std::string::npos);
    }
    CHECK_THROWS_AS(gemm.nt(a.data() + 1, b.data(), c.data(), fc::OutType::fp32, m, n, 8, nullptr), foe::InvalidArgument);
    CHECK_THROWS_AS(gemm.nt(a.data(), b.data() + 4, c.data(), fc::OutType::fp32, m, n, 8, nullptr), foe::InvalidArgument);
    CHECK_THROWS_AS(gemm.nt(a.data(), b.data(), c.data() + 1, fc::OutType::fp32, m, n, 8, nullptr), foe::InvalidArgument);
    CHECK_THROWS_AS(gemm.nt(a.data(), b.data(), c.data(), fc::OutType::fp32, -1, n, 8, nullptr), foe::InvalidArgument);
    // M = 0 or N = 0: nothing to do, nothing written.
    CHECK_NOTHROW(gemm.nt(a.data(), b.data(), c.data(), fc::OutType::fp32, 0, n, 8, nullptr));
    CHECK_NOTHROW(gemm.nt(a.data(), b.data(), c.data(), fc::OutType::fp32, m, 0, 8, nullptr));
    CHECK(cudaDeviceSynchronize() == cudaSuccess);
}

namespace {

/// One grouped-experts problem: weights, grouped input (poisoned past the routed rows), offsets.
struct GroupedCase {
    const char* name;
    index_t experts, d, f;
    std::vector<index_t> counts;  ///< rows per expert
    index_t max_rows;             ///< >= sum of counts; the rows past it are poison
};

struct GroupedData {
    Bf16Data gate_up, down, x;
    std::vector<std::int32_t> offsets;
    index_t routed = 0;
};

GroupedData make_grouped(const GroupedCase& c, std::mt19937_64& rng)
{
    GroupedData g;
    g.gate_up = random_bf16(sz(c.experts * 2 * c.f * c.d), rng, -0.1f, 0.1f);
    g.down = random_bf16(sz(c.experts * c.d * c.f), rng, -0.1f, 0.1f);
    g.offsets.assign(sz(c.experts + 1), 0);
    for (index_t e = 0; e < c.experts; ++e)
        g.offsets[sz(e + 1)] = g.offsets[sz(e)] + static_cast<std::int32_t>(c.counts[sz(e)]);
    g.routed = g.offsets.back();
    REQUIRE(g.routed <= c.max_rows);
    g.x = random_bf16(sz(c.max_rows * c.d), rng);
    for (std::size_t i = sz(g.routed * c.d); i < g.x.bits.size(); ++i) g.x.bits[i] = bfloat16::from_bits(0xffff);  // NaN
    return g;
}

/// y[r] = down_e(silu(gate_e x_r) * up_e x_r) in float64 for the routed rows.
std::vector<double> grouped_swiglu_f64(const GroupedCase& c, const GroupedData& g)
{
    const index_t d = c.d, f = c.f;
    std::vector<double> y(sz(g.routed * d)), act(sz(f));
    for (index_t e = 0; e < c.experts; ++e) {
        const float* gu = g.gate_up.values.data() + e * 2 * f * d;
        const float* dn = g.down.values.data() + e * d * f;
        for (index_t r = g.offsets[sz(e)]; r < g.offsets[sz(e + 1)]; ++r) {
            const float* x = g.x.values.data() + r * d;
            for (index_t j = 0; j < f; ++j) {
                double gate = 0.0, up = 0.0;
                for (index_t l = 0; l < d; ++l) {
                    gate += double{gu[j * d + l]} * x[l];
                    up += double{gu[(f + j) * d + l]} * x[l];
                }
                act[sz(j)] = gate / (1.0 + std::exp(-gate)) * up;
            }
            for (index_t o = 0; o < d; ++o) {
                double acc = 0.0;
                for (index_t j = 0; j < f; ++j) acc += act[sz(j)] * dn[o * f + j];
                y[sz(r * d + o)] = acc;
            }
        }
    }
    return y;
}

std::vector<index_t> random_counts(index_t experts, index_t rows, const std::vector<index_t>& allowed, std::mt19937_64& rng)
{
    std::vector<index_t> counts(sz(experts), 0);
    std::uniform_int_distribution<std::size_t> pick(0, allowed.size() - 1);
    for (index_t r = 0; r < rows; ++r) ++counts[sz(allowed[pick(rng)])];
    return counts;
}

std::vector<GroupedCase> grouped_cases(std::mt19937_64& rng)
{
    std::vector<GroupedCase> cases;
    // 8 experts, only 2, 3 and 5 routed (the first and last are empty); 64-row tiles.
    cases.push_back({"experts 0, 1, 4, 6, 7 empty", 8, 64, 48, random_counts(8, 300, {2, 3, 5}, rng), 337});
    // Every row on one expert; 600 >= 4 x 128 rows: 128-row tiles, and a tail of 600 % 128.
    cases.push_back({"all rows on expert 2", 4, 128, 96, {0, 0, 600, 0}, 600});
    // Uniform routing, counts not multiples of any tile, d not a multiple of the 128-column tile.
    {
        std::vector<index_t> all(8);
        for (index_t e = 0; e < 8; ++e) all[sz(e)] = e;
        cases.push_back({"uniform over 8, 128-row tiles", 8, 200, 72, random_counts(8, 2000, all, rng), 2011});
        cases.push_back({"uniform over 8, 64-row tiles", 8, 200, 72, random_counts(8, 333, all, rng), 400});
    }
    // foe-1b's expert shapes at a decode-size batch: 64 tokens x 8 slots.
    {
        std::vector<index_t> all(64);
        for (index_t e = 0; e < 64; ++e) all[sz(e)] = e;
        cases.push_back({"foe-1b shapes, 512 rows over 64 experts", 64, 768, 384, random_counts(64, 512, all, rng), 512});
    }
    cases.push_back({"one row", 8, 64, 40, {0, 0, 0, 0, 0, 1, 0, 0}, 5});
    cases.push_back({"no rows routed", 3, 64, 48, {0, 0, 0}, 10});
    return cases;
}

}  // namespace

TEST_CASE("cuda: grouped_swiglu (device offsets) matches a float64 SwiGLU per expert; unrouted rows untouched; bit-identical")
{
    if (!have_device()) return;
    std::mt19937_64 rng(14);
    for (const auto& c : grouped_cases(rng)) {
        CAPTURE(c.name);
        const auto g = make_grouped(c, rng);
        const auto want = grouped_swiglu_f64(c, g);
        auto dgu = fc::upload(g.gate_up.bits);
        auto ddown = fc::upload(g.down.bits);
        auto dx = fc::upload(g.x.bits);
        auto doff = fc::upload(g.offsets);
        fc::DeviceBuffer<unsigned char> ws(fc::grouped_swiglu_workspace_bytes(c.max_rows, c.experts, c.f));
        fc::DeviceBuffer<bfloat16> y(sz(c.max_rows * c.d));
        const fc::GroupedExpertWeights w{dgu.data(), ddown.data(), c.experts, c.d, c.f};
        std::vector<bfloat16> runs[2];
        for (int run = 0; run < 2; ++run) {
            fc::fill_bytes(y, 0xff);
            fc::fill_bytes(ws, 0xff);
            fc::grouped_swiglu(w, doff.data(), dx.data(), c.max_rows, ws.data(), y.data(), nullptr);
            runs[run] = fc::download(y);
        }
        const std::vector<bfloat16> routed(runs[0].begin(), runs[0].begin() + static_cast<std::ptrdiff_t>(want.size()));
        CHECK(rel_error(to_float(routed), want) < bf16_tolerance);
        bool untouched = true;
        for (std::size_t i = want.size(); i < runs[0].size(); ++i) untouched = untouched && runs[0][i].bits == 0xffff;
        CHECK_MESSAGE(untouched, "rows past offsets[experts] were written");
        CHECK(same_bits(runs[0], runs[1]));
    }
}

TEST_CASE("cuda: grouped_swiglu captured in a CUDA graph replays with new offsets and inputs")
{
    if (!have_device()) return;
    std::mt19937_64 rng(15);
    const index_t experts = 8, d = 128, f = 64, max_rows = 1100;
    std::vector<index_t> all(sz(experts));
    for (index_t e = 0; e < experts; ++e) all[sz(e)] = e;
    // Two routings of the same weights: 1000 rows uniform (128-row tiles: 1100 >= 8 x 128), and 97
    // rows on experts 1 and 6 only. The tile size is chosen from max_rows, so it is the same.
    GroupedCase first{"first", experts, d, f, random_counts(experts, 1000, all, rng), max_rows};
    GroupedCase second{"second", experts, d, f, random_counts(experts, 97, {1, 6}, rng), max_rows};
    auto g1 = make_grouped(first, rng);
    auto g2 = make_grouped(second, rng);
    g2.gate_up = g1.gate_up;
    g2.down = g1.down;
    auto dgu = fc::upload(g1.gate_up.bits);
    auto ddown = fc::upload(g1.down.bits);
    auto dx = fc::upload(g1.x.bits);
    auto doff = fc::upload(g1.offsets);
    fc::DeviceBuffer<unsigned char> ws(fc::grouped_swiglu_workspace_bytes(max_rows, experts, f));
    fc::DeviceBuffer<bfloat16> y(sz(max_rows * d));
    const fc::GroupedExpertWeights w{dgu.data(), ddown.data(), experts, d, f};

    // Eager results of both routings (the previous test checks them against float64).
    std::vector<bfloat16> eager[2];
    for (int i = 0; i < 2; ++i) {
        const auto& g = i == 0 ? g1 : g2;
        fc::check(cudaMemcpy(dx.data(), g.x.bits.data(), dx.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
        fc::check(cudaMemcpy(doff.data(), g.offsets.data(), doff.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
        fc::fill_bytes(y, 0xff);
        fc::grouped_swiglu(w, doff.data(), dx.data(), max_rows, ws.data(), y.data(), nullptr);
        eager[i] = fc::download(y);
    }
    const auto second_y = to_float(eager[1]);
    CHECK(rel_error(std::vector<float>(second_y.begin(), second_y.begin() + 97 * d), grouped_swiglu_f64(second, g2)) <
          bf16_tolerance);

    cudaStream_t stream{};
    // A blocking stream: it waits for the synchronous copies below, which run on the legacy
    // default stream and may still be in flight when cudaMemcpy returns (pageable memory).
    fc::check(cudaStreamCreate(&stream), "cudaStreamCreate");
    cudaGraph_t graph{};
    cudaGraphExec_t exec{};
    fc::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    fc::grouped_swiglu(w, doff.data(), dx.data(), max_rows, ws.data(), y.data(), stream);
    fc::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    fc::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    for (int i = 0; i < 2; ++i) {
        CAPTURE(i);
        const auto& g = i == 0 ? g1 : g2;
        fc::check(cudaMemcpy(dx.data(), g.x.bits.data(), dx.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
        fc::check(cudaMemcpy(doff.data(), g.offsets.data(), doff.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
        fc::fill_bytes(y, 0xff, stream);
        fc::check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
        fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        const auto got = fc::download(y);
        CHECK_MESSAGE(same_bits(got, eager[i]), "graph replay differs from the eager run");
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
    (void)cudaStreamDestroy(stream);
}

TEST_CASE("cuda: grouped_swiglu rejects bad expert counts, widths and alignment with InvalidArgument")
{
    if (!have_device()) return;
    fc::DeviceBuffer<bfloat16> buf(4096);
    fc::DeviceBuffer<std::int32_t> off(2048);
    fc::DeviceBuffer<unsigned char> ws(1 << 16);
    const auto run = [&](index_t experts, index_t d, index_t f, const bfloat16* x) {
        fc::grouped_swiglu({buf.data(), buf.data(), experts, d, f}, off.data(), x, 4, ws.data(), buf.data(), nullptr);
    };
    CHECK_THROWS_AS(run(0, 64, 64, buf.data()), foe::InvalidArgument);
    CHECK_THROWS_AS(run(1025, 64, 64, buf.data()), foe::InvalidArgument);
    CHECK_THROWS_AS(run(2, 60, 64, buf.data()), foe::InvalidArgument);
    CHECK_THROWS_AS(run(2, 64, 36, buf.data()), foe::InvalidArgument);
    CHECK_THROWS_AS(run(2, 64, 64, buf.data() + 1), foe::InvalidArgument);
    CHECK_THROWS_AS(fc::grouped_swiglu({buf.data(), buf.data(), 2, 64, 64}, off.data(), buf.data(), -1, ws.data(),
                                       buf.data(), nullptr),
                    foe::InvalidArgument);
}
