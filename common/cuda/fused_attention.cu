// Fused multi-query attention (see pi0/cuda/fused_attention.hpp). One CTA: 4 warps, 64 query rows
// (16 per warp) against one key range, in tiles of 32 keys double-buffered through cp.async;
// the per-tile step (S = Q K^T, mask, online softmax, O += P V on tensor cores) is
// attention_tile.cuh's, shared with the persistent decoder-layers kernel.
// The key ranges of a row block form one thread-block cluster and combine through distributed
// shared memory (the first version combined through global memory in the last CTA to arrive:
// 74 us per call, as one SM read every range's partial rows); each combined row reads its ranges'
// (max, sum) once, then only their partial rows. Independent problems (SigLIP's views and heads)
// are the grid's z. Key ranges that fit in shared memory whole run on a kernel of their own without
// a cluster (fused_attention_resident_kernel).
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention_tile.cuh"
#include "cluster_combine.cuh"
#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/fused_attention.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;
namespace cg = cooperative_groups;

constexpr int kThreads = 128;
constexpr int kRowsPerBlock = attention_combine::kRowsPerBlock;
constexpr int kKeysPerTile = attention_tile::kKeys;
// Ranges are planned for about two CTAs per SM of a whole H100; a fixed number, not the SM count
// this process sees, so that an MPS share does not change the bits. A row block's ranges are one
// cluster, so at most 8 (the portable cluster size).
constexpr int kPlannedCtas = 264;
constexpr int kMaxSplits = 8;

struct Args {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* out;
  int rows, keys, keys_per_split, splits, limited_rows, limited_keys;
  int head_dim, ld_q, ld_kv, ld_out, inner;
  int64_t outer_stride, inner_stride, out_outer_stride, out_inner_stride;
  float scale_log2;  // scale * log2(e)
};

