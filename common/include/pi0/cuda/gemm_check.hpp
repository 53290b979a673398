// A plain CUDA-core GEMM with the same layouts and epilogues as pi0::cuda::Gemm, used to check the
// algorithm cuBLASLt offers before it is trusted: as an MPS client with a reduced SM share, some
// offered algorithms returned success yet left the output unwritten (H100, CUDA 13.0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "pi0/cuda/gemm.hpp"

namespace pi0::cuda {

// out[b][i][j] (dense, [batch][m][n], fp32) = epilogue(alpha * x @ W (+ y_initial) (+ bias)).
void reference_gemm(const GemmShape& shape, const void* x, const void* w, const void* bias,
                    const void* y_initial, float* out, cudaStream_t stream);

// The same computation as reference_gemm into y itself, in the shape's layout and type (read
// first when accumulating): the last resort of a Gemm no cuBLASLt algorithm computes correctly.
void simple_gemm(const GemmShape& shape, const void* x, const void* w, const void* bias, void* y,
                 cudaStream_t stream);

// y = epilogue(y + bias) in place, per shape (bias and GELU-tanh of Epilogue::kGeluBias), for
// when cuBLASLt's fused epilogue cannot be used. Layout and type of y as in the shape.
void apply_bias_epilogue(const GemmShape& shape, const void* bias, void* y, cudaStream_t stream);

// ||y - ref|| / ||ref|| over the shape's output elements (y laid out per shape.ld_y / stride_y,
// of shape.y_type); infinite when y holds a non-finite value. Synchronises the stream.
double relative_difference(const GemmShape& shape, const void* y, const float* ref,
                           cudaStream_t stream);

}  // namespace pi0::cuda
