#include "pi0/reference.hpp"

#include <cmath>
#include <cstring>

#include "pi0/check.hpp"
#include "pi0/reference_ops.hpp"

namespace pi0 {
namespace {

// A whole tensor converted to fp32 once, so that every inference reads fp32 weights.
std::vector<float> to_float(const WeightStore& weights, const std::string& name) {
  const TensorView& t = weights.get(name);
  std::vector<float> out(t.numel);
  const long n = static_cast<long>(t.numel);
#pragma omp parallel for schedule(static) if (n > 65536)
  for (long i = 0; i < n; ++i) out[i] = bf16_to_float(t.data[i]);
  return out;
}

// Layer l of a tensor stacked on its first axis.
inline const float* layer_slice(const std::vector<float>& stacked, int layers, int layer) {
  return stacked.data() + stacked.size() / static_cast<size_t>(layers) * layer;
}

inline size_t sz(long a, long b) {
  return static_cast<size_t>(a) * static_cast<size_t>(b);
}

// Gemma's gated MLP on h [rows, width]: x += (gelu_tanh(h @ gate) * (h @ up)) @ down.
void geglu_residual(const float* h, float* x, const float* gate, const float* up, const float* down,
                    int rows, int width, int hidden) {
  std::vector<float> g(sz(rows, hidden)), u(sz(rows, hidden));
  ref::matmul(h, gate, nullptr, g.data(), rows, width, hidden, false);
  ref::matmul(h, up, nullptr, u.data(), rows, width, hidden, false);
  const long n = static_cast<long>(g.size());
#pragma omp parallel for schedule(static) if (n > 65536)
  for (long i = 0; i < n; ++i) g[i] = ref::gelu_tanh(g[i]) * u[i];
  ref::matmul(g.data(), down, nullptr, x, rows, hidden, width, true);
}

// Decoder mask: key rows [0, prefix_len) are the prefix cache, key prefix_len is the state token,
// the rest are action tokens. The state token (query 0) must not see the actions.
struct SuffixMask {
  int prefix_len;
};
bool suffix_allowed(int query_row, int key_row, const void* ctx) {
  const int prefix_len = static_cast<const SuffixMask*>(ctx)->prefix_len;
  return query_row > 0 || key_row <= prefix_len;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Encoder

struct ReferenceEncoder::Impl {
  ModelConfig c;
  int prompt_len = 0;
  std::vector<float> patch_w, patch_b, pos;
  std::vector<float> v_qkv_w, v_qkv_b, v_o_w, v_o_b, v_up_w, v_up_b, v_down_w, v_down_b;
  std::vector<float> v_ln1_w, v_ln1_b, v_ln2_w, v_ln2_b, v_final_w, v_final_b;
  std::vector<float> proj_w, proj_b;
  std::vector<float> qkv_w, o_w, gate_w, up_w, down_w;
  std::vector<float> language;
};

ReferenceEncoder::ReferenceEncoder(const ModelConfig& config, const WeightStore& weights)
    : impl_(std::make_unique<Impl>()) {
  config.validate();
  Impl& m = *impl_;
  m.c = config;
  m.prompt_len = weights.prompt_len();
  // Shapes were checked when the store was built; check the one that varies.
  const TensorView& lang = weights.get("language_embeds");
  PI0_CHECK(
      lang.shape.size() == 2 && lang.shape[0] == m.prompt_len && lang.shape[1] == config.lm_width,
      "reference encoder: language_embeds does not match the prompt length and lm_width");
  m.patch_w = to_float(weights, "vision_patch_embedding_w");
  m.patch_b = to_float(weights, "vision_patch_embedding_b");
  m.pos = to_float(weights, "vision_position_embedding");
  m.v_qkv_w = to_float(weights, "vision_attn_qkv_w");
  m.v_qkv_b = to_float(weights, "vision_attn_qkv_b");
  m.v_o_w = to_float(weights, "vision_attn_o_w");
  m.v_o_b = to_float(weights, "vision_attn_o_b");
  m.v_up_w = to_float(weights, "vision_ffn_up_w");
  m.v_up_b = to_float(weights, "vision_ffn_up_b");
  m.v_down_w = to_float(weights, "vision_ffn_down_w");
  m.v_down_b = to_float(weights, "vision_ffn_down_b");
  m.v_ln1_w = to_float(weights, "vision_pre_attn_norm_w");
  m.v_ln1_b = to_float(weights, "vision_pre_attn_norm_b");
  m.v_ln2_w = to_float(weights, "vision_pre_ffn_norm_w");
  m.v_ln2_b = to_float(weights, "vision_pre_ffn_norm_b");
  m.v_final_w = to_float(weights, "vision_final_norm_w");
  m.v_final_b = to_float(weights, "vision_final_norm_b");
  m.proj_w = to_float(weights, "encoder_multi_modal_projector_w");
  m.proj_b = to_float(weights, "encoder_multi_modal_projector_b");
  m.qkv_w = to_float(weights, "encoder_attn_qkv_w");
  m.o_w = to_float(weights, "encoder_attn_o_w");
  m.gate_w = to_float(weights, "encoder_ffn_gate_w");
  m.up_w = to_float(weights, "encoder_ffn_up_w");
  m.down_w = to_float(weights, "encoder_ffn_down_w");
  m.language = to_float(weights, "language_embeds");
}

ReferenceEncoder::~ReferenceEncoder() = default;
ReferenceEncoder::ReferenceEncoder(ReferenceEncoder&&) noexcept = default;

int ReferenceEncoder::prompt_len() const {
  return impl_->prompt_len;
}

void ReferenceEncoder::vision_tokens(int views, const Bf16* images, float* out) const {
  const Impl& m = *impl_;
  const ModelConfig& c = m.c;
  PI0_CHECK(views >= 1, "reference encoder: views must be positive, got " + std::to_string(views));
  const int side = c.patches_per_side(), tokens = c.tokens_per_view(), ps = c.patch_size;
  const int ch = c.image_channels, width = c.vision_width, pv = c.patch_values();
  const int rows = views * tokens;
  const int vl = c.vision_layers, heads = c.vision_heads, hd = c.vision_head_dim;
  const int qkv_w = c.vision_qkv_width(), mlp = c.vision_mlp;

  // Patches: token (py, px) of a view, its values in (row, col, channel) order.
  std::vector<float> patches(sz(rows, pv));
#pragma omp parallel for schedule(static) if (rows * pv >= 65536)
  for (int t = 0; t < rows; ++t) {
    const int view = t / tokens, py = (t % tokens) / side, px = (t % tokens) % side;
    const Bf16* img = images + static_cast<size_t>(view) * c.image_values();
    float* dst = patches.data() + sz(t, pv);
    for (int r = 0; r < ps; ++r)
      for (int col = 0; col < ps; ++col)
        for (int k = 0; k < ch; ++k)
          dst[(r * ps + col) * ch + k] =
              bf16_to_float(img[(sz(py * ps + r, c.image_size) + px * ps + col) * ch + k]);
  }
  std::vector<float> x(sz(rows, width));
  ref::matmul(patches.data(), m.patch_w.data(), m.patch_b.data(), x.data(), rows, pv, width, false);
  for (int t = 0; t < rows; ++t) {
    const float* p = m.pos.data() + sz(t % tokens, width);
    float* xr = x.data() + sz(t, width);
    for (int i = 0; i < width; ++i) xr[i] += p[i];
  }

  std::vector<float> h(sz(rows, width)), qkv(sz(rows, qkv_w)), attn(sz(rows, width)),
      up(sz(rows, mlp));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int l = 0; l < vl; ++l) {
    ref::layer_norm(x.data(), m.v_ln1_w.data() + sz(l, width), m.v_ln1_b.data() + sz(l, width),
                    h.data(), rows, width, c.vision_norm_eps);
    ref::matmul(h.data(), layer_slice(m.v_qkv_w, vl, l), m.v_qkv_b.data() + sz(l, qkv_w),
                qkv.data(), rows, width, qkv_w, false);
    // SigLIP encodes each camera view on its own: attention never crosses views.
    for (int v = 0; v < views; ++v) {
      const float* base = qkv.data() + sz(v * tokens, qkv_w);
      const int qw = heads * hd;
      ref::attention(base, qkv_w, base + qw, qkv_w, base + 2 * qw, qkv_w,
                     attn.data() + sz(v * tokens, width), tokens, tokens, heads, heads, hd, scale,
                     nullptr, nullptr);
    }
    ref::matmul(attn.data(), layer_slice(m.v_o_w, vl, l), m.v_o_b.data() + sz(l, width), x.data(),
                rows, width, width, true);
    ref::layer_norm(x.data(), m.v_ln2_w.data() + sz(l, width), m.v_ln2_b.data() + sz(l, width),
                    h.data(), rows, width, c.vision_norm_eps);
    ref::matmul(h.data(), layer_slice(m.v_up_w, vl, l), m.v_up_b.data() + sz(l, mlp), up.data(),
                rows, width, mlp, false);
    const long n = static_cast<long>(up.size());
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long i = 0; i < n; ++i) up[i] = ref::gelu_tanh(up[i]);
    ref::matmul(up.data(), layer_slice(m.v_down_w, vl, l), m.v_down_b.data() + sz(l, width),
                x.data(), rows, mlp, width, true);
  }
  ref::layer_norm(x.data(), m.v_final_w.data(), m.v_final_b.data(), h.data(), rows, width,
                  c.vision_norm_eps);
  ref::matmul(h.data(), m.proj_w.data(), m.proj_b.data(), out, rows, width, c.lm_width, false);
}

void ReferenceEncoder::encode(const RunShape& shape, const Bf16* images, float* kv_out) const {
  const Impl& m = *impl_;
  const ModelConfig& c = m.c;
  shape.validate();
  PI0_CHECK(shape.prompt_len == m.prompt_len, "reference encoder: run shape has prompt length " +
                                                  std::to_string(shape.prompt_len) +
                                                  " but the weights' language_embeds hold " +
                                                  std::to_string(m.prompt_len) + " tokens");
  const int e = shape.prefix_len(c);
  const int width = c.lm_width, layers = c.lm_layers, heads = c.lm_heads, hd = c.head_dim;
  const int qkv_w = c.qkv_width(), qw = c.lm_q_width(), mlp = c.lm_mlp;
  const int vision_rows = shape.views * c.tokens_per_view();

  std::vector<float> x(sz(e, width));
  vision_tokens(shape.views, images, x.data());
  if (m.prompt_len > 0)  // with no prompt, language.data() may be null: memcpy's UB
    std::memcpy(x.data() + sz(vision_rows, width), m.language.data(),
                sz(m.prompt_len, width) * sizeof(float));

  std::vector<float> h(sz(e, width)), qkv(sz(e, qkv_w)), attn(sz(e, qw));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int l = 0; l < layers; ++l) {
    ref::rms_norm(x.data(), h.data(), e, width, c.rms_eps);
    ref::matmul(h.data(), layer_slice(m.qkv_w, layers, l), nullptr, qkv.data(), e, width, qkv_w,
                false);
    ref::rope(qkv.data(), e, heads, hd, qkv_w, 0, c.rope_theta);
    ref::rope(qkv.data() + qw, e, 1, hd, qkv_w, 0, c.rope_theta);
    float* k_out = kv_out + kv_offset(c, e, l, 0);
    float* v_out = kv_out + kv_offset(c, e, l, 1);
    for (int r = 0; r < e; ++r) {
      std::memcpy(k_out + sz(r, hd), qkv.data() + sz(r, qkv_w) + qw, sz(hd, 1) * sizeof(float));
      std::memcpy(v_out + sz(r, hd), qkv.data() + sz(r, qkv_w) + qw + hd,
                  sz(hd, 1) * sizeof(float));
    }
    // The decoder reads only this layer's K/V: the rest of the last layer changes nothing it sees.
    if (l == layers - 1) break;
    ref::attention(qkv.data(), qkv_w, k_out, hd, v_out, hd, attn.data(), e, e, heads, 1, hd, scale,
                   nullptr, nullptr);
    ref::matmul(attn.data(), layer_slice(m.o_w, layers, l), nullptr, x.data(), e, qw, width, true);
    ref::rms_norm(x.data(), h.data(), e, width, c.rms_eps);
    geglu_residual(h.data(), x.data(), layer_slice(m.gate_w, layers, l),
                   layer_slice(m.up_w, layers, l), layer_slice(m.down_w, layers, l), e, width, mlp);
  }
}

