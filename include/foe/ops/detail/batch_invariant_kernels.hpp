#pragma once
// The packing routine and register-tile kernels of gemm::BatchInvariant, in two versions: AVX2
// with FMA (chosen at run time on x86 CPUs that have it) and portable C++ (std::fma). Both
// compute every output with the same operations in the same order, so they give the same bits:
//
//   c[i][j] = accumulate ? c[i][j] : 0;   for k = 0 .. K-1:  c[i][j] = fma(a[i][k], b[j][k], c[i][j])
//
// one rounding per k, one sequential chain per output. Blocking only decides when the running
// value is parked in C between blocks of K (an exact fp32 store and reload), never the order.

#include <algorithm>
#include <cmath>

#include "foe/core/types.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FOE_GEMM_HAS_AVX2_KERNELS 1
// GCC and clang compile these functions for AVX2+FMA whatever the translation unit's -march;
// they run only where the CPU reports both (see kernels_for_this_cpu()).
#define FOE_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
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
/// floats: bp[k * nr + j] = b[j][k]; columns j >= n_valid are zero.
using PackFn = void (*)(const float* b, index_t ldb, index_t n_valid, index_t depth, float* bp);
/// Register tile over `depth` steps of K: rows of A a[r * lda + k] (r < rows <= mr), the packed
/// panel bp, and a full mr x nr (rows x nr) tile of C with row stride ldc; load_c starts every
/// chain from C, otherwise from zero.
using TileFn = void (*)(index_t rows, index_t depth, const float* a, index_t lda, const float* bp, float* c,
                        index_t ldc, bool load_c);

struct Kernels {
    PackFn pack;
    TileFn tile;
    const char* name;
};

// --- portable ------------------------------------------------------------------------------

inline void pack_portable(const float* b, index_t ldb, index_t n_valid, index_t depth, float* bp)
{
    for (index_t j = 0; j < nr; ++j) {
        const float* row = b + j * ldb;
        if (j < n_valid)
            for (index_t k = 0; k < depth; ++k) bp[k * nr + j] = row[k];
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

inline constexpr Kernels portable_kernels{pack_portable, tile_portable, "portable (std::fma)"};

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

inline constexpr Kernels avx2_kernels{pack_avx2, tile_avx2, "avx2+fma"};

#endif  // FOE_GEMM_HAS_AVX2_KERNELS

/// The fastest kernels this CPU runs; decided once per process.
inline const Kernels& kernels_for_this_cpu() noexcept
{
#if defined(FOE_GEMM_HAS_AVX2_KERNELS)
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) return avx2_kernels;
#endif
    return portable_kernels;
}

}  // namespace foe::gemm::detail::bi
