// Moving a stage's weights from a WeightStore to the device.
#pragma once

#include <string>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/weights.hpp"

namespace pi0::cuda {

// Throws pi0::Error naming `who`, the model and the first tensor of `set` that `weights` lacks or
// holds with another shape than `config` and `prompt_len` give.
void check_weights(const ModelConfig& config, int prompt_len, WeightSet set,
                   const WeightStore& weights, const std::string& who);

DeviceBuffer<Bf16> upload_tensor(const WeightStore& weights, const std::string& name);

DeviceBuffer<float> upload_tensor_f32(const WeightStore& weights, const std::string& name);
// Two stacked [layers, rows, cols] tensors side by side: [layers, rows, 2 * cols] = first | second
// (the GeGLU gate and up projections as one GEMM).
DeviceBuffer<Bf16> upload_side_by_side(const WeightStore& weights, const std::string& first,
                                       const std::string& second);

}  // namespace pi0::cuda
