// All transformer layers of one decoder flow step in one persistent kernel.
//
// The decoder's weight GEMMs have M = C + 1 <= 64 rows: each streams its weights once, and as 11
// separate kernels per layer-step their launch, pipeline fill and tail cost more than the
// streaming itself (bench/NOTES.md v2-v5). Here one cooperative kernel runs every layer as phases
// separated by grid barriers:
//   norm (x += down partials; h = rms(x)) | qkv | RoPE + K/V write | attention over key ranges |
//   combine | o | norm | gate|up + GeGLU | down
// A CTA issues the weight loads of its unit in the next GEMM phase before the barrier, so weight
// streaming overlaps the barriers and the small phases. The work is cut into units from the shape
// alone (never from the SM count this process sees) and split-K partials are summed in a fixed
// order, so every MPS share computes the same bits.
//
// Status (bench/NOTES.md v6, v20): correct and deterministic, but slower than the per-op path
// (V=2 on an H100: 16.65 ms against 13.0), so CudaDecoder runs it only when asked. Its GEMM units
// run on wgmma where the binary has sm_90a code (PI0_LAYERS_GEMM=mma|wgmma), inlined at one call
// site (ptxas serialises wgmma across a call), over weights copied into per-unit blocks
// (set_weights). Every phase is a chain of latencies (L2 round trips, the epilogue, a grid
// barrier of about 1 us) about as long as a kernel boundary of the per-op path; only phases that
// overlap (per-tile counters instead of barriers) can beat it.
//
// Layouts: x fp32 [rows, width] (the residual, updated in place), h bf16 [rows, width] (rms(x)
// on return, for the Euler step), q / attn bf16 [rows, q_heads * head_dim], act bf16
// [rows, mlp]; weights of all layers back to back, [in, out] row-major, gate|up side by side
// ([width, 2 * mlp]); the K/V slot [layers][K|V][keys][head_dim] with the suffix keys after the
// `prefix` encoder keys, written here per layer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "pi0/bf16.hpp"
#include "pi0/cuda/device.hpp"

namespace pi0::cuda {

struct DecoderLayersShape {
  int rows = 0;    // suffix tokens (C + 1), at most 64
  int prefix = 0;  // encoder keys E
  int width = 0, q_heads = 0, head_dim = 0, mlp = 0, layers = 0;
  float rms_eps = 1e-6f, rope_theta = 10000.0f;
  int keys() const { return prefix + rows; }
};

struct DecoderLayersWeights {
  const Bf16* qkv = nullptr;      // [layers][width][(q_heads + 2) * head_dim]
  const Bf16* o = nullptr;        // [layers][q_heads * head_dim][width]
  const Bf16* gate_up = nullptr;  // [layers][width][2 * mlp]
  const Bf16* down = nullptr;     // [layers][mlp][width]
};

struct DecoderLayersBuffers {
  float* x = nullptr;
  Bf16* h = nullptr;
  Bf16* q = nullptr;
  Bf16* attn = nullptr;
  Bf16* act = nullptr;
  Bf16* kv_slot = nullptr;
};

class DecoderLayers {
 public:
  // Empty when the kernel handles the shape; otherwise why not (the caller keeps its per-op path).
  static std::string unsupported_reason(const DecoderLayersShape& shape);

  DecoderLayers() = default;
  // Allocates the split-K and attention scratch; one CTA per SM this process sees, at most
  // max_ctas where that is > 0. The grid changes the time, never the bits.
  explicit DecoderLayers(const DecoderLayersShape& shape, int max_ctas = 0);

  // Copies the layer weights into the layout the kernel streams (each unit's 64 x 64 blocks back
  // to back, 8 KB apiece, instead of 64-128 byte pieces of 64 rows far apart: the GEMM phases
  // 10-15% faster). As much memory again as the layer weights. Runs on the legacy stream and
  // synchronises the device, so never during a graph capture; required before run(), which
  // reads only the copies.
  void set_weights(const DecoderLayersWeights& weights);
  size_t weight_copy_bytes() const {
    return tiled_qkv_.bytes() + tiled_o_.bytes() + tiled_gu_.bytes() + tiled_down_.bytes();
  }

  void run(const DecoderLayersBuffers& buffers, cudaStream_t stream) const;

  // Diagnostics: every later launch (graphs captured from then on included) stamps each CTA's
  // arrival at and departure from every barrier, and inside its first GEMM unit of layer 1 (wgmma
  // only) the first block's arrival, the loop's end and the epilogue's; trace_summary()
  // (synchronises the device) gives each phase's time per layer in the last run and the units'
  // means. Stays on once enabled.
  void enable_trace();
  std::string trace_summary() const;

  bool valid() const { return grid_ > 0; }
  // The GEMM units' mainloop, "wgmma" or "mma.sync" (PI0_LAYERS_GEMM): for the benchmark.
  std::string describe() const;
  int grid() const { return grid_; }
  size_t scratch_bytes() const {
    return partials_.bytes() + attn_partials_.bytes() + attn_stats_.bytes();
  }

 private:
  DecoderLayersShape shape_;
  int grid_ = 0;
  bool wgmma_ = false;  // GEMM units on warpgroup MMA
  int trace_phases() const;
  DeviceBuffer<float> partials_, attn_partials_, attn_stats_;
  DeviceBuffer<uint64_t> trace_;
  DeviceBuffer<Bf16> tiled_qkv_, tiled_o_, tiled_gu_, tiled_down_;
};

}  // namespace pi0::cuda
