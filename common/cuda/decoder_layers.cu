// Persistent decoder-layers kernel (see pi0/cuda/decoder_layers.hpp). One CTA of 8 warps per SM;
// each phase hands out units in blockIdx order, grid-strided.
// GEMM units: a 64-row x 64-column output tile over one K range; X and W stream through a
// kStages-deep cp.async ring of 64-deep K blocks (16-byte chunks, XOR-swizzled: free of bank
// conflicts for ldmatrix, and the 128-byte-swizzle layout wgmma reads), as in skinny_gemm.cu. W
// comes from set_weights' copy, each unit's [64 k][64 n] blocks back to back (8 KB apiece). The
// mainloop is wgmma where the binary has sm_90a code (inlined at the kernel's one GEMM call site:
// ptxas serialises wgmma across a call), else mma.sync. A unit writes its fp32 partial tile to
// global scratch; the next phase sums the partials of a row in split order. Gate|up units take 32
// gate and the matching 32 up columns, so the GeGLU is applied in the epilogue, with no partials
// (one K range). Attention units: 64 query rows (query row r's heads are rows r * q_heads + h, all
// sharing the one K/V head) against 64 keys, an online softmax as in fused_attention.cu; the
// combine phase merges the key ranges in range order.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention_tile.cuh"
#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/decoder_layers.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
using namespace mma;

constexpr int kThreads = 256;  // 8 warps: the row phases are latency-bound
constexpr int kRows = 64;      // GEMM tile rows: every suffix row
constexpr int kBN = 64;
constexpr int kBK = 64;
constexpr int kStages = 6;
constexpr int kXStageBytes = kRows * kBK * 2;
constexpr int kStageBytes = kXStageBytes + kBK * kBN * 2;
constexpr int kHeadDim = 256;
constexpr int kKeysPerTile = attention_tile::kKeys;
constexpr int kKeysPerUnit = 64;
constexpr int kQRowsPerUnit = 64;
constexpr int kAttnBytes = (kQRowsPerUnit + 4 * kKeysPerTile) * kHeadDim * 2;
// + 1024: the ring starts on a 1024-byte boundary (wgmma's 128-byte-swizzle atoms).
constexpr int kSmemBytes =
    (kStages * kStageBytes > kAttnBytes ? kStages * kStageBytes : kAttnBytes) + 1024;
// Units per GEMM phase the K splits aim at: about one per SM of a whole H100. A constant, so the
// split (and so the bits) do not depend on the SM share.
constexpr int kTargetUnits = 128;
constexpr int kPhasesPerLayer = 9;

struct GemmPhase {
  const bf16* w = nullptr;
  size_t w_layer_stride = 0;
  const bf16* x = nullptr;
  int ldx = 0, ldw = 0;
  int tiles = 0, kblocks = 0, kb_per_split = 0, splits = 0;
  int geglu_up = 0;  // > 0: gate|up side by side, up starting at this column; GeGLU into y
  bf16* y = nullptr;
  int ld_y = 0;
  float* part = nullptr;  // [splits][kRows][ld_part]
  int ld_part = 0;
  __host__ __device__ int units() const { return tiles * splits; }
};

struct Args {
  GemmPhase qkv, o, gu, down;
  float* x;
  bf16* h;
  bf16* q;
  bf16* attn;
  float* att_o;    // [ranges][q_rows_pad][head_dim]
  float2* att_ml;  // [ranges][q_rows_pad]: running max (log2 domain) and sum
  bf16* kv;
  size_t kv_layer_stride, v_offset;
  int rows, prefix, keys, width, qkv_width, q_heads, layers;
  int q_rows, q_rows_pad, ranges, attn_units;
  float eps, log2_theta, scale_log2;
  int wgmma;  // GEMM units on warpgroup MMA (sm_90a code only) instead of mma.sync
  // Optional: globaltimer stamps [2][gridDim.x][phases]: as each CTA reaches each barrier, and
  // as it leaves it.
  unsigned long long* trace;
  int trace_phases;
  // Optional, with trace: inside each CTA's first GEMM unit of layer 1, per GEMM kind (qkv, o,
  // gate|up, down): [kind][gridDim.x][4] stamps: start, first block landed, loop done, end.
  unsigned long long* unit_trace;
};

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ void* smem_generic(uint32_t addr) {
  return __cvta_shared_to_generic(addr);
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < kThreads / 32; ++i) total += red[i];
  return total;
}

// ---- GEMM units ----

struct UnitRange {
  int tile, split, kb0, nkb;
  __device__ int kb(int step) const { return kb0 + step; }  // the K block of the unit's step
};
__device__ __forceinline__ UnitRange unit_range(const GemmPhase& g, int u) {
  UnitRange r;
  r.tile = u / g.splits;
  r.split = u % g.splits;
  r.kb0 = r.split * g.kb_per_split;
  r.nkb = min(g.kblocks, r.kb0 + g.kb_per_split) - r.kb0;
  return r;
}

// Global column of 8-column chunk `nc` (0..7) of tile `tile`. Gate|up: the warp owning chunks
// 2w, 2w + 1 gets gate block and up block of the same 8 output columns.
__device__ __forceinline__ int w_column(const GemmPhase& g, int tile, int nc) {
  if (g.geglu_up > 0) return (nc & 1 ? g.geglu_up : 0) + tile * (kBN / 2) + (nc >> 1) * 8;
  return tile * kBN + nc * 8;
}

