// Encoder forward: the vision tower keeps its residual stream in fp32 ([V*T, 1152]); LayerNorm
// outputs, QKV, attention and MLP activations are bf16 and feed cuBLASLt directly. Residual adds
// and biases ride the GEMM epilogues (beta = 1 on the fp32 stream), GELU rides the up-projection.
// The Gemma prefix keeps its residual stream in bf16 at width 2048, so that its RMS norms fold
// into the kernels after the products they feed (pi0/cuda/kernels.hpp, RowRmsScale): qkv and
// gate|up read the stream itself, and RoPE (with the Q copy and the K/V cache writes) and GeGLU
// scale each row. The last layer stops after its K/V.
#include "pi0/cuda_encoder.hpp"

#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/cuda/attention.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/op_timer.hpp"
#include "pi0/cuda/weights.hpp"
#include "pi0/reference.hpp"

namespace pi0 {

using cuda::DeviceBuffer;
using cuda::DType;
using cuda::Epilogue;
using cuda::Gemm;
using cuda::GemmShape;

struct CudaEncoder::Impl {
  ModelConfig cfg;
  RunShape shape;
  int tokens = 0;       // per view
  int vision_rows = 0;  // V * tokens
  int prefix = 0;       // E
  int slot_rows = 0;    // rows per K or V block of the slot: E, then C + 1 left to the decoder
  cuda::MemoryLedger memory{"encoder"};
  double flops = 0.0;

  cuda::LtHandle lt;
  DeviceBuffer<std::byte> gemm_ws;

  // Weights (bf16 unless noted; fp32 biases feed fp32-output epilogues).
  DeviceBuffer<Bf16> patch_w, patch_b, pos_embed;
  DeviceBuffer<Bf16> v_qkv_w, v_qkv_b, v_o_w, v_up_w, v_up_b, v_down_w;
  DeviceBuffer<float> v_o_b, v_down_b;
  DeviceBuffer<Bf16> ln1_w, ln1_b, ln2_w, ln2_b, final_w, final_b;
  DeviceBuffer<Bf16> proj_w, proj_b;
  DeviceBuffer<Bf16> lm_qkv_w, lm_o_w, lm_gate_up_w, lm_down_w, lang;

  // Activations.
  DeviceBuffer<Bf16> patches, vh, vqkv, vattn, vmlp;
  DeviceBuffer<float> vx;
  DeviceBuffer<Bf16> lx, lqkv, lq, lattn, lgu, lact;

  Gemm g_patch, g_vqkv, g_vo, g_vup, g_vdown, g_proj, g_lqkv, g_lo, g_lgu, g_ldown;
  cuda::ViewAttention v_attention;
  cuda::SharedKvAttention lm_attention;
  cuda::GraphCache graphs;
  std::vector<cuda::TunableGemm> tunables;  // with options.autotune_inplace

  cuda::OpTimer* timer = nullptr;
  void mark(const char* label, cudaStream_t s) {
    if (timer) timer->mark(label, s);
  }

  Gemm gemm(const GemmShape& s) { return Gemm(lt.get(), s, gemm_ws.get(), gemm_ws.bytes()); }

