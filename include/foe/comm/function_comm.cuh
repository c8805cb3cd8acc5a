#pragma once
// FunctionComm: a device communicator made of the caller's functions, for an engine that brings
// its own collectives (or binds NcclComm's: comm.all_reduce_sum, comm.all_gather). CudaModel
// builds its layers' sync and head-parallel policies over one from CudaModelOptions' hooks.
// Only the collectives that were given can be called; the others throw InvalidArgument.

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <span>

#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/types.hpp"

namespace foe::comm {

class FunctionComm {
public:
    using stream_type = cudaStream_t;
    /// Sums n fp32 device values in place over the ranks, on the stream.
    using Reduce = std::function<void(float* values, std::size_t n, cudaStream_t stream)>;
    /// out [ranks * n] = every rank's n bf16 device values, in rank order, on the stream.
    using Gather = std::function<void(const bfloat16* in, std::size_t n, bfloat16* out, cudaStream_t stream)>;

    FunctionComm() = default;
    FunctionComm(int rank, int size, Reduce reduce, Gather gather = {})
        : rank_(rank), size_(size), reduce_(std::move(reduce)), gather_(std::move(gather))
    {
        require<InvalidArgument>(size >= 1 && 0 <= rank && rank < size, "FunctionComm: rank ", rank, " of ", size,
                                 " ranks");
    }

    [[nodiscard]] int rank() const noexcept { return rank_; }
    [[nodiscard]] int size() const noexcept { return size_; }

    void all_reduce_sum(std::span<float> buf, cudaStream_t stream)
    {
        require<InvalidArgument>(static_cast<bool>(reduce_), "FunctionComm: no all-reduce was given");
        if (buf.empty()) return;  // every rank has the same count: all skip together (as NcclComm does)
        reduce_(buf.data(), buf.size(), stream);
    }
    void all_gather(std::span<const bfloat16> in, std::span<bfloat16> out, cudaStream_t stream)
    {
        require<InvalidArgument>(static_cast<bool>(gather_), "FunctionComm: no all-gather was given");
        require(out.size() == in.size() * static_cast<std::size_t>(size_), "FunctionComm::all_gather output holds ",
                out.size(), " values, expected ", in.size(), " x ", size_, " ranks");
        if (in.empty()) return;
        gather_(in.data(), in.size(), out.data(), stream);
    }
    void all_gather(std::span<const float>, std::span<float>, cudaStream_t) { unsupported("an fp32 all-gather"); }
    void all_to_all_v(std::span<const float>, std::span<const index_t>, std::span<float>, std::span<const index_t>,
                      cudaStream_t)
    {
        unsupported("an all-to-all");
    }
    [[nodiscard]] FunctionComm split(int, int) const
    {
        unsupported("split");
        return {};
    }

private:
    [[noreturn]] static void unsupported(const char* what)
    {
        throw InvalidArgument(::foe::detail::concat("FunctionComm: ", what, " is not one of its functions"));
    }

    int rank_ = 0, size_ = 1;
    Reduce reduce_;
    Gather gather_;
};

}  // namespace foe::comm
