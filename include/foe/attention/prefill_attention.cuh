#pragma once
// Causal GQA attention of a ragged batch on the device (prefill and chunked prefill), and the
// dispatcher that sends decode steps to the split-KV decode kernel.
//
// Row i of the batch (sequence b, position p = starts[b] + its index among b's new tokens, which
// is positions[i]) attends to positions [0, p] of slot slots[b] of the head-major caches [slots,
// kv_heads, capacity, head_dim], or of a paged cache (pools [pages, kv_heads, page_size, head_dim]
// and a device block table: foe/attention/kv_layout.cuh); the chunk's own keys are appended
// (append_kv) before the call, so a chunk whose start > 0 sees its cached prefix. Query head h
// uses KV head h / (query_heads / kv_heads); scores are scaled by 1/sqrt(head_dim). Positions the
// layout does not map (past a contiguous slot's capacity, an unassigned page) are masked out and
// never read. Both layouts give the same bits for the same rows: each kernel reads a row through
// the layout but computes on it exactly as on the other's.
//
// Tensor-core kernel (head_dim 32, 64, 96, 128 on sm_80+), FlashAttention-2's scheme: a block
// owns 64 query rows of one query head of one sequence (4 warps, 16 rows each); it walks the
// K/V tiles of 64 positions up to its last row's position, S = Q K^T (bf16 mma.sync m16n8k16,
// fp32 accumulators), online softmax in fp32 (running max and sum per row, the output rescaled
// when the max grows), O += P V with P rounded to bf16 (as FlashAttention does: the MMA takes
// bf16 operands; the row sums add the rounded values, so the weights applied are the weights
// normalised). K/V tiles stream through shared memory with cp.async: V(j) loads while S(j) is
// computed, K(j+1) while P V(j) is. Positions past a row's p are masked to -inf inside diagonal
// tiles; cache rows past the block's last position, or not mapped, are never loaded (zero-filled),
// so stale or poisoned cache contents cannot leak in as NaN. A paged tile's rows are gathered row
// by row through the block table (16-byte copies, one table read per copy). Every row sees key 0,
// so no row is all -inf (unless key 0 is not mapped: a broken table gives zeros, not NaN).
//
// Grid: (query tiles of max_new_tokens, query heads, sequences). One query head per block, not
// the GQA group's heads packed into the M dimension: foe-1b's groups have one query head per KV
// head (nothing to pack) and foe-7b's two; the K/V tile re-read by the group's other head comes
// from L2, and a per-head block keeps the causal mask a function of the row alone. Tiles are
// issued last first (the longest rows under the causal mask start first, the short ones fill the
// tail). Blocks whose tile starts past their sequence's new tokens exit at once.
//
// Any other head_dim <= 256 (the tests' tiny model uses 8), code built for an architecture older
// than sm_80, or pointers/strides that are not 16-byte aligned go to a simple kernel: one warp
// per (row, query head), fp32 on CUDA cores, the same online softmax over chunks of 32 positions.
//
// Both kernels add in a fixed order: the same inputs give bit-identical outputs run to run.
//
// Groups (foe/cuda/groups.cuh): one launch may cover the G groups of an FoE layer, each with the
// shape's query_heads and kv_heads. The query-head index is folded with the group (g x
// query_heads + h: the tensor-core grid's y, the simple kernel's work index), and group g reads
// q + g * groups.in and its caches + g * groups.cache, and writes out + g * groups.out. A group
// computes exactly what its own launch would: the same rows, in the same order.

#include <cmath>
#include <cstdint>

#include "foe/attention/decode_attention.cuh"
#include "foe/attention/kv_layout.cuh"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/groups.cuh"

