#pragma once
// TcGemm: foe's own tensor-core GEMM, a DeviceGemmPolicy beside cuBLASLt's LtGemm:
// C[M, N] = A[M, K] B[N, K]^T + beta C, row-major, A and B bf16, fp32 accumulation, C bf16 or
// fp32. No handle, no workspace, deterministic (one block owns each C tile and adds its K
// products in a fixed order: no split-K, no atomics).
//
// The kernel (sm_80+): a block computes a BM x BN tile of C; warps own WM x WN sub-tiles made of
// mma.sync.m16n8k16 (bf16 in, fp32 accumulate) issued through inline PTX, fed by ldmatrix.x4 from
// shared memory; the A and B tiles (BM x 32 and BN x 32) are staged by cp.async, double-buffered,
// so the copy of k-tile t+1 overlaps the MMAs of k-tile t. Inline PTX rather than nvcuda::wmma:
// wmma's fragment layout is opaque, so a fused epilogue (the grouped SwiGLU's silu(gate) * up,
// experts/grouped_swiglu.cuh) could not pair a gate element with its up element in registers; the
// PTX fragment layouts are documented (PTX ISA, "Matrix fragments for mma.m16n8k16").
//
// Tails: rows of A or B past M or N, and 16-byte chunks past K, are loaded as zeros (cp.async
// with a source size of 0) and stores are masked, so any M, N >= 0 work; K must be a multiple
// of 8 (whole 16-byte chunks) and A, B, C 16-byte aligned (cp.async's granule).
//
// The tile loop (detail::tc_mainloop) takes per-thread row pointers, so grouped kernels whose
// rows and weights are found on the device (experts/grouped_swiglu.cuh) run the same tensor-core
// path.

#include <cuda_runtime.h>

#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"
#include "foe/cuda/gemm.cuh"

namespace foe::cuda {

/// Launch policy of the tensor-core tile: a BM x BN block tile over k-tiles of 32, split into
/// WarpsM x WarpsN warp tiles. Chosen by reasoning, not yet by measurement (written without a
/// GPU): 128 x 128 with 8 warps of 64 x 32 gives each warp 16 MMAs per 6 ldmatrix.x4, and two
/// such blocks fit an SM (40 KiB of shared memory and 256 threads each); 64 x 64 with 4 warps of
/// 32 x 32 is for GEMMs too small to give every SM a 128 x 128 tile (decode batches).
template <int BM, int BN, int WarpsM, int WarpsN>
struct TcTileLaunch {
    static constexpr int bm = BM, bn = BN, bk = 32;
    static constexpr int warps_m = WarpsM, warps_n = WarpsN;
    static constexpr int block_threads = 32 * warps_m * warps_n;
    static constexpr int warp_m = bm / warps_m, warp_n = bn / warps_n;
    static constexpr int mma_m = warp_m / 16, mma_n = warp_n / 8;  // m16n8k16 tiles per warp
    static constexpr int ldk = bk + 8;                   // padded smem row: 80 bytes, ldmatrix conflict-free
    static constexpr int chunks_per_row = bk / 8;        // 16-byte chunks per tile row
    static constexpr int a_loads = bm * chunks_per_row / block_threads;  // cp.async per thread per k-tile
    static constexpr int b_loads = bn * chunks_per_row / block_threads;
    static_assert(bm % (16 * warps_m) == 0 && bn % (16 * warps_n) == 0, "warp tiles are whole 16 x 16 pairs");
    static_assert(mma_n % 2 == 0, "B fragments are loaded 16 columns (two n8 tiles) at a time");
    static_assert(block_threads % chunks_per_row == 0, "a thread copies the same k-chunk of every row it loads");
    static_assert(a_loads * block_threads == bm * chunks_per_row && b_loads * block_threads == bn * chunks_per_row,
                  "the tile's chunks divide evenly over the threads");
};
using TcLargeTile = TcTileLaunch<128, 128, 2, 4>;  // 8 warps, 64 x 32 each
using TcSmallTile = TcTileLaunch<64, 64, 2, 2>;    // 4 warps, 32 x 32 each

/// Which block tile TcGemm launches: by default the larger one when it alone fills every SM,
/// else the smaller; tests and benchmarks pin one to cover or measure both.
enum class TcTileChoice { automatic, large, small };

/// foe's tensor-core GEMM policy (no handle, no device state; any number may exist, on any stream).
class TcGemm {
public:
    TcGemm() = default;
    explicit TcGemm(TcTileChoice tile) noexcept : tile_(tile) {}

