// The sweep's reporting on synthetic results: best split choice, failed splits, JSON and plot.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "catch.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/sweep.hpp"
#include "process_utils.hpp"

using namespace pi0;

namespace {

RunReport point(int pct, double fps, double p99, const std::string& error = "") {
  RunReport r;
  r.label = "split " + std::to_string(pct) + "/" + std::to_string(100 - pct);
  r.model = "pi0";
  r.views = 2;
  r.chunk = 63;
  r.mode = "concurrent";
  r.mps = true;
  r.split_applied = true;
  r.encoder_pct = pct;
  r.decoder_pct = 100 - pct;
  r.frames = 200;
  r.throughput_fps = fps;
  r.latency_p50_ms = p99 * 0.9;
  r.latency_p99_ms = p99;
  r.error = error;
  return r;
}

// A baseline run under its sweep label: the single process and the pipeline at 100/100.
RunReport baseline(const std::string& label, const std::string& mode, double fps, double p99,
                   const std::string& error = "") {
  RunReport r = point(100, fps, p99, error);
  r.label = label;
  r.mode = mode;
  r.decoder_pct = 100;
  r.mps = label != "no-mps";
  r.split_applied = r.mps;
  return r;
}

SweepResult synthetic() {
  SweepResult s;
  s.points = {point(20, 40, 45), point(40, 66, 31), point(50, 90, 40, "no correct GEMM algorithm"),
              point(60, 75, 27), point(80, 70, 22)};
  s.baselines = {baseline("single-process", "single-process", 60, 16)};
  s.latency_budget_ms = 25;
  choose_best_runs(s);
  return s;
}

// What print_sweep writes for `s`.
std::string printed(const SweepResult& s) {
  std::FILE* out = std::tmpfile();
  REQUIRE(out != nullptr);
  print_sweep(s, out);
  std::rewind(out);
  std::string text;
  for (int c = std::fgetc(out); c != EOF; c = std::fgetc(out)) text.push_back(static_cast<char>(c));
  std::fclose(out);
  return text;
}

}  // namespace

TEST_CASE("sweep picks the best split among the runs that succeeded", "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  REQUIRE(s.best_throughput.has_value());
  // 50/50 failed, so its 90/s is no result; the single process (60/s, p99 16 ms) is a yardstick.
  CHECK(*s.best_throughput == "split 60/40");
  REQUIRE(s.best_within_budget.has_value());
  CHECK(*s.best_within_budget == "split 80/20");  // the only pipeline run with p99 <= 25 ms
  REQUIRE(find_run(s, "split 80/20") != nullptr);
  CHECK(find_run(s, "split 80/20")->encoder_pct == 80);
  CHECK(find_run(s, "single-process") == &s.baselines[0]);
  CHECK(find_run(s, "split 10/90") == nullptr);
  s.latency_budget_ms = 10;
  choose_best_runs(s);
  CHECK_FALSE(s.best_within_budget.has_value());
}

