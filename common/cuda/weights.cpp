#include "pi0/cuda/weights.hpp"

#include <cuda_runtime_api.h>

#include <sstream>
#include <vector>

#include "pi0/check.hpp"

namespace pi0::cuda {
namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

}  // namespace

void check_weights(const ModelConfig& config, int prompt_len, WeightSet set,
                   const WeightStore& weights, const std::string& who) {
  for (const TensorSpec& spec : weight_specs(config, prompt_len, set)) {
    if (!weights.has(spec.name)) {
      throw Error(who + ": the weights lack tensor '" + spec.name + "' that model '" +
                  config.name + "' needs");
    }
    const TensorView& t = weights.get(spec.name);
    if (t.shape != spec.shape) {
      throw Error(who + ": tensor '" + spec.name + "' has shape " + shape_text(t.shape) +
                  ", but model '" + config.name + "' (prompt length " +
                  std::to_string(prompt_len) + ") needs " + shape_text(spec.shape));
    }
  }
}

DeviceBuffer<Bf16> upload_tensor(const WeightStore& weights, const std::string& name) {
  const TensorView& t = weights.get(name);
  return upload(t.data, t.numel, "weight " + name);
}

DeviceBuffer<float> upload_tensor_f32(const WeightStore& weights, const std::string& name) {
  const TensorView& t = weights.get(name);
  std::vector<float> host(t.numel);
  for (size_t i = 0; i < t.numel; ++i) host[i] = bf16_to_float(t.data[i]);
  return upload(host, "weight " + name + " (fp32)");
}

DeviceBuffer<Bf16> upload_side_by_side(const WeightStore& weights, const std::string& first,
                                       const std::string& second) {
  const TensorView& a = weights.get(first);
  const TensorView& b = weights.get(second);
  PI0_CHECK(a.shape == b.shape && a.shape.size() >= 2,
            "upload_side_by_side: '" + first + "' and '" + second + "' differ in shape");
  const size_t cols = static_cast<size_t>(a.shape.back());
  const size_t rows = a.numel / cols;  // layers * rows
  DeviceBuffer<Bf16> out(a.numel * 2, "weight " + first + " | " + second);
  const size_t pitch = 2 * cols * sizeof(Bf16);
  CUDA_CHECK(cudaMemcpy2D(out.get(), pitch, a.data, cols * sizeof(Bf16), cols * sizeof(Bf16), rows,
                          cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy2D(out.get() + cols, pitch, b.data, cols * sizeof(Bf16),
                          cols * sizeof(Bf16), rows, cudaMemcpyHostToDevice));
  return out;
}

}  // namespace pi0::cuda
