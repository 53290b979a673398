// Child processes with move-only owners: spawned with an explicit environment in their own
// process group (so a terminal's Ctrl-C reaches only the orchestrator, which then drains them),
// their output forwarded line by line and the last lines kept for error reports; a child still
// running when its owner goes away is terminated and reaped.
#pragma once

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace pi0 {

struct ExitStatus {
  bool signaled = false;
  int code = 0;       // exit code when !signaled
  int signal = 0;     // signal number when signaled
  bool lost = false;  // it exited, but another reaped it (SIGCHLD ignored): the status is unknown
  bool success() const { return !signaled && !lost && code == 0; }
  std::string describe() const;  // "exited with status 1", "killed by signal 9 (SIGKILL)"
};

// The environment a child gets: ours, with these variables set (or removed when the value is
// std::nullopt).
using EnvOverrides = std::map<std::string, std::optional<std::string>>;

class ChildProcess {
 public:
  // Starts `path` with `args` (argv[0] is `name`). Output (stdout and stderr) goes through a pipe;
  // if `forward_output`, each line is copied to our stderr. Throws pi0::Error if it cannot start.
  static ChildProcess spawn(const std::string& name, const std::string& path,
                            const std::vector<std::string>& args, const EnvOverrides& env,
                            bool forward_output);

  ChildProcess();
  ChildProcess(ChildProcess&&) noexcept;
  ChildProcess& operator=(ChildProcess&&) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();  // terminate(1 s) if still running

  const std::string& name() const;
  int pid() const;
  bool running();
  // Reaps without blocking; the status once it has exited.
  std::optional<ExitStatus> poll();
  // Up to `timeout` for it to exit; then up to 200 ms more for its last output to be read.
  std::optional<ExitStatus> wait_for(std::chrono::milliseconds timeout);
  // SIGTERM, up to `grace` to exit, then SIGKILL; always reaps. Never throws.
  ExitStatus terminate(std::chrono::milliseconds grace) noexcept;
  // Waits (at most `timeout`) until everything the exited child wrote has been read, so that
  // last_lines() is complete. True if the output reached its end.
  bool wait_output_closed(std::chrono::milliseconds timeout);
  // The last lines it printed (at most 20), oldest first.
  std::vector<std::string> last_lines() const;
  // Everything it printed so far (kept up to 1 MiB).
  std::string output() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

struct CommandResult {
  ExitStatus status;
  std::string output;
  bool timed_out = false;
};

// Runs a command to completion (PATH lookup), feeding `input` on its stdin, within `timeout`
// (killed after it). Throws pi0::Error only if it cannot start (e.g. not found).
CommandResult run_command(const std::string& program, const std::vector<std::string>& args,
                          const EnvOverrides& env, const std::string& input,
                          std::chrono::milliseconds timeout);

// What the kernel says a live process is doing, in words ("running", "sleeping", "stopped by a
// signal", "in an uninterruptible wait (a driver call)", ...), from /proc/<pid>/stat; empty if
// it cannot be read (gone, or no /proc). For naming which worker hangs.
std::string process_state(int pid);

// Absolute path of a program on PATH, or empty.
std::string find_on_path(const std::string& program);
// Directory of the running executable (/proc/self/exe).
std::string executable_dir();

}  // namespace pi0
