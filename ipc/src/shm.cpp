#include "pi0/ipc/shm.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>

#include "pi0/check.hpp"

namespace bip = boost::interprocess;

namespace pi0::ipc {

struct SharedSegment::Impl {
  // Declaration order matters: the region is unmapped before the object's descriptor is closed.
  bip::shared_memory_object object;
  bip::mapped_region region;
  std::string name;
  bool owner = false;

  ~Impl() {
    if (owner) SharedSegment::remove(name);
  }
};

namespace {

constexpr const char* kShmDir = "/dev/shm";

// Boost prepends '/' itself and rejects names with further slashes; catch that here so the error
// names the segment instead of surfacing as an opaque interprocess_exception.
void check_name(const std::string& name) {
  PI0_CHECK(!name.empty() && name.find('/') == std::string::npos && name.size() < 250,
            "invalid shared memory segment name '" + name + "'");
}

// The pid namespace this process's pids belong to: the inode of /proc/self/ns/pid, 0 where /proc
// does not say. A pid names a process only inside its namespace; runs in two containers that
// share /dev/shm (as MPS clients often do) see each other's segments but not each other's pids.
uint64_t pid_namespace() {
  static const uint64_t ns = [] {
    struct stat st {};
    return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : uint64_t{0};
  }();
  return ns;
}

// Reads the decimal number at the front of `text` up to `stop`, and drops both; false if there is
// no such number or it exceeds `max`.
bool take_number(std::string_view& text, char stop, uint64_t max, uint64_t& value) {
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data() || value > max) return false;
  text.remove_prefix(static_cast<size_t>(end - text.data()));
  if (text.empty() || text.front() != stop) return false;
  text.remove_prefix(1);
  return true;
}

struct SegmentCreator {
  long pid = -1;
  uint64_t pid_namespace = 0;
};

// Parses "pi0mps_<pid>_n<pid namespace>_..."; pid -1 if the name does not follow the scheme.
SegmentCreator creator_of_segment(std::string_view name) {
  SegmentCreator creator;
  if (name.substr(0, kSegmentPrefix.size()) != kSegmentPrefix) return creator;
  name.remove_prefix(kSegmentPrefix.size());
  uint64_t pid = 0, ns = 0;
  if (!take_number(name, '_', 0x7fffffff, pid) || pid == 0) return creator;
  if (name.empty() || name.front() != 'n') return creator;
  name.remove_prefix(1);
  if (!take_number(name, '_', UINT64_MAX, ns)) return creator;
  creator.pid = static_cast<long>(pid);
  creator.pid_namespace = ns;
  return creator;
}

std::vector<std::string> list_segments(std::string_view prefix) {
  std::vector<std::string> names;
  DIR* dir = ::opendir(kShmDir);
  if (dir == nullptr) return names;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string_view name(entry->d_name);
    if (name.substr(0, prefix.size()) == prefix) names.emplace_back(name);
  }
  ::closedir(dir);
  return names;
}

constexpr std::string_view kCudaEventFilePrefix = "cuda.shm.";

// The pid of a "cuda.shm.<n>.<pid in hex>.<m>" file; -1 if the name does not follow the scheme.
long pid_of_cuda_event_file(std::string_view name) {
  if (name.substr(0, kCudaEventFilePrefix.size()) != kCudaEventFilePrefix) return -1;
  name.remove_prefix(kCudaEventFilePrefix.size());
  const size_t first = name.find('.');
  if (first == std::string_view::npos) return -1;
  const size_t second = name.find('.', first + 1);
  if (second == std::string_view::npos || second == first + 1 || second - first - 1 > 8) return -1;
  const std::string_view hex = name.substr(first + 1, second - first - 1);
  long pid = 0;
  const auto [end, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), pid, 16);
  if (ec != std::errc() || end != hex.data() + hex.size() || pid <= 0) return -1;
  return pid;
}

// Only ESRCH proves a process is gone; EPERM means it runs under another user. A zombie still
// counts as alive until its parent reaps it.
bool process_gone(long pid) {
  return ::kill(static_cast<pid_t>(pid), 0) == -1 && errno == ESRCH;
}

std::string no_room(const std::string& name, size_t bytes, uint64_t available) {
  std::string text = "not enough room in " + std::string(kShmDir) + " for shared memory segment '" +
                     name + "': it needs " + std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB";
  if (available > 0) text += ", " + std::to_string(available >> 20) + " MiB are free";
  return text + " (a container's /dev/shm is often 64 MiB: raise it, e.g. docker --shm-size)";
}

}  // namespace

