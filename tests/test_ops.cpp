// Host kernels against float64 naive oracles, on fresh random inputs over several shapes:
// GEMM policies, RMSNorm, RoPE, GQA attention with its KV cache, routing (score x selection) and
// SwiGLU experts (compute and combine). Layers and the whole model are tested in test_model.cpp.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "oracle.hpp"
#include "test_util.hpp"

using foe::index_t;
using foe::MatrixView;
using foe::QkNorm;
using foe::TensorView;
using foe::VectorView;
using oracle::Vec;

namespace {

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr double inf_d = std::numeric_limits<double>::infinity();

std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

/// Uniform random floats in [lo, hi) (norm weights live in [0.8, 1.2)).
std::vector<float> random_in(std::size_t n, std::uint64_t seed, float lo, float hi)
{
    std::vector<float> v(n);
    foe::CounterRng(seed, 0x5ca1e).fill_uniform(v, lo, hi);
    return v;
}

/// Random floats in [-scale, scale): projection weights scaled by 1/sqrt(fan_in) keep activations O(1).
std::vector<float> random_scaled(std::size_t n, std::uint64_t seed, double scale)
{
    auto v = test::random_floats(n, seed);
    for (auto& x : v) x = static_cast<float>(x * scale);
    return v;
}

/// A dense float64 copy of a (possibly strided) matrix view.
Vec dense(MatrixView<const float> m)
{
    Vec v;
    v.reserve(sz(m.size()));
    for (index_t i = 0; i < m.extent(0); ++i)
        for (index_t j = 0; j < m.extent(1); ++j) v.push_back(static_cast<double>(m(i, j)));
    return v;
}

std::vector<float> dense_f(MatrixView<const float> m)
{
    std::vector<float> v;
    v.reserve(sz(m.size()));
    for (index_t i = 0; i < m.extent(0); ++i)
        for (index_t j = 0; j < m.extent(1); ++j) v.push_back(m(i, j));
    return v;
}

}  // namespace

// =============================================================================================
// GEMM: C = A B^T (+ C), BatchInvariant always (with the kernels this CPU runs and with the
// portable ones), Cblas when the build found one.
// =============================================================================================

namespace {

struct GemmShape {
    index_t m, n, k;
};

// 1x1x1, odd sizes, sizes off the 8-lane and 64-column blocks, K < 8, a few larger ones, and
// shapes past BatchInvariant's blocks (6 x 16 register tiles, 96 rows, 128 columns, 256 of K).
const GemmShape gemm_shapes[] = {{1, 1, 1},     {5, 7, 3},      {3, 5, 7},     {2, 3, 5},     {4, 9, 7},
                                 {3, 70, 1},    {17, 64, 8},    {1, 200, 9},   {33, 65, 129}, {65, 129, 33},
                                 {129, 33, 65}, {64, 64, 64},   {7, 17, 600},  {100, 150, 300},
                                 {1, 300, 513}, {197, 261, 257}};

/// BatchInvariant forced onto its portable kernels (std::fma), whatever this CPU has.
struct BatchInvariantPortable {
    static void nt(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool accumulate)
    {
        foe::gemm::detail::bi::nt(foe::gemm::detail::bi::portable_kernels, a, b, c, accumulate);
    }
};
static_assert(foe::gemm::GemmPolicy<BatchInvariantPortable>);

template <class G>
void check_gemm_dense(GemmShape s, bool accumulate, std::uint64_t seed)
{
    const index_t m = s.m, n = s.n, k = s.k;  // no structured bindings: doctest's lambdas capture these
    const auto a = test::random_floats(sz(m * k), seed), b = test::random_floats(sz(n * k), seed + 1);
    // Without accumulate the output starts as NaN: every element must be overwritten, none read.
    auto c = accumulate ? test::random_floats(sz(m * n), seed + 2) : std::vector<float>(sz(m * n), nan_f);
    Vec expected = oracle::matmul_nt(oracle::to_double(a), m, k, b, n);
    if (accumulate)
        for (std::size_t i = 0; i < expected.size(); ++i) expected[i] += c[i];
    G::nt(MatrixView<const float>(a.data(), {m, k}), MatrixView<const float>(b.data(), {n, k}),
          MatrixView<float>(c.data(), {m, n}), accumulate);
    CHECK_MESSAGE(oracle::relative_error(c, expected) < 1e-5, "dense ", m, "x", n, "x", k, " accumulate=", accumulate);
}

/// A and B are column blocks of wider matrices; C is a sub-block of a NaN-poisoned buffer whose
/// row stride exceeds C's width. Elements of the buffer outside C must stay NaN.
template <class G>
void check_gemm_strided(GemmShape s, bool accumulate, std::uint64_t seed)
{
    const index_t m = s.m, n = s.n, k = s.k;  // no structured bindings: doctest's lambdas capture these
    const index_t lda = k + 5, ldb = k + 4, ldc = n + 6, c_rows = m + 3;
    const auto wa = test::random_floats(sz(m * lda), seed), wb = test::random_floats(sz(n * ldb), seed + 1);
    const MatrixView<const float> a = MatrixView<const float>(wa.data(), {m, lda}).slice(1, 2, k);
    const MatrixView<const float> b = MatrixView<const float>(wb.data(), {n, ldb}).slice(1, 3, k);
    std::vector<float> wc(sz(c_rows * ldc), nan_f);
    const MatrixView<float> c = MatrixView<float>(wc.data(), {c_rows, ldc}).slice(0, 1, m).slice(1, 2, n);
    REQUIRE(c.stride(0) == ldc);

    const auto init = test::random_floats(sz(m * n), seed + 2);
    Vec expected = oracle::matmul_nt(dense(a), m, k, dense_f(b), n);
    if (accumulate)
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j) {
                c(i, j) = init[sz(i * n + j)];
                expected[sz(i * n + j)] += init[sz(i * n + j)];
            }
    G::nt(a, b, c, accumulate);
    CHECK_MESSAGE(oracle::relative_error(dense_f(c), expected) < 1e-5, "strided ", m, "x", n, "x", k, " accumulate=", accumulate);

    index_t touched_outside = 0;
    for (index_t i = 0; i < c_rows; ++i)
        for (index_t j = 0; j < ldc; ++j) {
            const bool inside = i >= 1 && i < 1 + m && j >= 2 && j < 2 + n;
            if (!inside && !std::isnan(wc[sz(i * ldc + j)])) ++touched_outside;
        }
    CHECK_MESSAGE(touched_outside == 0, "strided ", m, "x", n, "x", k, ": ", touched_outside,
                  " elements outside the output view were written");
}

template <class G>
void check_gemm_policy(const char* policy)
{
    CAPTURE(policy);
    std::uint64_t seed = 100;
    for (const auto& s : gemm_shapes)
        for (bool accumulate : {false, true}) {
            check_gemm_dense<G>(s, accumulate, seed += 3);
            check_gemm_strided<G>(s, accumulate, seed += 3);
        }
}

template <class G>
void check_gemm_bad_shapes(const char* policy)
{
    CAPTURE(policy);
    std::vector<float> buf(64, 0.5f), out(64, 0.5f);
    const float* p = buf.data();
    using CV = MatrixView<const float>;
    using V = MatrixView<float>;
    // Inner dimensions differ.
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}), CV(p, {4, 5}), V(out.data(), {2, 4}), false), foe::InvalidArgument);
    // Output rows / columns wrong.
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}), CV(p, {4, 3}), V(out.data(), {3, 4}), false), foe::InvalidArgument);
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}), CV(p, {4, 3}), V(out.data(), {2, 5}), true), foe::InvalidArgument);
    // Non-unit stride along a row of A, B or C.
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}, {6, 2}), CV(p, {4, 3}), V(out.data(), {2, 4}), false), foe::InvalidArgument);
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}), CV(p, {4, 3}, {6, 2}), V(out.data(), {2, 4}), false), foe::InvalidArgument);
    CHECK_THROWS_AS(G::nt(CV(p, {2, 3}), CV(p, {4, 3}), V(out.data(), {2, 4}, {8, 2}), false), foe::InvalidArgument);
    CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.5f; }));
}

}  // namespace

TEST_CASE("GEMM BatchInvariant matches the float64 oracle: dense and strided views, overwrite and accumulate")
{
    check_gemm_policy<foe::gemm::BatchInvariant>(foe::gemm::BatchInvariant::kernel_name());
    check_gemm_policy<BatchInvariantPortable>("portable kernels");
}

TEST_CASE("GEMM BatchInvariant rejects bad shapes with InvalidArgument")
{
    check_gemm_bad_shapes<foe::gemm::BatchInvariant>("BatchInvariant");
}

namespace {

/// BatchInvariant's contract, written out: one sequential chain of fused multiply-adds per output.
std::vector<float> fma_chains(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& c0,
                              index_t m, index_t n, index_t k, bool accumulate)
{
    std::vector<float> c(sz(m * n));
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
            float acc = accumulate ? c0[sz(i * n + j)] : 0.0f;
            for (index_t p = 0; p < k; ++p) acc = std::fma(a[sz(i * k + p)], b[sz(j * k + p)], acc);
            c[sz(i * n + j)] = acc;
        }
    return c;
}

