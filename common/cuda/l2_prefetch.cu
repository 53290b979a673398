#include "pi0/cuda/l2_prefetch.hpp"

#include <algorithm>
#include <cstdint>
#include <string>

#include "pi0/check.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

struct L2Ranges {
  L2Range range[kMaxL2Ranges];
  int count;
};

// Each thread issues whole chunks; the prefetches complete after the kernel has exited.
constexpr size_t kPrefetchChunk = 16 * 1024;
__global__ void prefetch_l2_kernel(L2Ranges ranges) {
  wait_for_prior_grids();
  const size_t stride = size_t{gridDim.x} * blockDim.x * kPrefetchChunk;
  for (int r = 0; r < ranges.count; ++r) {
    const char* base = static_cast<const char*>(ranges.range[r].ptr);
    const size_t bytes = ranges.range[r].bytes;
    for (size_t off = (blockIdx.x * size_t{blockDim.x} + threadIdx.x) * kPrefetchChunk; off < bytes;
         off += stride) {
      const size_t size = bytes - off < kPrefetchChunk ? bytes - off : kPrefetchChunk;
#if __CUDA_ARCH__ >= 900
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off),
                   "r"(static_cast<uint32_t>(size))
                   : "memory");
#else
      for (size_t line = 0; line < size; line += 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off + line));
#endif
    }
  }
}

}  // namespace

void prefetch_l2(const L2Range* ranges, int count, cudaStream_t stream) {
  PI0_CHECK(count >= 0 && count <= kMaxL2Ranges,
            "prefetch_l2: at most " + std::to_string(kMaxL2Ranges) + " ranges");
  L2Ranges args{};
  size_t chunks = 0;
  for (int r = 0; r < count; ++r) {
    // Bulk prefetches take 16-byte aligned addresses and sizes: the range shrinks to fit.
    const auto begin = (reinterpret_cast<uintptr_t>(ranges[r].ptr) + 15) & ~uintptr_t{15};
    const auto end =
        (reinterpret_cast<uintptr_t>(ranges[r].ptr) + ranges[r].bytes) & ~uintptr_t{15};
    if (ranges[r].ptr == nullptr || end <= begin) continue;
    args.range[args.count++] = {reinterpret_cast<const void*>(begin), end - begin};
    chunks = std::max<size_t>(chunks, (end - begin + kPrefetchChunk - 1) / kPrefetchChunk);
  }
  if (args.count == 0) return;
  // A few CTAs: they only issue requests, and they share the SMs with the kernels running now.
  // But an SM issues bulk prefetches at only ~0.6 TB/s: on 2 CTAs the decoder's 35 MB per layer
  // took longer than the layer (V=2 19.7 ms against 14.7 without prefetching); 8 and 32 CTAs
  // both gave 14.36 ms.
  constexpr int kPrefetchThreads = 128;
  constexpr size_t kPrefetchBlocks = 8;
  const int blocks = static_cast<int>(
      std::min<size_t>(kPrefetchBlocks, (chunks + kPrefetchThreads - 1) / kPrefetchThreads));
  prefetch_l2_kernel<<<blocks, kPrefetchThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

void L2Prefetcher::begin() {
  for (Side& side : sides_) side.pending = false;
  next_ = 0;
}

void L2Prefetcher::prefetch(const L2Range* ranges, int count, cudaStream_t stream) {
  Side& side = sides_[next_];
  next_ = (next_ + 1) % kSideStreams;
  fork_.record(stream);
  CUDA_CHECK(cudaStreamWaitEvent(side.stream.get(), fork_.get(), 0));
  prefetch_l2(ranges, count, side.stream.get());
  side.pending = true;
}

void L2Prefetcher::rejoin(cudaStream_t stream) {
  for (Side& side : sides_) {
    if (!side.pending) continue;
    side.join.record(side.stream.get());
    CUDA_CHECK(cudaStreamWaitEvent(stream, side.join.get(), 0));
    side.pending = false;
  }
  next_ = 0;
}

}  // namespace pi0::cuda
