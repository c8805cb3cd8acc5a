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
// Failures. The communicator is non-blocking (NCCL's config.blocking = 0), so that ncclCommAbort
// can end any NCCL call. A watchdog thread of the NcclComm watches every enqueued collective (and
// whatever watch(stream, label) is handed); one that has not completed NcclOptions::timeout
// (default 5 min) after it was enqueued, or an asynchronous NCCL error (a peer died, a network
// failure; polled all the time, also while nothing is watched), fails the communicator, and the
// watchdog aborts it. The next call (a collective, synchronize(), wait()) then throws
// foe::CommError quoting the first failure (the collective, how long it waited, the timeout);
// aborted() turns true. A failed communicator stays failed: make a new one (on every rank).
// Every NCCL failure is a CommError naming the call, NCCL's error string, the last NCCL error text
// of this process and the rank, and fails the communicator the same way; a bad argument (count,
// span size) is a foe::InvalidArgument naming the value, thrown before anything is enqueued.
//
// What is bounded: every wait of the calling thread. A collective call waits out NCCL's
// non-blocking launch for at most options.timeout; synchronize() and wait() wait at most
// options.timeout; creating and splitting at most options.bootstrap_timeout; the destructor at
// most options.timeout (finalising) + options.teardown_timeout (destroying or aborting).
// What is not: NCCL's own ncclCommAbort, ncclCommFinalize and ncclCommDestroy block, even for a
// non-blocking communicator, until the device has drained NCCL's work, which may be never (a
// kernel ahead of it on the stream that does not end, a CUDA graph that still holds collectives of
// the communicator). NcclComm makes those calls only in threads of its own (the watchdog, or a
// helper thread when creation fails); one that outlasts the caller's bound is detached, owning
// everything it touches, and finishes (or stays blocked) on its own.
//
// CUDA graphs. A collective enqueued on a stream being captured runs when the graph is launched,
// out of the watchdog's sight: after each cudaGraphLaunch of a graph that holds collectives of
// this communicator, call watch(stream, label), so that the replay is covered by the timeout
// (asynchronous NCCL errors are polled regardless). Destroy such graphs (or the model that owns
// them) before the communicator: since NCCL 2.26 destroying a communicator waits for the graphs
// that captured its collectives, so the destructor would give up after its bound and leave the
// teardown blocked in a detached thread until the graphs are gone.
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
    /// How long a collective (or what watch() was handed) may take from being enqueued to
    /// completing (time spent queued behind earlier work on its stream included), and how long
    /// synchronize() and wait() wait, before the communicator fails and is aborted. Also how long
    /// the destructor lets finalisation (flushing what is in flight) take.
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    /// How long creating a communicator waits for the other ranks: the id file of from_file(),
    /// ncclCommInitRankConfig and ncclCommSplit.
    std::chrono::milliseconds bootstrap_timeout{std::chrono::minutes(5)};
    /// How often the watchdog checks the collectives in flight and polls NCCL's asynchronous
    /// error; while nothing is in flight, every 10 poll intervals (every one once collectives were
    /// captured into CUDA graphs, whose replays it cannot see).
    std::chrono::microseconds poll_interval{1000};
    /// How long the destructor waits, after finalising, for NCCL to destroy or abort the
    /// communicator (and a failed creation for the abort of the half-made one). NCCL's destroy and
    /// abort block until the device has drained NCCL's work; past this bound the caller goes on
    /// and a detached thread finishes the teardown. (Last, so that positional initialisations
    /// written before it existed keep their meaning.)
    std::chrono::milliseconds teardown_timeout{std::chrono::seconds(30)};
};

namespace detail {
class NcclState;
}

/// One rank's NCCL communicator. Move-only. The destructor finalises and destroys the NCCL
/// communicator, or aborts it when it has failed or finalising took longer than options.timeout;
/// it waits at most options.timeout + options.teardown_timeout (see the file comment for what
/// may go on afterwards). Destroy communicators in the same order on every rank (finalising waits
/// for the peers' side of the communicator), as objects of automatic storage are by themselves,
/// and after every CUDA graph that captured their collectives.
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
    /// communicator is up (every rank has joined, so every rank has read it) or its own joining
    /// has failed. A file left by an earlier job under the same path would be read as this job's:
    /// use a fresh path per job.
    [[nodiscard]] static NcclComm from_file(const std::filesystem::path& path, int rank, int size, int device,
                                            NcclOptions options = {});
    /// The one-rank communicator on `device`.
    [[nodiscard]] static NcclComm with_self(int device, NcclOptions options = {});
    /// A new NCCL unique id (ncclGetUniqueId), for from_unique_id.
    [[nodiscard]] static ncclUniqueId make_unique_id();

    NcclComm(NcclComm&& other) noexcept;
    /// Tears down the communicator held before (as the destructor does), then takes other's.
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
    /// communicator has this one's device and options. Waits at most options.bootstrap_timeout;
    /// a split that fails or times out fails this communicator too (the ranks no longer agree on
    /// its sequence of calls).
    [[nodiscard]] NcclComm split(int color, int key) const;

    /// Waits until the work enqueued on `stream` so far has completed, polling (cudaStreamQuery)
    /// for at most options.timeout; past it the communicator fails (aborted, CommError thrown).
    /// A CUDA error reported by the stream, or an asynchronous NCCL error seen once the stream has
    /// completed, fails it too. Throws CommError as soon as the watchdog has failed the
    /// communicator, and after a successful wait too if it did meanwhile (the results are then not
    /// to be trusted).
    void synchronize(cudaStream_t stream);
    /// Waits until every collective enqueued on this communicator so far, and whatever watch() was
    /// handed, has completed (on whatever stream); throws the watchdog's CommError if one timed out
    /// or NCCL failed. Collectives captured into CUDA graphs are not covered: call watch() after
    /// launching the graph.
    void wait();
    /// Watches the work enqueued on `stream` so far as if it were a collective: typically called
    /// right after a cudaGraphLaunch of a graph that holds collectives of this communicator. If it
    /// has not completed within options.timeout, the communicator fails (as for a collective: the
    /// watchdog aborts it, wait() and later calls throw CommError naming `label`); wait() waits
    /// for it. On a stream being captured it does nothing (watch the launch of the graph instead).
    /// A failure to record the CUDA event that it watches fails the communicator.
    void watch(cudaStream_t stream, std::string_view label);
    /// True once the communicator has failed: it is aborted (or being aborted by the watchdog)
    /// and every later call throws CommError.
    [[nodiscard]] bool aborted() const noexcept;
    /// Aborts the communicator on this rank (e.g. because a peer reported a failure by other
    /// means); later calls throw CommError quoting `reason`. The peers are not told: their
    /// collectives with this rank time out.
    void abort(std::string_view reason);

