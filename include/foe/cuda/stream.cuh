#pragma once
// Owners of CUDA state a model keeps: a stream (destroyed on every path out, also when a
// constructor throws half way) and the current device (set for a scope, restored after it), so
// that two models on two GPUs can be driven from one thread.

#include <cuda_runtime.h>

#include <utility>

#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// A non-blocking stream (it does not synchronise with the legacy default stream).
class Stream {
public:
    Stream() { check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
    Stream(Stream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}
    Stream& operator=(Stream&&) = delete;
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream()
    {
        if (stream_ != nullptr) {
            (void)cudaStreamSynchronize(stream_);
            (void)cudaStreamDestroy(stream_);
        }
    }
    [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

private:
    cudaStream_t stream_ = nullptr;
};

/// Makes `device` current for the guard's scope and restores the previous device after it.
class DeviceGuard {
public:
    explicit DeviceGuard(int device)
    {
        check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
        else previous_ = -1;  // nothing to restore
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;
    ~DeviceGuard()
    {
        if (previous_ >= 0) (void)cudaSetDevice(previous_);
    }

private:
    int previous_ = -1;
};

/// The current device.
[[nodiscard]] inline int current_device()
{
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    return device;
}

}  // namespace foe::cuda
