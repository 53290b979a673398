// Skinny GEMM kernels (see pi0/cuda/skinny_gemm.hpp). One CTA: 4 warps, a 64-row x BN-column
// output tile over one K split; X and W stream through a STAGES-deep cp.async ring of 64-deep
// K blocks (16-byte chunks, XOR-swizzled). Two mainloops:
// - mma.sync: each warp owns BN/4 columns and all 64 rows: per 16-deep step, 4 ldmatrix.x4 (X) +
//   BN/64 ldmatrix.x4.trans (W) and 4 * BN/32 mma.sync;
// - wgmma (sm_90a): the 4 warps are one warpgroup, and the tensor cores read X (K-major) and W
//   (MN-major as stored [k, n], or K-major when given transposed) through matrix descriptors of
//   the 128-byte-swizzled layout, so no operand passes through registers: per 16-deep step,
//   BN/64 wgmma.m64n64k16.
// The K splits of a tile are one cluster: every CTA parks its fp32 partial tile in its shared
// memory, and after a cluster barrier CTA r sums units r, r + S, ... of the tile over ranks
// 0..S-1 in that order (bitwise reproducible) and applies the epilogue.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;
using namespace mma;

constexpr int kThreads = 128;
constexpr int kBM = 64;
constexpr int kBK = 64;

enum Mode : int { kModeBf16 = 0, kModeF32 = 1, kModeF32Acc = 2, kModeGeglu = 3 };

struct Args {
  const bf16* x;
  const bf16* w;
  void* y;
  const float* bias;
  int m, n, k, ldx, ldw, ldy;
  int kb_total, kb_per_split, splits, mode;
};

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Stores the pair (v0, v1) at (row, col), (row, col + 1) of a plain output.
__device__ __forceinline__ void store_pair(const Args& a, int row, int col, float v0, float v1) {
  if (a.bias) {
    v0 += a.bias[col];
    v1 += a.bias[col + 1];
  }
  const size_t at = static_cast<size_t>(row) * a.ldy + col;
  if (a.mode == kModeBf16) {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(a.y) + at) =
        __floats2bfloat162_rn(v0, v1);
  } else {
    float2* p = reinterpret_cast<float2*>(static_cast<float*>(a.y) + at);
    if (a.mode == kModeF32Acc) {
      const float2 old = *p;
      v0 = old.x + v0;
      v1 = old.y + v1;
    }
    *p = make_float2(v0, v1);
  }
}

// The split-K reduction and epilogue of both mainloops. Each CTA's partial tile sits in its shared
// memory as float4 fragments, fragment f of thread t at red[f * kThreads + t] (rows r and r + 8,
// two adjacent columns each); fragments 2u and 2u + 1 are n8 chunks side by side, a gate chunk and
// its up chunk under GeGLU. CTA `rank` sums units rank, rank + splits, ... over ranks 0, 1, ... in
// that order, and stores them; locate(u) gives this thread's row r and first column in unit u.
template <class Locate>
__device__ __forceinline__ void reduce_and_store(const Args& a, float4* red, int rank, int units,
                                                 Locate locate) {
  const int tid = threadIdx.x, lane = tid & 31;
  cg::cluster_group cluster = cg::this_cluster();
  if (a.splits > 1) {
    cluster.sync();
  } else {
    __syncthreads();
  }
  for (int u = rank; u < units; u += a.splits) {
    float4 v[2];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int idx = (2 * u + jj) * kThreads + tid;
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int r = 0; r < a.splits; ++r) {
        const float4* src = a.splits > 1 ? cluster.map_shared_rank(red, r) : red;
        const float4 t = src[idx];
        s.x += t.x;
        s.y += t.y;
        s.z += t.z;
        s.w += t.w;
      }
      v[jj] = s;
    }
    const int2 at = locate(u);
    const int row_a = at.x, row_b = row_a + 8, col0 = at.y;
    if (a.mode == kModeGeglu) {
      const int chunk = (col0 - (lane & 3) * 2) / 8;  // even: gate; chunk + 1: up
      if (chunk * 8 < a.n) {
        const int ocol = (chunk / 2) * 8 + (lane & 3) * 2;
        bf16* y = static_cast<bf16*>(a.y);
        if (row_a < a.m)
          *reinterpret_cast<__nv_bfloat162*>(y + static_cast<size_t>(row_a) * a.ldy + ocol) =
              __floats2bfloat162_rn(gelu_tanh(v[0].x) * v[1].x, gelu_tanh(v[0].y) * v[1].y);
        if (row_b < a.m)
          *reinterpret_cast<__nv_bfloat162*>(y + static_cast<size_t>(row_b) * a.ldy + ocol) =
              __floats2bfloat162_rn(gelu_tanh(v[0].z) * v[1].z, gelu_tanh(v[0].w) * v[1].w);
      }
    } else {
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int col = col0 + jj * 8;
        if (col >= a.n) continue;
        if (row_a < a.m) store_pair(a, row_a, col, v[jj].x, v[jj].y);
        if (row_b < a.m) store_pair(a, row_b, col, v[jj].z, v[jj].w);
      }
    }
  }
  if (a.splits > 1) cluster.sync();  // no CTA leaves while another still reads its partials
}

