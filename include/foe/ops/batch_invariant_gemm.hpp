#pragma once
// gemm::BatchInvariant: foe's own host GEMM, whose every output is a fixed function of its row of
// A and its row of B alone.
//
// Each c[i][j] is one sequential chain of fused multiply-adds over k = 0 .. K-1, started from 0
// (or from c[i][j] when accumulating). Nothing else enters it: not M, not which rows share its
// register tile or thread, not the thread count, not the CPU. Threads split the output into
// blocks and never split K; blocking over K only parks the running value in C (an exact store
// and reload). So a token's logits are the same bits whether it runs alone or inside any batch,
// on 1 or 64 threads, with the AVX2 kernels or the portable ones (std::fma, the same roundings).
// That is the guarantee a vendor BLAS does not give: OpenBLAS picks kernels per CPU and per shape
// and may split K, so the same row can round differently when M changes (see the README's
// determinism table).
//
// Speed: a 6 x 16 register tile of FMAs over packed panels of B, the BLIS layout; within a few
// tens of percent of OpenBLAS on foe's shapes (bench_kernels: gemm_nt/*). What a chain of
// sequential FMAs gives up is splitting K, which only matters for tiny M x N with huge K.
// A decode step (M <= 4) skips the packing and streams every row of B once, transposing 8 x 8
// blocks in registers (the same chains; bench_kernels: gemm_pair/decode).
//
// B may be fp32, bf16 or fp16 (a weight kept in its file's type): the result is the bits of nt()
// with B widened to fp32 first, read at half the bytes.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"
#include "foe/ops/detail/batch_invariant_kernels.hpp"
#include "foe/ops/gemm_policy.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace foe::gemm {

struct BatchInvariant {
    /// c = a * b^T, or c += a * b^T with accumulate (see GemmPolicy).
    static void nt(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c, bool accumulate);
    /// The same with a bf16 or fp16 B, widened to fp32 as it is read: the bits of nt() on the
    /// widened B, without a widened copy.
    static void nt(MatrixView<const float> a, MatrixView<const bfloat16> b, MatrixView<float> c, bool accumulate);
    static void nt(MatrixView<const float> a, MatrixView<const float16> b, MatrixView<float> c, bool accumulate);
    /// The kernels this CPU runs: "avx2+fma" or "portable (std::fma)"; both give the same bits.
    [[nodiscard]] static const char* kernel_name() noexcept { return detail::bi::kernels_for_this_cpu().name; }
};
static_assert(GemmPolicy<BatchInvariant>);
static_assert(GemmPolicyFor<BatchInvariant, bfloat16> && GemmPolicyFor<BatchInvariant, float16>);

namespace detail::bi {

/// This thread's packing buffer of at least `floats` floats, 64-byte aligned; it grows once and is
/// reused by every later call on the thread (no allocation on the hot path).
inline float* pack_buffer(std::size_t floats)
{
    thread_local std::vector<float> storage;
    constexpr std::size_t align_floats = 64 / sizeof(float);
    if (storage.size() < floats + align_floats) storage.resize(floats + align_floats);
    const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
    const std::size_t skip = (align_floats - address / sizeof(float) % align_floats) % align_floats;
    return storage.data() + skip;
}

/// The small-M path gives every thread at least this many bytes of B, so below twice this it
/// runs on one thread. Measured at M = 1 on the development machine (2 cores, B of N x 768
/// from cache): a parallel region costs about a microsecond and a thread streams 64 KiB in about
/// 2, so two threads break even near 64 KiB of B and gain from about 96 KiB; 128 KiB leaves a
/// margin. A decode step's smallest GEMMs (FoE's per-group slices) stay on one thread.
inline constexpr index_t small_m_thread_bytes = index_t{1} << 16;

/// The small-M path: fn over all of B, or over one contiguous range of columns per thread when
/// B is large enough to pay for a parallel region (tests pass a smaller thread_bytes to run the
/// split on small shapes). Never splits K; no allocation.
template <class BElem>
void nt_small_m(SmallMFn<BElem> fn, MatrixView<const float> a, MatrixView<const BElem> b, MatrixView<float> c,
                bool accumulate, index_t thread_bytes = small_m_thread_bytes)
{
    const index_t m = a.extent(0), n = b.extent(0), k = a.extent(1);
    const index_t lda = a.stride(0), ldb = b.stride(0), ldc = c.stride(0);
    const float* const a0 = a.data();
    const BElem* const b0 = b.data();
    float* const c0 = c.data();
#if defined(_OPENMP)
    constexpr index_t grain = 16;  // columns: a thread's range is whole 16-column blocks of the kernels
    const index_t blocks = (n + grain - 1) / grain;
    const index_t threads =
        omp_in_parallel() ? 1
                          : std::min({static_cast<index_t>(omp_get_max_threads()), blocks,
                                      n * k * static_cast<index_t>(sizeof(BElem)) / std::max<index_t>(thread_bytes, 1)});
    if (threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(threads))
        {
            const auto t = static_cast<index_t>(omp_get_thread_num());
            const auto count = static_cast<index_t>(omp_get_num_threads());
            const index_t begin = blocks * t / count * grain, end = std::min(n, blocks * (t + 1) / count * grain);
            if (begin < end) fn(m, end - begin, k, a0, lda, b0 + begin * ldb, ldb, c0 + begin, ldc, accumulate);
        }
        return;
    }
#else
    static_cast<void>(thread_bytes);
#endif
    fn(m, n, k, a0, lda, b0, ldb, c0, ldc, accumulate);
}

