#include <spdlog/spdlog.h>
#include <cstdio>
#include <cstdlib>

#include "pi0/check.hpp"
#include "pi0/command_line.hpp"
#include "pi0/ipc/shm.hpp"
#include "pi0/log.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/sweep.hpp"

namespace pi0 {
namespace {

int exit_code_for_signal(int sig) {
  return sig ? 128 + sig : 0;
}

}  // namespace

int orchestrator_main(int argc, char** argv) {
  int exit_code = 0;
  const std::optional<RunOptions> options = parse_command_line(argc, argv, exit_code);
  if (!options) return exit_code;
  // Our own CUDA calls only probe the device: they must not make this process a client of an MPS
  // daemon (one quitting, or another user's, would then read as "no GPU"). Every child gets its
  // MPS variables explicitly.
  ::setenv("CUDA_MPS_PIPE_DIRECTORY", "/nonexistent/pi0-mps-orchestrator", 1);
  try {
    init_logging("orchestrator", options->log_level);
    install_stop_handlers();
    const ResolvedRun run = resolve(*options);
    std::printf("%s\n", run.note.c_str());
    std::fflush(stdout);

    if (options->sweep) {
      PI0_CHECK(run.backend == "cuda", "--sweep needs the cuda backend (MPS splits GPU SMs)");
      const SweepResult sweep = run_sweep(run);
      print_sweep(sweep);
      const std::string report_error = report_write_error();
      if (!options->json_path.empty()) {
        const std::string json = sweep_json(sweep);
        write_results_file(options->json_path, json);
      }
      if (!options->plot_path.empty()) write_sweep_plot(sweep, options->plot_path);
      PI0_CHECK(report_error.empty(), report_error);
      if (stop_signal() != 0) return exit_code_for_signal(stop_signal());
      // Not one run (split or pipeline baseline) measured a frame: the sweep found nothing.
      if (!sweep.best_throughput) {
        std::fprintf(stderr, "orchestrator: error: no run of the sweep measured a frame\n");
        return 3;
      }
      return 0;
    }

    MpsDaemon mps;
    if (run.backend == "cuda" && !options->no_mps) mps = MpsDaemon::start_or_adopt(options->mps);
    std::vector<float> actions;
    RunReport report =
        run_pipeline(run, mps.active() ? &mps : nullptr, options->encoder_pct, options->decoder_pct,
                     options->mode, options->actions_path.empty() ? nullptr : &actions);
    report.label = "pipeline";
    print_report(report);
    // Each results file is written even where another cannot be; the first failure is reported.
    std::string write_error = report_write_error();
    const auto write_result = [&](const std::string& path, std::string_view data) {
      try {
        write_results_file(path, data);
      } catch (const std::exception& e) {
        if (write_error.empty()) write_error = e.what();
      }
    };
    if (!options->json_path.empty()) {
      const std::string json = report_json({report});
      write_result(options->json_path, json);
    }
    if (!options->actions_path.empty()) {
      write_result(options->actions_path,
                   std::string_view(reinterpret_cast<const char*>(actions.data()),
                                    actions.size() * sizeof(float)));
    }
    if (!report.error.empty()) {  // a worker failed or hung after the last frame: the figures stand
      // A results file that could not be written is told as well, but the worker's failure sets
      // the status.
      if (!write_error.empty())
        std::fprintf(stderr, "orchestrator: error: %s\n", write_error.c_str());
      std::fprintf(stderr, "orchestrator: error: %s\n", report.error.c_str());
      return stop_signal() != 0 ? exit_code_for_signal(stop_signal()) : 3;
    }
    PI0_CHECK(write_error.empty(), write_error);
    return exit_code_for_signal(stop_signal());
  } catch (const WorkerFailure& e) {
    std::fprintf(stderr, "orchestrator: error: %s\n", e.what());
    // A run the user stopped (a hung worker outlasting the drain, a second signal) ends with the
    // signal's status, as a clean stop does.
    return stop_signal() != 0 ? exit_code_for_signal(stop_signal()) : 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "orchestrator: error: %s\n", e.what());
    // Stopped by a signal (e.g. while the workers were starting): the signal's status, as a run
    // it ends later gives, not the status of bad input.
    return stop_signal() != 0 ? exit_code_for_signal(stop_signal()) : 1;
  }
}

}  // namespace pi0
