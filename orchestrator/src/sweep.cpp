#include "pi0/sweep.hpp"

#include <unistd.h>

#include <spdlog/spdlog.h>
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/command_line.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/process.hpp"

namespace pi0 {

namespace {

// Worker start (weights, GEMM checks) takes up to a minute or so; then each frame of a healthy
// split takes well under 0.1 s back to back.
double sweep_run_timeout_s(const RunOptions& o) {
  const double per_frame = o.rate_hz > 0 ? 2.0 / o.rate_hz : 0.25;
  return 120.0 + per_frame * static_cast<double>(o.warmup + o.frames);
}

// pi0_bench's JSON as the baseline's report; nlohmann::json::exception where a field is missing.
RunReport single_process_report(const nlohmann::json& j, const ResolvedRun& run) {
  RunReport r;
  r.label = "single-process";
  r.backend = "cuda";
  r.model = run.config.name;
  r.mode = "single-process";
  r.views = run.shape.views;
  r.chunk = run.shape.chunk;
  r.prompt_len = run.shape.prompt_len;
  r.encoder_pct = r.decoder_pct = 100;
  r.split_note = "one process, whole GPU";
  // pi0_bench times encode+decode with CUDA events on device-resident inputs, back to back.
  const nlohmann::json& c = j.at("cases").at(0);
  r.frames = j.at("iters").get<uint64_t>();
  r.latency_p50_ms = c.at("e2e_median_ms").get<double>();
  r.latency_p99_ms = c.at("e2e_p99_ms").get<double>();
  r.latency_max_ms = c.at("e2e_max_ms").get<double>();
  r.latency_mean_ms = c.at("e2e_mean_ms").get<double>();
  r.throughput_fps = c.at("throughput_per_s").get<double>();
  // Absent from an older pi0_bench (--worker-dir): then only the CUDA-event figure is compared.
  r.host_to_host_p50_ms = c.value("host_to_host_median_ms", 0.0);
  r.host_to_host_p99_ms = c.value("host_to_host_p99_ms", 0.0);
  r.encoder.stage_ms_median = c.at("encoder_median_ms").get<double>();
  r.decoder.stage_ms_median = c.at("decoder_median_ms").get<double>();
  r.device_sms = cuda::device_sm_count_without_context(run.gpu_ordinal);
  return r;
}

}  // namespace

RunReport run_single_process_baseline(const ResolvedRun& run) {
  const RunOptions& o = run.options;
  const std::string dir = o.worker_dir.empty() ? executable_dir() : o.worker_dir;
  // A private directory (mode 0700, an unpredictable name): no other user can plant the file.
  char dir_template[] = "/tmp/pi0mps_baseline_XXXXXX";
  PI0_CHECK(::mkdtemp(dir_template) != nullptr,
            std::string("cannot make a temporary directory: ") + std::strerror(errno));
  const std::string private_dir = dir_template;
  const std::string json_path = private_dir + "/single_process.json";
  struct RemovedAtExit {
    const std::string& dir;
    const std::string& file;
    ~RemovedAtExit() {
      ::unlink(file.c_str());
      ::rmdir(dir.c_str());
    }
  } removed{private_dir, json_path};
  // pi0_bench times at most a million inferences (a sweep's runs take up to 10^7 frames): as sure a
  // baseline as more.
  constexpr uint64_t kBenchMaxRuns = 1'000'000;
  const std::string shape = std::to_string(run.shape.views) + "," +
                            std::to_string(run.shape.chunk) + "," +
                            std::to_string(run.shape.prompt_len);
  const std::vector<std::string> args = {
      "--model",  run.config.name,
      "--case",   shape,
      "--iters",  std::to_string(std::clamp<uint64_t>(o.frames, 50, kBenchMaxRuns)),
      "--warmup", std::to_string(o.warmup),
      "--json",   json_path};
  EnvOverrides env{{"CUDA_MPS_PIPE_DIRECTORY", "/nonexistent/pi0-mps-no-mps"},
                   {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", std::nullopt}};
  ChildProcess bench = ChildProcess::spawn("pi0_bench", dir + "/pi0_bench", args, env, false);
  const double limit_s = o.run_timeout_s > 0 ? o.run_timeout_s : 600.0;
  // Waited for in slices, so that a stop signal ends it at once: the bench runs in a process
  // group of its own, which a terminal's Ctrl-C does not reach.
  const auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::duration<double>(limit_s));
  std::optional<ExitStatus> status;
  while (!(status = bench.wait_for(std::chrono::milliseconds(50))) &&
         std::chrono::steady_clock::now() < deadline) {
    if (stop_signal() != 0) {
      bench.terminate(std::chrono::milliseconds(1000));
      throw Error("single-process baseline (pi0_bench) interrupted by signal " +
                  std::to_string(stop_signal()));
    }
  }
  std::ifstream in(json_path);
  PI0_CHECK(status && status->success() && in.good(),
            "single-process baseline (pi0_bench) failed: " +
                (status ? status->describe() : std::string("timed out")) +
                (bench.last_lines().empty() ? "" : "; " + bench.last_lines().back()));
  try {
    return single_process_report(nlohmann::json::parse(in), run);
  } catch (const nlohmann::json::exception& e) {
    // A truncated file (a full disk) or an older pi0_bench's (--worker-dir).
    throw Error("single-process baseline: cannot read pi0_bench's JSON: " + std::string(e.what()));
  }
}

namespace {

// A run with figures: not a failed one, nor one stopped (Ctrl-C) before it measured a frame,
// whose zeros are no latency or throughput.
bool has_figures(const RunReport& r) {
  return r.error.empty() && r.frames > 0;
}

// A run stopped before it measured a frame has no figures to compare. (One frame has a latency
// but no throughput, so a sweep of one frame a run compares the latencies.)
// A split whose SM share was not applied (the workers not MPS clients) is not the split it names.
bool is_candidate(const RunReport& r) {
  return has_figures(r) && !r.interrupted && r.mode != "single-process" &&
         (!r.mps || r.split_applied);
}

// The most frames/s; of the runs within kSameThroughput of it, the lowest p99.
std::optional<std::string> best_of(const std::vector<const RunReport*>& runs) {
  double top = 0;
  for (const RunReport* r : runs) top = std::max(top, r->throughput_fps);
  const RunReport* best = nullptr;
  for (const RunReport* r : runs) {
    if (r->throughput_fps < top * (1.0 - kSameThroughput)) continue;
    if (!best || r->latency_p99_ms < best->latency_p99_ms) best = r;
  }
  if (!best) return std::nullopt;
  return best->label;
}

}  // namespace

void choose_best_runs(SweepResult& result) {
  std::vector<const RunReport*> runs, within_budget;
  for (const auto* list : {&result.points, &result.baselines}) {
    for (const RunReport& r : *list) {
      if (!is_candidate(r)) continue;
      runs.push_back(&r);
      if (result.latency_budget_ms > 0 && r.latency_p99_ms <= result.latency_budget_ms)
        within_budget.push_back(&r);
    }
  }
  result.best_throughput = best_of(runs);
  result.best_within_budget = best_of(within_budget);
}

const RunReport* find_run(const SweepResult& s, const std::string& label) {
  for (const auto* list : {&s.points, &s.baselines}) {
    for (const RunReport& r : *list)
      if (r.label == label) return &r;
  }
  return nullptr;
}

std::string run_options(const RunReport& r) {
  if (r.mode == "single-process") return "";
  std::string options = r.mps ? "--encoder-pct " + std::to_string(r.encoder_pct) +
                                    " --decoder-pct " + std::to_string(r.decoder_pct)
                              : std::string("--no-mps");
  options += " --mode " + r.mode;
  if (r.rate_hz > 0) {
    char rate[32];
    std::snprintf(rate, sizeof rate, " --rate %g", r.rate_hz);
    options += rate;
  }
  if (r.decoder_batch > 1) options += " --decoder-batch " + std::to_string(r.decoder_batch);
  return options;
}

SweepResult run_sweep(const ResolvedRun& requested) {
  // A split that runs far slower than the others (e.g. a GEMM fell back to a slow kernel) is
  // reported as such, not waited for.
  ResolvedRun run = requested;
  if (run.options.run_timeout_s < 0) run.options.run_timeout_s = sweep_run_timeout_s(run.options);
  const RunOptions& o = run.options;
  // Before the baselines, which take minutes: the splits need the daemon's control program, and
  // a daemon they may start in its pipe and log directories (or one that answers there).
  try {
    MpsDaemon::check_can_start_or_adopt(o.mps);
  } catch (const Error& e) {
    throw Error(std::string("--sweep (it splits the GPU through MPS): ") + e.what());
  }
  SweepResult result;
  result.latency_budget_ms = o.latency_budget_ms;
  result.decoder_batch = o.decoder_batch;
  std::vector<int> splits;
  for (int pct = o.sweep_min; pct <= o.sweep_max; pct += o.sweep_step) splits.push_back(pct);
  const size_t total_runs = splits.size() + (o.baselines ? 4 : 0);
  size_t run_index = 0;
  const auto progress = [&](const std::string& what) {
    std::fprintf(stderr, "[sweep %zu/%zu] %s ...\n", ++run_index, total_runs, what.c_str());
  };
  const auto interrupted = [] { return stop_signal() != 0; };

  // A run that cannot happen (e.g. no correct GEMM algorithm at that SM share) is a result of the
  // sweep, reported with its reason, not the end of it. So is one whose worker failed or hung as
  // it stopped, after its frames: its report comes back with the error. Either is one line.
  const auto attempt = [&](const std::string& what, auto&& body) {
    progress(what);
    RunReport r;
    try {
      r = body();
    } catch (const Error& e) {
      r.error = e.what();
    }
    if (!r.error.empty()) {
      r.error = r.error.substr(0, r.error.find('\n'));
      std::fprintf(stderr, "    -> failed: %s\n", r.error.c_str());
    }
    return r;
  };
  const auto baseline = [&](const std::string& label, const std::string& what, auto&& body) {
    if (!o.baselines || interrupted()) return;
    RunReport r = attempt(what, body);
    r.label = label;
    result.baselines.push_back(r);
  };
  baseline("single-process", "single-process baseline (whole GPU, one process)",
           [&] { return run_single_process_baseline(run); });
  baseline("no-mps", "two workers without MPS (time-sliced), concurrent",
           [&] { return run_pipeline(run, nullptr, 100, 100, "concurrent", nullptr); });
  // Stopped already: no daemon to start for runs that will not happen.
  if (interrupted()) {
    choose_best_runs(result);
    return result;
  }
  MpsDaemon mps = MpsDaemon::start_or_adopt(o.mps);
  baseline("mps-100/100", "MPS 100/100 (no partition), concurrent",
           [&] { return run_pipeline(run, &mps, 100, 100, "concurrent", nullptr); });
  baseline("mps-100/100-sequential", "MPS 100/100, sequential",
           [&] { return run_pipeline(run, &mps, 100, 100, "sequential", nullptr); });
  for (int pct : splits) {
    if (interrupted()) break;
    const std::string split = std::to_string(pct) + "/" + std::to_string(100 - pct);
    RunReport r = attempt("split " + split + ", concurrent", [&] {
      return run_pipeline(run, &mps, pct, 100 - pct, "concurrent", nullptr);
    });
    if (has_figures(r)) {
      std::fprintf(stderr, "    -> %.1f frames/s, p50 %.2f ms, p99 %.2f ms, SMs %d/%d, %s\n",
                   r.throughput_fps, r.latency_p50_ms, r.latency_p99_ms, r.encoder.sm_count,
                   r.decoder.sm_count, r.split_note.c_str());
    }
    r.label = "split " + split;
    r.encoder_pct = pct;
    r.decoder_pct = 100 - pct;
    result.points.push_back(r);
  }
  choose_best_runs(result);
  return result;
}

void print_sweep(const SweepResult& s, std::FILE* out) {
  std::fprintf(out, "\n== split sweep (concurrent mode, MPS) ==\n");
  if (s.decoder_batch > 1)
    std::fprintf(out,
                 "decoder batch %u: frames that wait together share a decoder pass; dec ms is per "
                 "pass\n",
                 s.decoder_batch);
  // Stage medians show which stage limits the throughput at each split.
  std::fprintf(out, "%-10s %8s %8s %10s %10s %10s %10s %10s %8s\n", "enc/dec %", "enc SMs",
               "dec SMs", "enc ms", "dec ms", "p50 ms", "p99 ms", "frames/s", "applied");
  for (const auto& p : s.points) {
    if (!p.error.empty()) {
      std::fprintf(out, "%3d/%-6d failed: %s\n", p.encoder_pct, p.decoder_pct, p.error.c_str());
      continue;
    }
    if (!has_figures(p)) {
      std::fprintf(out, "%3d/%-6d stopped before a frame was measured\n", p.encoder_pct,
                   p.decoder_pct);
      continue;
    }
    std::fprintf(out, "%3d/%-6d %8d %8d %10.2f %10.2f %10.2f %10.2f %10.1f %8s\n", p.encoder_pct,
                 p.decoder_pct, p.encoder.sm_count, p.decoder.sm_count, p.encoder.stage_ms_median,
                 p.decoder.stage_ms_median, p.latency_p50_ms, p.latency_p99_ms, p.throughput_fps,
                 p.split_applied ? "yes" : "NO");
  }
  const RunReport* best = s.best_throughput ? find_run(s, *s.best_throughput) : nullptr;
  if (!s.baselines.empty()) {
    std::fprintf(out, "\n== baselines (ratio = best run's throughput / baseline's) ==\n");
    std::fprintf(out, "%-24s %10s %10s %12s %8s\n", "run", "p50 ms", "p99 ms", "frames/s", "ratio");
    for (const auto& b : s.baselines) {
      if (!b.error.empty()) {
        std::fprintf(out, "%-24s failed: %s\n", b.label.c_str(), b.error.c_str());
        continue;
      }
      if (!has_figures(b)) {
        std::fprintf(out, "%-24s stopped before a frame was measured\n", b.label.c_str());
        continue;
      }
      // The single process runs back to back even when the pipeline runs at a camera rate:
      // frames/s at two different offered rates make no ratio.
      char ratio[32] = "-";
      if (best && b.throughput_fps > 0 && b.rate_hz == best->rate_hz)
        std::snprintf(ratio, sizeof ratio, "%.2f", best->throughput_fps / b.throughput_fps);
      std::fprintf(out, "%-24s %10.2f %10.2f %12.1f %8s\n", b.label.c_str(), b.latency_p50_ms,
                   b.latency_p99_ms, b.throughput_fps, ratio);
    }
    const RunReport* single = find_run(s, "single-process");
    if (best && best->rate_hz > 0 && single && single->error.empty())
      std::fprintf(out, "(the pipeline runs at %g Hz, the single process back to back)\n",
                   best->rate_hz);
    const RunReport* seq = find_run(s, "mps-100/100-sequential");
    if (single && seq && single->latency_p50_ms > 0 && seq->error.empty() && !seq->interrupted &&
        seq->latency_p50_ms > 0) {
      std::fprintf(out, "sequential 100/100 latency vs single-process: %+.1f%%\n",
                   100.0 * (seq->latency_p50_ms / single->latency_p50_ms - 1.0));
      // Like for like: both host to host, inputs uploaded and actions read back.
      if (single->host_to_host_p50_ms > 0) {
        std::fprintf(
            out, "sequential 100/100 latency vs single-process host to host (%.2f ms): %+.1f%%\n",
            single->host_to_host_p50_ms,
            100.0 * (seq->latency_p50_ms / single->host_to_host_p50_ms - 1.0));
      }
    }
  }
  // Splits and pipeline baselines compete; throughputs within kSameThroughput count as equal (at
  // a camera rate every run that keeps up delivers the rate), and then the lower p99 wins.
  const auto describe = [out](const RunReport& r) {
    std::fprintf(out, "%s (%.1f frames/s, p50 %.2f ms, p99 %.2f ms): %s\n", r.label.c_str(),
                 r.throughput_fps, r.latency_p50_ms, r.latency_p99_ms, run_options(r).c_str());
  };
  if (best) {
    std::fprintf(out, "\nbest for throughput: ");
    describe(*best);
  }
  if (s.latency_budget_ms > 0) {
    const RunReport* b = s.best_within_budget ? find_run(s, *s.best_within_budget) : nullptr;
    if (b) {
      std::fprintf(out, "best within p99 <= %.1f ms: ", s.latency_budget_ms);
      describe(*b);
    } else {
      std::fprintf(out, "no split or baseline keeps p99 latency within %.1f ms\n",
                   s.latency_budget_ms);
    }
  }
  std::fflush(out);
}

std::string sweep_json(const SweepResult& s) {
  nlohmann::json out;
  out["points"] = nlohmann::json::array();
  for (const auto& p : s.points) out["points"].push_back(report_to_json(p));
  out["baselines"] = nlohmann::json::array();
  for (const auto& b : s.baselines) out["baselines"].push_back(report_to_json(b));
  if (s.best_throughput) out["best_throughput"] = *s.best_throughput;
  out["latency_budget_ms"] = s.latency_budget_ms;
  out["decoder_batch"] = s.decoder_batch;
  if (s.best_within_budget) out["best_within_budget"] = *s.best_within_budget;
  return json_text(out);
}

void write_sweep_plot(const SweepResult& s, const std::string& path) {
  PI0_CHECK(!s.points.empty(), "no sweep points to plot");
  constexpr double kW = 720, kH = 420, kLeft = 70, kRight = 70, kTop = 40, kBottom = 50;
  const double plot_w = kW - kLeft - kRight, plot_h = kH - kTop - kBottom;
  // Failed runs are not drawn, though a worker that failed or hung as it stopped left figures.
  double max_fps = 1, max_ms = 1;
  for (const auto& p : s.points) {
    if (!has_figures(p)) continue;
    max_fps = std::max(max_fps, p.throughput_fps);
    max_ms = std::max(max_ms, p.latency_p99_ms);
  }
  for (const auto& b : s.baselines)
    if (has_figures(b)) max_fps = std::max(max_fps, b.throughput_fps);
  max_fps *= 1.1;
  max_ms *= 1.1;
  const auto x_of = [&](int pct) { return kLeft + plot_w * pct / 100.0; };
  const auto y_fps = [&](double v) { return kTop + plot_h * (1 - v / max_fps); };
  const auto y_ms = [&](double v) { return kTop + plot_h * (1 - v / max_ms); };
  std::ostringstream svg;
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << kW << "' height='" << kH
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' "
         "fill='white'/>\n";
  // A failed run's report has no model or shape: name them from one that ran.
  const RunReport* named = &s.points.front();
  for (const auto& p : s.points)
    if (p.error.empty() && !p.model.empty()) {
      named = &p;
      break;
    }
  svg << "<text x='" << kW / 2
      << "' y='22' text-anchor='middle' font-size='14'>pi0-mps split sweep (" << named->model
      << ", V=" << named->views << ", C=" << named->chunk << ", concurrent)</text>\n";
  svg << "<rect x='" << kLeft << "' y='" << kTop << "' width='" << plot_w << "' height='" << plot_h
      << "' fill='none' stroke='#444'/>\n";
  for (int pct = 0; pct <= 100; pct += 10) {
    svg << "<text x='" << x_of(pct) << "' y='" << kTop + plot_h + 16 << "' text-anchor='middle'>"
        << pct << "</text>\n";
  }
  svg << "<text x='" << kLeft + plot_w / 2 << "' y='" << kH - 10
      << "' text-anchor='middle'>encoder SM percentage (decoder gets the rest)</text>\n";
  for (int i = 0; i <= 5; ++i) {
    const double f = max_fps * i / 5, m = max_ms * i / 5;
    svg << "<text x='" << kLeft - 6 << "' y='" << y_fps(f) + 4
        << "' text-anchor='end' fill='#1f77b4'>" << static_cast<int>(f) << "</text>\n";
    svg << "<text x='" << kLeft + plot_w + 6 << "' y='" << y_ms(m) + 4 << "' fill='#d62728'>"
        << std::round(m * 10) / 10 << "</text>\n";
  }
  svg << "<text transform='rotate(-90)' x='" << -(kTop + plot_h / 2)
      << "' y='16' text-anchor='middle' fill='#1f77b4'>throughput (frames/s)</text>\n";
  svg << "<text transform='rotate(90)' x='" << kTop + plot_h / 2 << "' y='" << -(kW - 14)
      << "' text-anchor='middle' fill='#d62728'>latency (ms)</text>\n";
  const auto polyline = [&](auto y_of, const char* color, const char* dash) {
    svg << "<polyline fill='none' stroke='" << color << "' stroke-width='2' stroke-dasharray='"
        << dash << "' points='";
    for (const auto& p : s.points) {
      if (has_figures(p)) svg << x_of(p.encoder_pct) << "," << y_of(p) << " ";
    }
    svg << "'/>\n";
    for (const auto& p : s.points) {
      if (!has_figures(p)) continue;
      svg << "<circle cx='" << x_of(p.encoder_pct) << "' cy='" << y_of(p) << "' r='3' fill='"
          << color << "'/>\n";
    }
  };
  polyline([&](const RunReport& p) { return y_fps(p.throughput_fps); }, "#1f77b4", "none");
  polyline([&](const RunReport& p) { return y_ms(p.latency_p50_ms); }, "#d62728", "none");
  polyline([&](const RunReport& p) { return y_ms(p.latency_p99_ms); }, "#d62728", "5,4");
  double legend_y = kTop + 14;
  // Baselines often lie within a few frames/s of each other: their labels go top-down in
  // throughput order, each at least one text line below the previous one.
  std::vector<const RunReport*> shown;
  for (const auto& b : s.baselines) {
    if (has_figures(b) && b.throughput_fps > 0) shown.push_back(&b);
  }
  std::sort(shown.begin(), shown.end(), [](const RunReport* a, const RunReport* b) {
    return a->throughput_fps > b->throughput_fps;
  });
  constexpr double kLabelStep = 11;
  double last_label_y = -1e9;
  for (const RunReport* b : shown) {
    const double y = y_fps(b->throughput_fps);
    const double label_y = std::max(y - 3, last_label_y + kLabelStep);
    last_label_y = label_y;
    svg << "<line x1='" << kLeft << "' x2='" << kLeft + plot_w << "' y1='" << y << "' y2='" << y
        << "' stroke='#999' stroke-dasharray='2,3'/>\n";
    svg << "<text x='" << kLeft + 6 << "' y='" << label_y << "' fill='#777' font-size='10'>"
        << b->label << " " << std::round(b->throughput_fps) << "/s</text>\n";
  }
  svg << "<text x='" << kLeft + plot_w - 6 << "' y='" << legend_y
      << "' text-anchor='end' fill='#1f77b4'>throughput</text>\n";
  svg << "<text x='" << kLeft + plot_w - 6 << "' y='" << legend_y + 14
      << "' text-anchor='end' fill='#d62728'>latency p50 (solid), p99 (dashed)</text>\n";
  svg << "</svg>\n";
  // Every write checked: a full disk would otherwise leave a truncated plot and exit 0.
  write_results_file(path, svg.str());
}

}  // namespace pi0
