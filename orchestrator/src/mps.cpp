#include "pi0/mps.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>
#include <utility>

#include "pi0/check.hpp"

namespace pi0 {
namespace {

CommandResult send_command(const MpsOptions& o, const std::string& command) {
  return run_command(o.control_program, {}, mps_client_environment(o), command + "\n",
                     std::chrono::milliseconds(5000));
}

// The pipe and log directories of a daemon we start (often as root): ours or root's, and writable
// by no one else, or another user could plant files the daemon then writes through.
void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    throw Error("MPS: cannot create directory " + dir + ": " + std::strerror(errno));
  }
  struct stat st {};
  PI0_CHECK(::lstat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode),
            "MPS: " + dir + " is not a directory");
  PI0_CHECK((st.st_uid == ::geteuid() || st.st_uid == 0) && (st.st_mode & 0022) == 0,
            "MPS: " + dir + " belongs to another user or is writable by others; remove it or " +
                "choose another with --mps-pipe-dir / --mps-log-dir");
}

// Whether the daemon answers `get_server_list`: a prompt failure means it is gone; no reply
// within the timeout means it is still there (e.g. waiting for its clients after `quit`).
enum class DaemonReply { kAnswers, kGone, kNoReply };
DaemonReply ask_daemon(const MpsOptions& o) {
  if (find_on_path(o.control_program).empty()) return DaemonReply::kGone;
  const CommandResult r = send_command(o, "get_server_list");
  if (r.timed_out) return DaemonReply::kNoReply;
  return r.status.success() ? DaemonReply::kAnswers : DaemonReply::kGone;
}

// The running daemon's pid, from the file it keeps in its pipe directory ("" where there is none,
// e.g. a control program that writes none).
std::string daemon_pid(const MpsOptions& o) {
  std::ifstream in(o.pipe_dir + "/nvidia-cuda-mps-control.pid");
  std::string pid;
  in >> pid;
  return pid;
}

// Our own files about the daemon live beside its pipe directory, not in it: "<pipe dir>.pi0",
// mode 0700, used only if it is a directory of ours (under a shared /tmp another user could have
// made it). Empty where it is not usable.
std::string state_dir(const MpsOptions& o) {
  const std::string dir = o.pipe_dir + ".pi0";
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return {};
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
      (st.st_mode & 0077) != 0)
    return {};
  return dir;
}

// Every pi0 run that uses the daemon holds a shared lock on this file; the one that can turn its
// lock exclusive when it ends is the last user.
std::string users_lock_path(const std::string& dir) {
  return dir + "/users.lock";
}
// Present while the daemon answering on the pipe directory is one a pi0 run started: that run's
// pid, then the daemon's (so that a mark left by a killed run is not taken for a daemon started
// since by other means).
std::string started_marker_path(const std::string& dir) {
  return dir + "/started-by-run";
}
// Held exclusively from the look for a daemon to the mark, so that two runs starting together do
// not both start one, nor one remove the other's fresh mark.
std::string start_lock_path(const std::string& dir) {
  return dir + "/start.lock";
}

// True if the mark names the daemon that runs now (or names none, where the control program keeps
// no pid file).
bool mark_is_current(const std::string& dir, const MpsOptions& o) {
  std::ifstream in(started_marker_path(dir));
  std::string run_pid, marked_daemon;
  if (!(in >> run_pid)) return false;
  in >> marked_daemon;
  return marked_daemon.empty() || marked_daemon == daemon_pid(o);
}

// `path` opened (created 0600) and flock()ed with `operation`: the descriptor that holds the
// lock until it is closed, or -1 where either fails, or where the lock is still held elsewhere
// after `patience`. Another run holds these locks only while it starts or quits the daemon, each
// step bounded by its own timeout; a run stopped there (Ctrl-Z) must not stop us too.
int lock_file(const std::string& path, int operation, std::chrono::milliseconds patience) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  const auto deadline = std::chrono::steady_clock::now() + patience;
  while (::flock(fd, operation | LOCK_NB) != 0) {
    const int error = errno;
    if (error == EINTR) continue;
    if (error != EWOULDBLOCK || std::chrono::steady_clock::now() >= deadline) {
      if (error == EWOULDBLOCK)
        spdlog::warn(
            "MPS: {} is still locked after {} s (a run stopped while it starts or quits "
            "the daemon?); going on without it",
            path, patience.count() / 1000.0);
      ::close(fd);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return fd;
}

// Longer than a run that holds a lock may take in the steps it holds it for: the control
// program's `-d` and the wait for the new daemon's answer, or `quit` and the wait for it to go.
std::chrono::milliseconds lock_patience(const MpsOptions& o) {
  return 3 * o.timeout;
}

// The start lock, released when it goes out of scope; nothing where the state dir is not usable.
class StartLock {
 public:
  StartLock(const std::string& dir, const MpsOptions& o)
      : fd_(dir.empty() ? -1 : lock_file(start_lock_path(dir), LOCK_EX, lock_patience(o))) {}
  ~StartLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  StartLock(const StartLock&) = delete;
  StartLock& operator=(const StartLock&) = delete;

 private:
  int fd_ = -1;
};

// The shared lock, taken before looking for a daemon so that a run ending meanwhile sees us; -1
// (and a warning) where it cannot be taken: then a run quits only a daemon it started itself.
int take_users_lock(const std::string& dir, const MpsOptions& o) {
  const int fd = dir.empty() ? -1 : lock_file(users_lock_path(dir), LOCK_SH, lock_patience(o));
  if (fd < 0)
    spdlog::warn(
        "MPS: cannot lock {}.pi0/users.lock: a run that shares this daemon may quit it "
        "under us",
        o.pipe_dir);
  return fd;
}

void require_control_program(const MpsOptions& o) {
  PI0_CHECK(!find_on_path(o.control_program).empty(),
            "MPS: " + o.control_program +
                " not found on PATH (it ships with the NVIDIA driver); pass --no-mps to run "
                "without MPS");
}

}  // namespace