// ---------------------------------------------------------------------------------------------
// Decoder

struct ReferenceDecoder::Impl {
  ModelConfig c;
  std::vector<float> state_w, state_b, in_w, time_b, amlp_w, amlp_b;
  std::vector<float> qkv_w, o_w, gate_w, up_w, down_w;
  std::vector<float> out_w, out_b;

  std::vector<float> state_token(const Bf16* state) const {
    std::vector<float> s(static_cast<size_t>(c.state_dim));
    for (int i = 0; i < c.state_dim; ++i) s[i] = bf16_to_float(state[i]);
    std::vector<float> out(static_cast<size_t>(c.action_width));
    ref::matmul(s.data(), state_w.data(), state_b.data(), out.data(), 1, c.state_dim,
                c.action_width, false);
    return out;
  }

  // One flow step's transformer: x [(C + 1), action_width] after the last layer.
  void run_step(const RunShape& shape, const float* kv_prefix, const float* s, const float* sample,
                int step, float* x) const {
    const int chunk = shape.chunk, tokens = chunk + 1, e = shape.prefix_len(c);
    const int aw = c.action_width, layers = c.lm_layers, heads = c.lm_heads, hd = c.head_dim;
    const int qkv_width = c.qkv_width(), qw = c.lm_q_width(), mlp = c.action_mlp;

    std::memcpy(x, s, sz(aw, 1) * sizeof(float));
    std::vector<float> a(sz(chunk, aw));
    ref::matmul(sample, in_w.data(), time_b.data() + sz(step, aw), a.data(), chunk, c.action_dim,
                aw, false);
    for (float& v : a) v = ref::silu(v);
    ref::matmul(a.data(), amlp_w.data(), amlp_b.data(), x + aw, chunk, aw, aw, false);

    std::vector<float> h(sz(tokens, aw)), qkv(sz(tokens, qkv_width)), attn(sz(tokens, qw));
    std::vector<float> keys(sz(e + tokens, hd)), values(sz(e + tokens, hd));
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const SuffixMask mask{e};
    for (int l = 0; l < layers; ++l) {
      ref::rms_norm(x, h.data(), tokens, aw, c.rms_eps);
      ref::matmul(h.data(), layer_slice(qkv_w, layers, l), nullptr, qkv.data(), tokens, aw,
                  qkv_width, false);
      ref::rope(qkv.data(), tokens, heads, hd, qkv_width, e, c.rope_theta);
      ref::rope(qkv.data() + qw, tokens, 1, hd, qkv_width, e, c.rope_theta);
      // Keys and values: this layer's prefix rows, then the suffix rows right after them.
      std::memcpy(keys.data(), kv_prefix + kv_offset(c, e, l, 0), sz(e, hd) * sizeof(float));
      std::memcpy(values.data(), kv_prefix + kv_offset(c, e, l, 1), sz(e, hd) * sizeof(float));
      for (int r = 0; r < tokens; ++r) {
        const float* row = qkv.data() + sz(r, qkv_width);
        std::memcpy(keys.data() + sz(e + r, hd), row + qw, sz(hd, 1) * sizeof(float));
        std::memcpy(values.data() + sz(e + r, hd), row + qw + hd, sz(hd, 1) * sizeof(float));
      }
      ref::attention(qkv.data(), qkv_width, keys.data(), hd, values.data(), hd, attn.data(), tokens,
                     e + tokens, heads, 1, hd, scale, suffix_allowed, &mask);
      ref::matmul(attn.data(), layer_slice(o_w, layers, l), nullptr, x, tokens, qw, aw, true);
      ref::rms_norm(x, h.data(), tokens, aw, c.rms_eps);
      geglu_residual(h.data(), x, layer_slice(gate_w, layers, l), layer_slice(up_w, layers, l),
                     layer_slice(down_w, layers, l), tokens, aw, mlp);
    }
  }
};

