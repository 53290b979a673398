#include "pi0/encoder_worker.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>

#include "pi0/check.hpp"

namespace pi0 {
namespace {

using ipc::Message;
using ipc::MsgType;
using ipc::RingId;
using ipc::WaitStatus;

// How long a frame may wait for a free K/V slot before the decoder is considered stuck.
constexpr double kSlotWaitSeconds = 60.0;
constexpr double kPollSeconds = 1.0;

void require_valid(const Message& m, const ipc::MessageLimits& limits, const char* from) {
  const std::string reason = ipc::validate(m, limits);
  PI0_CHECK(reason.empty(), std::string("rejected a message from the ") + from + ": " + reason);
}

}  // namespace

int run_encoder_worker(ipc::WorkerRuntime& rt) {
  auto& control = rt.control();
  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<EncoderStage> stage =
      rt.options().backend == "cuda" ? make_cuda_encoder_stage(rt) : make_cpu_encoder_stage(rt);
  spdlog::info("encoder ready ({} backend, model {}, {:.1f} s to load)", rt.options().backend,
               rt.options().model,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count());
  rt.send_ready();

  ipc::SpscRing& from_orch = control.ring(RingId::kOrchToEncoder);
  ipc::SpscRing& to_decoder = control.ring(RingId::kEncoderToDecoder);
  ipc::SpscRing& from_decoder = control.ring(RingId::kDecoderToEncoder);
  const ipc::MessageLimits limits = control.limits();
  const auto orch_ok = [&rt] { return rt.orchestrator_alive(); };
  const auto peers_ok = [&rt] { return rt.peer_alive(); };
  // A wait ended because the orchestrator or the decoder is gone, or a stop signal came: a
  // signal ends the worker quietly wherever it waits (a peer's death is an error, exit 1).
  const auto stopped = [&rt] {
    if (!rt.stop_signalled()) return false;
    spdlog::warn("stop signalled; exiting");
    return true;
  };

  std::deque<uint32_t> free_slots;
  std::vector<bool> slot_busy(limits.kv_slots, false);
  // A frame's generation (frame + 1), which this worker writes into its slot's layer signals, tells
  // them from the ones the slot's previous frame left only while frame numbers grow.
  uint64_t next_frame = 0;  // the lowest frame number that may come next
  for (uint32_t s = 0; s < limits.kv_slots; ++s) free_slots.push_back(s);

  const auto take_slot_free = [&](const Message& m) {
    require_valid(m, limits, "decoder");
    PI0_CHECK(m.type == static_cast<uint16_t>(MsgType::kSlotFree),
              "the decoder sent " + std::string(ipc::type_name(static_cast<MsgType>(m.type))) +
                  " where a slot-free message was expected");
    PI0_CHECK(slot_busy[m.kv_slot],
              "the decoder freed K/V slot " + std::to_string(m.kv_slot) + ", which was not in use");
    slot_busy[m.kv_slot] = false;
    stage->slot_returned(m.kv_slot);
    free_slots.push_back(m.kv_slot);
  };

  for (;;) {
    Message m;
    const WaitStatus st = from_orch.pop(m, ipc::WorkerRuntime::after(kPollSeconds), orch_ok);
    if (st == WaitStatus::kTimeout) continue;
    if (st == WaitStatus::kPeerDead) {
      if (stopped()) return 0;
      spdlog::warn("orchestrator gone; exiting");
      return 1;
    }
    PI0_CHECK(st == WaitStatus::kOk, "ring from the orchestrator is corrupt");
    require_valid(m, limits, "orchestrator");
    const auto type = static_cast<MsgType>(m.type);
    if (type == MsgType::kStop) {
      Message stop = ipc::make_message(MsgType::kStop, ipc::Role::kEncoder);
      const WaitStatus fs = to_decoder.push(stop, ipc::WorkerRuntime::after(5.0), peers_ok);
      if (fs != WaitStatus::kOk) spdlog::warn("could not forward stop to the decoder");
      // Slots still out are returned by the decoder as it drains; collect their timings.
      Message free_msg;
      while (std::count(slot_busy.begin(), slot_busy.end(), true) > 0) {
        const WaitStatus ds = from_decoder.pop(free_msg, ipc::WorkerRuntime::after(5.0), peers_ok);
        // A decoder gone or slow here only costs its slots' timings; a corrupt ring is an error.
        PI0_CHECK(ds != WaitStatus::kCorrupt, "ring from the decoder is corrupt");
        if (ds != WaitStatus::kOk) break;
        take_slot_free(free_msg);
      }
      rt.record_stage_times(stage->stage_times());
      rt.at_stop_test_hook();
      rt.send_stopped();
      spdlog::info("encoder stopped");
      return 0;
    }
    PI0_CHECK(type == MsgType::kFrameInput, "the orchestrator sent " +
                                                std::string(ipc::type_name(type)) +
                                                " where a frame was expected");
    PI0_CHECK(m.frame >= next_frame, "the orchestrator sent frame " + std::to_string(m.frame) +
                                         " after frame " + std::to_string(next_frame - 1) +
                                         "; frame numbers must grow");
    next_frame = m.frame + 1;

    Message free_msg;
    while (from_decoder.try_pop(free_msg)) take_slot_free(free_msg);
    const auto slot_deadline = ipc::WorkerRuntime::after(kSlotWaitSeconds);
    while (free_slots.empty()) {
      const WaitStatus fs = from_decoder.pop(free_msg, slot_deadline, peers_ok);
      if (fs == WaitStatus::kPeerDead && stopped()) return 0;
      PI0_CHECK(fs != WaitStatus::kTimeout, "no K/V slot came back from the decoder in 60 s");
      PI0_CHECK(fs != WaitStatus::kPeerDead, "the decoder or the orchestrator died");
      PI0_CHECK(fs == WaitStatus::kOk, "ring from the decoder is corrupt");
      take_slot_free(free_msg);
    }
    const uint32_t kv_slot = free_slots.front();
    free_slots.pop_front();
    slot_busy[kv_slot] = true;

    const auto t0 = std::chrono::steady_clock::now();
    stage->encode(m.frame, m.input_slot, kv_slot);
    const auto t1 = std::chrono::steady_clock::now();

    Message ready = ipc::make_message(MsgType::kSlotReady, ipc::Role::kEncoder);
    ready.frame = m.frame;
    ready.kv_slot = kv_slot;
    ready.input_slot = m.input_slot;
    ready.submit_ns = m.submit_ns;
    ready.encode_ns = static_cast<uint64_t>((t1 - t0).count());
    const WaitStatus ps =
        to_decoder.push(ready, ipc::WorkerRuntime::after(kSlotWaitSeconds), peers_ok);
    if (ps == WaitStatus::kPeerDead && stopped()) return 0;
    PI0_CHECK(ps == WaitStatus::kOk, std::string("could not hand frame ") +
                                         std::to_string(m.frame) +
                                         " to the decoder: " + ipc::wait_status_name(ps));
  }
}

}  // namespace pi0
