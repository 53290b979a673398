// A real worker process against a test that plays the orchestrator and the other worker on the
// control segment's rings: what a worker does with a stop signal while it waits, and with a
// message that breaks the slot protocol.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "pi0/config.hpp"
#include "pi0/ipc/control_block.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/ipc/shm.hpp"
#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/process.hpp"

using namespace pi0;
using ipc::Message;
using ipc::MsgType;
using ipc::RingId;
using ipc::WaitStatus;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kFrames = 8;

struct FakeRun {
  ipc::ControlBlock control;
  ChildProcess worker;

  // Starts `role`'s worker (CPU backend, model `model`, two K/V slots) and waits for its ready.
  FakeRun(ipc::Role role, const std::string& model, int chunk = 4) {
    ipc::WorkerOptions wo;
    wo.model = model;
    wo.config = model_config(model);
    wo.shape.views = 1;
    wo.shape.chunk = chunk;
    wo.kv_slots = 2;
    wo.max_frame = kFrames;
    wo.parent_pid = static_cast<int>(::getpid());
    control = ipc::ControlBlock::create(
        ipc::unique_segment_name("ctl"),
        ipc::compute_layout(wo.config, wo.shape, wo.kv_slots, kFrames, /*host_kv=*/true));
    wo.control_name = control.name();
    const bool encoder = role == ipc::Role::kEncoder;
    worker = ChildProcess::spawn(encoder ? "encoder_worker" : "decoder_worker",
                                 encoder ? PI0_ENCODER_EXE : PI0_DECODER_EXE,
                                 ipc::worker_arguments(wo), {}, false);
    Message ready;
    REQUIRE(control.ring(encoder ? RingId::kEncoderToOrch : RingId::kDecoderToOrch)
                .pop(ready, ipc::Clock::now() + 60s, [this] { return worker.running(); }) ==
            WaitStatus::kOk);
    REQUIRE(ready.type == static_cast<uint16_t>(MsgType::kWorkerReady));
  }
};

Message message(MsgType type, ipc::Role sender, uint64_t frame, uint32_t slot) {
  Message m = ipc::make_message(type, sender);
  m.frame = frame;
  m.kv_slot = slot;
  m.input_slot = slot;
  return m;
}

// Every message the worker has sent the orchestrator so far.
std::vector<Message> drained(ipc::SpscRing& ring) {
  std::vector<Message> out;
  Message m;
  while (ring.try_pop(m)) out.push_back(m);
  return out;
}

bool any_error(const std::vector<Message>& messages) {
  for (const Message& m : messages)
    if (m.type == static_cast<uint16_t>(MsgType::kError)) return true;
  return false;
}

// SIGTERM to the worker: it exits with status 0, reports no error to the orchestrator and says why.
void check_quiet_stop(FakeRun& run, RingId to_orchestrator) {
  REQUIRE(::kill(run.worker.pid(), SIGTERM) == 0);
  const auto status = run.worker.wait_for(10s);
  REQUIRE(status);
  INFO(run.worker.output());
  CHECK(status->success());
  CHECK_FALSE(any_error(drained(run.control.ring(to_orchestrator))));
  CHECK(run.worker.output().find("stop signalled") != std::string::npos);
}

}  // namespace

TEST_CASE("a stop signal to a worker waiting on its peer ends it quietly with status 0",
          "[worker][process]") {
  SECTION("the encoder, waiting for a K/V slot the decoder holds") {
    FakeRun run(ipc::Role::kEncoder, "tiny");
    // Three frames and two slots that never come back: the third waits for a slot.
    for (uint32_t f = 0; f < 3; ++f)
      REQUIRE(run.control.ring(RingId::kOrchToEncoder)
                  .try_push(message(MsgType::kFrameInput, ipc::Role::kOrchestrator, f, f % 2)));
    Message handed;
    for (int i = 0; i < 2; ++i)
      REQUIRE(
          run.control.ring(RingId::kEncoderToDecoder).pop(handed, ipc::Clock::now() + 30s, {}) ==
          WaitStatus::kOk);
    std::this_thread::sleep_for(100ms);  // into the wait for a free slot
    check_quiet_stop(run, RingId::kEncoderToOrch);
  }
  SECTION("the decoder, waiting for a frame") {
    FakeRun run(ipc::Role::kDecoder, "tiny");
    std::this_thread::sleep_for(100ms);
    check_quiet_stop(run, RingId::kDecoderToOrch);
  }
}

TEST_CASE("the decoder refuses a K/V slot handed over again while a frame still holds it",
          "[worker][process]") {
  // pi0-1l at 63 rows decodes for seconds on the CPU, so the first frame still holds slot 0 when
  // the second message arrives.
  FakeRun run(ipc::Role::kDecoder, "pi0-1l", 63);
  auto& to_decoder = run.control.ring(RingId::kEncoderToDecoder);
  REQUIRE(to_decoder.try_push(message(MsgType::kSlotReady, ipc::Role::kEncoder, 0, 0)));
  REQUIRE(to_decoder.try_push(message(MsgType::kSlotReady, ipc::Role::kEncoder, 1, 0)));
  const auto status = run.worker.wait_for(60s);
  REQUIRE(status);
  INFO(run.worker.output());
  CHECK(status->code == 1);
  bool named = false;
  for (const Message& m : drained(run.control.ring(RingId::kDecoderToOrch)))
    if (m.type == static_cast<uint16_t>(MsgType::kError))
      named = named || ipc::message_text(m).find("K/V slot 0") != std::string_view::npos;
  CHECK(named);
}

