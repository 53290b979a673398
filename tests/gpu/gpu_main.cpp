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
  const int status = Catch::Session().run(argc, argv);
  // CTest reads 77 as "Skipped". Catch2 2 returns the number of failed assertions (so 77 of them
  // would read as a skip); Catch2 3 returns 4 when every test case it ran was skipped.
  if (status == 77) return 1;
#if __has_include(<catch2/catch_session.hpp>)
  if (status == 4) return 77;
#endif
  return status;
}
