// One error type for the whole project, and the macros that raise it.
// This header includes no CUDA header: the macros expand to CUDA calls only where they are used.
#pragma once

#include <stdexcept>
#include <string>

namespace pi0 {

// Unexpected failures (a CUDA call failed, a file is malformed, a peer broke the protocol).
// Expected outcomes such as a timeout or a full queue are return values, not exceptions.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_api_error(const char* api, int code, const char* code_text, const char* expr,
                                  const char* file, int line);
const char* cublas_status_text(int status);
}  // namespace detail

}  // namespace pi0

#define PI0_CHECK(cond, msg)                            \
  do {                                                  \
    if (!(cond)) throw ::pi0::Error(std::string(msg));  \
  } while (0)

#define CUDA_CHECK(expr)                                                                        \
  do {                                                                                          \
    const auto pi0_cuda_status_ = (expr);                                                       \
    if (pi0_cuda_status_ != cudaSuccess)                                                        \
      ::pi0::detail::throw_api_error("CUDA", static_cast<int>(pi0_cuda_status_),                \
                                     cudaGetErrorString(pi0_cuda_status_), #expr, __FILE__,     \
                                     __LINE__);                                                 \
  } while (0)

#define CUBLAS_CHECK(expr)                                                                      \
  do {                                                                                          \
    const auto pi0_cublas_status_ = (expr);                                                     \
    if (pi0_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                            \
      ::pi0::detail::throw_api_error(                                                           \
          "cuBLAS", static_cast<int>(pi0_cublas_status_),                                       \
          ::pi0::detail::cublas_status_text(static_cast<int>(pi0_cublas_status_)), #expr,       \
          __FILE__, __LINE__);                                                                  \
  } while (0)

// After a kernel launch: launch errors are reported by cudaGetLastError, not by the launch.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
