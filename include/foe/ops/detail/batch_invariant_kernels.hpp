#pragma once
// The packing routine and register-tile kernels of gemm::BatchInvariant, in two versions: AVX2
// with FMA (chosen at run time on x86 CPUs that have it) and portable C++ (std::fma). Both
// compute every output with the same operations in the same order, so they give the same bits:
//
//   c[i][j] = accumulate ? c[i][j] : 0;   for k = 0 .. K-1:  c[i][j] = fma(a[i][k], b[j][k], c[i][j])
//
// one rounding per k, one sequential chain per output. Blocking only decides when the running
// value is parked in C between blocks of K (an exact fp32 store and reload), never the order.
//
// B may also hold bf16 or fp16 weights. Widening either to fp32 is exact, so the kernels widen
// while they read B (when packing, or in registers on the small-M path) and the chain is the one
// of the fp32 widened B, bit for bit.
//
// Two ways through: the blocked path (pack a panel of B, then the register tile) for any M, and
// the small-M path (a decode step: a few rows of A against the whole of B), which streams every
// row of B once without packing: 8 rows of B by 8 steps of K are loaded, transposed in registers
// and fed to 8 independent lanes, lane j running output j's chain over k in order.

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "foe/core/half.hpp"
#include "foe/core/types.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#include <immintrin.h>
#define FOE_GEMM_HAS_AVX2_KERNELS 1
// GCC and clang compile these functions for AVX2+FMA whatever the translation unit's -march;
// they run only where the CPU reports both (see kernels_for_this_cpu()).
#define FOE_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
// The kernels that read B of any element type, fp16 included (F16C's vcvtph2ps). GCC and clang
// give a template one target for all its instantiations, so their fp32 and bf16 versions carry
// f16c too; none of them runs unless the CPU reports all three.
#define FOE_TARGET_AVX2_FMA_F16C __attribute__((target("avx2,fma,f16c")))
#endif

namespace foe::gemm::detail::bi {

/// Register tile: mr rows of A by nr columns (rows of B). 6 x 16 keeps 12 accumulators, two B
/// vectors and one broadcast in the 16 AVX2 registers (the BLIS Haswell/Zen shape).
inline constexpr index_t mr = 6;
inline constexpr index_t nr = 16;
/// Cache blocking: a packed block of nc rows of B by kc of K (128 KiB) and mc rows of A by kc
/// (96 KiB) stay in L2; each 16-row panel of B (16 KiB) stays in L1 while the 6-row strips of A
/// stream past it. Fixed at compile time; the results do not depend on them.
inline constexpr index_t kc = 256;
inline constexpr index_t nc = 128;
inline constexpr index_t mc = 96;
static_assert(nc % nr == 0 && mc % mr == 0);

/// Packs rows [0, n_valid) of B (row stride ldb), columns [0, depth), as depth groups of nr
/// floats: bp[k * nr + j] = b[j][k] (widened to fp32); columns j >= n_valid are zero.
template <class BElem>
using PackAsFn = void (*)(const BElem* b, index_t ldb, index_t n_valid, index_t depth, float* bp);
using PackFn = PackAsFn<float>;
/// Register tile over `depth` steps of K: rows of A a[r * lda + k] (r < rows <= mr), the packed
/// panel bp, and a full mr x nr (rows x nr) tile of C with row stride ldc; load_c starts every
/// chain from C, otherwise from zero.
using TileFn = void (*)(index_t rows, index_t depth, const float* a, index_t lda, const float* bp, float* c,
                        index_t ldc, bool load_c);
/// The small-M path over columns [0, n): rows (1 .. small_m_rows) of A a[i * lda + k], all of
/// K (k >= 1), rows of B b[j * ldb + k], C c[i * ldc + j]; accumulate starts every chain from C.
template <class BElem>
using SmallMFn = void (*)(index_t rows, index_t n, index_t k, const float* a, index_t lda, const BElem* b,
                          index_t ldb, float* c, index_t ldc, bool accumulate);

/// At most this many rows of A take the small-M path (bench_kernels gemm_pair/decode: at 2048 x
/// 2048 it is ahead of packing up to 4 rows).
inline constexpr index_t small_m_rows = 4;

/// What a kernel set does with one element type of B. A null small_m: the blocked path for every M.
template <class BElem>
struct BKernels {
    PackAsFn<BElem> pack;
    SmallMFn<BElem> small_m;
};

struct Kernels {
    PackFn pack;
    TileFn tile;
    const char* name;
    SmallMFn<float> small_m;  // null: the blocked path for every M
    BKernels<bfloat16> bf16;
    BKernels<float16> f16;