std::string unique_segment_name(std::string_view tag) {
  return segment_name_of(::getpid(), tag);
}

std::string segment_name_of(long pid, std::string_view tag) {
  // random_device rather than a seeded PRNG: two runs started in the same instant with recycled
  // pids must still not collide, and create_only then fails loudly instead of sharing a segment.
  std::random_device rd;
  const uint64_t bits = (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
  char buf[96];
  std::snprintf(buf, sizeof(buf), "%ld_n%llu_%016llx_", pid,
                static_cast<unsigned long long>(pid_namespace()),
                static_cast<unsigned long long>(bits));
  std::string name(kSegmentPrefix);
  name += buf;
  name += tag;
  return name;
}

SharedSegment SharedSegment::create(const std::string& name, size_t bytes) {
  check_name(name);
  PI0_CHECK(bytes > 0, "shared memory segment '" + name + "' must not be empty");
  auto impl = std::make_unique<Impl>();
  try {
    impl->object = bip::shared_memory_object(bip::create_only, name.c_str(), bip::read_write,
                                             bip::permissions(0600));
  } catch (const bip::interprocess_exception& e) {
    throw Error("cannot create shared memory segment '" + name + "': " + e.what());
  }
  // From here on a failure must not leave the name behind.
  impl->name = name;
  impl->owner = true;
  try {
    // Boost applies the mode through open(2), which the umask may narrow or a patched libc widen;
    // fchmod makes it exactly 0600 whatever the environment.
    const int fd = impl->object.get_mapping_handle().handle;
    if (::fchmod(fd, 0600) != 0)
      throw Error("cannot chmod shared memory segment '" + name + "': " + std::strerror(errno));
    // Resizing a tmpfs object reserves no pages: the first touch of a page /dev/shm has no room
    // for would kill the process with SIGBUS. So check the room, then reserve every page now,
    // where running out is an error with a name. A new object reads as zeros.
    struct statvfs fs {};
    // f_blocks 0: a tmpfs mounted without a size limit, which reports no free blocks either.
    if (::statvfs(kShmDir, &fs) == 0 && fs.f_blocks != 0) {
      const auto available = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
      if (bytes > available) throw Error(no_room(name, bytes, available));
    }
    impl->object.truncate(static_cast<bip::offset_t>(bytes));
    const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (err == ENOSPC) throw Error(no_room(name, bytes, 0));
    if (err != 0 && err != EOPNOTSUPP && err != EINVAL)
      throw Error("cannot reserve shared memory segment '" + name + "': " + std::strerror(err));
    impl->region = bip::mapped_region(impl->object, bip::read_write, 0, bytes);
  } catch (const bip::interprocess_exception& e) {
    throw Error("cannot size or map shared memory segment '" + name + "': " + e.what());
  }
  SharedSegment seg;
  seg.impl_ = std::move(impl);
  return seg;
}

SharedSegment SharedSegment::open(const std::string& name) {
  check_name(name);
  auto impl = std::make_unique<Impl>();
  try {
    impl->object = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_write);
    bip::offset_t size = 0;
    if (!impl->object.get_size(size) || size <= 0)
      throw Error("shared memory segment '" + name + "' is empty or its size is unknown");
    impl->region = bip::mapped_region(impl->object, bip::read_write);
  } catch (const bip::interprocess_exception& e) {
    throw Error("cannot open shared memory segment '" + name + "': " + e.what());
  }
  impl->name = name;
  impl->owner = false;
  SharedSegment seg;
  seg.impl_ = std::move(impl);
  return seg;
}

bool SharedSegment::remove(const std::string& name) noexcept {
  try {
    return bip::shared_memory_object::remove(name.c_str());
  } catch (...) {
    return false;
  }
}

SharedSegment::SharedSegment() = default;
SharedSegment::SharedSegment(SharedSegment&&) noexcept = default;
SharedSegment& SharedSegment::operator=(SharedSegment&&) noexcept = default;
SharedSegment::~SharedSegment() = default;

void* SharedSegment::data() const {
  return impl_ ? impl_->region.get_address() : nullptr;
}
size_t SharedSegment::size() const {
  return impl_ ? impl_->region.get_size() : 0;
}
const std::string& SharedSegment::name() const {
  static const std::string kEmpty;
  return impl_ ? impl_->name : kEmpty;
}
bool SharedSegment::owner() const {
  return impl_ && impl_->owner;
}

