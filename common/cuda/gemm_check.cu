#include <cuda_bf16.h>

#include <cmath>

#include "pi0/check.hpp"
#include "pi0/cuda/gemm_check.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

struct Layout {
  int m, n, k, ld_x, ld_w, ld_y, batch;
  long long stride_x, stride_w, stride_y;
  bool w_transposed, y_f32, accumulate, bias, gelu;
  float alpha;
};

Layout layout_of(const GemmShape& s) {
  return Layout{s.m, s.n, s.k, s.ld_x, s.ld_w, s.ld_y, s.batch, s.stride_x, s.stride_w,
                s.stride_y, s.w_transposed, s.y_type == DType::kF32, s.accumulate,
                s.epilogue != Epilogue::kNone, s.epilogue == Epilogue::kGeluBias, s.alpha};
}

__device__ float load(const void* p, long long i, bool f32) {
  return f32 ? static_cast<const float*>(p)[i]
             : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ void store(void* p, long long i, bool f32, float v) {
  if (f32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

// One thread per output element. kInPlace: y = epilogue(... + y) in the shape's layout and type;
// otherwise a dense fp32 [batch][m][n] result, the initial y read from y0.
template <bool kInPlace>
__global__ void plain_gemm_kernel(Layout l, const __nv_bfloat16* x, const __nv_bfloat16* w,
                                  const void* bias, const void* y0, void* out) {
  wait_for_prior_grids();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y;
  const int b = blockIdx.z;
  if (j >= l.n) return;
  const __nv_bfloat16* xr = x + b * l.stride_x + static_cast<long long>(i) * l.ld_x;
  const __nv_bfloat16* wb = w + b * l.stride_w;
  float acc = 0.0f;
  for (int k = 0; k < l.k; ++k) {
    const long long wi = l.w_transposed ? static_cast<long long>(j) * l.ld_w + k
                                        : static_cast<long long>(k) * l.ld_w + j;
    acc += __bfloat162float(xr[k]) * __bfloat162float(wb[wi]);
  }
  const long long at = b * l.stride_y + static_cast<long long>(i) * l.ld_y + j;
  float v = l.alpha * acc;
  if (l.accumulate) v += load(y0, at, l.y_f32);
  if (l.bias) v += load(bias, j, l.y_f32);
  if (l.gelu) v = 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
  if constexpr (kInPlace) {
    store(out, at, l.y_f32, v);
  } else {
    static_cast<float*>(out)[(static_cast<long long>(b) * l.m + i) * l.n + j] = v;
  }
}

__global__ void difference_kernel(Layout l, const void* y, const float* ref, double* sums) {
  wait_for_prior_grids();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y;
  const int b = blockIdx.z;
  if (j >= l.n) return;
  const float got = load(y, b * l.stride_y + static_cast<long long>(i) * l.ld_y + j, l.y_f32);
  const float want = ref[(static_cast<long long>(b) * l.m + i) * l.n + j];
  if (!isfinite(got)) {
    atomicAdd(&sums[2], 1.0);
    return;
  }
  const double d = static_cast<double>(got) - want;
  atomicAdd(&sums[0], d * d);
  atomicAdd(&sums[1], static_cast<double>(want) * want);
}

__global__ void bias_epilogue_kernel(Layout l, const void* bias, void* y) {
  wait_for_prior_grids();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y;
  const int b = blockIdx.z;
  if (j >= l.n) return;
  const long long at = b * l.stride_y + static_cast<long long>(i) * l.ld_y + j;
  float v = load(y, at, l.y_f32) + load(bias, j, l.y_f32);
  if (l.gelu) v = 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
  store(y, at, l.y_f32, v);
}

dim3 grid_of(const GemmShape& s) {
  return dim3((static_cast<unsigned>(s.n) + 127) / 128, static_cast<unsigned>(s.m),
              static_cast<unsigned>(s.batch));
}

}  // namespace

void reference_gemm(const GemmShape& shape, const void* x, const void* w, const void* bias,
                    const void* y_initial, float* out, cudaStream_t stream) {
  plain_gemm_kernel<false><<<grid_of(shape), 128, 0, stream>>>(
      layout_of(shape), static_cast<const __nv_bfloat16*>(x),
      static_cast<const __nv_bfloat16*>(w), bias, y_initial, out);
  CUDA_CHECK_LAUNCH();
}

void simple_gemm(const GemmShape& shape, const void* x, const void* w, const void* bias, void* y,
                 cudaStream_t stream) {
  plain_gemm_kernel<true><<<grid_of(shape), 128, 0, stream>>>(
      layout_of(shape), static_cast<const __nv_bfloat16*>(x),
      static_cast<const __nv_bfloat16*>(w), bias, y, y);
  CUDA_CHECK_LAUNCH();
}

void apply_bias_epilogue(const GemmShape& shape, const void* bias, void* y, cudaStream_t stream) {
  bias_epilogue_kernel<<<grid_of(shape), 128, 0, stream>>>(layout_of(shape), bias, y);
  CUDA_CHECK_LAUNCH();
}

double relative_difference(const GemmShape& shape, const void* y, const float* ref,
                           cudaStream_t stream) {
  double* sums = nullptr;
  CUDA_CHECK(cudaMallocAsync(&sums, 3 * sizeof(double), stream));
  CUDA_CHECK(cudaMemsetAsync(sums, 0, 3 * sizeof(double), stream));
  difference_kernel<<<grid_of(shape), 128, 0, stream>>>(layout_of(shape), y, ref, sums);
  CUDA_CHECK_LAUNCH();
  double host[3];
  CUDA_CHECK(cudaMemcpyAsync(host, sums, sizeof host, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaFreeAsync(sums, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host[2] > 0) return INFINITY;
  return host[1] > 0 ? std::sqrt(host[0] / host[1]) : std::sqrt(host[0]);
}

}  // namespace pi0::cuda