    template <class BElem>
    [[nodiscard]] constexpr BKernels<BElem> for_b() const noexcept
    {
        if constexpr (std::is_same_v<BElem, float>)
            return {pack, small_m};
        else if constexpr (std::is_same_v<BElem, bfloat16>)
            return bf16;
        else {
            static_assert(std::is_same_v<BElem, float16>, "B is fp32, bf16 or fp16");
            return f16;
        }
    }
};

/// An element of B as fp32 (exact for all three types).
template <class BElem>
[[nodiscard]] inline float widen(BElem x) noexcept
{
    if constexpr (std::is_same_v<BElem, float>)
        return x;
    else
        return static_cast<float>(x);
}

// --- portable ------------------------------------------------------------------------------

template <class BElem>
void pack_portable(const BElem* b, index_t ldb, index_t n_valid, index_t depth, float* bp)
{
    for (index_t j = 0; j < nr; ++j) {
        const BElem* row = b + j * ldb;
        if (j < n_valid)
            for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = widen(row[k]);
        else
            for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = 0.0f;
    }
}

template <int Rows>
void tile_portable_rows(index_t depth, const float* a, index_t lda, const float* bp, float* c, index_t ldc, bool load_c)
{
    float acc[Rows][nr];
    for (int r = 0; r < Rows; ++r)
        for (index_t j = 0; j < nr; ++j) acc[r][j] = load_c ? c[r * ldc + j] : 0.0f;
    for (index_t k = 0; k < depth; ++k) {
        const float* bk = bp + k * nr;
        for (int r = 0; r < Rows; ++r) {
            const float ar = a[r * lda + k];
            for (index_t j = 0; j < nr; ++j) acc[r][j] = std::fma(ar, bk[j], acc[r][j]);
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (index_t j = 0; j < nr; ++j) c[r * ldc + j] = acc[r][j];
}

inline void tile_portable(index_t rows, index_t depth, const float* a, index_t lda, const float* bp, float* c,
                          index_t ldc, bool load_c)
{
    switch (rows) {
    case 1: tile_portable_rows<1>(depth, a, lda, bp, c, ldc, load_c); break;
    case 2: tile_portable_rows<2>(depth, a, lda, bp, c, ldc, load_c); break;
    case 3: tile_portable_rows<3>(depth, a, lda, bp, c, ldc, load_c); break;
    case 4: tile_portable_rows<4>(depth, a, lda, bp, c, ldc, load_c); break;
    case 5: tile_portable_rows<5>(depth, a, lda, bp, c, ldc, load_c); break;
    default: tile_portable_rows<6>(depth, a, lda, bp, c, ldc, load_c); break;
    }
}

/// The small-M path, portable: 8 columns at a time, every output its own chain over k in order.
template <class BElem>
void small_m_portable(index_t rows, index_t n, index_t k, const float* a, index_t lda, const BElem* b, index_t ldb,
                      float* c, index_t ldc, bool accumulate)
{
    for (index_t j0 = 0; j0 < n; j0 += 8) {
        const index_t cols = std::min<index_t>(8, n - j0);
        float acc[small_m_rows][8];
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) acc[i][j] = accumulate ? c[i * ldc + j0 + j] : 0.0f;
        for (index_t p = 0; p < k; ++p)
            for (index_t j = 0; j < cols; ++j) {
                const float bjp = widen(b[(j0 + j) * ldb + p]);
                for (index_t i = 0; i < rows; ++i) acc[i][j] = std::fma(a[i * lda + p], bjp, acc[i][j]);
            }
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) c[i * ldc + j0 + j] = acc[i][j];
    }
}

inline constexpr Kernels portable_kernels{pack_portable<float>,
                                          tile_portable,
                                          "portable (std::fma)",
                                          small_m_portable<float>,
                                          {pack_portable<bfloat16>, small_m_portable<bfloat16>},
                                          {pack_portable<float16>, small_m_portable<float16>}};

// --- AVX2 + FMA ------------------------------------------------------------------------------

#if defined(FOE_GEMM_HAS_AVX2_KERNELS)

/// Transposes the 8 x 8 block held in r[0..7] (r[i] = row i) in place.
FOE_TARGET_AVX2_FMA inline void transpose8(__m256 r[8])
{
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/// The same layout as pack_portable; full groups of 8 rows by 8 columns are transposed in
/// registers (a decode step packs every weight it reads, so packing runs at memory speed).
FOE_TARGET_AVX2_FMA inline void pack_avx2(const float* b, index_t ldb, index_t n_valid, index_t depth, float* bp)
{
    for (index_t j0 = 0; j0 < nr; j0 += 8) {
        if (j0 + 8 > n_valid) {  // a partial group of rows: element by element, zeros past n_valid
            for (index_t j = j0; j < j0 + 8; ++j) {
                const float* row = b + j * ldb;
                if (j < n_valid)
                    for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = row[k];
                else
                    for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = 0.0f;
            }
            continue;
        }
        index_t k = 0;
        for (; k + 8 <= depth; k += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(b + (j0 + i) * ldb + k);
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(bp + (k + i) * nr + j0, r[i]);
        }
        for (; k < depth; ++k)
            for (index_t j = j0; j < j0 + 8; ++j) bp[k * nr + j] = b[j * ldb + k];
    }
}

/// One row of the register tile, one step of K: lo/hi (columns 0-7 and 8-15) += a[r][k] * b[k].
FOE_TARGET_AVX2_FMA __attribute__((always_inline)) inline void fma_row(const float* ark, __m256 b0, __m256 b1,
                                                                       __m256& lo, __m256& hi)
{
    const __m256 x = _mm256_broadcast_ss(ark);
    lo = _mm256_fmadd_ps(x, b0, lo);
    hi = _mm256_fmadd_ps(x, b1, hi);
}

FOE_TARGET_AVX2_FMA __attribute__((always_inline)) inline void load_row(const float* cr, bool load_c, __m256& lo,
                                                                        __m256& hi)
{
    lo = load_c ? _mm256_loadu_ps(cr) : _mm256_setzero_ps();
    hi = load_c ? _mm256_loadu_ps(cr + 8) : _mm256_setzero_ps();
}

FOE_TARGET_AVX2_FMA __attribute__((always_inline)) inline void store_row(float* cr, __m256 lo, __m256 hi)
{
    _mm256_storeu_ps(cr, lo);
    _mm256_storeu_ps(cr + 8, hi);
}

/// The rows are written out, not looped over: the 12 accumulators must be 12 named registers,
/// and an unroll pragma is not honoured by every compiler that sees this header (nvcc's host
/// pass drops it, and the accumulators then live on the stack at a third of the speed).
template <int Rows>
FOE_TARGET_AVX2_FMA void tile_avx2_rows(index_t depth, const float* a, index_t lda, const float* bp, float* c,
                                        index_t ldc, bool load_c)
{
    static_assert(Rows >= 1 && Rows <= mr);
    __m256 l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5;
    load_row(c, load_c, l0, h0);
    if constexpr (Rows > 1) load_row(c + ldc, load_c, l1, h1);
    if constexpr (Rows > 2) load_row(c + 2 * ldc, load_c, l2, h2);
    if constexpr (Rows > 3) load_row(c + 3 * ldc, load_c, l3, h3);
    if constexpr (Rows > 4) load_row(c + 4 * ldc, load_c, l4, h4);
    if constexpr (Rows > 5) load_row(c + 5 * ldc, load_c, l5, h5);
    for (index_t k = 0; k < depth; ++k) {
        const __m256 b0 = _mm256_loadu_ps(bp + k * nr), b1 = _mm256_loadu_ps(bp + k * nr + 8);
        fma_row(a + k, b0, b1, l0, h0);
        if constexpr (Rows > 1) fma_row(a + lda + k, b0, b1, l1, h1);
        if constexpr (Rows > 2) fma_row(a + 2 * lda + k, b0, b1, l2, h2);
        if constexpr (Rows > 3) fma_row(a + 3 * lda + k, b0, b1, l3, h3);
        if constexpr (Rows > 4) fma_row(a + 4 * lda + k, b0, b1, l4, h4);
        if constexpr (Rows > 5) fma_row(a + 5 * lda + k, b0, b1, l5, h5);
    }
    store_row(c, l0, h0);
    if constexpr (Rows > 1) store_row(c + ldc, l1, h1);
    if constexpr (Rows > 2) store_row(c + 2 * ldc, l2, h2);
    if constexpr (Rows > 3) store_row(c + 3 * ldc, l3, h3);
    if constexpr (Rows > 4) store_row(c + 4 * ldc, l4, h4);
    if constexpr (Rows > 5) store_row(c + 5 * ldc, l5, h5);
}

FOE_TARGET_AVX2_FMA inline void tile_avx2(index_t rows, index_t depth, const float* a, index_t lda, const float* bp,
                                          float* c, index_t ldc, bool load_c)
{
    switch (rows) {
    case 1: tile_avx2_rows<1>(depth, a, lda, bp, c, ldc, load_c); break;
    case 2: tile_avx2_rows<2>(depth, a, lda, bp, c, ldc, load_c); break;
    case 3: tile_avx2_rows<3>(depth, a, lda, bp, c, ldc, load_c); break;
    case 4: tile_avx2_rows<4>(depth, a, lda, bp, c, ldc, load_c); break;
    case 5: tile_avx2_rows<5>(depth, a, lda, bp, c, ldc, load_c); break;
    default: tile_avx2_rows<6>(depth, a, lda, bp, c, ldc, load_c); break;
    }
}

/// 8 consecutive elements of B at p, widened to fp32: bf16 is the top half of an fp32 (zero-extend,
/// shift left by 16), fp16 goes through F16C. Both exact.
template <class BElem>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline __m256 load8_widened(const BElem* p)
{
    if constexpr (std::is_same_v<BElem, float>)
        return _mm256_loadu_ps(p);
    else if constexpr (std::is_same_v<BElem, bfloat16>)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    else
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

/// pack_avx2 for 16-bit B: each group of 8 rows by 8 columns is widened, transposed and stored.
template <class BElem>
FOE_TARGET_AVX2_FMA_F16C void pack_avx2_widening(const BElem* b, index_t ldb, index_t n_valid, index_t depth,
                                                 float* bp)
{
    for (index_t j0 = 0; j0 < nr; j0 += 8) {
        if (j0 + 8 > n_valid) {  // a partial group of rows: element by element, zeros past n_valid
            for (index_t j = j0; j < j0 + 8; ++j) {
                const BElem* row = b + j * ldb;
                if (j < n_valid)
                    for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = widen(row[k]);
                else
                    for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = 0.0f;
            }
            continue;
        }
        index_t k = 0;
        for (; k + 8 <= depth; k += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = load8_widened(b + (j0 + i) * ldb + k);
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(bp + (k + i) * nr + j0, r[i]);
        }
        for (; k < depth; ++k)
            for (index_t j = j0; j < j0 + 8; ++j) bp[k * nr + j] = widen(b[j * ldb + k]);
    }
}

/// 8 rows of B for the small-M path: row j at b + j * ldb; in the last, partial group of columns
/// (Partial), rows past `last` read row `last` again (in bounds; their lanes are dropped).
template <class BElem, bool Partial>
struct EightRows {
    const BElem* b;
    index_t ldb, last;
    [[nodiscard]] const BElem* operator()(int j) const noexcept
    {
        return b + (Partial ? std::min<index_t>(j, last) : j) * ldb;
    }
};

/// Two in-lane 4 x 4 transposes: lane l of q[0..3] holds rows 4 l .. 4 l + 3 of four columns of
/// K; afterwards q[t] holds column t of those rows, rows 0-3 in the low lane and 4-7 in the high.
FOE_TARGET_AVX2_FMA __attribute__((always_inline)) inline void transpose4_in_lanes(__m256 q[4])
{
    const __m256 t0 = _mm256_unpacklo_ps(q[0], q[1]), t1 = _mm256_unpackhi_ps(q[0], q[1]);
    const __m256 t2 = _mm256_unpacklo_ps(q[2], q[3]), t3 = _mm256_unpackhi_ps(q[2], q[3]);
    q[0] = _mm256_shuffle_ps(t0, t2, 0x44);
    q[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    q[2] = _mm256_shuffle_ps(t1, t3, 0x44);
    q[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

/// r[t] = b[j][p + t] for j = 0..7 (the 8 x 8 block of rows(0..7) from column p, transposed and
/// widened). fp32 and bf16 load row j and row j + 4 into the two lanes of one register, so that
/// two in-lane 4 x 4 transposes finish the job (16 shuffles instead of transpose8's 24); bf16
/// widens by interleaving zeros below its 16 bits. fp16 converts whole rows and uses transpose8.
template <class BElem, bool Partial>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline void load_transposed(EightRows<BElem, Partial> rows,
                                                                                  index_t p, __m256 r[8])
{
    if constexpr (std::is_same_v<BElem, float>) {
        for (int j = 0; j < 4; ++j) {
            r[j] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(rows(j) + p)), _mm_loadu_ps(rows(j + 4) + p), 1);
            r[j + 4] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(rows(j) + p + 4)),
                                            _mm_loadu_ps(rows(j + 4) + p + 4), 1);
        }
    } else if constexpr (std::is_same_v<BElem, bfloat16>) {
        const __m256i zero = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows(j) + p))),
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows(j + 4) + p)), 1);
            r[j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
            r[j + 4] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
        }
    } else {
        for (int j = 0; j < 8; ++j) r[j] = load8_widened(rows(j) + p);
        transpose8(r);
        return;
    }
    transpose4_in_lanes(r);
    transpose4_in_lanes(r + 4);
}

