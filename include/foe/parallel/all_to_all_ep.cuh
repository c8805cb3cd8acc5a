#pragma once
// DeviceAllToAllEP: expert parallelism on GPUs over NcclComm, the device counterpart of the host
// AllToAllEP (foe/parallel/all_to_all_ep.hpp). Both follow one index logic, DispatchPlan
// (foe/parallel/dispatch_plan.hpp): naive dispatch (one row per (token, slot), [expert, u]) or
// deduplicated dispatch (one row per (token, member holding >= 1 of its experts),
// [n, e_1..e_c, w_1..w_c, u], expanded at the receiver, one weighted partial sum back per row).
//
// One exchange, stream-ordered on the caller's stream:
//   1. plan      from the device routing (experts [T, slots] int32, weights [T, slots] fp32):
//                rows per (member, token) (one thread each), an exclusive scan of those counts
//                in member-major order (CUB; integers, so exact and the same every run), then one
//                thread per token writes its rows: exactly DispatchPlan's send order, row
//                contents and targets. No atomic decides any order (one atomicOr collects error
//                bits). The per-token rules, and the per-row rules of every kernel below, are the
//                __host__ __device__ functions of foe::parallel::ep: the host tests replay the plan
//                against plan_dispatch and whole exchanges of several members with them.
//   2. counts    rows per member, an all-to-all of one int32 per member (NcclComm::all_to_all_v).
//   3. dispatch  two all-to-alls: the row headers, fp32 words (ints as their bit patterns: NCCL's
//                send/recv copy bytes, so ids, counts and weights arrive bit for bit), and the
//                payload u[token], bf16 (d per row).
//   4. experts   the receiver expands each row into its (row, expert) pairs, groups them by local
//                expert (experts/permute.cuh's stable radix sort), gathers the inputs and runs the
//                grouped SwiGLU (experts/grouped_swiglu.cuh: device offsets, no host
//                synchronisation). Naive rows return FFN_e(u); dedup rows return
//                bf16(w_1 FFN_e1(u) + ... + w_n FFN_en(u)), accumulated in fp32 in slot order.
//   5. combine   one all-to-all back (bf16, d per row); each returned row lands at its target row
//                of y [T * slots, d]. combine() then adds them to the residual as the host does:
//                naive, base + sum_s w_s y[t slots + s] in slot order; dedup, base + the
//                token's partial sums in member order; fp32, one bf16 rounding.
//
// Two variants (DeviceEpSpec::fixed_capacity):
//   dynamic  the counts come back to the host once per exchange (one stream synchronisation,
//            bounded by NcclOptions::timeout) to size the ncclSend/ncclRecv of exactly the rows
//            that move; not capturable.
//   fixed    every (sender, member) block is padded to cap = worst_case_rows(mode, max_tokens,
//            slots, experts per member) rows and always sent whole (DeepEP's num_worst_tokens):
//            the transfer sizes are known on the host at plan time, the counts travel on the
//            device and the receivers read them there. No host synchronisation, no allocation:
//            capturable in a CUDA graph (watch() the graph's launches, see nccl_comm.cuh).
//            Memory, M members, T = max_tokens, k slots, E_r experts per member, c = min(k, E_r),
//            cap = worst_case_rows (naive T c, dedup T), S = M cap rows sent and as many
//            received, h = header_floats (naive 1, dedup 1 + 2c), P = M T c expanded pairs:
//              S (8 h + 8 d)            send + receive headers (4 B) and payloads (2 B), both ways back
//            + P (24 + 4 d + 2 f)       expert ids, sort keys/values and inverse (int32), gathered
//                                       inputs and outputs (bf16), the SwiGLU activation (bf16)
//            + (M T + 1) 8 + R 4 (3 + w) + T 4 + small   the plan: counts, scan, rows (R = T k naive,
//                                       T min(k, M) dedup; w = 1 naive, c dedup)
//            plus CUB's temporaries (a scan and a radix sort, device-dependent, O(rows) bytes).
//            naive:  M T c (12 d + 2 f + 32) + plan;   dedup: M T (8 + 16 c + 8 d) + M T c (24 + 4 d + 2 f) + plan.
//            capacity_bytes(spec) returns all of it but the CUB temporaries; bytes() the arena.
//            The wire carries S (4 h + 2 d) + S 2 d bytes per exchange whatever the routing.
//
// NcclExpertExchange binds one to its NcclComm as the CUDA layer's ExpertExchange
// (foe/parallel/expert_exchange.cuh): CudaModel then runs the standard-MoE baseline
// expert-parallel, the dynamic variant in eager forwards and a fixed one in captured decode steps.
//
// Errors found on the device (an expert no member holds, a token naming one expert twice, a block
// over its capacity, a row for an expert this rank does not hold) drop the rows concerned, never
// write outside a buffer, and set bits of a status word: the dynamic variant throws CommError
// after enqueueing the whole exchange (so that the peers are not left waiting in a collective);
// the fixed one leaves the word for status() to read outside the graph.

#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "foe/comm/nccl_comm.cuh"
#include "foe/core/config.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/check.cuh"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/permute.cuh"
#include "foe/parallel/dispatch_plan.hpp"
#include "foe/parallel/expert_exchange.cuh"

