// Programmatic dependent launch, the device side. A captured graph may let a kernel start while the
// kernel before it is still finishing (see `link_kernels` in device.hpp); every
// kernel of ours therefore waits for its predecessor's completion and memory before it touches
// memory (one exception, checked by a source test: qkv_rope.cu copies its constant weights
// first). Where the kernel was launched the ordinary way the wait returns at once. None of them
// lets its successor launch before it exits (griddepcontrol.launch_dependents): tried at the start
// of each, it made V=2 1 ms slower, the early blocks taking SMs from the work in flight; after
// qkv_rope's mainloop it changed nothing (bench/NOTES.md v38).
#pragma once

namespace pi0::cuda {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace pi0::cuda