// Copies rows first .. first + kRows - 1 and columns k0 .. k0 + 63 of a row-major bf16 matrix
// (zeros beyond `rows` and `cols`) into a K-major tile of 128-byte-swizzled rows at dst.
template <int kRows>
__device__ __forceinline__ void load_k_major(uint32_t dst, const bf16* src, int ld, int first,
                                             int rows, int k0, int cols) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kRows * 8 / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int r = c >> 3, kc = c & 7;
    const int gr = first + r, gk = k0 + kc * 8;
    const bool ok = gr < rows && gk < cols;
    cp_async16(dst + r * 128 + ((kc ^ (r & 7)) << 4),
               ok ? src + static_cast<size_t>(gr) * ld + gk : src, ok);
  }
}

// Copies rows k0 .. k0 + 63 and columns n0 .. n0 + BN - 1 of W as stored ([k, n] row-major; zeros
// beyond k and n): the 16-byte chunk nc of tile row kr goes to dst + offset(kr, nc).
template <int BN, class Offset>
__device__ __forceinline__ void load_w_tile(uint32_t dst, const Args& a, int k0, int n0,
                                            Offset offset) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kBK * BN / 8 / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int kr = c / (BN / 8), nc = c % (BN / 8);
    const int gk = k0 + kr, gn = n0 + nc * 8;
    const bool ok = gk < a.k && gn < a.n;
    cp_async16(dst + offset(kr, nc), ok ? a.w + static_cast<size_t>(gk) * a.ldw + gn : a.w, ok);
  }
}

// The cp.async ring of both mainloops: K blocks kb0 .. kb0 + nkb - 1 go to stage kb % STAGES
// (relative to kb0), one commit group per block, empty groups past the end so that
// cp_wait<STAGES - 2> always means "block it has landed". Fill issues the first STAGES - 1;
// refill, at block it, the block STAGES - 1 ahead into the stage block it - 1 has freed.
template <int STAGES, class Load>
__device__ __forceinline__ void ring_fill(int nkb, int kb0, Load& load) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkb) load(s, kb0 + s);
    cp_commit();
  }
}
template <int STAGES, class Load>
__device__ __forceinline__ void ring_refill(int it, int nkb, int kb0, Load& load) {
  const int next = it + STAGES - 1;
  if (next < nkb) load(next % STAGES, kb0 + next);
  cp_commit();
}

