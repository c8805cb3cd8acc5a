#pragma once
// Error checks, device count, and the device buffer of foe's CUDA layer.
//
// One error strategy (STYLE.md 9): CUDA calls return a status; foe::cuda::check() turns a failed
// status into a foe::CudaError naming file:line, after clearing the runtime's last-error state so
// that a caller who catches the exception does not see the same error again on its next,
// unrelated call.

#include <cuda_runtime.h>

#include <cstddef>
#include <source_location>
#include <span>
#include <utility>
#include <vector>

#include "foe/cuda/config.cuh"
#include "foe/cuda/error.cuh"

namespace foe::cuda {

/// Throws foe::CudaError if `status` is not cudaSuccess. `what` names the call.
inline void check(cudaError_t status, const char* what = "CUDA call",
                  std::source_location where = std::source_location::current())
{
    if (status == cudaSuccess) return;
    // Clears a non-sticky error so it does not resurface in a later, unrelated check. (A sticky
    // error, e.g. an illegal address, stays: the context is unusable and the message says so.)
    (void)cudaGetLastError();
    throw CudaError(::foe::detail::concat(where.file_name(), ":", where.line(), ": ", what, " failed: ",
                                   cudaGetErrorName(status), " (", cudaGetErrorString(status), ")"));
}

/// Checks the launch of the kernel just enqueued (configuration errors surface here; faults
/// inside the kernel surface at the next synchronising call).
inline void check_launch(const char* kernel, std::source_location where = std::source_location::current())
{
    check(cudaGetLastError(), kernel, where);
}

/// Number of CUDA devices; 0, without throwing, when there is no driver or no GPU.
[[nodiscard]] inline int cuda_device_count() noexcept
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/// Owning, move-only device allocation of `size()` elements of T (cudaMalloc: these buffers are
/// planned and allocated once, outside the hot path, so a stream-ordered pool buys nothing).
template <class T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(std::size_t n) : size_(n)
    {
        if (n > 0) check(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)), "cudaMalloc");
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0))
    {
    }
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept
    {
        if (this != &other) {
            reset();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { reset(); }

    [[nodiscard]] T* data() noexcept { return data_; }
    [[nodiscard]] const T* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return size_ * sizeof(T); }

    /// Frees the allocation (cudaFree synchronises the device: not for the hot path).
    void reset() noexcept
    {
        if (data_ != nullptr) (void)cudaFree(data_);
        data_ = nullptr;
        size_ = 0;
    }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

/// Copies host data into a new device buffer (synchronous).
template <class T>
[[nodiscard]] DeviceBuffer<T> upload(std::span<const T> host)
{
    DeviceBuffer<T> d(host.size());
    if (!host.empty()) check(cudaMemcpy(d.data(), host.data(), host.size_bytes(), cudaMemcpyHostToDevice), "upload");
    return d;
}
template <class T>
[[nodiscard]] DeviceBuffer<T> upload(const std::vector<T>& host)
{
    return upload(std::span<const T>(host));
}

/// Copies a device buffer back to the host after the work on `stream` completes.
template <class T>
[[nodiscard]] std::vector<T> download(const DeviceBuffer<T>& d, cudaStream_t stream = nullptr)
{
    std::vector<T> host(d.size());
    if (!host.empty()) {
        check(cudaMemcpyAsync(host.data(), d.data(), d.bytes(), cudaMemcpyDeviceToHost, stream), "download");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
    return host;
}

/// Fills a buffer with one byte value (tests poison outputs with 0xff: NaN in bf16 and fp32,
/// -1 in int32).
template <class T>
void fill_bytes(DeviceBuffer<T>& d, int byte, cudaStream_t stream = nullptr)
{
    if (d.size() > 0) check(cudaMemsetAsync(d.data(), byte, d.bytes(), stream), "cudaMemsetAsync");
}

namespace detail {
/// Integer ceiling division for grid sizes.
[[nodiscard]] constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }

/// Warp sum with a fixed butterfly order: the same inputs give the same bits on every run.
[[nodiscard]] __device__ inline float warp_sum(float v)
{
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
[[nodiscard]] __device__ inline float warp_max(float v)
{
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
}  // namespace detail

}  // namespace foe::cuda
