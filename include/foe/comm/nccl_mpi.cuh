#pragma once
// nccl_comm_over_mpi: one NcclComm per MPI rank, its NCCL unique id passed over MPI.
//
//   foe::comm::MpiSession session(&argc, &argv);
//   auto comm = foe::comm::nccl_comm_over_mpi(MPI_COMM_WORLD, local_rank % device_count);
//
// Needs <mpi.h> (link MPI::MPI_CXX) besides foe::nccl; foe/comm/nccl_comm.cuh itself does not.

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "foe/comm/mpi_comm.hpp"
#include "foe/comm/nccl_comm.cuh"

namespace foe::comm {

/// Collective over `comm`: every rank calls it with its own CUDA device. Rank 0 makes the NCCL
/// unique id and broadcasts it, with a flag saying whether it could; every rank then joins the
/// NCCL communicator with its rank and size in `comm` (NcclComm::from_unique_id). The broadcast
/// is non-blocking and waited for at most options.bootstrap_timeout, so a rank 0 that never
/// arrives ends in a CommError, not a hang; a rank 0 that could not make the id makes every rank
/// throw CommError.
[[nodiscard]] inline NcclComm nccl_comm_over_mpi(MPI_Comm comm, int device, NcclOptions options = {})
{
    int rank = 0, size = 0;
    detail::check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    detail::validate_nccl_setup("nccl_comm_over_mpi", rank, size, options);

    // Broadcast as plain bytes. Heap-allocated: after a timeout MPI may still write into it, so it
    // is then kept alive (leaked) rather than freed under MPI.
    struct Payload {
        int ok = 0;
        ncclUniqueId id{};
    };
    auto payload = std::make_unique<Payload>();
    std::string error;
    if (rank == 0) {
        try {
            payload->id = NcclComm::make_unique_id();
            payload->ok = 1;
        } catch (const CommError& e) {
            error = e.what();
        }
    }
    MPI_Request request = MPI_REQUEST_NULL;
    detail::check_mpi(
        MPI_Ibcast(payload.get(), static_cast<int>(sizeof(Payload)), MPI_BYTE, 0, comm, &request), "MPI_Ibcast");
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
        int done = 0;
        detail::check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
        if (done) break;
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited >= options.bootstrap_timeout) {
            (void)payload.release();  // MPI may still write into it
            raise<CommError>("nccl_comm_over_mpi (MPI rank ", rank, " of ", size,
                             "): the NCCL unique id from rank 0 did not arrive within NcclOptions::bootstrap_timeout (",
                             options.bootstrap_timeout.count(), " ms)");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (!payload->ok) {
        if (rank == 0) throw CommError(error);
        raise<CommError>("nccl_comm_over_mpi (MPI rank ", rank, " of ", size,
                         "): rank 0 could not make the NCCL unique id (its error says why)");
    }
    return NcclComm::from_unique_id(payload->id, rank, size, device, options);
}

}  // namespace foe::comm
