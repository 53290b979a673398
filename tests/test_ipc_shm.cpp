#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <set>
#include <string>
#include <vector>

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/ipc/shm.hpp"

using namespace pi0::ipc;

namespace {

bool shm_exists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm/" + name).c_str(), &st) == 0;
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// A pid that certainly belonged to a process which has exited (and been reaped) a moment ago.
pid_t dead_pid() {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) ::_exit(0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return pid;
}

}  // namespace

TEST_CASE("segment names are unique and carry the pid, its namespace and the tag", "[ipc]") {
  struct stat ns {};
  REQUIRE(::stat("/proc/self/ns/pid", &ns) == 0);
  const std::string prefix = std::string(kSegmentPrefix) + std::to_string(::getpid()) + "_n" +
                             std::to_string(ns.st_ino) + "_";
  std::set<std::string> names;
  for (int i = 0; i < 100; ++i) {
    const std::string name = unique_segment_name("ring");
    CHECK(name.rfind(prefix, 0) == 0);
    CHECK(name.size() == prefix.size() + 16 + 1 + 4);
    CHECK(name.substr(name.size() - 5) == "_ring");
    const std::string hex = name.substr(prefix.size(), 16);
    CHECK(hex.find_first_not_of("0123456789abcdef") == std::string::npos);
    CHECK(name.find('/') == std::string::npos);
    names.insert(name);
  }
  CHECK(names.size() == 100);
}

TEST_CASE("a created segment is private zeroed shared and removed by its owner", "[ipc]") {
  const std::string name = unique_segment_name("test");
  // A permissive umask must not widen the mode, a strict one must not lock the owner out.
  const mode_t old_umask = ::umask(0);
  SharedSegment seg = SharedSegment::create(name, 10000);
  ::umask(old_umask);
  REQUIRE(seg);
  CHECK(seg.owner());
  CHECK(seg.name() == name);
  CHECK(seg.size() == 10000);

  struct stat st {};
  REQUIRE(::stat(("/dev/shm/" + name).c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  CHECK(st.st_size == 10000);
  CHECK(st.st_uid == ::getuid());

  const auto* bytes = static_cast<const unsigned char*>(seg.data());
  CHECK(std::all_of(bytes, bytes + seg.size(), [](unsigned char b) { return b == 0; }));

  CHECK(contains(segments_of_process(::getpid()), name));

  {
    SharedSegment view = SharedSegment::open(name);
    CHECK_FALSE(view.owner());
    CHECK(view.size() >= 10000);
    CHECK(view.data() != seg.data());
    std::memcpy(seg.data(), "hello", 6);
    CHECK(std::strcmp(static_cast<const char*>(view.data()), "hello") == 0);
  }
  CHECK(shm_exists(name));  // closing a non-owning view leaves the name alone

  SECTION("destruction removes the name") {
    { SharedSegment gone = std::move(seg); }
    CHECK_FALSE(seg);
    CHECK_FALSE(shm_exists(name));
  }
  SECTION("move construction keeps one owner") {
    SharedSegment moved(std::move(seg));
    CHECK_FALSE(seg);
    CHECK(seg.data() == nullptr);
    CHECK(seg.size() == 0);
    CHECK(moved.owner());
    CHECK(shm_exists(name));
  }
  SECTION("move assignment removes the overwritten owner's name") {
    seg = SharedSegment::create(unique_segment_name("second"), 4096);
    CHECK_FALSE(shm_exists(name));
    CHECK(shm_exists(seg.name()));
  }
  SECTION("an owner whose name was already removed is still destroyed quietly") {
    CHECK(SharedSegment::remove(name));
    CHECK_FALSE(SharedSegment::remove(name));
  }
}

// Resizing a tmpfs object reserves nothing: a segment /dev/shm has no room for used to pass
// creation and then kill the process with SIGBUS at its first touch (a container's 64 MiB
// /dev/shm and a long prompt), leaving the segment behind.
TEST_CASE("a segment larger than the room in /dev/shm is a named error and is not left behind",
          "[ipc]") {
  struct statvfs fs {};
  REQUIRE(::statvfs("/dev/shm", &fs) == 0);
  if (fs.f_blocks == 0) {
    WARN("/dev/shm has no size limit here; nothing to check");
    return;
  }
  const uint64_t available = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
  const std::string name = unique_segment_name("huge");
  try {
    (void)SharedSegment::create(name, available + (uint64_t{64} << 20));
    FAIL("created a segment larger than the free room");
  } catch (const pi0::Error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("not enough room in /dev/shm") != std::string::npos);
    CHECK(what.find(name) != std::string::npos);
  }
  CHECK_FALSE(shm_exists(name));
}

TEST_CASE("create refuses an existing name and open of a missing name throws", "[ipc]") {
  const std::string name = unique_segment_name("dup");
  SharedSegment seg = SharedSegment::create(name, 4096);
  CHECK_THROWS_AS(SharedSegment::create(name, 4096), pi0::Error);
  CHECK(shm_exists(name));  // the failed second create must not remove the first one's name

  const std::string missing = unique_segment_name("missing");
  try {
    SharedSegment::open(missing);
    FAIL("open of a missing segment did not throw");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()).find(missing) != std::string::npos);
  }
  CHECK_THROWS_AS(SharedSegment::create("bad/name", 4096), pi0::Error);
  CHECK_FALSE(SharedSegment::remove(missing));
}

