#pragma once
// NcclComm: the Comm concept over NCCL, the production backend on GPUs (one communicator per rank,
// buffers are spans of device memory, collectives are enqueued on a CUDA stream).
//
// Getting one (every rank of the job calls the same function; `device` is this rank's GPU):
//   under MPI    auto comm = foe::comm::nccl_comm_over_mpi(MPI_COMM_WORLD, local_rank);
//                (foe/comm/nccl_mpi.cuh; rank 0 makes NCCL's unique id and broadcasts it)
//   from a file  auto comm = NcclComm::from_file("/shared/job-42.ncclid", rank, size, device);
//                (rank 0 writes the id, the others wait for the file; use a fresh path per job)
//   one GPU      auto comm = NcclComm::with_self(0);
// Then, for example, comm.all_reduce_sum(std::span<float>(d_ptr, n), stream); comm.synchronize(stream);
//
// Nothing waits forever. The communicator is non-blocking (NCCL's config.blocking = 0), so it can
// be aborted at any point. A watchdog thread of the NcclComm watches every enqueued collective; one
// that has not completed NcclOptions::timeout (default 5 min) after it was enqueued, or an
// asynchronous NCCL error (a peer died, a network failure), makes it abort the communicator. The
// next call (a collective, synchronize(), wait()) then throws foe::CommError naming the collective,
// how long it waited and the timeout; aborted() turns true. synchronize(stream) and wait() wait
// at most the same timeout. A failed communicator stays failed: make a new one (on every rank).
// Every NCCL failure is a CommError naming the call, NCCL's error string, ncclGetLastError's text
// and the rank, and fails the communicator the same way; a bad argument (count, span size) is a
// foe::InvalidArgument naming the value, thrown before anything is enqueued.
//
// Host code, but it needs <cuda_runtime.h> and <nccl.h>: link foe::nccl (CMake) and compile
// with nvcc or a host compiler that sees the CUDA include directory.

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "foe/comm/comm.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/cuda/error.cuh"

namespace foe::comm {

/// Time limits and the watchdog's polling period of an NcclComm (and of the communicators split
/// from it).
struct NcclOptions {
    /// How long a collective may take from being enqueued to completing (time spent queued behind
    /// earlier work on its stream included), and how long synchronize() and wait() wait, before the
    /// communicator is aborted and CommError thrown. Also bounds the destructor's finalisation.
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    /// How long creating a communicator waits for the other ranks: the id file of from_file(),
    /// ncclCommInitRankConfig and ncclCommSplit.
    std::chrono::milliseconds bootstrap_timeout{std::chrono::minutes(5)};
    /// How often the watchdog checks the collectives in flight (it sleeps while there are none).
    std::chrono::microseconds poll_interval{1000};
};

namespace detail {
class NcclState;
}

/// One rank's NCCL communicator. Move-only; the destructor finalises and destroys the NCCL
/// communicator (bounded by options.timeout), or aborts it when it has failed or when the
/// destructor runs during stack unwinding. Destroy communicators in the same order on every rank
/// (finalising may wait for the peers' side of the communicator), as objects of automatic storage
/// are by themselves.
///
/// One thread at a time calls a given NcclComm (as with NCCL itself); its watchdog thread is
/// internal. Collectives are stream-ordered: they return once NCCL has enqueued the work on
/// `stream`, which must belong to device(); buffers must stay valid until the stream reaches it.
class NcclComm {
public:
    using stream_type = cudaStream_t;

    /// An empty communicator of no ranks (rank() -1, size() 0); also what a moved-from NcclComm
    /// and split() with a negative color are. Every collective on it throws CommError.
    NcclComm() noexcept = default;

    /// Collective over `size` processes (or threads): joins the NCCL communicator identified by
    /// `id` (made by make_unique_id() on one rank and handed to all) as `rank`, on CUDA device
    /// `device`. Waits at most options.bootstrap_timeout for the others.
    [[nodiscard]] static NcclComm from_unique_id(const ncclUniqueId& id, int rank, int size, int device,
                                                 NcclOptions options = {});
    /// As from_unique_id, with the id passed through a file that every rank can see: rank 0
    /// writes it atomically (temporary file, then rename), the others wait for it at most
    /// options.bootstrap_timeout, before touching CUDA or NCCL. Rank 0 removes the file once the
    /// communicator is up (every rank has joined, so every rank has read it). A file left by an
    /// earlier job under the same path would be read as this job's: use a fresh path per job.
    [[nodiscard]] static NcclComm from_file(const std::filesystem::path& path, int rank, int size, int device,
                                            NcclOptions options = {});
    /// The one-rank communicator on `device`.
    [[nodiscard]] static NcclComm with_self(int device, NcclOptions options = {});
    /// A new NCCL unique id (ncclGetUniqueId), for from_unique_id.
    [[nodiscard]] static ncclUniqueId make_unique_id();

    NcclComm(NcclComm&& other) noexcept;
    NcclComm& operator=(NcclComm&& other) noexcept;
    NcclComm(const NcclComm&) = delete;
    NcclComm& operator=(const NcclComm&) = delete;
    ~NcclComm();

    [[nodiscard]] int rank() const noexcept;
    [[nodiscard]] int size() const noexcept;
    [[nodiscard]] int device() const noexcept;
    /// True for an empty communicator (see the default constructor).
    [[nodiscard]] bool empty() const noexcept { return state_ == nullptr; }

    /// In place: buf = sum over ranks of buf (NCCL's ncclSum; bf16 sums round to bf16 at each
    /// step of NCCL's algorithm).
    void all_reduce_sum(std::span<float> buf, cudaStream_t stream);
    void all_reduce_sum(std::span<bfloat16> buf, cudaStream_t stream);

