// The fp32 CPU reference of pi0, exactly as ../shared/spec/pi0-model.md describes it. It is the
// CPU backend of the workers and the yardstick of every CUDA kernel.
#pragma once

#include <memory>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"
#include "pi0/weights.hpp"

namespace pi0 {

// Prefix K/V cache layout, shared by every backend: for layer l, K rows then V rows,
// [lm_layers][2][E][head_dim]. The CPU backend stores it in fp32, the CUDA backend in bf16.
inline size_t kv_offset(const ModelConfig& c, int prefix_len, int layer, int which /*0 K, 1 V*/) {
  return ((static_cast<size_t>(layer) * 2 + which) * prefix_len) * c.head_dim;
}

class ReferenceEncoder {
 public:
  // Converts the encoder tensors of `weights` to fp32 once. `weights` need not outlive this.
  ReferenceEncoder(const ModelConfig& config, const WeightStore& weights);
  ~ReferenceEncoder();
  ReferenceEncoder(ReferenceEncoder&&) noexcept;

  // images [V, H, W, C] -> kv_out [lm_layers][2][E][head_dim], E = tokens_per_view*V + prompt_len.
  // shape.prompt_len must equal the weights' prompt length.
  void encode(const RunShape& shape, const Bf16* images, float* kv_out) const;

  // The vision tower and projector alone: images [V, H, W, C] -> [V * tokens_per_view, lm_width].
  void vision_tokens(int views, const Bf16* images, float* out) const;

  int prompt_len() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class ReferenceDecoder {
 public:
  ReferenceDecoder(const ModelConfig& config, const WeightStore& weights);
  ~ReferenceDecoder();
  ReferenceDecoder(ReferenceDecoder&&) noexcept;

  // kv_prefix [lm_layers][2][E][head_dim] fp32; state [state_dim]; noise [C, action_dim];
  // actions_out [C, action_dim] = the noise after flow_steps Euler steps.
  void decode(const RunShape& shape, const float* kv_prefix, const Bf16* state, const Bf16* noise,
              float* actions_out) const;

  // One flow step's transformer pass: hidden states after the last layer, before the final
  // norm, for all C+1 tokens: hidden_out [(C + 1), action_width]. `sample` is the current
  // noise [C, action_dim] in fp32. For tests of the attention mask.
  void step_hidden(const RunShape& shape, const float* kv_prefix, const Bf16* state,
                   const float* sample, int step, float* hidden_out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pi0
