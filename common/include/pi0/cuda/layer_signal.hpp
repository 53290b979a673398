// Per-layer hand-off of a K/V slot between the encoder and decoder processes on one GPU. The
// decoder's first flow step needs only layer l of the prefix K/V for its own layer l, and the
// encoder writes layer l early in its own layer l, so the decoder can follow the encoder layer by
// layer instead of waiting for all of it. An IPC event cannot carry that into a CUDA graph (a
// wait node waits on the event's latest record, not this frame's), so the encoder stores the
// frame's generation into a per-layer counter of the slot, and the decoder's graph holds a wait
// per layer: a one-thread kernel that waits until the counter reaches the generation it expects
// (generations only grow, frame number + 1, so a stale counter never passes for a new frame), or,
// for every layer but the last, the stream's front end held until the counter is non-zero, which
// spins on no SM and needs the counter zeroed between frames and a deadline kept by the host
// (LayerWaitLimits::frontend_layers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "pi0/cuda/device.hpp"

namespace pi0::cuda {

// Whether the two workers hand slots over per layer: only as MPS clients (without MPS their
// contexts are time-sliced, and a decoder spinning on a layer would hold the GPU from the encoder
// it waits for), and unless PI0_LAYER_WAITS=0 (both workers read it, so they agree).
bool layer_handoff_wanted(bool mps_client);

// Encoder side: after layer l's K/V are written, counters[l] = *generation (a device scalar the
// caller uploads per frame). If last_stamp is set, the last layer's signal first writes the GPU
// time there (so "encoder done" never comes after the decoder's wake-up).
struct LayerSignals {
  uint64_t* counters = nullptr;
  const uint64_t* generation = nullptr;
  uint64_t* last_stamp = nullptr;
  // Fault injection: this layer is never signalled, as by an encoder hung there, so that a test can
  // watch the decoder's deadline end the run (PI0_TEST_WITHHOLD_LAYER_SIGNAL). -1: none.
  int withheld_layer = -1;
};

// Decoder side, one per frame of a pass: wait until counters[l] >= *expected before layer l of
// the first flow step reads the slot. done_at, if set, gets the GPU time the last layer's wait
// let the stream go.
struct LayerWait {
  const uint64_t* counters = nullptr;
  const uint64_t* expected = nullptr;
  uint64_t* done_at = nullptr;
};

// Every wait of a pass shares these: on a timeout the wait sets *error (if still 0) to 1 + the
// layer and lets the stream go on, so that a dead or hung encoder cannot hang the decoder, and
// later waits do not wait while *error is set; the caller checks *error after the pass.
//
// The waits of layers below frontend_layers hold the stream in its front end instead
// (cuStreamWaitValue64 until the counter is >= 1), which keeps them off the SMs: a one-thread
// kernel spinning for most of the encoder's time holds an SM that a full-wave encoder GEMM then
// misses (bench/NOTES.md v18). Such a wait has no deadline and a fixed value, so only a caller
// that zeroes the counters between frames and lets them go from the host past a deadline
// (FrontendWaitRelease) may set it: InProcessHandoff and the decoder worker.
struct LayerWaitLimits {
  uint32_t* error = nullptr;
  uint64_t timeout_ns = 0;
  int frontend_layers = 0;
};

// Whether this device and driver can hold a stream on a 64-bit word (the front-end waits above).
bool frontend_waits_supported();
// The same, unless PI0_FRONTEND_WAITS=0 keeps every wait on the kernel.
bool frontend_waits_enabled();
// LayerWaitLimits::frontend_layers for a model of `layers` layers: all but the last where
// enabled (the front end polls, and would wake the decoder late at the last one), else 0.
int frontend_wait_layers(int layers);

// Lets front-end waits go from the host, which is where their deadline lives. Everything goes on
// a stream of its own as stream memory operations, which neither a held stream nor a kernel load
// can delay, into pinned memory allocated up front (allocating it later would wait for the held
// stream).
class FrontendWaitRelease {
 public:
  explicit FrontendWaitRelease(int layers);
  // For a frame past its deadline: if one of counters[0, frontend_layers) is still 0, sets *error
  // to 1 + the first such layer (unless a wait already set it), then every later counter still 0
  // past any generation (which lets the front-end waits and the last layer's wait kernel go),
  // and returns 1 + that layer. Otherwise writes nothing (the frame is held in its wait kernel,
  // which has its own deadline, or in its work) and returns 0. `past_waits` is an event recorded
  // after the frame's waits and before anything that zeroes its counters for the next frame:
  // done once the counters are read, the frame went on by itself and nothing is written.
  // Throws if the release does not finish within 2 s.
  uint32_t release_unsignalled(uint64_t* counters, int frontend_layers, uint32_t* error,
                               cudaEvent_t past_waits);
  // Sets counters[0, count) past any generation: a hand-off torn down with frames maybe held.
  void release_all(uint64_t* counters, size_t count) noexcept;

