#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/kernels.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // grid-stride beyond this: 31 blocks per SM is plenty
// Elementwise kernels take several 16-byte vectors a thread only from this many work items on
// (RoPE: pairs, GeGLU: outputs). Below it they are latency-bound, and more threads with less work
// each finish sooner (the decoder's RoPE, 82K pairs: 5.2 us a call with a pair a thread, 5.4 with
// four; its GeGLU, 262K outputs: 4.98 us with two a thread, 5.07 with eight).
constexpr size_t kVectorizeFrom = size_t{1} << 19;

const bf16* dev(const Bf16* p) {
  return reinterpret_cast<const bf16*>(p);
}
bf16* dev(Bf16* p) {
  return reinterpret_cast<bf16*>(p);
}

int grid_for(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<size_t>(1, std::min<size_t>(blocks, kMaxBlocks)));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Every thread gets the same total, summed in a fixed order (bitwise reproducible).
__device__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += smem[i];
  return total;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__global__ void bf16_to_f32_kernel(const bf16* in, float* out, size_t n) {
  wait_for_prior_grids();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, size_t n) {
  wait_for_prior_grids();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// One block per row; the row is re-read from L1/L2 for each pass rather than held in registers,
// which keeps one kernel for every width.
__global__ void layer_norm_kernel(const float* x, const bf16* weight, const bf16* bias, bf16* out,
                                  int width, float eps) {
  wait_for_prior_grids();
  __shared__ float smem[32];
  const float* row = x + static_cast<size_t>(blockIdx.x) * width;
  float s = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) s += row[i];
  const float mean = block_sum(s, smem) / width;
  float v = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float d = row[i] - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(block_sum(v, smem) / width + eps);
  bf16* o = out + static_cast<size_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x)
    o[i] = __float2bfloat16_rn((row[i] - mean) * rstd * __bfloat162float(weight[i]) +
                               __bfloat162float(bias[i]));
}

// RowRmsScale on the device: vec8 where every row can be read as 16-byte vectors (width % 8 == 0
// and x 16-byte aligned), decided on the host so that a configuration always sums the same way.
struct RowScale {
  const bf16* x;  // null: scale 1
  int width;
  float eps;
  bool vec8;
};

// Eight bf16 (one 16-byte load) as floats.
__device__ __forceinline__ void unpack8(const uint4 v, float* out) {
  const bf162* p = reinterpret_cast<const bf162*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(p[k]);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}

// rsqrt(mean(x[row]^2) + eps) for every thread of the block (all of them must call it), or 1.
__device__ float row_rms_scale(const RowScale& s, int row, float* smem) {
  if (!s.x) return 1.0f;
  const bf16* r = s.x + static_cast<size_t>(row) * s.width;
  float sum = 0.0f;
  if (s.vec8) {
    for (int i = 8 * static_cast<int>(threadIdx.x); i < s.width; i += 8 * blockDim.x) {
      float v[8];
      unpack8(*reinterpret_cast<const uint4*>(r + i), v);
#pragma unroll
      for (int k = 0; k < 4; ++k) sum += v[2 * k] * v[2 * k] + v[2 * k + 1] * v[2 * k + 1];
    }
  } else {
    for (int i = threadIdx.x; i < s.width; i += blockDim.x) {
      const float f = __bfloat162float(r[i]);
      sum += f * f;
    }
  }
  return rsqrtf(block_sum(sum, smem) / s.width + s.eps);
}

// Blocks of one row each: grid (rows, blocks per row), `threads` a block, for per_row items.
// Measured on an H100 (bench/NOTES.md v13): blocks of up to 512 or 1024 threads, or up to four
// items a thread, were no faster for pi0's RoPE and GeGLU.
struct RowGrid {
  dim3 grid;
  int threads;
};
RowGrid row_grid(int rows, size_t per_row) {
  const size_t blocks = std::max<size_t>(1, (per_row + kThreads - 1) / kThreads);
  const size_t per_block = (per_row + blocks - 1) / blocks;
  const int threads = static_cast<int>(std::max<size_t>(32, (per_block + 31) / 32 * 32));
  return {dim3(static_cast<unsigned>(rows), static_cast<unsigned>(blocks)), threads};
}

__global__ void rms_norm_bf16_kernel(const bf16* x, bf16* out, RowScale scale) {
  wait_for_prior_grids();
  __shared__ float smem[32];
  const float r = row_rms_scale(scale, blockIdx.x, smem);
  const size_t base = static_cast<size_t>(blockIdx.x) * scale.width;
  for (int i = threadIdx.x; i < scale.width; i += blockDim.x)
    out[base + i] = __float2bfloat16_rn(__bfloat162float(x[base + i]) * r);
}

__global__ void rms_norm_kernel(const float* x, bf16* out, int width, float eps) {
  wait_for_prior_grids();
  __shared__ float smem[32];
  const float* row = x + static_cast<size_t>(blockIdx.x) * width;
  float s = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) s += row[i] * row[i];
  const float scale = rsqrtf(block_sum(s, smem) / width + eps);
  bf16* o = out + static_cast<size_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = __float2bfloat16_rn(row[i] * scale);
}

