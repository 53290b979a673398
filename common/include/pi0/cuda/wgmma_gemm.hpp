// Prototype (bench/NOTES.md v6): a GEMM for the decoder's 64-row products on Hopper's warpgroup
// MMA (wgmma), to measure whether it beats the mma.sync tile loop that limits the persistent
// decoder kernel. Not used by the engines yet.
//
// part[s][m][n] (fp32) = X[m, k-range s] @ Wt[n, k-range s]^T, bf16 operands: X [m, ld_x]
// row-major, Wt [n, ld_wt] row-major (the weights transposed, so both operands are K-major). One
// CTA (one warpgroup) per 64-row x bn-column tile and K range; m <= 64 (rows beyond are zero).
// Requirements: k a multiple of 64 * splits, n a multiple of bn, ld_x and ld_wt multiples of 8,
// x and wt 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

struct WgmmaShape {
  int m = 0, n = 0, k = 0;
  int ld_x = 0, ld_wt = 0;
  int bn = 64;     // 64 or 128
  int splits = 1;  // K ranges; part holds splits x 64 x n floats
};

// True when the binary carries sm_90a code for the current device (the kernel traps otherwise).
bool wgmma_available();

bool wgmma_supported(const WgmmaShape& shape);

void wgmma_gemm(const WgmmaShape& shape, const Bf16* x, const Bf16* wt, float* part,
                cudaStream_t stream);

}  // namespace pi0::cuda
