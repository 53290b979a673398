#include "late_copy.hpp"

#include "pi0/check.hpp"

namespace pi0::test {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 32;

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ void copy_vectors(uint4* dst, const uint4* src, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    dst[i] = src[i];
}

__global__ void late_copy_kernel(uint4* dst, const uint4* src, size_t n, uint64_t delay_ns) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const uint64_t start = globaltimer();
  while (globaltimer() - start < delay_ns) __nanosleep(1000);
  copy_vectors(dst, src, n);
}

__global__ void unwaiting_copy_kernel(uint4* dst, const uint4* src, size_t n) {
  copy_vectors(dst, src, n);
}

}  // namespace

void launch_late_copy(void* dst, const void* src, size_t bytes, uint64_t delay_ns,
                      cudaStream_t stream) {
  PI0_CHECK(bytes % 16 == 0, "launch_late_copy: bytes must be a multiple of 16");
  late_copy_kernel<<<kBlocks, kThreads, 0, stream>>>(
      static_cast<uint4*>(dst), static_cast<const uint4*>(src), bytes / 16, delay_ns);
  CUDA_CHECK_LAUNCH();
}

void launch_unwaiting_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  PI0_CHECK(bytes % 16 == 0, "launch_unwaiting_copy: bytes must be a multiple of 16");
  unwaiting_copy_kernel<<<kBlocks, kThreads, 0, stream>>>(
      static_cast<uint4*>(dst), static_cast<const uint4*>(src), bytes / 16);
  CUDA_CHECK_LAUNCH();
}

}  // namespace pi0::test
