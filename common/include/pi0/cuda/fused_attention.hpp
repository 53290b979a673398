// Multi-query attention in one kernel (flash-decoding style): S = scale * Q K^T, a masked online
// softmax and O = P V per tile of keys, never writing the scores out. Built for small attentions
// (SigLIP's, the decoder's), where the launches and score round trips of the GEMM path cost more
// than the arithmetic.
//
// Q' [rows, head_dim] (rows = queries * heads: a query row's heads are contiguous, and all share
// one K/V head), K and V [keys, head_dim], O' like Q'; bf16, 16-byte aligned rows. Rows may also
// sit further apart (ld_*), and one launch may run a grid of independent problems (SigLIP: one per
// view and head, reading Q, K and V straight out of the fused QKV rows). Up to 256 keys (heads up
// to 72) sit in shared memory whole: one CTA per (problem, 64 rows), no cluster, where those CTAs
// fit one to an SM of an H100 (132). Longer ones, or more CTAs, are cut into `splits` ranges, one
// CTA per (problem, 64 rows, range); the ranges of a row block are one thread-block cluster and
// combine in range order through distributed shared memory. Either way the result does not depend
// on scheduling (bitwise reproducible).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct FusedAttentionShape {
  int rows = 0, keys = 0, head_dim = 0;
  float scale = 1.0f;
  // Rows < limited_rows see only keys < limited_keys (the decoder's state token, all its heads).
  int limited_rows = 0, limited_keys = 0;
  // Elements between consecutive rows of Q, of K and V, of O; 0 means head_dim (contiguous).
  int ld_q = 0, ld_kv = 0, ld_out = 0;
  // outer x inner independent problems; problem (o, i) finds its Q, K and V offset by
  // o * outer_stride + i * inner_stride elements, its output by o * out_outer_stride +
  // i * out_inner_stride.
  int outer = 1, inner = 1;
  int64_t outer_stride = 0, inner_stride = 0, out_outer_stride = 0, out_inner_stride = 0;
  int splits = 1;  // key ranges; plan_fused_attention() picks it from the shape alone
  // Every key in shared memory at once, no cluster (up to 256 keys, heads up to 72, 132 CTAs;
  // chosen by plan_fused_attention()).
  bool resident = false;
};

// 64, 72 (SigLIP's, padded to 80 in the products), 128 or 256.
bool fused_attention_supported(int head_dim);

// Fills in resident and splits. Depends on the shape only (and PI0_FUSED_ATTENTION_RESIDENT=0,
// which keeps the clustered kernel for comparisons), so every process computes the same bits.
FusedAttentionShape plan_fused_attention(FusedAttentionShape shape);

// Whether the planned shape can run in this process: its cluster scheduled (an MPS client with a
// small SM share may not hold one), or the in-shared-memory kernel's shared memory there; where
// not, use the GEMM path.
bool fused_attention_runs_here(const FusedAttentionShape& shape);

void fused_attention(const FusedAttentionShape& shape, const Bf16* q, const Bf16* k, const Bf16* v,
                     Bf16* out, cudaStream_t stream);

}  // namespace pi0::cuda