namespace foe::parallel {

/// What an exchange is planned for. Every member plans with the same spec but its `rank`: the
/// fixed variant's block sizes, and the dynamic one's default receive capacity, follow from
/// max_tokens (and a fixed-capacity exchange captured in a graph replays the token count it was
/// captured with, as the layer's kernels do).
struct DeviceEpSpec {
    Dispatch mode = Dispatch::naive;
    bool fixed_capacity = false;  ///< padded blocks, no host synchronisation: CUDA-graph capturable
    index_t max_tokens = 0;       ///< this rank's tokens per exchange, at most
    index_t slots = 0;            ///< routed slots per token
    index_t hidden = 0;           ///< d (a multiple of 8)
    index_t intermediate = 0;     ///< f (a multiple of 8)
    ExpertOwners owners;          ///< members = the communicator's size
    int rank = 0;                 ///< this rank's member index: it holds owners' block `rank`
    /// Dynamic only: rows this rank can receive per exchange; -1 for the worst case
    /// (members x worst_case_rows). A routing that sends more throws CommError.
    index_t max_recv_rows = -1;
};

/// Error bits of the device status word.
namespace ep_status {
inline constexpr std::int32_t unowned_expert = 1;     ///< routed to an expert no member holds
inline constexpr std::int32_t row_overflow = 2;       ///< a token names more than c experts of one member
inline constexpr std::int32_t capacity_overflow = 4;  ///< a (sender, member) block over its capacity
inline constexpr std::int32_t foreign_expert = 8;     ///< received a row for an expert not held here
}  // namespace ep_status

/// The owner rule in a form device code can read: member j holds experts
/// [first_expert + j experts_per_member, first_expert + (j + 1) experts_per_member).
struct DeviceOwners {
    std::int64_t first_expert = 0;
    std::int64_t experts_per_member = 1;
    int members = 1;
};

/// The most slots per token the device plan takes (its per-token owner table is a local array).
inline constexpr index_t ep_max_slots = 64;

/// The device plan's rows, [rows] each unless said (device pointers; the host tests pass host ones).
struct PlanRowsView {
    std::int32_t* row_token = nullptr;  ///< the token of each row
    std::int32_t* row_count = nullptr;  ///< experts the row carries
    std::int32_t* row_pairs = nullptr;  ///< [rows * width] token * slots + slot, -1 past row_count
    std::int32_t* target = nullptr;     ///< result row each returned row lands in
    std::int32_t* parts = nullptr;      ///< [tokens] dedup: partial sums per token
};

/// Where compact row i of an exchange sits in a buffer of `members` blocks: first[j] is the
/// compact index of block j's first row ([members + 1], first[members] the total); cap 0 means
/// the blocks are packed (position i), cap > 0 that block j starts at row j * cap.
struct BlockLayout {
    std::int64_t cap = 0;
    const std::int32_t* first = nullptr;
    int members = 1;
};

namespace ep {

/// The member holding `expert`, -1 when none does (the host's ExpertOwners::owner throws).
[[nodiscard]] FOE_HOST_DEVICE inline int owner_of(const DeviceOwners& o, std::int32_t expert) noexcept
{
    const std::int64_t rel = static_cast<std::int64_t>(expert) - o.first_expert;
    if (rel < 0) return -1;
    const std::int64_t j = rel / o.experts_per_member;
    return j < o.members ? static_cast<int>(j) : -1;
}

/// Rows token `e` (its `slots` expert ids) sends to `member`: naive, its slots held there; dedup,
/// one if it has any there.
[[nodiscard]] FOE_HOST_DEVICE inline std::int32_t token_rows_to(Dispatch mode, const DeviceOwners& o,
                                                                const std::int32_t* e, int slots, int member) noexcept
{
    std::int32_t n = 0;
    for (int s = 0; s < slots; ++s) n += owner_of(o, e[s]) == member ? 1 : 0;
    return mode == Dispatch::naive ? n : (n > 0 ? 1 : 0);
}

/// Writes the rows of token `token` (expert ids e[0, slots)) into `out`, as plan_dispatch orders
/// them: scan[j * tokens + token] is the exclusive prefix, in member-major order, of
/// token_rows_to over (member, token), i.e. the send-order index of the token's first row to j.
/// Naive: slot s's row is that index plus the token's earlier slots on the same member, target
/// token * slots + s. Dedup: the row opened by the token's first slot on j carries its slots on j
/// in slot order (at most `width`), target token * slots + (the token's members below j).
/// Returns ep_status bits (slots held by no member are dropped, as are experts past `width`).
FOE_HOST_DEVICE inline std::int32_t fill_token_rows(Dispatch mode, const DeviceOwners& o, const std::int32_t* e,
                                                    int slots, int width, std::int64_t token, std::int64_t tokens,
                                                    const std::int32_t* scan, const PlanRowsView& out) noexcept
{
    int own[ep_max_slots];
    for (int s = 0; s < slots; ++s) own[s] = owner_of(o, e[s]);
    std::int32_t status = 0;
    const std::int64_t pair0 = token * slots;
    std::int32_t parts = 0;
    for (int s = 0; s < slots; ++s) {
        const int j = own[s];
        if (j < 0) {
            status |= ep_status::unowned_expert;
            continue;
        }
        int before = 0;  // the token's earlier slots on member j
        for (int s2 = 0; s2 < s; ++s2) before += own[s2] == j ? 1 : 0;
        const std::int64_t first = scan[static_cast<std::int64_t>(j) * tokens + token];
        if (mode == Dispatch::naive) {
            const std::int64_t row = first + before;
            out.row_token[row] = static_cast<std::int32_t>(token);
            out.row_count[row] = 1;
            out.row_pairs[row] = static_cast<std::int32_t>(pair0 + s);
            out.target[row] = static_cast<std::int32_t>(pair0 + s);
            continue;
        }
        if (before > 0) continue;  // the token's row to j is open already
        const std::int64_t row = first;
        int n = 0;
        for (int s2 = s; s2 < slots; ++s2) {
            if (own[s2] != j) continue;
            if (n < width) out.row_pairs[row * width + n] = static_cast<std::int32_t>(pair0 + s2);
            else status |= ep_status::row_overflow;
            ++n;
        }
        for (int k = n; k < width; ++k) out.row_pairs[row * width + k] = -1;
        out.row_token[row] = static_cast<std::int32_t>(token);
        out.row_count[row] = n < width ? n : width;
        // The token's rows come back in member order: this one after those of its members below j.
        int part = 0;
        for (int s2 = 0; s2 < slots; ++s2) {
            if (own[s2] < 0 || own[s2] >= j) continue;
            bool opens = true;
            for (int s3 = 0; s3 < s2; ++s3) opens = opens && own[s3] != own[s2];
            part += opens ? 1 : 0;
        }
        out.target[row] = static_cast<std::int32_t>(pair0 + part);
        ++parts;
    }
    if (mode == Dispatch::dedup) out.parts[token] = parts;
    return status;
}

/// Position of compact row i (< l.first[l.members]) in its buffer: i when packed (cap 0), else
/// j cap + (i - first[j]) for the block j that holds it; -1 when that is past the block's cap.
[[nodiscard]] FOE_HOST_DEVICE inline std::int64_t block_position(const BlockLayout& l, std::int64_t i) noexcept
{
    if (l.cap == 0) return i;
    // The last j with first[j] <= i: one before the smallest j in [1, members] with first[j] > i.
    int lo = 1, hi = l.members;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (l.first[mid] > i) hi = mid;
        else lo = mid + 1;
    }
    const int j = lo - 1;
    const std::int64_t local = i - l.first[j];
    return local < l.cap ? static_cast<std::int64_t>(j) * l.cap + local : -1;
}

/// Header words of a row (DispatchPlan's header_floats): naive [expert]; dedup [n, e_1..e_w, w_1..w_w].
[[nodiscard]] FOE_HOST_DEVICE constexpr int header_words(Dispatch mode, int width) noexcept
{
    return mode == Dispatch::naive ? 1 : 1 + 2 * width;
}
/// Word of expert k of a row, and of its weight (dedup).
[[nodiscard]] FOE_HOST_DEVICE constexpr int expert_word(Dispatch mode, int k) noexcept
{
    return mode == Dispatch::naive ? 0 : 1 + k;
}
[[nodiscard]] FOE_HOST_DEVICE constexpr int weight_word(int width, int k) noexcept { return 1 + width + k; }

// The per-row rules of the exchange. Each kernel below is a grid-stride loop that calls one of
// these per row (or entry), with its threads as `lanes` over the row; the host tests call them
// with one lane and emulate the all-to-alls, the grouping and the experts around them.

/// send_first[j] = scan[j T] for j <= members; rows_to[j] = member j's rows, clamped to cap > 0.
/// Returns ep_status bits (capacity_overflow).
FOE_HOST_DEVICE inline std::int32_t send_counts_entry(int j, const std::int32_t* scan, std::int64_t tokens,
                                                      int members, std::int64_t cap, std::int32_t* send_first,
                                                      std::int32_t* rows_to) noexcept
{
    const std::int64_t first = scan[static_cast<std::int64_t>(j) * tokens];
    send_first[j] = static_cast<std::int32_t>(first);
    if (j == members) return 0;
    const std::int64_t rows = scan[static_cast<std::int64_t>(j + 1) * tokens] - first;
    const bool over = cap > 0 && rows > cap;
    rows_to[j] = static_cast<std::int32_t>(over ? cap : rows);
    return over ? ep_status::capacity_overflow : 0;
}

/// recv_first = the exclusive prefix of the received counts ([members + 1]), each clamped to
/// [0, cap] when cap > 0. Returns ep_status bits.
FOE_HOST_DEVICE inline std::int32_t receive_prefix(const std::int32_t* recv_counts, int members, std::int64_t cap,
                                                   std::int32_t* recv_first) noexcept
{
    std::int32_t status = 0, sum = 0;
    for (int j = 0; j < members; ++j) {
        recv_first[j] = sum;
        std::int32_t n = recv_counts[j] < 0 ? 0 : recv_counts[j];
        if (cap > 0 && n > cap) {
            status |= ep_status::capacity_overflow;
            n = static_cast<std::int32_t>(cap);
        }
        sum += n;
    }
    recv_first[members] = sum;
    return status;
}

/// Experts a received row carries: naive 1, dedup its header's count clamped to [0, width].
[[nodiscard]] FOE_HOST_DEVICE inline int row_experts(Dispatch mode, int width, const std::int32_t* hdr) noexcept
{
    if (mode == Dispatch::naive) return 1;
    return hdr[0] < 0 ? 0 : (hdr[0] > width ? width : hdr[0]);
}

/// Word w of the header of a row of n experts whose (token, slot) pairs are `pairs`: naive
/// [expert]; dedup [n, e_1..e_width, w_1..w_width] (past n: expert -1, weight 0), weights as
/// their bits.
[[nodiscard]] FOE_HOST_DEVICE inline std::int32_t header_word(Dispatch mode, int width, int w, int n,
                                                              const std::int32_t* pairs, const std::int32_t* experts,
                                                              const float* weights) noexcept
{
    if (mode == Dispatch::naive) return experts[pairs[0]];
    if (w == 0) return n;
    if (w <= width) return w - 1 < n ? experts[pairs[w - 1]] : -1;
    const int k = w - 1 - width;
    return ::foe::detail::bit_cast<std::int32_t>(k < n ? weights[pairs[k]] : 0.0f);
}

/// Sent row r: its header and payload u[row_token[r]] at its block position (nothing when over
/// the block's capacity).
template <class T>
FOE_HOST_DEVICE inline void pack_row(std::int64_t r, const PlanRowsView& plan, const BlockLayout& layout,
                                     Dispatch mode, int width, int d, const T* u, const std::int32_t* experts,
                                     const float* weights, std::int32_t* header, T* payload, int lane,
                                     int lanes) noexcept
{
    const std::int64_t pos = block_position(layout, r);
    if (pos < 0) return;
    const int h = header_words(mode, width);
    const int n = plan.row_count[r];
    const std::int32_t* pairs = plan.row_pairs + r * width;
    for (int w = lane; w < h; w += lanes) header[pos * h + w] = header_word(mode, width, w, n, pairs, experts, weights);
    const T* src = u + static_cast<std::int64_t>(plan.row_token[r]) * d;
    T* dst = payload + pos * d;
    for (int x = lane; x < d; x += lanes) dst[x] = src[x];
}

/// The expert of pair p = i width + k of the received rows (compact i): expert k of row i, -1
/// past its count or past the received rows (permute() sorts those to the end).
[[nodiscard]] FOE_HOST_DEVICE inline std::int32_t expand_pair(std::int64_t p, const std::int32_t* header,
                                                              const BlockLayout& layout, Dispatch mode,
                                                              int width) noexcept
{
    const std::int64_t i = p / width;
    const int k = static_cast<int>(p % width);
    if (i >= layout.first[layout.members]) return -1;
    const std::int64_t pos = block_position(layout, i);
    if (pos < 0) return -1;
    const std::int32_t* hdr = header + pos * header_words(mode, width);
    return k < row_experts(mode, width, hdr) ? hdr[expert_word(mode, k)] : -1;
}

/// Grouped input g: the payload of the received row of sorted pair sorted_pairs[g].
template <class T>
FOE_HOST_DEVICE inline void gather_pair(std::int64_t g, const T* payload, const std::int32_t* sorted_pairs,
                                        const BlockLayout& layout, int width, int d, T* expert_in, int lane,
                                        int lanes) noexcept
{
    const std::int64_t pos = block_position(layout, sorted_pairs[g] / width);
    if (pos < 0) return;  // not reached: pairs past the received rows are not routed
    const T* src = payload + pos * d;
    T* dst = expert_in + g * d;
    for (int x = lane; x < d; x += lanes) dst[x] = src[x];
}

/// What received row i sends back, at its block position: naive, its expert's output row;
/// dedup, w_1 y_1 + ... + w_n y_n in slot order (fp32 fma, one rounding to T). y is the grouped
/// expert output, inverse[pair] its row there (-1: not held here, left out). Returns true when
/// the row names an expert not held here.
template <class T>
FOE_HOST_DEVICE inline bool reply_row(std::int64_t i, const std::int32_t* header, const T* y,
                                      const std::int32_t* inverse, const BlockLayout& layout, Dispatch mode, int width,
                                      int d, T* reply, int lane, int lanes) noexcept
{
    const std::int64_t pos = block_position(layout, i);
    if (pos < 0) return false;
    const std::int32_t* hdr = header + pos * header_words(mode, width);
    const int n = row_experts(mode, width, hdr);
    bool foreign = false;
    for (int k = 0; k < n; ++k) foreign = foreign || inverse[i * width + k] < 0;
    T* dst = reply + pos * d;
    for (int x = lane; x < d; x += lanes) {
        float acc = 0.0f;
        for (int k = 0; k < n; ++k) {
            const std::int32_t g = inverse[i * width + k];
            if (g < 0) continue;
            const float v = static_cast<float>(y[static_cast<std::int64_t>(g) * d + x]);
            acc = mode == Dispatch::naive ? v : fmaf(::foe::detail::bit_cast<float>(hdr[weight_word(width, k)]), v, acc);
        }
        dst[x] = T(acc);
    }
    return foreign;
}

/// Sent row r's returned row, from its block position in `back` to row target[r] of y.
template <class T>
FOE_HOST_DEVICE inline void land_row(std::int64_t r, const T* back, const std::int32_t* target,
                                     const BlockLayout& layout, int d, T* y, int lane, int lanes) noexcept
{
    const std::int64_t pos = block_position(layout, r);
    if (pos < 0) return;
    const T* src = back + pos * d;
    T* dst = y + static_cast<std::int64_t>(target[r]) * d;
    for (int x = lane; x < d; x += lanes) dst[x] = src[x];
}

/// out[t] = base[t] + token t's returned rows of y: naive, sum over slots of weights[t, s]
/// y[t slots + s] (fma, slot order); dedup, its parts[t] partial sums (member order). fp32, one
/// rounding to T; base may be null.
template <class T>
FOE_HOST_DEVICE inline void combine_token(std::int64_t t, const T* y, const std::int32_t* parts, const float* weights,
                                          const T* base, int slots, int d, Dispatch mode, T* out, int lane,
                                          int lanes) noexcept
{
    const std::int64_t row0 = t * slots;
    const int n = mode == Dispatch::naive ? slots : (parts[t] < 0 ? 0 : (parts[t] > slots ? slots : parts[t]));
    for (int x = lane; x < d; x += lanes) {
        float acc = base != nullptr ? static_cast<float>(base[t * d + x]) : 0.0f;
        for (int s = 0; s < n; ++s) {
            const float v = static_cast<float>(y[(row0 + s) * d + x]);
            acc = mode == Dispatch::naive ? fmaf(weights[row0 + s], v, acc) : acc + v;
        }
        out[t * d + x] = T(acc);
    }
}

}  // namespace ep

