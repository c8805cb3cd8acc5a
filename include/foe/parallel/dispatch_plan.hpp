#pragma once
// The index logic of expert-parallel dispatch, one definition for the host policy (AllToAllEP)
// and the device one: which member holds an expert, which rows a rank sends where and in what
// order, how wide a row is, where each returned row lands, and the worst case that a
// fixed-capacity (graph-capturable) exchange must hold.
//
// Two modes (DESIGN.md 2.1):
//   naive  one row per (token, slot), to the member that holds the slot's expert:
//            [expert, u[token]]                                  1 + d floats
//          the receiver runs one expert per row and returns FFN_e(u) (d floats); the sender's
//          layer weights and sums the slots as if the experts were local.
//   dedup  one row per (token, member holding at least one of the token's experts):
//            [n, e_1 .. e_c, w_1 .. w_c, u[token]]               1 + 2c + d floats
//          c = min(slots, experts per member), n <= c used; the receiver runs the n experts and
//          returns one partial sum w_1 FFN_e1(u) + ... + w_n FFN_en(u) (d floats, slot order);
//          the sender adds the partials of a token in member order to its residual.
// Rows go out grouped by destination member, in token order inside a destination (a stable
// counting sort), so the exchange and every sum are in a fixed order: deterministic. A row to
// the sender itself goes through the same exchange (its own block stays local: no bytes).
//
// Row i of the send order returns into row target[i] of the [tokens * slots, d] result buffer:
// naive, row token * slots + slot; dedup, row token * slots + j, where j counts the token's
// earlier destinations in member order (so parts[token] partials fill rows 0 .. parts - 1).

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"
#include "foe/routing/routing.hpp"

namespace foe::parallel {

/// How tokens travel to the experts on other members.
enum class Dispatch : std::uint8_t {
    naive,  ///< one row per (token, expert)
    dedup,  ///< one row per (token, member), expanded at the receiver (DeepEP-style)
};

[[nodiscard]] constexpr std::string_view to_string(Dispatch d) noexcept
{
    return d == Dispatch::dedup ? "dedup" : "naive";
}

/// Members own contiguous ranges of experts: member j holds
/// [first_expert + j * experts_per_member, first_expert + (j + 1) * experts_per_member).
struct ExpertOwners {
    index_t first_expert = 0;
    index_t experts_per_member = 1;
    int members = 1;

    /// The member that holds `expert`; CommError when none does.
    [[nodiscard]] int owner(std::int32_t expert) const
    {
        const index_t j = (static_cast<index_t>(expert) - first_expert) / experts_per_member;
        require<CommError>(expert >= first_expert && j < members, "expert ", expert, " is not held by any of the ",
                           members, " members (experts [", first_expert, ", ",
                           first_expert + members * experts_per_member, "))");
        return static_cast<int>(j);
    }
};

/// Experts of one token one dedup row can carry: c = min(slots, experts per member).
[[nodiscard]] constexpr index_t experts_per_row(Dispatch mode, index_t slots, index_t experts_per_member) noexcept
{
    return mode == Dispatch::naive ? 1 : std::min(slots, experts_per_member);
}

/// Floats in front of u[token] in a dispatched row: naive 1 (the expert); dedup 1 + 2c.
[[nodiscard]] constexpr index_t header_floats(Dispatch mode, index_t slots, index_t experts_per_member) noexcept
{
    return mode == Dispatch::naive ? 1 : 1 + 2 * experts_per_row(mode, slots, experts_per_member);
}

/// The most rows one sender can send to one member for `tokens` tokens of `slots` slots: the
/// size a fixed-capacity exchange reserves per (sender, member) pair.
[[nodiscard]] constexpr index_t worst_case_rows(Dispatch mode, index_t tokens, index_t slots,
                                                index_t experts_per_member) noexcept
{
    return mode == Dispatch::naive ? tokens * std::min(slots, experts_per_member) : tokens;
}

/// The send side of one exchange, from the routing of this rank's tokens.
struct DispatchPlan {
    Dispatch mode = Dispatch::naive;
    index_t tokens = 0, slots = 0;
    index_t width = 1;                      ///< c: experts per row (naive 1)
    std::vector<index_t> rows_to;           ///< [members] rows sent to each member
    std::vector<index_t> row_token;         ///< [rows] the token of each row, in send order
    std::vector<index_t> row_count;         ///< [rows] experts the row carries (1..width)
    std::vector<index_t> row_pairs;         ///< [rows * width] token * slots + slot, slot order
    std::vector<index_t> target;            ///< [rows] result row the returned row lands in
    std::vector<index_t> parts;             ///< [tokens] dedup: partial sums per token

