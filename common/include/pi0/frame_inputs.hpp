// Deterministic synthetic camera frames: images in [-1, 1], state and noise N(0, 1), all a pure
// function of (seed, frame index) so that any process can regenerate a frame's inputs.
#pragma once

#include <cstdint>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"

namespace pi0 {

struct FrameInputs {
  std::vector<Bf16> images;  // [V, H, W, C]
  std::vector<Bf16> state;   // [state_dim]
  std::vector<Bf16> noise;   // [C, action_dim]
};

void fill_frame_inputs(const ModelConfig& config, const RunShape& shape, uint64_t seed,
                       uint64_t frame, Bf16* images, Bf16* state, Bf16* noise);
FrameInputs make_frame_inputs(const ModelConfig& config, const RunShape& shape, uint64_t seed,
                              uint64_t frame);

}  // namespace pi0
