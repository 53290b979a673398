// The orchestrator binary with real worker processes on the CPU backend.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "catch.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/ipc/control_block.hpp"
#include "pi0/ipc/shm.hpp"
#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/process.hpp"
#include "pi0/reference.hpp"
#include "process_utils.hpp"
#include "scoped_env.hpp"

namespace fs = std::filesystem;
using namespace pi0;
using namespace std::chrono_literals;

namespace {

std::vector<std::string> tiny_run(std::vector<std::string> extra) {
  std::vector<std::string> args = {"--backend", "cpu", "--model", "tiny", "--quiet-workers"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// Nothing of the run `pid` is left: no worker process, no shared-memory segment.
void require_nothing_left(int pid) {
  REQUIRE(test::eventually([&] { return test::workers_of(pid).empty(); }, 1000ms));
  REQUIRE(test::segments_of(pid).empty());
}

// Starts a long tiny run and waits until both workers serve frames.
ChildProcess start_long_run(std::string& log_out, const EnvOverrides& env = {}) {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "1000000", "--warmup", "0"}), env, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 20000ms));
  std::this_thread::sleep_for(300ms);  // frames are flowing
  REQUIRE(orch.running());
  log_out = orch.output();
  return orch;
}

// Waits until the orchestrator's output has `line`, then returns the pid it logged for `worker`.
int logged_pid(ChildProcess& orch, const std::string& line, const std::string& worker) {
  REQUIRE(test::eventually([&] { return orch.output().find(line) != std::string::npos; }, 20000ms));
  const int pid = test::pid_in_log(orch.output(), worker);
  REQUIRE(pid > 0);
  return pid;
}

}  // namespace

TEST_CASE(
    "cpu pipeline actions equal the in-process reference bitwise in both modes and with busy waits",
    "[orchestrator][process]") {
  const uint64_t seed = 7;
  const std::string dir = test::temp_dir("bitwise");
  const ModelConfig config = model_config("tiny");
  RunShape shape;  // the orchestrator's defaults: V=2, C=63, P=0
  const WeightStore weights = WeightStore::random(config, shape.prompt_len, seed, WeightSet::kAll);
  const ReferenceEncoder encoder(config, weights);
  const ReferenceDecoder decoder(config, weights);
  const StageSizes sizes = stage_sizes(config, shape);
  std::vector<std::vector<float>> expected;
  for (uint64_t i = 0; i < kDistinctInputs; ++i) {
    const FrameInputs in = make_frame_inputs(config, shape, input_seed(seed), i);
    std::vector<float> kv(sizes.kv_values), actions(sizes.action_values);
    encoder.encode(shape, in.images.data(), kv.data());
    decoder.decode(shape, kv.data(), in.state.data(), in.noise.data(), actions.data());
    expected.push_back(actions);
  }
  REQUIRE(expected[0] != expected[1]);

  // Both modes under the default wait policy (adaptive), then sequential with every process
  // spinning (fewer frames: on a small CPU-only host the spinners compete with the CPU stages)
  // and with every process asleep. Those two runs keep the workers' log lines, which say how
  // each one waits.
  struct Variant {
    std::string mode, wait;  // wait: empty for the default
  };
  for (const Variant& variant : {Variant{"concurrent", ""}, Variant{"sequential", ""},
                                 Variant{"sequential", "spin"}, Variant{"sequential", "sleep"}}) {
    const std::string& mode = variant.mode;
    const std::string wait = variant.wait.empty() ? "adaptive" : variant.wait;
    const uint64_t frames = variant.wait.empty() ? 200 : 24;
    const std::string out = dir + "/actions_" + mode + "_" + wait + ".f32";
    std::vector<std::string> args =
        tiny_run({"--frames", std::to_string(frames), "--warmup", "0", "--mode", mode, "--seed",
                  std::to_string(seed), "--actions-out", out});
    if (!variant.wait.empty()) {
      args.erase(std::find(args.begin(), args.end(), "--quiet-workers"));
      // Spinning through the old flag, sleeping through the new option.
      if (wait == "spin") {
        args.push_back("--busy-wait");
      } else {
        args.insert(args.end(), {"--wait", wait});
      }
    }
    const auto run = test::run_orchestrator(args);
    INFO(run.output);
    REQUIRE(run.status.success());
    char frames_line[64];
    std::snprintf(frames_line, sizeof frames_line, "%-22s %12llu", "frames",
                  static_cast<unsigned long long>(frames));
    REQUIRE(run.output.find(frames_line) != std::string::npos);
    const std::string& policy_name = wait;
    char wait_line[64];
    std::snprintf(wait_line, sizeof wait_line, "%-22s %12s", "waiting for messages",
                  policy_name.c_str());
    CHECK(run.output.find(wait_line) != std::string::npos);
    if (!variant.wait.empty()) {
      for (const std::string worker : {"encoder", "decoder"}) {
        INFO(worker << " worker's log");
        bool logged = false;
        std::istringstream lines(run.output);
        for (std::string line; std::getline(lines, line);) {
          logged = logged || (line.find("[" + worker) != std::string::npos &&
                              line.find("waits for messages: " + policy_name) != std::string::npos);
        }
        CHECK(logged);
      }
    }
    const std::vector<float> got = test::read_floats(out);
    REQUIRE(got.size() == frames * sizes.action_values);
    size_t mismatched = 0;
    for (uint64_t f = 0; f < frames; ++f) {
      const auto& want = expected[f % kDistinctInputs];
      if (std::memcmp(got.data() + f * sizes.action_values, want.data(),
                      sizes.action_values * sizeof(float)) != 0) {
        ++mismatched;
      }
    }
    CHECK(mismatched == 0);
  }
  fs::remove_all(dir);
}

TEST_CASE("a run writes its figures as JSON", "[orchestrator][process]") {
  const std::string dir = test::temp_dir("json");
  const auto run = test::run_orchestrator(tiny_run({"--frames", "20", "--json", dir + "/r.json"}));
  REQUIRE(run.status.success());
  std::ifstream in(dir + "/r.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text.find("\"throughput_fps\"") != std::string::npos);
  CHECK(text.find("\"p99\"") != std::string::npos);
  CHECK(text.find("\"frames\": 20") != std::string::npos);
  fs::remove_all(dir);
}