TEST_CASE("at a camera rate the sweep recommends the lowest latency among the runs that keep up",
          "[orchestrator][sweep]") {
  // 30 Hz: every run that keeps up delivers ~30 frames/s, so latency decides, and the MPS
  // 100/100 runs are candidates like the splits (figures of the kind an H100 gives at 30 Hz).
  SweepResult s;
  s.points = {point(10, 23.7, 90.0), point(50, 30.10, 18.42), point(60, 30.11, 19.5)};
  const RunReport concurrent = baseline("mps-100/100", "concurrent", 30.12, 15.06);
  const RunReport sequential = baseline("mps-100/100-sequential", "sequential", 30.08, 14.47);
  const RunReport no_mps = baseline("no-mps", "concurrent", 30.09, 16.0, "worker failed");
  const RunReport single = baseline("single-process", "single-process", 30.2, 13.1);
  s.baselines = {single, no_mps, concurrent, sequential};
  s.latency_budget_ms = 15;
  choose_best_runs(s);
  REQUIRE(s.best_throughput.has_value());
  CHECK(*s.best_throughput == "mps-100/100-sequential");
  REQUIRE(s.best_within_budget.has_value());
  CHECK(*s.best_within_budget == "mps-100/100-sequential");
  CHECK(run_options(*find_run(s, *s.best_throughput)) ==
        "--encoder-pct 100 --decoder-pct 100 --mode sequential");
  CHECK(run_options(*find_run(s, "split 50/50")) ==
        "--encoder-pct 50 --decoder-pct 50 --mode concurrent");
  CHECK(run_options(no_mps) == "--no-mps --mode concurrent");
  CHECK(run_options(single).empty());

  // More than 1% more frames/s outweighs latency: back to back, the split wins.
  s.points[1].throughput_fps = 80.9;
  s.points[1].latency_p99_ms = 24.79;
  s.latency_budget_ms = 25;
  choose_best_runs(s);
  CHECK(*s.best_throughput == "split 50/50");
  CHECK(*s.best_within_budget == "split 50/50");
  // Within 1% it does not: the lower p99 wins.
  s.baselines[2].throughput_fps = 80.5;
  s.baselines[2].latency_p99_ms = 20.0;
  choose_best_runs(s);
  CHECK(*s.best_throughput == "mps-100/100");
  s.latency_budget_ms = 10;
  choose_best_runs(s);
  CHECK_FALSE(s.best_within_budget.has_value());

  // A run stopped before it measured a frame (Ctrl-C) has no figures, so its p99 of 0 is within
  // any budget: it must never be the recommendation.
  s.points[2].interrupted = true;
  s.points[2].throughput_fps = 0;
  s.points[2].latency_p99_ms = 0;
  choose_best_runs(s);
  CHECK_FALSE(s.best_within_budget.has_value());
  CHECK(*s.best_throughput == "mps-100/100");
  s.points[2].interrupted = false;  // no frames at all, however it ended
  s.points[2].frames = 0;
  choose_best_runs(s);
  CHECK_FALSE(s.best_within_budget.has_value());
  // The options repeat the rate and the decoder batch where they were set.
  RunReport batched = s.points[1];
  batched.rate_hz = 60;
  batched.decoder_batch = 3;
  CHECK(run_options(batched) ==
        "--encoder-pct 50 --decoder-pct 50 --mode concurrent --rate 60 --decoder-batch 3");
}

// One frame a run (--frames 1) gives each a latency and no throughput: the runs are compared by
// their latency, not all refused as if none had measured a frame.
TEST_CASE("a sweep of one frame a run still names the best run", "[orchestrator][sweep]") {
  SweepResult s;
  for (const auto& [pct, p99] : {std::pair{30, 24.0}, {50, 18.0}, {70, 21.0}}) {
    s.points.push_back(point(pct, 0, p99));
    s.points.back().frames = 1;
  }
  choose_best_runs(s);
  REQUIRE(s.best_throughput.has_value());
  CHECK(*s.best_throughput == "split 50/50");
}

TEST_CASE("a split whose share was not applied is not recommended", "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  // 60/40 ran, but its workers were not MPS clients with that share: it was not the split 60/40.
  s.points[3].split_applied = false;
  choose_best_runs(s);
  REQUIRE(s.best_throughput.has_value());
  CHECK(*s.best_throughput == "split 80/20");
}

TEST_CASE("a failed sequential baseline gives no latency comparison", "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  // One that ran gives it (p50 15.84 ms against the single process's 14.4 ms), so that its
  // absence below is the failure's doing.
  s.baselines.push_back(baseline("mps-100/100-sequential", "sequential", 58, 17.6));
  const std::string ran = printed(s);
  INFO(ran);
  CHECK(ran.find("sequential 100/100 latency vs single-process: +10.0%\n") != std::string::npos);
  s.baselines.back() =
      baseline("mps-100/100-sequential", "sequential", 0, 0, "decoder_worker died");
  s.baselines.back().latency_p50_ms = 0;
  const std::string text = printed(s);
  INFO(text);
  CHECK(text.find("mps-100/100-sequential   failed: decoder_worker died") != std::string::npos);
  CHECK(text.find("latency vs single-process") == std::string::npos);
}

