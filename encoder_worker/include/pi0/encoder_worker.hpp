// The encoder stage as library code: the worker loop the encoder_worker executable runs, and the
// stage interface its backends implement.
#pragma once

#include <cstdint>
#include <memory>

#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {

// One backend of the encoder stage. encode() reads the images of an input slot and writes the
// prefix K/V cache of a K/V slot (host shared memory on the CPU backend, the CUDA IPC pool on the
// CUDA backend).
class EncoderStage {
 public:
  virtual ~EncoderStage() = default;
  virtual void encode(uint64_t frame, uint32_t input_slot, uint32_t kv_slot) = 0;
  // The decoder has finished reading `kv_slot` (its GPU work may still be queued: see events).
  virtual void slot_returned(uint32_t kv_slot) { (void)kv_slot; }
  // Per-frame times of this stage, for the worker's report.
  virtual const StageTimes& stage_times() const = 0;
};

std::unique_ptr<EncoderStage> make_cpu_encoder_stage(ipc::WorkerRuntime& runtime);
std::unique_ptr<EncoderStage> make_cuda_encoder_stage(ipc::WorkerRuntime& runtime);

// Loads the stage's weights, reports ready, then serves frames until told to stop.
int run_encoder_worker(ipc::WorkerRuntime& runtime);

}  // namespace pi0