template <int BN, int STAGES>
__global__ void __launch_bounds__(kThreads) skinny_kernel(const Args a) {
  wait_for_prior_grids();
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int kXBytes = kBM * kBK * 2;
  constexpr int kWBytes = kBK * BN * 2;
  constexpr int kStageBytes = kXBytes + kWBytes;
  constexpr int NT = BN / 32;  // n8 tiles per warp
  static_assert(4 * NT * kThreads * 16 <= STAGES * kStageBytes, "reduction tile must fit");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN;
  const int m0 = blockIdx.z * kBM;
  const int rank = blockIdx.y;  // cluster (1, splits, 1) over a grid of height splits
  const int kb0 = rank * a.kb_per_split;
  const int kb1 = min(a.kb_total, kb0 + a.kb_per_split);
  const int nkb = max(0, kb1 - kb0);
  const uint32_t sbase = smem_u32(smem);

  auto load = [&](int stage, int kb) {
    const int k0 = kb * kBK;
    const uint32_t xs = sbase + stage * kStageBytes;
    const uint32_t ws = xs + kXBytes;
    load_k_major<kBM>(xs, a.x, a.ldx, m0, a.m, k0, a.k);
    load_w_tile<BN>(ws, a, k0, n0,
                    [](int kr, int nc) { return (kr * BN + ((nc ^ (kr & 7)) << 3)) * 2; });
  };

  float acc[4][NT][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  ring_fill<STAGES>(nkb, kb0, load);
  for (int it = 0; it < nkb; ++it) {
    cp_wait<STAGES - 2>();
    __syncthreads();  // stage `it` landed for all threads; stage it-1 is free again
    ring_refill<STAGES>(it, nkb, kb0, load);
    const uint32_t xs = sbase + (it % STAGES) * kStageBytes;
    const uint32_t ws = xs + kXBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i * 16 + (lane & 15);
        const int kc = kk * 2 + (lane >> 4);
        ldsm_x4(af[i], xs + (row * kBK + ((kc ^ (row & 7)) << 3)) * 2);
      }
      uint32_t bfr[NT][2];
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        const int j = lane >> 3, r = lane & 7;
        const int kr = kk * 16 + (j & 1) * 8 + r;
        const int nc = warp * NT + jp * 2 + (j >> 1);
        uint32_t t[4];
        ldsm_x4_t(t, ws + (kr * BN + ((nc ^ (kr & 7)) << 3)) * 2);
        bfr[2 * jp][0] = t[0];
        bfr[2 * jp][1] = t[1];
        bfr[2 * jp + 1][0] = t[2];
        bfr[2 * jp + 1][1] = t[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
    }
  }
  cp_wait<0>();
  __syncthreads();  // the ring is free: reuse it for the partial tile

  float4* red = reinterpret_cast<float4*>(smem);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
      red[(i * NT + j) * kThreads + tid] =
          make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);

  const int i_of_unit = NT / 2;  // units per 16-row block
  reduce_and_store(a, red, rank, 4 * NT / 2, [&](int u) {
    const int i = u / i_of_unit, q = u % i_of_unit;
    return make_int2(m0 + i * 16 + (lane >> 2), n0 + warp * (BN / 4) + 2 * q * 8 + (lane & 3) * 2);
  });
}

