#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include <unistd.h>

#include "pi0/check.hpp"
#include "pi0/command_line.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/log.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/weights.hpp"

namespace pi0 {

namespace {

// CLI11 converts an unsigned option with strtoull, which takes "-1" as 2^64 - 1,
// "-18446744073709551615" as 1 and 2^64 as 2^64 - 1, and CLI::Range sees only the converted
// value: every unsigned option is checked to be written without a sign, and to fit, first.
CLI::Validator unsigned_number() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        const size_t first = input.find_first_not_of(" \t");
        if (first != std::string::npos && (input[first] == '-' || input[first] == '+'))
          return "expected a number without a sign, got '" + input + "'";
        errno = 0;
        (void)std::strtoull(input.c_str(), nullptr, 0);
        if (errno == ERANGE) return "'" + input + "' is beyond 2^64 - 1";
        return {};
      },
      "UNSIGNED");
}

// An integer option, read as decimal.
template <typename T>
CLI::Option* add_integer_option(CLI::App& app, const std::string& name, T& value,
                                const std::string& description) {
  return app.add_option(name, value, description)->transform(decimal_integer());
}

// The slowest camera rate --rate takes (0 means back to back): one frame every 100 s.
constexpr double kMinRateHz = 0.01;

}  // namespace

std::optional<RunOptions> parse_command_line(int argc, char** argv, int& exit_code) {
  RunOptions o;
  CLI::App app{
      "pi0-mps orchestrator: runs pi0 inference split over an encoder worker and a decoder "
      "worker, each with its own share of the GPU's SMs through CUDA MPS"};
  int prompt_len = -1;
  // A repeated option takes its last value (scripts append overrides), as CLI11 2.1 did.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--backend", o.backend, "cuda, cpu, or auto (cuda when a GPU is present)")
      ->check(CLI::IsMember({"auto", "cuda", "cpu"}));
  app.add_option("--model", o.model,
                 "pi0, tiny, pi0-1l, pi0-2l, or auto (pi0 on cuda, tiny on cpu)")
      ->check(CLI::IsMember({"auto", "pi0", "tiny", "pi0-1l", "pi0-2l"}));
  app.add_option("--weights", o.weights,
                 ".safetensors weights file (default: seeded random weights)");
  add_integer_option(app, "--views", o.views, "camera views per frame")->check(CLI::Range(1, 8));
  add_integer_option(app, "--chunk", o.chunk, "action chunk length")->check(CLI::Range(1, 1024));
  add_integer_option(app, "--prompt-len", prompt_len,
                     "prompt tokens (default: from the weights file, else 0)")
      ->check(CLI::Range(0, kMaxPromptLen));
  add_integer_option(app, "--encoder-pct", o.encoder_pct,
                     "encoder's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (1..100)")
      ->check(CLI::Range(1, 100));
  add_integer_option(app, "--decoder-pct", o.decoder_pct,
                     "decoder's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (1..100)")
      ->check(CLI::Range(1, 100));
  app.add_option("--mode", o.mode,
                 "sequential, or concurrent (encoder works on frame n+1 while the decoder works on "
                 "frame n)")
      ->check(CLI::IsMember({"sequential", "concurrent"}));
  add_integer_option(app, "--frames", o.frames, "frames measured")
      ->check(unsigned_number())
      ->check(CLI::Range(uint64_t{1}, uint64_t{10000000}));
  add_integer_option(app, "--warmup", o.warmup, "frames run before measuring")
      ->check(unsigned_number())
      ->check(CLI::Range(uint64_t{0}, uint64_t{100000}));
  add_integer_option(app, "--slots", o.slots,
                     "prefix K/V slots (frames in flight in concurrent mode)")
      ->check(unsigned_number())
      ->check(CLI::Range(1u, ipc::kMaxKvSlots));
  add_integer_option(
      app, "--decoder-batch", o.decoder_batch,
      "decode up to N frames that are waiting together in one pass (cuda backend): "
      "raises throughput where the decoder is the bottleneck, adds no latency at camera "
      "rates; a frame's actions may differ in their last bits with how it was paired. "
      "Slots default to 2N")
      ->check(unsigned_number())
      ->check(CLI::Range(1u, 4u));
  add_integer_option(app, "--seed", o.seed, "seed of the random weights and synthetic frames")
      ->check(unsigned_number());
  app.add_option("--rate", o.rate_hz,
                 "feed frames at this camera rate in Hz, 0.01 or more (default: back to back)")
      ->transform(decimal_real())
      ->check(CLI::Range(0.0, 100000.0));
  auto* wait =
      app.add_option("--wait", o.wait,
                     "how the orchestrator and workers wait for a message: sleep (on a futex), "
                     "adaptive (asleep, spinning only around the arrival their recent waits "
                     "predict; the default) or spin (lowest latency, one busy CPU core per "
                     "process)")
          ->check(CLI::IsMember({"sleep", "adaptive", "spin"}));
  bool busy_wait = false;
  app.add_flag("--busy-wait", busy_wait, "the same as --wait spin")->excludes(wait);
  app.add_flag("--no-mps", o.no_mps,
               "do not start or use the MPS daemon (workers time-share the GPU)");
  app.add_option("--mps-pipe-dir", o.mps.pipe_dir, "MPS pipe directory");
  app.add_option("--mps-log-dir", o.mps.log_dir, "MPS log directory");
  app.add_option("--gpu", o.gpu,
                 "CUDA_VISIBLE_DEVICES for the workers (default: inherited, else 0)");
  app.add_option("--json", o.json_path, "write the figures as JSON to this file");
  app.add_option("--actions-out", o.actions_path,
                 "write every frame's actions (f32, frame order) to this file");
  app.add_option("--log-level", o.log_level, "trace, debug, info, warn, error, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--startup-timeout", o.startup_timeout_s, "seconds a worker may take to load")
      ->transform(decimal_real())
      ->check(CLI::Range(1.0, 3600.0));
  app.add_option("--frame-timeout", o.frame_timeout_s,
                 "seconds a frame may take before the run fails")
      ->transform(decimal_real())
      ->check(CLI::Range(0.1, 3600.0));
  app.add_option("--run-timeout", o.run_timeout_s,
                 "seconds a whole run may take, worker start included (0: no limit; unset: no "
                 "limit, but a sweep gives each run 120 s + 0.25 s per frame, or twice the frame "
                 "period per frame with --rate)")
      ->transform(decimal_real())
      ->check(CLI::Range(0.0, 86400.0));
  app.add_option("--worker-dir", o.worker_dir,
                 "directory holding encoder_worker and decoder_worker");
  app.add_flag("--quiet-workers", o.quiet_workers, "do not copy the workers' log lines to stderr");
  app.add_flag("--sweep", o.sweep, "sweep the encoder's SM percentage (decoder gets the rest)");
  add_integer_option(app, "--sweep-step", o.sweep_step, "sweep step in percent")
      ->check(CLI::Range(1, 50));
  add_integer_option(app, "--sweep-min", o.sweep_min, "lowest encoder percentage of the sweep")
      ->check(CLI::Range(1, 99));
  add_integer_option(app, "--sweep-max", o.sweep_max, "highest encoder percentage of the sweep")
      ->check(CLI::Range(1, 99));
  app.add_option("--latency-budget-ms", o.latency_budget_ms,
                 "sweep: also name the best run (a split or a pipeline baseline) whose p99 "
                 "latency stays within this")
      ->transform(decimal_real())
      ->check(CLI::Range(0.0, 100000.0));
  app.add_option("--plot", o.plot_path,
                 "sweep: write an SVG plot of throughput and latency against the split");
  app.add_flag("!--no-baselines", o.baselines, "sweep: skip the baseline runs");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    exit_code = exit_for_help(app, e, "orchestrator");
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "orchestrator: error: %s\n", e.what());
    exit_code = 2;
    return std::nullopt;
  }
  if (prompt_len >= 0) o.prompt_len = prompt_len;
  if (busy_wait) o.wait = "spin";
  // Full passes need a pass's worth of slots running and another filling behind it.
  o.slots_given = app.count("--slots") > 0;
  if (!o.slots_given) o.slots = std::min(ipc::kMaxKvSlots, std::max(o.slots, 2 * o.decoder_batch));
  if (o.rate_hz > 0 && o.rate_hz < kMinRateHz) {
    std::fprintf(stderr, "orchestrator: error: --rate: %g Hz is below %g Hz (0: back to back)\n",
                 o.rate_hz, kMinRateHz);
    exit_code = 2;
    return std::nullopt;
  }
  if (o.sweep && o.no_mps) {
    std::fprintf(stderr,
                 "orchestrator: error: --sweep splits the GPU through MPS: drop --no-mps "
                 "(its no-MPS baseline runs anyway)\n");
    exit_code = 2;
    return std::nullopt;
  }
  // A single run draws no plot: it would end with exit 0 and no file where one was asked for.
  if (!o.sweep && !o.plot_path.empty()) {
    std::fprintf(stderr, "orchestrator: error: --plot draws a split sweep: it needs --sweep\n");
    exit_code = 2;
    return std::nullopt;
  }
  // --gpu asks for a GPU, as it does where none is usable (exit 1): the CPU backend's workers use
  // none, and a run that drops it quietly is not the run asked for.
  if (o.backend == "cpu" && !o.gpu.empty()) {
    std::fprintf(stderr,
                 "orchestrator: error: --gpu %s names the workers' GPU, which --backend cpu does "
                 "not use: drop one of them\n",
                 o.gpu.c_str());
    exit_code = 2;
    return std::nullopt;
  }
  if (o.mps.pipe_dir.empty() || o.mps.log_dir.empty()) {
    std::fprintf(stderr,
                 "orchestrator: error: --mps-pipe-dir and --mps-log-dir must not be empty\n");
    exit_code = 2;
    return std::nullopt;
  }
  // One daemon, one spelling: the runs sharing a daemon find each other's lock beside its pipe
  // directory, so "/tmp/nvidia-mps/", a relative path or a symlink must name it as the others do.
  for (const auto& [dir, option] :
       {std::pair{&o.mps.pipe_dir, "--mps-pipe-dir"}, std::pair{&o.mps.log_dir, "--mps-log-dir"}}) {
    std::error_code ec;
    const std::filesystem::path absolute = std::filesystem::absolute(*dir, ec);
    if (ec) {  // a relative path, and the working directory is gone
      std::fprintf(stderr, "orchestrator: error: %s %s: cannot make it absolute: %s\n", option,
                   dir->c_str(), ec.message().c_str());
      exit_code = 2;
      return std::nullopt;
    }
    std::string normal =
        std::filesystem::weakly_canonical(absolute, ec).lexically_normal().string();
    while (normal.size() > 1 && normal.back() == '/') normal.pop_back();
    if (!ec && !normal.empty()) *dir = normal;
  }
  if (o.sweep && o.sweep_min > o.sweep_max) {
    std::fprintf(stderr, "orchestrator: error: --sweep-min must not exceed --sweep-max\n");
    exit_code = 2;
    return std::nullopt;
  }
  return o;
}

