#include "pi0/ipc/ring.hpp"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <new>
#include <string>

#include "pi0/check.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace pi0::ipc {

namespace {
// Internal linkage: other ipc sources may define constants of the same names.
constexpr uint64_t kRingMagic = 0x5030'5249'4e47'0001ULL;  // "P0RING" + layout revision
constexpr uint32_t kMinCapacity = 2;
constexpr uint32_t kMaxCapacity = 65536;
constexpr size_t kCacheLine = 64;
}  // namespace

// Shared by two processes that may be built separately, so: fixed-width fields, no pointers, and
// each side's hot counter on its own cache line so producer and consumer do not false-share.
struct RingHeader {
  uint64_t magic;  // written and read through std::atomic_ref: the header's publication
  uint32_t capacity;
  uint32_t message_size;
  // Written by the consumer only.
  alignas(kCacheLine) std::atomic<uint64_t> head;
  // Written by the producer only.
  alignas(kCacheLine) std::atomic<uint64_t> tail;
  // The consumer sleeps on push_seq while the ring is empty; the producer bumps it and wakes the
  // consumer only when consumer_waiting says someone sleeps, so the fast path makes no syscall.
  alignas(kCacheLine) std::atomic<uint32_t> push_seq;
  std::atomic<uint32_t> consumer_waiting;
  // Mirror image for a producer blocked on a full ring.
  alignas(kCacheLine) std::atomic<uint32_t> pop_seq;
  std::atomic<uint32_t> producer_waiting;
};

static_assert(std::is_standard_layout_v<RingHeader>);
static_assert(std::atomic_ref<uint64_t>::is_always_lock_free &&
              alignof(uint64_t) >= std::atomic_ref<uint64_t>::required_alignment);
static_assert(sizeof(RingHeader) == 5 * kCacheLine);
static_assert(sizeof(RingHeader) % alignof(Message) == 0);
static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "cross-process atomics must not fall back to a process-local lock");
static_assert(std::atomic<uint32_t>::is_always_lock_free,
              "cross-process atomics must not fall back to a process-local lock");
// The futex syscall operates on the raw 32-bit word behind the atomic.
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));

