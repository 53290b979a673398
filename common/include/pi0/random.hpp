// Counter-based random numbers: value i of stream s under seed k is a pure function of (k, s, i),
// so any process, thread or order of generation produces the same weights and inputs.
#pragma once

#include <cstdint>
#include <string_view>

namespace pi0 {

// SplitMix64 finaliser over the combined counter.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A stable 64-bit id for a stream name (FNV-1a), e.g. a tensor name.
inline uint64_t stream_id(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Uniform in [0, 1) with 24 random bits.
float counter_uniform(uint64_t seed, uint64_t stream, uint64_t index);
// Uniform in [lo, hi).
float counter_uniform(uint64_t seed, uint64_t stream, uint64_t index, float lo, float hi);
// Standard normal (Box-Muller on two counter uniforms).
float counter_normal(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace pi0
