#pragma once
// AllToAllEP<Comm>: expert parallelism by all-to-all inside a communicator whose member j holds
// experts [first_expert + j E_r, first_expert + (j+1) E_r), E_r = experts_per_member.
//
//   IntraGroupEP: FoE with G > H; the communicator is the group's m ranks (one node), so the
//                 dispatch and combine never leave the node.
//   GlobalEP:     the standard MoE baseline; the communicator is all G ranks.
//
// One layer's exchange, for the (token, slot) pairs of this rank's tokens:
//   1. counts: how many rows go to each member (one float per member, an all-to-all);
//   2. dispatch: each row is [expert id, u[token]] (d + 1 floats), grouped by destination in
//      (token, slot) order;
//   3. each member runs its experts over the rows it received;
//   4. combine: the outputs go back the same way (d floats per row) into y[token * slots + slot].
// The order of rows is fixed by the routing, so the result is deterministic. Rows are fp32 on
// the host; a device backend sends bf16.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"
#include "foe/experts/experts.hpp"
#include "foe/experts/permute.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

template <comm::Comm C>
class AllToAllEP {
public:
    AllToAllEP() = default;
    AllToAllEP(C comm, index_t first_expert, index_t experts_per_member)
        : comm_(std::move(comm)), first_(first_expert), per_member_(experts_per_member)
    {
        require<ConfigError>(experts_per_member > 0, "experts per member (", experts_per_member, ") must be positive");
    }

    template <experts::ExpertsPolicy Experts>
    void run(Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y);

    [[nodiscard]] C& comm() noexcept { return comm_; }

private:
    [[nodiscard]] int owner(std::int32_t expert) const
    {
        const index_t j = (static_cast<index_t>(expert) - first_) / per_member_;
        require<CommError>(expert >= first_ && j < comm_.size(), "expert ", expert, " is not held by any of the ",
                           comm_.size(), " members (experts [", first_, ", ", first_ + comm_.size() * per_member_, "))");
        return static_cast<int>(j);
    }

    C comm_{};
    index_t first_ = 0, per_member_ = 1;
    experts::Permutation by_owner_;  // (token * slots + slot) rows grouped by destination member
    std::vector<float> send_, recv_, out_, back_;
    routing::RoutingResult local_;
};

template <comm::Comm C>
template <experts::ExpertsPolicy Experts>
void AllToAllEP<C>::run(Experts& x, MatrixView<const float> u, const routing::RoutingResult& r, MatrixView<float> y)
{
    const int members = comm_.size();
    const index_t d = u.extent(1), row = d + 1, pairs = r.tokens * r.slots_per_token;
    const auto stream = typename C::stream_type{};

    // 1. Rows per destination, in (token, slot) order within each destination.
    experts::group_rows(pairs, members, [&](index_t p) { return owner(r.experts[static_cast<std::size_t>(p)]); }, by_owner_);
    const std::vector<index_t>& order = by_owner_.rows;
    std::vector<index_t> rows_to(static_cast<std::size_t>(members));
    for (int j = 0; j < members; ++j) rows_to[static_cast<std::size_t>(j)] = by_owner_.count(j);

    // Counts travel as floats (exact below 2^24 rows per destination).
    constexpr index_t max_rows = index_t{1} << 24;
    std::vector<float> count_out(static_cast<std::size_t>(members)), count_in(count_out.size());
    for (int j = 0; j < members; ++j) {
        require<CommError>(rows_to[static_cast<std::size_t>(j)] < max_rows, "expert dispatch of ",
                           rows_to[static_cast<std::size_t>(j)], " rows to one member exceeds the limit ", max_rows);
        count_out[static_cast<std::size_t>(j)] = static_cast<float>(rows_to[static_cast<std::size_t>(j)]);
    }
    const std::vector<index_t> ones(static_cast<std::size_t>(members), 1);
    comm_.all_to_all_v(count_out, ones, count_in, ones, stream);
    std::vector<index_t> rows_from(static_cast<std::size_t>(members));
    index_t received = 0;
    for (int j = 0; j < members; ++j) received += rows_from[static_cast<std::size_t>(j)] = static_cast<index_t>(count_in[static_cast<std::size_t>(j)]);

    // 2. Dispatch [expert, u[token]] rows.
    send_.resize(static_cast<std::size_t>(pairs * row));
    for (index_t i = 0; i < pairs; ++i) {
        const index_t p = order[static_cast<std::size_t>(i)];
        float* dst = &send_[static_cast<std::size_t>(i * row)];
        dst[0] = static_cast<float>(r.experts[static_cast<std::size_t>(p)]);
        const float* src = &u(p / r.slots_per_token, 0);
        std::copy_n(src, d, dst + 1);
    }
    std::vector<index_t> send_counts(static_cast<std::size_t>(members)), recv_counts(send_counts.size());
    for (int j = 0; j < members; ++j) {
        send_counts[static_cast<std::size_t>(j)] = rows_to[static_cast<std::size_t>(j)] * row;
        recv_counts[static_cast<std::size_t>(j)] = rows_from[static_cast<std::size_t>(j)] * row;
    }
    recv_.resize(static_cast<std::size_t>(received * row));
    comm_.all_to_all_v(send_, send_counts, recv_, recv_counts, stream);

    // 3. The received rows through this member's experts: one slot per row.
    local_.tokens = received;
    local_.slots_per_token = 1;
    local_.slots_per_group = 1;
    local_.group_begin = 0;
    local_.experts.resize(static_cast<std::size_t>(received));
    local_.weights.assign(static_cast<std::size_t>(received), 1.0f);
    std::vector<float> inputs(static_cast<std::size_t>(received * d));
    for (index_t i = 0; i < received; ++i) {
        const float* src = &recv_[static_cast<std::size_t>(i * row)];
        local_.experts[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(src[0]);
        std::copy_n(src + 1, d, &inputs[static_cast<std::size_t>(i * d)]);
    }
    out_.resize(static_cast<std::size_t>(received * d));
    x.compute(MatrixView<const float>(inputs.data(), {received, d}), local_, MatrixView<float>(out_.data(), {received, d}));

    // 4. Combine: outputs back to their senders, then into the (token, slot) rows.
    for (int j = 0; j < members; ++j) {
        send_counts[static_cast<std::size_t>(j)] = rows_from[static_cast<std::size_t>(j)] * d;
        recv_counts[static_cast<std::size_t>(j)] = rows_to[static_cast<std::size_t>(j)] * d;
    }
    back_.resize(static_cast<std::size_t>(pairs * d));
    comm_.all_to_all_v(out_, send_counts, back_, recv_counts, stream);
    for (index_t i = 0; i < pairs; ++i)
        std::copy_n(&back_[static_cast<std::size_t>(i * d)], d, &y(order[static_cast<std::size_t>(i)], 0));
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
