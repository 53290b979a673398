#include "pi0/decode_batcher.hpp"

#include <string>

#include "pi0/check.hpp"

namespace pi0 {

DecodeBatcher::DecodeBatcher(uint32_t max_batch, uint32_t max_passes, uint32_t frame_capacity)
    : max_batch_(max_batch), max_passes_(max_passes), frame_capacity_(frame_capacity) {
  PI0_CHECK(max_batch >= 1 && max_batch <= 4,
            "decoder batch must be 1..4 frames, got " + std::to_string(max_batch));
  PI0_CHECK(max_passes >= 1 && max_passes <= kMaxPasses,
            "decoder passes in flight must be 1.." + std::to_string(kMaxPasses));
  PI0_CHECK(frame_capacity >= 1, "the decoder must be able to hold a frame");
}

void DecodeBatcher::add() {
  PI0_CHECK(waiting_ + started_frames_ < max_in_flight(),
            "more decoder frames submitted than can be in flight");
  ++waiting_;
}

uint32_t DecodeBatcher::start_next() {
  if (waiting_ == 0 || passes_ == max_passes_) return 0;
  // Only a full pass queues behind others; full is as many as could ever wait here.
  const uint32_t room = frame_capacity_ > started_frames_ ? frame_capacity_ - started_frames_ : 1;
  const uint32_t full = room < max_batch_ ? room : max_batch_;
  if (passes_ > 0 && waiting_ < full) return 0;
  const uint32_t count = waiting_ < max_batch_ ? waiting_ : max_batch_;
  pass_frames_[(oldest_ + passes_) % kMaxPasses] = count;
  ++passes_;
  waiting_ -= count;
  started_frames_ += count;
  return count;
}

uint32_t DecodeBatcher::finish_oldest() {
  PI0_CHECK(passes_ > 0, "finish_oldest() without a started pass");
  const uint32_t count = pass_frames_[oldest_];
  oldest_ = (oldest_ + 1) % kMaxPasses;
  --passes_;
  started_frames_ -= count;
  return count;
}

}  // namespace pi0
