// Helpers shared by the [gpu] tests: random host data, poisoned device buffers, error norms.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/random.hpp"
#include "pi0/reference.hpp"
#include "pi0/weights.hpp"
#include "scoped_env.hpp"

namespace pi0::test {

inline std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f,
                                        float offset = 0.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = offset + scale * counter_normal(seed, 77, i);
  return v;
}

inline std::vector<Bf16> to_bf16(const std::vector<float>& v) {
  std::vector<Bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16(v[i]);
  return out;
}

inline std::vector<float> to_float(const std::vector<Bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_float(v[i]);
  return out;
}

// Rounds every value through bf16: what the GPU sees of an fp32 input.
inline std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = round_to_bf16(x);
  return v;
}

// A device buffer filled with 0xFF bytes: NaN in bf16 and fp32, so unwritten outputs show.
template <typename T>
cuda::DeviceBuffer<T> poisoned(size_t n, const char* what = "test output") {
  cuda::DeviceBuffer<T> buf(n, what);
  CUDA_CHECK(cudaMemset(buf.get(), 0xFF, buf.bytes()));
  return buf;
}

inline size_t count_nonfinite(const std::vector<float>& v) {
  size_t n = 0;
  for (float x : v) n += std::isfinite(x) ? 0 : 1;
  return n;
}

// ||out - ref|| / ||ref|| in double; NaN if out has a non-finite value.
inline double rel_error(const float* out, const float* ref, size_t n) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) return NAN;
    const double d = static_cast<double>(out[i]) - ref[i];
    diff += d * d;
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}
inline double rel_error(const std::vector<float>& out, const std::vector<float>& ref) {
  PI0_CHECK(out.size() == ref.size(), "rel_error: size mismatch");
  return rel_error(out.data(), ref.data(), out.size());
}

// The reference's prefix K/V [layers][2][E][hd] placed in a device K/V slot
// [layers][2][E + C + 1][hd] (StageSizes::kv_slot_rows); the decoder's rows hold `fill`.
inline std::vector<float> prefix_to_slot(const ModelConfig& c, const RunShape& shape,
                                         const std::vector<float>& prefix_kv, float fill) {
  const StageSizes sizes = stage_sizes(c, shape);
  const size_t block = static_cast<size_t>(shape.prefix_len(c)) * c.head_dim;
  PI0_CHECK(prefix_kv.size() == sizes.kv_values, "prefix_to_slot: size mismatch");
  std::vector<float> slot(sizes.kv_slot_values, fill);
  for (int l = 0; l < c.lm_layers; ++l)
    for (int which = 0; which < 2; ++which)
      std::memcpy(slot.data() + kv_offset(c, sizes.kv_slot_rows, l, which),
                  prefix_kv.data() + kv_offset(c, shape.prefix_len(c), l, which),
                  block * sizeof(float));
  return slot;
}

// The inverse: the encoder's rows of a slot, in the reference's prefix layout.
inline std::vector<float> slot_to_prefix(const ModelConfig& c, const RunShape& shape,
                                         const std::vector<float>& slot) {
  const StageSizes sizes = stage_sizes(c, shape);
  const size_t block = static_cast<size_t>(shape.prefix_len(c)) * c.head_dim;
  PI0_CHECK(slot.size() == sizes.kv_slot_values, "slot_to_prefix: size mismatch");
  std::vector<float> prefix_kv(sizes.kv_values);
  for (int l = 0; l < c.lm_layers; ++l)
    for (int which = 0; which < 2; ++which)
      std::memcpy(prefix_kv.data() + kv_offset(c, shape.prefix_len(c), l, which),
                  slot.data() + kv_offset(c, sizes.kv_slot_rows, l, which), block * sizeof(float));
  return prefix_kv;
}

inline bool bitwise_equal(const void* a, const void* b, size_t bytes) {
  return std::memcmp(a, b, bytes) == 0;
}

inline void report(const std::string& what, double err) {
  std::printf("  %-58s rel error %.3e\n", what.c_str(), err);
  std::fflush(stdout);
}

// One frame's inputs on the device.
struct DeviceFrame {
  cuda::DeviceBuffer<Bf16> images, state, noise;
};
inline DeviceFrame upload_frame(const FrameInputs& in) {
  return DeviceFrame{cuda::upload(in.images, "images"), cuda::upload(in.state, "state"),
                     cuda::upload(in.noise, "noise")};
}

// Encodes and decodes `frame` into `kv` and `actions`, poisoned first so that every value read
// back was written by this frame; returns the K/V slot and the actions.
struct FrameOutputs {
  std::vector<Bf16> kv;
  std::vector<float> actions;
};
template <typename Encoder, typename Decoder>
FrameOutputs encode_and_decode(Encoder& encoder, Decoder& decoder, const DeviceFrame& frame,
                               cuda::DeviceBuffer<Bf16>& kv, cuda::DeviceBuffer<float>& actions) {
  CUDA_CHECK(cudaMemset(kv.get(), 0xFF, kv.bytes()));
  CUDA_CHECK(cudaMemset(actions.get(), 0xFF, actions.bytes()));
  encoder.encode(frame.images.get(), kv.get(), nullptr);
  decoder.decode(kv.get(), frame.state.get(), frame.noise.get(), actions.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  return FrameOutputs{cuda::download(kv.get(), kv.size()),
                      cuda::download(actions.get(), actions.size())};
}

// What the end-to-end engine tests share: a model's seeded random weights, one seeded random frame
// on the device, and poisoned buffers for the frame's K/V slot and actions.
struct EngineRig {
  ModelConfig config;
  RunShape shape;
  WeightStore weights;
  DeviceFrame frame;
  cuda::DeviceBuffer<Bf16> kv;
  cuda::DeviceBuffer<float> actions;

  template <typename Encoder, typename Decoder>
  FrameOutputs run(Encoder& encoder, Decoder& decoder) {
    return encode_and_decode(encoder, decoder, frame, kv, actions);
  }
};
// The weights from `seed`, the frame from seed + 1.
inline EngineRig engine_rig(const std::string& model, const RunShape& shape, uint64_t seed) {
  const ModelConfig config = model_config(model);
  const StageSizes sizes = stage_sizes(config, shape);
  return EngineRig{config,
                   shape,
                   WeightStore::random(config, shape.prompt_len, seed, WeightSet::kAll),
                   upload_frame(make_frame_inputs(config, shape, seed + 1, 0)),
                   poisoned<Bf16>(sizes.kv_slot_values, "kv slot"),
                   poisoned<float>(sizes.action_values, "actions")};
}

}  // namespace pi0::test
