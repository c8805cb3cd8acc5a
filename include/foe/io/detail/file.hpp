#pragma once
// File reads and atomic whole-file writes, shared by the safetensors and config.json code.
//
// Reads check that the path is a regular file before sizing a buffer from it (a FIFO or a
// device has no meaningful size), and refuse files above a caller-given limit before allocating.
// Weight files are not read whole: ReadOnlyFile reads the byte ranges asked for, so that a
// reader checks a header before it commits memory to the data behind it. Writes go to a
// temporary file next to the target and are renamed over it, so that a crash or a full disk
// never leaves a half-written model file under the final name. Paths in messages go through
// json::detail::describe_path(): a file name can hold terminal control characters.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/io/json.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define FOE_HAS_MMAP 1
#else
#define FOE_HAS_MMAP 0
#endif

namespace foe::detail::io {

/// The whole content of the regular file at path. IoError when it cannot be opened or read;
/// FormatError when it is larger than max_bytes (`what` names the kind of file for the message).
[[nodiscard]] std::vector<std::byte> read_whole_file(
    const std::filesystem::path& path, std::uintmax_t max_bytes = std::numeric_limits<std::uintmax_t>::max(),
    std::string_view what = "file");

/// Writes bytes to path through a temporary file in the same directory and a rename, so that
/// readers see either the old file or the complete new one. IoError on failure, after removing
/// the temporary file.
void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes);

/// path for a message: escaped and cut (json::detail::describe_path()).
[[nodiscard]] inline std::string display(const std::filesystem::path& path)
{
    return json::detail::describe_path(path.string());
}

/// A regular file opened for reading byte ranges at given offsets. The size is the opened file's,
/// so a file replaced after opening is not mixed with its successor. read() is safe to call from
/// several threads; copies share the open file.
class ReadOnlyFile {
public:
    /// IoError when path is not a regular file or cannot be opened.
    [[nodiscard]] static std::shared_ptr<const ReadOnlyFile> open(const std::filesystem::path& path);

    /// The path for messages, as display() writes it.
    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

    /// Fills out with the bytes at [offset, offset + out.size()). IoError naming the file when
    /// the range is not inside it or the read comes up short (a file truncated after opening).
    void read(std::uint64_t offset, std::span<std::byte> out) const;

private:
    ReadOnlyFile() = default;

    std::string name_;
    std::uint64_t size_ = 0;
    mutable std::mutex mutex_;  ///< one seek-and-read at a time on in_
    mutable std::ifstream in_;
};

/// A whole regular file mapped read-only into memory (POSIX mmap, private): the weights of a
/// checkpoint used in place. Pages are read from the file when first touched, so a process that
/// uses a tenth of a file reads and holds a tenth of it; pages of the page cache are shared by
/// every process that maps the file. The file must not be truncated while mapped (a read past
/// the new end would raise SIGBUS, as for every mapped-file reader); it is checked to have the
/// size its header was validated against when the mapping is made.
class MappedFile {
public:
    /// True where foe can map files (POSIX); elsewhere weights are read into memory.
    static constexpr bool supported = FOE_HAS_MMAP != 0;

    /// Maps the file at path; IoError naming it (`name`) if it cannot be mapped or its size is no
    /// longer expected_size.
    [[nodiscard]] static std::shared_ptr<const MappedFile> map(const std::filesystem::path& path, std::string name,
                                                              std::uint64_t expected_size);
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile();

    [[nodiscard]] const std::byte* data() const noexcept { return data_; }
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

    /// Reads the pages of [offset, offset + size) into memory now (asks the kernel to read ahead,
    /// then touches one byte per page), so that the first forward does not pay for them.
    void prefetch(std::uint64_t offset, std::uint64_t size) const;

private:
    MappedFile() = default;
    const std::byte* data_ = nullptr;
    std::uint64_t size_ = 0;
};

// ---------------------------------------------------------------------------------------------

/// The message of the last OS error, for IoError messages.
[[nodiscard]] inline std::string last_os_error(int saved_errno)
{
    if (saved_errno == 0) return "unknown error";
    return std::error_code(saved_errno, std::generic_category()).message();
}

