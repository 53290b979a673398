#include "pi0/decoder_worker.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>
#include <limits>
#include <thread>

#include "pi0/check.hpp"
#include "pi0/config.hpp"

namespace pi0 {
namespace {

using ipc::Message;
using ipc::MsgType;
using ipc::RingId;
using ipc::WaitStatus;

constexpr double kPollSeconds = 1.0;
constexpr double kPushSeconds = 60.0;
constexpr std::chrono::milliseconds kPeerCheckInterval{10};

}  // namespace

int run_decoder_worker(ipc::WorkerRuntime& rt) {
  auto& control = rt.control();
  // Test hook: each frame is reported done as frame + N, as a misbehaving decoder might, so that
  // the tests see the orchestrator refuse a frame that is not in flight (or out of range) and
  // name this worker. Read before the load, so that a bad value fails the start.
  const auto reported_frame_offset = static_cast<uint64_t>(
      env_integer("PI0_TEST_DECODER_REPORT_FRAME_OFFSET", 0, std::numeric_limits<long>::max(), 0));
  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<DecoderStage> stage =
      rt.options().backend == "cuda" ? make_cuda_decoder_stage(rt) : make_cpu_decoder_stage(rt);
  spdlog::info("decoder ready ({} backend, model {}, {:.1f} s to load)", rt.options().backend,
               rt.options().model,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count());
  rt.send_ready();

  ipc::SpscRing& from_encoder = control.ring(RingId::kEncoderToDecoder);
  ipc::SpscRing& to_encoder = control.ring(RingId::kDecoderToEncoder);
  ipc::SpscRing& to_orch = control.ring(RingId::kDecoderToOrch);
  const ipc::MessageLimits limits = control.limits();
  const auto peers_ok = [&rt] { return rt.peer_alive(); };
  const auto orch_ok = [&rt] { return rt.orchestrator_alive(); };

  // Frames handed to the stage and not yet reported, oldest first, and the K/V slots they hold.
  std::deque<Message> in_flight;
  std::vector<bool> kv_busy(limits.kv_slots, false);
  // A frame's layer waits tell its slot's signals from the ones the slot's previous frame left by
  // the frame's generation (frame + 1), which holds only while frame numbers grow.
  uint64_t next_frame = 0;  // the lowest frame number that may come next
  // Reports the oldest frame once the stage has finished it. False: the orchestrator is gone.
  const auto finish_oldest = [&]() -> bool {
    const DecodeTiming timing = stage->complete();
    const Message m = in_flight.front();
    in_flight.pop_front();
    kv_busy[m.kv_slot] = false;

    Message freed = ipc::make_message(MsgType::kSlotFree, ipc::Role::kDecoder);
    freed.frame = m.frame;
    freed.kv_slot = m.kv_slot;
    const WaitStatus fs = to_encoder.push(freed, ipc::WorkerRuntime::after(kPushSeconds), peers_ok);
    PI0_CHECK(fs == WaitStatus::kOk, std::string("could not return a K/V slot to the encoder: ") +
                                         ipc::wait_status_name(fs));

    Message done = ipc::make_message(MsgType::kFrameDone, ipc::Role::kDecoder);
    done.frame = m.frame + reported_frame_offset;
    done.input_slot = m.input_slot;
    done.kv_slot = m.kv_slot;
    done.submit_ns = m.submit_ns;
    done.encode_ns = m.encode_ns;
    done.decode_ns = static_cast<uint64_t>(timing.decode_ms * 1e6);
    done.handoff_ns = timing.handoff_us >= 0 ? static_cast<uint64_t>(timing.handoff_us * 1e3) : 0;
    const WaitStatus ds = to_orch.push(done, ipc::WorkerRuntime::after(kPushSeconds), orch_ok);
    PI0_CHECK(ds == WaitStatus::kOk || ds == WaitStatus::kPeerDead,
              std::string("could not report frame done: ") + ipc::wait_status_name(ds));
    return ds == WaitStatus::kOk;
  };

  // A peer is gone or a stop was signalled: the run is over, whatever is still in flight. A
  // signal ends the worker quietly (status 0); a peer's death is an error.
  const auto peer_gone = [&rt]() -> int {
    if (rt.stop_signalled()) {
      spdlog::warn("stop signalled; exiting");
      return 0;
    }
    PI0_CHECK(rt.orchestrator_alive(), "the orchestrator died");
    throw Error("the encoder worker died");
  };
  auto last_peer_check = ipc::Clock::now();

  for (;;) {
    if (!in_flight.empty()) {
      // When no more frames fit, wait for the oldest (in slices, to keep checking the peers).
      const bool full = in_flight.size() >= stage->max_in_flight();
      if (stage->wait_oldest(full ? kPeerCheckInterval : std::chrono::microseconds(0))) {
        if (!finish_oldest()) return rt.stop_signalled() ? 0 : 1;
        continue;
      }
      // The brief ring polls below never reach the ring's own peer check, and a frame whose
      // "ready" event never fires (its encoder died) would keep us here for good.
      if (ipc::Clock::now() - last_peer_check >= kPeerCheckInterval) {
        last_peer_check = ipc::Clock::now();
        if (!peers_ok()) return peer_gone();
      }
      if (full) continue;
    }
    // While a frame runs, look for the next one only briefly, so that the finished frame is
    // reported at once and the next is queued behind the running one.
    Message m;
    const auto deadline = in_flight.empty() ? ipc::WorkerRuntime::after(kPollSeconds)
                                            : ipc::Clock::now() + stage->poll_slice();
    const WaitStatus st = from_encoder.pop(m, deadline, peers_ok);
    if (st == WaitStatus::kTimeout) continue;
    if (st == WaitStatus::kPeerDead) return peer_gone();
    PI0_CHECK(st == WaitStatus::kOk, "ring from the encoder is corrupt");
    const std::string reason = ipc::validate(m, limits);
    PI0_CHECK(reason.empty(), "rejected a message from the encoder: " + reason);
    const auto type = static_cast<MsgType>(m.type);
    if (type == MsgType::kStop) {
      while (!in_flight.empty()) {
        if (!finish_oldest()) return rt.stop_signalled() ? 0 : 1;
      }
      rt.record_stage_times(stage->stage_times());
      stage->log_summary();
      rt.at_stop_test_hook();
      rt.send_stopped();
      spdlog::info("decoder stopped");
      return 0;
    }
    PI0_CHECK(type == MsgType::kSlotReady, "the encoder sent " + std::string(ipc::type_name(type)) +
                                               " where a ready slot was expected");
    PI0_CHECK(!kv_busy[m.kv_slot], "the encoder handed over K/V slot " + std::to_string(m.kv_slot) +
                                       " for frame " + std::to_string(m.frame) +
                                       " while an earlier frame held it");
    PI0_CHECK(m.frame >= next_frame, "the encoder handed over frame " + std::to_string(m.frame) +
                                         " after frame " + std::to_string(next_frame - 1) +
                                         "; frame numbers must grow");
    next_frame = m.frame + 1;
    kv_busy[m.kv_slot] = true;
    stage->submit(m.frame, m.input_slot, m.kv_slot);
    in_flight.push_back(m);
  }
}

}  // namespace pi0
