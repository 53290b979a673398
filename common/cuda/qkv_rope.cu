// The decoder's qkv product, folded RMS norm, RoPE and Q/K/V split in one kernel (see
// pi0/cuda/qkv_rope.hpp). Shared memory holds every 64-deep block of X ([64 rows][64 k]) and of
// this CTA's 32 rows of W^T ([32][64 k]) in the 128-byte-swizzle layout wgmma reads through
// descriptors, which is the layout the TMA writes a 64-wide box in with SWIZZLE_128B. One thread
// issues every block as a tensor-map copy, W's before the wait for the kernel before and X's after
// it, W block b and X block b completing on barrier b; block b's four wgmma.m64n32k16 start as soon
// as it has landed, while the CUDA cores sum the squares of its X rows for the norm. The epilogue
// scales, rotates and stores from the accumulators: a thread's accumulator pairs are adjacent
// columns, i.e. RoPE's interleaved pairs.
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "pi0/cuda/driver_entry.hpp"
#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/qkv_rope.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;

constexpr int kThreads = 128;
constexpr int kRows = 64;
constexpr int kCols = 32;
constexpr int kBK = 64;
constexpr int kMaxK = 1024;
constexpr int kMaxBlocks = kMaxK / kBK;
constexpr uint32_t kXBlockBytes = kRows * kBK * 2;
constexpr uint32_t kWBlockBytes = kCols * kBK * 2;
constexpr int kSmemBytes = kMaxBlocks * (kXBlockBytes + kWBlockBytes + 8) + 1024;

// Passed __grid_constant__: the TMA copies take the tensor maps' addresses in parameter space.
struct Args {
  CUtensorMap x_map;  // X [rows][k], boxes of 64 rows x 64 k (rows past `rows` read as zeros)
  CUtensorMap w_map;  // W^T [n][k], boxes of 32 rows x 64 k
  bf16 *q, *k, *v;
  int rows, kdim, q_heads, head_dim, first_position;
  float log2_theta, eps;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void bar_init(uint32_t b) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b) : "memory");
}
__device__ __forceinline__ void bar_expect(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(b),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void load_box(uint32_t dst, const CUtensorMap& map, int c0, int c1,
                                         uint32_t b) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(b)
      : "memory");
}
// D[64 x 32] += A[64 x 16] @ B[16 x 32], both K-major.
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b));
}

// Dynamic shared memory: W^T's blocks, then X's, 1024-byte aligned as the 128-byte swizzle needs,
// then a barrier a block.
struct Layout {
  uint32_t ws, xs, bars;
  __device__ uint32_t bar(int b) const { return bars + 8u * static_cast<uint32_t>(b); }
};
__device__ __forceinline__ Layout layout() {
  extern __shared__ unsigned char smem_raw[];
  Layout m;
  m.ws = (smem_u32(smem_raw) + 1023u) & ~1023u;
  m.xs = m.ws + kMaxBlocks * kWBlockBytes;
  m.bars = m.xs + kMaxBlocks * kXBlockBytes;
  return m;
}
#endif

// The kernel's first statement. The weights' copies go out before the wait for the kernel before:
// W is constant, nothing in flight writes it (V=2 on an H100: decoder 7.83 ms against 7.88,
// bench/NOTES.md v38). Nothing else is read here; X, which the kernel before writes, is copied
// after this returns.
__device__ __forceinline__ void issue_weights_then_wait_for_prior_grids(const Args& a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const Layout m = layout();
  if (threadIdx.x == 0) {
    const int blocks = a.kdim / kBK;
    for (int b = 0; b < blocks; ++b) bar_init(m.bar(b));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (int b = 0; b < blocks; ++b) {
      bar_expect(m.bar(b), kWBlockBytes + kXBlockBytes);
      load_box(m.ws + b * kWBlockBytes, a.w_map, b * kBK, static_cast<int>(blockIdx.x) * kCols,
               m.bar(b));
    }
  }
#endif
  wait_for_prior_grids();
}