/// A float view with b's extents and strides (and no data), for the shape checks.
template <class BElem>
MatrixView<const float> shape_only(MatrixView<const BElem> b)
{
    return {nullptr, b.shape(), b.strides()};
}

/// The product with the given kernels (tests run every kernel set against the others): the
/// small-M path for M <= small_m_rows where the set has one, otherwise the blocked one.
template <class BElem>
void nt(const Kernels& kernels, MatrixView<const float> a, MatrixView<const BElem> b, MatrixView<float> c,
        bool accumulate)
{
    check_nt_shapes(a, shape_only(b), c);
    const index_t m = a.extent(0), n = b.extent(0), k = a.extent(1);
    if (m == 0 || n == 0) return;
    // Pointer arithmetic throughout, not a(i, 0): with K = 0 there is no element 0 to index.
    float* const c0 = c.data();
    const index_t lda = a.stride(0), ldb = b.stride(0), ldc = c.stride(0);
    if (k == 0) {
        if (!accumulate)
            for (index_t i = 0; i < m; ++i) std::fill_n(c0 + i * ldc, n, 0.0f);
        return;
    }
    const BKernels<BElem> for_b = kernels.for_b<BElem>();
    if (m <= small_m_rows && for_b.small_m != nullptr) {
        nt_small_m(for_b.small_m, a, b, c, accumulate);
        return;
    }
    // One task per (column block, row block). Few rows (a decode step) give few tasks at nc
    // columns each, so the column blocks narrow until every thread has about two tasks.
    const auto ceil_div = [](index_t x, index_t y) { return (x + y - 1) / y; };
#if defined(_OPENMP)
    const index_t wanted_tasks = 2 * static_cast<index_t>(omp_get_max_threads());
#else
    const index_t wanted_tasks = 1;
#endif
    const index_t m_blocks = ceil_div(m, mc);
    index_t panel = nc;
    if (m_blocks * ceil_div(n, nc) < wanted_tasks)
        panel = std::clamp(ceil_div(ceil_div(n, ceil_div(wanted_tasks, m_blocks)), nr) * nr, nr, nc);
    const index_t n_blocks = ceil_div(n, panel);
    FOE_OMP_PARALLEL_FOR
    for (index_t task = 0; task < m_blocks * n_blocks; ++task) {
        const index_t jc = task / m_blocks * panel, ic = task % m_blocks * mc;
        const index_t nb = std::min(panel, n - jc), mb = std::min(mc, m - ic);
        float* const bp = pack_buffer(static_cast<std::size_t>(nc * kc + mc * kc));
        float* const ap = bp + nc * kc;
        for (index_t pc = 0; pc < k; pc += kc) {
            const index_t depth = std::min(kc, k - pc);
            const bool load_c = accumulate || pc > 0;
            for (index_t jr = 0; jr < nb; jr += nr)
                for_b.pack(b.data() + (jc + jr) * ldb + pc, ldb, std::min(nr, nb - jr), depth, bp + jr * depth);
            // A's rows too, one after another: rows of a long K lie 4 or 8 KiB apart, all in the
            // same L1 sets, and the tile's six broadcast streams then evict each other.
            for (index_t i = 0; i < mb; ++i) std::copy_n(a.data() + (ic + i) * lda + pc, depth, ap + i * depth);
            // Column panels outside, row strips inside (BLIS's order): a 16 x depth panel of B
            // (16 KiB) stays in L1 while every 6-row strip of A streams past it from L2.
            for (index_t jr = 0; jr < nb; jr += nr) {
                const index_t cols = std::min(nr, nb - jr);
                for (index_t ir = 0; ir < mb; ir += mr) {
                    const index_t rows = std::min(mr, mb - ir);
                    const float* const ai = ap + ir * depth;
                    float* const cij = c0 + (ic + ir) * ldc + jc + jr;
                    if (cols == nr) {
                        kernels.tile(rows, depth, ai, depth, bp + jr * depth, cij, ldc, load_c);
                        continue;
                    }
                    // The last columns: the tile runs on a full-width copy (same chain per output).
                    float edge[mr * nr];
                    if (load_c)
                        for (index_t r = 0; r < rows; ++r) std::copy_n(cij + r * ldc, cols, edge + r * nr);
                    kernels.tile(rows, depth, ai, depth, bp + jr * depth, edge, nr, load_c);
                    for (index_t r = 0; r < rows; ++r) std::copy_n(edge + r * nr, cols, cij + r * ldc);
                }
            }
        }
    }
}

}  // namespace detail::bi

inline void BatchInvariant::nt(MatrixView<const float> a, MatrixView<const float> b, MatrixView<float> c,
                               bool accumulate)
{
    detail::bi::nt(detail::bi::kernels_for_this_cpu(), a, b, c, accumulate);
}

inline void BatchInvariant::nt(MatrixView<const float> a, MatrixView<const bfloat16> b, MatrixView<float> c,
                               bool accumulate)
{
    detail::bi::nt(detail::bi::kernels_for_this_cpu(), a, b, c, accumulate);
}

inline void BatchInvariant::nt(MatrixView<const float> a, MatrixView<const float16> b, MatrixView<float> c,
                               bool accumulate)
{
    detail::bi::nt(detail::bi::kernels_for_this_cpu(), a, b, c, accumulate);
}

}  // namespace foe::gemm
