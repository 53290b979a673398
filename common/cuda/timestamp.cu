#include "pi0/check.hpp"
#include "pi0/cuda/timestamp.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

__global__ void write_globaltimer_kernel(uint64_t* dst) {
  wait_for_prior_grids();
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  *dst = t;
}

}  // namespace

void write_gpu_timestamp(uint64_t* dst, cudaStream_t stream) {
  write_globaltimer_kernel<<<1, 1, 0, stream>>>(dst);
  CUDA_CHECK_LAUNCH();
}

void load_gpu_timestamp_kernel() {
  cudaFuncAttributes attributes{};
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, write_globaltimer_kernel));
}

}  // namespace pi0::cuda