// The wgmma mainloop. Stage layout (1024-byte aligned): X [64 rows][64 k] then W as BN / 64
// blocks of 64 columns, every 128-byte row with its 16-byte chunk c at c ^ (row % 8): the
// canonical 128-byte-swizzle atoms. X is K-major; W is MN-major ([64 k][64 n] blocks) when given
// as [k, n], K-major ([64 n][64 k]) when given transposed as [n, k] (kWT), which streams each
// CTA's columns as contiguous rows of memory and runs faster (bench/NOTES.md v7). Per 16-deep
// step the K-major descriptors move 32 bytes along their rows, the MN-major ones 16 rows.
template <int BN, int STAGES, bool kWT>
__global__ void __launch_bounds__(kThreads) skinny_wgmma_kernel(const Args a) {
  wait_for_prior_grids();
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  (void)a;
  __trap();  // never launched: plan_skinny picks this kernel only where sm_90a code exists
#else
  extern __shared__ unsigned char smem_raw[];
  constexpr int kXBytes = kBM * kBK * 2;
  constexpr int kBlockBytes = kBK * 64 * 2;  // one 64 x 64 block of W
  constexpr int kBlocks = BN / 64;
  constexpr int kStageBytes = kXBytes + kBlocks * kBlockBytes;
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sbase = (raw + 1023u) & ~1023u;
  // The partial tile reuses the ring once the last wgmma has completed (see below).
  float4* red = reinterpret_cast<float4*>(smem_raw + (sbase - raw));
  static_assert(BN / 8 * kThreads * 16 <= STAGES * kStageBytes, "partial tile must fit the ring");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN;
  const int m0 = blockIdx.z * kBM;
  const int rank = blockIdx.y;
  const int kb0 = rank * a.kb_per_split;
  const int kb1 = min(a.kb_total, kb0 + a.kb_per_split);
  const int nkb = max(0, kb1 - kb0);

  auto load = [&](int stage, int kb) {
    const int k0 = kb * kBK;
    const uint32_t xs = sbase + stage * kStageBytes;
    const uint32_t ws = xs + kXBytes;
    load_k_major<kBM>(xs, a.x, a.ldx, m0, a.m, k0, a.k);
    if constexpr (kWT) {
      load_k_major<BN>(ws, a.w, a.ldw, n0, a.n, k0, a.k);
    } else {
      load_w_tile<BN>(ws, a, k0, n0, [](int kr, int nc) {
        return (nc >> 3) * kBlockBytes + kr * 128 + (((nc & 7) ^ (kr & 7)) << 4);
      });
    }
  };

  float d[kBlocks][32];
#pragma unroll
  for (int h = 0; h < kBlocks; ++h)
#pragma unroll
    for (int e = 0; e < 32; ++e) d[h][e] = 0.0f;

  ring_fill<STAGES>(nkb, kb0, load);
  for (int it = 0; it < nkb; ++it) {
    cp_wait<STAGES - 2>();
    fence_async_shared();  // this thread's copies, visible to the tensor cores
    __syncthreads();       // everyone's; and block it - 1's wgmma are done (waited below)
    ring_refill<STAGES>(it, nkb, kb0, load);
    const uint32_t xs = sbase + (it % STAGES) * kStageBytes;
    const uint32_t ws = xs + kXBytes;
#pragma unroll
    for (int h = 0; h < kBlocks; ++h) fence_operand(d[h]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint64_t da = smem_desc_sw128(xs + kk * 32, 16, 1024);
#pragma unroll
      for (int h = 0; h < kBlocks; ++h) {
        if constexpr (kWT) {
          wgmma_m64n64k16<0>(d[h], da, smem_desc_sw128(ws + h * kBlockBytes + kk * 32, 16, 1024),
                             1);
        } else {
          wgmma_m64n64k16<1>(d[h], da,
                             smem_desc_sw128(ws + h * kBlockBytes + kk * 2048, 1024, 1024), 1);
        }
      }
    }
    wgmma_commit();
    wgmma_wait0();
#pragma unroll
    for (int h = 0; h < kBlocks; ++h) fence_operand(d[h]);
  }
  cp_wait<0>();
  // Every warp has waited for the last wgmma, so the tensor cores are done reading the ring; the
  // proxy fence orders those async-proxy reads before this thread's generic writes over them.
  fence_async_shared();
  __syncthreads();

  // Fragment h * 8 + j: n8 chunk j of column block h, d[h][4 j .. 4 j + 3].
#pragma unroll
  for (int h = 0; h < kBlocks; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      red[(h * 8 + j) * kThreads + tid] =
          make_float4(d[h][4 * j], d[h][4 * j + 1], d[h][4 * j + 2], d[h][4 * j + 3]);

  reduce_and_store(a, red, rank, BN / 16, [&](int u) {
    return make_int2(m0 + warp * 16 + (lane >> 2), n0 + 16 * u + (lane & 3) * 2);
  });
#endif
}

// Writes 1 only where this binary carries sm_90a code for the device.
__global__ void wgmma_probe_kernel(int* flag) {
  wait_for_prior_grids();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

template <int BN, int STAGES>
constexpr int smem_bytes() {
  return STAGES * (kBM * kBK * 2 + kBK * BN * 2);
}

// The ring (which the partial tile reuses) and 1024 bytes of alignment slack: 65 KB at bn 64 and
// 4 stages, so 3 CTAs fit an SM as with mma.sync (a separate partial tile left room for 2, and
// the 320-CTA grids of qkv ran in two waves).
template <int BN, int STAGES>
constexpr int wgmma_smem_bytes() {
  return smem_bytes<BN, STAGES>() + 1024;
}

template <int BN, int STAGES>
void set_attributes() {
  auto* kernel = &skinny_kernel<BN, STAGES>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  smem_bytes<BN, STAGES>()));
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for (auto* wgmma :
       {&skinny_wgmma_kernel<BN, STAGES, false>, &skinny_wgmma_kernel<BN, STAGES, true>}) {
    CUDA_CHECK(cudaFuncSetAttribute(wgmma, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    wgmma_smem_bytes<BN, STAGES>()));
    CUDA_CHECK(cudaFuncSetAttribute(wgmma, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
}

template <int BN, int STAGES>
void launch(const Args& args, dim3 grid, SkinnyKernel kernel, bool w_transposed,
            cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  const bool wgmma = kernel == SkinnyKernel::kWgmma;
  cfg.dynamicSmemBytes = wgmma ? wgmma_smem_bytes<BN, STAGES>() : smem_bytes<BN, STAGES>();
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(args.splits);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = args.splits > 1 ? 1 : 0;
  if (wgmma && w_transposed) {
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, skinny_wgmma_kernel<BN, STAGES, true>, args));
  } else if (wgmma) {
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, skinny_wgmma_kernel<BN, STAGES, false>, args));
  } else {
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, skinny_kernel<BN, STAGES>, args));
  }
}