TEST_CASE("remove_stale_segments removes segments of dead pids only", "[ipc]") {
  const pid_t dead = dead_pid();
  const std::string stale = segment_name_of(dead, "fake");
  const std::string live = unique_segment_name("live");
  SharedSegment stale_seg = SharedSegment::create(stale, 4096);
  SharedSegment live_seg = SharedSegment::create(live, 4096);
  // A dead pid of another pid namespace (another container sharing /dev/shm) proves nothing: its
  // run may be alive. Nor does a name without a namespace (an older build's).
  const std::string ns_field = "_n";
  const std::string ours = segment_name_of(dead, "elsewhere");
  const size_t ns_at = ours.find(ns_field) + ns_field.size();
  const std::string elsewhere = ours.substr(0, ns_at) + "9" + ours.substr(ns_at);  // another inode
  SharedSegment elsewhere_seg = SharedSegment::create(elsewhere, 4096);
  const std::string no_ns =
      std::string(kSegmentPrefix) + std::to_string(dead) + "_0123456789abcdef_old";
  SharedSegment no_ns_seg = SharedSegment::create(no_ns, 4096);
  // Names with our prefix that do not follow the scheme must be left alone, not misparsed.
  const std::string odd = std::string(kSegmentPrefix) + "notapid" +
                          unique_segment_name("odd").substr(kSegmentPrefix.size());
  SharedSegment odd_seg = SharedSegment::create(odd, 4096);

  REQUIRE(contains(segments_of_process(dead), stale));
  const std::vector<std::string> removed = remove_stale_segments();
  CHECK(contains(removed, stale));
  CHECK_FALSE(contains(removed, live));
  CHECK_FALSE(contains(removed, odd));
  CHECK_FALSE(contains(removed, elsewhere));
  CHECK_FALSE(contains(removed, no_ns));
  CHECK(shm_exists(elsewhere));
  CHECK(shm_exists(no_ns));
  CHECK_FALSE(shm_exists(stale));
  CHECK(shm_exists(live));
  CHECK(shm_exists(odd));
  // Only the two names that were not this namespace's, or had none, stay.
  CHECK(segments_of_process(dead).size() == 2);
  // The owner of the removed stale name is destroyed at scope exit without complaint.
}