private:
    explicit NcclComm(std::shared_ptr<detail::NcclState> state) noexcept;
    [[nodiscard]] detail::NcclState& state(const char* op) const;
    /// Tears down the held communicator (the destructor's work); empty afterwards.
    void close() noexcept;

    /// Shared with the watchdog thread, which keeps it alive should the destructor stop waiting
    /// for the teardown; only this object calls it otherwise.
    std::shared_ptr<detail::NcclState> state_;
};

// ------------------------------------------------------------------------------------------------
// Implementation.

namespace detail {

using nccl_clock = std::chrono::steady_clock;

[[nodiscard]] inline long long nccl_ms(nccl_clock::duration d) noexcept
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

/// a + b, each capped at a year first: a bound for condition-variable waits that cannot overflow
/// whatever the options hold.
[[nodiscard]] inline std::chrono::milliseconds nccl_capped_sum(std::chrono::milliseconds a,
                                                               std::chrono::milliseconds b) noexcept
{
    constexpr std::chrono::milliseconds cap = std::chrono::hours(24 * 365);
    return std::min(a, cap) + std::min(b, cap);
}

/// The failure recorded when the watchdog itself failed (out of memory building a message, a
/// failed lock): fixed, so that recording it needs nothing that can fail.
inline constexpr std::string_view nccl_watchdog_failure =
    "the NcclComm watchdog failed (out of memory or a failed lock) and aborted the communicator";

/// Throws foe::CudaError for a failed CUDA runtime call (clearing a non-sticky error first, as
/// foe::cuda::check does; this header does not include check.cuh, which needs nvcc).
inline void nccl_cuda_check(cudaError_t status, const char* call)
{
    if (status == cudaSuccess) return;
    (void)cudaGetLastError();
    throw CudaError(::foe::detail::concat(call, " failed: ", cudaGetErrorName(status), " (",
                                          cudaGetErrorString(status), ")"));
}

/// True for the errors of a call that a stream capture got in the way of (the call did not fail
/// on its own account).
[[nodiscard]] constexpr bool nccl_capture_error(cudaError_t status) noexcept
{
    switch (status) {
    case cudaErrorStreamCaptureUnsupported:
    case cudaErrorStreamCaptureInvalidated:
    case cudaErrorStreamCaptureMerge:
    case cudaErrorStreamCaptureUnmatched:
    case cudaErrorStreamCaptureUnjoined:
    case cudaErrorStreamCaptureIsolation:
    case cudaErrorStreamCaptureImplicit:
    case cudaErrorCapturedEvent:
    case cudaErrorStreamCaptureWrongThread:
        return true;
    default:
        return false;
    }
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

/// "ncclAllReduce failed on rank 0 of 2 (device 0): unhandled system error (last NCCL error in
/// this process: <text>)". ncclGetLastError's text is process-wide (NCCL ignores its argument):
/// with several communicators it may be another one's.
[[nodiscard]] inline std::string nccl_failure(const char* call, ncclResult_t result, ncclComm_t comm,
                                              std::string_view where)
{
    const char* last = ncclGetLastError(comm);
    const bool has_last = last != nullptr && *last != '\0';
    return ::foe::detail::concat(call, " failed on ", where, ": ", ncclGetErrorString(result),
                                 has_last ? " (last NCCL error in this process: " : "", has_last ? last : "",
                                 has_last ? ")" : "");
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

/// Aborts `comm` in a thread of its own and waits for it at most `bound`; past it the thread is
/// detached and finishes on its own (ncclCommAbort blocks until the device has drained NCCL's
/// work). Only where no thread can be started does it abort in the calling thread.
inline void nccl_abort_bounded(ncclComm_t comm, std::chrono::milliseconds bound) noexcept
{
    if (comm == nullptr) return;
    struct Done {
        std::mutex mutex;
        std::condition_variable cv;
        bool done = false;
    };
    std::shared_ptr<Done> done;
    std::thread worker;
    try {
        done = std::make_shared<Done>();
        worker = std::thread([comm, done] {
            (void)ncclCommAbort(comm);
            try {
                std::lock_guard<std::mutex> lock(done->mutex);
                done->done = true;
            } catch (...) {  // the waiter then gives up at its bound
            }
            done->cv.notify_all();
        });
    } catch (...) {
        (void)ncclCommAbort(comm);
        return;
    }
    bool finished = false;
    try {
        std::unique_lock<std::mutex> lock(done->mutex);
        finished = done->cv.wait_for(lock, bound, [&] { return done->done; });
    } catch (...) {
    }
    try {
        if (finished) worker.join();
    } catch (...) {
    }
    if (worker.joinable()) worker.detach();
}

/// An NCCL communicator handle that is aborted (bounded, see nccl_abort_bounded) unless released:
/// creation's error paths.
class OwnedNcclComm {
public:
    explicit OwnedNcclComm(std::chrono::milliseconds abort_bound) noexcept : abort_bound_(abort_bound) {}
    OwnedNcclComm(const OwnedNcclComm&) = delete;
    OwnedNcclComm& operator=(const OwnedNcclComm&) = delete;
    ~OwnedNcclComm() { nccl_abort_bounded(handle, abort_bound_); }
    [[nodiscard]] ncclComm_t release() noexcept { return std::exchange(handle, nullptr); }
    [[nodiscard]] std::chrono::milliseconds abort_bound() const noexcept { return abort_bound_; }
    ncclComm_t handle = nullptr;

private:
    std::chrono::milliseconds abort_bound_;
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
    require(options.teardown_timeout.count() > 0, who, ": NcclOptions::teardown_timeout (",
            options.teardown_timeout.count(), " ms) must be positive");
    require(options.poll_interval.count() > 0, who, ": NcclOptions::poll_interval (", options.poll_interval.count(),
            " us) must be positive");
}

inline void validate_nccl_device(const char* who, int device)
{
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) {
        (void)cudaGetLastError();
        devices = 0;
    }
    require(device >= 0 && device < devices, who, ": device (", device,
            ") is not a CUDA device of this machine (it has ", devices, ")");
}

/// Everything an NcclComm shares with its watchdog thread. Owned through a shared_ptr by the
/// NcclComm and by the watchdog thread, so that a watchdog left blocked in NCCL's teardown (see
/// shutdown()) never touches freed memory.
///
/// Two mutexes, always taken in this order when both are held:
///   nccl_mutex_  around every NCCL call on comm_ (each checks comm_ under it first). The
///                watchdog takes the handle out under it (comm_ becomes null) and calls
///                ncclCommAbort outside it: abort blocks until the device drains, and no caller
///                may wait on this mutex that long. Every other call made under it returns
///                promptly (the comm is non-blocking; waits for ncclInProgress release it between
///                polls).
///   state_mutex_ around the failure record, the watched work and the watchdog's flags; never
///                held across an NCCL call, so a caller can see a failure while an abort is still
///                under way.
class NcclState {
public:
    NcclState(int rank_, int size_, int device_, const NcclOptions& options_)
        : rank(rank_), size(size_), device(device_), options(options_), where(nccl_where(rank_, size_, device_))
    {
    }
    NcclState(const NcclState&) = delete;
    NcclState& operator=(const NcclState&) = delete;

    /// Takes the communicator out of `owned` and starts the watchdog, which holds a reference.
    [[nodiscard]] static std::shared_ptr<NcclState> start(OwnedNcclComm& owned, int rank_, int size_, int device_,
                                                          const NcclOptions& options_)
    {
        auto state = std::make_shared<NcclState>(rank_, size_, device_, options_);
        state->comm_ = owned.release();  // ~NcclState aborts it should the thread not start
        state->watchdog_ = std::thread([state] { state->watch_loop(); });
        return state;
    }

    /// Only when the watchdog never ran (its thread could not start) is anything left here:
    /// otherwise its teardown() has released the communicator and the events.
    ~NcclState()
    {
        nccl_abort_bounded(std::exchange(comm_, nullptr), options.teardown_timeout);
        for (cudaEvent_t event : all_events_) (void)cudaEventDestroy(event);
        if (watchdog_.joinable()) watchdog_.detach();  // cannot happen (shutdown joins or detaches)
    }

    /// The NcclComm's destructor: stops the watchdog, which then finalises and destroys the
    /// communicator (or aborts it), and waits for that at most options.timeout +
    /// options.teardown_timeout. Past the bound the watchdog is detached: it finishes (or stays
    /// blocked in NCCL, e.g. behind a kernel that never ends or a CUDA graph that still holds
    /// collectives of the communicator) on its own, holding its reference to this state.
    void shutdown() noexcept
    {
        bool finished = false;
        try {
            std::unique_lock<std::mutex> lock(state_mutex_);
            stop_ = true;
            work_cv_.notify_all();
            finished = exit_cv_.wait_for(lock, nccl_capped_sum(options.timeout, options.teardown_timeout),
                                         [&] { return watchdog_done_.load(); });
        } catch (...) {
        }
        try {
            if (finished && watchdog_.joinable()) watchdog_.join();
        } catch (...) {
        }
        if (watchdog_.joinable()) watchdog_.detach();
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

    /// Records `message` as the failure unless one was recorded before, wakes the watchdog to
    /// abort, and throws the first failure as CommError (with `message` appended when it was not
    /// the first).
    [[noreturn]] void fail(std::string_view message)
    {
        std::string first;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            record_failure_locked(message);
            first = failure_.empty() ? std::string(nccl_watchdog_failure) : failure_;
        }
        work_cv_.notify_all();
        done_cv_.notify_all();
        if (first == message) throw CommError(std::move(first));
        throw CommError(::foe::detail::concat(first, " (then, in this call: ", message, ")"));
    }

    void record_failure(std::string_view message)
    {
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            record_failure_locked(message);
        }
        work_cv_.notify_all();
        done_cv_.notify_all();
    }

    /// Runs `issue(comm, lock)` under the NCCL mutex and watches the collective on `stream`.
    /// Everything that can fail without harm comes first (whether the stream is being captured,
    /// an event to record after the collective), so that a collective once enqueued is either
    /// watched or fails the communicator.
    template <class Issue>
    void enqueue(const char* op, std::size_t count, const char* dtype, cudaStream_t stream, Issue&& issue)
    {
        throw_if_failed(op);
        CudaDeviceGuard guard(device);
        const bool captured = capturing(stream, "NcclComm collective");
        if (captured) captured_.store(true, std::memory_order_relaxed);
        EventLoan loan(*this, captured ? nullptr : take_event());
        {
            std::unique_lock<std::mutex> lock(nccl_mutex_);
            issue(live_comm(op), lock);
        }
        if (loan.event == nullptr) return;  // captured: watch(stream, label) watches the graph's launch
        Pending pending;
        pending.op = op;
        pending.count = count;
        pending.dtype = dtype;
        start_watching(loan, stream, std::move(pending));
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

    [[nodiscard]] std::shared_ptr<NcclState> split(int color, int key)
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
        const auto start_time = nccl_clock::now();
        for (;;) {
            ncclResult_t state = ncclInProgress;
            if (const ncclResult_t q = ncclCommGetAsyncError(parent, &state); q != ncclSuccess)
                nccl_error("ncclCommGetAsyncError", q, op);
            if (state == ncclSuccess) break;
            if (state != ncclInProgress) nccl_error("ncclCommSplit", state, op);
            const auto waited = nccl_clock::now() - start_time;
            if (waited >= options.bootstrap_timeout)
                fail(::foe::detail::concat("NcclComm::split(color ", color, ", key ", key, ") on ", where,
                                           " did not complete within NcclOptions::bootstrap_timeout: waited ",
                                           nccl_ms(waited), " ms (timeout ", options.bootstrap_timeout.count(),
                                           " ms); some rank did not call split; the communicator is aborted"));
            lock.unlock();
            nccl_relax(waited, options.poll_interval);
            if (failed()) throw_failure(op);  // without waiting for the mutex, which an abort frees
            lock.lock();
            parent = live_comm(op);
        }
        OwnedNcclComm child(options.teardown_timeout);
        child.handle = std::exchange(split_slot_, nullptr);
        lock.unlock();
        if (child.handle == nullptr) return nullptr;  // NCCL_SPLIT_NOCOLOR: in no new communicator
        // From here on the peers hold their part of the new communicator: any failure of this
        // rank's part fails the parent too (and the child is aborted, bounded, by its owner).
        const ncclResult_t child_state = nccl_wait_ready(child.handle, options.bootstrap_timeout, options.poll_interval);
        if (child_state != ncclSuccess)
            fail(::foe::detail::concat(
                "NcclComm::split: ",
                child_state == ncclInProgress
                    ? ::foe::detail::concat("the new communicator on ", where,
                                            " did not become ready within NcclOptions::bootstrap_timeout (",
                                            options.bootstrap_timeout.count(), " ms)")
                    : nccl_failure("ncclCommSplit (new communicator)", child_state, child.handle, where),
                "; the communicator is aborted"));
        int child_rank = -1, child_size = 0;
        if (const ncclResult_t q = ncclCommUserRank(child.handle, &child_rank); q != ncclSuccess)
            fail(::foe::detail::concat("NcclComm::split: ", nccl_failure("ncclCommUserRank", q, child.handle, where),
                                       "; the new communicator and this one are aborted"));
        if (const ncclResult_t q = ncclCommCount(child.handle, &child_size); q != ncclSuccess)
            fail(::foe::detail::concat("NcclComm::split: ", nccl_failure("ncclCommCount", q, child.handle, where),
                                       "; the new communicator and this one are aborted"));
        return start(child, child_rank, child_size, device, options);
    }

    void synchronize(cudaStream_t stream)
    {
        const char* op = "synchronize";
        throw_if_failed(op);
        const auto start_time = nccl_clock::now();
        for (;;) {
            const cudaError_t status = cudaStreamQuery(stream);
            if (status == cudaSuccess) break;
            if (status != cudaErrorNotReady) {
                (void)cudaGetLastError();
                // A capture in the way is the caller's mistake (synchronising a stream being
                // captured), not a failure of the communicator.
                if (nccl_capture_error(status)) nccl_cuda_check(status, "cudaStreamQuery (NcclComm::synchronize)");
                std::string detail;
                const bool nccl_failed = async_error(detail);
                fail(::foe::detail::concat("NcclComm::synchronize on ", where, ": cudaStreamQuery reported ",
                                           cudaGetErrorName(status), " (", cudaGetErrorString(status), ")",
                                           nccl_failed ? "; NCCL reports " : "", detail,
                                           "; the communicator is aborted"));
            }
            throw_if_failed(op);
            const auto waited = nccl_clock::now() - start_time;
            if (waited >= options.timeout)
                fail(::foe::detail::concat("NcclComm::synchronize on ", where, " waited ", nccl_ms(waited),
                                           " ms for its stream, longer than NcclOptions::timeout (",
                                           options.timeout.count(),
                                           " ms): a collective or earlier work on the stream did not complete; "
                                           "the communicator is aborted"));
            nccl_relax(waited, options.poll_interval);
        }
        throw_if_failed(op);
        // The stream has completed, but a collective of it may have failed asynchronously (a
        // peer died): its results would be garbage.
        if (std::string detail; async_error(detail))
            fail(::foe::detail::concat("NcclComm::synchronize on ", where,
                                       ": the stream completed, but NCCL reports an asynchronous error: ", detail,
                                       "; the communicator is aborted"));
    }

    void wait_all()
    {
        std::unique_lock<std::mutex> lock(state_mutex_);
        // The watchdog times out each collective; the extra second only guards against a
        // watchdog that cannot make progress.
        const auto limit = nccl_capped_sum(options.timeout, std::chrono::seconds(1));
        const bool settled = done_cv_.wait_for(lock, limit, [&] { return failed() || pending_.empty(); });
        if (!settled) {
            record_failure_locked(::foe::detail::concat(
                "NcclComm::wait on ", where, " waited ", limit.count(), " ms for ", pending_.size(),
                " collective(s) without the watchdog settling them; the communicator is aborted"));
            work_cv_.notify_all();
        }
        if (failed())
            throw CommError(::foe::detail::concat("NcclComm::wait on ", where, ": ",
                                                  failure_.empty() ? nccl_watchdog_failure : failure_));
    }

    void watch(cudaStream_t stream, std::string_view label)
    {
        const char* op = "watch";
        throw_if_failed(op);
        CudaDeviceGuard guard(device);
        if (capturing(stream, "NcclComm::watch")) return;  // the graph's launch is what to watch
        Pending pending;
        pending.label.assign(label);  // allocates before anything is recorded
        EventLoan loan(*this, take_event());
        start_watching(loan, stream, std::move(pending));
    }

private:
    /// Work being watched: the event recorded after it on its stream.
    struct Pending {
        cudaEvent_t event = nullptr;
        const char* op = nullptr;  ///< the collective; null for watch()
        std::size_t count = 0;
        const char* dtype = "";
        std::string label;  ///< watch()'s label
        nccl_clock::time_point enqueued;
    };

    /// An event taken from the pool, given back unless handed to the watchdog.
    class EventLoan {
    public:
        EventLoan(NcclState& owner, cudaEvent_t event_) noexcept : event(event_), owner_(owner) {}
        EventLoan(const EventLoan&) = delete;
        EventLoan& operator=(const EventLoan&) = delete;
        ~EventLoan()
        {
            if (event != nullptr) owner_.give_back(event);
        }
        cudaEvent_t event;

    private:
        NcclState& owner_;
    };

    /// "all_to_all_v (777 fp32 elements)" or "work watched as \"label\"".
    [[nodiscard]] static std::string describe(const Pending& p)
    {
        if (p.op == nullptr) return ::foe::detail::concat("work watched as \"", p.label, "\"");
        return ::foe::detail::concat(p.op, " (", p.count, " ", p.dtype, " elements)");
    }

    [[noreturn]] void throw_failure(const char* op) const
    {
        std::string first;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            first = failure_.empty() ? std::string(nccl_watchdog_failure) : failure_;
        }
        throw CommError(::foe::detail::concat("NcclComm::", op, " on ", where,
                                              " refused, the communicator has failed: ", first));
    }