namespace foe::cuda {

/// The attention of one layer's (or one FoE group's) heads over its KV cache.
struct AttentionShape {
    index_t query_heads = 0;
    index_t kv_heads = 0;
    index_t head_dim = 0;
    index_t capacity = 0;  ///< positions per cache slot (paged: the most a sequence holds; sizes the decode workspace)
};

/// out [batch.tokens, query_heads, head_dim] (contiguous) = causal attention of the batch's rows.
/// q: row i's query_heads x head_dim values start at q + i * q_row_stride (q_row_stride >=
/// query_heads * head_dim; larger when q is the leading columns of a fused qkv buffer). kcache and
/// vcache: [slots, kv_heads, capacity, head_dim], already holding every position each row sees
/// (positions < capacity). batch.max_new_tokens must bound every sequence's new tokens: rows past
/// it are not computed. No workspace; stream-ordered; deterministic.
inline void prefill_attention(const AttentionShape& s, const DeviceBatch& batch, const bfloat16* q,
                              index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, bfloat16* out,
                              cudaStream_t stream);

/// The same over a cache of any layout: ContiguousKvLayout (as above, with its own capacity), or
/// PagedKvLayout (kcache and vcache the pools, the block table in device memory). Positions the
/// layout does not map are masked out and not read. Kernel arguments only: capturable in a CUDA
/// graph, with the block table's contents free to change between replays. `groups`: one launch
/// over groups.count groups of s's heads each (q, the caches and out shifted by groups.in, .cache
/// and .out per group; the layout and block table shared).
template <KvLayout Layout>
void prefill_attention(const AttentionShape& s, const Layout& layout, const DeviceBatch& batch, const bfloat16* q,
                       index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, bfloat16* out,
                       cudaStream_t stream, const GroupStrides& groups = {});

/// Workspace bytes of attention() for batches of up to max_sequences sequences (the decode path's
/// split-KV partials; the prefill path needs none), for a launch over `groups` groups.
[[nodiscard]] inline std::size_t attention_workspace_bytes(const AttentionShape& s, index_t max_sequences,
                                                           index_t groups = 1);

/// Attention of a ragged batch, choosing the kernel: a pure decode step (every sequence brings
/// exactly one token: max_new_tokens == 1 and tokens == sequences) runs decode_attention over
/// lengths[b] = starts[b] + 1 positions, split over the KV length; anything else runs
/// prefill_attention. Arguments as prefill_attention's; workspace holds
/// attention_workspace_bytes(s, n) bytes with n >= batch.sequences.
inline void attention(const AttentionShape& s, const DeviceBatch& batch, const bfloat16* q, index_t q_row_stride,
                      const bfloat16* kcache, const bfloat16* vcache, void* workspace, bfloat16* out,
                      cudaStream_t stream);

/// The same over a cache of any layout (decode_attention or prefill_attention with `layout`), and
/// over groups.count groups in one launch (workspace: attention_workspace_bytes(s, n, groups.count)).
template <KvLayout Layout>
void attention(const AttentionShape& s, const Layout& layout, const DeviceBatch& batch, const bfloat16* q,
               index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, void* workspace, bfloat16* out,
               cudaStream_t stream, const GroupStrides& groups = {});

/// Tensor-core kernel: 4 warps of 16 query rows each (one m16 MMA row block per warp), K/V tiles
/// of 64 positions. Shared memory at head_dim 128: two tiles of 64 x (128 + 8) bf16 = 34 KB,
/// under the 48 KB static limit with room for 2+ blocks per SM; registers: O 16 x 128 fp32 per
/// warp is 64 per thread, Q's fragments 32, S 32.
struct PrefillAttentionLaunch {
    static constexpr int warps = 4;
    static constexpr int block_threads = warps * 32;
    static constexpr int block_m = warps * 16;  ///< query rows per block
    static constexpr int block_n = 64;          ///< positions per K/V tile
    /// 8 bf16 (16 bytes) of padding per shared-memory row: rows are then 16 bytes apart modulo the
    /// 128-byte bank window for every head_dim in {32, 64, 96, 128}, so the 8 rows one ldmatrix
    /// phase reads hit 8 distinct 16-byte bank groups (conflict free).
    static constexpr int smem_pad = 8;
    static constexpr int fallback_threads = 128;  ///< 4 warps, one (row, query head) each
    static constexpr int max_head_dim = 256;
};

// ---------------------------------------------------------------------------------------------

namespace detail::prefill {

/// Shared-memory address of a generic pointer into shared memory (what ldmatrix and cp.async take).
[[nodiscard]] __device__ inline unsigned smem_address(const void* p)
{
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

/// 16-byte asynchronous global -> shared copy; zero-fills the 16 bytes when !valid (src is not read).
__device__ inline void cp_async_16(unsigned dst, const void* src, bool valid)
{
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ inline void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// Four 8x8 bf16 matrices from shared memory; lane l supplies the address of row l % 8 of matrix
/// l / 8, and register i receives matrix i in the MMA fragment layout.
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
/// The same, each matrix transposed.
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/// c (16x8 fp32) += a (16x16 bf16, row) b (16x8 bf16, col).
__device__ inline void mma_bf16_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats rounded to nearest-even bf16, lo in the low half (the lower column of a fragment).
[[nodiscard]] __device__ inline std::uint32_t pack_bf16x2(float lo, float hi)
{
    std::uint32_t r = 0;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
[[nodiscard]] __device__ inline float bf16x2_lo(std::uint32_t r) { return __uint_as_float(r << 16); }
[[nodiscard]] __device__ inline float bf16x2_hi(std::uint32_t r) { return __uint_as_float(r & 0xffff0000u); }

constexpr float neg_inf = -__builtin_huge_valf();

/// What one (row, folded head) of a grouped launch works on: element offsets of its q values
/// (row stride q_row_stride) and of its output ([rows, query_heads, head_dim] per group), and its
/// group's cache base (added to the layout's offsets).
struct GroupedRowHead {
    int group, head;
    std::int64_t q, out, cache;
};
[[nodiscard]] FOE_HOST_DEVICE constexpr GroupedRowHead grouped_row_head(const GroupStrides& gs, int query_heads,
                                                                        int folded, long long row,
                                                                        long long q_row_stride, int head_dim) noexcept
{
    const HeadFold fold{query_heads};
    const int g = fold.group(folded), h = fold.head(folded);
    return {g, h, GroupStrides::at(gs.in, g) + row * q_row_stride + static_cast<std::int64_t>(h) * head_dim,
            GroupStrides::at(gs.out, g) + (row * query_heads + h) * static_cast<std::int64_t>(head_dim),
            GroupStrides::at(gs.cache, g)};
}

/// The simple kernel's work item `work` (one warp) of a launch over `groups` groups: row work /
/// (groups x query_heads), folded head work % (groups x query_heads).
struct SimpleWork {
    long long row;
    int folded;
};
[[nodiscard]] FOE_HOST_DEVICE constexpr SimpleWork simple_work(long long work, int query_heads, int groups) noexcept
{
    const long long heads = static_cast<long long>(query_heads) * groups;
    return {work / heads, static_cast<int>(work % heads)};
}

}  // namespace detail::prefill

inline namespace kernels_v0_1 {

/// One block: query rows [tile * block_m, ...) of sequence blockIdx.z, query head blockIdx.y.
template <int HEAD_DIM, class Layout, class Launch = PrefillAttentionLaunch>
FOE_KERNEL(Launch::block_threads)
void prefill_attention_mma_kernel(const bfloat16* __restrict__ q, long long q_row_stride,
                                  const bfloat16* __restrict__ kcache, const bfloat16* __restrict__ vcache,
                                  const std::int32_t* __restrict__ row_offsets, const std::int32_t* __restrict__ slots,
                                  const std::int32_t* __restrict__ starts, int query_heads, int kv_heads, Layout layout,
                                  float scale_log2, bfloat16* __restrict__ out, GroupStrides groups)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // never launched: the host sees this image's PTX target and takes the simple kernel
#else
    namespace dp = detail::prefill;
    constexpr int D = HEAD_DIM, BM = Launch::block_m, BN = Launch::block_n, LD = D + Launch::smem_pad;
    constexpr int threads = Launch::block_threads;
    constexpr int KD = D / 16;   // k16 steps of S = Q K^T over head_dim
    constexpr int NT = BN / 8;   // n8 tiles of S over the tile's positions
    constexpr int KN = BN / 16;  // k16 steps of O += P V over the positions
    constexpr int DT = D / 8;    // n8 tiles of O over head_dim
    constexpr int CH = D / 8;    // 16-byte chunks per row
    static_assert(D % 16 == 0 && D <= 256, "tensor-core head_dim is a multiple of 16");
    static_assert(BM == Launch::warps * 16 && BM == BN, "one m16 row block per warp; Q is staged in the K buffer");
    static_assert(BN % 16 == 0 && (LD * 2) % 16 == 0, "tiles of whole k16 steps; 16-byte aligned smem rows");
    // Raw bits (foe::bfloat16 has a default member initialiser, which __shared__ variables may not).
    __shared__ __align__(16) std::uint16_t sk[BN * LD];
    __shared__ __align__(16) std::uint16_t sv[BN * LD];

    const int tile = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // longest rows first
    // blockIdx.y: the folded head g x query_heads + h; group g's operands start g strides in.
    const auto at0 = dp::grouped_row_head(groups, query_heads, static_cast<int>(blockIdx.y), 0, 0, D);
    const int h = at0.head, b = static_cast<int>(blockIdx.z);
    q += GroupStrides::at(groups.in, at0.group);
    out += GroupStrides::at(groups.out, at0.group);
    kcache += at0.cache;
    vcache += at0.cache;
    const int row0 = row_offsets[b], new_tokens = row_offsets[b + 1] - row0;
    const int m0 = tile * BM;
    if (m0 >= new_tokens) return;
    const int rows = min(BM, new_tokens - m0);  // valid query rows of this tile
    const int start = starts[b];
    const int kv_end = start + m0 + rows;  // positions [0, kv_end) are seen by some row
    const int kvh = h / (query_heads / kv_heads), slot = slots[b];
    const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: row group, thread in group

    // The cache row of position key of this block's (slot, KV head), in elements; -1 when the
    // layout does not map it or no row of the block sees it (key >= kv_end).
    const auto row_of = [&](int key) -> long long {
        return key < kv_end ? layout.offset(slot, kvh, key, kv_heads, D) : -1;
    };

    // Tile rows [0, BN) from positions key0 + r (a contiguous run of the head's cache within a
    // slot or page), 16-byte chunks, consecutive threads on consecutive chunks; rows without a
    // cache row (row_of < 0) are zero-filled, not read.
    const auto load_tile = [&](std::uint16_t* dst, const bfloat16* cache, int key0) {
        for (int c = tid; c < BN * CH; c += threads) {
            const int r = c / CH, col = (c % CH) * 8;
            const long long at = row_of(key0 + r);
            const bool valid = at >= 0;
            dp::cp_async_16(dp::smem_address(dst + r * LD + col),
                            cache + static_cast<std::size_t>(valid ? at : 0) + col, valid);
        }
    };

    // Q tile: staged in sk (rows past the sequence zero-filled), then held in registers as A fragments.
    for (int c = tid; c < BM * CH; c += threads) {
        const int r = c / CH, col = (c % CH) * 8;
        const bool valid = r < rows;
        const auto row = static_cast<std::size_t>(row0 + m0 + (valid ? r : 0));
        const bfloat16* src = q + row * static_cast<std::size_t>(q_row_stride) + static_cast<std::size_t>(h) * D + col;
        dp::cp_async_16(dp::smem_address(sk + r * LD + col), src, valid);
    }
    dp::cp_async_commit();
    dp::cp_async_wait<0>();
    __syncthreads();
    std::uint32_t qf[KD][4];
#pragma unroll
    for (int kd = 0; kd < KD; ++kd) {
        const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = kd * 16 + (lane >> 4) * 8;
        dp::ldmatrix_x4(qf[kd], dp::smem_address(sk + r * LD + col));
    }
    __syncthreads();  // every warp holds its Q before K(0) overwrites the staging buffer

    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float row_max[2] = {dp::neg_inf, dp::neg_inf};  // log2 domain, rows g and g + 8 of the warp
    float row_sum[2] = {0.0f, 0.0f};                // this thread's columns only; quad-reduced at the end
    const int first_pos = start + m0;               // the block's smallest row position
    const int pos0 = first_pos + warp * 16 + g;     // position of row g; row g + 8 is pos0 + 8
    const int tiles = (kv_end + BN - 1) / BN;

    // Pipeline (one K and one V buffer): groups committed in the order K0 | V0 K1 | V1 K2 | ...;
    // wait_group<1> before S(j) leaves only V(j) in flight, before P V(j) only K(j+1).
    load_tile(sk, kcache, 0);
    dp::cp_async_commit();
    for (int j = 0; j < tiles; ++j) {
        const int key0 = j * BN;
        load_tile(sv, vcache, key0);
        // Which of the tile's 64 keys were loaded (bit r: key0 + r), the same in every lane: lane
        // l asks for keys key0 + l and key0 + 32 + l.
        const unsigned loaded_lo = __ballot_sync(0xffffffffu, row_of(key0 + lane) >= 0);
        const unsigned loaded_hi = __ballot_sync(0xffffffffu, row_of(key0 + 32 + lane) >= 0);
        dp::cp_async_commit();
        dp::cp_async_wait<1>();
        __syncthreads();  // K(j) visible to every warp

        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                // Matrices: (keys +0..7, dims +0..7), (keys +0..7, dims +8..15), (keys +8..15, dims
                // +0..7), (keys +8..15, dims +8..15) = b0, b1 of n-tile 2np and of n-tile 2np + 1.
                std::uint32_t kb[4];
                const int r = np * 16 + (lane & 7) + (lane >> 4) * 8, col = kd * 16 + ((lane >> 3) & 1) * 8;
                dp::ldmatrix_x4(kb, dp::smem_address(sk + r * LD + col));
                dp::mma_bf16_16816(s[2 * np], qf[kd], kb[0], kb[1]);
                dp::mma_bf16_16816(s[2 * np + 1], qf[kd], kb[2], kb[3]);
            }
        }
        __syncthreads();  // every warp is done with K(j): the buffer takes K(j+1)
        if (j + 1 < tiles) load_tile(sk, kcache, key0 + BN);
        dp::cp_async_commit();  // an empty group after the last tile keeps the wait counts uniform

        // Causal mask (only where some position of the tile exceeds the block's first row), by
        // assignment so that nothing computed from a masked position survives; then the scale.
        // Fragment element e of n-tile nt: row g (e < 2) or g + 8, position key0 + nt*8 + 2t + e%2.
        // Keys that were zero-filled, not loaded (past the slot's capacity, an unmapped page): masked
        // too, so a row that sees them (a broken precondition) is not silently diluted.
        const bool diagonal = key0 + BN - 1 > first_pos || (loaded_lo & loaded_hi) != 0xffffffffu;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = nt * 8 + 2 * t + (e & 1), key = key0 + r;
                const bool loaded = ((r < 32 ? loaded_lo >> r : loaded_hi >> (r - 32)) & 1u) != 0;
                const bool masked = key > pos0 + (e >> 1) * 8 || !loaded;
                s[nt][e] = diagonal && masked ? dp::neg_inf : s[nt][e] * scale_log2;
            }

        // Online softmax: new row max over the quad's columns (fixed shuffle order), rescale.
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = dp::neg_inf;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(row_max[r], mx);
            // Position 0 is in tile 0 and seen by every row, so m_new is finite from the first
            // tile on; the guard only keeps a would-be all-masked row at zeros instead of NaN.
            const float m_use = m_new == dp::neg_inf ? 0.0f : m_new;
            alpha[r] = exp2f(row_max[r] - m_use);  // 0 on the first tile (row_max = -inf)
            row_max[r] = m_new;
            row_sum[r] *= alpha[r];
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * r] *= alpha[r];
                o[dt][2 * r + 1] *= alpha[r];
            }
        }

        // P = exp2(s - m), rounded to bf16 for the P V MMA. The C fragments of n-tiles 2kk and
        // 2kk + 1 are the A fragment of k-step kk: a0 = (g, 2t..), a1 = (g + 8, 2t..),
        // a2 = (g, 8 + 2t..), a3 = (g + 8, 8 + 2t..).
        std::uint32_t pa[KN][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_use = row_max[r] == dp::neg_inf ? 0.0f : row_max[r];
                const std::uint32_t pr =
                    dp::pack_bf16x2(exp2f(s[nt][2 * r] - m_use), exp2f(s[nt][2 * r + 1] - m_use));
                row_sum[r] += dp::bf16x2_lo(pr) + dp::bf16x2_hi(pr);
                pa[nt / 2][(nt % 2) * 2 + r] = pr;
            }
        }

        dp::cp_async_wait<1>();
        __syncthreads();  // V(j) visible to every warp
