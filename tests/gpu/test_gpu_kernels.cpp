// Each CUDA building block against the fp32 CPU reference ops on fresh random data. Inputs are
// rounded to bf16 on the host first, so the reference sees exactly what the GPU sees and the
// error left is the GPU's own (bf16 outputs: ~2e-3; fp32 outputs: ~1e-6).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/cuda/attention.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/fused_attention.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/gemm_table.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/l2_prefetch.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/qkv_rope.hpp"
#include "pi0/cuda/wgmma_attention.hpp"
#include "pi0/reference_ops.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;

namespace {

constexpr double kBf16Bound = 1e-2;

template <typename T>
DeviceBuffer<T> up(const std::vector<T>& v) {
  return cuda::upload(v, "test input");
}

std::vector<float> down_bf16(const DeviceBuffer<Bf16>& d) {
  return to_float(cuda::download(d.get(), d.size()));
}

std::vector<float> down_f32(const DeviceBuffer<float>& d) {
  return cuda::download(d.get(), d.size());
}

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (const float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// NaN anywhere gives NaN, which fails every bound.
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  PI0_CHECK(a.size() == b.size(), "max_abs_diff: size mismatch");
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (std::isnan(d)) return d;
    m = std::max(m, d);
  }
  return m;
}

}  // namespace

