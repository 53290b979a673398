// Per-layer signals between the encoder and decoder (see pi0/cuda/layer_signal.hpp): one-thread
// kernels around a 64-bit counter in device memory that both processes map.
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "pi0/check.hpp"
#include "pi0/cuda/layer_signal.hpp"
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

__global__ void advance_generation_kernel(uint64_t* generation) {
  wait_for_prior_grids();
  *generation += 1;
}

// With lazy loading (CUDA's default since 12.2) a kernel's first launch loads it, and a load waits
// for the kernels already running in the context. A wait that spins until a signal from the same
// process would hold up that signal's load until the wait's deadline (the kernel test did, in one
// process), so the first launch of either kernel loads both. One device per process, as our
// workers have.
void load_both_kernels() {
  static const bool loaded = [] {
    cudaFuncAttributes attributes{};
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, signal_layer_kernel));
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, wait_layer_kernel));
    return true;
  }();
  (void)loaded;
}

}  // namespace

bool layer_handoff_wanted(bool mps_client) {
  const char* v = std::getenv("PI0_LAYER_WAITS");
  return mps_client && !(v && v[0] == '0');
}

void signal_layer(uint64_t* counter, const uint64_t* generation, uint64_t* stamp,
                  cudaStream_t stream) {
  PI0_CHECK(counter && generation, "signal_layer: null counter or generation");
  load_both_kernels();
  signal_layer_kernel<<<1, 1, 0, stream>>>(counter, generation, stamp);
  CUDA_CHECK_LAUNCH();
}

void wait_layer(const uint64_t* counter, const uint64_t* expected, int layer,
                const LayerWaitLimits& limits, uint64_t* done_at, cudaStream_t stream) {
  PI0_CHECK(counter && expected, "wait_layer: null counter or expected generation");
  PI0_CHECK(limits.timeout_ns > 0, "wait_layer: a wait needs a deadline");
  load_both_kernels();
  wait_layer_kernel<<<1, 1, 0, stream>>>(counter, expected, layer, limits.error, limits.timeout_ns,
                                         done_at);
  CUDA_CHECK_LAUNCH();
}

void advance_generation(uint64_t* generation, cudaStream_t stream) {
  PI0_CHECK(generation, "advance_generation: null generation");
  advance_generation_kernel<<<1, 1, 0, stream>>>(generation);
  CUDA_CHECK_LAUNCH();
}

InProcessHandoff::InProcessHandoff(int layers, uint64_t timeout_ns)
    : words_(static_cast<size_t>(1 + std::max(layers, 1)), "in-process layer counters"),
      error_(1, "in-process layer wait error") {
  PI0_CHECK(layers >= 1, "InProcessHandoff: a model without layers");
  PI0_CHECK(timeout_ns > 0, "InProcessHandoff: a wait needs a deadline");
  zero_device(words_.get(), words_.bytes());
  zero_device(error_.get(), error_.bytes());
  limits_.error = error_.get();
  limits_.timeout_ns = timeout_ns;
}

void InProcessHandoff::begin_frame(cudaStream_t encoder, cudaStream_t decoder) {
  // Waiting on an event not recorded yet (the first frame) is a no-op.
  CUDA_CHECK(cudaStreamWaitEvent(encoder, decoder_finished_.get(), 0));
  advance_generation(words_.get(), encoder);
  decoder_started_.record(encoder);
  CUDA_CHECK(cudaStreamWaitEvent(decoder, decoder_started_.get(), 0));
}

void InProcessHandoff::end_frame(cudaStream_t decoder) {
  decoder_finished_.record(decoder);
}

LayerSignals InProcessHandoff::signals() const {
  return LayerSignals{words_.get() + 1, words_.get(), nullptr};
}

LayerWait InProcessHandoff::wait() const {
  return LayerWait{words_.get() + 1, words_.get(), nullptr};
}

uint32_t InProcessHandoff::timed_out_layer() const {
  uint32_t error = 0;
  copy_to_host(&error, error_.get(), sizeof error);
  return error;
}

}  // namespace pi0::cuda