// The same two norms with the row held in registers, kVec float4 per thread of kRowThreads: one
// read of the row, 16-byte loads and 8-byte stores. For widths that are multiples of 4 up to
// 4 * kVec * kRowThreads and 16-byte aligned rows, which all of pi0's are; the kernels above take
// the rest.
constexpr int kRowThreads = 128;

template <int kVec>
__device__ __forceinline__ void load_row(const float* x, int n4, float4 (&v)[kVec]) {
  const float4* row = reinterpret_cast<const float4*>(x) + static_cast<size_t>(blockIdx.x) * n4;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kRowThreads;
    v[j] = i < n4 ? row[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

__device__ __forceinline__ void store_bf16x4(bf16* dst, float a, float b, float c, float d) {
  const bf162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 packed;
  packed.x = *reinterpret_cast<const uint32_t*>(&lo);
  packed.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(dst) = packed;
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads)
    rms_norm_row_kernel(const float* x, bf16* out, int width, float eps) {
  wait_for_prior_grids();
  __shared__ float smem[32];
  const int n4 = width / 4;
  float4 v[kVec];
  load_row<kVec>(x, n4, v);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    s += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  const float scale = rsqrtf(block_sum(s, smem) / width + eps);
  bf16* o = out + static_cast<size_t>(blockIdx.x) * width;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kRowThreads;
    if (i < n4)
      store_bf16x4(o + 4 * i, v[j].x * scale, v[j].y * scale, v[j].z * scale, v[j].w * scale);
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_row_kernel(const float* x, const bf16* weight, const bf16* bias, bf16* out,
                          int width, float eps) {
  wait_for_prior_grids();
  __shared__ float smem[32];
  const int n4 = width / 4;
  float4 v[kVec];
  load_row<kVec>(x, n4, v);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) s += (v[j].x + v[j].y) + (v[j].z + v[j].w);
  const float mean = block_sum(s, smem) / width;
  float var = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kRowThreads;
    if (i >= n4) continue;
    const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
    var += (a * a + b * b) + (c * c + d * d);
  }
  const float rstd = rsqrtf(block_sum(var, smem) / width + eps);
  bf16* o = out + static_cast<size_t>(blockIdx.x) * width;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kRowThreads;
    if (i >= n4) continue;
    const bf162* w = reinterpret_cast<const bf162*>(weight + 4 * i);
    const bf162* b = reinterpret_cast<const bf162*>(bias + 4 * i);
    const float2 w0 = __bfloat1622float2(w[0]), w1 = __bfloat1622float2(w[1]);
    const float2 b0 = __bfloat1622float2(b[0]), b1 = __bfloat1622float2(b[1]);
    store_bf16x4(o + 4 * i, (v[j].x - mean) * rstd * w0.x + b0.x,
                 (v[j].y - mean) * rstd * w0.y + b0.y, (v[j].z - mean) * rstd * w1.x + b1.x,
                 (v[j].w - mean) * rstd * w1.y + b1.y);
  }
}

// float4 per thread the row kernels need for `width`; 0 where they do not apply. The choice (and
// so the last bits) depends on pointer alignment as well as the width: every engine buffer comes
// from 256-byte aligned allocations, so every process makes the same choice.
int row_vecs(const void* x, const void* out, int width) {
  if (width % 4 != 0 || !is_aligned(x, 16) || !is_aligned(out, 8)) return 0;
  const int per_thread = (width / 4 + kRowThreads - 1) / kRowThreads;
  for (int v : {1, 2, 4, 8})
    if (per_thread <= v) return v;
  return 0;
}

// Runs launch(std::integral_constant<int, vecs>()) for the row kernels' instantiations; false
// where vecs is none of them (0: the plain kernels).
template <typename Launch>
bool launch_row_kernel(int vecs, Launch&& launch) {
  switch (vecs) {
    case 1:
      launch(std::integral_constant<int, 1>());
      return true;
    case 2:
      launch(std::integral_constant<int, 2>());
      return true;
    case 4:
      launch(std::integral_constant<int, 4>());
      return true;
    case 8:
      launch(std::integral_constant<int, 8>());
      return true;
    default:
      return false;
  }
}

__global__ void extract_patches_kernel(const bf16* images, bf16* patches, int views, int image_size,
                                       int patch, int channels) {
  wait_for_prior_grids();
  const int side = image_size / patch;
  const int values = patch * patch * channels;
  const size_t n = static_cast<size_t>(views) * side * side * values;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const int value = static_cast<int>(i % values);
    const size_t token = i / values;
    const int view = static_cast<int>(token / (side * side));
    const int t = static_cast<int>(token % (side * side));
    const int pr = t / side, pc = t % side;
    const int ch = value % channels;
    const int c = (value / channels) % patch;
    const int r = value / (channels * patch);
    const size_t src =
        ((static_cast<size_t>(view) * image_size + pr * patch + r) * image_size + pc * patch + c) *
            channels +
        ch;
    patches[i] = images[src];
  }
}