#pragma unroll
        for (int kk = 0; kk < KN; ++kk) {
#pragma unroll
            for (int dpair = 0; dpair < DT / 2; ++dpair) {
                // Transposed matrices: (keys +0..7, dims +0..7), (keys +8..15, dims +0..7), (keys
                // +0..7, dims +8..15), (keys +8..15, dims +8..15) = b0, b1 of d-tiles 2dpair, 2dpair + 1.
                std::uint32_t vb[4];
                const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = dpair * 16 + (lane >> 4) * 8;
                dp::ldmatrix_x4_trans(vb, dp::smem_address(sv + r * LD + col));
                dp::mma_bf16_16816(o[2 * dpair], pa[kk], vb[0], vb[1]);
                dp::mma_bf16_16816(o[2 * dpair + 1], pa[kk], vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with V(j): the buffer takes V(j+1)
    }
    dp::cp_async_wait<0>();

    // out = O / l, rows of this tile only; thread (g, t) writes columns 2t, 2t + 1 of each d-tile.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const int local = warp * 16 + g + r * 8;
        if (local >= rows) continue;
        bfloat16* orow = out + (static_cast<std::size_t>(row0 + m0 + local) * static_cast<std::size_t>(query_heads) +
                                static_cast<std::size_t>(h)) *
                                   D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<std::uint32_t*>(orow + dt * 8 + 2 * t) =
                dp::pack_bf16x2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
#endif
}

/// One warp per (row, query head), any head_dim <= Launch::max_head_dim: lanes over 32
/// positions at a time for the scores (each lane a whole dot product), lanes over head_dim for
/// the output; the online softmax runs over those chunks of 32 in order.
template <class Layout, class Launch = PrefillAttentionLaunch>
FOE_KERNEL(Launch::fallback_threads)
void prefill_attention_simple_kernel(const bfloat16* __restrict__ q, long long q_row_stride,
                                     const bfloat16* __restrict__ kcache, const bfloat16* __restrict__ vcache,
                                     const std::int32_t* __restrict__ token_slots,
                                     const std::int32_t* __restrict__ positions, long long tokens, int query_heads,
                                     int kv_heads, int head_dim, Layout layout, float scale, bfloat16* __restrict__ out,
                                     GroupStrides groups)
{
    constexpr int warps = Launch::fallback_threads / 32;
    constexpr int per_lane = Launch::max_head_dim / 32;
    __shared__ float qs[warps][Launch::max_head_dim];
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    const long long work = static_cast<long long>(blockIdx.x) * warps + warp;
    if (work >= tokens * query_heads * groups.count) return;  // whole warps leave; no block barrier follows
    const auto [row, folded] = detail::prefill::simple_work(work, query_heads, groups.count);
    const auto at = detail::prefill::grouped_row_head(groups, query_heads, folded, row, q_row_stride, head_dim);
    const int h = at.head, kvh = h / (query_heads / kv_heads);
    kcache += at.cache;
    vcache += at.cache;

    const bfloat16* qr = q + at.q;
    for (int d = lane; d < head_dim; d += 32) qs[warp][d] = static_cast<float>(qr[d]);
    __syncwarp();
    // Keys [0, last], of which those the layout maps (a contiguous slot: all of them).
    const int last = static_cast<int>(min(static_cast<std::int64_t>(positions[row]), layout.positions() - 1));
    const int slot = token_slots[row];

    float o[per_lane];
#pragma unroll
    for (int i = 0; i < per_lane; ++i) o[i] = 0.0f;
    float m = detail::prefill::neg_inf, l = 0.0f;
    for (int j0 = 0; j0 <= last; j0 += 32) {
        const int key = j0 + lane;
        const long long at = key <= last ? layout.offset(slot, kvh, key, kv_heads, head_dim) : -1;
        float s = detail::prefill::neg_inf;
        if (at >= 0) {
            const bfloat16* kr = kcache + at;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; ++d) dot = fmaf(qs[warp][d], static_cast<float>(kr[d]), dot);
            s = dot * scale;
        }
        // Position j0 <= last is in every chunk, so the chunk max is finite, unless the layout maps
        // none of the chunk's keys so far (an unassigned page): then subtract 0, not -inf, and the
        // weights stay 0 instead of NaN.
        const float m_new = fmaxf(m, detail::warp_max(s));
        const float m_use = m_new == detail::prefill::neg_inf ? 0.0f : m_new;
        const float alpha = expf(m - m_use);  // 0 on the first chunk (m = -inf)
        const float e = at >= 0 ? expf(s - m_use) : 0.0f;
        l = l * alpha + detail::warp_sum(e);
#pragma unroll
        for (int i = 0; i < per_lane; ++i) o[i] *= alpha;
        const unsigned mapped = __ballot_sync(0xffffffffu, at >= 0);  // the same in every lane
        const int n = min(32, last + 1 - j0);
        for (int jj = 0; jj < n; ++jj) {
            if (((mapped >> jj) & 1u) == 0) continue;  // a row that is not mapped is not read
            const float p = __shfl_sync(0xffffffffu, e, jj);
            const bfloat16* vr = vcache + __shfl_sync(0xffffffffu, at, jj);
#pragma unroll
            for (int i = 0; i < per_lane; ++i) {
                const int d = lane + 32 * i;
                if (d < head_dim) o[i] = fmaf(p, static_cast<float>(vr[d]), o[i]);
            }
        }
        m = m_new;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    bfloat16* orow = out + at.out;
#pragma unroll
    for (int i = 0; i < per_lane; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) orow[d] = bfloat16(o[i] * inv);
    }
}

}  // namespace kernels_v0_1

