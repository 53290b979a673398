// The front-end layer waits (the driver's stream memory operations) and the single-process
// hand-off with the watchdog that gives those waits their deadline (pi0/cuda/layer_signal.hpp).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "pi0/cuda/driver_entry.hpp"
#include "layer_wait_internal.hpp"
#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/layer_signal.hpp"

namespace pi0::cuda {
namespace {

struct MemOpCalls {
  PFN_cuStreamWaitValue64_v11070 wait64 = nullptr;
  PFN_cuStreamWriteValue64_v11070 write64 = nullptr;
  PFN_cuStreamWriteValue32_v11070 write32 = nullptr;
  PFN_cuDeviceGetAttribute_v2000 attribute = nullptr;
};

const MemOpCalls& memop_calls() {
  static const MemOpCalls calls = [] {
    MemOpCalls c;
    load_driver_call("cuStreamWaitValue64", 11070, c.wait64);
    load_driver_call("cuStreamWriteValue64", 11070, c.write64);
    load_driver_call("cuStreamWriteValue32", 11070, c.write32);
    load_driver_call("cuDeviceGetAttribute", 2000, c.attribute);
    return c;
  }();
  return calls;
}

void check_driver(CUresult result, const char* what) {
  if (result != CUDA_SUCCESS)
    throw Error(std::string(what) + " failed (CUresult " + std::to_string(result) + ")");
}

}  // namespace

bool frontend_waits_enabled() {
  return env_switch("PI0_FRONTEND_WAITS", true) && frontend_waits_supported();
}

int frontend_wait_layers(int layers) {
  return layers > 1 && frontend_waits_enabled() ? layers - 1 : 0;
}

bool frontend_waits_supported() {
  const MemOpCalls& c = memop_calls();
  if (!c.wait64 || !c.write64 || !c.write32 || !c.attribute) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  int can = 0;
  return c.attribute(&can, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device) ==
             CUDA_SUCCESS &&
         can != 0;
}

void hold_stream_until_set(const uint64_t* counter, cudaStream_t stream) {
  PI0_CHECK(memop_calls().wait64, "front-end waits: the driver has no cuStreamWaitValue64");
  check_driver(
      memop_calls().wait64(reinterpret_cast<CUstream>(stream),
                           reinterpret_cast<CUdeviceptr>(counter), 1, CU_STREAM_WAIT_VALUE_GEQ),
      "cuStreamWaitValue64");
}

namespace {

template <typename Word, typename Write>
void write_with(Write write, const char* name, Word* word, Word value, cudaStream_t stream) {
  PI0_CHECK(write, std::string("front-end waits: the driver has no ") + name);
  check_driver(write(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(word), value,
                     CU_STREAM_WRITE_VALUE_DEFAULT),
               name);
}

}  // namespace

void write_word(uint64_t* word, uint64_t value, cudaStream_t stream) {
  write_with(memop_calls().write64, "cuStreamWriteValue64", word, value, stream);
}

void write_word(uint32_t* word, uint32_t value, cudaStream_t stream) {
  write_with(memop_calls().write32, "cuStreamWriteValue32", word, value, stream);
}

FrontendWaitRelease::FrontendWaitRelease(int layers)
    : layers_(layers),
      counters_seen_(static_cast<size_t>(std::max(layers, 1)), "front-end wait counters seen"),
      error_seen_(1, "front-end wait error seen") {}

void FrontendWaitRelease::finish_within_deadline() {
  // A stream memory operation orders work where CUDA cannot see it: were this stream to share a
  // hardware queue with the held one, it would queue behind it for good. Bounded, so that the
  // caller reports that instead of hanging.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (;;) {
    const cudaError_t state = cudaStreamQuery(stream_.get());
    if (state == cudaSuccess) return;
    if (state != cudaErrorNotReady) CUDA_CHECK(state);
    if (std::chrono::steady_clock::now() > deadline)
      throw Error("front-end layer waits: the stream that lets them go did not finish in 2 s");
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

uint32_t FrontendWaitRelease::release_unsignalled(uint64_t* counters, int frontend_layers,
                                                  uint32_t* error, cudaEvent_t past_waits) {
  cudaStream_t s = stream_.get();
  CUDA_CHECK(cudaMemcpyAsync(counters_seen_.get(), counters, counters_seen_.bytes(),
                             cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(
      cudaMemcpyAsync(error_seen_.get(), error, error_seen_.bytes(), cudaMemcpyDeviceToHost, s));
  finish_within_deadline();
  // Got past its waits meanwhile: the counters read may already be zeroed for the next frame.
  const cudaError_t passed = cudaEventQuery(past_waits);
  if (passed != cudaErrorNotReady) {
    if (passed != cudaSuccess) (void)cudaGetLastError();
    return 0;
  }
  int first = -1;
  for (int l = 0; l < layers_ && first < 0; ++l)
    if (counters_seen_.get()[l] == 0) first = l;
  // A counter set while the last layer's wait kernel runs would pass it as if signalled.
  if (first < 0 || first >= frontend_layers) return 0;
  // The error first: the last layer's wait kernel, let go by the counters below, then skips.
  if (error_seen_.get()[0] == 0) write_word(error, static_cast<uint32_t>(first + 1), s);
  for (int l = first; l < layers_; ++l)
    if (counters_seen_.get()[l] == 0) write_word(counters + l, kPastAnyGeneration, s);
  finish_within_deadline();
  return static_cast<uint32_t>(first + 1);
}

void FrontendWaitRelease::release_all(uint64_t* counters, size_t count) noexcept {
  try {
    for (size_t i = 0; i < count; ++i) write_word(counters + i, kPastAnyGeneration, stream_.get());
    finish_within_deadline();
  } catch (const std::exception& e) {
    spdlog::warn("front-end layer waits: letting them go failed: {}", e.what());
  }
}

// Frames enter at end_frame (an event recorded after the frame's decoder); the thread looks at
// the oldest every poll. Everything it enqueues goes on its own stream as memory operations, which
// a held stream cannot delay.
class InProcessHandoff::Watchdog {
 public:
  Watchdog(int layers, int frontend_layers, uint64_t timeout_ns, uint64_t* words, uint32_t* error)
      : layers_(layers),
        frontend_layers_(frontend_layers),
        timeout_(std::chrono::nanoseconds(timeout_ns)),
        poll_(std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(timeout_ / 8),
                         std::chrono::milliseconds(1), std::chrono::milliseconds(50))),
        words_(words),
        error_(error),
        release_(layers),
        thread_([this] { run(); }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
    // Frames still held (the caller is unwinding) must not hang the frees that follow, nor read
    // the counters after them: the counters are set past any generation, and the frames are
    // given a moment to get past their waits.
    release_.release_all(words_ + 1, static_cast<size_t>(layers_));
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    while (!pending_.empty() && cudaEventQuery(pending_.back().end.get()) == cudaErrorNotReady &&
           Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

  // Called by the frame's thread after enqueueing the frame's end.
  void frame_ended(cudaStream_t decoder) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (spare_.empty()) spare_.emplace_back(cudaEventDisableTiming);
    Event end = std::move(spare_.back());
    spare_.pop_back();
    end.record(decoder);
    pending_.push_back({std::move(end), Clock::now()});
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Frame {
    Event end;
    Clock::time_point ended_enqueued;
  };

  void run() {
    Clock::time_point oldest_since{};  // when the current oldest frame became the oldest
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      wake_.wait_for(lock, poll_);
      while (!stop_ && !pending_.empty()) {
        const cudaError_t state = cudaEventQuery(pending_.front().end.get());
        if (state == cudaErrorNotReady) break;
        // A failed frame is the frame thread's to report (its synchronize returns the error).
        if (state != cudaSuccess) (void)cudaGetLastError();
        spare_.push_back(std::move(pending_.front().end));
        pending_.pop_front();
        oldest_since = Clock::now();
      }
      if (stop_ || pending_.empty()) continue;
      const Clock::time_point since = std::max(oldest_since, pending_.front().ended_enqueued);
      if (Clock::now() - since < timeout_) continue;
      // The frame's thread only appends: the oldest entry stays where it is while unlocked.
      const cudaEvent_t oldest_end = pending_.front().end.get();
      lock.unlock();
      try {
        release_oldest(oldest_end);
      } catch (const std::exception& e) {
        spdlog::error("in-process hand-off: releasing a held frame failed: {}", e.what());
      }
      lock.lock();
      oldest_since = Clock::now();  // its waits are let go; give the rest of it a deadline too
    }
  }

  // The oldest frame is past its deadline: name the first layer not signalled yet (unless a wait
  // kernel named one already) and let its waits go.
  void release_oldest(cudaEvent_t oldest_end) {
    const uint32_t layer =
        release_.release_unsignalled(words_ + 1, frontend_layers_, error_, oldest_end);
    if (layer != 0)
      spdlog::error(
          "in-process hand-off: the encoder's layer {} was not signalled within {} ms; "
          "the decoder's waits were let go",
          layer - 1, std::chrono::duration_cast<std::chrono::milliseconds>(timeout_).count());
  }

  const int layers_, frontend_layers_;
  const std::chrono::nanoseconds timeout_;
  const std::chrono::milliseconds poll_;
  uint64_t* const words_;
  uint32_t* const error_;
  FrontendWaitRelease release_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::deque<Frame> pending_;
  std::vector<Event> spare_;
  std::thread thread_;  // last: it starts once everything above is built
};

InProcessHandoff::InProcessHandoff(int layers, uint64_t timeout_ns)
    : layers_(std::max(layers, 1)),
      words_(static_cast<size_t>(1 + std::max(layers, 1)), "in-process layer counters"),
      error_(1, "in-process layer wait error") {
  PI0_CHECK(layers >= 1, "InProcessHandoff: a model without layers");
  PI0_CHECK(timeout_ns > 0, "InProcessHandoff: a wait needs a deadline");
  zero_device(words_.get(), words_.bytes());
  zero_device(error_.get(), error_.bytes());
  limits_.error = error_.get();
  limits_.timeout_ns = timeout_ns;
  load_layer_signal_kernels();
  limits_.frontend_layers = frontend_wait_layers(layers);
  if (limits_.frontend_layers > 0) {
    watchdog_ = std::make_unique<Watchdog>(layers, limits_.frontend_layers, timeout_ns,
                                           words_.get(), error_.get());
  }
}

InProcessHandoff::~InProcessHandoff() = default;

void InProcessHandoff::begin_frame(cudaStream_t encoder, cudaStream_t decoder) {
  // Waiting on an event not recorded yet (the first frame) is a no-op. The counters are zeroed
  // here, after the previous frame's decoder and before this frame's signals, so that a front-end
  // wait (counter >= 1) passes only on this frame's signal.
  CUDA_CHECK(cudaStreamWaitEvent(encoder, decoder_finished_.get(), 0));
  begin_generation(words_.get(), words_.get() + 1, layers_, error_.get(), encoder);
  decoder_started_.record(encoder);
  CUDA_CHECK(cudaStreamWaitEvent(decoder, decoder_started_.get(), 0));
}

void InProcessHandoff::end_frame(cudaStream_t decoder) {
  // The watchdog's event first: while it is pending, so is the next frame's start, which zeroes
  // the counters (see release_unsignalled).
  if (watchdog_) watchdog_->frame_ended(decoder);
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
