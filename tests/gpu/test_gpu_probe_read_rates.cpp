// Probe (not part of the suite; run with the tag "[.probe]"): the rates at which SMs can read
// bytes from DRAM and from L2, by load instructions and by bulk copies (also multicast into the
// CTAs of a cluster), against the rate the decoder's cuBLASLt products read their weights at.
// bench/NOTES.md v34 found the decoder no faster with every layer's weights in L2 than streamed
// from DRAM behind its prefetch, and its products' time following their bytes even from L2: what a
// product of our own could reach is the L2 read rate, which this measures (v35 has its figures).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/l2_prefetch.hpp"
#include "read_rate.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;

namespace {

constexpr size_t kMiB = size_t{1} << 20;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Mean time of one launch (us) over `reps` launches after one unmeasured launch, all queued
// behind a GPU-side wait; the median of three such rounds.
template <typename Launch>
double launch_us(cudaStream_t stream, int reps, Launch&& launch) {
  cuda::Event start, stop;
  std::vector<double> rounds;
  for (int round = 0; round < 3; ++round) {
    launch();
    // The host's launches must not pace the timed ones: they queue behind a GPU-side wait.
    launch_spin(static_cast<uint64_t>(reps) * 20'000, stream);
    start.record(stream);
    for (int i = 0; i < reps; ++i) launch();
    stop.record(stream);
    stop.synchronize();
    rounds.push_back(stop.elapsed_since(start) * 1e3 / reps);
  }
  return median(rounds);
}

double tb_per_s(size_t bytes, double us) {
  return static_cast<double>(bytes) / (us * 1e-6) / 1e12;
}

}  // namespace

TEST_CASE("probe: read rates from DRAM and L2", "[.probe]") {
  const int sms = cuda::current_device_attribute(cudaDevAttrMultiProcessorCount, 0);
  REQUIRE(sms > 0);
  cuda::Stream stream;
  cudaStream_t s = stream.get();
  const size_t big_bytes = 1024 * kMiB;
  DeviceBuffer<float> big(big_bytes / sizeof(float), "probe buffer");
  cuda::fill_random(big.get(), big.size(), 7, 1.0f, s);
  DeviceBuffer<uint32_t> sink(4096, "probe sink");
  const bool bulk = read_bulk_available();
  CUDA_CHECK(cudaStreamSynchronize(s));

  // DRAM: 1 GiB, twenty times the L2, read whole each launch.
  size_t read = 0;
  double us = launch_us(s, 5, [&] {
    read = launch_read_vectors(big.get(), big_bytes, 1, 4 * sms, 512, false, sink.get(), s);
  });
  std::printf("probe read DRAM   loads, %4d blocks x 512: %7.1f us for %zu MiB, %.2f TB/s\n",
              4 * sms, us, read / kMiB, tb_per_s(read, us));
  if (bulk) {
    for (const auto& [stages, chunk] :
         {std::pair{4, 16384}, std::pair{4, 32768}, std::pair{8, 16384}, std::pair{6, 32768}}) {
      us = launch_us(s, 5, [&] {
        read = launch_read_bulk(big.get(), big_bytes, 1, sms, stages, chunk, sink.get(), s);
      });
      std::printf(
          "probe read DRAM   bulk,  %4d blocks, %d x %2d KB in flight: %7.1f us, %.2f TB/s\n", sms,
          stages, chunk / 1024, us, tb_per_s(read, us));
    }
  }

  // L2: a buffer read again and again within each launch (~1 GiB a launch), by size: where the
  // rate falls, the L2 no longer holds it.
  for (const size_t mib : {8, 16, 24, 32, 40, 48}) {
    const size_t bytes = mib * kMiB;
    const int passes = static_cast<int>(big_bytes / bytes);
    us = launch_us(s, 5, [&] {
      read = launch_read_vectors(big.get(), bytes, passes, 4 * sms, 512, false, sink.get(), s);
    });
    std::printf(
        "probe read L2?    loads, %4d blocks x 512: %2zu MiB %3d times: %7.1f us, %.2f "
        "TB/s\n",
        4 * sms, mib, passes, us, tb_per_s(read, us));
  }

  // What a few SMs can pull from L2: 16 MiB (resident) read 16 times a launch, one block an SM.
  const size_t l2_bytes = 16 * kMiB;
  constexpr int kL2Passes = 16;
  for (const int blocks : {8, 16, 33, 66, sms}) {
    us = launch_us(s, 3, [&] {
      read = launch_read_vectors(big.get(), l2_bytes, kL2Passes, blocks, 1024, true, sink.get(), s);
    });
    std::printf(
        "probe read L2     loads, %4d blocks x 1024, one an SM: %8.1f us, %.2f TB/s, "
        "%.1f GB/s a block\n",
        blocks, us, tb_per_s(read, us), tb_per_s(read, us) * 1e3 / blocks);
  }
  if (bulk) {
    for (const int blocks : {8, 33, 66, sms})
      for (const auto& [stages, chunk] :
           {std::pair{2, 16384}, std::pair{4, 16384}, std::pair{4, 32768}, std::pair{8, 16384},
            std::pair{6, 32768}}) {
        // The copies in flight, where a block's share is fewer chunks than the stages.
        const int in_flight =
            static_cast<int>(std::min<size_t>(stages, l2_bytes / blocks / chunk * kL2Passes));
        us = launch_us(s, 3, [&] {
          read = launch_read_bulk(big.get(), l2_bytes, kL2Passes, blocks, stages, chunk, sink.get(),
                                  s);
        });
        std::printf(
            "probe read L2     bulk,  %4d blocks, %d x %2d KB in flight: %8.1f us, %.2f "
            "TB/s, %.1f GB/s a block\n",
            blocks, in_flight, chunk / 1024, us, tb_per_s(read, us),
            tb_per_s(read, us) * 1e3 / blocks);
      }
  }

  // The same resident 16 MiB into clusters: with multicast, L2 hands each chunk out once a
  // cluster, so what each SM takes in can exceed its share of L2's rate. Cluster 1 is the same
  // kernel without sharing (one thread a CTA runs the ring in all), with plain copies and with
  // the multicast form, to show what that form costs by itself.
  for (const auto& [cluster, multicast] :
       {std::pair{1, false}, std::pair{1, true}, std::pair{2, true}, std::pair{4, true}}) {
    if (!read_bulk_cluster_available(cluster)) {
      std::printf("probe read L2     clusters of %d: do not run here\n", cluster);
      continue;
    }
    for (const int max_blocks : {80, sms})
      for (const auto& [stages, chunk] :
           {std::pair{4, 16384}, std::pair{4, 32768}, std::pair{4, 49152}, std::pair{2, 65536},
            std::pair{2, 98304}}) {
        if (stages % cluster != 0) continue;
        int blocks = 0;
        us = launch_us(s, 3, [&] {
          read = launch_read_bulk_cluster(big.get(), l2_bytes, kL2Passes, max_blocks, cluster,
                                          multicast, stages, chunk, sink.get(), s, &blocks);
        });
        std::printf(
            "probe read L2     cluster %d%s, %4d blocks, %d x %2d KB in flight: %8.1f us, into SMs "
            "%.2f TB/s (%.1f GB/s a block), out of L2 %.2f TB/s\n",
            cluster, multicast ? " multicast" : "", blocks, stages, chunk / 1024, us,
            tb_per_s(read, us), tb_per_s(read, us) * 1e3 / blocks, tb_per_s(read / cluster, us));
      }
  }

  // The decoder's prefetch (cuda::prefetch_l2, 8 CTAs of bulk prefetches) of one layer-step's
  // 34 MiB, each time a region not read for the last ~500 MiB, so cold: the prefetch kernel alone,
  // the region then read by loads (after the prefetch has had a millisecond), and prefetch + read
  // back to back, against the cold read alone.
  const size_t region = 34 * kMiB;
  const int regions = static_cast<int>(big_bytes / region);
  int next = 2;  // past the first 48 MiB, which the L2 reads above left in L2
  auto next_region = [&] {
    const auto* p = reinterpret_cast<const std::byte*>(big.get()) + (next % regions) * region;
    ++next;
    return p;
  };
  auto read_region = [&](const std::byte* p) {
    launch_read_vectors(p, region, 1, 4 * sms, 512, false, sink.get(), s);
  };
  auto prefetch_region = [&](const std::byte* p) {
    const cuda::L2Range range{p, region};
    cuda::prefetch_l2(&range, 1, s);
  };
  cuda::Event a, b;
  // The time (us) of the work `enqueue` puts on the stream, run once, queued behind a GPU-side
  // wait so that the host's launches are not timed.
  auto once_us = [&](auto&& enqueue) {
    launch_spin(50'000, s);
    a.record(s);
    enqueue();
    b.record(s);
    b.synchronize();
    return b.elapsed_since(a) * 1e3;
  };
  // Medians (us) over `rounds` cold regions: `pull` alone, the region read after it (the pull has
  // had a millisecond), and pull then read at once. The first call loads the pull's kernel (CUDA
  // loads kernels at their first launch), untimed.
  struct PullTimes {
    double alone, after, together;
  };
  auto pull_times = [&](auto&& pull, int rounds) {
    pull(reinterpret_cast<const std::byte*>(big.get()));
    std::vector<double> alone, after, together;
    for (int i = 0; i < rounds; ++i) {
      const std::byte* p = next_region();
      alone.push_back(once_us([&] { pull(p); }));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      after.push_back(once_us([&] { read_region(p); }));
      p = next_region();
      together.push_back(once_us([&] {
        pull(p);
        read_region(p);
      }));
    }
    return PullTimes{median(alone), median(after), median(together)};
  };
  std::vector<double> cold;
  static_assert(2 + 3 * 9 <= 1024 / 34, "every region read once");
  for (int i = 0; i < 9; ++i) {
    const std::byte* p = next_region();
    cold.push_back(once_us([&] { read_region(p); }));
  }
  const PullTimes prefetch = pull_times(prefetch_region, 9);
  std::printf(
      "probe prefetch 34 MiB: cold read %.1f us (%.2f TB/s); prefetch kernel %.1f us; read "
      "after it %.1f us (%.2f TB/s); prefetch then read at once %.1f us\n",
      median(cold), tb_per_s(region, median(cold)), prefetch.alone, prefetch.after,
      tb_per_s(region, prefetch.after), prefetch.together);

  // Ways to bring the same cold 34 MiB into L2, against the prefetch above (v44: the decoder is
  // paced by it). Which brings the bytes fastest and leaves them readable at L2's rate is the
  // candidate to replace it. The regions come round again after ~1 GiB of others, so each is
  // still cold.
  struct Pull {
    const char* label;
    L2Pull how;
    int blocks, threads;
    size_t chunk;
  };
  std::vector<Pull> pulls;
  for (const int blocks : {8, 32, sms})
    for (const size_t chunk : {size_t{2048}, size_t{4096}, size_t{16384}, size_t{65536}})
      pulls.push_back({"bulk", L2Pull::kBulk, blocks, 128, chunk});
  for (const int blocks : {8, 32, sms}) pulls.push_back({"lines", L2Pull::kLines, blocks, 512, 0});
  for (const int blocks : {16, 32, 66, sms})
    pulls.push_back({"loads L2::256B", L2Pull::kLoads256, blocks, 512, 0});
  for (const Pull& pull : pulls) {
    const PullTimes t = pull_times(
        [&](const std::byte* p) {
          launch_l2_pull(p, region, pull.how, pull.blocks, pull.threads, pull.chunk, sink.get(), s);
        },
        5);
    std::printf(
        "probe pull 34 MiB %-14s %4d x %3d, chunk %5zu: pull %6.1f us (%.2f TB/s); read after "
        "%5.1f us (%.2f TB/s); pull then read %6.1f us\n",
        pull.label, pull.blocks, pull.threads, pull.chunk, t.alone, tb_per_s(region, t.alone),
        t.after, tb_per_s(region, t.after), t.together);
  }

  // The decoder's products at 64 rows, cuBLASLt's fastest listed configuration, over one weight
  // copy (in L2 after the first launch) and over 20-32 (streamed from DRAM, as a decode's layers
  // are without the prefetch). Weight bytes only; the time includes the gaps between a graph's
  // launches.
  struct Product {
    const char* label;
    int n, k;
    bool acc;
  };
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  DeviceBuffer<Bf16> x(64 * 4096, "probe x");
  DeviceBuffer<Bf16> y(64 * 8192, "probe y");
  cuda::fill_random(x.get(), x.size(), 3, 1.0f, s);
  cuda::fill_random(y.get(), y.size(), 4, 1.0f, s);
  // The buffer's floats as bf16 would hold NaN patterns: bf16 weights of their own.
  Bf16* weights = reinterpret_cast<Bf16*>(big.get());
  cuda::fill_random(weights, big_bytes / sizeof(Bf16), 5, 0.05f, s);
  for (const Product& p :
       {Product{"qkv", 2560, 1024, false}, Product{"o", 1024, 2048, true},
        Product{"gate|up", 8192, 1024, false}, Product{"down", 1024, 4096, true}}) {
    const size_t w_elems = static_cast<size_t>(p.n) * p.k;
    cuda::Gemm gemm(
        lt.get(),
        cuda::linear_shape(64, p.n, p.k, cuda::DType::kBf16, cuda::Epilogue::kNone, p.acc),
        ws.get(), ws.bytes());
    // Enough copies that each is read once per timed graph (autotune's graphs hold at least 20
    // launches) and that a copy is 128 MiB back when it comes round again.
    const int streamed = static_cast<int>(
        std::max<size_t>(20, (128 * kMiB + w_elems * sizeof(Bf16) - 1) / (w_elems * sizeof(Bf16))));
    for (const int copies : {1, streamed}) {
      cuda::Gemm::AutotuneOptions tune;
      const auto ranked = gemm.rank_candidates(x.get(), weights, y.get(), nullptr, s,
                                               tune.over_layers(copies, w_elems), 1);
      if (ranked.empty()) continue;
      const double us = ranked.front().first * 1e3;
      std::printf(
          "probe gemm %-7s 64 x %4d x %4d, %2d weight cop%s: %6.2f us a launch in a graph, "
          "weights at %.2f TB/s\n",
          p.label, p.n, p.k, copies, copies == 1 ? "y  " : "ies", us,
          tb_per_s(w_elems * sizeof(Bf16), us));
    }
  }
}