    [[nodiscard]] index_t rows() const noexcept { return static_cast<index_t>(row_token.size()); }
};

/// Plans the exchange of routing `r` over `owners.members` members. Storage is reused.
inline void plan_dispatch(const routing::RoutingResult& r, const ExpertOwners& owners, Dispatch mode,
                          DispatchPlan& plan)
{
    const index_t t = r.tokens, slots = r.slots_per_token, members = owners.members;
    require<CommError>(static_cast<index_t>(r.experts.size()) == t * slots, "routing of ", t, " tokens x ", slots,
                       " slots holds ", r.experts.size(), " experts");
    plan.mode = mode;
    plan.tokens = t;
    plan.slots = slots;
    plan.width = experts_per_row(mode, slots, owners.experts_per_member);
    const index_t w = plan.width;

    // The destination of every (token, slot); a member's first slot in a token opens a row.
    std::vector<int> owner_of(static_cast<std::size_t>(t * slots));
    for (index_t p = 0; p < t * slots; ++p) owner_of[static_cast<std::size_t>(p)] = owners.owner(r.experts[static_cast<std::size_t>(p)]);
    auto opens_row = [&](index_t token, index_t slot) {
        if (mode == Dispatch::naive) return true;
        const int j = owner_of[static_cast<std::size_t>(token * slots + slot)];
        for (index_t s = 0; s < slot; ++s)
            if (owner_of[static_cast<std::size_t>(token * slots + s)] == j) return false;
        return true;
    };

    // Counting sort of the rows by destination, stable in (token, slot) order.
    plan.rows_to.assign(static_cast<std::size_t>(members), 0);
    for (index_t i = 0; i < t; ++i)
        for (index_t s = 0; s < slots; ++s)
            if (opens_row(i, s)) ++plan.rows_to[static_cast<std::size_t>(owner_of[static_cast<std::size_t>(i * slots + s)])];
    std::vector<index_t> next(static_cast<std::size_t>(members), 0);
    for (index_t j = 1; j < members; ++j)
        next[static_cast<std::size_t>(j)] = next[static_cast<std::size_t>(j - 1)] + plan.rows_to[static_cast<std::size_t>(j - 1)];
    const index_t rows = next.back() + plan.rows_to.back();
    plan.row_token.assign(static_cast<std::size_t>(rows), 0);
    plan.row_count.assign(static_cast<std::size_t>(rows), 0);
    plan.row_pairs.assign(static_cast<std::size_t>(rows * w), -1);
    std::vector<index_t> row_of_member(static_cast<std::size_t>(members), -1);  // this token's open rows
    for (index_t i = 0; i < t; ++i) {
        for (index_t s = 0; s < slots; ++s) {
            const int j = owner_of[static_cast<std::size_t>(i * slots + s)];
            index_t& row = row_of_member[static_cast<std::size_t>(j)];
            if (opens_row(i, s)) {
                row = next[static_cast<std::size_t>(j)]++;
                plan.row_token[static_cast<std::size_t>(row)] = i;
            }
            const index_t n = plan.row_count[static_cast<std::size_t>(row)]++;
            // A member holds E_r experts, so a token with distinct experts has at most w on it.
            require<CommError>(n < w, "token ", i, " selects more than ", w, " experts on member ", j,
                               ", which holds ", owners.experts_per_member, " (an expert selected twice?)");
            plan.row_pairs[static_cast<std::size_t>(row * w + n)] = i * slots + s;
        }
    }

    // Where each returned row lands: naive, its own (token, slot); dedup, the token's next part
    // in member order (the rows are in member order already).
    plan.target.resize(static_cast<std::size_t>(rows));
    plan.parts.assign(mode == Dispatch::dedup ? static_cast<std::size_t>(t) : 0, 0);
    for (index_t row = 0; row < rows; ++row) {
        const index_t i = plan.row_token[static_cast<std::size_t>(row)];
        plan.target[static_cast<std::size_t>(row)] =
            mode == Dispatch::naive ? plan.row_pairs[static_cast<std::size_t>(row * w)]
                                    : i * slots + plan.parts[static_cast<std::size_t>(i)]++;
    }
}

}  // namespace foe::parallel
