// Multi-rank tests, run by ctest under mpirun with 1, 2, 4 and 8 ranks. Every rank runs every
// test case and every collective in the same order: assertions are CHECKs, never REQUIREs, so a
// failure on one rank cannot leave the others waiting in a collective.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "foe/comm/hierarchical_comm.hpp"
#include "foe/comm/mpi_comm.hpp"
#include "foe/model/distributed.hpp"
#include "foe/model/host_model.hpp"
#include "foe/perf/cost_model.hpp"
#include "../test_util.hpp"

using foe::index_t;
using foe::parallel::Placement;
using foe::parallel::Strategy;

namespace {

foe::comm::MpiComm world() { return foe::comm::MpiComm::world(); }

/// The multi-rank test shape: 16 query heads, 8 KV heads, 16 experts, k = 8, so H can be 1, 2,
/// 4 or 8 and G up to 8 divides both the KV heads and the experts.
foe::ModelConfig mpi_config(foe::Architecture arch, index_t groups, foe::QkNorm qk = foe::QkNorm::per_head)
{
    foe::ModelConfig c = foe::named_config(arch == foe::Architecture::foe ? "foe-tiny" : "moe-tiny");
    c.hidden_size = 64;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.head_dim = 8;
    c.num_experts = 16;
    c.num_experts_per_tok = 8;
    c.intermediate_size = 16;
    c.num_hidden_layers = 2;
    if (arch == foe::Architecture::foe) {
        c.num_expert_groups = groups;
        c.qk_norm = qk;
    }
    c.validate();
    return c;
}

/// Four prompts of different lengths, the same on every rank.
std::vector<std::vector<std::int32_t>> prompts(index_t vocab)
{
    std::vector<std::vector<std::int32_t>> p;
    for (std::size_t i = 0; i < 4; ++i) p.push_back(test::random_tokens(3 + 2 * i, vocab, 100 + i));
    return p;
}

/// Runs this rank's share of the prompts through a distributed model as one ragged prefill,
/// then one decode step for each, and compares every logit with the one-process model.
/// Returns the worst relative error on this rank.
double run_against_reference(const foe::ModelConfig& config, Strategy strategy, int ranks_per_node,
                             const foe::ParallelOptions& parallel = {})
{
    auto w = world();
    const auto placement = Placement::make(strategy, config, w.size(), ranks_per_node, w.rank());
    const auto held = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 5, foe::held_tensors(placement)));
    foe::ModelOptions options;
    options.cache_slots = 4;
    options.cache_capacity = 16;
    auto dm = foe::make_distributed_model(w, placement, held, options, parallel);

    const auto all = prompts(config.vocab_size);
    const bool split = strategy == Strategy::moe_data_parallel || (strategy == Strategy::foe && placement.shards > 1);
    const auto mine = split ? foe::shard_of(static_cast<index_t>(all.size()), placement.shard, placement.shards)
                            : foe::SequenceRange{0, static_cast<index_t>(all.size())};

    std::vector<foe::SequenceChunk> chunks;
    std::vector<std::int32_t> tokens;
    for (index_t s = 0; s < mine.count; ++s) {
        const auto& p = all[static_cast<std::size_t>(mine.first + s)];
        chunks.push_back({s, 0, static_cast<index_t>(p.size())});
        tokens.insert(tokens.end(), p.begin(), p.end());
    }
    const auto prefill = dm.model->forward(foe::Batch(chunks), tokens);
    std::vector<foe::SequenceChunk> steps;
    std::vector<std::int32_t> next;
    for (index_t s = 0; s < mine.count; ++s) {
        steps.push_back({s, static_cast<index_t>(all[static_cast<std::size_t>(mine.first + s)].size()), 1});
        next.push_back(static_cast<std::int32_t>(7 * s + 1));
    }
    const auto decoded = dm.model->forward(foe::Batch(steps), next);

    // The one-process model of the same weights, sequence by sequence.
    const auto full = test::weights(config, 5);
    double worst = 0.0;
    index_t row = 0;
    const index_t v = config.vocab_size;
    for (index_t s = 0; s < mine.count; ++s) {
        auto reference = foe::make_model(full);
        auto prompt = all[static_cast<std::size_t>(mine.first + s)];
        const auto expected = reference->prefill(prompt);
        const auto expected_next = reference->decode(next[static_cast<std::size_t>(s)]);
        double scale = 0.0, diff = 0.0;
        for (index_t i = 0; i < expected.size(); ++i) {
            scale = std::max(scale, std::abs(static_cast<double>(expected.values()[i])));
            diff = std::max(diff, std::abs(static_cast<double>(prefill.values()[row * v + i]) - expected.values()[i]));
        }
        for (index_t i = 0; i < v; ++i)
            diff = std::max(diff, std::abs(static_cast<double>(decoded.values()[s * v + i]) - expected_next[i]));
        worst = std::max(worst, diff / scale);
        row += static_cast<index_t>(prompt.size());
    }
    return worst;
}

}  // namespace

