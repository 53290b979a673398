// Test kernels for the programmatic kernel handover (pi0/cuda/device.hpp, link_kernels): a
// predecessor that lets its dependents start at once and writes late, and a dependent that does not
// wait for it, the control that shows a missing wait is caught.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pi0::test {

// Copies `bytes` (a multiple of 16) from `src` to `dst` about `delay_ns` after it starts. Every
// block allows its dependents to launch first thing.
void launch_late_copy(void* dst, const void* src, size_t bytes, uint64_t delay_ns,
                      cudaStream_t stream);
// Copies at once, without waiting for the kernel before it.
void launch_unwaiting_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream);

}  // namespace pi0::test
