// Cross-process tests: the peer is a real pi0_test_helper process, not a thread.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/ipc/ring.hpp"
#include "pi0/ipc/shm.hpp"

extern char** environ;

using namespace pi0::ipc;
using namespace std::chrono_literals;

namespace {

// A started pi0_test_helper. The destructor kills and reaps it if the test did not, so a failing
// REQUIRE never leaves a helper (or a zombie) behind.
class Child {
 public:
  explicit Child(const std::vector<std::string>& args, int stdout_fd = -1) {
    std::vector<std::string> argv_s{PI0_TEST_HELPER_EXE};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (stdout_fd >= 0) posix_spawn_file_actions_adddup2(&actions, stdout_fd, STDOUT_FILENO);
    const int rc = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    REQUIRE(rc == 0);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (!reaped_) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
  }

  pid_t pid() const { return pid_; }

  // True while the process runs; a killed but unreaped child is not running (unlike kill(pid, 0),
  // which still succeeds on a zombie). Does not reap, so wait() still gets the status.
  bool running() const {
    if (reaped_) return false;
    siginfo_t info{};
    const int rc = ::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT);
    return rc == 0 && info.si_pid == 0;
  }

  // The raw wait status, or nullopt if the child has not exited by the timeout.
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        return status;
      }
      if (Clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(2ms);
    }
  }

  void kill9() { ::kill(pid_, SIGKILL); }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
};

std::string describe(std::optional<int> status) {
  if (!status) return "still running";
  if (WIFEXITED(*status)) return "exit code " + std::to_string(WEXITSTATUS(*status));
  if (WIFSIGNALED(*status)) return "killed by signal " + std::to_string(WTERMSIG(*status));
  return "status " + std::to_string(*status);
}

bool exited_ok(std::optional<int> status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

double children_cpu_ms() {
  rusage ru{};
  ::getrusage(RUSAGE_CHILDREN, &ru);
  return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

struct RingSegment {
  explicit RingSegment(uint32_t capacity)
      : segment(SharedSegment::create(unique_segment_name("testring"),
                                      SpscRing::bytes_for(capacity))),
        ring(SpscRing::create(segment.data(), capacity)) {}
  SharedSegment segment;
  SpscRing ring;
};

constexpr uint32_t kCap = 64;
constexpr uint64_t kMillion = 1'000'000;

}  // namespace

TEST_CASE("one million messages from a helper process arrive in order", "[ipc]") {
  RingSegment rs(kCap);
  Child producer({"ring-producer", rs.segment.name(), std::to_string(kCap), std::to_string(kMillion)});
  const MessageLimits limits{1, 4, kMillion};
  const Deadline deadline = Clock::now() + 60s;
  auto peer_alive = [&] { return producer.running(); };

  uint64_t bad_at = kMillion;
  std::string bad_reason;
  Message m;
  for (uint64_t i = 0; i < kMillion; ++i) {
    const WaitStatus s = rs.ring.pop(m, deadline, peer_alive);
    if (s != WaitStatus::kOk) {
      bad_at = i;
      bad_reason = wait_status_name(s);
      break;
    }
    if (m.frame != i || m.input_slot != i % 4) {
      bad_at = i;
      bad_reason = "got frame " + std::to_string(m.frame);
      break;
    }
    if (const std::string why = validate(m, limits); !why.empty()) {
      bad_at = i;
      bad_reason = why;
      break;
    }
  }
  INFO("first bad message " << bad_at << ": " << bad_reason);
  CHECK(bad_at == kMillion);
  const auto status = producer.wait(10s);
  INFO("producer: " << describe(status));
  CHECK(exited_ok(status));
  CHECK_FALSE(rs.ring.try_pop(m));
}

TEST_CASE("one million messages between two helper processes arrive in order", "[ipc]") {
  RingSegment rs(kCap);
  const std::vector<std::string> args{rs.segment.name(), std::to_string(kCap),
                                      std::to_string(kMillion)};
  // Consumer first, so it starts out blocked on an empty ring.
  Child consumer({"ring-consumer", args[0], args[1], args[2]});
  Child producer({"ring-producer", args[0], args[1], args[2]});
  const auto consumer_status = consumer.wait(60s);
  const auto producer_status = producer.wait(10s);
  INFO("consumer: " << describe(consumer_status) << ", producer: " << describe(producer_status));
  CHECK(exited_ok(consumer_status));
  CHECK(exited_ok(producer_status));
  CHECK(rs.ring.size_approx() == 0);
}

TEST_CASE("the helper consumer detects lost messages", "[ipc]") {
  // The sequence check in the helper must be able to fail: feed it a gap.
  RingSegment rs(kCap);
  for (uint64_t frame : {0, 1, 3}) {
    Message m = make_message(MsgType::kFrameInput, Role::kOrchestrator);
    m.frame = frame;
    m.input_slot = static_cast<uint32_t>(frame % 4);
    m.submit_ns = frame * 3;
    REQUIRE(rs.ring.try_push(m));
  }
  Child consumer({"ring-consumer", rs.segment.name(), std::to_string(kCap), "10"});
  const auto status = consumer.wait(10s);
  INFO("consumer: " << describe(status));
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 3);
}

