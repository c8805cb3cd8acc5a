// FoeLayer and MoeLayer: against the float64 oracle, the H = 1 identity, independence from the
// order groups are computed in, the residual sync's communicator, and swapping one policy.

#include <doctest/doctest.h>

#include "oracle.hpp"
#include "test_util.hpp"

#include <cstring>

using foe::Architecture;
using foe::index_t;
using foe::QkNorm;
using foe::ScoreFunction;

namespace {

/// Runs one layer of `Layer` over `streams` random input streams of T tokens (one prefill).
template <class Layer>
std::vector<float> run_layer(Layer& layer, const std::vector<float>& input, index_t streams, index_t t)
{
    const index_t d = layer.config().hidden_size;
    std::vector<float> out(static_cast<std::size_t>(layer.streams() * t * d), std::nanf(""));
    layer.forward(foe::Batch::single(0, t), foe::TensorView<const float, 3>(input.data(), {streams, t, d}),
                  foe::TensorView<float, 3>(out.data(), {layer.streams(), t, d}));
    return out;
}

std::vector<oracle::Vec> split_streams(const std::vector<float>& x, index_t streams)
{
    std::vector<oracle::Vec> out;
    const auto n = x.size() / static_cast<std::size_t>(streams);
    for (index_t s = 0; s < streams; ++s)
        out.emplace_back(x.begin() + static_cast<std::ptrdiff_t>(s * n), x.begin() + static_cast<std::ptrdiff_t>((s + 1) * n));
    return out;
}

oracle::Vec join(const std::vector<oracle::Vec>& streams)
{
    oracle::Vec all;
    for (const auto& s : streams) all.insert(all.end(), s.begin(), s.end());
    return all;
}

}  // namespace

TEST_CASE("FoE layer matches the float64 oracle on H distinct input streams and on one broadcast stream")
{
    for (index_t h : {1, 2, 4})
        for (auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
            CAPTURE(h);
            CAPTURE(static_cast<int>(score));
            const auto c = test::tiny(Architecture::foe, h, score, QkNorm::per_head, h == 2);
            const auto w = test::weights(c, 21);
            const index_t t = 11, d = c.hidden_size;
            for (index_t streams_in : {index_t{1}, h}) {
                CAPTURE(streams_in);
                const auto x = test::random_floats(static_cast<std::size_t>(streams_in * t * d), 99);
                using Layer = foe::HostFoeLayer<>;
                if (score == ScoreFunction::sigmoid) {
                    foe::HostFoeLayer<foe::routing::Sigmoid> layer(c, foe::layer_weights(*w, 1));
                    const auto out = run_layer(layer, x, streams_in, t);
                    CHECK(oracle::relative_error(out, join(oracle::layer(*w, 1, split_streams(x, streams_in), t))) < 1e-5);
                } else {
                    Layer layer(c, foe::layer_weights(*w, 1));
                    const auto out = run_layer(layer, x, streams_in, t);
                    CHECK(oracle::relative_error(out, join(oracle::layer(*w, 1, split_streams(x, streams_in), t))) < 1e-5);
                }
            }
        }
}

TEST_CASE("MoE layer matches the float64 oracle (all heads, global top-k, full-width QK-norm)")
{
    for (bool renorm : {false, true}) {
        const auto c = test::tiny(Architecture::olmoe, 1, ScoreFunction::softmax, QkNorm::full_width, renorm);
        const auto w = test::weights(c, 3);
        const index_t t = 9;
        const auto x = test::random_floats(static_cast<std::size_t>(t * c.hidden_size), 5);
        foe::HostMoeLayer<> layer(c, foe::layer_weights(*w, 0));
        const auto out = run_layer(layer, x, 1, t);
        CHECK(oracle::relative_error(out, oracle::layer(*w, 0, {oracle::Vec(x.begin(), x.end())}, t)[0]) < 1e-5);
    }
}

