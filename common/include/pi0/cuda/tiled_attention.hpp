// Multi-query attention as two small kernels of ours, for few query rows (the decoder's 64 or 51
// tokens x 8 heads) against keys of any count. cuBLASLt's QK and PV products take far slower
// kernels when the key count is not a multiple of 8 (C = 50: 563 or 583 keys), where these keep
// the aligned case's speed (bench/NOTES.md v17; default_attention_kernels() in attention.hpp).
//
// 1. scores: one CTA per (64 rows, 64 keys) tile computes S = scale * Q K^T, masks it, and
//    writes P~ = exp(S - m_t) in bf16 with the tile's row max m_t and row sum l_t.
// 2. values: one CTA per (32 rows, 32 output dims) turns each row's (m_t, l_t) into the weight of
//    every tile, exp(m_t - m) / l, and sums weight * (P~_t V_t) over the tiles.
// Nothing depends on scheduling, so the bits repeat; any grid fits any SM share (no clusters).
//
// Q' [rows, head_dim] (rows = queries * heads: a query row's heads are contiguous and share one
// K/V head), K and V [keys, head_dim], O' like Q'; bf16, contiguous, 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct TiledAttentionShape {
  int rows = 0, keys = 0, head_dim = 0;
  float scale = 1.0f;
  // Rows < limited_rows see only keys < limited_keys (the decoder's state token, all its heads).
  int limited_rows = 0, limited_keys = 0;
};

// head_dim 32, 64, 128 or 256, and at most kTiledAttentionMaxKeys keys.
constexpr int kTiledAttentionMaxKeys = 2048;
bool tiled_attention_supported(const TiledAttentionShape& shape);

// The scratch the two kernels pass between them: P~ and the tiles' row statistics.
size_t tiled_attention_scratch_bytes(const TiledAttentionShape& shape);

void tiled_attention_scores(const TiledAttentionShape& shape, const Bf16* q, const Bf16* k,
                            void* scratch, cudaStream_t stream);
void tiled_attention_values(const TiledAttentionShape& shape, const void* scratch, const Bf16* v,
                            Bf16* out, cudaStream_t stream);

}  // namespace pi0::cuda