__device__ __forceinline__ void load_w(const GemmPhase& g, const bf16* w, int tile, uint32_t ws,
                                       int kb) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kBK * kBN / 8 / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int kr = c >> 3, nc = c & 7;
    const bf16* src = w + (static_cast<size_t>(tile) * g.kblocks + kb) * (kBK * kBN) + c * 8;
    cp_async16(ws + (kr * kBN + ((nc ^ (kr & 7)) << 3)) * 2, src, true);
  }
}

__device__ __forceinline__ void load_x(const GemmPhase& g, int rows, uint32_t xs, int kb) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kRows * kBK / 8 / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c >> 3, kc = c & 7;
    const bool ok = row < rows;
    const bf16* src = ok ? g.x + static_cast<size_t>(row) * g.ldx + kb * kBK + kc * 8 : g.x;
    cp_async16(xs + (row * kBK + ((kc ^ (row & 7)) << 3)) * 2, src, ok);
  }
}

// The first kStages - 1 weight blocks of unit u, as one cp.async group: they do not depend on the
// previous phase, so they are issued before its barrier.
__device__ __noinline__ void prefetch_w(const GemmPhase& g, int layer, int u, uint32_t sbase) {
  const UnitRange r = unit_range(g, u);
  const bf16* w = g.w + layer * g.w_layer_stride;
  for (int s = 0; s < kStages - 1 && s < r.nkb; ++s)
    load_w(g, w, r.tile, sbase + s * kStageBytes + kXStageBytes, r.kb(s));
  cp_commit();
}

// The ring's first kStages - 1 blocks of unit r (W unless it was prefetched, and X), one cp.async
// group each, empty past the unit's end.
__device__ __forceinline__ void fill_ring(const GemmPhase& g, const bf16* w, const UnitRange& r,
                                          int rows, uint32_t sbase, bool w_prefetched) {
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < r.nkb) {
      const uint32_t xs = sbase + s * kStageBytes;
      if (!w_prefetched) load_w(g, w, r.tile, xs + kXStageBytes, r.kb(s));
      load_x(g, rows, xs, r.kb(s));
    }
    cp_commit();
  }
}

// Block `next` of unit r into its stage, as one group (empty past the unit's end).
__device__ __forceinline__ void refill_ring(const GemmPhase& g, const bf16* w, const UnitRange& r,
                                            int rows, uint32_t sbase, int next) {
  if (next < r.nkb) {
    const uint32_t xs = sbase + (next % kStages) * kStageBytes;
    load_w(g, w, r.tile, xs + kXStageBytes, r.kb(next));
    load_x(g, rows, xs, r.kb(next));
  }
  cp_commit();
}

__device__ __noinline__ void gemm_unit_mma(const GemmPhase& g, int layer, int u, int rows,
                                           uint32_t sbase, bool w_prefetched) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const UnitRange r = unit_range(g, u);
  const bf16* w = g.w + layer * g.w_layer_stride;

  // Warp w: rows 32 * (w / 4) .. + 32, columns (chunks) 2 * (w % 4) and 2 * (w % 4) + 1.
  const int row_half = warp >> 2, col_group = warp & 3;
  float acc[2][2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  fill_ring(g, w, r, rows, sbase, w_prefetched);
  for (int it = 0; it < r.nkb; ++it) {
    cp_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for all threads; stage it - 1 is free again
    refill_ring(g, w, r, rows, sbase, it + kStages - 1);
    const uint32_t xs = sbase + (it % kStages) * kStageBytes;
    const uint32_t ws = xs + kXStageBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = row_half * 32 + i * 16 + (lane & 15);
        const int kc = kk * 2 + (lane >> 4);
        ldsm_x4(af[i], xs + (row * kBK + ((kc ^ (row & 7)) << 3)) * 2);
      }
      uint32_t t[4];
      {
        const int j = lane >> 3, rr = lane & 7;
        const int kr = kk * 16 + (j & 1) * 8 + rr;
        const int nc = col_group * 2 + (j >> 1);
        ldsm_x4_t(t, ws + (kr * kBN + ((nc ^ (kr & 7)) << 3)) * 2);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mma16816(acc[i][0], af[i], t[0], t[1]);
        mma16816(acc[i][1], af[i], t[2], t[3]);
      }
    }
  }

  if (g.geglu_up > 0) {
    const int col = r.tile * (kBN / 2) + col_group * 8 + (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row_half * 32 + i * 16 + (lane >> 2) + 8 * h;
        if (row >= rows) continue;
        const float g0 = acc[i][0][2 * h], g1 = acc[i][0][2 * h + 1];
        const float u0 = acc[i][1][2 * h], u1 = acc[i][1][2 * h + 1];
        *reinterpret_cast<bf162*>(g.y + static_cast<size_t>(row) * g.ld_y + col) =
            __floats2bfloat162_rn(gelu_tanh(g0) * u0, gelu_tanh(g1) * u1);
      }
  } else {
    float* part = g.part + static_cast<size_t>(r.split) * kRows * g.ld_part;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_half * 32 + i * 16 + (lane >> 2) + 8 * h;
          if (row >= rows) continue;
          const int col = r.tile * kBN + col_group * 16 + j * 8 + (lane & 3) * 2;
          *reinterpret_cast<float2*>(part + static_cast<size_t>(row) * g.ld_part + col) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        }
  }
  cp_wait<0>();
  __syncthreads();  // the ring is free for the next unit or the next phase's prefetch
}

// Stamps step i of a traced unit (Args::unit_trace).
__device__ __forceinline__ void unit_stamp(unsigned long long* stamps, int i) {
  if (stamps && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    stamps[i] = t;
  }
}

