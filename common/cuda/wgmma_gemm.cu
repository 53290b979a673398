// wgmma prototype (see pi0/cuda/wgmma_gemm.hpp). One warpgroup per CTA. X and Wt tiles stream
// through a cp.async ring of 64-deep K blocks in the canonical K-major 128-byte-swizzled layout
// (row r's 16-byte chunk c at r * 128 + (c ^ (r % 8)) * 16, stage bases 1024-byte aligned), which
// the tensor cores read through matrix descriptors: no ldmatrix, no register staging of operands.
// Per K block: wait for the stage, make the generic-proxy writes visible to the async proxy,
// 4 wgmma (k16 each, descriptors advanced 32 bytes), wait for them before the slot is refilled.
#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "mma_primitives.cuh"
#include "pi0/check.hpp"
#include "pi0/cuda/wgmma_gemm.hpp"

namespace pi0::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;

constexpr int kThreads = 128;
constexpr int kRows = 64;
constexpr int kBK = 64;
constexpr int kStages = 4;

struct Args {
  const bf16* x;
  const bf16* wt;
  float* part;
  int m, n, ld_x, ld_wt, kb_per_split;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: start address, leading byte offset (unused for swizzled
// K-major: 1), stride byte offset 1024 (8 rows of 128 bytes), 128-byte swizzle.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  uint64_t d = (addr & 0x3FFFF) >> 4;
  d |= uint64_t{1} << 16;
  d |= uint64_t{1024 >> 4} << 32;
  d |= uint64_t{1} << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pins the accumulators in place around the async region (cute::warpgroup_fence_operand): no
// instruction is emitted, but the compiler can neither hoist a read of d above wgmma.wait_group
// nor sink a write to d below wgmma.fence.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

template <int BN>
__device__ __forceinline__ void wgmma_tile(float (&d)[BN / 2], uint64_t da, uint64_t db,
                                           int accumulate) {
  if constexpr (BN == 64) {
    wgmma_m64n64k16(d, da, db, accumulate);
  } else {
    wgmma_m64n128k16(d, da, db, accumulate);
  }
}

#endif

template <int BN>
__global__ void __launch_bounds__(kThreads) wgmma_gemm_kernel(const Args a) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // wgmma exists only in sm_90a code: build with -DCMAKE_CUDA_ARCHITECTURES=90a.
  (void)a;
  __trap();
#else
  extern __shared__ unsigned char smem_raw[];
  constexpr int kXBytes = kRows * kBK * 2;
  constexpr int kWBytes = BN * kBK * 2;
  constexpr int kStageBytes = kXBytes + kWBytes;  // multiples of 1024
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN;
  const int split = blockIdx.y;
  const int kb0 = split * a.kb_per_split, nkb = a.kb_per_split;

  auto load = [&](int stage, int kb) {
    const uint32_t xs = sbase + stage * kStageBytes, ws = xs + kXBytes;
    const int k0 = kb * kBK;
#pragma unroll
    for (int i = 0; i < kRows * 8 / kThreads; ++i) {
      const int c = tid + i * kThreads, r = c >> 3, ch = c & 7;
      const bool ok = r < a.m;
      cp_async16(xs + r * 128 + ((ch ^ (r & 7)) << 4),
                 ok ? a.x + static_cast<size_t>(r) * a.ld_x + k0 + ch * 8 : a.x, ok);
    }
#pragma unroll
    for (int i = 0; i < BN * 8 / kThreads; ++i) {
      const int c = tid + i * kThreads, r = c >> 3, ch = c & 7;
      cp_async16(ws + r * 128 + ((ch ^ (r & 7)) << 4),
                 a.wt + static_cast<size_t>(n0 + r) * a.ld_wt + k0 + ch * 8, true);
    }
  };

  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkb) load(s, kb0 + s);
    cp_commit();
  }
  for (int it = 0; it < nkb; ++it) {
    cp_wait<kStages - 2>();
    fence_async_shared();  // this thread's cp.async writes, visible to the tensor cores
    __syncthreads();
    const int next = it + kStages - 1;
    if (next < nkb) load(next % kStages, kb0 + next);  // slot of block it - 1: its wgmma is done
    cp_commit();
    const uint32_t xs = sbase + (it % kStages) * kStageBytes, ws = xs + kXBytes;
    fence_operand(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wgmma_tile<BN>(d, smem_desc(xs + kk * 32), smem_desc(ws + kk * 32), it > 0 || kk > 0);
    wgmma_commit();
    wgmma_wait0();
    fence_operand(d);
  }
  cp_wait<0>();

  // D fragment: warp w holds rows 16 w + lane / 4 and + 8; n8 chunk j at columns 8 j + 2 (lane %
  // 4).
  float* part = a.part + static_cast<size_t>(split) * kRows * a.n;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + g + 8 * h;
      if (row >= a.m) continue;
      *reinterpret_cast<float2*>(part + static_cast<size_t>(row) * a.n + n0 + 8 * j + 2 * q) =
          make_float2(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    }
#endif
}

// Writes 1 only where this binary carries sm_90a code for the device (see wgmma_available).
__global__ void wgmma_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

template <int BN>
constexpr int smem_bytes() {
  return kStages * (kRows * kBK * 2 + BN * kBK * 2) + 1024;
}

template <int BN>
void launch(const WgmmaShape& s, const Args& a, cudaStream_t stream) {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(wgmma_gemm_kernel<BN>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<BN>()));
    return true;
  }();
  (void)configured;
  const dim3 grid(static_cast<unsigned>(s.n / BN), static_cast<unsigned>(s.splits));
  wgmma_gemm_kernel<BN><<<grid, kThreads, smem_bytes<BN>(), stream>>>(a);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool wgmma_available() {
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

bool wgmma_supported(const WgmmaShape& s) {
  return s.m >= 1 && s.m <= kRows && (s.bn == 64 || s.bn == 128) && s.n > 0 && s.n % s.bn == 0 &&
         s.splits >= 1 && s.k > 0 && s.k % (kBK * s.splits) == 0 && s.ld_x % 8 == 0 &&
         s.ld_wt % 8 == 0 && s.ld_x >= s.k && s.ld_wt >= s.k;
}

void wgmma_gemm(const WgmmaShape& s, const Bf16* x, const Bf16* wt, float* part,
                cudaStream_t stream) {
  PI0_CHECK(
      wgmma_available(),
      "wgmma gemm: this build has no sm_90a code for the device (-DCMAKE_CUDA_ARCHITECTURES=90a)");
  PI0_CHECK(wgmma_supported(s), "wgmma gemm: unsupported shape m=" + std::to_string(s.m) +
                                    " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k));
  PI0_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(wt) % 16 == 0,
            "wgmma gemm: misaligned operand");
  Args a;
  a.x = reinterpret_cast<const bf16*>(x);
  a.wt = reinterpret_cast<const bf16*>(wt);
  a.part = part;
  a.m = s.m;
  a.n = s.n;
  a.ld_x = s.ld_x;
  a.ld_wt = s.ld_wt;
  a.kb_per_split = s.k / kBK / s.splits;
  if (s.bn == 128) {
    launch<128>(s, a, stream);
  } else {
    launch<64>(s, a, stream);
  }
}

}  // namespace pi0::cuda