TEST_CASE("MpiComm: all-reduce, all-to-all-v with uneven counts, all-gather, split, typed errors")
{
    auto w = world();
    const int g = w.size(), me = w.rank();
    std::vector<float> sum{static_cast<float>(me), 1.0f};
    w.all_reduce_sum(sum);
    CHECK(sum[0] == static_cast<float>(g * (g - 1) / 2));
    CHECK(sum[1] == static_cast<float>(g));

    // Rank r sends j + 1 copies of (100 r + j) to rank j.
    std::vector<index_t> send_counts, recv_counts;
    std::vector<float> send;
    for (int j = 0; j < g; ++j) {
        send_counts.push_back(j + 1);
        recv_counts.push_back(me + 1);
        send.insert(send.end(), static_cast<std::size_t>(j + 1), static_cast<float>(100 * me + j));
    }
    std::vector<float> recv(static_cast<std::size_t>(g * (me + 1)));
    w.all_to_all_v(send, send_counts, recv, recv_counts);
    for (int src = 0; src < g; ++src)
        for (int c = 0; c < me + 1; ++c) CHECK(recv[static_cast<std::size_t>(src * (me + 1) + c)] == static_cast<float>(100 * src + me));

    std::vector<float> mine{static_cast<float>(me)}, all(static_cast<std::size_t>(g));
    w.all_gather(mine, all);
    for (int r = 0; r < g; ++r) CHECK(all[static_cast<std::size_t>(r)] == static_cast<float>(r));

    auto halves = w.split(me % 2, -me);  // reverse order inside each half
    CHECK(halves.size() == (g + 1 - me % 2) / 2);
    std::vector<float> one{1.0f};
    halves.all_reduce_sum(one);
    CHECK(one[0] == static_cast<float>(halves.size()));

    const std::vector<index_t> too_few(static_cast<std::size_t>(g + 1), 0);
    CHECK_THROWS_AS(w.all_to_all_v(send, too_few, recv, too_few), foe::CommError);
    CHECK_THROWS_AS(w.all_gather(mine, std::span<float>(all).first(0)), foe::CommError);
}

TEST_CASE("FoE logits equal the one-process model in every valid layout (G <= H and G > H)")
{
    const int g = world().size();
    int layouts = 0;
    for (index_t h : {1, 2, 4, 8})
        for (int r : {g, 4}) {
            const auto config = mpi_config(foe::Architecture::foe, h);
            try {
                (void)Placement::make(Strategy::foe, config, g, r, 0);
            } catch (const foe::ConfigError&) {
                continue;  // not a valid layout for this G: the same on every rank
            }
            CAPTURE(h);
            CAPTURE(r);
            CHECK(run_against_reference(config, Strategy::foe, r) < 2e-5);
            ++layouts;
        }
    CHECK(layouts >= 2);
}

TEST_CASE("FoE with sigmoid routing is placement-independent too")
{
    auto config = mpi_config(foe::Architecture::foe, 8);
    config.scoring_func = foe::ScoreFunction::sigmoid;
    CHECK(run_against_reference(config, Strategy::foe, world().size()) < 2e-5);
}

TEST_CASE("both standard-MoE baselines equal the one-process MoE")
{
    const int g = world().size();
    // OLMoE itself (full-width QK-norm) with data-parallel attention.
    CHECK(run_against_reference(mpi_config(foe::Architecture::olmoe, 1), Strategy::moe_data_parallel, g) < 2e-5);
    // A standard MoE with per-head QK-norm (FoE with H = 1), both ways.
    const auto moe = mpi_config(foe::Architecture::foe, 1);
    CHECK(run_against_reference(moe, Strategy::moe_data_parallel, g) < 2e-5);
    CHECK(run_against_reference(moe, Strategy::moe_head_parallel, g) < 2e-5);
}

