// foe::comm::NcclComm on one rank (one GPU is all a test machine has): every collective moves
// what the Comm concept says into poisoned (0xff) buffers and writes nothing past them; split,
// the file bootstrap, typed errors, and the watchdog: a stream that never completes (a collective
// queued behind a spinning kernel, synchronize(), work handed to watch()) ends in a CommError
// after the timeout and an aborted communicator, never in a hang.
// The cases that need no GPU (the file bootstrap of a rank whose file never appears or whose
// device does not exist, the id file's temporary, argument checks, the empty communicator) run
// everywhere; the others say "no CUDA device: skipped".
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/comm/counting_comm.hpp"
#include "foe/comm/nccl_comm.cuh"
#include "foe/cuda/check.cuh"

using foe::bfloat16;
using foe::index_t;
using foe::comm::NcclComm;
using foe::comm::NcclOptions;
namespace fc = foe::cuda;
using namespace foe::cuda::testing;
using namespace std::chrono_literals;

static_assert(foe::comm::Comm<NcclComm>);
static_assert(foe::comm::Comm<foe::comm::CountingComm<NcclComm>>);

namespace {

using test_clock = std::chrono::steady_clock;

/// The message of the E that f throws; "<nothing thrown>" if it returns (another exception type
/// propagates and fails the test case).
template <class E, class F>
std::string thrown_message(F&& f)
{
    try {
        f();
    } catch (const E& e) {
        return e.what();
    }
    return "<nothing thrown>";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

/// A fresh temporary directory, removed with its contents.
struct TempDir {
    std::filesystem::path path;
    TempDir()
    {
        std::random_device rd;
        path = std::filesystem::temp_directory_path() /
               ("foe-nccl-test-" + std::to_string(rd()) + "-" + std::to_string(rd()));
        std::filesystem::create_directories(path);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir()
    {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
};

/// A CUDA stream that does not synchronise with the legacy default stream.
struct Stream {
    cudaStream_t handle = nullptr;
    Stream() { fc::check(cudaStreamCreateWithFlags(&handle, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() { (void)cudaStreamDestroy(handle); }
    operator cudaStream_t() const { return handle; }
};

__global__ void spin_until_set(const volatile int* flag)
{
    while (*flag == 0) __nanosleep(1000);
}

/// Blocks a stream with a kernel that spins until the host sets a flag in mapped pinned memory:
/// work enqueued after it does not complete until release(). A backstop thread releases it after
/// 60 s in any case, so that a broken NcclComm fails the test instead of hanging it.
class StreamBlocker {
public:
    explicit StreamBlocker(cudaStream_t stream) : stream_(stream)
    {
        fc::check(cudaHostAlloc(&host_, sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
        flag_ = static_cast<volatile int*>(host_);
        *flag_ = 0;
        void* device_flag = nullptr;
        fc::check(cudaHostGetDevicePointer(&device_flag, host_, 0), "cudaHostGetDevicePointer");
        spin_until_set<<<1, 1, 0, stream>>>(static_cast<const volatile int*>(device_flag));
        fc::check_launch("spin_until_set");
        backstop_ = std::thread([this] {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                cv_.wait_for(lock, 60s, [&] { return done_; });
            }
            release();
        });
    }
    StreamBlocker(const StreamBlocker&) = delete;
    StreamBlocker& operator=(const StreamBlocker&) = delete;
    ~StreamBlocker()
    {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            done_ = true;
        }
        cv_.notify_all();
        backstop_.join();  // it releases the kernel on its way out
        (void)cudaStreamSynchronize(stream_);
        (void)cudaFreeHost(host_);
    }

    void release()
    {
        std::lock_guard<std::mutex> lock(release_mutex_);
        *flag_ = 1;
    }

private:
    cudaStream_t stream_;
    void* host_ = nullptr;
    volatile int* flag_ = nullptr;
    std::mutex mutex_, release_mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::thread backstop_;
};

/// True when elements [first, first + count) of v are still 0xff bytes (never written).
template <class T>
bool still_poisoned(const std::vector<T>& v, std::size_t first, std::size_t count)
{
    REQUIRE(first + count <= v.size());
    const auto* bytes = reinterpret_cast<const unsigned char*>(v.data() + first);
    return std::all_of(bytes, bytes + count * sizeof(T), [](unsigned char b) { return b == 0xff; });
}

/// True when the first `count` elements of got and want have the same bits.
template <class T>
bool same_prefix(const std::vector<T>& got, const std::vector<T>& want, std::size_t count)
{
    REQUIRE(count <= got.size());
    REQUIRE(count <= want.size());
    return count == 0 || std::memcmp(got.data(), want.data(), count * sizeof(T)) == 0;
}

std::vector<float> random_floats(std::size_t n, std::mt19937_64& rng)
{
    std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

/// A device buffer of `values` followed by `pad` poisoned elements.
template <class T>
fc::DeviceBuffer<T> upload_padded(const std::vector<T>& values, std::size_t pad, cudaStream_t stream)
{
    fc::DeviceBuffer<T> d(values.size() + pad);
    fc::fill_bytes(d, 0xff, stream);
    if (!values.empty())
        fc::check(cudaMemcpyAsync(d.data(), values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync");
    return d;
}

/// all_reduce_sum over one rank: the buffer keeps its bits, the padding after it stays poisoned.
/// (NCCL may well do nothing for an in-place reduction over one rank: this checks only that
/// nothing is harmed; check_all_gather_copies checks that data moves.)
template <class T, class C>
void check_all_reduce_keeps(C& comm, const std::vector<T>& values, cudaStream_t stream)
{
    constexpr std::size_t pad = 33;
    auto d = upload_padded(values, pad, stream);
    comm.all_reduce_sum(std::span<T>(d.data(), values.size()), stream);
    auto got = fc::download(d, stream);
    CHECK(same_prefix(got, values, values.size()));
    CHECK(still_poisoned(got, values.size(), pad));
}

/// all_gather over one rank from one buffer into another, poisoned one: the block arrives with
/// its bits (so the element size NCCL was given is right: a wrong one would copy too little or
/// write into the padding) and nothing past it is written.
template <class T, class C>
void check_all_gather_copies(C& comm, const std::vector<T>& values, cudaStream_t stream)
{
    constexpr std::size_t pad = 17;
    auto din = upload_padded(values, 0, stream);
    fc::DeviceBuffer<T> dout(values.size() + pad);
    fc::fill_bytes(dout, 0xff, stream);
    comm.all_gather(std::span<const T>(din.data(), values.size()), std::span<T>(dout.data(), values.size()), stream);
    comm.synchronize(stream);
    const auto got = fc::download(dout, stream);
    CHECK(same_prefix(got, values, values.size()));
    CHECK(still_poisoned(got, values.size(), pad));
}

/// Random bf16 values with, at every third place, one that fp16 cannot hold (beyond its range,
/// below its smallest subnormal): data that went through fp16 anywhere would change its bits.
std::vector<bfloat16> bf16_beyond_fp16(std::size_t n, std::mt19937_64& rng)
{
    auto v = random_bf16(n, rng, -4.0f, 4.0f).bits;
    const float extremes[] = {1.0e20f, -3.0e38f, 1.0e-30f, -7.5e-25f, 262144.0f, -1.0e9f};
    for (std::size_t i = 0; i < n; i += 3) v[i] = bfloat16(extremes[(i / 3) % std::size(extremes)]);
    return v;
}

}  // namespace

// --- no GPU needed -----------------------------------------------------------------------------

TEST_CASE("nccl: the file bootstrap of a rank > 0 whose file never appears throws CommError after bootstrap_timeout")
{
    TempDir dir;
    const auto path = dir.path / "never-written.ncclid";
    NcclOptions options;
    options.bootstrap_timeout = 150ms;
    const auto start = test_clock::now();
    const std::string message =
        thrown_message<foe::CommError>([&] { (void)NcclComm::from_file(path, 1, 2, 0, options); });
    const auto waited = test_clock::now() - start;
    CAPTURE(message);
    CHECK(contains(message, path.string()));
    CHECK(contains(message, "150 ms"));
    CHECK(contains(message, "rank 1 of 2"));
    CHECK(waited >= 150ms);
    CHECK(waited < 10s);

    // A file of the wrong size is not rank 0's (it renames a complete file into place).
    const auto wrong = dir.path / "wrong-size.ncclid";
    {
        std::ofstream out(wrong, std::ios::binary);
        out << "abc";
    }
    const std::string wrong_message =
        thrown_message<foe::CommError>([&] { (void)NcclComm::from_file(wrong, 1, 2, 0, options); });
    CAPTURE(wrong_message);
    CHECK(contains(wrong_message, wrong.string()));
    CHECK(contains(wrong_message, "3 bytes"));
    CHECK(contains(wrong_message, "128"));
}

TEST_CASE("nccl: rank 0 of the file bootstrap publishes no id for a device it does not have")
{
    TempDir dir;
    const auto path = dir.path / "job.ncclid";
    const std::string message =
        thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_file(path, 0, 2, 1 << 20, NcclOptions{}); });
    CAPTURE(message);
    CHECK(contains(message, "device (1048576)"));
    CHECK_FALSE(std::filesystem::exists(path));
    CHECK_FALSE(std::filesystem::exists(dir.path / "job.ncclid.tmp"));
}

TEST_CASE("nccl: a unique-id file that cannot be renamed into place leaves no temporary file behind")
{
    TempDir dir;
    // The target is a non-empty directory: the rename of the written temporary file onto it fails.
    const auto occupied = dir.path / "occupied";
    std::filesystem::create_directories(occupied / "inside");
    ncclUniqueId id{};
    for (int i = 0; i < NCCL_UNIQUE_ID_BYTES; ++i) id.internal[i] = static_cast<char>(i);
    const std::string message =
        thrown_message<foe::IoError>([&] { foe::comm::detail::write_nccl_id_file(occupied, id); });
    CAPTURE(message);
    CHECK(contains(message, "could not rename"));
    CHECK_FALSE(std::filesystem::exists(dir.path / "occupied.tmp"));
    CHECK(std::filesystem::is_directory(occupied / "inside"));  // untouched

    // The good case: the file holds the id's bytes, and no temporary is left.
    const auto good = dir.path / "good.ncclid";
    foe::comm::detail::write_nccl_id_file(good, id);
    CHECK(std::filesystem::file_size(good) == static_cast<std::uintmax_t>(NCCL_UNIQUE_ID_BYTES));
    CHECK_FALSE(std::filesystem::exists(dir.path / "good.ncclid.tmp"));
    const ncclUniqueId back = foe::comm::detail::read_nccl_id_file(good, 1, 2, 1000ms);
    CHECK(std::memcmp(back.internal, id.internal, NCCL_UNIQUE_ID_BYTES) == 0);
}

TEST_CASE("nccl: bad ranks, sizes and options throw foe::InvalidArgument before touching CUDA or NCCL")
{
    const ncclUniqueId id{};
    CHECK(contains(thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_unique_id(id, 2, 2, 0); }),
                   "rank (2)"));
    CHECK(contains(thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_unique_id(id, 0, 0, 0); }),
                   "size (0)"));
    CHECK(contains(thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_file("unused", -1, 2, 0); }),
                   "rank (-1)"));
    NcclOptions bad;
    bad.timeout = 0ms;
    CHECK(contains(thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_unique_id(id, 0, 1, 0, bad); }),
                   "timeout (0 ms)"));
    NcclOptions bad_bootstrap;
    bad_bootstrap.bootstrap_timeout = -5ms;
    CHECK(contains(
        thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_file("unused", 1, 2, 0, bad_bootstrap); }),
        "bootstrap_timeout (-5 ms)"));
    NcclOptions bad_teardown;
    bad_teardown.teardown_timeout = 0ms;
    CHECK(contains(
        thrown_message<foe::InvalidArgument>([&] { (void)NcclComm::from_unique_id(id, 0, 1, 0, bad_teardown); }),
        "teardown_timeout (0 ms)"));
}