    /// The communicator, or the recorded failure thrown when the watchdog has aborted it. Under
    /// the NCCL mutex.
    [[nodiscard]] ncclComm_t live_comm(const char* op) const
    {
        if (comm_ == nullptr) throw_failure(op);
        return comm_;
    }

    /// Records the failure (the first one wins) and stops watching what is in flight. Cannot
    /// fail: should copying the message run out of memory, the fixed nccl_watchdog_failure stands
    /// for it.
    void record_failure_locked(std::string_view message) noexcept
    {
        if (failed()) return;
        try {
            failure_.assign(message.data(), message.size());
        } catch (...) {
            failure_.clear();
        }
        failed_.store(true, std::memory_order_release);
        // The work in flight is abandoned with the communicator. free_events_ has room for every
        // event (take_event reserves it), so this allocates nothing.
        for (const Pending& p : pending_) free_events_.push_back(p.event);
        pending_.clear();
        // Wake the waiters now: the watchdog notifies again after ncclCommAbort, but that can
        // block for as long as a kernel never ends, and wait() would sit until its own bound.
        done_cv_.notify_all();
        work_cv_.notify_all();
    }

    /// The watchdog's failure when it could not build a message (or take a lock).
    void record_watchdog_failure() noexcept
    {
        try {
            std::lock_guard<std::mutex> lock(state_mutex_);
            record_failure_locked(nccl_watchdog_failure);
        } catch (...) {
            failed_.store(true, std::memory_order_release);  // an empty failure_ reads as the fixed text
        }
        work_cv_.notify_all();
        done_cv_.notify_all();
    }

