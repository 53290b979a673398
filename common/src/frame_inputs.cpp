#include "pi0/frame_inputs.hpp"

#include "pi0/random.hpp"

namespace pi0 {
namespace {

// Each frame owns a disjoint window of 2^32 counter indices in every stream, which is far more
// than the largest input (8 views of 224 x 224 x 3, or twice the noise count for Box-Muller).
constexpr uint64_t kFrameStride = uint64_t{1} << 32;

}  // namespace

void fill_frame_inputs(const ModelConfig& config, const RunShape& shape, uint64_t seed,
                       uint64_t frame, Bf16* images, Bf16* state, Bf16* noise) {
  const StageSizes sizes = stage_sizes(config, shape);
  const uint64_t base = frame * kFrameStride;
  const uint64_t image_stream = stream_id("images");
  const uint64_t state_stream = stream_id("state");
  const uint64_t noise_stream = stream_id("noise");
  for (size_t i = 0; i < sizes.image_values; ++i)
    images[i] = float_to_bf16(counter_uniform(seed, image_stream, base + i, -1.0f, 1.0f));
  for (size_t i = 0; i < sizes.state_values; ++i)
    state[i] = float_to_bf16(counter_normal(seed, state_stream, base + i));
  for (size_t i = 0; i < sizes.noise_values; ++i)
    noise[i] = float_to_bf16(counter_normal(seed, noise_stream, base + i));
}

FrameInputs make_frame_inputs(const ModelConfig& config, const RunShape& shape, uint64_t seed,
                              uint64_t frame) {
  const StageSizes sizes = stage_sizes(config, shape);
  FrameInputs in;
  in.images.resize(sizes.image_values);
  in.state.resize(sizes.state_values);
  in.noise.resize(sizes.noise_values);
  fill_frame_inputs(config, shape, seed, frame, in.images.data(), in.state.data(), in.noise.data());
  return in;
}

}  // namespace pi0
