// A lock-free single-producer / single-consumer ring of Messages placed in shared memory.
// Indices are free-running 64-bit counters; the slot index is taken modulo the capacity that the
// process attaching the ring expects, never modulo a value read from shared memory.
// Blocking push/pop spin briefly, then sleep on a futex in short slices so that an idle pipeline
// burns no CPU, and check a deadline and the peer's liveness between slices. By default each ring
// learns how long its waits last and spins only through a short window around the expected
// arrival (WaitPolicy::kAdaptive); a process that wants the lowest wake-up latency whatever the
// timing keeps spinning (kSpin), at the cost of a core.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "pi0/ipc/protocol.hpp"

namespace pi0::ipc {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
// Returns false once the peer is known to be dead. Called between wait slices (at most every
// kWaitSlice), never in the uncontended fast path.
using PeerCheck = std::function<bool()>;

inline constexpr std::chrono::milliseconds kWaitSlice{10};

enum class WaitStatus { kOk, kTimeout, kPeerDead, kCorrupt };
const char* wait_status_name(WaitStatus s);

// How this process's blocked push/pop wait once the short spin is over (deadline and peer checks
// unchanged). A futex wake-up costs the sleeper tens of microseconds on a frame's critical path.
// kSleep: asleep on a futex. kSpin: spinning, which saves the wake-up and keeps one core busy
// per waiter. kAdaptive (the default): asleep, except for a window around the arrival the ring's
// recent waits predict, in which it spins; steady waits (frames back to back or at a camera rate)
// then cost no wake-up, for about an eighth of a core (a wait of t spins ~t/8 + 100 us).
enum class WaitPolicy { kSleep, kAdaptive, kSpin };
void set_wait_policy(WaitPolicy policy);
WaitPolicy wait_policy();
// "sleep", "adaptive" or "spin", as --wait takes them.
const char* wait_policy_name(WaitPolicy policy);
// The inverse; throws pi0::Error for any other name.
WaitPolicy parse_wait_policy(const std::string& name);

// What one ring end's past waits predict about its next one (process-local).
struct WaitHistory {
  std::chrono::nanoseconds typical{0};  // moving average of the last few waits; 0: none yet
  void record(std::chrono::nanoseconds waited);
};

// The adaptive policy's spin window for a wait expected to last `typical`, as offsets from the
// wait's start: asleep before `from`, spinning until `until`, asleep again after (a late message
// then costs a wake-up, as under kSleep). Empty (from == until) when the prediction is too short
// to be worth a sleep or too long to be steady.
struct SpinWindow {
  std::chrono::nanoseconds from{0}, until{0};
};
SpinWindow spin_window(std::chrono::nanoseconds typical);

struct RingHeader;  // defined in ring.cpp; standard layout, offsets only

class SpscRing {
 public:
  // Bytes needed for a ring of `capacity` messages (a power of two, 2..65536), header included.
  static size_t bytes_for(uint32_t capacity);
  // Constructs an empty ring at `where` (which must be 64-byte aligned and bytes_for(capacity)
  // long).
  static SpscRing create(void* where, uint32_t capacity);
  // Attaches to a ring another process created; checks the header's magic and capacity against
  // `capacity`. Throws pi0::Error if they differ.
  static SpscRing attach(void* where, uint32_t capacity);

  SpscRing() = default;

  // false if full / empty; pi0::Error if the shared counters are inconsistent (corrupt).
  bool try_push(const Message& m);
  bool try_pop(Message& m);
  // kCorrupt when the shared counters are inconsistent (more queued than the capacity).
  WaitStatus push(const Message& m, Deadline deadline, const PeerCheck& peer_alive);
  WaitStatus pop(Message& m, Deadline deadline, const PeerCheck& peer_alive);

  uint32_t capacity() const { return capacity_; }
  // What this end's waits have lasted lately (the adaptive policy's prediction).
  std::chrono::nanoseconds typical_pop_wait() const { return pop_history_.typical; }
  size_t size_approx() const;

 private:
  SpscRing(RingHeader* header, uint32_t capacity) : header_(header), capacity_(capacity) {}
  RingHeader* header_ = nullptr;
  uint32_t capacity_ = 0;
  WaitHistory push_history_, pop_history_;
};

}  // namespace pi0::ipc