bool initialised = false;

}  // namespace

bool skinny_wgmma_available() {
  static const bool ok = [] {
    int* flag = nullptr;
    int host = 0;
    if (cudaMalloc(&flag, sizeof(int)) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    wgmma_probe_kernel<<<1, 1>>>(flag);
    const bool ran = cudaGetLastError() == cudaSuccess &&
                     cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaFree(flag);
    (void)cudaGetLastError();  // e.g. no kernel image for this device: report "unavailable"
    return ran && host == 1;
  }();
  return ok;
}

bool skinny_supported(const SkinnyShape& s) {
  const bool strides = s.k % 8 == 0 && s.n % 8 == 0 && s.ld_x % 8 == 0 && s.ld_w % 8 == 0 &&
                       s.ld_y % 2 == 0 && s.ld_x >= s.k && s.ld_w >= (s.w_transposed ? s.k : s.n);
  const bool out =
      s.out == SkinnyOut::kGeglu ? (s.n % 16 == 0 && s.ld_y >= s.n / 2 && !s.bias) : s.ld_y >= s.n;
  return s.m > 0 && s.n > 0 && s.k > 0 && strides && out;
}

SkinnyShape plan_skinny(SkinnyShape s, int sm_count) {
  PI0_CHECK(skinny_supported(s), "skinny gemm: unsupported shape m=" + std::to_string(s.m) +
                                     " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k));
  if (s.bn == 0) s.bn = 64;
  if (s.stages == 0) s.stages = 4;
  const int kb = (s.k + kBK - 1) / kBK;
  if (s.splits == 0) {
    const int tiles = (s.n + s.bn - 1) / s.bn;
    s.splits = 1;
    while (s.splits < 8 && tiles * s.splits * 2 < 3 * sm_count && kb / (s.splits * 2) >= 2)
      s.splits *= 2;
  }
  PI0_CHECK(s.bn == 64 || s.bn == 128, "skinny gemm: bn must be 64 or 128");
  PI0_CHECK(s.stages == 4 || (s.stages == 8 && s.bn == 64), "skinny gemm: bad stage count");
  PI0_CHECK(s.splits == 1 || s.splits == 2 || s.splits == 4 || s.splits == 8 || s.splits == 16,
            "skinny gemm: splits must be 1, 2, 4, 8 or 16");
  if (s.kernel == SkinnyKernel::kAuto)
    s.kernel = skinny_wgmma_available() ? SkinnyKernel::kWgmma : SkinnyKernel::kMmaSync;
  PI0_CHECK(s.kernel != SkinnyKernel::kWgmma || skinny_wgmma_available(),
            "skinny gemm: the wgmma kernel needs sm_90a code for this GPU "
            "(build with -DCMAKE_CUDA_ARCHITECTURES=90a on an H100)");
  PI0_CHECK(!s.w_transposed || s.kernel == SkinnyKernel::kWgmma,
            "skinny gemm: transposed weights need the wgmma kernel");
  return s;
}

void skinny_init() {
  if (initialised) return;
  set_attributes<64, 4>();
  set_attributes<64, 8>();
  set_attributes<128, 4>();
  initialised = true;
}

void skinny_gemm(const SkinnyShape& s, const Bf16* x, const Bf16* w, void* y, const float* bias,
                 cudaStream_t stream) {
  PI0_CHECK(s.bn != 0 && s.splits != 0 && s.stages != 0 && s.kernel != SkinnyKernel::kAuto,
            "skinny gemm: shape not planned");
  PI0_CHECK(s.bias == (bias != nullptr), "skinny gemm: bias pointer does not match the shape");
  PI0_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(y) % 8 == 0,
            "skinny gemm: misaligned operand");
  skinny_init();
  Args a;
  a.x = reinterpret_cast<const bf16*>(x);
  a.w = reinterpret_cast<const bf16*>(w);
  a.y = y;
  a.bias = bias;
  a.m = s.m;
  a.n = s.n;
  a.k = s.k;
  a.ldx = s.ld_x;
  a.ldw = s.ld_w;
  a.ldy = s.ld_y;
  a.kb_total = (s.k + kBK - 1) / kBK;
  a.splits = s.splits;
  a.kb_per_split = (a.kb_total + s.splits - 1) / s.splits;
  a.mode = s.out == SkinnyOut::kBf16            ? kModeBf16
           : s.out == SkinnyOut::kF32           ? kModeF32
           : s.out == SkinnyOut::kF32Accumulate ? kModeF32Acc
                                                : kModeGeglu;
  const dim3 grid((s.n + s.bn - 1) / s.bn, s.splits, (s.m + kBM - 1) / kBM);
  if (s.bn == 128) {
    launch<128, 4>(a, grid, s.kernel, s.w_transposed, stream);
  } else if (s.stages == 8) {
    launch<64, 8>(a, grid, s.kernel, s.w_transposed, stream);
  } else {
    launch<64, 4>(a, grid, s.kernel, s.w_transposed, stream);
  }
}

std::vector<Bf16> transpose_layers(const Bf16* in, long layers, long rows, long cols) {
  std::vector<Bf16> out(static_cast<size_t>(layers * rows * cols));
  for (long l = 0; l < layers; ++l) {
    const Bf16* src = in + l * rows * cols;
    Bf16* dst = out.data() + l * rows * cols;
    for (long r = 0; r < rows; ++r)
      for (long c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
  return out;
}

void interleave_gate_up(const Bf16* gate, const Bf16* up, Bf16* out, long rows, int cols) {
  for (long r = 0; r < rows; ++r) {
    const Bf16* g = gate + r * cols;
    const Bf16* u = up + r * cols;
    Bf16* o = out + r * 2 * cols;
    for (int b = 0; b < cols / 8; ++b)
      for (int e = 0; e < 8; ++e) {
        o[16 * b + e] = g[8 * b + e];
        o[16 * b + 8 + e] = u[8 * b + e];
      }
  }
}

}  // namespace pi0::cuda