// The same unit on warpgroup MMA (sm_90a): the tensor cores read X (K-major) and W (MN-major: its
// [64 k][64 n] blocks) from the ring through 128-byte-swizzle descriptors (the ring's chunk swizzle
// is that layout), so no operand passes through registers. The two warpgroups take the two halves
// of every 64-deep block (k 0-31 and 32-63); warpgroup 1 hands its accumulators to warpgroup 0
// through shared memory, which adds them (always in that order) and runs the epilogue.
__device__ __forceinline__ void gemm_unit_wgmma(const GemmPhase& g, int layer, int u, int rows,
                                                uint32_t sbase, bool w_prefetched,
                                                unsigned long long* stamps) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  (void)g, (void)layer, (void)u, (void)rows, (void)sbase, (void)w_prefetched, (void)stamps;
  __trap();  // never launched: the host asks for wgmma only where sm_90a code exists
#else
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wg_tid = tid & 127, wg_warp = warp & 3;
  const UnitRange r = unit_range(g, u);
  const bf16* w = g.w + layer * g.w_layer_stride;

  float d[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) d[e] = 0.0f;

  unit_stamp(stamps, 0);
  fill_ring(g, w, r, rows, sbase, w_prefetched);
  for (int it = 0; it < r.nkb; ++it) {
    cp_wait<kStages - 2>();
    fence_async_shared();  // this thread's copies, visible to the tensor cores
    __syncthreads();       // everyone's; and block it - 1's wgmma are done (waited below)
    if (it == 0) unit_stamp(stamps, 1);
    refill_ring(g, w, r, rows, sbase, it + kStages - 1);
    const uint32_t xs = sbase + (it % kStages) * kStageBytes;
    const uint32_t ws = xs + kXStageBytes;
    fence_operand(d);
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < kBK / 32; ++kq) {
      const int kk = wg * (kBK / 32) + kq;
      wgmma_m64n64k16<1>(d, smem_desc_sw128(xs + kk * 32, 16, 1024),
                         smem_desc_sw128(ws + kk * 2048, 1024, 1024), 1);
    }
    wgmma_commit();
    wgmma_wait0();
    fence_operand(d);
  }
  unit_stamp(stamps, 2);
  cp_wait<0>();
  // The tensor cores are done reading the ring (every warp waited); order those async-proxy reads
  // before the generic writes below.
  fence_async_shared();
  __syncthreads();
  float4* red = reinterpret_cast<float4*>(smem_generic(sbase));
  float* tile = reinterpret_cast<float*>(smem_generic(sbase + 8 * 128 * 16));  // [64][64] fp32
  if (wg == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      red[j * 128 + wg_tid] = make_float4(d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]);
  }
  __syncthreads();
  if (wg == 0) {
    // Warp w holds rows 16 w + lane / 4 (and + 8); d[4 j + {0, 1}] are columns 8 j + 2 (lane % 4)
    // + {0, 1} of the tile (chunk j), d[4 j + {2, 3}] the same columns 8 rows down.
    const int row0 = wg_warp * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float4 o = red[j * 128 + wg_tid];
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(tile + row0 * kBN + col) =
          make_float2(d[4 * j] + o.x, d[4 * j + 1] + o.y);
      *reinterpret_cast<float2*>(tile + (row0 + 8) * kBN + col) =
          make_float2(d[4 * j + 2] + o.z, d[4 * j + 3] + o.w);
    }
  }
  __syncthreads();
  // The epilogue from the tile, by all 256 threads, as a loop (not unrolled: the GeGLU's tanhf is
  // long, and the kernel's code has to stay small enough for the instruction cache).
  if (g.geglu_up > 0) {
    // Chunk 2c holds the gate, chunk 2c + 1 the up of output columns c * 8 .. + 8 (w_column).
#pragma unroll 1
    for (int i = tid; i < kRows * kBN / 4; i += kThreads) {
      const int row = i / (kBN / 4), pair = i % (kBN / 4);
      if (row >= rows) continue;
      const int c = pair / 4, e = (pair % 4) * 2;
      const float* gate = tile + row * kBN + c * 16 + e;
      const float g0 = gate[0], g1 = gate[1], u0 = gate[8], u1 = gate[9];
      *reinterpret_cast<bf162*>(g.y + static_cast<size_t>(row) * g.ld_y + r.tile * (kBN / 2) +
                                c * 8 + e) =
          __floats2bfloat162_rn(gelu_tanh(g0) * u0, gelu_tanh(g1) * u1);
    }
  } else {
    float* part = g.part + static_cast<size_t>(r.split) * kRows * g.ld_part + r.tile * kBN;
#pragma unroll
    for (int i = tid; i < kRows * kBN / 4; i += kThreads) {
      const int row = i / (kBN / 4), c4 = i % (kBN / 4);
      if (row >= rows) continue;
      *reinterpret_cast<float4*>(part + static_cast<size_t>(row) * g.ld_part + c4 * 4) =
          *reinterpret_cast<const float4*>(tile + row * kBN + c4 * 4);
    }
  }
  __syncthreads();  // the ring is free for the next unit or the next phase's prefetch
  unit_stamp(stamps, 3);
#endif
}