    /// Rank r sends send_counts[j] elements of `in` (packed in rank order) to rank j and receives
    /// recv_counts[j] elements from rank j into `out` (packed in rank order): one group of
    /// ncclSend/ncclRecv, zero counts skipped. `in` and `out` must not overlap. Throws
    /// InvalidArgument (nothing enqueued) unless both count spans hold size() non-negative counts
    /// whose sums fit the buffers and this rank's counts to itself agree.
    void all_to_all_v(std::span<const float> in, std::span<const index_t> send_counts, std::span<float> out,
                      std::span<const index_t> recv_counts, cudaStream_t stream);
    void all_to_all_v(std::span<const bfloat16> in, std::span<const index_t> send_counts, std::span<bfloat16> out,
                      std::span<const index_t> recv_counts, cudaStream_t stream);

    /// out = concatenation over ranks of every rank's in; out.size() must be in.size() * size().
    void all_gather(std::span<const float> in, std::span<float> out, cudaStream_t stream);
    void all_gather(std::span<const bfloat16> in, std::span<bfloat16> out, cudaStream_t stream);

    /// Collective (ncclCommSplit): the ranks that pass the same non-negative color form a new
    /// communicator, ordered by key (ties by rank here). A negative color takes this rank out:
    /// it still has to call split, and gets an empty NcclComm (NCCL_SPLIT_NOCOLOR). The new
    /// communicator has this one's device and options. Waits at most options.bootstrap_timeout.
    [[nodiscard]] NcclComm split(int color, int key) const;

    /// Waits until the work enqueued on `stream` so far has completed, polling (cudaStreamQuery)
    /// for at most options.timeout; past it the communicator is aborted and CommError thrown.
    /// Throws CommError as soon as the watchdog has aborted the communicator, and after a
    /// successful wait too if it did meanwhile (the results are then not to be trusted).
    void synchronize(cudaStream_t stream);
    /// Waits until every collective enqueued on this communicator so far has completed (on
    /// whatever stream); throws the watchdog's CommError if one timed out or NCCL failed.
    void wait();
    /// True once the communicator has failed: it is aborted (or being aborted by the watchdog)
    /// and every later call throws CommError.
    [[nodiscard]] bool aborted() const noexcept;
    /// Aborts the communicator on this rank (e.g. because a peer reported a failure by other
    /// means); later calls throw CommError quoting `reason`. The peers are not told: their
    /// collectives with this rank time out.
    void abort(std::string_view reason);

private:
    explicit NcclComm(std::unique_ptr<detail::NcclState> state) noexcept;
    [[nodiscard]] detail::NcclState& state(const char* op) const;

