// The decoder's qkv product with its folded RMS norm, RoPE and the split into Q, K and V in one
// kernel (Hopper, sm_90a): Y = X W^T' for one frame's rows (at most 64), each row scaled by
// rsqrt(mean(X[r]^2) + eps), Q and K rotated by RoPE at positions first_position + r (interleaved
// pairs), Q to q [rows][q_heads * head_dim], K and V to k and v [rows][head_dim] (the K/V cache's
// suffix rows). One CTA: 32 output columns, all of X and of its W^T rows resident in shared
// memory, loaded through the TMA. Replaces cuBLASLt's qkv product and rope_split_qkv.
#pragma once

#include <cuda_runtime_api.h>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct QkvRopeShape {
  int rows = 0, k = 0;            // X [rows][k], rows <= 64, k % 64 == 0, k <= 1024
  int q_heads = 0, head_dim = 0;  // head_dim 256; W^T [(q_heads + 2) head_dim][k]
};

// Whether this binary has the kernel's sm_90a code for this GPU and the shape is one it takes.
bool qkv_rope_supported(const QkvRopeShape& s);

// Whether all of the shape's CTAs (one an SM, for their shared memory) run at once in this
// process; under an MPS share too small for them they would run in waves, slower than cuBLASLt.
bool qkv_rope_fits_at_once(const QkvRopeShape& s);

void qkv_rope(const QkvRopeShape& s, const Bf16* x, const Bf16* w_transposed, Bf16* q, Bf16* k,
              Bf16* v, int first_position, float theta, float eps, cudaStream_t stream);

}  // namespace pi0::cuda
