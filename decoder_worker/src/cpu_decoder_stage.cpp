// The CPU backend of the decoder: the fp32 reference reading K/V from host shared memory.
#include <chrono>
#include <cstdio>
#include <optional>

#include "pi0/check.hpp"
#include "pi0/decoder_worker.hpp"
#include "pi0/reference.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

class CpuDecoderStage final : public DecoderStage {
 public:
  explicit CpuDecoderStage(ipc::WorkerRuntime& rt) : rt_(rt), reference_(make_reference(rt)) {}

  // The reference runs on this thread: a frame is done when submit() returns.
  uint32_t max_in_flight() const override { return 1; }

  void submit(uint64_t, uint32_t input_slot, uint32_t kv_slot) override {
    const auto t0 = std::chrono::steady_clock::now();
    auto& c = rt_.control();
    reference_.decode(rt_.options().shape, c.host_kv(kv_slot), c.state(input_slot),
                      c.noise(input_slot), c.actions(input_slot));
    DecodeTiming t;
    t.decode_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    times_.add(t.decode_ms);
    finished_ = t;
  }

  bool oldest_done() override { return finished_.has_value(); }

  DecodeTiming complete() override {
    PI0_CHECK(finished_.has_value(), "complete() without a submitted frame");
    const DecodeTiming t = *finished_;
    finished_.reset();
    return t;
  }

  const StageTimes& stage_times() const override { return times_; }

 private:
  static ReferenceDecoder make_reference(ipc::WorkerRuntime& rt) {
    const WeightStore weights = ipc::load_stage_weights(rt.options(), WeightSet::kDecoder);
    rt.my_info().weight_bytes = weights.total_bytes();
    rt.describe("cpu", "host CPU (fp32 reference)", 0, -1);
    return ReferenceDecoder(rt.options().config, weights);
  }

  ipc::WorkerRuntime& rt_;
  ReferenceDecoder reference_;
  StageTimes times_;
  std::optional<DecodeTiming> finished_;
};

}  // namespace

std::unique_ptr<DecoderStage> make_cpu_decoder_stage(ipc::WorkerRuntime& rt) {
  return std::make_unique<CpuDecoderStage>(rt);
}

}  // namespace pi0
