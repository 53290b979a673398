// One step of flash-style multi-query attention on tensor cores, shared by the fused attention
// kernel and the persistent decoder-layers kernel. Internal to common/cuda.
//
// Shared memory holds [rows][D] bf16 matrices as 16-byte chunks XOR-swizzled by row, so ldmatrix
// is free of bank conflicts. A warp owns 16 query rows; thread (g = lane / 4, t = lane % 4) holds
// rows g and g + 8 of them, and output columns 8 n + 2 t, 8 n + 2 t + 1 of each n8 tile.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "mma_primitives.cuh"

namespace pi0::cuda::attention_tile {

constexpr int kKeys = 32;  // keys per tile

template <int D>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  static_assert(D % 64 == 0, "the XOR swizzle needs rows of at least 8 chunks, in eights");
  return static_cast<uint32_t>((row * (D / 8) + (chunk ^ (row & 7))) * 16);
}

// Rows first .. first + count - 1 of a matrix with rows ld elements apart into shared memory
// rows of D (cp.async, not committed): the first `chunks` 16-byte chunks of each row, where chunks
// at or past column `cols` (a multiple of 8) and rows >= end read as 0 (a head narrower than D,
// e.g. SigLIP's 72 in rows of 128, gets zeros in its padding).
template <int D, int kThreads>
__device__ __forceinline__ void load_rows(uint32_t dst, const __nv_bfloat16* src, int ld, int cols,
                                          int chunks, int first, int end, int count) {
  for (int c = static_cast<int>(threadIdx.x); c < count * chunks; c += kThreads) {
    const int r = c / chunks, ch = c % chunks;
    const int gr = first + r;
    const bool ok = gr < end && ch * 8 < cols;
    mma::cp_async16(dst + swizzled<D>(r, ch),
                    ok ? src + static_cast<size_t>(gr) * ld + ch * 8 : src, ok);
  }
}

// The same for a contiguous [*, D] matrix.
template <int D, int kThreads>
__device__ __forceinline__ void load_rows(uint32_t dst, const __nv_bfloat16* src, int first,
                                          int end, int count) {
  load_rows<D, kThreads>(dst, src, D, D, D / 8, first, end, count);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&p);
}