  Impl(const ModelConfig& config, const RunShape& run_shape, const WeightStore& w,
       const CudaEngineOptions& options);
  void forward(const Bf16* images, Bf16* kv, const cuda::LayerSignals* signals,
               cudaStream_t stream);
  Bf16* kv_slice(Bf16* kv, int layer, int which) const {
    return kv + kv_offset(cfg, slot_rows, layer, which);
  }
};

CudaEncoder::Impl::Impl(const ModelConfig& config, const RunShape& run_shape, const WeightStore& w,
                        const CudaEngineOptions& options)
    : cfg(config), shape(run_shape) {
  cfg.validate();
  shape.validate();
  PI0_CHECK(w.prompt_len() == shape.prompt_len,
            "CudaEncoder: the weights' language_embeds hold " + std::to_string(w.prompt_len()) +
                " prompt tokens but the run shape asks for " + std::to_string(shape.prompt_len));
  cuda::check_weights(cfg, shape.prompt_len, WeightSet::kEncoder, w, "CudaEncoder");
  tokens = cfg.tokens_per_view();
  vision_rows = tokens * shape.views;
  prefix = shape.prefix_len(cfg);
  slot_rows = stage_sizes(cfg, shape).kv_slot_rows;

  const int vw = cfg.vision_width, vqkv_w = cfg.vision_qkv_width(), vm = cfg.vision_mlp;
  const int lw = cfg.lm_width, qkv_w = cfg.qkv_width(), qw = cfg.lm_q_width(), lm = cfg.lm_mlp;
  const int pv = cfg.patch_values();

  gemm_ws = memory.work<std::byte>(cuda::kGemmWorkspaceBytes, "cuBLASLt workspace");

  patch_w = memory.weight(cuda::upload_tensor(w, "vision_patch_embedding_w"));
  patch_b = memory.weight(cuda::upload_tensor(w, "vision_patch_embedding_b"));
  pos_embed = memory.weight(cuda::upload_tensor(w, "vision_position_embedding"));
  v_qkv_w = memory.weight(cuda::upload_tensor(w, "vision_attn_qkv_w"));
  v_qkv_b = memory.weight(cuda::upload_tensor(w, "vision_attn_qkv_b"));
  v_o_w = memory.weight(cuda::upload_tensor(w, "vision_attn_o_w"));
  v_o_b = memory.weight(cuda::upload_tensor_f32(w, "vision_attn_o_b"));
  v_up_w = memory.weight(cuda::upload_tensor(w, "vision_ffn_up_w"));
  v_up_b = memory.weight(cuda::upload_tensor(w, "vision_ffn_up_b"));
  v_down_w = memory.weight(cuda::upload_tensor(w, "vision_ffn_down_w"));
  v_down_b = memory.weight(cuda::upload_tensor_f32(w, "vision_ffn_down_b"));
  ln1_w = memory.weight(cuda::upload_tensor(w, "vision_pre_attn_norm_w"));
  ln1_b = memory.weight(cuda::upload_tensor(w, "vision_pre_attn_norm_b"));
  ln2_w = memory.weight(cuda::upload_tensor(w, "vision_pre_ffn_norm_w"));
  ln2_b = memory.weight(cuda::upload_tensor(w, "vision_pre_ffn_norm_b"));
  final_w = memory.weight(cuda::upload_tensor(w, "vision_final_norm_w"));
  final_b = memory.weight(cuda::upload_tensor(w, "vision_final_norm_b"));
  proj_w = memory.weight(cuda::upload_tensor(w, "encoder_multi_modal_projector_w"));
  proj_b = memory.weight(cuda::upload_tensor(w, "encoder_multi_modal_projector_b"));
  lm_qkv_w = memory.weight(cuda::upload_tensor(w, "encoder_attn_qkv_w"));
  lm_o_w = memory.weight(cuda::upload_tensor(w, "encoder_attn_o_w"));
  lm_gate_up_w =
      memory.weight(cuda::upload_side_by_side(w, "encoder_ffn_gate_w", "encoder_ffn_up_w"));
  lm_down_w = memory.weight(cuda::upload_tensor(w, "encoder_ffn_down_w"));
  if (shape.prompt_len > 0) lang = memory.weight(cuda::upload_tensor(w, "language_embeds"));

  const size_t vr = static_cast<size_t>(vision_rows), e = static_cast<size_t>(prefix);
  patches = memory.work<Bf16>(vr * pv, "patches");
  vx = memory.work<float>(vr * vw, "vision residual");
  vh = memory.work<Bf16>(vr * vw, "vision normed");
  vqkv = memory.work<Bf16>(vr * vqkv_w, "vision qkv");
  vattn = memory.work<Bf16>(vr * vw, "vision attention");
  vmlp = memory.work<Bf16>(vr * vm, "vision mlp");
  lx = memory.work<Bf16>(e * lw, "lm residual");
  lqkv = memory.work<Bf16>(e * qkv_w, "lm qkv");
  lq = memory.work<Bf16>(e * qw, "lm q");
  lattn = memory.work<Bf16>(e * qw, "lm attention");
  lgu = memory.work<Bf16>(e * 2 * lm, "lm gate|up");
  lact = memory.work<Bf16>(e * lm, "lm geglu");

  g_patch = gemm(cuda::linear_shape(vision_rows, vw, pv, DType::kF32, Epilogue::kNone, true));
  g_vqkv = gemm(cuda::linear_shape(vision_rows, vqkv_w, vw, DType::kBf16, Epilogue::kBias, false));
  g_vo = gemm(cuda::linear_shape(vision_rows, vw, vw, DType::kF32, Epilogue::kBias, true));
  g_vup = gemm(cuda::linear_shape(vision_rows, vm, vw, DType::kBf16, Epilogue::kGeluBias, false));
  g_vdown = gemm(cuda::linear_shape(vision_rows, vw, vm, DType::kF32, Epilogue::kBias, true));
  g_proj = gemm(cuda::linear_shape(vision_rows, lw, vw, DType::kBf16, Epilogue::kBias, false));
  g_lqkv = gemm(cuda::linear_shape(prefix, qkv_w, lw, DType::kBf16, Epilogue::kNone, false));
  g_lo = gemm(cuda::linear_shape(prefix, lw, qw, DType::kBf16, Epilogue::kNone, true));
  g_lgu = gemm(cuda::linear_shape(prefix, 2 * lm, lw, DType::kBf16, Epilogue::kNone, false));
  g_ldown = gemm(cuda::linear_shape(prefix, lw, lm, DType::kBf16, Epilogue::kNone, true));
  // Per-layer GEMMs run vision_layers or lm_layers - 1 times; count them that often.
  flops = g_patch.shape().flops() + g_proj.shape().flops() +
          cfg.vision_layers * (g_vqkv.shape().flops() + g_vo.shape().flops() +
                               g_vup.shape().flops() + g_vdown.shape().flops()) +
          cfg.lm_layers * g_lqkv.shape().flops() +
          (cfg.lm_layers - 1) *
              (g_lo.shape().flops() + g_lgu.shape().flops() + g_ldown.shape().flops());

  // SigLIP's attention in the fused kernel where the head size has one, Gemma's as
  // default_attention_kernels() says (PI0_VISION_ATTENTION = gemm | fused and PI0_LM_ATTENTION =
  // gemm | fused | tiled | wgmma override the choice, for comparisons; bench/NOTES.md v9, v17,
  // v20).
  cuda::ViewAttention::Params vision_attention{
      shape.views, tokens, cfg.vision_heads, cfg.vision_head_dim,
      1.0f / std::sqrt(static_cast<float>(cfg.vision_head_dim))};
  // ViewAttention has no tiled kernels.
  vision_attention.fused = cuda::attention_kernels_from_env(
                               "PI0_VISION_ATTENTION", cuda::AttentionKernels::kFused,
                               {cuda::AttentionKernels::kGemms, cuda::AttentionKernels::kFused}) ==
                           cuda::AttentionKernels::kFused;
  v_attention = cuda::ViewAttention(lt.get(), vision_attention, gemm_ws.get(), gemm_ws.bytes());
  cuda::SharedKvAttention::Params lm_attention_params{
      prefix,
      cfg.lm_heads,
      cfg.head_dim,
      prefix,
      1.0f / std::sqrt(static_cast<float>(cfg.head_dim)),
      0,
      0};
  lm_attention_params.kernels = cuda::attention_kernels_from_env(
      "PI0_LM_ATTENTION", cuda::default_attention_kernels(prefix * cfg.lm_heads, prefix));
  lm_attention =
      cuda::SharedKvAttention(lt.get(), lm_attention_params, gemm_ws.get(), gemm_ws.bytes());
  // A kernel asked for that cannot run here (no sm_90a code, a cluster that does not fit this SM
  // share, a shape it does not take) falls back to the GEMMs: say so, loudly where a variable
  // asked for it.
  const auto note_fallback = [](const char* variable, const char* stage, bool asked, bool runs) {
    if (!asked || runs) return;
    const char* set = std::getenv(variable);
    if (set != nullptr && *set != '\0')
      spdlog::warn("{}: {}={} cannot run here; the attention runs as GEMMs", stage, variable, set);
    else
      spdlog::info("{}: its default attention kernel cannot run here; it runs as GEMMs", stage);
  };
  note_fallback("PI0_VISION_ATTENTION", "vision attention", vision_attention.fused,
                v_attention.fused());
  note_fallback("PI0_LM_ATTENTION", "lm attention",
                lm_attention_params.kernels != cuda::AttentionKernels::kGemms,
                lm_attention.kernels() == lm_attention_params.kernels);
  memory.add_workspace(v_attention.scratch_bytes() + lm_attention.scratch_bytes());
  flops += cfg.vision_layers * v_attention.flops() + (cfg.lm_layers - 1) * lm_attention.flops();

  if (options.autotune_gemms) {
    cudaStream_t s = nullptr;
    // Tune on non-zero data: zeros can run faster than real values.
    cuda::fill_random(patches.get(), patches.size(), 1, 1.0f, s);
    cuda::fill_random(vh.get(), vh.size(), 2, 1.0f, s);
    cuda::fill_random(vattn.get(), vattn.size(), 3, 1.0f, s);
    cuda::fill_random(vmlp.get(), vmlp.size(), 4, 1.0f, s);
    cuda::fill_random(lattn.get(), lattn.size(), 6, 1.0f, s);
    cuda::fill_random(lact.get(), lact.size(), 7, 1.0f, s);
    cuda::fill_random(vx.get(), vx.size(), 8, 1.0f, s);
    cuda::fill_random(lx.get(), lx.size(), 9, 1.0f, s);
    // Per-layer weights are timed over every layer's copy, as a frame streams them.
    cuda::Gemm::AutotuneOptions tune;
    tune.wide = options.autotune_wide;
    const int vl = cfg.vision_layers, ll = cfg.lm_layers - 1;  // Gemma's last stops after K/V
    const size_t vws = static_cast<size_t>(vw), lws = static_cast<size_t>(lw);
    std::vector<cuda::TunableGemm>* in_place = options.autotune_inplace ? &tunables : nullptr;
    auto tune_gemm = [&](const char* label, Gemm& g, const void* gx, const void* gw, void* gy,
                         const void* gb, const cuda::Gemm::AutotuneOptions& o) {
      cuda::autotune_gemm(g, gx, gw, gy, gb, s, o, label, in_place);
    };
    tune_gemm("encoder patch embedding", g_patch, patches.get(), patch_w.get(), vx.get(), nullptr,
              tune);
    tune_gemm("encoder vision qkv", g_vqkv, vh.get(), v_qkv_w.get(), vqkv.get(), v_qkv_b.get(),
              tune.over_layers(vl, vws * vqkv_w));
    tune_gemm("encoder vision o", g_vo, vattn.get(), v_o_w.get(), vx.get(), v_o_b.get(),
              tune.over_layers(vl, vws * vw));
    tune_gemm("encoder vision up", g_vup, vh.get(), v_up_w.get(), vmlp.get(), v_up_b.get(),
              tune.over_layers(vl, vws * vm));
    tune_gemm("encoder vision down", g_vdown, vmlp.get(), v_down_w.get(), vx.get(), v_down_b.get(),
              tune.over_layers(vl, static_cast<size_t>(vm) * vw));
    tune_gemm("encoder projector", g_proj, vh.get(), proj_w.get(), lx.get(), proj_b.get(), tune);
    tune_gemm("encoder lm qkv", g_lqkv, lx.get(), lm_qkv_w.get(), lqkv.get(), nullptr,
              tune.over_layers(cfg.lm_layers, lws * qkv_w));
    tune_gemm("encoder lm o", g_lo, lattn.get(), lm_o_w.get(), lx.get(), nullptr,
              tune.over_layers(ll, static_cast<size_t>(qw) * lw));
    tune_gemm("encoder lm gate|up", g_lgu, lx.get(), lm_gate_up_w.get(), lgu.get(), nullptr,
              tune.over_layers(ll, lws * 2 * lm));
    tune_gemm("encoder lm down", g_ldown, lact.get(), lm_down_w.get(), lx.get(), nullptr,
              tune.over_layers(ll, static_cast<size_t>(lm) * lw));
    CUDA_CHECK(cudaDeviceSynchronize());
  }
}

void CudaEncoder::Impl::forward(const Bf16* images, Bf16* kv, const cuda::LayerSignals* signals,
                                cudaStream_t s) {
  const int vw = cfg.vision_width, vqkv_w = cfg.vision_qkv_width(), vm = cfg.vision_mlp;
  const int lw = cfg.lm_width, qkv_w = cfg.qkv_width(), qw = cfg.lm_q_width(), lm = cfg.lm_mlp;

  if (timer) timer->begin(s);
  // Patch embedding: x = pos_embed[token] + b_patch, then x += patches @ W_patch.
  cuda::extract_patches(images, patches.get(), shape.views, cfg.image_size, cfg.patch_size,
                        cfg.image_channels, s);
  cuda::broadcast_rows(pos_embed.get(), tokens, patch_b.get(), vx.get(), vision_rows, vw, s);
  g_patch.run(patches.get(), patch_w.get(), vx.get(), nullptr, s);
  mark("patch embedding", s);

  for (int l = 0; l < cfg.vision_layers; ++l) {
    const size_t lv = static_cast<size_t>(l);
    cuda::layer_norm(vx.get(), ln1_w.get() + lv * vw, ln1_b.get() + lv * vw, vh.get(), vision_rows,
                     vw, cfg.vision_norm_eps, s);
    mark("vision layernorm", s);
    g_vqkv.run(vh.get(), v_qkv_w.get() + lv * vw * vqkv_w, vqkv.get(), v_qkv_b.get() + lv * vqkv_w,
               s);
    mark("vision qkv gemm", s);
    v_attention.run(vqkv.get(), vattn.get(), s, timer);
    g_vo.run(vattn.get(), v_o_w.get() + lv * vw * vw, vx.get(), v_o_b.get() + lv * vw, s);
    mark("vision o gemm + residual", s);
    cuda::layer_norm(vx.get(), ln2_w.get() + lv * vw, ln2_b.get() + lv * vw, vh.get(), vision_rows,
                     vw, cfg.vision_norm_eps, s);
    mark("vision layernorm", s);
    g_vup.run(vh.get(), v_up_w.get() + lv * vw * vm, vmlp.get(), v_up_b.get() + lv * vm, s);
    mark("vision up gemm + gelu", s);
    g_vdown.run(vmlp.get(), v_down_w.get() + lv * vm * vw, vx.get(), v_down_b.get() + lv * vw, s);
    mark("vision down gemm + residual", s);
  }
  cuda::layer_norm(vx.get(), final_w.get(), final_b.get(), vh.get(), vision_rows, vw,
                   cfg.vision_norm_eps, s);
  g_proj.run(vh.get(), proj_w.get(), lx.get(), proj_b.get(), s);
  mark("final norm + projector", s);
  if (shape.prompt_len > 0)
    CUDA_CHECK(cudaMemcpyAsync(lx.get() + static_cast<size_t>(vision_rows) * lw, lang.get(),
                               static_cast<size_t>(shape.prompt_len) * lw * sizeof(Bf16),
                               cudaMemcpyDeviceToDevice, s));
  const cuda::RowRmsScale rms{lx.get(), lw, cfg.rms_eps};

  for (int l = 0; l < cfg.lm_layers; ++l) {
    const size_t ll = static_cast<size_t>(l);
    Bf16* k = kv_slice(kv, l, 0);
    Bf16* v = kv_slice(kv, l, 1);
    g_lqkv.run(lx.get(), lm_qkv_w.get() + ll * lw * qkv_w, lqkv.get(), nullptr, s);
    mark("lm qkv gemm", s);
    cuda::rope_split_qkv(lqkv.get(), prefix, cfg.lm_heads, cfg.head_dim, 0, cfg.rope_theta,
                         lq.get(), k, v, s, rms);
    mark("lm rms + rope + kv write", s);
    if (signals && l != signals->withheld_layer) {
      const bool last = l == cfg.lm_layers - 1;
      cuda::signal_layer(signals->counters + l, signals->generation,
                         last ? signals->last_stamp : nullptr, s);
    }
    if (l == cfg.lm_layers - 1) break;  // only its K/V leave the encoder
    lm_attention.run(lq.get(), k, v, lattn.get(), s, timer);
    g_lo.run(lattn.get(), lm_o_w.get() + ll * qw * lw, lx.get(), nullptr, s);
    mark("lm o gemm + residual", s);
    g_lgu.run(lx.get(), lm_gate_up_w.get() + ll * lw * 2 * lm, lgu.get(), nullptr, s);
    mark("lm gate|up gemm", s);
    cuda::geglu(lgu.get(), lact.get(), prefix, lm, s, rms);
    mark("lm rms + geglu", s);
    g_ldown.run(lact.get(), lm_down_w.get() + ll * lm * lw, lx.get(), nullptr, s);
    mark("lm down gemm + residual", s);
  }
}

CudaEncoder::CudaEncoder(const ModelConfig& config, const RunShape& shape,
                         const WeightStore& weights, const CudaEngineOptions& options)
    : impl_(((void)cuda::kernel_handover(),  // a bad PI0_KERNEL_HANDOVER fails here, not later
             std::make_unique<Impl>(config, shape, weights, options))) {}
CudaEncoder::~CudaEncoder() = default;
CudaEncoder::CudaEncoder(CudaEncoder&&) noexcept = default;
CudaEncoder& CudaEncoder::operator=(CudaEncoder&&) noexcept = default;

void CudaEncoder::encode(const Bf16* d_images, Bf16* d_kv_out, cudaStream_t stream,
                         const cuda::LayerSignals* signals) {
  PI0_CHECK(impl_, "CudaEncoder used after move");
  PI0_CHECK(d_images && d_kv_out, "CudaEncoder::encode: null device pointer");
  PI0_CHECK(cuda::is_aligned(d_images, 16) && cuda::is_aligned(d_kv_out, 16),
            "CudaEncoder::encode: device buffers must be 16-byte aligned");
  PI0_CHECK(!signals || (signals->counters && signals->generation),
            "CudaEncoder::encode: layer signals need counters and a generation");
  const cuda::LayerSignals none;
  const cuda::LayerSignals& sig = signals ? *signals : none;
  impl_->graphs.run(
      {d_images, d_kv_out, impl_->timer, sig.counters, sig.generation, sig.last_stamp}, stream,
      [&](cudaStream_t s) { impl_->forward(d_images, d_kv_out, signals, s); });
}

std::vector<cuda::TunableGemm> CudaEncoder::tunable_gemms() {
  return impl_->tunables;
}
void CudaEncoder::forget_graphs() {
  impl_->graphs.clear();
}
void CudaEncoder::set_op_timer(cuda::OpTimer* timer) {
  impl_->timer = timer;
}
size_t CudaEncoder::weight_bytes() const {
  return impl_->memory.weight_bytes();
}
size_t CudaEncoder::workspace_bytes() const {
  return impl_->memory.workspace_bytes();
}
double CudaEncoder::flops() const {
  return impl_->flops;
}
const ModelConfig& CudaEncoder::config() const {
  return impl_->cfg;
}
const RunShape& CudaEncoder::shape() const {
  return impl_->shape;
}

}  // namespace pi0
