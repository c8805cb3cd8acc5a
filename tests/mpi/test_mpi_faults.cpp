// Faults across ranks, under mpirun with 2 and 4 ranks: a rank that fails makes every other rank
// fail within seconds with a CommError naming it, and a rank that never joins a collective makes
// the others fail at the communicator's timeout; never a hang (ctest's TIMEOUT is the backstop).
//
// A fault leaves every process of the launch failed (the ranks no longer agree on the sequence
// of collectives), so each test case needs a launch of its own: ctest runs them one per launch
// with -tc, and every rank's own doctest result is its exit status.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "foe/comm/mpi_comm.hpp"
#include "foe/model/distributed.hpp"
#include "../test_util.hpp"

using foe::parallel::Placement;
using foe::parallel::Strategy;

namespace {

using seconds = std::chrono::duration<double>;

seconds since(std::chrono::steady_clock::time_point start) { return std::chrono::steady_clock::now() - start; }

void require_fresh_process()
{
    REQUIRE_MESSAGE(foe::comm::detail::error_channel().failure.empty(),
                    "run one test case per launch (-tc=...): an earlier case left this process failed");
}

/// The last rank feeds its model a token id outside the vocabulary, so it throws before its
/// first collective and calls abort_peers; every other rank waits in a collective of the
/// forward pass and must throw a CommError naming the last rank, within seconds.
void one_rank_throws_inside_a_forward(const char* config_name, Strategy strategy)
{
    require_fresh_process();
    auto w = foe::comm::MpiComm::world();
    w.set_timeout(seconds(60));  // far above "within seconds": only abort_peers can end the wait in time
    const int failing = w.size() - 1;
    const auto config = foe::named_config(config_name);
    const auto placement = Placement::make(strategy, config, w.size(), w.size(), w.rank());
    auto dm = foe::make_distributed_model(
        w, placement,
        std::make_shared<const foe::ModelWeights>(foe::random_weights(config, 3, foe::held_tensors(placement))));

    auto tokens = test::random_tokens(6, config.vocab_size, 1);
    if (w.rank() == failing) tokens[2] = static_cast<std::int32_t>(config.vocab_size);
    const auto start = std::chrono::steady_clock::now();
    std::string message;
    try {
        (void)dm.model->prefill(tokens);
        if (w.size() > 1) FAIL_CHECK("rank ", w.rank(), ": the forward completed although rank ", failing, " failed");
    } catch (const foe::CommError& e) {
        message = e.what();
    } catch (const foe::InvalidArgument& e) {
        CHECK(w.rank() == failing);
        w.abort_peers(e.what());
        message = e.what();
    }
    if (w.rank() != failing) {
        const std::string expected = "rank " + std::to_string(failing) + " failed: token id 97";
        CHECK_MESSAGE(message.find(expected) != std::string::npos, message);
        CHECK(since(start).count() < 10.0);
    } else {
        CHECK_MESSAGE(message.find("token id 97") != std::string::npos, message);
    }

    // The process is failed now: every later collective, on any communicator, throws at once.
    std::vector<float> buf{1.0f};
    const auto later = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(w.all_reduce_sum(buf), foe::CommError);
    CHECK_THROWS_WITH_AS(dm.sync.all_reduce_sum(buf), doctest::Contains("failed: token id 97"), foe::CommError);
    CHECK(since(later).count() < 1.0);
}

}  // namespace

TEST_CASE("fault: a rank that throws inside an FoE forward (all-reduce) stops every other rank, naming it")
{
    one_rank_throws_inside_a_forward("foe-tiny", Strategy::foe);
}

TEST_CASE("fault: a rank that throws inside an MoE forward (all-to-all) stops every other rank, naming it")
{
    one_rank_throws_inside_a_forward("moe-tiny", Strategy::moe_data_parallel);
}

TEST_CASE("fault: a rank that never joins a collective makes the others time out, naming the collective")
{
    require_fresh_process();
    auto w = foe::comm::MpiComm::world();
    if (w.size() == 1) return;
    w.set_timeout(seconds(2));
    const int absent = w.size() - 1;
    std::vector<float> buf{1.0f};
    if (w.rank() != absent) {
        const auto start = std::chrono::steady_clock::now();
        std::string message;
        try {
            w.all_reduce_sum(buf);
            FAIL_CHECK("the all-reduce completed without rank ", absent);
        } catch (const foe::CommError& e) {
            message = e.what();
            w.abort_peers(message);  // what foe_run does: the absent rank may still come
        }
        CHECK_MESSAGE(message.find("all_reduce_sum (MPI_Iallreduce) on " + std::to_string(w.size()) +
                                   " ranks") != std::string::npos,
                      message);
        CHECK_MESSAGE(message.find("did not complete within 2 s") != std::string::npos, message);
        CHECK(since(start).count() >= 2.0);
        CHECK(since(start).count() < 10.0);
    } else {
        // Late, after the others gave up: the collective fails at once with their message.
        std::this_thread::sleep_for(std::chrono::seconds(4));
        const auto start = std::chrono::steady_clock::now();
        CHECK_THROWS_WITH_AS(w.all_reduce_sum(buf), doctest::Contains("failed: MpiComm all_reduce_sum"),
                             foe::CommError);
        CHECK(since(start).count() < 1.0);
    }
}

int main(int argc, char** argv)
{
    foe::comm::MpiSession session(&argc, &argv);
    doctest::Context context(argc, argv);
    if (foe::comm::MpiComm::world().rank() != 0) context.setOption("minimal", true);
    // No final all-gather of the results, as test_mpi has: after a fault every collective
    // throws. Each rank's exit status is its own result, and mpirun fails if any rank fails.
    return context.run();
}