__global__ void broadcast_rows_kernel(const bf16* table, int table_rows, const bf16* bias,
                                      float* out, int rows, int width) {
  wait_for_prior_grids();
  const size_t n = static_cast<size_t>(rows) * width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const int col = static_cast<int>(i % width);
    const int row = static_cast<int>(i / width);
    float v = __bfloat162float(table[static_cast<size_t>(row % table_rows) * width + col]);
    if (bias) v += __bfloat162float(bias[col]);
    out[i] = v;
  }
}

// kPairs interleaved pairs a thread: 1 (4-byte loads, any even head_dim) or 4 (one 16-byte load
// and store; head_dim % 8 == 0, every row 16-byte aligned). Each pair's angle is computed the same
// way in both, so without the folded norm they give the same bits; with it, the row's sum of
// squares is reduced over blocks of another size, so the last bits may differ (a configuration
// always takes the same one). Blocks of one row each (row_grid), so that a block can scale its row
// by the folded RMS norm; the first item's load is issued before that reduction.
template <int kPairs>
__global__ void rope_split_qkv_kernel(const bf16* qkv, int q_heads, int head_dim,
                                      int first_position, float log2_theta, bf16* q_out,
                                      bf16* k_out, bf16* v_out, RowScale scale) {
  wait_for_prior_grids();
  static_assert(kPairs == 1 || kPairs == 4, "a bf16 pair or a 16-byte vector a thread");
  using Vec = std::conditional_t<kPairs == 1, bf162, uint4>;
  __shared__ float smem[32];
  const int row = blockIdx.x;
  const int per_head = head_dim / (2 * kPairs);
  const int per_row = (q_heads + 2) * per_head;
  const int width = (q_heads + 2) * head_dim;
  const bf16* in_row = qkv + static_cast<size_t>(row) * width;
  auto load = [&](int j) {
    const int head = j / per_head, col = (j % per_head) * 2 * kPairs;
    return *reinterpret_cast<const Vec*>(in_row + head * head_dim + col);
  };
  const int first = blockIdx.y * blockDim.x + threadIdx.x;
  const Vec first_in = first < per_row ? load(first) : Vec{};
  const float r = row_rms_scale(scale, row, smem);
  const float position = static_cast<float>(first_position + row);
  for (int j = first; j < per_row; j += gridDim.y * blockDim.x) {
    const int head = j / per_head, col = (j % per_head) * 2 * kPairs;
    const Vec in = j == first ? first_in : load(j);
    const bf162* pairs = reinterpret_cast<const bf162*>(&in);
    Vec out;
    bf162* rotated = reinterpret_cast<bf162*>(&out);
    if (head == q_heads + 1) {
#pragma unroll
      for (int k = 0; k < kPairs; ++k)
        rotated[k] = __floats2bfloat162_rn(__low2float(pairs[k]) * r, __high2float(pairs[k]) * r);
      *reinterpret_cast<Vec*>(v_out + static_cast<size_t>(row) * head_dim + col) = out;
      continue;
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = col / 2 + k;
      const float x0 = __low2float(pairs[k]) * r, x1 = __high2float(pairs[k]) * r;
      // theta^(-2i/d) in fp32, angle reduced by sincosf's full-range reduction.
      const float inv_freq = exp2f(-(2.0f * i / head_dim) * log2_theta);
      float s, c;
      sincosf(position * inv_freq, &s, &c);
      rotated[k] = __floats2bfloat162_rn(x0 * c - x1 * s, x0 * s + x1 * c);
    }
    bf16* dst = head < q_heads
                    ? q_out + static_cast<size_t>(row) * q_heads * head_dim + head * head_dim
                    : k_out + static_cast<size_t>(row) * head_dim;
    *reinterpret_cast<Vec*>(dst + col) = out;
  }
}

// One warp per row; the row (at most a few thousand scores) is re-read from L2 per pass.
__global__ void softmax_rows_kernel(const float* scores, int ld_scores, bf16* probs, int ld_probs,
                                    int rows, int cols, int limited_rows, int limited_cols) {
  wait_for_prior_grids();
  const int warps = blockDim.x >> 5;
  const int row = blockIdx.x * warps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int valid = row < limited_rows ? limited_cols : cols;
  const float* s = scores + static_cast<size_t>(row) * ld_scores;
  float m = -INFINITY;
  for (int c = lane; c < valid; c += 32) m = fmaxf(m, s[c]);
  m = warp_max(m);
  float sum = 0.0f;
  for (int c = lane; c < valid; c += 32) sum += expf(s[c] - m);
  const float inv = 1.0f / warp_sum(sum);
  bf16* p = probs + static_cast<size_t>(row) * ld_probs;
  for (int c = lane; c < cols; c += 32)
    p[c] = __float2bfloat16_rn(c < valid ? expf(s[c] - m) * inv : 0.0f);
}

