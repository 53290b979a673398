// Multi-query attention on warpgroup MMA (see pi0/cuda/wgmma_attention.hpp). One CTA is one
// warpgroup: 64 query rows against one key range, 64 keys a step, K and V double-buffered through
// cp.async. Shared memory holds every operand in the 128-byte-swizzle layout wgmma reads through
// descriptors: Q and each K / V tile as four [64][64] blocks (rows of 64 dims = 128 bytes, 16-byte
// chunk c of row r at c ^ (r % 8)), and P as one [64 rows][64 keys] block. Per step:
//   S = Q K^T: 16 x wgmma.m64n64k16 (A = Q K-major, B = K K-major);
//   masked online softmax on the accumulators, P (bf16) written to shared memory;
//   O += P V: 4 x 4 x wgmma.m64n64k16 (A = P K-major, B = V MN-major: keys are V's rows).
// The key ranges of a row block are one cluster: each parks its rows, normalised by its own sum, as
// bf16 in its shared memory, and CTA r sums rows r, r + S, ... over the ranges in order.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "pi0/cuda/wgmma_attention.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;
namespace cg = cooperative_groups;

constexpr int kThreads = 128;  // one warpgroup
constexpr int kHeadDim = 256;
constexpr int kRows = 64;                 // query rows per CTA
constexpr int kKeys = 64;                 // keys per step
constexpr int kBlockBytes = 64 * 64 * 2;  // one [64][64] bf16 block
constexpr int kQBytes = 4 * kBlockBytes;
constexpr int kTileBytes = 8 * kBlockBytes;  // K (4 blocks) then V (4 blocks)
constexpr int kPBytes = kBlockBytes;
// One CTA per SM of a whole H100 is the plan (shared memory allows no more with two stages); a
// fixed number, so that an MPS share does not change the split, nor the bits.
constexpr int kPlannedCtas = 132;
// A parked row (bf16): 256 dims and 8 of padding, so that a warp's stores (8 rows x 4 columns)
// fall on 32 different banks.
constexpr int kParkedRow = kHeadDim + 8;
static_assert(kRows * kParkedRow * 2 <= kQBytes + kPBytes + kTileBytes, "parked rows must fit");
constexpr int kMaxSplits = 16;  // above 8 the cluster size is non-portable (H100: up to 16)

struct Args {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* out;
  int rows, keys, blocks_per_split, splits, limited_rows, limited_keys;
  float scale_log2;  // scale * log2(e)
};

int row_blocks(const WgmmaAttentionShape& s) {
  return (s.rows + kRows - 1) / kRows;
}
int key_blocks(const WgmmaAttentionShape& s) {
  return (s.keys + kKeys - 1) / kKeys;
}
int blocks_per_split(const WgmmaAttentionShape& s) {
  return (key_blocks(s) + s.splits - 1) / s.splits;
}
// Two stages where a range has two key steps or more, else one (and then two CTAs fit an SM).
int stages(const WgmmaAttentionShape& s) {
  return blocks_per_split(s) > 1 ? 2 : 1;
}
int smem_bytes(const WgmmaAttentionShape& s) {
  // + 1024: the base is rounded up to the swizzle atom's alignment.
  return kQBytes + kPBytes + stages(s) * kTileBytes + 1024;
}

// 64 rows of 256 dims from `src` (row stride 256) into four swizzled [64][64] blocks; rows at or
// past `valid_rows` are zero-filled.
__device__ __forceinline__ void load_rows(uint32_t dst, const bf16* src, int row0, int valid_rows) {
#pragma unroll 4
  for (int c = threadIdx.x; c < kRows * (kHeadDim / 8); c += kThreads) {
    const int r = c / (kHeadDim / 8), ch = c % (kHeadDim / 8);
    const int block = ch / 8, chunk = ch % 8;
    const bool ok = row0 + r < valid_rows;
    const bf16* p = ok ? src + static_cast<size_t>(row0 + r) * kHeadDim + ch * 8 : src;
    cp_async16(dst + block * kBlockBytes + r * 128 + ((chunk ^ (r & 7)) << 4), p, ok);
  }
}

