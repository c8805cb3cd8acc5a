#pragma once
// Backends: where a policy's data lives and how its work runs. The policies of one layer share a
// backend, and a layer checks that they do at compile time (layer/backend_check.hpp):
//
//   HostBackend  fp32 in host memory; work completes before a call returns (OpenMP inside).
//   CudaBackend  device memory (bf16 storage, fp32 accumulation); work is enqueued on a CUDA
//                stream and completes in stream order. Device policies take the batch as
//                cuda::DeviceBatch and a cuda::DeviceContext (stream + scratch) as their last
//                argument; the kind concepts (attention/attention.hpp, ...) spell out both forms.
//
// A policy says its backend with a member `using backend = ...;`. A policy that says nothing is
// a host policy (every policy a user wrote before backends existed is one). A policy built over a
// communicator takes the communicator's backend (comm::comm_backend_t): AllReduceMean<NcclComm>
// is a device policy, whose buffers NCCL reads on the device, and must not serve a host layer.

#include <concepts>
#include <type_traits>

namespace foe {

struct HostBackend {
    static constexpr const char* name = "host";
};
struct CudaBackend {
    static constexpr const char* name = "cuda";
};

template <class B>
concept Backend = std::same_as<B, HostBackend> || std::same_as<B, CudaBackend>;

namespace comm {
struct HostStream;  // comm/comm.hpp: the stream type of host communicators
}
namespace cuda {
struct DeviceBatch;    // cuda/batch.cuh: a batch as the device kernels read it
struct DeviceContext;  // cuda/context.cuh: the stream and scratch of one device call
}  // namespace cuda

namespace detail {
template <class P>
struct backend_of {
    using type = HostBackend;
};
/// A communicator (comm/comm.hpp): host when its collectives take HostStream (they complete on
/// the host, on host memory), CUDA otherwise (enqueued on a stream, on device memory).
template <class P>
    requires requires { typename P::stream_type; } && (!requires { typename P::backend; })
struct backend_of<P> {
    using type = std::conditional_t<std::same_as<typename P::stream_type, comm::HostStream>, HostBackend, CudaBackend>;
};
template <class P>
    requires requires { typename P::backend; }
struct backend_of<P> {
    using type = typename P::backend;
};
}  // namespace detail

/// The backend P declares (HostBackend when it declares none); a communicator's follows from its
/// stream type.
template <class P>
using backend_of_t = typename detail::backend_of<P>::type;

}  // namespace foe