    /// C[M, N] = A[M, K] B[N, K]^T + beta C; c is bf16 or fp32 as `out` says, and C is read (in
    /// that type) only when beta != 0. Stream-ordered, no host synchronisation, no allocation:
    /// capturable in a CUDA graph. Throws foe::InvalidArgument for a negative or > 2^31 - 1
    /// dimension, K not a multiple of 8, or a pointer not 16-byte aligned; foe::CudaError on a
    /// device older than sm_80. K == 0 gives C = beta C.
    void nt(const bfloat16* a, const bfloat16* b, void* c, OutType out, index_t m, index_t n, index_t k,
            cudaStream_t stream, float beta = 0.0f) const;

    /// `batch` GEMMs C_i = A_i B_i^T + beta C_i, A_i = a + i stride_a, B_i = b + i stride_b, C_i =
    /// c + i stride_c (elements; C's in its own type), one launch (grid.z over the batch). Each
    /// C_i is the same bits nt() gives for it alone: a block's sums do not depend on the tile or
    /// the batch. The strides must keep every matrix 16-byte aligned (InvalidArgument otherwise).
    void nt_batched(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c, index_t stride_c,
                    index_t batch, OutType out, index_t m, index_t n, index_t k, cudaStream_t stream,
                    float beta = 0.0f) const;

private:
    void run(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c, index_t stride_c,
             index_t batch, OutType out, index_t m, index_t n, index_t k, cudaStream_t stream, float beta) const;

