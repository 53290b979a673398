// Test kernels for the read-rate probe (test_gpu_probe_read_rates.cpp): kernels that read a buffer
// and keep nothing but a checksum, so that their time is the time the bytes take to arrive.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pi0::test {

// `blocks` blocks of `threads` threads read [src, src + bytes) (bytes a multiple of 16, src
// 16-byte aligned) as 16-byte vectors through L2 (ld.global.cg), each thread striding the grid.
// sink holds `blocks` words.
void launch_read_vectors(const void* src, size_t bytes, int blocks, int threads, uint32_t* sink,
                         cudaStream_t stream);

// Whether launch_read_bulk runs on this build and device (sm_90 code and compute capability 9.x).
bool read_bulk_available();
// `blocks` blocks each stream an equal, contiguous share of [src, src + bytes) into shared memory
// as bulk copies (cp.async.bulk, the TMA's path) of `chunk` bytes, `stages` of them in flight
// (stages * chunk <= 192 KB, chunk a multiple of 16, src 16-byte aligned); each stage is released
// once its 128 threads have read one word of it. sink holds `blocks` words. Returns the bytes
// read (each share is whole chunks).
size_t launch_read_bulk(const void* src, size_t bytes, int blocks, int stages, int chunk,
                        uint32_t* sink, cudaStream_t stream);

}  // namespace pi0::test