__global__ void __launch_bounds__(kThreads) qkv_rope_kernel(const __grid_constant__ Args a) {
  issue_weights_then_wait_for_prior_grids(a);
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // never launched: the host checks skinny_wgmma_available()
#else
  __shared__ float row_scale[kRows];
  const Layout m = layout();
  const uint32_t ws = m.ws, xs = m.xs;
  const int blocks = a.kdim / kBK;
  const int tid = threadIdx.x;
  const int n0 = static_cast<int>(blockIdx.x) * kCols;
  if (tid == 0) {
    for (int b = 0; b < blocks; ++b) load_box(xs + b * kXBlockBytes, a.x_map, b * kBK, 0, m.bar(b));
  }
  __syncthreads();  // the barriers are initialised before anyone waits on them
  const int sq_row = tid >> 1, sq_half = tid & 1;  // this thread's 32 values of each X block
  float squares = 0.0f;
  float d[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) d[e] = 0.0f;
  __builtin_assume(blocks > 0);  // k >= 64 (the host checks)
  for (int b = 0; b < blocks; ++b) {
    bar_wait(m.bar(b), 0);
    const uint32_t xb = xs + b * kXBlockBytes, wb = ws + b * kWBlockBytes;
    fence_operand(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wgmma_m64n32k16(d, smem_desc_sw128(xb + kk * 32, 16, 1024),
                      smem_desc_sw128(wb + kk * 32, 16, 1024));
    wgmma_commit();
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int kc = sq_half * 4 + c;
      uint4 val;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w)
                   : "r"(xb + sq_row * 128 + ((kc ^ (sq_row & 7)) << 4)));
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&val);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(p[e]);
        squares += f.x * f.x + f.y * f.y;
      }
    }
  }
  wgmma_wait0();
  fence_operand(d);
  squares += __shfl_xor_sync(0xffffffffu, squares, 1);
  if (sq_half == 0) row_scale[sq_row] = rsqrtf(squares / static_cast<float>(a.kdim) + a.eps);
  __syncthreads();
  // Warp w holds rows 16 w + lane / 4 and + 8; d[4 j .. 4 j + 3] are n8 chunk j's column pair,
  // first row then second. A CTA's 32 columns lie in one head.
  const int lane = tid & 31, warp = tid >> 5;
  const int row0 = warp * 16 + (lane >> 2);
  const int head = n0 / a.head_dim;
  const bool is_v = head == a.q_heads + 1;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
    const int col = (n0 % a.head_dim) + 8 * j + (lane & 3) * 2;  // within the head
    const int i = col / 2;
    // theta^(-2i/d) in fp32, as rope_split_qkv computes it.
    const float inv_freq = exp2f(-(2.0f * i / a.head_dim) * a.log2_theta);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + 8 * h;
      if (r >= a.rows) continue;
      const float sr = row_scale[r];
      const float x0 = d[4 * j + 2 * h] * sr, x1 = d[4 * j + 2 * h + 1] * sr;
      __nv_bfloat162 out;
      if (is_v) {
        out = __floats2bfloat162_rn(x0, x1);
      } else {
        float s, c;
        sincosf(static_cast<float>(a.first_position + r) * inv_freq, &s, &c);
        out = __floats2bfloat162_rn(x0 * c - x1 * s, x0 * s + x1 * c);
      }
      bf16* dst = head < a.q_heads
                      ? a.q + static_cast<size_t>(r) * a.q_heads * a.head_dim + head * a.head_dim
                  : is_v ? a.v + static_cast<size_t>(r) * a.head_dim
                         : a.k + static_cast<size_t>(r) * a.head_dim;
      *reinterpret_cast<__nv_bfloat162*>(dst + col) = out;
    }
  }
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    load_driver_call("cuTensorMapEncodeTiled", 12000, fn);
    PI0_CHECK(fn != nullptr, "qkv rope: the driver has no cuTensorMapEncodeTiled");
    return fn;
  }();
  return encode;
}

// A 2-D tensor map over a row-major bf16 matrix [rows][cols], boxes of box_rows x 64 columns
// written 128-byte swizzled; rows past the matrix read as zeros.
CUtensorMap tensor_map(const Bf16* base, int rows, int cols, int box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(Bf16)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<Bf16*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  PI0_CHECK(r == CUDA_SUCCESS, "qkv rope: cuTensorMapEncodeTiled failed (error " +
                                   std::to_string(static_cast<int>(r)) + ")");
  return map;
}

// Q | K | V: the product's columns, 32 a CTA.
int output_columns(const QkvRopeShape& s) {
  return (s.q_heads + 2) * s.head_dim;
}

void configure() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(qkv_rope_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kSmemBytes));
    return true;
  }();
  (void)configured;
}

}  // namespace

bool qkv_rope_supported(const QkvRopeShape& s) {
  return s.rows > 0 && s.rows <= kRows && s.k >= kBK && s.k % kBK == 0 && s.k <= kMaxK &&
         s.head_dim > 0 && s.head_dim % kCols == 0 && s.q_heads > 0 && skinny_wgmma_available();
}

bool qkv_rope_fits_at_once(const QkvRopeShape& s) {
  if (!qkv_rope_supported(s)) return false;
  configure();
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, qkv_rope_kernel, kThreads,
                                                    kSmemBytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return per_sm * current_device_attribute(cudaDevAttrMultiProcessorCount, 0) >=
         output_columns(s) / kCols;
}

void qkv_rope(const QkvRopeShape& s, const Bf16* x, const Bf16* w_transposed, Bf16* q, Bf16* k,
              Bf16* v, int first_position, float theta, float eps, cudaStream_t stream) {
  PI0_CHECK(qkv_rope_supported(s), "qkv rope: unsupported shape rows=" + std::to_string(s.rows) +
                                       " k=" + std::to_string(s.k));
  PI0_CHECK(is_aligned(x, 16) && is_aligned(w_transposed, 16) && is_aligned(q, 4) &&
                is_aligned(k, 4) && is_aligned(v, 4),
            "qkv rope: X and W must be 16-byte aligned, the outputs 4-byte aligned");
  configure();
  const int n = output_columns(s);
  Args a{};
  a.x_map = tensor_map(x, s.rows, s.k, kRows);
  a.w_map = tensor_map(w_transposed, n, s.k, kCols);
  a.q = reinterpret_cast<bf16*>(q);
  a.k = reinterpret_cast<bf16*>(k);
  a.v = reinterpret_cast<bf16*>(v);
  a.rows = s.rows;
  a.kdim = s.k;
  a.q_heads = s.q_heads;
  a.head_dim = s.head_dim;
  a.first_position = first_position;
  a.log2_theta = std::log2(theta);
  a.eps = eps;
  qkv_rope_kernel<<<n / kCols, kThreads, kSmemBytes, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

}  // namespace pi0::cuda