// The same with the row in registers: one warp per row, kVec float4 per lane, one read of the
// scores and one exp per score. For rows 16-byte aligned, with room in probs to store whole
// float4s past cols (zeros there).
template <int kVec>
__global__ void softmax_rows_reg_kernel(const float* scores, int ld_scores, bf16* probs,
                                        int ld_probs, int rows, int cols, int limited_rows,
                                        int limited_cols) {
  wait_for_prior_grids();
  const int warps = blockDim.x >> 5;
  const int row = blockIdx.x * warps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int valid = row < limited_rows ? limited_cols : cols;
  const float4* s = reinterpret_cast<const float4*>(scores + static_cast<size_t>(row) * ld_scores);
  const int quads = (cols + 3) / 4;
  float v[kVec][4];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int q = lane + 32 * j;
    const float4 x = q < quads ? s[q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    v[j][0] = 4 * q + 0 < valid ? x.x : -INFINITY;
    v[j][1] = 4 * q + 1 < valid ? x.y : -INFINITY;
    v[j][2] = 4 * q + 2 < valid ? x.z : -INFINITY;
    v[j][3] = 4 * q + 3 < valid ? x.w : -INFINITY;
#pragma unroll
    for (int e = 0; e < 4; ++e) m = fmaxf(m, v[j][e]);
  }
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[j][e] = v[j][e] == -INFINITY ? 0.0f : expf(v[j][e] - m);
      sum += v[j][e];
    }
  const float inv = 1.0f / warp_sum(sum);
  bf16* p = probs + static_cast<size_t>(row) * ld_probs;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int q = lane + 32 * j;
    if (q < quads)
      store_bf16x4(p + 4 * q, v[j][0] * inv, v[j][1] * inv, v[j][2] * inv, v[j][3] * inv);
  }
}

// kCols columns a thread: 8 (16-byte loads of gate and up, one 16-byte store; width % 8 == 0,
// rows 16-byte aligned), 2 (width even) or 1. Blocks of one row each (row_grid), so that a block
// can scale its row by the folded RMS norm: gelu_tanh(r * gate) * (r * up).
template <int kCols>
__global__ void geglu_kernel(const bf16* gate_up, bf16* out, int width, RowScale scale) {
  wait_for_prior_grids();
  using Vec = std::conditional_t<kCols == 8, uint4, std::conditional_t<kCols == 2, bf162, bf16>>;
  static_assert(sizeof(Vec) == kCols * sizeof(bf16), "kCols bf16 a vector");
  __shared__ float smem[32];
  const int row = blockIdx.x;
  const int per_row = width / kCols;
  const bf16* g_row = gate_up + static_cast<size_t>(row) * 2 * width;
  const int first = blockIdx.y * blockDim.x + threadIdx.x;
  Vec first_g{}, first_u{};
  if (first < per_row) {
    first_g = *reinterpret_cast<const Vec*>(g_row + first * kCols);
    first_u = *reinterpret_cast<const Vec*>(g_row + width + first * kCols);
  }
  const float r = row_rms_scale(scale, row, smem);
  for (int j = first; j < per_row; j += gridDim.y * blockDim.x) {
    const Vec gv = j == first ? first_g : *reinterpret_cast<const Vec*>(g_row + j * kCols);
    const Vec uv = j == first ? first_u : *reinterpret_cast<const Vec*>(g_row + width + j * kCols);
    const bf16* g = reinterpret_cast<const bf16*>(&gv);
    const bf16* u = reinterpret_cast<const bf16*>(&uv);
    Vec ov;
    bf16* o = reinterpret_cast<bf16*>(&ov);
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      o[k] =
          __float2bfloat16_rn(gelu_tanh(__bfloat162float(g[k]) * r) * (__bfloat162float(u[k]) * r));
    *reinterpret_cast<Vec*>(out + static_cast<size_t>(row) * width + j * kCols) = ov;
  }
}

__global__ void silu_kernel(bf16* x, size_t n) {
  wait_for_prior_grids();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const float v = __bfloat162float(x[i]);
    x[i] = __float2bfloat16_rn(v / (1.0f + expf(-v)));
  }
}

constexpr int kGlueThreads = 256;
constexpr int kGlueWarps = kGlueThreads / 32;
constexpr int kGlueMaxDim = 32;
constexpr int kGlueMaxWidth = 2048;
constexpr int kGlueBatch = 16;  // weight loads a thread keeps in flight
// One action row a block (63 blocks at V=2): with four rows (16 blocks) each block's chain of
// phases made the kernel as slow as the six graph nodes it replaces. H100, V=2, decoder: one row
// 7.71-7.74 ms and two 7.77 against 7.79-7.81 for the six nodes on one machine; four 7.85
// against 7.76 on another (bench/NOTES.md v24).
constexpr int kGlueRowsPerBlock = 1;
// The launch's dynamic shared memory (the larger of the Euler update's rows and partial sums and
// the action input's partial sums, at most 2048 floats a row) stays under the 48 KB default.
static_assert(kGlueRowsPerBlock * (kGlueMaxWidth + kGlueWarps * kGlueMaxDim) * sizeof(float) <=
                  48 * 1024,
              "flow_step_glue's shared memory needs no opt-in");