TEST_CASE("a blocked pop reports a SIGKILLed peer process within 200 ms", "[ipc]") {
  RingSegment rs(8);
  Child peer({"sleep-forever"});
  REQUIRE(peer.running());

  std::atomic<int64_t> killed_at_ns{0};
  std::thread killer([&] {
    std::this_thread::sleep_for(150ms);
    killed_at_ns = Clock::now().time_since_epoch().count();
    peer.kill9();
  });
  Message m;
  const auto start = Clock::now();
  const WaitStatus s = rs.ring.pop(m, start + 10s, [&] { return peer.running(); });
  const auto returned = Clock::now();
  killer.join();
  CHECK(s == WaitStatus::kPeerDead);
  const auto after_kill = returned - Clock::time_point(Clock::duration(killed_at_ns.load()));
  INFO("pop returned "
       << std::chrono::duration_cast<std::chrono::microseconds>(after_kill).count()
       << " us after the kill");
  CHECK(after_kill >= 0ms);
  CHECK(after_kill < 200ms);
  const auto status = peer.wait(5s);
  REQUIRE(status);
  CHECK(WIFSIGNALED(*status));
}

TEST_CASE("a helper blocked in pop for half a second uses little CPU", "[ipc]") {
  RingSegment rs(8);
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  const double cpu_before = children_cpu_ms();
  std::optional<int> status;
  {
    Child idle({"ring-pop-idle", rs.segment.name(), "8", "500"}, out[1]);
    ::close(out[1]);
    status = idle.wait(10s);
  }
  const double child_cpu = children_cpu_ms() - cpu_before;
  char buf[64] = {};
  const ssize_t n = ::read(out[0], buf, sizeof(buf) - 1);
  ::close(out[0]);
  INFO("helper: " << describe(status) << ", process CPU " << child_cpu << " ms, thread CPU in pop "
                  << (n > 0 ? buf : "?") << " us");
  CHECK(exited_ok(status));
  REQUIRE(n > 0);
  CHECK(std::stol(buf) < 50'000);
  // Whole process, start-up included.
  CHECK(child_cpu < 50.0);
}

TEST_CASE("segments of a SIGKILLed creator are found and removed as stale", "[ipc]") {
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  Child creator({"create-segment", "victim", "8192"}, out[1]);
  ::close(out[1]);
  // The helper prints the name once the segment exists.
  std::string name;
  char c;
  while (::read(out[0], &c, 1) == 1 && c != '\n') name += c;
  ::close(out[0]);
  REQUIRE_FALSE(name.empty());
  CHECK(name.rfind(std::string(kSegmentPrefix) + std::to_string(creator.pid()) + "_", 0) == 0);
  const std::vector<std::string> before = segments_of_process(creator.pid());
  CHECK(std::find(before.begin(), before.end(), name) != before.end());

  // A live creator's segment is not stale.
  std::vector<std::string> removed = remove_stale_segments();
  CHECK(std::find(removed.begin(), removed.end(), name) == removed.end());
  struct stat st{};
  CHECK(::stat(("/dev/shm/" + name).c_str(), &st) == 0);

  creator.kill9();
  const auto status = creator.wait(5s);  // reaped: a zombie's pid still exists
  REQUIRE(status);
  REQUIRE(WIFSIGNALED(*status));
  CHECK(::stat(("/dev/shm/" + name).c_str(), &st) == 0);  // the kill left it behind

  removed = remove_stale_segments();
  CHECK(std::find(removed.begin(), removed.end(), name) != removed.end());
  CHECK(::stat(("/dev/shm/" + name).c_str(), &st) != 0);
  CHECK(segments_of_process(creator.pid()).empty());
}
