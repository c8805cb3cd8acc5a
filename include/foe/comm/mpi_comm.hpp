#pragma once
// MpiComm: the Comm concept over MPI, the multi-process backend on CPUs.
//
// Collectives complete before they return (stream_type is HostStream). The communicator handle
// is shared by copies and freed with the last one. Every MPI call's error becomes a CommError
// naming the call and MPI's own text: MpiSession sets MPI_ERRORS_RETURN on MPI_COMM_WORLD, and
// split communicators inherit it.
//
// Every collective first checks that the ranks agree on its sizes (one small MPI_Iallreduce, and
// for all_to_all_v an MPI_Ialltoall of the counts too): ranks that pass different counts get a
// CommError on every rank naming the counts, instead of MPI writing past a buffer (what a
// mismatched MPI_Iallreduce does) or waiting forever. A size error leaves the communicator usable.
//
// Failures end in an error on every rank, never in a hang. A rank that fails while the others
// wait in a blocking MPI collective would leave them waiting forever, so every collective here is
// non-blocking (MPI_Iallreduce, MPI_Ialltoallv, MPI_Iallgather, MPI_Ibarrier) and waits in a
// loop that also
//   - polls the error channel, a duplicate of MPI_COMM_WORLD that MpiSession makes, on which a
//     failing rank's abort_peers(message) reaches every other rank: a waiting rank throws
//     CommError("rank 3 failed: <message>") (world ranks);
//   - gives up after the communicator's timeout (default 300 s, set_timeout()), throwing a
//     CommError that names the collective (MPI cannot tell which rank did not join).
// Either leaves the process failed: the ranks no longer agree on which collective comes next, so
// every later collective of any MpiComm throws the same CommError at once, and ~MpiSession
// finalises without waiting for the abandoned collectives; if a peer never reaches MPI_Finalize
// (it hangs), a failed process exits with status 1 after a grace period instead of waiting. An abandoned collective keeps its
// buffers (collectives run on internal copies), so MPI never writes into memory the caller has
// freed when the collective progresses late.
//
// Not covered: a rank that dies (a signal, exit without MPI_Finalize) is the launcher's to handle
// (mpirun ends the job); a rank stuck outside collectives polls nothing, so the others time out.
//
// This header needs <mpi.h>; foe.hpp does not include it. Link MPI (CMake: MPI::MPI_CXX).

// Only MPI's C API is used; keep the deprecated C++ bindings (and their warnings) out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"

