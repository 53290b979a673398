#include "pi0/reference_ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace pi0::ref {
namespace {

// Eight floats as one value: GCC lowers it to whatever the target has (two SSE registers on
// baseline x86-64, NEON on aarch64), so the kernel vectorises without -march flags.
typedef float Vec8 __attribute__((vector_size(32)));

// Tile sizes of one matmul task. They are constants, never derived from the thread count, and
// every output element sums its k terms in ascending order one at a time, so the result is the
// same bitwise for any number of threads.
constexpr int kRowBlock = 32;     // rows per task
constexpr int kColBlock = 64;     // output columns per task (a multiple of 8)
constexpr int kDepthBlock = 256;  // k values per pass, so the W panel stays in L1/L2
constexpr int kMicroRows = 4;

// Below about this many multiply-adds a parallel region costs more than it saves (and on a busy
// machine an OpenMP barrier can cost milliseconds), so small calls such as the tiny model run
// serially.
constexpr double kParallelWork = 1 << 20;

// acc[r][0..8) += sum over k in [k0, k1) of x[r][k] * w[k][0..8) for R rows.
template <int R>
inline void micro_kernel(const float* x, int ldx, const float* w, int ldw, int k0, int k1,
                         float* acc, int ldacc) {
  // Plain memcpy, no helpers: a Vec8 passed or returned by value trips GCC's -Wpsabi note.
  Vec8 a[R];
  for (int r = 0; r < R; ++r) std::memcpy(&a[r], acc + r * ldacc, sizeof(Vec8));
  for (int k = k0; k < k1; ++k) {
    Vec8 wv;
    std::memcpy(&wv, w + static_cast<size_t>(k) * ldw, sizeof wv);
    for (int r = 0; r < R; ++r) a[r] += x[static_cast<size_t>(r) * ldx + k] * wv;
  }
  for (int r = 0; r < R; ++r) std::memcpy(acc + r * ldacc, &a[r], sizeof(Vec8));
}

void matmul_tile(const float* x, const float* w, const float* bias, float* out, int m0, int m1,
                 int n0, int n1, int k, int n, bool accumulate) {
  alignas(64) float acc[kRowBlock * kColBlock];
  const int rows = m1 - m0;
  const int cols = n1 - n0;
  const int vec_cols = cols / 8 * 8;
  std::fill(acc, acc + rows * kColBlock, 0.0f);
  for (int k0 = 0; k0 < k; k0 += kDepthBlock) {
    const int k1 = std::min(k, k0 + kDepthBlock);
    for (int r = 0; r < rows; r += kMicroRows) {
      const int rr = std::min(kMicroRows, rows - r);
      const float* xr = x + static_cast<size_t>(m0 + r) * k;
      float* ar = acc + r * kColBlock;
      for (int c = 0; c < vec_cols; c += 8) {
        const float* wc = w + n0 + c;
        switch (rr) {
          case 4:
            micro_kernel<4>(xr, k, wc, n, k0, k1, ar + c, kColBlock);
            break;
          case 3:
            micro_kernel<3>(xr, k, wc, n, k0, k1, ar + c, kColBlock);
            break;
          case 2:
            micro_kernel<2>(xr, k, wc, n, k0, k1, ar + c, kColBlock);
            break;
          default:
            micro_kernel<1>(xr, k, wc, n, k0, k1, ar + c, kColBlock);
            break;
        }
      }
      // Columns past the last full group of eight: same order of summation, scalar.
      for (int i = 0; i < rr; ++i) {
        const float* xi = xr + static_cast<size_t>(i) * k;
        for (int c = vec_cols; c < cols; ++c) {
          float s = ar[i * kColBlock + c];
          for (int kk = k0; kk < k1; ++kk) s += xi[kk] * w[static_cast<size_t>(kk) * n + n0 + c];
          ar[i * kColBlock + c] = s;
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* o = out + static_cast<size_t>(m0 + r) * n + n0;
    const float* a = acc + r * kColBlock;
    for (int c = 0; c < cols; ++c) {
      float v = a[c];
      if (bias) v += bias[n0 + c];
      o[c] = accumulate ? o[c] + v : v;
    }
  }
}

// Eight interleaved partial sums, added up in a fixed order: vectorises, and still gives the same
// bits on every call.
float dot(const float* a, const float* b, int n) {
  Vec8 acc = {};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    Vec8 va, vb;
    std::memcpy(&va, a + i, sizeof va);
    std::memcpy(&vb, b + i, sizeof vb);
    acc += va * vb;
  }
  float lanes[8];
  std::memcpy(lanes, &acc, sizeof lanes);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
              ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

void matmul(const float* x, const float* w, const float* bias, float* out, int m, int k, int n,
            bool accumulate) {
  if (m <= 0 || n <= 0) return;
  const int row_blocks = (m + kRowBlock - 1) / kRowBlock;
  const int col_blocks = (n + kColBlock - 1) / kColBlock;
  const long tasks = static_cast<long>(row_blocks) * col_blocks;
  // Column blocks vary fastest so that neighbouring threads share the same rows of x.
#pragma omp parallel for schedule( \
    dynamic, 1) if (tasks > 1 && static_cast <double>(m) * k * n >= kParallelWork)
  for (long t = 0; t < tasks; ++t) {
    const int rb = static_cast<int>(t / col_blocks);
    const int cb = static_cast<int>(t % col_blocks);
    const int m0 = rb * kRowBlock, n0 = cb * kColBlock;
    matmul_tile(x, w, bias, out, m0, std::min(m, m0 + kRowBlock), n0, std::min(n, n0 + kColBlock),
                k, n, accumulate);
  }
}

void layer_norm(const float* x, const float* weight, const float* bias, float* out, int rows,
                int width, float eps) {
#pragma omp parallel for schedule(static) if (static_cast <double>(rows) * width >= \
                                              kParallelWork / 16)
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * width;
    float* o = out + static_cast<size_t>(r) * width;
    // Statistics in double: the reference should be the accurate side of every comparison.
    double sum = 0.0;
    for (int i = 0; i < width; ++i) sum += xr[i];
    const double mean = sum / width;
    double var = 0.0;
    for (int i = 0; i < width; ++i) {
      const double d = xr[i] - mean;
      var += d * d;
    }
    var /= width;
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float mean_f = static_cast<float>(mean);
    for (int i = 0; i < width; ++i) {
      float v = (xr[i] - mean_f) * inv;
      if (weight) v *= weight[i];
      if (bias) v += bias[i];
      o[i] = v;
    }
  }
}

void rms_norm(const float* x, float* out, int rows, int width, float eps) {
#pragma omp parallel for schedule(static) if (static_cast <double>(rows) * width >= \
                                              kParallelWork / 16)
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * width;
    float* o = out + static_cast<size_t>(r) * width;
    double sum_sq = 0.0;
    for (int i = 0; i < width; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / width + eps));
    for (int i = 0; i < width; ++i) o[i] = xr[i] * inv;
  }
}