TEST_CASE("nccl: an empty communicator has no ranks and refuses collectives with CommError")
{
    NcclComm empty;
    CHECK(empty.empty());
    CHECK(empty.size() == 0);
    CHECK(empty.rank() == -1);
    CHECK_FALSE(empty.aborted());
    std::vector<float> never_touched(4);  // the emptiness check comes before any use of the buffer
    CHECK(contains(thrown_message<foe::CommError>(
                       [&] { empty.all_reduce_sum(std::span<float>(never_touched), nullptr); }),
                   "empty communicator"));
    CHECK_THROWS_AS((void)empty.split(0, 0), foe::CommError);
    CHECK_THROWS_AS(empty.wait(), foe::CommError);
    CHECK_THROWS_AS(empty.watch(nullptr, "graph"), foe::CommError);
}

// --- GPU ---------------------------------------------------------------------------------------

TEST_CASE("nccl: all_reduce_sum on one rank keeps fp32 and bf16 buffers; all_gather copies them bit for bit")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    CHECK(comm.rank() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.device() == 0);
    CHECK_FALSE(comm.empty());
    Stream stream;
    std::mt19937_64 rng(21);
    for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{65537}}) {
        CAPTURE(n);
        const auto floats = random_floats(n, rng);
        const auto halves = bf16_beyond_fp16(n, rng);
        // In place over one rank NCCL may do nothing: the values must merely survive...
        check_all_reduce_keeps(comm, floats, stream);
        check_all_reduce_keeps(comm, halves, stream);
        // ...and the same communicator must move them between distinct buffers, as bf16.
        check_all_gather_copies(comm, floats, stream);
        check_all_gather_copies(comm, halves, stream);
    }
    comm.synchronize(stream);
    comm.wait();
    CHECK_FALSE(comm.aborted());

    // Through the counting decorator, as the layers use it.
    foe::comm::CountingComm<NcclComm> counting(std::move(comm));
    CHECK(comm.empty());  // moved from
    check_all_reduce_keeps(counting, random_floats(100, rng), stream);
    CHECK(counting.counts(foe::comm::Op::all_reduce_sum).calls == 1);
    counting.inner().wait();
}

