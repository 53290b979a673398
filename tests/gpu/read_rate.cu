#include <cooperative_groups.h>

#include <algorithm>
#include <string>

#include "pi0/check.hpp"
#include "read_rate.hpp"

namespace pi0::test {
namespace {

constexpr int kBulkThreads = 128;
constexpr int kMaxStages = 16;
constexpr int kMaxBulkBytes = 192 * 1024;
constexpr int kMaxCluster = 4;

namespace cg = cooperative_groups;

__global__ void read_vectors_kernel(const uint4* src, size_t n, int passes, uint32_t* sink) {
  const size_t first = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  uint32_t x = 0;
  for (int p = 0; p < passes; ++p) {
    size_t i = first;
    // Four independent loads before any is used: one at a time, a thread would wait for each.
    for (; i + 3 * stride < n; i += 4 * stride) {
      const uint4 a = __ldcg(src + i), b = __ldcg(src + i + stride),
                  c = __ldcg(src + i + 2 * stride), d = __ldcg(src + i + 3 * stride);
      x ^= (a.x ^ a.y ^ a.z ^ a.w) ^ (b.x ^ b.y ^ b.z ^ b.w) ^ (c.x ^ c.y ^ c.z ^ c.w) ^
           (d.x ^ d.y ^ d.z ^ d.w);
    }
    for (; i < n; i += stride) {
      const uint4 v = __ldcg(src + i);
      x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  // A store the compiler cannot drop, since it depends on every load; taken almost never.
  if (x == 0x9e3779b9u) sink[blockIdx.x] = x;
}

__global__ void l2_pull_kernel(const char* src, size_t bytes, L2Pull how, size_t chunk,
                               uint32_t* sink) {
  const size_t me = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  const size_t threads = size_t{gridDim.x} * blockDim.x;
  uint32_t x = 0;
  if (how == L2Pull::kBulk) {
    for (size_t off = me * chunk; off < bytes; off += threads * chunk) {
      const size_t size = bytes - off < chunk ? bytes - off : chunk;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + off),
                   "r"(static_cast<uint32_t>(size))
                   : "memory");
#endif
    }
  } else if (how == L2Pull::kLines) {
    for (size_t off = me * 128; off < bytes; off += threads * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(src + off));
  } else {
    size_t seg = me;
    const size_t segs = bytes / 256;
    // Eight loads in flight a thread.
    for (; seg + 7 * threads < segs; seg += 8 * threads) {
      uint32_t v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];"
                     : "=r"(v[u])
                     : "l"(src + (seg + u * threads) * 256));
#pragma unroll
      for (int u = 0; u < 8; ++u) x ^= v[u];
    }
    for (; seg < segs; seg += threads) {
      uint32_t v;
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];"
                   : "=r"(v)
                   : "l"(src + seg * 256));
      x ^= v;
    }
  }
  if (x == 0x9e3779b9u) sink[blockIdx.x] = x;
}

__global__ void spin_kernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The mbarrier and bulk-copy steps of both bulk kernels (sm_90 PTX).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}

// This thread's arrival on `bar`, announcing `bytes` that copies will bring in this phase.
__device__ __forceinline__ void barrier_expect(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Waits until the phase of `parity` completes; kCluster: also acquires what other CTAs of the
// cluster released onto it.
template <bool kCluster>
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    if constexpr (kCluster)
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; "
          "selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
          "selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
  }
}

// `bytes` from global `src` into this CTA's shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const char* src, int bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
#endif

