// Options shared by the CUDA encoder and decoder engines.
#pragma once

namespace pi0 {

struct CudaEngineOptions {
  // Time cuBLASLt's candidate algorithms per GEMM at construction and keep the fastest. Faster,
  // but the choice (and so the last bits of the output) may differ between two engines, so it is
  // off unless asked for.
  bool autotune_gemms = false;
  // Decoder only: the most frames CudaDecoder::decode_batch() takes in one pass (1..4).
  int max_decode_batch = 1;
};

}  // namespace pi0
