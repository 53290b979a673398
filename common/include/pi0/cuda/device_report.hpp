// What a worker process learns about the GPU it was given: its SM share under MPS and whether it
// is an MPS client at all. Creates the CUDA context (MPS reads its limits at that moment).
#pragma once

#include <cstdint>
#include <string>

namespace pi0::cuda {

struct DeviceReport {
  int device = 0;
  int sm_count = 0;         // cudaDevAttrMultiProcessorCount: MPS-limited in an MPS client
  int mps_enabled = 0;      // cudaDevAttrMpsEnabled: contexts on this device go through MPS
  size_t total_memory = 0;
  std::string name;
};

// Selects device 0, forces context creation, reads the attributes. Throws pi0::Error with a
// one-line message when no usable GPU is present or the MPS server refuses us.
DeviceReport open_device();
// True when at least one CUDA device can be used; never throws, creates no context.
bool cuda_device_present(std::string* why_not = nullptr);
// How many CUDA devices this process sees (0 where none can be used); never throws.
int cuda_device_count();

}  // namespace pi0::cuda

namespace pi0::cuda {
// Device `device`'s full SM count, read without creating a context (so not MPS-limited); 0 if
// there is no such device.
int device_sm_count_without_context(int device = 0);
}  // namespace pi0::cuda