TEST_CASE("FoE with H = 1 equals the MoE layer bit for bit on the same weights")
{
    for (auto qk : {QkNorm::none, QkNorm::per_head, QkNorm::full_width})
        for (bool renorm : {false, true}) {
            auto c = test::tiny(Architecture::foe, 1, ScoreFunction::softmax, qk, renorm);
            const auto w = test::weights(c, 8);
            const index_t t = 13;
            const auto x = test::random_floats(static_cast<std::size_t>(t * c.hidden_size), 17);
            foe::HostFoeLayer<> foe_layer(c, foe::layer_weights(*w, 0));
            foe::HostMoeLayer<> moe_layer(c, foe::layer_weights(*w, 0));
            const auto a = run_layer(foe_layer, x, 1, t);
            const auto b = run_layer(moe_layer, x, 1, t);
            CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);

            // And a decode step after the prefill, through the KV cache.
            const auto next = test::random_floats(static_cast<std::size_t>(c.hidden_size), 18);
            std::vector<float> ya(next.size()), yb(next.size());
            const foe::Batch step = foe::Batch::single(t, 1);
            foe_layer.forward(step, {next.data(), {1, 1, c.hidden_size}}, {ya.data(), {1, 1, c.hidden_size}});
            moe_layer.forward(step, {next.data(), {1, 1, c.hidden_size}}, {yb.data(), {1, 1, c.hidden_size}});
            CHECK(ya == yb);
        }
}

TEST_CASE("FoE model with H = 1 equals the MoE model bit for bit")
{
    const auto c = test::tiny(Architecture::foe, 1, ScoreFunction::softmax, QkNorm::full_width);
    const auto w = test::weights(c, 2);
    foe::Model<foe::HostFoeLayer<>> foe_model(w);
    foe::Model<foe::HostMoeLayer<>> moe_model(w);
    const auto tokens = test::random_tokens(8, c.vocab_size, 1);
    CHECK(foe_model.prefill(tokens).values() == moe_model.prefill(tokens).values());
    CHECK(foe_model.decode(5) == moe_model.decode(5));
}

TEST_CASE("swapping the order in which groups are computed changes nothing")
{
    const auto c = test::tiny(Architecture::foe, 4);
    const auto w = test::weights(c, 4);
    const index_t t = 7;
    const auto x = test::random_floats(static_cast<std::size_t>(4 * t * c.hidden_size), 3);
    foe::HostFoeLayer<> natural(c, foe::layer_weights(*w, 1));
    foe::LayerOptions reversed_order;
    reversed_order.compute_order = {3, 2, 1, 0};
    foe::HostFoeLayer<> reversed(c, foe::layer_weights(*w, 1), reversed_order);
    foe::LayerOptions shuffled_order;
    shuffled_order.compute_order = {2, 0, 3, 1};
    foe::HostFoeLayer<> shuffled(c, foe::layer_weights(*w, 1), shuffled_order);
    const auto a = run_layer(natural, x, 4, t);
    CHECK(a == run_layer(reversed, x, 4, t));
    CHECK(a == run_layer(shuffled, x, 4, t));

    foe::LayerOptions not_a_permutation;
    not_a_permutation.compute_order = {0, 0, 1, 2};
    CHECK_THROWS_AS(foe::HostFoeLayer<>(c, foe::layer_weights(*w, 1), not_a_permutation), foe::InvalidArgument);
}

namespace {

/// A stand-in for the other rank of a two-rank communicator: all_reduce_sum records this rank's
/// buffer and adds the peer's recorded buffer (empty: adds nothing).
struct PeerComm {
    using stream_type = foe::comm::HostStream;
    std::vector<float>* sent = nullptr;
    const std::vector<float>* peer = nullptr;

    int rank() const { return 0; }
    int size() const { return 2; }
    void all_reduce_sum(std::span<float> buf, stream_type = {})
    {
        sent->assign(buf.begin(), buf.end());
        if (!peer->empty())
            for (std::size_t i = 0; i < buf.size(); ++i) buf[i] += (*peer)[i];
    }
    void all_to_all_v(std::span<const float>, std::span<const index_t>, std::span<float>, std::span<const index_t>,
                      stream_type = {})
    {
    }
    void all_gather(std::span<const float>, std::span<float>, stream_type = {}) {}
    PeerComm split(int, int) const { return *this; }
};
static_assert(foe::comm::Comm<PeerComm>);

}  // namespace