// A results file that is a FIFO: with no process reading it, the run's figures are printed and the
// file is an error naming it (opening it to write used to wait for a reader for ever, after the
// run); with a reader (`--json >(jq .)`), the reader gets the JSON.
TEST_CASE("a results file that is a FIFO goes to its reader and without one is an error",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("fifo");
  const std::string fifo = dir + "/results";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const auto unread = test::run_orchestrator(tiny_run({"--frames", "3", "--json", fifo}), 60s);
  INFO(unread.output);
  CHECK(unread.status.code == 1);
  CHECK(unread.output.find("latency p50") != std::string::npos);
  CHECK(unread.output.find("orchestrator: error: cannot write " + fifo +
                           ": no process reads the FIFO") != std::string::npos);
  require_nothing_left(unread.pid);

  std::string received;
  std::thread reader([&] {
    const int fd = ::open(fifo.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    char buffer[4096];
    for (ssize_t n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) received.append(buffer, n);
    ::close(fd);
  });
  const auto read = test::run_orchestrator(tiny_run({"--frames", "3", "--json", fifo}), 60s);
  // Were the FIFO never opened, the reader would wait in open(2): a writer opened and closed here
  // lets it go with nothing read.
  const int unblock = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (unblock >= 0) ::close(unblock);
  reader.join();
  INFO(read.output);
  CHECK(read.status.success());
  REQUIRE(!received.empty());
  CHECK(nlohmann::json::parse(received).at("runs").at(0).at("frames").get<uint64_t>() == 3);
  fs::remove_all(dir);
}

// The printed report is the run's result as much as its JSON: one that could not be written (a
// full disk) is a failure, not exit 0 with no report. The JSON is still written.
TEST_CASE("a report that cannot be written to standard output fails the run",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("report_stdout");
  std::vector<std::string> args = {"-c", "exec \"$0\" \"$@\" >/dev/full", test::orchestrator_exe()};
  for (const std::string& a : tiny_run(
           {"--frames", "2", "--warmup", "0", "--json", dir + "/r.json", "--log-level", "warn"}))
    args.push_back(a);
  const CommandResult run = run_command("sh", args, {}, "", 60000ms);
  INFO(run.output);
  CHECK(run.status.code == 1);
  CHECK(run.output.find("orchestrator: error: cannot write the report to standard output") !=
        std::string::npos);
  CHECK(fs::exists(dir + "/r.json"));
  fs::remove_all(dir);
}

// The help likewise: standard output that cannot take it is one line and exit 1, not exit 0.
TEST_CASE("help that standard output cannot take is an error", "[orchestrator][cli]") {
  const CommandResult full =
      run_command("sh", {"-c", "exec \"$0\" \"$@\" >/dev/full", test::orchestrator_exe(), "--help"},
                  {}, "", 60000ms);
  INFO(full.output);
  CHECK(full.status.code == 1);
  // The reason (ENOSPC) is lost where the help overflowed the buffer and failed before the end.
  CHECK(full.output.rfind("orchestrator: error: cannot write the help to standard output", 0) == 0);
  CHECK(std::count(full.output.begin(), full.output.end(), '\n') == 1);
  const CommandResult help = run_command(test::orchestrator_exe(), {"--help"}, {}, "", 60000ms);
  CHECK(help.status.code == 0);
  CHECK(help.output.find("--rate") != std::string::npos);
}

// At a camera rate, frames complete one period apart: the throughput is the rate (frames over the
// wall time from the first arrival would count one period too few: 22 frames/s for 10 at 20 Hz).
TEST_CASE("the throughput at a camera rate is the rate, and one frame has none",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("rate_throughput");
  // The throughput a run of `frames` measured frames at 20 Hz reports in its JSON.
  const auto throughput = [&](const char* frames) {
    const auto run = test::run_orchestrator(
        tiny_run({"--frames", frames, "--warmup", "2", "--rate", "20", "--json", dir + "/r.json"}));
    REQUIRE(run.status.success());
    return nlohmann::json::parse(std::ifstream(dir + "/r.json"))
        .at("runs")
        .at(0)
        .at("throughput_fps")
        .get<double>();
  };
  const double fps = throughput("10");
  CHECK(fps > 18.5);
  CHECK(fps < 21.0);
  CHECK(throughput("1") == 0);
  // The printed report says it has none, rather than 0 frames/s.
  const auto one = test::run_orchestrator(tiny_run({"--frames", "1", "--warmup", "0"}));
  REQUIRE(one.status.success());
  INFO(one.output);
  char line[64];
  std::snprintf(line, sizeof line, "%-22s %12s\n", "throughput (frames/s)", "-");
  CHECK(one.output.find(line) != std::string::npos);
  // The report gives the rate as it was asked for: 29.97 Hz is not 30.0, nor 0.01 Hz 0.0.
  for (const char* rate : {"29.97", "0.01"}) {
    const auto at_rate =
        test::run_orchestrator(tiny_run({"--frames", "1", "--warmup", "0", "--rate", rate}));
    REQUIRE(at_rate.status.success());
    INFO(at_rate.output);
    std::snprintf(line, sizeof line, "%-22s %12s\n", "camera rate (Hz)", rate);
    CHECK(at_rate.output.find(line) != std::string::npos);
  }
  fs::remove_all(dir);
}

// A build carried to another machine (the GPU machine) has no build path there:
// PI0_TEST_ORCHESTRATOR points the tests at the carried orchestrator, which starts the workers
// beside it.
TEST_CASE("the tests run the orchestrator PI0_TEST_ORCHESTRATOR names", "[orchestrator][process]") {
  const std::string dir = test::temp_dir("carried");
  for (const char* exe : {PI0_ORCHESTRATOR_EXE, PI0_ENCODER_EXE, PI0_DECODER_EXE})
    fs::copy_file(exe, fs::path(dir) / fs::path(exe).filename());
  const std::string carried = dir + "/orchestrator", missing = dir + "/missing";
  {
    const test::ScopedEnv env("PI0_TEST_ORCHESTRATOR", carried.c_str());
    CHECK(test::orchestrator_exe() == carried);
    const auto run = test::run_orchestrator(tiny_run({"--frames", "4"}));
    INFO(run.output);
    CHECK(run.status.success());

    // Without its workers beside it, the carried orchestrator fails: it did not use the build's.
    fs::remove(fs::path(dir) / "encoder_worker");
    const auto without = test::run_orchestrator(tiny_run({"--frames", "4"}));
    INFO(without.output);
    CHECK_FALSE(without.status.success());
    CHECK(without.output.find(dir + "/encoder_worker") != std::string::npos);
  }
  {
    const test::ScopedEnv env("PI0_TEST_ORCHESTRATOR", missing.c_str());
    bool named = false;
    try {
      test::run_orchestrator(tiny_run({"--frames", "4"}));
    } catch (const Error& e) {
      named = std::string(e.what()).find(missing) != std::string::npos;
    }
    CHECK(named);
  }
  fs::remove_all(dir);
}

// A worker sends kStopped and exits; an orchestrator that saw the exit before reading the message
// reported a clean run as "died: exited with status 0" (exit 3). Looking at the stopping workers
// every 200 ms instead of every 1 ms makes that order the usual one.
TEST_CASE("workers that exit right after they stop end a clean run", "[orchestrator][process]") {
  for (int i = 0; i < 3; ++i) {
    const auto run = test::run_orchestrator(tiny_run({"--frames", "4", "--warmup", "0"}),
                                            std::chrono::seconds(120),
                                            {{"PI0_ORCHESTRATOR_STOP_POLL_MS", "200"}});
    INFO(run.output);
    REQUIRE(run.status.success());
    require_nothing_left(run.pid);
  }
}

// An orchestrator stopped (SIGSTOP, Ctrl-Z) as its workers stop, and resumed after the 30 s they
// are given, finds both kStopped waiting: the run is clean. It failed with an empty error line
// (exit 3) where it read both in the look that found the deadline passed. A slow look at the
// stopping workers (1 s) lets the workers exit before the orchestrator sees them.
TEST_CASE("an orchestrator stopped while its workers stop ends a clean run when it resumes",
          "[orchestrator][process]") {
  ChildProcess orch = ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                                          tiny_run({"--frames", "4", "--warmup", "0"}),
                                          {{"PI0_ORCHESTRATOR_STOP_POLL_MS", "1000"}}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 20000ms));
  REQUIRE(test::eventually([&] { return test::workers_of(orch.pid()).empty(); }, 20000ms));
  REQUIRE(::kill(orch.pid(), SIGSTOP) == 0);
  std::this_thread::sleep_for(31s);
  ::kill(orch.pid(), SIGCONT);
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 0);
  CHECK(orch.output().find("orchestrator: error") == std::string::npos);
  CHECK(orch.output().find("latency p50") != std::string::npos);
  require_nothing_left(orch.pid());
}

// The 30 s stop deadline starts once every frame is done: feed() drains every frame in flight under
// --frame-timeout before the workers are told to stop, so a last frame that takes longer than the
// stop deadline (here the decoder is held 34 s while it is in flight, as a slow CPU frame of the
// full model might be) but finishes within --frame-timeout is not cut off by it.
TEST_CASE("a last frame slower than the stop deadline but within --frame-timeout ends a clean run",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("slow_last_frame");
  // Frame 0 at once, frame 1 (the last) 4 s later: seconds either side of each signal below, for
  // a loaded machine.
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "2", "--warmup", "0", "--rate", "0.25",
                                    "--frame-timeout", "60", "--json", dir + "/r.json"}),
                          {}, false);
  const int decoder_pid = logged_pid(orch, "streaming frames", "decoder_worker");
  std::this_thread::sleep_for(2s);  // frame 0 is done; frame 1 arrives in 2 s
  REQUIRE(::kill(decoder_pid, SIGSTOP) == 0);
  std::this_thread::sleep_for(35s);  // frame 1 waits ~33 s for the stopped decoder
  ::kill(decoder_pid, SIGCONT);      // gone where the run was ended while it was held
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 0);
  CHECK(orch.output().find("orchestrator: error") == std::string::npos);
  REQUIRE(fs::exists(dir + "/r.json"));
  std::ifstream in(dir + "/r.json");
  const nlohmann::json report = nlohmann::json::parse(in).at("runs").at(0);
  CHECK(report["frames"] == 2);
  // The last frame really was in flight for longer than the stop deadline.
  CHECK(report["latency_ms"]["max"].get<double>() > 30000.0);
  require_nothing_left(orch.pid());
  fs::remove_all(dir);
}

