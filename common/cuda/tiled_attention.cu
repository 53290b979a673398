// Two-kernel multi-query attention (see pi0/cuda/tiled_attention.hpp). Both kernels: 16 rows a
// warp, mma.sync m16n8k16 with operands through ldmatrix. Shared-memory rows are padded
// by 16 bytes, so the 8 rows an ldmatrix reads fall in 8 different bank groups.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_tile.cuh"
#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/tiled_attention.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;
using attention_tile::pack_bf16;

constexpr int kScoreThreads = 256;  // 8 warps: 4 row groups of 16 x 2 key halves of 32
constexpr int kValueThreads = 128;  // 4 warps: 2 row groups of 16 x even / odd tiles
constexpr int kScoreRows = 64;      // query rows per scores CTA
constexpr int kValueRows = 32;      // query rows per values CTA
constexpr int kKeys = 64;           // keys per tile
constexpr int kMaxTiles = kTiledAttentionMaxKeys / kKeys;
constexpr int kDims = 32;    // output dims per values CTA
constexpr int kStages = 10;  // the values kernel's ring of (P~, V) tiles: all of V=2's 9 at once

struct Layout {
  int rows_padded, tiles, ld;  // ld: P~'s row length, whole tiles
  size_t probs_bytes, stats_bytes;
};

Layout layout_of(const TiledAttentionShape& s) {
  Layout l{};
  l.rows_padded = (s.rows + kScoreRows - 1) / kScoreRows * kScoreRows;
  l.tiles = (s.keys + kKeys - 1) / kKeys;
  l.ld = l.tiles * kKeys;
  l.probs_bytes = static_cast<size_t>(l.rows_padded) * l.ld * sizeof(bf16);
  l.stats_bytes = static_cast<size_t>(l.tiles) * l.rows_padded * sizeof(float2);
  return l;
}

struct Args {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* out;
  bf16* probs;    // [rows_padded][ld]
  float2* stats;  // [tiles][rows_padded]: (row max in the log2 domain, sum of P~)
  int rows, keys, rows_padded, tiles, ld, limited_rows, limited_keys;
  float scale_log2;
};

// cp.async.wait_group takes an immediate: this picks it for a count known only at run time.
template <int N>
__device__ __forceinline__ void cp_wait_at_most(int pending) {
  if constexpr (N == 0) {
    cp_wait<0>();
  } else {
    if (pending >= N)
      cp_wait<N>();
    else
      cp_wait_at_most<N - 1>(pending);
  }
}

template <int D>
constexpr int qk_row_bytes() {
  return D * 2 + 16;
}
template <int D>
constexpr int scores_smem_bytes() {
  return (kScoreRows + kKeys) * qk_row_bytes<D>() + 2 * 2 * kScoreRows * 4;
}

