#include "pi0/cuda/device_report.hpp"

#include <cuda_runtime_api.h>

#include "pi0/check.hpp"

namespace pi0::cuda {

DeviceReport open_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  PI0_CHECK(status == cudaSuccess && count > 0,
            std::string("no usable CUDA GPU: ") +
                (status != cudaSuccess ? cudaGetErrorString(status) : "no device found"));
  DeviceReport r;
  CUDA_CHECK(cudaSetDevice(r.device));
  // cudaFree(0) creates the context now, so that MPS failures surface here with a clear message.
  const cudaError_t init = cudaFree(nullptr);
  PI0_CHECK(init == cudaSuccess, std::string("could not create a CUDA context: ") +
                                     cudaGetErrorString(init) +
                                     " (is the MPS daemon running for this user and pipe dir?)");
  CUDA_CHECK(cudaDeviceGetAttribute(&r.sm_count, cudaDevAttrMultiProcessorCount, r.device));
  CUDA_CHECK(cudaDeviceGetAttribute(&r.mps_enabled, cudaDevAttrMpsEnabled, r.device));
  cudaDeviceProp props{};
  CUDA_CHECK(cudaGetDeviceProperties(&props, r.device));
  r.name = props.name;
  r.total_memory = props.totalGlobalMem;
  return r;
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

bool cuda_device_present(std::string* why_not) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    if (why_not) *why_not = status != cudaSuccess ? cudaGetErrorString(status) : "0 devices";
    return false;
  }
  return true;
}

}  // namespace pi0::cuda

namespace pi0::cuda {
int device_sm_count_without_context(int device) {
  int sms = 0;
  if (device < 0 || device >= cuda_device_count()) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}
}  // namespace pi0::cuda
