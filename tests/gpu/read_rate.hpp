// Test kernels for the read-rate probe (test_gpu_probe_read_rates.cpp): kernels that read a buffer
// and keep nothing but a checksum, so that their time is the time the bytes take to arrive.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pi0::test {

// `blocks` blocks of `threads` threads read [src, src + bytes) `passes` times (bytes a multiple of
// 16, src 16-byte aligned) as 16-byte vectors through L2 (ld.global.cg), four loads in flight a
// thread, each thread striding the grid. With one_block_an_sm, each block asks for more than half
// an SM's shared memory, so that no two share an SM. sink holds `blocks` words. Returns the bytes
// read.
size_t launch_read_vectors(const void* src, size_t bytes, int passes, int blocks, int threads,
                           bool one_block_an_sm, uint32_t* sink, cudaStream_t stream);

// Whether launch_read_bulk runs on this build and device (sm_90 code and compute capability 9.x).
bool read_bulk_available();
// `blocks` blocks each stream an equal, contiguous share of [src, src + bytes), `passes` times,
// into shared memory as bulk copies (cp.async.bulk, the TMA's path) of `chunk` bytes, up to
// `stages` of them in flight (stages * chunk <= 192 KB, chunk a multiple of 16, src 16-byte
// aligned); each stage is refilled once its 128 threads have read one word of it. sink holds
// `blocks` words. Returns the bytes read (each share is whole chunks).
size_t launch_read_bulk(const void* src, size_t bytes, int passes, int blocks, int stages,
                        int chunk, uint32_t* sink, cudaStream_t stream);

// Whether launch_read_bulk_cluster can run `cluster`-CTA clusters of one block an SM here.
bool read_bulk_cluster_available(int cluster);
// Bulk copies into clusters of `cluster` CTAs (1, 2 or 4), one block an SM, as many clusters as
// run at once (at most `max_blocks` blocks): each cluster streams an equal, contiguous share of
// [src, src + bytes), `passes` times, and every chunk lands in every CTA of the cluster
// (cp.async.bulk .multicast::cluster; issued by CTA rank j % cluster), so L2 hands out each chunk
// once a cluster. Without `multicast` (clusters of 1 only) the copies are the plain form. `stages`
// chunks in flight (a multiple of `cluster`); one thread a CTA waits for each chunk, frees its
// stage to the issuing CTA and, there, refills it. Returns the bytes that arrived in shared memory
// (each cluster's share times its CTAs); *blocks_run gets the grid.
size_t launch_read_bulk_cluster(const void* src, size_t bytes, int passes, int max_blocks,
                                int cluster, bool multicast, int stages, int chunk, uint32_t* sink,
                                cudaStream_t stream, int* blocks_run);

// Ways to bring [src, src + bytes) into L2 without keeping it in the SMs: the decoder's L2
// prefetch (bulk prefetches through the TMA) and candidates to replace it (bench/NOTES.md v44 found
// the decoder paced by that prefetch's ~0.87 TB/s).
enum class L2Pull {
  kBulk,      // cp.async.bulk.prefetch.L2 of `chunk` bytes, each thread striding the grid
  kLines,     // prefetch.global.L2, one a 128-byte line
  kLoads256,  // ld.global.nc with the L2::256B hint, one 4-byte load a 256-byte segment
};
// `blocks` blocks of `threads` threads pull the range (16-byte aligned; bulk chunks a multiple of
// 16). sink holds `blocks` words.
void launch_l2_pull(const void* src, size_t bytes, L2Pull how, int blocks, int threads,
                    size_t chunk, uint32_t* sink, cudaStream_t stream);

// One thread that spins for `ns` nanoseconds: queued before a timed region's first event, it keeps
// the host's launch of the work after it out of the time.
void launch_spin(uint64_t ns, cudaStream_t stream);

}  // namespace pi0::test