/// Expert parallelism over an NcclComm whose member j holds the experts of owners' block j.
/// Buffers come from one device allocation planned at construction from the spec; run() and
/// combine() allocate nothing. One thread at a time (as NcclComm).
class DeviceAllToAllEP {
public:
    /// Plans and allocates; throws InvalidArgument for a spec the kernels cannot run.
    explicit DeviceAllToAllEP(const DeviceEpSpec& spec);

    /// Device bytes of an exchange planned for `spec`, without CUB's temporaries (see the file
    /// comment for the formula). Host-only arithmetic, no device needed.
    [[nodiscard]] static std::size_t capacity_bytes(const DeviceEpSpec& spec);
    /// Device bytes this instance holds (capacity_bytes + CUB's temporaries).
    [[nodiscard]] std::size_t bytes() const noexcept { return arena_.bytes(); }
    [[nodiscard]] const DeviceEpSpec& spec() const noexcept { return spec_; }
    /// Experts per dedup row (1 naive): DispatchPlan::width.
    [[nodiscard]] index_t width() const noexcept { return width_; }
    /// Rows of a (sender, member) block in the fixed variant (worst_case_rows); 0 when dynamic.
    [[nodiscard]] index_t block_capacity() const noexcept { return spec_.fixed_capacity ? cap_ : 0; }

