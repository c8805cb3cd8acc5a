#pragma once
// Grouped SwiGLU experts on the device, reading the expert offsets from device memory: no host
// synchronisation, a fixed number of launches whatever the routing, so a layer that calls it is
// capturable in a CUDA graph. For every expert e and its grouped rows [offsets[e], offsets[e+1])
// (permute.cuh's layout),
//   a = silu(x W_gate^T) * (x W_up^T)    fp32, rounded once to bf16
//   y = a W_down^T                       bf16
// in three launches:
//   1. tile starts (one block): tiles_e = ceil(rows_e / BM), tile_start = exclusive prefix of
//      tiles_e, on the device from the offsets;
//   2. gate/up GEMM with the SwiGLU in its epilogue: a block's B tile holds the same output
//      columns j of gate and of up, interleaved per warp (each warp's first half of n8 tiles
//      are gate columns, its second half the up columns of the same j), so a thread holds g and
//      u of the same element in registers and writes a[:, j] = silu(g) * u directly (no fp32
//      [rows, 2f] intermediate);
//   3. down GEMM (N = d, K = f) from a.
// The GEMM grids are the upper bound ceil(max_rows / BM) + experts row tiles (sum_e ceil(rows_e
// / BM) never exceeds it) times the column tiles; a block finds its expert by binary search in
// tile_start and returns if its tile is past the total. Both GEMMs run TcGemm's tensor-core tile
// loop (detail::tc_mainloop), so foe has one tensor-core code path. Deterministic: every output
// element is computed by one block in a fixed order.
//
// swiglu_reference.cuh keeps the host-driven cuBLASLt version (host_offsets read back) as the
// reference this one is measured against.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm_tc.cuh"

