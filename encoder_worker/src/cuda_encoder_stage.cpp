// The CUDA backend of the encoder worker. It owns the prefix K/V slot pool (one device allocation,
// exported through CUDA IPC) and, per slot, a "ready" event it records after its last write and a
// "consumed" event the decoder records after its last read, which it waits on before overwriting.
// As an MPS client it also signals each Gemma layer of a slot as written
// (pi0/cuda/layer_signal.hpp: per-layer counters after the per-slot timestamps in the exported
// timestamp buffer), so that the decoder, running beside it, can start its first flow step before
// the whole slot is done.
#include <spdlog/spdlog.h>
#include <cstdio>
#include <string>

#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/timestamp.hpp"
#include "pi0/cuda_encoder.hpp"
#include "pi0/encoder_worker.hpp"
#include "pi0/ipc/cuda_ipc.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

constexpr size_t kSlotAlignment = size_t{2} << 20;

class CudaEncoderStage final : public EncoderStage {
 public:
  explicit CudaEncoderStage(ipc::WorkerRuntime& rt) : rt_(rt) {
    const cuda::DeviceReport device = cuda::open_device();
    rt.describe("cuda", device.name, device.sm_count, device.mps_enabled);
    ipc::WorkerInfo& info = rt.my_info();

    const auto& o = rt.options();
    {
      const WeightStore weights = ipc::load_stage_weights(o, WeightSet::kEncoder);
      encoder_ = std::make_unique<CudaEncoder>(o.config, o.shape, weights);
    }
    info.weight_bytes = encoder_->weight_bytes();

    auto& cuda_block = rt.control().header().cuda;
    const ipc::ControlLayout& layout = rt.control().layout();
    const size_t slot_bytes = stage_sizes(o.config, o.shape).kv_slot_values * sizeof(Bf16);
    slot_stride_ = (slot_bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
    pool_ = ipc::IpcDeviceMemory::allocate_exported(slot_stride_ * layout.kv_slots,
                                                    cuda_block.kv_pool_handle);
    // Per slot: the GPU time its encoding finished, then (after all slots') a counter per Gemma
    // layer holding the generation (frame + 1) last written there; 0 is no frame.
    layers_ = o.config.lm_layers;
    timestamps_ = ipc::IpcDeviceMemory::allocate_exported(
        ipc::encoder_stamp_bytes(layout.kv_slots, layers_), cuda_block.timestamp_handle);
    cuda::zero_device(timestamps_.get(), timestamps_.bytes());
    signal_layers_ = cuda::layer_handoff_wanted(device.mps_enabled != 0);
    // A Gemma layer, 0..layers - 1; unset or empty: none (as every PI0_* number reads).
    const long layer = env_integer("PI0_TEST_WITHHOLD_LAYER_SIGNAL", 0, layers_ - 1, -1);
    if (layer >= 0) {
      // Only the per-layer hand-off reads the layer signals: elsewhere nothing would be withheld.
      PI0_CHECK(signal_layers_,
                "PI0_TEST_WITHHOLD_LAYER_SIGNAL needs the per-layer hand-off (an MPS client, "
                "without PI0_LAYER_WAITS=0)");
      withheld_layer_ = static_cast<int>(layer);
      spdlog::warn(
          "fault injection: the encoder never signals its layer {} "
          "(PI0_TEST_WITHHOLD_LAYER_SIGNAL)",
          withheld_layer_);
    }
    generation_ = cuda::DeviceBuffer<uint64_t>(layout.kv_slots, "encoder frame generations");
    cuda::zero_device(generation_.get(), generation_.bytes());
    generation_host_ = cuda::PinnedBuffer<uint64_t>(layout.kv_slots, "encoder frame generations");
    // The driver makes a file in /dev/shm for the exported events and leaves it behind: recorded
    // here by identity, so that only this file is removed (pi0/ipc/shm.hpp).
    const ipc::CudaEventFileWatch event_files;
    try {
      for (uint32_t s = 0; s < layout.kv_slots; ++s) {
        ready_.push_back(ipc::IpcEvent::create_exported(cuda_block.ready_event[s]));
        consumed_.push_back(ipc::IpcEvent::create_exported(cuda_block.consumed_event[s]));
        start_.emplace_back(cudaEventDefault);
        stop_.emplace_back(cudaEventDefault);
      }
    } catch (...) {
      // The events made before the failure have their file already: recorded, it is removed
      // once we are reaped; unrecorded, it would stay in /dev/shm for good.
      event_files.record(info.event_files);
      throw;
    }
    spdlog::debug("the CUDA driver made {} file(s) in /dev/shm for the exported events",
                  event_files.record(info.event_files));
    timing_pending_.assign(layout.kv_slots, false);
    cuda_block.kv_pool_bytes = pool_.bytes();
    cuda_block.kv_slot_stride = slot_stride_;
    images_ = cuda::DeviceBuffer<Bf16>(layout.image_values, "encoder input images");
    input_pin_ = ipc::HostRegistration(rt.control().input_area(), rt.control().input_area_bytes());
    cuda_block.published.store(ipc::kCudaHandlesPublished, std::memory_order_release);

    // Warm up and capture the graph of every slot now, so the first frames run at full speed.
    for (uint32_t s = 0; s < layout.kv_slots; ++s) {
      const cuda::LayerSignals signals = layer_signals(s);  // generation 0: signals nothing
      for (int i = 0; i < 2; ++i)
        encoder_->encode(images_.get(), slot(s), stream_.get(),
                         signal_layers_ ? &signals : nullptr);
    }
    stream_.synchronize();
    cuda_block.published.store(ipc::kCudaEncoderWarm, std::memory_order_release);
    info.device_bytes =
        encoder_->weight_bytes() + encoder_->workspace_bytes() + pool_.bytes() + images_.bytes();
  }

  void encode(uint64_t frame, uint32_t input_slot, uint32_t kv_slot) override {
    cudaStream_t stream = stream_.get();
    // The decoder's reads of this slot's previous frame come first (a never-recorded event
    // counts as complete).
    CUDA_CHECK(cudaStreamWaitEvent(stream, consumed_[kv_slot].get(), 0));
    start_[kv_slot].record(stream);
    CUDA_CHECK(cudaMemcpyAsync(images_.get(), rt_.control().images(input_slot), images_.bytes(),
                               cudaMemcpyHostToDevice, stream));
    if (signal_layers_) {
      // Read by the copy when the stream gets there; this slot's entry is not written again
      // before the decoder has consumed the slot, long after.
      generation_host_.get()[kv_slot] = frame + 1;
      CUDA_CHECK(cudaMemcpyAsync(generation_.get() + kv_slot, generation_host_.get() + kv_slot,
                                 sizeof(uint64_t), cudaMemcpyHostToDevice, stream));
      const cuda::LayerSignals signals = layer_signals(kv_slot);  // stamps the slot's end too
      encoder_->encode(images_.get(), slot(kv_slot), stream, &signals);
    } else {
      encoder_->encode(images_.get(), slot(kv_slot), stream);
      cuda::write_gpu_timestamp(static_cast<uint64_t*>(timestamps_.get()) + kv_slot, stream);
    }
    stop_[kv_slot].record(stream);
    CUDA_CHECK(cudaEventRecord(ready_[kv_slot].get(), stream));
    timing_pending_[kv_slot] = true;
  }

  void slot_returned(uint32_t kv_slot) override {
    if (!timing_pending_[kv_slot]) return;
    timing_pending_[kv_slot] = false;
    // The decoder has waited on "ready", so this frame's encoder work has completed.
    stop_[kv_slot].synchronize();
    times_.add(stop_[kv_slot].elapsed_since(start_[kv_slot]));
  }

  const StageTimes& stage_times() const override { return times_; }

 private:
  Bf16* slot(uint32_t kv_slot) const {
    return reinterpret_cast<Bf16*>(static_cast<char*>(pool_.get()) + kv_slot * slot_stride_);
  }
  cuda::LayerSignals layer_signals(uint32_t kv_slot) const {
    uint64_t* stamps = static_cast<uint64_t*>(timestamps_.get());
    const size_t slots = rt_.control().layout().kv_slots;
    cuda::LayerSignals s;
    s.counters = stamps + slots + static_cast<size_t>(kv_slot) * layers_;
    s.generation = generation_.get() + kv_slot;
    s.last_stamp = stamps + kv_slot;
    s.withheld_layer = withheld_layer_;
    return s;
  }

  ipc::WorkerRuntime& rt_;
  std::unique_ptr<CudaEncoder> encoder_;
  cuda::Stream stream_;
  size_t slot_stride_ = 0;
  ipc::IpcDeviceMemory pool_;
  ipc::IpcDeviceMemory timestamps_;
  int layers_ = 0;
  bool signal_layers_ = false;
  int withheld_layer_ = -1;
  cuda::DeviceBuffer<uint64_t> generation_;
  cuda::PinnedBuffer<uint64_t> generation_host_;
  std::vector<ipc::IpcEvent> ready_, consumed_;
  std::vector<cuda::Event> start_, stop_;
  std::vector<bool> timing_pending_;
  cuda::DeviceBuffer<Bf16> images_;
  ipc::HostRegistration input_pin_;
  StageTimes times_;
};

}  // namespace

std::unique_ptr<EncoderStage> make_cuda_encoder_stage(ipc::WorkerRuntime& rt) {
  return std::make_unique<CudaEncoderStage>(rt);
}

}  // namespace pi0