    /// Waits out ncclInProgress after a call made under `lock`, releasing it between polls so
    /// that the watchdog can take the communicator out meanwhile.
    void await(const char* call, const char* op, std::unique_lock<std::mutex>& lock)
    {
        const auto start_time = nccl_clock::now();
        for (;;) {
            ncclResult_t state = ncclInProgress;
            if (const ncclResult_t q = ncclCommGetAsyncError(comm_, &state); q != ncclSuccess)
                nccl_error("ncclCommGetAsyncError", q, op);
            if (state == ncclSuccess) return;
            if (state != ncclInProgress) nccl_error(call, state, op);
            const auto waited = nccl_clock::now() - start_time;
            if (waited >= options.timeout)
                fail(::foe::detail::concat("NcclComm::", op, " on ", where, ": ", call, " was still in progress after ",
                                           nccl_ms(waited), " ms (NcclOptions::timeout ", options.timeout.count(),
                                           " ms); the communicator is aborted"));
            lock.unlock();
            nccl_relax(waited, options.poll_interval);
            if (failed()) throw_failure(op);  // without waiting for the mutex
            lock.lock();
            (void)live_comm(op);
        }
    }

    /// Whether `stream` is being captured into a CUDA graph. A failed query throws CudaError
    /// (before anything is enqueued).
    [[nodiscard]] static bool capturing(cudaStream_t stream, const char* who)
    {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        const cudaError_t status = cudaStreamIsCapturing(stream, &capture);
        if (status != cudaSuccess)
            nccl_cuda_check(status, ::foe::detail::concat("cudaStreamIsCapturing (", who, ")").c_str());
        return capture != cudaStreamCaptureStatusNone;
    }