namespace foe::cuda {

/// Device weights of `experts` SwiGLU experts, each expert's matrices contiguous after the
/// previous expert's: the HF gate_proj, up_proj ([f, d] each) and down_proj ([d, f]) stacked.
struct GroupedExpertWeights {
    const bfloat16* gate_up = nullptr;  ///< [experts, 2f, d]: per expert its f gate rows, then its f up rows
    const bfloat16* down = nullptr;     ///< [experts, d, f]
    index_t experts = 0, d = 0, f = 0;
};

/// The most experts grouped_swiglu() takes (its tile-start scan is one block of 1024 threads).
inline constexpr index_t grouped_swiglu_max_experts = 1024;

/// Bytes of device workspace grouped_swiglu() needs for up to max_rows rows: the bf16
/// activation [max_rows, f] and the tile starts [experts + 1].
[[nodiscard]] inline std::size_t grouped_swiglu_workspace_bytes(index_t max_rows, index_t experts, index_t f);

/// y[r, :] = FFN_e(x[r, :]) for every expert e and row r in [offsets[e], offsets[e+1]).
/// offsets: device int32 [experts + 1], non-decreasing, offsets[experts] <= max_rows (values are
/// clamped to [0, max_rows], so a bad offset never reads or writes outside the buffers). x, y:
/// [max_rows, d] bf16, grouped by expert; rows outside [offsets[0], offsets[experts]) of y are
/// not written and those of x not read. workspace: grouped_swiglu_workspace_bytes() bytes.
/// Stream-ordered, no host synchronisation, no allocation. Throws foe::InvalidArgument for
/// experts outside [1, 1024], d or f not a positive multiple of 8, max_rows outside
/// [0, 2^31 - 1], or a pointer not 16-byte aligned; foe::CudaError on a device older than sm_80.
inline void grouped_swiglu(const GroupedExpertWeights& w, const std::int32_t* offsets, const bfloat16* x,
                           index_t max_rows, void* workspace, bfloat16* y, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------

/// The tile-start scan: one block, one thread per expert.
struct GroupedTileScanLaunch {
    static constexpr int block_threads = static_cast<int>(grouped_swiglu_max_experts);
};

namespace detail {

[[nodiscard]] __device__ inline int clamp_row(std::int32_t o, int max_rows) { return min(max(o, 0), max_rows); }

/// The expert and row range of this block's row tile (blockIdx.x), or false when the tile is
/// past the routed total.
struct GroupedTile {
    int expert;
    index_t row_begin;  ///< first row of the tile
    index_t row_end;    ///< end of the expert's rows (the tile's valid rows are [row_begin, min(row_begin + BM, row_end)))
};
template <class Tile>
[[nodiscard]] __device__ inline bool grouped_find_tile(const std::int32_t* __restrict__ offsets,
                                                       const std::int32_t* __restrict__ tile_start, int experts,
                                                       int max_rows, GroupedTile& t)
{
    const int tile = static_cast<int>(blockIdx.x);
    if (tile >= tile_start[experts]) return false;
    // Smallest i in [1, experts] with tile_start[i] > tile; the tile is expert i - 1's (empty
    // experts have tile_start[e] == tile_start[e + 1] and are skipped).
    int lo = 1, hi = experts;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (tile_start[mid] > tile) hi = mid;
        else lo = mid + 1;
    }
    t.expert = lo - 1;
    t.row_begin = static_cast<index_t>(clamp_row(offsets[t.expert], max_rows)) +
                  static_cast<index_t>(tile - tile_start[t.expert]) * Tile::bm;
    t.row_end = clamp_row(offsets[t.expert + 1], max_rows);
    return true;
}

[[nodiscard]] __device__ inline float silu(float g) { return g / (1.0f + expf(-g)); }

}  // namespace detail

inline namespace kernels_v0_1 {

/// tile_start[e] = sum over e' < e of ceil(rows_e' / Tile::bm), for e in [0, experts]: a
/// Hillis-Steele scan over one block (integers: exact, and the same every run).
template <class Tile, class Launch = GroupedTileScanLaunch>
FOE_KERNEL(Launch::block_threads)
void grouped_tile_starts_kernel(const std::int32_t* __restrict__ offsets, int experts, int max_rows,
                                std::int32_t* __restrict__ tile_start)
{
    __shared__ int s[Launch::block_threads];
    const int e = static_cast<int>(threadIdx.x);
    int tiles = 0;
    if (e < experts) {
        const int begin = detail::clamp_row(offsets[e], max_rows), end = detail::clamp_row(offsets[e + 1], max_rows);
        const int rows = end > begin ? end - begin : 0;
        tiles = rows / Tile::bm + (rows % Tile::bm != 0 ? 1 : 0);
    }
    s[e] = tiles;
    __syncthreads();
    for (int off = 1; off < Launch::block_threads; off *= 2) {
        const int v = e >= off ? s[e - off] : 0;
        __syncthreads();
        s[e] += v;
        __syncthreads();
    }
    if (e < experts) tile_start[e + 1] = s[e];  // inclusive prefix of e = exclusive prefix of e + 1
    if (e == 0) tile_start[0] = 0;
}

/// act[r, j] = bf16(silu(x_r . gate_e[j]) * (x_r . up_e[j])) for the block's row tile (blockIdx.x,
/// see grouped_find_tile) and output columns [blockIdx.y * BN / 2, (blockIdx.y + 1) * BN / 2).
template <class Tile>
FOE_KERNEL(Tile::block_threads)
void grouped_gate_up_kernel(const bfloat16* __restrict__ x, const bfloat16* __restrict__ gate_up,
                            const std::int32_t* __restrict__ offsets, const std::int32_t* __restrict__ tile_start,
                            int experts, int max_rows, int d, int f, bfloat16* __restrict__ act)
{
#ifdef FOE_TC_NO_TENSOR_CORES
    __trap();  // the host launcher refuses devices older than sm_80; never reached
#else
    // A warp's B rows [wn * warp_n, (wn + 1) * warp_n): the first half gate columns, the second
    // half the up columns of the same `half` output columns, so n8 tile ni (gate) pairs with
    // n8 tile ni + mma_n / 2 (up) in the same thread.
    constexpr int half = Tile::warp_n / 2;
    __shared__ detail::TcShared<Tile> sm;
    detail::GroupedTile t;
    if (!detail::grouped_find_tile<Tile>(offsets, tile_start, experts, max_rows, t)) return;
    const index_t j0 = static_cast<index_t>(blockIdx.y) * (Tile::bn / 2);
    const bfloat16* w = gate_up + static_cast<std::size_t>(t.expert) * 2 * static_cast<std::size_t>(f) * static_cast<std::size_t>(d);
    const bfloat16* a_rows[Tile::a_loads];
    const bfloat16* b_rows[Tile::b_loads];
#pragma unroll
    for (int i = 0; i < Tile::a_loads; ++i) {
        const index_t r = t.row_begin + detail::tc_load_row<Tile>(i);
        a_rows[i] = r < t.row_end ? x + static_cast<std::size_t>(r) * static_cast<std::size_t>(d) : nullptr;
    }
#pragma unroll
    for (int i = 0; i < Tile::b_loads; ++i) {
        const int lr = detail::tc_load_row<Tile>(i);
        const index_t col = j0 + (lr / Tile::warp_n) * half + lr % half;
        const index_t wrow = (lr % Tile::warp_n >= half ? f : 0) + col;  // up rows follow the f gate rows
        b_rows[i] = col < f ? w + static_cast<std::size_t>(wrow) * static_cast<std::size_t>(d) : nullptr;
    }
    detail::TcAccumulators<Tile> acc;
    detail::tc_mainloop<Tile>(sm, a_rows, b_rows, x, gate_up, d, acc);

    const detail::TcFragmentCoords<Tile> at;
#pragma unroll
    for (int mi = 0; mi < Tile::mma_m; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const index_t row = t.row_begin + at.row(mi, h);
            if (row >= t.row_end) continue;
#pragma unroll
            for (int ni = 0; ni < Tile::mma_n / 2; ++ni) {
                const index_t col = j0 + at.wn * half + ni * 8 + 2 * at.q;
                if (col >= f) continue;  // f % 8 == 0 and col even: col + 1 < f too
                const float g0 = acc[mi][ni][2 * h], g1 = acc[mi][ni][2 * h + 1];
                const float u0 = acc[mi][ni + Tile::mma_n / 2][2 * h], u1 = acc[mi][ni + Tile::mma_n / 2][2 * h + 1];
                *reinterpret_cast<detail::Bf16Pair*>(act + static_cast<std::size_t>(row) * static_cast<std::size_t>(f) +
                                                     static_cast<std::size_t>(col)) =
                    detail::Bf16Pair{bfloat16(detail::silu(g0) * u0), bfloat16(detail::silu(g1) * u1)};
            }
        }
#endif
}

/// y[r, n] = act_r . down_e[n] for the block's row tile and columns [blockIdx.y * BN, + BN).
template <class Tile>
FOE_KERNEL(Tile::block_threads)
void grouped_down_kernel(const bfloat16* __restrict__ act, const bfloat16* __restrict__ down,
                         const std::int32_t* __restrict__ offsets, const std::int32_t* __restrict__ tile_start,
                         int experts, int max_rows, int d, int f, bfloat16* __restrict__ y)
{
#ifdef FOE_TC_NO_TENSOR_CORES
    __trap();  // the host launcher refuses devices older than sm_80; never reached
#else
    __shared__ detail::TcShared<Tile> sm;
    detail::GroupedTile t;
    if (!detail::grouped_find_tile<Tile>(offsets, tile_start, experts, max_rows, t)) return;
    const index_t n0 = static_cast<index_t>(blockIdx.y) * Tile::bn;
    const bfloat16* w = down + static_cast<std::size_t>(t.expert) * static_cast<std::size_t>(d) * static_cast<std::size_t>(f);
    const bfloat16* a_rows[Tile::a_loads];
    const bfloat16* b_rows[Tile::b_loads];
#pragma unroll
    for (int i = 0; i < Tile::a_loads; ++i) {
        const index_t r = t.row_begin + detail::tc_load_row<Tile>(i);
        a_rows[i] = r < t.row_end ? act + static_cast<std::size_t>(r) * static_cast<std::size_t>(f) : nullptr;
    }
#pragma unroll
    for (int i = 0; i < Tile::b_loads; ++i) {
        const index_t col = n0 + detail::tc_load_row<Tile>(i);
        b_rows[i] = col < d ? w + static_cast<std::size_t>(col) * static_cast<std::size_t>(f) : nullptr;
    }
    detail::TcAccumulators<Tile> acc;
    detail::tc_mainloop<Tile>(sm, a_rows, b_rows, act, down, f, acc);

    const detail::TcFragmentCoords<Tile> at;
#pragma unroll
    for (int mi = 0; mi < Tile::mma_m; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const index_t row = t.row_begin + at.row(mi, h);
            if (row >= t.row_end) continue;
#pragma unroll
            for (int ni = 0; ni < Tile::mma_n; ++ni) {
                const index_t col = n0 + at.col(ni);
                if (col >= d) continue;  // d % 8 == 0 and col even: col + 1 < d too
                detail::tc_store(y, true, static_cast<std::size_t>(row) * static_cast<std::size_t>(d) + static_cast<std::size_t>(col),
                                 acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], true, true, 0.0f);
            }
        }
#endif
}

}  // namespace kernels_v0_1