// ---------------------------------------------------------------------------------------------

namespace detail::prefill {

/// Runs the tensor-core kernel when the image the current device would execute was compiled for
/// sm_80 or later (an older image holds only the __trap() stub); returns false otherwise. Asking
/// the runtime about the image, not the device, also covers a device that JIT-compiles an older
/// PTX target.
template <int HEAD_DIM, class Layout>
[[nodiscard]] bool launch_mma(const AttentionShape& s, const Layout& layout, const DeviceBatch& batch,
                              const bfloat16* q, index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache,
                              bfloat16* out, cudaStream_t stream, const GroupStrides& groups)
{
    using L = PrefillAttentionLaunch;
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, prefill_attention_mma_kernel<HEAD_DIM, Layout, L>),
          "cudaFuncGetAttributes (prefill_attention_mma_kernel)");
    if (attributes.ptxVersion < 80) return false;
    const float scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(HEAD_DIM)));
    const dim3 grid(static_cast<unsigned>(ceil_div(batch.max_new_tokens, L::block_m)),
                    static_cast<unsigned>(groups.count * s.query_heads), static_cast<unsigned>(batch.sequences));
    prefill_attention_mma_kernel<HEAD_DIM, Layout><<<grid, L::block_threads, 0, stream>>>(
        q, static_cast<long long>(q_row_stride), kcache, vcache, batch.row_offsets, batch.slots, batch.starts,
        static_cast<int>(s.query_heads), static_cast<int>(s.kv_heads), layout, scale_log2, out, groups);
    check_launch("prefill_attention_mma_kernel");
    return true;
}

