// Runner of the [gpu] tests. Without a usable CUDA device it runs nothing and exits 77, which
// CTest reports as "Skipped" for every test, with the reason printed here.
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::strncmp(argv[i], "--list", 6) == 0;
  if (!listing) {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0) {
      std::printf("SKIPPED: no CUDA device (%s); this [gpu] test needs an NVIDIA GPU\n",
                  status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
      return 77;
    }
  }
  return Catch::Session().run(argc, argv);
}