/// One step of the small-M path: 8 rows of B by 8 columns of K from p are loaded, widened and
/// transposed, so that vector t holds b[j][p + t] for j = 0..7, and 8 FMAs in the order
/// t = 0..7 advance every lane of acc[i] (output (i, j)) by 8 steps of its chain.
template <class BElem, int Rows, bool Partial>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline void small_m_step(const float* a, index_t lda,
                                                                               EightRows<BElem, Partial> rows,
                                                                               index_t p, __m256 (&acc)[Rows])
{
    __m256 r[8];
    load_transposed(rows, p, r);
    for (int t = 0; t < 8; ++t)
        for (int i = 0; i < Rows; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + p + t), r[t], acc[i]);
}

/// One step of K for the last k % 8 columns: b[j][p] gathered for j = 0..7.
template <class BElem, int Rows, bool Partial>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline void small_m_step1(const float* a, index_t lda,
                                                                                EightRows<BElem, Partial> rows,
                                                                                index_t p, __m256 (&acc)[Rows])
{
    const __m256 bp = _mm256_setr_ps(widen(rows(0)[p]), widen(rows(1)[p]), widen(rows(2)[p]), widen(rows(3)[p]),
                                     widen(rows(4)[p]), widen(rows(5)[p]), widen(rows(6)[p]), widen(rows(7)[p]));
    for (int i = 0; i < Rows; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + p), bp, acc[i]);
}