    TcTileChoice tile_ = TcTileChoice::automatic;
};
static_assert(DeviceGemmPolicy<TcGemm>);
static_assert(DeviceBatchedGemmPolicy<TcGemm>);

// ---------------------------------------------------------------------------------------------
// The tile machinery (device side), shared with experts/grouped_swiglu.cuh.

namespace detail {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FOE_TC_NO_TENSOR_CORES 1  // device pass for an architecture without bf16 mma.sync / cp.async
#endif

[[nodiscard]] __device__ inline std::uint32_t smem_address(const void* p)
{
    return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// 16 bytes global -> shared, asynchronous; when !valid, writes 16 zero bytes and reads nothing
/// (source size 0), so `src` only has to be some mapped address.
__device__ inline void cp_async_16(void* dst, const void* src, bool valid)
{
#ifndef FOE_TC_NO_TENSOR_CORES
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(bytes)
                 : "memory");
#else
    (void)dst, (void)src, (void)valid;
#endif
}

__device__ inline void cp_async_commit()
{
#ifndef FOE_TC_NO_TENSOR_CORES
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most `Pending` of this thread's committed cp.async groups are in flight.
template <int Pending>
__device__ inline void cp_async_wait()
{
#ifndef FOE_TC_NO_TENSOR_CORES
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

/// Four 8 x 8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8, and
/// receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each matrix in r[0..3].
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row)
{
#ifndef FOE_TC_NO_TENSOR_CORES
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
#else
    (void)row;
    r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

/// d += a b for one m16n8k16 tile: a row-major 16 x 16 bf16, b "col" 16 x 8 bf16 (k contiguous
/// per column, i.e. B stored [n][k]), d 16 x 8 fp32.
__device__ inline void mma_bf16_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2])
{
#ifndef FOE_TC_NO_TENSOR_CORES
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d, (void)a, (void)b;
#endif
}

/// Shared memory of one block: two stages of the A and B tiles (bf16 bits: a __shared__ object
/// must be trivially constructible, and only cp.async and ldmatrix touch it), rows padded to `ldk`.
template <class Tile>
struct alignas(16) TcShared {
    std::uint16_t a[2][Tile::bm][Tile::ldk];
    std::uint16_t b[2][Tile::bn][Tile::ldk];
};

/// The fp32 accumulators of one thread: warp tile (mi, ni), then the mma's d[4].
template <class Tile>
using TcAccumulators = float[Tile::mma_m][Tile::mma_n][4];

/// Where this thread's accumulator elements sit in the block tile: acc[mi][ni][2h + j] is
/// element (row(mi, h), col(ni) + j) of the BM x BN tile (the mma's C fragment layout).
template <class Tile>
struct TcFragmentCoords {
    int wm, wn, g, q;
    __device__ TcFragmentCoords()
    {
        const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
        wm = warp / Tile::warps_n;
        wn = warp % Tile::warps_n;
        g = lane / 4;
        q = lane % 4;
    }
    [[nodiscard]] __device__ int row(int mi, int h) const { return wm * Tile::warp_m + mi * 16 + g + 8 * h; }
    [[nodiscard]] __device__ int col(int ni) const { return wn * Tile::warp_n + ni * 8 + 2 * q; }
};

/// Tile row this thread copies in its i-th cp.async of a k-tile (A or B alike).
template <class Tile>
[[nodiscard]] __device__ inline int tc_load_row(int i)
{
    return (i * Tile::block_threads + static_cast<int>(threadIdx.x)) / Tile::chunks_per_row;
}

/// Copies k-tile [k0, k0 + 32) of this thread's rows into `stage`; rows given as nullptr, and
/// chunks at or past k, become zeros.
template <class Tile>
__device__ inline void tc_load_stage(TcShared<Tile>& sm, int stage, const bfloat16* const (&a_rows)[Tile::a_loads],
                                     const bfloat16* const (&b_rows)[Tile::b_loads], const bfloat16* a_fallback,
                                     const bfloat16* b_fallback, int k0, int k)
{
    const int kc = (static_cast<int>(threadIdx.x) % Tile::chunks_per_row) * 8;
    const bool k_in = k0 + kc < k;  // k % 8 == 0: a chunk is wholly inside or wholly past K
#pragma unroll
    for (int i = 0; i < Tile::a_loads; ++i) {
        const bool ok = k_in && a_rows[i] != nullptr;
        cp_async_16(&sm.a[stage][tc_load_row<Tile>(i)][kc], ok ? a_rows[i] + k0 + kc : a_fallback, ok);
    }
#pragma unroll
    for (int i = 0; i < Tile::b_loads; ++i) {
        const bool ok = k_in && b_rows[i] != nullptr;
        cp_async_16(&sm.b[stage][tc_load_row<Tile>(i)][kc], ok ? b_rows[i] + k0 + kc : b_fallback, ok);
    }
}

/// The tensor-core tile loop every foe GEMM kernel runs: acc = A_tile[BM, K] B_tile[BN, K]^T.
/// a_rows[i] / b_rows[i] point at the start (column 0) of the A / B row this thread copies in
/// its i-th load (tc_load_row<Tile>(i)), or are nullptr for a row past the matrix (zeros);
/// a_fallback / b_fallback are any mapped addresses (cp.async's source when nothing is read).
/// All threads of the block must call it (it synchronises the block); acc is overwritten. The
/// k-tiles are added in order, so the result does not depend on timing.
template <class Tile>
__device__ inline void tc_mainloop(TcShared<Tile>& sm, const bfloat16* const (&a_rows)[Tile::a_loads],
                                   const bfloat16* const (&b_rows)[Tile::b_loads], const bfloat16* a_fallback,
                                   const bfloat16* b_fallback, int k, TcAccumulators<Tile>& acc)
{
#pragma unroll
    for (int mi = 0; mi < Tile::mma_m; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::mma_n; ++ni)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.0f;

    const int lane = static_cast<int>(threadIdx.x) % 32;
    const TcFragmentCoords<Tile> at;
    const int k_tiles = (k + Tile::bk - 1) / Tile::bk;
    // ldmatrix row addresses: A, lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8 (the
    // a0..a3 order of the mma); B ([n][k] in smem), lanes 0-7 n 0-7 k 0, 8-15 n 0-7 k 8,
    // 16-23 n 8-15 k 0, 24-31 n 8-15 k 8 (b0, b1 of two n8 tiles).
    const int a_row = at.wm * Tile::warp_m + lane % 16, a_k = (lane / 16) * 8;
    const int b_row = at.wn * Tile::warp_n + (lane / 16) * 8 + lane % 8, b_k = ((lane / 8) % 2) * 8;

    if (k_tiles > 0) tc_load_stage<Tile>(sm, 0, a_rows, b_rows, a_fallback, b_fallback, 0, k);
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
        // The stage written here was last read in iteration kt - 1, which ended in a barrier.
        if (kt + 1 < k_tiles)
            tc_load_stage<Tile>(sm, (kt + 1) % 2, a_rows, b_rows, a_fallback, b_fallback, (kt + 1) * Tile::bk, k);
        cp_async_commit();  // possibly empty: keeps "all but the newest group" = k-tile kt
        cp_async_wait<1>();
        __syncthreads();
        const int s = kt % 2;
#pragma unroll
        for (int kk = 0; kk < Tile::bk; kk += 16) {
            std::uint32_t af[Tile::mma_m][4];
            std::uint32_t bf[Tile::mma_n][2];
#pragma unroll
            for (int mi = 0; mi < Tile::mma_m; ++mi) ldmatrix_x4(af[mi], &sm.a[s][a_row + mi * 16][kk + a_k]);
#pragma unroll
            for (int p = 0; p < Tile::mma_n / 2; ++p) {
                std::uint32_t r[4];
                ldmatrix_x4(r, &sm.b[s][b_row + p * 16][kk + b_k]);
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < Tile::mma_m; ++mi)
#pragma unroll
                for (int ni = 0; ni < Tile::mma_n; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni]);
        }
        __syncthreads();  // every warp is done with stage s before iteration kt + 1 refills it
    }
}

