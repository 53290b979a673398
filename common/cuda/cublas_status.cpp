#include <cublas_api.h>

#include "pi0/check.hpp"

namespace pi0::detail {

const char* cublas_status_text(int status) {
  return cublasGetStatusString(static_cast<cublasStatus_t>(status));
}

}  // namespace pi0::detail
