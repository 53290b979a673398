// The orchestrator as library code: command line, one pipeline run (start or adopt MPS, spawn the
// two workers, feed frames, collect actions, supervise, shut down), the split sweep, and reports.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/ipc/control_block.hpp"
#include "pi0/mps.hpp"

namespace pi0 {

struct RunOptions {
  std::string backend = "auto";  // auto | cuda | cpu
  std::string model = "auto";    // auto | pi0 | tiny | pi0-1l | pi0-2l
  std::string weights;           // .safetensors; empty: seeded random weights
  int views = 2;
  int chunk = 63;
  std::optional<int> prompt_len;  // default: from the weights file, else 0
  int encoder_pct = 50;
  int decoder_pct = 50;
  std::string mode = "concurrent";  // sequential | concurrent
  uint64_t frames = 200;
  uint64_t warmup = 10;
  uint32_t slots = 2;          // 2, or 2 x decoder_batch when --slots is not given
  bool slots_given = false;    // --slots was on the command line
  uint32_t decoder_batch = 1;  // frames the decoder may decode in one pass (cuda backend)
  // How the orchestrator and workers wait for a message: sleep | adaptive | spin (ipc/ring.hpp).
  std::string wait = "adaptive";
  uint64_t seed = 0;
  double rate_hz = 0;  // 0: back to back; else frames arrive at this camera rate (open loop)
  bool no_mps = false;
  MpsOptions mps;
  std::string gpu;  // CUDA_VISIBLE_DEVICES for the workers; empty: inherit (default "0")
  std::string json_path;
  std::string actions_path;  // raw little-endian f32, [warmup + frames][chunk][action_dim]
  std::string log_level = "info";
  double startup_timeout_s = 300;
  double frame_timeout_s = 60;
  // A whole run, worker start included; 0: no limit. Unset (< 0): no limit, except that a sweep
  // gives each of its runs sweep_run_timeout_s().
  double run_timeout_s = -1;
  std::string worker_dir;  // where encoder_worker and decoder_worker are; default: ours
  bool quiet_workers = false;
  // Split sweep.
  bool sweep = false;
  int sweep_step = 10;
  int sweep_min = 10;
  int sweep_max = 90;
  double latency_budget_ms = 0;
  std::string plot_path;
  bool baselines = true;
};

// Parses argv. Returns nullopt and sets exit_code when the program should exit now (--help, or
// a bad value, reported on stderr in one line).
std::optional<RunOptions> parse_command_line(int argc, char** argv, int& exit_code);

// The run after `auto` values are resolved.
struct ResolvedRun {
  RunOptions options;
  std::string backend;  // cuda | cpu
  ModelConfig config;
  RunShape shape;
  std::string note;  // one line on how backend and model were chosen
  // The device the workers get first (--gpu's first entry where it is a number, else 0), as this
  // process numbers them: the one whose SM count judges their split.
  int gpu_ordinal = 0;
};
ResolvedRun resolve(const RunOptions& options);  // throws pi0::Error (one line)

struct WorkerSummary {
  int pid = 0;
  int sm_count = 0;
  int mps_client = -1;
  int active_thread_pct = -1;
  double weight_gib = 0;
  double device_gib = 0;
  double stage_ms_median = 0;
  double stage_ms_mean = 0;
  std::string backend;
  std::string device;
};

struct RunReport {
  std::string label;  // e.g. "split 40/60" or "single-process"
  std::string backend, model, mode;
  int views = 0, chunk = 0, prompt_len = 0;
  uint32_t slots = 0, decoder_batch = 1;
  std::string wait;  // the wait policy
  int encoder_pct = 0, decoder_pct = 0;
  bool mps = false;            // workers were started under MPS
  bool split_applied = false;  // both workers are MPS clients with the SM share asked for
  std::string split_note;
  int device_sms = 0;
  uint64_t frames = 0;
  double rate_hz = 0;
  double latency_p50_ms = 0, latency_p99_ms = 0, latency_max_ms = 0, latency_mean_ms = 0;
  double throughput_fps = 0;
  // Single-process baseline only: the same inferences timed host to host (inputs uploaded from
  // pinned memory, actions read back), which is how the pipeline's latency is measured.
  double host_to_host_p50_ms = 0, host_to_host_p99_ms = 0;
  double handoff_us_median = -1;
  double wall_s = 0;
  bool interrupted = false;
  // Why this run failed: in a sweep, a run that could not happen; in any run, a worker that failed
  // as the workers were stopped after every frame had finished (it could not be told to stop,
  // died, reported an error or did not stop within the stop deadline, or exited badly after it
  // stopped): the figures stand. Empty when all went well.
  std::string error;
  WorkerSummary encoder, decoder;
};

// Raised when a worker dies or reports an error: its one-line message names the worker.
class WorkerFailure : public Error {
 public:
  using Error::Error;
};

// One pipeline run at one split. `mps` is the daemon to use (nullptr: workers run without MPS).
// If `actions` is given it receives every frame's actions, warm-up included, in frame order.
RunReport run_pipeline(const ResolvedRun& run, const MpsDaemon* mps, int encoder_pct,
                       int decoder_pct, const std::string& mode, std::vector<float>* actions);

// The seed of frame inputs for a run seed (weights use the run seed itself), and the number of
// distinct synthetic input sets the orchestrator cycles through (frame n uses set n % count).
uint64_t input_seed(uint64_t run_seed);
inline constexpr uint64_t kDistinctInputs = 16;

void print_report(const RunReport& report);
// One run's figures as a JSON object (shared by report_json and the sweep's JSON).
nlohmann::json report_to_json(const RunReport& report);
std::string report_json(const std::vector<RunReport>& reports);
// A results document as the file's text (report_json, the sweep's JSON).
std::string json_text(const nlohmann::json& document);

// Installs SIGINT/SIGTERM handlers that make running pipelines drain and stop.
void install_stop_handlers();
// The signal that asked us to stop, or 0.
int stop_signal();

// The whole program: returns the process exit code.
int orchestrator_main(int argc, char** argv);

}  // namespace pi0
