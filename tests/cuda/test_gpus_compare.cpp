// The host side of `foe_gpus --compare` (examples/foe_gpus_compare.hpp): argument parsing, the
// sweep's batches, the timing statistics, the Table-9-shaped table and the JSON. Plain C++: it
// runs without a GPU (it sits beside the CUDA tests because it tests a GPU program).
#include <doctest/doctest.h>

#include <numeric>
#include <string>
#include <vector>

#include "../../examples/foe_gpus_compare.hpp"

using foe::index_t;
using namespace foe_gpus;

TEST_CASE("gpus compare: options parse, with Table 9's sweep by default, and bad values are typed errors")
{
    const CompareOptions d = parse_compare({"--compare"});
    CHECK(d.config == "foe-1b");
    CHECK(d.tokens.front() == 1);
    CHECK(d.tokens.back() == 24576);
    CHECK(d.tokens.size() == 13);
    const CompareOptions o = parse_compare({"--compare", "--config", "foe-7b", "--tokens", "1,128,2048", "--ranks-per-node",
                                            "8", "--json", "out.json", "--repeats", "3", "--warmup", "0",
                                            "--allow-shared-gpus", "--layers", "2"});
    CHECK(o.config == "foe-7b");
    CHECK(o.tokens == std::vector<index_t>{1, 128, 2048});
    CHECK(o.ranks_per_node == 8);
    CHECK(o.json == "out.json");
    CHECK(o.repeats == 3);
    CHECK(o.warmup == 0);
    CHECK(o.allow_shared_gpus);
    CHECK(o.layers == 2);
    CHECK_THROWS_AS(parse_compare({"--compare", "--tokens", "1,,2"}), foe::InvalidArgument);
    CHECK_THROWS_AS(parse_compare({"--compare", "--tokens", "0"}), foe::InvalidArgument);
    CHECK_THROWS_AS(parse_compare({"--compare", "--tokens", "12x"}), foe::InvalidArgument);
    CHECK_THROWS_AS(parse_compare({"--compare", "--repeats", "0"}), foe::InvalidArgument);
    CHECK_THROWS_AS(parse_compare({"--compare", "--json"}), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(parse_compare({"--compare", "--frobnicate"}), doctest::Contains("unknown option --frobnicate"),
                         foe::InvalidArgument);
}

TEST_CASE("gpus compare: S tokens over G ranks are min(G, S) sequences of S/G tokens, the first S % n one longer")
{
    CHECK(sequence_lengths(2048, 8) == std::vector<index_t>(8, 256));
    CHECK(sequence_lengths(1, 8) == std::vector<index_t>{1});
    CHECK(sequence_lengths(10, 4) == std::vector<index_t>{3, 3, 2, 2});
    CHECK(sequence_lengths(5, 1) == std::vector<index_t>{5});
    for (index_t s : {1, 2, 7, 8, 9, 128, 24576})
        for (int g : {1, 2, 3, 8, 16}) {
            const auto l = sequence_lengths(s, g);
            CHECK(std::accumulate(l.begin(), l.end(), index_t{0}) == s);
            // FoE: every rank the whole batch; DP: the ranks' batches partition it.
            CHECK(rank_batch(s, g, g - 1, true).tokens() == s);
            index_t dp = 0;
            for (int p = 0; p < g; ++p) {
                const foe::Batch b = rank_batch(s, g, p, false);
                CHECK(b.sequences() <= 1);
                if (b.sequences() == 1) CHECK(b.chunks()[0].slot == 0);
                dp += b.tokens();
            }
            CHECK(dp == s);
        }
    CHECK(rank_batch(2, 8, 5, false).sequences() == 0);  // an idle DP rank: an empty batch
    CHECK(longest_sequence({1, 128, 2048}, 8) == 256);
    CHECK(longest_sequence({1, 2}, 8) == 1);
    CHECK_THROWS_AS(sequence_lengths(0, 8), foe::InvalidArgument);
    for (auto id : token_ids(1000, 97, 3)) CHECK((id >= 0 && id < 97));
}

TEST_CASE("gpus compare: per repeat the slowest rank, then the median")
{
    // 3 ranks x 4 repeats, rank after rank.
    const std::vector<float> all{1, 5, 3, 2, /**/ 2, 1, 3, 9, /**/ 1, 1, 4, 1};
    CHECK(slowest_rank(all, 3, 4) == std::vector<double>{2, 5, 4, 9});
    CHECK(median({2, 5, 4, 9}) == doctest::Approx(4.5));
    CHECK(median({3, 1, 2}) == 2);
    CHECK_THROWS_AS(median({}), foe::InvalidArgument);
    CHECK_THROWS_AS(slowest_rank(all, 2, 4), foe::InvalidArgument);
}

TEST_CASE("gpus compare: the table has Table 9's columns, speedups MoE/FoE, and names what was skipped")
{
    CompareReport r;
    r.config = "foe-1b";
    r.device = "NVIDIA H100 80GB HBM3";
    r.ranks = 8;
    r.ranks_per_node = 8;
    r.layers = 16;
    r.repeats = 5;
    r.warmup = 2;
    r.tokens = {1, 24576};
    r.foe = {"FoE", "", {0.05, 0.5}, {0.003, 0.03}};
    r.moe = {{"DP+EP naive", "", {0.06, 2.0}, {0.004, 0.12}},
             {"DP+EP dedup", "", {0.06, 1.0}, {0.004, 0.06}},
             {"TP+EP naive", "not on GPUs yet", {}, {}}};
    const std::string t = format_table9(r);
    CHECK(t.find("tokens") != std::string::npos);
    CHECK(t.find("DP+EP naive / FoE") != std::string::npos);
    CHECK(t.find("4.00x") != std::string::npos);  // 2.0 / 0.5
    CHECK(t.find("2.00x") != std::string::npos);  // 1.0 / 0.5
    CHECK(t.find("24576") != std::string::npos);
    CHECK(t.find("0.50000") != std::string::npos);
    CHECK(t.find("TP+EP naive: not on GPUs yet") != std::string::npos);
    const std::string j = foe::json::dump(report_json(r));
    for (const char* key : {"\"date\"", "\"device\"", "\"command\"", "\"ranks\"", "\"forward_s\"", "\"layer_s\"",
                            "\"skipped\"", "\"tokens\""})
        CHECK_MESSAGE(j.find(key) != std::string::npos, key);
    // FoE skipped (G > H): the baselines alone, no speedup columns.
    r.foe.skipped = "G > H is not supported on GPUs yet";
    const std::string t2 = format_table9(r);
    CHECK(t2.find("/ FoE") == std::string::npos);
    CHECK(t2.find("FoE: G > H is not supported on GPUs yet") != std::string::npos);
}