TEST_CASE("deduplicated dispatch equals the naive one and the one-process model")
{
    const int g = world().size();
    const foe::ParallelOptions dedup{foe::parallel::Dispatch::dedup, false};
    CHECK(run_against_reference(mpi_config(foe::Architecture::olmoe, 1), Strategy::moe_data_parallel, g, dedup) < 2e-5);
    const auto moe = mpi_config(foe::Architecture::foe, 1);
    CHECK(run_against_reference(moe, Strategy::moe_data_parallel, g, dedup) < 2e-5);
    CHECK(run_against_reference(moe, Strategy::moe_head_parallel, g, dedup) < 2e-5);
    // FoE with G > H: the dispatch inside the group is deduplicated too.
    for (index_t h : {1, 2}) {
        const auto config = mpi_config(foe::Architecture::foe, h);
        if (g <= h) continue;
        CAPTURE(h);
        CHECK(run_against_reference(config, Strategy::foe, g, dedup) < 2e-5);
    }
}

TEST_CASE("communication: the bytes of either dispatch are those the routing implies, and dedup sends fewer")
{
    auto w = world();
    const int g = w.size();
    const auto config = mpi_config(foe::Architecture::olmoe, 1);
    const auto placement = Placement::make(Strategy::moe_data_parallel, config, g, g, w.rank());
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 1, foe::held_tensors(placement)));
    const auto tokens = test::random_tokens(static_cast<std::size_t>(6 + w.rank()), config.vocab_size, 19 + w.rank());
    const index_t per_rank = config.num_experts / g, d = config.hidden_size, k = config.num_experts_per_tok;
    std::int64_t sent[2] = {0, 0};
    for (auto mode : {foe::parallel::Dispatch::naive, foe::parallel::Dispatch::dedup}) {
        CAPTURE(foe::parallel::to_string(mode));
        auto dm = foe::make_distributed_model(w, placement, weights, {}, {mode, false});
        (void)dm.model->prefill(tokens);
        // Rows this rank sends to every rank, per layer, from the routing it made: naive one per
        // (token, expert), dedup one per (token, rank holding >= 1 of its experts).
        const index_t header = mode == foe::parallel::Dispatch::naive ? 1 : 1 + 2 * std::min(k, per_rank);
        std::int64_t expected = 0;
        for (index_t l = 0; l < config.num_hidden_layers; ++l) {
            const auto& r = dm.model->last_routing(l);
            std::vector<float> rows_to(static_cast<std::size_t>(g), 0.0f), all(static_cast<std::size_t>(g * g));
            for (index_t i = 0; i < r.tokens; ++i) {
                std::vector<bool> hit(static_cast<std::size_t>(g), false);
                for (index_t s = 0; s < r.slots_per_token; ++s) {
                    const auto j = static_cast<std::size_t>(r.expert(i, s) / per_rank);
                    if (mode == foe::parallel::Dispatch::naive || !hit[j]) rows_to[j] += 1.0f;
                    hit[j] = true;
                }
            }
            w.all_gather(rows_to, all);
            const auto me = static_cast<std::size_t>(w.rank());
            expected += (g - 1) * 4;  // the row counts, one float per other rank
            for (std::size_t j = 0; j < static_cast<std::size_t>(g); ++j) {
                if (j == me) continue;
                expected += static_cast<std::int64_t>(all[me * g + j]) * (header + d) * 4;  // dispatch
                expected += static_cast<std::int64_t>(all[j * g + me]) * d * 4;             // results back
            }
        }
        const auto& a2a = dm.experts.counts(foe::comm::Op::all_to_all_v);
        CHECK(a2a.calls == 3 * config.num_hidden_layers);
        CHECK(a2a.wire_bytes() == expected);
        sent[mode == foe::parallel::Dispatch::dedup ? 1 : 0] = a2a.wire_bytes();
    }
    if (g > 1) CHECK(sent[1] < sent[0]);  // k = 8 of 16 experts: tokens often meet a rank twice
}

