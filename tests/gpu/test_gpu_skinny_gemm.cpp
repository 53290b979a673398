// The skinny GEMM (M <= 64 rows) against pi0::ref::matmul on fresh random data, for every decoder
// shape and M in {1, 17, 51, 64}, with poisoned outputs; and bitwise determinism across runs. Both
// mainloops: mma.sync everywhere, wgmma where the build carries sm_90a code (gpu_check's does).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "pi0/reference_ops.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;
using cuda::SkinnyKernel;
using cuda::SkinnyOut;
using cuda::SkinnyShape;

namespace {

int sm_count() {
  int dev = 0, n = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// A mainloop and how it is given W: [k, n], or transposed [n, k] (wgmma only).
struct Variant {
  SkinnyKernel kernel;
  bool w_transposed;
  const char* name;
};

// The variants this build can run here; says so when the wgmma ones cannot run.
std::vector<Variant> variants() {
  std::vector<Variant> v = {{SkinnyKernel::kMmaSync, false, "mma.sync"}};
  if (cuda::skinny_wgmma_available()) {
    v.push_back({SkinnyKernel::kWgmma, false, "wgmma"});
    v.push_back({SkinnyKernel::kWgmma, true, "wgmma-wt"});
  } else {
    WARN(
        "skinny gemm: no sm_90a code for this GPU, the wgmma mainloop is not tested "
        "(build with -DCMAKE_CUDA_ARCHITECTURES=90a on an H100)");
  }
  return v;
}

struct Case {
  const char* name;
  int k, n;
  SkinnyOut out;
  bool bias;
};

// The decoder's products (K x N); for GeGLU N counts gate and up together.
const Case kCases[] = {
    {"qkv", 1024, 2560, SkinnyOut::kBf16, false},
    {"o", 2048, 1024, SkinnyOut::kF32Accumulate, false},
    {"gate up geglu", 1024, 8192, SkinnyOut::kGeglu, false},
    {"down", 4096, 1024, SkinnyOut::kF32Accumulate, false},
    {"action in", 32, 1024, SkinnyOut::kBf16, true},
    {"action mlp", 1024, 1024, SkinnyOut::kF32, true},
    {"action out", 1024, 32, SkinnyOut::kF32Accumulate, true},
};

// Product c at m rows, unplanned, with W as the mainloop is given it ([k, n], or [n, k]).
SkinnyShape case_shape(const Case& c, int m, SkinnyKernel kernel = SkinnyKernel::kAuto,
                       bool w_transposed = false) {
  SkinnyShape s;
  s.m = m;
  s.n = c.n;
  s.k = c.k;
  s.ld_x = c.k;
  s.ld_w = w_transposed ? c.k : c.n;
  s.w_transposed = w_transposed;
  s.ld_y = c.out == SkinnyOut::kGeglu ? c.n / 2 : c.n;
  s.out = c.out;
  s.bias = c.bias;
  s.kernel = kernel;
  return s;
}

struct Result {
  double err = 0.0;
  bool deterministic = false;
};

Result run_case(const Case& c, int m, uint64_t seed, const Variant& variant, int bn = 0,
                int splits = 0, int stages = 0) {
  const bool geglu = c.out == SkinnyOut::kGeglu;
  const int out_n = geglu ? c.n / 2 : c.n;
  const bool f32 = c.out == SkinnyOut::kF32 || c.out == SkinnyOut::kF32Accumulate;
  const auto x = rounded(random_floats(static_cast<size_t>(m) * c.k, seed, 1.0f));
  const auto w = rounded(random_floats(static_cast<size_t>(c.k) * c.n, seed + 1,
                                       1.0f / std::sqrt(static_cast<float>(c.k))));
  const auto bias = random_floats(c.n, seed + 2, 0.5f);
  const auto y0 = random_floats(static_cast<size_t>(m) * out_n, seed + 3, 1.0f);

  // Reference in fp32 on exactly the bf16 inputs.
  std::vector<float> ref(static_cast<size_t>(m) * out_n);
  std::vector<Bf16> w_dev_host = to_bf16(w);
  if (geglu) {
    const int h = c.n / 2;
    std::vector<float> wg(static_cast<size_t>(c.k) * h), wu(wg.size());
    for (int r = 0; r < c.k; ++r)
      for (int j = 0; j < h; ++j) {
        wg[static_cast<size_t>(r) * h + j] = w[static_cast<size_t>(r) * c.n + j];
        wu[static_cast<size_t>(r) * h + j] = w[static_cast<size_t>(r) * c.n + h + j];
      }
    std::vector<float> g(ref.size()), u(ref.size());
    ref::matmul(x.data(), wg.data(), nullptr, g.data(), m, c.k, h, false);
    ref::matmul(x.data(), wu.data(), nullptr, u.data(), m, c.k, h, false);
    for (size_t i = 0; i < ref.size(); ++i) ref[i] = ref::gelu_tanh(g[i]) * u[i];
    const auto gb = to_bf16(wg), ub = to_bf16(wu);
    cuda::interleave_gate_up(gb.data(), ub.data(), w_dev_host.data(), c.k, h);
  } else {
    if (c.out == SkinnyOut::kF32Accumulate) ref = y0;
    ref::matmul(x.data(), w.data(), c.bias ? bias.data() : nullptr, ref.data(), m, c.k, c.n,
                c.out == SkinnyOut::kF32Accumulate);
  }

  SkinnyShape s = case_shape(c, m, variant.kernel, variant.w_transposed);
  s.bn = bn;
  s.splits = splits;
  s.stages = stages;
  s = cuda::plan_skinny(s, sm_count());
  if (variant.w_transposed) w_dev_host = cuda::transpose_layers(w_dev_host.data(), 1, c.k, c.n);

  auto dx = cuda::upload(to_bf16(x), "x");
  auto dw = cuda::upload(w_dev_host, "w");
  auto db = cuda::upload(bias, "bias");
  const size_t bytes = ref.size() * (f32 ? 4 : 2);
  DeviceBuffer<std::byte> y(bytes, "y");
  std::vector<std::vector<std::byte>> runs;
  for (int rep = 0; rep < 2; ++rep) {
    if (c.out == SkinnyOut::kF32Accumulate) {
      cuda::copy_to_device(y.get(), y0.data(), bytes);
    } else {
      CUDA_CHECK(cudaMemset(y.get(), 0xFF, bytes));  // NaN poison
    }
    cuda::skinny_gemm(s, dx.get(), dw.get(), y.get(), c.bias ? db.get() : nullptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    runs.push_back(cuda::download(y.get(), bytes));
  }
  std::vector<float> out(ref.size());
  if (f32) {
    std::memcpy(out.data(), runs[0].data(), bytes);
  } else {
    std::vector<Bf16> ob(ref.size());
    std::memcpy(ob.data(), runs[0].data(), bytes);
    out = to_float(ob);
  }
  Result r;
  r.err = rel_error(out, ref);
  r.deterministic = runs[0] == runs[1];
  return r;
}

}  // namespace

TEST_CASE("skinny gemm matches the reference on every decoder shape", "[gpu][skinny]") {
  for (const Variant& variant : variants()) {
    uint64_t seed = 500;
    for (const Case& c : kCases) {
      for (int m : {1, 17, 51, 64}) {
        const Result r = run_case(c, m, seed += 10, variant);
        const bool f32 = c.out == SkinnyOut::kF32 || c.out == SkinnyOut::kF32Accumulate;
        report(std::string("skinny ") + variant.name + " " + c.name + " m=" + std::to_string(m),
               r.err);
        INFO(variant.name << " " << c.name << " m=" << m << " err=" << r.err);
        REQUIRE(r.deterministic);
        REQUIRE(r.err < (f32 ? 1e-5 : 1e-2));
      }
    }
  }
}

TEST_CASE("skinny gemm is correct for every tile and split choice", "[gpu][skinny]") {
  const int configs[][3] = {{64, 1, 4},  {64, 2, 8},  {64, 4, 4},  {64, 8, 8},
                            {64, 16, 4}, {128, 1, 4}, {128, 4, 4}, {128, 8, 4}};
  for (const Variant& variant : variants()) {
    uint64_t seed = 900;
    for (const auto& cfg : configs) {
      for (const Case& c : {kCases[0], kCases[1], kCases[2], kCases[4], kCases[6]}) {
        for (int m : {17, 64, 100}) {
          const Result r = run_case(c, m, seed += 10, variant, cfg[0], cfg[1], cfg[2]);
          const bool f32 = c.out == SkinnyOut::kF32 || c.out == SkinnyOut::kF32Accumulate;
          INFO(variant.name << " " << c.name << " m=" << m << " bn=" << cfg[0]
                            << " splits=" << cfg[1] << " stages=" << cfg[2] << " err=" << r.err);
          REQUIRE(r.deterministic);
          REQUIRE(r.err < (f32 ? 1e-5 : 1e-2));
        }
      }
    }
  }
}

// Timing sweep (hidden; run with the tag "[.sweep]"): weight bandwidth of each configuration.
TEST_CASE("skinny gemm sweep", "[.sweep]") {
  const int sms = sm_count();
  const int configs[][3] = {{64, 1, 4},  {64, 2, 4},  {64, 4, 4},  {64, 8, 4},  {64, 16, 4},
                            {64, 1, 8},  {64, 2, 8},  {64, 4, 8},  {64, 8, 8},  {64, 16, 8},
                            {128, 1, 4}, {128, 2, 4}, {128, 4, 4}, {128, 8, 4}, {128, 16, 4}};
  for (const Case& c : kCases) {
    const int m = 64;
    const int out_n = c.out == SkinnyOut::kGeglu ? c.n / 2 : c.n;
    // 8 copies of the weights so that consecutive launches do not hit L2.
    const int copies = 8;
    DeviceBuffer<Bf16> x(static_cast<size_t>(m) * c.k, "x");
    DeviceBuffer<Bf16> w(static_cast<size_t>(c.k) * c.n * copies, "w");
    DeviceBuffer<float> y(static_cast<size_t>(m) * out_n, "y");
    DeviceBuffer<float> b(c.n, "b");
    CUDA_CHECK(cudaMemset(x.get(), 0, x.bytes()));
    CUDA_CHECK(cudaMemset(w.get(), 0, w.bytes()));
    CUDA_CHECK(cudaMemset(y.get(), 0, y.bytes()));
    CUDA_CHECK(cudaMemset(b.get(), 0, b.bytes()));
    const SkinnyShape chosen = cuda::plan_skinny(case_shape(c, m), sms);
    for (const Variant& variant : variants())
      for (const auto& cfg : configs) {
        SkinnyShape s = case_shape(c, m, variant.kernel, variant.w_transposed);
        s.bn = cfg[0];
        s.splits = cfg[1];
        s.stages = cfg[2];
        s = cuda::plan_skinny(s, sms);
        cudaEvent_t e0, e1;
        CUDA_CHECK(cudaEventCreate(&e0));
        CUDA_CHECK(cudaEventCreate(&e1));
        const int iters = 400;
        try {
          for (int i = 0; i < 16; ++i)
            cuda::skinny_gemm(s, x.get(), w.get() + (i % copies) * static_cast<size_t>(c.k) * c.n,
                              y.get(), c.bias ? b.get() : nullptr, nullptr);
          CUDA_CHECK(cudaEventRecord(e0));
          for (int i = 0; i < iters; ++i)
            cuda::skinny_gemm(s, x.get(), w.get() + (i % copies) * static_cast<size_t>(c.k) * c.n,
                              y.get(), c.bias ? b.get() : nullptr, nullptr);
          CUDA_CHECK(cudaEventRecord(e1));
          CUDA_CHECK(cudaEventSynchronize(e1));
          float ms = 0.0f;
          CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
          const double us = 1e3 * ms / iters;
          const double gbs = 2.0 * c.k * c.n / (us * 1e3);
          std::printf(
              "sweep %-14s %-8s K=%5d N=%5d bn=%3d splits=%2d stages=%d: %7.2f us %7.0f GB/s%s\n",
              c.name, variant.name, c.k, c.n, s.bn, s.splits, s.stages, us, gbs,
              (!s.w_transposed && s.kernel == chosen.kernel && s.bn == chosen.bn &&
               s.splits == chosen.splits && s.stages == chosen.stages)
                  ? "  <- plan"
                  : "");
        } catch (const Error& e) {
          std::printf("sweep %-14s bn=%d splits=%d stages=%d: failed: %s\n", c.name, s.bn, s.splits,
                      s.stages, e.what());
          (void)cudaGetLastError();
        }
        CUDA_CHECK(cudaEventDestroy(e0));
        CUDA_CHECK(cudaEventDestroy(e1));
      }
  }
}