TEST_CASE("nccl: collectives captured in a CUDA graph on the non-blocking communicator replay, watched, as foe_gpus's decode does")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    std::mt19937_64 rng(31);
    const auto values = random_floats(4096, rng);
    auto d = upload_padded(values, 0, stream);
    fc::DeviceBuffer<float> gathered(values.size());
    comm.synchronize(stream);
    // The all-reduce (in place: over one rank it may do nothing) and an all-gather into another
    // buffer, so that every replay must move data.
    cudaGraph_t graph = nullptr;
    fc::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    comm.all_reduce_sum(std::span<float>(d.data(), values.size()), stream);
    comm.all_gather(std::span<const float>(d.data(), values.size()), std::span<float>(gathered.data(), values.size()),
                    stream);
    fc::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    fc::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    for (int replay = 0; replay < 3; ++replay) {
        CAPTURE(replay);
        fc::fill_bytes(gathered, 0xff, stream);
        fc::check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
        comm.watch(stream, "graph replay");  // covered by the timeout, as a collective is
        comm.wait();
        const auto got = fc::download(gathered, stream);
        CHECK(same_prefix(got, values, values.size()));
    }
    CHECK_FALSE(comm.aborted());
    fc::check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
    fc::check(cudaGraphDestroy(graph), "cudaGraphDestroy");
}

