// The CUDA MPS control daemon: adopted when one already answers on the pipe directory, otherwise
// started with `nvidia-cuda-mps-control -d`. A daemon a pi0 run started is told to quit by the
// last pi0 run that uses it (each holds a shared lock on a file in "<pipe dir>.pi0", and the
// starter leaves a mark there); one started otherwise (by hand, by scripts/start_mps.sh) is left
// running.
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
  // What start_or_adopt would refuse before it does anything, checked now (e.g. before a sweep's
  // baselines, which take minutes): the control program is missing, or no daemon answers and the
  // pipe or log directory is not one it may start a daemon in. Throws pi0::Error (one line).
  static void check_can_start_or_adopt(const MpsOptions& options);

  MpsDaemon() = default;
  MpsDaemon(MpsDaemon&& other) noexcept;
  MpsDaemon& operator=(MpsDaemon&& other) noexcept;
  MpsDaemon(const MpsDaemon&) = delete;
  MpsDaemon& operator=(const MpsDaemon&) = delete;
  ~MpsDaemon();  // stop(); never throws

  bool active() const { return active_; }
  bool started_here() const { return started_here_; }
  const MpsOptions& options() const { return options_; }
  // Ends our use: if a pi0 run started the daemon and no other pi0 run uses it, sends `quit` and
  // waits until it stops answering; otherwise leaves it running.
  void stop() noexcept;

 private:
  // stop()'s part while the daemon is in use: quit it if we are the last pi0 run using a daemon a
  // pi0 run started.
  void end_use() noexcept;

  MpsOptions options_;
  bool active_ = false;
  bool started_here_ = false;
  int users_fd_ = -1;      // the shared lock held while we use the daemon (-1: none could be taken)
  std::string state_dir_;  // "<pipe dir>.pi0", where the lock and the starter's mark live
};

}  // namespace pi0