EnvOverrides mps_client_environment(const MpsOptions& o) {
  return {{"CUDA_MPS_PIPE_DIRECTORY", o.pipe_dir}, {"CUDA_MPS_LOG_DIRECTORY", o.log_dir}};
}

bool mps_daemon_answers(const MpsOptions& o) {
  return ask_daemon(o) == DaemonReply::kAnswers;
}

void MpsDaemon::check_can_start_or_adopt(const MpsOptions& o) {
  require_control_program(o);
  if (mps_daemon_answers(o)) return;  // adopted: its directories are not ours to judge
  make_dir(o.pipe_dir);
  make_dir(o.log_dir);
}

MpsDaemon MpsDaemon::start_or_adopt(const MpsOptions& o) {
  require_control_program(o);
  MpsDaemon daemon;
  daemon.options_ = o;
  daemon.state_dir_ = state_dir(o);
  daemon.users_fd_ = take_users_lock(daemon.state_dir_, o);
  const StartLock start_lock(daemon.state_dir_, o);
  if (mps_daemon_answers(o)) {
    daemon.active_ = true;
    spdlog::info("MPS: adopted the control daemon already running on {} (it stays running)",
                 o.pipe_dir);
    return daemon;
  }
  make_dir(o.pipe_dir);
  make_dir(o.log_dir);
  // No daemon answers, so a mark left here is stale (its run was killed, or the daemon quit by
  // other means): the one this start may make is the only one to trust.
  if (!daemon.state_dir_.empty()) ::unlink(started_marker_path(daemon.state_dir_).c_str());
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
  if (!daemon.state_dir_.empty())
    std::ofstream(started_marker_path(daemon.state_dir_)) << ::getpid() << "\n"
                                                          << daemon_pid(o) << "\n";
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
    users_fd_ = std::exchange(other.users_fd_, -1);
    state_dir_ = std::move(other.state_dir_);
  }
  return *this;
}

MpsDaemon::~MpsDaemon() {
  stop();
}

void MpsDaemon::stop() noexcept {
  if (active_) end_use();
  active_ = false;
  if (users_fd_ >= 0) ::close(users_fd_);  // and with it our lock
  users_fd_ = -1;
}

void MpsDaemon::end_use() noexcept {
  // Our shared lock turns exclusive only if no other run holds one (Linux drops ours either way).
  const bool last_user = users_fd_ < 0 || ::flock(users_fd_, LOCK_EX | LOCK_NB) == 0;
  const bool started_by_pi0 =
      started_here_ || (users_fd_ >= 0 && mark_is_current(state_dir_, options_));
  if (!started_by_pi0) return;
  try {
    if (!last_user) {
      spdlog::info(
          "MPS: left the control daemon on {} running: another run uses it, and the last "
          "one quits it",
          options_.pipe_dir);
      return;
    }
    send_command(options_, "quit");
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    bool gone = ask_daemon(options_) == DaemonReply::kGone;
    while (!gone && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      gone = ask_daemon(options_) == DaemonReply::kGone;
    }
    if (!gone) {
      spdlog::warn(
          "MPS: the control daemon on {} still answers after `quit`; stop it with "
          "scripts/stop_mps.sh",
          options_.pipe_dir);
      return;
    }
    if (!state_dir_.empty()) ::unlink(started_marker_path(state_dir_).c_str());
    spdlog::info(started_here_ ? "MPS: stopped the control daemon we started"
                               : "MPS: stopped the control daemon another run started, as its "
                                 "last user");
  } catch (...) {
    // Nothing sensible to do while unwinding; the daemon may outlive us.
  }
}

}  // namespace pi0
