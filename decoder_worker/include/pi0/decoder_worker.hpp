// The decoder stage as library code: the worker loop the decoder_worker executable runs, and the
// stage interface its backends implement.
#pragma once

#include <cstdint>
#include <memory>

#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {

struct DecodeTiming {
  double decode_ms = 0;   // this stage's time for the frame
  double handoff_us = -1; // encoder's last write to decoder's first read, when measured
};

// One backend of the decoder stage. decode() reads the prefix K/V of `kv_slot` and the state and
// noise of `input_slot`, and writes the actions of `input_slot`; when it returns the actions are
// in host shared memory and the K/V slot is no longer read.
class DecoderStage {
 public:
  virtual ~DecoderStage() = default;
  virtual DecodeTiming decode(uint64_t frame, uint32_t input_slot, uint32_t kv_slot) = 0;
  // Per-frame times of this stage, for the worker's report.
  virtual const StageTimes& stage_times() const = 0;
};

std::unique_ptr<DecoderStage> make_cpu_decoder_stage(ipc::WorkerRuntime& runtime);
std::unique_ptr<DecoderStage> make_cuda_decoder_stage(ipc::WorkerRuntime& runtime);

int run_decoder_worker(ipc::WorkerRuntime& runtime);

}  // namespace pi0