TEST_CASE("hierarchical all-reduce equals the flat one, and every member sends the same inter-node bytes")
{
    auto w = world();
    const int g = w.size();
    using Counting = foe::comm::CountingComm<foe::comm::MpiComm>;
    for (int r : {1, 2, 4, 8}) {
        if (r > g || g % r != 0) continue;
        CAPTURE(r);
        std::vector<int> nodes;
        for (int p = 0; p < g; ++p) nodes.push_back(p / r);
        foe::comm::HierarchicalComm<Counting> hier(Counting(w, nodes), nodes);
        // 37 floats: not a multiple of the members per node, so the chunks are uneven.
        const std::size_t n = 37;
        std::vector<float> mine(n), flat;
        const foe::CounterRng rng(7, static_cast<std::uint64_t>(w.rank()));
        for (std::size_t i = 0; i < n; ++i) mine[i] = rng.normal(i);
        flat = mine;
        w.all_reduce_sum(flat);
        auto tree = mine;
        hier.all_reduce_sum(tree);
        double worst = 0.0;
        for (std::size_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(static_cast<double>(tree[i]) - flat[i]));
        CHECK(worst < 1e-5);
        // Every member ends with the same bits.
        std::vector<float> everyone(n * static_cast<std::size_t>(g));
        w.all_gather(tree, everyone);
        bool same = true;
        for (int p = 1; p < g; ++p)
            same = same && std::equal(tree.begin(), tree.end(), everyone.begin() + static_cast<std::ptrdiff_t>(p * n));
        CHECK(same);

        // Bytes: L members per node, N nodes, chunk = ceil(n / L).
        const std::int64_t l = r, nodes_count = g / r, chunk = (static_cast<std::int64_t>(n) + l - 1) / l;
        const std::int64_t local = w.rank() % r, len = std::max<std::int64_t>(0, std::min<std::int64_t>(n, (local + 1) * chunk) - local * chunk);
        const auto& rs = hier.node_comm().counts(foe::comm::Op::all_to_all_v);
        const auto& ag = hier.node_comm().counts(foe::comm::Op::all_gather);
        const auto& ar = hier.cross_node_comm().counts(foe::comm::Op::all_reduce_sum);
        CHECK(rs.inter_node_bytes + ag.inter_node_bytes == 0);
        CHECK(rs.intra_node_bytes == (static_cast<std::int64_t>(n) - len) * 4);
        CHECK(ag.intra_node_bytes == (l - 1) * chunk * 4);
        CHECK(ar.intra_node_bytes == 0);
        CHECK(ar.inter_node_bytes == 2 * (nodes_count - 1) * len * 4 / nodes_count);
    }
}

TEST_CASE("hierarchical all-reduce: nodes of unequal size are refused on every rank alike")
{
    auto w = world();
    const int g = w.size();
    if (g < 3) return;
    std::vector<int> nodes(static_cast<std::size_t>(g), 1);
    nodes[0] = 0;  // one rank on node 0, the others on node 1
    std::string message;
    try {
        foe::comm::HierarchicalComm<foe::comm::MpiComm> hier(w, nodes);
    } catch (const foe::CommError& e) {
        message = e.what();
    }
    CHECK(message.find("same number of members on every node") != std::string::npos);
    CHECK(message.find("1 on node 0") != std::string::npos);
    std::vector<float> digest{static_cast<float>(foe::stream_id(message) & 0xffff)}, all(static_cast<std::size_t>(g));
    w.all_gather(digest, all);
    CHECK(std::all_of(all.begin(), all.end(), [&](float v) { return v == all[0]; }));
}

TEST_CASE("FoE with the hierarchical all-reduce equals the one-process model")
{
    const int g = world().size();
    for (int r : {1, 2, g}) {
        if (g % r != 0) continue;
        for (index_t h : {8, 2}) {
            const auto config = mpi_config(foe::Architecture::foe, h);
            try {
                (void)Placement::make(Strategy::foe, config, g, r, 0);
            } catch (const foe::ConfigError&) {
                continue;
            }
            CAPTURE(r);
            CAPTURE(h);
            CHECK(run_against_reference(config, Strategy::foe, r, {foe::parallel::Dispatch::naive, true}) < 2e-5);
        }
    }
}

