// The fp32 building blocks of the CPU reference against naive formulas.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if __has_include(<omp.h>)
#include <omp.h>
#define PI0_TEST_HAVE_OMP 1
#endif

#include "catch.hpp"
#include "pi0/random.hpp"
#include "pi0/reference_ops.hpp"

namespace {

std::vector<float> random_vector(size_t n, uint64_t stream, float scale = 1.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = pi0::counter_normal(77, stream, i) * scale;
  return v;
}

double max_rel_error(const std::vector<float>& got, const std::vector<double>& want) {
  double max_want = 0.0, max_diff = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_want = std::max(max_want, std::abs(want[i]));
    max_diff = std::max(max_diff, std::abs(got[i] - want[i]));
  }
  return max_diff / max_want;
}

struct Causal {
  static bool allowed(int q, int k, const void*) { return k <= q; }
};

}  // namespace

TEST_CASE("matmul matches a naive triple loop", "[common]") {
  // Odd sizes exercise every remainder path; the large one crosses tile and depth blocks.
  const int sizes[][3] = {{37, 53, 29}, {1, 7, 3}, {5, 300, 70}, {70, 600, 131}};
  for (const auto& s : sizes) {
    const int m = s[0], k = s[1], n = s[2];
    const auto x = random_vector(static_cast<size_t>(m) * k, 1);
    const auto w = random_vector(static_cast<size_t>(k) * n, 2);
    const auto bias = random_vector(n, 3);
    const auto prior = random_vector(static_cast<size_t>(m) * n, 4);
    std::vector<double> want(static_cast<size_t>(m) * n), want_acc(want.size());
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double sum = 0.0;
        for (int kk = 0; kk < k; ++kk) sum += static_cast<double>(x[i * k + kk]) * w[kk * n + j];
        want[i * n + j] = sum;
        want_acc[i * n + j] = sum + bias[j] + prior[i * n + j];
      }
    INFO("m=" << m << " k=" << k << " n=" << n);
    std::vector<float> out(want.size(), 123.0f);
    pi0::ref::matmul(x.data(), w.data(), nullptr, out.data(), m, k, n, false);
    REQUIRE(max_rel_error(out, want) < 1e-5);
    std::vector<float> acc = prior;
    pi0::ref::matmul(x.data(), w.data(), bias.data(), acc.data(), m, k, n, true);
    REQUIRE(max_rel_error(acc, want_acc) < 1e-5);
  }
}

TEST_CASE("rope rotates interleaved pairs by the position angle", "[common]") {
  const int rows = 9, heads = 3, head_dim = 8, stride = 30, first = 5;
  const float theta = 10000.0f;
  const auto original = random_vector(static_cast<size_t>(rows) * stride, 5);
  auto x = original;
  pi0::ref::rope(x.data(), rows, heads, head_dim, stride, first, theta);
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < head_dim / 2; ++i) {
        const int at = r * stride + h * head_dim + 2 * i;
        const double angle = (first + r) * std::pow(10000.0, -2.0 * i / head_dim);
        const double a = original[at], b = original[at + 1];
        REQUIRE(std::abs(x[at] - (a * std::cos(angle) - b * std::sin(angle))) < 1e-5);
        REQUIRE(std::abs(x[at + 1] - (a * std::sin(angle) + b * std::cos(angle))) < 1e-5);
        REQUIRE(std::abs(std::hypot(x[at], x[at + 1]) - std::hypot(a, b)) < 1e-5);
      }
    // Columns past heads * head_dim belong to someone else and stay untouched.
    for (int col = heads * head_dim; col < stride; ++col)
      REQUIRE(x[r * stride + col] == original[r * stride + col]);
  }
  // Position 0 is the identity.
  auto zero = original;
  pi0::ref::rope(zero.data(), 1, heads, head_dim, stride, 0, theta);
  for (int col = 0; col < stride; ++col) REQUIRE(zero[col] == original[col]);
}

TEST_CASE("attention with a mask matches a naive implementation", "[common]") {
  const int rows_q = 7, rows_k = 11, heads = 4, kv_heads = 2, head_dim = 6;
  const int q_stride = heads * head_dim + 3, kv_stride = kv_heads * head_dim * 2;
  const auto q = random_vector(static_cast<size_t>(rows_q) * q_stride, 6);
  const auto kv = random_vector(static_cast<size_t>(rows_k) * kv_stride, 7);
  const float* k = kv.data();
  const float* v = kv.data() + kv_heads * head_dim;
  const float scale = 0.4f;
  for (bool masked : {false, true}) {
    std::vector<float> out(static_cast<size_t>(rows_q) * heads * head_dim);
    pi0::ref::attention(q.data(), q_stride, k, kv_stride, v, kv_stride, out.data(), rows_q, rows_k,
                        heads, kv_heads, head_dim, scale, masked ? Causal::allowed : nullptr,
                        nullptr);
    std::vector<double> want(out.size());
    for (int i = 0; i < rows_q; ++i)
      for (int h = 0; h < heads; ++h) {
        const int g = h / (heads / kv_heads);
        std::vector<double> p(rows_k, 0.0);
        double total = 0.0;
        for (int j = 0; j < rows_k; ++j) {
          if (masked && j > i) continue;
          double dot = 0.0;
          for (int d = 0; d < head_dim; ++d)
            dot += static_cast<double>(q[i * q_stride + h * head_dim + d]) *
                   k[j * kv_stride + g * head_dim + d];
          p[j] = std::exp(dot * scale);
          total += p[j];
        }
        for (int d = 0; d < head_dim; ++d) {
          double s = 0.0;
          for (int j = 0; j < rows_k; ++j) s += p[j] * v[j * kv_stride + g * head_dim + d];
          want[(i * heads + h) * head_dim + d] = s / total;
        }
      }
    INFO("masked=" << masked);
    REQUIRE(max_rel_error(out, want) < 1e-5);
  }
  // Query 0 under the causal mask sees key 0 alone, so it returns that value row exactly.
  std::vector<float> out(static_cast<size_t>(rows_q) * heads * head_dim);
  pi0::ref::attention(q.data(), q_stride, k, kv_stride, v, kv_stride, out.data(), rows_q, rows_k,
                      heads, kv_heads, head_dim, scale, Causal::allowed, nullptr);
  for (int d = 0; d < head_dim; ++d) REQUIRE(out[d] == v[d]);
}

