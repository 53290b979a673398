// Skinny GEMM for few rows (the decoder's M <= 64): Y[m, n] = X[m, k] @ W[k, n], bf16 row-major
// operands ([in, out] weights), fp32 accumulation on tensor cores.
//
// Bound by streaming W once, so the grid is sized to fill the GPU: N is tiled by `bn` (64 or 128)
// columns, K is split over `splits` CTAs (1, 2, 4, 8 or 16) that form one thread-block cluster; the
// split partials are summed through distributed shared memory in a fixed order (rank 0, 1, ...),
// so results are bitwise reproducible. Rows beyond m are masked; m > 64 runs 64-row blocks.
// Two mainloops share the tiling, the split-K reduction and the epilogues: mma.sync (any sm_80+
// GPU) and, where the binary carries sm_90a code, Hopper's warpgroup MMA (wgmma), which reads both
// operands straight from shared memory (bench/NOTES.md v7 has the timings).
// Requirements: k, n, ld_x, ld_w multiples of 8; ld_y even; x, w 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

enum class SkinnyOut {
  kBf16,           // y bf16 [m, ld_y] = acc (+ bias)
  kF32,            // y fp32 = acc (+ bias)
  kF32Accumulate,  // y fp32 += acc (+ bias)
  // W's columns (rows when transposed) interleave gate and up in blocks of 8 (see
  // interleave_gate_up); y bf16 [m, n / 2] = gelu_tanh(gate) * up. No bias.
  kGeglu,
};

enum class SkinnyKernel {
  kAuto,     // wgmma where available, else mma.sync
  kMmaSync,  // warp-level mma.sync.m16n8k16 with ldmatrix
  kWgmma,    // warpgroup wgmma.m64n64k16 (needs sm_90a code: skinny_wgmma_available())
};

struct SkinnyShape {
  int m = 0, n = 0, k = 0;
  int ld_x = 0, ld_w = 0, ld_y = 0;  // row strides in elements
  // W given transposed, [n, k] row-major (ld_w >= k): the wgmma kernel only; it streams faster so.
  bool w_transposed = false;
  SkinnyOut out = SkinnyOut::kBf16;
  bool bias = false;  // fp32 bias [n] added in the epilogue
  int bn = 0;         // 0: chosen by plan_skinny
  int splits = 0;     // 0: chosen by plan_skinny (1, 2, 4, 8 or 16)
  int stages = 0;     // cp.async pipeline depth (4 or 8; 8 only with bn 64); 0: chosen
  SkinnyKernel kernel = SkinnyKernel::kAuto;  // resolved by plan_skinny
};

// True when this binary carries sm_90a code for the current device, so that the wgmma mainloop
// runs (a build for plain sm_90 has none; see CMakeLists.txt).
bool skinny_wgmma_available();

// True when the kernel can run `s` (alignment of sizes and strides).
bool skinny_supported(const SkinnyShape& s);
// Fills bn, splits and stages (where 0) for a GPU with `sm_count` multiprocessors and resolves
// kAuto; checks the shape, and that a requested wgmma mainloop is available.
SkinnyShape plan_skinny(SkinnyShape s, int sm_count);
// Raises the kernels' dynamic shared-memory limits; call once before capturing graphs.
void skinny_init();
// Launches one GEMM (graph-capturable). bias: fp32 [n] or nullptr (only when s.bias).
void skinny_gemm(const SkinnyShape& s, const Bf16* x, const Bf16* w, void* y, const float* bias,
                 cudaStream_t stream);

// Host-side: [layers][rows, cols] -> [layers][cols, rows] (weights for w_transposed).
std::vector<Bf16> transpose_layers(const Bf16* in, long layers, long rows, long cols);

// Host-side: [rows, cols] gate and up (row-major) -> [rows, 2 * cols] with columns in blocks of 8
// alternating gate | up (cols must be a multiple of 8).
void interleave_gate_up(const Bf16* gate, const Bf16* up, Bf16* out, long rows, int cols);

}  // namespace pi0::cuda
