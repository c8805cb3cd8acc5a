// DeviceAllToAllEP (foe/parallel/all_to_all_ep.cuh): expert parallelism on GPUs over NcclComm.
//
// Without a GPU: the device plan's per-token and per-row rules (foe::parallel::ep, __host__
// __device__) replayed on the host exactly as the kernels apply them (one (member, token) count
// each, an exclusive scan, one token's rows each) equal plan_dispatch on random routings, naive
// and dedup, over member counts, slots and experts per member, with tokens whose experts all sit
// on one member and members that get no rows; whole exchanges of 1-4 members (dynamic and fixed,
// naive and dedup, ranks with no tokens), replayed with the kernels' own row rules around an
// emulated all-to-all, grouping and experts, bit for bit against what the experts give; the padded
// layout's positions; the capacity bound; the fixed variant's stated memory cost.
// With one GPU: the device plan itself against plan_dispatch, and the one-rank exchange (naive,
// dedup; dynamic, fixed capacity, and the fixed one replayed from a CUDA graph) against the host
// experts (SwiGluExperts) on the same bf16 weights. With two GPUs: a two-rank exchange; skipped
// otherwise, saying so.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <exception>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/experts/swiglu_experts.hpp"
#include "foe/parallel/all_to_all_ep.cuh"
#include "foe/parallel/dispatch_plan.hpp"

using foe::index_t;
using foe::comm::NcclComm;
using foe::parallel::BlockLayout;
using foe::parallel::DeviceAllToAllEP;
using foe::parallel::DeviceEpSpec;
using foe::parallel::DeviceOwners;
using foe::parallel::Dispatch;
using foe::parallel::DispatchPlan;
using foe::parallel::ExpertOwners;
using foe::parallel::PlanRowsView;
namespace ep = foe::parallel::ep;
namespace fc = foe::cuda;
using namespace foe::cuda::testing;

namespace {

/// How the experts of a random routing are drawn.
enum class Draw {
    any,         ///< k distinct experts from all members
    one_member,  ///< all of a token's experts on one member (k <= experts per member)
    even_only,   ///< only from even members: the odd ones get no rows
};

foe::routing::RoutingResult random_routing(index_t tokens, index_t slots, const ExpertOwners& o, Draw draw,
                                           std::mt19937_64& rng)
{
    foe::routing::RoutingResult r;
    r.tokens = tokens;
    r.slots_per_token = slots;
    r.slots_per_group = slots;
    r.group_begin = 0;
    const index_t per = o.experts_per_member, all = per * o.members;
    std::uniform_real_distribution<float> weight(0.05f, 1.0f);
    for (index_t t = 0; t < tokens; ++t) {
        std::vector<index_t> pool;
        if (draw == Draw::one_member) {
            const auto j = static_cast<index_t>(std::uniform_int_distribution<int>(0, o.members - 1)(rng));
            for (index_t e = 0; e < per; ++e) pool.push_back(j * per + e);
        } else {
            for (index_t e = 0; e < all; ++e)
                if (draw == Draw::any || (e / per) % 2 == 0) pool.push_back(e);
        }
        std::shuffle(pool.begin(), pool.end(), rng);
        REQUIRE(static_cast<index_t>(pool.size()) >= slots);
        for (index_t s = 0; s < slots; ++s) {
            r.experts.push_back(static_cast<std::int32_t>(o.first_expert + pool[sz(s)]));
            r.weights.push_back(weight(rng));
        }
    }
    return r;
}

std::vector<index_t> widen(const std::vector<std::int32_t>& v) { return {v.begin(), v.end()}; }

DeviceOwners device_owners(const ExpertOwners& o)
{
    return DeviceOwners{o.first_expert, o.experts_per_member, o.members};
}

/// The device plan, replayed on the host as the kernels run it: ep_count_kernel's counts
/// (member-major, a trailing 0), CUB's exclusive scan, ep_fill_kernel's rows per token,
/// ep_send_counts_kernel's rows per member.
struct Replay {
    std::vector<index_t> rows_to, row_token, row_count, row_pairs, target, parts;
    std::int32_t status = 0;
};
Replay replay_device_plan(const foe::routing::RoutingResult& r, const ExpertOwners& owners, Dispatch mode)
{
    const DeviceOwners o = device_owners(owners);
    const index_t t = r.tokens, k = r.slots_per_token, m = owners.members;
    const auto width = static_cast<int>(foe::parallel::experts_per_row(mode, k, owners.experts_per_member));
    std::vector<std::int32_t> counts(sz(m * t + 1), 0), scan(counts.size());
    for (index_t p = 0; p < m * t; ++p)
        counts[sz(p)] = ep::token_rows_to(mode, o, r.experts.data() + (p % t) * k, static_cast<int>(k),
                                          static_cast<int>(p / t));
    std::exclusive_scan(counts.begin(), counts.end(), scan.begin(), 0);
    const index_t rows = scan.back();
    // Poisoned with -7: a row the rules never write shows up as a mismatch.
    std::vector<std::int32_t> row_token(sz(rows), -7), row_count(sz(rows), -7), row_pairs(sz(rows * width), -7),
        target(sz(rows), -7), parts(sz(t), -7);
    const PlanRowsView out{row_token.data(), row_count.data(), row_pairs.data(), target.data(), parts.data()};
    Replay rep;
    for (index_t i = 0; i < t; ++i)
        rep.status |= ep::fill_token_rows(mode, o, r.experts.data() + i * k, static_cast<int>(k), width, i, t,
                                          scan.data(), out);
    for (index_t j = 0; j < m; ++j) rep.rows_to.push_back(scan[sz((j + 1) * t)] - scan[sz(j * t)]);
    rep.row_token = widen(row_token);
    rep.row_count = widen(row_count);
    rep.row_pairs = widen(row_pairs);
    rep.target = widen(target);
    if (mode == Dispatch::dedup) rep.parts = widen(parts);
    return rep;
}

void check_same_plan(const Replay& got, const DispatchPlan& want)
{
    CHECK_MESSAGE(got.rows_to == want.rows_to, "rows_to: ", first_mismatch(got.rows_to, want.rows_to));
    CHECK_MESSAGE(got.row_token == want.row_token, "row_token: ", first_mismatch(got.row_token, want.row_token));
    CHECK_MESSAGE(got.row_count == want.row_count, "row_count: ", first_mismatch(got.row_count, want.row_count));
    CHECK_MESSAGE(got.row_pairs == want.row_pairs, "row_pairs: ", first_mismatch(got.row_pairs, want.row_pairs));
    CHECK_MESSAGE(got.target == want.target, "target: ", first_mismatch(got.target, want.target));
    CHECK_MESSAGE(got.parts == want.parts, "parts: ", first_mismatch(got.parts, want.parts));
}

struct PlanCase {
    int members;
    index_t per_member, slots, first_expert;
};
std::vector<PlanCase> plan_cases()
{
    std::vector<PlanCase> cases;
    for (int m : {1, 2, 3, 4, 8})
        for (index_t per : {1, 2, 3, 4})
            for (index_t k : {1, 2, 3, 4, 6, 8})
                if (k <= m * per) cases.push_back({m, per, k, m == 3 ? 5 : 0});
    return cases;
}

}  // namespace

