// Helpers for tests that run the real executables: run the orchestrator, find processes and
// shared-memory segments a run may have left behind.
#pragma once

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "pi0/proc_state.hpp"
#include "pi0/process.hpp"

namespace pi0::test {

inline std::string read_cmdline(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (char& c : s) c = c == '\0' ? ' ' : c;
  return s;
}

// Pids of live (not zombie) processes whose command line contains `needle`.
inline std::vector<int> processes_matching(const std::string& needle) {
  std::vector<int> pids;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const int pid = std::stoi(name);
    const char state = proc_state(pid);
    if (state == '\0' || state == 'Z') continue;
    if (read_cmdline(pid).find(needle) != std::string::npos) pids.push_back(pid);
  }
  return pids;
}

// Workers started by orchestrator `pid` carry "--parent-pid <pid>" on their command line.
inline std::vector<int> workers_of(int orchestrator_pid) {
  return processes_matching("--parent-pid " + std::to_string(orchestrator_pid) + " ");
}

inline std::vector<std::string> segments_named(const std::string& needle) {
  std::vector<std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm")) {
    const std::string name = entry.path().filename();
    if (name.find(needle) != std::string::npos) out.push_back(name);
  }
  return out;
}

inline std::vector<std::string> segments_of(int pid) {
  return segments_named("pi0mps_" + std::to_string(pid) + "_");
}

// The pid the orchestrator's log gives `worker` ("encoder_worker (pid N)"), or -1.
inline int pid_in_log(const std::string& log, const std::string& worker) {
  const std::string key = worker + " (pid ";
  const auto at = log.find(key);
  return at == std::string::npos ? -1 : std::stoi(log.substr(at + key.size()));
}

struct Finished {
  ExitStatus status;
  std::string output;
  double seconds;
  int pid;  // the orchestrator's, to look for what it left behind
};

// The orchestrator the tests run: the build's, or $PI0_TEST_ORCHESTRATOR where set (a build
// carried to another machine, e.g. the GPU machine, where the build path does not exist; the
// orchestrator finds its workers beside itself).
inline std::string orchestrator_exe() {
  const char* carried = std::getenv("PI0_TEST_ORCHESTRATOR");
  return carried != nullptr && *carried != '\0' ? std::string(carried)
                                                : std::string(PI0_ORCHESTRATOR_EXE);
}

// Runs the orchestrator to completion (killed after `timeout`), with `env` over this process's.
inline Finished run_orchestrator(const std::vector<std::string>& args,
                                 std::chrono::seconds timeout = std::chrono::seconds(120),
                                 const EnvOverrides& env = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  ChildProcess p = ChildProcess::spawn("orchestrator", orchestrator_exe(), args, env, false);
  auto status = p.wait_for(timeout);
  if (!status) status = p.terminate(std::chrono::milliseconds(100));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  p.terminate(std::chrono::milliseconds(100));  // joins the output reader
  return {*status, p.output(), secs, p.pid()};
}

// Waits until `pred` holds or the timeout passes; returns whether it held.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

// A raw little-endian f32 file (the orchestrator's --actions-out).
inline std::vector<float> read_floats(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

// An executable shell script at `path`: a stand-in or wrapper for a worker or a tool.
inline void write_script(const std::string& path, const std::string& body) {
  {
    std::ofstream script(path);
    script << "#!/bin/sh\n" << body;
  }
  std::filesystem::permissions(path, std::filesystem::perms::owner_all);
}

inline std::string temp_dir(const std::string& tag) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("pi0mps_test_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace pi0::test
