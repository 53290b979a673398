#include "pi0/random.hpp"

#include <cmath>

namespace pi0 {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr float kTwoPiF = 6.28318530717958647692f;
constexpr float kInv24 = 1.0f / 16777216.0f;  // 2^-24

// The (seed, stream) pair is hashed first so that nearby seeds and nearby stream ids do not give
// overlapping sequences; the index then walks a SplitMix64 sequence from that key.
inline uint64_t counter_bits(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t key = mix64(seed ^ mix64(stream));
  return mix64(key + index * kGolden);
}

}  // namespace

float counter_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  // The top 24 bits fill a float mantissa exactly, so the result is exact and strictly below 1.
  return static_cast<float>(counter_bits(seed, stream, index) >> 40) * kInv24;
}

float counter_uniform(uint64_t seed, uint64_t stream, uint64_t index, float lo, float hi) {
  const float u = counter_uniform(seed, stream, index);
  const float v = lo + (hi - lo) * u;
  // lo + (hi - lo) * u can round up to hi for u just below 1; keep the interval half-open.
  return v < hi ? v : std::nextafter(hi, lo);
}

float counter_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  // Normal i consumes uniforms 2i and 2i+1 of the stream, so it never shares them with normal i+1.
  const float u1 = counter_uniform(seed, stream, 2 * index);
  const float u2 = counter_uniform(seed, stream, 2 * index + 1);
  // 1 - u1 is exact and in (0, 1], so the logarithm is finite. Float math is accurate to a few
  // ulp, far below the bf16 rounding every use applies, and twice as fast as double.
  const float radius = std::sqrt(-2.0f * std::log(1.0f - u1));
  return radius * std::cos(kTwoPiF * u2);
}

}  // namespace pi0