[[nodiscard]] inline ContiguousKvLayout contiguous_layout(const AttentionShape& s, const char* who)
{
    require(s.capacity > 0 && s.capacity <= 0x7fffffff, who, ": capacity ", s.capacity, " outside [1, 2^31)");
    return ContiguousKvLayout{static_cast<std::int32_t>(s.capacity)};
}

}  // namespace detail::prefill

template <KvLayout Layout>
void prefill_attention(const AttentionShape& s, const Layout& layout, const DeviceBatch& batch, const bfloat16* q,
                       index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, bfloat16* out,
                       cudaStream_t stream, const GroupStrides& groups)
{
    using L = PrefillAttentionLaunch;
    require(s.kv_heads > 0 && s.query_heads > 0 && s.query_heads % s.kv_heads == 0, "prefill_attention: ",
            s.query_heads, " query heads are not a positive multiple of ", s.kv_heads, " KV heads");
    require(groups.count >= 1, "prefill_attention: ", groups.count, " groups; at least 1");
    require(groups.count * s.query_heads <= 65535, "prefill_attention: ", groups.count, " groups of ", s.query_heads,
            " query heads exceed the grid's 65535");
    require(s.head_dim > 0 && s.head_dim <= L::max_head_dim, "prefill_attention: head_dim ", s.head_dim,
            " outside [1, ", L::max_head_dim, "]");
    require(s.capacity > 0 && s.capacity <= 0x7fffffff, "prefill_attention: capacity ", s.capacity,
            " outside [1, 2^31)");
    layout.check("prefill_attention");
    require(q_row_stride >= s.query_heads * s.head_dim, "prefill_attention: q_row_stride ", q_row_stride,
            " is less than query_heads * head_dim = ", s.query_heads * s.head_dim);
    require(batch.sequences >= 0 && batch.sequences <= 65535, "prefill_attention: ", batch.sequences,
            " sequences outside [0, 65535]");
    require(batch.tokens >= 0 && batch.tokens <= 0x7fffffff && batch.max_new_tokens >= 0,
            "prefill_attention: bad token counts (tokens ", batch.tokens, ", max_new_tokens ", batch.max_new_tokens,
            ")");
    if (batch.tokens == 0 || batch.sequences == 0) return;
    require(batch.max_new_tokens > 0, "prefill_attention: max_new_tokens is 0 for a batch of ", batch.tokens,
            " tokens");

    auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
    // 16-byte cp.async of Q/K/V rows: aligned pointers and a q stride of whole 16-byte chunks
    // (cache rows are head_dim apart, a multiple of 16 elements at every tensor-core head_dim).
    // Every group's operands aligned too: group strides of whole 16-byte chunks.
    if (q_row_stride % 8 == 0 && groups.in % 8 == 0 && groups.cache % 8 == 0 && groups.out % 8 == 0 && aligned(q) &&
        aligned(kcache) && aligned(vcache) && aligned(out)) {
        using namespace detail::prefill;
        bool done = false;
        switch (s.head_dim) {
        case 32: done = launch_mma<32>(s, layout, batch, q, q_row_stride, kcache, vcache, out, stream, groups); break;
        case 64: done = launch_mma<64>(s, layout, batch, q, q_row_stride, kcache, vcache, out, stream, groups); break;
        case 96: done = launch_mma<96>(s, layout, batch, q, q_row_stride, kcache, vcache, out, stream, groups); break;
        case 128: done = launch_mma<128>(s, layout, batch, q, q_row_stride, kcache, vcache, out, stream, groups); break;
        default: break;
        }
        if (done) return;
    }
    constexpr int warps = L::fallback_threads / 32;
    const index_t blocks = detail::ceil_div(batch.tokens * groups.count * s.query_heads, warps);
    require(blocks <= 0x7fffffff, "prefill_attention: ", batch.tokens, " tokens x ", groups.count * s.query_heads,
            " heads exceed the grid");
    const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
    prefill_attention_simple_kernel<Layout><<<static_cast<unsigned>(blocks), L::fallback_threads, 0, stream>>>(
        q, static_cast<long long>(q_row_stride), kcache, vcache, batch.token_slots, batch.positions,
        static_cast<long long>(batch.tokens), static_cast<int>(s.query_heads), static_cast<int>(s.kv_heads),
        static_cast<int>(s.head_dim), layout, scale, out, groups);
    check_launch("prefill_attention_simple_kernel");
}