// One (64 rows, 64 keys) tile: S = Q K^T over the head, masked and scaled (log2 domain);
// P~ = exp2(S - m) per row, rounded to bf16; (m, sum of the rounded P~) per row. The head's dims
// arrive in groups of 64 so the products start before the last group lands; the two key halves'
// warps meet in shared memory for the row max and sum.
template <int D>
__global__ void __launch_bounds__(kScoreThreads) scores_kernel(Args a) {
  wait_for_prior_grids();
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kRowBytes = qk_row_bytes<D>();
  constexpr int kGroups = D >= 64 ? D / 64 : 1;
  constexpr int kGroupChunks = D / 8 / kGroups;
  const uint32_t qs = smem_u32(smem), ks = qs + kScoreRows * kRowBytes;
  float* half_max = reinterpret_cast<float*>(smem + (kScoreRows + kKeys) * kRowBytes);  // [2][64]
  float* half_sum = half_max + 2 * kScoreRows;                                          // [2][64]
  const int tile = blockIdx.x, row0 = blockIdx.y * kScoreRows, key0 = tile * kKeys;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    for (int c = static_cast<int>(threadIdx.x); c < kScoreRows * kGroupChunks; c += kScoreThreads) {
      const int r = c / kGroupChunks, ch = g * kGroupChunks + c % kGroupChunks;
      const int qr = row0 + r, kr = key0 + r;
      const uint32_t at = static_cast<uint32_t>(r * kRowBytes + ch * 16);
      cp_async16(qs + at, a.q + (qr < a.rows ? static_cast<size_t>(qr) * D + ch * 8 : 0),
                 qr < a.rows);
      cp_async16(ks + at, a.k + (kr < a.keys ? static_cast<size_t>(kr) * D + ch * 8 : 0),
                 kr < a.keys);
    }
    cp_commit();
  }

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int t = lane & 3, rows16 = (warp & 3) * 16, half = warp >> 2, keys32 = half * 32;
  float s[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    cp_wait_at_most<kGroups - 1>(kGroups - 1 - g);
    __syncthreads();
#pragma unroll
    for (int kk = g * kGroupChunks / 2; kk < (g + 1) * kGroupChunks / 2; ++kk) {
      uint32_t af[4];
      ldsm_x4(af, qs + (rows16 + (lane & 15)) * kRowBytes + (kk * 2 + (lane >> 4)) * 16);
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        uint32_t b[4];
        const int key = keys32 + jp * 16 + ((lane >> 4) & 1) * 8 + (lane & 7);
        ldsm_x4(b, ks + key * kRowBytes + (kk * 2 + ((lane >> 3) & 1)) * 16);
        mma16816(s[2 * jp], af, b[0], b[1]);
        mma16816(s[2 * jp + 1], af, b[2], b[3]);
      }
    }
  }

  const int r_lo = rows16 + (lane >> 2), row = row0 + r_lo;  // and row + 8
  const bool limited[2] = {row < a.limited_rows, row + 8 < a.limited_rows};
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + keys32 + j * 8 + 2 * t + (e & 1);
      const int h = e >> 1;
      const bool ok = key < a.keys && (!limited[h] || key < a.limited_keys);
      s[j][e] = ok ? s[j][e] * a.scale_log2 : -INFINITY;
      mx[h] = fmaxf(mx[h], s[j][e]);
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
  }
  if (t == 0) {
    half_max[half * kScoreRows + r_lo] = mx[0];
    half_max[half * kScoreRows + r_lo + 8] = mx[1];
  }
  __syncthreads();
  float base[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(half_max[r_lo + 8 * h], half_max[kScoreRows + r_lo + 8 * h]);
    base[h] = mx[h] == -INFINITY ? 0.0f : mx[h];  // a row that sees no key here: P~ = 0
  }
  bf16* p0 = a.probs + static_cast<size_t>(row) * a.ld + key0 + keys32 + 2 * t;
  bf16* p1 = p0 + static_cast<size_t>(8) * a.ld;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 lo =
        __floats2bfloat162_rn(exp2f(s[j][0] - base[0]), exp2f(s[j][1] - base[0]));
    const __nv_bfloat162 hi =
        __floats2bfloat162_rn(exp2f(s[j][2] - base[1]), exp2f(s[j][3] - base[1]));
    // The sum of what the values kernel multiplies, so a row's weights add up to 1.
    sum[0] += __low2float(lo) + __high2float(lo);
    sum[1] += __low2float(hi) + __high2float(hi);
    *reinterpret_cast<__nv_bfloat162*>(p0 + j * 8) = lo;
    *reinterpret_cast<__nv_bfloat162*>(p1 + j * 8) = hi;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
    sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
  }
  if (t == 0) {
    half_sum[half * kScoreRows + r_lo] = sum[0];
    half_sum[half * kScoreRows + r_lo + 8] = sum[1];
  }
  __syncthreads();
  if (half == 0 && t == 0) {
    float2* st = a.stats + static_cast<size_t>(tile) * a.rows_padded + row;
    st[0] = make_float2(mx[0], half_sum[r_lo] + half_sum[kScoreRows + r_lo]);
    st[8] = make_float2(mx[1], half_sum[r_lo + 8] + half_sum[kScoreRows + r_lo + 8]);
  }
}

