// Launchers of the pi0 elementwise, normalisation and RoPE kernels (kernel code lives in
// common/cuda/kernels.cu). Activations: bf16 storage; the vision tower's residual stream and the
// flow sample are fp32. Every launcher checks the launch and throws pi0::Error on failure.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

void bf16_to_f32(const Bf16* in, float* out, size_t n, cudaStream_t stream);
void f32_to_bf16(const float* in, Bf16* out, size_t n, cudaStream_t stream);

// out[r] = LayerNorm(x[r]) * weight + bias, in fp32, stored bf16. x [rows, width] fp32.
void layer_norm(const float* x, const Bf16* weight, const Bf16* bias, Bf16* out, int rows,
                int width, float eps, cudaStream_t stream);
// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps), stored bf16.
void rms_norm(const float* x, Bf16* out, int rows, int width, float eps, cudaStream_t stream);
void rms_norm(const Bf16* x, Bf16* out, int rows, int width, float eps, cudaStream_t stream);

// An RMS norm folded into the product after it. pi0's norms before a matrix have their learned
// scale folded into that matrix, so rms(x) @ W is (x @ W) with row r scaled by
// rsqrt(mean(x[r]^2) + eps): the product reads the residual stream x itself, and the kernel after
// it applies this scale, which saves the norm's own launch. x [rows, width] bf16; null: no scale.
struct RowRmsScale {
  const Bf16* x = nullptr;
  int width = 0;
  float eps = 0.0f;
};

// images [views, size, size, channels] -> patches [views * (size/patch)^2, patch*patch*channels],
// patches in row-major order, each flattened in (row, col, channel) order.
void extract_patches(const Bf16* images, Bf16* patches, int views, int image_size, int patch_size,
                     int channels, cudaStream_t stream);
// out[r, :] = table[r % table_rows, :] + bias (bias may be null); out fp32 [rows, width].
void broadcast_rows(const Bf16* table, int table_rows, const Bf16* bias, float* out, int rows,
                    int width, cudaStream_t stream);

// qkv [rows, (q_heads + 2) * head_dim] = Q | K | V (one K/V head). Rotates interleaved pairs of Q
// and K by position (first_position + row) and writes Q to q_out [rows, q_heads * head_dim], K to
// k_out [rows, head_dim] and V (unrotated) to v_out [rows, head_dim]; with `rms`, Q, K and V of
// row r are scaled by its RMS scale first.
void rope_split_qkv(const Bf16* qkv, int rows, int q_heads, int head_dim, int first_position,
                    float theta, Bf16* q_out, Bf16* k_out, Bf16* v_out, cudaStream_t stream,
                    const RowRmsScale& rms = {});

// probs[r, c] = softmax over c < valid(r) of scores[r, c], 0 for valid(r) <= c < cols, where
// valid(r) = limited_cols for r < limited_rows and cols otherwise. Scores fp32, probs bf16; both
// [rows, ld] buffers. Where ld_probs allows, columns cols .. cols rounded up to 4 get zeros too.
void softmax_rows(const float* scores, int ld_scores, Bf16* probs, int ld_probs, int rows, int cols,
                  int limited_rows, int limited_cols, cudaStream_t stream);

// gate_up [rows, 2 * width] = gate | up  ->  out [rows, width] = gelu_tanh(gate) * up; with `rms`,
// gate and up of row r are scaled by its RMS scale first.
void geglu(const Bf16* gate_up, Bf16* out, int rows, int width, cudaStream_t stream,
           const RowRmsScale& rms = {});
void silu_inplace(Bf16* x, size_t n, cudaStream_t stream);

// The decoder's work between two flow steps, in one launch instead of six. The residual stream x
// holds `frames` frames of rows_per_frame = chunk + 1 rows: a frame's state token, then its
// `chunk` action rows; actions [frames * chunk, action_dim] fp32 is the flow sample. For every
// action row:
// - the Euler update of the step before: actions += bf16(rms(x)) @ w_out + b_out (w_out null:
//   none, before the first step);
// - the next step's action input: t1 = silu(bf16(bf16(actions) @ w_in + time_bias)), t1
//   [frames * chunk, width] bf16 (w_in null: none, after the last step);
// and each frame's state token (state [frames, width]) copied into its row 0 (state null: none).
// w_out [width, action_dim], w_in [action_dim, width], time_bias [width]: bf16; b_out fp32.
struct FlowStepGlue {
  Bf16* x = nullptr;
  int rows_per_frame = 0;
  int width = 0;
  float eps = 0.0f;
  const Bf16* state = nullptr;
  float* actions = nullptr;
  int frames = 0;
  int chunk = 0;
  int action_dim = 0;
  const Bf16* w_out = nullptr;
  const float* b_out = nullptr;
  const Bf16* w_in = nullptr;
  const Bf16* time_bias = nullptr;
  Bf16* t1 = nullptr;
};
// Whether the kernel takes these widths: width a multiple of 8 up to 2048, action_dim 8, 16 or 32.
bool flow_step_glue_supported(int width, int action_dim);
void flow_step_glue(const FlowStepGlue& glue, cudaStream_t stream);

// Deterministic pseudo-random fill in [-scale, scale) (workspace warm-up, tuning, test poison).
void fill_random(Bf16* out, size_t n, uint64_t seed, float scale, cudaStream_t stream);
void fill_random(float* out, size_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace pi0::cuda