TEST_CASE("nccl: all_to_all_v and all_gather on one rank copy the block and write nothing else")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    std::mt19937_64 rng(22);
    constexpr std::size_t in_extra = 5, out_pad = 9;
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{777}}) {
        CAPTURE(n);
        const std::vector<index_t> counts{static_cast<index_t>(n)};
        {  // fp32 all_to_all_v: the send buffer holds more than it sends
            const auto x = random_floats(n + in_extra, rng);
            auto din = upload_padded(x, 0, stream);
            fc::DeviceBuffer<float> dout(n + out_pad);
            fc::fill_bytes(dout, 0xff, stream);
            comm.all_to_all_v(std::span<const float>(din.data(), din.size()), counts,
                              std::span<float>(dout.data(), dout.size()), counts, stream);
            comm.synchronize(stream);
            const auto got = fc::download(dout, stream);
            CHECK(same_prefix(got, x, n));
            CHECK(still_poisoned(got, n, out_pad));
        }
        {  // bf16 all_to_all_v
            const auto x = random_bf16(n + in_extra, rng).bits;
            auto din = upload_padded(x, 0, stream);
            fc::DeviceBuffer<bfloat16> dout(n + out_pad);
            fc::fill_bytes(dout, 0xff, stream);
            comm.all_to_all_v(std::span<const bfloat16>(din.data(), din.size()), counts,
                              std::span<bfloat16>(dout.data(), dout.size()), counts, stream);
            comm.synchronize(stream);
            const auto got = fc::download(dout, stream);
            CHECK(same_prefix(got, x, n));
            CHECK(still_poisoned(got, n, out_pad));
        }
        {  // fp32 all_gather: out is the one rank's block
            const auto x = random_floats(n, rng);
            auto din = upload_padded(x, 0, stream);
            fc::DeviceBuffer<float> dout(n + out_pad);
            fc::fill_bytes(dout, 0xff, stream);
            comm.all_gather(std::span<const float>(din.data(), n), std::span<float>(dout.data(), n), stream);
            comm.synchronize(stream);
            const auto got = fc::download(dout, stream);
            CHECK(same_prefix(got, x, n));
            CHECK(still_poisoned(got, n, out_pad));
        }
        {  // bf16 all_gather
            const auto x = random_bf16(n, rng).bits;
            auto din = upload_padded(x, 0, stream);
            fc::DeviceBuffer<bfloat16> dout(n + out_pad);
            fc::fill_bytes(dout, 0xff, stream);
            comm.all_gather(std::span<const bfloat16>(din.data(), n), std::span<bfloat16>(dout.data(), n), stream);
            comm.synchronize(stream);
            const auto got = fc::download(dout, stream);
            CHECK(same_prefix(got, x, n));
            CHECK(still_poisoned(got, n, out_pad));
        }
    }
    comm.wait();
    CHECK_FALSE(comm.aborted());
}

