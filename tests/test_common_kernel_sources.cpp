// The early kernel handover (pi0/cuda/device.hpp, link_kernels; the default) lets any kernel of
// ours launch before the kernel before it has finished: that is safe only because each one waits
// for its predecessor before it touches memory. This reads the sources and requires that of every
// kernel, so that a new one cannot forget it; and checks how PI0_KERNEL_HANDOVER is read.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/cuda/device.hpp"

namespace {

struct Kernel {
  std::string file;
  size_t line = 0;
  std::string first_statement;
};

std::string read_source(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Each __global__ function's first statement (the text after the body's '{', up to its ';').
std::vector<Kernel> kernels_in(const std::filesystem::path& path) {
  const std::string src = read_source(path);
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
    // The one exception: qkv_rope.cu copies its constant weights first (checked below).
    const bool weights_first = k.file == "qkv_rope.cu" &&
                               k.first_statement == "issue_weights_then_wait_for_prior_grids(a);";
    CHECK((k.first_statement == "wait_for_prior_grids();" || weights_first));
  }
}

// The exception above reads nothing the kernel before may write: before its wait it copies only
// its weights (W^T, a.w_map), and it copies nothing after the wait.
TEST_CASE("the qkv kernel copies only its weights before it waits for the kernel before",
          "[handover]") {
  const std::string src =
      read_source(std::filesystem::path(PI0_SOURCE_DIR) / "common" / "cuda" / "qkv_rope.cu");
  const std::string head = "void issue_weights_then_wait_for_prior_grids(const Args& a) {";
  const size_t at = src.find(head);
  REQUIRE(at != std::string::npos);
  const size_t end = src.find("\n}\n", at);
  REQUIRE(end != std::string::npos);
  const std::string body = src.substr(at + head.size(), end - at - head.size());
  const size_t wait = body.rfind("wait_for_prior_grids();");
  REQUIRE(wait != std::string::npos);
  const std::string before = body.substr(0, wait);
  INFO(body);
  CHECK(before.find("x_map") == std::string::npos);
  size_t copies = 0;
  for (size_t c = before.find("load_box("); c != std::string::npos;
       c = before.find("load_box(", c + 1)) {
    ++copies;
    CHECK(before.substr(c, before.find(';', c) - c).find("a.w_map") != std::string::npos);
  }
  CHECK(copies >= 1);
  CHECK(body.find("load_box", wait) == std::string::npos);
}

// What a user sets in PI0_KERNEL_HANDOVER, and what they get without it.
TEST_CASE("PI0_KERNEL_HANDOVER: early unless set, and a bad value is named", "[handover]") {
  using pi0::cuda::KernelHandover;
  CHECK(pi0::cuda::parse_kernel_handover(nullptr) == KernelHandover::kEarly);
  CHECK(pi0::cuda::parse_kernel_handover("") == KernelHandover::kEarly);
  CHECK(pi0::cuda::parse_kernel_handover("early") == KernelHandover::kEarly);
  CHECK(pi0::cuda::parse_kernel_handover("completion") == KernelHandover::kCompletion);
  for (const char* bad : {"Early", "late", "completion "}) {
    INFO("value '" << bad << "'");
    try {
      (void)pi0::cuda::parse_kernel_handover(bad);
      FAIL("accepted");
    } catch (const pi0::Error& e) {
      CHECK(std::string(e.what()).find(std::string("'") + bad + "'") != std::string::npos);
    }
  }
}
