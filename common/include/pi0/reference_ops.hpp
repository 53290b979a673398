// fp32 CPU building blocks of the pi0 reference. The CUDA kernels are checked against these.
// Matrices are row-major; weights are [in, out] so a product is x @ W. Every function parallelises
// across independent rows only, so results do not depend on the thread count (bitwise).
#pragma once

#include <cstddef>

namespace pi0::ref {

// out[M, N] = x[M, K] @ w[K, N] (+ bias[N] if bias) (+ out if accumulate)
void matmul(const float* x, const float* w, const float* bias, float* out, int m, int k, int n,
            bool accumulate);
// LayerNorm over the last dimension, with weight and bias.
void layer_norm(const float* x, const float* weight, const float* bias, float* out, int rows,
                int width, float eps);
// out = x * rsqrt(mean(x^2) + eps) (no learned scale: it is folded into the next matrix).
void rms_norm(const float* x, float* out, int rows, int width, float eps);
float gelu_tanh(float x);
float silu(float x);
// In place: rotates interleaved pairs (2i, 2i+1) of each head by position * theta^(-2i/head_dim).
// x is [rows, heads * head_dim] with row stride `stride`; row r has position first_position + r.
void rope(float* x, int rows, int heads, int head_dim, int stride, int first_position, float theta);
// Multi-head attention with grouped K/V: q [rows_q, heads*head_dim] (stride q_stride),
// k and v [rows_k, kv_heads*head_dim] (strides k_stride, v_stride); query head h uses K/V head
// h / (heads / kv_heads). allowed(qi, kj) says whether query qi may see key kj (nullptr: all).
// out [rows_q, heads*head_dim].
using AttentionMask = bool (*)(int query_row, int key_row, const void* ctx);
void attention(const float* q, int q_stride, const float* k, int k_stride, const float* v,
               int v_stride, float* out, int rows_q, int rows_k, int heads, int kv_heads,
               int head_dim, float scale, AttentionMask allowed, const void* mask_ctx);

}  // namespace pi0::ref