    std::unique_ptr<detail::NcclState> state_;
};

// ------------------------------------------------------------------------------------------------
// Implementation.

namespace detail {

using nccl_clock = std::chrono::steady_clock;

[[nodiscard]] inline long long nccl_ms(nccl_clock::duration d) noexcept
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

/// Throws foe::CudaError for a failed CUDA runtime call (clearing a non-sticky error first, as
/// foe::cuda::check does; this header does not include check.cuh, which needs nvcc).
inline void nccl_cuda_check(cudaError_t status, const char* call)
{
    if (status == cudaSuccess) return;
    (void)cudaGetLastError();
    throw CudaError(::foe::detail::concat(call, " failed: ", cudaGetErrorName(status), " (",
                                          cudaGetErrorString(status), ")"));
}

/// Makes `device` current for the scope, then restores the previous device.
class CudaDeviceGuard {
public:
    explicit CudaDeviceGuard(int device)
    {
        nccl_cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) {
            nccl_cuda_check(cudaSetDevice(device), "cudaSetDevice");
            restore_ = true;
        }
    }
    CudaDeviceGuard(const CudaDeviceGuard&) = delete;
    CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;
    ~CudaDeviceGuard()
    {
        if (restore_) (void)cudaSetDevice(previous_);
    }

private:
    int previous_ = 0;
    bool restore_ = false;
};

/// Between two polls: yield for the first millisecond (a non-blocking launch completes in
/// microseconds), then sleep, so that a long wait does not take a core from the ranks it waits for.
inline void nccl_relax(nccl_clock::duration waited, std::chrono::microseconds poll)
{
    if (waited < std::chrono::milliseconds(1)) std::this_thread::yield();
    else std::this_thread::sleep_for(poll);
}

/// "rank 2 of 8 (device 2)"
[[nodiscard]] inline std::string nccl_where(int rank, int size, int device)
{
    return ::foe::detail::concat("rank ", rank, " of ", size, " (device ", device, ")");
}

/// "ncclAllReduce failed on rank 0 of 2 (device 0): unhandled system error: <last error text>"
[[nodiscard]] inline std::string nccl_failure(const char* call, ncclResult_t result, ncclComm_t comm,
                                              std::string_view where)
{
    const char* last = ncclGetLastError(comm);
    return ::foe::detail::concat(call, " failed on ", where, ": ", ncclGetErrorString(result),
                                 (last != nullptr && *last != '\0') ? " (" : "",
                                 last != nullptr ? last : "", (last != nullptr && *last != '\0') ? ")" : "");
}

/// The configuration of every NcclComm: non-blocking, so that ncclCommAbort can end any call.
[[nodiscard]] inline ncclConfig_t nonblocking_config() noexcept
{
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    return config;
}

/// Polls a non-blocking communicator until it leaves ncclInProgress: returns its state
/// (ncclSuccess or an error), the error of the query itself, or ncclInProgress after `timeout`.
[[nodiscard]] inline ncclResult_t nccl_wait_ready(ncclComm_t comm, std::chrono::milliseconds timeout,
                                                  std::chrono::microseconds poll)
{
    const auto start = nccl_clock::now();
    for (;;) {
        ncclResult_t state = ncclInProgress;
        if (const ncclResult_t r = ncclCommGetAsyncError(comm, &state); r != ncclSuccess) return r;
        if (state != ncclInProgress) return state;
        const auto waited = nccl_clock::now() - start;
        if (waited >= timeout) return ncclInProgress;
        nccl_relax(waited, poll);
    }
}

/// An NCCL communicator handle that is aborted unless released (creation's error paths).
class OwnedNcclComm {
public:
    OwnedNcclComm() = default;
    OwnedNcclComm(const OwnedNcclComm&) = delete;
    OwnedNcclComm& operator=(const OwnedNcclComm&) = delete;
    ~OwnedNcclComm()
    {
        if (handle != nullptr) (void)ncclCommAbort(handle);
    }
    [[nodiscard]] ncclComm_t release() noexcept { return std::exchange(handle, nullptr); }
    ncclComm_t handle = nullptr;
};

template <class T>
struct NcclType;
template <>
struct NcclType<float> {
    static constexpr ncclDataType_t value = ncclFloat32;
    static constexpr const char* name = "fp32";
};
template <>
struct NcclType<bfloat16> {
    static_assert(sizeof(bfloat16) == 2, "foe::bfloat16 must be two bytes to be NCCL's ncclBfloat16");
    static constexpr ncclDataType_t value = ncclBfloat16;
    static constexpr const char* name = "bf16";
};

inline void validate_nccl_setup(const char* who, int rank, int size, const NcclOptions& options)
{
    require(size >= 1, who, ": size (", size, ") must be at least 1");
    require(rank >= 0 && rank < size, who, ": rank (", rank, ") must be in [0, ", size, ")");
    require(options.timeout.count() > 0, who, ": NcclOptions::timeout (", options.timeout.count(),
            " ms) must be positive");
    require(options.bootstrap_timeout.count() > 0, who, ": NcclOptions::bootstrap_timeout (",
            options.bootstrap_timeout.count(), " ms) must be positive");
    require(options.poll_interval.count() > 0, who, ": NcclOptions::poll_interval (", options.poll_interval.count(),
            " us) must be positive");
}

/// Everything an NcclComm shares with its watchdog thread; it stays put when the NcclComm moves.
///
/// Two mutexes, always taken in this order when both are held:
///   nccl_mutex_  around every NCCL call on comm_. ncclCommAbort frees the communicator, so no
///                other NCCL call on it may run concurrently or after: the watchdog aborts under
///                this mutex and sets comm_ to null. The comm is non-blocking, so every call made
///                under it returns promptly (waits for ncclInProgress release it between polls),
///                and the watchdog never waits long to abort.
///   state_mutex_ around the failure record and the watched collectives; never held across an
///                NCCL call, so a caller can see a failure while an abort is still under way.
class NcclState {
public:
    NcclState(OwnedNcclComm& owned, int rank_, int size_, int device_, const NcclOptions& options_)
        : rank(rank_), size(size_), device(device_), options(options_), where(nccl_where(rank_, size_, device_))
    {
        comm_ = owned.release();
        try {
            watchdog_ = std::thread([this] { watch_loop(); });
        } catch (...) {
            (void)ncclCommAbort(comm_);
            throw;
        }
    }
    NcclState(const NcclState&) = delete;
    NcclState& operator=(const NcclState&) = delete;

    ~NcclState()
    {
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            stop_ = true;
        }
        work_cv_.notify_all();
        done_cv_.notify_all();
        if (watchdog_.joinable()) watchdog_.join();
        // One thread from here on. A failed communicator is aborted (the watchdog may have done
        // it); a healthy one is finalised (flushing what is in flight), unless the destructor
        // runs during unwinding: this rank then leaves its peers anyway, and finalising would
        // wait for them.
        if (comm_ != nullptr) {
            std::optional<CudaDeviceGuard> guard;
            try {
                guard.emplace(device);
            } catch (...) {  // NCCL sets the communicator's device itself; the guard is a courtesy
            }
            bool clean = !failed_.load() && std::uncaught_exceptions() == 0;
            if (clean) {
                const ncclResult_t r = ncclCommFinalize(comm_);
                clean = (r == ncclSuccess || r == ncclInProgress) &&
                        nccl_wait_ready(comm_, options.timeout, options.poll_interval) == ncclSuccess;
            }
            (void)(clean ? ncclCommDestroy(comm_) : ncclCommAbort(comm_));
            comm_ = nullptr;
        }
        // A split that this side gave up on (timeout) may have completed since; its job is
        // joined by now (destroying or aborting the parent waits for it).
        if (split_slot_ != nullptr) (void)ncclCommAbort(split_slot_);
        for (cudaEvent_t event : all_events_) (void)cudaEventDestroy(event);
    }

    const int rank, size, device;
    const NcclOptions options;
    const std::string where;  ///< "rank r of n (device d)"

    [[nodiscard]] bool failed() const noexcept { return failed_.load(std::memory_order_acquire); }

    /// Throws the recorded failure, if any: the first check of every call.
    void throw_if_failed(const char* op) const
    {
        if (failed()) throw_failure(op);
    }

    /// Records `message` as the failure (the first one wins), wakes the watchdog to abort, and
    /// throws it as CommError.
    [[noreturn]] void fail(std::string message)
    {
        record_failure(message);
        throw CommError(std::move(message));
    }