TEST_CASE("two ranks holding two groups each produce the streams of one rank holding all four")
{
    using Half = foe::FoeLayer<foe::attention::GqaAttention<>, foe::routing::Router<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                               foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts, foe::sync::AllReduceMean<PeerComm>>;
    const auto c = test::tiny(Architecture::foe, 4);
    const auto w = test::weights(c, 12);
    const index_t t = 5, d = c.hidden_size, half_size = 2 * t * d;
    const auto x = test::random_floats(static_cast<std::size_t>(4 * t * d), 8);
    foe::HostFoeLayer<> whole(c, foe::layer_weights(*w, 0));
    const auto expected = run_layer(whole, x, 4, t);

    const std::vector<float> x0(x.begin(), x.begin() + half_size), x1(x.begin() + half_size, x.end());
    std::vector<float> partial0, partial1, none;
    auto make_half = [&](index_t first, std::vector<float>* sent, const std::vector<float>* peer) {
        foe::LayerOptions o;
        o.group_begin = first;
        o.group_end = first + 2;
        return Half(c, foe::layer_weights(*w, 0), o, foe::sync::AllReduceMean<PeerComm>(PeerComm{sent, peer}));
    };
    // Each rank's partial sum depends only on its own groups; exchange them, then run for real.
    auto probe1 = make_half(2, &partial1, &none);
    (void)run_layer(probe1, x1, 2, t);
    auto rank0 = make_half(0, &partial0, &partial1);
    const auto out0 = run_layer(rank0, x0, 2, t);
    auto rank1 = make_half(2, &partial1, &partial0);
    const auto out1 = run_layer(rank1, x1, 2, t);

    CHECK(rank1.last_routing().group_begin == 2);
    CHECK(rank1.last_routing().slots_per_token == 2 * c.top_k_per_group());
    std::vector<float> joined(out0);
    joined.insert(joined.end(), out1.begin(), out1.end());
    // Partial sums (r0 + r1) + (r2 + r3) round differently from r0 + r1 + r2 + r3.
    CHECK(oracle::relative_error(joined, oracle::Vec(expected.begin(), expected.end())) < 1e-6);
}

TEST_CASE("the residual sync all-reduces once per layer through the communicator, and counts its bytes")
{
    using Counting = foe::comm::CountingComm<foe::comm::SelfComm>;
    using Layer = foe::FoeLayer<foe::attention::GqaAttention<>, foe::routing::Router<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                                foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts, foe::sync::AllReduceMean<Counting>>;
    const auto c = test::tiny(Architecture::foe, 4);
    const auto w = test::weights(c, 1);
    Layer layer(c, foe::layer_weights(*w, 0));
    const index_t t = 6;
    const auto x = test::random_floats(static_cast<std::size_t>(t * c.hidden_size), 2);
    (void)run_layer(layer, x, 1, t);
    const auto& counts = layer.sync_policy().comm().counts(foe::comm::Op::all_reduce_sum);
    CHECK(counts.calls == 1);
    CHECK(counts.payload_bytes == t * c.hidden_size * 4);
    CHECK(counts.wire_bytes() == 0);  // one rank sends nothing
    CHECK(layer.sync_policy().comm().counts(foe::comm::Op::all_to_all_v).calls == 0);

    // Same bits as the plain SelfComm layer.
    foe::HostFoeLayer<> plain(c, foe::layer_weights(*w, 0));
    CHECK(run_layer(plain, x, 1, t) == run_layer(layer, x, 1, t));
}