__global__ void __launch_bounds__(kThreads) wgmma_attention_kernel(const __grid_constant__ Args a) {
  wait_for_prior_grids();
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // never launched: the host checks wgmma_attention_available()
#else
  extern __shared__ unsigned char smem_raw[];
  __shared__ float2 parked_ml[kRows];
  __shared__ float row_weights[kRows][kMaxSplits + 1];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t qs = base, ps = base + kQBytes, ring = ps + kPBytes;
  unsigned char* const base_ptr = smem_raw + (base - raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = lane & 3;
  const int split = blockIdx.x, r0 = blockIdx.y * kRows;
  const int kb_begin = split * a.blocks_per_split;
  const int kb_end = min((a.keys + kKeys - 1) / kKeys, kb_begin + a.blocks_per_split);
  const int steps = max(0, kb_end - kb_begin);
  const int nstages = a.blocks_per_split > 1 ? 2 : 1;

  auto load_tile = [&](int step) {
    const uint32_t ts = ring + (step % nstages) * kTileBytes;
    const int key0 = (kb_begin + step) * kKeys;
    load_rows(ts, a.k, key0, a.keys);
    load_rows(ts + 4 * kBlockBytes, a.v, key0, a.keys);
  };
  load_rows(qs, a.q, r0, a.rows);
  if (steps > 0) load_tile(0);
  cp_commit();
  if (nstages > 1 && steps > 1) load_tile(1);
  cp_commit();

  // This thread's rows of the block: rl[0] = 16 warp + lane / 4 and rl[1] = rl[0] + 8. Its
  // accumulator entries 4 j + {0, 1} are row rl[0], columns 8 j + 2 t + {0, 1}; 4 j + {2, 3} the
  // same columns of row rl[1].
  const int rl0 = warp * 16 + (lane >> 2);
  const bool limited[2] = {r0 + rl0 < a.limited_rows, r0 + rl0 + 8 < a.limited_rows};
  float o[4][32];
#pragma unroll
  for (int nb = 0; nb < 4; ++nb)
#pragma unroll
    for (int e = 0; e < 32; ++e) o[nb][e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int step = 0; step < steps; ++step) {
    if (nstages > 1) {
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    fence_async_shared();  // this thread's copies, visible to the tensor cores
    __syncthreads();
    const uint32_t ks = ring + (step % nstages) * kTileBytes, vs = ks + 4 * kBlockBytes;

    float s[32];
    fence_operand(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kBlockBytes + (kk & 3) * 32;
      wgmma_m64n64k16<0>(s, smem_desc_sw128(qs + off, 16, 1024),
                         smem_desc_sw128(ks + off, 16, 1024), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait0();
    fence_operand(s);

    // Online softmax over this step's keys, in the log2 domain.
    const int key0 = (kb_begin + step) * kKeys;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int key = key0 + 8 * j + 2 * t + (e & 1);
        const bool masked = key >= a.keys || (limited[h] && key >= a.limited_keys);
        s[4 * j + e] = masked ? -INFINITY : s[4 * j + e] * a.scale_log2;
        mx[h] = fmaxf(mx[h], s[4 * j + e]);
      }
    float alpha[2], m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      m_use[h] = m_new == -INFINITY ? 0.0f : m_new;  // a row with every key masked so far
      alpha[h] = m[h] == -INFINITY ? 0.0f : exp2f(m[h] - m_use[h]);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
    // P = exp2(S - m) as bf16 into the P block (row r, keys 8 j + 2 t + {0, 1}: chunk j).
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p0 = exp2f(s[4 * j + 2 * h] - m_use[h]);
        const float p1 = exp2f(s[4 * j + 2 * h + 1] - m_use[h]);
        l[h] += p0 + p1;
        const int r = rl0 + 8 * h;
        *reinterpret_cast<__nv_bfloat162*>(base_ptr + kQBytes + r * 128 + ((j ^ (r & 7)) << 4) +
                                           t * 4) = __floats2bfloat162_rn(p0, p1);
      }
#pragma unroll
    for (int nb = 0; nb < 4; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[nb][4 * j] *= alpha[0];
        o[nb][4 * j + 1] *= alpha[0];
        o[nb][4 * j + 2] *= alpha[1];
        o[nb][4 * j + 3] *= alpha[1];
      }
    fence_async_shared();  // P's generic stores, visible to the tensor cores
    __syncthreads();

#pragma unroll
    for (int nb = 0; nb < 4; ++nb) fence_operand(o[nb]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint64_t da = smem_desc_sw128(ps + kk * 32, 16, 1024);
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
        wgmma_m64n64k16<1>(o[nb], da,
                           smem_desc_sw128(vs + nb * kBlockBytes + kk * 2048, 1024, 1024), 1);
    }
    wgmma_commit();
    wgmma_wait0();
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) fence_operand(o[nb]);
    // The tensor cores are done with this stage and with P: order their reads before the
    // generic writes that reuse them (the next loads, the next P).
    fence_async_shared();
    __syncthreads();
    if (step + nstages < steps) load_tile(step + nstages);
    cp_commit();
  }
  cp_wait<0>();  // with no step at all, the Q load may still be landing
  // l: the sum over the quad's columns.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }

  if (a.splits == 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r0 + rl0 + 8 * h;
      if (row >= a.rows) continue;
      const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          *reinterpret_cast<__nv_bfloat162*>(a.out + static_cast<size_t>(row) * kHeadDim + nb * 64 +
                                             8 * j + 2 * t) =
              __floats2bfloat162_rn(o[nb][4 * j + 2 * h] * inv, o[nb][4 * j + 2 * h + 1] * inv);
    }
    return;
  }

  // Park this range's rows normalised by its own sum, as bf16 [64][kParkedRow] over Q (and the
  // first 1 KB of P; neither is read any more), and (max, sum); then CTA r of the cluster combines
  // rows r, r + S, ... over the ranges in order through distributed shared memory. bf16 halves
  // the exchange, which is most of the kernel's time (bench/NOTES.md v21). The ranks past the
  // cluster are never loaded from, but the compiler maps every address up front: peer() has
  // rank 0 stand in for them, so that no address is mapped for a CTA that does not exist.
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();
  bf16* parked = reinterpret_cast<bf16*>(base_ptr);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = rl0 + 8 * h;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
    for (int nb = 0; nb < 4; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        *reinterpret_cast<__nv_bfloat162*>(parked + r * kParkedRow + nb * 64 + 8 * j + 2 * t) =
            __floats2bfloat162_rn(o[nb][4 * j + 2 * h] * inv, o[nb][4 * j + 2 * h + 1] * inv);
    if (t == 0) parked_ml[r] = make_float2(m[h], l[h]);
  }
  cluster.sync();
  const int splits = a.splits, rank = split;  // the cluster spans blockIdx.x
  const int my_rows = (kRows - rank + splits - 1) / splits;
  auto peer = [&](auto* p, int sp) { return cluster.map_shared_rank(p, sp < splits ? sp : 0); };
  // Each row's range weights: sum_sp * exp2(max_sp - max), then 1 / their total. All the remote
  // loads are issued before the first is used.
  for (int j = tid; j < my_rows; j += kThreads) {
    const int rl = rank + j * splits;
    float2 ml[kMaxSplits];
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp)
      ml[sp] = sp < splits ? peer(parked_ml, sp)[rl] : make_float2(-INFINITY, 0.0f);
    float mmax = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) mmax = fmaxf(mmax, ml[sp].x);
    float sum = 0.0f;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      const float w = ml[sp].x == -INFINITY ? 0.0f : ml[sp].y * exp2f(ml[sp].x - mmax);
      sum += w;
      row_weights[j][sp] = w;
    }
    row_weights[j][kMaxSplits] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncthreads();
  constexpr int kOctets = kHeadDim / 8;  // eight bf16 columns: one 16-byte load
  for (int idx = tid; idx < my_rows * kOctets; idx += kThreads) {
    const int j = idx / kOctets, d8 = idx % kOctets;
    const int rl = rank + j * splits;
    const int row = r0 + rl;
    if (row >= a.rows) continue;
    uint4 po[kMaxSplits];
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp)
      po[sp] = sp < splits ? reinterpret_cast<const uint4*>(peer(parked, sp) + rl * kParkedRow)[d8]
                           : make_uint4(0u, 0u, 0u, 0u);
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      if (sp >= splits) break;
      const float w = row_weights[j][sp];
      const __nv_bfloat162* p2 = reinterpret_cast<const __nv_bfloat162*>(&po[sp]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(p2[e]);
        acc[2 * e] += w * f.x;
        acc[2 * e + 1] += w * f.y;
      }
    }
    const float inv = row_weights[j][kMaxSplits];
    uint4 packed;
    __nv_bfloat162* q2 = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      q2[e] = __floats2bfloat162_rn(acc[2 * e] * inv, acc[2 * e + 1] * inv);
    *reinterpret_cast<uint4*>(a.out + static_cast<size_t>(row) * kHeadDim + d8 * 8) = packed;
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
#endif
}

