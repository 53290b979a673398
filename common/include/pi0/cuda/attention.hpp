// Attention as two cuBLASLt GEMMs around a row softmax: S = scale * Q K^T (fp32), P = softmax(S)
// (bf16, masked), O = P V; or, where asked and possible, in the one-kernel flash attention of
// fused_attention.hpp or the two kernels of tiled_attention.hpp. Which is faster depends on the
// shape (bench/NOTES.md v9, v17), so each caller chooses.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <initializer_list>

#include "pi0/bf16.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/fused_attention.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/op_timer.hpp"
#include "pi0/cuda/tiled_attention.hpp"
#include "pi0/cuda/wgmma_attention.hpp"

namespace pi0::cuda {

enum class AttentionKernels { kGemms, kFused, kTiled, kWgmma };

// The multi-query attention's kernels for `query_rows` (queries x heads) against `keys` keys.
// cuBLASLt takes far slower kernels for the QK and PV products when the key count is not a
// multiple of 8: the decoder at C = 50 (512 query rows) took 10.9-11.1 ms against 8.2-8.3 with
// the tiled kernels. Elsewhere the GEMMs are 0.05-0.4 ms a frame faster, and so they are for the
// Gemma prefix's 4,256 query rows at P = 20, whose tiled values kernel re-reads P~ once per 32
// output dims (bench/NOTES.md v17). So: tiled for a decoder-sized attention over unaligned keys,
// else the GEMMs.
AttentionKernels default_attention_kernels(int query_rows, int keys);

// The decoder's flow steps after the first: the wgmma kernel wherever default_attention_kernels()
// says GEMMs and the head size is 256 (V=2 0.10-0.12 ms lower on an H100, bench/NOTES.md v21),
// so the tiled kernels keep decoder-sized attentions over unaligned keys. SharedKvAttention falls
// back to the GEMMs where the kernel cannot run (no sm_90a code, a cluster that does not fit the
// SM share; then every step runs them, and the bits differ from a run on the wgmma kernel). The
// first step keeps default_attention_kernels().
AttentionKernels default_decoder_attention_kernels(int query_rows, int keys, int head_dim);

// "gemm", "fused", "tiled" or "wgmma": the names the PI0_*_ATTENTION variables take.
const char* attention_kernels_name(AttentionKernels kernels);

// `variable` = gemm | fused | tiled | wgmma (those of `accepted`) overrides `fallback`; unset or
// empty keeps it. A value not accepted throws an error naming the variable, the value and the
// choices.
AttentionKernels attention_kernels_from_env(const char* variable, AttentionKernels fallback,
                                            std::initializer_list<AttentionKernels> accepted = {
                                                AttentionKernels::kGemms, AttentionKernels::kFused,
                                                AttentionKernels::kTiled,
                                                AttentionKernels::kWgmma});

// `heads` query heads sharing one K/V head (Gemma's multi-query attention). Because the query
// heads of a row are contiguous, Q [queries, heads * head_dim] is also Q' [queries * heads,
// head_dim], and the whole attention is one QK^T and one PV product over Q'.
class SharedKvAttention {
 public:
  struct Params {
    int queries = 0, heads = 0, head_dim = 0, keys = 0;
    float scale = 1.0f;
    // Queries (tokens) < limited_queries see only keys < limited_keys (the decoder's state token).
    int limited_queries = 0, limited_keys = 0;
    // kFused: one kernel (pi0/cuda/fused_attention.hpp), where the head size allows it and its
    // cluster fits this process's SM share. kTiled: the two kernels of tiled_attention.hpp,
    // where the shape allows it. kWgmma: pi0/cuda/wgmma_attention.hpp's one kernel, for head
    // size 256 where this binary has sm_90a code and its cluster fits this process's share.
    // Otherwise, and for kGemms, the GEMMs and the softmax.
    AttentionKernels kernels = AttentionKernels::kGemms;
  };
  SharedKvAttention() = default;
  SharedKvAttention(cublasLtHandle_t handle, const Params& params, void* workspace,
                    size_t workspace_bytes);
  // q [queries, heads*head_dim], k and v [keys, head_dim], out [queries, heads*head_dim]; all
  // contiguous bf16, 256-byte aligned.
  void run(const Bf16* q, const Bf16* k, const Bf16* v, Bf16* out, cudaStream_t stream,
           OpTimer* timer = nullptr);
  size_t scratch_bytes() const { return scores_.bytes() + probs_.bytes() + tiled_scratch_.bytes(); }
  double flops() const {
    return 4.0 * params_.queries * params_.heads * static_cast<double>(params_.keys) *
           params_.head_dim;
  }
  bool fused() const { return fused_; }
  bool tiled() const { return tiled_scratch_.bytes() > 0; }
  bool on_wgmma() const { return wgmma_; }
  // The kernels it runs: what Params asked for, or the GEMMs where those cannot run here.
  AttentionKernels kernels() const {
    return wgmma_    ? AttentionKernels::kWgmma
           : fused_  ? AttentionKernels::kFused
           : tiled() ? AttentionKernels::kTiled
                     : AttentionKernels::kGemms;
  }

 private:
  bool try_fused();  // plans the fused kernel; false where its cluster does not fit here
  Params params_{};
  bool wgmma_ = false;
  WgmmaAttentionShape wgmma_shape_{};
  int ld_ = 0;
  DeviceBuffer<float> scores_;
  DeviceBuffer<Bf16> probs_;
  Gemm qk_, pv_;
  bool fused_ = false;
  FusedAttentionShape fused_shape_{};
  TiledAttentionShape tiled_shape_{};
  DeviceBuffer<std::byte> tiled_scratch_;
};

// Multi-head attention within each view (SigLIP): qkv [views * tokens, 3 * heads * head_dim]
// = Q | K | V, out [views * tokens, heads * head_dim]. Fused: one kernel for every view and head,
// reading Q, K and V in place. Otherwise heads are GEMM batches and views separate calls, the
// softmax one launch over all of them (five launches at two views).
class ViewAttention {
 public:
  struct Params {
    int views = 0, tokens = 0, heads = 0, head_dim = 0;
    float scale = 1.0f;
    // The fused kernel, where the head size allows it and it can run in this process
    // (fused_attention_runs_here).
    bool fused = false;
  };
  ViewAttention() = default;
  ViewAttention(cublasLtHandle_t handle, const Params& params, void* workspace,
                size_t workspace_bytes);
  void run(const Bf16* qkv, Bf16* out, cudaStream_t stream, OpTimer* timer = nullptr);
  size_t scratch_bytes() const { return scores_.bytes() + probs_.bytes(); }
  double flops() const {
    return 4.0 * params_.views * params_.heads * static_cast<double>(params_.tokens) *
           params_.tokens * params_.head_dim;
  }
  bool fused() const { return fused_; }
  // The fused kernel's plan (meaningful where fused()).
  const FusedAttentionShape& fused_shape() const { return fused_shape_; }

 private:
  Params params_{};
  int ld_ = 0;
  DeviceBuffer<float> scores_;
  DeviceBuffer<Bf16> probs_;
  Gemm qk_, pv_;
  bool fused_ = false;
  FusedAttentionShape fused_shape_{};
};

}  // namespace pi0::cuda
