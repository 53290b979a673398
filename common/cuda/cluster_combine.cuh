// The last step of a flash-decoding attention whose key ranges are one thread-block cluster: each
// CTA has parked its unnormalised output rows [64][D] (fp32) and their (max, sum) in its own
// shared memory; CTA r combines rows r, r + S, ... over the ranks 0 .. S-1 in that order through
// distributed shared memory, so the result does not depend on scheduling. The fused (mma.sync)
// attention kernels' combine; the wgmma kernel exchanges bf16 rows instead (its own, in
// wgmma_attention.cu). Internal to common/cuda.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>

namespace pi0::cuda::attention_combine {

constexpr int kRowsPerBlock = 64;

// row_weights: [64][kMaxSplits + 1] of this CTA's shared memory (per combined row: each range's
// weight, then 1 / sum). Every thread of the CTA calls it; ends with a cluster barrier, after
// which no CTA reads another's shared memory.
template <int D, int kThreads, int kMaxSplits>
__device__ void combine_ranges(cooperative_groups::cluster_group& cluster, float* parked,
                               float2* parked_ml, float (*row_weights)[kMaxSplits + 1], int splits,
                               int r0, int rows, int head_dim, __nv_bfloat16* out, int ld_out) {
  const int tid = threadIdx.x;
  const int rank = static_cast<int>(cluster.block_rank());
  const int my_rows = (kRowsPerBlock - rank + splits - 1) / splits;
  // Each of this CTA's rows weighs its ranges once (max, then exp2 of each range's max against
  // it, and the normaliser): the remote (max, sum) pairs are read once per row, not per column.
  for (int j = tid; j < my_rows; j += kThreads) {
    const int rl = rank + j * splits;
    float2 ml[kMaxSplits];
    float mmax = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      if (sp >= splits) break;
      ml[sp] = cluster.map_shared_rank(parked_ml, sp)[rl];
      mmax = fmaxf(mmax, ml[sp].x);
    }
    float sum = 0.0f;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      if (sp >= splits) break;
      const float w = ml[sp].x == -INFINITY ? 0.0f : exp2f(ml[sp].x - mmax);
      sum += w * ml[sp].y;
      row_weights[j][sp] = w;
    }
    row_weights[j][kMaxSplits] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncthreads();
  const int quads = head_dim / 4;  // output columns in fours
  for (int idx = tid; idx < my_rows * quads; idx += kThreads) {
    const int j = idx / quads, d4 = idx % quads;
    const int rl = rank + j * splits;
    const int row = r0 + rl;
    if (row >= rows) continue;
    float4 po[kMaxSplits];
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      if (sp >= splits) break;
      po[sp] = reinterpret_cast<const float4*>(cluster.map_shared_rank(parked, sp) + rl * D)[d4];
    }
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      if (sp >= splits) break;
      const float w = row_weights[j][sp];
      acc.x += w * po[sp].x;
      acc.y += w * po[sp].y;
      acc.z += w * po[sp].z;
      acc.w += w * po[sp].w;
    }
    const float inv = row_weights[j][kMaxSplits];
    __nv_bfloat162* dst =
        reinterpret_cast<__nv_bfloat162*>(out + static_cast<size_t>(row) * ld_out + d4 * 4);
    dst[0] = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
    dst[1] = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

}  // namespace pi0::cuda::attention_combine