__device__ __forceinline__ void gemm_unit(const Args& a, const GemmPhase& g, int layer, int u,
                                          uint32_t sbase, bool w_prefetched, int kind) {
  if (a.wgmma) {
    unsigned long long* stamps =
        a.unit_trace && layer == 1 && u == blockIdx.x
            ? a.unit_trace + (static_cast<size_t>(kind) * gridDim.x + blockIdx.x) * 4
            : nullptr;
    gemm_unit_wgmma(g, layer, u, a.rows, sbase, w_prefetched, stamps);
  } else {
    gemm_unit_mma(g, layer, u, a.rows, sbase, w_prefetched);
  }
}

// ---- row phases ----

// x += the `splits` partials of the last GEMM (in split order); h = x * rsqrt(mean(x^2) + eps).
__device__ __noinline__ void norm_phase(const Args& a, const GemmPhase* from, float* red) {
  const int w4 = a.width / 4;
  for (int r = blockIdx.x; r < a.rows; r += gridDim.x) {
    float4* xr = reinterpret_cast<float4*>(a.x + static_cast<size_t>(r) * a.width);
    float ss = 0.0f;
    for (int c = threadIdx.x; c < w4; c += kThreads) {
      float4 v = __ldcg(xr + c);
      if (from) {
        for (int s = 0; s < from->splits; ++s) {
          const float4 p = __ldcg(reinterpret_cast<const float4*>(
                                      from->part + (static_cast<size_t>(s) * kRows + r) * a.width) +
                                  c);
          v.x += p.x;
          v.y += p.y;
          v.z += p.z;
          v.w += p.w;
        }
        xr[c] = v;
      }
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float scale = rsqrtf(block_sum(ss, red) / a.width + a.eps);
    bf16* hr = a.h + static_cast<size_t>(r) * a.width;
    for (int c = threadIdx.x; c < w4; c += kThreads) {
      const float4 v = xr[c];
      reinterpret_cast<bf162*>(hr + 4 * c)[0] = __floats2bfloat162_rn(v.x * scale, v.y * scale);
      reinterpret_cast<bf162*>(hr + 4 * c)[1] = __floats2bfloat162_rn(v.z * scale, v.w * scale);
    }
  }
}

// Sums the qkv partials, rotates q and k (RoPE on interleaved pairs, positions prefix + row) and
// writes q, and k and v into the slot's suffix rows of this layer.
__device__ __noinline__ void rope_phase(const Args& a, int layer) {
  constexpr int kHalf = kHeadDim / 2;
  const int pairs_per_row = (a.q_heads + 2) * kHalf;
  const int n = a.rows * pairs_per_row;
  bf16* k_out = a.kv + layer * a.kv_layer_stride + static_cast<size_t>(a.prefix) * kHeadDim;
  bf16* v_out = k_out + a.v_offset;
  for (int idx = blockIdx.x * kThreads + threadIdx.x; idx < n; idx += gridDim.x * kThreads) {
    const int row = idx / pairs_per_row, j = idx % pairs_per_row;
    const int head = j / kHalf, i = j % kHalf;
    const int col = head * kHeadDim + 2 * i;
    float x0 = 0.0f, x1 = 0.0f;
    for (int s = 0; s < a.qkv.splits; ++s) {
      const float2 p = __ldcg(reinterpret_cast<const float2*>(
          a.qkv.part + (static_cast<size_t>(s) * kRows + row) * a.qkv_width + col));
      x0 += p.x;
      x1 += p.y;
    }
    if (head == a.q_heads + 1) {
      *reinterpret_cast<bf162*>(v_out + static_cast<size_t>(row) * kHeadDim + 2 * i) =
          __floats2bfloat162_rn(x0, x1);
      continue;
    }
    const float inv_freq = exp2f(-(2.0f * i / kHeadDim) * a.log2_theta);
    float sn, cs;
    sincosf(static_cast<float>(a.prefix + row) * inv_freq, &sn, &cs);
    bf16* dst = head < a.q_heads
                    ? a.q + static_cast<size_t>(row) * a.q_heads * kHeadDim + head * kHeadDim
                    : k_out + static_cast<size_t>(row) * kHeadDim;
    *reinterpret_cast<bf162*>(dst + 2 * i) =
        __floats2bfloat162_rn(x0 * cs - x1 * sn, x0 * sn + x1 * cs);
  }
}

// ---- attention ----

__device__ __noinline__ void attention_unit(const Args& a, int layer, int u, uint32_t sbase) {
  const uint32_t qs = sbase;
  const uint32_t ks0 = qs + kQRowsPerUnit * kHeadDim * 2;
  const uint32_t vs0 = ks0 + 2 * kKeysPerTile * kHeadDim * 2;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // Warp w: query rows 16 * (w % 4) .. + 16 of the unit, output dims 128 * (w / 4) .. + 128. The
  // two warps of a row group compute the same scores (and so the same softmax statistics).
  const int row_group = warp & 3, dim_half = warp >> 2;
  constexpr int kHalfDim = kHeadDim / 2;
  const int range = u % a.ranges;
  const int r0 = (u / a.ranges) * kQRowsPerUnit;
  const int key_begin = range * kKeysPerUnit;
  const int key_end = min(a.keys, key_begin + kKeysPerUnit);
  const bf16* k = a.kv + layer * a.kv_layer_stride;
  const bf16* v = k + a.v_offset;
  // The state token (query row 0, all its heads) sees the prefix and itself only.
  const int limited_rows = a.q_heads, limited_keys = a.prefix + 1;

  attention_tile::load_rows<kHeadDim, kThreads>(qs, a.q, r0, a.q_rows, kQRowsPerUnit);
  const int row_a = r0 + row_group * 16 + g;
  attention_tile::RowState<kHalfDim> rows(row_a, limited_rows);
  auto& [o, m, l, limited] = rows;
  attention_tile::attend_range<kHeadDim, kHalfDim, kThreads>(
      qs, ks0, vs0, k, v, key_begin, key_end, row_group * 16, dim_half * kHalfDim, limited,
      limited_keys, a.scale_log2, m, l, o);
  attention_tile::quad_sum(l);

  // The unnormalised rows and (max, sum) of this key range, for the combine phase.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_a + 8 * h;
    if (row >= a.q_rows) continue;
    const size_t at = static_cast<size_t>(range) * a.q_rows_pad + row;
    float* dst = a.att_o + at * kHeadDim + dim_half * kHalfDim;
#pragma unroll
    for (int n = 0; n < kHalfDim / 8; ++n)
      *reinterpret_cast<float2*>(dst + n * 8 + 2 * t) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
    if (t == 0 && dim_half == 0) a.att_ml[at] = make_float2(m[h], l[h]);
  }
  cp_wait<0>();
  __syncthreads();
}