inline std::vector<std::byte> read_whole_file(const std::filesystem::path& path, std::uintmax_t max_bytes,
                                              std::string_view what)
{
    const std::string name = display(path);
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec) raise<IoError>(name, ": cannot open: ", ec.message());
    if (!std::filesystem::is_regular_file(status)) raise<IoError>(name, ": cannot read: not a regular file");
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) raise<IoError>(name, ": cannot read its size: ", ec.message());
    require<FormatError>(size <= max_bytes, name, ": ", what, " is ", size, " bytes, above the limit of ",
                         max_bytes, " bytes");
    require<IoError>(size <= static_cast<std::uintmax_t>(std::numeric_limits<std::streamsize>::max()), name,
                     ": file of ", size, " bytes is too large to read");

    errno = 0;
    std::ifstream in(path, std::ios::binary);
    if (!in) raise<IoError>(name, ": cannot open for reading: ", last_os_error(errno));
    std::vector<std::byte> bytes;
    try {
        bytes.resize(static_cast<std::size_t>(size));
    } catch (const std::bad_alloc&) {
        raise<IoError>(name, ": out of memory for its ", size, " bytes");
    }
    // Reading std::byte storage through char* is allowed aliasing.
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
    const auto got = in.gcount();
    if (static_cast<std::uintmax_t>(got) != size)
        raise<IoError>(name, ": read only ", got, " of ", size, " bytes (was the file truncated while reading?)");
    return bytes;
}

inline std::shared_ptr<const MappedFile> MappedFile::map(const std::filesystem::path& path, std::string name,
                                                        std::uint64_t expected_size)
{
    std::shared_ptr<MappedFile> m(new MappedFile());
#if FOE_HAS_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) raise<IoError>(name, ": cannot open for mapping: ", last_os_error(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        const int saved = errno;
        ::close(fd);
        raise<IoError>(name, ": cannot map: ", S_ISREG(st.st_mode) ? last_os_error(saved) : "not a regular file");
    }
    if (static_cast<std::uint64_t>(st.st_size) != expected_size) {
        ::close(fd);
        raise<IoError>(name, ": the file changed while it was being loaded: it holds ", st.st_size,
                       " bytes, its header was read from a file of ", expected_size);
    }
    if (expected_size > 0) {
        void* p = ::mmap(nullptr, static_cast<std::size_t>(expected_size), PROT_READ, MAP_PRIVATE, fd, 0);
        const int saved = errno;
        ::close(fd);  // the mapping keeps the file
        if (p == MAP_FAILED) raise<IoError>(name, ": cannot map its ", expected_size, " bytes: ", last_os_error(saved));
        m->data_ = static_cast<const std::byte*>(p);
    } else {
        ::close(fd);
    }
    m->size_ = expected_size;
#else
    (void)path;
    (void)expected_size;
    raise<IoError>(name, ": this platform cannot map files; load with LoadOptions::map_files = false");
#endif
    return m;
}

inline MappedFile::~MappedFile()
{
#if FOE_HAS_MMAP
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), static_cast<std::size_t>(size_));
#endif
}

inline void MappedFile::prefetch(std::uint64_t offset, std::uint64_t size) const
{
    if (size == 0 || offset >= size_) return;
    size = std::min(size, size_ - offset);
#if FOE_HAS_MMAP
    const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    const std::uint64_t begin = offset / page * page;
    (void)::madvise(const_cast<std::byte*>(data_ + begin), static_cast<std::size_t>(offset + size - begin),
                    MADV_WILLNEED);
    // Touch one byte per page: the read-ahead above is only advice.
    volatile std::byte sink{};
    for (std::uint64_t at = offset; at < offset + size; at += page) sink = data_[at];
    sink = data_[offset + size - 1];
    (void)sink;
#endif
}

inline std::shared_ptr<const ReadOnlyFile> ReadOnlyFile::open(const std::filesystem::path& path)
{
    std::shared_ptr<ReadOnlyFile> f(new ReadOnlyFile());
    f->name_ = display(path);
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec) raise<IoError>(f->name_, ": cannot open: ", ec.message());
    if (!std::filesystem::is_regular_file(status)) raise<IoError>(f->name_, ": cannot read: not a regular file");
    errno = 0;
    f->in_.open(path, std::ios::binary);
    if (!f->in_) raise<IoError>(f->name_, ": cannot open for reading: ", last_os_error(errno));
    f->in_.seekg(0, std::ios::end);
    const std::streamoff end = f->in_.tellg();
    if (!f->in_ || end < 0) raise<IoError>(f->name_, ": cannot read its size");
    f->size_ = static_cast<std::uint64_t>(end);
    return f;
}