bool same_bits(const float* a, const float* b, std::size_t n) { return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0; }

}  // namespace

TEST_CASE("GEMM BatchInvariant gives every output the bits of its own FMA chain, on this CPU's kernels and the portable ones")
{
    CAPTURE(foe::gemm::BatchInvariant::kernel_name());
    std::uint64_t seed = 500;
    for (const auto& s : gemm_shapes)
        for (bool accumulate : {false, true}) {
            const index_t m = s.m, n = s.n, k = s.k;
            CAPTURE(m);
            CAPTURE(n);
            CAPTURE(k);
            CAPTURE(accumulate);
            const auto a = test::random_floats(sz(m * k), seed += 3), b = test::random_floats(sz(n * k), seed + 1);
            const auto c0 = test::random_floats(sz(m * n), seed + 2);
            const auto want = fma_chains(a, b, c0, m, n, k, accumulate);
            auto fast = c0, portable = c0;
            foe::gemm::BatchInvariant::nt({a.data(), {m, k}}, {b.data(), {n, k}}, {fast.data(), {m, n}}, accumulate);
            BatchInvariantPortable::nt({a.data(), {m, k}}, {b.data(), {n, k}}, {portable.data(), {m, n}}, accumulate);
            CHECK(same_bits(fast.data(), want.data(), want.size()));
            CHECK(same_bits(portable.data(), want.data(), want.size()));
        }
}

TEST_CASE("GEMM BatchInvariant: a row's bits do not depend on M, on the rows around it or on the thread count")
{
    // 203 rows: three 96-row blocks, the last partial, and 6-row tiles with every remainder; 261
    // columns (two 128-column panels and a 5-column edge, or narrower panels for few rows); K 700
    // (three blocks of 256).
    const index_t m = 203, n = 261, k = 700;
    const auto a = test::random_floats(sz(m * k), 61), b = test::random_floats(sz(n * k), 62);
    const auto c0 = test::random_floats(sz(m * n), 63);
    for (bool accumulate : {false, true}) {
        CAPTURE(accumulate);
        auto whole = c0;
        foe::gemm::BatchInvariant::nt({a.data(), {m, k}}, {b.data(), {n, k}}, {whole.data(), {m, n}}, accumulate);
        // Row blocks of other sizes at other offsets: every size 1..13, and some larger ones.
        struct Rows {
            index_t begin, count;
        };
        std::vector<Rows> blocks;
        for (index_t count = 1; count <= 13; ++count) blocks.push_back({(count * 37) % (m - count), count});
        blocks.push_back({5, 96});
        blocks.push_back({1, 150});
        blocks.push_back({m - 1, 1});
        for (const auto& r : blocks) {
            CAPTURE(r.begin);
            CAPTURE(r.count);
            std::vector<float> part(c0.begin() + r.begin * n, c0.begin() + (r.begin + r.count) * n);
            foe::gemm::BatchInvariant::nt({a.data() + r.begin * k, {r.count, k}}, {b.data(), {n, k}},
                                          {part.data(), {r.count, n}}, accumulate);
            CHECK(same_bits(part.data(), whole.data() + r.begin * n, part.size()));
        }
        // Columns: a block of rows of B gives the same bits as those columns of the whole product.
        std::vector<float> cols(sz(m * 21));
        for (index_t i = 0; i < m; ++i) std::copy_n(c0.begin() + i * n + 130, 21, cols.begin() + i * 21);
        foe::gemm::BatchInvariant::nt({a.data(), {m, k}}, {b.data() + 130 * k, {21, k}}, {cols.data(), {m, 21}},
                                      accumulate);
        bool columns_same = true;
        for (index_t i = 0; i < m; ++i)
            columns_same = columns_same && same_bits(cols.data() + i * 21, whole.data() + i * n + 130, 21);
        CHECK(columns_same);
#if defined(_OPENMP)
        const int saved = omp_get_max_threads();
        for (int threads : {1, 2, 3, 5}) {
            CAPTURE(threads);
            omp_set_num_threads(threads);
            auto again = c0;
            foe::gemm::BatchInvariant::nt({a.data(), {m, k}}, {b.data(), {n, k}}, {again.data(), {m, n}}, accumulate);
            auto one_row = std::vector<float>(c0.begin() + 17 * n, c0.begin() + 18 * n);
            foe::gemm::BatchInvariant::nt({a.data() + 17 * k, {1, k}}, {b.data(), {n, k}}, {one_row.data(), {1, n}},
                                          accumulate);
            CHECK(same_bits(again.data(), whole.data(), whole.size()));
            CHECK(same_bits(one_row.data(), whole.data() + 17 * n, one_row.size()));
        }
        omp_set_num_threads(saved);
#endif
    }
}

// --- BatchInvariant's small-M (decode) path and bf16 / fp16 B ----------------------------------

static_assert(foe::gemm::GemmPolicyFor<foe::gemm::BatchInvariant, float>);
static_assert(foe::gemm::GemmPolicyFor<foe::gemm::BatchInvariant, foe::bfloat16>);
static_assert(foe::gemm::GemmPolicyFor<foe::gemm::BatchInvariant, foe::float16>);
static_assert(!foe::gemm::GemmPolicyFor<BatchInvariantPortable, foe::bfloat16>);  // fp32 B only

namespace {

namespace bi = foe::gemm::detail::bi;

/// Every kernel set this CPU runs: the portable one always; on an AVX2 + FMA CPU the set without
/// F16C (the blocked path for every M, 16-bit B widened by the portable packing) and, with F16C,
/// the full AVX2 set (small-M path, 16-bit B widened in registers).
struct NamedKernels {
    const char* name;
    const bi::Kernels* kernels;
};
std::vector<NamedKernels> kernel_sets_of_this_cpu()
{
    std::vector<NamedKernels> sets{{"portable", &bi::portable_kernels}};
#if defined(FOE_GEMM_HAS_AVX2_KERNELS)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        sets.push_back({"avx2+fma without f16c", &bi::avx2_kernels_without_f16c});
        if (&bi::kernels_for_this_cpu() == &bi::avx2_kernels) sets.push_back({"avx2+fma+f16c", &bi::avx2_kernels});
    }
#endif
    return sets;
}

/// n rows of B of element type T, ldb apart (ldb >= k), from random floats in [-1, 1) rounded to
/// T, and the same k columns widened to a dense fp32 [n, k].
template <class T>
struct TypedB {
    index_t n, k, ldb;
    std::vector<T> storage;
    std::vector<float> widened;
    TypedB(index_t rows, index_t cols, index_t stride, std::uint64_t seed) : n(rows), k(cols), ldb(stride)
    {
        for (const float x : test::random_floats(sz(n * ldb), seed)) storage.push_back(T(x));
        for (index_t j = 0; j < n; ++j)
            for (index_t p = 0; p < k; ++p) widened.push_back(static_cast<float>(storage[sz(j * ldb + p)]));
    }
    [[nodiscard]] MatrixView<const T> view() const { return {storage.data(), {n, k}, {ldb, 1}}; }
    [[nodiscard]] MatrixView<const float> widened_view() const { return {widened.data(), {n, k}}; }
};

/// Runs check() once on 1 thread and once on 2, then restores the thread count.
template <class F>
void on_1_and_2_threads(F&& check)
{
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    for (int threads : {1, 2}) {
        CAPTURE(threads);
        omp_set_num_threads(threads);
        check();
    }
    omp_set_num_threads(saved);
#else
    check();
#endif
}

template <class T>
void check_chains_with_b_of(const char* type)
{
    CAPTURE(type);
    const auto sets = kernel_sets_of_this_cpu();
    on_1_and_2_threads([&] {
        std::uint64_t seed = 900;
        // M 1 .. 3 on the small-M path (where the kernel set has one), 5 .. 13 on the blocked
        // path; N and K around the 8- and 16-wide blocks, K = 0 the empty sum.
        for (index_t m : {1, 2, 3, 5, 7, 13})
            for (index_t n : {1, 7, 8, 9, 33, 130})
                for (index_t k : {0, 1, 7, 8, 9, 257})
                    for (bool accumulate : {false, true}) {
                        CAPTURE(m);
                        CAPTURE(n);
                        CAPTURE(k);
                        CAPTURE(accumulate);
                        const index_t ldb = (n + k) % 2 == 1 ? k + 3 : k;  // gaps between rows of B in half the shapes
                        CAPTURE(ldb);
                        const auto a = test::random_floats(sz(m * k), seed += 3);
                        const TypedB<T> b(n, k, ldb, seed + 1);
                        const auto c0 = test::random_floats(sz(m * n), seed + 2);
                        const auto want = fma_chains(a, b.widened, c0, m, n, k, accumulate);
                        const MatrixView<const float> av(a.data(), {m, k});
                        for (const auto& set : sets) {
                            CAPTURE(set.name);
                            auto got = c0;
                            bi::nt(*set.kernels, av, b.view(), MatrixView<float>(got.data(), {m, n}), accumulate);
                            CHECK(same_bits(got.data(), want.data(), want.size()));
                            // The small-M path split over the threads whatever the size of B.
                            const auto small_m = set.kernels->template for_b<T>().small_m;
                            if (m <= bi::small_m_rows && k > 0 && small_m != nullptr) {
                                auto split = c0;
                                bi::nt_small_m(small_m, av, b.view(), MatrixView<float>(split.data(), {m, n}), accumulate, 1);
                                CHECK(same_bits(split.data(), want.data(), want.size()));
                            }
                        }
                        // The public entry point, and on the fp32 widened B: the same bits.
                        auto direct = c0, widened = c0;
                        foe::gemm::BatchInvariant::nt(av, b.view(), MatrixView<float>(direct.data(), {m, n}), accumulate);
                        foe::gemm::BatchInvariant::nt(av, b.widened_view(), MatrixView<float>(widened.data(), {m, n}),
                                                      accumulate);
                        CHECK(same_bits(direct.data(), want.data(), want.size()));
                        CHECK(same_bits(widened.data(), direct.data(), want.size()));
                    }
    });
}