// Merges the key ranges of every query row in range order; attn = sum_r w_r o_r / sum_r w_r l_r.
__device__ __noinline__ void combine_phase(const Args& a) {
  constexpr int kD4 = kHeadDim / 4;
  const int n = a.q_rows * kD4;
  for (int idx = blockIdx.x * kThreads + threadIdx.x; idx < n; idx += gridDim.x * kThreads) {
    const int row = idx / kD4, d4 = idx % kD4;
    float mmax = -INFINITY;
    for (int r = 0; r < a.ranges; ++r)
      mmax = fmaxf(mmax, __ldcg(a.att_ml + static_cast<size_t>(r) * a.q_rows_pad + row).x);
    float sum = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int r = 0; r < a.ranges; ++r) {
      const size_t at = static_cast<size_t>(r) * a.q_rows_pad + row;
      const float2 ml = __ldcg(a.att_ml + at);
      const float w = ml.x == -INFINITY ? 0.0f : exp2f(ml.x - mmax);
      sum += w * ml.y;
      const float4 po = __ldcg(reinterpret_cast<const float4*>(a.att_o + at * kHeadDim) + d4);
      acc.x += w * po.x;
      acc.y += w * po.y;
      acc.z += w * po.z;
      acc.w += w * po.w;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    bf162* dst = reinterpret_cast<bf162*>(a.attn + static_cast<size_t>(row) * kHeadDim + d4 * 4);
    dst[0] = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
    dst[1] = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
  }
}

// Copies a phase's weights ([layers][k][n] as stored) into per-unit blocks: for every layer, tile
// and 64-deep K block, the [64 k][64 n] block a unit loads, 8 KB back to back, so each unit
// streams contiguous memory instead of 64- or 128-byte pieces of 64 rows far apart.
__global__ void tile_weights_kernel(GemmPhase g, bf16* dst, int layers) {
  wait_for_prior_grids();
  const size_t per_layer = static_cast<size_t>(g.tiles) * g.kblocks * (kBK * kBN / 8);
  const size_t n = per_layer * layers;
  for (size_t c = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; c < n;
       c += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int layer = static_cast<int>(c / per_layer);
    const size_t in_layer = c % per_layer;
    const int block = static_cast<int>(in_layer / (kBK * kBN / 8));
    const int chunk = static_cast<int>(in_layer % (kBK * kBN / 8));
    const int tile = block / g.kblocks, kb = block % g.kblocks;
    const int kr = chunk >> 3, nc = chunk & 7;
    const bf16* src = g.w + layer * g.w_layer_stride + static_cast<size_t>(kb * kBK + kr) * g.ldw +
                      w_column(g, tile, nc);
    *reinterpret_cast<uint4*>(dst + c * 8) = *reinterpret_cast<const uint4*>(src);
  }
}

// ---- the kernel ----

__global__ void __launch_bounds__(kThreads) decoder_layers_kernel(const __grid_constant__ Args a) {
  wait_for_prior_grids();
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float red[kThreads / 32];
  cg::grid_group grid = cg::this_grid();
  const uint32_t sbase = (smem_u32(smem) + 1023u) & ~1023u;
  const int b = blockIdx.x, nb = gridDim.x;
  int phase = 0;
  auto stamp = [&]() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
  };
  auto sync = [&]() {
    if (a.trace) __syncthreads();  // a CTA arrives when its last warp does (a.trace is uniform)
    if (a.trace && threadIdx.x == 0)
      a.trace[static_cast<size_t>(b) * a.trace_phases + phase] = stamp();
    grid.sync();
    if (a.trace && threadIdx.x == 0)
      a.trace[static_cast<size_t>(nb + b) * a.trace_phases + phase] = stamp();
    ++phase;
  };

  auto prefetch = [&](const GemmPhase& g, int layer) {
    if (b >= g.units()) return false;
    prefetch_w(g, layer, b, sbase);
    return true;
  };
  bool prefetched = prefetch(a.qkv, 0);
  norm_phase(a, nullptr, red);
  sync();
  // Phases of a layer: 0 qkv, 1 RoPE + K/V, 2 attention, 3 combine, 4 o, 5 norm, 6 gate|up,
  // 7 down, 8 norm. The four GEMM phases share one call site, so that the wgmma unit is inlined
  // once (ptxas serialises wgmma across a call).
  for (int l = 0; l < a.layers; ++l) {
    for (int p = 0; p < kPhasesPerLayer; ++p) {
      if (p == 0 || p == 4 || p == 6 || p == 7) {
        const int kind = p == 0 ? 0 : p == 4 ? 1 : p == 6 ? 2 : 3;
        const GemmPhase& g = kind == 0 ? a.qkv : kind == 1 ? a.o : kind == 2 ? a.gu : a.down;
        for (int u = b; u < g.units(); u += nb)
          gemm_unit(a, g, l, u, sbase, prefetched && u == b, kind);
        // The first weight blocks of the next GEMM phase, before the barrier.
        if (kind == 1) prefetched = prefetch(a.gu, l);
        if (kind == 2) prefetched = prefetch(a.down, l);
        if (kind == 3) prefetched = l + 1 < a.layers && prefetch(a.qkv, l + 1);
      } else if (p == 1) {
        rope_phase(a, l);
      } else if (p == 2) {
        for (int u = b; u < a.attn_units; u += nb) attention_unit(a, l, u, sbase);
        prefetched = prefetch(a.o, l);
      } else if (p == 3) {
        combine_phase(a);
      } else {
        norm_phase(a, p == 5 ? &a.o : &a.down, red);  // the last leaves h = rms(x) for Euler
      }
      if (l + 1 < a.layers || p + 1 < kPhasesPerLayer) sync();
    }
  }
}