/// Two adjacent bf16 stored as one 32-bit word.
struct alignas(4) Bf16Pair {
    bfloat16 x, y;
};

/// Stores v0 (and v1 at idx + 1 when `two`) into c[idx] as bf16 or fp32, after adding beta times
/// the old values when beta != 0. `paired`: idx is even and the row length even, so the pair is
/// 4-byte (bf16) / 8-byte (fp32) aligned and one store does.
__device__ inline void tc_store(void* c, bool out_bf16, std::size_t idx, float v0, float v1, bool two, bool paired,
                                float beta)
{
    if (out_bf16) {
        bfloat16* p = static_cast<bfloat16*>(c) + idx;
        if (beta != 0.0f) {
            v0 += beta * static_cast<float>(p[0]);
            if (two) v1 += beta * static_cast<float>(p[1]);
        }
        if (two && paired) {
            *reinterpret_cast<Bf16Pair*>(p) = Bf16Pair{bfloat16(v0), bfloat16(v1)};
        } else {
            p[0] = bfloat16(v0);
            if (two) p[1] = bfloat16(v1);
        }
    } else {
        float* p = static_cast<float*>(c) + idx;
        if (beta != 0.0f) {
            v0 += beta * p[0];
            if (two) v1 += beta * p[1];
        }
        if (two && paired) {
            *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
        } else {
            p[0] = v0;
            if (two) p[1] = v1;
        }
    }
}

}  // namespace detail

