#pragma once
// CudaSelfComm: the one-rank device communicator, the CUDA counterpart of SelfComm
// (comm/self_comm.hpp). Its buffers are device memory and its collectives are enqueued on a CUDA
// stream (stream_type cudaStream_t, so comm::comm_backend_t<CudaSelfComm> is CudaBackend): the
// sum over one rank is the buffer itself (nothing enqueued), and all_to_all_v / all_gather are
// device-to-device copies on the stream. It needs no NCCL: a single-GPU layer composed with
// sync::AllReduceMean<CudaSelfComm> runs the same code path as a multi-GPU one over NcclComm.

#include <cuda_runtime.h>

#include <span>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::comm {

class CudaSelfComm {
public:
    using stream_type = cudaStream_t;

    [[nodiscard]] int rank() const noexcept { return 0; }
    [[nodiscard]] int size() const noexcept { return 1; }

    /// The sum over one rank is the buffer itself: enqueues nothing.
    void all_reduce_sum(std::span<float>, cudaStream_t) {}
    void all_reduce_sum(std::span<bfloat16>, cudaStream_t) {}

    /// Copies send_counts[0] elements of `in` to `out` on the stream (in and out must not overlap
    /// unless they are the same buffer); throws CommError, enqueueing nothing, unless both count
    /// spans hold one count, the counts agree and fit the buffers.
    void all_to_all_v(std::span<const float> in, std::span<const index_t> send_counts, std::span<float> out,
                      std::span<const index_t> recv_counts, cudaStream_t stream)
    {
        all_to_all_v_impl(in, send_counts, out, recv_counts, stream);
    }
    void all_to_all_v(std::span<const bfloat16> in, std::span<const index_t> send_counts, std::span<bfloat16> out,
                      std::span<const index_t> recv_counts, cudaStream_t stream)
    {
        all_to_all_v_impl(in, send_counts, out, recv_counts, stream);
    }

    /// out = in, on the stream; out.size() must equal in.size() (one rank).
    void all_gather(std::span<const float> in, std::span<float> out, cudaStream_t stream)
    {
        all_gather_impl(in, out, stream);
    }
    void all_gather(std::span<const bfloat16> in, std::span<bfloat16> out, cudaStream_t stream)
    {
        all_gather_impl(in, out, stream);
    }

    [[nodiscard]] CudaSelfComm split(int /*color*/, int /*key*/) const { return {}; }

private:
    template <class T>
    static void copy(const T* in, T* out, std::size_t n, cudaStream_t stream)
    {
        if (n == 0 || in == out) return;
        cuda::check(cudaMemcpyAsync(out, in, n * sizeof(T), cudaMemcpyDeviceToDevice, stream),
                    "cudaMemcpyAsync (CudaSelfComm)");
    }

    template <class T>
    static void all_to_all_v_impl(std::span<const T> in, std::span<const index_t> send_counts, std::span<T> out,
                                  std::span<const index_t> recv_counts, cudaStream_t stream)
    {
        require<CommError>(send_counts.size() == 1 && recv_counts.size() == 1,
                           "CudaSelfComm::all_to_all_v needs one count per rank (1), got ", send_counts.size(),
                           " and ", recv_counts.size());
        require<CommError>(send_counts[0] >= 0 && send_counts[0] == recv_counts[0], "CudaSelfComm::all_to_all_v sends ",
                           send_counts[0], " elements to itself but expects to receive ", recv_counts[0]);
        require<CommError>(static_cast<index_t>(in.size()) >= send_counts[0] &&
                               static_cast<index_t>(out.size()) >= recv_counts[0],
                           "CudaSelfComm::all_to_all_v buffers are smaller than their counts");
        copy(in.data(), out.data(), static_cast<std::size_t>(send_counts[0]), stream);
    }

    template <class T>
    static void all_gather_impl(std::span<const T> in, std::span<T> out, cudaStream_t stream)
    {
        require<CommError>(out.size() == in.size(), "CudaSelfComm::all_gather output holds ", out.size(),
                           " elements, expected ", in.size());
        copy(in.data(), out.data(), in.size(), stream);
    }
};
static_assert(Comm<CudaSelfComm>);
static_assert(std::same_as<comm_backend_t<CudaSelfComm>, CudaBackend>);

}  // namespace foe::comm