GemmPhase plan_gemm(int n_tiles, int k, bool splittable) {
  GemmPhase g;
  g.tiles = n_tiles;
  g.kblocks = k / kBK;
  int splits = splittable ? std::clamp(kTargetUnits / n_tiles, 1, g.kblocks) : 1;
  g.kb_per_split = (g.kblocks + splits - 1) / splits;
  g.splits = (g.kblocks + g.kb_per_split - 1) / g.kb_per_split;  // no empty split
  return g;
}

struct Plan {
  GemmPhase qkv, o, gu, down;
  int q_rows, q_rows_pad, ranges, attn_units;
  size_t part_floats;
};

Plan plan(const DecoderLayersShape& s) {
  Plan p;
  const int qw = s.q_heads * s.head_dim, qkv_width = qw + 2 * s.head_dim;
  p.qkv = plan_gemm(qkv_width / kBN, s.width, true);
  p.o = plan_gemm(s.width / kBN, qw, true);
  p.gu = plan_gemm(s.mlp / (kBN / 2), s.width, false);
  p.down = plan_gemm(s.width / kBN, s.mlp, true);
  p.qkv.ldx = s.width;
  p.qkv.ldw = qkv_width;
  p.qkv.ld_part = qkv_width;
  p.qkv.w_layer_stride = static_cast<size_t>(s.width) * qkv_width;
  p.o.ldx = qw;
  p.o.ldw = s.width;
  p.o.ld_part = s.width;
  p.o.w_layer_stride = static_cast<size_t>(qw) * s.width;
  p.gu.ldx = s.width;
  p.gu.ldw = 2 * s.mlp;
  p.gu.geglu_up = s.mlp;
  p.gu.ld_y = s.mlp;
  p.gu.w_layer_stride = static_cast<size_t>(s.width) * 2 * s.mlp;
  p.down.ldx = s.mlp;
  p.down.ldw = s.width;
  p.down.ld_part = s.width;
  p.down.w_layer_stride = static_cast<size_t>(s.mlp) * s.width;
  p.q_rows = s.rows * s.q_heads;
  p.q_rows_pad = (p.q_rows + kQRowsPerUnit - 1) / kQRowsPerUnit * kQRowsPerUnit;
  p.ranges = (s.keys() + kKeysPerUnit - 1) / kKeysPerUnit;
  p.attn_units = (p.q_rows_pad / kQRowsPerUnit) * p.ranges;
  p.part_floats =
      static_cast<size_t>(kRows) * std::max({static_cast<size_t>(p.qkv.splits) * qkv_width,
                                             static_cast<size_t>(p.o.splits) * s.width,
                                             static_cast<size_t>(p.down.splits) * s.width});
  return p;
}

}  // namespace

std::string DecoderLayers::unsupported_reason(const DecoderLayersShape& s) {
  if (s.head_dim != kHeadDim) return "head_dim " + std::to_string(s.head_dim) + " is not 256";
  if (s.rows < 1 || s.rows > kRows)
    return "suffix rows " + std::to_string(s.rows) + " not in 1..64";
  if (s.q_heads < 1 || s.layers < 1 || s.prefix < 0) return "empty shape";
  if (s.width < kBK || s.mlp < kBK || s.width % kBK != 0 || s.mlp % kBK != 0)
    return "width and mlp must be positive multiples of 64";
  return {};
}