// --- no GPU needed -----------------------------------------------------------------------------

TEST_CASE("ep: the device plan's rules, replayed on the host, equal plan_dispatch on random routings")
{
    std::mt19937_64 rng(14);
    int checked = 0;
    for (const PlanCase& c : plan_cases()) {
        const ExpertOwners owners{c.first_expert, c.per_member, c.members};
        for (Dispatch mode : {Dispatch::naive, Dispatch::dedup})
            for (Draw draw : {Draw::any, Draw::one_member, Draw::even_only}) {
                if (draw == Draw::one_member && c.slots > c.per_member) continue;
                if (draw == Draw::even_only && c.slots > ((c.members + 1) / 2) * c.per_member) continue;
                for (index_t tokens : {0, 1, 7, 64}) {
                    CAPTURE(c.members);
                    CAPTURE(c.per_member);
                    CAPTURE(c.slots);
                    CAPTURE(tokens);
                    CAPTURE(static_cast<int>(draw));
                    CAPTURE(foe::parallel::to_string(mode));
                    const auto r = random_routing(tokens, c.slots, owners, draw, rng);
                    DispatchPlan want;
                    foe::parallel::plan_dispatch(r, owners, mode, want);
                    const Replay got = replay_device_plan(r, owners, mode);
                    CHECK(got.status == 0);
                    check_same_plan(got, want);
                    if (draw == Draw::even_only && c.members > 1)
                        for (int j = 1; j < c.members; j += 2) CHECK(want.rows_to[sz(j)] == 0);
                    ++checked;
                }
            }
    }
    MESSAGE(checked, " routings replayed");
    CHECK(checked > 500);
}

TEST_CASE("ep: no (sender, member) block of a random routing exceeds worst_case_rows, which some routing reaches")
{
    std::mt19937_64 rng(15);
    for (const PlanCase& c : plan_cases()) {
        const ExpertOwners owners{c.first_expert, c.per_member, c.members};
        for (Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
            const index_t tokens = 33, cap = foe::parallel::worst_case_rows(mode, tokens, c.slots, c.per_member);
            for (Draw draw : {Draw::any, Draw::one_member}) {
                if (draw == Draw::one_member && c.slots > c.per_member) continue;
                const auto r = random_routing(tokens, c.slots, owners, draw, rng);
                const Replay got = replay_device_plan(r, owners, mode);
                for (index_t n : got.rows_to) CHECK(n <= cap);
                for (index_t n : got.row_count) CHECK(n <= foe::parallel::experts_per_row(mode, c.slots, c.per_member));
            }
            // Every token's first min(k, E_r) slots on member 0: member 0's block is exactly full.
            foe::routing::RoutingResult r;
            r.tokens = tokens;
            r.slots_per_token = r.slots_per_group = c.slots;
            for (index_t t = 0; t < tokens; ++t)
                for (index_t s = 0; s < c.slots; ++s) {
                    r.experts.push_back(static_cast<std::int32_t>(c.first_expert + s));  // s < k <= M E_r: distinct
                    r.weights.push_back(1.0f);
                }
            CHECK(replay_device_plan(r, owners, mode).rows_to[0] == cap);
        }
    }
}

TEST_CASE("ep: the rules flag an expert no member holds and a token naming an expert twice, and drop those rows")
{
    const ExpertOwners owners{4, 2, 3};  // experts [4, 10)
    foe::routing::RoutingResult r;
    r.tokens = 2;
    r.slots_per_token = r.slots_per_group = 3;
    r.experts = {4, 10, 7, 3, 5, 6};  // token 0: 10 unowned; token 1: 3 unowned
    r.weights.assign(6, 0.5f);
    for (Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
        const Replay got = replay_device_plan(r, owners, mode);
        CHECK(got.status == foe::parallel::ep_status::unowned_expert);
        const index_t rows = std::accumulate(got.rows_to.begin(), got.rows_to.end(), index_t{0});
        CHECK(rows == 4);  // naive: the 4 owned slots; dedup: each token on members 0 and 1
        CHECK(std::find(got.row_token.begin(), got.row_token.end(), -7) == got.row_token.end());
    }
    // Dedup, c = min(3, 2) = 2: three slots on member 0 overflow its row.
    r.tokens = 1;
    r.experts = {4, 5, 4};
    r.weights.assign(3, 0.5f);
    const Replay dup = replay_device_plan(r, owners, Dispatch::dedup);
    CHECK(dup.status == foe::parallel::ep_status::row_overflow);
    CHECK(dup.row_count == std::vector<index_t>{2});
    CHECK(dup.row_pairs == std::vector<index_t>{0, 1});
}

