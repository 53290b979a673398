// GPU-side timestamps (%globaltimer, one clock for every context on the device), to measure the
// encoder-to-decoder handoff across processes without host clocks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pi0::cuda {

// Enqueues a one-thread kernel that writes the GPU's global nanosecond timer to *dst when the
// stream reaches it.
void write_gpu_timestamp(uint64_t* dst, cudaStream_t stream);

// Loads that kernel now. CUDA loads a kernel at its first launch, and a load can wait for the
// work in flight: a caller whose first timestamp may come while a stream is held (a front-end
// layer wait, pi0/cuda/layer_signal.hpp) loads it before.
void load_gpu_timestamp_kernel();

}  // namespace pi0::cuda
