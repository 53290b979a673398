// The per-run control segment: a header, the message rings between the three processes, the
// frame input slots, the action output slots and (CPU backend) the prefix K/V slots.
// Every process computes the layout itself from the run's config and only checks that the header
// agrees; offsets read from shared memory are never used unchecked.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/ipc/ring.hpp"
#include "pi0/ipc/shm.hpp"

namespace pi0::ipc {

inline constexpr uint32_t kControlMagic = 0x5030'4342;  // "P0CB"
inline constexpr uint32_t kControlVersion = 2;          // 2: the workers' error texts
inline constexpr uint32_t kMaxKvSlots = 8;
inline constexpr uint32_t kRingCapacity = 64;
inline constexpr size_t kCudaIpcHandleBytes = 64;  // cudaIpcMemHandle_t / cudaIpcEventHandle_t

enum class RingId : uint32_t {
  kOrchToEncoder = 0,  // kFrameInput, kStop
  kEncoderToDecoder,   // kSlotReady, kStop
  kDecoderToEncoder,   // kSlotFree
  kDecoderToOrch,      // kWorkerReady, kFrameDone, kError, kStopped
  kEncoderToOrch,      // kWorkerReady, kError, kStopped
  kCount
};
inline constexpr uint32_t kRingCount = static_cast<uint32_t>(RingId::kCount);

// What a worker tells the orchestrator about itself before it reports ready.
struct WorkerInfo {
  int32_t pid;
  int32_t sm_count;    // cudaDevAttrMultiProcessorCount as this process sees it (MPS-limited)
  int32_t mps_client;  // 1 if this process is an MPS client, 0 if not, -1 unknown / CPU
  int32_t active_thread_pct;  // CUDA_MPS_ACTIVE_THREAD_PERCENTAGE it was started with, or -1
  uint64_t weight_bytes;      // bytes of weights this process holds (host or device)
  uint64_t device_bytes;      // device memory this process allocated (0 on the CPU backend)
  double stage_ms_median;     // filled in at exit: this stage's median time per frame
  double stage_ms_mean;
  uint64_t frames;
  char backend[16];
  char device_name[64];
  CudaEventFiles event_files;  // the files the driver made for its interprocess events
};
static_assert(std::is_standard_layout_v<WorkerInfo> && std::is_trivially_copyable_v<WorkerInfo>);
static_assert(sizeof(WorkerInfo) == 136 + sizeof(CudaEventFiles));
// pid is written by its worker and read by the other one through std::atomic_ref.
static_assert(std::atomic_ref<int32_t>::is_always_lock_free &&
              offsetof(WorkerInfo, pid) % std::atomic_ref<int32_t>::required_alignment == 0);

// CUDA IPC handles the encoder publishes for the decoder (CUDA backend).
struct CudaIpcBlock {
  uint8_t kv_pool_handle[kCudaIpcHandleBytes];
  uint8_t ready_event[kMaxKvSlots][kCudaIpcHandleBytes];
  uint8_t consumed_event[kMaxKvSlots][kCudaIpcHandleBytes];
  uint8_t timestamp_handle[kCudaIpcHandleBytes];  // device buffer of GPU timestamps (handoff)
  uint64_t kv_pool_bytes;
  uint64_t kv_slot_stride;
  // The encoder's progress: kCudaHandlesPublished, then kCudaEncoderWarm.
  std::atomic<uint32_t> published;
  uint32_t reserved;
};
// The bytes behind timestamp_handle: a finish time per K/V slot, then a counter per slot and Gemma
// layer. The encoder allocates them and the decoder maps them, each sizing them alike.
inline size_t encoder_stamp_bytes(uint32_t kv_slots, int lm_layers) {
  return sizeof(uint64_t) * kv_slots * (1 + static_cast<size_t>(lm_layers));
}
// Every handle above is written.
inline constexpr uint32_t kCudaHandlesPublished = 1;
// And the encoder's warm-up is done: from now on it writes the slots' layer counters only for
// frames (the decoder's front-end waits need them at 0 until then).
inline constexpr uint32_t kCudaEncoderWarm = 2;
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(std::is_standard_layout_v<CudaIpcBlock>);
static_assert(sizeof(CudaIpcBlock) == (2 + 2 * kMaxKvSlots) * kCudaIpcHandleBytes +
                                          2 * sizeof(uint64_t) + 2 * sizeof(uint32_t));

// Byte layout of the segment: a pure function of the run's parameters.
struct ControlLayout {
  uint32_t kv_slots = 0;
  uint32_t input_slots = 0;
  uint64_t max_frame = 0;
  uint64_t ring_offset[kRingCount] = {};
  uint64_t input_offset = 0, input_stride = 0;
  uint64_t images_in_slot = 0, state_in_slot = 0, noise_in_slot = 0;
  uint64_t image_values = 0, state_values = 0, noise_values = 0;
  uint64_t output_offset = 0, output_stride = 0, action_values = 0;
  uint64_t kv_offset = 0, kv_stride = 0, kv_values = 0;  // kv_stride 0: K/V not in host memory
  uint64_t total_bytes = 0;