struct GlueArgs {
  bf16* x;
  const bf16* state;
  float* actions;
  const bf16* w_out;
  const float* b_out;
  const bf16* w_in;
  const bf16* time_bias;
  bf16* t1;
  int frames, chunk, rows_per_frame, width, action_dim, in_parts;
  float eps;
};

__device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// See FlowStepGlue. A block takes kGlueRows action rows. Euler: the rows are normalised into
// shared memory, and thread t sums input rows t / (D / 8) + i * 256 / (D / 8), i = 0, 1, ...,
// against output octet t % (D / 8) of w_out; lanes then warps are summed in a fixed order. Action
// input: thread t takes width octet t % (W / 8) over one of in_parts equal ranges of the D inputs,
// and the ranges are summed in order. Both products' first kGlueBatch weight loads a thread are
// issued before anything else, so the block waits for memory once (the weights are rarely in L2
// here: the layers stream theirs through it between two calls).
template <int kGlueRows>
__global__ void __launch_bounds__(kGlueThreads) flow_step_glue_kernel(const GlueArgs a) {
  wait_for_prior_grids();
  static_assert(kGlueRows * kGlueMaxDim <= kGlueThreads,
                "one thread per row and output of the Euler update");
  extern __shared__ float glue_smem[];
  __shared__ float ss_part[kGlueWarps][kGlueRows];
  __shared__ float act[kGlueRows][kGlueMaxDim];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int width = a.width, ad = a.action_dim, octets = width / 8;
  const int total = a.frames * a.chunk, g0 = blockIdx.x * kGlueRows;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  const int out_octets = ad / 8;  // 1, 2 or 4: divides 32
  const int jq = tid % out_octets, parts = kGlueThreads / out_octets, e0 = tid / out_octets;
  auto w_out_at = [&](int e) {
    return *reinterpret_cast<const uint4*>(a.w_out + static_cast<size_t>(e) * ad + 8 * jq);
  };
  uint4 wo[kGlueBatch];
  if (a.w_out) {
#pragma unroll
    for (int b = 0; b < kGlueBatch; ++b) {
      const int e = e0 + b * parts;
      wo[b] = e < width ? w_out_at(e) : zero;
    }
  }
  const int per_part = ad / a.in_parts, jp = tid / octets, oi = tid % octets;
  const bool in_thread = a.w_in && tid < a.in_parts * octets;
  auto w_in_at = [&](int j) {
    return *reinterpret_cast<const uint4*>(a.w_in + static_cast<size_t>(j) * width + 8 * oi);
  };
  uint4 wi[kGlueBatch];
  if (in_thread) {
#pragma unroll
    for (int b = 0; b < kGlueBatch; ++b) wi[b] = b < per_part ? w_in_at(jp * per_part + b) : zero;
  }

  if (a.state && blockIdx.x == 0) {
    for (int i = tid; i < a.frames * octets; i += kGlueThreads) {
      const int f = i / octets, o = i % octets;
      reinterpret_cast<uint4*>(a.x + static_cast<size_t>(f) * a.rows_per_frame * width)[o] =
          reinterpret_cast<const uint4*>(a.state + static_cast<size_t>(f) * width)[o];
    }
  }

  if (a.w_out) {
    float* h = glue_smem;  // [kGlueRows][width]
    float ss[kGlueRows];
    uint4 first[kGlueRows];
    // Action row g of the pass: row 1 + g % chunk of its frame, after the state token.
    auto action_row = [&](int g) {
      return reinterpret_cast<const uint4*>(
          a.x + (static_cast<size_t>(g / a.chunk) * a.rows_per_frame + 1 + g % a.chunk) * width);
    };
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r) {
      const int g = g0 + r;
      first[r] = g < total && tid < octets ? action_row(g)[tid] : zero;
    }
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r) {
      ss[r] = 0.0f;
      const int g = g0 + r;
      if (g >= total) continue;
      const uint4* row = action_row(g);
      for (int o = tid; o < octets; o += kGlueThreads) {
        float v[8];
        unpack8(o == tid ? first[r] : row[o], v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          h[r * width + 8 * o + k] = v[k];
          ss[r] += v[k] * v[k];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r) {
      const float w = warp_sum(ss[r]);
      if (lane == 0) ss_part[warp][r] = w;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < kGlueWarps; ++w) t += ss_part[w][r];
      const float scale = rsqrtf(t / width + a.eps);
      for (int o = tid; o < octets; o += kGlueThreads)
#pragma unroll
        for (int k = 0; k < 8; ++k)
          h[r * width + 8 * o + k] = round_bf16(h[r * width + 8 * o + k] * scale);
    }
    __syncthreads();
    float acc[kGlueRows][8];
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r)
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[r][k] = 0.0f;
    for (int base = 0; e0 + base * parts < width; base += kGlueBatch) {
      if (base > 0) {
#pragma unroll
        for (int b = 0; b < kGlueBatch; ++b) {
          const int e = e0 + (base + b) * parts;
          wo[b] = e < width ? w_out_at(e) : zero;
        }
      }
#pragma unroll
      for (int b = 0; b < kGlueBatch; ++b) {
        const int e = e0 + (base + b) * parts;
        if (e >= width) break;
        float w8[8];
        unpack8(wo[b], w8);
#pragma unroll
        for (int r = 0; r < kGlueRows; ++r) {
          const float hv = h[r * width + e];
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[r][k] += hv * w8[k];
        }
      }
    }
    for (int m = out_octets; m < 32; m <<= 1)