TEST_CASE("the sweep's report names the options of its recommendation", "[orchestrator][sweep]") {
  SweepResult s;
  s.points = {point(50, 30.1, 18.2)};
  s.points[0].rate_hz = 29.97;  // a camera's NTSC rate, named as it was asked for
  RunReport sequential = baseline("mps-100/100-sequential", "sequential", 30.1, 13.8);
  sequential.rate_hz = 29.97;
  const RunReport single = baseline("single-process", "single-process", 78.7, 13.0);
  s.baselines = {single, sequential};
  s.latency_budget_ms = 16;
  choose_best_runs(s);

  const std::string text = printed(s);
  CHECK(text.find("best for throughput: mps-100/100-sequential") != std::string::npos);
  CHECK(text.find("best within p99 <= 16.0 ms: mps-100/100-sequential") != std::string::npos);
  CHECK(text.find("--encoder-pct 100 --decoder-pct 100 --mode sequential --rate 29.97\n") !=
        std::string::npos);
  // Back to back against 30 Hz: no ratio for the single process, and the report says why.
  CHECK(text.find("78.7        -") != std::string::npos);
  CHECK(text.find("the pipeline runs at 29.97 Hz, the single process back to back") !=
        std::string::npos);
}

TEST_CASE("sweep JSON and plot carry every split and skip failed ones in the curves",
          "[orchestrator][sweep]") {
  const SweepResult s = synthetic();
  const nlohmann::json j = nlohmann::json::parse(sweep_json(s));
  REQUIRE(j.at("points").size() == 5);
  CHECK(j.at("points").at(2).at("error") == "no correct GEMM algorithm");
  CHECK(j.at("best_throughput") == "split 60/40");
  CHECK(j.at("best_within_budget") == "split 80/20");

  const std::string dir = test::temp_dir("plot");
  write_sweep_plot(s, dir + "/sweep.svg");
  std::ifstream in(dir + "/sweep.svg");
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(svg.find("throughput") != std::string::npos);
  CHECK(svg.find("single-process") != std::string::npos);
  // Three curves (throughput, p50, p99) with one marker per successful split each.
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1))
    ++circles;
  CHECK(circles == 3 * 4);
  std::filesystem::remove_all(dir);
  // A plot that cannot be written (a full disk) is an error, not a truncated file. (/dev/full is
  // the full disk; a container without it would have the write make a plain file there.)
  if (std::filesystem::is_character_file("/dev/full")) {
    CHECK_THROWS_AS(write_sweep_plot(s, "/dev/full"), Error);
  } else {
    WARN("no /dev/full here: the full-disk check of the plot is skipped");
  }
}

// Ctrl-C during a split's warm-up leaves a run with no frames and no error: its zeros are no
// figures, so the table says it stopped and the curves skip it rather than dive to zero there.
TEST_CASE("a split stopped before it measured a frame is neither tabled nor plotted as zeros",
          "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  RunReport& stopped = s.points[3];  // 60/40
  stopped.interrupted = true;
  stopped.frames = 0;
  stopped.throughput_fps = stopped.latency_p50_ms = stopped.latency_p99_ms = 0;
  s.baselines.push_back(baseline("mps-100/100", "concurrent", 0, 0));
  s.baselines.back().interrupted = true;
  s.baselines.back().frames = 0;
  choose_best_runs(s);
  const std::string text = printed(s);
  INFO(text);
  CHECK(text.find(" 60/40     stopped before a frame was measured") != std::string::npos);
  CHECK(text.find("mps-100/100              stopped before a frame was measured") !=
        std::string::npos);

  const std::string dir = test::temp_dir("plot_stopped");
  write_sweep_plot(s, dir + "/sweep.svg");
  std::ifstream in(dir + "/sweep.svg");
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1))
    ++circles;
  CHECK(circles == 3 * 3);  // 20/80, 40/60 and 80/20
  std::filesystem::remove_all(dir);
}