constexpr int kProbRowBytes = kKeys * 2 + 16;
constexpr int kValueRowBytes = kDims * 2 + 16;
constexpr int kStageBytes = kValueRows * kProbRowBytes + kKeys * kValueRowBytes;
constexpr int kStatsBytes = kMaxTiles * kValueRows * 8;
constexpr int kValuesSmemBytes =
    kStages * kStageBytes + kStatsBytes + kMaxTiles * kValueRows * 4 + kValueRows * kDims * 4;

// One (32 rows, 32 dims) block of O: each row's tile weights exp2(m_t - m) / l from the stats,
// then O = sum over tiles of weight_t * (P~_t V_t), the even tiles by warps 0-1 and the odd ones
// by warps 2-3, added at the end; the (P~, V) tiles stream through a ring of kStages.
template <int D>
__global__ void __launch_bounds__(kValueThreads) values_kernel(Args a) {
  wait_for_prior_grids();
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t ring = smem_u32(smem);
  auto* stats = reinterpret_cast<float2*>(smem + kStages * kStageBytes);  // [tile][row]
  float* weights = reinterpret_cast<float*>(smem + kStages * kStageBytes + kStatsBytes);
  float* odd_sum = weights + kMaxTiles * kValueRows;  // [row][dim]
  const int row0 = blockIdx.y * kValueRows, dim0 = blockIdx.x * kDims, tiles = a.tiles;

  auto load = [&](int tile) {
    const uint32_t ps = ring + (tile % kStages) * kStageBytes, vs = ps + kValueRows * kProbRowBytes;
    const bf16* prob_tile = a.probs + static_cast<size_t>(row0) * a.ld + tile * kKeys;
    for (int c = static_cast<int>(threadIdx.x); c < kValueRows * (kKeys / 8); c += kValueThreads) {
      const int r = c / (kKeys / 8), ch = c % (kKeys / 8);
      cp_async16(ps + r * kProbRowBytes + ch * 16,
                 prob_tile + static_cast<size_t>(r) * a.ld + ch * 8, true);
    }
    for (int c = static_cast<int>(threadIdx.x); c < kKeys * (kDims / 8); c += kValueThreads) {
      const int r = c / (kDims / 8), ch = c % (kDims / 8);
      const int key = tile * kKeys + r;
      // Keys past the end read as 0: their P~ is 0 too, and 0 * garbage could be NaN.
      cp_async16(vs + r * kValueRowBytes + ch * 16,
                 a.v + (key < a.keys ? static_cast<size_t>(key) * D + dim0 + ch * 8 : 0),
                 key < a.keys);
    }
  };
  // Group 0: every tile's statistics for these rows, and tile 0.
  for (int c = static_cast<int>(threadIdx.x); c < tiles * (kValueRows / 2); c += kValueThreads) {
    const int tl = c / (kValueRows / 2), pair = c % (kValueRows / 2);
    cp_async16(smem_u32(stats + tl * kValueRows + 2 * pair),
               a.stats + static_cast<size_t>(tl) * a.rows_padded + row0 + 2 * pair, true);
  }
  int issued = 0;
  for (; issued < tiles && issued < kStages; ++issued) {
    load(issued);
    cp_commit();
  }
  cp_wait_at_most<kStages>(issued - 1);
  __syncthreads();
  {
    // Four adjacent threads a row, each over every fourth tile.
    static_assert(kValueThreads == 4 * kValueRows, "four threads a row");
    const int r = static_cast<int>(threadIdx.x) >> 2, q = static_cast<int>(threadIdx.x) & 3;
    float m = -INFINITY;
    for (int tl = q; tl < tiles; tl += 4) m = fmaxf(m, stats[tl * kValueRows + r].x);
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    float l = 0.0f;
    for (int tl = q; tl < tiles; tl += 4) {
      const float2 x = stats[tl * kValueRows + r];
      const float w = exp2f(x.x - m);
      weights[tl * kValueRows + r] = w;
      l += x.y * w;
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int tl = q; tl < tiles; tl += 4) weights[tl * kValueRows + r] *= inv;
  }

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int t = lane & 3, rows16 = (warp & 1) * 16, parity = warp >> 1;
  const int r_lo = rows16 + (lane >> 2);
  float o[4][4];
#pragma unroll
  for (int n = 0; n < 4; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  for (int pair = 0; 2 * pair < tiles; ++pair) {
    const int needed = min(2 * pair + 2, tiles);
    cp_wait_at_most<kStages>(issued - needed);
    __syncthreads();  // the pair's tiles (and, the first time, the weights) are there for all
    const int tile = 2 * pair + parity;
    if (tile < tiles) {
      const uint32_t ps = ring + (tile % kStages) * kStageBytes,
                     vs = ps + kValueRows * kProbRowBytes;
      float acc[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4(af, ps + (rows16 + (lane & 15)) * kProbRowBytes + (kk * 2 + (lane >> 4)) * 16);
#pragma unroll
        for (int dn = 0; dn < kDims / 16; ++dn) {
          uint32_t b[4];
          const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
          ldsm_x4_t(b, vs + key * kValueRowBytes + (dn * 2 + (lane >> 4)) * 16);
          mma16816(acc[2 * dn], af, b[0], b[1]);
          mma16816(acc[2 * dn + 1], af, b[2], b[3]);
        }
      }
      const float w0 = weights[tile * kValueRows + r_lo],
                  w1 = weights[tile * kValueRows + r_lo + 8];
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        o[n][0] += w0 * acc[n][0];
        o[n][1] += w0 * acc[n][1];
        o[n][2] += w1 * acc[n][2];
        o[n][3] += w1 * acc[n][3];
      }
    }
    __syncthreads();  // the pair's stages are free to refill
    for (; issued < tiles && issued < needed + kStages; ++issued) {
      load(issued);
      cp_commit();
    }
  }
  if (parity == 1) {
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int col = n * 8 + 2 * t;
      odd_sum[r_lo * kDims + col] = o[n][0];
      odd_sum[r_lo * kDims + col + 1] = o[n][1];
      odd_sum[(r_lo + 8) * kDims + col] = o[n][2];
      odd_sum[(r_lo + 8) * kDims + col + 1] = o[n][3];
    }
  }
  __syncthreads();
  if (parity == 1) return;
  const int row = row0 + r_lo;
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int col = n * 8 + 2 * t;
    if (row < a.rows)
      *reinterpret_cast<uint32_t*>(a.out + static_cast<size_t>(row) * D + dim0 + col) = pack_bf16(
          o[n][0] + odd_sum[r_lo * kDims + col], o[n][1] + odd_sum[r_lo * kDims + col + 1]);
    if (row + 8 < a.rows)
      *reinterpret_cast<uint32_t*>(a.out + static_cast<size_t>(row + 8) * D + dim0 + col) =
          pack_bf16(o[n][2] + odd_sum[(r_lo + 8) * kDims + col],
                    o[n][3] + odd_sum[(r_lo + 8) * kDims + col + 1]);
  }
}

