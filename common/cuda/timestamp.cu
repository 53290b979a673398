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

}  // namespace pi0::cuda