    /// Records the loaned event after the work just enqueued on `stream` and hands it to the
    /// watchdog. A failed record fails the communicator: the work is in flight unwatched.
    void start_watching(EventLoan& loan, cudaStream_t stream, Pending&& pending)
    {
        if (const cudaError_t status = cudaEventRecord(loan.event, stream); status != cudaSuccess) {
            (void)cudaGetLastError();
            fail(::foe::detail::concat("NcclComm ", describe(pending), " on ", where,
                                       ": enqueued, but recording the event that watches it failed (cudaEventRecord: ",
                                       cudaGetErrorName(status), ", ", cudaGetErrorString(status),
                                       "); the communicator is aborted"));
        }
        pending.event = loan.event;
        pending.enqueued = nccl_clock::now();
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            if (failed()) return;  // failed meanwhile: nothing is watched any more (the loan gives it back)
            pending_.push_back(std::move(pending));  // room reserved by take_event
            loan.event = nullptr;
            ++work_seq_;
        }
        work_cv_.notify_one();
    }

    /// An event from the pool: after warm-up (as much work in flight as ever before) this
    /// allocates nothing.
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
            // record_failure_locked, which must not fail) never allocates.
            free_events_.reserve(all_events_.size() + 1);
            pending_.reserve(all_events_.size() + 1);
            all_events_.push_back(event);
        } catch (...) {
            (void)cudaEventDestroy(event);
            throw;
        }
        return event;
    }

    void give_back(cudaEvent_t event) noexcept
    {
        try {
            std::lock_guard<std::mutex> lock(state_mutex_);
            free_events_.push_back(event);  // room reserved by take_event
        } catch (...) {  // lost to the pool; destroyed with all_events_
        }
    }

    /// Polls NCCL's asynchronous error under the NCCL mutex: true, with `detail` saying what,
    /// once NCCL reports the communicator failed (false once it has been aborted).
    [[nodiscard]] bool async_error(std::string& detail)
    {
        std::lock_guard<std::mutex> lock(nccl_mutex_);
        if (comm_ == nullptr) return false;
        ncclResult_t state = ncclSuccess;
        if (const ncclResult_t q = ncclCommGetAsyncError(comm_, &state); q != ncclSuccess) {
            detail = nccl_failure("ncclCommGetAsyncError", q, comm_, where);
            return true;
        }
        if (state == ncclSuccess || state == ncclInProgress) return false;
        detail = nccl_failure("an asynchronous NCCL operation", state, comm_, where);
        return true;
    }

    /// How long the watchdog sleeps while nothing is watched (it still polls NCCL's error):
    /// 10 poll intervals, or one once collectives were captured into graphs, whose replays it
    /// cannot see otherwise.
    [[nodiscard]] std::chrono::microseconds idle_interval() const noexcept
    {
        const auto poll = std::min<std::chrono::microseconds>(options.poll_interval, std::chrono::hours(1));
        return captured_.load(std::memory_order_relaxed) ? poll : poll * 10;
    }

    /// The watchdog thread. Its stream-capture mode is relaxed, so that its event queries never
    /// invalidate another thread's capture (the default, global mode, forbids such calls while
    /// any thread captures). It ends with the teardown of the communicator.
    void watch_loop() noexcept
    {
        (void)cudaSetDevice(device);  // events and the communicator live on this device
        cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
        (void)cudaThreadExchangeStreamCaptureMode(&mode);
        for (;;) {
            try {
                if (!watch_round()) break;
            } catch (...) {  // a message or a lock failed: fail without one, then go on
                record_watchdog_failure();
                std::this_thread::sleep_for(options.poll_interval);
            }
        }
        teardown();
        try {
            std::lock_guard<std::mutex> lock(state_mutex_);
            watchdog_done_.store(true);
        } catch (...) {
            watchdog_done_.store(true);  // shutdown() then sees it at its bound at the latest
        }
        exit_cv_.notify_all();
    }

    /// One round of the watchdog; false once it is to stop. After a failure it aborts the
    /// communicator (once) and waits for the stop; otherwise it checks the watched work, polls
    /// NCCL's asynchronous error (every poll interval while work is watched, every 10 otherwise)
    /// and sleeps.
    bool watch_round()
    {
        std::unique_lock<std::mutex> lock(state_mutex_);
        if (failed()) {
            if (!aborted_) {
                lock.unlock();
                abort_comm();
                lock.lock();
                aborted_ = true;
                done_cv_.notify_all();
            }
            work_cv_.wait(lock, [&] { return stop_; });
            return false;
        }
        if (stop_) return false;
        sweep();
        if (failed()) return true;
        if (pending_.empty()) done_cv_.notify_all();
        if (const auto now = nccl_clock::now(); now >= next_async_poll_) {
            next_async_poll_ = now + (pending_.empty() ? idle_interval() : options.poll_interval);
            lock.unlock();
            std::string detail;
            const bool nccl_failed = async_error(detail);
            lock.lock();
            if (nccl_failed) {
                record_failure_locked(async_failure(detail));
                return true;
            }
        }
        const std::uint64_t seen = work_seq_;
        work_cv_.wait_for(lock, pending_.empty() ? idle_interval() : options.poll_interval,
                          [&] { return stop_ || failed() || work_seq_ != seen; });
        return true;
    }

    /// Takes the communicator out under the NCCL mutex (every other NCCL call checks comm_
    /// under it) and aborts it outside, however long that takes.
    void abort_comm()
    {
        ncclComm_t doomed = nullptr;
        {
            std::lock_guard<std::mutex> lock(nccl_mutex_);
            doomed = std::exchange(comm_, nullptr);
        }
        if (doomed != nullptr) (void)ncclCommAbort(doomed);
    }

    /// The failure for an asynchronous NCCL error, naming the oldest work in flight. Under the
    /// state mutex.
    [[nodiscard]] std::string async_failure(const std::string& detail) const
    {
        if (pending_.empty())
            return ::foe::detail::concat("NcclComm on ", where,
                                         ": NCCL reported an asynchronous error while no collective was watched "
                                         "(one replayed from a CUDA graph, or one that had completed): ",
                                         detail, "; the communicator is aborted");
        const Pending& p = *std::min_element(pending_.begin(), pending_.end(),
                                             [](const Pending& a, const Pending& b) { return a.enqueued < b.enqueued; });
        return ::foe::detail::concat("NcclComm ", describe(p), " on ", where,
                                     " in flight: NCCL reported an asynchronous error: ", detail,
                                     "; the communicator is aborted");
    }

    /// Checks the watched events under the state mutex: completed ones go back to the pool; an
    /// error or an overdue one fails the communicator.
    void sweep()
    {
        const auto now = nccl_clock::now();
        for (std::size_t i = 0; i < pending_.size();) {
            Pending& p = pending_[i];
            const cudaError_t status = cudaEventQuery(p.event);
            if (status == cudaSuccess) {
                free_events_.push_back(p.event);
                if (i + 1 != pending_.size()) p = std::move(pending_.back());
                pending_.pop_back();
                continue;
            }
            if (status != cudaErrorNotReady) {
                (void)cudaGetLastError();
                // A capture in the way says nothing about the event: not ready yet (the timeout
                // still applies).
                if (!nccl_capture_error(status)) {
                    record_failure_locked(::foe::detail::concat(
                        "NcclComm ", describe(p), " on ", where, ": CUDA reported ", cudaGetErrorName(status), " (",
                        cudaGetErrorString(status), ") while it was in flight; the communicator is aborted"));
                    return;
                }
            }
            if (const auto waited = now - p.enqueued; waited > options.timeout) {
                record_failure_locked(::foe::detail::concat(
                    "NcclComm ", describe(p), " on ", where,
                    " did not complete within NcclOptions::timeout: waited ", nccl_ms(waited), " ms (timeout ",
                    options.timeout.count(),
                    " ms); the communicator is aborted (did a peer fail, or not call the same collective?)"));
                return;
            }
            ++i;
        }
    }

    /// The watchdog's last act: finalise (flushing what is in flight, at most options.timeout)
    /// and destroy a healthy communicator, or abort a failed one; then abort a split child that
    /// a timed-out split() left behind and destroy the events. It blocks as long as NCCL does;
    /// shutdown() waits for it only so long.
    void teardown() noexcept
    {
        ncclComm_t doomed = nullptr;
        try {
            std::lock_guard<std::mutex> lock(nccl_mutex_);
            doomed = std::exchange(comm_, nullptr);
        } catch (...) {
            doomed = std::exchange(comm_, nullptr);  // no caller is left to race with
        }
        if (doomed != nullptr) {
            bool clean = !failed();
            if (clean) {
                const ncclResult_t r = ncclCommFinalize(doomed);
                clean = (r == ncclSuccess || r == ncclInProgress) &&
                        nccl_wait_ready(doomed, options.timeout, options.poll_interval) == ncclSuccess;
            }
            (void)(clean ? ncclCommDestroy(doomed) : ncclCommAbort(doomed));
        }
        // A split that this side gave up on may have completed since; its job is over by now
        // (destroying or aborting the parent ends it).
        if (split_slot_ != nullptr) (void)ncclCommAbort(std::exchange(split_slot_, nullptr));
        for (cudaEvent_t event : all_events_) (void)cudaEventDestroy(event);
        all_events_.clear();
        free_events_.clear();
        pending_.clear();
    }

    mutable std::mutex nccl_mutex_;
    ncclComm_t comm_ = nullptr;        ///< null once taken out for the abort or teardown (under nccl_mutex_)
    ncclComm_t split_slot_ = nullptr;  ///< where NCCL's split job stores the new handle

    mutable std::mutex state_mutex_;
    std::condition_variable work_cv_;  ///< wakes the watchdog
    std::condition_variable done_cv_;  ///< wakes wait()
    std::condition_variable exit_cv_;  ///< wakes shutdown() once the watchdog is done
    std::atomic<bool> failed_{false};  ///< set with failure_, read without the mutex
    std::atomic<bool> captured_{false};  ///< a collective was enqueued on a capturing stream
    std::atomic<bool> watchdog_done_{false};
    std::string failure_;
    bool aborted_ = false;  ///< the watchdog has aborted comm_ after the failure
    bool stop_ = false;
    std::uint64_t work_seq_ = 0;  ///< counts the work handed to the watchdog (wakes it when idle)
    nccl_clock::time_point next_async_poll_{};
    std::vector<Pending> pending_;
    std::vector<cudaEvent_t> free_events_;
    std::vector<cudaEvent_t> all_events_;
    std::thread watchdog_;
};