template <typename F>
void with_head_dim(int head_dim, F&& f) {
  using std::integral_constant;
  switch (head_dim) {
    case 32:
      f(integral_constant<int, 32>());
      break;
    case 64:
      f(integral_constant<int, 64>());
      break;
    case 128:
      f(integral_constant<int, 128>());
      break;
    default:
      f(integral_constant<int, 256>());
      break;
  }
}

template <int D>
void configure() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(scores_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    scores_smem_bytes<D>()));
    CUDA_CHECK(cudaFuncSetAttribute(values_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kValuesSmemBytes));
    return true;
  }();
  (void)configured;
}

Args args_for(const TiledAttentionShape& s, const Layout& l, const void* scratch) {
  PI0_CHECK(tiled_attention_supported(s), "tiled attention: unsupported shape");
  PI0_CHECK(scratch != nullptr && is_aligned(scratch, 256), "tiled attention: bad scratch");
  Args a{};
  auto* base = static_cast<unsigned char*>(const_cast<void*>(scratch));
  a.probs = reinterpret_cast<bf16*>(base);
  a.stats = reinterpret_cast<float2*>(base + l.probs_bytes);
  a.rows = s.rows;
  a.keys = s.keys;
  a.rows_padded = l.rows_padded;
  a.tiles = l.tiles;
  a.ld = l.ld;
  a.limited_rows = s.limited_rows;
  a.limited_keys = s.limited_keys;
  a.scale_log2 = s.scale * 1.4426950408889634f;
  return a;
}