TEST_CASE("ep: block positions of packed and padded layouts")
{
    std::mt19937_64 rng(16);
    for (int members : {1, 2, 5, 8})
        for (std::int64_t cap : {1, 3, 16}) {
            CAPTURE(members);
            CAPTURE(cap);
            // Counts up to cap + 2 (over the capacity, as a broken routing would send), some zero.
            std::uniform_int_distribution<int> count(0, static_cast<int>(cap) + 2);
            std::vector<std::int32_t> n(sz(members)), first(sz(members + 1), 0);
            for (int j = 0; j < members; ++j) {
                n[sz(j)] = j % 3 == 1 ? 0 : count(rng);
                first[sz(j + 1)] = first[sz(j)] + n[sz(j)];
            }
            const BlockLayout padded{cap, first.data(), members};
            const BlockLayout packed{0, first.data(), members};
            std::int64_t i = 0;
            for (int j = 0; j < members; ++j)
                for (std::int32_t local = 0; local < n[sz(j)]; ++local, ++i) {
                    CHECK(ep::block_position(packed, i) == i);
                    CHECK(ep::block_position(padded, i) == (local < cap ? j * cap + local : -1));
                }
        }
}

TEST_CASE("ep: the fixed-capacity variant's memory is the stated formula")
{
    // capacity_bytes adds up the same buffers the arena carves (all but CUB's temporaries); the
    // file comment's closed form leaves out the plan's arrays and the 256-byte alignment.
    for (Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
        for (int members : {2, 8}) {
            DeviceEpSpec s;
            s.mode = mode;
            s.fixed_capacity = true;
            s.max_tokens = 256;
            s.slots = 8;
            s.hidden = 2048;
            s.intermediate = 1024;
            s.owners = ExpertOwners{0, 64 / members, members};
            const index_t m = members, t = s.max_tokens, k = s.slots, d = s.hidden, f = s.intermediate;
            const index_t c = std::min(k, s.owners.experts_per_member);
            const index_t cap = foe::parallel::worst_case_rows(mode, t, k, s.owners.experts_per_member);
            const index_t h = foe::parallel::header_floats(mode, k, s.owners.experts_per_member);
            const index_t rows = m * cap, pairs = m * t * c;
            const index_t main = rows * (8 * h + 8 * d) + pairs * (24 + 4 * d + 2 * f);
            const index_t w = foe::parallel::experts_per_row(mode, k, s.owners.experts_per_member);
            const index_t send_rows = mode == Dispatch::naive ? t * k : t * std::min<index_t>(k, m);
            const index_t plan = (m * t + 1) * 8 + send_rows * 4 * (3 + w) + t * 4 + (2 * m + 1 + 2 * (m + 1)) * 4 +
                                 (s.owners.experts_per_member + 1) * 4 * 2;
            CHECK(ep::header_words(mode, static_cast<int>(w)) == h);  // the device rows' header is DispatchPlan's
            const auto got = static_cast<index_t>(DeviceAllToAllEP::capacity_bytes(s));
            CAPTURE(foe::parallel::to_string(mode));
            CAPTURE(members);
            MESSAGE(foe::parallel::to_string(mode), ", ", members, " members, ", t, " tokens, k ", k, ", d ", d, ", f ",
                    f, ": ", got, " bytes (", got / (1 << 20), " MiB)");
            CHECK(got >= main + plan);
            CHECK(got <= main + plan + 30 * 256);  // at most one alignment pad per buffer
        }
    }
    // The dynamic variant's default receive side is the same worst case; max_recv_rows shrinks it.
    DeviceEpSpec s;
    s.mode = Dispatch::dedup;
    s.max_tokens = 64;
    s.slots = 4;
    s.hidden = 64;
    s.intermediate = 48;
    s.owners = ExpertOwners{0, 2, 4};
    const std::size_t worst = DeviceAllToAllEP::capacity_bytes(s);
    s.max_recv_rows = 64;
    CHECK(DeviceAllToAllEP::capacity_bytes(s) < worst);
    s.fixed_capacity = true;
    CHECK_THROWS_AS((void)DeviceAllToAllEP::capacity_bytes(s), foe::InvalidArgument);
    s.max_recv_rows = -1;
    s.slots = foe::parallel::ep_max_slots + 1;
    CHECK_THROWS_AS((void)DeviceAllToAllEP::capacity_bytes(s), foe::InvalidArgument);
}

