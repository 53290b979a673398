// bfloat16 on the host: storage type plus exact conversions (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>

namespace pi0 {

struct Bf16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2);

inline float bf16_to_float(Bf16 v) {
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof out);
  return out;
}

inline Bf16 float_to_bf16(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  if ((word & 0x7f800000u) == 0x7f800000u && (word & 0x007fffffu) != 0) {
    return Bf16{static_cast<uint16_t>((word >> 16) | 0x0040u)};  // quiet NaN stays NaN
  }
  const uint32_t rounding = 0x7fffu + ((word >> 16) & 1u);
  return Bf16{static_cast<uint16_t>((word + rounding) >> 16)};
}

// Rounds a float through bf16 and back: what storing it in bf16 does to it.
inline float round_to_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

}  // namespace pi0