TEST_CASE("communication: FoE with G <= H all-reduces once per layer and sends no all-to-all bytes")
{
    auto w = world();
    const int g = w.size();
    const auto config = mpi_config(foe::Architecture::foe, 8);
    const auto placement = Placement::make(Strategy::foe, config, g, g, w.rank());
    auto dm = foe::make_distributed_model(w, placement, test::weights(config, 1));
    const index_t t = 16;  // T * d * 4 bytes is a multiple of every G here
    (void)dm.model->prefill(test::random_tokens(t, config.vocab_size, 3));
    const auto& ar = dm.sync.counts(foe::comm::Op::all_reduce_sum);
    const std::int64_t bytes = t * config.hidden_size * 4, layers = config.num_hidden_layers;
    CHECK(ar.calls == layers);
    CHECK(ar.payload_bytes == layers * bytes);
    CHECK(ar.intra_node_bytes == layers * 2 * (g - 1) * bytes / g);
    CHECK(ar.inter_node_bytes == 0);
    CHECK(dm.experts.total_wire_bytes() == 0);
    CHECK(dm.experts.counts(foe::comm::Op::all_to_all_v).calls == 0);
    CHECK(dm.output.counts(foe::comm::Op::all_reduce_sum).calls == 1);  // once per forward, not per layer
}

TEST_CASE("communication: the cost model predicts the bytes CountingComm measures for the same placement")
{
    auto w = world();
    const int g = w.size();
    auto hw = foe::perf::h100_sxm_8x_ib();
    hw.load_imbalance = 1.0;  // the measured side has no trained router
    const double fp32_over_bf16 = 4.0 / foe::perf::activation_bytes;  // the host sends fp32

    // FoE (G <= H and, with H = 2 < G, G > H): the all-reduce bytes are exact.
    for (index_t h : {8, 2}) {
        const auto config = mpi_config(foe::Architecture::foe, h);
        const int r = g;
        try {
            (void)Placement::make(Strategy::foe, config, g, r, 0);
        } catch (const foe::ConfigError&) {
            continue;
        }
        CAPTURE(h);
        const auto placement = Placement::make(Strategy::foe, config, g, r, w.rank());
        // g sequences of 8 tokens: every shard gets whole sequences.
        const index_t length = 8, sequences = g;
        const auto mine = placement.shards > 1 ? foe::shard_of(sequences, placement.shard, placement.shards)
                                               : foe::SequenceRange{0, sequences};
        foe::ModelOptions options;
        options.cache_slots = sequences;
        options.cache_capacity = length;
        auto dm = foe::make_distributed_model(w, placement, std::make_shared<const foe::ModelWeights>(
                                                                foe::random_weights(config, 2, foe::held_tensors(placement))),
                                              options);
        std::vector<foe::SequenceChunk> chunks;
        for (index_t s = 0; s < mine.count; ++s) chunks.push_back({s, 0, length});
        const auto tokens = test::random_tokens(static_cast<std::size_t>(mine.count * length), config.vocab_size, 4);
        (void)dm.model->forward(foe::Batch(chunks), tokens);

        const auto predicted = foe::perf::layer_cost(config, Strategy::foe, {sequences * length, length}, {g, r}, hw);
        const auto& measured = dm.sync.counts(foe::comm::Op::all_reduce_sum);
        CHECK(static_cast<double>(measured.wire_bytes()) ==
              doctest::Approx(predicted.all_reduce.bytes.total() * fp32_over_bf16 * static_cast<double>(config.num_hidden_layers)));
    }

    // The MoE baseline: balanced routing predicts the mean over ranks of the random routing's
    // dispatch bytes (less our one-float expert id per row and the row counts).
    const auto config = mpi_config(foe::Architecture::olmoe, 1);
    const auto placement = Placement::make(Strategy::moe_data_parallel, config, g, g, w.rank());
    auto dm = foe::make_distributed_model(w, placement, std::make_shared<const foe::ModelWeights>(
                                                            foe::random_weights(config, 3, foe::held_tensors(placement))));
    const index_t length = 64;
    (void)dm.model->prefill(test::random_tokens(static_cast<std::size_t>(length), config.vocab_size, 50 + w.rank()));
    const auto predicted = foe::perf::layer_cost(config, Strategy::moe_data_parallel, {g * length, length}, {g, g}, hw);
    std::vector<float> mine{static_cast<float>(dm.experts.counts(foe::comm::Op::all_to_all_v).wire_bytes())},
        all(static_cast<std::size_t>(g));
    w.all_gather(mine, all);
    double mean = 0.0;
    for (float b : all) mean += static_cast<double>(b) / g;
    const double per_row = static_cast<double>(config.hidden_size);
    const double payload_share = (2.0 * per_row) / (2.0 * per_row + 1.0);  // dispatch rows carry d + 1 floats
    const double predicted_fp32 = predicted.all_to_all.bytes.total() * fp32_over_bf16 * static_cast<double>(config.num_hidden_layers);
    if (g > 1) CHECK(mean * payload_share == doctest::Approx(predicted_fp32).epsilon(0.15));
}

