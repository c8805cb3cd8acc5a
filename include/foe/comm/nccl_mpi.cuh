#pragma once
// nccl_comm_over_mpi: one NcclComm per MPI rank, its NCCL unique id passed over MPI.
//
//   foe::comm::MpiSession session(&argc, &argv);
//   auto comm = foe::comm::nccl_comm_over_mpi(MPI_COMM_WORLD, local_rank % device_count);
//
// Needs <mpi.h> (link MPI::MPI_CXX) besides foe::nccl; foe/comm/nccl_comm.cuh itself does not.

#include <algorithm>
#include <chrono>
#include <exception>
#include <memory>
#include <string>
#include <thread>

#include "foe/comm/mpi_comm.hpp"
#include "foe/comm/nccl_comm.cuh"

namespace foe::comm {

namespace detail {

/// Everything MPI may write into while nccl_comm_over_mpi's requests are in flight: freed once
/// they have completed, leaked on purpose otherwise (MPI may still write into it).
struct NcclMpiBootstrap {
    MPI_Comm dup = MPI_COMM_NULL;  ///< private duplicate of the caller's communicator
    MPI_Request request = MPI_REQUEST_NULL;
    struct Message {
        int ok = 0;  ///< rank 0 could make the id
        ncclUniqueId id{};
    } message;
};

/// Polls `request` (MPI_Test) until it completes, true, or until `deadline`, false.
[[nodiscard]] inline bool nccl_mpi_wait(MPI_Request& request, std::chrono::steady_clock::time_point deadline)
{
    for (;;) {
        int done = 0;
        check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
        if (done) return true;
        if (std::chrono::steady_clock::now() >= deadline) return false;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
}

}  // namespace detail

/// Collective over `comm`: every rank calls it with its own CUDA device. Rank 0 makes the NCCL
/// unique id and broadcasts it, with a flag saying whether it could; every rank then joins the
/// NCCL communicator with its rank and size in `comm` (NcclComm::from_unique_id). A rank 0 that
/// could not make the id (whatever it threw) still takes part in the broadcast, and every rank
/// throws CommError.
///
/// The broadcast runs on a private duplicate of `comm` (MPI_Comm_idup), non-blocking, and both
/// are waited for at most options.bootstrap_timeout in all, so a rank 0 that never arrives ends in
/// a CommError, not a hang, and leaves no request on `comm` that could match its later traffic.
/// After such a timeout the duplicate's request stays outstanding (MPI cannot cancel a collective
/// portably): the duplicate communicator and the buffers MPI may still write into are leaked,
/// deliberately; so are they if MPI_Test itself fails.
[[nodiscard]] inline NcclComm nccl_comm_over_mpi(MPI_Comm comm, int device, NcclOptions options = {})
{
    int rank = 0, size = 0;
    detail::check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    detail::validate_nccl_setup("nccl_comm_over_mpi", rank, size, options);
    const std::string who = foe::detail::concat("nccl_comm_over_mpi (MPI rank ", rank, " of ", size, ")");

    auto boot = std::make_unique<detail::NcclMpiBootstrap>();
    std::string error;
    if (rank == 0) {
        try {
            boot->message.id = NcclComm::make_unique_id();
            boot->message.ok = 1;
        } catch (const std::exception& e) {
            try {
                error = e.what();
            } catch (...) {  // out of memory: the generic message below
            }
        } catch (...) {
        }
    }

    // Waits for boot->request; on a timeout or a failed MPI_Test the request may still write
    // into *boot, which is then leaked.
    const auto deadline = std::chrono::steady_clock::now() +
                          std::min<std::chrono::milliseconds>(options.bootstrap_timeout, std::chrono::hours(24 * 365));
    const auto await_request = [&](const char* what) {
        bool done = false;
        try {
            done = detail::nccl_mpi_wait(boot->request, deadline);
        } catch (...) {
            (void)boot.release();
            throw;
        }
        if (!done) {
            (void)boot.release();
            raise<CommError>(who, ": ", what, " did not complete within NcclOptions::bootstrap_timeout (",
                             options.bootstrap_timeout.count(), " ms); did every rank of the communicator call it?");
        }
    };

    detail::check_mpi(MPI_Comm_idup(comm, &boot->dup, &boot->request), "MPI_Comm_idup");
    await_request("duplicating the communicator (MPI_Comm_idup)");
    if (const int rc = MPI_Ibcast(&boot->message, static_cast<int>(sizeof(detail::NcclMpiBootstrap::Message)), MPI_BYTE,
                                  0, boot->dup, &boot->request);
        rc != MPI_SUCCESS) {
        (void)MPI_Comm_free(&boot->dup);
        detail::check_mpi(rc, "MPI_Ibcast");
    }
    await_request("the broadcast of the NCCL unique id from rank 0 (MPI_Ibcast)");
    const detail::NcclMpiBootstrap::Message message = boot->message;
    detail::check_mpi(MPI_Comm_free(&boot->dup), "MPI_Comm_free");
    boot.reset();

    if (!message.ok) {
        if (rank == 0) throw CommError(error.empty() ? who + ": could not make the NCCL unique id" : error);
        raise<CommError>(who, ": rank 0 could not make the NCCL unique id (its error says why)");
    }
    return NcclComm::from_unique_id(message.id, rank, size, device, options);
}

}  // namespace foe::comm
