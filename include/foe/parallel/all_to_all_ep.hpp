#pragma once
// AllToAllEP<Comm>: expert parallelism by all-to-all inside a communicator whose member j holds
// experts [first_expert + j E_r, first_expert + (j+1) E_r), E_r = experts_per_member.
//
//   IntraGroupEP: FoE with G > H; the communicator is the group's m ranks (one node), so the
//                 dispatch and combine never leave the node.
//   GlobalEP:     the standard MoE baseline; the communicator is all G ranks.
//
// One layer's exchange, for this rank's tokens, in one of two modes (parallel/dispatch_plan.hpp):
//   1. counts: how many rows go to each member (one float per member, an all-to-all);
//   2. dispatch: naive, one row [expert, u] per (token, slot); dedup, one row
//      [n, experts, weights, u] per (token, member holding >= 1 of its experts);
//   3. each member runs its experts over the rows it received (dedup: and sums each row's
//      experts, weighted, in slot order);
//   4. return: naive, one expert output per (token, slot); dedup, one partial sum per
//      (token, member), which combine() adds to the residual in member order.
// The order of rows is fixed by the routing, so the result is deterministic. Dedup sums a
// token's experts in a different order than naive (per member first), so the two agree to fp32
// rounding, not bit for bit. Rows are fp32 on the host; a device backend sends bf16.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"
#include "foe/experts/experts.hpp"
#include "foe/parallel/dispatch_plan.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

template <comm::Comm C>
class AllToAllEP {
public:
    /// The communicator's: a host exchange over MpiComm, a device one over NcclComm.
    using backend = comm::comm_backend_t<C>;

    AllToAllEP() = default;
    AllToAllEP(C comm, index_t first_expert, index_t experts_per_member, Dispatch mode = Dispatch::naive)
        : comm_(std::move(comm)), owners_{first_expert, experts_per_member, comm_.size()}, mode_(mode)
    {
        require<ConfigError>(experts_per_member > 0, "experts per member (", experts_per_member, ") must be positive");
    }

    /// Leaves in y what combine() needs: naive, y[i * slots + s] = FFN of slot s of token i;
    /// dedup, y[i * slots + j] = the j-th partial sum of token i (plan().parts[i] of them).
    template <experts::ExpertsPolicy Experts>
    void run(Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y);

    /// out[i] = residual[i] + the token's expert outputs over the slot range, weighted. Dedup
    /// returns sums over all of a token's slots on a member, so it takes the whole range only.
    template <experts::ExpertsPolicy Experts>
    void combine(const routing::RoutingResult& r, MatrixView<const float> y, MatrixView<const float> residual,
                 index_t first_slot, index_t slot_count, MatrixView<float> out) const;

    [[nodiscard]] C& comm() noexcept { return comm_; }
    [[nodiscard]] Dispatch mode() const noexcept { return mode_; }
    /// The plan of the last run(): rows sent to each member, and where they returned.
    [[nodiscard]] const DispatchPlan& plan() const noexcept { return plan_; }

private:
    C comm_{};
    ExpertOwners owners_{};
    Dispatch mode_ = Dispatch::naive;
    DispatchPlan plan_;
    std::vector<float> send_, recv_, inputs_, out_, back_;
    routing::RoutingResult local_;
};