// One pass: the arguments from the shape and the scratch, `bind` adds the pass's operands, and
// `launch(D, args, layout)` launches the kernel instantiated for the head dim.
template <typename Bind, typename Launch>
void run_pass(const TiledAttentionShape& s, const void* scratch, Bind&& bind, Launch&& launch) {
  const Layout l = layout_of(s);
  Args a = args_for(s, l, scratch);
  bind(a);
  with_head_dim(s.head_dim, [&](auto d) {
    configure<decltype(d)::value>();
    launch(d, a, l);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace

bool tiled_attention_supported(const TiledAttentionShape& s) {
  const bool dims = s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256;
  const bool mask = s.limited_rows <= 0 || (s.limited_keys >= 1 && s.limited_keys <= s.keys);
  return dims && mask && s.rows > 0 && s.keys > 0 && s.keys <= kTiledAttentionMaxKeys &&
         s.rows <= 65535 * kValueRows;
}

size_t tiled_attention_scratch_bytes(const TiledAttentionShape& s) {
  const Layout l = layout_of(s);
  return l.probs_bytes + l.stats_bytes;
}

void tiled_attention_scores(const TiledAttentionShape& s, const Bf16* q, const Bf16* k,
                            void* scratch, cudaStream_t stream) {
  PI0_CHECK(is_aligned(q, 16) && is_aligned(k, 16),
            "tiled attention: Q and K must be 16-byte aligned");
  run_pass(
      s, scratch,
      [&](Args& a) {
        a.q = reinterpret_cast<const bf16*>(q);
        a.k = reinterpret_cast<const bf16*>(k);
      },
      [&](auto d, const Args& a, const Layout& l) {
        constexpr int D = decltype(d)::value;
        scores_kernel<D><<<dim3(static_cast<unsigned>(l.tiles),
                                static_cast<unsigned>(l.rows_padded / kScoreRows)),
                           kScoreThreads, scores_smem_bytes<D>(), stream>>>(a);
      });
}

void tiled_attention_values(const TiledAttentionShape& s, const void* scratch, const Bf16* v,
                            Bf16* out, cudaStream_t stream) {
  PI0_CHECK(is_aligned(v, 16) && is_aligned(out, 4),
            "tiled attention: V must be 16-byte and the output 4-byte aligned");
  run_pass(
      s, scratch,
      [&](Args& a) {
        a.v = reinterpret_cast<const bf16*>(v);
        a.out = reinterpret_cast<bf16*>(out);
      },
      [&](auto d, const Args& a, const Layout& l) {
        constexpr int D = decltype(d)::value;
        values_kernel<D><<<dim3(static_cast<unsigned>(D / kDims),
                                static_cast<unsigned>(l.rows_padded / kValueRows)),
                           kValueThreads, kValuesSmemBytes, stream>>>(a);
      });
}

}  // namespace pi0::cuda
