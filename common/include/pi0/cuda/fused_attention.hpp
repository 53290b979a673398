// Multi-query attention in one kernel (flash-decoding style): S = scale * Q K^T, a masked online
// softmax and O = P V per tile of keys, never writing the scores out. Built for the decoder, where
// the 3 launches and 2 score round trips of the GEMM path cost more than the arithmetic.
//
// Q' [rows, head_dim] (rows = queries * heads: a query row's heads are contiguous, and all share
// one K/V head), K and V [keys, head_dim], O' like Q'; bf16, 16-byte aligned rows. The keys are
// cut into `splits` ranges, one CTA per (64 rows, range); the ranges of a row block are one
// thread-block cluster and combine in range order through distributed shared memory, so the
// result does not depend on scheduling (bitwise reproducible).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct FusedAttentionShape {
  int rows = 0, keys = 0, head_dim = 0;
  float scale = 1.0f;
  // Rows < limited_rows see only keys < limited_keys (the decoder's state token, all its heads).
  int limited_rows = 0, limited_keys = 0;
  int splits = 1;  // key ranges; plan_fused_attention() picks it from the shape alone
};

bool fused_attention_supported(int head_dim);  // 64, 128 or 256

// Fills in splits. Depends on the shape only, so every process computes the same bits.
FusedAttentionShape plan_fused_attention(FusedAttentionShape shape);

// Whether the cluster of the planned shape can be scheduled in this process (an MPS client with a
// small SM share may not hold one); where not, use the GEMM path.
bool fused_attention_runs_here(const FusedAttentionShape& shape);

void fused_attention(const FusedAttentionShape& shape, const Bf16* q, const Bf16* k,
                     const Bf16* v, Bf16* out, cudaStream_t stream);

}  // namespace pi0::cuda