DecoderLayers::DecoderLayers(const DecoderLayersShape& shape, int max_ctas) : shape_(shape) {
  const std::string why = unsupported_reason(shape);
  PI0_CHECK(why.empty(), "DecoderLayers: " + why);
  const Plan p = plan(shape);
  partials_ = DeviceBuffer<float>(p.part_floats, "decoder layers split-K partials");
  attn_partials_ = DeviceBuffer<float>(static_cast<size_t>(p.ranges) * p.q_rows_pad * kHeadDim,
                                       "decoder layers attention partials");
  attn_stats_ = DeviceBuffer<float>(static_cast<size_t>(p.ranges) * p.q_rows_pad * 2,
                                    "decoder layers attention statistics");
  CUDA_CHECK(cudaFuncSetAttribute(decoder_layers_kernel,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  int device = 0, sms = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int cooperative = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  PI0_CHECK(cooperative != 0, "DecoderLayers: this GPU does not support cooperative launches");
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decoder_layers_kernel, kThreads,
                                                           kSmemBytes));
  PI0_CHECK(per_sm >= 1, "DecoderLayers: the kernel does not fit on an SM");
  // One CTA per SM: the units of a phase are about one per SM of a whole GPU, and at 255
  // registers per thread a second CTA would not fit anyway.
  grid_ = max_ctas > 0 ? std::min(sms, max_ctas) : sms;

  // PI0_LAYERS_GEMM=mma|wgmma (default: wgmma where this binary has sm_90a code for the GPU).
  // Both give bits that do not depend on the grid; they differ from each other in the order of
  // each tile's K sum.
  const char* gemm_env = std::getenv("PI0_LAYERS_GEMM");
  const std::string gemm_choice = gemm_env ? gemm_env : "";
  PI0_CHECK(gemm_choice.empty() || gemm_choice == "mma" || gemm_choice == "wgmma",
            "PI0_LAYERS_GEMM must be mma or wgmma, not '" + gemm_choice + "'");
  wgmma_ = gemm_choice != "mma" && skinny_wgmma_available();
  PI0_CHECK(gemm_choice != "wgmma" || wgmma_,
            "PI0_LAYERS_GEMM=wgmma: this binary has no sm_90a code for this GPU");
}

void DecoderLayers::set_weights(const DecoderLayersWeights& w) {
  PI0_CHECK(valid(), "DecoderLayers used before construction");
  PI0_CHECK(w.qkv && w.o && w.gate_up && w.down, "DecoderLayers::set_weights: a weight is missing");
  Plan p = plan(shape_);
  auto tile = [&](GemmPhase g, const Bf16* src, const char* what) {
    DeviceBuffer<Bf16> dst(g.w_layer_stride * shape_.layers, what);
    g.w = reinterpret_cast<const bf16*>(src);
    tile_weights_kernel<<<1024, 256>>>(g, reinterpret_cast<bf16*>(dst.get()), shape_.layers);
    CUDA_CHECK(cudaGetLastError());
    return dst;
  };
  tiled_qkv_ = tile(p.qkv, w.qkv, "decoder layers qkv weights (tiled)");
  tiled_o_ = tile(p.o, w.o, "decoder layers o weights (tiled)");
  tiled_gu_ = tile(p.gu, w.gate_up, "decoder layers gate|up weights (tiled)");
  tiled_down_ = tile(p.down, w.down, "decoder layers down weights (tiled)");
  CUDA_CHECK(cudaDeviceSynchronize());
}

void DecoderLayers::run(const DecoderLayersBuffers& buf, cudaStream_t stream) const {
  PI0_CHECK(valid(), "DecoderLayers used before construction");
  const DecoderLayersShape& s = shape_;
  const Plan p = plan(s);
  Args a{};
  a.qkv = p.qkv;
  a.o = p.o;
  a.gu = p.gu;
  a.down = p.down;
  PI0_CHECK(!tiled_qkv_.empty(), "DecoderLayers::run before set_weights");
  a.qkv.w = reinterpret_cast<const bf16*>(tiled_qkv_.get());
  a.qkv.x = reinterpret_cast<const bf16*>(buf.h);
  a.qkv.part = partials_.get();
  a.o.w = reinterpret_cast<const bf16*>(tiled_o_.get());
  a.o.x = reinterpret_cast<const bf16*>(buf.attn);
  a.o.part = partials_.get();
  a.gu.w = reinterpret_cast<const bf16*>(tiled_gu_.get());
  a.gu.x = reinterpret_cast<const bf16*>(buf.h);
  a.gu.y = reinterpret_cast<bf16*>(buf.act);
  a.down.w = reinterpret_cast<const bf16*>(tiled_down_.get());
  a.down.x = reinterpret_cast<const bf16*>(buf.act);
  a.down.part = partials_.get();
  a.x = buf.x;
  a.h = reinterpret_cast<bf16*>(buf.h);
  a.q = reinterpret_cast<bf16*>(buf.q);
  a.attn = reinterpret_cast<bf16*>(buf.attn);
  a.att_o = attn_partials_.get();
  a.att_ml = reinterpret_cast<float2*>(attn_stats_.get());
  a.kv = reinterpret_cast<bf16*>(buf.kv_slot);
  a.kv_layer_stride = static_cast<size_t>(2) * s.keys() * kHeadDim;
  a.v_offset = static_cast<size_t>(s.keys()) * kHeadDim;
  a.rows = s.rows;
  a.prefix = s.prefix;
  a.keys = s.keys();
  a.width = s.width;
  a.qkv_width = (s.q_heads + 2) * kHeadDim;
  a.q_heads = s.q_heads;
  a.layers = s.layers;
  a.q_rows = p.q_rows;
  a.q_rows_pad = p.q_rows_pad;
  a.ranges = p.ranges;
  a.attn_units = p.attn_units;
  a.eps = s.rms_eps;
  a.log2_theta = std::log2(s.rope_theta);
  a.scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(kHeadDim));
  a.wgmma = wgmma_ ? 1 : 0;

  cudaLaunchConfig_t cfg = {};
  a.trace = trace_.empty() ? nullptr : reinterpret_cast<unsigned long long*>(trace_.get());
  a.trace_phases = trace_phases();
  a.unit_trace = trace_.empty() ? nullptr
                                : reinterpret_cast<unsigned long long*>(trace_.get()) +
                                      static_cast<size_t>(2 * grid_) * trace_phases();
  cfg.gridDim = dim3(static_cast<unsigned>(grid_));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, decoder_layers_kernel, a));
}

}  // namespace pi0::cuda

