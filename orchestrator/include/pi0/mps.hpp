// The CUDA MPS control daemon: adopted when one already answers on the pipe directory (and then
// left running), otherwise started with `nvidia-cuda-mps-control -d` and told to quit when its
// owner goes away.
#pragma once

#include <chrono>
#include <string>

#include "pi0/process.hpp"

namespace pi0 {

struct MpsOptions {
  std::string pipe_dir = "/tmp/nvidia-mps";
  std::string log_dir = "/tmp/nvidia-mps-log";
  std::string control_program = "nvidia-cuda-mps-control";
  std::chrono::milliseconds timeout{10000};
};

// The variables a CUDA client needs to find this daemon.
EnvOverrides mps_client_environment(const MpsOptions& options);

// True if a control daemon answers `get_server_list` on options.pipe_dir.
bool mps_daemon_answers(const MpsOptions& options);

class MpsDaemon {
 public:
  // Throws pi0::Error (one line) if the control program is missing, fails to start, or does not
  // answer within the timeout.
  static MpsDaemon start_or_adopt(const MpsOptions& options);

  MpsDaemon() = default;
  MpsDaemon(MpsDaemon&& other) noexcept;
  MpsDaemon& operator=(MpsDaemon&& other) noexcept;
  MpsDaemon(const MpsDaemon&) = delete;
  MpsDaemon& operator=(const MpsDaemon&) = delete;
  ~MpsDaemon();  // sends `quit` only if we started it; never throws

  bool active() const { return active_; }
  bool started_here() const { return started_here_; }
  const MpsOptions& options() const { return options_; }
  // Sends `quit` now (if we started it) and waits until the daemon stops answering.
  void stop() noexcept;

 private:
  MpsOptions options_;
  bool active_ = false;
  bool started_here_ = false;
};

}  // namespace pi0
