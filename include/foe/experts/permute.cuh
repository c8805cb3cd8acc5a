#pragma once
// Grouping of the (token, slot) rows by expert on the device, the device counterpart of
// foe::experts::group_rows: a stable sort, so rows keep their order inside each expert and the
// grouping is deterministic.
//
//   plan  = PermutePlan(rows, local_experts)           workspace bytes, once
//   permute(plan, experts, expert_begin, ws, out)       sorted rows, offsets, inverse map
//   gather_rows(x, out.sorted_rows, ...)                the expert inputs, grouped
//
// The sort is CUB's DeviceRadixSort::SortPairs (stable LSD radix sort) on the local expert id,
// with the row index as value, over only the bits the expert ids need. Rows routed to experts
// this rank does not hold get the key `local_experts` and sort to the end, past offsets[E].

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <bit>
#include <cstdint>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// Elementwise kernels of this file: 256 threads, grid-stride; pure bandwidth.
struct PermuteLaunch {
    static constexpr int block_threads = 256;
};

/// Device outputs of permute(): all sized by the plan.
struct PermuteOutputs {
    std::int32_t* sorted_rows = nullptr;  ///< [rows]: row indices (token * slots + slot) grouped by expert
    std::int32_t* offsets = nullptr;      ///< [local_experts + 1]: expert e's rows are [offsets[e], offsets[e+1])
    std::int32_t* inverse = nullptr;      ///< [rows]: position of each row in sorted_rows, -1 if not local
};

/// Sizes of the permutation's workspace for `rows` (token, slot) rows and E local experts.
class PermutePlan {
public:
    PermutePlan(index_t rows, index_t local_experts) : rows_(rows), experts_(local_experts)
    {
        require(rows >= 0 && rows <= 0x7fffffff, "permute: ", rows, " rows do not fit int32");
        require(local_experts > 0 && local_experts < 0x7fffffff, "permute: bad expert count ", local_experts);
        end_bit_ = std::bit_width(static_cast<std::uint32_t>(local_experts));  // keys in [0, E]
        check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes_, static_cast<const std::uint32_t*>(nullptr),
                                              static_cast<std::uint32_t*>(nullptr),
                                              static_cast<const std::int32_t*>(nullptr),
                                              static_cast<std::int32_t*>(nullptr), static_cast<int>(rows), 0, end_bit_),
              "cub::DeviceRadixSort::SortPairs (size query)");
    }
    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t local_experts() const noexcept { return experts_; }
    /// Bytes of device workspace permute() needs: keys in, keys out, rows in, CUB's temporary.
    [[nodiscard]] std::size_t workspace_bytes() const noexcept { return 3 * array_bytes() + sort_bytes_; }

    /// Bytes of one int32 array of the workspace, rounded up to 256 (CUB's alignment).
    [[nodiscard]] std::size_t array_bytes() const noexcept
    {
        return (static_cast<std::size_t>(rows_) * sizeof(std::int32_t) + 255) / 256 * 256;
    }
    [[nodiscard]] int end_bit() const noexcept { return end_bit_; }
    [[nodiscard]] std::size_t sort_bytes() const noexcept { return sort_bytes_; }

private:
    index_t rows_, experts_;
    int end_bit_ = 1;
    std::size_t sort_bytes_ = 0;
};

inline namespace kernels_v0_1 {

template <class Launch = PermuteLaunch>
FOE_KERNEL(Launch::block_threads)
void permute_keys_kernel(const std::int32_t* __restrict__ experts, int rows, int expert_begin, int local_experts,
                         std::uint32_t* keys, std::int32_t* values)
{
    for (int r = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); r < rows;
         r += static_cast<int>(gridDim.x * blockDim.x)) {
        const int e = experts[r] - expert_begin;
        keys[r] = static_cast<std::uint32_t>((e >= 0 && e < local_experts) ? e : local_experts);
        values[r] = r;
    }
}

/// offsets[e] = first position whose key is >= e (binary search over the sorted keys), for
/// e in [0, E]; inverse[sorted_rows[i]] = i for the local rows, -1 for the others.
template <class Launch = PermuteLaunch>
FOE_KERNEL(Launch::block_threads)
void permute_offsets_kernel(const std::uint32_t* __restrict__ sorted_keys, const std::int32_t* __restrict__ sorted_rows,
                            int rows, int local_experts, std::int32_t* offsets, std::int32_t* inverse)
{
    const int stride = static_cast<int>(gridDim.x * blockDim.x);
    for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < rows; i += stride)
        inverse[sorted_rows[i]] = sorted_keys[i] < static_cast<std::uint32_t>(local_experts) ? i : -1;
    for (int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); e <= local_experts; e += stride) {
        int lo = 0, hi = rows;
        while (lo < hi) {
            const int mid = lo + (hi - lo) / 2;
            if (sorted_keys[mid] < static_cast<std::uint32_t>(e)) lo = mid + 1;
            else hi = mid;
        }
        offsets[e] = lo;
    }
}