int row_blocks(const FusedAttentionShape& s) {
  return (s.rows + kRowsPerBlock - 1) / kRowsPerBlock;
}
int64_t problems(const FusedAttentionShape& s) {
  return static_cast<int64_t>(s.outer) * s.inner;
}
int keys_per_split(const FusedAttentionShape& s) {
  const int per = (s.keys + s.splits - 1) / s.splits;
  return (per + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile;
}
__device__ __forceinline__ void store_bf16x2(bf16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Moves the operand pointers to independent problem `problem` (grid z).
__device__ __forceinline__ void to_problem(Args& a, int problem) {
  const int outer = problem / a.inner, inner = problem % a.inner;
  const int64_t in = outer * a.outer_stride + inner * a.inner_stride;
  a.q += in;
  a.k += in;
  a.v += in;
  a.out += outer * a.out_outer_stride + inner * a.out_inner_stride;
}

// This thread's rows row_a and row_a + 8 of the output, o divided by the row sums l (rows past
// a.rows and the head's padding columns are not written).
template <int DK>
__device__ __forceinline__ void store_rows(const Args& a, int row_a, int t, const float (&l)[2],
                                           const float (&o)[DK / 8][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_a + 8 * h;
    if (row >= a.rows) continue;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
    for (int n = 0; n < DK / 8; ++n)
      if (n * 8 < a.head_dim)
        store_bf16x2(a.out + static_cast<size_t>(row) * a.ld_out + n * 8 + 2 * t, o[n][2 * h] * inv,
                     o[n][2 * h + 1] * inv);
  }
}

// D: the shared-memory row (the head dim, or the multiple of 64 it is padded to); DK: the head
// dim rounded up to 16, the depth of both products.
template <int D, int DK>
__global__ void __launch_bounds__(kThreads) fused_attention_kernel(Args a) {
  wait_for_prior_grids();
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float2 parked_ml[kRowsPerBlock];
  __shared__ float row_weights[kRowsPerBlock][kMaxSplits + 1];  // per combined row: w, 1 / sum
  const uint32_t qs = smem_u32(smem);
  const uint32_t ks0 = qs + kRowsPerBlock * D * 2;
  const uint32_t vs0 = ks0 + 2 * kKeysPerTile * D * 2;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = blockIdx.x * kRowsPerBlock;
  const int split = blockIdx.y;
  const int key_begin = split * a.keys_per_split;
  const int key_end = min(a.keys, key_begin + a.keys_per_split);
  to_problem(a, blockIdx.z);

  attention_tile::load_rows<D, kThreads>(qs, a.q, a.ld_q, a.head_dim, DK / 8, r0, a.rows,
                                         kRowsPerBlock);

  const int row_a = r0 + warp * 16 + g;  // this thread's rows: row_a and row_a + 8
  attention_tile::RowState<DK> rows(row_a, a.limited_rows);
  auto& [o, m, l, limited] = rows;

  attention_tile::attend_range<D, DK, kThreads, DK>(qs, ks0, vs0, a.k, a.v, key_begin, key_end,
                                                    warp * 16, 0, limited, a.limited_keys,
                                                    a.scale_log2, m, l, o, a.ld_kv, a.head_dim);
  attention_tile::quad_sum(l);

  if (a.splits == 1) {
    store_rows<DK>(a, row_a, t, l, o);
    return;
  }

  // The key ranges of a row block are one cluster. Each CTA parks its unnormalised rows and
  // (max, sum) in its own shared memory (the tiles are no longer needed), and CTA r combines rows
  // r, r + S, ... over the ranks 0 .. S-1 in that order through distributed shared memory.
  cg::cluster_group cluster = cg::this_cluster();
  cp_wait<0>();  // with no tile at all, the Q load may still be landing
  __syncthreads();
  float* parked = reinterpret_cast<float*>(smem);  // [64][D]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rl = warp * 16 + g + 8 * h;
#pragma unroll
    for (int n = 0; n < DK / 8; ++n)
      *reinterpret_cast<float2*>(parked + rl * D + n * 8 + 2 * t) =
          make_float2(o[n][2 * h], o[n][2 * h + 1]);
    if (t == 0) parked_ml[rl] = make_float2(m[h], l[h]);
  }
  cluster.sync();

  attention_combine::combine_ranges<D, kThreads, kMaxSplits>(
      cluster, parked, parked_ml, row_weights, a.splits, r0, a.rows, a.head_dim, a.out, a.ld_out);
}

// Key ranges short enough to sit in shared memory whole (SigLIP's 256 keys a view) run without a
// cluster: kParts warps on each 16 query rows, each taking a part of the key tiles, merged through
// shared memory at the end. The tiles load in rounds (round r: the r-th tile of every part, Q with
// the first), so that a round's tiles are attended while the next ones land. No cluster exchange,
// which was most of the clustered kernel's time at this size.
constexpr int kResidentMaxKeys = 256;
// Heads up to SigLIP's 72 (products 80 deep): at 128 the 512 threads' 128 registers spill.
constexpr int kResidentMaxHead = 72;
constexpr int kResidentMaxDepth = 80;            // DK
constexpr int kRowGroups = kRowsPerBlock / 16;   // a warp's 16 query rows
constexpr int kExchangeSlots = kRowGroups * 32;  // threads of one part
// Parts of the key tiles: SigLIP's attention (breakdown, one H100) 14.56 us a call clustered, 12.56
// with 2 parts in rounds, 12.05 with 4 (bench/NOTES.md v26).
constexpr int kResidentParts = 4;
// One CTA an SM (SigLIP's ~147 KB of shared memory; at head 64, its 512 threads' registers): more
// CTAs than a whole H100's SMs would run in
// waves (SigLIP at V=3, 192 CTAs: encoder 7.80 ms against 7.69-7.73 clustered), so those keep the
// clustered kernel. A fixed number, not the SM count this process sees, so that an MPS share does
// not change the choice, nor the bits.
constexpr int kResidentMaxCtas = 132;

// The current device's opt-in shared memory per block (0 where it cannot be read).
size_t shared_memory_optin() {
  return static_cast<size_t>(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
}
__host__ __device__ constexpr int padded_keys(int keys) {
  return (keys + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile;
}
// What each thread of a later part hands to the thread on the same rows in part 0: o, m and l.
template <int DK>
constexpr int exchange_values() {
  return DK / 2 + 4;
}
template <int D, int DK, int kParts>
constexpr size_t resident_smem_bytes(int keys) {
  return std::max(
      static_cast<size_t>(kRowsPerBlock + 2 * keys) * D * 2,
      static_cast<size_t>(kParts - 1) * exchange_values<DK>() * kExchangeSlots * sizeof(float));
}

template <int D, int DK, int kParts>
__global__ void __launch_bounds__(kParts* kExchangeSlots) fused_attention_resident_kernel(Args a) {
  wait_for_prior_grids();
  static_assert(DK <= kResidentMaxDepth, "deeper heads spill registers");
  static_assert(kResidentMaxKeys / kKeysPerTile <= 2 * kParts, "at most two rounds of loads");
  constexpr int kBlockThreads = kParts * kExchangeSlots;
  constexpr uint32_t kTileBytes = kKeysPerTile * D * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const int keys = padded_keys(a.keys);
  const uint32_t qs = smem_u32(smem);
  const uint32_t ks = qs + kRowsPerBlock * D * 2;
  const uint32_t vs = ks + static_cast<uint32_t>(keys) * D * 2;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int group = warp % kRowGroups, part = warp / kRowGroups;  // 16 query rows; a key part
  const int r0 = blockIdx.x * kRowsPerBlock;
  to_problem(a, blockIdx.z);
  const int tiles = keys / kKeysPerTile;
  const int per_part = (tiles + kParts - 1) / kParts;  // = rounds of loads
  attention_tile::load_rows<D, kBlockThreads>(qs, a.q, a.ld_q, a.head_dim, DK / 8, r0, a.rows,
                                              kRowsPerBlock);
  for (int r = 0; r < per_part; ++r) {
    for (int p = 0; p < kParts; ++p) {
      const int tile = p * per_part + r;
      if (tile >= tiles) break;
      const int key0 = tile * kKeysPerTile;
      attention_tile::load_rows<D, kBlockThreads>(ks + tile * kTileBytes, a.k, a.ld_kv, a.head_dim,
                                                  DK / 8, key0, a.keys, kKeysPerTile);
      attention_tile::load_rows<D, kBlockThreads>(vs + tile * kTileBytes, a.v, a.ld_kv, a.head_dim,
                                                  DK / 8, key0, a.keys, kKeysPerTile);
    }
    cp_commit();
  }

  const int row_a = r0 + group * 16 + g;  // this thread's rows: row_a and row_a + 8
  attention_tile::RowState<DK> rows(row_a, a.limited_rows);
  auto& [o, m, l, limited] = rows;
  for (int r = 0; r < per_part; ++r) {
    if (r + 1 < per_part) {
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();  // round r has landed for every thread's loads
    const int tile = part * per_part + r;
    if (tile < tiles)
      attention_tile::attend_tile<D, DK, DK>(qs, ks + tile * kTileBytes, vs + tile * kTileBytes,
                                             group * 16, 0, tile * kKeysPerTile, a.keys, limited,
                                             a.limited_keys, a.scale_log2, m, l, o);
  }

  // Later parts hand their (o, m, l) to part 0 through shared memory (Q, K and V are no longer
  // needed), laid out [part][value][slot] so that consecutive threads touch consecutive words.
  constexpr int kValues = exchange_values<DK>();
  float* xchg = reinterpret_cast<float*>(smem);
  const int slot = group * 32 + lane;
  __syncthreads();  // every warp is done with Q, K and V
  if (part > 0) {
    float* mine = xchg + (part - 1) * kValues * kExchangeSlots + slot;
#pragma unroll
    for (int n = 0; n < DK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) mine[(4 * n + e) * kExchangeSlots] = o[n][e];
    mine[(DK / 2 + 0) * kExchangeSlots] = m[0];
    mine[(DK / 2 + 1) * kExchangeSlots] = m[1];
    mine[(DK / 2 + 2) * kExchangeSlots] = l[0];
    mine[(DK / 2 + 3) * kExchangeSlots] = l[1];
  }
  __syncthreads();
  if (part > 0) return;
  // Part 0 weighs every part by exp2(its max - the overall max), in part order.
  float w[kParts][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = m[h];
#pragma unroll
    for (int p = 1; p < kParts; ++p)
      mx = fmaxf(mx, xchg[((p - 1) * kValues + DK / 2 + h) * kExchangeSlots + slot]);
    const float base = mx == -INFINITY ? 0.0f : mx;  // a row that sees no key stays at 0
    w[0][h] = exp2f(m[h] - base);
    l[h] *= w[0][h];
#pragma unroll
    for (int p = 1; p < kParts; ++p) {
      const float* theirs = xchg + (p - 1) * kValues * kExchangeSlots + slot;
      w[p][h] = exp2f(theirs[(DK / 2 + h) * kExchangeSlots] - base);
      l[h] += theirs[(DK / 2 + 2 + h) * kExchangeSlots] * w[p][h];
    }
  }
  attention_tile::quad_sum(l);
#pragma unroll
  for (int n = 0; n < DK / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      float v = o[n][e] * w[0][h];
#pragma unroll
      for (int p = 1; p < kParts; ++p)
        v += xchg[((p - 1) * kValues + 4 * n + e) * kExchangeSlots + slot] * w[p][h];
      o[n][e] = v;
    }
  store_rows<DK>(a, row_a, t, l, o);
}

template <int D>
constexpr int smem_bytes() {
  return (kRowsPerBlock + 4 * kKeysPerTile) * D * 2;
}

template <int D, int DK>
void configure() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(fused_attention_kernel<D, DK>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<D>()));
    return true;
  }();
  (void)configured;
}

template <int D>
cudaLaunchConfig_t launch_config(const FusedAttentionShape& s, cudaLaunchAttribute* attr,
                                 cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(row_blocks(s)), static_cast<unsigned>(s.splits),
                     static_cast<unsigned>(problems(s)));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem_bytes<D>();
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(s.splits);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

template <int D, int DK, int kParts>
void launch_resident_parts(const FusedAttentionShape& s, const Args& args, cudaStream_t stream) {
  auto kernel = fused_attention_resident_kernel<D, DK, kParts>;
  static const bool configured = [&] {
    const size_t bytes =
        std::min(resident_smem_bytes<D, DK, kParts>(kResidentMaxKeys), shared_memory_optin());
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
    return true;
  }();
  (void)configured;
  const dim3 grid(static_cast<unsigned>(row_blocks(s)), 1, static_cast<unsigned>(problems(s)));
  kernel<<<grid, kParts * kExchangeSlots, resident_smem_bytes<D, DK, kParts>(padded_keys(s.keys)),
           stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

template <int D, int DK>
void launch_resident(const FusedAttentionShape& s, const Args& args, cudaStream_t stream) {
  if constexpr (DK <= kResidentMaxDepth) {
    launch_resident_parts<D, DK, kResidentParts>(s, args, stream);
  } else {
    PI0_CHECK(false, "fused attention: no in-shared-memory kernel for heads of " +
                         std::to_string(s.head_dim));
  }
}

template <int D, int DK>
void launch(const FusedAttentionShape& s, const Args& args, cudaStream_t stream) {
  if (s.resident) return launch_resident<D, DK>(s, args, stream);
  configure<D, DK>();
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config<D>(s, attr, stream);
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, fused_attention_kernel<D, DK>, args));
}