void configure() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(wgmma_attention_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kQBytes + kPBytes + 2 * kTileBytes + 1024));
    CUDA_CHECK(cudaFuncSetAttribute(wgmma_attention_kernel,
                                    cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    return true;
  }();
  (void)configured;
}

cudaLaunchConfig_t launch_config(const WgmmaAttentionShape& s, cudaLaunchAttribute* attr,
                                 cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(s.splits), static_cast<unsigned>(row_blocks(s)));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes(s));
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(s.splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

}  // namespace

// Every .cu of this library is built for the same architectures, so this kernel has sm_90a code
// for the GPU exactly where the skinny GEMM's wgmma mainloop has (its probe kernel says).
bool wgmma_attention_available() {
  return skinny_wgmma_available();
}

WgmmaAttentionShape plan_wgmma_attention(WgmmaAttentionShape s) {
  PI0_CHECK(s.rows > 0 && s.keys > 0, "wgmma attention: empty shape");
  const int blocks = key_blocks(s);
  s.splits = std::clamp(kPlannedCtas / row_blocks(s), 1, std::min(blocks, kMaxSplits));
  // No empty range: as many ranges as the rounded-up range length needs.
  s.splits = (blocks + blocks_per_split(s) - 1) / blocks_per_split(s);
  return s;
}