TEST_CASE("layer norm and rms norm normalise each row", "[common]") {
  const int rows = 5, width = 33;
  auto x = random_vector(static_cast<size_t>(rows) * width, 8, 3.0f);
  for (int i = 0; i < width; ++i) x[i] += 10.0f;  // a large mean on row 0
  std::vector<float> ln(x.size()), rms(x.size());
  pi0::ref::layer_norm(x.data(), nullptr, nullptr, ln.data(), rows, width, 0.0f);
  pi0::ref::rms_norm(x.data(), rms.data(), rows, width, 0.0f);
  for (int r = 0; r < rows; ++r) {
    double mean = 0.0, sq = 0.0, rms_sq = 0.0;
    for (int i = 0; i < width; ++i) {
      mean += ln[r * width + i];
      sq += ln[r * width + i] * ln[r * width + i];
      rms_sq += rms[r * width + i] * rms[r * width + i];
    }
    REQUIRE(std::abs(mean / width) < 1e-5);
    REQUIRE(std::abs(sq / width - 1.0) < 1e-4);
    REQUIRE(std::abs(rms_sq / width - 1.0) < 1e-4);
    // rms_norm only scales: every element keeps its sign and ratio to the others.
    const float ratio = rms[r * width] / x[r * width];
    for (int i = 1; i < width; ++i)
      REQUIRE(std::abs(rms[r * width + i] / x[r * width + i] - ratio) < 1e-5f * ratio);
  }
  // Weight and bias apply after normalising.
  const auto weight = random_vector(width, 9), bias = random_vector(width, 10);
  std::vector<float> affine(x.size());
  pi0::ref::layer_norm(x.data(), weight.data(), bias.data(), affine.data(), rows, width, 0.0f);
  for (size_t i = 0; i < x.size(); ++i)
    REQUIRE(std::abs(affine[i] - (ln[i] * weight[i % width] + bias[i % width])) < 1e-5f);
  // Epsilon keeps an all-zero row finite.
  std::vector<float> zeros(width, 0.0f), out(width);
  pi0::ref::rms_norm(zeros.data(), out.data(), 1, width, 1e-6f);
  for (float v : out) REQUIRE(v == 0.0f);
}

TEST_CASE("activations follow their formulas", "[common]") {
  for (float x : {-4.0f, -1.0f, -0.1f, 0.0f, 0.5f, 2.0f, 6.0f}) {
    const double g =
        0.5 * x *
        (1.0 + std::tanh(std::sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
    REQUIRE(std::abs(pi0::ref::gelu_tanh(x) - g) < 1e-6);
    REQUIRE(std::abs(pi0::ref::silu(x) - x / (1.0 + std::exp(-x))) < 1e-6);
  }
}

#ifdef PI0_TEST_HAVE_OMP
TEST_CASE("ops give bitwise equal results for any thread count", "[common]") {
  // Large enough that every op takes its parallel path.
  const int m = 70, k = 600, n = 131;
  const auto x = random_vector(static_cast<size_t>(m) * k, 11);
  const auto w = random_vector(static_cast<size_t>(k) * n, 12);
  const int rows = 300, heads = 4, head_dim = 64, width = heads * head_dim;
  const auto q = random_vector(static_cast<size_t>(rows) * width, 13);
  const auto kv = random_vector(static_cast<size_t>(rows) * head_dim * 2, 14);
  auto run = [&] {
    std::vector<float> out(static_cast<size_t>(m) * n);
    pi0::ref::matmul(x.data(), w.data(), nullptr, out.data(), m, k, n, false);
    std::vector<float> attn(q.size());
    pi0::ref::attention(q.data(), width, kv.data(), 2 * head_dim, kv.data() + head_dim,
                        2 * head_dim, attn.data(), rows, rows, heads, 1, head_dim, 0.125f,
                        Causal::allowed, nullptr);
    std::vector<float> roped = q;
    pi0::ref::rope(roped.data(), rows, heads, head_dim, width, 3, 10000.0f);
    std::vector<float> norm(q.size());
    pi0::ref::rms_norm(q.data(), norm.data(), rows, width, 1e-6f);
    out.insert(out.end(), attn.begin(), attn.end());
    out.insert(out.end(), roped.begin(), roped.end());
    out.insert(out.end(), norm.begin(), norm.end());
    return out;
  };
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = run();
  for (int t : {2, 3, 5}) {
    omp_set_num_threads(t);
    const auto many = run();
    INFO("threads " << t);
    CHECK(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0);
  }
  omp_set_num_threads(threads);
}
#endif