__global__ void __launch_bounds__(kBulkThreads)
    read_bulk_kernel(const char* src, size_t per_block, int passes, int stages, int chunk,
                     uint32_t* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ __align__(8) uint64_t full[kMaxStages];
  const char* base = src + blockIdx.x * per_block;
  const int chunks = static_cast<int>(per_block / chunk);
  const int total = chunks * passes;
  const uint32_t buf = shared_address(stage_bytes);
  auto bar = [&](int s) { return shared_address(&full[s]); };
  auto issue = [&](int j, int s) {
    barrier_expect(bar(s), chunk);
    bulk_copy(buf + s * chunk, base + static_cast<size_t>(j % chunks) * chunk, chunk, bar(s));
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) barrier_init(bar(s), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int j = 0; j < stages && j < total; ++j) issue(j, j);
  }
  __syncthreads();
  uint32_t x = 0;
  for (int j = 0; j < total; ++j) {
    const int s = j % stages;
    barrier_wait<false>(bar(s), static_cast<uint32_t>(j / stages) & 1u);
    x ^= reinterpret_cast<const uint32_t*>(stage_bytes + s * chunk)[threadIdx.x % (chunk / 4)];
    __syncthreads();  // every thread has read stage s before it is refilled
    if (threadIdx.x == 0 && j + stages < total) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(j + stages, s);
    }
  }
  if (x == 0x9e3779b9u) sink[blockIdx.x] = x;
#else
  (void)src;
  (void)per_block;
  (void)passes;
  (void)stages;
  (void)chunk;
  (void)sink;
#endif
}

// One thread a CTA runs the ring, with no block barrier a chunk. Chunk j sits in stage
// s = j % stages, phase j / stages; its issuer is rank j % cluster, the same for every phase of a
// stage since stages % cluster == 0. full[s] (one arrival, this CTA's own, plus the chunk's bytes)
// says the chunk has landed here; empty[s], in the issuer, takes one arrival from every CTA of the
// cluster once the chunk has landed in it, and only then is the stage refilled. On the H100 the
// rate grows with the chunk, not with the chunks in flight (v35): the ring's round trip a chunk
// bounds it, so its figures are lower bounds on what the copies can deliver.
template <bool kMulticast>
__global__ void __launch_bounds__(kBulkThreads)
    read_bulk_cluster_kernel(const char* src, size_t per_cluster, int passes, int stages, int chunk,
                             uint32_t* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ __align__(8) uint64_t full[kMaxStages];
  __shared__ __align__(8) uint64_t empty[kMaxStages];
  cg::cluster_group cluster = cg::this_cluster();
  const int size = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const char* base = src + (blockIdx.x / size) * per_cluster;
  const int chunks = static_cast<int>(per_cluster / chunk);
  const int total = chunks * passes;
  const uint16_t all = static_cast<uint16_t>((1u << size) - 1u);
  const uint32_t buf = shared_address(stage_bytes);
  auto full_bar = [&](int s) { return shared_address(&full[s]); };
  auto empty_bar = [&](int s) { return shared_address(&empty[s]); };
  auto wait = [](uint32_t bar, uint32_t parity) { barrier_wait<true>(bar, parity); };
  auto expect = [&](int s) { barrier_expect(full_bar(s), chunk); };
  auto issue = [&](int j, int s) {
    const char* from = base + static_cast<size_t>(j % chunks) * chunk;
    if constexpr (kMulticast)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
          "[%0], [%1], %2, [%3], %4;" ::"r"(buf + s * chunk),
          "l"(from), "r"(chunk), "r"(full_bar(s)), "h"(all)
          : "memory");
    else
      bulk_copy(buf + s * chunk, from, chunk, full_bar(s));
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      barrier_init(full_bar(s), 1);
      barrier_init(empty_bar(s), static_cast<uint32_t>(size));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster.sync();  // every CTA's barriers exist before a copy or an arrival reaches them
  uint32_t x = 0;
  if (threadIdx.x == 0) {
    for (int j = 0; j < stages && j < total; ++j) {
      expect(j);
      if (j % size == rank) issue(j, j);
    }
    for (int j = 0; j < total; ++j) {
      const int s = j % stages;
      const uint32_t parity = static_cast<uint32_t>(j / stages) & 1u;
      wait(full_bar(s), parity);
      x ^= reinterpret_cast<const uint32_t*>(stage_bytes + s * chunk)[j % (chunk / 4)];
      if (j + stages < total) {
        expect(s);
        uint32_t issuer_empty;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                     : "=r"(issuer_empty)
                     : "r"(empty_bar(s)), "r"(s % size));
        asm volatile(
            "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(issuer_empty)
            : "memory");
        if (s % size == rank) {
          wait(empty_bar(s), parity);
          issue(j + stages, s);
        }
      }
    }
  }
  cluster.sync();  // no CTA leaves while a peer may still copy into it or arrive on its barriers
  if (x == 0x9e3779b9u) sink[blockIdx.x] = x;
