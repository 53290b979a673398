#include "pi0/cuda/attention.hpp"

#include <cstdlib>
#include <string>

#include "pi0/check.hpp"
#include "pi0/cuda/kernels.hpp"

namespace pi0::cuda {
namespace {

// Score rows padded to 16 elements keep every bf16 probability row 32-byte aligned, so the PV
// product can use the widest loads.
int padded(int cols) {
  return (cols + 15) / 16 * 16;
}

}  // namespace

AttentionKernels default_attention_kernels(int query_rows, int keys) {
  constexpr int kMaxTiledRows = 1024;
  return keys % 8 != 0 && query_rows <= kMaxTiledRows ? AttentionKernels::kTiled
                                                      : AttentionKernels::kGemms;
}

AttentionKernels default_decoder_attention_kernels(int query_rows, int keys, int head_dim) {
  const AttentionKernels kernels = default_attention_kernels(query_rows, keys);
  return kernels == AttentionKernels::kGemms && head_dim == 256 ? AttentionKernels::kWgmma
                                                                : kernels;
}

const char* attention_kernels_name(AttentionKernels kernels) {
  return kernels == AttentionKernels::kGemms   ? "gemm"
         : kernels == AttentionKernels::kFused ? "fused"
         : kernels == AttentionKernels::kTiled ? "tiled"
                                               : "wgmma";
}

AttentionKernels attention_kernels_from_env(const char* variable, AttentionKernels fallback,
                                            std::initializer_list<AttentionKernels> accepted) {
  const char* value = std::getenv(variable);
  if (value == nullptr || value[0] == '\0') return fallback;
  const std::string kernels(value);
  std::string choices;
  size_t i = 0;
  for (AttentionKernels k : accepted) {
    const std::string name = attention_kernels_name(k);
    if (kernels == name) return k;
    choices += (i == 0 ? "" : i + 1 == accepted.size() ? " or " : ", ") + name;
    ++i;
  }
  throw Error(std::string(variable) + "=" + kernels + ": expected " + choices);
}

bool SharedKvAttention::try_fused() {
  FusedAttentionShape f;
  f.rows = params_.queries * params_.heads;
  f.keys = params_.keys;
  f.head_dim = params_.head_dim;
  f.scale = params_.scale;
  f.limited_rows = params_.limited_queries * params_.heads;
  f.limited_keys = params_.limited_keys;
  fused_shape_ = plan_fused_attention(f);
  return fused_attention_runs_here(fused_shape_);
}

SharedKvAttention::SharedKvAttention(cublasLtHandle_t handle, const Params& params, void* workspace,
                                     size_t workspace_bytes)
    : params_(params), ld_(padded(params.keys)) {
  PI0_CHECK(params.queries > 0 && params.heads > 0 && params.head_dim > 0 && params.keys > 0,
            "SharedKvAttention: empty shape");
  const int rows = params.queries * params.heads;
  if (params.kernels == AttentionKernels::kWgmma && params.head_dim == 256) {
    WgmmaAttentionShape w;
    w.rows = rows;
    w.keys = params.keys;
    w.scale = params.scale;
    w.limited_rows = params.limited_queries * params.heads;
    w.limited_keys = params.limited_keys;
    wgmma_shape_ = plan_wgmma_attention(w);
    wgmma_ = wgmma_attention_runs_here(wgmma_shape_);
    if (wgmma_) return;
  }
  if (params.kernels == AttentionKernels::kFused && fused_attention_supported(params.head_dim)) {
    fused_ = try_fused();
    if (fused_) return;
  }
  if (params.kernels == AttentionKernels::kTiled) {
    tiled_shape_.rows = rows;
    tiled_shape_.keys = params.keys;
    tiled_shape_.head_dim = params.head_dim;
    tiled_shape_.scale = params.scale;
    tiled_shape_.limited_rows = params.limited_queries * params.heads;
    tiled_shape_.limited_keys = params.limited_keys;
    if (tiled_attention_supported(tiled_shape_)) {
      tiled_scratch_ =
          DeviceBuffer<std::byte>(tiled_attention_scratch_bytes(tiled_shape_), "attention tiles");
      return;
    }
  }
  scores_ = DeviceBuffer<float>(static_cast<size_t>(rows) * ld_, "attention scores");
  probs_ = DeviceBuffer<Bf16>(static_cast<size_t>(rows) * ld_, "attention probabilities");

  GemmShape qk;
  qk.m = rows;
  qk.n = params.keys;
  qk.k = params.head_dim;
  qk.ld_x = params.head_dim;
  qk.ld_w = params.head_dim;
  qk.ld_y = ld_;
  qk.w_transposed = true;
  qk.y_type = DType::kF32;
  qk.alpha = params.scale;
  qk.alignment = 16;  // K and V slices of a layer start at row offsets, not allocation starts
  qk_ = Gemm(handle, qk, workspace, workspace_bytes);

  GemmShape pv;
  pv.m = rows;
  pv.n = params.head_dim;
  pv.k = params.keys;
  pv.ld_x = ld_;
  pv.ld_w = params.head_dim;
  pv.ld_y = params.head_dim;
  pv.alignment = 16;
  pv_ = Gemm(handle, pv, workspace, workspace_bytes);
  if ((qk_.on_builtin_kernel() || pv_.on_builtin_kernel()) &&
      fused_attention_supported(params.head_dim)) {
    // At some MPS shares no cuBLASLt algorithm gets these products right; the fused kernel is
    // much faster than the plain GEMM kernel they would fall back to. The GEMMs and their
    // score buffers are then never used: give their memory back.
    fused_ = try_fused();
    if (fused_) {
      qk_ = Gemm();
      pv_ = Gemm();
      scores_ = DeviceBuffer<float>();
      probs_ = DeviceBuffer<Bf16>();
    }
  }
}

void SharedKvAttention::run(const Bf16* q, const Bf16* k, const Bf16* v, Bf16* out,
                            cudaStream_t stream, OpTimer* timer) {
  if (wgmma_) {
    wgmma_attention(wgmma_shape_, q, k, v, out, stream);
    if (timer) timer->mark("attention (wgmma)", stream);
    return;
  }
  if (fused_) {
    fused_attention(fused_shape_, q, k, v, out, stream);
    if (timer) timer->mark("attention (fused)", stream);
    return;
  }
  if (tiled()) {
    tiled_attention_scores(tiled_shape_, q, k, tiled_scratch_.get(), stream);
    if (timer) timer->mark("attention scores (tiled)", stream);
    tiled_attention_values(tiled_shape_, tiled_scratch_.get(), v, out, stream);
    if (timer) timer->mark("attention values (tiled)", stream);
    return;
  }
  const int rows = params_.queries * params_.heads;
  qk_.run(q, k, scores_.get(), nullptr, stream);
  if (timer) timer->mark("attention qk gemm", stream);
  softmax_rows(scores_.get(), ld_, probs_.get(), ld_, rows, params_.keys,
               params_.limited_queries * params_.heads, params_.limited_keys, stream);
  if (timer) timer->mark("attention softmax", stream);
  pv_.run(probs_.get(), v, out, nullptr, stream);
  if (timer) timer->mark("attention pv gemm", stream);
}

ViewAttention::ViewAttention(cublasLtHandle_t handle, const Params& params, void* workspace,
                             size_t workspace_bytes)
    : params_(params), ld_(padded(params.tokens)) {
  PI0_CHECK(params.views > 0 && params.tokens > 0 && params.heads > 0 && params.head_dim > 0,
            "ViewAttention: empty shape");
  const int64_t width = static_cast<int64_t>(params.heads) * params.head_dim;
  if (params.fused && fused_attention_supported(params.head_dim)) {
    FusedAttentionShape f;
    f.rows = params.tokens;
    f.keys = params.tokens;
    f.head_dim = params.head_dim;
    f.scale = params.scale;
    f.ld_q = f.ld_kv = static_cast<int>(3 * width);
    f.ld_out = static_cast<int>(width);
    f.outer = params.views;
    f.inner = params.heads;
    f.outer_stride = params.tokens * 3 * width;
    f.inner_stride = params.head_dim;
    f.out_outer_stride = params.tokens * width;
    f.out_inner_stride = params.head_dim;
    fused_shape_ = plan_fused_attention(f);
    fused_ = fused_attention_runs_here(fused_shape_);
    if (fused_) return;
  }
  const size_t per_view = static_cast<size_t>(params.heads) * params.tokens * ld_;
  scores_ = DeviceBuffer<float>(per_view * params.views, "vision attention scores");
  probs_ = DeviceBuffer<Bf16>(per_view * params.views, "vision attention probabilities");
  const int hd = params.heads * params.head_dim;

  // Batch b = head: Q and K of head b start b * head_dim columns into the fused QKV rows.
  GemmShape qk;
  qk.m = params.tokens;
  qk.n = params.tokens;
  qk.k = params.head_dim;
  qk.ld_x = 3 * hd;
  qk.ld_w = 3 * hd;
  qk.ld_y = ld_;
  qk.w_transposed = true;
  qk.y_type = DType::kF32;
  qk.alpha = params.scale;
  qk.batch = params.heads;
  qk.stride_x = params.head_dim;
  qk.stride_w = params.head_dim;
  qk.stride_y = static_cast<int64_t>(params.tokens) * ld_;
  qk.alignment = 16;  // head slices are head_dim * 2 bytes apart (144 for SigLIP)
  PI0_CHECK((params.head_dim * 2) % 16 == 0, "ViewAttention: head_dim must be a multiple of 8");
  qk_ = Gemm(handle, qk, workspace, workspace_bytes);

  GemmShape pv;
  pv.m = params.tokens;
  pv.n = params.head_dim;
  pv.k = params.tokens;
  pv.ld_x = ld_;
  pv.ld_w = 3 * hd;
  pv.ld_y = hd;
  pv.batch = params.heads;
  pv.stride_x = static_cast<int64_t>(params.tokens) * ld_;
  pv.stride_w = params.head_dim;
  pv.stride_y = params.head_dim;
  pv.alignment = 16;
  pv_ = Gemm(handle, pv, workspace, workspace_bytes);
}

void ViewAttention::run(const Bf16* qkv, Bf16* out, cudaStream_t stream, OpTimer* timer) {
  const int hd = params_.heads * params_.head_dim;
  if (fused_) {
    fused_attention(fused_shape_, qkv, qkv + hd, qkv + 2 * hd, out, stream);
    if (timer) timer->mark("vision attention (fused)", stream);
    return;
  }
  const size_t view_rows = static_cast<size_t>(params_.tokens) * 3 * hd;
  const size_t per_view = static_cast<size_t>(params_.heads) * params_.tokens * ld_;
  for (int v = 0; v < params_.views; ++v) {
    const Bf16* base = qkv + v * view_rows;
    qk_.run(base, base + hd, scores_.get() + v * per_view, nullptr, stream);
  }
  if (timer) timer->mark("vision attention qk gemm", stream);
  softmax_rows(scores_.get(), ld_, probs_.get(), ld_,
               params_.views * params_.heads * params_.tokens, params_.tokens, 0, 0, stream);
  if (timer) timer->mark("vision attention softmax", stream);
  for (int v = 0; v < params_.views; ++v) {
    const Bf16* base = qkv + v * view_rows;
    pv_.run(probs_.get() + v * per_view, base + 2 * hd,
            out + static_cast<size_t>(v) * params_.tokens * hd, nullptr, stream);
  }
  if (timer) timer->mark("vision attention pv gemm", stream);
}

}  // namespace pi0::cuda
