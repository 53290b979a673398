// Driver API entry points looked up through the runtime, so that nothing links libcuda (CI builds
// without a driver). device.cpp (graph node names), frontend_waits.cpp (stream memory
// operations), qkv_rope.cu (tensor maps) and ipc's cuda_ipc.cpp (the size of a mapped allocation)
// use it.
#pragma once

#include <cuda_runtime_api.h>

namespace pi0::cuda {

// Sets `fn` to the driver's `symbol` as of CUDA `version` (e.g. 12030 for 12.3), or leaves it
// null where this driver lacks it.
template <typename Fn>
void load_driver_call(const char* symbol, int version, Fn& fn) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(symbol, &ptr, version, cudaEnableDefault, &found) ==
          cudaSuccess &&
      found == cudaDriverEntryPointSuccess)
    fn = reinterpret_cast<Fn>(ptr);
  else
    (void)cudaGetLastError();
}

}  // namespace pi0::cuda
