#pragma once
// The execution context of the CUDA backend's policies: the stream their kernels are enqueued on,
// and the scratch memory of one call.
//
// Device policies (attention/, routing/, experts/, parallel/, sync/ *.cuh) take a DeviceContext as
// their last argument where the host policies take none. Scratch is transient: a policy may take
// from ctx.scratch whatever it needs during one call (the layer resets it before each call), up
// to the scratch_bytes(max_tokens) the policy declared when the layer was planned. Nothing is
// allocated in a call, so a decode step is capturable in a CUDA graph: the same call sequence on
// the same shapes takes the same addresses.

#include <cuda_runtime.h>

#include <cstddef>

#include "foe/core/error.hpp"
#include "foe/cuda/arena.cuh"

namespace foe::cuda {

/// A bump allocator over a region of device memory planned once. take() throws if a policy takes
/// more than the region holds (its scratch_bytes() under-declared: a bug reported, never an overrun).
class Scratch {
public:
    Scratch() = default;
    Scratch(void* base, std::size_t bytes) noexcept : base_(static_cast<unsigned char*>(base)), bytes_(bytes) {}

    template <class T>
    [[nodiscard]] T* take(std::size_t count)
    {
        const std::size_t size = align_up(count * sizeof(T));
        require(used_ + size <= bytes_, "device scratch: taking ", size, " bytes at offset ", used_,
                " overruns the planned ", bytes_, " bytes (a policy's scratch_bytes() is too small)");
        T* p = reinterpret_cast<T*>(base_ + used_);
        used_ += size;
        return p;
    }
    void reset() noexcept { used_ = 0; }
    /// The part not taken yet, as a scratch of its own (what a policy's call may use: it is dead
    /// before anything taken later here is written, since both run in stream order).
    [[nodiscard]] Scratch remaining() const noexcept { return Scratch(base_ + used_, bytes_ - used_); }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
    [[nodiscard]] std::size_t used() const noexcept { return used_; }

private:
    unsigned char* base_ = nullptr;
    std::size_t bytes_ = 0;
    std::size_t used_ = 0;
};

/// What a device policy's call runs in: its kernels go on `stream` (no host synchronisation), its
/// transient buffers come from `scratch`.
struct DeviceContext {
    cudaStream_t stream = nullptr;
    Scratch* scratch = nullptr;

    template <class T>
    [[nodiscard]] T* take(std::size_t count) const
    {
        require(scratch != nullptr, "device context has no scratch");
        return scratch->template take<T>(count);
    }
};

}  // namespace foe::cuda