    /// One exchange: routes `tokens` (<= max_tokens) rows of u [tokens, d] (bf16) by experts and
    /// weights ([tokens, slots], device) through the members' experts; y [tokens * slots, d]
    /// receives, naive, FFN_e(u[t]) at row t * slots + s; dedup, the token's partial sums at rows
    /// t * slots + j, j < parts[t] (member order). Other rows of y are not written. `held` are
    /// this rank's experts (owners' block spec.rank). Every member calls run() for every
    /// exchange (with its own token count, possibly 0). Dynamic: synchronises `stream` once;
    /// throws CommError (after enqueueing the whole exchange) when the status word has bits set.
    void run(comm::NcclComm& comm, const cuda::GroupedExpertWeights& held, const std::int32_t* experts,
             const float* weights, const bfloat16* u, index_t tokens, bfloat16* y, cudaStream_t stream);

    /// out [tokens, d] = base + the returned rows of y (run()'s output), as the host layer adds
    /// them: naive, sum over slots in slot order of weights[t, s] y[t slots + s]; dedup, the
    /// token's parts[t] partial sums in member order. fp32, one bf16 rounding; base may be null.
    void combine(const bfloat16* y, const float* weights, const bfloat16* base, index_t tokens, bfloat16* out,
                 cudaStream_t stream) const;

    /// Enqueues step 1 alone (run() does it first): the device plan of `tokens` tokens.
    void plan(const std::int32_t* experts, index_t tokens, cudaStream_t stream);

    /// The device plan of the last plan() or run() (device pointers), for tests and tools:
    /// rows_to[members] (rows per member, clamped to the block capacity when fixed),
    /// send_first[members + 1] (compact index of each member's first row; [members] the total).
    struct PlanView {
        PlanRowsView rows;
        const std::int32_t* rows_to = nullptr;
        const std::int32_t* send_first = nullptr;
        const std::int32_t* recv_counts = nullptr;  ///< [members] rows received from each member
    };
    [[nodiscard]] PlanView plan_view() const noexcept;

    /// Waits for `stream` and returns the status word of the last exchange (ep_status bits).
    [[nodiscard]] std::int32_t status(cudaStream_t stream) const;

private:
    struct Buffers;
    template <class Visit>
    static void for_each_buffer(const DeviceEpSpec& spec, std::size_t scan_bytes, std::size_t permute_bytes,
                                Buffers& b, Visit&& visit);
    [[nodiscard]] DeviceOwners device_owners() const noexcept;
    [[nodiscard]] BlockLayout send_layout() const noexcept;
    [[nodiscard]] BlockLayout recv_layout() const noexcept;

    struct Buffers {
        std::int32_t* counts = nullptr;      ///< [M T + 1] rows per (member, token), member-major; last 0
        std::int32_t* scan = nullptr;        ///< [M T + 1] its exclusive prefix
        void* scan_ws = nullptr;             ///< CUB's temporary storage of the scan
        std::int32_t* row_token = nullptr;   ///< [max send rows]
        std::int32_t* row_count = nullptr;   ///< [max send rows]
        std::int32_t* row_pairs = nullptr;   ///< [max send rows * width]
        std::int32_t* target = nullptr;      ///< [max send rows]
        std::int32_t* parts = nullptr;       ///< [T] (dedup)
        std::int32_t* meta = nullptr;        ///< [2 M + 1]: rows to each member, rows from each, status
        std::int32_t* send_first = nullptr;  ///< [M + 1]
        std::int32_t* recv_first = nullptr;  ///< [M + 1]
        std::int32_t* send_header = nullptr;   ///< [send slots * h]
        bfloat16* send_payload = nullptr;      ///< [send slots * d]
        std::int32_t* recv_header = nullptr;   ///< [recv slots * h]
        bfloat16* recv_payload = nullptr;      ///< [recv slots * d]
        std::int32_t* pair_expert = nullptr;   ///< [pairs]
        std::int32_t* sorted_pairs = nullptr;  ///< [pairs]
        std::int32_t* offsets = nullptr;       ///< [E_r + 1]
        std::int32_t* inverse = nullptr;       ///< [pairs]
        void* permute_ws = nullptr;
        bfloat16* expert_in = nullptr;         ///< [pairs * d] grouped by expert
        bfloat16* expert_out = nullptr;        ///< [pairs * d]
        void* experts_ws = nullptr;            ///< grouped_swiglu's workspace
        bfloat16* reply = nullptr;             ///< [recv slots * d] what goes back
        bfloat16* back = nullptr;              ///< [send slots * d] what came back
    };

    /// Sizes that follow from the spec.
    struct Shape {
        index_t members, tokens, slots, width, header, cap, send_rows, send_slots, recv_slots, pairs;
    };
    [[nodiscard]] static Shape shape_of(const DeviceEpSpec& spec);

    DeviceEpSpec spec_;
    Shape shape_{};
    index_t width_ = 1, cap_ = 0;
    std::size_t scan_bytes_ = 0;
    cuda::PermutePlan permute_plan_{0, 1};
    Buffers b_;
    cuda::DeviceArena arena_;
    cuda::PinnedBuffer<std::int32_t> host_meta_;
    index_t planned_tokens_ = 0;
    std::vector<index_t> send_rows_, recv_rows_, send_n_, recv_n_, ones_;  // [members], reused
};

/// A DeviceAllToAllEP bound to its communicator: the ExpertExchange of the CUDA layer and model
/// (CudaModelOptions::expert_exchange, decode_expert_exchange). This rank holds owners' block
/// spec.rank. The communicator must outlive it, and it must outlive every CUDA graph that
/// captured it.
class NcclExpertExchange final : public cuda::ExpertExchange {
public:
    /// Plans and allocates the exchange; throws InvalidArgument when comm is not the spec's
    /// members (size) or rank.
    NcclExpertExchange(comm::NcclComm& comm, const DeviceEpSpec& spec);

    void run(const cuda::GroupedExpertWeights& held, const std::int32_t* experts, const float* weights,
             const bfloat16* u, index_t tokens, bfloat16* y, cudaStream_t stream) override
    {
        ep_.run(*comm_, held, experts, weights, u, tokens, y, stream);
    }
    void combine(const bfloat16* y, const float* weights, const bfloat16* base, index_t tokens, bfloat16* out,
                 cudaStream_t stream) override
    {
        ep_.combine(y, weights, base, tokens, out, stream);
    }
    [[nodiscard]] index_t max_tokens() const noexcept override { return ep_.spec().max_tokens; }
    [[nodiscard]] index_t slots() const noexcept override { return ep_.spec().slots; }
    [[nodiscard]] index_t expert_begin() const noexcept override
    {
        const DeviceEpSpec& s = ep_.spec();
        return s.owners.first_expert + s.rank * s.owners.experts_per_member;
    }
    [[nodiscard]] index_t expert_count() const noexcept override { return ep_.spec().owners.experts_per_member; }
    [[nodiscard]] bool capturable() const noexcept override { return ep_.spec().fixed_capacity; }

