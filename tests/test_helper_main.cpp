// pi0_test_helper: a real, separate process that the tests start as a peer, so that cross-process
// behaviour (shared memory, futex wake-ups, peer death, stale segments) is exercised for real.
//
//   pi0_test_helper ring-producer <segment> <capacity> <count>
//       Attaches the ring at offset 0 of <segment> and pushes <count> kFrameInput messages with
//       frame = 0, 1, 2, ... (input_slot = frame % 4, submit_ns = frame * 3).
//   pi0_test_helper ring-consumer <segment> <capacity> <count>
//       Pops <count> messages and checks that each validates and carries exactly the next frame;
//       exits 3 with a message on loss, duplication or reordering.
//   pi0_test_helper ring-pop-idle <segment> <capacity> <ms>
//       Blocks in pop on an (empty) ring for <ms> milliseconds; exits 0 on kTimeout. Prints the
//       thread CPU time it used, in microseconds, on stdout.
//   pi0_test_helper create-segment <tag> <bytes>
//       Creates a segment named by unique_segment_name(<tag>), prints its name on stdout, then
//       sleeps until killed (so tests can leave a segment behind with SIGKILL).
//   pi0_test_helper sleep-forever
//   pi0_test_helper exit-code <n>
//
// Exit codes: 0 success, 2 usage, 3 check failed, 4 unexpected wait status, 5 exception.
// Every helper dies with its parent (PR_SET_PDEATHSIG) so a crashed test leaves no stray peers.
#include <signal.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/ipc/ring.hpp"
#include "pi0/ipc/shm.hpp"