inline namespace kernels_v0_1 {

/// One Tile::bm x Tile::bn tile of C per block: blockIdx.x over M tiles, blockIdx.y over N tiles,
/// blockIdx.z over the batch (matrix z at a + z stride_a, b + z stride_b, c + z stride_c).
template <class Tile>
FOE_KERNEL(Tile::block_threads)
void tc_gemm_kernel(const bfloat16* __restrict__ a, const bfloat16* __restrict__ b, void* c, bool out_bf16, int m,
                    int n, int k, float beta, long long stride_a, long long stride_b, long long stride_c)
{
#ifdef FOE_TC_NO_TENSOR_CORES
    __trap();  // the host launcher refuses devices older than sm_80; never reached
#else
    __shared__ detail::TcShared<Tile> sm;
    const auto z = static_cast<long long>(blockIdx.z);
    a += z * stride_a;
    b += z * stride_b;
    c = out_bf16 ? static_cast<void*>(static_cast<bfloat16*>(c) + z * stride_c)
                 : static_cast<void*>(static_cast<float*>(c) + z * stride_c);
    const index_t m0 = static_cast<index_t>(blockIdx.x) * Tile::bm, n0 = static_cast<index_t>(blockIdx.y) * Tile::bn;
    const bfloat16* a_rows[Tile::a_loads];
    const bfloat16* b_rows[Tile::b_loads];
#pragma unroll
    for (int i = 0; i < Tile::a_loads; ++i) {
        const index_t r = m0 + detail::tc_load_row<Tile>(i);
        a_rows[i] = r < m ? a + static_cast<std::size_t>(r) * static_cast<std::size_t>(k) : nullptr;
    }
#pragma unroll
    for (int i = 0; i < Tile::b_loads; ++i) {
        const index_t r = n0 + detail::tc_load_row<Tile>(i);
        b_rows[i] = r < n ? b + static_cast<std::size_t>(r) * static_cast<std::size_t>(k) : nullptr;
    }
    detail::TcAccumulators<Tile> acc;
    detail::tc_mainloop<Tile>(sm, a_rows, b_rows, a, b, k, acc);

    const detail::TcFragmentCoords<Tile> at;
    const bool paired = n % 2 == 0;
#pragma unroll
    for (int mi = 0; mi < Tile::mma_m; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const index_t row = m0 + at.row(mi, h);
            if (row >= m) continue;
#pragma unroll
            for (int ni = 0; ni < Tile::mma_n; ++ni) {
                const index_t col = n0 + at.col(ni);
                if (col >= n) continue;
                detail::tc_store(c, out_bf16, static_cast<std::size_t>(row) * static_cast<std::size_t>(n) + static_cast<std::size_t>(col),
                                 acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], col + 1 < n, paired, beta);
            }
        }
#endif
}

}  // namespace kernels_v0_1

namespace detail {

/// The current device's compute capability major and SM count; throws foe::CudaError for a
/// device without bf16 tensor cores. Attribute queries only (no stream work): legal while a
/// stream is being captured.
struct TcDevice {
    int major = 0;
    int sms = 0;
};
[[nodiscard]] inline TcDevice tc_device(const char* who)
{
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    TcDevice d;
    check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute(major)");
    check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SM count)");
    require<CudaError>(d.major >= 8, who, " needs bf16 tensor cores and cp.async (compute capability 8.0 or newer); device ",
                       dev, " has compute capability ", d.major, ".x");
    return d;
}

/// Throws foe::CudaError when the code the device would run for `kernel` was compiled for an
/// architecture below sm_80 (a build without an sm_80+ image JIT-compiles older PTX, where the
/// tensor-core path is a trap): the device's compute capability alone does not tell.
template <class Kernel>
void require_tensor_core_image(Kernel* kernel, const char* who)
{
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    require<CudaError>(attributes.ptxVersion >= 80, who, ": this program's code for the device was compiled for "
                       "compute_", attributes.ptxVersion, "; the tensor-core kernels need 80 or newer (add 80 or 90a "
                       "to CMAKE_CUDA_ARCHITECTURES)");
}