// A worker that fails or hangs as it stops, after every frame, leaves its run's figures beside the
// error (a single run prints and writes them): in a sweep that run failed all the same, so it is
// tabled as failed, not recommended, and neither drawn nor counted in the plot's scales.
TEST_CASE("a run with figures and an error is tabled as failed and not plotted",
          "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  const std::string hung = "encoder_worker (pid 4242) did not stop within 30 s of being told to";
  s.points[4] = point(80, 500, 900, hung);  // 80/20: more frames/s and a higher p99 than any
  s.baselines.push_back(baseline("mps-100/100", "concurrent", 400, 8, hung));
  choose_best_runs(s);
  REQUIRE(s.best_throughput.has_value());
  CHECK(*s.best_throughput == "split 60/40");
  CHECK(!s.best_within_budget.has_value());  // 80/20 was the one within 25 ms
  const std::string text = printed(s);
  INFO(text);
  CHECK(text.find(" 80/20     failed: " + hung + "\n") != std::string::npos);
  CHECK(text.find("mps-100/100              failed: " + hung + "\n") != std::string::npos);
  CHECK(text.find("500.0") == std::string::npos);

  const std::string dir = test::temp_dir("plot_failed_with_figures");
  write_sweep_plot(s, dir + "/sweep.svg");
  std::ifstream in(dir + "/sweep.svg");
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INFO(svg);
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1))
    ++circles;
  CHECK(circles == 3 * 3);  // 20/80, 40/60 and 60/40
  CHECK(svg.find("mps-100/100") == std::string::npos);
  // The scales top out 10% above the runs drawn: 75 frames/s (60/40) and 45 ms (20/80).
  CHECK(svg.find(">82</text>") != std::string::npos);
  CHECK(svg.find(">49.5</text>") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "results with invalid UTF-8 in an error text are still written, and a failed first "
    "split does not blank the plot's title",
    "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  s.points.front().error = "worker said \xe2\x82";  // cut inside a three-byte character
  s.points.front().model.clear();
  const nlohmann::json j = nlohmann::json::parse(sweep_json(s));
  CHECK(j.at("points").at(0).at("error").get<std::string>().rfind("worker said ", 0) == 0);
  const nlohmann::json run = nlohmann::json::parse(report_json({s.points.front()}));
  CHECK(run.at("runs").size() == 1);

  const std::string dir = test::temp_dir("plot_title");
  write_sweep_plot(s, dir + "/sweep.svg");
  std::ifstream in(dir + "/sweep.svg");
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(svg.find("split sweep (pi0, V=2, C=63, concurrent)") != std::string::npos);
  std::filesystem::remove_all(dir);
}

namespace {

// A stand-in pi0_bench in `dir` that writes `json` to the file its --json names. Like pi0_bench,
// it refuses more than a million timed inferences (exit 2).
void write_stand_in_bench(const std::string& dir, const std::string& json) {
  test::write_script(dir + "/pi0_bench",
                     "while [ $# -gt 0 ]; do\n"
                     "  case \"$1\" in --json) out=\"$2\";; --iters) [ \"$2\" -gt 1000000 ] && "
                     "{ echo \"$1 too large\"; exit 2; };; esac\n  shift\ndone\n"
                     "printf '%s' '" +
                         json + "' > \"$out\"\n");
}

// A cuda run of the tiny model whose single-process baseline runs the pi0_bench found in `dir`.
ResolvedRun baseline_run(const std::string& dir) {
  ResolvedRun run;
  run.backend = "cuda";
  run.config = model_config("tiny");
  run.options.worker_dir = dir;
  run.options.run_timeout_s = 60;
  return run;
}

}  // namespace

// pi0_bench's JSON, truncated (a full disk) or from an older pi0_bench (--worker-dir), is the
// baseline's one-line failure, not an exception that ends the sweep.
TEST_CASE("a malformed pi0_bench JSON fails the single-process baseline with one line",
          "[orchestrator][sweep]") {
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("baseline-json");
  const ResolvedRun run = baseline_run(dir);
  // The third is an older pi0_bench's, before it wrote the mean and max.
  for (const std::string json :
       {"{\"iters\": 5, \"cases\": [{\"e2e_med",
        "{\"iters\": 5, \"cases\": [{\"e2e_median_ms\": 1.0}]}",
        "{\"iters\": 5, \"cases\": [{\"e2e_median_ms\": 1.0, \"e2e_p99_ms\": 2.0, "
        "\"throughput_per_s\": 9.0, \"encoder_median_ms\": 0.5, \"decoder_median_ms\": 0.5}]}"}) {
    write_stand_in_bench(dir, json);
    try {
      run_single_process_baseline(run);
      FAIL("no error");
    } catch (const Error& e) {
      const std::string what = e.what();
      CHECK(what.find("cannot read pi0_bench's JSON") != std::string::npos);
      CHECK(what.find('\n') == std::string::npos);
    }
  }
  fs::remove_all(dir);
}