TEST_CASE("communication: across two nodes the cost model's ring and hierarchical all-reduce are what the ranks send")
{
    auto w = world();
    const int g = w.size();
    if (g < 4) return;  // two nodes of at least two ranks
    const int r = g / 2;
    auto hw = foe::perf::h100_sxm_8x_ib();
    const double fp32_over_bf16 = 4.0 / foe::perf::activation_bytes;
    const auto config = mpi_config(foe::Architecture::foe, 8);  // G <= H: the sync spans every rank
    const auto placement = Placement::make(Strategy::foe, config, g, r, w.rank());
    const index_t length = 8, sequences = 2;
    foe::ModelOptions options;
    options.cache_slots = sequences;
    options.cache_capacity = length;
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 2, foe::held_tensors(placement)));
    std::vector<foe::SequenceChunk> chunks;
    for (index_t s = 0; s < sequences; ++s) chunks.push_back({s, 0, length});
    const auto tokens = test::random_tokens(static_cast<std::size_t>(sequences * length), config.vocab_size, 4);
    const double layers = static_cast<double>(config.num_hidden_layers);

    for (bool hierarchical : {false, true}) {
        CAPTURE(hierarchical);
        auto dm = foe::make_distributed_model(w, placement, weights, options, {foe::parallel::Dispatch::naive, hierarchical});
        (void)dm.model->forward(foe::Batch(chunks), tokens);
        foe::perf::CostOptions cost;
        cost.cross_node_all_reduce = hierarchical ? foe::perf::CrossNodeAllReduce::hierarchical : foe::perf::CrossNodeAllReduce::ring;
        const auto predicted = foe::perf::layer_cost(config, Strategy::foe, {sequences * length, length}, {g, r}, hw, cost);
        // The busiest rank's inter-node bytes: the ring's boundary ranks; every rank alike when
        // hierarchical.
        const double inter = static_cast<double>(hierarchical ? dm.sync_cross.counts(foe::comm::Op::all_reduce_sum).inter_node_bytes
                                                              : dm.sync.counts(foe::comm::Op::all_reduce_sum).inter_node_bytes);
        std::vector<float> mine{static_cast<float>(inter)}, all(static_cast<std::size_t>(g));
        w.all_gather(mine, all);
        const double max = *std::max_element(all.begin(), all.end()), min = *std::min_element(all.begin(), all.end());
        CHECK(max == doctest::Approx(predicted.all_reduce.bytes.inter * fp32_over_bf16 * layers));
        if (hierarchical) CHECK(min == max);
    }
}