namespace foe::comm {

/// How long a rank waits in one collective before it throws CommError (MpiComm::set_timeout).
inline constexpr std::chrono::seconds default_collective_timeout{300};

namespace detail {

/// Throws CommError for a failed MPI call, with MPI's description of the error.
inline void check_mpi(int rc, const char* call)
{
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    MPI_Error_string(rc, text, &length);
    raise<CommError>(call, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

inline int checked_int(index_t v, const char* what)
{
    require<CommError>(v >= 0 && v <= INT_MAX, what, " (", v, ") is outside MPI's int count range [0, ", INT_MAX, "]");
    return static_cast<int>(v);
}

/// A collective in flight: its request and every buffer MPI may still touch.
struct PendingCollective {
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<float> send, recv;
    std::vector<int> counts_and_offsets;
};

/// The process-wide failure state behind every MpiComm (one per program: an inline variable).
struct ErrorChannel {
    MPI_Comm comm = MPI_COMM_NULL;  ///< duplicate of MPI_COMM_WORLD, for abort messages only
    int world_rank = 0;
    int world_size = 1;
    /// Non-empty once this process has failed: a peer's abort arrived, a collective timed out,
    /// or this rank called abort_peers. Every later collective throws it.
    std::string failure;
    bool peer_failed = false;  ///< the failure is a peer's: abort_peers has nothing to add
    bool sent_abort = false;
    /// Collectives abandoned mid-flight and the abort messages sent: kept alive until the end.
    std::vector<std::shared_ptr<PendingCollective>> abandoned;
    std::vector<std::shared_ptr<std::string>> sent_messages;
    std::vector<MPI_Request> send_requests;
};

inline ErrorChannel& error_channel() noexcept
{
    static ErrorChannel channel;
    return channel;
}

/// Tag of abort messages on the error channel (the only messages it carries).
inline constexpr int abort_tag = 7001;

/// If a peer's abort message has arrived, records it as this process's failure and returns true.
inline bool receive_peer_failure()
{
    ErrorChannel& ch = error_channel();
    if (ch.comm == MPI_COMM_NULL) return false;
    int arrived = 0;
    MPI_Status status;
    check_mpi(MPI_Iprobe(MPI_ANY_SOURCE, abort_tag, ch.comm, &arrived, &status), "MPI_Iprobe");
    if (!arrived) return false;
    int length = 0;
    check_mpi(MPI_Get_count(&status, MPI_CHAR, &length), "MPI_Get_count");
    std::string message(static_cast<std::size_t>(std::max(length, 0)), '\0');
    check_mpi(MPI_Recv(message.data(), length, MPI_CHAR, status.MPI_SOURCE, abort_tag, ch.comm, MPI_STATUS_IGNORE),
              "MPI_Recv");
    if (ch.failure.empty()) {
        ch.failure = foe::detail::concat("rank ", status.MPI_SOURCE, " failed: ", message);
        ch.peer_failed = true;
    }
    return true;
}

/// Throws the recorded failure, if any: the first check of every collective.
inline void throw_if_failed()
{
    ErrorChannel& ch = error_channel();
    if (ch.failure.empty()) receive_peer_failure();
    if (!ch.failure.empty()) throw CommError(ch.failure);
}

}  // namespace detail

/// Initialises MPI for the lifetime of the object (if nobody did before) and finalises it after.
/// Collective: every rank constructs one, before any MpiComm, since it also creates the error
/// channel that lets a failing rank stop the others (see the top of this header).
class MpiSession {
public:
    MpiSession(int* argc, char*** argv)
    {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (!initialized) {
            int provided = 0;
            detail::check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
            owns_ = true;
        }
        detail::check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
        detail::ErrorChannel& ch = detail::error_channel();
        if (ch.comm == MPI_COMM_NULL) {
            detail::check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &ch.comm), "MPI_Comm_dup");
            detail::check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &ch.world_rank), "MPI_Comm_rank");
            detail::check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &ch.world_size), "MPI_Comm_size");
            owns_channel_ = true;
        }
    }
    MpiSession(const MpiSession&) = delete;
    MpiSession& operator=(const MpiSession&) = delete;
    ~MpiSession()
    {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized) return;
        detail::ErrorChannel& ch = detail::error_channel();
        // After a failure the channel may hold unreceived messages and the abandoned collectives
        // unmatched requests: freeing it could wait on them, so it is left to MPI_Finalize.
        if (owns_channel_ && ch.failure.empty() && ch.comm != MPI_COMM_NULL) MPI_Comm_free(&ch.comm);
        if (!owns_) return;
        if (!ch.failure.empty()) {
            // MPI_Finalize synchronises with every process of the job: a peer that hangs (stopped,
            // or stuck outside collectives) would keep this one waiting forever (Open MPI spins
            // in ompi_mpi_finalize). A failed process gives it a grace period, then exits with
            // status 1 without finalising; the launcher then ends the job's other processes.
            std::thread([grace = finalize_grace_] {
                std::this_thread::sleep_for(grace);
                std::fflush(nullptr);
                std::_Exit(1);
            }).detach();
        }
        MPI_Finalize();
    }

    /// How long a failed process waits in MPI_Finalize for its peers before it exits with status 1
    /// (default 5 s). A process that has not failed finalises without a limit.
    void set_finalize_grace(std::chrono::duration<double> grace) { finalize_grace_ = grace; }

    /// The number of ranks of MPI_COMM_WORLD.
    [[nodiscard]] static int world_size()
    {
        int size = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        return size;
    }

private:
    bool owns_ = false;
    bool owns_channel_ = false;
    std::chrono::duration<double> finalize_grace_{5.0};
};

class MpiComm {
public:
    using stream_type = HostStream;
    using duration = std::chrono::duration<double>;

    /// MPI_COMM_WORLD (needs an MpiSession, or MPI_Init first; without a session a failing rank
    /// cannot reach the others, and only the timeout ends their wait).
    [[nodiscard]] static MpiComm world() { return MpiComm(MPI_COMM_WORLD, false); }

    MpiComm() : MpiComm(MPI_COMM_WORLD, false) {}

    [[nodiscard]] int rank() const noexcept { return rank_; }
    [[nodiscard]] int size() const noexcept { return size_; }
    [[nodiscard]] MPI_Comm native() const noexcept { return *handle_; }

