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
#include <map>
#include <memory>
#include <typeindex>

#include "foe/core/error.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/gemm.cuh"

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

/// The GEMM policy instances of one owner (a model), one per policy type, made on first use. A
/// CUDA graph bakes in a GEMM's handle and workspace, so they must live as long as the graphs that
/// captured them: CudaModel owns a GemmSet and makes its GEMM at construction, never inside a
/// capture.
class GemmSet {
public:
    template <DeviceGemmPolicy G>
    [[nodiscard]] G& get()
    {
        const std::type_index key(typeid(G));
        auto it = gemms_.find(key);
        if (it == gemms_.end())
            it = gemms_.emplace(key, Owned(new G(), [](void* p) { delete static_cast<G*>(p); })).first;
        return *static_cast<G*>(it->second.get());
    }

private:
    using Owned = std::unique_ptr<void, void (*)(void*)>;
    std::map<std::type_index, Owned> gemms_;
};

/// What a device policy's call runs in: its kernels go on `stream` (no host synchronisation), its
/// transient buffers come from `scratch`, its dense GEMMs through `gemms` (none: the calling
/// thread's shared instance, cuda::device_gemm; make it before capturing a graph, e.g. by one
/// eager forward, since creating a cuBLASLt handle inside a capture fails).
struct DeviceContext {
    cudaStream_t stream = nullptr;
    Scratch* scratch = nullptr;
    GemmSet* gemms = nullptr;

    template <class T>
    [[nodiscard]] T* take(std::size_t count) const
    {
        require(scratch != nullptr, "device context has no scratch");
        return scratch->template take<T>(count);
    }

    template <DeviceGemmPolicy G>
    [[nodiscard]] G& gemm() const
    {
        return gemms != nullptr ? gemms->template get<G>() : device_gemm<G>();
    }
};

}  // namespace foe::cuda