TEST_CASE("nccl: bad collective arguments throw foe::InvalidArgument naming the value and leave the comm usable")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    fc::DeviceBuffer<float> a(8), b(8);
    const std::span<const float> in(a.data(), 8);
    const std::span<float> out(b.data(), 8);
    const std::vector<index_t> three_ranks{1, 1, 1}, four{4}, three{3}, negative{-7}, nine{9};
    auto a2a = [&](const std::vector<index_t>& send, const std::vector<index_t>& recv) {
        return thrown_message<foe::InvalidArgument>([&] { comm.all_to_all_v(in, send, out, recv, stream); });
    };
    CHECK(contains(a2a(three_ranks, four), "got 3 send and 1 receive counts"));
    CHECK(contains(a2a(negative, four), "send_counts[0] (-7)"));
    CHECK(contains(a2a(four, negative), "recv_counts[0] (-7)"));
    CHECK(contains(a2a(nine, nine), "send_counts[0] (9) must be in [0, 8]"));
    CHECK(contains(a2a(four, three), "sends 4 elements to itself but expects to receive 3"));
    CHECK(contains(thrown_message<foe::InvalidArgument>([&] {
                       comm.all_gather(std::span<const float>(a.data(), 4), std::span<float>(b.data(), 5), stream);
                   }),
                   "output holds 5 elements, expected 4"));
    CHECK_FALSE(comm.aborted());
    comm.all_to_all_v(in, four, out, four, stream);
    comm.synchronize(stream);
}

