// The split sweep: the encoder's SM percentage from low to high in concurrent mode (workers are
// restarted per split, since MPS reads the percentage at context creation), the baselines that
// show what MPS buys, and the best split for throughput and for a latency budget.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "pi0/orchestrator.hpp"

namespace pi0 {

struct SweepResult {
  std::vector<RunReport> points;     // one per split, concurrent mode under MPS
  std::vector<RunReport> baselines;  // single-process, no MPS, MPS 100/100, sequential 100/100
  std::optional<size_t> best_throughput;  // index into points
  std::optional<size_t> best_within_budget;
  double latency_budget_ms = 0;
  uint32_t decoder_batch = 1;  // --decoder-batch of every run (the single process decodes one)
};

SweepResult run_sweep(const ResolvedRun& run);
// Sets best_throughput and best_within_budget (p99 <= latency_budget_ms) over the points that ran.
void choose_best_splits(SweepResult& sweep);
void print_sweep(const SweepResult& sweep);
std::string sweep_json(const SweepResult& sweep);
// An SVG chart: throughput and p50/p99 latency against the encoder's percentage.
void write_sweep_plot(const SweepResult& sweep, const std::string& path);

// Runs the single-process baseline program (pi0_bench --single-process) on the whole GPU.
RunReport run_single_process_baseline(const ResolvedRun& run);

}  // namespace pi0