namespace {

/// A stand-in for the experts in the host replay of a whole exchange: elementwise, different per
/// expert, and the same float operations wherever it is evaluated (so results compare exactly).
float fake_expert(std::int32_t e, float x)
{
    return x * (0.5f + 0.25f * static_cast<float>(e % 5)) + static_cast<float>(e) / 128.0f;
}

/// What one rank ends with after a replayed exchange.
struct SimRank {
    std::vector<float> y, out;  ///< [tokens * slots, d] (NaN where not written), [tokens, d]
    std::vector<std::int32_t> parts;
    std::int32_t status = 0;
    std::vector<std::int32_t> rows_to;
};

/// The whole exchange of every member, replayed on the host as DeviceAllToAllEP::run enqueues it:
/// the plan kernels, the counts all-to-all, ep::pack_row, the header and payload all-to-alls
/// (packed blocks in rank order when dynamic, cap-row blocks when fixed), ep::expand_pair, a
/// stable grouping by local expert (permute()), ep::gather_pair, fake_expert (the grouped
/// SwiGLU), ep::reply_row, the all-to-all back, ep::land_row and ep::combine_token. Every row
/// and pair rule is the kernels' own function, called with one lane.
std::vector<SimRank> replay_exchange(Dispatch mode, bool fixed, const ExpertOwners& owners, index_t max_tokens,
                                     index_t slots, index_t d, const std::vector<foe::routing::RoutingResult>& r,
                                     const std::vector<std::vector<float>>& u,
                                     const std::vector<std::vector<float>>& base)
{
    const int m = owners.members;
    const index_t per = owners.experts_per_member;
    const auto width = static_cast<int>(foe::parallel::experts_per_row(mode, slots, per));
    const auto h = static_cast<index_t>(ep::header_words(mode, width));
    const index_t cap = fixed ? foe::parallel::worst_case_rows(mode, max_tokens, slots, per) : 0;
    const index_t send_rows = mode == Dispatch::naive ? max_tokens * slots : max_tokens * std::min<index_t>(slots, m);
    const index_t send_slots = fixed ? m * cap : send_rows;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto di = static_cast<int>(d), ki = static_cast<int>(slots);

    struct Sender {
        std::vector<std::int32_t> scan, row_token, row_count, row_pairs, target, parts, send_first, header;
        std::vector<float> payload, back;
        PlanRowsView view() { return {row_token.data(), row_count.data(), row_pairs.data(), target.data(), parts.data()}; }
    };
    std::vector<Sender> snd(sz(m));
    std::vector<SimRank> res(sz(m));
    const DeviceOwners o = device_owners(owners);
    for (int p = 0; p < m; ++p) {  // plan: ep_count_kernel, CUB's scan, ep_fill_kernel, ep_send_counts_kernel
        Sender& S = snd[sz(p)];
        const index_t t = r[sz(p)].tokens;
        REQUIRE(t <= max_tokens);
        std::vector<std::int32_t> counts(sz(m * t + 1), 0);
        for (index_t q = 0; q < m * t; ++q)
            counts[sz(q)] = ep::token_rows_to(mode, o, r[sz(p)].experts.data() + (q % t) * slots, ki, static_cast<int>(q / t));
        S.scan.resize(counts.size());
        std::exclusive_scan(counts.begin(), counts.end(), S.scan.begin(), 0);
        S.row_token.assign(sz(send_rows), -7);
        S.row_count.assign(sz(send_rows), -7);
        S.row_pairs.assign(sz(send_rows * width), -7);
        S.target.assign(sz(send_rows), -7);
        S.parts.assign(sz(max_tokens), -7);
        for (index_t i = 0; i < t; ++i)
            res[sz(p)].status |= ep::fill_token_rows(mode, o, r[sz(p)].experts.data() + i * slots, ki, width, i, t,
                                                     S.scan.data(), S.view());
        S.send_first.assign(sz(m + 1), -7);
        res[sz(p)].rows_to.assign(sz(m), -7);
        for (int j = 0; j <= m; ++j)
            res[sz(p)].status |= ep::send_counts_entry(j, S.scan.data(), t, m, cap, S.send_first.data(),
                                                       res[sz(p)].rows_to.data());
        // The send buffers start zeroed (the constructor's cudaMemset).
        S.header.assign(sz(send_slots * h), 0);
        S.payload.assign(sz(send_slots * d), 0.0f);
        S.back.assign(sz(send_slots * d), nan);
        const BlockLayout layout{cap, S.send_first.data(), m};
        for (std::int64_t row = 0; row < S.send_first[sz(m)]; ++row)
            ep::pack_row(row, S.view(), layout, mode, width, di, u[sz(p)].data(), r[sz(p)].experts.data(),
                         r[sz(p)].weights.data(), S.header.data(), S.payload.data(), 0, 1);
    }
    // Receivers: counts, headers and payloads in; experts; replies out.
    std::vector<std::vector<std::int32_t>> recv_first(sz(m));
    std::vector<std::vector<float>> reply(sz(m));
    for (int q = 0; q < m; ++q) {
        std::vector<std::int32_t> recv_counts(sz(m));
        for (int j = 0; j < m; ++j) recv_counts[sz(j)] = res[sz(j)].rows_to[sz(q)];
        recv_first[sz(q)].assign(sz(m + 1), -7);
        res[sz(q)].status |= ep::receive_prefix(recv_counts.data(), m, cap, recv_first[sz(q)].data());
        const index_t received = fixed ? m * cap : std::accumulate(recv_counts.begin(), recv_counts.end(), index_t{0});
        std::vector<std::int32_t> header(sz(received * h), -7);
        std::vector<float> payload(sz(received * d), nan);
        index_t at = 0;  // NcclComm::all_to_all_v: blocks packed in rank order
        for (int j = 0; j < m; ++j) {
            const index_t n = fixed ? cap : recv_counts[sz(j)], from = fixed ? q * cap : snd[sz(j)].send_first[sz(q)];
            std::copy_n(snd[sz(j)].header.begin() + from * h, n * h, header.begin() + at * h);
            std::copy_n(snd[sz(j)].payload.begin() + from * d, n * d, payload.begin() + at * d);
            at += n;
        }
        const BlockLayout layout{cap, recv_first[sz(q)].data(), m};
        const index_t pairs = received * width;
        std::vector<std::int32_t> pair_expert(sz(pairs));
        for (index_t p = 0; p < pairs; ++p) pair_expert[sz(p)] = ep::expand_pair(p, header.data(), layout, mode, width);
        // permute(): a stable sort by local expert, the others after them.
        const index_t local_begin = owners.first_expert + q * per;
        auto key = [&](index_t p) {
            const index_t e = pair_expert[sz(p)] - local_begin;
            return e >= 0 && e < per ? e : per;
        };
        std::vector<std::int32_t> sorted(sz(pairs)), inverse(sz(pairs), -1);
        std::iota(sorted.begin(), sorted.end(), 0);
        std::stable_sort(sorted.begin(), sorted.end(), [&](std::int32_t a, std::int32_t b) { return key(a) < key(b); });
        index_t routed = 0;
        while (routed < pairs && key(sorted[sz(routed)]) < per) ++routed;
        for (index_t g = 0; g < routed; ++g) inverse[sz(sorted[sz(g)])] = static_cast<std::int32_t>(g);
        std::vector<float> expert_in(sz(routed * d), nan), expert_out(sz(routed * d), nan);
        for (index_t g = 0; g < routed; ++g)
            ep::gather_pair(g, payload.data(), sorted.data(), layout, width, di, expert_in.data(), 0, 1);
        for (index_t g = 0; g < routed; ++g)
            for (index_t x = 0; x < d; ++x)
                expert_out[sz(g * d + x)] = fake_expert(pair_expert[sz(sorted[sz(g)])], expert_in[sz(g * d + x)]);
        reply[sz(q)].assign(sz(received * d), 0.0f);  // the constructor zeroes it too
        for (std::int64_t i = 0; i < recv_first[sz(q)][sz(m)]; ++i)
            if (ep::reply_row(i, header.data(), expert_out.data(), inverse.data(), layout, mode, width, di,
                              reply[sz(q)].data(), 0, 1))
                res[sz(q)].status |= foe::parallel::ep_status::foreign_expert;
    }
    // Back to the senders, into the target rows, and the combine.
    for (int p = 0; p < m; ++p) {
        Sender& S = snd[sz(p)];
        index_t at = 0;
        for (int q = 0; q < m; ++q) {
            const index_t n = fixed ? cap : res[sz(p)].rows_to[sz(q)], from = fixed ? p * cap : recv_first[sz(q)][sz(p)];
            std::copy_n(reply[sz(q)].begin() + from * d, n * d, S.back.begin() + at * d);
            at += n;
        }
        const index_t t = r[sz(p)].tokens;
        res[sz(p)].y.assign(sz(t * slots * d), nan);
        const BlockLayout layout{cap, S.send_first.data(), m};
        for (std::int64_t row = 0; row < S.send_first[sz(m)]; ++row)
            ep::land_row(row, S.back.data(), S.target.data(), layout, di, res[sz(p)].y.data(), 0, 1);
        res[sz(p)].out.assign(sz(t * d), nan);
        for (index_t i = 0; i < t; ++i)
            ep::combine_token(i, res[sz(p)].y.data(), S.parts.data(), r[sz(p)].weights.data(), base[sz(p)].data(), ki,
                              di, mode, res[sz(p)].out.data(), 0, 1);
        if (mode == Dispatch::dedup) res[sz(p)].parts.assign(S.parts.begin(), S.parts.begin() + t);
    }
    return res;
}

}  // namespace