#else
  (void)src;
  (void)per_cluster;
  (void)passes;
  (void)stages;
  (void)chunk;
  (void)sink;
#endif
}

cudaLaunchConfig_t cluster_config(int blocks, int cluster, size_t shared, cudaStream_t stream,
                                  cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kBulkThreads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = cluster;
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// How many clusters of `cluster` (1 to kMaxCluster) blocks asking for all kMaxBulkBytes (one an
// SM) run at once. Asked once a size: timed launches must not carry the query.
int active_clusters(int cluster) {
  static int known_plus_one[kMaxCluster + 1] = {};  // 0: not asked yet
  if (known_plus_one[cluster] == 0) {
    cudaLaunchAttribute attribute{};
    const cudaLaunchConfig_t config =
        cluster_config(cluster, cluster, kMaxBulkBytes, nullptr, &attribute);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, read_bulk_cluster_kernel<true>, &config) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      clusters = 0;
    }
    known_plus_one[cluster] = clusters + 1;
  }
  return known_plus_one[cluster] - 1;
}

}  // namespace

size_t launch_read_vectors(const void* src, size_t bytes, int passes, int blocks, int threads,
                           bool one_block_an_sm, uint32_t* sink, cudaStream_t stream) {
  PI0_CHECK(bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 && blocks > 0 &&
                threads > 0 && passes > 0,
            "launch_read_vectors: 16-byte aligned src and bytes, a pass and a non-empty grid");
  // More than half of an H100 SM's 228 KB: one such block an SM.
  constexpr int kHalfAnSmAndMore = 120 * 1024;
  static const bool attribute_set =
      cudaFuncSetAttribute(read_vectors_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kHalfAnSmAndMore) == cudaSuccess;
  PI0_CHECK(!one_block_an_sm || attribute_set,
            "launch_read_vectors: cannot ask for 120 KB of shared memory a block here");
  read_vectors_kernel<<<blocks, threads, one_block_an_sm ? kHalfAnSmAndMore : 0, stream>>>(
      static_cast<const uint4*>(src), bytes / 16, passes, sink);
  CUDA_CHECK_LAUNCH();
  return bytes * passes;
}

void launch_l2_pull(const void* src, size_t bytes, L2Pull how, int blocks, int threads,
                    size_t chunk, uint32_t* sink, cudaStream_t stream) {
  PI0_CHECK(reinterpret_cast<uintptr_t>(src) % 16 == 0 && bytes % 16 == 0 && blocks > 0 &&
                threads > 0 && (how != L2Pull::kBulk || (chunk > 0 && chunk % 16 == 0)),
            "launch_l2_pull: 16-byte aligned src and bytes, a non-empty grid, whole bulk chunks");
  l2_pull_kernel<<<blocks, threads, 0, stream>>>(static_cast<const char*>(src), bytes, how, chunk,
                                                 sink);
  CUDA_CHECK_LAUNCH();
}

void launch_spin(uint64_t ns, cudaStream_t stream) {
  spin_kernel<<<1, 1, 0, stream>>>(ns);
  CUDA_CHECK_LAUNCH();
}

bool read_bulk_available() {
  static const bool available = [] {
    int device = 0, major = 0;
    cudaFuncAttributes attributes{};
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaFuncGetAttributes(&attributes, read_bulk_kernel) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return major == 9 && attributes.binaryVersion >= 90 &&
           cudaFuncSetAttribute(read_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                kMaxBulkBytes) == cudaSuccess;
  }();
  return available;
}

