#pragma once
// MpiComm: the Comm concept over MPI, the multi-process backend on CPUs.
//
// Collectives complete before they return (stream_type is HostStream). The communicator handle
// is shared by copies and freed with the last one. Every MPI call's error becomes a CommError
// naming the call and MPI's own text: MpiSession sets MPI_ERRORS_RETURN on MPI_COMM_WORLD, and
// split communicators inherit it.
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

#include <climits>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"

namespace foe::comm {

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

}  // namespace detail

/// Initialises MPI for the lifetime of the object (if nobody did before) and finalises it after.
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
    }
    MpiSession(const MpiSession&) = delete;
    MpiSession& operator=(const MpiSession&) = delete;
    ~MpiSession()
    {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (owns_ && !finalized) MPI_Finalize();
    }

    /// True when this process was started by an MPI launcher with more than one rank.
    [[nodiscard]] static int world_size()
    {
        int size = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        return size;
    }

private:
    bool owns_ = false;
};

class MpiComm {
public:
    using stream_type = HostStream;

    /// MPI_COMM_WORLD (needs an MpiSession or MPI_Init first).
    [[nodiscard]] static MpiComm world() { return MpiComm(MPI_COMM_WORLD, false); }

    MpiComm() : MpiComm(MPI_COMM_WORLD, false) {}

    [[nodiscard]] int rank() const noexcept { return rank_; }
    [[nodiscard]] int size() const noexcept { return size_; }
    [[nodiscard]] MPI_Comm native() const noexcept { return *handle_; }

    void all_reduce_sum(std::span<float> buf, HostStream = {})
    {
        detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, buf.data(), detail::checked_int(static_cast<index_t>(buf.size()), "all_reduce_sum count"),
                                        MPI_FLOAT, MPI_SUM, native()),
                          "MPI_Allreduce");
    }

    void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                      std::span<const index_t> recv_counts, HostStream = {})
    {
        require<CommError>(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
                           "all_to_all_v needs one send and one receive count per rank (", size_, "), got ",
                           send_counts.size(), " and ", recv_counts.size());
        std::vector<int> sc(static_cast<std::size_t>(size_)), sd(sc.size()), rc(sc.size()), rd(sc.size());
        index_t s_off = 0, r_off = 0;
        for (std::size_t j = 0; j < sc.size(); ++j) {
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
        detail::check_mpi(MPI_Alltoallv(send.data(), sc.data(), sd.data(), MPI_FLOAT, recv.data(), rc.data(), rd.data(),
                                        MPI_FLOAT, native()),
                          "MPI_Alltoallv");
    }

    void all_gather(std::span<const float> in, std::span<float> out, HostStream = {})
    {
        require<CommError>(out.size() == in.size() * static_cast<std::size_t>(size_), "all_gather output holds ",
                           out.size(), " elements, expected ", in.size(), " x ", size_, " ranks");
        detail::check_mpi(MPI_Allgather(in.data(), detail::checked_int(static_cast<index_t>(in.size()), "all_gather count"),
                                        MPI_FLOAT, out.data(), static_cast<int>(in.size()), MPI_FLOAT, native()),
                          "MPI_Allgather");
    }

    [[nodiscard]] MpiComm split(int color, int key) const
    {
        MPI_Comm sub = MPI_COMM_NULL;
        detail::check_mpi(MPI_Comm_split(native(), color, key, &sub), "MPI_Comm_split");
        return MpiComm(sub, true);
    }

    void barrier() const { detail::check_mpi(MPI_Barrier(native()), "MPI_Barrier"); }

private:
    MpiComm(MPI_Comm c, bool owned)
        : handle_(owned ? std::shared_ptr<MPI_Comm>(new MPI_Comm(c),
                                                    [](MPI_Comm* p) {
                                                        int finalized = 0;
                                                        MPI_Finalized(&finalized);
                                                        if (!finalized && *p != MPI_COMM_NULL) MPI_Comm_free(p);
                                                        delete p;
                                                    })
                        : std::make_shared<MPI_Comm>(c))
    {
        detail::check_mpi(MPI_Comm_rank(c, &rank_), "MPI_Comm_rank");
        detail::check_mpi(MPI_Comm_size(c, &size_), "MPI_Comm_size");
    }

    std::shared_ptr<MPI_Comm> handle_;
    int rank_ = 0;
    int size_ = 1;
};
static_assert(Comm<MpiComm>);

}  // namespace foe::comm
