// CUDA IPC resources with move-only owners: the K/V slot pool the encoder exports and the decoder
// maps without a copy, the interprocess events that order the two processes' GPU work without a
// host round trip, and host shared memory registered (pinned) for asynchronous copies.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pi0/ipc/control_block.hpp"

namespace pi0::ipc {

// Device memory allocated here and exported, or imported from another process.
class IpcDeviceMemory {
 public:
  // One allocation of `bytes` (rounded up to 2 MiB), exported into `handle_out`.
  static IpcDeviceMemory allocate_exported(size_t bytes,
                                           uint8_t (&handle_out)[kCudaIpcHandleBytes]);
  // Maps memory another process exported. Never copies. `bytes` is the size the exporter
  // announced (the caller checks it against what it will use), which bytes() then reports;
  // an allocation smaller than that is refused.
  static IpcDeviceMemory open_imported(const uint8_t (&handle)[kCudaIpcHandleBytes], size_t bytes);

  IpcDeviceMemory() = default;
  IpcDeviceMemory(IpcDeviceMemory&& o) noexcept { *this = static_cast<IpcDeviceMemory&&>(o); }
  IpcDeviceMemory& operator=(IpcDeviceMemory&& o) noexcept;
  IpcDeviceMemory(const IpcDeviceMemory&) = delete;
  IpcDeviceMemory& operator=(const IpcDeviceMemory&) = delete;
  ~IpcDeviceMemory();

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool imported_ = false;
};

// Bytes of device memory from `ptr` to the end of the allocation that holds it (the driver's
// record, so also for memory mapped from another process). Throws for a pointer that is not
// device memory.
size_t allocation_bytes_from(const void* ptr);

// An interprocess event (cudaEventInterprocess | cudaEventDisableTiming).
class IpcEvent {
 public:
  static IpcEvent create_exported(uint8_t (&handle_out)[kCudaIpcHandleBytes]);
  static IpcEvent open_imported(const uint8_t (&handle)[kCudaIpcHandleBytes]);

  IpcEvent() = default;
  IpcEvent(IpcEvent&& o) noexcept { *this = static_cast<IpcEvent&&>(o); }
  IpcEvent& operator=(IpcEvent&& o) noexcept;
  IpcEvent(const IpcEvent&) = delete;
  IpcEvent& operator=(const IpcEvent&) = delete;
  ~IpcEvent();

  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// Host memory (e.g. a shared-memory area) page-locked for async copies while this lives.
class HostRegistration {
 public:
  HostRegistration() = default;
  HostRegistration(void* ptr, size_t bytes);
  HostRegistration(HostRegistration&& o) noexcept { *this = static_cast<HostRegistration&&>(o); }
  HostRegistration& operator=(HostRegistration&& o) noexcept;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  ~HostRegistration();

 private:
  void* ptr_ = nullptr;
};

}  // namespace pi0::ipc