TEST_CASE("CountingComm counts wire bytes per operation with the ring formulas")
{
    foe::comm::CountingComm<foe::comm::SelfComm> comm;
    std::vector<float> buf = test::random_floats(10, 1), out(10);
    comm.all_reduce_sum(buf);
    comm.all_gather(buf, out);
    const std::vector<index_t> counts{10};
    comm.all_to_all_v(buf, counts, out, counts);
    CHECK(out == buf);
    CHECK(comm.counts(foe::comm::Op::all_reduce_sum).payload_bytes == 40);
    CHECK(comm.counts(foe::comm::Op::all_gather).calls == 1);
    CHECK(comm.counts(foe::comm::Op::all_to_all_v).payload_bytes == 40);
    CHECK(comm.total_wire_bytes() == 0);
    const std::vector<index_t> wrong{11};
    CHECK_THROWS_AS(comm.all_to_all_v(buf, counts, out, wrong), foe::CommError);
    static_assert(foe::comm::Comm<foe::comm::CountingComm<foe::comm::SelfComm>>);
}

TEST_CASE("NoSync refuses more than one group")
{
    const auto c = test::tiny(Architecture::foe, 2);
    const auto w = test::weights(c, 1);
    using Layer = foe::FoeLayer<foe::attention::GqaAttention<>, foe::routing::Router<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                                foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts, foe::sync::NoSync>;
    Layer layer(c, foe::layer_weights(*w, 0));
    const auto x = test::random_floats(static_cast<std::size_t>(3 * c.hidden_size), 2);
    CHECK_THROWS_AS((void)run_layer(layer, x, 1, 3), foe::ConfigError);
}

TEST_CASE("MoeLayer refuses a config with more than one group")
{
    const auto c = test::tiny(Architecture::foe, 4);
    const auto w = test::weights(c, 1);
    CHECK_THROWS_WITH_AS(foe::HostMoeLayer<>(c, foe::layer_weights(*w, 0)), doctest::Contains("4 expert groups"),
                         foe::ConfigError);
}

TEST_CASE("the dispatch plan: rows by destination in token order, dedup one row per (token, member)")
{
    using foe::parallel::Dispatch;
    // 3 members of 2 experts each; 3 tokens of 3 slots.
    foe::routing::RoutingResult r;
    r.tokens = 3;
    r.slots_per_token = 3;
    r.slots_per_group = 3;
    r.experts = {4, 0, 5,   // token 0: members 2, 0, 2
                 1, 0, 3,   // token 1: members 0, 0, 1
                 2, 3, 5};  // token 2: members 1, 1, 2
    r.weights = {0.5f, 0.3f, 0.2f, 0.6f, 0.3f, 0.1f, 0.4f, 0.4f, 0.2f};
    const foe::parallel::ExpertOwners owners{0, 2, 3};
    foe::parallel::DispatchPlan plan;

    foe::parallel::plan_dispatch(r, owners, Dispatch::naive, plan);
    CHECK(plan.width == 1);
    CHECK(plan.rows_to == std::vector<index_t>{3, 3, 3});
    // Member 0: (0,1) (1,0) (1,1); member 1: (1,2) (2,0) (2,1); member 2: (0,0) (0,2) (2,2).
    CHECK(plan.row_pairs == std::vector<index_t>{1, 3, 4, 5, 6, 7, 0, 2, 8});
    CHECK(plan.target == plan.row_pairs);
    CHECK(plan.row_token == std::vector<index_t>{0, 1, 1, 1, 2, 2, 0, 0, 2});

    foe::parallel::plan_dispatch(r, owners, Dispatch::dedup, plan);
    CHECK(plan.width == 2);
    CHECK(plan.rows_to == std::vector<index_t>{2, 2, 2});
    CHECK(plan.row_token == std::vector<index_t>{0, 1, 1, 2, 0, 2});
    CHECK(plan.row_count == std::vector<index_t>{1, 2, 1, 2, 2, 1});
    CHECK(plan.row_pairs == std::vector<index_t>{1, -1, 3, 4, 5, -1, 6, 7, 0, 2, 8, -1});
    // A token's partials land in rows token * slots + 0, 1, ... in member order.
    CHECK(plan.target == std::vector<index_t>{0, 3, 4, 6, 1, 7});
    CHECK(plan.parts == std::vector<index_t>{2, 2, 2});
    CHECK(foe::parallel::header_floats(Dispatch::dedup, 3, 2) == 5);
    CHECK(foe::parallel::worst_case_rows(Dispatch::naive, 10, 3, 2) == 20);
    CHECK(foe::parallel::worst_case_rows(Dispatch::dedup, 10, 3, 2) == 10);

    r.experts[4] = 1;  // token 1 selects {1, 1, 0}: three slots on member 0, which holds two experts
    r.experts[5] = 0;
    CHECK_THROWS_WITH_AS(foe::parallel::plan_dispatch(r, owners, Dispatch::dedup, plan),
                         doctest::Contains("token 1 selects more than 2 experts on member 0"), foe::CommError);
    r.experts[4] = 6;  // no member holds expert 6
    CHECK_THROWS_WITH_AS(foe::parallel::plan_dispatch(r, owners, Dispatch::dedup, plan),
                         doctest::Contains("expert 6 is not held by any of the 3 members"), foe::CommError);
}