    void record_failure(const std::string& message)
    {
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            record_failure_locked(message);
        }
        work_cv_.notify_all();
        done_cv_.notify_all();
    }

    /// Runs `issue(comm, lock)` under the NCCL mutex, then watches the collective on `stream`.
    template <class Issue>
    void enqueue(const char* op, std::size_t count, const char* dtype, cudaStream_t stream, Issue&& issue)
    {
        throw_if_failed(op);
        CudaDeviceGuard guard(device);
        {
            std::unique_lock<std::mutex> lock(nccl_mutex_);
            issue(live_comm(op), lock);
        }
        watch(op, count, dtype, stream);
    }

    /// Checks the result of an NCCL call made under `lock`: ncclInProgress is waited out (the
    /// non-blocking launch must finish before the stream holds the work), an error thrown.
    void check(ncclResult_t r, const char* call, const char* op, std::unique_lock<std::mutex>& lock)
    {
        if (r == ncclSuccess) return;
        if (r == ncclInProgress) {
            await(call, op, lock);
            return;
        }
        nccl_error(call, r, op);
    }

    /// Fails the communicator for a failed NCCL call (under the NCCL mutex) and throws. Every
    /// error is fatal: even ncclInvalidArgument, after which a blocking communicator would stay
    /// usable, becomes a non-blocking communicator's state, refusing every later call. (Bad
    /// arguments foe can see are InvalidArgument before NCCL is called.)
    [[noreturn]] void nccl_error(const char* call, ncclResult_t r, const char* op)
    {
        fail(::foe::detail::concat("NcclComm::", op, ": ", nccl_failure(call, r, comm_, where),
                                   "; the communicator is aborted"));
    }

    template <class T>
    void all_reduce_sum(std::span<T> buf, cudaStream_t stream)
    {
        const char* op = "all_reduce_sum";
        throw_if_failed(op);
        if (buf.empty()) return;
        enqueue(op, buf.size(), NcclType<T>::name, stream, [&](ncclComm_t comm, std::unique_lock<std::mutex>& lock) {
            check(ncclAllReduce(buf.data(), buf.data(), buf.size(), NcclType<T>::value, ncclSum, comm, stream),
                  "ncclAllReduce", op, lock);
        });
    }

    template <class T>
    void all_gather(std::span<const T> in, std::span<T> out, cudaStream_t stream)
    {
        const char* op = "all_gather";
        require(out.size() == in.size() * static_cast<std::size_t>(size), "NcclComm::all_gather output holds ",
                out.size(), " elements, expected ", in.size(), " x ", size, " ranks = ",
                in.size() * static_cast<std::size_t>(size));
        throw_if_failed(op);
        if (in.empty()) return;
        enqueue(op, out.size(), NcclType<T>::name, stream, [&](ncclComm_t comm, std::unique_lock<std::mutex>& lock) {
            check(ncclAllGather(in.data(), out.data(), in.size(), NcclType<T>::value, comm, stream), "ncclAllGather",
                  op, lock);
        });
    }

    template <class T>
    void all_to_all_v(std::span<const T> in, std::span<const index_t> send_counts, std::span<T> out,
                      std::span<const index_t> recv_counts, cudaStream_t stream)
    {
        const char* op = "all_to_all_v";
        const auto p = static_cast<std::size_t>(size);
        require(send_counts.size() == p && recv_counts.size() == p,
                "NcclComm::all_to_all_v needs one send and one receive count per rank (", size, "), got ",
                send_counts.size(), " send and ", recv_counts.size(), " receive counts");
        const auto in_size = static_cast<index_t>(in.size());
        const auto out_size = static_cast<index_t>(out.size());
        index_t sent = 0, received = 0;
        for (std::size_t j = 0; j < p; ++j) {
            // Each count is checked against its buffer before it is added: the sums cannot overflow.
            require(send_counts[j] >= 0 && send_counts[j] <= in_size, "NcclComm::all_to_all_v send_counts[", j,
                    "] (", send_counts[j], ") must be in [0, ", in_size, "], the send buffer's size");
            require(recv_counts[j] >= 0 && recv_counts[j] <= out_size, "NcclComm::all_to_all_v recv_counts[", j,
                    "] (", recv_counts[j], ") must be in [0, ", out_size, "], the receive buffer's size");
            sent += send_counts[j];
            received += recv_counts[j];
        }
        require(sent <= in_size, "NcclComm::all_to_all_v send counts sum to ", sent,
                " elements, more than the send buffer holds (", in_size, ")");
        require(received <= out_size, "NcclComm::all_to_all_v receive counts sum to ", received,
                " elements, more than the receive buffer holds (", out_size, ")");
        const auto self = static_cast<std::size_t>(rank);
        require(send_counts[self] == recv_counts[self], "NcclComm::all_to_all_v: rank ", rank, " sends ",
                send_counts[self], " elements to itself but expects to receive ", recv_counts[self]);
        throw_if_failed(op);
        if (sent == 0 && received == 0) return;
        enqueue(op, static_cast<std::size_t>(sent), NcclType<T>::name, stream,
                [&](ncclComm_t comm, std::unique_lock<std::mutex>& lock) {
                    check(ncclGroupStart(), "ncclGroupStart", op, lock);
                    ncclResult_t r = ncclSuccess;
                    const char* failed_call = nullptr;
                    index_t s_off = 0, r_off = 0;
                    for (std::size_t j = 0; j < p && failed_call == nullptr; ++j) {
                        const int peer = static_cast<int>(j);
                        if (send_counts[j] > 0) {
                            r = ncclSend(in.data() + s_off, static_cast<std::size_t>(send_counts[j]),
                                         NcclType<T>::value, peer, comm, stream);
                            if (r != ncclSuccess && r != ncclInProgress) failed_call = "ncclSend";
                        }
                        if (failed_call == nullptr && recv_counts[j] > 0) {
                            r = ncclRecv(out.data() + r_off, static_cast<std::size_t>(recv_counts[j]),
                                         NcclType<T>::value, peer, comm, stream);
                            if (r != ncclSuccess && r != ncclInProgress) failed_call = "ncclRecv";
                        }
                        s_off += send_counts[j];
                        r_off += recv_counts[j];
                    }
                    // The group is closed in any case (it is per-thread state of NCCL); after a
                    // failed call inside it, what the group did is unknown, so that is fatal.
                    const ncclResult_t end = ncclGroupEnd();
                    if (failed_call != nullptr) nccl_error(failed_call, r, op);
                    check(end, "ncclGroupEnd", op, lock);
                });
    }

    [[nodiscard]] std::unique_ptr<NcclState> split(int color, int key)
    {
        const char* op = "split";
        throw_if_failed(op);
        CudaDeviceGuard guard(device);
        ncclConfig_t config = nonblocking_config();
        std::unique_lock<std::mutex> lock(nccl_mutex_);
        ncclComm_t parent = live_comm(op);
        const int nccl_color = color < 0 ? NCCL_SPLIT_NOCOLOR : color;
        // Non-blocking, the split runs as a job of the parent, which stays ncclInProgress until
        // it is done; the job stores the new handle through the pointer it was given only then,
        // so that pointer is split_slot_, which outlives the job even if this call gives up.
        split_slot_ = nullptr;
        const ncclResult_t r = ncclCommSplit(parent, nccl_color, key, &split_slot_, &config);
        if (r != ncclSuccess && r != ncclInProgress) nccl_error("ncclCommSplit", r, op);
        // A split that fails or times out leaves the ranks disagreeing on the parent's sequence
        // of calls, so the parent fails too.
        const auto start = nccl_clock::now();
        for (;;) {
            ncclResult_t state = ncclInProgress;
            if (const ncclResult_t q = ncclCommGetAsyncError(parent, &state); q != ncclSuccess)
                nccl_error("ncclCommGetAsyncError", q, op);
            if (state == ncclSuccess) break;
            if (state != ncclInProgress) nccl_error("ncclCommSplit", state, op);
            const auto waited = nccl_clock::now() - start;
            if (waited >= options.bootstrap_timeout)
                fail(::foe::detail::concat("NcclComm::split(color ", color, ", key ", key, ") on ", where,
                                           " did not complete within NcclOptions::bootstrap_timeout: waited ",
                                           nccl_ms(waited), " ms (timeout ", options.bootstrap_timeout.count(),
                                           " ms); some rank did not call split; the communicator is aborted"));
            lock.unlock();
            nccl_relax(waited, options.poll_interval);
            lock.lock();
            parent = live_comm(op);
        }
        OwnedNcclComm child;
        child.handle = std::exchange(split_slot_, nullptr);
        lock.unlock();
        if (child.handle == nullptr) return nullptr;  // NCCL_SPLIT_NOCOLOR: in no new communicator
        const ncclResult_t child_state = nccl_wait_ready(child.handle, options.bootstrap_timeout, options.poll_interval);
        if (child_state != ncclSuccess)
            fail(::foe::detail::concat(
                "NcclComm::split: ",
                child_state == ncclInProgress
                    ? std::string("the new communicator did not become ready within NcclOptions::bootstrap_timeout")
                    : nccl_failure("ncclCommSplit (new communicator)", child_state, child.handle, where),
                "; the communicator is aborted"));
        int child_rank = -1, child_size = 0;
        if (const ncclResult_t q = ncclCommUserRank(child.handle, &child_rank); q != ncclSuccess)
            raise<CommError>("NcclComm::split: ", nccl_failure("ncclCommUserRank", q, child.handle, where));
        if (const ncclResult_t q = ncclCommCount(child.handle, &child_size); q != ncclSuccess)
            raise<CommError>("NcclComm::split: ", nccl_failure("ncclCommCount", q, child.handle, where));
        return std::make_unique<NcclState>(child, child_rank, child_size, device, options);
    }

    void synchronize(cudaStream_t stream)
    {
        const char* op = "synchronize";
        throw_if_failed(op);
        const auto start = nccl_clock::now();
        for (;;) {
            const cudaError_t status = cudaStreamQuery(stream);
            if (status == cudaSuccess) break;
            if (status != cudaErrorNotReady) nccl_cuda_check(status, "cudaStreamQuery (NcclComm::synchronize)");
            throw_if_failed(op);
            const auto waited = nccl_clock::now() - start;
            if (waited >= options.timeout)
                fail(::foe::detail::concat("NcclComm::synchronize on ", where, " waited ", nccl_ms(waited),
                                           " ms for its stream, longer than NcclOptions::timeout (",
                                           options.timeout.count(),
                                           " ms): a collective or earlier work on the stream did not complete; "
                                           "the communicator is aborted"));
            nccl_relax(waited, options.poll_interval);
        }
        throw_if_failed(op);
    }

    void wait_all()
    {
        const char* op = "wait";
        std::unique_lock<std::mutex> lock(state_mutex_);
        // The watchdog times out each collective; the extra second only guards against a
        // watchdog that cannot make progress.
        const auto limit = options.timeout + std::chrono::seconds(1);
        const bool settled = done_cv_.wait_for(lock, limit, [&] { return failed() || pending_.empty(); });
        if (!settled) {
            record_failure_locked(::foe::detail::concat(
                "NcclComm::wait on ", where, " waited ", limit.count(), " ms for ", pending_.size(),
                " collective(s) without the watchdog settling them; the communicator is aborted"));
            work_cv_.notify_all();
        }
        if (failed()) throw CommError(::foe::detail::concat("NcclComm::", op, " on ", where, ": ", failure_));
    }

