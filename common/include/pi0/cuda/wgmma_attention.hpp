// Multi-query attention for head size 256 (Gemma's prefix, the action expert) on Hopper's
// warpgroup MMA: one kernel, flash-attention style. A CTA is one warpgroup: 64 query rows against
// one range of keys, 64 keys at a time; S = Q K^T and O += P V run on wgmma with every operand in
// shared memory (Q and K as loaded, P written by the softmax), so the scores never leave the SM.
// The key ranges of a row block are one thread-block cluster and combine in range order through
// distributed shared memory, each range's rows normalised by its own sum and exchanged as bf16
// (half the bytes of fp32, and the exchange is most of the kernel's time): bitwise reproducible,
// whatever the SM share.
//
// Q' [rows, 256] (rows = queries * heads, a query's heads contiguous, all sharing the one K/V
// head), K and V [keys, 256], O' like Q'; contiguous bf16, 16-byte aligned. Needs sm_90a code
// (wgmma_attention_available()).
#pragma once

#include <cuda_runtime_api.h>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct WgmmaAttentionShape {
  int rows = 0, keys = 0;
  float scale = 1.0f;
  // Rows < limited_rows see only keys < limited_keys (the decoder's state token, all its heads).
  int limited_rows = 0, limited_keys = 0;
  int splits = 1;  // key ranges (the cluster size); plan_wgmma_attention() picks it
};

// Whether this binary carries the kernel's sm_90a code for the current GPU.
bool wgmma_attention_available();

// Fills in splits from the shape alone (never the SM count), so every process gets the same bits.
WgmmaAttentionShape plan_wgmma_attention(WgmmaAttentionShape shape);

// Whether a cluster of the planned shape can be scheduled in this process (an MPS client with a
// small SM share may not hold one); where not, the caller keeps another path.
bool wgmma_attention_runs_here(const WgmmaAttentionShape& shape);

void wgmma_attention(const WgmmaAttentionShape& shape, const Bf16* q, const Bf16* k, const Bf16* v,
                     Bf16* out, cudaStream_t stream);

}  // namespace pi0::cuda
