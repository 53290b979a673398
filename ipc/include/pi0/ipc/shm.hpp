// A POSIX shared-memory segment (Boost.Interprocess) with a move-only owner.
// Names are unique per run and carry the creator's pid and pid namespace so that segments left by
// a dead run can be found and removed: "/pi0mps_<pid>_n<pid namespace inode>_<16 hex
// digits>_<tag>".
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace pi0::ipc {

inline constexpr std::string_view kSegmentPrefix = "pi0mps_";

// A fresh name for this process: kSegmentPrefix + pid + "_n" + pid namespace + '_' + 64 random
// bits in hex + '_' + tag.
std::string unique_segment_name(std::string_view tag);
// The same for another process `pid` of this pid namespace (tests make stale names with it).
std::string segment_name_of(long pid, std::string_view tag);

class SharedSegment {
 public:
  // Creates the segment exclusively with mode 0600 (regardless of umask), sized and zero-filled.
  // The returned owner removes the name on destruction. Throws pi0::Error on failure.
  static SharedSegment create(const std::string& name, size_t bytes);
  // Maps an existing segment read-write; does not remove it on destruction. Throws pi0::Error.
  static SharedSegment open(const std::string& name);
  // Removes a segment name; false if there was none. Never throws.
  static bool remove(const std::string& name) noexcept;

  SharedSegment();
  SharedSegment(SharedSegment&&) noexcept;
  SharedSegment& operator=(SharedSegment&&) noexcept;
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;
  ~SharedSegment();

  void* data() const;
  size_t size() const;
  const std::string& name() const;
  bool owner() const;
  explicit operator bool() const { return impl_ != nullptr; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Removes segments whose name starts with kSegmentPrefix and whose creator, of this pid namespace,
// no longer runs (a segment of another namespace, or of a name without one, is left alone).
// Returns the names removed. Never throws.
std::vector<std::string> remove_stale_segments() noexcept;
// Names of existing segments created by `pid` (for tests and leak checks).
std::vector<std::string> segments_of_process(int pid);

// The CUDA driver backs the interprocess events a process exports (cudaEventInterprocess) with a
// file of its own in /dev/shm, "cuda.shm.<n>.<the pid in hex>.<m>", and leaves it there when the
// process exits, even cleanly (driver 580: one 80 KB file per encoder worker). The names of such
// files of `pid`.
std::vector<std::string> cuda_event_files_of_process(int pid);

// The pid in such a name is the one the driver saw, which a process of another pid namespace
// sharing /dev/shm (another container) can have too, and its file may be older or newer than
// ours. So a process records which files are its own by identity (device and inode) as the driver
// makes them, and only those are removed. Placed in shared memory (WorkerInfo): written by the
// worker, `count` last (std::atomic_ref, release); read by the orchestrator, `count` first
// (acquire) and bounded by kMax.
struct CudaEventFiles {
  static constexpr uint32_t kMax = 4;
  uint32_t count;
  uint32_t reserved;
  uint64_t device[kMax];
  uint64_t inode[kMax];
};
static_assert(std::is_standard_layout_v<CudaEventFiles> &&
              std::is_trivially_copyable_v<CudaEventFiles>);
static_assert(sizeof(CudaEventFiles) == 8 + 16 * CudaEventFiles::kMax);
static_assert(std::atomic_ref<uint32_t>::is_always_lock_free &&
              offsetof(CudaEventFiles, count) % std::atomic_ref<uint32_t>::required_alignment == 0);

// Taken just before this process makes its interprocess events; record() then finds the event
// files of this process that appeared since.
class CudaEventFileWatch {
 public:
  CudaEventFileWatch();
  // Writes the new files' identities (at most kMax) into `published` and keeps them for
  // remove_own_cuda_event_files. Returns how many.
  uint32_t record(CudaEventFiles& published) const;

 private:
  std::vector<std::pair<uint64_t, uint64_t>> before_;  // (device, inode)
};

// Removes the files of `pid` that `published` names, once `pid` has exited and been reaped (a
// running or zombie pid keeps its files). Files of that name it does not list stay. Returns the
// names removed. Never throws.
std::vector<std::string> remove_cuda_event_files(int pid, const CudaEventFiles& published) noexcept;
// The calling process's own files, as its CudaEventFileWatch recorded them: for a worker that
// exits after its orchestrator died, when nobody is left to remove them (its events destroyed;
// an importer keeps its mapping, only the name goes). Never throws.
std::vector<std::string> remove_own_cuda_event_files() noexcept;

}  // namespace pi0::ipc