ReferenceDecoder::ReferenceDecoder(const ModelConfig& config, const WeightStore& weights)
    : impl_(std::make_unique<Impl>()) {
  config.validate();
  Impl& m = *impl_;
  m.c = config;
  m.state_w = to_float(weights, "decoder_state_in_proj_w");
  m.state_b = to_float(weights, "decoder_state_in_proj_b");
  m.in_w = to_float(weights, "decoder_action_fused_in_proj_w");
  m.time_b = to_float(weights, "decoder_action_fused_time_biases");
  m.amlp_w = to_float(weights, "decoder_action_mlp_w");
  m.amlp_b = to_float(weights, "decoder_action_mlp_b");
  m.qkv_w = to_float(weights, "decoder_attn_qkv_w");
  m.o_w = to_float(weights, "decoder_attn_o_w");
  m.gate_w = to_float(weights, "decoder_ffn_gate_w");
  m.up_w = to_float(weights, "decoder_ffn_up_w");
  m.down_w = to_float(weights, "decoder_ffn_down_w");
  m.out_w = to_float(weights, "decoder_action_fused_out_proj_w");
  m.out_b = to_float(weights, "decoder_action_fused_out_proj_b");
}

ReferenceDecoder::~ReferenceDecoder() = default;
ReferenceDecoder::ReferenceDecoder(ReferenceDecoder&&) noexcept = default;

