// The pi0 action expert on the GPU: 10 flow-matching steps over the prefix K/V cache, bf16
// storage with fp32 accumulation and an fp32 flow sample. It holds only the decoder's weights.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "pi0/bf16.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/engine_options.hpp"
#include "pi0/weights.hpp"

namespace pi0 {

namespace cuda {
class OpTimer;
struct TunableGemm;
struct LayerWait;
struct LayerWaitLimits;
}  // namespace cuda

class CudaDecoder {
 public:
  // Uploads the decoder_* tensors of `weights`. Throws pi0::Error when they do not fit `config`,
  // on OOM, or on any CUDA/cuBLAS failure.
  CudaDecoder(const ModelConfig& config, const RunShape& shape, const WeightStore& weights,
              const CudaEngineOptions& options = {});
  ~CudaDecoder();
  CudaDecoder(CudaDecoder&&) noexcept;
  CudaDecoder& operator=(CudaDecoder&&) noexcept;
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  // d_kv_slot: the K/V slot the encoder filled, bf16 [lm_layers][2][E + C + 1][head_dim]
  // (StageSizes::kv_slot_values; may be another process's memory mapped through CUDA IPC). Its
  // first E rows per block are read, never written; the decoder writes its own C + 1 keys and
  // values into the rows after them and attends over each block in place. d_state bf16 [state_dim];
  // d_noise bf16 [C, action_dim]; d_actions fp32 [C, action_dim] (output; it also holds the flow
  // sample between steps). All at least 16-byte aligned. All flow steps are enqueued on `stream`;
  // graph-captured per pointer set after a first eager call.
  void decode(Bf16* d_kv_slot, const Bf16* d_state, const Bf16* d_noise, float* d_actions,
              cudaStream_t stream);
  // Decodes `count` frames (1..max_batch()) in one pass: their rows share every weight GEMM
  // (M = count * (C + 1)), which costs little more than one frame's, since the decoder's GEMMs
  // are bound by weight reads; RoPE, the K/V write and attention run per frame on its own slot.
  // d_kv_slots[i] is frame i's slot; d_state [count][state_dim], d_noise and d_actions
  // [count][C][action_dim] hold the frames one after another. A frame decoded alone gets exactly
  // decode()'s bits; in a pass with others, its GEMMs may pick other algorithms, so its last bits
  // may differ.
  // With `waits` (one per frame) and `limits`, layer l of the first flow step waits for the
  // encoder's signal that layer l of the frame's slot is written (pi0/cuda/layer_signal.hpp)
  // instead of the caller waiting for the whole slot: the decode then follows a running encoder.
  void decode_batch(Bf16* const* d_kv_slots, int count, const Bf16* d_state, const Bf16* d_noise,
                    float* d_actions, cudaStream_t stream, const cuda::LayerWait* waits = nullptr,
                    const cuda::LayerWaitLimits* limits = nullptr);
  int max_batch() const;
  // Whether one-frame passes run the persistent layers kernel (pi0/cuda/decoder_layers.hpp)
  // rather than one kernel per operation.
  bool persistent_layers() const;
  // With an op timer set: the persistent kernel's time per phase in the last decode (empty
  // without it).
  std::string layers_trace() const;
  // The attention kernels flow step `step` runs (one-frame passes of the per-op path): "gemm"
  // (QK product, softmax, PV product), "fused", "tiled" or "wgmma". The first step can differ from
  // the later ones: it runs beside a still-running encoder, where the wgmma kernel's clusters wait
  // for SMs.
  std::string attention_kernels(int step) const;

  size_t weight_bytes() const;
  size_t workspace_bytes() const;
  double flops() const;              // per decode, all steps
  double weight_bytes_read() const;  // per decode, all steps (weights are re-read each step)
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