// A worker that hangs after the last frame (here the encoder, stopped by SIGSTOP once it has
// handed the last frame on) is named at the stop deadline, 30 s after it was told to stop, with
// what the kernel says of it. Every frame was measured, so, as for a worker that fails after it
// stopped, the report, the JSON (its error naming the worker) and the actions are written first;
// the run then ends with exit 3, the hung worker killed and nothing left behind. (It wrote none of
// them: a long run lost every figure to a worker hung at exit.)
TEST_CASE("a worker that hangs after the last frame is named at the stop deadline",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("hung_at_stop");
  const std::string json = dir + "/r.json", actions = dir + "/actions.f32";
  ChildProcess orch = ChildProcess::spawn(
      "orchestrator", test::orchestrator_exe(),
      tiny_run({"--frames", "2", "--warmup", "0", "--rate", "0.25", "--frame-timeout", "60",
                "--json", json, "--actions-out", actions}),
      {}, false);
  const int decoder_pid = logged_pid(orch, "streaming frames", "decoder_worker");
  const int encoder_pid = logged_pid(orch, "streaming frames", "encoder_worker");
  // The decoder holds the last frame while the encoder, which has handed it on, is stopped; the
  // decoder then finishes it, and the encoder never hears the stop that follows. Frames 4 s apart
  // leave seconds either side of each signal, for a loaded machine.
  std::this_thread::sleep_for(2s);  // frame 0 is done; frame 1 arrives in 2 s
  REQUIRE(::kill(decoder_pid, SIGSTOP) == 0);
  std::this_thread::sleep_for(4s);  // frame 1 is encoded and waits for the stopped decoder
  REQUIRE(::kill(encoder_pid, SIGSTOP) == 0);
  REQUIRE(::kill(decoder_pid, SIGCONT) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  const auto status = orch.wait_for(60000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!status) ::kill(encoder_pid, SIGCONT);
  REQUIRE(status.has_value());
  const std::string output = orch.output();
  INFO(output);
  CHECK(status->code == 3);
  const std::string named = "encoder_worker (pid " + std::to_string(encoder_pid) +
                            ") did not stop within 30 s of being told to (it is stopped by a "
                            "signal)";
  const size_t error_at = output.find("orchestrator: error: " + named);
  CHECK(error_at != std::string::npos);
  CHECK(secs > 29.0);
  CHECK(secs < 40.0);
  // The figures of both frames, printed before the error line.
  char frames_line[64];
  std::snprintf(frames_line, sizeof frames_line, "%-22s %12d", "frames", 2);
  const size_t report_at = output.find(frames_line);
  CHECK(report_at != std::string::npos);
  CHECK(output.find("latency p50") != std::string::npos);
  CHECK(report_at < error_at);
  REQUIRE(fs::exists(json));
  std::ifstream in(json);
  const nlohmann::json report = nlohmann::json::parse(in).at("runs").at(0);
  CHECK(report.at("frames").get<uint64_t>() == 2);
  CHECK(report.at("latency_ms").at("p50").get<double>() > 0);
  CHECK(report.at("interrupted") == false);
  CHECK(report.at("error").get<std::string>().find(named) == 0);
  const size_t action_values = stage_sizes(model_config("tiny"), RunShape{}).action_values;
  CHECK(test::read_floats(actions).size() == 2 * action_values);
  require_nothing_left(orch.pid());
  fs::remove_all(dir);
}

// The stop poll is read when the run is set up, so a bad value stops the run before any worker
// starts, with one line naming it (it was read only as the workers stopped: every frame ran, then
// the run ended with exit 1 and no report).
TEST_CASE("a bad stop poll is refused before the workers start", "[orchestrator][process]") {
  const auto run =
      test::run_orchestrator(tiny_run({"--frames", "4", "--warmup", "0"}), std::chrono::seconds(60),
                             {{"PI0_ORCHESTRATOR_STOP_POLL_MS", "0"}});
  INFO(run.output);
  CHECK(run.status.code == 1);
  CHECK(run.output.find("PI0_ORCHESTRATOR_STOP_POLL_MS must be a whole number from 1 to 1000") !=
        std::string::npos);
  CHECK(run.output.find("started encoder_worker") == std::string::npos);
  CHECK(run.output.find("latency p50") == std::string::npos);
  require_nothing_left(run.pid);
}

// Every frame's actions are held until the run ends: a run that cannot hold them is refused
// before the workers load (it used to end in "std::bad_alloc" after loading, or the OOM killer).
TEST_CASE("actions too large to hold are refused before the workers start",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("actions");
  // 10^7 frames x 1024 x the action dim in f32: over a terabyte.
  const auto run = test::run_orchestrator(
      tiny_run({"--frames", "10000000", "--chunk", "1024", "--actions-out", dir + "/actions.bin"}));
  INFO(run.output);
  CHECK(run.status.code == 1);
  CHECK(run.output.find("--actions-out") != std::string::npos);
  CHECK(run.output.find("started encoder_worker") == std::string::npos);
  require_nothing_left(run.pid);
  fs::remove_all(dir);
}

TEST_CASE("bad percentages are rejected with one line and nothing left behind",
          "[orchestrator][cli]") {
  for (const auto& bad : std::vector<std::vector<std::string>>{
           {"--encoder-pct", "0"}, {"--decoder-pct", "101"}, {"--encoder-pct", "abc"}}) {
    const auto run = test::run_orchestrator(tiny_run(bad));
    INFO(run.output);
    CHECK_FALSE(run.status.success());
    CHECK(run.output.find(bad[0]) != std::string::npos);
    CHECK(std::count(run.output.begin(), run.output.end(), '\n') == 1);
    require_nothing_left(run.pid);
  }
}

TEST_CASE("missing truncated and misshapen weights files fail cleanly", "[orchestrator][weights]") {
  const std::string dir = test::temp_dir("weights");
  const std::string good = dir + "/tiny.safetensors";
  WeightStore::random(model_config("tiny"), 0, 3, WeightSet::kAll).save_safetensors(good);
  const auto size = fs::file_size(good);
  const std::string truncated = dir + "/truncated.safetensors";
  fs::copy_file(good, truncated);
  fs::resize_file(truncated, size / 2);

  struct Case {
    std::vector<std::string> args;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"--weights", dir + "/missing.safetensors"}, "missing.safetensors"},
      {{"--weights", truncated}, "truncated"},
      {{"--weights", good, "--model", "pi0-1l"}, "shape"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"--backend", "cpu", "--quiet-workers"};
    if (std::find(c.args.begin(), c.args.end(), "--model") == c.args.end()) {
      args.insert(args.end(), {"--model", "tiny"});
    }
    args.insert(args.end(), c.args.begin(), c.args.end());
    const auto run = test::run_orchestrator(args);
    INFO(run.output);
    CHECK(run.status.code == 1);
    CHECK(run.output.find("error:") != std::string::npos);
    CHECK(run.output.find(c.expect) != std::string::npos);
  }
  // The good file works and gives the same actions as the same seed's random weights.
  const auto with_file =
      test::run_orchestrator(tiny_run({"--weights", good, "--seed", "3", "--frames", "5",
                                       "--warmup", "0", "--actions-out", dir + "/a.f32"}));
  const auto with_seed = test::run_orchestrator(
      tiny_run({"--seed", "3", "--frames", "5", "--warmup", "0", "--actions-out", dir + "/b.f32"}));
  REQUIRE(with_file.status.success());
  REQUIRE(with_seed.status.success());
  // Both files hold the five frames' actions: two missing files would compare equal too.
  const std::vector<float> from_file = test::read_floats(dir + "/a.f32");
  CHECK(from_file.size() == 5 * stage_sizes(model_config("tiny"), RunShape{}).action_values);
  CHECK(from_file == test::read_floats(dir + "/b.f32"));
  fs::remove_all(dir);
}

