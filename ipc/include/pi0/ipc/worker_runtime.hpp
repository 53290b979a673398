// What every worker process does around its stage: parse the arguments the orchestrator passes,
// die with the orchestrator, open and check the control segment, watch its peers, and report
// readiness, errors and its exit through the rings.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "pi0/config.hpp"
#include "pi0/ipc/control_block.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/stage_timer.hpp"
#include "pi0/weights.hpp"

namespace pi0::ipc {

struct WorkerOptions {
  std::string control_name;
  std::string model = "tiny";
  ModelConfig config;
  RunShape shape;
  std::string backend = "cpu";  // cpu | cuda
  std::string weights_path;     // empty: seeded random weights
  uint64_t weight_seed = 0;
  uint32_t kv_slots = 2;
  uint32_t decoder_batch = 1;     // frames the decoder may decode in one pass
  std::string wait = "adaptive";  // this worker's WaitPolicy: sleep | adaptive | spin
  uint64_t max_frame = 0;
  int parent_pid = 0;
  double startup_timeout_s = 120;
  std::string log_level = "info";
};

// Parses a worker's command line (the orchestrator builds it with worker_arguments()).
// Throws pi0::Error with a one-line message on bad arguments.
WorkerOptions parse_worker_arguments(Role role, int argc, char** argv);
std::vector<std::string> worker_arguments(const WorkerOptions& options);

class WorkerRuntime {
 public:
  // Installs signal handling (SIGTERM/SIGINT/SIGHUP request a stop, SIGPIPE ignored), asks the
  // kernel to send SIGUSR1 when the parent dies (a stop too, and the sign that the control segment
  // may be left to us), and opens the control segment.
  WorkerRuntime(Role role, const WorkerOptions& options);
  ~WorkerRuntime();

  Role role() const { return role_; }
  const WorkerOptions& options() const { return options_; }
  ControlBlock& control() { return control_; }
  WorkerInfo& my_info();

  // False once the orchestrator is gone or a stop signal arrived.
  bool orchestrator_alive() const;
  // False once the other worker (if it has reported its pid) is gone, or orchestrator_alive() is.
  bool peer_alive() const;
  // True once SIGTERM, SIGINT or SIGHUP arrived (the orchestrator's teardown, or a user), not when
  // the orchestrator died: a worker stopped this way exits quietly with status 0.
  bool stop_signalled() const;
  // True once the orchestrator process itself no longer runs (we were re-parented or it exited).
  bool orchestrator_gone() const;

  // Ring to the orchestrator (kEncoderToOrch or kDecoderToOrch).
  SpscRing& to_orchestrator();
  // Records (and logs) what this worker runs on: backend, device, SMs visible, MPS client or not
  // (-1: not applicable).
  void describe(const char* backend, const std::string& device, int sm_count, int mps_client);
  // Writes this stage's per-frame time summary into its info block (read by the orchestrator).
  void record_stage_times(const StageTimes& times);
  void send_ready();
  void send_error(const std::string& what) noexcept;
  void send_stopped() noexcept;
  // Test hook (PI0_TEST_AT_STOP), called by a worker told to stop before it says it stopped:
  // "error" fails it there (an error message to the orchestrator, exit 1), "kill" ends it with
  // SIGKILL, so that the tests see the orchestrator name a worker that fails as it stops. Unset
  // or empty: nothing. Read at construction, so that a bad value fails the start.
  void at_stop_test_hook();

  // Deadline `seconds` from now.
  static Deadline after(double seconds);

 private:
  // From construction to send_ready(): a worker loading (weights, engines, graphs: up to minutes)
  // checks nothing, so this thread ends it if the orchestrator dies meanwhile, and removes the
  // control segment left to it.
  void watch_startup();
  void end_startup_watch() noexcept;

  Role role_;
  WorkerOptions options_;
  ControlBlock control_;
  std::mutex startup_mutex_;
  std::condition_variable startup_cv_;
  bool started_ = false;  // guarded by startup_mutex_
  std::thread startup_watch_;
  std::string at_stop_;  // PI0_TEST_AT_STOP
};

// The weights of one stage: the file given, or seeded random weights. Checks the prompt length.
WeightStore load_stage_weights(const WorkerOptions& options, WeightSet set);

// The body of a worker main: runs `body` and turns exceptions into a kError message, a log line
// and exit code 1. If the orchestrator is gone, removes the control segment it left.
int run_worker_main(Role role, int argc, char** argv, int (*body)(WorkerRuntime& runtime));

}  // namespace pi0::ipc
