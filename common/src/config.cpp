#include "pi0/config.hpp"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "pi0/check.hpp"

namespace pi0 {
namespace {

void require_positive(int value, const char* field) {
  PI0_CHECK(value > 0, std::string("model config: ") + field + " must be positive, got " +
                           std::to_string(value));
}

ModelConfig tiny_config() {
  ModelConfig c;
  c.name = "tiny";
  c.image_size = 56;  // 4 x 4 patches of 14 x 14
  c.vision_width = 48;
  c.vision_layers = 2;
  c.vision_heads = 2;
  c.vision_head_dim = 24;
  c.vision_mlp = 96;
  c.lm_width = 64;
  c.lm_layers = 2;
  c.lm_heads = 2;
  c.head_dim = 32;
  c.lm_mlp = 128;
  c.action_width = 48;
  c.action_mlp = 96;
  return c;
}

}  // namespace

void ModelConfig::validate() const {
  require_positive(image_size, "image_size");
  require_positive(patch_size, "patch_size");
  require_positive(image_channels, "image_channels");
  PI0_CHECK(image_size % patch_size == 0,
            "model config: image_size must be a multiple of patch_size");
  require_positive(vision_width, "vision_width");
  require_positive(vision_layers, "vision_layers");
  require_positive(vision_heads, "vision_heads");
  require_positive(vision_head_dim, "vision_head_dim");
  PI0_CHECK(vision_heads * vision_head_dim == vision_width,
            "model config: vision_heads * vision_head_dim must equal vision_width");
  require_positive(vision_mlp, "vision_mlp");
  require_positive(lm_width, "lm_width");
  require_positive(lm_layers, "lm_layers");
  require_positive(lm_heads, "lm_heads");
  require_positive(head_dim, "head_dim");
  PI0_CHECK(head_dim % 2 == 0, "model config: head_dim must be even (RoPE rotates pairs)");
  require_positive(lm_mlp, "lm_mlp");
  require_positive(action_width, "action_width");
  require_positive(action_mlp, "action_mlp");
  require_positive(action_dim, "action_dim");
  require_positive(state_dim, "state_dim");
  require_positive(flow_steps, "flow_steps");
}

ModelConfig model_config(const std::string& name) {
  ModelConfig c;
  if (name == "pi0") return c;
  if (name == "tiny") return tiny_config();
  if (name == "pi0-1l" || name == "pi0-2l") {
    const int layers = name == "pi0-1l" ? 1 : 2;
    c.name = name;
    c.vision_layers = layers;
    c.lm_layers = layers;
    return c;
  }
  std::string known;
  for (const auto& n : model_config_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown model '" + name + "' (known: " + known + ")");
}

std::vector<std::string> model_config_names() {
  return {"pi0", "tiny", "pi0-1l", "pi0-2l"};
}

void RunShape::validate() const {
  PI0_CHECK(views >= 1 && views <= 8, "views must be in 1..8, got " + std::to_string(views));
  PI0_CHECK(chunk >= 1 && chunk <= 1024, "chunk must be in 1..1024, got " + std::to_string(chunk));
  PI0_CHECK(prompt_len >= 0 && prompt_len <= kMaxPromptLen,
            "prompt length must be in 0.." + std::to_string(kMaxPromptLen) + ", got " +
                std::to_string(prompt_len));
}

StageSizes stage_sizes(const ModelConfig& c, const RunShape& s) {
  StageSizes z{};
  z.image_values = static_cast<size_t>(s.views) * c.image_values();
  z.state_values = static_cast<size_t>(c.state_dim);
  z.noise_values = static_cast<size_t>(s.chunk) * c.action_dim;
  z.action_values = z.noise_values;
  z.kv_values = static_cast<size_t>(c.lm_layers) * 2 * s.prefix_len(c) * c.head_dim;
  z.kv_slot_rows = s.prefix_len(c) + s.chunk + 1;
  z.kv_slot_values = static_cast<size_t>(c.lm_layers) * 2 * z.kv_slot_rows * c.head_dim;
  return z;
}

long env_integer(const char* name, long lo, long hi, long fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string value(v);
  errno = 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  // strtol skips leading white space of every kind ("\n5") and takes a '+': a digit or a minus
  // sign first.
  const bool plain = (v[0] >= '0' && v[0] <= '9') || v[0] == '-';
  PI0_CHECK(plain && errno == 0 && *end == '\0' && n >= lo && n <= hi,
            std::string(name) + " must be a whole number from " + std::to_string(lo) + " to " +
                std::to_string(hi) + ", not '" + value + "'");
  return n;
}

bool env_switch(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string value(v);
  PI0_CHECK(value == "0" || value == "1",
            std::string(name) + " must be 0 or 1, not '" + value + "'");
  return value == "1";
}

}  // namespace pi0