private:
    /// A collective being watched: the event recorded after it on its stream.
    struct Pending {
        cudaEvent_t event = nullptr;
        const char* op = "";
        std::size_t count = 0;
        const char* dtype = "";
        nccl_clock::time_point enqueued;
    };

    [[noreturn]] void throw_failure(const char* op) const
    {
        std::lock_guard<std::mutex> lock(state_mutex_);
        throw CommError(::foe::detail::concat("NcclComm::", op, " on ", where,
                                              " refused, the communicator has failed: ", failure_));
    }

    /// The communicator, or the recorded failure thrown when the watchdog has aborted it. Under
    /// the NCCL mutex.
    [[nodiscard]] ncclComm_t live_comm(const char* op) const
    {
        if (comm_ == nullptr) throw_failure(op);
        return comm_;
    }

    void record_failure_locked(const std::string& message)
    {
        if (failed()) return;
        failure_ = message;
        failed_.store(true, std::memory_order_release);
        // The collectives in flight are abandoned with the communicator: stop watching them.
        for (const Pending& p : pending_) free_events_.push_back(p.event);  // capacity reserved
        pending_.clear();
    }

    /// Waits out ncclInProgress after a call made under `lock`, releasing it between polls so
    /// that the watchdog can abort meanwhile.
    void await(const char* call, const char* op, std::unique_lock<std::mutex>& lock)
    {
        const auto start = nccl_clock::now();
        for (;;) {
            ncclResult_t state = ncclInProgress;
            if (const ncclResult_t q = ncclCommGetAsyncError(comm_, &state); q != ncclSuccess)
                nccl_error("ncclCommGetAsyncError", q, op);
            if (state == ncclSuccess) return;
            if (state != ncclInProgress) nccl_error(call, state, op);
            const auto waited = nccl_clock::now() - start;
            if (waited >= options.timeout)
                fail(::foe::detail::concat("NcclComm::", op, " on ", where, ": ", call, " was still in progress after ",
                                           nccl_ms(waited), " ms (NcclOptions::timeout ", options.timeout.count(),
                                           " ms); the communicator is aborted"));
            lock.unlock();
            nccl_relax(waited, options.poll_interval);
            lock.lock();
            (void)live_comm(op);
        }
    }

    /// Records an event after the collective just enqueued on `stream` and hands it to the
    /// watchdog. Events come from a pool: after warm-up (as many collectives in flight as ever
    /// before) this allocates nothing. A stream being captured into a CUDA graph is not watched:
    /// the collective runs when the graph is launched, and synchronize() watches that.
    void watch(const char* op, std::size_t count, const char* dtype, cudaStream_t stream)
    {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
            (void)cudaGetLastError();
            return;
        }
        if (capture != cudaStreamCaptureStatusNone) return;
        cudaEvent_t event = take_event();
        if (const cudaError_t status = cudaEventRecord(event, stream); status != cudaSuccess) {
            {
                std::lock_guard<std::mutex> lock(state_mutex_);
                free_events_.push_back(event);
            }
            nccl_cuda_check(status, "cudaEventRecord (NcclComm watchdog)");
        }
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            if (failed()) {  // failed meanwhile: nothing is watched any more
                free_events_.push_back(event);
                return;
            }
            pending_.push_back(Pending{event, op, count, dtype, nccl_clock::now()});
        }
        work_cv_.notify_one();
    }

    [[nodiscard]] cudaEvent_t take_event()
    {
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            if (!free_events_.empty()) {
                cudaEvent_t event = free_events_.back();
                free_events_.pop_back();
                return event;
            }
        }
        cudaEvent_t event = nullptr;
        nccl_cuda_check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
        try {
            std::lock_guard<std::mutex> lock(state_mutex_);
            // Room for every event in either list, so that moving events between them (also in
            // record_failure_locked, which must not throw) never allocates.
            free_events_.reserve(all_events_.size() + 1);
            pending_.reserve(all_events_.size() + 1);
            all_events_.push_back(event);
        } catch (...) {
            (void)cudaEventDestroy(event);
            throw;
        }
        return event;
    }

    /// The watchdog thread: sleeps while nothing is in flight; otherwise polls the events and
    /// NCCL's asynchronous error every poll_interval, and aborts the communicator on a failure.
    void watch_loop() noexcept
    {
        (void)cudaSetDevice(device);  // events and the communicator live on this device
        std::unique_lock<std::mutex> lock(state_mutex_);
        for (;;) {
            work_cv_.wait(lock, [&] { return stop_ || !pending_.empty() || (failed() && !aborted_); });
            if (failed() && !aborted_) {
                lock.unlock();
                {
                    std::lock_guard<std::mutex> nccl_lock(nccl_mutex_);
                    if (comm_ != nullptr) (void)ncclCommAbort(comm_);
                    comm_ = nullptr;
                }
                lock.lock();
                aborted_ = true;
                done_cv_.notify_all();
                continue;
            }
            if (stop_) return;
            sweep(lock);
            if (pending_.empty() || failed()) {
                done_cv_.notify_all();
                continue;
            }
            work_cv_.wait_for(lock, options.poll_interval, [&] { return stop_ || failed(); });
        }
    }

    /// One round of the watchdog under the state mutex (released around the NCCL query).
    void sweep(std::unique_lock<std::mutex>& lock)
    {
        const auto now = nccl_clock::now();
        for (std::size_t i = 0; i < pending_.size();) {
            const Pending& p = pending_[i];
            const cudaError_t status = cudaEventQuery(p.event);
            if (status == cudaSuccess) {
                free_events_.push_back(p.event);
                pending_[i] = pending_.back();
                pending_.pop_back();
                continue;
            }
            if (status != cudaErrorNotReady) {
                (void)cudaGetLastError();
                record_failure_locked(::foe::detail::concat(
                    "NcclComm ", p.op, " (", p.count, " ", p.dtype, " elements) on ", where,
                    ": CUDA reported ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
                    ") while it was in flight; the communicator is aborted"));
                return;
            }
            if (const auto waited = now - p.enqueued; waited > options.timeout) {
                record_failure_locked(::foe::detail::concat(
                    "NcclComm ", p.op, " (", p.count, " ", p.dtype, " elements) on ", where,
                    " did not complete within NcclOptions::timeout: waited ", nccl_ms(waited), " ms (timeout ",
                    options.timeout.count(),
                    " ms); the communicator is aborted (did a peer fail, or not call the same collective?)"));
                return;
            }
            ++i;
        }
        if (pending_.empty()) return;
        lock.unlock();
        ncclResult_t async = ncclSuccess;
        std::string detail;
        {
            std::lock_guard<std::mutex> nccl_lock(nccl_mutex_);
            if (comm_ != nullptr) {
                ncclResult_t state = ncclSuccess;
                async = ncclCommGetAsyncError(comm_, &state);
                if (async == ncclSuccess && state != ncclInProgress) async = state;
                if (async != ncclSuccess) detail = nccl_failure("ncclCommGetAsyncError", async, comm_, where);
            }
        }
        lock.lock();
        if (async != ncclSuccess && !pending_.empty()) {
            const Pending& p = *std::min_element(pending_.begin(), pending_.end(),
                                                 [](const Pending& a, const Pending& b) { return a.enqueued < b.enqueued; });
            record_failure_locked(::foe::detail::concat("NcclComm ", p.op, " (", p.count, " ", p.dtype,
                                                        " elements) in flight: NCCL reported an asynchronous error: ",
                                                        detail, "; the communicator is aborted"));
        }
    }

    mutable std::mutex nccl_mutex_;
    ncclComm_t comm_ = nullptr;        ///< null once aborted (under nccl_mutex_)
    ncclComm_t split_slot_ = nullptr;  ///< where NCCL's split job stores the new handle

    mutable std::mutex state_mutex_;
    std::condition_variable work_cv_;  ///< wakes the watchdog
    std::condition_variable done_cv_;  ///< wakes wait()
    std::atomic<bool> failed_{false};  ///< set with failure_, read without the mutex
    std::string failure_;
    bool aborted_ = false;  ///< the watchdog has aborted comm_ after the failure
    bool stop_ = false;
    std::vector<Pending> pending_;
    std::vector<cudaEvent_t> free_events_;
    std::vector<cudaEvent_t> all_events_;
    std::thread watchdog_;  ///< last: started once everything above exists
};