/// out[i, :] = x[sorted_rows[i] / slots_per_token, :] for i < count (one block row per output row).
template <class Launch = PermuteLaunch>
FOE_KERNEL(Launch::block_threads)
void gather_rows_kernel(const bfloat16* __restrict__ x, const std::int32_t* __restrict__ sorted_rows,
                        int slots_per_token, int d, bfloat16* out)
{
    const int token = sorted_rows[blockIdx.x] / slots_per_token;
    const bfloat16* src = x + static_cast<std::size_t>(token) * static_cast<std::size_t>(d);
    bfloat16* dst = out + static_cast<std::size_t>(blockIdx.x) * static_cast<std::size_t>(d);
    for (int j = static_cast<int>(threadIdx.x); j < d; j += Launch::block_threads) dst[j] = src[j];
}

}  // namespace kernels_v0_1

namespace detail {
[[nodiscard]] inline unsigned elementwise_blocks(index_t n)
{
    // Enough blocks to fill an H200 (132 SMs x 8 blocks of 256) without a huge grid.
    return static_cast<unsigned>(std::max<index_t>(1, std::min<index_t>(ceil_div(n, PermuteLaunch::block_threads), 1056)));
}
}  // namespace detail

/// Groups the first `rows` (<= plan.rows()) rows by expert: experts[r] is row r's global expert
/// id (the router output, flattened), and the local experts are [expert_begin, expert_begin + E).
/// workspace holds plan.workspace_bytes() bytes (256-byte aligned). Stream-ordered, no host
/// synchronisation: a plan sized for the largest batch serves every smaller one.
inline void permute(const PermutePlan& plan, index_t rows, const std::int32_t* experts, index_t expert_begin,
                    void* workspace, const PermuteOutputs& out, cudaStream_t stream)
{
    require(rows >= 0 && rows <= plan.rows(), "permute: ", rows, " rows exceed the plan's ", plan.rows());
    const int n = static_cast<int>(rows), e = static_cast<int>(plan.local_experts());
    auto* base = static_cast<unsigned char*>(workspace);
    const std::size_t a = plan.array_bytes();
    auto* keys_in = reinterpret_cast<std::uint32_t*>(base);
    auto* keys_out = reinterpret_cast<std::uint32_t*>(base + a);
    auto* rows_in = reinterpret_cast<std::int32_t*>(base + 2 * a);
    void* temp = base + 3 * a;
    if (n > 0) {
        permute_keys_kernel<<<detail::elementwise_blocks(n), PermuteLaunch::block_threads, 0, stream>>>(
            experts, n, static_cast<int>(expert_begin), e, keys_in, rows_in);
        check_launch("permute_keys_kernel");
        // CUB's temporary storage does not grow when there are fewer items than the plan's.
        std::size_t temp_bytes = plan.sort_bytes();
        check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, rows_in, out.sorted_rows, n, 0,
                                              plan.end_bit(), stream),
              "cub::DeviceRadixSort::SortPairs");
    }
    permute_offsets_kernel<<<detail::elementwise_blocks(std::max(n, e + 1)), PermuteLaunch::block_threads, 0, stream>>>(
        keys_out, out.sorted_rows, n, e, out.offsets, out.inverse);
    check_launch("permute_offsets_kernel");
}

/// permute() over all of the plan's rows.
inline void permute(const PermutePlan& plan, const std::int32_t* experts, index_t expert_begin, void* workspace,
                    const PermuteOutputs& out, cudaStream_t stream)
{
    permute(plan, plan.rows(), experts, expert_begin, workspace, out, stream);
}

/// out[i, :] = x[sorted_rows[i] / slots_per_token, :] for the first `count` sorted rows: the
/// expert inputs, grouped (count = offsets[E], or the plan's rows for an upper bound).
inline void gather_rows(const bfloat16* x, const std::int32_t* sorted_rows, index_t count, index_t slots_per_token,
                        index_t d, bfloat16* out, cudaStream_t stream)
{
    require(count >= 0 && count <= 0x7fffffff && d > 0 && slots_per_token > 0, "gather_rows: bad shape");
    if (count == 0) return;
    gather_rows_kernel<<<static_cast<unsigned>(count), PermuteLaunch::block_threads, 0, stream>>>(
        x, sorted_rows, static_cast<int>(slots_per_token), static_cast<int>(d), out);
    check_launch("gather_rows_kernel");
}

}  // namespace foe::cuda