  bool operator==(const ControlLayout&) const = default;
};
static_assert(std::is_standard_layout_v<ControlLayout> &&
              std::is_trivially_copyable_v<ControlLayout>);
static_assert(sizeof(ControlLayout) ==
              2 * sizeof(uint32_t) + sizeof(uint64_t) * (1 + kRingCount + 15));
ControlLayout compute_layout(const ModelConfig& config, const RunShape& shape, uint32_t kv_slots,
                             uint64_t max_frame, bool host_kv);

struct ControlHeader {
  uint32_t magic;  // written last and read first through std::atomic_ref: the header's publication
  uint32_t version;
  ControlLayout layout;
  std::atomic<uint32_t> stop_requested;
  uint32_t reserved;
  WorkerInfo encoder;
  WorkerInfo decoder;
  CudaIpcBlock cuda;
  ErrorText encoder_error;  // each written by its worker alone, before its kError message
  ErrorText decoder_error;
};
static_assert(std::is_standard_layout_v<ControlHeader>);
static_assert(std::atomic_ref<uint32_t>::is_always_lock_free &&
              alignof(uint32_t) >= std::atomic_ref<uint32_t>::required_alignment);
static_assert(sizeof(ControlHeader) == 8 + sizeof(ControlLayout) + 8 + 2 * sizeof(WorkerInfo) +
                                           sizeof(CudaIpcBlock) + 2 * sizeof(ErrorText));

// A mapped control segment. The orchestrator creates it (and owns the name); workers open it.
class ControlBlock {
 public:
  static ControlBlock create(const std::string& name, const ControlLayout& layout);
  // Opens and checks magic, version and that the header's layout equals `expected`.
  static ControlBlock open(const std::string& name, const ControlLayout& expected);

  ControlBlock() = default;
  ControlHeader& header() const { return *header_; }
  const ControlLayout& layout() const { return layout_; }
  SpscRing& ring(RingId id) { return rings_[static_cast<uint32_t>(id)]; }
  // The error text area of a worker (kEncoder or kDecoder; throws pi0::Error for another role).
  ErrorText& error_area(Role worker) const;
  const std::string& name() const { return segment_.name(); }

  // Slot accessors throw pi0::Error if the index is out of range.
  Bf16* images(uint32_t input_slot) const;
  Bf16* state(uint32_t input_slot) const;
  Bf16* noise(uint32_t input_slot) const;
  float* actions(uint32_t input_slot) const;
  float* host_kv(uint32_t kv_slot) const;  // CPU backend only
  // The whole input/output areas (for registering them with CUDA as pinned memory).
  void* input_area() const;
  size_t input_area_bytes() const;
  void* output_area() const;
  size_t output_area_bytes() const;

  MessageLimits limits() const;

 private:
  char* at(uint64_t offset) const { return static_cast<char*>(segment_.data()) + offset; }
  SharedSegment segment_;
  ControlHeader* header_ = nullptr;
  ControlLayout layout_;
  SpscRing rings_[kRingCount];
};

}  // namespace pi0::ipc