/// Starts Rows chains of 8 outputs (cols of them valid) from C or from zero.
template <int Rows>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline void small_m_load(const float* c, index_t ldc,
                                                                               index_t cols, bool accumulate,
                                                                               __m256 (&acc)[Rows])
{
    for (int i = 0; i < Rows; ++i) {
        if (!accumulate) {
            acc[i] = _mm256_setzero_ps();
        } else if (cols >= 8) {
            acc[i] = _mm256_loadu_ps(c + i * ldc);
        } else {
            alignas(32) float edge[8] = {};
            std::copy_n(c + i * ldc, cols, edge);
            acc[i] = _mm256_load_ps(edge);
        }
    }
}

template <int Rows>
FOE_TARGET_AVX2_FMA_F16C __attribute__((always_inline)) inline void small_m_store(const __m256 (&acc)[Rows], float* c,
                                                                                index_t ldc, index_t cols)
{
    for (int i = 0; i < Rows; ++i) {
        if (cols >= 8) {
            _mm256_storeu_ps(c + i * ldc, acc[i]);
        } else {
            alignas(32) float edge[8];
            _mm256_store_ps(edge, acc[i]);
            std::copy_n(edge, cols, c + i * ldc);
        }
    }
}

/// The small-M path on 8 columns (cols of them valid, 1 .. 8) and Rows rows of A: lane j of
/// acc[i] is output (i, j), one chain over k in order, so the bits of the packed tile's.
template <class BElem, int Rows, bool Partial>
FOE_TARGET_AVX2_FMA_F16C void small_m_avx2_8(index_t k, const float* a, index_t lda, const BElem* b, index_t ldb,
                                             index_t cols, float* c, index_t ldc, bool accumulate)
{
    const EightRows<BElem, Partial> rows{b, ldb, cols - 1};
    __m256 acc[Rows];
    small_m_load<Rows>(c, ldc, cols, accumulate, acc);
    const index_t k8 = k / 8 * 8;
    for (index_t p = 0; p < k8; p += 8) small_m_step<BElem, Rows>(a, lda, rows, p, acc);
    for (index_t p = k8; p < k; ++p) small_m_step1<BElem, Rows>(a, lda, rows, p, acc);
    small_m_store<Rows>(acc, c, ldc, cols);
}