// A worker's error reaches the orchestrator's one-line headline whole, not cut at the 63 bytes a
// ring message carries (it was: "failed: weights file '/tmp/pi0mps_test_long_error_...", mid-word,
// the rest only in the worker's log lines, which --log-level off hides). The orchestrator checked
// the weights file before the workers started; it is gone by the time they load it, and their
// error names its long path.
TEST_CASE("a worker error longer than a ring message reaches the headline whole",
          "[orchestrator][weights]") {
  const std::string dir = test::temp_dir("long_error");
  const std::string weights =
      dir + "/weights_with_a_name_longer_than_one_ring_message_holds.safetensors";
  WeightStore::random(model_config("tiny"), 0, 3, WeightSet::kAll).save_safetensors(weights);
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--weights", weights, "--frames", "2", "--log-level", "off"}),
                          {{"PI0_TEST_LOAD_DELAY_MS", "3000"}}, false);
  // Both workers run (so the orchestrator's check of the file is done) and wait out the delay
  // before they load it.
  REQUIRE(test::eventually([&] { return test::workers_of(orch.pid()).size() == 2; }, 20000ms));
  REQUIRE(fs::remove(weights));
  const auto status = orch.wait_for(60000ms);
  REQUIRE(status.has_value());
  const std::string output = orch.output();
  INFO(output);
  CHECK(status->code == 3);
  const std::string error =
      "weights file '" + weights + "': cannot open: No such file or directory";
  REQUIRE(error.size() > sizeof(ipc::Message::text));
  // Either worker may be the one named; the headline is the last line and ends with the error.
  CHECK(output.ends_with(") failed: " + error + "\n"));
  const size_t headline = output.rfind("orchestrator: error: ");
  REQUIRE(headline != std::string::npos);
  CHECK(output.find('\n', headline) == output.size() - 1);  // one line: no log lines appended
  require_nothing_left(orch.pid());
  fs::remove_all(dir);
}

TEST_CASE("kill -9 of a worker stops the run within a second naming it",
          "[orchestrator][process]") {
  for (const std::string victim : {"encoder_worker", "decoder_worker"}) {
    std::string log;
    ChildProcess orch = start_long_run(log);
    const int victim_pid = test::pid_in_log(log, victim);
    REQUIRE(victim_pid > 0);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(::kill(victim_pid, SIGKILL) == 0);
    const auto status = orch.wait_for(2000ms);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    REQUIRE(status.has_value());
    INFO(orch.output());
    CHECK(secs < 1.0);
    CHECK(status->code == 3);
    CHECK(orch.output().find(victim + " (pid " + std::to_string(victim_pid) +
                             ") died: killed by signal 9") != std::string::npos);
    require_nothing_left(orch.pid());
  }
}

// The file the CUDA driver keeps in /dev/shm for a worker's interprocess events is named after
// the worker's pid in hex, which a process of another container sharing /dev/shm can have too.
// The workers here make stand-ins (the CPU backend makes none) and record them as the CUDA encoder
// records the driver's; "another container's" files carry the same pids, made later.
struct EventFileStandIns {
  static std::string name(int pid, int n) {
    char text[64];
    std::snprintf(text, sizeof text, "cuda.shm.%d.%x.1", n, static_cast<unsigned>(pid));
    return text;
  }
  // The workers' own (made by them at start) and, for each, another container's of its pid.
  explicit EventFileStandIns(const std::string& log) {
    for (const char* worker : {"encoder_worker", "decoder_worker"}) {
      const int pid = test::pid_in_log(log, worker);
      REQUIRE(pid > 0);
      workers.push_back(name(pid, 0));
      REQUIRE(test::segments_named(workers.back()).size() == 1);
      foreign.push_back(name(pid, 5));
      files.push_back(ipc::SharedSegment::create(foreign.back(), 4096));
    }
    foreign.push_back(name(static_cast<int>(::getpid()), 0));  // and a live process's
    files.push_back(ipc::SharedSegment::create(foreign.back(), 4096));
  }
  void require_only_foreign_left() const {
    for (const std::string& n : workers) {
      INFO(n);
      CHECK(test::eventually([&] { return test::segments_named(n).empty(); }, 1000ms));
    }
    for (const std::string& n : foreign) {
      INFO(n);
      CHECK(test::segments_named(n).size() == 1);
    }
  }
  // Where a check above failed, the workers' stand-ins are not left behind either.
  ~EventFileStandIns() {
    for (const std::string& n : workers) ipc::SharedSegment::remove(n);
  }
  EventFileStandIns(const EventFileStandIns&) = delete;
  EventFileStandIns& operator=(const EventFileStandIns&) = delete;
  std::vector<std::string> workers, foreign;
  std::vector<ipc::SharedSegment> files;  // the foreign files, removed at scope exit
};
const EnvOverrides kEventFileStandIns = {{"PI0_TEST_CUDA_EVENT_FILE_STAND_IN", "1"}};

// With the orchestrator gone, the workers remove the files they recorded themselves.
TEST_CASE("workers exit and clean up when the orchestrator is killed", "[orchestrator][process]") {
  std::string log;
  ChildProcess orch = start_long_run(log, kEventFileStandIns);
  const int pid = orch.pid();
  REQUIRE(test::workers_of(pid).size() == 2);
  REQUIRE(test::segments_of(pid).size() == 1);
  const EventFileStandIns event_files(log);
  ::kill(pid, SIGKILL);
  REQUIRE(orch.wait_for(1000ms).has_value());
  CHECK(test::eventually([&] { return test::workers_of(pid).empty(); }, 1000ms));
  CHECK(test::eventually([&] { return test::segments_of(pid).empty(); }, 1000ms));
  event_files.require_only_foreign_left();
}

// A worker stopped (SIGSTOP) when its orchestrator is killed gets, from the kernel, SIGHUP and
// SIGCONT as its process group is orphaned: it must take that SIGHUP as the stop it is, and clean
// up as it exits. (It was ended by the SIGHUP, leaving the segment and its event files.) Both
// workers are stopped, while they serve frames and while they load. Where the workers' new parent
// shares their session the kernel sends neither signal; the SIGCONT below then lets them go on.
TEST_CASE("workers stopped when the orchestrator is killed clean up as they exit",
          "[orchestrator][process]") {
  for (const bool loading : {false, true}) {
    INFO("stopped while " << (loading ? "loading" : "serving frames"));
    EnvOverrides env = kEventFileStandIns;
    if (loading) env["PI0_TEST_LOAD_DELAY_MS"] = "30000";
    ChildProcess orch =
        ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                            tiny_run({"--frames", "1000000", "--warmup", "0"}), env, false);
    const std::string line = loading ? "started encoder_worker" : "streaming frames";
    const int encoder_pid = logged_pid(orch, line, "encoder_worker");
    const int decoder_pid = logged_pid(orch, line, "decoder_worker");
    // Each worker makes its stand-in as it starts, before it loads.
    REQUIRE(test::eventually(
        [&] {
          return test::segments_named(EventFileStandIns::name(encoder_pid, 0)).size() == 1 &&
                 test::segments_named(EventFileStandIns::name(decoder_pid, 0)).size() == 1;
        },
        5000ms));
    const EventFileStandIns event_files(orch.output());
    const int pid = orch.pid();
    REQUIRE(test::segments_of(pid).size() == 1);
    REQUIRE(::kill(encoder_pid, SIGSTOP) == 0);
    REQUIRE(::kill(decoder_pid, SIGSTOP) == 0);
    std::this_thread::sleep_for(500ms);
    CHECK((orch.output().find("streaming frames") == std::string::npos) == loading);
    ::kill(pid, SIGKILL);
    REQUIRE(orch.wait_for(5000ms).has_value());
    for (const int worker : {encoder_pid, decoder_pid}) ::kill(worker, SIGCONT);
    CHECK(test::eventually([&] { return test::workers_of(pid).empty(); }, 5000ms));
    CHECK(test::eventually([&] { return test::segments_of(pid).empty(); }, 2000ms));
    event_files.require_only_foreign_left();
  }
}

// After a run the orchestrator removes, once it has reaped its workers, the files they recorded,
// and no other file of their pids.
TEST_CASE("the orchestrator removes only the event files its workers recorded",
          "[orchestrator][process]") {
  std::string log;
  ChildProcess orch = start_long_run(log, kEventFileStandIns);
  const EventFileStandIns event_files(log);
  ::kill(orch.pid(), SIGINT);
  const auto status = orch.wait_for(5000ms);
  REQUIRE(status.has_value());
  CHECK(status->code == 130);
  require_nothing_left(orch.pid());
  event_files.require_only_foreign_left();
}

