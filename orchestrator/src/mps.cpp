#include "pi0/mps.hpp"

#include <sys/stat.h>

#include <spdlog/spdlog.h>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

#include "pi0/check.hpp"

namespace pi0 {
namespace {

CommandResult send_command(const MpsOptions& o, const std::string& command) {
  return run_command(o.control_program, {}, mps_client_environment(o), command + "\n",
                     std::chrono::milliseconds(5000));
}

void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    throw Error("MPS: cannot create directory " + dir + ": " + std::strerror(errno));
  }
}

}  // namespace

EnvOverrides mps_client_environment(const MpsOptions& o) {
  return {{"CUDA_MPS_PIPE_DIRECTORY", o.pipe_dir}, {"CUDA_MPS_LOG_DIRECTORY", o.log_dir}};
}

bool mps_daemon_answers(const MpsOptions& o) {
  if (find_on_path(o.control_program).empty()) return false;
  const CommandResult r = send_command(o, "get_server_list");
  return !r.timed_out && r.status.success();
}

MpsDaemon MpsDaemon::start_or_adopt(const MpsOptions& o) {
  PI0_CHECK(!find_on_path(o.control_program).empty(),
            "MPS: " + o.control_program +
                " not found on PATH (it ships with the NVIDIA driver); pass --no-mps to run "
                "without MPS");
  MpsDaemon daemon;
  daemon.options_ = o;
  if (mps_daemon_answers(o)) {
    daemon.active_ = true;
    spdlog::info("MPS: adopted the control daemon already running on {} (it stays running)",
                 o.pipe_dir);
    return daemon;
  }
  make_dir(o.pipe_dir);
  make_dir(o.log_dir);
  const CommandResult started = run_command(o.control_program, {"-d"}, mps_client_environment(o),
                                            "", std::chrono::milliseconds(o.timeout));
  // Before the check: `-d` may have started a daemon and still timed out, and then it is ours
  // to quit. A `-d` that failed started nothing: a daemon answering now is someone else's (e.g.
  // another run's, started in the same instant).
  daemon.active_ = true;
  daemon.started_here_ = started.timed_out || started.status.success();
  if (!daemon.started_here_ && mps_daemon_answers(o)) {
    spdlog::info(
        "MPS: adopted the control daemon another process started on {} meanwhile (it "
        "stays running)",
        o.pipe_dir);
    return daemon;
  }
  PI0_CHECK(!started.timed_out && started.status.success(),
            "MPS: `" + o.control_program + " -d` failed (" + started.status.describe() +
                "): " + started.output.substr(0, started.output.find('\n')));
  const auto deadline = std::chrono::steady_clock::now() + o.timeout;
  while (!mps_daemon_answers(o)) {
    PI0_CHECK(std::chrono::steady_clock::now() < deadline,
              "MPS: the control daemon started but does not answer on " + o.pipe_dir);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  spdlog::info("MPS: started the control daemon (pipe {}, log {})", o.pipe_dir, o.log_dir);
  return daemon;
}

MpsDaemon::MpsDaemon(MpsDaemon&& other) noexcept {
  *this = std::move(other);
}

MpsDaemon& MpsDaemon::operator=(MpsDaemon&& other) noexcept {
  if (this != &other) {
    stop();
    options_ = other.options_;
    active_ = std::exchange(other.active_, false);
    started_here_ = std::exchange(other.started_here_, false);
  }
  return *this;
}

MpsDaemon::~MpsDaemon() {
  stop();
}

void MpsDaemon::stop() noexcept {
  if (!active_) return;
  active_ = false;
  if (!started_here_) return;
  try {
    send_command(options_, "quit");
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    bool answers = mps_daemon_answers(options_);
    while (answers && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      answers = mps_daemon_answers(options_);
    }
    if (answers) {
      spdlog::warn(
          "MPS: the control daemon we started still answers on {} after `quit`; stop it "
          "with scripts/stop_mps.sh",
          options_.pipe_dir);
    } else {
      spdlog::info("MPS: stopped the control daemon we started");
    }
  } catch (...) {
    // Nothing sensible to do while unwinding; the daemon may outlive us.
  }
}

}  // namespace pi0
