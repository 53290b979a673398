// Pulling data into L2 ahead of the kernels that will read it (kernel code in l2_prefetch.cu).
// Matrix products at a few dozen rows stream their weights at well under the memory's bandwidth,
// and attention and the small kernels between them leave it idle: prefetching the next weights
// there lets the GEMMs find them in L2 (bench/NOTES.md v10). The decoder uses it; the encoder's
// GEMMs (hundreds of rows, bound by tensor cores) got slower with it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "pi0/cuda/device.hpp"

namespace pi0::cuda {

struct L2Range {
  const void* ptr = nullptr;
  size_t bytes = 0;
};
constexpr int kMaxL2Ranges = 8;

// Starts pulling each range into L2 and returns without waiting for the data (sm_90: bulk
// prefetches; older GPUs: one prefetch per 128-byte line). Unaligned ends shrink to 16 bytes;
// null and empty ranges are skipped. Changes no data.
void prefetch_l2(const L2Range* ranges, int count, cudaStream_t stream);

// Prefetches on a side stream forked from the caller's stream at the point of the call, so that
// they run beside the kernels queued after it; rejoin() makes the caller's stream wait for all
// of them (a captured graph must end on the stream it began on). Works eagerly and under capture.
class L2Prefetcher {
 public:
  // Forgets prefetches an earlier sequence left without rejoin() (one whose capture threw): call
  // at the start of each sequence, so that its rejoin() never waits on work outside it.
  void begin() { pending_ = false; }
  void prefetch(const L2Range* ranges, int count, cudaStream_t stream);
  // No-op when nothing was prefetched since the last rejoin.
  void rejoin(cudaStream_t stream);

 private:
  Stream side_;
  Event fork_{cudaEventDisableTiming}, join_{cudaEventDisableTiming};
  bool pending_ = false;
};

}  // namespace pi0::cuda