template <comm::Comm C>
template <experts::ExpertsPolicy Experts>
void AllToAllEP<C>::run(Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y)
{
    const int members = comm_.size();
    const index_t d = u.extent(1), slots = r.slots_per_token;
    require(y.extent(0) == r.tokens * slots && y.extent(1) == d && y.stride(1) == 1, "expert output is ",
            format_shape(y.shape()), ", expected [", r.tokens * slots, ", ", d, "] with unit-stride rows");
    const auto stream = typename C::stream_type{};
    plan_dispatch(r, owners_, mode_, plan_);
    const index_t width = plan_.width, header = header_floats(mode_, slots, owners_.experts_per_member);
    const index_t row = header + d, rows = plan_.rows();

    // 1. Counts travel as floats (exact below 2^24 rows per member).
    constexpr index_t max_rows = index_t{1} << 24;
    std::vector<float> count_out(static_cast<std::size_t>(members)), count_in(count_out.size());
    for (int j = 0; j < members; ++j) {
        const index_t n = plan_.rows_to[static_cast<std::size_t>(j)];
        require<CommError>(n < max_rows, "expert dispatch of ", n, " rows to one member exceeds the limit ", max_rows);
        count_out[static_cast<std::size_t>(j)] = static_cast<float>(n);
    }
    const std::vector<index_t> ones(static_cast<std::size_t>(members), 1);
    comm_.all_to_all_v(count_out, ones, count_in, ones, stream);
    std::vector<index_t> rows_from(static_cast<std::size_t>(members));
    index_t received = 0;
    for (int j = 0; j < members; ++j)
        received += rows_from[static_cast<std::size_t>(j)] = static_cast<index_t>(count_in[static_cast<std::size_t>(j)]);

    // 2. Dispatch: naive [expert, u]; dedup [n, e_1 .. e_c, w_1 .. w_c, u] (unused: -1 and 0).
    send_.resize(static_cast<std::size_t>(rows * row));
    for (index_t i = 0; i < rows; ++i) {
        float* dst = &send_[static_cast<std::size_t>(i * row)];
        const index_t n = plan_.row_count[static_cast<std::size_t>(i)];
        const index_t* pairs = &plan_.row_pairs[static_cast<std::size_t>(i * width)];
        if (mode_ == Dispatch::naive) {
            dst[0] = static_cast<float>(r.experts[static_cast<std::size_t>(pairs[0])]);
        } else {
            dst[0] = static_cast<float>(n);
            for (index_t s = 0; s < width; ++s) {
                dst[1 + s] = s < n ? static_cast<float>(r.experts[static_cast<std::size_t>(pairs[s])]) : -1.0f;
                dst[1 + width + s] = s < n ? r.weights[static_cast<std::size_t>(pairs[s])] : 0.0f;
            }
        }
        std::copy_n(&u(plan_.row_token[static_cast<std::size_t>(i)], 0), d, dst + header);
    }
    std::vector<index_t> send_counts(static_cast<std::size_t>(members)), recv_counts(send_counts.size());
    for (int j = 0; j < members; ++j) {
        send_counts[static_cast<std::size_t>(j)] = plan_.rows_to[static_cast<std::size_t>(j)] * row;
        recv_counts[static_cast<std::size_t>(j)] = rows_from[static_cast<std::size_t>(j)] * row;
    }
    recv_.resize(static_cast<std::size_t>(received * row));
    comm_.all_to_all_v(send_, send_counts, recv_, recv_counts, stream);

    // 3. The received rows through this member's experts: `width` slots per row; a slot whose
    //    expert is -1 is held by no one, so the experts policy leaves its output alone.
    local_.tokens = received;
    local_.slots_per_token = width;
    local_.slots_per_group = width;
    local_.group_begin = 0;
    local_.experts.resize(static_cast<std::size_t>(received * width));
    local_.weights.resize(local_.experts.size());
    inputs_.resize(static_cast<std::size_t>(received * d));
    for (index_t i = 0; i < received; ++i) {
        const float* src = &recv_[static_cast<std::size_t>(i * row)];
        for (index_t s = 0; s < width; ++s) {
            const bool naive = mode_ == Dispatch::naive;
            const auto e = static_cast<std::int32_t>(naive ? src[0] : src[1 + s]);
            require<CommError>(e == -1 || (owners_.owner(e) == comm_.rank()), "member ", comm_.rank(),
                               " received a row for expert ", e, ", which it does not hold");
            local_.experts[static_cast<std::size_t>(i * width + s)] = e;
            local_.weights[static_cast<std::size_t>(i * width + s)] = naive ? 1.0f : src[1 + width + s];
        }
        std::copy_n(src + header, d, &inputs_[static_cast<std::size_t>(i * d)]);
    }
    out_.resize(static_cast<std::size_t>(received * width * d));
    x.compute(MatrixView<const float>(inputs_.data(), {received, d}), local_,
              MatrixView<float>(out_.data(), {received * width, d}));
    if (mode_ == Dispatch::dedup) {
        // One partial sum per row, the row's experts weighted and added in slot order, in place
        // of the row's first output.
        FOE_OMP_PARALLEL_FOR
        for (index_t i = 0; i < received; ++i) {
            float* acc = &out_[static_cast<std::size_t>(i * width * d)];
            const float w0 = local_.weights[static_cast<std::size_t>(i * width)];
            for (index_t j = 0; j < d; ++j) acc[j] *= w0;
            for (index_t s = 1; s < width && local_.experts[static_cast<std::size_t>(i * width + s)] >= 0; ++s) {
                const float w = local_.weights[static_cast<std::size_t>(i * width + s)];
                const float* o = &out_[static_cast<std::size_t>((i * width + s) * d)];
                for (index_t j = 0; j < d; ++j) acc[j] += w * o[j];
            }
        }
    }

    // 4. Return one row per received row (naive: width is 1; dedup: the partial, strided by
    //    width), back to its sender, then into the result rows the plan names.
    if (width > 1)
        for (index_t i = 1; i < received; ++i)
            std::copy_n(&out_[static_cast<std::size_t>(i * width * d)], d, &out_[static_cast<std::size_t>(i * d)]);
    for (int j = 0; j < members; ++j) {
        send_counts[static_cast<std::size_t>(j)] = rows_from[static_cast<std::size_t>(j)] * d;
        recv_counts[static_cast<std::size_t>(j)] = plan_.rows_to[static_cast<std::size_t>(j)] * d;
    }
    back_.resize(static_cast<std::size_t>(rows * d));
    comm_.all_to_all_v(std::span<const float>(out_.data(), static_cast<std::size_t>(received * d)), send_counts, back_,
                       recv_counts, stream);
    for (index_t i = 0; i < rows; ++i)
        std::copy_n(&back_[static_cast<std::size_t>(i * d)], d, &y(plan_.target[static_cast<std::size_t>(i)], 0));
}