/// Writes the id to `path` atomically: a temporary file next to it, then a rename. A failed
/// write or rename removes the temporary file.
inline void write_nccl_id_file(const std::filesystem::path& path, const ncclUniqueId& id)
{
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out.is_open()) raise<IoError>("NcclComm::from_file: could not create the unique-id file ", tmp.string());
        out.write(id.internal, NCCL_UNIQUE_ID_BYTES);
        out.close();
        if (!out) {
            std::error_code ignored;
            std::filesystem::remove(tmp, ignored);
            raise<IoError>("NcclComm::from_file: could not write the unique-id file ", tmp.string());
        }
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
            require<CommError>(bytes == static_cast<std::uintmax_t>(NCCL_UNIQUE_ID_BYTES), "NcclComm::from_file (rank ",
                               rank, " of ", size, "): the unique-id file ", path.string(), " holds ", bytes,
                               " bytes, expected ", NCCL_UNIQUE_ID_BYTES, " (not written by NcclComm::from_file?)");
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

inline NcclComm::NcclComm(std::shared_ptr<detail::NcclState> state) noexcept : state_(std::move(state)) {}
inline NcclComm::NcclComm(NcclComm&& other) noexcept : state_(std::move(other.state_)) {}

inline NcclComm& NcclComm::operator=(NcclComm&& other) noexcept
{
    if (this != &other) {
        close();
        state_ = std::move(other.state_);
    }
    return *this;
}