bool read_bulk_cluster_available(int cluster) {
  static const bool attribute_set =
      read_bulk_available() &&
      cudaFuncSetAttribute(read_bulk_cluster_kernel<true>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kMaxBulkBytes) == cudaSuccess &&
      cudaFuncSetAttribute(read_bulk_cluster_kernel<false>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kMaxBulkBytes) == cudaSuccess;
  return attribute_set && cluster >= 1 && cluster <= kMaxCluster && active_clusters(cluster) > 0;
}

size_t launch_read_bulk_cluster(const void* src, size_t bytes, int passes, int max_blocks,
                                int cluster, bool multicast, int stages, int chunk, uint32_t* sink,
                                cudaStream_t stream, int* blocks_run) {
  PI0_CHECK(read_bulk_cluster_available(cluster), "launch_read_bulk_cluster: clusters of " +
                                                      std::to_string(cluster) +
                                                      " with one block an SM do not run here");
  PI0_CHECK(multicast || cluster == 1, "launch_read_bulk_cluster: a cluster shares by multicast");
  PI0_CHECK(passes > 0 && stages >= 1 && stages <= kMaxStages && stages % cluster == 0 &&
                chunk >= 16 && chunk % 16 == 0 &&
                static_cast<size_t>(stages) * chunk <= kMaxBulkBytes &&
                reinterpret_cast<uintptr_t>(src) % 16 == 0,
            "launch_read_bulk_cluster: " + std::to_string(stages) + " stages of " +
                std::to_string(chunk) + " bytes in clusters of " + std::to_string(cluster));
  const int clusters = std::min(max_blocks / cluster, active_clusters(cluster));
  PI0_CHECK(clusters > 0, "launch_read_bulk_cluster: no cluster fits in " +
                              std::to_string(max_blocks) + " blocks");
  const size_t per_cluster = bytes / clusters / chunk * chunk;
  PI0_CHECK(per_cluster > 0, "launch_read_bulk_cluster: fewer bytes than one chunk a cluster");
  cudaLaunchAttribute attribute{};
  // All of kMaxBulkBytes, whatever the stages use: one block an SM, as active_clusters counted.
  const cudaLaunchConfig_t config =
      cluster_config(clusters * cluster, cluster, kMaxBulkBytes, stream, &attribute);
  CUDA_CHECK(cudaLaunchKernelEx(
      &config, multicast ? read_bulk_cluster_kernel<true> : read_bulk_cluster_kernel<false>,
      static_cast<const char*>(src), per_cluster, passes, stages, chunk, sink));
  *blocks_run = clusters * cluster;
  return per_cluster * clusters * cluster * passes;
}

size_t launch_read_bulk(const void* src, size_t bytes, int passes, int blocks, int stages,
                        int chunk, uint32_t* sink, cudaStream_t stream) {
  PI0_CHECK(read_bulk_available(), "launch_read_bulk: needs sm_90 code on a 9.x device");
  PI0_CHECK(blocks > 0 && passes > 0 && stages >= 1 && stages <= kMaxStages && chunk >= 16 &&
                chunk % 16 == 0 && static_cast<size_t>(stages) * chunk <= kMaxBulkBytes &&
                reinterpret_cast<uintptr_t>(src) % 16 == 0,
            "launch_read_bulk: " + std::to_string(stages) + " stages of " + std::to_string(chunk) +
                " bytes over " + std::to_string(blocks) + " blocks");
  const size_t per_block = bytes / blocks / chunk * chunk;
  PI0_CHECK(per_block > 0, "launch_read_bulk: fewer bytes than one chunk a block");
  read_bulk_kernel<<<blocks, kBulkThreads, stages * chunk, stream>>>(
      static_cast<const char*>(src), per_block, passes, stages, chunk, sink);
  CUDA_CHECK_LAUNCH();
  return per_block * blocks * passes;
}

}  // namespace pi0::test
