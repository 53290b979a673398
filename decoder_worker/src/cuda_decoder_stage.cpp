// The CUDA backend of the decoder worker. It maps the encoder's K/V slot pool through CUDA IPC
// once (no copy), and per frame makes its stream wait on the slot's "ready" event, runs the flow
// steps over the mapped K/V, and records "consumed" so the encoder may overwrite the slot.
#include <spdlog/spdlog.h>
#include <array>
#include <cstdio>
#include <thread>

#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/cuda/timestamp.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/decoder_worker.hpp"
#include "pi0/ipc/cuda_ipc.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

// Device timestamps per frame: [0] decoder start, [1] encoder finished (copied from the
// encoder's IPC buffer), [2] decoder end.
constexpr int kStampCount = 3;
// Frames queued on the stream at once: the next one is queued while the current one runs.
constexpr uint32_t kInFlight = 2;

class CudaDecoderStage final : public DecoderStage {
 public:
  explicit CudaDecoderStage(ipc::WorkerRuntime& rt) : rt_(rt) {
    const cuda::DeviceReport device = cuda::open_device();
    rt.describe("cuda", device.name, device.sm_count, device.mps_enabled);
    ipc::WorkerInfo& info = rt.my_info();

    const auto& o = rt.options();
    {
      const WeightStore weights = ipc::load_stage_weights(o, WeightSet::kDecoder);
      decoder_ = std::make_unique<CudaDecoder>(o.config, o.shape, weights);
    }
    info.weight_bytes = decoder_->weight_bytes();

    // The encoder publishes its handles once its pool exists; it loads weights concurrently.
    auto& cuda_block = rt.control().header().cuda;
    const auto deadline = ipc::WorkerRuntime::after(o.startup_timeout_s);
    while (cuda_block.published.load(std::memory_order_acquire) != 1) {
      PI0_CHECK(rt.peer_alive(), "the encoder worker died before publishing its K/V slots");
      PI0_CHECK(ipc::Clock::now() < deadline, "the encoder did not publish its K/V slots in time");
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    const ipc::ControlLayout& layout = rt.control().layout();
    slot_stride_ = cuda_block.kv_slot_stride;
    PI0_CHECK(slot_stride_ >= stage_sizes(o.config, o.shape).kv_slot_values * sizeof(Bf16) &&
                  cuda_block.kv_pool_bytes >= slot_stride_ * layout.kv_slots,
              "the encoder's K/V pool is smaller than this run's slots");
    pool_ = ipc::IpcDeviceMemory::open_imported(cuda_block.kv_pool_handle);
    encoder_stamps_ = ipc::IpcDeviceMemory::open_imported(cuda_block.timestamp_handle);
    for (uint32_t s = 0; s < layout.kv_slots; ++s) {
      ready_.push_back(ipc::IpcEvent::open_imported(cuda_block.ready_event[s]));
      consumed_.push_back(ipc::IpcEvent::open_imported(cuda_block.consumed_event[s]));
    }
    state_ = cuda::DeviceBuffer<Bf16>(layout.state_values, "decoder state");
    noise_ = cuda::DeviceBuffer<Bf16>(layout.noise_values, "decoder noise");
    actions_ = cuda::DeviceBuffer<float>(layout.action_values, "decoder actions");
    stamps_ = cuda::DeviceBuffer<uint64_t>(kStampCount * kInFlight, "decoder timestamps");
    input_pin_ = ipc::HostRegistration(rt.control().input_area(), rt.control().input_area_bytes());
    output_pin_ =
        ipc::HostRegistration(rt.control().output_area(), rt.control().output_area_bytes());
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_stamps_),
                              sizeof(uint64_t) * kStampCount * kInFlight));

    // Capture the graph of every slot now (the slot contents are whatever is there: the run
    // has not started, and the results are discarded).
    for (uint32_t s = 0; s < layout.kv_slots; ++s) {
      for (int i = 0; i < 2; ++i) {
        decoder_->decode(slot(s), state_.get(), noise_.get(), actions_.get(), stream_.get());
      }
    }
    stream_.synchronize();
    info.device_bytes = decoder_->weight_bytes() + decoder_->workspace_bytes() + state_.bytes() +
                        noise_.bytes() + actions_.bytes();
  }

  ~CudaDecoderStage() override {
    // Frames still in flight (the run failed) may never finish, e.g. behind the "ready" event of
    // a dead encoder, and would write host_stamps_: leave it to the process's exit.
    if (in_flight_ == 0 && host_stamps_) cudaFreeHost(host_stamps_);
  }

  uint32_t max_in_flight() const override { return kInFlight; }

  void submit(uint64_t, uint32_t input_slot, uint32_t kv_slot) override {
    PI0_CHECK(in_flight_ < kInFlight, "more decoder frames submitted than can be in flight");
    const uint32_t i = (oldest_ + in_flight_) % kInFlight;
    Frame& f = frames_[i];
    cudaStream_t stream = stream_.get();
    auto& c = rt_.control();
    uint64_t* stamps = stamps_.get() + i * kStampCount;
    // state_, noise_ and actions_ serve every frame: one stream orders a frame's uploads after
    // the previous frame's decode, and its decode after the previous frame's action download.
    CUDA_CHECK(cudaStreamWaitEvent(stream, ready_[kv_slot].get(), 0));
    f.start.record(stream);
    cuda::write_gpu_timestamp(stamps + 0, stream);
    CUDA_CHECK(cudaMemcpyAsync(stamps + 1,
                               static_cast<const uint64_t*>(encoder_stamps_.get()) + kv_slot,
                               sizeof(uint64_t), cudaMemcpyDeviceToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(state_.get(), c.state(input_slot), state_.bytes(),
                               cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(noise_.get(), c.noise(input_slot), noise_.bytes(),
                               cudaMemcpyHostToDevice, stream));
    decoder_->decode(slot(kv_slot), state_.get(), noise_.get(), actions_.get(), stream);
    CUDA_CHECK(cudaEventRecord(consumed_[kv_slot].get(), stream));
    cuda::write_gpu_timestamp(stamps + 2, stream);
    f.stop.record(stream);
    CUDA_CHECK(cudaMemcpyAsync(c.actions(input_slot), actions_.get(), actions_.bytes(),
                               cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaMemcpyAsync(host_stamps_ + i * kStampCount, stamps,
                               sizeof(uint64_t) * kStampCount, cudaMemcpyDeviceToHost, stream));
    f.done.record(stream);
    ++in_flight_;
  }

  // A finished frame is only seen by polling its event (a blocking wait would miss the next
  // message), so look often.
  std::chrono::microseconds poll_slice() const override { return std::chrono::microseconds(10); }

  bool wait_oldest(std::chrono::microseconds timeout) override {
    if (in_flight_ == 0) return false;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (frames_[oldest_].done.done()) return true;
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::yield();
    }
  }

  DecodeTiming complete() override {
    PI0_CHECK(in_flight_ > 0, "complete() without a submitted frame");
    const Frame& f = frames_[oldest_];
    f.done.synchronize();
    const uint64_t* stamps = host_stamps_ + oldest_ * kStampCount;
    oldest_ = (oldest_ + 1) % kInFlight;
    --in_flight_;

    DecodeTiming t;
    t.decode_ms = f.stop.elapsed_since(f.start);
    times_.add(t.decode_ms);
    // Handoff: from the later of "encoder finished" and "our previous frame finished" to our
    // start, so time the frame spent queued behind our own previous frame is not counted.
    const uint64_t start = stamps[0], encoder_done = stamps[1];
    const uint64_t ready_at = std::max(encoder_done, previous_end_);
    if (encoder_done != 0 && start >= ready_at)
      t.handoff_us = static_cast<double>(start - ready_at) / 1e3;
    previous_end_ = stamps[2];
    return t;
  }

  const StageTimes& stage_times() const override { return times_; }

 private:
  Bf16* slot(uint32_t kv_slot) const {
    return reinterpret_cast<Bf16*>(static_cast<char*>(pool_.get()) + kv_slot * slot_stride_);
  }

  ipc::WorkerRuntime& rt_;
  std::unique_ptr<CudaDecoder> decoder_;
  cuda::Stream stream_;
  size_t slot_stride_ = 0;
  ipc::IpcDeviceMemory pool_;
  ipc::IpcDeviceMemory encoder_stamps_;
  std::vector<ipc::IpcEvent> ready_, consumed_;
  struct Frame {
    cuda::Event start, stop;
    cuda::Event done{cudaEventDisableTiming};  // after the frame's downloads
  };
  std::array<Frame, kInFlight> frames_;
  uint32_t oldest_ = 0, in_flight_ = 0;
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