float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

float silu(float x) {
  return x / (1.0f + std::exp(-x));
}

void rope(float* x, int rows, int heads, int head_dim, int stride, int first_position,
          float theta) {
  const int pairs = head_dim / 2;
  std::vector<double> inv_freq(pairs);
  for (int i = 0; i < pairs; ++i)
    inv_freq[i] = std::pow(static_cast<double>(theta), -2.0 * i / head_dim);
#pragma omp parallel for schedule(static) if (static_cast <double>(rows) * heads * head_dim >= \
                                              kParallelWork / 16)
  for (int r = 0; r < rows; ++r) {
    const double position = static_cast<double>(first_position) + r;
    float* row = x + static_cast<size_t>(r) * stride;
    for (int i = 0; i < pairs; ++i) {
      const double angle = position * inv_freq[i];
      const float c = static_cast<float>(std::cos(angle));
      const float s = static_cast<float>(std::sin(angle));
      for (int h = 0; h < heads; ++h) {
        float* p = row + static_cast<size_t>(h) * head_dim + 2 * i;
        const float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
      }
    }
  }
}

void attention(const float* q, int q_stride, const float* k, int k_stride, const float* v,
               int v_stride, float* out, int rows_q, int rows_k, int heads, int kv_heads,
               int head_dim, float scale, AttentionMask allowed, const void* mask_ctx) {
  const int group = heads / kv_heads;
  const int out_stride = heads * head_dim;
  const long tasks = static_cast<long>(rows_q) * heads;
#pragma omp parallel if (tasks > 1 && \
                         static_cast <double>(tasks) * rows_k * head_dim >= kParallelWork)
  {
    std::vector<float> scores(static_cast<size_t>(std::max(rows_k, 1)));
    std::vector<float> acc(static_cast<size_t>(head_dim));
#pragma omp for schedule(static)
    for (long t = 0; t < tasks; ++t) {
      const int qi = static_cast<int>(t / heads);
      const int h = static_cast<int>(t % heads);
      const int kvh = h / group;
      const float* qv = q + static_cast<size_t>(qi) * q_stride + static_cast<size_t>(h) * head_dim;
      float max_score = -INFINITY;
      for (int j = 0; j < rows_k; ++j) {
        if (allowed && !allowed(qi, j, mask_ctx)) {
          scores[j] = -INFINITY;
          continue;
        }
        const float* kv =
            k + static_cast<size_t>(j) * k_stride + static_cast<size_t>(kvh) * head_dim;
        scores[j] = dot(qv, kv, head_dim) * scale;
        max_score = std::max(max_score, scores[j]);
      }
      float* o = out + static_cast<size_t>(qi) * out_stride + static_cast<size_t>(h) * head_dim;
      if (max_score == -INFINITY) {  // every key masked: nothing to attend to
        std::fill(o, o + head_dim, 0.0f);
        continue;
      }
      float sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int j = 0; j < rows_k; ++j) {
        if (scores[j] == -INFINITY) continue;
        const float p = std::exp(scores[j] - max_score);
        sum += p;
        const float* vv =
            v + static_cast<size_t>(j) * v_stride + static_cast<size_t>(kvh) * head_dim;
        for (int d = 0; d < head_dim; ++d) acc[d] += p * vv[d];
      }
      const float inv = 1.0f / sum;
      for (int d = 0; d < head_dim; ++d) o[d] = acc[d] * inv;
    }
  }
}

}  // namespace pi0::ref
