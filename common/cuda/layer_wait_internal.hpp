// What layer_signal.cu and in_process_handoff.cpp share, internal to pi0_cuda: the driver's stream
// memory operations (a stream held until a word in device memory reaches a value, and words
// written in stream order, both in the stream's front end, on no SM), which the runtime API lacks,
// and the in-process hand-off's kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pi0::cuda {

// Loads the layer-signal kernels (layer_signal.cu) once: see there why before any wait.
void load_layer_signal_kernels();

// In stream order: *generation += 1 and counters[0, layers) = 0 (one kernel: a frame's start).
void begin_generation(uint64_t* generation, uint64_t* counters, int layers, cudaStream_t stream);

// Holds the stream until *counter >= 1 (64-bit, signed difference, as CU_STREAM_WAIT_VALUE_GEQ
// compares). Throws if frontend_waits_supported() is false.
void hold_stream_until_set(const uint64_t* counter, cudaStream_t stream);

// *word = value in stream order, without a kernel (so without a module load that could wait for
// a held stream).
void write_word(uint64_t* word, uint64_t value, cudaStream_t stream);
void write_word(uint32_t* word, uint32_t value, cudaStream_t stream);

}  // namespace pi0::cuda
