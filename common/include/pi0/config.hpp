// The pi0 model configuration: every dimension of the model comes from one field here, so that
// a tiny model of the same structure runs in CI and full-width, few-layer models run in GPU checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pi0 {

struct ModelConfig {
  std::string name = "pi0";

  // SigLIP vision tower.
  int image_size = 224;
  int patch_size = 14;
  int image_channels = 3;
  int vision_width = 1152;
  int vision_layers = 27;
  int vision_heads = 16;
  int vision_head_dim = 72;
  int vision_mlp = 4304;
  float vision_norm_eps = 1e-5f;

  // Gemma prefix (language model). The action expert shares its layer count, its head layout and
  // its RoPE, since it attends to the prefix K/V cache layer by layer.
  int lm_width = 2048;
  int lm_layers = 18;
  int lm_heads = 8;  // query heads; one shared K/V head
  int head_dim = 256;
  int lm_mlp = 16384;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.0f;

  // Action expert.
  int action_width = 1024;
  int action_mlp = 4096;
  int action_dim = 32;
  int state_dim = 32;
  int flow_steps = 10;

  // Derived dimensions.
  int patches_per_side() const { return image_size / patch_size; }
  int tokens_per_view() const { return patches_per_side() * patches_per_side(); }
  int patch_values() const { return patch_size * patch_size * image_channels; }
  int vision_qkv_width() const { return 3 * vision_heads * vision_head_dim; }
  int lm_q_width() const { return lm_heads * head_dim; }
  int qkv_width() const { return lm_q_width() + 2 * head_dim; }  // Q | K | V
  size_t image_values() const {
    return static_cast<size_t>(image_size) * image_size * image_channels;
  }

  // Throws pi0::Error naming the first inconsistent field.
  void validate() const;
};

// Named configs: "pi0" (the spec's defaults), "tiny" (same structure, CI-sized),
// "pi0-1l" / "pi0-2l" (full widths, 1 or 2 layers per tower, for GPU numerics checks).
ModelConfig model_config(const std::string& name);  // throws pi0::Error for an unknown name
std::vector<std::string> model_config_names();

// An on/off switch from the environment (the PI0_* knobs): "1" on, "0" off, unset or empty
// `fallback`. Anything else ("off", "true", "00") throws pi0::Error naming the variable, rather
// than being read as one or the other.
bool env_switch(const char* name, bool fallback);
// A whole number from the environment, lo..hi; unset or empty `fallback`. Anything else ("20s",
// "abc", out of range) throws pi0::Error naming the variable and the range.
long env_integer(const char* name, long lo, long hi, long fallback);

// The longest prompt a run takes (RunShape::validate, the weights file's language_embeds).
inline constexpr int kMaxPromptLen = 4096;

// The per-run shape of one inference.
struct RunShape {
  int views = 2;       // V camera views
  int chunk = 63;      // C action rows
  int prompt_len = 0;  // P language tokens

  int prefix_len(const ModelConfig& c) const { return c.tokens_per_view() * views + prompt_len; }
  void validate() const;  // throws pi0::Error
};

// Sizes of the buffers that cross process boundaries, in elements.
struct StageSizes {
  size_t image_values;   // V * H * W * C
  size_t state_values;   // state_dim
  size_t noise_values;   // C * action_dim
  size_t action_values;  // C * action_dim
  size_t kv_values;      // lm_layers * 2 * E * head_dim (K then V per layer)
  // The device K/V slot the encoder fills and the decoder attends over in place: each layer's K
  // and V blocks hold E prefix rows (the encoder's) then C + 1 rows the decoder writes its own
  // keys and values into, so decoder attention reads one block with no copy of the prefix.
  int kv_slot_rows;       // E + C + 1
  size_t kv_slot_values;  // lm_layers * 2 * kv_slot_rows * head_dim
};
StageSizes stage_sizes(const ModelConfig& c, const RunShape& s);

}  // namespace pi0
