// The early kernel handover (pi0/cuda/device.hpp, link_kernels) lets any kernel of ours launch
// before the kernel before it has finished: that is safe only because each one waits for its
// predecessor before it touches memory. This reads the sources and requires that of every kernel,
// so that a new one cannot forget it.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"

namespace {

struct Kernel {
  std::string file;
  size_t line = 0;
  std::string first_statement;
};

// Each __global__ function's first statement (the text after the body's '{', up to its ';').
std::vector<Kernel> kernels_in(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string src = buffer.str();
  std::vector<Kernel> found;
  for (size_t at = src.find("__global__"); at != std::string::npos;
       at = src.find("__global__", at + 1)) {
    int depth = 0;
    size_t i = at;
    for (; i < src.size(); ++i) {
      const char c = src[i];
      if (c == '(') ++depth;
      if (c == ')') --depth;
      if (depth == 0 && (c == '{' || c == ';')) break;
    }
    if (i >= src.size() || src[i] == ';') continue;  // a declaration
    size_t body = i + 1;
    while (body < src.size() && std::isspace(static_cast<unsigned char>(src[body]))) ++body;
    const size_t end = src.find(';', body);
    Kernel k;
    k.file = path.filename().string();
    k.line = 1 + static_cast<size_t>(std::count(src.begin(), src.begin() + at, '\n'));
    k.first_statement = src.substr(body, end == std::string::npos ? 0 : end + 1 - body);
    found.push_back(k);
  }
  return found;
}

}  // namespace

TEST_CASE("every kernel of ours waits for the kernel before it first thing", "[handover]") {
  const std::filesystem::path dir = std::filesystem::path(PI0_SOURCE_DIR) / "common" / "cuda";
  std::vector<Kernel> kernels;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const auto ext = entry.path().extension();
    if (ext != ".cu" && ext != ".cuh") continue;
    for (Kernel& k : kernels_in(entry.path())) kernels.push_back(std::move(k));
  }
  REQUIRE(kernels.size() >= 20);  // the parse found the kernels at all
  for (const Kernel& k : kernels) {
    INFO(k.file << ":" << k.line << " starts with: " << k.first_statement);
    CHECK(k.first_statement == "wait_for_prior_grids();");
  }
}