inline void ReadOnlyFile::read(std::uint64_t offset, std::span<std::byte> out) const
{
    if (out.empty()) return;
    require<IoError>(offset <= size_ && out.size() <= size_ - offset, name_, ": cannot read bytes [", offset, ", ",
                     offset + out.size(), "): the file holds ", size_, " bytes");
    const std::lock_guard lock(mutex_);
    in_.clear();
    errno = 0;
    in_.seekg(static_cast<std::streamoff>(offset));
    // Reading std::byte storage through char* is allowed aliasing.
    in_.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
    const auto got = in_.gcount();
    if (!in_ || static_cast<std::uint64_t>(got) != out.size()) {
        const int saved = errno;
        in_.clear();
        if (saved != 0) raise<IoError>(name_, ": cannot read ", out.size(), " bytes at offset ", offset, ": ",
                                       last_os_error(saved));
        raise<IoError>(name_, ": read only ", got, " of the ", out.size(), " bytes at offset ", offset,
                       " (was the file truncated while reading?)");
    }
}

/// A name for the temporary file that no other writer in this or another thread or process is
/// likely to pick at the same time.
[[nodiscard]] inline std::filesystem::path temporary_sibling(const std::filesystem::path& path)
{
    static std::atomic<std::uint64_t> counter{0};
    const auto ticks = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    const auto thread = static_cast<std::uint64_t>(std::hash<std::thread::id>{}(std::this_thread::get_id()));
    const std::uint64_t tag = ticks ^ (thread * 0x9e3779b97f4a7c15ull) ^ (counter.fetch_add(1) << 48);
    std::filesystem::path tmp = path;
    tmp += ".tmp-" + std::to_string(tag);
    return tmp;
}

/// What a write to `path` replaces: path itself or, when path is a symbolic link, the file the link
/// finally names (the link stays a link, as with a plain open for writing). IoError when that
/// exists and is not a regular file: renaming a temporary file over a device node, a FIFO or a
/// directory would replace it (as root, `--logits-out /dev/null` would have replaced /dev/null).
[[nodiscard]] inline std::filesystem::path write_target(const std::filesystem::path& path)
{
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path target = path;
    // Link by link (weakly_canonical stops at a link whose target does not exist yet).
    for (int hops = 0; fs::is_symlink(fs::symlink_status(target, ec)); ++hops) {
        if (hops == 40) raise<IoError>(display(path), ": more than 40 levels of symbolic links");
        const fs::path next = fs::read_symlink(target, ec);
        if (ec) raise<IoError>(display(path), ": cannot read the symbolic link ", display(target), ": ", ec.message());
        target = next.is_absolute() ? next : target.parent_path() / next;
    }
    const fs::file_status st = fs::status(target, ec);
    if (!fs::exists(st) || fs::is_regular_file(st)) return target;
    const char* kind = fs::is_directory(st)       ? "a directory"
                       : fs::is_character_file(st) ? "a character device"
                       : fs::is_block_file(st)     ? "a block device"
                       : fs::is_fifo(st)           ? "a FIFO"
                       : fs::is_socket(st)         ? "a socket"
                                                   : "not a regular file";
    raise<IoError>(display(path), target == path ? std::string() : foe::detail::concat(" (a link to ", display(target), ")"),
                   " is ", kind, ": foe writes only regular files (through a temporary file renamed over the "
                   "target); choose another path");
}

inline void write_file_atomically(const std::filesystem::path& requested, std::span<const std::byte> bytes)
{
    const std::filesystem::path path = write_target(requested);
    const std::filesystem::path tmp = temporary_sibling(path);
    const auto discard_tmp = [&] {
        std::error_code ignored;
        std::filesystem::remove(tmp, ignored);
    };
    {
        errno = 0;
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) raise<IoError>(display(path), ": cannot create the temporary file ", display(tmp), ": ",
                                 last_os_error(errno));
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        out.close();
        if (!out) {
            const int saved = errno;
            discard_tmp();
            raise<IoError>(display(path), ": writing ", bytes.size(), " bytes to ", display(tmp),
                           " failed: ", last_os_error(saved));
        }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
        discard_tmp();
        raise<IoError>(display(path), ": cannot rename ", display(tmp), " to it: ", ec.message());
    }
}

}  // namespace foe::detail::io