TEST_CASE("ep: a whole exchange replayed on the host with the kernels' row rules returns what the experts give")
{
    std::mt19937_64 rng(21);
    const index_t d = 3, max_tokens = 9;
    int checked = 0;
    for (int m : {1, 2, 3, 4})
        for (index_t per : {1, 2, 3})
            for (index_t k : {1, 2, 3, 4}) {
                if (k > m * per) continue;
                const ExpertOwners owners{m == 3 ? 2 : 0, per, m};
                for (Draw draw : {Draw::any, Draw::one_member, Draw::even_only}) {
                    if (draw == Draw::one_member && k > per) continue;
                    if (draw == Draw::even_only && k > ((m + 1) / 2) * per) continue;
                    // Ranks with 9, 0, 5 and 1 tokens: full, empty and partly filled blocks.
                    std::vector<foe::routing::RoutingResult> routing;
                    std::vector<std::vector<float>> u, base;
                    std::uniform_real_distribution<float> value(-2.0f, 2.0f);
                    for (int p = 0; p < m; ++p) {
                        const index_t t = std::vector<index_t>{9, 0, 5, 1}[sz(p % 4)];
                        routing.push_back(random_routing(t, k, owners, draw, rng));
                        u.emplace_back(sz(t * d));
                        base.emplace_back(sz(t * d));
                        for (auto& x : u.back()) x = value(rng);
                        for (auto& x : base.back()) x = value(rng);
                    }
                    for (Dispatch mode : {Dispatch::naive, Dispatch::dedup})
                        for (bool fixed : {false, true}) {
                            CAPTURE(m);
                            CAPTURE(per);
                            CAPTURE(k);
                            CAPTURE(static_cast<int>(draw));
                            CAPTURE(foe::parallel::to_string(mode));
                            CAPTURE(fixed);
                            const auto got = replay_exchange(mode, fixed, owners, max_tokens, k, d, routing, u, base);
                            for (int p = 0; p < m; ++p) {
                                CAPTURE(p);
                                const auto& rr = routing[sz(p)];
                                const SimRank& g = got[sz(p)];
                                CHECK(g.status == 0);
                                DispatchPlan plan;
                                foe::parallel::plan_dispatch(rr, owners, mode, plan);
                                CHECK(widen(g.rows_to) == plan.rows_to);
                                // Expected: naive FFN_e(u) per (token, slot); dedup per (token, member in
                                // order) the fma of w FFN_e(u) over its slots in slot order.
                                std::vector<float> want(sz(rr.tokens * k * d), std::numeric_limits<float>::quiet_NaN());
                                std::vector<std::int32_t> parts(sz(rr.tokens), 0);
                                std::vector<double> out(sz(rr.tokens * d));
                                for (index_t i = 0; i < rr.tokens; ++i) {
                                    for (index_t x = 0; x < d; ++x) {
                                        double acc = base[sz(p)][sz(i * d + x)];
                                        for (index_t s = 0; s < k; ++s)
                                            acc += double{rr.weight(i, s)} * fake_expert(rr.expert(i, s), u[sz(p)][sz(i * d + x)]);
                                        out[sz(i * d + x)] = acc;
                                    }
                                    for (int j = 0; j < m; ++j) {
                                        bool any = false;
                                        std::vector<float> acc(sz(d), 0.0f);
                                        for (index_t s = 0; s < k; ++s) {
                                            if (owners.owner(rr.expert(i, s)) != j) continue;
                                            for (index_t x = 0; x < d; ++x) {
                                                const float v = fake_expert(rr.expert(i, s), u[sz(p)][sz(i * d + x)]);
                                                if (mode == Dispatch::naive) want[sz((i * k + s) * d + x)] = v;
                                                else acc[sz(x)] = std::fma(rr.weight(i, s), v, acc[sz(x)]);
                                            }
                                            any = true;
                                        }
                                        if (mode == Dispatch::dedup && any) {
                                            std::copy(acc.begin(), acc.end(), want.begin() + (i * k + parts[sz(i)]) * d);
                                            ++parts[sz(i)];
                                        }
                                    }
                                }
                                if (mode == Dispatch::dedup) CHECK(g.parts == parts);
                                // Bit for bit, NaN (never written) included: compare the bits.
                                CHECK_MESSAGE(same_bits(g.y, want), first_mismatch(g.y, want));
                                double err = 0.0;
                                for (std::size_t i = 0; i < out.size(); ++i)
                                    err = std::max(err, std::abs(double{g.out[i]} - out[i]));
                                CHECK(err < 1e-4);
                                ++checked;
                            }
                        }
                }
            }
    MESSAGE(checked, " rank exchanges replayed");
}

