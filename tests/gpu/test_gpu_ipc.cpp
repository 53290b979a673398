// The CUDA IPC owners across two real processes: this runner exports device memory, and a child
// run of this same runner (the hidden test case below) maps it, as the decoder worker maps the
// encoder's K/V pool. A process cannot open its own IPC handle, hence the child.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/ipc/cuda_ipc.hpp"
#include "pi0/process.hpp"

using namespace pi0;

namespace {

constexpr size_t kMiB = size_t{1} << 20;

std::string to_hex(const uint8_t (&bytes)[ipc::kCudaIpcHandleBytes]) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

bool from_hex(const std::string& s, uint8_t (&bytes)[ipc::kCudaIpcHandleBytes]) {
  if (s.size() != 2 * ipc::kCudaIpcHandleBytes) return false;
  for (size_t i = 0; i < ipc::kCudaIpcHandleBytes; ++i) {
    const unsigned long v = std::strtoul(s.substr(2 * i, 2).c_str(), nullptr, 16);
    bytes[i] = static_cast<uint8_t>(v);
  }
  return true;
}

// The child's run: maps the handle it is given with the size it is told the exporter announced.
CommandResult import_in_child(const uint8_t (&handle)[ipc::kCudaIpcHandleBytes], size_t announced) {
  return run_command(
      std::filesystem::read_symlink("/proc/self/exe").string(), {"[.ipc_import_child]"},
      {{"PI0_TEST_IPC_HANDLE", to_hex(handle)}, {"PI0_TEST_IPC_BYTES", std::to_string(announced)}},
      "", std::chrono::seconds(60));
}

}  // namespace

TEST_CASE("allocation_bytes_from reports the bytes left in the allocation", "[gpu]") {
  uint8_t handle[ipc::kCudaIpcHandleBytes];
  // 3 MiB + 1 is rounded up to the pool alignment, 4 MiB: the driver records the whole of it.
  const auto pool = ipc::IpcDeviceMemory::allocate_exported(3 * kMiB + 1, handle);
  REQUIRE(pool.bytes() == 4 * kMiB);
  const auto* base = static_cast<const char*>(pool.get());
  CHECK(ipc::allocation_bytes_from(base) == 4 * kMiB);
  CHECK(ipc::allocation_bytes_from(base + kMiB + 12) == 3 * kMiB - 12);
  int on_host = 0;
  CHECK_THROWS_AS(ipc::allocation_bytes_from(&on_host), Error);
}

TEST_CASE("a process maps exported memory only as large as the allocation", "[gpu]") {
  uint8_t handle[ipc::kCudaIpcHandleBytes];
  const auto pool = ipc::IpcDeviceMemory::allocate_exported(2 * kMiB, handle);

  const CommandResult as_announced = import_in_child(handle, pool.bytes());
  INFO(as_announced.output);
  CHECK(as_announced.status.success());
  CHECK(as_announced.output.find("mapped 2097152 bytes") != std::string::npos);

  // What a corrupt control block (or an encoder of another build) would announce.
  const CommandResult overstated = import_in_child(handle, pool.bytes() + 1);
  INFO(overstated.output);
  CHECK_FALSE(overstated.status.success());
  CHECK(overstated.output.find("the exporter announced 2097153 bytes of device memory, but its "
                               "allocation has 2097152") != std::string::npos);
}

// Run only as the child above (hidden: neither CTest nor a plain run of the runner starts it).
TEST_CASE("ipc import child", "[.ipc_import_child]") {
  const char* hex = std::getenv("PI0_TEST_IPC_HANDLE");
  const char* announced = std::getenv("PI0_TEST_IPC_BYTES");
  REQUIRE(hex != nullptr);
  REQUIRE(announced != nullptr);
  uint8_t handle[ipc::kCudaIpcHandleBytes];
  REQUIRE(from_hex(hex, handle));
  try {
    const auto mapped =
        ipc::IpcDeviceMemory::open_imported(handle, std::strtoull(announced, nullptr, 10));
    std::printf("mapped %zu bytes\n", mapped.bytes());
  } catch (const Error& e) {
    std::printf("error: %s\n", e.what());
    FAIL("the import was refused");
  }
}