// A worker that is not the orchestrator's own child (here under a shell that does not exec it,
// as under a profiler's wrapper) must not take the orchestrator for gone: when it fails, the
// control segment stays for the orchestrator, which is alive, to remove.
// Workers under wrappers that do not exec them get no death signal from the orchestrator, and
// a killed orchestrator stays a zombie until its parent reaps it (here: this test, 4 s later).
// They must still see it gone and exit.
TEST_CASE("workers under wrappers exit when the orchestrator is killed and not yet reaped",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("wrapped");
  for (const auto& [name, exe] :
       {std::pair<std::string, std::string>{"encoder_worker", PI0_ENCODER_EXE},
        {"decoder_worker", PI0_DECODER_EXE}}) {
    test::write_script(dir + "/" + name, "\"" + exe + "\" \"$@\"\n");
  }
  ChildProcess orch = ChildProcess::spawn(
      "orchestrator", test::orchestrator_exe(),
      tiny_run({"--worker-dir", dir, "--frames", "1000000", "--warmup", "0"}), {}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 20000ms));
  const int pid = orch.pid();
  REQUIRE(::kill(pid, SIGKILL) == 0);
  // Not reaped (no poll or wait on it) while the workers are watched.
  const auto t0 = std::chrono::steady_clock::now();
  bool gone = false;
  while (!gone && std::chrono::steady_clock::now() - t0 < 4s) {
    gone = test::workers_of(pid).empty();
    std::this_thread::sleep_for(50ms);
  }
  CHECK(gone);
  REQUIRE(orch.wait_for(1000ms).has_value());
  CHECK(test::eventually([&] { return test::workers_of(pid).empty(); }, 2000ms));
  CHECK(test::eventually([&] { return test::segments_of(pid).empty(); }, 2000ms));
  fs::remove_all(dir);
}

TEST_CASE("a failing worker under a wrapper leaves a live orchestrator's segment alone",
          "[orchestrator][process]") {
  const std::string name = ipc::unique_segment_name("ctl");
  ipc::SharedSegment segment = ipc::SharedSegment::create(name, 4096);  // not a control block
  ipc::WorkerOptions options;
  options.control_name = name;
  options.config = model_config(options.model);
  options.parent_pid = static_cast<int>(::getpid());
  std::vector<std::string> args = {"-c", "\"$0\" \"$@\"; exit $?", PI0_DECODER_EXE};
  for (const std::string& a : ipc::worker_arguments(options)) args.push_back(a);
  ChildProcess wrapper = ChildProcess::spawn("wrapper", "/bin/sh", args, {}, false);
  const auto status = wrapper.wait_for(10000ms);
  REQUIRE(status.has_value());
  INFO(wrapper.output());
  CHECK(status->code == 1);
  // It failed on the segment itself (not, say, on its command line), and left it.
  CHECK(wrapper.output().find("control segment " + name) != std::string::npos);
  CHECK(test::segments_named(name).size() == 1);
}

TEST_CASE("SIGINT drains the frames in flight and exits cleanly", "[orchestrator][process]") {
  std::string log;
  ChildProcess orch = start_long_run(log);
  ::kill(orch.pid(), SIGINT);
  const auto status = orch.wait_for(5000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 130);
  CHECK(orch.output().find("draining") != std::string::npos);
  CHECK(orch.output().find("interrupted") != std::string::npos);
  require_nothing_left(orch.pid());
}

// A worker that never answers must not keep the run from hearing the user: with the encoder
// stopped (SIGSTOP), the first SIGINT starts a drain that cannot end, and the second stops the run
// at once, with the signal's status and nothing left behind (the stopped worker killed too).
TEST_CASE("a second stop signal ends a run whose worker hangs", "[orchestrator][process]") {
  std::string log;
  ChildProcess orch = start_long_run(log);
  const int encoder_pid = test::pid_in_log(log, "encoder_worker");
  REQUIRE(encoder_pid > 0);
  REQUIRE(::kill(encoder_pid, SIGSTOP) == 0);
  std::this_thread::sleep_for(200ms);
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(orch.pid(), SIGINT);
  REQUIRE(test::eventually([&] { return orch.output().find("draining") != std::string::npos; },
                           2000ms));
  CHECK(orch.running());
  ::kill(orch.pid(), SIGINT);
  const auto status = orch.wait_for(5000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!status) ::kill(encoder_pid, SIGCONT);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 130);
  CHECK(secs < 4.0);
  CHECK(orch.output().find("stopped by a second signal") != std::string::npos);
  require_nothing_left(orch.pid());
}

// A worker that says it stopped and then does not exit (hung in its teardown; here a wrapper
// that sleeps after the encoder) is given 10 s to exit: a second stop signal in that time still
// stops the run at once, with no report or results files. (It was heard only after those 10 s,
// and the report and JSON were written.)
TEST_CASE("a second stop signal ends a run whose worker hangs after it stopped",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("hung_exit");
  test::write_script(dir + "/encoder_worker",
                     "\"" + std::string(PI0_ENCODER_EXE) + "\" \"$@\"\nexec sleep 30\n");
  test::write_script(dir + "/decoder_worker",
                     "exec \"" + std::string(PI0_DECODER_EXE) + "\" \"$@\"\n");
  const std::string json = dir + "/r.json";
  std::vector<std::string> args =
      tiny_run({"--worker-dir", dir, "--frames", "2", "--warmup", "0", "--json", json});
  args.erase(std::find(args.begin(), args.end(), "--quiet-workers"));  // their lines say "stopped"
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(), args, {}, false);
  REQUIRE(test::eventually(
      [&] {
        const std::string out = orch.output();
        return out.find("encoder stopped") != std::string::npos &&
               out.find("decoder stopped") != std::string::npos;
      },
      30000ms));
  std::this_thread::sleep_for(1s);  // the orchestrator waits for the encoder's wrapper to exit
  REQUIRE(orch.running());
  ::kill(orch.pid(), SIGINT);
  std::this_thread::sleep_for(1s);
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(orch.pid(), SIGINT);
  const auto status = orch.wait_for(20000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 130);
  CHECK(secs < 5.0);
  CHECK(orch.output().find("stopped by a second signal while the workers were stopping") !=
        std::string::npos);
  CHECK(orch.output().find("latency p50") == std::string::npos);
  CHECK_FALSE(fs::exists(json));
  require_nothing_left(orch.pid());
  fs::remove_all(dir);
}

// A worker that hangs (here stopped by SIGSTOP) ends the run at --frame-timeout, and the line
// says what the kernel says of each worker, so the stopped one can be found.
TEST_CASE("a frame timeout says what each worker is doing", "[orchestrator][process]") {
  ChildProcess orch = ChildProcess::spawn(
      "orchestrator", test::orchestrator_exe(),
      tiny_run({"--frames", "1000000", "--warmup", "0", "--frame-timeout", "1"}), {}, false);
  const int decoder_pid = logged_pid(orch, "streaming frames", "decoder_worker");
  const int encoder_pid = logged_pid(orch, "streaming frames", "encoder_worker");
  REQUIRE(::kill(decoder_pid, SIGSTOP) == 0);
  const auto status = orch.wait_for(10000ms);
  if (!status) ::kill(decoder_pid, SIGCONT);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 3);
  CHECK(orch.output().find("no frame finished within 1 s") != std::string::npos);
  CHECK(orch.output().find("decoder_worker (pid " + std::to_string(decoder_pid) +
                           ") is stopped by a signal") != std::string::npos);
  CHECK(orch.output().find("encoder_worker (pid " + std::to_string(encoder_pid) + ") is ") !=
        std::string::npos);
  require_nothing_left(orch.pid());
}