inline void prefill_attention(const AttentionShape& s, const DeviceBatch& batch, const bfloat16* q,
                              index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, bfloat16* out,
                              cudaStream_t stream)
{
    prefill_attention(s, detail::prefill::contiguous_layout(s, "prefill_attention"), batch, q, q_row_stride, kcache,
                      vcache, out, stream);
}

namespace detail::prefill {
[[nodiscard]] inline DecodeAttentionShape decode_shape(const AttentionShape& s, index_t sequences)
{
    return DecodeAttentionShape{sequences, s.query_heads, s.kv_heads, s.head_dim, s.capacity};
}
}  // namespace detail::prefill

inline std::size_t attention_workspace_bytes(const AttentionShape& s, index_t max_sequences, index_t groups)
{
    require(max_sequences >= 0 && groups >= 1, "attention_workspace_bytes: max_sequences ", max_sequences,
            " must not be negative and groups ", groups, " positive");
    return decode_attention_workspace_bytes(detail::prefill::decode_shape(s, max_sequences), groups);
}

template <KvLayout Layout>
void attention(const AttentionShape& s, const Layout& layout, const DeviceBatch& batch, const bfloat16* q,
               index_t q_row_stride, const bfloat16* kcache, const bfloat16* vcache, void* workspace, bfloat16* out,
               cudaStream_t stream, const GroupStrides& groups)
{
    // tokens == sequences with at most one token each means exactly one each: row b is sequence
    // b, the layout decode_attention reads and writes.
    if (batch.max_new_tokens == 1 && batch.tokens == batch.sequences) {
        decode_attention(detail::prefill::decode_shape(s, batch.sequences), layout, q, q_row_stride, kcache, vcache,
                         batch.slots, batch.lengths, workspace, out, stream, groups);
        return;
    }
    prefill_attention(s, layout, batch, q, q_row_stride, kcache, vcache, out, stream, groups);
}

inline void attention(const AttentionShape& s, const DeviceBatch& batch, const bfloat16* q, index_t q_row_stride,
                      const bfloat16* kcache, const bfloat16* vcache, void* workspace, bfloat16* out,
                      cudaStream_t stream)
{
    attention(s, detail::prefill::contiguous_layout(s, "attention"), batch, q, q_row_stride, kcache, vcache, workspace,
              out, stream);
}

}  // namespace foe::cuda