// Widths that take the row-in-registers kernels with 1, 2, 3 (as 4), 4 and 8 float4 per thread,
// and ones that take the plain kernels: not a multiple of 4, wider than 4096, or (the last run)
// an input that is not 16-byte aligned.
TEST_CASE("layernorm matches the reference", "[gpu]") {
  for (const int width : {1152, 768, 2048, 4096, 500, 1150, 8192, -1152}) {
    const bool misaligned = width < 0;  // the input starts one float into its buffer
    const int cols = misaligned ? -width : width, rows = 37;
    const auto x = random_floats(static_cast<size_t>(rows) * cols, 1, 2.0f, 0.5f);
    const auto w = rounded(random_floats(cols, 2, 0.5f, 1.0f));
    const auto b = rounded(random_floats(cols, 3, 0.2f));
    const size_t offset = misaligned ? 1 : 0;
    std::vector<float> padded(x.size() + offset, 0.0f);
    std::copy(x.begin(), x.end(), padded.begin() + static_cast<std::ptrdiff_t>(offset));
    auto dx = up(padded);
    auto dw = up(to_bf16(w));
    auto db = up(to_bf16(b));
    auto out = poisoned<Bf16>(x.size());
    cuda::layer_norm(dx.get() + offset, dw.get(), db.get(), out.get(), rows, cols, 1e-5f, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(x.size());
    ref::layer_norm(x.data(), w.data(), b.data(), ref.data(), rows, cols, 1e-5f);
    const double err = rel_error(down_bf16(out), ref);
    report("layernorm 37 x " + std::to_string(cols) + (misaligned ? ", misaligned input" : ""),
           err);
    REQUIRE(err < 5e-3);
  }
}

TEST_CASE("rmsnorm matches the reference", "[gpu]") {
  for (const int width : {1024, 2048, 4096, 300, 1022, 8192}) {
    const int rows = 65;
    const auto x = random_floats(static_cast<size_t>(rows) * width, 4, 3.0f, -0.3f);
    auto dx = up(x);
    auto out = poisoned<Bf16>(x.size());
    cuda::rms_norm(dx.get(), out.get(), rows, width, 1e-6f, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(x.size());
    ref::rms_norm(x.data(), ref.data(), rows, width, 1e-6f);
    const double err = rel_error(down_bf16(out), ref);
    report("rmsnorm 65 x " + std::to_string(width), err);
    REQUIRE(err < 5e-3);
  }
}

// 420 rows of head 256 take the four-pairs-a-thread kernel; 21 rows (too few to vectorize), a
// head of 12 (not a multiple of 8) and a q output that is not 16-byte aligned take the pair
// kernel. Both compute each angle the same way.
TEST_CASE("rope split writes rotated q and k and copies v", "[gpu]") {
  struct Case {
    int rows, head_dim;
    size_t q_offset;  // elements into q's buffer
  };
  for (const Case cs : {Case{420, 256, 0}, Case{21, 256, 0}, Case{21, 12, 0}, Case{420, 256, 2}}) {
    const int rows = cs.rows, heads = 8, hd = cs.head_dim, first = 517;
    const float theta = 10000.0f;
    const int width = (heads + 2) * hd;
    const auto qkv = rounded(random_floats(static_cast<size_t>(rows) * width, 5));
    auto dqkv = up(to_bf16(qkv));
    const size_t q_size = static_cast<size_t>(rows) * heads * hd;
    auto q = poisoned<Bf16>(q_size + cs.q_offset);
    auto k = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    auto v = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    cuda::rope_split_qkv(dqkv.get(), rows, heads, hd, first, theta, q.get() + cs.q_offset, k.get(),
                         v.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> rq(q_size), rk(static_cast<size_t>(rows) * hd), rv(rk.size());
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < heads * hd; ++i)
        rq[static_cast<size_t>(r) * heads * hd + i] = qkv[static_cast<size_t>(r) * width + i];
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < hd; ++i) {
        rk[static_cast<size_t>(r) * hd + i] = qkv[static_cast<size_t>(r) * width + heads * hd + i];
        rv[static_cast<size_t>(r) * hd + i] =
            qkv[static_cast<size_t>(r) * width + (heads + 1) * hd + i];
      }
    ref::rope(rq.data(), rows, heads, hd, heads * hd, first, theta);
    ref::rope(rk.data(), rows, 1, hd, hd, first, theta);
    auto gq = down_bf16(q);
    gq.erase(gq.begin(), gq.begin() + static_cast<std::ptrdiff_t>(cs.q_offset));
    const double eq = rel_error(gq, rq), ek = rel_error(down_bf16(k), rk);
    const std::string name = "rope " + std::to_string(rows) + " rows of head " +
                             std::to_string(hd) + (cs.q_offset ? ", q misaligned" : "");
    report(name + " q", eq);
    report(name + " k", ek);
    REQUIRE(eq < 5e-3);
    REQUIRE(ek < 5e-3);
    REQUIRE(rel_error(down_bf16(v), rv) == 0.0);
  }
}

// An RMS norm folded into the kernel after the product (RowRmsScale): row r of RoPE's and GeGLU's
// input is scaled by rsqrt(mean(x[r]^2) + eps) of the bf16 residual stream x first, which is what
// the product would have given had it read the normed rows. 420 rows take the 16-byte kernels
// (four pairs, eight columns a thread), 65 rows the pair kernels, an odd GeGLU width the scalar
// one; x of width 1022 is summed with scalar loads, 1024 and 2048 with 16-byte ones.
TEST_CASE("rope and geglu apply a folded rms norm", "[gpu]") {
  struct Case {
    int rows, x_width, mlp_width;
  };
  for (const Case cs : {Case{420, 2048, 4096}, Case{65, 1024, 4096}, Case{65, 1022, 101}}) {
    const int rows = cs.rows, xw = cs.x_width, heads = 8, hd = 256, first = 300;
    const float eps = 1e-6f, theta = 10000.0f;
    const auto x = rounded(random_floats(static_cast<size_t>(rows) * xw, 60, 3.0f, -0.3f));
    std::vector<float> scale(static_cast<size_t>(rows));
    for (int r = 0; r < rows; ++r) {
      double squares = 0.0;
      for (int i = 0; i < xw; ++i) {
        const double v = x[static_cast<size_t>(r) * xw + i];
        squares += v * v;
      }
      scale[static_cast<size_t>(r)] = static_cast<float>(1.0 / std::sqrt(squares / xw + eps));
    }
    auto dx = up(to_bf16(x));
    const cuda::RowRmsScale rms{dx.get(), xw, eps};
    const std::string name = std::to_string(rows) + " rows, x width " + std::to_string(xw);

    // The norm itself, on the bf16 stream (the Euler step's).
    auto normed = poisoned<Bf16>(x.size());
    cuda::rms_norm(dx.get(), normed.get(), rows, xw, eps, nullptr);
    // RoPE + K/V write.
    const int width = (heads + 2) * hd;
    const auto qkv = rounded(random_floats(static_cast<size_t>(rows) * width, 61));
    auto dqkv = up(to_bf16(qkv));
    auto q = poisoned<Bf16>(static_cast<size_t>(rows) * heads * hd);
    auto k = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    auto v = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    cuda::rope_split_qkv(dqkv.get(), rows, heads, hd, first, theta, q.get(), k.get(), v.get(),
                         nullptr, rms);
    // GeGLU.
    const int mw = cs.mlp_width;
    const auto gu = rounded(random_floats(static_cast<size_t>(rows) * 2 * mw, 62, 2.0f));
    auto dgu = up(to_bf16(gu));
    auto act = poisoned<Bf16>(static_cast<size_t>(rows) * mw);
    cuda::geglu(dgu.get(), act.get(), rows, mw, nullptr, rms);
    CUDA_CHECK(cudaDeviceSynchronize());

    std::vector<float> rn(x.size()), rq(q.size()), rk(k.size()), rv(v.size()), ract(act.size());
    for (int r = 0; r < rows; ++r) {
      const size_t row = static_cast<size_t>(r);
      const float sr = scale[row];
      for (int i = 0; i < xw; ++i) rn[row * xw + i] = x[row * xw + i] * sr;
      for (int i = 0; i < heads * hd; ++i) rq[row * heads * hd + i] = qkv[row * width + i] * sr;
      for (int i = 0; i < hd; ++i) {
        rk[row * hd + i] = qkv[row * width + heads * hd + i] * sr;
        rv[row * hd + i] = qkv[row * width + (heads + 1) * hd + i] * sr;
      }
      for (int j = 0; j < mw; ++j)
        ract[row * mw + j] =
            ref::gelu_tanh(gu[row * 2 * mw + j] * sr) * (gu[row * 2 * mw + mw + j] * sr);
    }
    ref::rope(rq.data(), rows, heads, hd, heads * hd, first, theta);
    ref::rope(rk.data(), rows, 1, hd, hd, first, theta);
    const double en = rel_error(down_bf16(normed), rn), eq = rel_error(down_bf16(q), rq),
                 ek = rel_error(down_bf16(k), rk), ev = rel_error(down_bf16(v), rv),
                 eg = rel_error(down_bf16(act), ract);
    report("rms norm of the bf16 stream, " + name, en);
    report("rope q with the folded norm, " + name, eq);
    report("rope k with the folded norm, " + name, ek);
    report("v with the folded norm, " + name, ev);
    report("geglu " + std::to_string(mw) + " wide with the folded norm, " + name, eg);
    REQUIRE(en < 5e-3);
    REQUIRE(eq < 5e-3);
    REQUIRE(ek < 5e-3);
    REQUIRE(ev < 5e-3);
    REQUIRE(eg < 5e-3);
  }
}

namespace {

// Runs `run` again into a freshly poisoned `out`: the fused kernel's key ranges combine in a fixed
// order, so the bits must repeat.
template <typename Run>
void require_same_bits_again(DeviceBuffer<Bf16>& out, Run&& run) {
  const auto first = cuda::download(out.get(), out.size());
  CUDA_CHECK(cudaMemset(out.get(), 0xFF, out.bytes()));
  run();
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto second = cuda::download(out.get(), out.size());
  REQUIRE(bitwise_equal(first.data(), second.data(), first.size() * sizeof(Bf16)));
}

struct PrefixMask {
  int limited_queries;
  int limited_keys;
};
bool prefix_mask(int q, int k, const void* ctx) {
  const auto* m = static_cast<const PrefixMask*>(ctx);
  return q >= m->limited_queries || k < m->limited_keys;
}

// kernels: the kernels asked for. falls_back_to_fused: the GEMMs are expected to land on the
// built-in kernel, and the attention to switch to the fused kernel and free their scratch.
void check_shared_kv(int queries, int keys, int heads, int hd, int limited_queries,
                     int limited_keys, uint64_t seed,
                     cuda::AttentionKernels kernels = cuda::AttentionKernels::kGemms,
                     bool falls_back_to_fused = false) {
  using cuda::AttentionKernels;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const auto q = rounded(random_floats(static_cast<size_t>(queries) * heads * hd, seed, 1.5f));
  const auto k = rounded(random_floats(static_cast<size_t>(keys) * hd, seed + 1, 1.5f));
  const auto v = rounded(random_floats(static_cast<size_t>(keys) * hd, seed + 2));
  auto dq = up(to_bf16(q));
  auto dk = up(to_bf16(k));
  auto dv = up(to_bf16(v));
  auto out = poisoned<Bf16>(q.size());
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  cuda::SharedKvAttention::Params params{queries, heads,           hd,          keys,
                                         scale,   limited_queries, limited_keys};
  params.kernels = kernels;
  cuda::SharedKvAttention att(lt.get(), params, ws.get(), ws.bytes());
  const bool fused = kernels == AttentionKernels::kFused,
             tiled = kernels == AttentionKernels::kTiled;
  const bool wgmma = kernels == AttentionKernels::kWgmma;
  REQUIRE(att.fused() == (fused || falls_back_to_fused));
  REQUIRE(att.tiled() == tiled);
  REQUIRE(att.on_wgmma() == wgmma);
  if (falls_back_to_fused || wgmma) REQUIRE(att.scratch_bytes() == 0);
  att.run(dq.get(), dk.get(), dv.get(), out.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  if (att.fused() || att.tiled() || att.on_wgmma())
    require_same_bits_again(out,
                            [&] { att.run(dq.get(), dk.get(), dv.get(), out.get(), nullptr); });
  std::vector<float> ref(q.size());
  PrefixMask mask{limited_queries, limited_keys};
  ref::attention(q.data(), heads * hd, k.data(), hd, v.data(), hd, ref.data(), queries, keys, heads,
                 1, hd, scale, limited_queries > 0 ? prefix_mask : nullptr, &mask);
  const double err = rel_error(down_bf16(out), ref);
  report(std::string(falls_back_to_fused ? "fused (GEMMs on the built-in kernel) "
                     : fused             ? "fused "
                     : tiled             ? "tiled "
                     : wgmma             ? "wgmma "
                                         : "") +
             "shared-kv attention q=" + std::to_string(queries) + " k=" + std::to_string(keys) +
             " hd=" + std::to_string(hd) +
             (limited_queries ? " state-token mask" : " bidirectional"),
         err);
  REQUIRE(err < kBf16Bound);
}

}  // namespace

// The decoder's qkv product, folded norm, RoPE and Q/K/V split as one kernel, against the
// reference ops: X W^T' in fp32, each row scaled by its RMS, then RoPE on Q and K. The decoder's
// shape (one frame of 64 rows, and C = 50's 51), a few rows, and a narrower product (k 128, one
// query head: two blocks of K, 24 CTAs).
TEST_CASE("the fused qkv product with its norm and rope matches the reference", "[gpu]") {
  struct Case {
    int rows, k, heads, first;
  };
  const cuda::QkvRopeShape decoder{64, 1024, 8, 256};
  if (!cuda::qkv_rope_supported(decoder)) {
    PI0_SKIP("this binary has no sm_90a code for this GPU");
  }
  for (const Case cs : {Case{64, 1024, 8, 576}, Case{51, 1024, 8, 583}, Case{9, 1024, 8, 40},
                        Case{33, 128, 1, 7}}) {
    const int rows = cs.rows, kd = cs.k, heads = cs.heads, hd = 256, n = (heads + 2) * hd;
    const float eps = 1e-6f, theta = 10000.0f;
    const auto x = rounded(random_floats(static_cast<size_t>(rows) * kd, 70, 1.5f, 0.2f));
    const auto wt = rounded(
        random_floats(static_cast<size_t>(n) * kd, 71, 1.0f / std::sqrt(static_cast<float>(kd))));
    auto dx = up(to_bf16(x));
    auto dwt = up(to_bf16(wt));
    auto q = poisoned<Bf16>(static_cast<size_t>(rows) * heads * hd);
    auto k = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    auto v = poisoned<Bf16>(static_cast<size_t>(rows) * hd);
    const cuda::QkvRopeShape shape{rows, kd, heads, hd};
    REQUIRE(cuda::qkv_rope_supported(shape));
    cuda::qkv_rope(shape, dx.get(), dwt.get(), q.get(), k.get(), v.get(), cs.first, theta, eps,
                   nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());

    // The reference's own order: rms(x) @ W, then RoPE on Q and K in place.
    std::vector<float> w(wt.size());
    for (int c = 0; c < n; ++c)
      for (int i = 0; i < kd; ++i)
        w[static_cast<size_t>(i) * n + c] = wt[static_cast<size_t>(c) * kd + i];
    std::vector<float> h(x.size()), qkv(static_cast<size_t>(rows) * n);
    ref::rms_norm(x.data(), h.data(), rows, kd, eps);
    ref::matmul(h.data(), w.data(), nullptr, qkv.data(), rows, kd, n, false);
    ref::rope(qkv.data(), rows, heads, hd, n, cs.first, theta);
    ref::rope(qkv.data() + heads * hd, rows, 1, hd, n, cs.first, theta);
    std::vector<float> rq, rk, rv;
    for (int r = 0; r < rows; ++r) {
      const auto row = qkv.begin() + static_cast<std::ptrdiff_t>(r) * n;
      rq.insert(rq.end(), row, row + heads * hd);
      rk.insert(rk.end(), row + heads * hd, row + (heads + 1) * hd);
      rv.insert(rv.end(), row + (heads + 1) * hd, row + n);
    }
    const std::string name = std::to_string(rows) + " rows, k " + std::to_string(kd) + ", " +
                             std::to_string(heads) + " query heads";
    const double eq = rel_error(down_bf16(q), rq), ek = rel_error(down_bf16(k), rk),
                 ev = rel_error(down_bf16(v), rv);
    report("fused qkv + norm + rope q, " + name, eq);
    report("fused qkv + norm + rope k, " + name, ek);
    report("fused qkv + norm v, " + name, ev);
    REQUIRE(eq < 5e-3);
    REQUIRE(ek < 5e-3);
    REQUIRE(ev < 5e-3);
  }
}
TEST_CASE("shared kv attention matches the reference bidirectional", "[gpu]") {
  check_shared_kv(532, 532, 8, 256, 0, 0, 10);  // encoder prefix with a prompt
  check_shared_kv(40, 70, 2, 32, 0, 0, 11);     // tiny widths
}

TEST_CASE("fused shared kv attention matches the reference", "[gpu]") {
  const auto fused = cuda::AttentionKernels::kFused;
  check_shared_kv(64, 576, 8, 256, 1, 513, 40, fused);  // decoder, V=2 C=63: 6 key ranges
  check_shared_kv(51, 583, 8, 256, 1, 533, 41, fused);  // decoder, C=50 P=20: partial tiles
  check_shared_kv(532, 532, 8, 256, 0, 0, 42, fused);   // encoder-sized, bidirectional
  check_shared_kv(9, 40, 2, 128, 1, 3, 43, fused);      // one key range, rows < 64
  check_shared_kv(9, 40, 2, 64, 1, 3, 46, fused);       // keys in shared memory, state token
  check_shared_kv(33, 200, 4, 64, 2, 100, 47, fused);   // the same, its mask past the first part
  check_shared_kv(33, 300, 4, 64, 2, 100, 44, fused);   // head_dim 64
}

// The two tiled kernels: partial row blocks and key tiles, masks that leave whole tiles of a row
// empty, every head size they take.
TEST_CASE("tiled shared kv attention matches the reference", "[gpu]") {
  const auto tiled = cuda::AttentionKernels::kTiled;
  check_shared_kv(64, 576, 8, 256, 1, 513, 50, tiled);  // decoder, V=2 C=63
  check_shared_kv(51, 583, 8, 256, 1, 533, 51, tiled);  // decoder, C=50 P=20
  check_shared_kv(64, 832, 8, 256, 1, 769, 52, tiled);  // decoder, V=3
  check_shared_kv(532, 532, 8, 256, 0, 0, 53, tiled);   // encoder-sized, with a prompt
  check_shared_kv(9, 200, 2, 128, 1, 3, 54, tiled);     // token 0 sees only 3 keys
  check_shared_kv(33, 300, 4, 64, 2, 100, 55, tiled);   // head_dim 64
  check_shared_kv(40, 70, 2, 32, 1, 41, 56, tiled);     // tiny widths
}

// The wgmma kernel (head size 256, sm_90a builds): one and several key steps per range, partial
// row blocks and key tiles, the state token's mask, one range and clusters up to 13 ranges.
TEST_CASE("wgmma shared kv attention matches the reference", "[gpu]") {
  if (!cuda::wgmma_attention_available()) {
    PI0_SKIP("this binary has no sm_90a code for this GPU");
  }
  const auto wgmma = cuda::AttentionKernels::kWgmma;
  check_shared_kv(64, 576, 8, 256, 1, 513, 60, wgmma);   // decoder, V=2 C=63: 9 ranges of 64
  check_shared_kv(51, 583, 8, 256, 1, 533, 61, wgmma);   // decoder, C=50 P=20: partial tiles
  check_shared_kv(64, 832, 8, 256, 1, 769, 62, wgmma);   // decoder, V=3
  check_shared_kv(512, 512, 8, 256, 0, 0, 63, wgmma);    // encoder prefix, V=2 P=0
  check_shared_kv(532, 532, 8, 256, 0, 0, 64, wgmma);    // encoder prefix with a prompt
  check_shared_kv(9, 40, 2, 256, 1, 3, 65, wgmma);       // one range, rows < 64, 3 keys seen
  check_shared_kv(1024, 1000, 1, 256, 0, 0, 66, wgmma);  // 8 ranges of 2 steps, partial tile
  check_shared_kv(1024, 570, 1, 256, 0, 0, 67, wgmma);   // ranges of 2, 2, 2, 2 and 1 steps
  // 16 ranges of 2 steps, a partial last tile: the largest (non-portable) cluster, which a small
  // MPS share may not hold; there the attention keeps another path and this case is skipped.
  cuda::WgmmaAttentionShape sixteen;
  sixteen.rows = 2 * 64;
  sixteen.keys = 2000;
  sixteen = cuda::plan_wgmma_attention(sixteen);
  REQUIRE(sixteen.splits == 16);
  if (cuda::wgmma_attention_runs_here(sixteen)) {
    check_shared_kv(64, 2000, 2, 256, 0, 0, 68, wgmma);
  } else {
    PI0_SKIP("the 16-range case: a cluster of 16 CTAs does not fit this process's SM share");
  }
}

// At some MPS shares no cuBLASLt algorithm gets the QK / PV products right; the attention then
// runs the fused kernel rather than the plain GEMM kernel, and keeps no GEMM scratch for it.
TEST_CASE("shared kv attention falls back to the fused kernel without keeping gemm scratch",
          "[gpu]") {
  const ScopedEnv builtin("PI0_GEMM_PATH", "builtin");  // the Gemm tier to start at
  check_shared_kv(64, 576, 8, 256, 1, 513, 45, cuda::AttentionKernels::kGemms, true);  // decoder
}

TEST_CASE("shared kv attention applies the state token mask", "[gpu]") {
  // Decoder shape: 64 suffix queries over 512 prefix + 64 suffix keys; token 0 sees 513 keys.
  check_shared_kv(64, 576, 8, 256, 1, 513, 20);
  // A mask that changes the result a lot: token 0 sees only the first 3 of 50 keys.
  check_shared_kv(9, 50, 2, 32, 1, 3, 21);
}

namespace {

// SigLIP-style attention within each view, on the GEMM path or the fused kernel, against the
// reference; the fused kernel must also repeat its bits.
void check_view_attention(int views, int tokens, int heads, int hd, bool fused, uint64_t seed) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int width = 3 * heads * hd;
  const auto qkv = rounded(random_floats(static_cast<size_t>(views) * tokens * width, seed, 1.5f));
  auto dqkv = up(to_bf16(qkv));
  auto out = poisoned<Bf16>(static_cast<size_t>(views) * tokens * heads * hd);
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  cuda::ViewAttention::Params params{views, tokens, heads, hd, scale};
  params.fused = fused;
  cuda::ViewAttention att(lt.get(), params, ws.get(), ws.bytes());
  REQUIRE(att.fused() == fused);
  if (fused) REQUIRE(att.scratch_bytes() == 0);
  att.run(dqkv.get(), out.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  if (fused) require_same_bits_again(out, [&] { att.run(dqkv.get(), out.get(), nullptr); });
  std::vector<float> ref(out.size());
  for (int v = 0; v < views; ++v) {
    const float* base = qkv.data() + static_cast<size_t>(v) * tokens * width;
    ref::attention(base, width, base + heads * hd, width, base + 2 * heads * hd, width,
                   ref.data() + static_cast<size_t>(v) * tokens * heads * hd, tokens, tokens, heads,
                   heads, hd, scale, nullptr, nullptr);
  }
  const double err = rel_error(down_bf16(out), ref);
  report(std::string(fused ? "fused " : "") + "view attention " + std::to_string(views) +
             " views x " + std::to_string(tokens) + " tokens, " + std::to_string(heads) + " x " +
             std::to_string(hd),
         err);
  REQUIRE(err < kBf16Bound);
}

}  // namespace

TEST_CASE("view attention keeps views apart and matches the reference", "[gpu]") {
  check_view_attention(2, 256, 16, 72, false, 30);
}

// SigLIP's head of 72 runs padded to 80 inside rows of 128: the padding must neither leak into
// the scores nor be written over the next head's columns.
// Up to 256 keys run on the kernel that holds every key in shared memory (four parts of the key
// tiles on each 16 query rows, merged in the CTA) where its CTAs fit one to an SM of an H100, the
// rest on the clustered one ("which fused attention kernel a shape gets" below checks the choice).
TEST_CASE("fused view attention matches the reference", "[gpu]") {
  check_view_attention(2, 256, 16, 72, true, 31);  // pi0, V=2: 8 tiles, 2 a part, 2 rounds
  check_view_attention(1, 200, 2, 72, true, 40);   // 7 tiles: the last part has 1, partial
  check_view_attention(3, 100, 4, 72, true, 32);   // partial tiles
  check_view_attention(1, 70, 2, 72, true, 35);    // 3 tiles: the last part has none
  check_view_attention(1, 20, 2, 72, true, 36);    // 1 tile: three parts have none
  check_view_attention(1, 40, 2, 64, true, 33);    // another head size
  check_view_attention(1, 256, 2, 64, true, 41);   // head 64 with 256 keys, 2 rounds
  check_view_attention(1, 300, 2, 72, true, 37);   // clustered: 2 key ranges in rows of 128
  check_view_attention(1, 300, 2, 64, true, 38);   // clustered, head 64
  check_view_attention(3, 256, 16, 72, true, 39);  // pi0, V=3: 192 CTAs, clustered
}

TEST_CASE("which fused attention kernel a shape gets", "[gpu]") {
  // The plan SigLIP's attention runs on, as the encoder builds it.
  auto view_plan = [](int views, int tokens, int heads, int hd) {
    cuda::LtHandle lt;
    DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
    cuda::ViewAttention::Params params{views, tokens, heads, hd, 1.0f};
    params.fused = true;
    cuda::ViewAttention att(lt.get(), params, ws.get(), ws.bytes());
    REQUIRE(att.fused());
    return att.fused_shape();
  };
  const cuda::FusedAttentionShape pi0_v2 = view_plan(2, 256, 16, 72);
  REQUIRE(pi0_v2.resident);
  REQUIRE(pi0_v2.splits == 1);
  REQUIRE(view_plan(1, 20, 2, 72).resident);
  REQUIRE(view_plan(1, 256, 2, 64).resident);
  REQUIRE_FALSE(view_plan(3, 256, 16, 72).resident);  // 192 CTAs
  REQUIRE_FALSE(view_plan(1, 300, 2, 72).resident);   // 300 keys
  REQUIRE_FALSE(view_plan(1, 40, 2, 128).resident);   // head 128 would spill registers
  {
    const ScopedEnv clustered("PI0_FUSED_ATTENTION_RESIDENT", "0");
    const cuda::FusedAttentionShape off = view_plan(2, 256, 16, 72);
    REQUIRE_FALSE(off.resident);
    REQUIRE(off.splits == 2);
  }
}

TEST_CASE("fused view attention on the clustered kernel matches the reference", "[gpu]") {
  const ScopedEnv clustered("PI0_FUSED_ATTENTION_RESIDENT", "0");
  check_view_attention(2, 256, 16, 72, true, 31);  // pi0, V=2: 2 key ranges
  check_view_attention(1, 40, 2, 72, true, 34);    // one key range: stores straight from registers
}

namespace {

// Y (+)= X @ W (+ bias) through cuda::Gemm against ref::matmul on the bf16-rounded operands.
double check_gemm(int m, int n, int k, cuda::DType y_type, cuda::Epilogue epi, bool accumulate,
                  bool transposed, uint64_t seed, bool erf_gelu = false,
                  std::string* path = nullptr) {
  const auto x = rounded(random_floats(static_cast<size_t>(m) * k, seed));
  const auto w =
      rounded(random_floats(static_cast<size_t>(k) * n, seed + 1, 1.0f / std::sqrt(float(k))));
  auto b = rounded(random_floats(n, seed + 2, 0.5f));
  const auto y0 = rounded(random_floats(static_cast<size_t>(m) * n, seed + 3));
  // W^T stored [n, k] when transposed.
  std::vector<float> w_stored(w.size());
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < n; ++j)
      w_stored[transposed ? static_cast<size_t>(j) * k + i : static_cast<size_t>(i) * n + j] =
          w[static_cast<size_t>(i) * n + j];
  cuda::GemmShape s = cuda::linear_shape(m, n, k, y_type, epi, accumulate);
  s.ld_w = transposed ? k : n;
  s.w_transposed = transposed;
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  cuda::Gemm g(lt.get(), s, ws.get(), ws.bytes());
  if (path) *path = g.path_name();
  auto dx = up(to_bf16(x));
  auto dw = up(to_bf16(w_stored));
  std::vector<float> out;
  const bool bias = epi != cuda::Epilogue::kNone;
  if (y_type == cuda::DType::kF32) {
    auto dy = accumulate ? up(y0) : poisoned<float>(y0.size());
    auto db = up(b);
    g.run(dx.get(), dw.get(), dy.get(), bias ? db.get() : nullptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    out = down_f32(dy);
  } else {
    auto dy = accumulate ? up(to_bf16(y0)) : poisoned<Bf16>(y0.size());
    auto db = up(to_bf16(b));
    g.run(dx.get(), dw.get(), dy.get(), bias ? db.get() : nullptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    out = down_bf16(dy);
  }
  std::vector<float> ref = accumulate ? y0 : std::vector<float>(y0.size(), 0.0f);
  std::vector<float> prod(ref.size());
  ref::matmul(x.data(), w.data(), bias ? b.data() : nullptr, prod.data(), m, k, n, false);
  for (size_t i = 0; i < prod.size(); ++i) {
    float p = prod[i];
    if (epi == cuda::Epilogue::kGeluBias)
      p = erf_gelu ? 0.5f * p * (1.0f + std::erf(p / std::sqrt(2.0f))) : ref::gelu_tanh(p);
    ref[i] += p;
  }
  return rel_error(out, ref);
}

}  // namespace

TEST_CASE("gemm matches the reference with every epilogue", "[gpu]") {
  using cuda::DType;
  using cuda::Epilogue;
  const double plain = check_gemm(96, 320, 200, DType::kBf16, Epilogue::kNone, false, false, 40);
  const double bias = check_gemm(64, 2560, 1024, DType::kBf16, Epilogue::kBias, false, false, 41);
  const double f32 = check_gemm(63, 1024, 1024, DType::kF32, Epilogue::kBias, false, false, 42);
  const double acc = check_gemm(512, 1152, 4304, DType::kF32, Epilogue::kBias, true, false, 43);
  const double acc_t = check_gemm(100, 72, 256, DType::kF32, Epilogue::kNone, true, true, 44);
  const double gelu =
      check_gemm(128, 4304, 1152, DType::kF32, Epilogue::kGeluBias, false, false, 45);
  const double gelu_erf =
      check_gemm(128, 4304, 1152, DType::kF32, Epilogue::kGeluBias, false, false, 45, true);
  const double gelu_bf16 =
      check_gemm(96, 4304, 1152, DType::kBf16, Epilogue::kGeluBias, false, false, 46);
  const double acc_bf16 =
      check_gemm(64, 1024, 4096, DType::kBf16, Epilogue::kNone, true, false, 47);
  report("gemm bf16 out", plain);
  report("gemm bf16 out + bias", bias);
  report("gemm fp32 out + bias", f32);
  report("gemm fp32 accumulate + bias (residual add)", acc);
  report("gemm fp32 accumulate, W transposed", acc_t);
  report("gemm fp32 out + bias + gelu (vs tanh gelu)", gelu);
  report("gemm fp32 out + bias + gelu (vs erf gelu, info)", gelu_erf);
  report("gemm bf16 out + bias + gelu", gelu_bf16);
  report("gemm bf16 accumulate (the bf16 residual add)", acc_bf16);
  REQUIRE(plain < 5e-3);
  REQUIRE(bias < 5e-3);
  // fp32 outputs keep the fp32 accumulation: only summation order differs.
  REQUIRE(f32 < 1e-4);
  REQUIRE(acc < 1e-4);
  REQUIRE(acc_t < 1e-4);
  REQUIRE(gelu < 2e-3);
  REQUIRE(gelu_bf16 < 5e-3);
  REQUIRE(acc_bf16 < 5e-3);
}

// A GEMM table entry (gemm_table.hpp) moves a Gemm to the configuration it names: one of the
// heuristic's candidates, or one a wide search found that the heuristic does not offer, which the
// Gemm builds. An entry cuBLASLt does not accept (a table tuned under another GPU, SM plan or
// cuBLASLt) or that is not a configuration at all is ignored. The decoder's gate|up shape, which
// has several candidates on an H100.
TEST_CASE("a gemm table entry picks its configuration only where cuBLASLt accepts it", "[gpu]") {
  const cuda::GemmShape s =
      cuda::linear_shape(64, 8192, 1024, cuda::DType::kBf16, cuda::Epilogue::kNone, false);
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  cuda::GemmTable none;
  const cuda::ScopedGemmTable without(&none);
  cuda::Gemm heuristic(lt.get(), s, ws.get(), ws.bytes());
  const int first = heuristic.chosen_candidate();
  const int offered = heuristic.candidates();
  REQUIRE(first >= 0);
  REQUIRE(offered > first + 1);
  const int other = first + 1;

  cuda::GemmTable table;
  table.set(s.describe(), cuda::GemmChoice{other, heuristic.describe_candidate(other)});
  {
    const cuda::ScopedGemmTable with(&table);
    const cuda::Gemm tuned(lt.get(), s, ws.get(), ws.bytes());
    CHECK(tuned.chosen_candidate() == other);
    CHECK(tuned.describe_candidate(other) == heuristic.describe_candidate(other));
  }

  // A GEMM of the same shape with a role of its own (the decoder's first flow step) takes the
  // shape's entry where the table has none for the role, and its own where it has one.
  {
    cuda::GemmShape roled = s;
    roled.role = "first step";
    REQUIRE(roled.describe() != s.describe());
    const cuda::ScopedGemmTable with(&table);
    const cuda::Gemm shared(lt.get(), roled, ws.get(), ws.bytes());
    CHECK(shared.chosen_candidate() == other);
    cuda::GemmTable own = table;
    own.set(roled.describe(), cuda::GemmChoice{first, heuristic.describe_candidate(first)});
    const cuda::ScopedGemmTable with_own(&own);
    const cuda::Gemm apart(lt.get(), roled, ws.get(), ws.bytes());
    CHECK(apart.chosen_candidate() == first);
  }

  // A configuration from the wide list, past the heuristic's, is built where it is read. One
  // without a cluster or split-K, so that it runs at an MPS share too (gpu_check runs these
  // tests at 30%).
  REQUIRE(heuristic.widen_candidates() > 0);
  int widened = -1;
  for (int c = offered; c < heuristic.candidates() && widened < 0; ++c) {
    const auto config = cuda::GemmAlgoConfig::parse(heuristic.describe_candidate(c));
    REQUIRE(config.has_value());
    if (config->cluster == CUBLASLT_CLUSTER_SHAPE_1x1x1 && config->split_k == 1) widened = c;
  }
  REQUIRE(widened >= offered);
  const std::string wide_algo = heuristic.describe_candidate(widened);
  cuda::GemmTable wide;
  wide.set(s.describe(), cuda::GemmChoice{widened, wide_algo});
  {
    const cuda::ScopedGemmTable with(&wide);
    const cuda::Gemm built(lt.get(), s, ws.get(), ws.bytes());
    REQUIRE(built.chosen_candidate() >= offered);
    CHECK(built.describe_candidate(built.chosen_candidate()) == wide_algo);
  }

  // In-place tuning's two steps: a ranking of checked candidates, fastest first, and a switch to
  // any of them.
  {
    DeviceBuffer<Bf16> x(64 * 1024, "x"), w(1024 * 8192, "w"), y(64 * 8192, "y");
    cuda::fill_random(x.get(), x.size(), 31, 1.0f, nullptr);
    cuda::fill_random(w.get(), w.size(), 32, 0.03f, nullptr);
    cuda::Gemm::AutotuneOptions options;  // the list as widened above, up to 32 of it
    const auto ranked =
        heuristic.rank_candidates(x.get(), w.get(), y.get(), nullptr, nullptr, options, 3);
    REQUIRE(!ranked.empty());
    REQUIRE(ranked.size() <= 3);
    for (size_t i = 1; i < ranked.size(); ++i) CHECK(ranked[i - 1].first <= ranked[i].first);
    for (const auto& [ms, c] : ranked) {
      CHECK(ms > 0.0f);
      REQUIRE(heuristic.select_candidate(c));
      CHECK(heuristic.chosen_candidate() == c);
    }
  }

  for (const char* stale :
       {"algo 0 tile 0 stages 0 split-k 0 cluster 0",  // not a configuration (v13's form)
        "algo 9999 tile 12 stages 35 split-k 1 reduction 0 swizzle 0 custom 0 inner 0 cluster 2"}) {
    cuda::GemmTable bad;
    bad.set(s.describe(), cuda::GemmChoice{other, stale});
    const cuda::ScopedGemmTable with(&bad);
    const cuda::Gemm ignored(lt.get(), s, ws.get(), ws.bytes());
    CHECK(ignored.chosen_candidate() == first);
    CHECK(ignored.candidates() == offered);
  }
}

TEST_CASE("gemm rejects misaligned operands", "[gpu]") {
  cuda::GemmShape s;
  s.m = 16;
  s.n = 64;
  s.k = 64;
  s.ld_x = 64;
  s.ld_w = 64;
  s.ld_y = 64;
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  cuda::Gemm g(lt.get(), s, ws.get(), ws.bytes());
  DeviceBuffer<Bf16> a(4096 + 8, "a"), b(4096, "b"), c(4096, "c");
  REQUIRE_THROWS_AS(g.run(a.get() + 8, b.get(), c.get(), nullptr, nullptr), pi0::Error);
}

// Row softmax over widths that take the register kernel with 2, 5 and 8 float4 per lane, and one
// too wide for it; rows below limited_rows see only the first keys, the rest of each row is 0.
TEST_CASE("row softmax matches the host formula", "[gpu]") {
  for (const int cols : {50, 575, 640, 1000, 2000}) {
    const int rows = 37, ld = (cols + 15) / 16 * 16, limited_rows = 3, limited_cols = cols / 3;
    const auto scores = random_floats(static_cast<size_t>(rows) * ld, 60 + cols, 4.0f);
    auto ds = up(scores);
    auto probs = poisoned<Bf16>(static_cast<size_t>(rows) * ld);
    cuda::softmax_rows(ds.get(), ld, probs.get(), ld, rows, cols, limited_rows, limited_cols,
                       nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = down_bf16(probs);
    std::vector<float> ref, out;
    for (int r = 0; r < rows; ++r) {
      const int valid = r < limited_rows ? limited_cols : cols;
      const float* s = scores.data() + static_cast<size_t>(r) * ld;
      double m = -1e30, sum = 0.0;
      for (int c = 0; c < valid; ++c) m = std::max(m, static_cast<double>(s[c]));
      for (int c = 0; c < valid; ++c) sum += std::exp(s[c] - m);
      for (int c = 0; c < cols; ++c) {
        ref.push_back(c < valid ? static_cast<float>(std::exp(s[c] - m) / sum) : 0.0f);
        out.push_back(got[static_cast<size_t>(r) * ld + c]);
      }
    }
    const double err = rel_error(out, ref);
    report("row softmax 37 x " + std::to_string(cols) + ", 3 rows masked", err);
    REQUIRE(err < 5e-3);
  }
}

// GeGLU at widths that take eight, two and one column per thread.
TEST_CASE("geglu and silu match the host formulas", "[gpu]") {
  // 160 x 4096 takes eight columns a thread; 33 x 4096 (too few to vectorize) and 4100 two;
  // an odd width one.
  for (const auto& [rows, width] : {std::pair{160, 4096}, {33, 4096}, {33, 4100}, {33, 101}}) {
    const auto gu = rounded(random_floats(static_cast<size_t>(rows) * 2 * width, 50, 2.0f));
    auto dgu = up(to_bf16(gu));
    auto out = poisoned<Bf16>(static_cast<size_t>(rows) * width);
    cuda::geglu(dgu.get(), out.get(), rows, width, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(out.size());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < width; ++j)
        ref[static_cast<size_t>(r) * width + j] =
            ref::gelu_tanh(gu[static_cast<size_t>(r) * 2 * width + j]) *
            gu[static_cast<size_t>(r) * 2 * width + width + j];
    const double eg = rel_error(down_bf16(out), ref);
    report("geglu " + std::to_string(rows) + " x " + std::to_string(width), eg);
    REQUIRE(eg < 5e-3);
  }
  const auto x = rounded(random_floats(5000, 51, 3.0f));
  auto dx = up(to_bf16(x));
  cuda::silu_inplace(dx.get(), x.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> sref(x.size());
  for (size_t i = 0; i < x.size(); ++i) sref[i] = ref::silu(x[i]);
  const double es = rel_error(down_bf16(dx), sref);
  report("silu", es);
  REQUIRE(es < 5e-3);
}

TEST_CASE("patch extraction and row broadcast follow the spec layout", "[gpu]") {
  const int views = 2, size = 56, patch = 14, ch = 3, side = size / patch;
  const int values = patch * patch * ch, tokens = side * side, width = 40;
  const auto img = to_bf16(random_floats(static_cast<size_t>(views) * size * size * ch, 60));
  auto dimg = up(img);
  auto patches = poisoned<Bf16>(static_cast<size_t>(views) * tokens * values);
  cuda::extract_patches(dimg.get(), patches.get(), views, size, patch, ch, nullptr);
  const auto table = to_bf16(random_floats(static_cast<size_t>(tokens) * width, 61));
  const auto bias = to_bf16(random_floats(width, 62));
  auto dt = up(table);
  auto db = up(bias);
  auto rowsout = poisoned<float>(static_cast<size_t>(views) * tokens * width);
  cuda::broadcast_rows(dt.get(), tokens, db.get(), rowsout.get(), views * tokens, width, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = cuda::download(patches.get(), patches.size());
  size_t mismatches = 0;
  for (int v = 0; v < views; ++v)
    for (int pr = 0; pr < side; ++pr)
      for (int pc = 0; pc < side; ++pc)
        for (int r = 0; r < patch; ++r)
          for (int c = 0; c < patch; ++c)
            for (int k = 0; k < ch; ++k) {
              const size_t token = static_cast<size_t>(v) * tokens + pr * side + pc;
              const size_t dst = token * values + (r * patch + c) * ch + k;
              const size_t src =
                  ((static_cast<size_t>(v) * size + pr * patch + r) * size + pc * patch + c) * ch +
                  k;
              mismatches += got[dst].bits != img[src].bits;
            }
  REQUIRE(mismatches == 0);
  const auto rows_got = down_f32(rowsout);
  std::vector<float> rows_ref(rows_got.size());
  for (int r = 0; r < views * tokens; ++r)
    for (int j = 0; j < width; ++j)
      rows_ref[static_cast<size_t>(r) * width + j] =
          bf16_to_float(table[static_cast<size_t>(r % tokens) * width + j]) +
          bf16_to_float(bias[j]);
  REQUIRE(rel_error(rows_got, rows_ref) < 1e-6);
}

// The encoder's own GEMM shapes at full pi0 widths (V=2: 512 rows). cuBLASLt picks algorithms by
// the SM count it sees, which under MPS is the worker's share, so gpu_check.sh also runs this at
// a reduced share.
namespace {

struct GemmCase {
  const char* name;
  int m, n, k;
  cuda::DType y;
  cuda::Epilogue epi;
  bool acc;
  bool transposed = false;
};

// bf16 output rounds each value (~2e-3); fp32 output differs only in summation order.
double gemm_bound(cuda::DType y) {
  return y == cuda::DType::kF32 ? 1e-4 : 5e-3;
}

// Runs `cases` (seeds first_seed, first_seed + 1, ...) with the Gemm tiers forced to start at
// `forced` (PI0_GEMM_PATH), and checks each lands on `expected_path` and matches the reference.
void check_gemm_tier(const char* forced, const char* expected_path, const char* label,
                     std::initializer_list<GemmCase> cases, uint64_t first_seed) {
  const ScopedEnv path_guard("PI0_GEMM_PATH", forced);
  uint64_t seed = first_seed;
  for (const GemmCase& c : cases) {
    std::string path;
    const double err =
        check_gemm(c.m, c.n, c.k, c.y, c.epi, c.acc, c.transposed, seed++, false, &path);
    INFO(c.name);
    CHECK(path == expected_path);
    report(std::string(label) + ": " + c.name, err);
    CHECK(err < gemm_bound(c.y));
  }
}

}  // namespace

TEST_CASE("encoder gemm shapes match the reference", "[gpu]") {
  using cuda::DType;
  using cuda::Epilogue;
  const GemmCase shapes[] = {
      {"patch embedding 512x1152x588 (+=)", 512, 1152, 588, DType::kF32, Epilogue::kNone, true},
      {"vision qkv 512x3456x1152 + bias", 512, 3456, 1152, DType::kBf16, Epilogue::kBias, false},
      {"vision o 512x1152x1152 + bias (+=)", 512, 1152, 1152, DType::kF32, Epilogue::kBias, true},
      {"vision up 512x4304x1152 + bias + gelu", 512, 4304, 1152, DType::kBf16, Epilogue::kGeluBias,
       false},
      {"vision down 512x1152x4304 + bias (+=)", 512, 1152, 4304, DType::kF32, Epilogue::kBias,
       true},
      {"projector 512x2048x1152 + bias", 512, 2048, 1152, DType::kF32, Epilogue::kBias, false},
      {"lm qkv 512x2560x2048", 512, 2560, 2048, DType::kBf16, Epilogue::kNone, false},
      {"lm o 512x2048x2048 (+=)", 512, 2048, 2048, DType::kF32, Epilogue::kNone, true},
      {"lm gate|up 512x32768x2048", 512, 32768, 2048, DType::kBf16, Epilogue::kNone, false},
      {"lm down 512x2048x16384 (+=)", 512, 2048, 16384, DType::kF32, Epilogue::kNone, true},
  };
  uint64_t seed = 300;
  for (const GemmCase& s : shapes) {
    const double err = check_gemm(s.m, s.n, s.k, s.y, s.epi, s.acc, false, seed++);
    report(s.name, err);
    CHECK(err < gemm_bound(s.y));
  }
}

// The fallback a Gemm takes when no fused bias / GELU epilogue of cuBLASLt checks out: the product
// alone, then the epilogue in its own kernel.
TEST_CASE("gemm with a separate epilogue kernel matches the reference", "[gpu]") {
  using cuda::DType;
  using cuda::Epilogue;
  check_gemm_tier(
      "separate", "cublaslt+epilogue", "separate epilogue",
      {{"bf16 out + bias", 512, 3456, 1152, DType::kBf16, Epilogue::kBias, false},
       {"fp32 accumulate + bias", 512, 1152, 4304, DType::kF32, Epilogue::kBias, true},
       {"bf16 out + bias + gelu", 256, 4304, 1152, DType::kBf16, Epilogue::kGeluBias, false}},
      400);
}

// The last resort of a Gemm no cuBLASLt algorithm computes correctly: the plain kernel in place.
TEST_CASE("gemm on the built-in kernel matches the reference", "[gpu]") {
  using cuda::DType;
  using cuda::Epilogue;
  check_gemm_tier(
      "builtin", "builtin", "built-in gemm",
      {{"bf16 out + bias", 512, 3456, 1152, DType::kBf16, Epilogue::kBias, false},
       {"fp32 accumulate", 64, 1024, 4096, DType::kF32, Epilogue::kNone, true},
       {"bf16 out + bias + gelu", 256, 4304, 1152, DType::kBf16, Epilogue::kGeluBias, false},
       {"fp32 out, W transposed", 512, 576, 256, DType::kF32, Epilogue::kNone, false, true}},
      410);
}

// The fallback before the plain kernel: our skinny tensor-core kernel, bias / GELU apart.
TEST_CASE("gemm on the skinny kernel fallback matches the reference", "[gpu]") {
  using cuda::DType;
  using cuda::Epilogue;
  check_gemm_tier(
      "skinny", "skinny", "skinny fallback",
      {{"bf16 out + bias", 512, 3456, 1152, DType::kBf16, Epilogue::kBias, false},
       {"fp32 accumulate", 560, 2048, 16384, DType::kF32, Epilogue::kNone, true},
       {"bf16 out + bias + gelu", 256, 4304, 1152, DType::kBf16, Epilogue::kGeluBias, false},
       {"fp32 out + bias", 63, 1024, 32, DType::kF32, Epilogue::kBias, false}},
      420);
}

// The L2 prefetch takes any ranges (unaligned ends shrink to 16 bytes, empty and null ones are
// skipped), more data than its CTAs cover in one pass, and leaves the data as it was.
TEST_CASE("l2 prefetch accepts any ranges and changes no data", "[gpu]") {
  const size_t n = (size_t{40} << 20) / sizeof(float);  // 40 MiB: several chunks per thread
  const auto host = random_floats(n, 31);
  auto data = up(host);
  const char* base = reinterpret_cast<const char*>(data.get());
  const cuda::L2Range ranges[] = {
      {base + 3, data.bytes() - 100}, {nullptr, 4096}, {base, 0}, {base + 1000, 7}};
  cuda::prefetch_l2(ranges, 4, nullptr);
  cuda::prefetch_l2(ranges, 0, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  REQUIRE(down_f32(data) == host);
  REQUIRE_THROWS_AS(cuda::prefetch_l2(ranges, cuda::kMaxL2Ranges + 1, nullptr), Error);
}

// The per-layer hand-off between the workers (pi0/cuda/layer_signal.hpp): a wait holds its stream
// until the counter reaches the generation it expects, which a signal from another stream (in
// the pipeline, another process) provides; an older generation does not pass; without a signal
// the wait gives up at its deadline, names the layer, and lets the stream go on.
TEST_CASE("layer waits follow the encoder's signals and give up at their deadline", "[gpu]") {
  cuda::DeviceBuffer<uint64_t> words(6, "layer signal words");  // counter, 2 generations, 3 stamps
  cuda::DeviceBuffer<uint32_t> error(1, "layer wait error");
  CUDA_CHECK(cudaMemset(words.get(), 0, words.bytes()));
  CUDA_CHECK(cudaMemset(error.get(), 0, error.bytes()));
  uint64_t* counter = words.get();
  uint64_t* generation = words.get() + 1;  // the encoder's: 7
  uint64_t* expected = words.get() + 2;    // the decoder's: 7
  uint64_t* signal_stamp = words.get() + 3;
  uint64_t* done_at = words.get() + 4;
  const uint64_t seven = 7, six = 6;
  CUDA_CHECK(cudaMemcpy(generation, &seven, sizeof seven, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(expected, &seven, sizeof seven, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(counter, &six, sizeof six, cudaMemcpyHostToDevice));  // last frame's
  cuda::LayerWaitLimits limits;
  limits.error = error.get();
  limits.timeout_ns = 5'000'000'000ull;

  SECTION("a signal from another stream releases the wait") {
    cuda::Stream decoder, encoder;
    cuda::wait_layer(counter, expected, 3, limits, done_at, decoder.get());
    // The decoder's stream is held: its event stays pending while nothing has signalled.
    cuda::Event after_wait(cudaEventDisableTiming);
    after_wait.record(decoder.get());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE_FALSE(after_wait.done());
    cuda::signal_layer(counter, generation, signal_stamp, encoder.get());
    after_wait.synchronize();
    // The signal released the wait, not its deadline (in one process this needs both kernels
    // loaded before the wait spins: see layer_signal.cu).
    REQUIRE(cuda::download(error.get(), 1)[0] == 0);
    const auto w = cuda::download(words.get(), words.size());
    REQUIRE(w[0] == 7);
    REQUIRE(w[3] != 0);
    // Let go after the signal (that it was held until then, the pending event above shows), and
    // soon after. %globaltimer ticks about once a microsecond and SMs see a tick at slightly
    // different moments: the stamps are compared with room for that.
    REQUIRE(w[4] + 50'000 >= w[3]);
    REQUIRE(w[4] < w[3] + 100'000'000);
  }
  SECTION("without a signal the wait times out, names the layer and lets the stream go") {
    limits.timeout_ns = 20'000'000ull;  // 20 ms
    cuda::Stream decoder;
    const auto t0 = std::chrono::steady_clock::now();
    cuda::wait_layer(counter, expected, 11, limits, done_at, decoder.get());
    decoder.synchronize();
    const double waited_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    REQUIRE(waited_ms >= 15.0);
    REQUIRE(waited_ms < 2000.0);
    REQUIRE(cuda::download(error.get(), 1)[0] == 12);  // layer 11, counted from 1
    REQUIRE(cuda::download(words.get(), words.size())[4] != 0);
  }
  SECTION("a wait on a counter that is there already passes") {
    CUDA_CHECK(cudaMemcpy(counter, &seven, sizeof seven, cudaMemcpyHostToDevice));
    cuda::wait_layer(counter, expected, 0, limits, nullptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    REQUIRE(cuda::download(error.get(), 1)[0] == 0);
  }
}

namespace {

// Polls instead of synchronizing, so that a wait that is never let go fails the test instead of
// hanging it. Returns the milliseconds it took, or a negative number past the deadline.
double wait_for(const cuda::Event& event, double deadline_ms) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (event.done()) return ms;
    if (ms > deadline_ms) return -1.0;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace

// The host's side of the front-end waits' deadline (FrontendWaitRelease), which the decoder worker
// and the single process share: it names the first layer not signalled and lets the frame's
// later waits go; it leaves alone a frame held only at its last layer (whose wait kernel has its
// own deadline, and would pass a counter set now as if signalled) and a frame that went on by
// itself while the counters were read (they may be the next frame's by then).
TEST_CASE("front-end waits are let go only where a frame is held in them", "[gpu]") {
  REQUIRE(cuda::frontend_waits_supported());
  constexpr int kLayers = 4;
  constexpr uint64_t kLetGo = uint64_t{1} << 62;
  DeviceBuffer<uint64_t> words(kLayers + 1, "counters and a gate");
  DeviceBuffer<uint32_t> error(1, "layer wait error");
  uint64_t* const counters = words.get();
  uint64_t* const gate = words.get() + kLayers;  // holds the frame's stream until opened
  cuda::FrontendWaitRelease release(kLayers), opener(1);
  cuda::Stream frame;
  cuda::Event past(cudaEventDisableTiming);  // after the frame's waits
  const auto start = [&](std::vector<uint64_t> values, uint32_t error_value, bool held) {
    values.push_back(0);  // the gate, closed
    cuda::copy_to_device(words.get(), values.data(), words.bytes());
    cuda::copy_to_device(error.get(), &error_value, sizeof error_value);
    if (held) {
      cuda::LayerWaitLimits gate_limits;
      gate_limits.error = error.get();
      gate_limits.timeout_ns = 1'000'000'000ull;
      gate_limits.frontend_layers = 1;
      cuda::wait_layer(gate, words.get(), 0, gate_limits, nullptr, frame.get());
    }
    past.record(frame.get());
    if (!held) past.synchronize();
  };
  const auto finish = [&] {
    opener.release_all(gate, 1);
    REQUIRE(wait_for(past, 5000.0) >= 0.0);
    auto w = cuda::download(words.get(), kLayers);
    return std::make_pair(w, cuda::download(error.get(), 1)[0]);
  };

  SECTION("held in a front-end wait: the first layer not signalled is named, the rest let go") {
    start({5, 5, 0, 0}, 0, true);
    REQUIRE(release.release_unsignalled(counters, kLayers - 1, error.get(), past.get()) == 3);
    const auto [w, e] = finish();
    CHECK(w == std::vector<uint64_t>{5, 5, kLetGo, kLetGo});
    CHECK(e == 3);
  }
  SECTION("a layer a wait kernel named already keeps its name") {
    start({5, 0, 0, 0}, 7, true);
    REQUIRE(release.release_unsignalled(counters, kLayers - 1, error.get(), past.get()) == 2);
    const auto [w, e] = finish();
    CHECK(w == std::vector<uint64_t>{5, kLetGo, kLetGo, kLetGo});
    CHECK(e == 7);
  }
  SECTION("held only at the last layer: nothing is written") {
    start({5, 5, 5, 0}, 0, true);
    REQUIRE(release.release_unsignalled(counters, kLayers - 1, error.get(), past.get()) == 0);
    const auto [w, e] = finish();
    CHECK(w == std::vector<uint64_t>{5, 5, 5, 0});
    CHECK(e == 0);
  }
  SECTION("a frame that went on by itself: nothing is written") {
    start({5, 0, 0, 0}, 0, false);
    REQUIRE(release.release_unsignalled(counters, kLayers - 1, error.get(), past.get()) == 0);
    const auto [w, e] = finish();
    CHECK(w == std::vector<uint64_t>{5, 0, 0, 0});
    CHECK(e == 0);
  }
}

// The single process's hand-off (pi0_bench, the stages' bit test) holds the decoder's stream in
// its front end for every layer's wait but the last, so no SM spins while the encoder runs. What
// the user relies on: a frame's decoder goes past layer l only after that frame's signal of layer
// l (never on the previous frame's), and a frame whose encoder never signals a layer ends at the
// hand-off's deadline with that layer named, instead of hanging the process, and the frames
// queued behind it do not wait out a deadline each; a frame whose hand-off is destroyed while it
// is held (an exception unwinding) goes on too.
TEST_CASE("in-process front-end layer waits follow the signals, and a watchdog ends them",
          "[gpu]") {
  constexpr int kLayers = 4;
  cuda::Stream encoder, decoder;
  DeviceBuffer<uint64_t> stamps(2, "stamps");  // layer 1's signal, the decoder let go past it
  const auto enqueue_frame_waits = [&](cuda::InProcessHandoff& handoff, const cuda::Event& after) {
    const cuda::LayerWait wait = handoff.wait();
    handoff.begin_frame(encoder.get(), decoder.get());
    for (int l = 0; l < kLayers; ++l)
      cuda::wait_layer(wait.counters + l, wait.expected, l, handoff.limits(),
                       l == 1 ? stamps.get() + 1 : nullptr, decoder.get());
    after.record(decoder.get());
    handoff.end_frame(decoder.get());
  };
  const auto signal = [&](cuda::InProcessHandoff& handoff, int from, int to) {
    const cuda::LayerSignals signals = handoff.signals();
    for (int l = from; l < to; ++l)
      cuda::signal_layer(signals.counters + l, signals.generation, l == 1 ? stamps.get() : nullptr,
                         encoder.get());
  };
  cuda::Event after(cudaEventDisableTiming);

  SECTION("each frame's waits pass on that frame's signals") {
    cuda::InProcessHandoff handoff(kLayers, 5'000'000'000ull);
    INFO("PI0_FRONTEND_WAITS=0 in the environment turns front-end waits off");
    REQUIRE(cuda::frontend_waits_supported());
    REQUIRE(handoff.limits().frontend_layers == kLayers - 1);
    for (int frame = 0; frame < 3; ++frame) {
      INFO("frame " << frame);
      CUDA_CHECK(cudaMemsetAsync(stamps.get(), 0, stamps.bytes(), encoder.get()));
      enqueue_frame_waits(handoff, after);
      // Held: from frame 1 on, the counters still hold the previous frame's signals.
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      REQUIRE_FALSE(after.done());
      signal(handoff, 0, 2);
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      REQUIRE_FALSE(after.done());  // layer 2 has not been signalled
      signal(handoff, 2, kLayers);
      REQUIRE(wait_for(after, 5000.0) >= 0.0);
      REQUIRE(handoff.timed_out_layer() == 0);
      const auto w = cuda::download(stamps.get(), 2);
      // %globaltimer ticks about once a microsecond and differs slightly between SMs.
      REQUIRE(w[0] != 0);
      REQUIRE(w[1] + 50'000 >= w[0]);
    }
  }
  SECTION("a layer never signalled ends the frame at the deadline, named") {
    cuda::InProcessHandoff handoff(kLayers, 200'000'000ull);  // 200 ms
    enqueue_frame_waits(handoff, after);
    signal(handoff, 0, 2);
    const double ms = wait_for(after, 5000.0);
    INFO("the frame ended after " << ms << " ms");
    REQUIRE(ms >= 150.0);
    REQUIRE(ms < 3000.0);
    REQUIRE(handoff.timed_out_layer() == 3);  // layer 2, counted from 1
    // The hand-off is spent: a frame queued after it is not held for another deadline.
    cuda::Event next(cudaEventDisableTiming);
    enqueue_frame_waits(handoff, next);
    const double next_ms = wait_for(next, 5000.0);
    INFO("the next frame ended after " << next_ms << " ms");
    REQUIRE(next_ms >= 0.0);
    REQUIRE(next_ms < 100.0);
    REQUIRE(handoff.timed_out_layer() == 3);
  }
  SECTION("destroying the hand-off lets a held frame go") {
    {
      cuda::InProcessHandoff handoff(kLayers, 60'000'000'000ull);
      enqueue_frame_waits(handoff, after);
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      REQUIRE_FALSE(after.done());
    }
    REQUIRE(wait_for(after, 5000.0) >= 0.0);
  }
}

// The decoder's work between flow steps in one kernel, against the host formulas: before the
// first step (action input and state tokens only), between two steps (Euler update too) and after
// the last (Euler only); at pi0's widths with two frames, a narrower action dim with three, the
// tiny config's width, action dim 8 (a whole warp sums one output octet), and the widest width
// (more weights a thread than one batch of loads; one input range).
TEST_CASE("the flow step glue kernel matches the host formulas", "[gpu]") {
  struct Case {
    int width, action_dim, frames, chunk;
  };
  for (const Case& k : {Case{1024, 32, 2, 63}, Case{1024, 16, 3, 50}, Case{48, 32, 1, 5},
                        Case{1024, 8, 1, 7}, Case{2048, 32, 2, 9}}) {
    const int w = k.width, ad = k.action_dim, rpf = k.chunk + 1, total = k.frames * k.chunk;
    const float eps = 1e-6f;
    const auto x = rounded(random_floats(static_cast<size_t>(k.frames) * rpf * w, 90, 1.5f));
    const auto state = rounded(random_floats(static_cast<size_t>(k.frames) * w, 91, 1.0f));
    const auto actions = random_floats(static_cast<size_t>(total) * ad, 92, 1.0f);
    const auto w_out = rounded(random_floats(static_cast<size_t>(w) * ad, 93, 0.03f));
    const auto b_out = random_floats(ad, 94, 0.1f);
    const auto w_in = rounded(random_floats(static_cast<size_t>(ad) * w, 95, 0.2f));
    const auto time_bias = rounded(random_floats(w, 96, 0.1f));
    auto dstate = up(to_bf16(state));
    auto dw_out = up(to_bf16(w_out));
    auto db_out = up(b_out);
    auto dw_in = up(to_bf16(w_in));
    auto dtb = up(to_bf16(time_bias));

    // Host: the Euler update and the action input of every action row.
    std::vector<float> euler(actions.size()), t1_ref(static_cast<size_t>(total) * w);
    auto action_input = [&](const std::vector<float>& a) {
      for (int g = 0; g < total; ++g)
        for (int c = 0; c < w; ++c) {
          float s = 0.0f;
          for (int j = 0; j < ad; ++j)
            s += round_to_bf16(a[static_cast<size_t>(g) * ad + j]) *
                 w_in[static_cast<size_t>(j) * w + c];
          t1_ref[static_cast<size_t>(g) * w + c] = ref::silu(round_to_bf16(s + time_bias[c]));
        }
    };
    for (int g = 0; g < total; ++g) {
      const float* row = &x[(static_cast<size_t>(g / k.chunk) * rpf + 1 + g % k.chunk) * w];
      double ss = 0.0;
      for (int e = 0; e < w; ++e) ss += static_cast<double>(row[e]) * row[e];
      const float scale = static_cast<float>(1.0 / std::sqrt(ss / w + eps));
      for (int j = 0; j < ad; ++j) {
        double dot = 0.0;
        for (int e = 0; e < w; ++e)
          dot += static_cast<double>(round_to_bf16(row[e] * scale)) *
                 w_out[static_cast<size_t>(e) * ad + j];
        euler[static_cast<size_t>(g) * ad + j] = static_cast<float>(dot) + b_out[j];
      }
    }

    for (const int mode : {0, 1, 2}) {  // 0: before the first step, 1: between, 2: after the last
      const std::string name = std::to_string(w) + " x " + std::to_string(ad) + ", " +
                               std::to_string(k.frames) + " frames of " + std::to_string(k.chunk) +
                               (mode == 0   ? ", first"
                                : mode == 1 ? ", between"
                                            : ", last");
      auto dx_run = up(to_bf16(x));
      auto dact = up(actions);
      auto dt1 = poisoned<Bf16>(static_cast<size_t>(total) * w);
      cuda::FlowStepGlue gl;
      gl.x = dx_run.get();
      gl.rows_per_frame = rpf;
      gl.width = w;
      gl.eps = eps;
      gl.actions = dact.get();
      gl.frames = k.frames;
      gl.chunk = k.chunk;
      gl.action_dim = ad;
      if (mode > 0) {
        gl.w_out = dw_out.get();
        gl.b_out = db_out.get();
      }
      if (mode < 2) {
        gl.state = dstate.get();
        gl.w_in = dw_in.get();
        gl.time_bias = dtb.get();
        gl.t1 = dt1.get();
      }
      cuda::flow_step_glue(gl, nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());

      const auto got_actions = down_f32(dact);
      std::vector<float> new_actions = actions;
      if (mode > 0) {
        std::vector<float> delta(actions.size()), ref_delta(actions.size());
        for (size_t i = 0; i < actions.size(); ++i) {
          delta[i] = got_actions[i] - actions[i];
          ref_delta[i] = euler[i];
          new_actions[i] = actions[i] + euler[i];
        }
        const double ee = rel_error(delta, ref_delta);
        report("flow step glue: euler update " + name, ee);
        REQUIRE(ee < 5e-3);
        REQUIRE(max_abs_diff(delta, ref_delta) <= 1e-3 * max_abs(ref_delta));  // no single outlier
      } else {
        REQUIRE(got_actions == actions);  // no Euler update before the first step
      }

      const auto got_t1 = cuda::download(dt1.get(), dt1.size());
      if (mode < 2) {
        action_input(new_actions);
        const double et = rel_error(to_float(got_t1), t1_ref);
        report("flow step glue: action input " + name, et);
        REQUIRE(et < 1e-2);
        // bf16 outputs: a few ulps an element at most, far below one element of another row.
        REQUIRE(max_abs_diff(to_float(got_t1), t1_ref) <= 0.05 * max_abs(t1_ref));
      } else {
        size_t written = 0;  // t1 keeps its poison after the last step
        for (const Bf16 v : got_t1) written += v.bits != 0xFFFF;
        REQUIRE(written == 0);
      }

      // Each frame's row 0 holds its state token (none copied after the last step); the action
      // rows are read, never written.
      const auto got_x = to_float(cuda::download(dx_run.get(), dx_run.size()));
      size_t wrong = 0;
      for (int f = 0; f < k.frames; ++f)
        for (int r = 0; r < rpf; ++r)
          for (int e = 0; e < w; ++e) {
            const size_t at = (static_cast<size_t>(f) * rpf + r) * w + e;
            const float want = r == 0 && mode < 2 ? state[static_cast<size_t>(f) * w + e] : x[at];
            wrong += got_x[at] != want;
          }
      REQUIRE(wrong == 0);
    }
  }
}

// Probe (not part of the suite; run with the tag "[.probe]"): how well cuBLASLt's best listed
// configuration fills the GPU with the encoder's products as the row count grows. Where the rows
// of one frame (V=2: 512) leave SMs idle (a wave of few tiles, or a last wave half empty), the
// time a row falls with more rows; a GEMM that spread V=2's work evenly over every SM would come
// near the larger counts' time a row. Each product is timed as autotune() times it, over enough
// layers' weight copies to stream them from DRAM.
TEST_CASE("probe: the encoder's products at several row counts", "[.probe]") {
  using cuda::DType;
  using cuda::Epilogue;
  struct Product {
    const char* label;
    int n, k;
    DType y;
    Epilogue epi;
    bool acc;
  };
  const Product products[] = {
      {"vision qkv", 3456, 1152, DType::kBf16, Epilogue::kBias, false},
      {"vision o", 1152, 1152, DType::kF32, Epilogue::kBias, true},
      {"vision up", 4304, 1152, DType::kBf16, Epilogue::kGeluBias, false},
      {"vision down", 1152, 4304, DType::kF32, Epilogue::kBias, true},
      {"lm qkv", 2560, 2048, DType::kBf16, Epilogue::kNone, false},
      {"lm o", 2048, 2048, DType::kBf16, Epilogue::kNone, true},
      {"lm gate|up", 32768, 2048, DType::kBf16, Epilogue::kNone, false},
      {"lm down", 2048, 16384, DType::kBf16, Epilogue::kNone, true},
  };
  cuda::Stream stream;
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  for (const Product& p : products) {
    const size_t w_elems = static_cast<size_t>(p.k) * p.n;
    // At least ~200 MB of weights (four times the L2), at most 27 copies (SigLIP's layers).
    const int copies = static_cast<int>(
        std::clamp<size_t>((size_t{200} << 20) / (w_elems * sizeof(Bf16)) + 1, 2, 27));
    const auto w = up(to_bf16(random_floats(w_elems * copies, 5, 0.05f)));
    const auto bias_f = random_floats(static_cast<size_t>(p.n), 6, 0.1f);
    const auto bias_bf = up(to_bf16(bias_f));
    const auto bias_f32 = up(bias_f);
    const void* bias = p.epi == Epilogue::kNone ? nullptr
                       : p.y == DType::kF32     ? static_cast<const void*>(bias_f32.get())
                                                : static_cast<const void*>(bias_bf.get());
    std::vector<std::pair<int, double>> times;
    for (const int m : {256, 512, 768, 1024, 2048}) {
      const auto shape = cuda::linear_shape(m, p.n, p.k, p.y, p.epi, p.acc);
      cuda::Gemm gemm(lt.get(), shape, ws.get(), ws.bytes());
      if (gemm.chosen_candidate() < 0) continue;
      const auto x = up(to_bf16(random_floats(static_cast<size_t>(m) * p.k, 3)));
      DeviceBuffer<std::byte> y(static_cast<size_t>(m) * p.n * (p.y == DType::kF32 ? 4 : 2),
                                "probe output");
      CUDA_CHECK(cudaMemset(y.get(), 0, y.bytes()));
      cuda::Gemm::AutotuneOptions tune;
      const auto ranked = gemm.rank_candidates(x.get(), w.get(), y.get(), bias, stream.get(),
                                               tune.over_layers(copies, w_elems), 1);
      if (ranked.empty()) continue;
      const double us = ranked.front().first * 1e3;
      times.emplace_back(m, us);
    }
    if (times.empty()) continue;
    const auto [max_rows, us_at_max] = times.back();
    for (const auto& [m, us] : times) {
      const double tflops = 2.0 * m * p.n * p.k / (us * 1e-6) / 1e12;
      std::printf(
          "probe %-11s m=%4d n=%5d k=%5d: %8.2f us %6.0f TFLOP/s, a row %.3f us, "
          "%.2fx the time a row at m=%d (%d weight copies)\n",
          p.label, m, p.n, p.k, us, tflops, us / m, us / m / (us_at_max / max_rows), max_rows,
          copies);
    }
  }
}