// pi0_bench reports the median, p99, mean and max of its timed inferences: each is the baseline's
// figure of that name in the sweep's JSON (the max and mean were once its p99 and median).
TEST_CASE("the single-process baseline carries pi0_bench's p50, p99, mean and max apart",
          "[orchestrator][sweep]") {
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("baseline-figures");
  ResolvedRun run = baseline_run(dir);
  run.shape.views = 2;
  run.shape.chunk = 4;
  const std::string json =
      "{\"iters\": 200, \"cases\": [{\"e2e_median_ms\": 12.5, \"e2e_p99_ms\": 13.25, "
      "\"e2e_mean_ms\": 12.625, \"e2e_max_ms\": 14.75, \"throughput_per_s\": 78.5, "
      "\"host_to_host_median_ms\": 12.75, \"host_to_host_p99_ms\": 13.5, "
      "\"encoder_median_ms\": 5.25, \"decoder_median_ms\": 7.5}]}";
  write_stand_in_bench(dir, json);
  SweepResult s;
  s.baselines = {run_single_process_baseline(run)};
  const RunReport& r = s.baselines.front();
  CHECK(r.frames == 200);
  CHECK(r.latency_p50_ms == 12.5);
  CHECK(r.latency_p99_ms == 13.25);
  CHECK(r.latency_mean_ms == 12.625);
  CHECK(r.latency_max_ms == 14.75);
  const nlohmann::json latency =
      nlohmann::json::parse(sweep_json(s)).at("baselines").at(0).at("latency_ms");
  CHECK(latency.at("p50").get<double>() == 12.5);
  CHECK(latency.at("p99").get<double>() == 13.25);
  CHECK(latency.at("mean").get<double>() == 12.625);
  CHECK(latency.at("max").get<double>() == 14.75);
  fs::remove_all(dir);
}

// A sweep's runs may have up to 10^7 frames, pi0_bench at most 10^6 inferences: the baseline asks
// for no more than it takes (the stand-in refuses more, as pi0_bench does, exit 2).
TEST_CASE("the single-process baseline asks pi0_bench for no more inferences than it takes",
          "[orchestrator][sweep]") {
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("baseline-iters");
  write_stand_in_bench(dir,
                       "{\"iters\": 9, \"cases\": [{\"e2e_median_ms\": 1.0, \"e2e_p99_ms\": 2.0, "
                       "\"e2e_mean_ms\": 1.0, \"e2e_max_ms\": 2.0, \"throughput_per_s\": 9.0, "
                       "\"encoder_median_ms\": 0.5, \"decoder_median_ms\": 0.5}]}");
  ResolvedRun run = baseline_run(dir);
  run.options.frames = 2'000'000;
  CHECK(run_single_process_baseline(run).latency_p50_ms == 1.0);
  fs::remove_all(dir);
}

// The sweep's single-process baseline runs pi0_bench in a process group of its own, which a
// terminal's Ctrl-C does not reach: a stop signal to the orchestrator must end it at once, and not
// after the bench's whole run. Here a stand-in bench that sleeps, in a forked orchestrator
// process (a signal handler's state must not outlive this test).
TEST_CASE("a stop signal ends the sweep's single-process baseline at once",
          "[orchestrator][sweep]") {
  namespace fs = std::filesystem;
  using namespace std::chrono_literals;
  const std::string dir = test::temp_dir("baseline-stop");
  const std::string bench = dir + "/pi0_bench", pid_file = dir + "/bench.pid";
  {
    std::ofstream script(bench);
    script << "#!/bin/sh\necho $$ > \"" << pid_file << "\"\nexec sleep 30\n";
  }
  fs::permissions(bench, fs::perms::owner_all);
  const ResolvedRun run = baseline_run(dir);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    install_stop_handlers();
    int code = 2;  // the baseline returned
    try {
      (void)run_single_process_baseline(run);
    } catch (const std::exception& e) {
      code = std::string(e.what()).find("interrupted by signal 2") != std::string::npos ? 0 : 3;
    }
    ::_exit(code);
  }
  REQUIRE(test::eventually([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; },
                           10000ms));
  int bench_pid = 0;
  std::ifstream(pid_file) >> bench_pid;
  REQUIRE(bench_pid > 0);
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(child, SIGINT);
  int status = 0;
  const bool ended =
      test::eventually([&] { return ::waitpid(child, &status, WNOHANG) == child; }, 5000ms);
  if (!ended) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(ended);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(secs < 3.0);
  const bool bench_gone = test::eventually([&] { return ::kill(bench_pid, 0) != 0; }, 2000ms);
  if (!bench_gone) ::kill(bench_pid, SIGKILL);
  CHECK(bench_gone);
  fs::remove_all(dir);
}
