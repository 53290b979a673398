#include "pi0/ipc/worker_runtime.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/log.hpp"
#include "pi0/proc_state.hpp"

namespace pi0::ipc {
namespace {

std::atomic<bool> g_stop_signal{false};
// Our death signal (PR_SET_PDEATHSIG) came: the orchestrator's thread that spawned us exited.
std::atomic<bool> g_parent_died{false};
// The orchestrator's pid when we started as its child (0 otherwise, e.g. under a wrapper that
// did not exec): only then does a different parent pid mean it is gone.
std::atomic<int> g_spawned_by{0};
static_assert(std::atomic<bool>::is_always_lock_free && std::atomic<int>::is_always_lock_free,
              "set from signal handlers");

void on_stop_signal(int) {
  g_stop_signal.store(true);
}

void on_parent_death(int) {
  g_parent_died.store(true);
  g_stop_signal.store(true);
}

void install_handler(int signal, void (*handler)(int)) {
  struct sigaction action {};
  action.sa_handler = handler;
  sigemptyset(&action.sa_mask);
  ::sigaction(signal, &action, nullptr);
}

void note_parent(int parent_pid) {
  if (::getppid() == parent_pid) g_spawned_by.store(parent_pid);
}

// A peer worker counts as alive until the orchestrator reaps it, so that the orchestrator, which
// reaps it, is the one that names it (and how it died) rather than the surviving worker.
bool process_alive(int pid) {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

// The orchestrator is gone once it is a zombie: nobody reaps it while we watch, and a killed
// orchestrator's main thread is one while its other threads still exit. (So the orchestrator
// must not end its main thread on its own while other threads run.)
bool process_running(int pid) {
  if (!process_alive(pid)) return false;
  const char state = proc_state(pid);
  return state != 'Z' && state != 'X';  // no /proc to ask ('\0'): trust kill()
}

// Cheap enough for the wait loops' peer checks (no /proc read); the death signal covers a killed
// orchestrator there.
bool orchestrator_gone(int parent_pid) {
  if (g_spawned_by.load() == parent_pid)
    return ::getppid() != parent_pid || !process_alive(parent_pid);
  // Under a wrapper the death signal is the wrapper's, and kill() calls a zombie alive: one that
  // nobody reaps (its parent busy, or stopped) would keep us running. /proc tells (~10 us, at the
  // waits' 10 ms peer checks).
  return !process_running(parent_pid);
}

// Also counts a zombie as gone: for deciding whether the control segment is left to us.
bool orchestrator_dead(int parent_pid) {
  return orchestrator_gone(parent_pid) || !process_running(parent_pid);
}

// Whether the control segment is ours to remove: its orchestrator is gone. The kernel sends the
// death signal as the orchestrator's spawning thread exits, a moment before the process is gone,
// so after the death signal look again for a short while.
bool segment_orphaned(int parent_pid) {
  if (orchestrator_dead(parent_pid)) return true;
  if (!g_parent_died.load()) return false;
  for (int i = 0; i < 25; ++i) {
    ::usleep(2000);
    if (orchestrator_dead(parent_pid)) return true;
  }
  return false;
}

// With the orchestrator gone nobody else is left to remove its control segment, nor the file the
// CUDA driver keeps for our interprocess events (the orchestrator removes it once it reaps us).
void remove_segment_if_orphaned(const std::string& control_name, int parent_pid) {
  if (control_name.empty() || parent_pid <= 0 || !segment_orphaned(parent_pid)) return;
  if (SharedSegment::remove(control_name)) {
    spdlog::warn("orchestrator (pid {}) is gone; removed its control segment", parent_pid);
  }
  for (const std::string& name : remove_own_cuda_event_files())
    spdlog::warn("orchestrator (pid {}) is gone; removed /dev/shm/{}", parent_pid, name);
}

// Test hook (PI0_TEST_CUDA_EVENT_FILE_STAND_IN=1): the CPU backend makes no CUDA driver files,
// so a stand-in is made and recorded the way the CUDA encoder records the driver's, and the
// tests of their removal run without a GPU.
void make_event_file_stand_in(WorkerInfo& info) {
  const CudaEventFileWatch watch;
  char path[64];
  std::snprintf(path, sizeof path, "/dev/shm/cuda.shm.0.%x.1", static_cast<unsigned>(::getpid()));
  const int fd = ::open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  PI0_CHECK(fd >= 0, std::string("cannot make ") + path + ": " + std::strerror(errno));
  ::close(fd);
  watch.record(info.event_files);
}

}  // namespace

std::vector<std::string> worker_arguments(const WorkerOptions& o) {
  // One flag and its value per line.
  // clang-format off
  std::vector<std::string> args = {
      "--control",         o.control_name,
      "--model",           o.model,
      "--views",           std::to_string(o.shape.views),
      "--chunk",           std::to_string(o.shape.chunk),
      "--prompt-len",      std::to_string(o.shape.prompt_len),
      "--backend",         o.backend,
      "--weights",         o.weights_path,
      "--seed",            std::to_string(o.weight_seed),
      "--slots",           std::to_string(o.kv_slots),
      "--decoder-batch",   std::to_string(o.decoder_batch),
      "--max-frame",       std::to_string(o.max_frame),
      "--parent-pid",      std::to_string(o.parent_pid),
      "--startup-timeout", std::to_string(o.startup_timeout_s),
      "--log-level",       o.log_level};
  // clang-format on
  args.push_back("--wait");
  args.push_back(o.wait);
  return args;
}

WorkerOptions parse_worker_arguments(Role role, int argc, char** argv) {
  WorkerOptions o;
  CLI::App app{std::string(role_name(role)) +
               " worker of pi0-mps (started by the orchestrator, not by hand)"};
  app.add_option("--control", o.control_name, "control segment name")->required();
  app.add_option("--model", o.model)->required();
  app.add_option("--views", o.shape.views)->required();
  app.add_option("--chunk", o.shape.chunk)->required();
  app.add_option("--prompt-len", o.shape.prompt_len)->required();
  app.add_option("--backend", o.backend)->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--weights", o.weights_path);
  app.add_option("--seed", o.weight_seed);
  app.add_option("--slots", o.kv_slots)->check(CLI::Range(1u, kMaxKvSlots));
  app.add_option("--decoder-batch", o.decoder_batch)->check(CLI::Range(1u, 4u));
  app.add_option("--max-frame", o.max_frame)->required();
  app.add_option("--parent-pid", o.parent_pid)->required();
  app.add_option("--startup-timeout", o.startup_timeout_s);
  app.add_option("--log-level", o.log_level);
  app.add_option("--wait", o.wait)->check(CLI::IsMember({"sleep", "adaptive", "spin"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    throw Error(std::string(role_name(role)) +
                ": started by the orchestrator, which passes its arguments; see orchestrator "
                "--help");
  } catch (const CLI::ParseError& e) {
    throw Error(std::string(role_name(role)) + ": bad arguments: " + e.what());
  }
  o.config = model_config(o.model);
  o.shape.validate();
  return o;
}

WorkerRuntime::WorkerRuntime(Role role, const WorkerOptions& options)
    : role_(role), options_(options) {
  install_handler(SIGTERM, on_stop_signal);
  install_handler(SIGINT, on_stop_signal);
  // The kernel sends SIGHUP, then SIGCONT, to a stopped worker whose orchestrator dies (its
  // process group is orphaned then): by default SIGHUP would end it there, leaving the control
  // segment and its own event files, which it removes as it exits when it hears of the death.
  install_handler(SIGHUP, on_stop_signal);
  ::signal(SIGPIPE, SIG_IGN);
  // The kernel tells us when the orchestrator dies, with a signal of its own so that a stop the
  // orchestrator asks for (SIGTERM) is told apart; the check after it closes the race where it
  // died before prctl took effect.
  install_handler(SIGUSR1, on_parent_death);
  note_parent(options.parent_pid);
  ::prctl(PR_SET_PDEATHSIG, SIGUSR1);
  PI0_CHECK(!g_stop_signal.load() && !orchestrator_dead(options.parent_pid),
            "the orchestrator (pid " + std::to_string(options.parent_pid) + ") is not running");
  set_wait_policy(parse_wait_policy(options.wait));
  spdlog::info("waits for messages: {}", wait_policy_name(wait_policy()));
  const bool host_kv = options.backend == "cpu";
  control_ = ControlBlock::open(
      options.control_name,
      compute_layout(options.config, options.shape, options.kv_slots, options.max_frame, host_kv));
  WorkerInfo& info = my_info();
  // The other worker reads it concurrently (peer_alive): an atomic store, as WorkerInfo must stay
  // trivially copyable.
  std::atomic_ref<int32_t>(info.pid).store(static_cast<int32_t>(::getpid()),
                                           std::memory_order_release);
  info.mps_client = -1;
  info.active_thread_pct = -1;
  if (const char* pct = std::getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")) {
    info.active_thread_pct = std::atoi(pct);
  }
  if (env_switch("PI0_TEST_CUDA_EVENT_FILE_STAND_IN", false)) make_event_file_stand_in(info);
  if (const char* at_stop = std::getenv("PI0_TEST_AT_STOP")) at_stop_ = at_stop;
  PI0_CHECK(at_stop_.empty() || at_stop_ == "error" || at_stop_ == "kill",
            "PI0_TEST_AT_STOP must be error or kill, not '" + at_stop_ + "'");
  startup_watch_ = std::thread([this] { watch_startup(); });
}

WorkerRuntime::~WorkerRuntime() {
  end_startup_watch();
}

void WorkerRuntime::watch_startup() {
  std::unique_lock lock(startup_mutex_);
  while (!startup_cv_.wait_for(lock, std::chrono::milliseconds(50), [this] { return started_; })) {
    // Told to stop (SIGTERM, SIGINT, SIGHUP) while loading, which can take tens of seconds and
    // has no way out: stop now, as the run's loops would, rather than load, report ready and then
    // stop. (The death signal sets g_parent_died before g_stop_signal; the SIGHUP a stopped worker
    // gets when its orchestrator dies can come before the death signal, so the orchestrator is
    // asked too: a stop with it gone is its death.)
    if (g_stop_signal.load() && !g_parent_died.load() &&
        !ipc::orchestrator_gone(options_.parent_pid)) {
      spdlog::info("stop signalled while loading; exiting");
      spdlog::default_logger()->flush();
      ::_exit(0);
    }
    if (!g_parent_died.load() && !ipc::orchestrator_gone(options_.parent_pid)) continue;
    spdlog::warn("the orchestrator (pid {}) died while this worker was starting; exiting",
                 options_.parent_pid);
    remove_segment_if_orphaned(options_.control_name, options_.parent_pid);
    spdlog::default_logger()->flush();
    // The main thread is somewhere in loading, which has no way out: end the process here.
    ::_exit(1);
  }
}

void WorkerRuntime::end_startup_watch() noexcept {
  {
    const std::lock_guard lock(startup_mutex_);
    started_ = true;
  }
  startup_cv_.notify_all();
  if (startup_watch_.joinable()) startup_watch_.join();
}

WorkerInfo& WorkerRuntime::my_info() {
  return role_ == Role::kEncoder ? control_.header().encoder : control_.header().decoder;
}

bool WorkerRuntime::stop_signalled() const {
  return g_stop_signal.load() && !g_parent_died.load();
}

bool WorkerRuntime::orchestrator_gone() const {
  return ipc::orchestrator_gone(options_.parent_pid);
}

bool WorkerRuntime::orchestrator_alive() const {
  return !g_stop_signal.load() && !orchestrator_gone();
}

bool WorkerRuntime::peer_alive() const {
  if (!orchestrator_alive()) return false;
  ControlHeader& h = control_.header();
  int32_t& peer_pid = role_ == Role::kEncoder ? h.decoder.pid : h.encoder.pid;
  const int32_t peer = std::atomic_ref<int32_t>(peer_pid).load(std::memory_order_acquire);
  return peer == 0 || process_alive(peer);
}

SpscRing& WorkerRuntime::to_orchestrator() {
  return control_.ring(role_ == Role::kEncoder ? RingId::kEncoderToOrch : RingId::kDecoderToOrch);
}

Deadline WorkerRuntime::after(double seconds) {
  // The cast below is undefined past the clock's range (or for NaN): a wait of more than ~30
  // years is no deadline at all, and a negative one is due now.
  constexpr double kNoDeadline = 1e9;
  if (!(seconds < kNoDeadline)) return Deadline::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(std::max(seconds, 0.0)));
}

void WorkerRuntime::describe(const char* backend, const std::string& device, int sm_count,
                             int mps_client) {
  WorkerInfo& info = my_info();
  info.sm_count = sm_count;
  info.mps_client = mps_client;
  std::snprintf(info.backend, sizeof info.backend, "%s", backend);
  std::snprintf(info.device_name, sizeof info.device_name, "%s", device.c_str());
  if (mps_client >= 0) {
    spdlog::info("{}: {} SMs visible, MPS client: {}, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={}", device,
                 sm_count, mps_client ? "yes" : "no", info.active_thread_pct);
  }
}

void WorkerRuntime::record_stage_times(const StageTimes& times) {
  WorkerInfo& info = my_info();
  info.stage_ms_median = times.median();
  info.stage_ms_mean = times.mean();
  info.frames = times.count();
}

void WorkerRuntime::send_ready() {
  end_startup_watch();  // from here the run's loops watch the orchestrator
  // A stop that came as the load ended: no "ready" for a worker about to stop (the run's loop
  // sees the stop first thing).
  if (stop_signalled()) return;
  Message m = make_message(MsgType::kWorkerReady, role_);
  const WaitStatus s = to_orchestrator().push(m, after(options_.startup_timeout_s),
                                              [this] { return orchestrator_alive(); });
  PI0_CHECK(s == WaitStatus::kOk,
            std::string("could not report ready to the orchestrator: ") + wait_status_name(s));
}

void WorkerRuntime::send_error(const std::string& what) noexcept {
  Message m = make_message(MsgType::kError, role_);
  m.code = 1;
  set_text(m, what);
  // The whole text, before the message that publishes it (see ErrorText).
  set_error_text(control_.error_area(role_), what);
  to_orchestrator().push(m, after(1.0), [this] { return orchestrator_alive(); });
}

void WorkerRuntime::send_stopped() noexcept {
  Message m = make_message(MsgType::kStopped, role_);
  to_orchestrator().push(m, after(5.0), [this] { return orchestrator_alive(); });
}

void WorkerRuntime::at_stop_test_hook() {
  if (at_stop_ == "kill") {
    spdlog::warn("told to stop: killing itself (PI0_TEST_AT_STOP=kill)");
    spdlog::default_logger()->flush();
    ::raise(SIGKILL);
  }
  PI0_CHECK(at_stop_ != "error", "told to stop: failing (PI0_TEST_AT_STOP=error)");
}

WeightStore load_stage_weights(const WorkerOptions& o, WeightSet set) {
  // Tests stand in for a slow load with this (pi0's weights take tens of seconds on a GPU).
  std::this_thread::sleep_for(
      std::chrono::milliseconds(env_integer("PI0_TEST_LOAD_DELAY_MS", 0, 60000, 0)));
  if (o.weights_path.empty()) {
    return WeightStore::random(o.config, o.shape.prompt_len, o.weight_seed, set);
  }
  WeightStore store = WeightStore::load_safetensors(o.weights_path, o.config, set);
  if (set != WeightSet::kDecoder) {
    PI0_CHECK(store.prompt_len() == o.shape.prompt_len,
              "weights file " + o.weights_path + " holds " + std::to_string(store.prompt_len()) +
                  " prompt tokens (language_embeds) but the run asks for " +
                  std::to_string(o.shape.prompt_len));
  }
  return store;
}

int run_worker_main(Role role, int argc, char** argv, int (*body)(WorkerRuntime& runtime)) {
  std::string level = "info";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--log-level") level = argv[i + 1];
  }
  try {
    init_logging(role_name(role), is_valid_log_level(level) ? level : "info");
  } catch (...) {
    return 1;
  }
  std::string control_name;
  int parent = 0;
  const auto remove_if_orphaned = [&] { remove_segment_if_orphaned(control_name, parent); };
  try {
    const WorkerOptions options = parse_worker_arguments(role, argc, argv);
    control_name = options.control_name;
    parent = options.parent_pid;
    note_parent(parent);
    std::unique_ptr<WorkerRuntime> runtime;
    try {
      runtime = std::make_unique<WorkerRuntime>(role, options);
    } catch (const std::exception& e) {
      spdlog::error("{}", e.what());
      remove_if_orphaned();
      return 1;
    }
    try {
      const int rc = body(*runtime);
      remove_if_orphaned();
      return rc;
    } catch (const std::exception& e) {
      spdlog::error("{}", e.what());
      runtime->send_error(e.what());
      remove_if_orphaned();
      return 1;
    }
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    remove_if_orphaned();
    return 1;
  }
}

}  // namespace pi0::ipc
