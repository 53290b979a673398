// Which of the frames handed to the decoder start together as one pass (CudaDecoder::
// decode_batch). Frames wait in submission order and a pass takes the oldest waiting ones:
// - when no pass runs, the waiting frames (up to max_batch) start at once: a frame never waits
//   for a partner while the GPU idles, so at a camera rate the decoder decodes frame by frame with
//   no added latency;
// - while passes run, another is queued behind them only when it is full: frames pile up only
//   where the decoder is the bottleneck, and those are decoded max_batch at a time.
// With max_batch 1 this is plain queueing: one frame runs, the next waits on the stream behind it.
// Bookkeeping only (no CUDA), so the policy is tested on any machine.
#pragma once

#include <cstdint>

namespace pi0 {

class DecodeBatcher {
 public:
  // max_batch 1..4 frames per pass; max_passes passes started at once (running or queued);
  // frame_capacity: the most frames the decoder can hold at once (one K/V slot each), which
  // bounds how many can wait behind a running pass: a pass counts as full at
  // min(max_batch, frame_capacity - started frames), so with few slots frames still queue.
  explicit DecodeBatcher(uint32_t max_batch, uint32_t max_passes = 2,
                         uint32_t frame_capacity = UINT32_MAX);

  uint32_t max_batch() const { return max_batch_; }
  // Frames waiting or in started passes, at most.
  uint32_t max_in_flight() const { return max_batch_ * max_passes_; }
  // One more frame waits. Throws pi0::Error when max_in_flight() frames are already in flight.
  void add();
  // The frame count of the pass to start now, counted as started; 0 when none should start.
  uint32_t start_next();
  // The oldest started pass has finished: returns its frame count.
  uint32_t finish_oldest();

  uint32_t waiting() const { return waiting_; }
  uint32_t started_passes() const { return passes_; }
  uint32_t started_frames() const { return started_frames_; }

 private:
  static constexpr uint32_t kMaxPasses = 4;
  uint32_t max_batch_, max_passes_, frame_capacity_;
  uint32_t waiting_ = 0, passes_ = 0, started_frames_ = 0;
  uint32_t pass_frames_[kMaxPasses] = {};  // frame counts of the started passes, oldest first
  uint32_t oldest_ = 0;
};

}  // namespace pi0
