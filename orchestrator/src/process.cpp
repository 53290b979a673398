#include "pi0/process.hpp"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "pi0/check.hpp"
#include "pi0/proc_state.hpp"

extern char** environ;

namespace pi0 {
namespace {

constexpr size_t kKeptLines = 20;
constexpr size_t kKeptBytes = size_t{1} << 20;

ExitStatus decode_wait_status(int status) {
  ExitStatus s;
  if (WIFSIGNALED(status)) {
    s.signaled = true;
    s.signal = WTERMSIG(status);
  } else {
    s.code = WEXITSTATUS(status);
  }
  return s;
}

// waitpid's ECHILD for a child we started: it has exited and another reaped it (the kernel does,
// where SIGCHLD is ignored).
ExitStatus lost_status() {
  ExitStatus s;
  s.lost = true;
  return s;
}

std::vector<std::string> build_environment(const EnvOverrides& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry(*e);
    const std::string key = entry.substr(0, entry.find('='));
    if (overrides.count(key) == 0) env.push_back(entry);
  }
  for (const auto& [key, value] : overrides) {
    if (value) env.push_back(key + "=" + *value);
  }
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// posix_spawn with stdin from `stdin_fd` (or /dev/null) and stdout+stderr into `out_fd`, in a
// new process group, with default signal dispositions and an empty signal mask.
pid_t spawn_with_pipes(const std::string& path, std::vector<std::string> argv_strings,
                       const EnvOverrides& env, int stdin_fd, int out_fd, bool search_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (stdin_fd >= 0) {
    posix_spawn_file_actions_adddup2(&actions, stdin_fd, 0);
  } else {
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
  posix_spawn_file_actions_adddup2(&actions, out_fd, 2);

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t empty, defaults;
  sigemptyset(&empty);
  posix_spawnattr_setsigmask(&attr, &empty);
  sigemptyset(&defaults);
  for (int sig : {SIGINT, SIGTERM, SIGPIPE, SIGCHLD, SIGHUP, SIGQUIT}) sigaddset(&defaults, sig);
  posix_spawnattr_setsigdefault(&attr, &defaults);

  std::vector<std::string> env_strings = build_environment(env);
  std::vector<char*> argv = c_strings(argv_strings);
  std::vector<char*> envp = c_strings(env_strings);
  pid_t pid = -1;
  const int rc = search_path
                     ? posix_spawnp(&pid, path.c_str(), &actions, &attr, argv.data(), envp.data())
                     : posix_spawn(&pid, path.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    throw Error("cannot start " + argv_strings.front() + " (" + path + "): " + std::strerror(rc));
  }
  return pid;
}

}  // namespace

std::string ExitStatus::describe() const {
  if (lost) return "exited with a status nobody could read (SIGCHLD was ignored)";
  if (!signaled) return "exited with status " + std::to_string(code);
  const char* abbrev = sigabbrev_np(signal);
  return "killed by signal " + std::to_string(signal) +
         (abbrev ? std::string(" (SIG") + abbrev + ")" : std::string());
}

struct ChildProcess::State {
  std::string name;
  pid_t pid = -1;
  std::optional<ExitStatus> status;
  int out_fd = -1;
  bool forward = false;
  std::atomic<bool> stop_reader{false};
  std::atomic<bool> output_closed{false};
  std::thread reader;
  mutable std::mutex mu;
  std::deque<std::string> last;
  std::string all;
  std::string partial;

  void take_line(const std::string& line) {
    if (forward) {
      std::fprintf(stderr, "%s\n", line.c_str());
      std::fflush(stderr);
    }
    std::lock_guard lock(mu);
    last.push_back(line);
    if (last.size() > kKeptLines) last.pop_front();
    if (all.size() < kKeptBytes) all += line + "\n";
  }

  void read_loop() {
    char buf[4096];
    for (;;) {
      pollfd p{out_fd, POLLIN, 0};
      const int ready = ::poll(&p, 1, 100);
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) {
        if (stop_reader.load()) break;
        continue;
      }
      const ssize_t n = ::read(out_fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      partial.append(buf, static_cast<size_t>(n));
      size_t pos;
      while ((pos = partial.find('\n')) != std::string::npos) {
        take_line(partial.substr(0, pos));
        partial.erase(0, pos + 1);
      }
    }
    if (!partial.empty()) take_line(partial);
    partial.clear();
    output_closed.store(true);
  }
};

ChildProcess ChildProcess::spawn(const std::string& name, const std::string& path,
                                 const std::vector<std::string>& args, const EnvOverrides& env,
                                 bool forward_output) {
  int fds[2];
  PI0_CHECK(::pipe2(fds, O_CLOEXEC) == 0, std::string("pipe: ") + std::strerror(errno));
  std::vector<std::string> argv{name};
  argv.insert(argv.end(), args.begin(), args.end());
  pid_t pid;
  try {
    pid = spawn_with_pipes(path, argv, env, -1, fds[1], false);
  } catch (...) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw;
  }
  ::close(fds[1]);
  ChildProcess child;
  child.state_ = std::make_unique<State>();
  State& s = *child.state_;
  s.name = name;
  s.pid = pid;
  s.out_fd = fds[0];
  s.forward = forward_output;
  s.reader = std::thread([&s] { s.read_loop(); });
  return child;
}

ChildProcess::ChildProcess() = default;
ChildProcess::ChildProcess(ChildProcess&&) noexcept = default;
ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (state_) terminate(std::chrono::milliseconds(1000));
    state_ = std::move(other.state_);
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (state_) terminate(std::chrono::milliseconds(1000));
}

const std::string& ChildProcess::name() const {
  return state_->name;
}
int ChildProcess::pid() const {
  return state_ ? state_->pid : -1;
}