template <comm::Comm C>
template <experts::ExpertsPolicy Experts>
void AllToAllEP<C>::combine(const routing::RoutingResult& r, MatrixView<const float> y,
                            MatrixView<const float> residual, index_t first_slot, index_t slot_count,
                            MatrixView<float> out) const
{
    if (mode_ == Dispatch::naive) {
        Experts::combine(r, y, residual, first_slot, slot_count, out);
        return;
    }
    const index_t t = r.tokens, d = residual.extent(1), slots = r.slots_per_token;
    require(first_slot == 0 && slot_count == slots, "deduplicated dispatch returns one sum per (token, member) over "
            "all of a token's ", slots, " slots; it cannot combine slots [", first_slot, ", ", first_slot + slot_count,
            ") alone (a rank holding several groups uses LocalExperts)");
    require(plan_.tokens == t && plan_.slots == slots, "combine() is for the routing of the last run() (", plan_.tokens,
            " tokens), got ", t);
    require(residual.extent(0) == t && out.extent(0) == t && out.extent(1) == d && y.extent(0) == t * slots &&
                y.extent(1) == d && y.stride(1) == 1 && residual.stride(1) == 1 && out.stride(1) == 1,
            "combine shapes disagree with the routing of ", t, " tokens of width ", d, ": y is ", format_shape(y.shape()),
            ", residual ", format_shape(residual.shape()), ", out ", format_shape(out.shape()));
    FOE_OMP_PARALLEL_FOR
    for (index_t i = 0; i < t; ++i) {
        float* o = &out(i, 0);
        const float* res = &residual(i, 0);
        for (index_t j = 0; j < d; ++j) o[j] = res[j];
        for (index_t p = 0; p < plan_.parts[static_cast<std::size_t>(i)]; ++p) {
            const float* part = &y(i * slots + p, 0);
            for (index_t j = 0; j < d; ++j) o[j] += part[j];
        }
    }
}

}  // namespace foe::parallel

namespace foe::parallel {

/// FoE with G > H: dispatch inside the group's communicator (its m ranks, one node).
template <comm::Comm C>
using IntraGroupEP = AllToAllEP<C>;

/// The standard MoE baseline: dispatch over all G ranks.
template <comm::Comm C>
using GlobalEP = AllToAllEP<C>;

}  // namespace foe::parallel