// The startup timeout's line, like the frame timeout's, says what the kernel says of the late
// worker: here one stopped by SIGSTOP while it loads.
TEST_CASE("a startup timeout says what the late worker is doing", "[orchestrator][process]") {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "2", "--warmup", "0", "--startup-timeout", "2"}),
                          {{"PI0_TEST_LOAD_DELAY_MS", "1000"}}, false);
  const int encoder_pid = logged_pid(orch, "started encoder_worker", "encoder_worker");
  REQUIRE(::kill(encoder_pid, SIGSTOP) == 0);
  const auto status = orch.wait_for(20000ms);
  if (!status) ::kill(encoder_pid, SIGCONT);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 3);
  CHECK(orch.output().find("encoder_worker (pid " + std::to_string(encoder_pid) +
                           ") did not report ready within 2 s (it is stopped by a signal)") !=
        std::string::npos);
  require_nothing_left(orch.pid());
}

// At a camera rate frames keep arriving behind a stuck one: those are no progress, so the frame
// timeout still runs from the last frame that finished, and not only once every slot is full
// (here that would be seven more periods of 1 s).
TEST_CASE("a frame timeout at a camera rate counts from the last frame that finished",
          "[orchestrator][process]") {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "1000000", "--warmup", "0", "--rate", "1",
                                    "--slots", "8", "--frame-timeout", "1"}),
                          {}, false);
  const int decoder_pid = logged_pid(orch, "streaming frames", "decoder_worker");
  std::this_thread::sleep_for(300ms);  // the first frame is done; the next arrives in 0.7 s
  REQUIRE(::kill(decoder_pid, SIGSTOP) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  const auto status = orch.wait_for(15000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!status) ::kill(decoder_pid, SIGCONT);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 3);
  CHECK(orch.output().find("no frame finished within 1 s") != std::string::npos);
  // ~3 s: the next arrival, the timeout and the workers' shutdown; the old count from each
  // arrival named the hang only once the eight slots were full, after ~9 s.
  CHECK(secs < 6.0);
  require_nothing_left(orch.pid());
}

// The actions file of a run stopped early holds the frames that finished, as many as its JSON
// counts (no warm-up here), and not zeros for the frames that never ran.
TEST_CASE("an interrupted run writes the actions of the frames that finished",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("interrupted");
  const std::string json = dir + "/run.json", actions = dir + "/actions.f32";
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "3000", "--warmup", "0", "--rate", "100", "--json",
                                    json, "--actions-out", actions}),
                          {}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 20000ms));
  std::this_thread::sleep_for(500ms);
  ::kill(orch.pid(), SIGINT);
  const auto status = orch.wait_for(5000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 130);
  std::ifstream in(json);
  const nlohmann::json report = nlohmann::json::parse(in).at("runs").at(0);
  const uint64_t frames = report.at("frames").get<uint64_t>();
  CHECK(report.at("interrupted").get<bool>());
  CHECK(frames > 0);
  CHECK(frames < 3000);
  const StageSizes sizes = stage_sizes(model_config("tiny"), RunShape{});
  CHECK(fs::file_size(actions) == frames * sizes.action_values * sizeof(float));
  require_nothing_left(orch.pid());
  fs::remove_all(dir);
}

// Exit 1 means bad input; a run stopped by a signal exits 128 + the signal at any point, the
// workers' start (seconds for pi0-1l's weights on the CPU) included, and SIGHUP (a closed
// terminal) stops it the same way, so that nothing (an MPS daemon we started) is left behind.
// Loading checks nothing (pi0's weights take tens of seconds; here a 20 s stand-in): a worker
// whose orchestrator is killed meanwhile must still end at once, and remove the segment.
TEST_CASE("workers that are still loading exit when the orchestrator is killed",
          "[orchestrator][process]") {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(), tiny_run({"--frames", "2"}),
                          {{"PI0_TEST_LOAD_DELAY_MS", "20000"}}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("started encoder_worker") != std::string::npos; }, 20000ms));
  const int pid = orch.pid();
  REQUIRE(test::eventually([&] { return test::workers_of(pid).size() == 2; }, 2000ms));
  std::this_thread::sleep_for(300ms);  // both in their loads
  const bool still_starting = orch.output().find("streaming frames") == std::string::npos;
  ::kill(pid, SIGKILL);
  REQUIRE(orch.wait_for(1000ms).has_value());
  INFO("killed while starting: " << still_starting << "\n" << orch.output());
  CHECK(still_starting);
  CHECK(test::eventually([&] { return test::workers_of(pid).empty(); }, 2000ms));
  CHECK(test::eventually([&] { return test::segments_of(pid).empty(); }, 2000ms));
}

// A worker told to stop while it loads (tens of seconds for pi0's weights; an 8 s stand-in here)
// stops at once, instead of loading, reporting ready and only then stopping.
TEST_CASE("a worker told to stop while it loads stops at once", "[orchestrator][process]") {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(), tiny_run({"--frames", "2"}),
                          {{"PI0_TEST_LOAD_DELAY_MS", "8000"}}, false);
  const int encoder_pid = logged_pid(orch, "started encoder_worker", "encoder_worker");
  std::this_thread::sleep_for(300ms);  // in its load
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(encoder_pid, SIGTERM) == 0);
  const auto status = orch.wait_for(20000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(secs < 3.0);
  CHECK(status->code == 3);
  CHECK(orch.output().find("stop signalled while loading") != std::string::npos);
  CHECK(orch.output().find("encoder_worker (pid " + std::to_string(encoder_pid) + ") died") !=
        std::string::npos);
  CHECK(orch.output().find("streaming frames") == std::string::npos);
  require_nothing_left(orch.pid());
}

TEST_CASE("a stop signal while the workers start exits with the signal's status",
          "[orchestrator][process]") {
  for (const int sig : {SIGINT, SIGHUP}) {
    ChildProcess orch = ChildProcess::spawn(
        "orchestrator", test::orchestrator_exe(),
        {"--backend", "cpu", "--model", "pi0-1l", "--quiet-workers", "--frames", "2"}, {}, false);
    REQUIRE(test::eventually(
        [&] { return orch.output().find("started encoder_worker") != std::string::npos; },
        20000ms));
    const bool still_starting = orch.output().find("streaming frames") == std::string::npos;
    ::kill(orch.pid(), sig);
    const auto status = orch.wait_for(20000ms);
    REQUIRE(status.has_value());
    INFO("signal " << sig << ", sent while starting: " << still_starting << "\n" << orch.output());
    CHECK(still_starting);
    CHECK(status->code == 128 + sig);
    require_nothing_left(orch.pid());
  }
}

// Whether both workers of the tiny run `orchestrator_pid` (default shape and slots, `frames` in
// all) have messages waiting in their rings to the orchestrator (what a worker sends first is its
// "ready").
bool both_workers_sent(int orchestrator_pid, uint64_t frames) {
  const auto names = test::segments_of(orchestrator_pid);
  if (names.size() != 1) return false;
  try {
    ipc::ControlBlock control = ipc::ControlBlock::open(
        names[0], ipc::compute_layout(model_config("tiny"), RunShape{}, 2, frames, true));
    return control.ring(ipc::RingId::kEncoderToOrch).size_approx() > 0 &&
           control.ring(ipc::RingId::kDecoderToOrch).size_approx() > 0;
  } catch (const Error&) {
    return false;
  }
}

// An orchestrator that is itself stopped (SIGSTOP, or Ctrl-Z: the workers have process groups of
// their own and go on) while its workers load finds their "ready" waiting when it resumes. Resumed
// past --startup-timeout, it named a worker that had reported ready in time as one that "did not
// report ready within 2 s" (exit 3).
TEST_CASE("an orchestrator stopped while the workers start goes on when it resumes",
          "[orchestrator][process]") {
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(),
                          tiny_run({"--frames", "4", "--warmup", "0", "--startup-timeout", "2"}),
                          {{"PI0_TEST_LOAD_DELAY_MS", "1000"}}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("started encoder_worker") != std::string::npos; }, 20000ms));
  std::this_thread::sleep_for(100ms);  // its startup deadline set; the workers are loading
  REQUIRE(::kill(orch.pid(), SIGSTOP) == 0);
  const auto stopped_at = std::chrono::steady_clock::now();
  // Both "ready" wait unread, and then the deadline passes with the orchestrator still stopped.
  const bool ready_waiting =
      test::eventually([&] { return both_workers_sent(orch.pid(), 4); }, 20000ms);
  std::this_thread::sleep_until(stopped_at + 3s);
  ::kill(orch.pid(), SIGCONT);
  REQUIRE(ready_waiting);
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 0);
  CHECK(orch.output().find("did not report ready") == std::string::npos);
  CHECK(orch.output().find("streaming frames") != std::string::npos);
  require_nothing_left(orch.pid());
}