    /// How long one collective may wait for the other ranks before it throws CommError. Per
    /// communicator object; split() passes it on.
    [[nodiscard]] duration timeout() const noexcept { return timeout_; }
    MpiComm& set_timeout(duration timeout)
    {
        require<InvalidArgument>(timeout.count() > 0.0, "MpiComm timeout (", timeout.count(), " s) must be positive");
        timeout_ = timeout;
        return *this;
    }

    void all_reduce_sum(std::span<float> buf, HostStream = {})
    {
        detail::throw_if_failed();
        const int n = detail::checked_int(static_cast<index_t>(buf.size()), "all_reduce_sum count");
        require_same_count(n, "all_reduce_sum (MPI_Iallreduce)");
        auto op = std::make_shared<detail::PendingCollective>();
        op->recv.assign(buf.begin(), buf.end());
        detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, op->recv.data(), n, MPI_FLOAT, MPI_SUM, native(), &op->request),
                          "MPI_Iallreduce");
        wait(op, "all_reduce_sum (MPI_Iallreduce)");
        std::copy(op->recv.begin(), op->recv.end(), buf.begin());
    }

    void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                      std::span<const index_t> recv_counts, HostStream = {})
    {
        require<CommError>(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
                           "all_to_all_v needs one send and one receive count per rank (", size_, "), got ",
                           send_counts.size(), " and ", recv_counts.size());
        const auto p = static_cast<std::size_t>(size_);
        auto op = std::make_shared<detail::PendingCollective>();
        op->counts_and_offsets.resize(4 * p);
        int* sc = op->counts_and_offsets.data();
        int* sd = sc + p;
        int* rc = sd + p;
        int* rd = rc + p;
        index_t s_off = 0, r_off = 0;
        for (std::size_t j = 0; j < p; ++j) {
            sc[j] = detail::checked_int(send_counts[j], "all_to_all_v send count");
            rc[j] = detail::checked_int(recv_counts[j], "all_to_all_v receive count");
            sd[j] = detail::checked_int(s_off, "all_to_all_v send offset");
            rd[j] = detail::checked_int(r_off, "all_to_all_v receive offset");
            s_off += send_counts[j];
            r_off += recv_counts[j];
        }
        require<CommError>(s_off <= static_cast<index_t>(send.size()) && r_off <= static_cast<index_t>(recv.size()),
                           "all_to_all_v counts (", s_off, " sent, ", r_off, " received) exceed the buffers (",
                           send.size(), ", ", recv.size(), ")");
        detail::throw_if_failed();
        require_matching_counts(sc, rc);
        op->send.assign(send.begin(), send.begin() + s_off);
        op->recv.resize(static_cast<std::size_t>(r_off));
        detail::check_mpi(MPI_Ialltoallv(op->send.data(), sc, sd, MPI_FLOAT, op->recv.data(), rc, rd, MPI_FLOAT,
                                         native(), &op->request),
                          "MPI_Ialltoallv");
        wait(op, "all_to_all_v (MPI_Ialltoallv)");
        std::copy(op->recv.begin(), op->recv.end(), recv.begin());
    }

    void all_gather(std::span<const float> in, std::span<float> out, HostStream = {})
    {
        require<CommError>(out.size() == in.size() * static_cast<std::size_t>(size_), "all_gather output holds ",
                           out.size(), " elements, expected ", in.size(), " x ", size_, " ranks");
        const int n = detail::checked_int(static_cast<index_t>(in.size()), "all_gather count");
        detail::throw_if_failed();
        require_same_count(n, "all_gather (MPI_Iallgather)");
        auto op = std::make_shared<detail::PendingCollective>();
        op->send.assign(in.begin(), in.end());
        op->recv.resize(out.size());
        detail::check_mpi(MPI_Iallgather(op->send.data(), n, MPI_FLOAT, op->recv.data(), n, MPI_FLOAT, native(),
                                         &op->request),
                          "MPI_Iallgather");
        wait(op, "all_gather (MPI_Iallgather)");
        std::copy(op->recv.begin(), op->recv.end(), out.begin());
    }

    /// Collective. A barrier first, which fails rather than hangs when a rank is missing, so that
    /// MPI_Comm_split, which blocks, runs only once every rank has arrived.
    [[nodiscard]] MpiComm split(int color, int key) const
    {
        barrier();
        MPI_Comm sub = MPI_COMM_NULL;
        detail::check_mpi(MPI_Comm_split(native(), color, key, &sub), "MPI_Comm_split");
        MpiComm out(sub, true);
        out.timeout_ = timeout_;
        return out;
    }

    void barrier() const
    {
        detail::throw_if_failed();
        auto op = std::make_shared<detail::PendingCollective>();
        detail::check_mpi(MPI_Ibarrier(native(), &op->request), "MPI_Ibarrier");
        wait(op, "barrier (MPI_Ibarrier)");
    }

    /// Tells every other rank of the job that this rank failed: each throws
    /// CommError("rank R failed: message") from the collective it waits in or calls next,
    /// instead of waiting for this rank forever. Call it when this rank abandons the sequence of
    /// collectives because of an error the other ranks did not see (an error every rank saw
    /// alike, such as foe::agree's, needs no call). Waits at most about a second for the sends
    /// to leave; sends once per process, and not at all when the failure came from a peer (a
    /// rank that timed out does send: the others may still be waiting).
    /// Afterwards this process is failed (see the top of this header). Never throws.
    void abort_peers(std::string_view message) const noexcept
    {
        detail::ErrorChannel& ch = detail::error_channel();
        try {
            if (ch.failure.empty()) ch.failure = concat_failure(message);
            if (ch.sent_abort || ch.peer_failed || ch.comm == MPI_COMM_NULL) return;
            ch.sent_abort = true;
            // Bounded, and below every transport's eager limit, so that each send completes
            // without the peer posting a receive (an unfinished send could stall MPI_Finalize).
            constexpr std::size_t max_message = 1024;
            auto text = std::make_shared<std::string>(message.substr(0, max_message));
            ch.sent_messages.push_back(text);
            for (int r = 0; r < ch.world_size; ++r) {
                if (r == ch.world_rank) continue;
                MPI_Request request = MPI_REQUEST_NULL;
                if (MPI_Isend(text->data(), static_cast<int>(text->size()), MPI_CHAR, r, detail::abort_tag, ch.comm,
                              &request) == MPI_SUCCESS)
                    ch.send_requests.push_back(request);
            }
            // Small messages usually leave at once (eager protocol); a short bounded wait covers
            // the rest without turning a failure into a hang.
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
            int done = 0;
            while (!done && std::chrono::steady_clock::now() < deadline) {
                if (MPI_Testall(static_cast<int>(ch.send_requests.size()), ch.send_requests.data(), &done,
                                MPI_STATUSES_IGNORE) != MPI_SUCCESS)
                    break;
                if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
        } catch (...) {  // allocation failure: nothing more can be done for the peers
        }
    }

private:
    MpiComm(MPI_Comm c, bool owned)
        : handle_(owned ? std::shared_ptr<MPI_Comm>(new MPI_Comm(c),
                                                    [](MPI_Comm* p) {
                                                        int finalized = 0;
                                                        MPI_Finalized(&finalized);
                                                        // A failed process may have abandoned
                                                        // collectives on it: leave it to MPI.
                                                        if (!finalized && *p != MPI_COMM_NULL &&
                                                            detail::error_channel().failure.empty())
                                                            MPI_Comm_free(p);
                                                        delete p;
                                                    })
                        : std::make_shared<MPI_Comm>(c))
    {
        detail::check_mpi(MPI_Comm_rank(c, &rank_), "MPI_Comm_rank");
        detail::check_mpi(MPI_Comm_size(c, &size_), "MPI_Comm_size");
    }

    [[nodiscard]] static std::string concat_failure(std::string_view message) noexcept
    {
        try {
            return foe::detail::concat("rank ", detail::error_channel().world_rank,
                                       " (this rank) failed: ", message);
        } catch (...) {
            return "this rank failed";
        }
    }

    /// Collective: throws CommError on every rank when the ranks pass different counts to the
    /// collective `what` (the minimum and maximum over the ranks, and this rank's, are named).
    /// Its own wait and timeout are reported as the collective's: the check is part of it.
    void require_same_count(int count, std::string_view what) const
    {
        auto op = std::make_shared<detail::PendingCollective>();
        op->counts_and_offsets = {count, -count};  // one MPI_MAX gives the maximum and the minimum
        detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, op->counts_and_offsets.data(), 2, MPI_INT, MPI_MAX, native(),
                                         &op->request),
                          "MPI_Iallreduce");
        wait(op, what);  // a timeout names the collective the caller called
        const int most = op->counts_and_offsets[0], least = -op->counts_and_offsets[1];
        require<CommError>(most == least, "MpiComm ", what, " on ", size_, " ranks: the ranks pass different counts (",
                           least, " to ", most, " elements; rank ", rank_, " passes ", count,
                           "): every rank must pass the same count");
    }

    /// Collective: throws CommError on every rank unless what each rank sends to each other
    /// equals what that one expects to receive (send_counts[q] on rank p == recv_counts[p] on q).
    void require_matching_counts(const int* send_counts, const int* recv_counts) const
    {
        const auto p = static_cast<std::size_t>(size_);
        auto exchange = std::make_shared<detail::PendingCollective>();
        exchange->counts_and_offsets.assign(send_counts, send_counts + p);
        exchange->counts_and_offsets.resize(2 * p);
        int* incoming = exchange->counts_and_offsets.data() + p;
        detail::check_mpi(MPI_Ialltoall(exchange->counts_and_offsets.data(), 1, MPI_INT, incoming, 1, MPI_INT, native(),
                                        &exchange->request),
                          "MPI_Ialltoall");
        wait(exchange, "all_to_all_v (MPI_Ialltoallv)");
        int sender = -1;
        for (std::size_t q = 0; q < p && sender < 0; ++q)
            if (incoming[q] != recv_counts[q]) sender = static_cast<int>(q);
        // The lowest rank that found a mismatch, so that every rank names the same one.
        auto verdict = std::make_shared<detail::PendingCollective>();
        verdict->counts_and_offsets = {sender >= 0 ? INT_MAX - rank_ : -1};
        detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, verdict->counts_and_offsets.data(), 1, MPI_INT, MPI_MAX,
                                         native(), &verdict->request),
                          "MPI_Iallreduce");
        wait(verdict, "all_to_all_v (MPI_Ialltoallv)");
        if (verdict->counts_and_offsets[0] < 0) return;
        const int receiver = INT_MAX - verdict->counts_and_offsets[0];
        raise<CommError>("MpiComm all_to_all_v on ", size_, " ranks: the ranks' counts do not match: rank ", receiver,
                         " expects another number of elements from some rank than that rank sends",
                         sender >= 0 && receiver == rank_
                             ? foe::detail::concat(" (this rank expects ", recv_counts[sender], " from rank ", sender,
                                                   ", which sends ", incoming[sender], ")")
                             : std::string(),
                         "; every rank's send_counts[q] must equal rank q's recv_counts for it");
    }

    /// Waits for op, polling the error channel and the clock. On a peer's failure or the timeout
    /// the collective is abandoned (its buffers kept alive) and CommError thrown.
    void wait(const std::shared_ptr<detail::PendingCollective>& op, std::string_view what) const
    {
        using clock = std::chrono::steady_clock;
        detail::ErrorChannel& ch = detail::error_channel();
        const auto start = clock::now();
        // Spin first (a collective between busy ranks completes in microseconds, and MPI only
        // progresses inside MPI_Test), then yield, then sleep: a rank that waits long for a slow
        // or failed peer must not take the CPU from the ranks it waits for.
        for (std::uint64_t i = 0;; ++i) {
            int done = 0;
            if (const int rc = MPI_Test(&op->request, &done, MPI_STATUS_IGNORE); rc != MPI_SUCCESS) {
                ch.abandoned.push_back(op);  // MPI may still own the buffers
                detail::check_mpi(rc, "MPI_Test");
            }
            if (done) return;
            if (i % 64 != 0) continue;
            const auto waited = clock::now() - start;
            if (detail::receive_peer_failure()) {
                ch.abandoned.push_back(op);
                throw CommError(ch.failure);
            }
            if (waited > timeout_) {
                ch.abandoned.push_back(op);
                ch.failure = foe::detail::concat(
                    "MpiComm ", what, " on ", size_, " ranks (this is rank ", rank_, ", world rank ", ch.world_rank,
                    ") did not complete within ", timeout_.count(),
                    " s: some rank did not join it and reported no failure (MPI cannot tell which)");
                throw CommError(ch.failure);
            }
            if (waited > std::chrono::milliseconds(10)) std::this_thread::sleep_for(std::chrono::microseconds(200));
            else if (i >= 4096) std::this_thread::yield();
        }
    }

    std::shared_ptr<MPI_Comm> handle_;
    int rank_ = 0;
    int size_ = 1;
    duration timeout_ = default_collective_timeout;
};
static_assert(Comm<MpiComm>);

}  // namespace foe::comm