// --- one GPU -----------------------------------------------------------------------------------

namespace {

/// A non-blocking CUDA stream.
struct Stream {
    cudaStream_t handle = nullptr;
    Stream() { fc::check(cudaStreamCreateWithFlags(&handle, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() { (void)cudaStreamDestroy(handle); }
    operator cudaStream_t() const { return handle; }
};

template <class T>
std::vector<T> download_n(const T* p, index_t n, cudaStream_t stream)
{
    std::vector<T> v(sz(n));
    if (n > 0) fc::check(cudaMemcpyAsync(v.data(), p, sz(n) * sizeof(T), cudaMemcpyDeviceToHost, stream), "download");
    fc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return v;
}

/// Every expert of a layer: bf16 bits for the device ([E, 2f, d] gate rows then up rows per
/// expert, [E, d, f]) and their float values for the host experts.
struct ExpertSet {
    index_t experts, d, f;
    Bf16Data gate_up, down;
    ExpertSet(index_t e, index_t d_, index_t f_, std::mt19937_64& rng)
        : experts(e), d(d_), f(f_), gate_up(random_bf16(sz(e * 2 * f_ * d_), rng, -0.2f, 0.2f)),
          down(random_bf16(sz(e * d_ * f_), rng, -0.2f, 0.2f))
    {
    }
    /// Host SwiGluExperts over experts [begin, begin + n) of the set, global ids [first + begin, ...).
    foe::experts::SwiGluExperts<> host(index_t first) const
    {
        std::vector<foe::experts::ExpertWeights> w;
        for (index_t e = 0; e < experts; ++e) {
            const float* gu = gate_up.values.data() + e * 2 * f * d;
            w.push_back({foe::WeightMatrix(gu, {f, d}), foe::WeightMatrix(gu + f * d, {f, d}),
                         foe::WeightMatrix(down.values.data() + e * d * f, {d, f})});
        }
        return foe::experts::SwiGluExperts<>(foe::experts::ExpertsSpec{d, f, first, first + experts}, std::move(w));
    }
};

/// What the host says an exchange returns: FFN_e(u) per (token, slot), the dedup partial sums per
/// (token, member in order), and base + sum_s w_s FFN_e(u).
struct HostResult {
    std::vector<float> per_slot, partials, combined;
    std::vector<index_t> parts;
};
HostResult host_result(const ExpertSet& set, const ExpertOwners& owners, const foe::routing::RoutingResult& r,
                       const std::vector<float>& u, const std::vector<float>& base)
{
    const index_t t = r.tokens, k = r.slots_per_token, d = set.d;
    HostResult h;
    h.per_slot.assign(sz(t * k * d), 0.0f);
    auto experts = set.host(owners.first_expert);
    if (t > 0)
        experts.compute(foe::MatrixView<const float>(u.data(), {t, d}), r,
                        foe::MatrixView<float>(h.per_slot.data(), {t * k, d}));
    h.partials.assign(sz(t * k * d), 0.0f);
    h.combined.assign(sz(t * d), 0.0f);
    h.parts.assign(sz(t), 0);
    for (index_t i = 0; i < t; ++i) {
        for (index_t x = 0; x < d; ++x) {
            double acc = base[sz(i * d + x)];
            for (index_t s = 0; s < k; ++s) acc += double{r.weight(i, s)} * h.per_slot[sz((i * k + s) * d + x)];
            h.combined[sz(i * d + x)] = static_cast<float>(acc);
        }
        // Members in increasing order, each with the sum of its slots' weighted outputs.
        for (int j = 0; j < owners.members; ++j) {
            bool any = false;
            std::vector<double> acc(sz(d), 0.0);
            for (index_t s = 0; s < k; ++s)
                if (owners.owner(r.expert(i, s)) == j) {
                    any = true;
                    for (index_t x = 0; x < d; ++x)
                        acc[sz(x)] += double{r.weight(i, s)} * h.per_slot[sz((i * k + s) * d + x)];
                }
            if (!any) continue;
            const index_t part = h.parts[sz(i)]++;
            for (index_t x = 0; x < d; ++x) h.partials[sz((i * k + part) * d + x)] = static_cast<float>(acc[sz(x)]);
        }
    }
    return h;
}

/// The rows of y [tokens * slots, d] that an exchange writes: naive all, dedup the parts.
std::vector<float> written_rows(const std::vector<float>& y, const std::vector<index_t>& parts, index_t k, index_t d,
                                Dispatch mode)
{
    if (mode == Dispatch::naive) return y;
    std::vector<float> out;
    for (std::size_t i = 0; i < parts.size(); ++i)
        for (index_t j = 0; j < parts[i]; ++j)
            out.insert(out.end(), y.begin() + static_cast<std::ptrdiff_t>((static_cast<index_t>(i) * k + j) * d),
                       y.begin() + static_cast<std::ptrdiff_t>((static_cast<index_t>(i) * k + j + 1) * d));
    return out;
}

/// One rank's side of an exchange: its routing and inputs on the device, the exchange, and the
/// checks against the host.
struct RankRun {
    foe::routing::RoutingResult routing;
    Bf16Data u, base;
    HostResult want;
};

RankRun make_rank_run(const ExpertSet& set, const ExpertOwners& owners, index_t tokens, index_t slots, Draw draw,
                      std::mt19937_64& rng)
{
    RankRun run;
    run.routing = random_routing(tokens, slots, owners, draw, rng);
    run.u = random_bf16(sz(tokens * set.d), rng);
    run.base = random_bf16(sz(tokens * set.d), rng);
    run.want = host_result(set, owners, run.routing, run.u.values, run.base.values);
    return run;
}

/// Runs one exchange of `run` on `comm` with `ep` and checks y and the combine against the host.
/// `graph_replays` > 0 (fixed only): captures the exchange and combine once, replays them.
void exchange_and_check(NcclComm& comm, DeviceAllToAllEP& ep, const ExpertSet& set, index_t held_first,
                        const RankRun& run, cudaStream_t stream, int graph_replays = 0)
{
    const DeviceEpSpec& s = ep.spec();
    const index_t t = run.routing.tokens, k = s.slots, d = s.hidden;
    const index_t per = s.owners.experts_per_member;
    // This rank's experts: its slice of the set.
    const std::vector<foe::bfloat16> gate_up(set.gate_up.bits.begin() + held_first * 2 * set.f * d,
                                        set.gate_up.bits.begin() + (held_first + per) * 2 * set.f * d);
    const std::vector<foe::bfloat16> down(set.down.bits.begin() + held_first * d * set.f,
                                     set.down.bits.begin() + (held_first + per) * d * set.f);
    auto dgate_up = fc::upload(gate_up), ddown = fc::upload(down);
    const fc::GroupedExpertWeights held{dgate_up.data(), ddown.data(), per, d, set.f};
    auto experts = fc::upload(run.routing.experts);
    auto weights = fc::upload(run.routing.weights);
    auto u = fc::upload(run.u.bits), base = fc::upload(run.base.bits);
    fc::DeviceBuffer<foe::bfloat16> y(sz(std::max<index_t>(t * k * d, 1))), out(sz(std::max<index_t>(t * d, 1)));
    auto poison = [&] {
        fc::fill_bytes(y, 0xff, stream);
        fc::fill_bytes(out, 0xff, stream);
    };
    auto enqueue = [&] {
        ep.run(comm, held, experts.data(), weights.data(), u.data(), t, y.data(), stream);
        ep.combine(y.data(), weights.data(), base.data(), t, out.data(), stream);
    };
    auto check_results = [&] {
        comm.synchronize(stream);
        CHECK(ep.status(stream) == 0);
        const auto got_parts = widen(download_n(ep.plan_view().rows.parts, s.mode == Dispatch::dedup ? t : 0, stream));
        if (s.mode == Dispatch::dedup) CHECK(got_parts == run.want.parts);
        const auto got_y = to_float(download_n(y.data(), t * k * d, stream));
        const auto got_out = to_float(download_n(out.data(), t * d, stream));
        const auto& want_y = s.mode == Dispatch::naive ? run.want.per_slot : run.want.partials;
        const auto got_rows = written_rows(got_y, run.want.parts, k, d, s.mode);
        const auto want_rows = written_rows(want_y, run.want.parts, k, d, s.mode);
        CHECK(got_rows.size() == want_rows.size());
        if (got_rows.size() == want_rows.size()) CHECK(rel_error(got_rows, want_rows) < bf16_tolerance);
        CHECK(rel_error(got_out, run.want.combined) < bf16_tolerance);
    };
    if (graph_replays == 0) {
        poison();
        enqueue();
        check_results();
        return;
    }
    comm.synchronize(stream);
    cudaGraph_t graph = nullptr;
    fc::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    enqueue();
    fc::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    fc::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    for (int replay = 0; replay < graph_replays; ++replay) {
        CAPTURE(replay);
        poison();
        fc::check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
        comm.watch(stream, "DeviceAllToAllEP graph replay");
        check_results();
    }
    fc::check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
    fc::check(cudaGraphDestroy(graph), "cudaGraphDestroy");
}

DeviceEpSpec make_spec(Dispatch mode, bool fixed, index_t max_tokens, index_t slots, const ExpertSet& set,
                       const ExpertOwners& owners, int rank)
{
    DeviceEpSpec s;
    s.mode = mode;
    s.fixed_capacity = fixed;
    s.max_tokens = max_tokens;
    s.slots = slots;
    s.hidden = set.d;
    s.intermediate = set.f;
    s.owners = owners;
    s.rank = rank;
    return s;
}

}  // namespace

TEST_CASE("cuda ep: the device plan equals plan_dispatch (member counts, slots, experts per member, both variants)")
{
    if (!have_device()) return;
    Stream stream;
    std::mt19937_64 rng(17);
    for (const PlanCase& c : plan_cases()) {
        const ExpertOwners owners{c.first_expert, c.per_member, c.members};
        for (Dispatch mode : {Dispatch::naive, Dispatch::dedup})
            for (bool fixed : {false, true})
                for (Draw draw : {Draw::any, Draw::one_member}) {
                    if (draw == Draw::one_member && c.slots > c.per_member) continue;
                    const index_t tokens = 45;
                    CAPTURE(c.members);
                    CAPTURE(c.per_member);
                    CAPTURE(c.slots);
                    CAPTURE(fixed);
                    CAPTURE(foe::parallel::to_string(mode));
                    DeviceEpSpec s;
                    s.mode = mode;
                    s.fixed_capacity = fixed;
                    s.max_tokens = 50;
                    s.slots = c.slots;
                    s.hidden = 8;
                    s.intermediate = 8;
                    s.owners = owners;
                    DeviceAllToAllEP ep(s);
                    const auto r = random_routing(tokens, c.slots, owners, draw, rng);
                    DispatchPlan want;
                    foe::parallel::plan_dispatch(r, owners, mode, want);
                    auto experts = fc::upload(r.experts);
                    ep.plan(experts.data(), tokens, stream);
                    const auto v = ep.plan_view();
                    const index_t rows = want.rows();
                    Replay got;
                    got.rows_to = widen(download_n(v.rows_to, c.members, stream));
                    got.row_token = widen(download_n(v.rows.row_token, rows, stream));
                    got.row_count = widen(download_n(v.rows.row_count, rows, stream));
                    got.row_pairs = widen(download_n(v.rows.row_pairs, rows * want.width, stream));
                    got.target = widen(download_n(v.rows.target, rows, stream));
                    if (mode == Dispatch::dedup) got.parts = widen(download_n(v.rows.parts, tokens, stream));
                    check_same_plan(got, want);
                    const auto first = download_n(v.send_first, c.members + 1, stream);
                    CHECK(first.back() == rows);
                    CHECK(ep.status(stream) == 0);
                }
    }
}

TEST_CASE("cuda ep: a one-rank NCCL exchange (naive, dedup; dynamic, fixed capacity) equals the host experts")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    std::mt19937_64 rng(18);
    const ExpertSet set(8, 64, 48, rng);
    const ExpertOwners owners{0, 8, 1};
    for (Dispatch mode : {Dispatch::naive, Dispatch::dedup})
        for (bool fixed : {false, true})
            for (index_t tokens : {37, 0, 1}) {
                CAPTURE(foe::parallel::to_string(mode));
                CAPTURE(fixed);
                CAPTURE(tokens);
                DeviceAllToAllEP ep(make_spec(mode, fixed, 50, 4, set, owners, 0));
                if (fixed) CHECK(ep.bytes() >= DeviceAllToAllEP::capacity_bytes(ep.spec()));
                const RankRun run = make_rank_run(set, owners, tokens, 4, Draw::any, rng);
                exchange_and_check(comm, ep, set, 0, run, stream);
                // The same instance again, with another routing (buffers are reused).
                const RankRun again = make_rank_run(set, owners, tokens, 4, Draw::any, rng);
                exchange_and_check(comm, ep, set, 0, again, stream);
            }
    CHECK_FALSE(comm.aborted());
}

TEST_CASE("cuda ep: the fixed-capacity exchange captured in a CUDA graph replays without a host synchronisation")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    std::mt19937_64 rng(19);
    const ExpertSet set(8, 64, 48, rng);
    const ExpertOwners owners{0, 8, 1};
    for (Dispatch mode : {Dispatch::naive, Dispatch::dedup}) {
        CAPTURE(foe::parallel::to_string(mode));
        DeviceAllToAllEP ep(make_spec(mode, true, 40, 4, set, owners, 0));
        const RankRun run = make_rank_run(set, owners, 29, 4, Draw::any, rng);
        exchange_and_check(comm, ep, set, 0, run, stream, 2);
    }
    CHECK_FALSE(comm.aborted());
}

// --- two GPUs ----------------------------------------------------------------------------------

TEST_CASE("cuda ep: a two-rank NCCL exchange (naive, dedup; dynamic, fixed) equals the host experts on each rank")
{
    if (fc::cuda_device_count() < 2) {
        MESSAGE("fewer than two CUDA devices (", fc::cuda_device_count(), "): the two-rank EP exchange is skipped");
        return;
    }
    constexpr int ranks = 2;
    std::mt19937_64 rng(20);
    const ExpertSet set(8, 64, 48, rng);
    const ExpertOwners owners{0, 4, ranks};
    const ncclUniqueId id = NcclComm::make_unique_id();
    // Every rank's routing and the host's answer, made before the threads start (one rng).
    std::vector<std::vector<RankRun>> runs(ranks);
    const std::vector<Draw> draws{Draw::any, Draw::one_member, Draw::even_only, Draw::any};
    const std::vector<index_t> tokens{31, 17, 23, 0};
    for (int p = 0; p < ranks; ++p)
        for (std::size_t i = 0; i < draws.size(); ++i)
            runs[sz(p)].push_back(make_rank_run(set, owners, tokens[i] + p, 3, draws[i], rng));
    std::vector<std::exception_ptr> failed(ranks);
    std::vector<std::thread> threads;
    // doctest's CHECKs may run in threads a test case spawns; an exception (a CUDA, NCCL or
    // doctest REQUIRE failure) is carried to the main thread, which reports it.
    for (int p = 0; p < ranks; ++p)
        threads.emplace_back([&, p] {
            try {
                fc::check(cudaSetDevice(p), "cudaSetDevice");
                auto comm = NcclComm::from_unique_id(id, p, ranks, p);
                Stream stream;
                for (Dispatch mode : {Dispatch::naive, Dispatch::dedup})
                    for (bool fixed : {false, true}) {
                        DeviceAllToAllEP ep(make_spec(mode, fixed, 40, 3, set, owners, p));
                        for (const RankRun& run : runs[sz(p)])
                            exchange_and_check(comm, ep, set, p * owners.experts_per_member, run, stream);
                    }
            } catch (...) {
                failed[sz(p)] = std::current_exception();
            }
        });
    for (auto& t : threads) t.join();
    for (int p = 0; p < ranks; ++p) {
        CAPTURE(p);
        if (failed[sz(p)]) {
            try {
                std::rethrow_exception(failed[sz(p)]);
            } catch (const std::exception& e) {
                FAIL("rank ", p, ": ", e.what());
            } catch (...) {
                FAIL("rank ", p, ": a REQUIRE failed (see above)");
            }
        }
    }
}
