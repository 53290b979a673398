// The pi0 encoder (SigLIP vision tower, projector, Gemma prefix) on the GPU: images in, the prefix
// K/V cache out, bf16 storage with fp32 accumulation. It holds only the encoder's weights.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/engine_options.hpp"
#include "pi0/weights.hpp"

namespace pi0 {

namespace cuda {
class OpTimer;
struct TunableGemm;
struct LayerSignals;
}  // namespace cuda

class CudaEncoder {
 public:
  // Uploads the encoder tensors (vision_*, encoder_*, language_embeds) of `weights` to the
  // current device. Throws pi0::Error when the weights do not fit `config` and `shape` (naming the
  // tensor), on OOM (naming the buffer), or on any CUDA/cuBLAS failure.
  CudaEncoder(const ModelConfig& config, const RunShape& shape, const WeightStore& weights,
              const CudaEngineOptions& options = {});
  ~CudaEncoder();
  CudaEncoder(CudaEncoder&&) noexcept;
  CudaEncoder& operator=(CudaEncoder&&) noexcept;
  CudaEncoder(const CudaEncoder&) = delete;
  CudaEncoder& operator=(const CudaEncoder&) = delete;

  // d_images: bf16 [V, H, W, C] on device; d_kv_out: a K/V slot, bf16
  // [lm_layers][2][E + C + 1][head_dim] on device (StageSizes::kv_slot_values), of which this
  // writes the first E rows of every block and leaves the rest to the decoder (both at least
  // 16-byte aligned). Enqueues on `stream`; the first call per (d_images, d_kv_out)
  // pair runs eagerly, the second captures a CUDA graph of the whole forward, later calls replay
  // it. Not to be called concurrently from two threads. With `signals`, each Gemma layer's K/V
  // write is followed by its per-layer signal (pi0/cuda/layer_signal.hpp), so a decoder can start
  // on the layers that are done; the pointers are part of the graph's key.
  void encode(const Bf16* d_images, Bf16* d_kv_out, cudaStream_t stream,
              const cuda::LayerSignals* signals = nullptr);

  size_t weight_bytes() const;
  size_t workspace_bytes() const;
  double flops() const;  // per encode, counted from the GEMM shapes
  // Charges GPU time to named operations (see pi0/cuda/op_timer.hpp); nullptr turns it off. The
  // timed forward is graph-captured separately from the untimed one.
  void set_op_timer(cuda::OpTimer* timer);
  // The GEMMs an in-place tuning may try (CudaEngineOptions::autotune_inplace; empty otherwise;
  // their pointers live as long as the engine), and a way to drop the captured graphs after one
  // of them changed its choice.
  std::vector<cuda::TunableGemm> tunable_gemms();
  void forget_graphs();
  const ModelConfig& config() const;
  const RunShape& shape() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pi0