TEST_CASE("nccl: split makes a working one-rank communicator; a negative color makes an empty one")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    std::mt19937_64 rng(23);
    NcclComm sub = comm.split(3, 0);
    CHECK_FALSE(sub.empty());
    CHECK(sub.rank() == 0);
    CHECK(sub.size() == 1);
    CHECK(sub.device() == 0);
    check_all_reduce_keeps(sub, random_floats(300, rng), stream);

    NcclComm none = comm.split(-1, 0);  // NCCL_SPLIT_NOCOLOR: this rank is in no new communicator
    CHECK(none.empty());
    CHECK(none.size() == 0);
    std::vector<float> never_touched(4);
    CHECK_THROWS_AS(none.all_reduce_sum(std::span<float>(never_touched), stream), foe::CommError);

    sub = comm.split(7, 1);  // move assignment finalises the previous sub-communicator
    CHECK(sub.size() == 1);
    check_all_reduce_keeps(sub, random_bf16(64, rng).bits, stream);
    check_all_reduce_keeps(comm, random_floats(64, rng), stream);  // the parent still works
    sub.wait();
    comm.wait();
}

TEST_CASE("nccl: from_file with one rank writes the id, joins, and removes the file")
{
    if (!have_device()) return;
    TempDir dir;
    const auto path = dir.path / "job.ncclid";
    auto comm = NcclComm::from_file(path, 0, 1, 0);
    CHECK(comm.size() == 1);
    CHECK(comm.rank() == 0);
    CHECK_FALSE(std::filesystem::exists(path));
    CHECK_FALSE(std::filesystem::exists(dir.path / "job.ncclid.tmp"));
    Stream stream;
    std::mt19937_64 rng(24);
    check_all_reduce_keeps(comm, random_floats(10, rng), stream);
}

TEST_CASE("nccl: synchronize() on a stream that never completes throws CommError after the timeout and aborts")
{
    if (!have_device()) return;
    NcclOptions options;
    options.timeout = 300ms;
    auto comm = NcclComm::with_self(0, options);
    Stream stream;
    fc::DeviceBuffer<float> d(16);
    fc::fill_bytes(d, 0, stream);
    // Warm-up: NCCL's lazy setup of the first collective happens here, on a free stream.
    comm.all_reduce_sum(std::span<float>(d.data(), d.size()), stream);
    comm.synchronize(stream);
    {
        StreamBlocker blocker(stream);
        const auto start = test_clock::now();
        const std::string message = thrown_message<foe::CommError>([&] { comm.synchronize(stream); });
        const auto waited = test_clock::now() - start;
        blocker.release();
        CAPTURE(message);
        CHECK(contains(message, "synchronize"));
        CHECK(contains(message, "300 ms"));
        CHECK(contains(message, "rank 0 of 1"));
        CHECK(comm.aborted());
        CHECK(waited >= 300ms);
        CHECK(waited < 30s);
    }
    // Every later call refuses, quoting the failure.
    const std::string later = thrown_message<foe::CommError>(
        [&] { comm.all_reduce_sum(std::span<float>(d.data(), d.size()), stream); });
    CAPTURE(later);
    CHECK(contains(later, "all_reduce_sum"));
    CHECK(contains(later, "synchronize"));
    CHECK_THROWS_AS(comm.wait(), foe::CommError);
    CHECK_THROWS_AS((void)comm.split(0, 0), foe::CommError);
}