/// Rows 1 to 4 at a time (the small-M path) against the same rows of one 29-row product (the
/// blocked path), A and B strided.
template <class T>
void check_small_m_rows_inside_large_m(const char* type)
{
    CAPTURE(type);
    const index_t m = 29, n = 130, k = 257, lda = k + 2;
    const auto wa = test::random_floats(sz(m * lda), 71);
    const MatrixView<const float> a = MatrixView<const float>(wa.data(), {m, lda}).slice(1, 1, k);
    const TypedB<T> b(n, k, k + 5, 72);
    const auto c0 = test::random_floats(sz(m * n), 73);
    on_1_and_2_threads([&] {
        for (bool accumulate : {false, true}) {
            CAPTURE(accumulate);
            auto whole = c0;
            foe::gemm::BatchInvariant::nt(a, b.view(), MatrixView<float>(whole.data(), {m, n}), accumulate);
            for (index_t count = 1; count <= bi::small_m_rows; ++count)
                for (index_t begin : {index_t{0}, index_t{3}, m - count}) {
                    CAPTURE(count);
                    CAPTURE(begin);
                    std::vector<float> part(c0.begin() + begin * n, c0.begin() + (begin + count) * n);
                    foe::gemm::BatchInvariant::nt(a.slice(0, begin, count), b.view(),
                                                  MatrixView<float>(part.data(), {count, n}), accumulate);
                    CHECK(same_bits(part.data(), whole.data() + begin * n, part.size()));
                }
        }
    });
}

}  // namespace

TEST_CASE("GEMM BatchInvariant small M and bf16 / fp16 B: every output the bits of its own FMA chain, every kernel set, 1 and 2 threads")
{
    check_chains_with_b_of<float>("fp32");
    check_chains_with_b_of<foe::bfloat16>("bf16");
    check_chains_with_b_of<foe::float16>("fp16");
}

TEST_CASE("GEMM BatchInvariant: rows on the small-M path have the bits of the same rows in a large-M product")
{
    check_small_m_rows_inside_large_m<float>("fp32");
    check_small_m_rows_inside_large_m<foe::bfloat16>("bf16");
    check_small_m_rows_inside_large_m<foe::float16>("fp16");
}

TEST_CASE("GEMM BatchInvariant with bf16 / fp16 B rejects bad shapes with InvalidArgument")
{
    const std::vector<float> a(64, 0.5f);
    std::vector<float> out(64, 0.5f);
    const std::vector<foe::bfloat16> bh(64, foe::bfloat16(0.25f));
    const std::vector<foe::float16> fh(64, foe::float16(0.25f));
    using CV = MatrixView<const float>;
    using V = MatrixView<float>;
    using BH = MatrixView<const foe::bfloat16>;
    using FH = MatrixView<const foe::float16>;
    CHECK_THROWS_AS(foe::gemm::BatchInvariant::nt(CV(a.data(), {2, 3}), BH(bh.data(), {4, 5}), V(out.data(), {2, 4}), false),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(foe::gemm::BatchInvariant::nt(CV(a.data(), {2, 3}), FH(fh.data(), {4, 3}), V(out.data(), {2, 5}), true),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(foe::gemm::BatchInvariant::nt(CV(a.data(), {2, 3}), BH(bh.data(), {4, 3}, {6, 2}), V(out.data(), {2, 4}), false),
                    foe::InvalidArgument);
    CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.5f; }));
}

#if defined(FOE_WITH_CBLAS)
TEST_CASE("GEMM Cblas matches the float64 oracle: dense and strided views, overwrite and accumulate")
{
    check_gemm_policy<foe::gemm::Cblas>("Cblas");
}

TEST_CASE("GEMM Cblas rejects bad shapes with InvalidArgument")
{
    check_gemm_bad_shapes<foe::gemm::Cblas>("Cblas");
}

TEST_CASE("GEMM Cblas: a row computed alone or in another batch agrees within 1e-6 relative, not bit for bit")
{
    // What a vendor BLAS gives: OpenBLAS picks kernels per CPU and per M, so a row's bits may
    // change with the batch around it (on Zen they do). The bound is fp32 rounding over K = 700.
    const index_t m = 203, n = 261, k = 700;
    const auto a = test::random_floats(sz(m * k), 61), b = test::random_floats(sz(n * k), 62);
    std::vector<float> whole(sz(m * n));
    foe::gemm::Cblas::nt({a.data(), {m, k}}, {b.data(), {n, k}}, {whole.data(), {m, n}}, false);
    for (index_t count : {1, 2, 5, 64}) {
        CAPTURE(count);
        std::vector<float> part(sz(count * n));
        foe::gemm::Cblas::nt({a.data() + 11 * k, {count, k}}, {b.data(), {n, k}}, {part.data(), {count, n}}, false);
        const std::vector<float> same_rows(whole.begin() + 11 * n, whole.begin() + (11 + count) * n);
        CHECK(oracle::relative_error(part, oracle::to_double(same_rows)) < 1e-6);
    }
}
#endif

// =============================================================================================
// RMSNorm
// =============================================================================================

TEST_CASE("rms_norm matches the float64 oracle for several row lengths: out of place, in place, strided rows")
{
    constexpr float eps = 1e-5f;
    const index_t rows = 5;
    std::uint64_t seed = 300;
    for (index_t n : {1, 2, 7, 64, 96, 129, 768}) {
        CAPTURE(n);
        const auto x = test::random_floats(sz(rows * n), ++seed);
        const auto w = random_in(sz(n), ++seed, 0.8f, 1.2f);
        const VectorView<const float> wv(w.data(), {n});
        const Vec expected = oracle::rms_norm(oracle::to_double(x), n, w, static_cast<double>(eps));

        std::vector<float> y(x.size(), nan_f);
        foe::ops::rms_norm(MatrixView<const float>(x.data(), {rows, n}), wv, eps, MatrixView<float>(y.data(), {rows, n}));
        CHECK(oracle::relative_error(y, expected) < 1e-6);

        // In place: the same operations, so the same bits.
        auto z = x;
        const MatrixView<float> zv(z.data(), {rows, n});
        foe::ops::rms_norm(zv, wv, eps, zv);
        CHECK(z == y);

        // Rows inside wider buffers; the padding of the output buffer stays NaN.
        const index_t ldx = n + 3, ldy = n + 5;
        std::vector<float> wx(sz(rows * ldx), 7.0f), wy(sz(rows * ldy), nan_f);
        for (index_t i = 0; i < rows; ++i) std::copy_n(&x[sz(i * n)], n, &wx[sz(i * ldx + 1)]);
        const MatrixView<float> ys = MatrixView<float>(wy.data(), {rows, ldy}).slice(1, 2, n);
        foe::ops::rms_norm(MatrixView<const float>(wx.data(), {rows, ldx}).slice(1, 1, n), wv, eps, ys);
        CHECK(dense_f(ys) == y);
        index_t written_outside = 0;
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < ldy; ++j)
                if ((j < 2 || j >= 2 + n) && !std::isnan(wy[sz(i * ldy + j)])) ++written_outside;
        CHECK(written_outside == 0);
    }
}