    [[nodiscard]] DeviceAllToAllEP& exchange() noexcept { return ep_; }
    [[nodiscard]] const DeviceAllToAllEP& exchange() const noexcept { return ep_; }

private:
    comm::NcclComm* comm_;
    DeviceAllToAllEP ep_;
};

/// The exchange of a standard-MoE model (one expert group, global top-k) whose E experts are
/// spread evenly over `members` ranks, member j holding [j E/members, (j+1) E/members): one
/// exchange serves every layer (they run one after another). Throws ConfigError when the
/// experts do not split evenly or the config has more than one group.
[[nodiscard]] inline DeviceEpSpec moe_ep_spec(const ModelConfig& c, int members, int rank, Dispatch mode,
                                              bool fixed_capacity, index_t max_tokens)
{
    require<ConfigError>(c.groups() == 1, "moe_ep_spec: expert parallelism of the MoE baseline needs one expert group, "
                         "the config has ", c.groups());
    require<ConfigError>(members > 0 && c.num_experts % members == 0, "moe_ep_spec: ", c.num_experts,
                         " experts do not split evenly over ", members, " ranks");
    DeviceEpSpec s;
    s.mode = mode;
    s.fixed_capacity = fixed_capacity;
    s.max_tokens = max_tokens;
    s.slots = c.num_experts_per_tok;
    s.hidden = c.hidden_size;
    s.intermediate = c.intermediate_size;
    s.owners = ExpertOwners{0, c.num_experts / members, members};
    s.rank = rank;
    return s;
}

// ---------------------------------------------------------------------------------------------
// Kernels.

/// The plan kernels are one thread per (member, token) or per token; the row kernels one block
/// per row (threads over d, as gather_rows_kernel), grid-stride up to the device total, the grid
/// capped at 4096 blocks (enough to fill an H200's 132 SMs several times over).
struct EpLaunch {
    static constexpr int block_threads = 256;
    static constexpr unsigned max_row_blocks = 4096;
};

inline namespace kernels_v0_1 {

template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_count_kernel(const std::int32_t* __restrict__ experts, int tokens, int slots, Dispatch mode, DeviceOwners o,
                     std::int32_t* __restrict__ counts)
{
    const std::int64_t n = static_cast<std::int64_t>(o.members) * tokens;
    for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; p <= n;
         p += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        if (p == n) {
            counts[p] = 0;  // the scan's last element becomes the total
            continue;
        }
        const int j = static_cast<int>(p / tokens);
        const std::int64_t t = p % tokens;
        counts[p] = ep::token_rows_to(mode, o, experts + t * slots, slots, j);
    }
}

template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_fill_kernel(const std::int32_t* __restrict__ experts, int tokens, int slots, int width, Dispatch mode,
                    DeviceOwners o, const std::int32_t* __restrict__ scan, PlanRowsView out, std::int32_t* status)
{
    for (std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; t < tokens;
         t += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int32_t s = ep::fill_token_rows(mode, o, experts + t * slots, slots, width, t, tokens, scan, out);
        if (s != 0) atomicOr(status, s);  // error bits only: no order depends on it
    }
}

/// ep::send_counts_entry for j in [0, members].
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_send_counts_kernel(const std::int32_t* __restrict__ scan, int tokens, int members, std::int64_t cap,
                           std::int32_t* __restrict__ send_first, std::int32_t* __restrict__ rows_to,
                           std::int32_t* status)
{
    for (int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); j <= members;
         j += static_cast<int>(gridDim.x * blockDim.x)) {
        const std::int32_t s = ep::send_counts_entry(j, scan, tokens, members, cap, send_first, rows_to);
        if (s != 0) atomicOr(status, s);
    }
}

/// ep::receive_prefix: one thread, M additions.
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_recv_first_kernel(const std::int32_t* __restrict__ recv_counts, int members, std::int64_t cap,
                          std::int32_t* __restrict__ recv_first, std::int32_t* status)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const std::int32_t s = ep::receive_prefix(recv_counts, members, cap, recv_first);
    if (s != 0) atomicOr(status, s);
}

/// ep::pack_row for every sent row (up to the device total).
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_pack_kernel(const bfloat16* __restrict__ u, const std::int32_t* __restrict__ experts,
                    const float* __restrict__ weights, PlanRowsView plan, BlockLayout layout, Dispatch mode, int width,
                    int d, std::int32_t* __restrict__ header, bfloat16* __restrict__ payload)
{
    const std::int64_t rows = layout.first[layout.members];
    for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        ep::pack_row(r, plan, layout, mode, width, d, u, experts, weights, header, payload,
                     static_cast<int>(threadIdx.x), Launch::block_threads);
}

/// ep::expand_pair for pairs [0, pairs).
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_expand_kernel(const std::int32_t* __restrict__ header, BlockLayout layout, Dispatch mode, int width,
                      std::int64_t pairs, std::int32_t* __restrict__ pair_expert)
{
    for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; p < pairs;
         p += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
        pair_expert[p] = ep::expand_pair(p, header, layout, mode, width);
}

/// ep::gather_pair for the pairs of local experts: g < offsets[E_r] (*routed_end).
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_gather_kernel(const bfloat16* __restrict__ payload, const std::int32_t* __restrict__ sorted_pairs,
                      const std::int32_t* __restrict__ routed_end, BlockLayout layout, int width, int d,
                      bfloat16* __restrict__ expert_in)
{
    const std::int64_t routed = *routed_end;
    for (std::int64_t g = blockIdx.x; g < routed; g += gridDim.x)
        ep::gather_pair(g, payload, sorted_pairs, layout, width, d, expert_in, static_cast<int>(threadIdx.x),
                        Launch::block_threads);
}

/// ep::reply_row for every received row (up to the device total).
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_reply_kernel(const std::int32_t* __restrict__ header, const bfloat16* __restrict__ expert_out,
                     const std::int32_t* __restrict__ inverse, BlockLayout layout, Dispatch mode, int width, int d,
                     bfloat16* __restrict__ reply, std::int32_t* status)
{
    const std::int64_t rows = layout.first[layout.members];
    for (std::int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
        const bool foreign = ep::reply_row(i, header, expert_out, inverse, layout, mode, width, d, reply,
                                           static_cast<int>(threadIdx.x), Launch::block_threads);
        if (foreign && threadIdx.x == 0) atomicOr(status, ep_status::foreign_expert);
    }
}

/// ep::land_row for every sent row (up to the device total).
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_land_kernel(const bfloat16* __restrict__ back, const std::int32_t* __restrict__ target, BlockLayout layout,
                    int d, bfloat16* __restrict__ y)
{
    const std::int64_t rows = layout.first[layout.members];
    for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        ep::land_row(r, back, target, layout, d, y, static_cast<int>(threadIdx.x), Launch::block_threads);
}