#pragma unroll
      for (int r = 0; r < kGlueRows; ++r)
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[r][k] += __shfl_xor_sync(0xffffffffu, acc[r][k], m);
    float* red = glue_smem + kGlueRows * width;  // [kGlueWarps][kGlueRows][kGlueMaxDim]
    if (lane < out_octets)
#pragma unroll
      for (int r = 0; r < kGlueRows; ++r)
#pragma unroll
        for (int k = 0; k < 8; ++k)
          red[(warp * kGlueRows + r) * kGlueMaxDim + 8 * jq + k] = acc[r][k];
    __syncthreads();
    if (tid < kGlueRows * ad) {
      const int r = tid / ad, j = tid % ad, g = g0 + r;
      if (g < total) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kGlueWarps; ++w) sum += red[(w * kGlueRows + r) * kGlueMaxDim + j];
        float* p = a.actions + static_cast<size_t>(g) * ad + j;
        const float v = *p + (sum + a.b_out[j]);
        *p = v;
        act[r][j] = v;
      }
    }
  } else if (tid < kGlueRows * ad) {
    const int r = tid / ad, j = tid % ad, g = g0 + r;
    if (g < total) act[r][j] = a.actions[static_cast<size_t>(g) * ad + j];
  }
  if (!a.w_in) return;
  __syncthreads();  // act written; h (under part) no longer read

  float* part = glue_smem;  // [in_parts][kGlueRows][width]
  if (in_thread) {
    float acc[kGlueRows][8];
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r)
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[r][k] = 0.0f;
    for (int base = 0; base < per_part; base += kGlueBatch) {
      if (base > 0) {
#pragma unroll
        for (int b = 0; b < kGlueBatch; ++b)
          wi[b] = base + b < per_part ? w_in_at(jp * per_part + base + b) : zero;
      }
#pragma unroll
      for (int b = 0; b < kGlueBatch; ++b) {
        if (base + b >= per_part) break;
        const int j = jp * per_part + base + b;
        float w8[8];
        unpack8(wi[b], w8);
#pragma unroll
        for (int r = 0; r < kGlueRows; ++r) {
          const float sv = round_bf16(act[r][j]);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[r][k] += sv * w8[k];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGlueRows; ++r)
#pragma unroll
      for (int k = 0; k < 8; ++k) part[(jp * kGlueRows + r) * width + 8 * oi + k] = acc[r][k];
  }
  __syncthreads();
  for (int idx = tid; idx < kGlueRows * octets; idx += kGlueThreads) {
    const int r = idx / octets, o = idx % octets, g = g0 + r;
    if (g >= total) continue;
    float tb[8];
    unpack8(reinterpret_cast<const uint4*>(a.time_bias)[o], tb);
    uint4 packed;
    bf162* out2 = reinterpret_cast<bf162*>(&packed);
    float y[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float s = 0.0f;
      for (int p = 0; p < a.in_parts; ++p) s += part[(p * kGlueRows + r) * width + 8 * o + k];
      const float v = round_bf16(s + tb[k]);
      y[k] = v / (1.0f + expf(-v));
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) out2[k] = __floats2bfloat162_rn(y[2 * k], y[2 * k + 1]);
    reinterpret_cast<uint4*>(a.t1 + static_cast<size_t>(g) * width)[o] = packed;
  }
}

__device__ __forceinline__ float hash_uniform(uint64_t seed, size_t i) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

__global__ void fill_bf16_kernel(bf16* out, size_t n, uint64_t seed, float scale) {
  wait_for_prior_grids();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(scale * hash_uniform(seed, i));
}

__global__ void fill_f32_kernel(float* out, size_t n, uint64_t seed, float scale) {
  wait_for_prior_grids();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = scale * hash_uniform(seed, i);
}

}  // namespace

void bf16_to_f32(const Bf16* in, float* out, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(in), out, n);
  CUDA_CHECK_LAUNCH();
}

void f32_to_bf16(const float* in, Bf16* out, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(in, dev(out), n);
  CUDA_CHECK_LAUNCH();
}