// A corrupt ring from the decoder is an error when the encoder stops, as anywhere else, not the
// end of the slots it waits for: it must not report a clean stop over it.
TEST_CASE("the encoder's stop reports a corrupt ring from the decoder", "[worker][process]") {
  FakeRun run(ipc::Role::kEncoder, "tiny");
  // Two frames, and their slots never come back: the stop then waits for them.
  for (uint32_t f = 0; f < 2; ++f)
    REQUIRE(run.control.ring(RingId::kOrchToEncoder)
                .try_push(message(MsgType::kFrameInput, ipc::Role::kOrchestrator, f, f)));
  Message handed;
  for (int i = 0; i < 2; ++i)
    REQUIRE(run.control.ring(RingId::kEncoderToDecoder).pop(handed, ipc::Clock::now() + 30s, {}) ==
            WaitStatus::kOk);
  // Three messages the encoder has not read yet make the ring's tail 3 and its head 0; then the
  // tail is set past what the ring can hold.
  auto& from_decoder = run.control.ring(RingId::kDecoderToEncoder);
  for (uint32_t i = 0; i < 3; ++i)
    REQUIRE(from_decoder.try_push(message(MsgType::kSlotFree, ipc::Role::kDecoder, 0, 0)));
  const size_t header_bytes =
      ipc::SpscRing::bytes_for(ipc::kRingCapacity) - ipc::kRingCapacity * sizeof(Message);
  auto* words = reinterpret_cast<uint64_t*>(
      reinterpret_cast<char*>(&run.control.header()) +
      run.control.layout().ring_offset[static_cast<uint32_t>(RingId::kDecoderToEncoder)]);
  std::atomic<uint64_t>* tail = nullptr;
  for (size_t i = 0; i < header_bytes / sizeof(uint64_t); ++i) {
    if (words[i] != 3) continue;
    REQUIRE(tail == nullptr);
    tail = reinterpret_cast<std::atomic<uint64_t>*>(&words[i]);
  }
  REQUIRE(tail != nullptr);
  tail->store(ipc::kRingCapacity + 5);
  REQUIRE(run.control.ring(RingId::kOrchToEncoder)
              .try_push(message(MsgType::kStop, ipc::Role::kOrchestrator, 0, 0)));
  const auto status = run.worker.wait_for(30s);
  REQUIRE(status);
  INFO(run.worker.output());
  CHECK(status->code == 1);
  bool named = false, stopped = false;
  for (const Message& m : drained(run.control.ring(RingId::kEncoderToOrch))) {
    if (m.type == static_cast<uint16_t>(MsgType::kError))
      named = named || ipc::message_text(m).find("corrupt") != std::string_view::npos;
    stopped = stopped || m.type == static_cast<uint16_t>(MsgType::kStopped);
  }
  CHECK(named);
  CHECK_FALSE(stopped);
}

// A frame's generation (its number + 1) is what tells a K/V slot's layer signals of this frame
// from those its previous frame left (pi0/cuda/layer_signal.hpp): that holds only while the frame
// numbers grow, so a worker refuses one that does not, whichever way it came.
TEST_CASE("a worker refuses a frame handed over twice or out of order", "[worker][process]") {
  const bool encoder = GENERATE(true, false);
  const uint64_t second = GENERATE(uint64_t{1}, uint64_t{0});  // frame 1 again, or frame 0 after it
  INFO((encoder ? "encoder" : "decoder") << ", frame " << second << " after frame 1");
  FakeRun run(encoder ? ipc::Role::kEncoder : ipc::Role::kDecoder, "tiny");
  auto& in = run.control.ring(encoder ? RingId::kOrchToEncoder : RingId::kEncoderToDecoder);
  const MsgType type = encoder ? MsgType::kFrameInput : MsgType::kSlotReady;
  const ipc::Role sender = encoder ? ipc::Role::kOrchestrator : ipc::Role::kEncoder;
  // Two K/V and input slots, one for each frame: only the frame numbers break the protocol.
  REQUIRE(in.try_push(message(type, sender, 1, 0)));
  REQUIRE(in.try_push(message(type, sender, second, 1)));
  const auto status = run.worker.wait_for(20s);
  REQUIRE(status);
  INFO(run.worker.output());
  CHECK(status->code == 1);
  const std::string expected = "frame " + std::to_string(second) + " after frame 1";
  bool named = false;
  for (const Message& m :
       drained(run.control.ring(encoder ? RingId::kEncoderToOrch : RingId::kDecoderToOrch)))
    if (m.type == static_cast<uint16_t>(MsgType::kError))
      named = named || ipc::message_text(m).find(expected) != std::string_view::npos;
  CHECK(named);
}
