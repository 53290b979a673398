// Per-layer signals between the encoder and decoder (see pi0/cuda/layer_signal.hpp): one-thread
// kernels around a 64-bit counter in device memory that both processes map.
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "layer_wait_internal.hpp"
#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/timestamp.hpp"
#include "programmatic.cuh"

namespace pi0::cuda {
namespace {

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void signal_layer_kernel(uint64_t* counter, const uint64_t* generation,
                                    uint64_t* stamp) {
  wait_for_prior_grids();
  const uint64_t g = *generation;
  if (stamp) *stamp = globaltimer();
  // The layer's K/V were written by earlier kernels of this stream: fence, then release.
  __threadfence();
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(counter), "l"(g) : "memory");
}

__global__ void wait_layer_kernel(const uint64_t* counter, const uint64_t* expected, int layer,
                                  uint32_t* error, uint64_t timeout_ns, uint64_t* done_at) {
  wait_for_prior_grids();
  const uint64_t want = *expected;
  const uint64_t start = globaltimer();
  // After one layer's wait timed out, the rest of the pass does not wait again: the pass is lost
  // (its worker reports the error), and 18 more timeouts would only delay that.
  if (error && *static_cast<volatile uint32_t*>(error) != 0) {
    if (done_at) *done_at = start;
    return;
  }
  for (;;) {
    uint64_t value;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(counter) : "memory");
    if (value >= want) break;
    if (globaltimer() - start > timeout_ns) {
      if (error) atomicCAS(error, 0u, static_cast<uint32_t>(layer + 1));
      break;
    }
    __nanosleep(200);
  }
  if (done_at) *done_at = globaltimer();
}

__global__ void begin_generation_kernel(uint64_t* generation, uint64_t* counters, int layers,
                                        const uint32_t* error) {
  wait_for_prior_grids();
  if (threadIdx.x == 0) *generation += 1;
  const uint64_t start = *error != 0 ? kPastAnyGeneration : 0;
  for (int l = threadIdx.x; l < layers; l += blockDim.x) counters[l] = start;
}

}  // namespace

// With lazy loading (CUDA's default since 12.2) a kernel's first launch loads it, and a load waits
// for the kernels already running in the context. A wait that spins until a signal from the same
// process would hold up that signal's load until the wait's deadline (the kernel test did, in one
// process), and a front-end wait would hold it for good; so the first launch of any of these
// kernels (or InProcessHandoff, before any wait) loads them all. One device per process, as our
// workers have.
void load_layer_signal_kernels() {
  static const bool loaded = [] {
    cudaFuncAttributes attributes{};
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, signal_layer_kernel));
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, wait_layer_kernel));
    load_gpu_timestamp_kernel();  // a front-end wait's done_at
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, begin_generation_kernel));
    return true;
  }();
  (void)loaded;
}

bool layer_handoff_wanted(bool mps_client) {
  return mps_client && env_switch("PI0_LAYER_WAITS", true);
}

void signal_layer(uint64_t* counter, const uint64_t* generation, uint64_t* stamp,
                  cudaStream_t stream) {
  PI0_CHECK(counter && generation, "signal_layer: null counter or generation");
  load_layer_signal_kernels();
  signal_layer_kernel<<<1, 1, 0, stream>>>(counter, generation, stamp);
  CUDA_CHECK_LAUNCH();
}

void wait_layer(const uint64_t* counter, const uint64_t* expected, int layer,
                const LayerWaitLimits& limits, uint64_t* done_at, cudaStream_t stream) {
  PI0_CHECK(counter && expected, "wait_layer: null counter or expected generation");
  PI0_CHECK(limits.timeout_ns > 0, "wait_layer: a wait needs a deadline");
  load_layer_signal_kernels();
  if (layer < limits.frontend_layers) {
    hold_stream_until_set(counter, stream);
    if (done_at) write_gpu_timestamp(done_at, stream);
    return;
  }
  wait_layer_kernel<<<1, 1, 0, stream>>>(counter, expected, layer, limits.error, limits.timeout_ns,
                                         done_at);
  CUDA_CHECK_LAUNCH();
}

void begin_generation(uint64_t* generation, uint64_t* counters, int layers, const uint32_t* error,
                      cudaStream_t stream) {
  PI0_CHECK(generation && counters && error && layers >= 1, "begin_generation: no counters");
  load_layer_signal_kernels();
  begin_generation_kernel<<<1, 32, 0, stream>>>(generation, counters, layers, error);
  CUDA_CHECK_LAUNCH();
}

}  // namespace pi0::cuda