void layer_norm(const float* x, const Bf16* weight, const Bf16* bias, Bf16* out, int rows,
                int width, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  const bool params_aligned = is_aligned(weight, 8) && is_aligned(bias, 8);
  const bool in_registers =
      launch_row_kernel(params_aligned ? row_vecs(x, out, width) : 0, [&](auto vecs) {
        layer_norm_row_kernel<decltype(vecs)::value>
            <<<rows, kRowThreads, 0, stream>>>(x, dev(weight), dev(bias), dev(out), width, eps);
      });
  if (!in_registers)
    layer_norm_kernel<<<rows, kThreads, 0, stream>>>(x, dev(weight), dev(bias), dev(out), width,
                                                     eps);
  CUDA_CHECK_LAUNCH();
}

void rms_norm(const float* x, Bf16* out, int rows, int width, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  const bool in_registers = launch_row_kernel(row_vecs(x, out, width), [&](auto vecs) {
    rms_norm_row_kernel<decltype(vecs)::value>
        <<<rows, kRowThreads, 0, stream>>>(x, dev(out), width, eps);
  });
  if (!in_registers) rms_norm_kernel<<<rows, kThreads, 0, stream>>>(x, dev(out), width, eps);
  CUDA_CHECK_LAUNCH();
}

void extract_patches(const Bf16* images, Bf16* patches, int views, int image_size, int patch_size,
                     int channels, cudaStream_t stream) {
  const int side = image_size / patch_size;
  const size_t n = static_cast<size_t>(views) * side * side * patch_size * patch_size * channels;
  extract_patches_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(images), dev(patches), views,
                                                               image_size, patch_size, channels);
  CUDA_CHECK_LAUNCH();
}

void broadcast_rows(const Bf16* table, int table_rows, const Bf16* bias, float* out, int rows,
                    int width, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(rows) * width;
  if (n == 0) return;
  broadcast_rows_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(table), table_rows, dev(bias),
                                                              out, rows, width);
  CUDA_CHECK_LAUNCH();
}

namespace {

RowScale device_scale(const RowRmsScale& s, int rows, const char* who) {
  if (!s.x) return RowScale{nullptr, 0, 0.0f, false};
  PI0_CHECK(s.width > 0 && rows >= 0, std::string(who) + ": the RMS scale needs a positive width");
  return RowScale{dev(s.x), s.width, s.eps, s.width % 8 == 0 && is_aligned(s.x, 16)};
}

}  // namespace

void rms_norm(const Bf16* x, Bf16* out, int rows, int width, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  const RowScale scale = device_scale(RowRmsScale{x, width, eps}, rows, "rms_norm");
  rms_norm_bf16_kernel<<<rows, kRowThreads, 0, stream>>>(dev(x), dev(out), scale);
  CUDA_CHECK_LAUNCH();
}

void rope_split_qkv(const Bf16* qkv, int rows, int q_heads, int head_dim, int first_position,
                    float theta, Bf16* q_out, Bf16* k_out, Bf16* v_out, cudaStream_t stream,
                    const RowRmsScale& rms) {
  PI0_CHECK(head_dim % 2 == 0, "rope_split_qkv: head_dim must be even");
  const size_t n = static_cast<size_t>(rows) * (q_heads + 2) * (head_dim / 2);
  if (n == 0) return;
  const RowScale scale = device_scale(rms, rows, "rope_split_qkv");
  const bool x4 = n >= kVectorizeFrom && head_dim % 8 == 0 && is_aligned(qkv, 16) &&
                  is_aligned(q_out, 16) && is_aligned(k_out, 16) && is_aligned(v_out, 16);
  const int pairs = x4 ? 4 : 1;
  auto kernel = x4 ? rope_split_qkv_kernel<4> : rope_split_qkv_kernel<1>;
  const RowGrid g = row_grid(rows, n / rows / pairs);
  kernel<<<g.grid, g.threads, 0, stream>>>(dev(qkv), q_heads, head_dim, first_position,
                                           std::log2(theta), dev(q_out), dev(k_out), dev(v_out),
                                           scale);
  CUDA_CHECK_LAUNCH();
}

void softmax_rows(const float* scores, int ld_scores, Bf16* probs, int ld_probs, int rows, int cols,
                  int limited_rows, int limited_cols, cudaStream_t stream) {
  if (rows == 0) return;
  PI0_CHECK(limited_rows <= 0 || (limited_cols >= 1 && limited_cols <= cols),
            "softmax_rows: limited_cols out of range");
  constexpr int kWarps = kThreads / 32;
  const int blocks = (rows + kWarps - 1) / kWarps;
  const int quads = (cols + 3) / 4;
  const bool fits = ld_scores % 4 == 0 && ld_probs % 4 == 0 && ld_probs >= 4 * quads &&
                    is_aligned(scores, 16) && is_aligned(probs, 8);
  const int per_lane = (quads + 31) / 32;
  if (fits && per_lane <= 2) {
    softmax_rows_reg_kernel<2><<<blocks, kThreads, 0, stream>>>(
        scores, ld_scores, dev(probs), ld_probs, rows, cols, limited_rows, limited_cols);
  } else if (fits && per_lane <= 5) {
    softmax_rows_reg_kernel<5><<<blocks, kThreads, 0, stream>>>(
        scores, ld_scores, dev(probs), ld_probs, rows, cols, limited_rows, limited_cols);
  } else if (fits && per_lane <= 8) {
    softmax_rows_reg_kernel<8><<<blocks, kThreads, 0, stream>>>(
        scores, ld_scores, dev(probs), ld_probs, rows, cols, limited_rows, limited_cols);
  } else {
    softmax_rows_kernel<<<blocks, kThreads, 0, stream>>>(scores, ld_scores, dev(probs), ld_probs,
                                                         rows, cols, limited_rows, limited_cols);
  }
  CUDA_CHECK_LAUNCH();
}

