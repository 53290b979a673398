// The wgmma GEMM prototype (pi0/cuda/wgmma_gemm.hpp) against pi0::ref::matmul on fresh random
// data, for the decoder's weight products, M in {64, 51, 17}, every tile width and a K split;
// poisoned partials. Needs a build for sm_90a (-DCMAKE_CUDA_ARCHITECTURES=90a). The hidden
// "[.wgmma-sweep]" times it the way the skinny sweep does, for comparison.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/wgmma_gemm.hpp"
#include "pi0/reference_ops.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;
using cuda::WgmmaShape;

namespace {

struct Product {
  const char* name;
  int k, n;
};
const Product kProducts[] = {
    {"qkv", 1024, 2560}, {"o", 2048, 1024}, {"gate|up", 1024, 8192}, {"down", 4096, 1024}};

double run_product(const Product& p, int m, int bn, int splits, uint64_t seed) {
  const auto x = rounded(random_floats(static_cast<size_t>(m) * p.k, seed, 1.0f));
  const auto w = rounded(random_floats(static_cast<size_t>(p.k) * p.n, seed + 1,
                                       1.0f / std::sqrt(static_cast<float>(p.k))));
  std::vector<float> ref(static_cast<size_t>(m) * p.n);
  ref::matmul(x.data(), w.data(), nullptr, ref.data(), m, p.k, p.n, false);
  std::vector<float> wt(w.size());
  for (int r = 0; r < p.k; ++r)
    for (int c = 0; c < p.n; ++c)
      wt[static_cast<size_t>(c) * p.k + r] = w[static_cast<size_t>(r) * p.n + c];

  WgmmaShape s;
  s.m = m;
  s.n = p.n;
  s.k = p.k;
  s.ld_x = p.k;
  s.ld_wt = p.k;
  s.bn = bn;
  s.splits = splits;
  REQUIRE(cuda::wgmma_supported(s));
  auto dx = cuda::upload(to_bf16(x), "x");
  auto dwt = cuda::upload(to_bf16(wt), "wt");
  auto part = poisoned<float>(static_cast<size_t>(splits) * 64 * p.n, "partials");
  cuda::wgmma_gemm(s, dx.get(), dwt.get(), part.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto parts = cuda::download(part.get(), part.size());
  std::vector<float> out(ref.size(), 0.0f);
  for (int sp = 0; sp < splits; ++sp)
    for (size_t i = 0; i < out.size(); ++i) out[i] += parts[static_cast<size_t>(sp) * 64 * p.n + i];
  return rel_error(out, ref);
}

}  // namespace

TEST_CASE("wgmma gemm matches the reference on the decoder's products", "[gpu][wgmma]") {
  // Not a silent pass: a build without sm_90a code cannot run the prototype at all.
  if (!cuda::wgmma_available())
    FAIL("wgmma: this build has no sm_90a code (build with -DCMAKE_CUDA_ARCHITECTURES=90a)");
  uint64_t seed = 900;
  for (const Product& p : kProducts)
    for (int m : {64, 51, 17})
      for (int bn : {64, 128})
        for (int splits : {1, 4}) {
          const double err = run_product(p, m, bn, splits, seed += 10);
          report(std::string("wgmma ") + p.name + " m=" + std::to_string(m) +
                     " bn=" + std::to_string(bn) + " splits=" + std::to_string(splits),
                 err);
          CHECK(err < 1e-3);  // fp32 accumulation of exactly representable bf16 products
        }
}

TEST_CASE("wgmma gemm sweep", "[.wgmma-sweep]") {
  // Not a silent pass: a build without sm_90a code cannot run the prototype at all.
  if (!cuda::wgmma_available())
    FAIL("wgmma: this build has no sm_90a code (build with -DCMAKE_CUDA_ARCHITECTURES=90a)");
  for (const Product& p : kProducts) {
    const int m = 64, copies = 8;
    DeviceBuffer<Bf16> x(static_cast<size_t>(m) * p.k, "x");
    DeviceBuffer<Bf16> wt(static_cast<size_t>(p.k) * p.n * copies, "wt");
    CUDA_CHECK(cudaMemset(x.get(), 0, x.bytes()));
    CUDA_CHECK(cudaMemset(wt.get(), 0, wt.bytes()));
    for (int bn : {64, 128})
      for (int splits : {1, 2, 4, 8, 16}) {
        WgmmaShape s;
        s.m = m;
        s.n = p.n;
        s.k = p.k;
        s.ld_x = p.k;
        s.ld_wt = p.k;
        s.bn = bn;
        s.splits = splits;
        if (!cuda::wgmma_supported(s)) continue;
        DeviceBuffer<float> part(static_cast<size_t>(splits) * 64 * p.n, "partials");
        cudaEvent_t e0, e1;
        CUDA_CHECK(cudaEventCreate(&e0));
        CUDA_CHECK(cudaEventCreate(&e1));
        const int iters = 400;
        auto launch = [&](int i) {
          cuda::wgmma_gemm(s, x.get(), wt.get() + (i % copies) * static_cast<size_t>(p.k) * p.n,
                           part.get(), nullptr);
        };
        for (int i = 0; i < 16; ++i) launch(i);
        CUDA_CHECK(cudaEventRecord(e0));
        for (int i = 0; i < iters; ++i) launch(i);
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = 1e3 * ms / iters;
        std::printf(
            "wgmma sweep %-8s K=%5d N=%5d bn=%3d splits=%2d (%4d CTAs): %7.2f us %7.0f GB/s\n",
            p.name, p.k, p.n, bn, splits, p.n / bn * splits, us, 2.0 * p.k * p.n / (us * 1e3));
        CUDA_CHECK(cudaEventDestroy(e0));
        CUDA_CHECK(cudaEventDestroy(e1));
      }
  }
}
