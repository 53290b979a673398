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

// Prefetches on side streams forked from the caller's stream at the point of the call, so that
// they run beside the kernels queued after it; rejoin() makes the caller's stream wait for all
// of them (a captured graph must end on the stream it began on). Works eagerly and under capture.
//
// Consecutive prefetches go to two side streams in turn. A prefetch kernel ends only once its
// bulk prefetches have drained (~30 us for the decoder's 34 MB a layer-step), so on one stream
// each layer-step's prefetch waited for the last one's and that chain paced the whole decode
// (bench/NOTES.md v44). On two, a prefetch overlaps the one before it: V=2 on an H200 12.18 ms
// against 12.41-12.47 with one; three or four streams gained nothing more (v45).
class L2Prefetcher {
 public:
  // Forgets prefetches an earlier sequence left without rejoin() (one whose capture threw): call
  // at the start of each sequence, so that its rejoin() never waits on work outside it.
  void begin();
  void prefetch(const L2Range* ranges, int count, cudaStream_t stream);
  // No-op when nothing was prefetched since the last rejoin.
  void rejoin(cudaStream_t stream);

 private:
  static constexpr int kSideStreams = 2;
  struct Side {
    Stream stream;
    Event join{cudaEventDisableTiming};
    bool pending = false;
  };
  Side sides_[kSideStreams];
  Event fork_{cudaEventDisableTiming};
  int next_ = 0;  // the side stream the next prefetch goes to
};

}  // namespace pi0::cuda
