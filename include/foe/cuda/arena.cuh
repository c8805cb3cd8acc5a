#pragma once
// A planned device allocation: the sizes of every buffer of a layer or model are added up first
// (ArenaPlan), one cudaMalloc holds them all (DeviceArena), and the buffers are carved from it in
// the same order. Nothing is allocated after construction, which is what lets a forward run
// inside a captured CUDA graph, and the total is known (and reported) before anything runs.

#include <cstddef>
#include <cstdint>
#include <utility>

#include "foe/core/error.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda {

/// Every carved buffer starts on a 256-byte boundary (what cuBLASLt, CUB and 16-byte vector
/// loads want).
inline constexpr std::size_t arena_alignment = 256;

[[nodiscard]] constexpr std::size_t align_up(std::size_t bytes) noexcept
{
    return (bytes + arena_alignment - 1) / arena_alignment * arena_alignment;
}

/// Adds up aligned buffer sizes.
class ArenaPlan {
public:
    template <class T>
    void add(std::size_t count) noexcept
    {
        bytes_ += align_up(count * sizeof(T));
    }
    void add_bytes(std::size_t bytes) noexcept { bytes_ += align_up(bytes); }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

private:
    std::size_t bytes_ = 0;
};

/// One device allocation carved into buffers in plan order. take<T>(n) throws if the plan was
/// smaller than what is taken (a bug in the plan, reported rather than overrun).
class DeviceArena {
public:
    DeviceArena() = default;
    explicit DeviceArena(std::size_t bytes) : storage_(bytes) {}

    template <class T>
    [[nodiscard]] T* take(std::size_t count)
    {
        return static_cast<T*>(take_bytes(count * sizeof(T)));
    }
    [[nodiscard]] void* take_bytes(std::size_t bytes)
    {
        const std::size_t size = align_up(bytes);
        require(used_ + size <= storage_.size(), "device arena: taking ", size, " bytes at offset ", used_,
                " overruns its planned ", storage_.size(), " bytes");
        void* p = storage_.data() + used_;
        used_ += size;
        return p;
    }
    [[nodiscard]] std::size_t bytes() const noexcept { return storage_.size(); }
    [[nodiscard]] std::size_t used() const noexcept { return used_; }

private:
    DeviceBuffer<unsigned char> storage_;
    std::size_t used_ = 0;
};

/// Page-locked host memory (cudaMallocHost): the staging area of stream-ordered copies whose
/// source the host rewrites between forwards.
template <class T>
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(std::size_t n) : size_(n)
    {
        if (n > 0) check(cudaMallocHost(reinterpret_cast<void**>(&data_), n * sizeof(T)), "cudaMallocHost");
    }
    PinnedBuffer(PinnedBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    PinnedBuffer& operator=(PinnedBuffer&& o) noexcept
    {
        if (this != &o) {
            if (data_ != nullptr) (void)cudaFreeHost(data_);
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    ~PinnedBuffer()
    {
        if (data_ != nullptr) (void)cudaFreeHost(data_);
    }
    [[nodiscard]] T* data() noexcept { return data_; }
    [[nodiscard]] const T* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    T& operator[](std::size_t i) noexcept { return data_[i]; }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace foe::cuda
