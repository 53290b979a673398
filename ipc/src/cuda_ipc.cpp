#include "pi0/ipc/cuda_ipc.hpp"

#include <cstring>
#include <string>
#include <utility>

#include "pi0/check.hpp"
#include "pi0/cuda/driver_entry.hpp"

namespace pi0::ipc {
namespace {
constexpr size_t kPoolAlignment = size_t{2} << 20;  // whole 2 MiB pages: one mapping, no sharing
}

IpcDeviceMemory IpcDeviceMemory::allocate_exported(size_t bytes,
                                                   uint8_t (&handle_out)[kCudaIpcHandleBytes]) {
  static_assert(sizeof(cudaIpcMemHandle_t) == kCudaIpcHandleBytes);
  IpcDeviceMemory m;
  m.bytes_ = (bytes + kPoolAlignment - 1) / kPoolAlignment * kPoolAlignment;
  const cudaError_t status = cudaMalloc(&m.ptr_, m.bytes_);
  PI0_CHECK(status == cudaSuccess, "out of GPU memory allocating the K/V slot pool (" +
                                       std::to_string(m.bytes_ >> 20) +
                                       " MiB): " + cudaGetErrorString(status));
  cudaIpcMemHandle_t handle;
  CUDA_CHECK(cudaIpcGetMemHandle(&handle, m.ptr_));
  std::memcpy(handle_out, &handle, sizeof handle);
  return m;
}

IpcDeviceMemory IpcDeviceMemory::open_imported(const uint8_t (&handle)[kCudaIpcHandleBytes],
                                               size_t bytes) {
  IpcDeviceMemory m;
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle, sizeof h);
  CUDA_CHECK(cudaIpcOpenMemHandle(&m.ptr_, h, cudaIpcMemLazyEnablePeerAccess));
  m.bytes_ = bytes;
  m.imported_ = true;
  // The size comes from shared memory: a kernel that trusted a wrong one would read past the
  // mapping and end this context with an illegal address instead of one line naming the problem.
  const size_t mapped = allocation_bytes_from(m.ptr_);
  PI0_CHECK(mapped >= bytes, "the exporter announced " + std::to_string(bytes) +
                                 " bytes of device memory, but its allocation has " +
                                 std::to_string(mapped));
  return m;
}

size_t allocation_bytes_from(const void* ptr) {
  // cuMemGetAddressRange_v2 (CUDA 3.2): CUresult (CUdeviceptr* base, size_t* size, CUdeviceptr).
  using GetRange = int (*)(unsigned long long*, size_t*, unsigned long long);
  static const GetRange get_range = [] {
    GetRange fn = nullptr;
    cuda::load_driver_call("cuMemGetAddressRange", 3020, fn);
    return fn;
  }();
  PI0_CHECK(get_range != nullptr, "the CUDA driver lacks cuMemGetAddressRange");
  const auto address = reinterpret_cast<unsigned long long>(ptr);
  unsigned long long base = 0;
  size_t size = 0;
  const int status = get_range(&base, &size, address);
  PI0_CHECK(status == 0, "cuMemGetAddressRange failed (CUresult " + std::to_string(status) +
                             "): not device memory, or no CUDA context");
  return static_cast<size_t>(base + size - address);
}

IpcDeviceMemory& IpcDeviceMemory::operator=(IpcDeviceMemory&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  std::swap(bytes_, o.bytes_);
  std::swap(imported_, o.imported_);
  return *this;
}

IpcDeviceMemory::~IpcDeviceMemory() {
  if (!ptr_) return;
  if (imported_) {
    cudaIpcCloseMemHandle(ptr_);
  } else {
    cudaFree(ptr_);
  }
}

IpcEvent IpcEvent::create_exported(uint8_t (&handle_out)[kCudaIpcHandleBytes]) {
  static_assert(sizeof(cudaIpcEventHandle_t) == kCudaIpcHandleBytes);
  IpcEvent e;
  CUDA_CHECK(cudaEventCreateWithFlags(&e.event_, cudaEventInterprocess | cudaEventDisableTiming));
  cudaIpcEventHandle_t handle;
  CUDA_CHECK(cudaIpcGetEventHandle(&handle, e.event_));
  std::memcpy(handle_out, &handle, sizeof handle);
  return e;
}

IpcEvent IpcEvent::open_imported(const uint8_t (&handle)[kCudaIpcHandleBytes]) {
  IpcEvent e;
  cudaIpcEventHandle_t h;
  std::memcpy(&h, handle, sizeof h);
  CUDA_CHECK(cudaIpcOpenEventHandle(&e.event_, h));
  return e;
}

IpcEvent& IpcEvent::operator=(IpcEvent&& o) noexcept {
  std::swap(event_, o.event_);
  return *this;
}

IpcEvent::~IpcEvent() {
  if (event_) cudaEventDestroy(event_);
}

HostRegistration::HostRegistration(void* ptr, size_t bytes) {
  CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterDefault));
  ptr_ = ptr;
}

HostRegistration& HostRegistration::operator=(HostRegistration&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  return *this;
}

HostRegistration::~HostRegistration() {
  if (ptr_) cudaHostUnregister(ptr_);
}

}  // namespace pi0::ipc