namespace pi0::cuda {

std::string DecoderLayers::describe() const {
  return wgmma_ ? "wgmma" : "mma.sync";
}

int DecoderLayers::trace_phases() const {
  return 1 + kPhasesPerLayer * shape_.layers;
}

void DecoderLayers::enable_trace() {
  if (trace_.empty()) {
    trace_ = DeviceBuffer<uint64_t>(
        static_cast<size_t>(2 * grid_) * trace_phases() + static_cast<size_t>(4 * grid_) * 4,
        "decoder layers trace");
    zero_device(trace_.get(), trace_.bytes());
  }
}

std::string DecoderLayers::trace_summary() const {
  if (trace_.empty()) return {};
  CUDA_CHECK(cudaDeviceSynchronize());
  const int phases = trace_phases();
  std::vector<uint64_t> t(trace_.size());
  copy_to_host(t.data(), trace_.get(), trace_.bytes());
  static const char* const kNames[kPhasesPerLayer] = {"qkv gemm",
                                                      "rope + kv",
                                                      "attention",
                                                      "combine",
                                                      "o gemm",
                                                      "norm (after o)",
                                                      "gate|up gemm + geglu",
                                                      "down gemm",
                                                      "norm (after down)"};
  // Per phase kind, averaged over the layers: work = the slowest CTA's time from leaving the
  // previous barrier to reaching this one; barrier = the last arrival to the first departure;
  // release = the first departure to the last (how unevenly the CTAs see the barrier open).
  double work[kPhasesPerLayer] = {}, barrier[kPhasesPerLayer] = {}, release[kPhasesPerLayer] = {};
  auto arrive = [&](int b, int p) { return t[static_cast<size_t>(b) * phases + p]; };
  auto leave = [&](int b, int p) { return t[static_cast<size_t>(grid_ + b) * phases + p]; };
  const int barriers = kPhasesPerLayer * shape_.layers;  // the last layer's last norm has none
  if (t[static_cast<size_t>(grid_) * phases] == 0)
    return "  persistent layers: no one-frame pass traced\n";
  for (int p = 1; p < barriers; ++p) {
    uint64_t slowest = 0, last_in = 0, first_out = UINT64_MAX, last_out = 0;
    for (int b = 0; b < grid_; ++b) {
      slowest = std::max<uint64_t>(slowest, arrive(b, p) - leave(b, p - 1));
      last_in = std::max<uint64_t>(last_in, arrive(b, p));
      first_out = std::min<uint64_t>(first_out, leave(b, p));
      last_out = std::max<uint64_t>(last_out, leave(b, p));
    }
    const int kind = (p - 1) % kPhasesPerLayer;
    work[kind] += static_cast<double>(slowest) / 1000.0;
    barrier[kind] += static_cast<double>(first_out - last_in) / 1000.0;
    release[kind] += static_cast<double>(last_out - first_out) / 1000.0;
  }
  const int layers_seen = std::max(1, shape_.layers - 1);  // the final norm is not stamped
  std::string out = "  persistent layers (" + describe() +
                    "), us per layer (work + barrier + release), " + std::to_string(grid_) +
                    " CTAs:\n";
  char line[160];
  for (int k = 0; k < kPhasesPerLayer; ++k) {
    if (k == kPhasesPerLayer - 1 && shape_.layers == 1) continue;  // no barrier after it
    const int n = k == kPhasesPerLayer - 1 ? layers_seen : shape_.layers;
    std::snprintf(line, sizeof line, "    %-22s %7.2f + %5.2f + %5.2f\n", kNames[k], work[k] / n,
                  barrier[k] / n, release[k] / n);
    out += line;
  }
  uint64_t first_leave = UINT64_MAX, last_leave = 0;
  for (int b = 0; b < grid_; ++b) {
    first_leave = std::min<uint64_t>(first_leave, leave(b, 0));
    last_leave = std::max<uint64_t>(last_leave, leave(b, barriers - 1));
  }
  std::snprintf(line, sizeof line, "    all layers, first and last norm aside  %.1f us\n",
                static_cast<double>(last_leave - first_leave) / 1000.0);
  out += line;
  // Inside the first GEMM unit of each CTA, layer 1 (wgmma only): mean over the CTAs of the
  // time to the first landed block, the K loop after it and the epilogue, and the slowest unit.
  const uint64_t* u = t.data() + static_cast<size_t>(2 * grid_) * phases;
  static const char* const kGemms[4] = {"qkv", "o", "gate|up", "down"};
  for (int k = 0; k < 4 && shape_.layers > 1; ++k) {
    double first = 0, loop = 0, epi = 0, slowest = 0;
    int n = 0;
    for (int b = 0; b < grid_; ++b) {
      const uint64_t* st = u + (static_cast<size_t>(k) * grid_ + b) * 4;
      if (st[0] == 0 || st[3] < st[0]) continue;
      first += static_cast<double>(st[1] - st[0]);
      loop += static_cast<double>(st[2] - st[1]);
      epi += static_cast<double>(st[3] - st[2]);
      slowest = std::max(slowest, static_cast<double>(st[3] - st[0]));
      ++n;
    }
    if (n == 0) continue;
    std::snprintf(
        line, sizeof line,
        "    %-8s unit: first block %.2f, loop %.2f, epilogue %.2f, slowest %.2f us (%d)\n",
        kGemms[k], first / n / 1000.0, loop / n / 1000.0, epi / n / 1000.0, slowest / 1000.0, n);
    out += line;
  }
  return out;
}

}  // namespace pi0::cuda
