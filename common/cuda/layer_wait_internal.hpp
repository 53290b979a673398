// What layer_signal.cu and frontend_waits.cpp share, internal to pi0_cuda: the driver's stream
// memory operations (a stream held until a word in device memory reaches a value, and words
// written in stream order, both in the stream's front end, on no SM), which the runtime API lacks,
// and the in-process hand-off's kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pi0::cuda {

// Loads the layer-signal kernels (layer_signal.cu) once: see there why before any wait.
void load_layer_signal_kernels();

// Passes a front-end wait (>= 1) and any wait kernel (>= its frame's generation) alike.
inline constexpr uint64_t kPastAnyGeneration = uint64_t{1} << 62;

// In stream order: *generation += 1 and counters[0, layers) = 0 (one kernel: a frame's start).
// Once *error is set the hand-off is spent: the counters are set past any generation instead, so
// that the frames still queued do not each wait out a deadline.
void begin_generation(uint64_t* generation, uint64_t* counters, int layers, const uint32_t* error,
                      cudaStream_t stream);

// Holds the stream until *counter >= 1 (64-bit, signed difference, as CU_STREAM_WAIT_VALUE_GEQ
// compares). Throws if frontend_waits_supported() is false.
void hold_stream_until_set(const uint64_t* counter, cudaStream_t stream);

// *word = value in stream order, without a kernel (so without a module load that could wait for
// a held stream).
void write_word(uint64_t* word, uint64_t value, cudaStream_t stream);
void write_word(uint32_t* word, uint32_t value, cudaStream_t stream);

}  // namespace pi0::cuda