ResolvedRun resolve(const RunOptions& o) {
  ResolvedRun r;
  r.options = o;
  std::string why_no_gpu;
  if (o.backend == "auto") {
    const bool gpu = cuda::cuda_device_present(&why_no_gpu);
    // Asked for by name, a GPU that is not there is an error, not a quiet run on the CPU.
    PI0_CHECK(gpu || o.gpu.empty(),
              "--gpu " + o.gpu + ": no usable CUDA GPU on this host (" + why_no_gpu + ")");
    r.backend = gpu ? "cuda" : "cpu";
  } else {
    r.backend = o.backend;
    if (r.backend == "cuda") {
      PI0_CHECK(cuda::cuda_device_present(&why_no_gpu),
                (o.gpu.empty() ? std::string("--backend cuda") : "--gpu " + o.gpu) +
                    ": no usable CUDA GPU (" + why_no_gpu + ")");
    }
  }
  // --gpu is only the workers' CUDA_VISIBLE_DEVICES (an MPS daemon we start must not inherit it:
  // MPS reads a client's devices relative to the daemon's). Its first entry, where it is a device
  // number, must exist; UUIDs are left to the workers.
  if (r.backend == "cuda" && !o.gpu.empty()) {
    const std::string first = o.gpu.substr(0, o.gpu.find(','));
    int ordinal = -1;
    const auto [end, ec] = std::from_chars(first.data(), first.data() + first.size(), ordinal);
    if (ec == std::errc() && end == first.data() + first.size() && ordinal >= 0) {
      const int count = cuda::cuda_device_count();
      PI0_CHECK(ordinal < count, "--gpu " + o.gpu + ": there is no CUDA device " + first +
                                     " (this host has " + std::to_string(count) +
                                     ", numbered from 0)");
      r.gpu_ordinal = ordinal;
    }
  }
  const std::string model = o.model != "auto" ? o.model : (r.backend == "cuda" ? "pi0" : "tiny");
  r.config = model_config(model);
  r.shape.views = o.views;
  r.shape.chunk = o.chunk;
  r.shape.prompt_len = o.prompt_len.value_or(0);
  if (!o.weights.empty()) {
    // Every tensor's name, dtype, shape and offsets, checked now without reading their data, so
    // that a bad file fails before any worker starts.
    const int file_prompt_len = WeightStore::check_safetensors(o.weights, r.config);
    PI0_CHECK(!o.prompt_len || *o.prompt_len == file_prompt_len,
              "--prompt-len " + std::to_string(*o.prompt_len) + " does not match the " +
                  std::to_string(file_prompt_len) + " prompt tokens in " + o.weights);
    r.shape.prompt_len = file_prompt_len;
  }
  r.shape.validate();
  check_writable(o.json_path, "--json");
  check_writable(o.actions_path, "--actions-out");
  check_writable(o.plot_path, "--plot");
  // No results file may replace another, nor the weights the run reads.
  const std::pair<const std::string*, const char*> results[] = {{&o.weights, "--weights"},
                                                                {&o.json_path, "--json"},
                                                                {&o.actions_path, "--actions-out"},
                                                                {&o.plot_path, "--plot"}};
  for (size_t i = 0; i < std::size(results); ++i)
    for (size_t j = i + 1; j < std::size(results); ++j)
      PI0_CHECK(!same_file(*results[i].first, *results[j].first),
                std::string(results[j].second) + " " + *results[j].first + " is the file of " +
                    results[i].second);
  if (o.backend == "auto" && r.backend == "cpu") {
    r.note = "no CUDA GPU (" + why_no_gpu + "): running model '" + model +
             "' on the CPU backend (fp32 reference)";
  } else {
    r.note = "backend " + r.backend + ", model " + model;
  }
  if (r.backend == "cpu" && o.decoder_batch > 1) {
    // The run is then batch 1's, and so are its report and its default slots: the 2N slots a
    // batch gets would only queue frames behind the one decoding (3x the latency at batch 3).
    r.options.decoder_batch = 1;
    if (!o.slots_given) r.options.slots = RunOptions{}.slots;
    r.note +=
        "; --decoder-batch applies to the cuda backend (the CPU decoder decodes frame by frame): "
        "ignored";
  }
  return r;
}

}  // namespace pi0
