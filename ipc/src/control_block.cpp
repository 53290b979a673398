#include "pi0/ipc/control_block.hpp"

#include <new>

#include "pi0/check.hpp"

namespace pi0::ipc {
namespace {

constexpr uint64_t kAlign = 256;  // covers cache lines and CUDA's copy alignment

uint64_t align_up(uint64_t v) {
  return (v + kAlign - 1) / kAlign * kAlign;
}

}  // namespace

ControlLayout compute_layout(const ModelConfig& config, const RunShape& shape, uint32_t kv_slots,
                             uint64_t max_frame, bool host_kv) {
  PI0_CHECK(
      kv_slots >= 1 && kv_slots <= kMaxKvSlots,
      "slots must be in 1.." + std::to_string(kMaxKvSlots) + ", got " + std::to_string(kv_slots));
  const StageSizes sizes = stage_sizes(config, shape);
  ControlLayout l;
  l.kv_slots = kv_slots;
  l.input_slots = kv_slots;  // a frame holds its input slot from submission to its actions
  l.max_frame = max_frame;
  uint64_t cursor = align_up(sizeof(ControlHeader));
  for (uint32_t r = 0; r < kRingCount; ++r) {
    l.ring_offset[r] = cursor;
    cursor = align_up(cursor + SpscRing::bytes_for(kRingCapacity));
  }
  l.image_values = sizes.image_values;
  l.state_values = sizes.state_values;
  l.noise_values = sizes.noise_values;
  l.images_in_slot = 0;
  l.state_in_slot = align_up(sizes.image_values * sizeof(Bf16));
  l.noise_in_slot = l.state_in_slot + align_up(sizes.state_values * sizeof(Bf16));
  l.input_stride = l.noise_in_slot + align_up(sizes.noise_values * sizeof(Bf16));
  l.input_offset = cursor;
  cursor += l.input_stride * l.input_slots;
  l.action_values = sizes.action_values;
  l.output_stride = align_up(sizes.action_values * sizeof(float));
  l.output_offset = cursor;
  cursor += l.output_stride * l.input_slots;
  l.kv_values = sizes.kv_values;
  if (host_kv) {
    l.kv_stride = align_up(sizes.kv_values * sizeof(float));
    l.kv_offset = cursor;
    cursor += l.kv_stride * kv_slots;
  }
  l.total_bytes = align_up(cursor);
  return l;
}

ControlBlock ControlBlock::create(const std::string& name, const ControlLayout& layout) {
  ControlBlock block;
  block.segment_ = SharedSegment::create(name, layout.total_bytes);
  block.layout_ = layout;
  block.header_ = new (block.segment_.data()) ControlHeader{};
  block.header_->version = kControlVersion;
  block.header_->layout = layout;
  for (uint32_t r = 0; r < kRingCount; ++r) {
    block.rings_[r] = SpscRing::create(block.at(layout.ring_offset[r]), kRingCapacity);
  }
  // Magic last, released: an open that acquires it sees the header and the rings complete.
  std::atomic_ref<uint32_t>(block.header_->magic).store(kControlMagic, std::memory_order_release);
  return block;
}

ControlBlock ControlBlock::open(const std::string& name, const ControlLayout& expected) {
  ControlBlock block;
  block.segment_ = SharedSegment::open(name);
  PI0_CHECK(block.segment_.size() >= expected.total_bytes,
            "control segment " + name + " is smaller than this run's layout");
  block.header_ = static_cast<ControlHeader*>(block.segment_.data());
  PI0_CHECK(std::atomic_ref<uint32_t>(block.header_->magic).load(std::memory_order_acquire) ==
                kControlMagic,
            "control segment " + name + " has a bad magic");
  PI0_CHECK(block.header_->version == kControlVersion,
            "control segment " + name + " has protocol version " +
                std::to_string(block.header_->version) + ", expected " +
                std::to_string(kControlVersion));
  PI0_CHECK(block.header_->layout == expected,
            "control segment " + name +
                " was laid out for another run configuration (model, views, chunk, prompt or slots "
                "differ between orchestrator and worker)");
  block.layout_ = expected;
  for (uint32_t r = 0; r < kRingCount; ++r) {
    block.rings_[r] = SpscRing::attach(block.at(expected.ring_offset[r]), kRingCapacity);
  }
  return block;
}

namespace {
void check_slot(uint32_t slot, uint32_t count, const char* what) {
  PI0_CHECK(slot < count, std::string(what) + " slot " + std::to_string(slot) + " out of range (" +
                              std::to_string(count) + " slots)");
}
}  // namespace

Bf16* ControlBlock::images(uint32_t s) const {
  check_slot(s, layout_.input_slots, "input");
  return reinterpret_cast<Bf16*>(
      at(layout_.input_offset + s * layout_.input_stride + layout_.images_in_slot));
}
Bf16* ControlBlock::state(uint32_t s) const {
  check_slot(s, layout_.input_slots, "input");
  return reinterpret_cast<Bf16*>(
      at(layout_.input_offset + s * layout_.input_stride + layout_.state_in_slot));
}
Bf16* ControlBlock::noise(uint32_t s) const {
  check_slot(s, layout_.input_slots, "input");
  return reinterpret_cast<Bf16*>(
      at(layout_.input_offset + s * layout_.input_stride + layout_.noise_in_slot));
}
float* ControlBlock::actions(uint32_t s) const {
  check_slot(s, layout_.input_slots, "output");
  return reinterpret_cast<float*>(at(layout_.output_offset + s * layout_.output_stride));
}
float* ControlBlock::host_kv(uint32_t s) const {
  PI0_CHECK(layout_.kv_stride != 0, "this run keeps the K/V slots in device memory");
  check_slot(s, layout_.kv_slots, "kv");
  return reinterpret_cast<float*>(at(layout_.kv_offset + s * layout_.kv_stride));
}
void* ControlBlock::input_area() const {
  return at(layout_.input_offset);
}
size_t ControlBlock::input_area_bytes() const {
  return layout_.input_stride * layout_.input_slots;
}
void* ControlBlock::output_area() const {
  return at(layout_.output_offset);
}
size_t ControlBlock::output_area_bytes() const {
  return layout_.output_stride * layout_.input_slots;
}

ErrorText& ControlBlock::error_area(Role worker) const {
  PI0_CHECK(worker == Role::kEncoder || worker == Role::kDecoder,
            "only a worker has an error text area, not the " + std::string(role_name(worker)));
  return worker == Role::kEncoder ? header_->encoder_error : header_->decoder_error;
}

MessageLimits ControlBlock::limits() const {
  return MessageLimits{layout_.kv_slots, layout_.input_slots, layout_.max_frame};
}

}  // namespace pi0::ipc