namespace detail {

/// Offset of the tile starts in the workspace (after the activation, 256-byte aligned).
[[nodiscard]] inline std::size_t grouped_tile_start_offset(index_t max_rows, index_t f)
{
    const std::size_t act = static_cast<std::size_t>(max_rows) * static_cast<std::size_t>(f) * sizeof(bfloat16);
    return (act + 255) / 256 * 256;
}

template <class Tile>
void launch_grouped_swiglu(const GroupedExpertWeights& w, const std::int32_t* offsets, const bfloat16* x,
                           index_t max_rows, void* workspace, bfloat16* y, cudaStream_t stream)
{
    auto* act = static_cast<bfloat16*>(workspace);
    auto* tile_start = reinterpret_cast<std::int32_t*>(static_cast<unsigned char*>(workspace) +
                                                       grouped_tile_start_offset(max_rows, w.f));
    const int e = static_cast<int>(w.experts), rows = static_cast<int>(max_rows), d = static_cast<int>(w.d),
              f = static_cast<int>(w.f);
    const index_t gate_up_tiles = ceil_div(w.f, Tile::bn / 2), down_tiles = ceil_div(w.d, Tile::bn);
    require(gate_up_tiles <= 65535 && down_tiles <= 65535, "grouped_swiglu: d (", w.d, ") or f (", w.f,
            ") needs more than the grid's 65535 column tiles");
    // Upper bound of sum_e ceil(rows_e / BM): sum_e (rows_e / BM + 1) <= max_rows / BM + experts.
    const auto row_tiles = static_cast<unsigned>(ceil_div(max_rows, Tile::bm) + w.experts);

    require_tensor_core_image(grouped_gate_up_kernel<Tile>, "grouped_swiglu");
    grouped_tile_starts_kernel<Tile><<<1, GroupedTileScanLaunch::block_threads, 0, stream>>>(offsets, e, rows, tile_start);
    check_launch("grouped_tile_starts_kernel");
    grouped_gate_up_kernel<Tile><<<dim3(row_tiles, static_cast<unsigned>(gate_up_tiles)), Tile::block_threads, 0, stream>>>(
        x, w.gate_up, offsets, tile_start, e, rows, d, f, act);
    check_launch("grouped_gate_up_kernel");
    grouped_down_kernel<Tile><<<dim3(row_tiles, static_cast<unsigned>(down_tiles)), Tile::block_threads, 0, stream>>>(
        act, w.down, offsets, tile_start, e, rows, d, f, y);
    check_launch("grouped_down_kernel");
}

}  // namespace detail