TEST_CASE("rms_norm rejects a weight or an output of the wrong shape")
{
    const auto x = test::random_floats(12, 1);
    const auto w = random_in(4, 2, 0.8f, 1.2f);
    std::vector<float> y(12);
    const MatrixView<const float> xv(x.data(), {3, 4});
    CHECK_THROWS_AS(foe::ops::rms_norm(xv, VectorView<const float>(w.data(), {3}), 1e-5f, MatrixView<float>(y.data(), {3, 4})),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(foe::ops::rms_norm(xv, VectorView<const float>(w.data(), {4}), 1e-5f, MatrixView<float>(y.data(), {4, 3})),
                    foe::InvalidArgument);
}

// =============================================================================================
// RoPE
// =============================================================================================

TEST_CASE("RoPE matches the float64 rotate-half oracle at positions up to 30000 within the float-angle bound")
{
    // The library forms the angle in float, as Hugging Face does: fl(pos * fl(theta^-fl(2j/D))).
    // With u = 2^-24 and e = 2j/D, the three roundings give a relative angle error of at most
    // (ln(theta) e + 2) u, so |d angle| <= pos theta^-e (ln(theta) e + 2) u <= 2 u pos (the
    // function of e is decreasing, and j = 0 is exact: inv_freq = 1 and pos < 2^24). A rotated
    // pair (a, b) with |a|, |b| < 1 moves by at most |(a, b)| |d angle| < 2 |d angle|, and cos/sin
    // rounded to float plus two products and a sum add a few u. Bound: (4 pos + 8) u per element;
    // at 30000 that is 7e-3 (measured there: up to 1.1e-3 at head_dim 96, so the bound is not idle).
    constexpr double u = 0x1.0p-24;
    const std::vector<index_t> positions{0, 1, 17, 1000, 30000};
    const index_t tokens = static_cast<index_t>(positions.size()), heads = 3;
    std::uint64_t seed = 400;
    for (double theta : {10000.0, 500000.0})
        for (index_t hd : {2, 16, 96}) {
            CAPTURE(theta);
            CAPTURE(hd);
            const foe::ops::Rope rope(hd, theta);
            CHECK(rope.head_dim() == hd);
            const auto x0 = test::random_floats(sz(tokens * heads * hd), ++seed);
            auto x = x0;
            rope.apply(TensorView<float, 3>(x.data(), {tokens, heads, hd}), positions);
            for (index_t t = 0; t < tokens; ++t) {
                const index_t pos = positions[sz(t)];
                CAPTURE(pos);
                const double bound = (4.0 * static_cast<double>(pos) + 8.0) * u;
                double worst = 0.0;
                for (index_t h = 0; h < heads; ++h) {
                    const std::size_t off = sz((t * heads + h) * hd);
                    Vec v(x0.begin() + static_cast<std::ptrdiff_t>(off), x0.begin() + static_cast<std::ptrdiff_t>(off) + hd);
                    oracle::rope(v.data(), hd, pos, theta);
                    for (index_t e = 0; e < hd; ++e) {
                        const double got = x[off + sz(e)];
                        worst = std::isfinite(got) ? std::max(worst, std::abs(got - v[sz(e)])) : inf_d;
                    }
                    if (pos == 0)  // cos 0 = 1, sin 0 = 0: the identity, exactly
                        CHECK(std::equal(x.begin() + static_cast<std::ptrdiff_t>(off),
                                         x.begin() + static_cast<std::ptrdiff_t>(off) + hd,
                                         x0.begin() + static_cast<std::ptrdiff_t>(off)));
                }
                CHECK_MESSAGE(worst <= bound, "max error ", worst, " exceeds the bound ", bound);
            }
        }
}

TEST_CASE("RoPE rejects an odd or non-positive head_dim and mismatched inputs")
{
    CHECK_THROWS_AS(foe::ops::Rope(3, 10000.0), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::ops::Rope(95, 10000.0), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::ops::Rope(0, 10000.0), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::ops::Rope(-2, 10000.0), foe::InvalidArgument);

    const foe::ops::Rope rope(8, 10000.0);
    auto x = test::random_floats(2 * 3 * 8, 5);
    const std::vector<index_t> two{0, 1}, three{0, 1, 2};
    CHECK_THROWS_AS(rope.apply(TensorView<float, 3>(x.data(), {2, 3, 8}), three), foe::InvalidArgument);
    CHECK_THROWS_AS(rope.apply(TensorView<float, 3>(x.data(), {2, 6, 4}), two), foe::InvalidArgument);
}

// =============================================================================================
// GQA attention with its KV cache
// =============================================================================================

namespace {

/// Owned random weights of one attention instance and the spec they fit. o_proj is a column
/// block of a twice-wider matrix, as a group's slice of the full o_proj is.
struct AttnFixture {
    foe::attention::AttentionSpec spec;
    std::vector<float> input_norm, q, k, v, o_wide, q_norm, k_norm;

    [[nodiscard]] index_t qw() const { return spec.q_heads * spec.head_dim; }
    [[nodiscard]] index_t kw() const { return spec.kv_heads * spec.head_dim; }
    [[nodiscard]] MatrixView<const float> o_view() const
    {
        return MatrixView<const float>(o_wide.data(), {spec.hidden_size, 2 * qw()}).slice(1, qw(), qw());
    }
    [[nodiscard]] foe::attention::AttentionWeights weights() const
    {
        const index_t d = spec.hidden_size;
        return {VectorView<const float>(input_norm.data(), {d}),
                MatrixView<const float>(q.data(), {qw(), d}),
                MatrixView<const float>(k.data(), {kw(), d}),
                MatrixView<const float>(v.data(), {kw(), d}),
                o_view(),
                VectorView<const float>(q_norm.data(), {static_cast<index_t>(q_norm.size())}),
                VectorView<const float>(k_norm.data(), {static_cast<index_t>(k_norm.size())})};
    }
};

AttnFixture make_attention(index_t d, index_t qh, index_t kh, index_t hd, QkNorm qk, index_t slots, index_t capacity,
                           std::uint64_t seed)
{
    AttnFixture f;
    f.spec = foe::attention::AttentionSpec{d, qh, kh, hd, qk, 1e-5f, 10000.0, slots, capacity};
    const double in_scale = 1.0 / std::sqrt(static_cast<double>(d));
    f.input_norm = random_in(sz(d), seed, 0.8f, 1.2f);
    f.q = random_scaled(sz(f.qw() * d), seed + 1, in_scale);
    f.k = random_scaled(sz(f.kw() * d), seed + 2, in_scale);
    f.v = random_scaled(sz(f.kw() * d), seed + 3, in_scale);
    f.o_wide = random_scaled(sz(d * 2 * f.qw()), seed + 4, 1.0 / std::sqrt(static_cast<double>(f.qw())));
    if (qk == QkNorm::per_head) {
        f.q_norm = random_in(sz(hd), seed + 5, 0.8f, 1.2f);
        f.k_norm = random_in(sz(hd), seed + 6, 0.8f, 1.2f);
    } else if (qk == QkNorm::full_width) {
        f.q_norm = random_in(sz(f.qw()), seed + 5, 0.8f, 1.2f);
        f.k_norm = random_in(sz(f.kw()), seed + 6, 0.8f, 1.2f);
    }
    return f;
}

/// Float64 attention of one sequence of s tokens at positions 0..s-1: [s, d].
Vec attention_oracle(const AttnFixture& f, const Vec& x, index_t s)
{
    const auto& sp = f.spec;
    const index_t d = sp.hidden_size, hd = sp.head_dim, qh = sp.q_heads, kh = sp.kv_heads;
    const double eps = static_cast<double>(sp.rms_norm_eps);
    const Vec xn = oracle::rms_norm(x, d, f.input_norm, eps);
    Vec q = oracle::matmul_nt(xn, s, d, f.q, qh * hd);
    Vec k = oracle::matmul_nt(xn, s, d, f.k, kh * hd);
    const Vec v = oracle::matmul_nt(xn, s, d, f.v, kh * hd);
    if (sp.qk_norm == QkNorm::full_width) {
        q = oracle::rms_norm(q, qh * hd, f.q_norm, eps);
        k = oracle::rms_norm(k, kh * hd, f.k_norm, eps);
    } else if (sp.qk_norm == QkNorm::per_head) {
        q = oracle::rms_norm(q, hd, f.q_norm, eps);
        k = oracle::rms_norm(k, hd, f.k_norm, eps);
    }
    for (index_t i = 0; i < s; ++i) {
        for (index_t h = 0; h < qh; ++h) oracle::rope(&q[sz((i * qh + h) * hd)], hd, i, sp.rope_theta);
        for (index_t h = 0; h < kh; ++h) oracle::rope(&k[sz((i * kh + h) * hd)], hd, i, sp.rope_theta);
    }
    Vec ctx(sz(s * qh * hd), 0.0);
    for (index_t i = 0; i < s; ++i)
        for (index_t h = 0; h < qh; ++h) {
            const index_t kv = h / (qh / kh);  // repeat_kv: consecutive query heads share a KV head
            Vec p(sz(i + 1));
            double mx = -inf_d, sum = 0.0;
            for (index_t j = 0; j <= i; ++j) {
                double dot = 0.0;
                for (index_t e = 0; e < hd; ++e) dot += q[sz((i * qh + h) * hd + e)] * k[sz((j * kh + kv) * hd + e)];
                p[sz(j)] = dot / std::sqrt(static_cast<double>(hd));
                mx = std::max(mx, p[sz(j)]);
            }
            for (auto& pj : p) sum += pj = std::exp(pj - mx);
            for (index_t j = 0; j <= i; ++j)
                for (index_t e = 0; e < hd; ++e)
                    ctx[sz((i * qh + h) * hd + e)] += p[sz(j)] / sum * v[sz((j * kh + kv) * hd + e)];
        }
    return oracle::matmul_nt(ctx, s, qh * hd, dense_f(f.o_view()), d);
}

/// Rows [row0, row0 + rows) of a [*, d] float matrix as doubles.
Vec rows_of(const std::vector<float>& m, index_t d, index_t row0, index_t rows)
{
    return Vec(m.begin() + static_cast<std::ptrdiff_t>(row0 * d), m.begin() + static_cast<std::ptrdiff_t>((row0 + rows) * d));
}

using Attention = foe::attention::GqaAttention<>;

/// Runs a fresh attention instance over one sequence prefill of x [s, d].
std::vector<float> prefill(const AttnFixture& f, const std::vector<float>& x, index_t s)
{
    Attention attn(f.spec, f.weights());
    std::vector<float> out(sz(s * f.spec.hidden_size), nan_f);
    attn.forward(foe::Batch::single(0, s), MatrixView<const float>(x.data(), {s, f.spec.hidden_size}),
                 MatrixView<float>(out.data(), {s, f.spec.hidden_size}));
    return out;
}

}  // namespace

TEST_CASE("GqaAttention prefill matches the float64 oracle: GQA ratios, head_dim 8 and 16, every QK-norm, 1 to 17 tokens")
{
    const index_t d = 24;
    std::uint64_t seed = 500;
    const std::pair<index_t, index_t> head_counts[] = {{1, 1}, {2, 1}, {4, 2}};
    for (const auto& heads : head_counts)
        for (index_t hd : {8, 16})
            for (QkNorm qk : {QkNorm::none, QkNorm::per_head, QkNorm::full_width})
                for (index_t tokens : {1, 5, 17}) {
                    const index_t qh = heads.first, kh = heads.second;
                    CAPTURE(qh);
                    CAPTURE(kh);
                    CAPTURE(hd);
                    CAPTURE(foe::to_string(qk));
                    CAPTURE(tokens);
                    const auto f = make_attention(d, qh, kh, hd, qk, 1, 20, seed += 10);
                    const auto x = test::random_floats(sz(tokens * d), seed + 9);
                    const auto out = prefill(f, x, tokens);
                    CHECK(oracle::relative_error(out, attention_oracle(f, oracle::to_double(x), tokens)) < 1e-5);
                }
}

TEST_CASE("GqaAttention decode steps after a prefill equal the last row of a longer prefill")
{
    const index_t d = 24, total = 10, first = 6;
    for (QkNorm qk : {QkNorm::none, QkNorm::per_head, QkNorm::full_width}) {
        CAPTURE(foe::to_string(qk));
        const auto f = make_attention(d, 4, 2, 16, qk, 1, 16, 600);
        const auto x = test::random_floats(sz(total * d), 601);
        const auto reference = prefill(f, x, total);

        Attention attn(f.spec, f.weights());
        std::vector<float> out(sz(first * d), nan_f);
        attn.forward(foe::Batch::single(0, first), MatrixView<const float>(x.data(), {first, d}),
                     MatrixView<float>(out.data(), {first, d}));
        CHECK(oracle::relative_error(out, rows_of(reference, d, 0, first)) < 1e-6);
        for (index_t t = first; t < total; ++t) {
            CAPTURE(t);
            std::vector<float> row(sz(d), nan_f);
            attn.forward(foe::Batch::single(t, 1), MatrixView<const float>(&x[sz(t * d)], {1, d}),
                         MatrixView<float>(row.data(), {1, d}));
            CHECK(oracle::relative_error(row, rows_of(reference, d, t, 1)) < 1e-5);
        }
    }
}

TEST_CASE("GqaAttention ragged batch of two sequences equals two separate runs, prefill then mixed continuation")
{
    const index_t d = 24;
    const auto f = make_attention(d, 4, 2, 8, QkNorm::per_head, 2, 16, 700);
    const auto x = test::random_floats(sz(7 * d), 701);

    Attention batched(f.spec, f.weights()), seq0(f.spec, f.weights()), seq1(f.spec, f.weights());
    std::vector<float> out(sz(7 * d), nan_f), out0(sz(3 * d), nan_f), out1(sz(4 * d), nan_f);
    batched.forward(foe::Batch({{0, 0, 3}, {1, 0, 4}}), MatrixView<const float>(x.data(), {7, d}),
                    MatrixView<float>(out.data(), {7, d}));
    seq0.forward(foe::Batch::single(0, 3), MatrixView<const float>(x.data(), {3, d}), MatrixView<float>(out0.data(), {3, d}));
    seq1.forward(foe::Batch::single(0, 4), MatrixView<const float>(&x[sz(3 * d)], {4, d}),
                 MatrixView<float>(out1.data(), {4, d}));
    CHECK(oracle::relative_error(rows_of(out, d, 0, 3), oracle::to_double(out0)) < 1e-6);
    CHECK(oracle::relative_error(rows_of(out, d, 3, 4), oracle::to_double(out1)) < 1e-6);
    CHECK(oracle::relative_error(out0, attention_oracle(f, rows_of(x, d, 0, 3), 3)) < 1e-5);
    CHECK(oracle::relative_error(out1, attention_oracle(f, rows_of(x, d, 3, 4), 4)) < 1e-5);

    // Continue: sequence 1 (slot 1) prefills 2 more tokens, sequence 0 (slot 0) decodes 1, listed
    // in that order so the batch order differs from the slot order.
    const auto y = test::random_floats(sz(3 * d), 702);
    std::vector<float> next(sz(3 * d), nan_f), next0(sz(d), nan_f), next1(sz(2 * d), nan_f);
    batched.forward(foe::Batch({{1, 4, 2}, {0, 3, 1}}), MatrixView<const float>(y.data(), {3, d}),
                    MatrixView<float>(next.data(), {3, d}));
    seq1.forward(foe::Batch::single(4, 2), MatrixView<const float>(y.data(), {2, d}), MatrixView<float>(next1.data(), {2, d}));
    seq0.forward(foe::Batch::single(3, 1), MatrixView<const float>(&y[sz(2 * d)], {1, d}),
                 MatrixView<float>(next0.data(), {1, d}));
    CHECK(oracle::relative_error(rows_of(next, d, 0, 2), oracle::to_double(next1)) < 1e-6);
    CHECK(oracle::relative_error(rows_of(next, d, 2, 1), oracle::to_double(next0)) < 1e-6);
}

TEST_CASE("GqaAttention rejects a chunk beyond the cache capacity and two chunks in one slot, leaving the cache intact")
{
    const index_t d = 24, capacity = 8;
    const auto f = make_attention(d, 2, 1, 8, QkNorm::none, 2, capacity, 800);
    const auto x = test::random_floats(sz(9 * d), 801);
    std::vector<float> out(sz(9 * d), nan_f);
    auto in = [&](index_t row0, index_t rows) { return MatrixView<const float>(&x[sz(row0 * d)], {rows, d}); };
    auto to = [&](index_t rows) { return MatrixView<float>(out.data(), {rows, d}); };

    Attention attn(f.spec, f.weights());
    CHECK_THROWS_WITH_AS(attn.forward(foe::Batch::single(0, 9), in(0, 9), to(9)), doctest::Contains("KV cache full"),
                         foe::CapacityError);
    attn.forward(foe::Batch::single(0, 6), in(0, 6), to(6));
    CHECK_THROWS_AS(attn.forward(foe::Batch::single(6, 3), in(6, 3), to(3)), foe::CapacityError);
    CHECK_THROWS_AS(attn.forward(foe::Batch({{0, 6, 1}, {0, 7, 1}}), in(6, 2), to(2)), foe::InvalidArgument);
    CHECK_THROWS_AS(attn.forward(foe::Batch::single(0, 1, 2), in(0, 1), to(1)), foe::InvalidArgument);  // slot 2 of 2

    // The rejected calls changed nothing: decoding position 6 still equals a 7-token prefill.
    attn.forward(foe::Batch::single(6, 1), in(6, 1), to(1));
    const auto reference = prefill(f, x, 7);
    CHECK(oracle::relative_error(std::vector<float>(out.begin(), out.begin() + d), rows_of(reference, d, 6, 1)) < 1e-5);
}

TEST_CASE("GqaAttention rejects an inconsistent spec with ConfigError and misshapen weights with InvalidArgument")
{
    const auto f = make_attention(24, 4, 2, 8, QkNorm::per_head, 1, 8, 850);
    auto spec = f.spec;
    spec.q_heads = 3;  // not a multiple of the 2 KV heads
    CHECK_THROWS_AS(Attention(spec, f.weights()), foe::ConfigError);
    spec = f.spec;
    spec.cache_slots = 0;
    CHECK_THROWS_AS(Attention(spec, f.weights()), foe::ConfigError);
    spec = f.spec;
    spec.cache_capacity = -1;  // must be rejected before the cache is sized from it
    CHECK_THROWS_AS(Attention(spec, f.weights()), foe::ConfigError);
    spec = f.spec;
    spec.qk_norm = QkNorm::full_width;  // the per-head norm weights are too short for it
    CHECK_THROWS_WITH_AS(Attention(spec, f.weights()), doctest::Contains("q_norm"), foe::InvalidArgument);
    auto w = f.weights();
    w.o_proj = MatrixView<const float>(f.o_wide.data(), {24, 2 * f.qw()});  // the full width, not the block
    CHECK_THROWS_WITH_AS(Attention(f.spec, w), doctest::Contains("o_proj"), foe::InvalidArgument);
}

// =============================================================================================
// Routing: Router<Score, Selection>
// =============================================================================================

namespace {

using foe::routing::GlobalTopK;
using foe::routing::PerGroupTopK;
using foe::routing::RoutingResult;
using foe::routing::RoutingSpec;
using foe::routing::Sigmoid;
using foe::routing::Softmax;

/// Float64 scores (the weights) and keys (what the selection ranks) of one token's logits.
template <class Score, class Selection>
RoutingResult route(const RoutingSpec& spec, const std::vector<float>& gate, const std::vector<float>& bias,
                    const std::vector<float>& u, index_t d)
{
    foe::routing::Router<Score, Selection> router(
        spec, MatrixView<const float>(gate.data(), {spec.num_experts, d}),
        bias.empty() ? VectorView<const float>{} : VectorView<const float>(bias.data(), {spec.num_experts}));
    RoutingResult r;
    router.route(MatrixView<const float>(u.data(), {static_cast<index_t>(u.size()) / d, d}), r);
    return r;
}

/// Checks r against the float64 scores for every token and held group: k/H distinct experts per
/// group inside its range, best key first, no better unselected expert, weights = scores
/// (renormalised per group when asked). Keys within 1e-6 count as ties (float vs double rounding).
void check_routing_result(const RoutingResult& r, const RoutingSpec& spec, bool softmax, const std::vector<float>& gate,
                          const std::vector<float>& bias, const std::vector<float>& u, index_t d)
{
    const index_t t = static_cast<index_t>(u.size()) / d, e_total = spec.num_experts;
    const index_t kpg = spec.top_k / spec.groups, per_group = e_total / spec.groups;
    const index_t held = spec.group_end - spec.group_begin;
    REQUIRE(r.tokens == t);
    REQUIRE(r.slots_per_group == kpg);
    REQUIRE(r.slots_per_token == held * kpg);
    REQUIRE(r.group_begin == spec.group_begin);
    REQUIRE(r.experts.size() == sz(t * held * kpg));
    REQUIRE(r.weights.size() == r.experts.size());
    constexpr double tol = 1e-6;
    const Vec logits = oracle::matmul_nt(oracle::to_double(u), t, d, gate, e_total);
    for (index_t i = 0; i < t; ++i) {
        CAPTURE(i);
        Vec scores, keys;
        oracle::score(softmax ? foe::ScoreFunction::softmax : foe::ScoreFunction::sigmoid, Vec(logits.begin() + i * e_total, logits.begin() + (i + 1) * e_total), bias, scores, keys);
        for (index_t g = 0; g < held; ++g) {
            const index_t group = spec.group_begin + g, lo = group * per_group, hi = lo + per_group;
            CAPTURE(group);
            std::set<index_t> chosen;
            double sum_scores = 0.0, sum_weights = 0.0;
            for (index_t s = 0; s < kpg; ++s) {
                const index_t e = r.expert(i, g * kpg + s);
                CAPTURE(s);
                CAPTURE(e);
                REQUIRE_MESSAGE((e >= lo && e < hi), "expert outside its group's range [", lo, ", ", hi, ")");
                CHECK_MESSAGE(chosen.insert(e).second, "expert chosen twice");
                if (s > 0) CHECK(keys[sz(r.expert(i, g * kpg + s - 1))] >= keys[sz(e)] - tol);
                sum_scores += scores[sz(e)];
                sum_weights += static_cast<double>(r.weight(i, g * kpg + s));
            }
            double worst_chosen = inf_d, best_other = -inf_d;
            for (index_t e = lo; e < hi; ++e) {
                if (chosen.count(e))
                    worst_chosen = std::min(worst_chosen, keys[sz(e)]);
                else
                    best_other = std::max(best_other, keys[sz(e)]);
            }
            CHECK_MESSAGE(worst_chosen >= best_other - tol, "an unselected expert has a larger key");
            for (index_t s = 0; s < kpg; ++s) {
                const index_t e = r.expert(i, g * kpg + s);
                const double want = spec.renormalize ? scores[sz(e)] / sum_scores : scores[sz(e)];
                CHECK_MESSAGE(std::abs(static_cast<double>(r.weight(i, g * kpg + s)) - want) < tol, "weight of slot ",
                              s, " (expert ", e, ")");
            }
            if (spec.renormalize) CHECK(std::abs(sum_weights - 1.0) < tol);
        }
    }
}

template <class Score, class Selection>
void check_router(index_t groups, index_t k, bool renormalize, std::uint64_t seed)
{
    constexpr bool softmax = std::is_same_v<Score, Softmax>;
    const index_t e = 16, d = 12, t = 9;
    CAPTURE(softmax);
    CAPTURE(Selection::per_group);
    CAPTURE(groups);
    CAPTURE(k);
    CAPTURE(renormalize);
    const RoutingSpec spec{e, k, groups, 0, groups, renormalize};
    const auto gate = test::random_floats(sz(e * d), seed), u = test::random_floats(sz(t * d), seed + 1);
    const auto r = route<Score, Selection>(spec, gate, {}, u, d);
    check_routing_result(r, spec, softmax, gate, {}, u, d);
}

/// Values in {0.25, 0.5, 0.75, 1}: dot products of a few of them are exact in float, whatever the
/// summation order, so equal gate rows give bit-equal logits under any GEMM policy.
std::vector<float> quarters(std::size_t n, std::uint64_t seed)
{
    auto v = test::random_floats(n, seed);
    for (auto& x : v) x = (std::floor((x + 1.0f) * 2.0f) + 1.0f) / 4.0f;
    return v;
}

}  // namespace

TEST_CASE("Router matches the float64 scores and selection: softmax and sigmoid, per-group top-k for H = 1 2 4, global top-k")
{
    std::uint64_t seed = 900;
    for (bool renorm : {false, true})
        for (index_t k : {4, 8}) {
            for (index_t h : {1, 2, 4}) {
                check_router<Softmax, PerGroupTopK>(h, k, renorm, seed += 2);
                check_router<Sigmoid, PerGroupTopK>(h, k, renorm, seed += 2);
            }
            check_router<Softmax, GlobalTopK>(1, k, renorm, seed += 2);
            check_router<Sigmoid, GlobalTopK>(1, k, renorm, seed += 2);
        }
}

TEST_CASE("Router breaks exact ties toward the lower expert index")
{
    // Rows 1, 4, 6 (group 0 of 2) and 9, 15 (group 1) are the same row r of positive quarters;
    // u is positive quarters too, so their logits are equal and >= 12/16; every other row is
    // +-1/32, whose logits are at most 12/32 in magnitude.
    const index_t e = 16, d = 12, t = 5;
    const auto u = quarters(sz(t * d), 1000), r = quarters(sz(d), 1001);
    auto gate = test::random_floats(sz(e * d), 1002);
    for (auto& x : gate) x = x < 0.0f ? -1.0f / 32.0f : 1.0f / 32.0f;
    for (index_t row : {1, 4, 6, 9, 15}) std::copy(r.begin(), r.end(), gate.begin() + row * d);

    auto check = [&](auto score, auto selection, index_t groups, index_t k, std::vector<std::int32_t> want) {
        using Score = decltype(score);
        using Selection = decltype(selection);
        const bool softmax = std::is_same_v<Score, Softmax>;
        CAPTURE(softmax);
        CAPTURE(groups);
        CAPTURE(k);
        const auto res = route<Score, Selection>(RoutingSpec{e, k, groups, 0, groups, false}, gate, {}, u, d);
        for (index_t i = 0; i < t; ++i) {
            CAPTURE(i);
            const std::vector<std::int32_t> got(res.experts.begin() + i * k, res.experts.begin() + (i + 1) * k);
            CHECK(got == want);
            for (index_t s = 1; s < k; ++s) CHECK(res.weight(i, s) == res.weight(i, 0));  // tied scores, bit-equal
        }
    };
    check(Softmax{}, PerGroupTopK{}, 2, 4, {1, 4, 9, 15});
    check(Sigmoid{}, PerGroupTopK{}, 2, 4, {1, 4, 9, 15});
    check(Softmax{}, PerGroupTopK{}, 2, 2, {1, 9});
    check(Sigmoid{}, PerGroupTopK{}, 4, 4, {1, 4, 9, 15});
    check(Softmax{}, GlobalTopK{}, 1, 4, {1, 4, 6, 9});
    check(Sigmoid{}, GlobalTopK{}, 1, 5, {1, 4, 6, 9, 15});
}

TEST_CASE("Router sigmoid bias changes the selection but not the weights, and softmax ignores a bias")
{
    const index_t e = 16, d = 12, t = 9;
    const auto gate = test::random_floats(sz(e * d), 1100), u = test::random_floats(sz(t * d), 1101);
    // Small random bias everywhere, +10 on experts 3 and 7 (group 0) and 12 and 13 (group 1).
    auto bias = random_scaled(sz(e), 1102, 0.01);
    for (index_t x : {3, 7, 12, 13}) bias[sz(x)] += 10.0f;

    for (bool renorm : {false, true}) {
        CAPTURE(renorm);
        const RoutingSpec spec{e, 4, 2, 0, 2, renorm};
        const auto plain = route<Sigmoid, PerGroupTopK>(spec, gate, {}, u, d);
        const auto biased = route<Sigmoid, PerGroupTopK>(spec, gate, bias, u, d);
        check_routing_result(biased, spec, false, gate, bias, u, d);
        index_t changed = 0;
        for (index_t i = 0; i < t; ++i) {
            CAPTURE(i);
            std::set<std::int32_t> g0{biased.expert(i, 0), biased.expert(i, 1)}, g1{biased.expert(i, 2), biased.expert(i, 3)};
            CHECK(g0 == std::set<std::int32_t>{3, 7});
            CHECK(g1 == std::set<std::int32_t>{12, 13});
            for (index_t s = 0; s < 4; ++s) changed += biased.expert(i, s) != plain.expert(i, s);
        }
        CHECK(changed > 0);

        const RoutingSpec sspec{e, 4, 2, 0, 2, renorm};
        const auto soft_plain = route<Softmax, PerGroupTopK>(sspec, gate, {}, u, d);
        const auto soft_biased = route<Softmax, PerGroupTopK>(sspec, gate, bias, u, d);
        CHECK(soft_plain.experts == soft_biased.experts);
        CHECK(soft_plain.weights == soft_biased.weights);
    }
}

TEST_CASE("Router never selects a NaN logit over a number and never crashes on NaN input")
{
    const index_t e = 16, d = 12, t = 6;
    auto gate = test::random_floats(sz(e * d), 1200);
    // NaN logits for experts 0 (first of group 0) and 13 (group 1): their gate rows are NaN.
    for (index_t row : {0, 13}) std::fill_n(gate.begin() + row * d, d, nan_f);
    auto u = test::random_floats(sz(t * d), 1201);

    auto check = [&](auto score, index_t groups, index_t k) {
        using Score = decltype(score);
        const bool softmax = std::is_same_v<Score, Softmax>;
        CAPTURE(softmax);
        CAPTURE(groups);
        CAPTURE(k);
        const auto r = route<Score, PerGroupTopK>(RoutingSpec{e, k, groups, 0, groups, false}, gate, {}, u, d);
        index_t nan_selected = 0, bad_weights = 0;
        for (index_t i = 0; i < t; ++i)
            for (index_t s = 0; s < k; ++s) {
                nan_selected += r.expert(i, s) == 0 || r.expert(i, s) == 13;
                bad_weights += !std::isfinite(r.weight(i, s));
            }
        CHECK_MESSAGE(nan_selected == 0, nan_selected, " of ", t * k, " slots picked a NaN-logit expert");
        CHECK_MESSAGE(bad_weights == 0, bad_weights, " of ", t * k, " selected weights are not finite");
    };
    for (index_t groups : {1, 2, 4}) {
        check(Softmax{}, groups, 4);
        check(Sigmoid{}, groups, 4);
    }

    // A token whose every logit is NaN (a NaN input row) still gets k/H distinct in-range experts.
    std::fill_n(u.begin() + 2 * d, d, nan_f);
    for (bool softmax : {true, false}) {
        CAPTURE(softmax);
        const RoutingSpec spec{e, 8, 4, 0, 4, true};
        const auto r = softmax ? route<Softmax, PerGroupTopK>(spec, gate, {}, u, d)
                               : route<Sigmoid, PerGroupTopK>(spec, gate, {}, u, d);
        for (index_t g = 0; g < 4; ++g) {
            const auto a = r.expert(2, 2 * g), b = r.expert(2, 2 * g + 1);
            CHECK(a != b);
            CHECK((a >= 4 * g && a < 4 * g + 4 && b >= 4 * g && b < 4 * g + 4));
        }
    }
}

TEST_CASE("Router with a held group subrange routes only those groups, as the full router does")
{
    const index_t e = 16, d = 12, t = 7;
    const auto gate = test::random_floats(sz(e * d), 1300), u = test::random_floats(sz(t * d), 1301);
    for (bool softmax : {true, false}) {
        CAPTURE(softmax);
        const RoutingSpec full{e, 8, 4, 0, 4, true}, part{e, 8, 4, 1, 3, true};
        const auto rf = softmax ? route<Softmax, PerGroupTopK>(full, gate, {}, u, d)
                                : route<Sigmoid, PerGroupTopK>(full, gate, {}, u, d);
        const auto rp = softmax ? route<Softmax, PerGroupTopK>(part, gate, {}, u, d)
                                : route<Sigmoid, PerGroupTopK>(part, gate, {}, u, d);
        check_routing_result(rp, part, softmax, gate, {}, u, d);
        REQUIRE(rp.slots_per_token == 4);
        CHECK(rp.group_begin == 1);
        for (index_t i = 0; i < t; ++i)
            for (index_t s = 0; s < 4; ++s) {
                CAPTURE(i);
                CAPTURE(s);
                CHECK(rp.expert(i, s) == rf.expert(i, 2 + s));  // groups 1 and 2 are slots 2..5 of the full result
                CHECK(rp.weight(i, s) == rf.weight(i, 2 + s));
            }
    }
}

TEST_CASE("Router rejects inconsistent configurations with ConfigError")
{
    const index_t e = 16, d = 12;
    const auto gate = test::random_floats(sz(e * d), 1400);
    const MatrixView<const float> g(gate.data(), {e, d});
    using SoftGlobal = foe::routing::Router<Softmax, GlobalTopK>;
    using SoftGroup = foe::routing::Router<Softmax, PerGroupTopK>;
    CHECK_THROWS_WITH_AS(SoftGlobal(RoutingSpec{e, 4, 2, 0, 2, false}, g, {}), doctest::Contains("PerGroupTopK"),
                         foe::ConfigError);
    CHECK_THROWS_WITH_AS(SoftGroup(RoutingSpec{e, 6, 4, 0, 4, false}, g, {}),
                         doctest::Contains("num_experts_per_tok (6) must be a positive multiple of num_expert_groups (4)"),
                         foe::ConfigError);
    CHECK_THROWS_AS(SoftGroup(RoutingSpec{e, 4, 3, 0, 3, false}, g, {}), foe::ConfigError);   // E % H != 0
    CHECK_THROWS_AS(SoftGroup(RoutingSpec{e, 20, 4, 0, 4, false}, g, {}), foe::ConfigError);  // k/H > E/H
    CHECK_THROWS_AS(SoftGroup(RoutingSpec{e, 4, 4, 2, 5, false}, g, {}), foe::ConfigError);   // groups outside [0, H)
    CHECK_THROWS_AS(SoftGroup(RoutingSpec{e, 4, 4, 2, 2, false}, g, {}), foe::ConfigError);   // no group held
    CHECK_THROWS_AS(SoftGroup(RoutingSpec{8, 4, 4, 0, 4, false}, g, {}), foe::InvalidArgument);  // gate has 16 rows
    const auto bias = random_scaled(sz(e - 1), 1401, 0.01);
    using SigGroup = foe::routing::Router<Sigmoid, PerGroupTopK>;
    CHECK_THROWS_AS(SigGroup(RoutingSpec{e, 4, 4, 0, 4, false}, g, VectorView<const float>(bias.data(), {e - 1})),
                    foe::InvalidArgument);
}

// =============================================================================================
// SwiGLU experts: compute over grouped tokens, and the weighted combine
// =============================================================================================

namespace {

using foe::experts::ExpertsSpec;
using foe::experts::ExpertWeights;

struct ExpertsFixture {
    index_t d = 0, f = 0;
    std::vector<std::vector<float>> gate, up, down;  // per expert, [f, d], [f, d], [d, f]

    [[nodiscard]] std::vector<ExpertWeights> views(index_t begin, index_t end) const
    {
        std::vector<ExpertWeights> w;
        for (index_t e = begin; e < end; ++e)
            w.push_back({MatrixView<const float>(gate[sz(e)].data(), {f, d}), MatrixView<const float>(up[sz(e)].data(), {f, d}),
                         MatrixView<const float>(down[sz(e)].data(), {d, f})});
        return w;
    }

    /// Float64 FFN_e(u) = down (silu(gate u) * (up u)).
    [[nodiscard]] Vec ffn(index_t e, const float* u) const
    {
        const Vec x(u, u + d);
        const Vec g = oracle::matmul_nt(x, 1, d, gate[sz(e)], f), v = oracle::matmul_nt(x, 1, d, up[sz(e)], f);
        Vec act(sz(f));
        for (std::size_t j = 0; j < act.size(); ++j) act[j] = oracle::silu(g[j]) * v[j];
        return oracle::matmul_nt(act, 1, f, down[sz(e)], d);
    }
};

ExpertsFixture make_experts(index_t n, index_t d, index_t f, std::uint64_t seed)
{
    ExpertsFixture x{d, f, {}, {}, {}};
    for (index_t e = 0; e < n; ++e) {
        const std::uint64_t s = seed + 3 * static_cast<std::uint64_t>(e);
        x.gate.push_back(random_scaled(sz(f * d), s, 2.0 / std::sqrt(static_cast<double>(d))));
        x.up.push_back(random_scaled(sz(f * d), s + 1, 2.0 / std::sqrt(static_cast<double>(d))));
        x.down.push_back(random_scaled(sz(d * f), s + 2, 1.0 / std::sqrt(static_cast<double>(f))));
    }
    return x;
}

RoutingResult make_routing(index_t tokens, index_t slots, std::vector<std::int32_t> experts, std::uint64_t seed)
{
    RoutingResult r;
    r.tokens = tokens;
    r.slots_per_token = r.slots_per_group = slots;
    r.experts = std::move(experts);
    r.weights = random_in(r.experts.size(), seed, 0.05f, 1.0f);
    REQUIRE(r.experts.size() == sz(tokens * slots));
    return r;
}

/// Runs SwiGluExperts holding [begin, end) over u and checks every row of y: held experts' rows
/// match the float64 FFN, the other rows keep their NaN poison; and the per-expert counts.
void check_experts(const ExpertsFixture& x, index_t begin, index_t end, const RoutingResult& r, const std::vector<float>& u)
{
    CAPTURE(begin);
    CAPTURE(end);
    const index_t d = x.d, pairs = r.tokens * r.slots_per_token;
    foe::experts::SwiGluExperts<> experts(ExpertsSpec{d, x.f, begin, end}, x.views(begin, end));
    std::vector<float> y(sz(pairs * d), nan_f);
    experts.compute(MatrixView<const float>(u.data(), {r.tokens, d}), r, MatrixView<float>(y.data(), {pairs, d}));

    std::vector<index_t> counts(sz(end - begin), 0);
    for (index_t p = 0; p < pairs; ++p) {
        const index_t e = r.experts[sz(p)];
        CAPTURE(p);
        CAPTURE(e);
        const auto first = y.begin() + p * d, last = first + d;
        if (e >= begin && e < end) {
            ++counts[sz(e - begin)];
            CHECK(oracle::relative_error(std::vector<float>(first, last), x.ffn(e, &u[sz(p / r.slots_per_token * d)])) < 1e-5);
        } else {
            CHECK_MESSAGE(std::all_of(first, last, [](float v) { return std::isnan(v); }),
                          "row of an unheld expert was written");
        }
    }
    CHECK(experts.tokens_per_expert() == counts);
}

}  // namespace

TEST_CASE("SwiGluExperts compute matches the float64 FFN: random routing over all experts and a held subrange")
{
    const index_t n = 8, d = 13, f = 21, t = 7, slots = 3;
    const auto x = make_experts(n, d, f, 1500);
    const auto u = test::random_floats(sz(t * d), 1501);
    // Three distinct random experts per token.
    std::vector<std::int32_t> ids;
    const foe::CounterRng rng(1502, 1);
    std::uint64_t draw = 0;
    for (index_t i = 0; i < t; ++i) {
        std::vector<std::int32_t> mine;
        while (static_cast<index_t>(mine.size()) < slots) {
            const auto e = static_cast<std::int32_t>(rng.bits(draw++) % static_cast<std::uint64_t>(n));
            if (std::find(mine.begin(), mine.end(), e) == mine.end()) mine.push_back(e);
        }
        ids.insert(ids.end(), mine.begin(), mine.end());
    }
    const auto r = make_routing(t, slots, ids, 1503);
    check_experts(x, 0, n, r, u);
    check_experts(x, 2, 6, r, u);
}

TEST_CASE("SwiGluExperts compute: every token on one expert, idle experts, a single token")
{
    const index_t n = 8, d = 13, f = 21;
    const auto x = make_experts(n, d, f, 1600);
    SUBCASE("all tokens routed to expert 3")
    {
        const index_t t = 6;
        const auto u = test::random_floats(sz(t * d), 1601);
        const auto r = make_routing(t, 1, std::vector<std::int32_t>(sz(t), 3), 1602);
        check_experts(x, 0, n, r, u);
        check_experts(x, 2, 6, r, u);
        check_experts(x, 4, 8, r, u);  // holds none of the routed experts: y stays NaN
    }
    SUBCASE("only experts 1 and 4 receive tokens")
    {
        const index_t t = 5;
        const auto u = test::random_floats(sz(t * d), 1603);
        std::vector<std::int32_t> ids;
        for (index_t i = 0; i < t; ++i) {
            ids.push_back(i % 2 == 0 ? 1 : 4);
            ids.push_back(i % 2 == 0 ? 4 : 1);
        }
        const auto r = make_routing(t, 2, ids, 1604);
        check_experts(x, 0, n, r, u);
        check_experts(x, 2, 6, r, u);
    }
    SUBCASE("one token")
    {
        const auto u = test::random_floats(sz(d), 1605);
        const auto r = make_routing(1, 2, {5, 2}, 1606);
        check_experts(x, 0, n, r, u);
        check_experts(x, 2, 6, r, u);
        check_experts(x, 3, 6, r, u);
    }
}

TEST_CASE("SwiGluExperts combine matches the float64 weighted sum over a slot range")
{
    const index_t t = 5, slots = 4, d = 13;
    const auto r = make_routing(t, slots, std::vector<std::int32_t>(sz(t * slots), 0), 1700);
    const auto y = test::random_floats(sz(t * slots * d), 1701), res = test::random_floats(sz(t * d), 1702);
    const MatrixView<const float> yv(y.data(), {t * slots, d}), rv(res.data(), {t, d});
    const std::pair<index_t, index_t> ranges[] = {{0, 4}, {1, 2}, {3, 1}, {2, 0}};
    for (const auto& range : ranges) {
        const index_t first = range.first, count = range.second;
        CAPTURE(first);
        CAPTURE(count);
        Vec expected(sz(t * d));
        for (index_t i = 0; i < t; ++i)
            for (index_t j = 0; j < d; ++j) {
                double acc = res[sz(i * d + j)];
                for (index_t s = first; s < first + count; ++s)
                    acc += static_cast<double>(r.weight(i, s)) * y[sz((i * slots + s) * d + j)];
                expected[sz(i * d + j)] = acc;
            }
        std::vector<float> out(sz(t * d), nan_f);
        foe::experts::SwiGluExperts<>::combine(r, yv, rv, first, count, MatrixView<float>(out.data(), {t, d}));
        CHECK(oracle::relative_error(out, expected) < 1e-6);
    }
    std::vector<float> out(sz(t * d));
    CHECK_THROWS_AS(foe::experts::SwiGluExperts<>::combine(r, yv, rv, 3, 2, MatrixView<float>(out.data(), {t, d})),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(foe::experts::SwiGluExperts<>::combine(r, yv, rv, -1, 1, MatrixView<float>(out.data(), {t, d})),
                    foe::InvalidArgument);
    // y narrower than the residual rows: combine would read past each y row. (The view lies inside
    // y's buffer, so a missing check shows as a failed CHECK rather than an out-of-bounds read.)
    CHECK_THROWS_AS(foe::experts::SwiGluExperts<>::combine(r, MatrixView<const float>(y.data(), {t * slots, d - 1}), rv,
                                                           0, slots, MatrixView<float>(out.data(), {t, d})),
                    foe::InvalidArgument);
}

// =============================================================================================
// GEMM edge case: empty extents. Last in the file on purpose: a policy that indexes element
// (i, 0) of a K = 0 operand fails an assertion here and aborts the executable (UB under NDEBUG),
// and doctest runs test cases in file order.
// =============================================================================================

namespace {

template <class G>
void check_gemm_empty(const char* policy)
{
    CAPTURE(policy);
    const GemmShape shapes[] = {{3, 4, 0}, {0, 4, 3}, {3, 0, 5}, {0, 0, 0}};
    for (const auto& s : shapes)
        for (bool accumulate : {false, true}) {
            const index_t m = s.m, n = s.n, k = s.k;  // no structured bindings: doctest's lambdas capture these
            CAPTURE(m);
            CAPTURE(n);
            CAPTURE(k);
            CAPTURE(accumulate);
            const std::vector<float> a(sz(m * k), 0.5f), b(sz(n * k), 0.25f);
            const auto c0 = test::random_floats(sz(m * n), 1800);
            auto c = c0;
            G::nt(MatrixView<const float>(a.data(), {m, k}), MatrixView<const float>(b.data(), {n, k}),
                  MatrixView<float>(c.data(), {m, n}), accumulate);
            // An empty sum: C = 0, or C unchanged when accumulating.
            CHECK((accumulate ? c == c0 : std::all_of(c.begin(), c.end(), [](float x) { return x == 0.0f; })));
        }
}

}  // namespace

#if defined(FOE_WITH_CBLAS)
TEST_CASE("GEMM Cblas with an empty extent: K = 0 gives C = 0 or leaves C as it was")
{
    check_gemm_empty<foe::gemm::Cblas>("Cblas");
}
#endif

TEST_CASE("GEMM BatchInvariant with an empty extent: K = 0 gives C = 0 or leaves C as it was")
{
    check_gemm_empty<foe::gemm::BatchInvariant>("BatchInvariant");
    check_gemm_empty<BatchInvariantPortable>("portable kernels");
}