void ReferenceDecoder::decode(const RunShape& shape, const float* kv_prefix, const Bf16* state,
                              const Bf16* noise, float* actions_out) const {
  const Impl& m = *impl_;
  const ModelConfig& c = m.c;
  shape.validate();
  const int chunk = shape.chunk, aw = c.action_width, ad = c.action_dim;
  const std::vector<float> s = m.state_token(state);
  // actions_out doubles as the running sample: each Euler step adds to it in place.
  for (size_t i = 0; i < sz(chunk, ad); ++i) actions_out[i] = bf16_to_float(noise[i]);
  std::vector<float> x(sz(chunk + 1, aw)), h(sz(chunk, aw));
  for (int step = 0; step < c.flow_steps; ++step) {
    m.run_step(shape, kv_prefix, s.data(), actions_out, step, x.data());
    ref::rms_norm(x.data() + aw, h.data(), chunk, aw, c.rms_eps);
    ref::matmul(h.data(), m.out_w.data(), m.out_b.data(), actions_out, chunk, aw, ad, true);
  }
}

void ReferenceDecoder::step_hidden(const RunShape& shape, const float* kv_prefix, const Bf16* state,
                                   const float* sample, int step, float* hidden_out) const {
  const Impl& m = *impl_;
  shape.validate();
  PI0_CHECK(step >= 0 && step < m.c.flow_steps, "reference decoder: step " + std::to_string(step) +
                                                    " is outside 0.." +
                                                    std::to_string(m.c.flow_steps - 1));
  const std::vector<float> s = m.state_token(state);
  m.run_step(shape, kv_prefix, s.data(), sample, step, hidden_out);
}

}  // namespace pi0