TEST_CASE("MpiComm: ranks passing different counts get a CommError on every rank, no overrun, and the communicator stays usable")
{
    // Before, a rank with a longer all-reduce made Open MPI write past the shorter ranks' buffers
    // (heap overflow under ASan). Each collective now checks its sizes across the ranks first.
    auto w = world();
    const int g = w.size(), me = w.rank();
    const auto message_of = [](auto&& f) {
        try {
            f();
        } catch (const foe::CommError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    const auto last_rank_longer = static_cast<std::size_t>(me == g - 1 && g > 1 ? 9 : 8);
    std::vector<float> buf(last_rank_longer, 1.0f);
    const std::string reduce = message_of([&] { w.all_reduce_sum(buf); });
    if (g > 1) {
        CHECK(reduce.find("the ranks pass different counts (8 to 9 elements") != std::string::npos);
        CHECK(std::all_of(buf.begin(), buf.end(), [](float x) { return x == 1.0f; }));  // untouched
    } else {
        CHECK(reduce == "no error");
    }

    std::vector<float> all(last_rank_longer * static_cast<std::size_t>(g));
    const std::string gather = message_of([&] { w.all_gather(buf, all); });
    CHECK((g > 1 ? gather.find("all_gather") != std::string::npos : gather == "no error"));

    // all_to_all_v: rank 0 expects one element more from the last rank than it sends.
    std::vector<index_t> send_counts(static_cast<std::size_t>(g), 2), recv_counts(static_cast<std::size_t>(g), 2);
    if (me == 0) recv_counts.back() = 3;
    std::vector<float> send(static_cast<std::size_t>(2 * g), 1.0f), recv(static_cast<std::size_t>(2 * g + 1), 5.0f);
    const std::string a2a = message_of([&] { w.all_to_all_v(send, send_counts, recv, recv_counts); });
    if (g > 1) {
        CHECK(a2a.find("rank 0 expects another number of elements") != std::string::npos);
        if (me == 0) CHECK(a2a.find("this rank expects 3 from rank " + std::to_string(g - 1) + ", which sends 2") != std::string::npos);
    }

    // The errors were agreed (every rank threw the same verdict): the communicator still works.
    std::vector<float> one{1.0f};
    w.all_reduce_sum(one);
    CHECK(one[0] == static_cast<float>(g));
}

TEST_CASE("a bad placement fails on every rank with the same message")
{
    auto w = world();
    const auto config = mpi_config(foe::Architecture::foe, 4);
    std::string message;
    try {
        (void)Placement::make(Strategy::foe, config, 8, 1, 0);  // groups of 2 ranks, nodes of 1 rank
    } catch (const foe::ConfigError& e) {
        message = e.what();
    }
    CHECK(message.find("must stay inside one node") != std::string::npos);
    std::vector<float> mine{static_cast<float>(foe::stream_id(message) & 0xffff)}, all(static_cast<std::size_t>(w.size()));
    w.all_gather(mine, all);
    CHECK(std::all_of(all.begin(), all.end(), [&](float v) { return v == all[0]; }));

    const auto expect = [&](int g, int r, const char* words) {
        try {
            (void)Placement::make(Strategy::foe, config, g, r, 0);
            CHECK_MESSAGE(false, "placement G=", g, " R=", r, " was accepted");
        } catch (const foe::ConfigError& e) {
            const std::string what = e.what();
            CHECK_MESSAGE(what.find(words) != std::string::npos, what);
        }
    };
    expect(3, 3, "use G in {1, 2, 4}");                         // H % G != 0
    expect(10, 10, "not a multiple of H (4)");                   // G % H != 0
    expect(128, 8, "every rank needs at least one expert");      // 4 experts per group over 32 ranks
    expect(6, 4, "G (6) ranks do not fill whole nodes");         // not a layout of whole nodes
}

TEST_CASE("ranks that disagree on the model fail fast, all of them, naming the rank")
{
    auto w = world();
    if (w.size() == 1) return;  // nothing to disagree with
    auto config = mpi_config(foe::Architecture::foe, 8);
    if (w.rank() == 1) config.vocab_size += 1;  // rank 1 was launched with another model
    const auto placement = Placement::make(Strategy::foe, config, w.size(), w.size(), w.rank());
    std::string message;
    try {
        (void)foe::make_distributed_model(w, placement, test::weights(config, 1));
    } catch (const foe::CommError& e) {
        message = e.what();
    }
    CHECK_MESSAGE(message.find("rank(s) 1 have a different config") != std::string::npos, message);
}

TEST_CASE("an error on one rank becomes the same error on every rank")
{
    auto w = world();
    std::string message;
    try {
        foe::agree(w, 42, w.rank() == w.size() - 1 ? "model.safetensors: missing tensor \"lm_head.weight\"" : "");
    } catch (const foe::CommError& e) {
        message = e.what();
    }
    const std::string expected = "rank " + std::to_string(w.size() - 1) + " failed: model.safetensors: missing tensor";
    CHECK_MESSAGE(message.find(expected) != std::string::npos, message);
}

int main(int argc, char** argv)
{
    foe::comm::MpiSession session(&argc, &argv);
    doctest::Context context(argc, argv);
    // Rank 0 reports in full; the others print only their failures.
    if (world().rank() != 0) context.setOption("minimal", true);
    const int failed = context.run();
    // A rank whose test failed must make the whole launch fail.
    std::vector<float> mine{static_cast<float>(failed != 0)}, all(static_cast<std::size_t>(world().size()));
    auto w = world();
    w.all_gather(mine, all);
    return std::any_of(all.begin(), all.end(), [](float f) { return f != 0.0f; }) ? 1 : 0;
}
