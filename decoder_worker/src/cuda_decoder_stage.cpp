// The CUDA backend of the decoder worker. It maps the encoder's K/V slot pool through CUDA IPC
// once (no copy), and per pass makes its stream wait on the "ready" event of each frame's slot,
// runs the flow steps over the mapped K/V, and records "consumed" so the encoder may overwrite
// the slots. As an MPS client, where the two workers run side by side, it waits per layer
// instead (pi0/cuda/layer_signal.hpp): the pass starts while the encoder is still at work, and
// layer l of the first flow step waits for the encoder's signal that layer l of the slot is
// written, so that step runs under the encoder's last layers rather than after them; all layers'
// waits but the last hold the stream in its front end, whose deadline this stage keeps from the
// host (release_oldest_pass). A pass is one frame, or with --decoder-batch N up to N frames that
// were waiting together (pi0/decode_batcher.hpp).
#include <spdlog/spdlog.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <deque>
#include <optional>
#include <thread>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/timestamp.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/decode_batcher.hpp"
#include "pi0/decoder_worker.hpp"
#include "pi0/ipc/cuda_ipc.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

// Device timestamps per frame: [0] decoder start, [1] encoder finished (copied from the
// encoder's IPC buffer), [2] decoder end, [3] with layer waits, when the last layer's wait let the
// pass go.
constexpr int kStampCount = 4;
// Passes started at once: the next one is queued on the stream while the current one runs.
constexpr uint32_t kPassesInFlight = 2;