TEST_CASE("all-to-all expert parallelism on one rank: naive is LocalExperts bit for bit, dedup agrees to rounding")
{
    using foe::parallel::Dispatch;
    using EP = foe::parallel::AllToAllEP<foe::comm::SelfComm>;
    using Routing = foe::routing::Router<foe::routing::Softmax, foe::routing::GlobalTopK>;
    using Local = foe::MoeLayer<foe::attention::GqaAttention<>, Routing, foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts>;
    using Exchanged = foe::MoeLayer<foe::attention::GqaAttention<>, Routing, foe::experts::SwiGluExperts<>, EP>;
    const auto c = test::tiny(Architecture::olmoe, 1);
    const auto w = test::weights(c, 4);
    const index_t t = 9;
    const auto x = test::random_floats(static_cast<std::size_t>(t * c.hidden_size), 5);
    Local local(c, foe::layer_weights(*w, 0));
    Exchanged naive(c, foe::layer_weights(*w, 0), {}, EP({}, 0, c.num_experts, Dispatch::naive));
    Exchanged dedup(c, foe::layer_weights(*w, 0), {}, EP({}, 0, c.num_experts, Dispatch::dedup));
    const auto expected = run_layer(local, x, 1, t);
    CHECK(run_layer(naive, x, 1, t) == expected);
    const auto got = run_layer(dedup, x, 1, t);
    double worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(got[i]) - expected[i]));
    CHECK(worst < 1e-5);
    CHECK(worst > 0.0);  // a different order of additions (otherwise the test would not see dedup at all)
}

TEST_CASE("deduplicated dispatch refuses to combine part of a token's slots")
{
    using foe::parallel::Dispatch;
    foe::parallel::AllToAllEP<foe::comm::SelfComm> ep({}, 0, 4, Dispatch::dedup);
    foe::routing::RoutingResult r;
    r.tokens = 1;
    r.slots_per_token = 2;
    r.slots_per_group = 1;
    std::vector<float> y(2 * 3), res(3), out(3);
    CHECK_THROWS_WITH_AS(ep.combine<foe::experts::SwiGluExperts<>>(r, {y.data(), {2, 3}}, {res.data(), {1, 3}}, 0, 1,
                                                                    {out.data(), {1, 3}}),
                         doctest::Contains("cannot combine slots [0, 1) alone"), foe::InvalidArgument);
}

TEST_CASE("HierarchicalComm over one rank is the buffer itself")
{
    static_assert(foe::comm::Comm<foe::comm::HierarchicalComm<foe::comm::SelfComm>>);
    foe::comm::HierarchicalComm<foe::comm::SelfComm> comm({}, {0});
    auto buf = test::random_floats(11, 3);
    const auto before = buf;
    comm.all_reduce_sum(buf);
    CHECK(buf == before);
    CHECK_THROWS_AS(foe::comm::HierarchicalComm<foe::comm::SelfComm>({}, {0, 1}), foe::CommError);
}