/// ep::combine_token, one block per token.
template <class Launch = EpLaunch>
FOE_KERNEL(Launch::block_threads)
void ep_combine_kernel(const bfloat16* __restrict__ y, const std::int32_t* __restrict__ parts,
                       const float* __restrict__ weights, const bfloat16* __restrict__ base, int tokens, int slots,
                       int d, Dispatch mode, bfloat16* __restrict__ out)
{
    for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
        ep::combine_token(t, y, parts, weights, base, slots, d, mode, out, static_cast<int>(threadIdx.x),
                          Launch::block_threads);
}

}  // namespace kernels_v0_1

// ---------------------------------------------------------------------------------------------
// Host side.

namespace detail {

[[nodiscard]] inline unsigned ep_row_blocks(index_t rows)
{
    return static_cast<unsigned>(std::clamp<index_t>(rows, 1, EpLaunch::max_row_blocks));
}
[[nodiscard]] inline unsigned ep_thread_blocks(index_t n)
{
    return static_cast<unsigned>(
        std::clamp<index_t>(cuda::detail::ceil_div(n, EpLaunch::block_threads), 1, EpLaunch::max_row_blocks));
}

}  // namespace detail

inline DeviceAllToAllEP::Shape DeviceAllToAllEP::shape_of(const DeviceEpSpec& s)
{
    const index_t m = s.owners.members, t = s.max_tokens, k = s.slots, per = s.owners.experts_per_member;
    Shape sh{};
    sh.members = m;
    sh.tokens = t;
    sh.slots = k;
    sh.width = experts_per_row(s.mode, k, per);
    sh.header = header_floats(s.mode, k, per);
    sh.cap = worst_case_rows(s.mode, t, k, per);
    // The most rows one plan can hold: naive one per slot, dedup one per (token, member).
    sh.send_rows = s.mode == Dispatch::naive ? t * k : t * std::min(k, m);
    sh.send_slots = s.fixed_capacity ? m * sh.cap : sh.send_rows;
    sh.recv_slots = s.fixed_capacity || s.max_recv_rows < 0 ? m * sh.cap : s.max_recv_rows;
    sh.pairs = sh.recv_slots * sh.width;
    return sh;
}

template <class Visit>
void DeviceAllToAllEP::for_each_buffer(const DeviceEpSpec& spec, std::size_t scan_bytes, std::size_t permute_bytes,
                                       Buffers& b, Visit&& visit)
{
    const Shape sh = shape_of(spec);
    const auto z = [](index_t n) { return static_cast<std::size_t>(n); };
    const std::size_t d = z(spec.hidden), mt1 = z(sh.members * sh.tokens + 1);
    auto bytes = [&](void*& p, std::size_t n) {
        auto* q = static_cast<unsigned char*>(p);
        visit(q, n);
        p = q;
    };
    visit(b.counts, mt1);
    visit(b.scan, mt1);
    bytes(b.scan_ws, scan_bytes);
    visit(b.row_token, z(sh.send_rows));
    visit(b.row_count, z(sh.send_rows));
    visit(b.row_pairs, z(sh.send_rows * sh.width));
    visit(b.target, z(sh.send_rows));
    visit(b.parts, z(sh.tokens));
    visit(b.meta, z(2 * sh.members + 1));
    visit(b.send_first, z(sh.members + 1));
    visit(b.recv_first, z(sh.members + 1));
    visit(b.send_header, z(sh.send_slots * sh.header));
    visit(b.send_payload, z(sh.send_slots) * d);
    visit(b.recv_header, z(sh.recv_slots * sh.header));
    visit(b.recv_payload, z(sh.recv_slots) * d);
    visit(b.pair_expert, z(sh.pairs));
    visit(b.sorted_pairs, z(sh.pairs));
    visit(b.offsets, z(spec.owners.experts_per_member + 1));
    visit(b.inverse, z(sh.pairs));
    bytes(b.permute_ws, permute_bytes);
    visit(b.expert_in, z(sh.pairs) * d);
    visit(b.expert_out, z(sh.pairs) * d);
    bytes(b.experts_ws,
          cuda::grouped_swiglu_workspace_bytes(sh.pairs, spec.owners.experts_per_member, spec.intermediate));
    visit(b.reply, z(sh.recv_slots) * d);
    visit(b.back, z(sh.send_slots) * d);
}

namespace detail {

inline void validate_ep_spec(const DeviceEpSpec& s)
{
    const ExpertOwners& o = s.owners;
    require<InvalidArgument>(o.members >= 1 && o.experts_per_member >= 1 && o.first_expert >= 0,
                             "DeviceAllToAllEP: owners need members (", o.members, ") and experts per member (",
                             o.experts_per_member, ") >= 1 and first_expert (", o.first_expert, ") >= 0");
    require<InvalidArgument>(o.first_expert + o.members * o.experts_per_member <= 0x7fffffff,
                             "DeviceAllToAllEP: expert ids up to ", o.first_expert + o.members * o.experts_per_member,
                             " do not fit int32");
    require<InvalidArgument>(0 <= s.rank && s.rank < o.members, "DeviceAllToAllEP: rank ", s.rank,
                             " is not a member of ", o.members);
    require<InvalidArgument>(s.max_tokens >= 1 && s.slots >= 1 && s.slots <= ep_max_slots,
                             "DeviceAllToAllEP: max_tokens (", s.max_tokens, ") must be positive and slots (", s.slots,
                             ") in [1, ", ep_max_slots, "]");
    require<InvalidArgument>(s.hidden > 0 && s.intermediate > 0 && s.hidden % 8 == 0 && s.intermediate % 8 == 0,
                             "DeviceAllToAllEP: d (", s.hidden, ") and f (", s.intermediate,
                             ") must be positive multiples of 8 (the grouped SwiGLU's 16-byte rows)");
    require<InvalidArgument>(o.experts_per_member <= cuda::grouped_swiglu_max_experts,
                             "DeviceAllToAllEP: ", o.experts_per_member, " experts per member exceed the grouped "
                             "SwiGLU's ", cuda::grouped_swiglu_max_experts);
    require<InvalidArgument>(!s.fixed_capacity || s.max_recv_rows < 0,
                             "DeviceAllToAllEP: max_recv_rows applies to the dynamic variant only (the fixed one "
                             "receives members x worst_case_rows)");
}

}  // namespace detail

inline std::size_t DeviceAllToAllEP::capacity_bytes(const DeviceEpSpec& spec)
{
    detail::validate_ep_spec(spec);
    const Shape sh = shape_of(spec);
    // permute()'s three int32 arrays without CUB's sort storage (as PermutePlan::array_bytes).
    const std::size_t permute = 3 * cuda::align_up(static_cast<std::size_t>(sh.pairs) * sizeof(std::int32_t));
    cuda::ArenaPlan plan;
    Buffers b;
    for_each_buffer(spec, 0, permute, b, [&](auto*& p, std::size_t n) {
        plan.add<std::remove_reference_t<decltype(*p)>>(n);
    });
    return plan.bytes();
}

