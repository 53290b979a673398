// pi0 weights: the spec's tensor names and shapes, loaded from .safetensors (validated) or drawn
// from seeded random numbers. Storage is bf16 on the host; the CPU reference converts to fp32 and
// the CUDA engines upload to the device.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"

namespace pi0 {

// Which process needs which tensors: the encoder holds vision_*, encoder_* and language_embeds,
// the decoder holds decoder_*.
enum class WeightSet { kEncoder, kDecoder, kAll };

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t fan_in;  // input dimension, for N(0, 1/fan_in) initialisation; 0 = not a matrix
  float init_std;  // std of the random init (0 for biases; norm weights use init_one)
  bool init_one;   // norm weights: all ones
  size_t numel() const;
};

// The exact tensors a config needs, in the spec's order. prompt_len sizes language_embeds.
std::vector<TensorSpec> weight_specs(const ModelConfig& config, int prompt_len, WeightSet set);

struct TensorView {
  const Bf16* data = nullptr;
  std::vector<int64_t> shape;
  size_t numel = 0;
};

class WeightStore {
 public:
  // Loads and validates every tensor of `set` from a .safetensors file. Throws pi0::Error with a
  // one-line message naming the file and the problem: missing file, truncated file, header that is
  // not JSON, missing tensor, wrong dtype, wrong shape, offsets outside the data. The prompt length
  // is taken from language_embeds' first dimension (any, including 0).
  // The tensors are read into memory the store owns (not mapped), so that a file changed on disk
  // afterwards changes nothing the store holds.
  static WeightStore load_safetensors(const std::string& path, const ModelConfig& config,
                                      WeightSet set);
  // Every check load_safetensors makes of every tensor of the model, without reading their data;
  // returns the prompt length. Throws as load_safetensors does.
  static int check_safetensors(const std::string& path, const ModelConfig& config);

  // Seeded random weights as the spec describes (norm weights 1, biases 0, position embedding and
  // time biases N(0, 0.02), matrices N(0, 1/fan_in), language_embeds N(0, 1)).
  static WeightStore random(const ModelConfig& config, int prompt_len, uint64_t seed,
                            WeightSet set);

  // Writes every tensor held to a .safetensors file (for tests and the weights tool): beside it
  // first, then renamed over it, so that a process reading the old file keeps reading it whole.
  // Throws pi0::Error if it cannot.
  void save_safetensors(const std::string& path) const;

  const TensorView& get(const std::string& name) const;  // throws pi0::Error if absent
  bool has(const std::string& name) const;
  int prompt_len() const { return prompt_len_; }
  size_t total_bytes() const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

  WeightStore(WeightStore&&) noexcept;
  WeightStore& operator=(WeightStore&&) noexcept;
  ~WeightStore();

 private:
  WeightStore();
  struct Backing;  // the tensors' memory
  std::unique_ptr<Backing> backing_;
  std::map<std::string, TensorView> tensors_;
  int prompt_len_ = 0;
};

}  // namespace pi0
