// The CPU backend of the encoder: the fp32 reference writing K/V into host shared memory.
#include <chrono>

#include "pi0/encoder_worker.hpp"
#include "pi0/reference.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

class CpuEncoderStage final : public EncoderStage {
 public:
  explicit CpuEncoderStage(ipc::WorkerRuntime& rt)
      : rt_(rt), reference_(make_reference(rt)) {}

  void encode(uint64_t, uint32_t input_slot, uint32_t kv_slot) override {
    const auto t0 = std::chrono::steady_clock::now();
    reference_.encode(rt_.options().shape, rt_.control().images(input_slot),
                      rt_.control().host_kv(kv_slot));
    times_.add(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                   .count());
  }

  const StageTimes& stage_times() const override { return times_; }

 private:
  static ReferenceEncoder make_reference(ipc::WorkerRuntime& rt) {
    const WeightStore weights = ipc::load_stage_weights(rt.options(), WeightSet::kEncoder);
    rt.my_info().weight_bytes = weights.total_bytes();
    rt.describe("cpu", "host CPU (fp32 reference)", 0, -1);
    return ReferenceEncoder(rt.options().config, weights);
  }

  ipc::WorkerRuntime& rt_;
  ReferenceEncoder reference_;
  StageTimes times_;
};

}  // namespace

std::unique_ptr<EncoderStage> make_cpu_encoder_stage(ipc::WorkerRuntime& rt) {
  return std::make_unique<CpuEncoderStage>(rt);
}

}  // namespace pi0
