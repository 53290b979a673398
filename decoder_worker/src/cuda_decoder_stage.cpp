// The CUDA backend of the decoder worker. It maps the encoder's K/V slot pool through CUDA IPC
// once (no copy), and per frame makes its stream wait on the slot's "ready" event, runs the flow
// steps over the mapped K/V, and records "consumed" so the encoder may overwrite the slot.
#include <cstdio>
#include <spdlog/spdlog.h>
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
    stamps_ = cuda::DeviceBuffer<uint64_t>(kStampCount, "decoder timestamps");
    input_pin_ = ipc::HostRegistration(rt.control().input_area(), rt.control().input_area_bytes());
    output_pin_ = ipc::HostRegistration(rt.control().output_area(), rt.control().output_area_bytes());
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_stamps_), sizeof(uint64_t) * kStampCount));

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
    if (host_stamps_) cudaFreeHost(host_stamps_);
  }

  DecodeTiming decode(uint64_t, uint32_t input_slot, uint32_t kv_slot) override {
    cudaStream_t stream = stream_.get();
    auto& c = rt_.control();
    CUDA_CHECK(cudaStreamWaitEvent(stream, ready_[kv_slot].get(), 0));
    start_.record(stream);
    cuda::write_gpu_timestamp(stamps_.get() + 0, stream);
    CUDA_CHECK(cudaMemcpyAsync(stamps_.get() + 1,
                               static_cast<const uint64_t*>(encoder_stamps_.get()) + kv_slot,
                               sizeof(uint64_t), cudaMemcpyDeviceToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(state_.get(), c.state(input_slot), state_.bytes(),
                               cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(noise_.get(), c.noise(input_slot), noise_.bytes(),
                               cudaMemcpyHostToDevice, stream));
    decoder_->decode(slot(kv_slot), state_.get(), noise_.get(), actions_.get(), stream);
    CUDA_CHECK(cudaEventRecord(consumed_[kv_slot].get(), stream));
    cuda::write_gpu_timestamp(stamps_.get() + 2, stream);
    stop_.record(stream);
    CUDA_CHECK(cudaMemcpyAsync(c.actions(input_slot), actions_.get(), actions_.bytes(),
                               cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaMemcpyAsync(host_stamps_, stamps_.get(), sizeof(uint64_t) * kStampCount,
                               cudaMemcpyDeviceToHost, stream));
    stream_.synchronize();

    DecodeTiming t;
    t.decode_ms = stop_.elapsed_since(start_);
    times_.add(t.decode_ms);
    // Handoff: from the later of "encoder finished" and "our previous frame finished" to our
    // start, so time the frame spent queued behind our own previous frame is not counted.
    const uint64_t start = host_stamps_[0], encoder_done = host_stamps_[1];
    const uint64_t ready_at = std::max(encoder_done, previous_end_);
    if (encoder_done != 0 && start >= ready_at) t.handoff_us = static_cast<double>(start - ready_at) / 1e3;
    previous_end_ = host_stamps_[2];
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
  cuda::Event start_, stop_;
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