/// Writes the id to `path` atomically: a temporary file next to it, then a rename.
inline void write_nccl_id_file(const std::filesystem::path& path, const ncclUniqueId& id)
{
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out.write(id.internal, NCCL_UNIQUE_ID_BYTES);
        out.close();
        if (!out) raise<IoError>("NcclComm::from_file: could not write the unique-id file ", tmp.string());
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
        std::error_code ignored;
        std::filesystem::remove(tmp, ignored);
        raise<IoError>("NcclComm::from_file: could not rename ", tmp.string(), " to ", path.string(), ": ",
                       ec.message());
    }
}

/// Waits (polling, no CUDA or NCCL call) until rank 0's id file appears, then reads it.
[[nodiscard]] inline ncclUniqueId read_nccl_id_file(const std::filesystem::path& path, int rank, int size,
                                                    std::chrono::milliseconds timeout)
{
    const auto start = nccl_clock::now();
    for (;;) {
        std::error_code ec;
        const std::uintmax_t bytes = std::filesystem::file_size(path, ec);
        if (!ec) {
            // Rank 0 renames a complete file into place: any other size is not its file.
            require<CommError>(bytes == static_cast<std::uintmax_t>(NCCL_UNIQUE_ID_BYTES), "NcclComm::from_file (rank ", rank, " of ", size,
                               "): the unique-id file ", path.string(), " holds ", bytes, " bytes, expected ",
                               NCCL_UNIQUE_ID_BYTES, " (not written by NcclComm::from_file?)");
            ncclUniqueId id{};
            std::ifstream in(path, std::ios::binary);
            in.read(id.internal, NCCL_UNIQUE_ID_BYTES);
            if (in && in.gcount() == NCCL_UNIQUE_ID_BYTES) return id;
            // Vanished between the two calls: keep polling until the timeout.
        }
        const auto waited = nccl_clock::now() - start;
        if (waited >= timeout)
            raise<CommError>("NcclComm::from_file (rank ", rank, " of ", size, "): the unique-id file ", path.string(),
                             " did not appear within NcclOptions::bootstrap_timeout (", timeout.count(),
                             " ms); rank 0 writes it: is it running, with the same path on a file system this "
                             "rank sees?");
        std::this_thread::sleep_for(std::min<nccl_clock::duration>(std::chrono::milliseconds(5), timeout - waited));
    }
}

}  // namespace detail