namespace {

enum class Step { kDone, kBlocked, kCorrupt };

constexpr int kSpinIterations = 200;
constexpr int kYieldIterations = 4;
// A spinning waiter (WaitPolicy::kSpin) yields its core this often, so that on a host with fewer
// free cores than spinners the thread it waits for still gets to run; on an idle core the yield
// returns at once.
constexpr uint32_t kSpinsPerYield = 256;

std::atomic<WaitPolicy> g_wait_policy{WaitPolicy::kAdaptive};

// Waits shorter than this are left to the initial spin and the futex; longer than this they are
// not steady enough (an idle pipeline) to be worth spinning for.
constexpr std::chrono::microseconds kShortestPredicted{200};
constexpr std::chrono::seconds kLongestPredicted{1};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

inline uint32_t* futex_word(std::atomic<uint32_t>& a) {
  return reinterpret_cast<uint32_t*>(&a);
}

// Shared (not FUTEX_PRIVATE) because waiter and waker live in different processes.
void futex_wait(std::atomic<uint32_t>& word, uint32_t expected, std::chrono::nanoseconds timeout) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
  // EAGAIN (word already changed), EINTR and ETIMEDOUT all send the caller back to re-check.
  ::syscall(SYS_futex, futex_word(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
  ::syscall(SYS_futex, futex_word(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

// The waker's half of the flag/recheck protocol. The waiter sets its flag and then re-reads the
// counter; we publish the counter and then read the flag. The seq_cst fence on both sides means at
// least one of us sees the other's store, so a waiter can never sleep through a publication.
inline void wake_if_waiting(std::atomic<uint32_t>& waiting, std::atomic<uint32_t>& seq) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (waiting.load(std::memory_order_relaxed) != 0) {
    seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(seq);
  }
}

inline Message* slots(RingHeader* h) {
  return reinterpret_cast<Message*>(reinterpret_cast<char*>(h) + sizeof(RingHeader));
}

bool valid_capacity(uint32_t capacity) {
  return capacity >= kMinCapacity && capacity <= kMaxCapacity && (capacity & (capacity - 1)) == 0;
}

Step push_step(RingHeader* h, uint32_t capacity, const Message& m) {
  const uint64_t tail = h->tail.load(std::memory_order_relaxed);
  const uint64_t head = h->head.load(std::memory_order_acquire);
  // Unsigned difference: also catches a head that ran ahead of the tail.
  const uint64_t used = tail - head;
  if (used > capacity) return Step::kCorrupt;
  if (used == capacity) return Step::kBlocked;
  std::memcpy(&slots(h)[tail & (capacity - 1)], &m, sizeof(Message));
  h->tail.store(tail + 1, std::memory_order_release);
  wake_if_waiting(h->consumer_waiting, h->push_seq);
  return Step::kDone;
}

Step pop_step(RingHeader* h, uint32_t capacity, Message& m) {
  const uint64_t head = h->head.load(std::memory_order_relaxed);
  const uint64_t tail = h->tail.load(std::memory_order_acquire);
  const uint64_t used = tail - head;
  if (used > capacity) return Step::kCorrupt;
  if (used == 0) return Step::kBlocked;
  std::memcpy(&m, &slots(h)[head & (capacity - 1)], sizeof(Message));
  h->head.store(head + 1, std::memory_order_release);
  wake_if_waiting(h->producer_waiting, h->pop_seq);
  return Step::kDone;
}

// Spin, then yield, then sleep on `seq` in slices no longer than kWaitSlice, re-trying `step`
// after each (spinning instead under kSpin, and under kAdaptive inside the window `history`
// predicts). `still_blocked` re-reads the counters after the waiter flag is raised (the waiter's
// half of the protocol in wake_if_waiting).
template <typename StepFn, typename BlockedFn>
WaitStatus wait_loop(StepFn&& step, BlockedFn&& still_blocked, std::atomic<uint32_t>& waiting,
                     std::atomic<uint32_t>& seq, Deadline deadline, const PeerCheck& peer_alive,
                     WaitHistory& history) {
  const auto start = Clock::now();
  auto done = [&] {
    history.record(Clock::now() - start);
    return WaitStatus::kOk;
  };
  for (int i = 0; i < kSpinIterations; ++i) {
    const Step s = step();
    if (s == Step::kDone) return done();
    if (s == Step::kCorrupt) return WaitStatus::kCorrupt;
    cpu_relax();
  }
  for (int i = 0; i < kYieldIterations; ++i) {
    const Step s = step();
    if (s == Step::kDone) return done();
    if (s == Step::kCorrupt) return WaitStatus::kCorrupt;
    ::sched_yield();
  }
  const WaitPolicy policy = g_wait_policy.load(std::memory_order_relaxed);
  const SpinWindow window =
      policy == WaitPolicy::kAdaptive ? spin_window(history.typical) : SpinWindow{};
  auto last_peer_check = Clock::now();
  for (uint32_t spins = 1;; ++spins) {
    const Step s = step();
    if (s == Step::kDone) return done();
    if (s == Step::kCorrupt) return WaitStatus::kCorrupt;

    const auto now = Clock::now();
    if (now >= deadline) return WaitStatus::kTimeout;
    if (peer_alive && now - last_peer_check >= kWaitSlice) {
      if (!peer_alive()) {
        // The peer may have pushed its last message (a stop, an error) or freed its last slot and
        // exited since the step above saw the ring blocked: what it left is still ours.
        const Step last = step();
        if (last == Step::kDone) return done();
        return last == Step::kCorrupt ? WaitStatus::kCorrupt : WaitStatus::kPeerDead;
      }
      last_peer_check = now;
    }
    const auto waited = now - start;
    if (policy == WaitPolicy::kSpin || (waited >= window.from && waited < window.until)) {
      if (spins % kSpinsPerYield == 0) {
        ::sched_yield();
      } else {
        cpu_relax();
      }
      continue;
    }

    const uint32_t expected = seq.load(std::memory_order_seq_cst);
    waiting.store(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (still_blocked()) {
      std::chrono::nanoseconds slice =
          std::min<std::chrono::nanoseconds>(deadline - now, kWaitSlice);
      // Asleep before the spin window: wake for it (a timer, not a futex wake-up from the peer).
      if (waited < window.from)
        slice = std::min<std::chrono::nanoseconds>(slice, window.from - waited);
      // A sleeper that was woken by a stale wake (or slept through a full slice) still checks the
      // peer at most one slice later; that bounds peer-death detection to about two slices.
      futex_wait(seq, expected, slice);
    }
    waiting.store(0, std::memory_order_relaxed);
  }
}

// Corrupt counters are not "full" or "empty": read as those, a peer's error or stop message
// would go unseen and the run be misreported, so they throw, as the blocking calls' callers do.
bool done_unless_corrupt(Step s, uint32_t capacity) {
  PI0_CHECK(s != Step::kCorrupt, "a shared ring is corrupt: its counters say more than its " +
                                     std::to_string(capacity) + " slots are queued");
  return s == Step::kDone;
}

}  // namespace

void WaitHistory::record(std::chrono::nanoseconds waited) {
  typical = typical.count() == 0 ? waited : (3 * typical + waited) / 4;
}

SpinWindow spin_window(std::chrono::nanoseconds typical) {
  if (typical < kShortestPredicted || typical > kLongestPredicted) return {};
  // Frame-to-frame jitter is tens of microseconds, but a slow frame now and then moves the
  // average; the margin also covers the sleeper's timer slack (50 us by default) and is capped so
  // that a long wait spins at most 4 ms. On an H100, sequential 100/100 with a margin of
  // 1/16 + 50 us came to 14.95-15.04 ms, against 14.92-14.96 spinning and 15.07-15.11 asleep.
  const std::chrono::nanoseconds margin = std::min<std::chrono::nanoseconds>(
      typical / 8 + std::chrono::microseconds(100), std::chrono::milliseconds(2));
  return {typical - margin, typical + margin};
}

const char* wait_policy_name(WaitPolicy policy) {
  switch (policy) {
    case WaitPolicy::kSleep:
      return "sleep";
    case WaitPolicy::kAdaptive:
      return "adaptive";
    case WaitPolicy::kSpin:
      return "spin";
  }
  return "unknown";
}

WaitPolicy parse_wait_policy(const std::string& name) {
  if (name == "sleep") return WaitPolicy::kSleep;
  if (name == "adaptive") return WaitPolicy::kAdaptive;
  if (name == "spin") return WaitPolicy::kSpin;
  throw Error("unknown wait policy '" + name + "' (sleep, adaptive or spin)");
}

void set_wait_policy(WaitPolicy policy) {
  g_wait_policy.store(policy, std::memory_order_relaxed);
}
WaitPolicy wait_policy() {
  return g_wait_policy.load(std::memory_order_relaxed);
}

const char* wait_status_name(WaitStatus s) {
  switch (s) {
    case WaitStatus::kOk:
      return "ok";
    case WaitStatus::kTimeout:
      return "timeout";
    case WaitStatus::kPeerDead:
      return "peer dead";
    case WaitStatus::kCorrupt:
      return "corrupt";
  }
  return "unknown";
}

size_t SpscRing::bytes_for(uint32_t capacity) {
  PI0_CHECK(valid_capacity(capacity),
            "ring capacity " + std::to_string(capacity) + " is not a power of two in [2, 65536]");
  return sizeof(RingHeader) + static_cast<size_t>(capacity) * sizeof(Message);
}

SpscRing SpscRing::create(void* where, uint32_t capacity) {
  const size_t bytes = bytes_for(capacity);
  PI0_CHECK(where != nullptr, "ring memory is null");
  PI0_CHECK(reinterpret_cast<uintptr_t>(where) % kCacheLine == 0,
            "ring memory is not 64-byte aligned");
  std::memset(where, 0, bytes);
  auto* h = new (where) RingHeader{};
  h->capacity = capacity;
  h->message_size = sizeof(Message);
  h->head.store(0, std::memory_order_relaxed);
  h->tail.store(0, std::memory_order_relaxed);
  h->push_seq.store(0, std::memory_order_relaxed);
  h->consumer_waiting.store(0, std::memory_order_relaxed);
  h->pop_seq.store(0, std::memory_order_relaxed);
  h->producer_waiting.store(0, std::memory_order_relaxed);
  // Magic last, released: an attach that acquires it sees the whole header (today every attach
  // follows a spawn or an open, which orders it anyway).
  std::atomic_ref<uint64_t>(h->magic).store(kRingMagic, std::memory_order_release);
  return SpscRing(h, capacity);
}

SpscRing SpscRing::attach(void* where, uint32_t capacity) {
  PI0_CHECK(valid_capacity(capacity),
            "ring capacity " + std::to_string(capacity) + " is not a power of two in [2, 65536]");
  PI0_CHECK(where != nullptr, "ring memory is null");
  PI0_CHECK(reinterpret_cast<uintptr_t>(where) % kCacheLine == 0,
            "ring memory is not 64-byte aligned");
  auto* h = std::launder(reinterpret_cast<RingHeader*>(where));
  const uint64_t magic = std::atomic_ref<uint64_t>(h->magic).load(std::memory_order_acquire);
  if (magic != kRingMagic) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "no ring at this address (magic 0x%016llx, expected 0x%016llx)",
                  static_cast<unsigned long long>(magic),
                  static_cast<unsigned long long>(kRingMagic));
    throw Error(buf);
  }
  PI0_CHECK(h->capacity == capacity, "ring capacity mismatch: shared header says " +
                                         std::to_string(h->capacity) + ", expected " +
                                         std::to_string(capacity));
  PI0_CHECK(h->message_size == sizeof(Message),
            "ring message size mismatch: shared header says " + std::to_string(h->message_size) +
                ", expected " + std::to_string(sizeof(Message)));
  return SpscRing(h, capacity);
}

bool SpscRing::try_push(const Message& m) {
  PI0_CHECK(header_ != nullptr, "push on a ring that is not attached");
  return done_unless_corrupt(push_step(header_, capacity_, m), capacity_);
}

bool SpscRing::try_pop(Message& m) {
  PI0_CHECK(header_ != nullptr, "pop on a ring that is not attached");
  return done_unless_corrupt(pop_step(header_, capacity_, m), capacity_);
}

WaitStatus SpscRing::push(const Message& m, Deadline deadline, const PeerCheck& peer_alive) {
  PI0_CHECK(header_ != nullptr, "push on a ring that is not attached");
  RingHeader* h = header_;
  const uint32_t cap = capacity_;
  return wait_loop([&] { return push_step(h, cap, m); },
                   [&] {
                     return h->tail.load(std::memory_order_relaxed) -
                                h->head.load(std::memory_order_seq_cst) ==
                            cap;
                   },
                   h->producer_waiting, h->pop_seq, deadline, peer_alive, push_history_);
}

WaitStatus SpscRing::pop(Message& m, Deadline deadline, const PeerCheck& peer_alive) {
  PI0_CHECK(header_ != nullptr, "pop on a ring that is not attached");
  RingHeader* h = header_;
  const uint32_t cap = capacity_;
  return wait_loop([&] { return pop_step(h, cap, m); },
                   [&] {
                     return h->tail.load(std::memory_order_seq_cst) ==
                            h->head.load(std::memory_order_relaxed);
                   },
                   h->consumer_waiting, h->push_seq, deadline, peer_alive, pop_history_);
}

size_t SpscRing::size_approx() const {
  if (header_ == nullptr) return 0;
  const uint64_t head = header_->head.load(std::memory_order_acquire);
  const uint64_t tail = header_->tail.load(std::memory_order_acquire);
  const uint64_t used = tail - head;
  return used > capacity_ ? capacity_ : static_cast<size_t>(used);
}

}  // namespace pi0::ipc