// The warp's rows (shared-memory rows row0 .. row0 + 15 of qs) against one tile of keys key0 ..
// key0 + 31 (ks, vs: that tile's K and V rows): S = Q K^T over the whole head dim, scaled (log2
// domain, scale_log2 = scale * log2 e) and masked (keys >= key_end, and for a `limited` row keys
// >= limited_keys); the running max m and sum l updated; o = o * alpha + P V for output dims
// dim0 .. dim0 + DO - 1. l stays a per-thread partial: quad_sum() it at the end. The product runs
// over the first DK dims of the rows only (DK < D where the head is padded to D).
template <int D, int DO, int DK = D>
__device__ __forceinline__ void attend_tile(uint32_t qs, uint32_t ks, uint32_t vs, int row0,
                                            int dim0, int key0, int key_end,
                                            const bool (&limited)[2], int limited_keys,
                                            float scale_log2, float (&m)[2], float (&l)[2],
                                            float (&o)[DO / 8][4]) {
  static_assert(DK % 16 == 0 && DO % 16 == 0 && DK <= D && DO <= D,
                "both products step 16 dims at a time within the shared-memory row");
  using namespace mma;
  const int lane = threadIdx.x & 31, t = lane & 3;
  float s[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    uint32_t af[4];
    ldsm_x4(af, qs + swizzled<D>(row0 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
    for (int jp = 0; jp < 2; ++jp) {
      uint32_t b[4];
      const int key = jp * 16 + ((lane >> 4) & 1) * 8 + (lane & 7);
      ldsm_x4(b, ks + swizzled<D>(key, kk * 2 + ((lane >> 3) & 1)));
      mma16816(s[2 * jp], af, b[0], b[1]);
      mma16816(s[2 * jp + 1], af, b[2], b[3]);
    }
  }

  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + j * 8 + 2 * t + (e & 1);
      const int h = e >> 1;
      const bool ok = key < key_end && (!limited[h] || key < limited_keys);
      s[j][e] = ok ? s[j][e] * scale_log2 : -INFINITY;
      mx[h] = fmaxf(mx[h], s[j][e]);
    }
  float base[2], alpha[2], added[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    base[h] = mx[h] == -INFINITY ? 0.0f : mx[h];  // a row with nothing visible yet stays at 0
    alpha[h] = exp2f(m[h] - base[h]);
    m[h] = mx[h];
  }
  // P in the A-operand layout of the PV product: key step ks covers score tiles 2ks, 2ks + 1.
  uint32_t pa[2][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float p0 = exp2f(s[j][0] - base[0]), p1 = exp2f(s[j][1] - base[0]);
    const float p2 = exp2f(s[j][2] - base[1]), p3 = exp2f(s[j][3] - base[1]);
    added[0] += p0 + p1;
    added[1] += p2 + p3;
    pa[j >> 1][(j & 1) * 2] = pack_bf16(p0, p1);
    pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p2, p3);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + added[h];
#pragma unroll
  for (int n = 0; n < DO / 8; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }
#pragma unroll
  for (int ks_step = 0; ks_step < 2; ++ks_step) {
#pragma unroll
    for (int dn = 0; dn < DO / 16; ++dn) {
      uint32_t b[4];
      const int key = ks_step * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
      ldsm_x4_t(b, vs + swizzled<D>(key, dim0 / 8 + dn * 2 + (lane >> 4)));
      mma16816(o[2 * dn], pa[ks_step], b[0], b[1]);
      mma16816(o[2 * dn + 1], pa[ks_step], b[2], b[3]);
    }
  }
}

// The warp's rows against keys key_begin .. key_end - 1 of k / v (global, rows ld elements apart,
// `cols` of them valid; by default [keys][D]), in tiles double-buffered through ks0 / vs0 (room
// for two tiles each). The caller has issued the Q load into qs without committing it. Every warp
// of the CTA calls this (it synchronises the CTA).
template <int D, int DO, int kThreads, int DK = D>
__device__ __forceinline__ void attend_range(uint32_t qs, uint32_t ks0, uint32_t vs0,
                                             const __nv_bfloat16* k, const __nv_bfloat16* v,
                                             int key_begin, int key_end, int row0, int dim0,
                                             const bool (&limited)[2], int limited_keys,
                                             float scale_log2, float (&m)[2], float (&l)[2],
                                             float (&o)[DO / 8][4], int ld = D, int cols = D) {
  constexpr int kTileBytes = kKeys * D * 2;
  // 16-byte chunks of a row to load: all of them, or with a padded head (DK < D) only those the
  // products read.
  const int chunks = DK == D ? D / 8 : max(DK, dim0 + DO) / 8;
  const int tiles = key_end > key_begin ? (key_end - key_begin + kKeys - 1) / kKeys : 0;
  if (tiles > 0) {
    load_rows<D, kThreads>(ks0, k, ld, cols, chunks, key_begin, key_end, kKeys);
    load_rows<D, kThreads>(vs0, v, ld, cols, chunks, key_begin, key_end, kKeys);
  }
  mma::cp_commit();
  for (int it = 0; it < tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < tiles) {
      const int next = key_begin + (it + 1) * kKeys;
      load_rows<D, kThreads>(ks0 + (stage ^ 1) * kTileBytes, k, ld, cols, chunks, next, key_end,
                             kKeys);
      load_rows<D, kThreads>(vs0 + (stage ^ 1) * kTileBytes, v, ld, cols, chunks, next, key_end,
                             kKeys);
      mma::cp_commit();
      mma::cp_wait<1>();
    } else {
      mma::cp_wait<0>();
    }
    __syncthreads();
    attend_tile<D, DO, DK>(qs, ks0 + stage * kTileBytes, vs0 + stage * kTileBytes, row0, dim0,
                           key_begin + it * kKeys, key_end, limited, limited_keys, scale_log2, m, l,
                           o);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
}

// One thread's running state over its rows row_a and row_a + 8 (of a warp's 16 query rows): the
// unnormalised output o over DO dims, the running maxima m and partial sums l, and which of the
// two rows see only keys < limited_keys. Starts with no key seen. Kernels bind the members to
// names (auto& [o, m, l, limited] = rows) and hand them to attend_tile / attend_range.
template <int DO>
struct RowState {
  float o[DO / 8][4];
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  bool limited[2];
  __device__ __forceinline__ RowState(int row_a, int limited_rows)
      : limited{row_a < limited_rows, row_a + 8 < limited_rows} {
#pragma unroll
    for (int n = 0; n < DO / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  }
};

// The four threads of a row share its sum.
__device__ __forceinline__ void quad_sum(float (&l)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
}

}  // namespace pi0::cuda::attention_tile