// --- NcclComm --------------------------------------------------------------------------------

inline NcclComm::NcclComm(std::unique_ptr<detail::NcclState> state) noexcept : state_(std::move(state)) {}
inline NcclComm::NcclComm(NcclComm&& other) noexcept = default;
inline NcclComm& NcclComm::operator=(NcclComm&& other) noexcept = default;
inline NcclComm::~NcclComm() = default;

inline int NcclComm::rank() const noexcept { return state_ ? state_->rank : -1; }
inline int NcclComm::size() const noexcept { return state_ ? state_->size : 0; }
inline int NcclComm::device() const noexcept { return state_ ? state_->device : -1; }

inline detail::NcclState& NcclComm::state(const char* op) const
{
    if (!state_)
        raise<CommError>("NcclComm::", op,
                         " on an empty communicator (default-constructed, moved from, or split() with a "
                         "negative color)");
    return *state_;
}

inline ncclUniqueId NcclComm::make_unique_id()
{
    ncclUniqueId id{};
    if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
        raise<CommError>("NcclComm: ", detail::nccl_failure("ncclGetUniqueId", r, nullptr, "this process"));
    return id;
}

inline NcclComm NcclComm::from_unique_id(const ncclUniqueId& id, int rank, int size, int device, NcclOptions options)
{
    detail::validate_nccl_setup("NcclComm::from_unique_id", rank, size, options);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) {
        (void)cudaGetLastError();
        devices = 0;
    }
    require(device >= 0 && device < devices, "NcclComm::from_unique_id: device (", device,
            ") is not a CUDA device of this machine (it has ", devices, ")");
    detail::CudaDeviceGuard guard(device);
    const std::string where = detail::nccl_where(rank, size, device);
    ncclConfig_t config = detail::nonblocking_config();
    detail::OwnedNcclComm comm;
    const ncclResult_t r = ncclCommInitRankConfig(&comm.handle, size, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress)
        raise<CommError>("NcclComm: ", detail::nccl_failure("ncclCommInitRankConfig", r, comm.handle, where));
    require<CommError>(comm.handle != nullptr, "NcclComm: ncclCommInitRankConfig on ", where,
                       " returned no communicator");
    // Non-blocking: initialisation goes on in the background until every rank has joined.
    const ncclResult_t state = detail::nccl_wait_ready(comm.handle, options.bootstrap_timeout, options.poll_interval);
    if (state == ncclInProgress)
        raise<CommError>("NcclComm: ncclCommInitRankConfig on ", where,
                         " did not complete within NcclOptions::bootstrap_timeout (", options.bootstrap_timeout.count(),
                         " ms): not every rank joined with the same unique id and size; aborted");
    if (state != ncclSuccess)
        raise<CommError>("NcclComm: ", detail::nccl_failure("ncclCommInitRankConfig", state, comm.handle, where));
    return NcclComm(std::make_unique<detail::NcclState>(comm, rank, size, device, options));
}