/// The same on 16 columns, as two groups of 8: twice the independent chains (M = 1 is bound by
/// the FMA latency otherwise). The second group runs `lag` columns of K behind the first: with
/// rows of B a multiple of 4 KiB apart (K = 1024, 2048), 16 rows read at the same k all fall in
/// the same L1 sets and evict each other.
template <class BElem, int Rows>
FOE_TARGET_AVX2_FMA_F16C void small_m_avx2_16(index_t k, index_t lag, const float* a, index_t lda, const BElem* b,
                                              index_t ldb, float* c, index_t ldc, bool accumulate)
{
    const EightRows<BElem, false> rows0{b, ldb, 7}, rows1{b + 8 * ldb, ldb, 7};
    __m256 acc0[Rows], acc1[Rows];
    small_m_load<Rows>(c, ldc, 8, accumulate, acc0);
    small_m_load<Rows>(c + 8, ldc, 8, accumulate, acc1);
    const index_t k8 = k / 8 * 8, behind = std::min(lag / 8 * 8, k8);
    index_t p = 0;
    for (; p < behind; p += 8) small_m_step<BElem, Rows>(a, lda, rows0, p, acc0);
    for (; p < k8; p += 8) {
        small_m_step<BElem, Rows>(a, lda, rows0, p, acc0);
        small_m_step<BElem, Rows>(a, lda, rows1, p - behind, acc1);
    }
    for (p -= behind; p < k8; p += 8) small_m_step<BElem, Rows>(a, lda, rows1, p, acc1);
    for (p = k8; p < k; ++p) {
        small_m_step1<BElem, Rows>(a, lda, rows0, p, acc0);
        small_m_step1<BElem, Rows>(a, lda, rows1, p, acc1);
    }
    small_m_store<Rows>(acc0, c, ldc, 8);
    small_m_store<Rows>(acc1, c + 8, ldc, 8);
}