[[nodiscard]] inline bool aligned16(const void* p) noexcept { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class Tile>
void launch_tc_gemm(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c, index_t stride_c,
                    index_t batch, OutType out, index_t m, index_t n, index_t k, cudaStream_t stream, float beta)
{
    const index_t n_tiles = ceil_div(n, Tile::bn);
    require(n_tiles <= 65535, "TcGemm: N (", n, ") needs ", n_tiles, " column tiles, more than the grid's 65535");
    require(batch <= 65535, "TcGemm: a batch of ", batch, " exceeds the grid's 65535");
    require_tensor_core_image(tc_gemm_kernel<Tile>, "TcGemm");
    const dim3 grid(static_cast<unsigned>(ceil_div(m, Tile::bm)), static_cast<unsigned>(n_tiles),
                    static_cast<unsigned>(batch));
    tc_gemm_kernel<Tile><<<grid, Tile::block_threads, 0, stream>>>(
        a, b, c, out == OutType::bf16, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), beta,
        static_cast<long long>(stride_a), static_cast<long long>(stride_b), static_cast<long long>(stride_c));
    check_launch("tc_gemm_kernel");
}

}  // namespace detail

inline void TcGemm::nt(const bfloat16* a, const bfloat16* b, void* c, OutType out, index_t m, index_t n, index_t k,
                       cudaStream_t stream, float beta) const
{
    run(a, 0, b, 0, c, 0, 1, out, m, n, k, stream, beta);
}

inline void TcGemm::nt_batched(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c,
                               index_t stride_c, index_t batch, OutType out, index_t m, index_t n, index_t k,
                               cudaStream_t stream, float beta) const
{
    require(batch >= 0 && stride_a >= 0 && stride_b >= 0 && stride_c >= 0, "TcGemm: bad batch ", batch,
            " or strides A ", stride_a, ", B ", stride_b, ", C ", stride_c);
    // 16 bytes: 8 bf16 (A, B, bf16 C) or 4 fp32 (C).
    require(stride_a % 8 == 0 && stride_b % 8 == 0 && stride_c % (out == OutType::bf16 ? 8 : 4) == 0,
            "TcGemm: batch strides A ", stride_a, ", B ", stride_b, ", C ", stride_c,
            " must keep every matrix 16-byte aligned");
    if (batch == 0) return;
    run(a, stride_a, b, stride_b, c, stride_c, batch, out, m, n, k, stream, beta);
}

inline void TcGemm::run(const bfloat16* a, index_t stride_a, const bfloat16* b, index_t stride_b, void* c,
                        index_t stride_c, index_t batch, OutType out, index_t m, index_t n, index_t k,
                        cudaStream_t stream, float beta) const
{
    require(m >= 0 && n >= 0 && k >= 0 && m <= 0x7fffffff && n <= 0x7fffffff && k <= 0x7fffffff,
            "TcGemm: bad shape M ", m, ", N ", n, ", K ", k, " (each must be in [0, 2^31 - 1])");
    require(k % 8 == 0, "TcGemm: K (", k, ") must be a multiple of 8 (rows are copied in 16-byte chunks)");
    require(detail::aligned16(a) && detail::aligned16(b) && detail::aligned16(c),
            "TcGemm: A, B and C must be 16-byte aligned (A ", static_cast<const void*>(a), ", B ",
            static_cast<const void*>(b), ", C ", c, ")");
    if (m == 0 || n == 0) return;
    const detail::TcDevice dev = detail::tc_device("TcGemm");
    // 128 x 128 tiles when they alone give every SM a block; smaller ones otherwise, so a
    // decode-size GEMM (a few rows) still spreads over the GPU. Not split-K: that would need a
    // second pass (or atomics, which would break determinism) for a gain only at tiny M x N.
    // A batch's matrices all count towards filling the GPU (the tile changes no result bits).
    const bool large = tile_ == TcTileChoice::automatic
                           ? batch * detail::ceil_div(m, TcLargeTile::bm) * detail::ceil_div(n, TcLargeTile::bn) >= dev.sms
                           : tile_ == TcTileChoice::large;
    if (large)
        detail::launch_tc_gemm<TcLargeTile>(a, stride_a, b, stride_b, c, stride_c, batch, out, m, n, k, stream, beta);
    else
        detail::launch_tc_gemm<TcSmallTile>(a, stride_a, b, stride_b, c, stride_c, batch, out, m, n, k, stream, beta);
}

}  // namespace foe::cuda
