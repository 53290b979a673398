// The decoder stage as library code: the worker loop the decoder_worker executable runs, and the
// stage interface its backends implement.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {

struct DecodeTiming {
  double decode_ms = 0;    // this stage's time for the frame
  double handoff_us = -1;  // encoder's last write to decoder's first read, when measured
};

// One backend of the decoder stage. submit() starts a frame: it reads the prefix K/V of `kv_slot`
// and the state and noise of `input_slot`, and writes the actions of `input_slot`. Frames finish
// in submission order; complete() waits for the oldest one, after which its actions are in host
// shared memory and its K/V slot is no longer read. Up to max_in_flight() frames run at once, so
// the stage does not sit idle while the worker reports one frame and fetches the next.
class DecoderStage {
 public:
  virtual ~DecoderStage() = default;
  virtual uint32_t max_in_flight() const = 0;
  // How long the worker may wait for the next message before looking at the running frames
  // again: short where a finished frame can only be polled for.
  virtual std::chrono::microseconds poll_slice() const = 0;
  virtual void submit(uint64_t frame, uint32_t input_slot, uint32_t kv_slot) = 0;
  // True once the oldest submitted frame has finished (complete() will not block), waiting for
  // that at most `timeout`. False too when nothing is in flight.
  virtual bool wait_oldest(std::chrono::microseconds timeout) = 0;
  virtual DecodeTiming complete() = 0;
  // Per-frame times of this stage, for the worker's report.
  virtual const StageTimes& stage_times() const = 0;
  // Logs what the run's figures do not show (e.g. how frames shared passes); called at the
  // stop, before the worker reports it, so the orchestrator still reads the line.
  virtual void log_summary() const {}
};

std::unique_ptr<DecoderStage> make_cpu_decoder_stage(ipc::WorkerRuntime& runtime);
std::unique_ptr<DecoderStage> make_cuda_decoder_stage(ipc::WorkerRuntime& runtime);

int run_decoder_worker(ipc::WorkerRuntime& runtime);

}  // namespace pi0