std::optional<ExitStatus> ChildProcess::poll() {
  if (!state_) return std::nullopt;
  if (state_->status) return state_->status;
  int status = 0;
  const pid_t r = ::waitpid(state_->pid, &status, WNOHANG);
  if (r == state_->pid) {
    state_->status = decode_wait_status(status);
  } else if (r < 0 && errno == ECHILD) {
    state_->status = lost_status();  // gone: its pid must never be signalled again
  }
  return state_->status;
}

bool ChildProcess::running() {
  return state_ && !poll().has_value();
}

std::optional<ExitStatus> ChildProcess::wait_for(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (auto s = poll()) {
      // Its last lines may still be in the pipe: callers read output() next. Bounded, since a
      // process it started could still hold the pipe open.
      wait_output_closed(std::chrono::milliseconds(200));
      return s;
    }
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

ExitStatus ChildProcess::terminate(std::chrono::milliseconds grace) noexcept {
  ExitStatus result;
  if (!state_) return result;
  if (!poll()) {
    ::kill(state_->pid, SIGTERM);
    if (!wait_for(grace)) {
      ::kill(state_->pid, SIGKILL);
      // Bounded: a process stuck in the kernel (a driver call) outlives even SIGKILL for a while.
      constexpr auto kKillWait = std::chrono::seconds(10);
      if (!wait_for(std::chrono::duration_cast<std::chrono::milliseconds>(kKillWait))) {
        std::fprintf(stderr,
                     "%s (pid %d) did not exit within %lld s of SIGKILL (stuck in the kernel or "
                     "a driver call); it is left behind\n",
                     state_->name.c_str(), static_cast<int>(state_->pid),
                     static_cast<long long>(kKillWait.count()));
        ExitStatus killed;
        killed.signaled = true;
        killed.signal = SIGKILL;
        state_->status = killed;
      }
    }
  }
  state_->stop_reader.store(true);
  if (state_->reader.joinable()) state_->reader.join();
  if (state_->out_fd >= 0) {
    ::close(state_->out_fd);
    state_->out_fd = -1;
  }
  return *state_->status;
}

bool ChildProcess::wait_output_closed(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (state_ && !state_->output_closed.load()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

std::vector<std::string> ChildProcess::last_lines() const {
  std::lock_guard lock(state_->mu);
  return {state_->last.begin(), state_->last.end()};
}

std::string ChildProcess::output() const {
  std::lock_guard lock(state_->mu);
  return state_->all;
}

CommandResult run_command(const std::string& program, const std::vector<std::string>& args,
                          const EnvOverrides& env, const std::string& input,
                          std::chrono::milliseconds timeout) {
  int in_fds[2], out_fds[2];
  PI0_CHECK(::pipe2(in_fds, O_CLOEXEC) == 0 && ::pipe2(out_fds, O_CLOEXEC) == 0,
            std::string("pipe: ") + std::strerror(errno));
  std::vector<std::string> argv{program};
  argv.insert(argv.end(), args.begin(), args.end());
  pid_t pid;
  try {
    pid = spawn_with_pipes(program, argv, env, in_fds[0], out_fds[1], true);
  } catch (...) {
    for (int fd : {in_fds[0], in_fds[1], out_fds[0], out_fds[1]}) ::close(fd);
    throw;
  }
  ::close(in_fds[0]);
  ::close(out_fds[1]);
  // Inputs are a few bytes: a pipe buffer takes them without blocking. A program that exits
  // without reading them (the MPS control client does when no daemon runs) must not kill us with
  // SIGPIPE: block it for this thread around the write and discard it if it was raised.
  if (!input.empty()) {
    sigset_t pipe_only, previous;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_only, &previous);
    [[maybe_unused]] const ssize_t w = ::write(in_fds[1], input.data(), input.size());
    sigset_t pending;
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE) && !sigismember(&previous, SIGPIPE)) {
      const timespec zero{0, 0};
      sigtimedwait(&pipe_only, nullptr, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }
  ::close(in_fds[1]);

  CommandResult result;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    pollfd p{out_fds[0], POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::min<long>(left.count(), 100)));
    if (ready <= 0) continue;
    const ssize_t n = ::read(out_fds[0], buf, sizeof buf);
    if (n <= 0) break;
    result.output.append(buf, static_cast<size_t>(n));
  }
  ::close(out_fds[0]);
  int status = 0;
  if (!result.timed_out) {
    // The output closed: the program is exiting; give it the rest of the deadline.
    while (std::chrono::steady_clock::now() < deadline) {
      const pid_t r = ::waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        result.status = decode_wait_status(status);
        return result;
      }
      if (r < 0 && errno == ECHILD) {
        result.status = lost_status();
        return result;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    result.timed_out = true;
    ::kill(pid, SIGKILL);
  }
  pid_t r = 0;
  while ((r = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
  result.status = r == pid ? decode_wait_status(status) : lost_status();
  return result;
}

std::string process_state(int pid) {
  const char state = proc_state(pid);
  switch (state) {
    case '\0':
      return {};
    case 'R':
      return "running";
    case 'S':
      return "sleeping";
    case 'D':
      return "in an uninterruptible wait (a driver call)";
    case 'T':
      return "stopped by a signal";
    case 't':
      return "stopped by a tracer";
    case 'Z':
      return "exited, not yet reaped";
    default:
      return std::string("in state ") + state;
  }
}

std::string find_on_path(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    return ::access(program.c_str(), X_OK) == 0 ? program : std::string();
  }
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + program;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return {};
}

std::string executable_dir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  PI0_CHECK(n > 0, "cannot read /proc/self/exe");
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

}  // namespace pi0