bool wgmma_attention_runs_here(const WgmmaAttentionShape& s) {
  if (!wgmma_attention_available()) return false;
  try {
    configure();
  } catch (const Error&) {
    return false;  // the caller keeps another path
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(s, attr, nullptr);
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, wgmma_attention_kernel, &cfg);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return clusters >= 1;
}

void wgmma_attention(const WgmmaAttentionShape& s, const Bf16* q, const Bf16* k, const Bf16* v,
                     Bf16* out, cudaStream_t stream) {
  PI0_CHECK(s.splits >= 1 && s.splits <= kMaxSplits && s.rows > 0 && s.keys > 0,
            "wgmma attention: shape not planned");
  PI0_CHECK(is_aligned(q, 16) && is_aligned(k, 16) && is_aligned(v, 16) && is_aligned(out, 16),
            "wgmma attention: Q, K, V and the output must be 16-byte aligned");
  configure();
  Args a{};
  a.q = reinterpret_cast<const bf16*>(q);
  a.k = reinterpret_cast<const bf16*>(k);
  a.v = reinterpret_cast<const bf16*>(v);
  a.out = reinterpret_cast<bf16*>(out);
  a.rows = s.rows;
  a.keys = s.keys;
  a.blocks_per_split = blocks_per_split(s);
  a.splits = s.splits;
  a.limited_rows = s.limited_rows;
  a.limited_keys = s.limited_keys;
  a.scale_log2 = s.scale * 1.4426950408889634f;
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(s, attr, stream);
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, wgmma_attention_kernel, a));
}

}  // namespace pi0::cuda