template <int D, int DK>
bool cluster_fits(const FusedAttentionShape& s) {
  configure<D, DK>();
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config<D>(s, attr, nullptr);
  int clusters = 0;
  const cudaError_t err =
      cudaOccupancyMaxActiveClusters(&clusters, fused_attention_kernel<D, DK>, &cfg);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return clusters >= 1;
}

// Runs f(D, DK) as std::integral_constants for the head dim's instantiation: D is the
// shared-memory row, DK the head rounded up to 16 (SigLIP's 72 runs in rows of 128, its products
// 80 deep).
template <typename F>
auto with_instantiation(int head_dim, F&& f) {
  using std::integral_constant;
  switch (head_dim) {
    case 64:
      return f(integral_constant<int, 64>(), integral_constant<int, 64>());
    case 72:
      return f(integral_constant<int, 128>(), integral_constant<int, 80>());
    case 128:
      return f(integral_constant<int, 128>(), integral_constant<int, 128>());
    default:
      return f(integral_constant<int, 256>(), integral_constant<int, 256>());
  }
}

}  // namespace

bool fused_attention_supported(int head_dim) {
  return head_dim == 64 || head_dim == 72 || head_dim == 128 || head_dim == 256;
}

FusedAttentionShape plan_fused_attention(FusedAttentionShape s) {
  PI0_CHECK(s.rows > 0 && s.keys > 0 && fused_attention_supported(s.head_dim),
            "fused attention: unsupported shape");
  PI0_CHECK(s.outer >= 1 && s.inner >= 1 && problems(s) <= 65535,
            "fused attention: bad problem grid");
  if (s.ld_q == 0) s.ld_q = s.head_dim;
  if (s.ld_kv == 0) s.ld_kv = s.head_dim;
  if (s.ld_out == 0) s.ld_out = s.head_dim;
  PI0_CHECK(s.ld_q >= s.head_dim && s.ld_kv >= s.head_dim && s.ld_out >= s.head_dim &&
                s.ld_q % 8 == 0 && s.ld_kv % 8 == 0 && s.ld_out % 8 == 0 &&
                s.outer_stride % 8 == 0 && s.inner_stride % 8 == 0 && s.out_outer_stride % 8 == 0 &&
                s.out_inner_stride % 8 == 0,
            "fused attention: row strides must cover the head and keep rows 16-byte aligned");
  // Whole key ranges in shared memory where they fit (PI0_FUSED_ATTENTION_RESIDENT=0 keeps the
  // clustered kernel, for comparisons).
  s.resident = s.keys <= kResidentMaxKeys && s.head_dim <= kResidentMaxHead &&
               row_blocks(s) * problems(s) <= kResidentMaxCtas &&
               env_switch("PI0_FUSED_ATTENTION_RESIDENT", true);
  if (s.resident) {
    s.splits = 1;
    return s;
  }
  const int blocks = row_blocks(s) * static_cast<int>(problems(s));
  const int max_splits =
      std::clamp((s.keys + 2 * kKeysPerTile - 1) / (2 * kKeysPerTile), 1, kMaxSplits);
  // At most the planned CTAs (rounding down): SigLIP's 128 row blocks take 2 ranges of 128 keys,
  // 1.9 us per layer faster than 3 of 96 (bench/NOTES.md v9).
  const int wanted = std::max(1, kPlannedCtas / blocks);
  s.splits = std::min(max_splits, wanted);
  // No empty range: as many ranges as the rounded-up range length needs.
  const int per = keys_per_split(s);
  s.splits = (s.keys + per - 1) / per;
  return s;
}