/// How far (in bytes of B) the second group of 8 columns runs behind the first. Measured at
/// M = 1 on one thread: 1 KiB beats no lag by 1.5 to 2x at K = 1024 and 2048 (fp32) and is within
/// 5% of the best lag at K = 768.
inline constexpr index_t small_m_lag_bytes = 1024;

template <class BElem, int Rows>
FOE_TARGET_AVX2_FMA_F16C void small_m_avx2_rows(index_t n, index_t k, const float* a, index_t lda, const BElem* b,
                                                index_t ldb, float* c, index_t ldc, bool accumulate,
                                                index_t lag = small_m_lag_bytes / static_cast<index_t>(sizeof(BElem)))
{
    index_t j = 0;
    for (; j + 16 <= n; j += 16) small_m_avx2_16<BElem, Rows>(k, lag, a, lda, b + j * ldb, ldb, c + j, ldc, accumulate);
    if (j + 8 <= n) {
        small_m_avx2_8<BElem, Rows, false>(k, a, lda, b + j * ldb, ldb, 8, c + j, ldc, accumulate);
        j += 8;
    }
    if (j < n) small_m_avx2_8<BElem, Rows, true>(k, a, lda, b + j * ldb, ldb, n - j, c + j, ldc, accumulate);
}

template <class BElem>
FOE_TARGET_AVX2_FMA_F16C void small_m_avx2(index_t rows, index_t n, index_t k, const float* a, index_t lda,
                                           const BElem* b, index_t ldb, float* c, index_t ldc, bool accumulate)
{
    static_assert(small_m_rows == 4);
    switch (rows) {
    case 1: small_m_avx2_rows<BElem, 1>(n, k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 2: small_m_avx2_rows<BElem, 2>(n, k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 3: small_m_avx2_rows<BElem, 3>(n, k, a, lda, b, ldb, c, ldc, accumulate); break;
    default: small_m_avx2_rows<BElem, 4>(n, k, a, lda, b, ldb, c, ldc, accumulate); break;
    }
}

/// AVX2, FMA and F16C: every kernel in registers.
inline constexpr Kernels avx2_kernels{pack_avx2,
                                      tile_avx2,
                                      "avx2+fma",
                                      small_m_avx2<float>,
                                      {pack_avx2_widening<bfloat16>, small_m_avx2<bfloat16>},
                                      {pack_avx2_widening<float16>, small_m_avx2<float16>}};
/// AVX2 and FMA without F16C (no such CPU is known, but a virtual machine may hide the flag): the
/// packed path for every M, 16-bit B widened by the portable packing.
inline constexpr Kernels avx2_kernels_without_f16c{pack_avx2,
                                                   tile_avx2,
                                                   "avx2+fma",
                                                   nullptr,
                                                   {pack_portable<bfloat16>, nullptr},
                                                   {pack_portable<float16>, nullptr}};

#endif  // FOE_GEMM_HAS_AVX2_KERNELS

/// The fastest kernels this CPU runs; decided once per process.
inline const Kernels& kernels_for_this_cpu() noexcept
{
#if defined(FOE_GEMM_HAS_AVX2_KERNELS)
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    // CPUID leaf 1, ECX bit 29 (clang before 16 has no "f16c" for __builtin_cpu_supports; the
    // OS's support for the AVX registers it needs is part of the avx2 check above).
    static const bool f16c = [] {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
    }();
    if (avx2) return f16c ? avx2_kernels : avx2_kernels_without_f16c;
#endif
    return portable_kernels;
}

}  // namespace foe::gemm::detail::bi