inline DeviceAllToAllEP::DeviceAllToAllEP(const DeviceEpSpec& spec) : spec_(spec)
{
    detail::validate_ep_spec(spec);
    shape_ = shape_of(spec);
    width_ = shape_.width;
    cap_ = shape_.cap;
    const index_t m = shape_.members;
    // Kernels index rows, pairs and scan entries with int32: every count must fit.
    require<InvalidArgument>(shape_.pairs <= 0x7fffffff && shape_.send_slots <= 0x7fffffff &&
                                 shape_.recv_slots <= 0x7fffffff && m * shape_.tokens + 1 <= 0x7fffffff &&
                                 shape_.send_rows * shape_.width <= 0x7fffffff &&
                                 shape_.tokens * shape_.slots <= 0x7fffffff,
                             "DeviceAllToAllEP: ", shape_.pairs, " expanded rows, ", shape_.send_slots, " send and ",
                             shape_.recv_slots, " receive rows, or ", m * shape_.tokens + 1,
                             " plan entries do not fit int32; plan for fewer tokens");
    cuda::check(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes_, static_cast<const std::int32_t*>(nullptr),
                                              static_cast<std::int32_t*>(nullptr),
                                              static_cast<int>(m * shape_.tokens + 1)),
                "cub::DeviceScan::ExclusiveSum (size query)");
    permute_plan_ = cuda::PermutePlan(shape_.pairs, spec.owners.experts_per_member);
    cuda::ArenaPlan plan;
    for_each_buffer(spec, scan_bytes_, permute_plan_.workspace_bytes(), b_, [&](auto*& p, std::size_t n) {
        plan.add<std::remove_reference_t<decltype(*p)>>(n);
    });
    arena_ = cuda::DeviceArena(plan.bytes());
    for_each_buffer(spec, scan_bytes_, permute_plan_.workspace_bytes(), b_, [&](auto*& p, std::size_t n) {
        p = arena_.take<std::remove_reference_t<decltype(*p)>>(n);
    });
    // The fixed variant sends whole blocks, padding rows included: zero what this rank sends, so
    // that no byte on the wire is uninitialised memory (once; the legacy stream is synchronised,
    // since the caller's stream may not wait for it).
    const auto zero = [](void* p, std::size_t bytes) {
        if (bytes > 0) cuda::check(cudaMemset(p, 0, bytes), "cudaMemset (send buffers)");
    };
    const auto z = [](index_t n) { return static_cast<std::size_t>(n); };
    zero(b_.send_header, z(shape_.send_slots * shape_.header) * sizeof(std::int32_t));
    zero(b_.send_payload, z(shape_.send_slots * spec.hidden) * sizeof(bfloat16));
    zero(b_.reply, z(shape_.recv_slots * spec.hidden) * sizeof(bfloat16));
    cuda::check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
    host_meta_ = cuda::PinnedBuffer<std::int32_t>(static_cast<std::size_t>(2 * m + 1));
    for (auto* v : {&send_rows_, &recv_rows_, &send_n_, &recv_n_}) v->assign(static_cast<std::size_t>(m), 0);
    ones_.assign(static_cast<std::size_t>(m), 1);
}

inline DeviceOwners DeviceAllToAllEP::device_owners() const noexcept
{
    return DeviceOwners{spec_.owners.first_expert, spec_.owners.experts_per_member, spec_.owners.members};
}

inline BlockLayout DeviceAllToAllEP::send_layout() const noexcept
{
    return BlockLayout{spec_.fixed_capacity ? cap_ : 0, b_.send_first, spec_.owners.members};
}

inline BlockLayout DeviceAllToAllEP::recv_layout() const noexcept
{
    return BlockLayout{spec_.fixed_capacity ? cap_ : 0, b_.recv_first, spec_.owners.members};
}

inline DeviceAllToAllEP::PlanView DeviceAllToAllEP::plan_view() const noexcept
{
    PlanView v;
    v.rows = PlanRowsView{b_.row_token, b_.row_count, b_.row_pairs, b_.target, b_.parts};
    v.rows_to = b_.meta;
    v.send_first = b_.send_first;
    v.recv_counts = b_.meta + spec_.owners.members;
    return v;
}

inline void DeviceAllToAllEP::plan(const std::int32_t* experts, index_t tokens, cudaStream_t stream)
{
    require<InvalidArgument>(tokens >= 0 && tokens <= spec_.max_tokens, "DeviceAllToAllEP: ", tokens,
                             " tokens exceed the planned ", spec_.max_tokens);
    require<InvalidArgument>(tokens == 0 || experts != nullptr, "DeviceAllToAllEP: the routed experts are null");
    const int m = spec_.owners.members, t = static_cast<int>(tokens), k = static_cast<int>(spec_.slots);
    const DeviceOwners o = device_owners();
    std::int32_t* status = b_.meta + 2 * m;
    planned_tokens_ = tokens;
    cuda::check(cudaMemsetAsync(status, 0, sizeof(std::int32_t), stream), "cudaMemsetAsync (status)");
    const index_t entries = static_cast<index_t>(m) * t + 1;
    ep_count_kernel<<<detail::ep_thread_blocks(entries), EpLaunch::block_threads, 0, stream>>>(experts, t, k,
                                                                                               spec_.mode, o, b_.counts);
    cuda::check_launch("ep_count_kernel");
    // CUB's temporary storage does not grow when there are fewer items than planned.
    std::size_t scan_bytes = scan_bytes_;
    cuda::check(cub::DeviceScan::ExclusiveSum(b_.scan_ws, scan_bytes, b_.counts, b_.scan, static_cast<int>(entries),
                                              stream),
                "cub::DeviceScan::ExclusiveSum");
    if (t > 0) {
        ep_fill_kernel<<<detail::ep_thread_blocks(t), EpLaunch::block_threads, 0, stream>>>(
            experts, t, k, static_cast<int>(width_), spec_.mode, o, b_.scan, plan_view().rows, status);
        cuda::check_launch("ep_fill_kernel");
    }
    ep_send_counts_kernel<<<detail::ep_thread_blocks(m + 1), EpLaunch::block_threads, 0, stream>>>(
        b_.scan, t, m, spec_.fixed_capacity ? cap_ : 0, b_.send_first, b_.meta, status);
    cuda::check_launch("ep_send_counts_kernel");
}