// Under nohup (SIGHUP ignored), or as a background job of a shell (SIGINT and SIGQUIT ignored),
// those signals must not stop the run: the caller meant it to outlive them.
TEST_CASE("stop signals the caller ignores stay ignored", "[orchestrator][process]") {
  std::vector<std::string> args = {"-c", "trap '' HUP INT QUIT; exec \"$0\" \"$@\"",
                                   test::orchestrator_exe()};
  for (const std::string& a : tiny_run({"--frames", "40", "--warmup", "0", "--rate", "20"}))
    args.push_back(a);
  ChildProcess orch = ChildProcess::spawn("orchestrator", "/bin/sh", args, {}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 20000ms));
  for (const int sig : {SIGHUP, SIGINT, SIGQUIT}) REQUIRE(::kill(orch.pid(), sig) == 0);
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 0);
  CHECK(orch.output().find("draining") == std::string::npos);
  CHECK(orch.output().find("interrupted") == std::string::npos);
  require_nothing_left(orch.pid());
}

TEST_CASE("a worker that fails to start is named with its status and last lines",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("badworker");
  test::write_script(dir + "/encoder_worker", "echo 'cannot open the camera driver' >&2\nexit 7\n");
  fs::create_symlink(fs::path(PI0_DECODER_EXE), dir + "/decoder_worker");
  const auto run = test::run_orchestrator(tiny_run({"--worker-dir", dir, "--frames", "5"}), 30s);
  INFO(run.output);
  CHECK(run.status.code == 3);
  CHECK(run.output.find("encoder_worker (pid") != std::string::npos);
  CHECK(run.output.find("exited with status 7") != std::string::npos);
  CHECK(run.output.find("cannot open the camera driver") != std::string::npos);
  CHECK(run.seconds < 5);
  fs::remove_all(dir);
}

// A worker that stops and then exits badly (say, a crash in its driver's teardown) has done its
// frames: the run prints and writes its figures, then ends with exit 3 naming the worker, and
// so whether the orchestrator sees the exit or the worker's "stopped" message first.
TEST_CASE("a worker that fails after it stopped leaves the figures and exit 3",
          "[orchestrator][process]") {
  const std::string dir = test::temp_dir("teardown");
  test::write_script(dir + "/decoder_worker",
                     std::string("\"") + PI0_DECODER_EXE +
                         "\" \"$@\"\necho 'driver teardown failed' >&2\nexit 7\n");
  fs::create_symlink(fs::path(PI0_ENCODER_EXE), dir + "/encoder_worker");
  const std::string json = dir + "/run.json";
  for (int round = 0; round < 3; ++round) {
    fs::remove(json);
    const auto run = test::run_orchestrator(
        tiny_run({"--worker-dir", dir, "--frames", "5", "--warmup", "0", "--json", json}), 30s);
    INFO("round " << round << "\n" << run.output);
    CHECK(run.status.code == 3);
    CHECK(run.output.find("decoder_worker (pid") != std::string::npos);
    CHECK(run.output.find("stopped, then did not exit cleanly: exited with status 7") !=
          std::string::npos);
    CHECK(run.output.find("driver teardown failed") != std::string::npos);
    CHECK(run.output.find("latency p50") != std::string::npos);
    REQUIRE(fs::exists(json));
    std::ifstream in(json);
    const nlohmann::json report = nlohmann::json::parse(in).at("runs").at(0);
    CHECK(report.at("frames").get<uint64_t>() == 5);
    CHECK(report.at("error").get<std::string>().find("decoder_worker") != std::string::npos);
    require_nothing_left(run.pid);
  }
  fs::remove_all(dir);
}

// A worker that dies or fails after it was told to stop, before it says it stopped, has done its
// frames too: the run prints and writes every figure and the actions, then ends with exit 3 and
// the line naming the worker, with nothing left behind. (Such a run printed and wrote nothing.)
// PI0_TEST_AT_STOP, set for one worker by its wrapper, kills the decoder with SIGKILL, or fails
// the encoder with an error message, where each would say it stopped.
TEST_CASE("a worker that dies or fails as it stops leaves the figures and exit 3",
          "[orchestrator][process]") {
  struct Variant {
    std::string worker, at_stop, line;
  };
  for (const Variant& v : {Variant{"decoder_worker", "kill", "died: killed by signal 9 (SIGKILL)"},
                           Variant{"encoder_worker", "error",
                                   "failed: told to stop: failing (PI0_TEST_AT_STOP=error)"}}) {
    const std::string dir = test::temp_dir("fails_at_stop_" + v.at_stop);
    for (const std::string worker : {"encoder_worker", "decoder_worker"}) {
      const std::string exe = worker == "encoder_worker" ? PI0_ENCODER_EXE : PI0_DECODER_EXE;
      if (worker == v.worker) {
        test::write_script(dir + "/" + worker,
                           "PI0_TEST_AT_STOP=" + v.at_stop + " exec \"" + exe + "\" \"$@\"\n");
      } else {
        fs::create_symlink(fs::path(exe), dir + "/" + worker);
      }
    }
    const std::string json = dir + "/r.json", actions = dir + "/actions.f32";
    const auto run =
        test::run_orchestrator(tiny_run({"--worker-dir", dir, "--frames", "5", "--warmup", "0",
                                         "--json", json, "--actions-out", actions}),
                               60s);
    INFO(v.worker << " " << v.at_stop << "\n" << run.output);
    CHECK(run.status.code == 3);
    const int pid = test::pid_in_log(run.output, v.worker);
    REQUIRE(pid > 0);
    const std::string named = v.worker + " (pid " + std::to_string(pid) + ") " + v.line;
    const size_t error_at = run.output.find("orchestrator: error: " + named);
    CHECK(error_at != std::string::npos);
    // The figures of every frame, printed before the error line.
    char frames_line[64];
    std::snprintf(frames_line, sizeof frames_line, "%-22s %12d", "frames", 5);
    const size_t report_at = run.output.find(frames_line);
    CHECK(report_at != std::string::npos);
    CHECK(run.output.find("latency p50") != std::string::npos);
    CHECK(report_at < error_at);
    REQUIRE(fs::exists(json));
    std::ifstream in(json);
    const nlohmann::json report = nlohmann::json::parse(in).at("runs").at(0);
    CHECK(report.at("frames").get<uint64_t>() == 5);
    CHECK(report.at("latency_ms").at("p50").get<double>() > 0);
    CHECK(report.at("error").get<std::string>().find(named) == 0);
    const size_t action_values = stage_sizes(model_config("tiny"), RunShape{}).action_values;
    CHECK(test::read_floats(actions).size() == 5 * action_values);
    require_nothing_left(run.pid);
    // A results file that cannot be written (a full disk) is told too, but does not hide the
    // worker's failure: both lines, exit 3 (it was exit 1 with only the write error).
    if (fs::is_character_file("/dev/full")) {
      const auto full =
          test::run_orchestrator(tiny_run({"--worker-dir", dir, "--frames", "5", "--warmup", "0",
                                           "--json", "/dev/full", "--actions-out", actions}),
                                 60s);
      INFO(full.output);
      CHECK(full.status.code == 3);
      CHECK(full.output.find("orchestrator: error: cannot write /dev/full") != std::string::npos);
      const int full_pid = test::pid_in_log(full.output, v.worker);
      REQUIRE(full_pid > 0);
      CHECK(full.output.find("orchestrator: error: " + v.worker + " (pid " +
                             std::to_string(full_pid) + ") " + v.line) != std::string::npos);
      CHECK(test::read_floats(actions).size() == 5 * action_values);
      require_nothing_left(full.pid);
    } else {
      WARN("no /dev/full here: the unwritable-results case of the failure at the stop is skipped");
    }
    fs::remove_all(dir);
  }
}