namespace {

using namespace pi0::ipc;
using Args = std::vector<std::string>;

constexpr uint32_t kTestInputSlots = 4;
constexpr std::chrono::seconds kTransferDeadline{60};

pid_t g_parent = 0;

bool parent_alive() {
  return ::getppid() == g_parent;
}

uint64_t parse_u64(const std::string& s) {
  size_t used = 0;
  const unsigned long long v = std::stoull(s, &used, 10);
  PI0_CHECK(used == s.size(), "not a number: '" + s + "'");
  return v;
}

[[noreturn]] void sleep_until_killed() {
  for (;;) ::pause();
}

int ring_producer(const Args& a) {
  if (a.size() != 3) return 2;
  auto seg = SharedSegment::open(a[0]);
  auto ring = SpscRing::attach(seg.data(), static_cast<uint32_t>(parse_u64(a[1])));
  const uint64_t count = parse_u64(a[2]);
  const Deadline deadline = Clock::now() + kTransferDeadline;
  Message m = make_message(MsgType::kFrameInput, Role::kOrchestrator);
  for (uint64_t i = 0; i < count; ++i) {
    m.frame = i;
    m.input_slot = static_cast<uint32_t>(i % kTestInputSlots);
    m.submit_ns = i * 3;
    const WaitStatus s = ring.push(m, deadline, parent_alive);
    if (s != WaitStatus::kOk) {
      std::fprintf(stderr, "ring-producer: push %llu: %s\n", static_cast<unsigned long long>(i),
                   wait_status_name(s));
      return 4;
    }
  }
  return 0;
}

int ring_consumer(const Args& a) {
  if (a.size() != 3) return 2;
  auto seg = SharedSegment::open(a[0]);
  auto ring = SpscRing::attach(seg.data(), static_cast<uint32_t>(parse_u64(a[1])));
  const uint64_t count = parse_u64(a[2]);
  const MessageLimits limits{1, kTestInputSlots, count};
  const Deadline deadline = Clock::now() + kTransferDeadline;
  Message m;
  for (uint64_t i = 0; i < count; ++i) {
    const WaitStatus s = ring.pop(m, deadline, parent_alive);
    if (s != WaitStatus::kOk) {
      std::fprintf(stderr, "ring-consumer: pop %llu: %s\n", static_cast<unsigned long long>(i),
                   wait_status_name(s));
      return 4;
    }
    const std::string why = validate(m, limits);
    if (!why.empty()) {
      std::fprintf(stderr, "ring-consumer: message %llu invalid: %s\n",
                   static_cast<unsigned long long>(i), why.c_str());
      return 3;
    }
    if (m.frame != i || m.input_slot != i % kTestInputSlots || m.submit_ns != i * 3) {
      std::fprintf(stderr, "ring-consumer: expected frame %llu, got frame %llu (%s)\n",
                   static_cast<unsigned long long>(i), static_cast<unsigned long long>(m.frame),
                   m.frame < i ? "duplicate or reordered" : "lost messages");
      return 3;
    }
  }
  if (ring.try_pop(m)) {
    std::fprintf(stderr, "ring-consumer: extra message (frame %llu) after %llu\n",
                 static_cast<unsigned long long>(m.frame), static_cast<unsigned long long>(count));
    return 3;
  }
  return 0;
}

int ring_pop_idle(const Args& a) {
  if (a.size() != 3) return 2;
  auto seg = SharedSegment::open(a[0]);
  auto ring = SpscRing::attach(seg.data(), static_cast<uint32_t>(parse_u64(a[1])));
  const auto wait = std::chrono::milliseconds(parse_u64(a[2]));
  timespec t0{}, t1{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  Message m;
  const WaitStatus s = ring.pop(m, Clock::now() + wait, parent_alive);
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  const long long cpu_us = (t1.tv_sec - t0.tv_sec) * 1'000'000LL + (t1.tv_nsec - t0.tv_nsec) / 1000;
  std::printf("%lld\n", cpu_us);
  std::fflush(stdout);
  if (s != WaitStatus::kTimeout) {
    std::fprintf(stderr, "ring-pop-idle: expected timeout, got %s\n", wait_status_name(s));
    return 4;
  }
  return 0;
}

int create_segment(const Args& a) {
  if (a.size() != 2) return 2;
  // Deliberately not owned past this point: the test kills us with SIGKILL, so the destructor
  // never runs, which is exactly the leak remove_stale_segments must clean up.
  auto seg = SharedSegment::create(unique_segment_name(a[0]), parse_u64(a[1]));
  std::printf("%s\n", seg.name().c_str());
  std::fflush(stdout);
  sleep_until_killed();
}

int sleep_forever(const Args& a) {
  if (!a.empty()) return 2;
  sleep_until_killed();
}

int exit_code(const Args& a) {
  if (a.size() != 1) return 2;
  return static_cast<int>(parse_u64(a[0]) & 0xff);
}

const std::map<std::string, std::function<int(const Args&)>>& commands() {
  static const std::map<std::string, std::function<int(const Args&)>> kCommands = {
      {"ring-producer", ring_producer}, {"ring-consumer", ring_consumer},
      {"ring-pop-idle", ring_pop_idle}, {"create-segment", create_segment},
      {"sleep-forever", sleep_forever}, {"exit-code", exit_code},
  };
  return kCommands;
}

int usage() {
  std::fprintf(stderr, "usage: pi0_test_helper <command> [args...]\ncommands:");
  for (const auto& [name, fn] : commands()) std::fprintf(stderr, " %s", name.c_str());
  std::fprintf(stderr, "\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  g_parent = ::getppid();
  // Already re-parented to init: the parent died before we ran, and no death signal would come.
  if (g_parent == 1) return 1;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  // The parent may have died between fork and prctl; then nobody would ever kill us.
  if (::getppid() != g_parent) return 1;
  if (argc < 2) return usage();
  const auto it = commands().find(argv[1]);
  if (it == commands().end()) return usage();
  try {
    const int rc = it->second(Args(argv + 2, argv + argc));
    if (rc == 2) {
      std::fprintf(stderr, "pi0_test_helper %s: wrong arguments\n", argv[1]);
      return usage();
    }
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pi0_test_helper %s: %s\n", argv[1], e.what());
    return 5;
  }
}