class CudaDecoderStage final : public DecoderStage {
 public:
  explicit CudaDecoderStage(ipc::WorkerRuntime& rt)
      : rt_(rt),
        batcher_(rt.options().decoder_batch, kPassesInFlight, rt.control().layout().kv_slots) {
    const cuda::DeviceReport device = cuda::open_device();
    rt.describe("cuda", device.name, device.sm_count, device.mps_enabled);
    ipc::WorkerInfo& info = rt.my_info();

    const auto& o = rt.options();
    {
      const WeightStore weights = ipc::load_stage_weights(o, WeightSet::kDecoder);
      CudaEngineOptions engine;
      engine.max_decode_batch = static_cast<int>(o.decoder_batch);
      if (device.mps_enabled && info.active_thread_pct > 0)
        engine.decoder_share_percent = info.active_thread_pct;
      decoder_ = std::make_unique<CudaDecoder>(o.config, o.shape, weights, engine);
    }
    info.weight_bytes = decoder_->weight_bytes();

    // The encoder publishes its handles once its pool exists; it loads weights concurrently.
    auto& cuda_block = rt.control().header().cuda;
    const auto deadline = ipc::WorkerRuntime::after(o.startup_timeout_s);
    const auto await_encoder = [&](uint32_t progress, const char* died, const char* late) {
      while (cuda_block.published.load(std::memory_order_acquire) < progress) {
        PI0_CHECK(rt.peer_alive(), died);
        PI0_CHECK(ipc::Clock::now() < deadline, late);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    };
    await_encoder(ipc::kCudaHandlesPublished,
                  "the encoder worker died before publishing its K/V slots",
                  "the encoder did not publish its K/V slots in time");
    const ipc::ControlLayout& layout = rt.control().layout();
    // Each size is read from shared memory once, so that the value checked here is the value
    // the import maps: a second read could see another. Compared by division, so that no value
    // can overflow the check.
    slot_stride_ =
        std::atomic_ref<uint64_t>(cuda_block.kv_slot_stride).load(std::memory_order_relaxed);
    const uint64_t pool_bytes =
        std::atomic_ref<uint64_t>(cuda_block.kv_pool_bytes).load(std::memory_order_relaxed);
    PI0_CHECK(layout.kv_slots >= 1 &&
                  slot_stride_ >= stage_sizes(o.config, o.shape).kv_slot_values * sizeof(Bf16) &&
                  slot_stride_ <= pool_bytes / layout.kv_slots,
              "the encoder's K/V pool is smaller than this run's slots");
    pool_ = ipc::IpcDeviceMemory::open_imported(cuda_block.kv_pool_handle, pool_bytes);
    layers_ = o.config.lm_layers;
    encoder_stamps_ = ipc::IpcDeviceMemory::open_imported(
        cuda_block.timestamp_handle, ipc::encoder_stamp_bytes(layout.kv_slots, layers_));
    wait_layers_ = cuda::layer_handoff_wanted(device.mps_enabled != 0);
    // Every layer's wait but the last in the stream's front end (pi0/cuda/layer_signal.hpp): a
    // slot's counters must then be 0 until its frame's signals, which the encoder's warm-up
    // (signalling generation 0) would undo. So this warm-up comes after the encoder's, with every
    // counter set, and zeroes them before the first frame; each pass zeroes its slots' counters
    // before it hands them back.
    if (wait_layers_) limits_.frontend_layers = cuda::frontend_wait_layers(layers_);
    if (limits_.frontend_layers > 0) {
      release_.emplace(layers_);
      await_encoder(ipc::kCudaEncoderWarm, "the encoder worker died during its warm-up",
                    "the encoder did not finish its warm-up in time");
    }
    for (uint32_t s = 0; s < layout.kv_slots; ++s) {
      ready_.push_back(ipc::IpcEvent::open_imported(cuda_block.ready_event[s]));
      consumed_.push_back(ipc::IpcEvent::open_imported(cuda_block.consumed_event[s]));
    }
    const uint32_t batch = batcher_.max_batch(), frames = batcher_.max_in_flight();
    state_ = cuda::DeviceBuffer<Bf16>(layout.state_values * batch, "decoder state");
    noise_ = cuda::DeviceBuffer<Bf16>(layout.noise_values * batch, "decoder noise");
    actions_ = cuda::DeviceBuffer<float>(layout.action_values * batch, "decoder actions");
    stamps_ = cuda::DeviceBuffer<uint64_t>(kStampCount * frames, "decoder timestamps");
    // Per slot, the generation its frame's layer waits expect (frame + 1; 0 in the warm-up below,
    // which any slot passes) and when the last of them let the pass go; and the first layer that
    // timed out (0: none).
    expected_ = cuda::DeviceBuffer<uint64_t>(layout.kv_slots, "decoder expected generations");
    expected_host_ = cuda::PinnedBuffer<uint64_t>(layout.kv_slots, "decoder expected generations");
    slot_resumed_ = cuda::DeviceBuffer<uint64_t>(layout.kv_slots, "decoder resumption per slot");
    wait_error_ = cuda::DeviceBuffer<uint32_t>(1, "decoder layer wait error");
    wait_error_host_ = cuda::PinnedBuffer<uint32_t>(1, "decoder layer wait error");
    cuda::zero_device(expected_.get(), expected_.bytes());
    cuda::zero_device(wait_error_.get(), wait_error_.bytes());
    wait_error_host_.get()[0] = 0;
    limits_.error = wait_error_.get();
    limits_.timeout_ns = cuda::kLayerWaitTimeoutNs;
    input_pin_ = ipc::HostRegistration(rt.control().input_area(), rt.control().input_area_bytes());
    output_pin_ =
        ipc::HostRegistration(rt.control().output_area(), rt.control().output_area_bytes());
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_stamps_),
                              sizeof(uint64_t) * kStampCount * frames));

    const size_t counter_bytes = sizeof(uint64_t) * layout.kv_slots * static_cast<size_t>(layers_);
    if (limits_.frontend_layers > 0)  // bytes of 1: >= 1, and >= the warm-up's generation 0
      CUDA_CHECK(cudaMemsetAsync(slot_counters(0), 1, counter_bytes, stream_.get()));
    // Capture the graph of every pass that can come now (the slot contents are whatever is
    // there: the run has not started, and the results are discarded). The encoder hands slots
    // out in ring order, so a pass of n frames holds n consecutive slots.
    for (uint32_t n = 1; n <= std::min(batch, layout.kv_slots); ++n) {
      for (uint32_t first = 0; first < layout.kv_slots; ++first) {
        std::vector<Bf16*> slots;
        for (uint32_t i = 0; i < n; ++i) slots.push_back(slot((first + i) % layout.kv_slots));
        std::vector<cuda::LayerWait> waits;
        for (uint32_t i = 0; i < n; ++i) waits.push_back(layer_wait((first + i) % layout.kv_slots));
        for (int i = 0; i < 2; ++i) {
          decoder_->decode_batch(slots.data(), static_cast<int>(n), state_.get(), noise_.get(),
                                 actions_.get(), stream_.get(),
                                 wait_layers_ ? waits.data() : nullptr, &limits_);
        }
      }
    }
    if (limits_.frontend_layers > 0)
      CUDA_CHECK(cudaMemsetAsync(slot_counters(0), 0, counter_bytes, stream_.get()));
    stream_.synchronize();
    info.device_bytes = decoder_->weight_bytes() + decoder_->workspace_bytes() + state_.bytes() +
                        noise_.bytes() + actions_.bytes();
  }

  ~CudaDecoderStage() override {
    // A pass held in its front end (the encoder died or hung) would hold the frees below for good.
    if (release_ && batcher_.started_passes() != 0)
      release_->release_all(slot_counters(0),
                            rt_.control().layout().kv_slots * static_cast<size_t>(layers_));
    // Passes still started (the run failed) may never finish, e.g. behind the "ready" event of
    // a dead encoder, and would write host_stamps_: leave it to the process's exit.
    if (batcher_.started_passes() == 0 && host_stamps_) cudaFreeHost(host_stamps_);
  }

  uint32_t max_in_flight() const override { return batcher_.max_in_flight(); }

  void submit(uint64_t frame, uint32_t input_slot, uint32_t kv_slot) override {
    batcher_.add();
    frames_.push_back(Frame{input_slot, kv_slot, next_stamp_, frame});
    next_stamp_ = (next_stamp_ + 1) % batcher_.max_in_flight();
    start_passes();
  }

  // A finished pass is only seen by polling its event (a blocking wait would miss the next
  // message), so look often.
  std::chrono::microseconds poll_slice() const override { return std::chrono::microseconds(10); }

  bool wait_oldest(std::chrono::microseconds timeout) override {
    if (batcher_.started_frames() == 0) return false;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (passes_[oldest_pass_].done.done()) return true;
      const auto now = std::chrono::steady_clock::now();
      if (release_ && now - oldest_since_ > std::chrono::nanoseconds(cuda::kLayerWaitTimeoutNs))
        release_oldest_pass();
      if (now >= deadline) return false;
      std::this_thread::yield();
    }
  }

  DecodeTiming complete() override {
    PI0_CHECK(batcher_.started_frames() > 0, "complete() without a started frame");
    Pass& pass = passes_[oldest_pass_];
    // Polled: a pass held in its front end past the deadline is let go there. Its layer waits on
    // the GPU give up at their own deadline, so a pass that has not finished after all of them
    // never will: the worker reports that rather than spin until it is killed.
    const auto limit = std::chrono::nanoseconds(cuda::kLayerWaitTimeoutNs) * (layers_ + 2);
    const auto give_up = std::chrono::steady_clock::now() + limit;
    while (!wait_oldest(std::chrono::milliseconds(100))) {
      PI0_CHECK(
          std::chrono::steady_clock::now() < give_up,
          "a decode pass did not finish within " +
              std::to_string(std::chrono::duration_cast<std::chrono::seconds>(limit).count()) +
              " s (the GPU is stuck or the encoder's K/V never came)");
    }
    // Handoff: from the later of "our previous pass finished" and "the encoder finished the
    // last frame of this pass" to the pass's start. Time queued behind our own previous pass,
    // or waiting on the GPU for a partner's encoding, is latency of the pipeline's shape, not of
    // the handoff, and is not counted. With layer waits a pass may start before the encoder is
    // done; then the handoff ends when the last layer's wait let it go.
    if (pass.completed == 0) {
      pass.ready_at = previous_end_;
      pass.encoder_stamped = true;
      for (uint32_t i = 0; i < pass.count; ++i) {
        const uint64_t encoder_done = host_stamps_[frames_[i].stamp * kStampCount + 1];
        pass.encoder_stamped = pass.encoder_stamped && encoder_done != 0;
        pass.ready_at = std::max(pass.ready_at, encoder_done);
      }
      pass.started_at = host_stamps_[frames_.front().stamp * kStampCount];
      pass.resumed_at = 0;
      pass.ended_at = 0;
      for (uint32_t i = 0; i < pass.count; ++i) {
        const uint64_t* s = host_stamps_ + frames_[i].stamp * kStampCount;
        pass.resumed_at = std::max(pass.resumed_at, s[3]);
        pass.ended_at = std::max(pass.ended_at, s[2]);
      }
    }
    if (wait_error_host_.get()[0] != 0) {
      throw Error("the encoder did not signal layer " +
                  std::to_string(wait_error_host_.get()[0] - 1) + " of a frame's K/V slot within " +
                  std::to_string(cuda::kLayerWaitTimeoutNs / 1'000'000'000ull) +
                  " s: it is dead or hung");
    }
    const Frame f = frames_.front();
    frames_.pop_front();
    --started_in_queue_;
    const uint64_t* stamps = host_stamps_ + f.stamp * kStampCount;

    DecodeTiming t;
    t.decode_ms = pass.stop.elapsed_since(pass.start);
    // A pass that started beside a running encoder spent part of that time waiting for its
    // layers: its decoder time is what came after the later of its start and the encoder's end.
    if (wait_layers_ && pass.encoder_stamped && pass.ended_at > pass.ready_at &&
        pass.started_at < pass.ready_at)
      t.decode_ms = static_cast<double>(pass.ended_at - pass.ready_at) / 1e6;
    // %globaltimer ticks per microsecond and SMs see a tick at slightly different moments: a
    // start up to 2 us "before" the encoder's end is a handoff of 0.
    constexpr uint64_t kTimerSkewNs = 2000;
    const uint64_t handoff_end = pass.started_at + kTimerSkewNs >= pass.ready_at || !wait_layers_
                                     ? pass.started_at
                                     : pass.resumed_at;
    if (pass.encoder_stamped && handoff_end + kTimerSkewNs >= pass.ready_at)
      t.handoff_us =
          static_cast<double>(std::max(handoff_end, pass.ready_at) - pass.ready_at) / 1e3;
    if (++pass.completed == pass.count) {
      times_.add(t.decode_ms);
      previous_end_ = stamps[2];
      batcher_.finish_oldest();
      oldest_pass_ = (oldest_pass_ + 1) % kPassesInFlight;
      oldest_since_ = std::chrono::steady_clock::now();
      start_passes();
    }
    return t;
  }

  const StageTimes& stage_times() const override { return times_; }

  void log_summary() const override {
    if (passes_run_ > 0 && batcher_.max_batch() > 1)
      spdlog::info("decoder: {} frames in {} passes ({:.2f} frames per pass)", frames_run_,
                   passes_run_, static_cast<double>(frames_run_) / passes_run_);
  }

 private:
  struct Frame {
    uint32_t input_slot, kv_slot, stamp;
    uint64_t frame;
  };
  struct Pass {
    cuda::Event start, stop;
    cuda::Event done{cudaEventDisableTiming};     // after the pass's downloads
    cuda::Event decoded{cudaEventDisableTiming};  // after its waits, before its counters are zeroed
    uint32_t count = 0, completed = 0;
    // Device times (ns) of the pass's start, of when it could have started, of when its last
    // layer wait let it go (layer waits only) and of its end (see complete()).
    uint64_t started_at = 0, ready_at = 0, resumed_at = 0, ended_at = 0;
    bool encoder_stamped = false;
  };

  Bf16* slot(uint32_t kv_slot) const {
    return reinterpret_cast<Bf16*>(static_cast<char*>(pool_.get()) + kv_slot * slot_stride_);
  }
  // The layer waits of the frame in `kv_slot`: the encoder's counters for the slot (after its
  // per-slot timestamps), the frame's expected generation, and where the last layer's wait
  // stamps the time it let the pass go (copied to the frame's timestamp [3], where the handoff of
  // a pass that started beside the encoder ends). All per slot, so the graphs are the ones of
  // the slots alone.
  cuda::LayerWait layer_wait(uint32_t kv_slot) const {
    cuda::LayerWait w;
    w.counters = slot_counters(kv_slot);
    w.expected = expected_.get() + kv_slot;
    w.done_at = slot_resumed_.get() + kv_slot;
    return w;
  }

  // The encoder's layer counters of `kv_slot`, after its per-slot timestamps (both sides lay them
  // out from the same config and control layout: an imported allocation does not say its size).
  uint64_t* slot_counters(uint32_t kv_slot) const {
    return static_cast<uint64_t*>(encoder_stamps_.get()) + rt_.control().layout().kv_slots +
           static_cast<size_t>(kv_slot) * layers_;
  }

  // The oldest pass has been the oldest for the layer waits' deadline: its front-end waits, which
  // have none of their own, are let go with the first unsignalled layer named (complete() reports
  // it), and the rest of the pass gets a deadline of its own.
  void release_oldest_pass() {
    const Pass& pass = passes_[oldest_pass_];
    for (uint32_t i = 0; i < pass.count && i < frames_.size(); ++i)
      release_->release_unsignalled(slot_counters(frames_[i].kv_slot), limits_.frontend_layers,
                                    wait_error_.get(), pass.decoded.get());
    oldest_since_ = std::chrono::steady_clock::now();
  }

  void start_passes() {
    for (uint32_t n; (n = batcher_.start_next()) > 0;) start_pass(n);
  }

  // Enqueues the oldest `count` frames that have not started yet as one pass.
  void start_pass(uint32_t count) {
    const size_t first = started_in_queue_;  // started frames lead frames_
    Pass& pass = passes_[(oldest_pass_ + batcher_.started_passes() - 1) % kPassesInFlight];
    if (batcher_.started_passes() == 1) oldest_since_ = std::chrono::steady_clock::now();
    pass.count = count;
    pass.completed = 0;
    cudaStream_t stream = stream_.get();
    auto& c = rt_.control();
    const ipc::ControlLayout& layout = c.layout();
    std::vector<Bf16*> slots;
    std::vector<cuda::LayerWait> waits;
    // state_, noise_ and actions_ serve every pass: one stream orders a pass's uploads after the
    // previous pass's decode, and its decode after the previous pass's action downloads.
    for (uint32_t i = 0; i < count; ++i) {
      const Frame& f = frames_[first + i];
      if (wait_layers_) {
        waits.push_back(layer_wait(f.kv_slot));
      } else {
        CUDA_CHECK(cudaStreamWaitEvent(stream, ready_[f.kv_slot].get(), 0));
      }
      slots.push_back(slot(f.kv_slot));
    }
    // With layer waits the pass's time includes waiting for the encoder's layers.
    pass.start.record(stream);
    auto copy_encoder_stamp = [&](const Frame& f) {
      CUDA_CHECK(cudaMemcpyAsync(stamps_.get() + f.stamp * kStampCount + 1,
                                 static_cast<const uint64_t*>(encoder_stamps_.get()) + f.kv_slot,
                                 sizeof(uint64_t), cudaMemcpyDeviceToDevice, stream));
    };
    for (uint32_t i = 0; i < count; ++i) {
      const Frame& f = frames_[first + i];
      cuda::write_gpu_timestamp(stamps_.get() + f.stamp * kStampCount, stream);
      if (!wait_layers_) copy_encoder_stamp(f);
    }
    for (uint32_t i = 0; i < count && wait_layers_; ++i) {
      // Read by the copy when the stream gets there; the slot's entry is written again only
      // for the slot's next frame, after this pass has consumed it.
      const Frame& f = frames_[first + i];
      expected_host_.get()[f.kv_slot] = f.frame + 1;
      CUDA_CHECK(cudaMemcpyAsync(expected_.get() + f.kv_slot, expected_host_.get() + f.kv_slot,
                                 sizeof(uint64_t), cudaMemcpyHostToDevice, stream));
    }
    for (uint32_t i = 0; i < count; ++i) {
      const Frame& f = frames_[first + i];
      CUDA_CHECK(cudaMemcpyAsync(state_.get() + i * layout.state_values, c.state(f.input_slot),
                                 layout.state_values * sizeof(Bf16), cudaMemcpyHostToDevice,
                                 stream));
      CUDA_CHECK(cudaMemcpyAsync(noise_.get() + i * layout.noise_values, c.noise(f.input_slot),
                                 layout.noise_values * sizeof(Bf16), cudaMemcpyHostToDevice,
                                 stream));
    }
    decoder_->decode_batch(slots.data(), static_cast<int>(count), state_.get(), noise_.get(),
                           actions_.get(), stream, wait_layers_ ? waits.data() : nullptr, &limits_);
    if (release_) pass.decoded.record(stream);
    for (uint32_t i = 0; i < count && wait_layers_; ++i) {
      // When the last layer's wait let the pass go; the encoder stamped its end before
      // signalling that layer.
      const Frame& f = frames_[first + i];
      CUDA_CHECK(cudaMemcpyAsync(stamps_.get() + f.stamp * kStampCount + 3,
                                 slot_resumed_.get() + f.kv_slot, sizeof(uint64_t),
                                 cudaMemcpyDeviceToDevice, stream));
      copy_encoder_stamp(f);
    }
    for (uint32_t i = 0; i < count; ++i) {
      const Frame& f = frames_[first + i];
      // The slot's next frame (after "consumed", which the encoder waits for) must wait for its
      // own signals.
      if (limits_.frontend_layers > 0)
        CUDA_CHECK(
            cudaMemsetAsync(slot_counters(f.kv_slot), 0, sizeof(uint64_t) * layers_, stream));
      CUDA_CHECK(cudaEventRecord(consumed_[f.kv_slot].get(), stream));
      cuda::write_gpu_timestamp(stamps_.get() + f.stamp * kStampCount + 2, stream);
    }
    pass.stop.record(stream);
    for (uint32_t i = 0; i < count; ++i) {
      const Frame& f = frames_[first + i];
      CUDA_CHECK(cudaMemcpyAsync(c.actions(f.input_slot), actions_.get() + i * layout.action_values,
                                 layout.action_values * sizeof(float), cudaMemcpyDeviceToHost,
                                 stream));
      CUDA_CHECK(cudaMemcpyAsync(host_stamps_ + f.stamp * kStampCount,
                                 stamps_.get() + f.stamp * kStampCount,
                                 sizeof(uint64_t) * kStampCount, cudaMemcpyDeviceToHost, stream));
    }
    if (wait_layers_)
      CUDA_CHECK(cudaMemcpyAsync(wait_error_host_.get(), wait_error_.get(), sizeof(uint32_t),
                                 cudaMemcpyDeviceToHost, stream));
    pass.done.record(stream);
    started_in_queue_ += count;
    ++passes_run_;
    frames_run_ += count;
  }

  ipc::WorkerRuntime& rt_;
  DecodeBatcher batcher_;
  std::unique_ptr<CudaDecoder> decoder_;
  cuda::Stream stream_;
  size_t slot_stride_ = 0;
  ipc::IpcDeviceMemory pool_;
  ipc::IpcDeviceMemory encoder_stamps_;
  int layers_ = 0;
  bool wait_layers_ = false;
  cuda::DeviceBuffer<uint64_t> expected_, slot_resumed_;
  cuda::PinnedBuffer<uint64_t> expected_host_;
  cuda::DeviceBuffer<uint32_t> wait_error_;
  cuda::PinnedBuffer<uint32_t> wait_error_host_;
  cuda::LayerWaitLimits limits_;
  std::optional<cuda::FrontendWaitRelease> release_;      // with front-end waits
  std::chrono::steady_clock::time_point oldest_since_{};  // when the oldest pass became it
  std::vector<ipc::IpcEvent> ready_, consumed_;
  std::deque<Frame> frames_;  // started frames first (oldest first), then waiting ones
  size_t started_in_queue_ = 0;
  std::array<Pass, kPassesInFlight> passes_;
  uint32_t oldest_pass_ = 0, next_stamp_ = 0;
  uint64_t passes_run_ = 0, frames_run_ = 0;
  cuda::DeviceBuffer<Bf16> state_, noise_;
  cuda::DeviceBuffer<float> actions_;
  cuda::DeviceBuffer<uint64_t> stamps_;
  uint64_t* host_stamps_ = nullptr;
  uint64_t previous_end_ = 0;
  ipc::HostRegistration input_pin_, output_pin_;
  StageTimes times_;
};

}  // namespace

std::unique_ptr<DecoderStage> make_cuda_decoder_stage(ipc::WorkerRuntime& rt) {
  return std::make_unique<CudaDecoderStage>(rt);
}

}  // namespace pi0