inline NcclComm::~NcclComm() { close(); }

inline void NcclComm::close() noexcept
{
    if (std::shared_ptr<detail::NcclState> s = std::exchange(state_, nullptr)) s->shutdown();
}

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
    detail::validate_nccl_device("NcclComm::from_unique_id", device);
    detail::CudaDeviceGuard guard(device);
    const std::string where = detail::nccl_where(rank, size, device);
    ncclConfig_t config = detail::nonblocking_config();
    detail::OwnedNcclComm comm(options.teardown_timeout);
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
    return NcclComm(detail::NcclState::start(comm, rank, size, device, options));
}

inline NcclComm NcclComm::from_file(const std::filesystem::path& path, int rank, int size, int device,
                                    NcclOptions options)
{
    detail::validate_nccl_setup("NcclComm::from_file", rank, size, options);
    if (rank != 0) return from_unique_id(detail::read_nccl_id_file(path, rank, size, options.bootstrap_timeout), rank,
                                         size, device, options);
    // Rank 0 checks its device before it publishes an id that it could not use.
    detail::validate_nccl_device("NcclComm::from_file", device);
    const ncclUniqueId id = make_unique_id();
    detail::write_nccl_id_file(path, id);
    // Initialisation completes only once every rank has joined, so every rank has read the file
    // then; removing it keeps a later job on the same path from reading this job's id. A failed
    // initialisation removes it too: the id is of no use to anyone.
    NcclComm comm;
    try {
        comm = from_unique_id(id, rank, size, device, options);
    } catch (...) {
        std::error_code ignored;
        std::filesystem::remove(path, ignored);
        throw;
    }
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
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

inline void NcclComm::watch(cudaStream_t stream, std::string_view label) { state("watch").watch(stream, label); }

inline bool NcclComm::aborted() const noexcept { return state_ && state_->failed(); }

inline void NcclComm::abort(std::string_view reason)
{
    detail::NcclState& s = state("abort");
    s.record_failure(foe::detail::concat("NcclComm on ", s.where, " aborted by the caller: ", reason));
}

static_assert(Comm<NcclComm>);

}  // namespace foe::comm