std::vector<std::string> remove_stale_segments() noexcept {
  std::vector<std::string> removed;
  try {
    for (const std::string& name : list_segments(kSegmentPrefix)) {
      const SegmentCreator creator = creator_of_segment(name);
      // Another namespace's pid says nothing here: its run may well be alive.
      if (creator.pid <= 0 || creator.pid_namespace != pid_namespace()) continue;
      if (process_gone(creator.pid)) {
        if (SharedSegment::remove(name)) removed.push_back(name);
      }
    }
  } catch (...) {
    // Allocation failure while listing: report what was removed so far.
  }
  return removed;
}

std::vector<std::string> segments_of_process(int pid) {
  return list_segments(std::string(kSegmentPrefix) + std::to_string(pid) + "_");
}

std::vector<std::string> cuda_event_files_of_process(int pid) {
  std::vector<std::string> names = list_segments(kCudaEventFilePrefix);
  std::erase_if(names,
                [pid](const std::string& name) { return pid_of_cuda_event_file(name) != pid; });
  return names;
}

namespace {

using FileId = std::pair<uint64_t, uint64_t>;  // (device, inode)

std::optional<FileId> id_of_shm_file(const std::string& name) {
  struct stat st {};
  if (::stat((std::string(kShmDir) + "/" + name).c_str(), &st) != 0) return std::nullopt;
  return FileId{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

std::vector<FileId> event_file_ids_of_process(int pid) {
  std::vector<FileId> ids;
  for (const std::string& name : cuda_event_files_of_process(pid)) {
    if (const auto id = id_of_shm_file(name)) ids.push_back(*id);
  }
  return ids;
}

// What this process's watch recorded, for remove_own_cuda_event_files.
CudaEventFiles g_own_event_files{};

// Copies a record whose count may be anything (it may come from shared memory).
std::vector<FileId> ids_in(const CudaEventFiles& files) {
  // atomic_ref takes no const object in C++20; it only loads here.
  const uint32_t count = std::min(
      std::atomic_ref<uint32_t>(const_cast<uint32_t&>(files.count)).load(std::memory_order_acquire),
      CudaEventFiles::kMax);
  std::vector<FileId> ids;
  for (uint32_t i = 0; i < count; ++i) ids.emplace_back(files.device[i], files.inode[i]);
  return ids;
}

std::vector<std::string> remove_listed_event_files(int pid, const std::vector<FileId>& ids) {
  std::vector<std::string> removed;
  if (ids.empty()) return removed;
  for (const std::string& name : cuda_event_files_of_process(pid)) {
    const auto id = id_of_shm_file(name);
    if (!id || std::find(ids.begin(), ids.end(), *id) == ids.end()) continue;  // not the one made
    if (SharedSegment::remove(name)) removed.push_back(name);
  }
  return removed;
}

}  // namespace

CudaEventFileWatch::CudaEventFileWatch() : before_(event_file_ids_of_process(::getpid())) {}

uint32_t CudaEventFileWatch::record(CudaEventFiles& published) const {
  uint32_t count = 0;
  for (const FileId& id : event_file_ids_of_process(::getpid())) {
    if (count == CudaEventFiles::kMax) break;
    if (std::find(before_.begin(), before_.end(), id) != before_.end()) continue;
    for (CudaEventFiles* files : {&published, &g_own_event_files}) {
      files->device[count] = id.first;
      files->inode[count] = id.second;
    }
    ++count;
  }
  for (CudaEventFiles* files : {&published, &g_own_event_files})
    std::atomic_ref<uint32_t>(files->count).store(count, std::memory_order_release);
  return count;
}

std::vector<std::string> remove_cuda_event_files(int pid,
                                                 const CudaEventFiles& published) noexcept {
  try {
    if (pid <= 0 || !process_gone(pid)) return {};
    return remove_listed_event_files(pid, ids_in(published));
  } catch (...) {
    return {};  // allocation failure while listing
  }
}

std::vector<std::string> remove_own_cuda_event_files() noexcept {
  try {
    return remove_listed_event_files(static_cast<int>(::getpid()), ids_in(g_own_event_files));
  } catch (...) {
    return {};
  }
}

}  // namespace pi0::ipc
