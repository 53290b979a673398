// The ceilings pi0_bench's utilisation columns divide by: rates measured on each GPU model here
// (bench/NOTES.md), not datasheet peaks. Header-only so that the CPU tests can check the choice.
#pragma once

#include <string_view>

namespace pi0::bench {

struct Ceilings {
  double tflops = 0;    // dense bf16 matrix products on random data
  double gbps = 0;      // reads from DRAM
  const char* of = "";  // whose figures these are, printed beside the percentages
};

// By the device name CUDA reports. The H200 is the H100's chip with faster memory: the same
// matrix rate (769-798 TFLOP/s measured on one), reads at 4.57-4.65 TB/s (v45's probe) against
// the H100's 3.09-3.13 (v35). Any other GPU gets the H100's figures, and says so.
inline Ceilings ceilings_for(std::string_view device_name) {
  if (device_name.find("H200") != std::string_view::npos) return {800.0, 4600.0, "H200"};
  if (device_name.find("H100") != std::string_view::npos) return {800.0, 3000.0, "H100"};
  return {800.0, 3000.0, "the H100's; none measured for this GPU"};
}

}  // namespace pi0::bench