inline NcclComm NcclComm::from_file(const std::filesystem::path& path, int rank, int size, int device,
                                    NcclOptions options)
{
    detail::validate_nccl_setup("NcclComm::from_file", rank, size, options);
    ncclUniqueId id{};
    if (rank == 0) {
        id = make_unique_id();
        detail::write_nccl_id_file(path, id);
    } else {
        id = detail::read_nccl_id_file(path, rank, size, options.bootstrap_timeout);
    }
    NcclComm comm = from_unique_id(id, rank, size, device, options);
    if (rank == 0) {
        // Initialisation completes only once every rank has joined, so every rank has read it;
        // removing it keeps a later job on the same path from reading this job's id.
        std::error_code ignored;
        std::filesystem::remove(path, ignored);
    }
    return comm;
}

inline NcclComm NcclComm::with_self(int device, NcclOptions options)
{
    return from_unique_id(make_unique_id(), 0, 1, device, options);
}

inline void NcclComm::all_reduce_sum(std::span<float> buf, cudaStream_t stream)
{
    state("all_reduce_sum").all_reduce_sum(buf, stream);
}
inline void NcclComm::all_reduce_sum(std::span<bfloat16> buf, cudaStream_t stream)
{
    state("all_reduce_sum").all_reduce_sum(buf, stream);
}

inline void NcclComm::all_to_all_v(std::span<const float> in, std::span<const index_t> send_counts,
                                   std::span<float> out, std::span<const index_t> recv_counts, cudaStream_t stream)
{
    state("all_to_all_v").all_to_all_v(in, send_counts, out, recv_counts, stream);
}
inline void NcclComm::all_to_all_v(std::span<const bfloat16> in, std::span<const index_t> send_counts,
                                   std::span<bfloat16> out, std::span<const index_t> recv_counts, cudaStream_t stream)
{
    state("all_to_all_v").all_to_all_v(in, send_counts, out, recv_counts, stream);
}

inline void NcclComm::all_gather(std::span<const float> in, std::span<float> out, cudaStream_t stream)
{
    state("all_gather").all_gather(in, out, stream);
}
inline void NcclComm::all_gather(std::span<const bfloat16> in, std::span<bfloat16> out, cudaStream_t stream)
{
    state("all_gather").all_gather(in, out, stream);
}

inline NcclComm NcclComm::split(int color, int key) const { return NcclComm(state("split").split(color, key)); }

inline void NcclComm::synchronize(cudaStream_t stream) { state("synchronize").synchronize(stream); }

inline void NcclComm::wait() { state("wait").wait_all(); }

inline bool NcclComm::aborted() const noexcept { return state_ && state_->failed(); }

inline void NcclComm::abort(std::string_view reason)
{
    detail::NcclState& s = state("abort");
    s.record_failure(foe::detail::concat("NcclComm on ", s.where, " aborted by the caller: ", reason));
}

static_assert(Comm<NcclComm>);

}  // namespace foe::comm