TEST_CASE("nccl: the watchdog aborts a collective that does not complete in time; wait() and later calls say which")
{
    if (!have_device()) return;
    NcclOptions options;
    options.timeout = 300ms;
    auto comm = NcclComm::with_self(0, options);
    Stream stream;
    constexpr std::size_t n = 1024;
    fc::DeviceBuffer<float> d(2 * n);
    fc::fill_bytes(d, 0, stream);
    const std::vector<index_t> counts{static_cast<index_t>(n)};
    const std::span<const float> in(d.data(), n);
    const std::span<float> out(d.data() + n, n);
    comm.all_to_all_v(in, counts, out, counts, stream);  // warm-up on a free stream (NCCL's lazy setup)
    comm.synchronize(stream);
    {
        StreamBlocker blocker(stream);
        const auto start = test_clock::now();
        // A real NCCL send/receive queued behind the spinning kernel: the watchdog times it out,
        // and its abort meets NCCL work that cannot run yet. wait() reports it without waiting for
        // the abort. (Should NCCL's non-blocking launch itself wait for the stream, the call
        // reports the timeout.)
        const std::string message = thrown_message<foe::CommError>([&] {
            comm.all_to_all_v(in, counts, out, counts, stream);
            comm.wait();
        });
        const auto waited = test_clock::now() - start;
        blocker.release();
        CAPTURE(message);
        CHECK(contains(message, "all_to_all_v"));
        CHECK(contains(message, "300 ms"));
        CHECK(comm.aborted());
        CHECK(waited >= 300ms);
        CHECK(waited < 30s);
    }
    const auto start = test_clock::now();
    const std::string later = thrown_message<foe::CommError>([&] {
        comm.all_gather(std::span<const float>(d.data(), 8), std::span<float>(d.data() + 8, 8), stream);
    });
    CAPTURE(later);
    CHECK(contains(later, "all_gather"));
    CHECK(contains(later, "all_to_all_v"));
    CHECK(test_clock::now() - start < 5s);  // refused at once, whatever the abort is doing
}

TEST_CASE("nccl: watch(stream, label) times out work the communicator did not enqueue and fails it")
{
    if (!have_device()) return;
    NcclOptions options;
    options.timeout = 300ms;
    auto comm = NcclComm::with_self(0, options);
    Stream stream;
    comm.watch(stream, "an idle stream");  // completes at once
    comm.wait();
    CHECK_FALSE(comm.aborted());
    {
        StreamBlocker blocker(stream);
        const auto start = test_clock::now();
        // As after a cudaGraphLaunch whose replay does not complete.
        const std::string message = thrown_message<foe::CommError>([&] {
            comm.watch(stream, "decode graph replay");
            comm.wait();
        });
        const auto waited = test_clock::now() - start;
        blocker.release();
        CAPTURE(message);
        CHECK(contains(message, "decode graph replay"));
        CHECK(contains(message, "300 ms"));
        CHECK(contains(message, "rank 0 of 1"));
        CHECK(comm.aborted());
        CHECK(waited >= 300ms);
        CHECK(waited < 30s);
    }
    fc::DeviceBuffer<float> d(4);
    const std::string later = thrown_message<foe::CommError>(
        [&] { comm.all_reduce_sum(std::span<float>(d.data(), d.size()), stream); });
    CAPTURE(later);
    CHECK(contains(later, "decode graph replay"));
    CHECK_THROWS_AS(comm.watch(stream, "later"), foe::CommError);
}

TEST_CASE("nccl: abort(reason) fails the communicator and later calls quote the reason")
{
    if (!have_device()) return;
    auto comm = NcclComm::with_self(0);
    Stream stream;
    comm.abort("rank 3 reported a failure");
    CHECK(comm.aborted());
    fc::DeviceBuffer<float> d(4);
    const std::string message = thrown_message<foe::CommError>(
        [&] { comm.all_reduce_sum(std::span<float>(d.data(), d.size()), stream); });
    CAPTURE(message);
    CHECK(contains(message, "rank 3 reported a failure"));
}