// A decoder that reports a frame done which is not in flight in that slot (here, each frame as the
// next one, through the decoder's test hook) misbehaves as one that sends a malformed message
// does: the run ends at once with exit 3 and one line naming it, not as bad input (exit 1).
TEST_CASE("a decoder that reports a frame not in flight is named and the run ends with exit 3",
          "[orchestrator][process]") {
  for (const std::string mode : {"sequential", "concurrent"}) {
    const auto run = test::run_orchestrator(
        tiny_run({"--mode", mode, "--frames", "20", "--warmup", "0", "--frame-timeout", "30"}), 60s,
        {{"PI0_TEST_DECODER_REPORT_FRAME_OFFSET", "1"}});
    INFO(mode << "\n" << run.output);
    CHECK(run.status.code == 3);
    const int decoder_pid = test::pid_in_log(run.output, "decoder_worker");
    REQUIRE(decoder_pid > 0);
    CHECK(run.output.find("error: decoder_worker (pid " + std::to_string(decoder_pid) +
                          ") reported frame 1 done in input slot") != std::string::npos);
    CHECK(run.output.find("where that frame is not in flight") != std::string::npos);
    CHECK(run.seconds < 10);
    require_nothing_left(run.pid);
  }
}

// A frame number far past the run's end is refused by the message's validation, before it could
// index anything, and is the decoder's failure as well.
TEST_CASE("a decoder that reports a frame out of range is named and the run ends with exit 3",
          "[orchestrator][process]") {
  const auto run = test::run_orchestrator(
      tiny_run({"--frames", "5", "--warmup", "0", "--frame-timeout", "30"}), 60s,
      {{"PI0_TEST_DECODER_REPORT_FRAME_OFFSET", std::to_string(1ull << 40)}});
  INFO(run.output);
  CHECK(run.status.code == 3);
  const int decoder_pid = test::pid_in_log(run.output, "decoder_worker");
  REQUIRE(decoder_pid > 0);
  CHECK(run.output.find("error: decoder_worker (pid " + std::to_string(decoder_pid) +
                        ") sent a malformed message: frame " + std::to_string(1ull << 40) +
                        " out of range (max 5) in FrameDone") != std::string::npos);
  CHECK(run.seconds < 10);
  require_nothing_left(run.pid);
}

// A worker that fails sends kError, then exits. An orchestrator that saw the exit before it read
// the message named the failure "died: exited with status 1", leaving out why. Here the
// orchestrator is stopped (SIGSTOP) while the encoder rejects a message from the segment and
// exits, so that it is sure to see the exit first when it resumes.
TEST_CASE("a worker that fails and exits at once is named with its error and not its exit status",
          "[orchestrator][process]") {
  const std::vector<std::string> args =
      tiny_run({"--views", "1", "--chunk", "4", "--slots", "2", "--frames", "100000", "--warmup",
                "0", "--rate", "5", "--frame-timeout", "60"});
  ChildProcess orch =
      ChildProcess::spawn("orchestrator", test::orchestrator_exe(), args, {}, false);
  const int encoder_pid = logged_pid(orch, "streaming frames", "encoder_worker");
  const std::vector<std::string> segments = test::segments_of(orch.pid());
  REQUIRE(segments.size() == 1);
  RunShape shape;
  shape.views = 1;
  shape.chunk = 4;
  ipc::ControlBlock control = ipc::ControlBlock::open(
      segments[0], ipc::compute_layout(model_config("tiny"), shape, 2, 100000, true));

  REQUIRE(::kill(orch.pid(), SIGSTOP) == 0);
  // The orchestrator is stopped: the test is the ring's only producer now.
  ipc::Message bad = ipc::make_message(ipc::MsgType::kFrameInput, ipc::Role::kOrchestrator);
  bad.magic = 0xdeadbeef;
  REQUIRE(control.ring(ipc::RingId::kOrchToEncoder).try_push(bad));
  const bool encoder_exited = test::eventually(
      [&] { return process_state(encoder_pid) == "exited, not yet reaped"; }, 20000ms);
  ::kill(orch.pid(), SIGCONT);
  REQUIRE(encoder_exited);
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  INFO(orch.output());
  CHECK(status->code == 3);
  CHECK(orch.output().find("error: encoder_worker (pid " + std::to_string(encoder_pid) +
                           ") failed: rejected a message from the orchestrator: bad magic "
                           "0xdeadbeef") != std::string::npos);
  CHECK(orch.output().find(") died: ") == std::string::npos);
  control = ipc::ControlBlock();
  require_nothing_left(orch.pid());
}

TEST_CASE("segments left by dead runs are removed when a run starts", "[orchestrator][ipc]") {
  ChildProcess gone = ChildProcess::spawn("true", "/bin/true", {}, {}, false);
  REQUIRE(gone.wait_for(5000ms).has_value());
  const std::string name = ipc::segment_name_of(gone.pid(), "ctl");
  const int fd = ::shm_open(("/" + name).c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  REQUIRE(fd >= 0);
  ::close(fd);
  REQUIRE(test::segments_named(name).size() == 1);
  const auto run = test::run_orchestrator(tiny_run({"--frames", "3"}));
  REQUIRE(run.status.success());
  CHECK(test::segments_named(name).empty());
}

TEST_CASE("the cuda backend without a GPU is a one-line error", "[orchestrator][cli]") {
  std::string why;
  const bool gpu = cuda::cuda_device_present(&why);
  const auto run = test::run_orchestrator(
      {"--backend", "cuda", "--model", "tiny", "--frames", "3", "--no-mps", "--quiet-workers"});
  INFO(run.output);
  if (gpu) {
    CHECK(run.status.success());
  } else {
    CHECK(run.status.code == 1);
    CHECK(run.output.find("--backend cuda: no usable CUDA GPU") != std::string::npos);
    CHECK(std::count(run.output.begin(), run.output.end(), '\n') == 1);
    CHECK(test::segments_of(run.pid).empty());
  }
}

// --gpu names the devices the workers get; one that is not there (99 on any host) is bad input,
// found before a worker starts, and not a quiet fall-back to the CPU.
TEST_CASE("a --gpu that names no usable GPU is a one-line error", "[orchestrator][cli]") {
  for (const std::vector<std::string>& backend :
       {std::vector<std::string>{}, std::vector<std::string>{"--backend", "cuda"}}) {
    std::vector<std::string> args = {"--gpu", "99", "--frames", "1"};
    args.insert(args.end(), backend.begin(), backend.end());
    const auto run = test::run_orchestrator(args, 30s);
    INFO(run.output);
    CHECK(run.status.code == 1);
    // Without a GPU (CI) no GPU is usable at all; with one, device 99 is not there.
    CHECK((run.output.find("--gpu 99: no usable CUDA GPU") != std::string::npos ||
           run.output.find("--gpu 99: there is no CUDA device 99") != std::string::npos));
    CHECK(run.output.find("started encoder_worker") == std::string::npos);
  }
}

// The CPU backend's workers use no GPU: a --gpu beside it was dropped without a word, and the
// run went on as if the GPU had been given.
TEST_CASE("a --gpu beside the CPU backend is a bad command line", "[orchestrator][cli]") {
  const auto run = test::run_orchestrator(
      {"--backend", "cpu", "--gpu", "0", "--model", "tiny", "--frames", "1", "--warmup", "0"}, 30s);
  INFO(run.output);
  CHECK(run.status.code == 2);
  CHECK(run.output ==
        "orchestrator: error: --gpu 0 names the workers' GPU, which --backend cpu does not use: "
        "drop one of them\n");
  CHECK(test::segments_of(run.pid).empty());
}

TEST_CASE("a sweep on the CPU backend is refused", "[orchestrator][cli]") {
  const auto run = test::run_orchestrator(tiny_run({"--sweep"}));
  INFO(run.output);
  CHECK(run.status.code == 1);
  CHECK(run.output.find("--sweep needs the cuda backend") != std::string::npos);
}

TEST_CASE("a run that outlasts --run-timeout stops with that reason and leaves nothing",
          "[orchestrator][process]") {
  const auto t0 = std::chrono::steady_clock::now();
  ChildProcess orch = ChildProcess::spawn(
      "orchestrator", test::orchestrator_exe(),
      tiny_run({"--frames", "10000000", "--warmup", "0", "--run-timeout", "3"}), {}, false);
  const auto status = orch.wait_for(20000ms);
  REQUIRE(status.has_value());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(orch.output());
  CHECK(secs >= 3.0);
  CHECK(secs < 8.0);
  CHECK(status->code == 3);
  CHECK(orch.output().find("took longer than --run-timeout 3 s") != std::string::npos);
  require_nothing_left(orch.pid());
}