// The file the CUDA driver leaves in /dev/shm for the interprocess events of a process that has
// exited ("cuda.shm.<n>.<pid in hex>.<m>"): the orchestrator removes those its workers recorded
// once they are reaped. A process of another container sharing /dev/shm can have the same pid, so
// a file of that name the worker did not record stays, older or newer.
namespace {

std::string hex_pid(long pid) {
  char text[32];
  std::snprintf(text, sizeof text, "%lx", pid);
  return text;
}

// Records `names` (files in /dev/shm) as a worker's watch would.
CudaEventFiles record_of(const std::vector<std::string>& names) {
  CudaEventFiles files{};
  for (const std::string& name : names) {
    struct stat st {};
    REQUIRE(::stat(("/dev/shm/" + name).c_str(), &st) == 0);
    files.device[files.count] = st.st_dev;
    files.inode[files.count] = st.st_ino;
    ++files.count;
  }
  return files;
}

auto sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

TEST_CASE("remove_cuda_event_files removes the files a gone process recorded, and only those",
          "[ipc]") {
  const pid_t dead = dead_pid();
  const std::vector<std::string> recorded = {"cuda.shm.0." + hex_pid(dead) + ".1",
                                             "cuda.shm.1." + hex_pid(dead) + ".2"};
  // Another container's file of the same pid, another pid whose hex starts like the dead one's,
  // our own (alive), and names off the scheme.
  const std::vector<std::string> others = {"cuda.shm.2." + hex_pid(dead) + ".3",
                                           "cuda.shm.0." + hex_pid(dead) + "0.1",
                                           "cuda.shm.0." + hex_pid(::getpid()) + ".1",
                                           "cuda.shm.0." + hex_pid(dead) + "zz.1",
                                           "cuda.shm." + hex_pid(dead),
                                           "xcuda.shm.0." + hex_pid(dead) + ".1"};
  // Owners remove what is left at scope exit; removing a name twice is no error.
  std::vector<SharedSegment> files;
  for (const auto& names : {recorded, others})
    for (const std::string& name : names) files.push_back(SharedSegment::create(name, 4096));
  const CudaEventFiles record = record_of(recorded);

  CHECK(cuda_event_files_of_process(static_cast<int>(dead)).size() == 3);
  CHECK(remove_cuda_event_files(::getpid(), record).empty());  // we are alive: ours stay
  CHECK(
      remove_cuda_event_files(static_cast<int>(dead), CudaEventFiles{}).empty());  // none recorded
  CHECK(remove_cuda_event_files(0, record).empty());
  CHECK(sorted(remove_cuda_event_files(static_cast<int>(dead), record)) == sorted(recorded));
  for (const std::string& name : recorded) CHECK_FALSE(shm_exists(name));
  for (const std::string& name : others) CHECK(shm_exists(name));
  CHECK(cuda_event_files_of_process(static_cast<int>(dead)) ==
        std::vector<std::string>{others.front()});
}

// A record read from shared memory may say anything: a count past the arrays is bounded by them.
TEST_CASE("remove_cuda_event_files bounds a corrupt record's count", "[ipc]") {
  const pid_t dead = dead_pid();
  std::vector<std::string> names;
  std::vector<SharedSegment> files;
  for (uint32_t n = 0; n <= CudaEventFiles::kMax; ++n) {
    names.push_back("cuda.shm." + std::to_string(n) + "." + hex_pid(dead) + ".1");
    files.push_back(SharedSegment::create(names.back(), 4096));
  }
  CudaEventFiles record = record_of({names.begin(), names.begin() + CudaEventFiles::kMax});
  record.count = UINT32_MAX;
  CHECK(sorted(remove_cuda_event_files(static_cast<int>(dead), record)) ==
        sorted({names.begin(), names.begin() + CudaEventFiles::kMax}));
  CHECK(shm_exists(names.back()));
}

// A worker's watch records the files of its pid made after the watch began, not those before, and
// the worker removes only what it recorded.
TEST_CASE("a CudaEventFileWatch records only the files made since it began", "[ipc]") {
  const std::string before = "cuda.shm.7." + hex_pid(::getpid()) + ".1";
  const std::string made = "cuda.shm.8." + hex_pid(::getpid()) + ".1";
  SharedSegment old_file = SharedSegment::create(before, 4096);
  CudaEventFiles published{};
  {
    const CudaEventFileWatch watch;
    SharedSegment new_file = SharedSegment::create(made, 4096);
    REQUIRE(watch.record(published) == 1);
    CHECK(published.count == 1);
    CHECK(record_of({made}).inode[0] == published.inode[0]);
    CHECK(remove_own_cuda_event_files() == std::vector<std::string>{made});
    CHECK_FALSE(shm_exists(made));
  }
  CHECK(shm_exists(before));
  CHECK(remove_own_cuda_event_files().empty());
}