void geglu(const Bf16* gate_up, Bf16* out, int rows, int width, cudaStream_t stream,
           const RowRmsScale& rms) {
  const size_t n = static_cast<size_t>(rows) * width;
  if (n == 0) return;
  const RowScale scale = device_scale(rms, rows, "geglu");
  const bool x8 =
      n >= kVectorizeFrom && width % 8 == 0 && is_aligned(gate_up, 16) && is_aligned(out, 16);
  const int cols = x8 ? 8 : width % 2 == 0 && is_aligned(gate_up, 4) && is_aligned(out, 4) ? 2 : 1;
  const RowGrid g = row_grid(rows, static_cast<size_t>(width / cols));
  auto kernel = cols == 8 ? geglu_kernel<8> : cols == 2 ? geglu_kernel<2> : geglu_kernel<1>;
  kernel<<<g.grid, g.threads, 0, stream>>>(dev(gate_up), dev(out), width, scale);
  CUDA_CHECK_LAUNCH();
}

bool flow_step_glue_supported(int width, int action_dim) {
  return width > 0 && width % 8 == 0 && width <= kGlueMaxWidth &&
         (action_dim == 8 || action_dim == 16 || action_dim == 32);
}

void flow_step_glue(const FlowStepGlue& g, cudaStream_t stream) {
  PI0_CHECK(flow_step_glue_supported(g.width, g.action_dim),
            "flow_step_glue: width " + std::to_string(g.width) + " / action_dim " +
                std::to_string(g.action_dim) + " not supported");
  PI0_CHECK(g.x && g.actions, "flow_step_glue: null residual stream or sample");
  PI0_CHECK(g.frames > 0 && g.chunk > 0,
            "flow_step_glue: " + std::to_string(g.frames) + " frames of " +
                std::to_string(g.chunk) + " action rows");
  PI0_CHECK(g.rows_per_frame == g.chunk + 1,
            "flow_step_glue: " + std::to_string(g.rows_per_frame) +
                " rows a frame, expected the state token and " + std::to_string(g.chunk) +
                " action rows");
  PI0_CHECK(!g.w_out || g.b_out, "flow_step_glue: the Euler update needs b_out");
  PI0_CHECK(!g.w_in || (g.time_bias && g.t1), "flow_step_glue: the action input needs its buffers");
  PI0_CHECK(is_aligned(g.x, 16) && is_aligned(g.state, 16) && is_aligned(g.w_out, 16) &&
                is_aligned(g.w_in, 16) && is_aligned(g.time_bias, 16) && is_aligned(g.t1, 16),
            "flow_step_glue: bf16 buffers must be 16-byte aligned");
  const int octets = g.width / 8;
  // The largest power of two of input ranges that keeps every range's octets on a thread.
  int in_parts = 1;
  while (in_parts * 2 <= g.action_dim && in_parts * 2 * octets <= kGlueThreads) in_parts *= 2;
  GlueArgs a{dev(g.x),     dev(g.state),     g.actions, dev(g.w_out), g.b_out,
             dev(g.w_in),  dev(g.time_bias), dev(g.t1), g.frames,     g.chunk,
             g.rows_per_frame, g.width,      g.action_dim, in_parts,  g.eps};
  constexpr int rows = kGlueRowsPerBlock;
  const size_t euler_bytes =
      (static_cast<size_t>(rows) * g.width + kGlueWarps * rows * kGlueMaxDim) * sizeof(float);
  const size_t input_bytes = static_cast<size_t>(in_parts) * rows * g.width * sizeof(float);
  const size_t smem = std::max(euler_bytes, input_bytes);
  const int blocks = (g.frames * g.chunk + rows - 1) / rows;
  flow_step_glue_kernel<rows><<<blocks, kGlueThreads, smem, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

void silu_inplace(Bf16* x, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  silu_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(x), n);
  CUDA_CHECK_LAUNCH();
}

void fill_random(Bf16* out, size_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n == 0) return;
  fill_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(out), n, seed, scale);
  CUDA_CHECK_LAUNCH();
}

void fill_random(float* out, size_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n == 0) return;
  fill_f32_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n, seed, scale);
  CUDA_CHECK_LAUNCH();
}

bool our_kernels_wait_for_prior_grids() {
  // Every .cu file of ours is compiled for the same architectures; the PTX version of one kernel
  // says whether wait_for_prior_grids() was compiled in (__CUDA_ARCH__ >= 900).
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, silu_kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.ptxVersion >= 90;
}

}  // namespace pi0::cuda