bool fused_attention_runs_here(const FusedAttentionShape& s) {
  return with_instantiation(s.head_dim, [&](auto d, auto dk) {
    if (s.resident)
      return resident_smem_bytes<decltype(d)::value, decltype(dk)::value, kResidentParts>(
                 padded_keys(s.keys)) <= shared_memory_optin();
    return cluster_fits<decltype(d)::value, decltype(dk)::value>(s);
  });
}

void fused_attention(const FusedAttentionShape& s, const Bf16* q, const Bf16* k, const Bf16* v,
                     Bf16* out, cudaStream_t stream) {
  PI0_CHECK(fused_attention_supported(s.head_dim) && s.splits >= 1 && s.splits <= kMaxSplits &&
                (!s.resident ||
                 (s.splits == 1 && s.keys <= kResidentMaxKeys && s.head_dim <= kResidentMaxHead)) &&
                s.ld_q >= s.head_dim && s.ld_kv >= s.head_dim && s.ld_out >= s.head_dim,
            "fused attention: shape not planned");
  PI0_CHECK(is_aligned(q, 16) && is_aligned(k, 16) && is_aligned(v, 16) && is_aligned(out, 16),
            "fused attention: Q, K, V and the output must be 16-byte aligned");
  Args a{};
  a.q = reinterpret_cast<const bf16*>(q);
  a.k = reinterpret_cast<const bf16*>(k);
  a.v = reinterpret_cast<const bf16*>(v);
  a.out = reinterpret_cast<bf16*>(out);
  a.rows = s.rows;
  a.keys = s.keys;
  a.keys_per_split = keys_per_split(s);
  a.splits = s.splits;
  a.limited_rows = s.limited_rows;
  a.limited_keys = s.limited_keys;
  a.head_dim = s.head_dim;
  a.ld_q = s.ld_q;
  a.ld_kv = s.ld_kv;
  a.ld_out = s.ld_out;
  a.inner = s.inner;
  a.outer_stride = s.outer_stride;
  a.inner_stride = s.inner_stride;
  a.out_outer_stride = s.out_outer_stride;
  a.out_inner_stride = s.out_inner_stride;
  a.scale_log2 = s.scale * 1.4426950408889634f;
  with_instantiation(s.head_dim, [&](auto d, auto dk) {
    launch<decltype(d)::value, decltype(dk)::value>(s, a, stream);
  });
}

}  // namespace pi0::cuda
