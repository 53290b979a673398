#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/kernels.hpp"

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
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// One block per row; the row is re-read from L1/L2 for each pass rather than held in registers,
// which keeps one kernel for every width.
__global__ void layer_norm_kernel(const float* x, const bf16* weight, const bf16* bias, bf16* out,
                                  int width, float eps) {
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

__global__ void rms_norm_kernel(const float* x, bf16* out, int width, float eps) {
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
// way in both, so they give the same bits.
template <int kPairs>
__global__ void rope_split_qkv_kernel(const bf16* qkv, int rows, int q_heads, int head_dim,
                                      int first_position, float log2_theta, bf16* q_out,
                                      bf16* k_out, bf16* v_out) {
  static_assert(kPairs == 1 || kPairs == 4, "a bf16 pair or a 16-byte vector a thread");
  using Vec = std::conditional_t<kPairs == 1, bf162, uint4>;
  const int per_head = head_dim / (2 * kPairs);
  const int per_row = (q_heads + 2) * per_head;
  const size_t n = static_cast<size_t>(rows) * per_row;
  const int width = (q_heads + 2) * head_dim;
  for (size_t idx = blockIdx.x * size_t{blockDim.x} + threadIdx.x; idx < n;
       idx += size_t{gridDim.x} * blockDim.x) {
    const int row = static_cast<int>(idx / per_row);
    const int j = static_cast<int>(idx % per_row);
    const int head = j / per_head, col = (j % per_head) * 2 * kPairs;
    const Vec in = *reinterpret_cast<const Vec*>(qkv + static_cast<size_t>(row) * width +
                                                 head * head_dim + col);
    if (head == q_heads + 1) {
      *reinterpret_cast<Vec*>(v_out + static_cast<size_t>(row) * head_dim + col) = in;
      continue;
    }
    const bf162* pairs = reinterpret_cast<const bf162*>(&in);
    Vec out;
    bf162* rotated = reinterpret_cast<bf162*>(&out);
    const float position = static_cast<float>(first_position + row);
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = col / 2 + k;
      const float x0 = __low2float(pairs[k]), x1 = __high2float(pairs[k]);
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

// Eight columns a thread: 16-byte loads of gate and up, one 16-byte store (width % 8 == 0, rows
// 16-byte aligned).
__global__ void geglu_x8_kernel(const bf16* gate_up, bf16* out, int rows, int width) {
  const int eighths = width / 8;
  const size_t n = static_cast<size_t>(rows) * eighths;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t row = i / eighths;
    const int col = static_cast<int>(i % eighths) * 8;
    const bf16* g = gate_up + row * 2 * width + col;
    const uint4 gv = *reinterpret_cast<const uint4*>(g);
    const uint4 uv = *reinterpret_cast<const uint4*>(g + width);
    const bf162* gp = reinterpret_cast<const bf162*>(&gv);
    const bf162* up = reinterpret_cast<const bf162*>(&uv);
    uint4 ov;
    bf162* op = reinterpret_cast<bf162*>(&ov);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      op[k] = __floats2bfloat162_rn(gelu_tanh(__low2float(gp[k])) * __low2float(up[k]),
                                    gelu_tanh(__high2float(gp[k])) * __high2float(up[k]));
    *reinterpret_cast<uint4*>(out + row * width + col) = ov;
  }
}

__global__ void geglu_kernel(const bf16* gate_up, bf16* out, int rows, int width) {
  const int half_width = width / 2;  // in bf16 pairs
  const size_t n = static_cast<size_t>(rows) * half_width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t row = i / half_width;
    const int col = static_cast<int>(i % half_width) * 2;
    const bf16* g = gate_up + row * 2 * width;
    const bf162 gv = *reinterpret_cast<const bf162*>(g + col);
    const bf162 uv = *reinterpret_cast<const bf162*>(g + width + col);
    *reinterpret_cast<bf162*>(out + row * width + col) =
        __floats2bfloat162_rn(gelu_tanh(__low2float(gv)) * __low2float(uv),
                              gelu_tanh(__high2float(gv)) * __high2float(uv));
  }
}

__global__ void geglu_scalar_kernel(const bf16* gate_up, bf16* out, int rows, int width) {
  const size_t n = static_cast<size_t>(rows) * width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t row = i / width;
    const int col = static_cast<int>(i % width);
    const float g = __bfloat162float(gate_up[row * 2 * width + col]);
    const float u = __bfloat162float(gate_up[row * 2 * width + width + col]);
    out[i] = __float2bfloat16_rn(gelu_tanh(g) * u);
  }
}

__global__ void silu_kernel(bf16* x, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const float v = __bfloat162float(x[i]);
    x[i] = __float2bfloat16_rn(v / (1.0f + expf(-v)));
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
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(scale * hash_uniform(seed, i));
}

__global__ void fill_f32_kernel(float* out, size_t n, uint64_t seed, float scale) {
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

void rope_split_qkv(const Bf16* qkv, int rows, int q_heads, int head_dim, int first_position,
                    float theta, Bf16* q_out, Bf16* k_out, Bf16* v_out, cudaStream_t stream) {
  PI0_CHECK(head_dim % 2 == 0, "rope_split_qkv: head_dim must be even");
  const size_t n = static_cast<size_t>(rows) * (q_heads + 2) * (head_dim / 2);
  if (n == 0) return;
  const bool x4 = n >= kVectorizeFrom && head_dim % 8 == 0 && is_aligned(qkv, 16) &&
                  is_aligned(q_out, 16) && is_aligned(k_out, 16) && is_aligned(v_out, 16);
  const int pairs = x4 ? 4 : 1;
  auto kernel = x4 ? rope_split_qkv_kernel<4> : rope_split_qkv_kernel<1>;
  kernel<<<grid_for(n / pairs), kThreads, 0, stream>>>(dev(qkv), rows, q_heads, head_dim,
                                                       first_position, std::log2(theta), dev(q_out),
                                                       dev(k_out), dev(v_out));
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

void geglu(const Bf16* gate_up, Bf16* out, int rows, int width, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(rows) * width;
  if (n == 0) return;
  const bool x8 =
      n >= kVectorizeFrom && width % 8 == 0 && is_aligned(gate_up, 16) && is_aligned(out, 16);
  if (x8) {
    geglu_x8_kernel<<<grid_for(n / 8), kThreads, 0, stream>>>(dev(gate_up), dev(out), rows, width);
  } else if (width % 2 == 0) {
    geglu_kernel<<<grid_for(n / 2), kThreads, 0, stream>>>(dev(gate_up), dev(out), rows, width);
  } else {
    geglu_scalar_kernel<<<grid_for(n), kThreads, 0, stream>>>(dev(gate_up), dev(out), rows, width);
  }
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

}  // namespace pi0::cuda
