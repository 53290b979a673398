#include "pi0/check.hpp"

#include <sstream>

namespace pi0::detail {

void throw_api_error(const char* api, int code, const char* code_text, const char* expr,
                     const char* file, int line) {
  std::ostringstream out;
  out << api << " error " << code << " (" << (code_text ? code_text : "?") << ") in `" << expr
      << "` at " << file << ":" << line;
  throw Error(out.str());
}

}  // namespace pi0::detail
