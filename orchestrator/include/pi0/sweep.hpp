// The split sweep: the encoder's SM percentage from low to high in concurrent mode (workers are
// restarted per split, since MPS reads the percentage at context creation), the baselines that
// show what MPS buys, and the best configuration for throughput and for a latency budget.
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "pi0/orchestrator.hpp"

namespace pi0 {

struct SweepResult {
  std::vector<RunReport> points;     // one per split, concurrent mode under MPS
  std::vector<RunReport> baselines;  // single-process, no MPS, MPS 100/100, sequential 100/100
  // Labels of the best runs a user can ask the orchestrator for (a split or a pipeline baseline;
  // not the single process): see choose_best_runs.
  std::optional<std::string> best_throughput;
  std::optional<std::string> best_within_budget;
  double latency_budget_ms = 0;
  uint32_t decoder_batch = 1;  // --decoder-batch of every run (the single process decodes one)
};

SweepResult run_sweep(const ResolvedRun& run);
// Throughputs this close (relative) count as the same: at a camera rate every configuration that
// keeps up delivers the rate, and the lower latency decides.
inline constexpr double kSameThroughput = 0.01;
// Sets best_throughput (the most frames/s; of those within kSameThroughput of it, the lowest p99)
// and best_within_budget (the same among those with p99 <= latency_budget_ms) over the runs that
// measured frames: the splits and the pipeline baselines (no MPS, MPS 100/100 in either mode),
// which are configurations of the orchestrator too. The single process is a yardstick, not a
// candidate.
void choose_best_runs(SweepResult& sweep);
// The run labelled `label` among the points and baselines; nullptr if none.
const RunReport* find_run(const SweepResult& sweep, const std::string& label);
// The orchestrator options that repeat a pipeline run's configuration (e.g. "--encoder-pct 50
// --decoder-pct 50 --mode concurrent", "--no-mps --mode concurrent --rate 30"; --rate and
// --decoder-batch where set); empty for the single process.
std::string run_options(const RunReport& run);
void print_sweep(const SweepResult& sweep, std::FILE* out = stdout);
std::string sweep_json(const SweepResult& sweep);
// An SVG chart: throughput and p50/p99 latency against the encoder's percentage.
void write_sweep_plot(const SweepResult& sweep, const std::string& path);

// Runs the single-process baseline program (pi0_bench, at the run's shape) on the whole GPU.
RunReport run_single_process_baseline(const ResolvedRun& run);

}  // namespace pi0