inline std::size_t grouped_swiglu_workspace_bytes(index_t max_rows, index_t experts, index_t f)
{
    require(max_rows >= 0 && experts >= 0 && f >= 0, "grouped_swiglu_workspace_bytes: bad sizes max_rows ", max_rows,
            ", experts ", experts, ", f ", f);
    return detail::grouped_tile_start_offset(max_rows, f) + static_cast<std::size_t>(experts + 1) * sizeof(std::int32_t);
}

inline void grouped_swiglu(const GroupedExpertWeights& w, const std::int32_t* offsets, const bfloat16* x,
                           index_t max_rows, void* workspace, bfloat16* y, cudaStream_t stream)
{
    require(w.experts >= 1 && w.experts <= grouped_swiglu_max_experts, "grouped_swiglu: experts (", w.experts,
            ") must be in [1, ", grouped_swiglu_max_experts, "]");
    require(w.d > 0 && w.f > 0 && w.d % 8 == 0 && w.f % 8 == 0 && w.d <= 0x3fffffff && w.f <= 0x3fffffff,
            "grouped_swiglu: d (", w.d, ") and f (", w.f, ") must be positive multiples of 8 (rows are copied in 16-byte chunks)");
    require(max_rows >= 0 && max_rows <= 0x7fffffff, "grouped_swiglu: max_rows (", max_rows,
            ") must be in [0, 2^31 - 1]");
    require(offsets != nullptr, "grouped_swiglu: offsets is null");
    require(detail::aligned16(x) && detail::aligned16(y) && detail::aligned16(w.gate_up) && detail::aligned16(w.down) &&
                detail::aligned16(workspace),
            "grouped_swiglu: x, y, gate_up, down and the workspace must be 16-byte aligned");
    if (max_rows == 0) return;
    (void)detail::tc_device("grouped_swiglu");
    // 128-row tiles once the average expert fills one; 64-row tiles below that (decode batches,
    // where most experts get a few rows and a 128-row tile would be mostly masked).
    if (max_rows >= w.experts * TcLargeTile::bm)
        detail::launch_grouped_swiglu<TcLargeTile>(w, offsets, x, max_rows, workspace, y, stream);
    else
        detail::launch_grouped_swiglu<TcSmallTile>(w, offsets, x, max_rows, workspace, y, stream);
}

}  // namespace foe::cuda
