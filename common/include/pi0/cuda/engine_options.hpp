// Options shared by the CUDA encoder and decoder engines.
#pragma once

namespace pi0 {

struct CudaEngineOptions {
  // Time cuBLASLt's candidate algorithms per GEMM at construction and keep the fastest. Faster,
  // but the choice (and so the last bits of the output) may differ between two engines, so it is
  // off unless asked for.
  bool autotune_gemms = false;
  // With autotune_gemms: search cuBLASLt's configurations beyond its heuristic's few
  // (Gemm::widen_candidates); slower to start (seconds per GEMM), for writing a GEMM table.
  bool autotune_wide = false;
  // With autotune_gemms: rank each GEMM's candidates alone but keep its few fastest
  // (tunable_gemms()), for trying them one at a time in the stage itself (pi0_bench
  // --autotune-inplace); each GEMM starts on the fastest alone.
  bool autotune_inplace = false;
  // Decoder only: the most frames CudaDecoder::decode_batch() takes in one pass (1..4).
  int max_decode_batch = 1;
  // Decoder only: the share of the GPU's SMs the decoder was given: the MPS pipeline's decoder
  // worker sets its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (a worker started without one, and the
  // single process, count as the whole GPU). Below kWgmmaMinSharePercent its attention keeps
  // default_attention_kernels() in every flow step instead of the wgmma kernel for steps 2-10:
  // the kernel's clusters (9 CTAs at C = 63) would then run in waves, and the pipeline was
  // measured with it only at 50% and 100% (faster at both: bench/NOTES.md v23).
  // PI0_DECODER_ATTENTION still overrides.
  int decoder_share_percent = 100;
  static constexpr int kWgmmaMinSharePercent = 50;
  // Decoder only: one-frame passes run every layer of a flow step in one persistent kernel
  // (pi0/cuda/decoder_layers.hpp) instead of one kernel per operation. Off by default: correct,
  // but slower as of bench/NOTES.md v6. PI0_DECODER_LAYERS=1 turns it on as well.
  bool decoder_persistent_layers = false;
  // Its CTAs: 0 = one per SM this process sees; N > 0 = at most N (tests: an MPS share's smaller
  // grid must give the same bits).
  int decoder_layers_ctas = 0;
};

}  // namespace pi0