inline void DeviceAllToAllEP::run(comm::NcclComm& comm, const cuda::GroupedExpertWeights& held,
                                  const std::int32_t* experts, const float* weights, const bfloat16* u, index_t tokens,
                                  bfloat16* y, cudaStream_t stream)
{
    const int m = spec_.owners.members;
    require<InvalidArgument>(comm.size() == m && comm.rank() == spec_.rank, "DeviceAllToAllEP: planned as member ",
                             spec_.rank, " of ", m, ", run on rank ", comm.rank(), " of ", comm.size());
    require<InvalidArgument>(held.experts == spec_.owners.experts_per_member && held.d == spec_.hidden &&
                                 held.f == spec_.intermediate,
                             "DeviceAllToAllEP: the held experts are ", held.experts, " of d ", held.d, ", f ", held.f,
                             "; planned ", spec_.owners.experts_per_member, " of d ", spec_.hidden, ", f ",
                             spec_.intermediate);
    require<InvalidArgument>(tokens == 0 || (u != nullptr && y != nullptr && weights != nullptr),
                             "DeviceAllToAllEP: u, weights or y is null");
    const index_t d = spec_.hidden, h = shape_.header, w = width_;
    const int di = static_cast<int>(d), wi = static_cast<int>(w);
    std::int32_t* status = b_.meta + 2 * m;
    std::int32_t* rows_to = b_.meta;
    std::int32_t* recv_counts = b_.meta + m;

    // 1. Plan; 2. counts (int32 bit patterns in fp32 words: copied, never converted).
    plan(experts, tokens, stream);
    auto words = [](const std::int32_t* p, index_t n) {
        return std::span<const float>(reinterpret_cast<const float*>(p), static_cast<std::size_t>(n));
    };
    auto words_out = [](std::int32_t* p, index_t n) {
        return std::span<float>(reinterpret_cast<float*>(p), static_cast<std::size_t>(n));
    };
    comm.all_to_all_v(words(rows_to, m), ones_, words_out(recv_counts, m), ones_, stream);
    ep_recv_first_kernel<<<1, 1, 0, stream>>>(recv_counts, m, spec_.fixed_capacity ? cap_ : 0, b_.recv_first, status);
    cuda::check_launch("ep_recv_first_kernel");

    // Rows each member sends here and this rank sends there, and the rows received (a bound on
    // the device total in the fixed variant, the exact total in the dynamic one).
    index_t received = 0;
    std::int32_t plan_status = 0;
    if (spec_.fixed_capacity) {
        std::fill(send_rows_.begin(), send_rows_.end(), cap_);
        std::fill(recv_rows_.begin(), recv_rows_.end(), cap_);
        received = shape_.recv_slots;
    } else {
        cuda::check(cudaMemcpyAsync(host_meta_.data(), b_.meta, host_meta_.size() * sizeof(std::int32_t),
                                    cudaMemcpyDeviceToHost, stream),
                    "cudaMemcpyAsync (exchange counts)");
        comm.synchronize(stream);
        for (std::size_t j = 0; j < static_cast<std::size_t>(m); ++j) {
            send_rows_[j] = host_meta_[j];
            recv_rows_[j] = host_meta_[static_cast<std::size_t>(m) + j];
            received += recv_rows_[j];
        }
        plan_status = host_meta_[static_cast<std::size_t>(2 * m)];
        // Past here the peers are in the dispatch all-to-all: a throw leaves them to time out.
        require<CommError>(received <= shape_.recv_slots, "DeviceAllToAllEP: rank ", spec_.rank, " receives ",
                           received, " rows, more than its max_recv_rows (", shape_.recv_slots,
                           "); plan for more (-1: the worst case)");
    }
    // Element counts of an all-to-all of `per_row` elements per row.
    auto elements = [](const std::vector<index_t>& rows, index_t per_row,
                       std::vector<index_t>& out) -> std::vector<index_t>& {
        for (std::size_t j = 0; j < rows.size(); ++j) out[j] = rows[j] * per_row;
        return out;
    };

    // 3. Dispatch: headers, then payloads.
    if (tokens > 0) {
        ep_pack_kernel<<<detail::ep_row_blocks(shape_.send_rows), EpLaunch::block_threads, 0, stream>>>(
            u, experts, weights, plan_view().rows, send_layout(), spec_.mode, wi, di, b_.send_header, b_.send_payload);
        cuda::check_launch("ep_pack_kernel");
    }
    comm.all_to_all_v(words(b_.send_header, shape_.send_slots * h), elements(send_rows_, h, send_n_),
                      words_out(b_.recv_header, shape_.recv_slots * h), elements(recv_rows_, h, recv_n_), stream);
    comm.all_to_all_v(std::span<const bfloat16>(b_.send_payload, static_cast<std::size_t>(shape_.send_slots * d)),
                      elements(send_rows_, d, send_n_),
                      std::span<bfloat16>(b_.recv_payload, static_cast<std::size_t>(shape_.recv_slots * d)),
                      elements(recv_rows_, d, recv_n_), stream);

    // 4. The held experts over the received rows, expanded to (row, expert) pairs.
    const index_t pairs = received * w;
    if (pairs > 0) {
        ep_expand_kernel<<<detail::ep_thread_blocks(pairs), EpLaunch::block_threads, 0, stream>>>(
            b_.recv_header, recv_layout(), spec_.mode, wi, pairs, b_.pair_expert);
        cuda::check_launch("ep_expand_kernel");
    }
    const index_t local_begin = spec_.owners.first_expert + spec_.rank * spec_.owners.experts_per_member;
    cuda::permute(permute_plan_, pairs, b_.pair_expert, local_begin, b_.permute_ws,
                  cuda::PermuteOutputs{b_.sorted_pairs, b_.offsets, b_.inverse}, stream);
    if (pairs > 0) {
        ep_gather_kernel<<<detail::ep_row_blocks(pairs), EpLaunch::block_threads, 0, stream>>>(
            b_.recv_payload, b_.sorted_pairs, b_.offsets + spec_.owners.experts_per_member, recv_layout(), wi, di,
            b_.expert_in);
        cuda::check_launch("ep_gather_kernel");
    }
    cuda::grouped_swiglu(held, b_.offsets, b_.expert_in, pairs, b_.experts_ws, b_.expert_out, stream);
    if (received > 0) {
        ep_reply_kernel<<<detail::ep_row_blocks(received), EpLaunch::block_threads, 0, stream>>>(
            b_.recv_header, b_.expert_out, b_.inverse, recv_layout(), spec_.mode, wi, di, b_.reply, status);
        cuda::check_launch("ep_reply_kernel");
    }

    // 5. Back to the senders (the dispatch's counts, the other way), then to the target rows.
    comm.all_to_all_v(std::span<const bfloat16>(b_.reply, static_cast<std::size_t>(shape_.recv_slots * d)),
                      elements(recv_rows_, d, recv_n_),
                      std::span<bfloat16>(b_.back, static_cast<std::size_t>(shape_.send_slots * d)),
                      elements(send_rows_, d, send_n_), stream);
    if (tokens > 0) {
        ep_land_kernel<<<detail::ep_row_blocks(shape_.send_rows), EpLaunch::block_threads, 0, stream>>>(
            b_.back, b_.target, send_layout(), di, y);
        cuda::check_launch("ep_land_kernel");
    }
    if (plan_status != 0)
        raise<CommError>("DeviceAllToAllEP: rank ", spec_.rank, "'s routing cannot be dispatched (status ",
                         plan_status, ": ",
                         (plan_status & ep_status::unowned_expert) ? "an expert no member holds; " : "",
                         (plan_status & ep_status::row_overflow) ? "a token names an expert twice; " : "",
                         (plan_status & ep_status::capacity_overflow) ? "a block over its capacity; " : "",
                         "those rows were dropped)");
}

inline void DeviceAllToAllEP::combine(const bfloat16* y, const float* weights, const bfloat16* base, index_t tokens,
                                      bfloat16* out, cudaStream_t stream) const
{
    require<InvalidArgument>(tokens >= 0 && tokens <= planned_tokens_, "DeviceAllToAllEP::combine: ", tokens,
                             " tokens, the last exchange planned ", planned_tokens_);
    if (tokens == 0) return;
    ep_combine_kernel<<<detail::ep_row_blocks(tokens), EpLaunch::block_threads, 0, stream>>>(
        y, b_.parts, weights, base, static_cast<int>(tokens), static_cast<int>(spec_.slots),
        static_cast<int>(spec_.hidden), spec_.mode, out);
    cuda::check_launch("ep_combine_kernel");
}

inline std::int32_t DeviceAllToAllEP::status(cudaStream_t stream) const
{
    std::int32_t s = 0;
    cuda::check(cudaMemcpyAsync(&s, b_.meta + 2 * spec_.owners.members, sizeof(s), cudaMemcpyDeviceToHost, stream),
                "cudaMemcpyAsync (status)");
    cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return s;
}

inline NcclExpertExchange::NcclExpertExchange(comm::NcclComm& comm, const DeviceEpSpec& spec)
    : comm_((require<InvalidArgument>(comm.size() == spec.owners.members && comm.rank() == spec.rank,
                                      "NcclExpertExchange: planned as member ", spec.rank, " of ", spec.owners.members,
                                      ", the communicator is rank ", comm.rank(), " of ", comm.size()),
             &comm)),
      ep_(spec)
{
}

}  // namespace foe::parallel
