#include "pi0/decoder_worker.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

#include "pi0/check.hpp"

namespace pi0 {
namespace {

using ipc::Message;
using ipc::MsgType;
using ipc::RingId;
using ipc::WaitStatus;

constexpr double kPollSeconds = 1.0;
constexpr double kPushSeconds = 60.0;

}  // namespace

int run_decoder_worker(ipc::WorkerRuntime& rt) {
  auto& control = rt.control();
  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<DecoderStage> stage = rt.options().backend == "cuda"
                                            ? make_cuda_decoder_stage(rt)
                                            : make_cpu_decoder_stage(rt);
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

  for (;;) {
    Message m;
    const WaitStatus st = from_encoder.pop(m, ipc::WorkerRuntime::after(kPollSeconds), peers_ok);
    if (st == WaitStatus::kTimeout) continue;
    if (st == WaitStatus::kPeerDead) {
      PI0_CHECK(rt.orchestrator_alive(), "orchestrator gone or stop signalled");
      throw Error("the encoder worker died");
    }
    PI0_CHECK(st == WaitStatus::kOk, "ring from the encoder is corrupt");
    const std::string reason = ipc::validate(m, limits);
    PI0_CHECK(reason.empty(), "rejected a message from the encoder: " + reason);
    const auto type = static_cast<MsgType>(m.type);
    if (type == MsgType::kStop) {
      rt.record_stage_times(stage->stage_times());
      rt.send_stopped();
      spdlog::info("decoder stopped");
      return 0;
    }
    PI0_CHECK(type == MsgType::kSlotReady, "the encoder sent " + std::string(ipc::type_name(type)) +
                                               " where a ready slot was expected");

    const auto t0 = std::chrono::steady_clock::now();
    const DecodeTiming timing = stage->decode(m.frame, m.input_slot, m.kv_slot);
    const auto t1 = std::chrono::steady_clock::now();

    Message freed = ipc::make_message(MsgType::kSlotFree, ipc::Role::kDecoder);
    freed.frame = m.frame;
    freed.kv_slot = m.kv_slot;
    const WaitStatus fs = to_encoder.push(freed, ipc::WorkerRuntime::after(kPushSeconds), peers_ok);
    PI0_CHECK(fs == WaitStatus::kOk,
              std::string("could not return a K/V slot to the encoder: ") +
                  ipc::wait_status_name(fs));

    Message done = ipc::make_message(MsgType::kFrameDone, ipc::Role::kDecoder);
    done.frame = m.frame;
    done.input_slot = m.input_slot;
    done.kv_slot = m.kv_slot;
    done.submit_ns = m.submit_ns;
    done.encode_ns = m.encode_ns;
    done.decode_ns = timing.decode_ms > 0 ? static_cast<uint64_t>(timing.decode_ms * 1e6)
                                          : static_cast<uint64_t>((t1 - t0).count());
    done.handoff_ns = timing.handoff_us >= 0 ? static_cast<uint64_t>(timing.handoff_us * 1e3) : 0;
    const WaitStatus ds = to_orch.push(done, ipc::WorkerRuntime::after(kPushSeconds), orch_ok);
    PI0_CHECK(ds == WaitStatus::kOk || ds == WaitStatus::kPeerDead,
              std::string("could not report frame done: ") + ipc::wait_status_name(ds));
    if (ds == WaitStatus::kPeerDead) return rt.stop_signalled() ? 0 : 1;
  }
}

}  // namespace pi0