 private:
  void finish_within_deadline();

  int layers_ = 0;
  Stream stream_;
  PinnedBuffer<uint64_t> counters_seen_;
  PinnedBuffer<uint32_t> error_seen_;
};

// The deadline the decoder worker and the single-process baseline give each layer's wait: far
// beyond any encoder layer at any share; past it the encoder is taken for dead or hung and the
// pass fails instead of hanging.
constexpr uint64_t kLayerWaitTimeoutNs = 10'000'000'000ull;

// Stores *generation into *counter, released at GPU scope after every earlier write of the stream
// (writing the GPU time to *stamp first, if not null).
void signal_layer(uint64_t* counter, const uint64_t* generation, uint64_t* stamp,
                  cudaStream_t stream);

// Holds the stream until *counter >= *expected (acquire, GPU scope) or timeout_ns have passed;
// then writes the GPU time to *done_at if not null. Below limits.frontend_layers: until
// *counter >= 1, in the stream's front end, without a deadline.
void wait_layer(const uint64_t* counter, const uint64_t* expected, int layer,
                const LayerWaitLimits& limits, uint64_t* done_at, cudaStream_t stream);

// The same hand-off inside one process (the single-process baseline): the encoder runs on one
// stream and the decoder on another, which follows it layer by layer through its first flow step.
// Frames stay one at a time (a frame's encoder starts after the previous frame's decoder is
// done), so one generation word serves both sides, and the counters are zeroed at each frame's
// start, which lets every layer's wait but the last hold the decoder's stream in its front end
// (LayerWaitLimits::frontend_layers; PI0_FRONTEND_WAITS=0 keeps them all on the wait kernel).
// The last layer keeps the kernel: the front end polls, and would wake the decoder late there.
//
// A front-end wait has no deadline of its own, so a watchdog thread gives one to each frame: once
// a frame has been the oldest unfinished one for timeout_ns, the watchdog sets the error (1 + the
// first layer not signalled) and lets the frame's waits go. After a timeout the hand-off is spent:
// the waits of the frames after it pass at once (none waits out a deadline of its own), and the
// caller reports the error and stops. Destroying the hand-off lets every wait go.
class InProcessHandoff {
 public:
  InProcessHandoff(int layers, uint64_t timeout_ns);
  ~InProcessHandoff();
  InProcessHandoff(const InProcessHandoff&) = delete;
  InProcessHandoff& operator=(const InProcessHandoff&) = delete;

  // Enqueues a frame's start: the encoder's stream waits for the previous frame's decoder,
  // advances the generation and zeroes the counters, and the decoder's stream waits for that.
  void begin_frame(cudaStream_t encoder, cudaStream_t decoder);
  // Enqueues a frame's end on the decoder's stream, for the next begin_frame, and hands the
  // frame to the watchdog.
  void end_frame(cudaStream_t decoder);
  LayerSignals signals() const;
  LayerWait wait() const;
  const LayerWaitLimits& limits() const { return limits_; }
  // 0, or 1 + the first layer whose wait ran into its deadline. A plain copy, which does not wait
  // for the streams: call it once the frames are done (after synchronizing the decoder's stream).
  uint32_t timed_out_layer() const;

 private:
  class Watchdog;
  int layers_;
  DeviceBuffer<uint64_t> words_;  // the generation, then one counter per layer
  DeviceBuffer<uint32_t> error_;
  Event decoder_started_{cudaEventDisableTiming};
  Event decoder_finished_{cudaEventDisableTiming};
  LayerWaitLimits limits_;
  std::unique_ptr<Watchdog> watchdog_;  // only with front-end waits
};

}  // namespace pi0::cuda
