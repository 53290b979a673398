// Command-line parsing and process plumbing of the orchestrator library.
#include <filesystem>
#include <fstream>
#include <optional>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "catch.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/mps.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/process.hpp"
#include "pi0/weights.hpp"
#include "process_utils.hpp"

using namespace pi0;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

std::optional<RunOptions> parse(std::vector<std::string> args, int& code) {
  args.insert(args.begin(), "orchestrator");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  code = 0;
  return parse_command_line(static_cast<int>(argv.size()), argv.data(), code);
}

// What a worker parses from the command line the orchestrator builds for it.
ipc::WorkerOptions worker_round_trip(const ipc::WorkerOptions& options, ipc::Role role) {
  std::vector<std::string> args = ipc::worker_arguments(options);
  args.insert(args.begin(), "worker");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return ipc::parse_worker_arguments(role, static_cast<int>(argv.size()), argv.data());
}

// A stand-in for nvidia-cuda-mps-control: "-d" starts a "daemon" (a state file, and a pid file as
// the real one keeps), commands on stdin answer only while it runs, "quit" stops it.
// `-d` starts a daemon, fails, or fails because another run's daemon started in the same instant
// (which then answers).
enum class FakeStart { kStarts, kFails, kLosesRace };

std::string fake_mps_control(const std::string& dir, FakeStart start = FakeStart::kStarts) {
  const std::string path = dir + "/fake-mps-control";
  std::ofstream script(path);
  const bool start_fails = start != FakeStart::kStarts;
  script << "#!/bin/sh\n"
            "state=\"$CUDA_MPS_PIPE_DIRECTORY/daemon\"\n"
            "if [ \"$1\" = \"-d\" ]; then\n"
         << (start == FakeStart::kLosesRace ? "  echo up > \"$state\"\n" : "")
         << (start_fails ? "  echo 'An instance of this daemon is already running' >&2; exit 1\n"
                         : "")
         << "  echo up > \"$state\"; echo start >> \"$CUDA_MPS_PIPE_DIRECTORY/starts\"\n"
            "  echo $$ > \"$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid\"; exit 0\n"
            "fi\n"
            "[ -f \"$state\" ] || { echo 'Cannot find MPS control daemon process' >&2; exit 1; }\n"
            "read cmd\n"
            "case \"$cmd\" in get_server_list) exit 0;;\n"
            "  quit) rm -f \"$state\" \"$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid\"; "
            "exit 0;;\n"
            "esac\n"
            "exit 1\n";
  script.close();
  fs::permissions(path, fs::perms::owner_all);
  return path;
}

}  // namespace

// Runs sharing a daemon find each other's lock beside its pipe directory, however it is written.
TEST_CASE("the MPS directories are normalised, and a sweep needs MPS", "[orchestrator][cli]") {
  const std::string dir = test::temp_dir("mps_dirs");
  fs::create_directories(dir + "/real");
  fs::create_directory_symlink(dir + "/real", dir + "/link");
  int code = 0;
  for (const std::string& spelling :
       {dir + "/real/", dir + "/real//", dir + "/./real", dir + "/link", dir + "/x/../real"}) {
    const auto o =
        parse({"--mps-pipe-dir", spelling, "--mps-log-dir", spelling + "/../log/"}, code);
    REQUIRE(o.has_value());
    CHECK(o->mps.pipe_dir == fs::canonical(dir + "/real").string());
    CHECK(o->mps.log_dir == fs::canonical(dir).string() + "/log");
  }
  const auto defaults = parse({}, code);
  REQUIRE(defaults.has_value());
  CHECK(defaults->mps.pipe_dir == fs::weakly_canonical("/tmp/nvidia-mps").string());
  CHECK_FALSE(parse({"--mps-pipe-dir", ""}, code).has_value());
  CHECK(code == 2);
  CHECK_FALSE(parse({"--sweep", "--no-mps"}, code).has_value());
  CHECK(code == 2);
  // A relative directory where the working directory is gone: one line and exit 2, no abort.
  const fs::path cwd = fs::current_path();
  fs::create_directory(dir + "/gone");
  REQUIRE(::chdir((dir + "/gone").c_str()) == 0);
  fs::remove(dir + "/gone");
  code = 0;
  const auto relative = parse({"--mps-pipe-dir", "rel"}, code);
  REQUIRE(::chdir(cwd.c_str()) == 0);
  CHECK_FALSE(relative.has_value());
  CHECK(code == 2);
  fs::remove_all(dir);
}

TEST_CASE("command line defaults and validation", "[orchestrator][cli]") {
  int code = 0;
  auto o = parse({}, code);
  REQUIRE(o.has_value());
  CHECK(o->backend == "auto");
  CHECK(o->mode == "concurrent");
  CHECK(o->slots == 2);
  CHECK_FALSE(o->prompt_len.has_value());

  o = parse({"--seed", "18446744073709551615", "--frames", "7"}, code);
  REQUIRE(o.has_value());
  CHECK(o->seed == 18446744073709551615ull);
  CHECK(o->frames == 7);

  // Integers are decimal: a leading zero is not octal.
  o = parse({"--frames", "010", "--seed", "0123", "--views", "03", "--warmup", "000"}, code);
  REQUIRE(o.has_value());
  CHECK(o->frames == 10);
  CHECK(o->seed == 123);
  CHECK(o->views == 3);
  CHECK(o->warmup == 0);

  o = parse({"--sweep", "--plot", "sweep.svg"}, code);
  REQUIRE(o.has_value());
  CHECK(o->plot_path == "sweep.svg");

  o = parse(
      {"--encoder-pct", "30", "--decoder-pct", "70", "--mode", "sequential", "--prompt-len", "20"},
      code);
  REQUIRE(o.has_value());
  CHECK(o->encoder_pct == 30);
  CHECK(o->decoder_pct == 70);
  CHECK(o->mode == "sequential");
  CHECK(*o->prompt_len == 20);

  for (const auto& bad :
       std::vector<std::vector<std::string>>{{"--encoder-pct", "0"},
                                             {"--decoder-pct", "101"},
                                             {"--mode", "fast"},
                                             {"--slots", "9"},
                                             {"--backend", "tpu"},
                                             {"--views", "0"},
                                             {"--frames", "-3"},
                                             {"--frames", "-18446744073709551615"},
                                             {"--warmup", "-18446744073709551615"},
                                             {"--slots", "-4294967295"},
                                             {"--decoder-batch", "+2"},
                                             {"--seed", "-1"},
                                             {"--seed", "18446744073709551616"},
                                             {"--decoder-batch", "0"},
                                             {"--decoder-batch", "5"},
                                             {"--frames", "0x10"},
                                             {"--seed", "0x10"},
                                             {"--views", "0b1"},
                                             {"--encoder-pct", "5e1"},
                                             {"--chunk", "12abc"},
                                             {"--sweep-step", ""},
                                             {"--sweep", "--sweep-min", "80", "--sweep-max", "20"},
                                             {"--plot", "sweep.svg"},  // a single run draws none
                                             {"--no-such-flag"}}) {
    INFO(bad[0]);
    CHECK_FALSE(parse(bad, code).has_value());
    CHECK(code != 0);
  }
}

// CLI::Range alone lets NaN through, and a NaN timeout or rate used to reach float-to-integer
// casts (a "-2147483648 s" startup deadline, a rate silently ignored).
TEST_CASE("real-valued options must be finite and a rate not vanishingly small",
          "[orchestrator][cli]") {
  int code = 0;
  for (const char* option :
       {"--rate", "--startup-timeout", "--frame-timeout", "--run-timeout", "--latency-budget-ms"}) {
    for (const char* value : {"nan", "NaN", "inf", "-inf", "1e999", "3x"}) {
      INFO(option << " " << value);
      code = 0;
      CHECK_FALSE(parse({option, value}, code).has_value());
      CHECK(code == 2);
    }
  }
  for (const char* rate : {"1e-300", "0.001"}) {
    INFO("--rate " << rate);
    code = 0;
    CHECK_FALSE(parse({"--rate", rate}, code).has_value());
    CHECK(code == 2);
  }
  auto o = parse({"--rate", "0.01", "--frame-timeout", "2.5"}, code);
  REQUIRE(o.has_value());
  CHECK(o->rate_hz == 0.01);
  CHECK(o->frame_timeout_s == 2.5);
  o = parse({"--rate", "0"}, code);
  REQUIRE(o.has_value());
  CHECK(o->rate_hz == 0.0);
}

// A value that reads as something other than the decimal number written was taken as that:
// "--rate 1e-400" underflowed to 0 and ran back to back (where "--rate 0.001" is refused), and
// "--run-timeout 1e-400" had no limit; "0x1p4" read as 16. Each is one line naming the option and
// the value, exit 2, as the command line's other errors are.
TEST_CASE("real-valued options take only the decimal number written", "[orchestrator][cli]") {
  const std::pair<const char*, const char*> refused[] = {
      {"1e-400", "'1e-400' is closer to 0 than a double holds (2.2e-308)"},
      {"-1e-400", "'-1e-400' is closer to 0 than a double holds (2.2e-308)"},
      {"1e-310", "'1e-310' is closer to 0 than a double holds (2.2e-308)"},
      {"1e400", "'1e400' is beyond the largest number a double holds (1.8e308)"},
      {"0x1p4", "expected a finite decimal number, got '0x1p4'"},
      {"0x10", "expected a finite decimal number, got '0x10'"},
      {"nan", "expected a finite decimal number, got 'nan'"},
      {"infinity", "expected a finite decimal number, got 'infinity'"},
      {"5junk", "expected a finite decimal number, got '5junk'"},
      {"5e", "expected a finite decimal number, got '5e'"},
      {".", "expected a finite decimal number, got '.'"},
      {"", "expected a finite decimal number, got ''"}};
  for (const char* option :
       {"--rate", "--startup-timeout", "--frame-timeout", "--run-timeout", "--latency-budget-ms"}) {
    for (const auto& [value, why] : refused) {
      INFO(option << " '" << value << "'");
      const auto run = test::run_orchestrator({option, value, "--backend", "cpu"}, 30s);
      CHECK(run.status.code == 2);
      CHECK(run.output == "orchestrator: error: " + std::string(option) + ": " + why + "\n");
    }
  }
  int code = 0;
  for (const auto& [value, rate] :
       std::initializer_list<std::pair<const char*, double>>{{"16", 16.0},
                                                             {"+2.5e+1", 25.0},
                                                             {" 5. ", 5.0},
                                                             {".5", 0.5},
                                                             {"1E-2", 0.01},
                                                             {"0e-99999", 0.0},
                                                             {"-0", 0.0}}) {
    INFO("--rate '" << value << "'");
    const auto o = parse({"--rate", value}, code);
    REQUIRE(o.has_value());
    CHECK(o->rate_hz == rate);
  }
}

// A refused value's control characters are escaped in its one line: a CR (a value read from a
// CRLF file) sent the terminal's cursor back over the line, which then showed a plain "5" as
// refused, and a newline split the line in two.
TEST_CASE("a refused number's control characters are escaped in its one line",
          "[orchestrator][cli]") {
  const std::pair<std::vector<std::string>, std::string> refused[] = {
      {{"--rate", "5\r"}, "--rate: expected a finite decimal number, got '5\\r'"},
      {{"--run-timeout", "5\n"}, "--run-timeout: expected a finite decimal number, got '5\\n'"},
      {{"--frame-timeout", "\n5"}, "--frame-timeout: expected a finite decimal number, got '\\n5'"},
      {{"--rate", "5\t5"}, "--rate: expected a finite decimal number, got '5\\t5'"},
      {{"--rate", "\x1b[2J5"}, "--rate: expected a finite decimal number, got '\\x1b[2J5'"},
      {{"--rate", "5\\"}, "--rate: expected a finite decimal number, got '5\\\\'"},
      {{"--rate", "\xd9\xa1"}, "--rate: expected a finite decimal number, got '\xd9\xa1'"},
      {{"--frames", "5\r"}, "--frames: expected a decimal integer, got '5\\r'"}};
  for (const auto& [args, why] : refused) {
    INFO(args[0] << " " << args[1]);
    std::vector<std::string> run_args = args;
    run_args.insert(run_args.end(), {"--backend", "cpu"});
    const auto run = test::run_orchestrator(run_args, 30s);
    CHECK(run.status.code == 2);
    CHECK(run.output == "orchestrator: error: " + why + "\n");
  }
}

TEST_CASE("decoder batching gets enough slots unless they are given", "[orchestrator][cli]") {
  int code = 0;
  auto o = parse({"--decoder-batch", "2"}, code);
  REQUIRE(o.has_value());
  CHECK(o->decoder_batch == 2);
  CHECK(o->slots == 4);  // a full pass running and the next one filling behind it
  o = parse({"--decoder-batch", "4"}, code);
  REQUIRE(o.has_value());
  CHECK(o->slots == ipc::kMaxKvSlots);
  o = parse({"--decoder-batch", "2", "--slots", "3"}, code);
  REQUIRE(o.has_value());
  CHECK(o->slots == 3);
  o = parse({"--slots", "5"}, code);
  REQUIRE(o.has_value());
  CHECK(o->decoder_batch == 1);
  CHECK(o->slots == 5);

  // The workers get it on their command line.
  ipc::WorkerOptions wo;
  wo.control_name = "pi0-test";
  wo.decoder_batch = 3;
  CHECK(worker_round_trip(wo, ipc::Role::kDecoder).decoder_batch == 3);
}

TEST_CASE("the wait policy reaches the run options and the workers' command line",
          "[orchestrator][cli]") {
  int code = 0;
  auto o = parse({}, code);
  REQUIRE(o.has_value());
  CHECK(o->wait == "adaptive");
  o = parse({"--busy-wait"}, code);
  REQUIRE(o.has_value());
  CHECK(o->wait == "spin");
  o = parse({"--wait", "sleep"}, code);
  REQUIRE(o.has_value());
  CHECK(o->wait == "sleep");
  CHECK_FALSE(parse({"--wait", "nap"}, code).has_value());
  CHECK(code != 0);
  CHECK_FALSE(parse({"--wait", "sleep", "--busy-wait"}, code).has_value());

  for (const char* wait : {"sleep", "adaptive", "spin"}) {
    ipc::WorkerOptions wo;
    wo.control_name = "pi0-test";
    wo.wait = wait;
    CHECK(worker_round_trip(wo, ipc::Role::kEncoder).wait == wait);
  }
}

TEST_CASE("resolve picks the CPU backend and tiny model without a GPU", "[orchestrator][cli]") {
  // The default backend is picked by what the host has: the CPU and the tiny model without a GPU
  // (CI), the GPU and the full model with one.
  RunOptions o;
  REQUIRE(o.backend == "auto");
  const bool gpu = cuda::cuda_device_present();
  const ResolvedRun picked = resolve(o);
  CHECK(picked.backend == (gpu ? "cuda" : "cpu"));
  CHECK(picked.config.name == (gpu ? "pi0" : "tiny"));
  // Asked for, the CPU backend runs the tiny model unless another is named.
  o.backend = "cpu";
  const ResolvedRun r = resolve(o);
  CHECK(r.backend == "cpu");
  CHECK(r.config.name == "tiny");
  o.model = "pi0";
  CHECK(resolve(o).config.name == "pi0");
}

// The CPU decoder decodes frame by frame: --decoder-batch there must not leave the 2N slots it
// asks for (frames queued behind the one decoding), nor a report of batched passes.
TEST_CASE("on the CPU backend --decoder-batch and the slots it asks for are ignored",
          "[orchestrator][cli]") {
  int code = 0;
  auto o = parse({"--backend", "cpu", "--decoder-batch", "3"}, code);
  REQUIRE(o.has_value());
  ResolvedRun r = resolve(*o);
  CHECK(r.options.decoder_batch == 1);
  CHECK(r.options.slots == 2);
  CHECK(r.note.find("--decoder-batch applies to the cuda backend") != std::string::npos);
  // Slots given on the command line stay.
  o = parse({"--backend", "cpu", "--decoder-batch", "3", "--slots", "5"}, code);
  REQUIRE(o.has_value());
  r = resolve(*o);
  CHECK(r.options.decoder_batch == 1);
  CHECK(r.options.slots == 5);
}

// A run writes its results at its end: a path it cannot write must fail before any worker starts,
// not after the run (and creating or truncating nothing on the way).
TEST_CASE("resolve refuses results paths that cannot be written", "[orchestrator][cli]") {
  const fs::path dir = fs::temp_directory_path() / ("pi0-cli-out-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  RunOptions o;
  o.backend = "cpu";
  const auto message = [&] {
    try {
      resolve(o);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  o.json_path = (dir / "no-such-dir" / "run.json").string();
  const auto says = [&](const std::string& expected) {
    const std::string got = message();
    INFO("error: " << got);
    return got.find(expected) != std::string::npos;
  };
  CHECK(says("--json: cannot write " + o.json_path));
  o.json_path.clear();
  o.actions_path = dir.string();
  CHECK(says("--actions-out: " + dir.string() + " is a directory"));
  o.actions_path.clear();
  const fs::path file = dir / "a-file";
  std::ofstream(file) << "x";
  o.plot_path = (file / "sweep.svg").string();
  // Named for what it is, not "Permission denied" (no search permission on a plain file).
  CHECK(
      says("--plot: cannot write " + o.plot_path + " (" + file.string() + " is not a directory)"));
  // Two results written to one file: the later would replace the earlier, however it is spelt.
  o.plot_path.clear();
  o.json_path = file.string();
  o.actions_path = (dir / "." / "a-file").string();
  CHECK(says("--actions-out " + o.actions_path + " is the file of --json"));
  o.actions_path.clear();
  fs::create_symlink(file, dir / "link");
  o.plot_path = (dir / "link").string();
  CHECK(says("--plot " + o.plot_path + " is the file of --json"));
  // A link into a directory that does not exist is checked where it points.
  o.json_path.clear();
  fs::create_symlink(dir / "no-such-dir" / "run.json", dir / "dangling");
  o.plot_path = (dir / "dangling").string();
  CHECK(says("--plot: cannot write " + o.plot_path + " (" + (dir / "no-such-dir").string()));
  o.json_path = file.string();
  // Neither written yet.
  o.json_path = (dir / "sweep.svg").string();
  o.plot_path.clear();
  o.actions_path = (dir / "sweep.svg").string();
  CHECK(says("--actions-out " + o.actions_path + " is the file of --json"));
  o.actions_path.clear();
  // Nor over the weights the run reads.
  const fs::path weights = dir / "tiny.safetensors";
  WeightStore::random(model_config("tiny"), 0, 1, WeightSet::kAll).save_safetensors(weights);
  o.weights = weights.string();
  o.json_path.clear();
  o.actions_path = (dir / "." / "tiny.safetensors").string();
  CHECK(says("--actions-out " + o.actions_path + " is the file of --weights"));
  o.actions_path.clear();
  CHECK(message().empty());
  o.weights.clear();
  // Writable paths pass, and resolve leaves them as they were.
  o.plot_path = (dir / "sweep.svg").string();
  o.json_path = file.string();
  CHECK(message().empty());
  CHECK_FALSE(fs::exists(dir / "sweep.svg"));
  CHECK(fs::file_size(file) == 1);
  fs::remove_all(dir);
}

TEST_CASE("child processes report exit status and output", "[orchestrator][process]") {
  ChildProcess p = ChildProcess::spawn("sh", "/bin/sh",
                                       {"-c", "echo first; echo second >&2; exit 3"}, {}, false);
  const auto s = p.wait_for(5000ms);
  REQUIRE(s.has_value());
  CHECK(s->code == 3);
  CHECK(s->describe() == "exited with status 3");
  p.terminate(100ms);
  CHECK(p.last_lines() == std::vector<std::string>{"first", "second"});

  ChildProcess env_child = ChildProcess::spawn(
      "sh", "/bin/sh", {"-c", "echo \"pct=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE home=${HOME:+set}\""},
      {{"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "30"}}, false);
  REQUIRE(env_child.wait_for(5000ms).has_value());
  env_child.terminate(100ms);
  CHECK(env_child.output() == "pct=30 home=set\n");

  ChildProcess sleeper = ChildProcess::spawn("sleep", "/bin/sleep", {"100"}, {}, false);
  const auto t0 = std::chrono::steady_clock::now();
  const ExitStatus killed = sleeper.terminate(2000ms);
  CHECK(killed.signaled);
  CHECK(killed.describe() == "killed by signal 15 (SIGTERM)");
  CHECK(std::chrono::steady_clock::now() - t0 < 1s);

  CHECK_THROWS_AS(ChildProcess::spawn("nope", "/nonexistent/program", {}, {}, false), Error);
}

// A caller that ignores SIGCHLD (a service manager, a shell's `trap '' CHLD`) passes that on
// through exec, and the kernel then reaps our children itself. The orchestrator sets it back to
// the default; where it is ignored anyway, a wait still ends, the status reads as lost, and the
// pid is not signalled again.
TEST_CASE(
    "an ignored SIGCHLD neither hangs a wait nor hides a child's status from the orchestrator",
    "[orchestrator][process]") {
  struct sigaction ignore {
  }, before{};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  SECTION("ignored: the waits end and say the status is lost") {
    REQUIRE(::sigaction(SIGCHLD, &ignore, &before) == 0);
    const auto t0 = std::chrono::steady_clock::now();
    const CommandResult r = run_command("true", {}, {}, "", 3000ms);
    ChildProcess child = ChildProcess::spawn("sh", "/bin/sh", {"-c", "exit 3"}, {}, false);
    const auto status = child.wait_for(3000ms);
    const ExitStatus terminated = child.terminate(100ms);
    ::sigaction(SIGCHLD, &before, nullptr);
    CHECK_FALSE(r.timed_out);
    CHECK(r.status.lost);
    CHECK_FALSE(r.status.success());
    REQUIRE(status.has_value());
    CHECK(status->lost);
    CHECK(status->describe() == "exited with a status nobody could read (SIGCHLD was ignored)");
    CHECK(terminated.lost);
    CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  }
  SECTION("install_stop_handlers sets it back, so the status is read") {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {  // its own process: the stop handlers stay out of this test runner
      ::sigaction(SIGCHLD, &ignore, nullptr);
      install_stop_handlers();
      ChildProcess child = ChildProcess::spawn("sh", "/bin/sh", {"-c", "exit 3"}, {}, false);
      const auto status = child.wait_for(3000ms);
      const CommandResult r = run_command("sh", {"-c", "exit 4"}, {}, "", 3000ms);
      ::_exit(status && !status->lost && status->code == 3 && !r.status.lost && r.status.code == 4
                  ? 0
                  : 1);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
}

TEST_CASE("run_command feeds stdin and enforces its timeout", "[orchestrator][process]") {
  const CommandResult r = run_command("cat", {}, {}, "hello\n", 5000ms);
  CHECK(r.status.success());
  CHECK(r.output == "hello\n");
  const auto t0 = std::chrono::steady_clock::now();
  const CommandResult slow = run_command("sleep", {"10"}, {}, "", 200ms);
  CHECK(slow.timed_out);
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  // A program that exits without reading its input (as the MPS control client does when no
  // daemon runs) must not take us down with SIGPIPE.
  for (int i = 0; i < 20; ++i) {
    const CommandResult quick = run_command("true", {}, {}, "get_server_list\n", 5000ms);
    CHECK(quick.status.success());
  }
  CHECK_FALSE(find_on_path("sh").empty());
  CHECK(find_on_path("no-such-program-pi0").empty());
}

// scripts/start_mps.sh and stop_mps.sh, against the same stand-in control program.
TEST_CASE("start_mps.sh starts a daemon only where a run may and stop_mps.sh quits it",
          "[orchestrator][mps-control]") {
  const std::string dir = test::temp_dir("mps_scripts");
  MpsOptions o;
  o.pipe_dir = dir + "/pipe";
  o.log_dir = dir + "/log";
  o.control_program = fake_mps_control(dir);
  const EnvOverrides env{{"NVIDIA_MPS_CONTROL", o.control_program},
                         {"CUDA_MPS_PIPE_DIRECTORY", o.pipe_dir},
                         {"CUDA_MPS_LOG_DIRECTORY", o.log_dir}};
  // Under a given umask (a user's shell often has 002), with `overrides` on top of `env`.
  const auto script = [&](const std::string& name, const std::string& umask = "022",
                          const EnvOverrides& overrides = {},
                          std::chrono::milliseconds limit = 10000ms) {
    EnvOverrides with = env;
    for (const auto& [key, value] : overrides) with[key] = value;
    return run_command("sh",
                       {"-c", "umask " + umask + " && exec bash \"$0\"",
                        std::string(PI0_SOURCE_DIR) + "/scripts/" + name},
                       with, "", limit);
  };
  const auto starts = [&] {
    std::ifstream in(o.pipe_dir + "/starts");
    int n = 0;
    for (std::string line; std::getline(in, line);) ++n;
    return n;
  };
  SECTION("under a umask of 002 it makes directories a run may start a daemon in later") {
    const CommandResult started = script("start_mps.sh", "002");
    INFO(started.output);
    REQUIRE(started.status.success());
    CHECK(mps_daemon_answers(o));
    for (const std::string& d : {o.pipe_dir, o.log_dir})
      CHECK((fs::status(d).permissions() & (fs::perms::group_write | fs::perms::others_write)) ==
            fs::perms::none);
    CHECK(script("start_mps.sh").status.success());  // it answers: nothing more is started
    CHECK(starts() == 1);
    REQUIRE(script("stop_mps.sh").status.success());
    CHECK_FALSE(mps_daemon_answers(o));
    CHECK_NOTHROW(MpsDaemon::check_can_start_or_adopt(o));
    CHECK(script("stop_mps.sh").status.success());  // none runs: nothing to do
  }
  SECTION("a directory others may write is refused before a daemon starts") {
    fs::create_directories(o.log_dir);
    fs::permissions(o.log_dir, fs::perms::all);
    const CommandResult refused = script("start_mps.sh");
    INFO(refused.output);
    CHECK(refused.status.code == 1);
    CHECK(refused.output.find(o.log_dir + " belongs to another user or is writable by others") !=
          std::string::npos);
    CHECK(starts() == 0);
    CHECK_FALSE(mps_daemon_answers(o));
  }
  SECTION("a daemon that does not answer is one line and exit 1, not a hang") {
    const std::string wedged = dir + "/wedged-mps-control";
    test::write_script(wedged, "exec sleep 30\n");
    for (const std::string name : {"start_mps.sh", "stop_mps.sh"}) {
      const auto begun = std::chrono::steady_clock::now();
      const CommandResult r = script(
          name, "022", {{"NVIDIA_MPS_CONTROL", wedged}, {"PI0_MPS_TIMEOUT_S", "1"}}, 20000ms);
      INFO(name << ": " << r.output);
      CHECK(r.status.code == 1);
      CHECK(r.output.find("did not answer within 1 s") != std::string::npos);
      CHECK(std::chrono::steady_clock::now() - begun < 10s);
    }
  }
  SECTION("a daemon it started that does not answer is one line and exit 1, not a hang") {
    // `-d` starts it, and then it never answers: start_mps.sh waited for it a hundred times
    // over, each wait a whole deadline (17 minutes at the default 10 s).
    const std::string mute = dir + "/mute-mps-control";
    test::write_script(mute,
                       "state=\"$CUDA_MPS_PIPE_DIRECTORY/daemon\"\n"
                       "if [ \"$1\" = \"-d\" ]; then echo up > \"$state\"; exit 0; fi\n"
                       "[ -f \"$state\" ] || exit 1\n"
                       "exec sleep 30\n");
    const auto begun = std::chrono::steady_clock::now();
    const CommandResult r = script(
        "start_mps.sh", "022", {{"NVIDIA_MPS_CONTROL", mute}, {"PI0_MPS_TIMEOUT_S", "1"}}, 30000ms);
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output == "start_mps: the MPS control daemon (pipe " + o.pipe_dir +
                          ") did not answer within 1 s\n");
    CHECK(std::chrono::steady_clock::now() - begun < 10s);
  }
  SECTION("a daemon that stops answering after `quit` is not reported stopped") {
    // Told to quit, it waits for its clients and answers no more within the deadline: it is
    // still there (as the orchestrator judges it), and its run's mark stays.
    const std::string lingering = dir + "/lingering-mps-control";
    test::write_script(lingering,
                       "state=\"$CUDA_MPS_PIPE_DIRECTORY/daemon\"\n"
                       "[ -f \"$state\" ] || exit 1\n"
                       "[ -f \"$state.quitting\" ] && exec sleep 30\n"
                       "read cmd\n"
                       "[ \"$cmd\" = quit ] && touch \"$state.quitting\"\n"
                       "exit 0\n");
    fs::create_directories(o.pipe_dir);
    std::ofstream(o.pipe_dir + "/daemon") << "up\n";
    const std::string mark = o.pipe_dir + ".pi0/started-by-run";
    fs::create_directories(o.pipe_dir + ".pi0");
    std::ofstream(mark) << "1\n";
    const CommandResult r = script("stop_mps.sh", "022",
                                   {{"NVIDIA_MPS_CONTROL", lingering}, {"PI0_MPS_TIMEOUT_S", "1"}});
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output ==
          "stop_mps: the MPS control daemon (pipe " + o.pipe_dir + ") did not answer within 1 s\n");
    CHECK(fs::exists(mark));
  }
  SECTION("a deadline that is not a number of seconds is one line and exit 1") {
    // `timeout` would refuse it, and a refused request reads as "no daemon": stop_mps.sh would
    // report none while one answers, and start_mps.sh would start another.
    REQUIRE(script("start_mps.sh").status.success());
    for (const std::string bad : {"abc", "-1", "0", "1x"}) {
      for (const std::string name : {"stop_mps.sh", "start_mps.sh"}) {
        const CommandResult r = script(name, "022", {{"PI0_MPS_TIMEOUT_S", bad}});
        INFO(name << " with PI0_MPS_TIMEOUT_S=" << bad << ": " << r.output);
        CHECK(r.status.code == 1);
        CHECK(r.output == name.substr(0, name.size() - 3) + ": PI0_MPS_TIMEOUT_S='" + bad +
                              "': expected a number of seconds above 0\n");
      }
    }
    CHECK(mps_daemon_answers(o));
    CHECK(starts() == 1);
    REQUIRE(script("stop_mps.sh").status.success());
  }
  SECTION("a missing control program is one line and exit 1") {
    const CommandResult missing =
        script("start_mps.sh", "022", {{"NVIDIA_MPS_CONTROL", dir + "/not-installed"}});
    CHECK(missing.status.code == 1);
    CHECK(missing.output.find("not found") != std::string::npos);
    CHECK_FALSE(fs::exists(o.pipe_dir));
  }
  fs::remove_all(dir);
}

TEST_CASE("MPS daemon is started and quit or adopted and left running",
          "[orchestrator][mps-control]") {
  const std::string dir = test::temp_dir("mps");
  MpsOptions o;
  o.pipe_dir = dir + "/pipe";
  o.log_dir = dir + "/log";
  o.control_program = fake_mps_control(dir);
  o.timeout = 5000ms;
  const std::string state = o.pipe_dir + "/daemon";

  SECTION("started here, quit on destruction") {
    {
      MpsDaemon d = MpsDaemon::start_or_adopt(o);
      CHECK(d.active());
      CHECK(d.started_here());
      CHECK(fs::exists(state));
      CHECK(mps_daemon_answers(o));
    }
    CHECK_FALSE(fs::exists(state));
    CHECK_FALSE(mps_daemon_answers(o));
  }
  SECTION("a daemon a run started is quit by the last run that uses it") {
    std::optional<MpsDaemon> first(MpsDaemon::start_or_adopt(o));
    CHECK(first->started_here());
    {
      MpsDaemon second = MpsDaemon::start_or_adopt(o);
      CHECK_FALSE(second.started_here());
      first.reset();  // the run that started it ends first: the other still uses it
      CHECK(fs::exists(state));
      CHECK(mps_daemon_answers(o));
    }  // the last user ends
    CHECK_FALSE(fs::exists(state));
    CHECK_FALSE(fs::exists(o.pipe_dir + ".pi0/started-by-run"));
  }
  SECTION("locks a stopped run holds delay a start, and do not stop it") {
    // Another run stopped (Ctrl-Z) while it starts or quits the daemon holds these locks.
    o.timeout = 200ms;
    const std::string locks = o.pipe_dir + ".pi0";
    REQUIRE(::mkdir(locks.c_str(), 0700) == 0);
    std::vector<int> held;
    for (const char* name : {"/start.lock", "/users.lock"}) {
      held.push_back(::open((locks + name).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
      REQUIRE(held.back() >= 0);
      REQUIRE(::flock(held.back(), LOCK_EX) == 0);
    }
    const auto t0 = std::chrono::steady_clock::now();
    {
      MpsDaemon d = MpsDaemon::start_or_adopt(o);
      CHECK(d.started_here());
      CHECK(mps_daemon_answers(o));
    }
    CHECK(std::chrono::steady_clock::now() - t0 < 5s);  // each lock waited 3 x 200 ms
    for (const int fd : held) ::close(fd);
    CHECK_FALSE(fs::exists(state));  // the daemon it started is quit
  }
  SECTION("adopted, left running") {
    fs::create_directories(o.pipe_dir);
    std::ofstream(state) << "up\n";
    {
      MpsDaemon d = MpsDaemon::start_or_adopt(o);
      CHECK(d.active());
      CHECK_FALSE(d.started_here());
    }
    CHECK(fs::exists(state));
    CHECK_FALSE(fs::exists(o.pipe_dir + "/starts"));
  }
  SECTION("a mark left by a killed run does not get a daemon started since by hand quit") {
    // A run that started a daemon was killed (its mark stays); the daemon was then restarted by
    // other means, as another process with another pid.
    {
      MpsDaemon killed_run = MpsDaemon::start_or_adopt(o);
      REQUIRE(killed_run.started_here());
      const std::string mark = o.pipe_dir + ".pi0/started-by-run";
      REQUIRE(fs::exists(mark));
      fs::copy_file(mark, dir + "/mark");
    }
    fs::copy_file(dir + "/mark", o.pipe_dir + ".pi0/started-by-run");
    const CommandResult by_hand =
        run_command(o.control_program, {"-d"}, mps_client_environment(o), "", 5000ms);
    REQUIRE(by_hand.status.success());
    { MpsDaemon later_run = MpsDaemon::start_or_adopt(o); }
    CHECK(mps_daemon_answers(o));  // left running: not the daemon the mark names
  }
  SECTION("a pipe or log directory others may write is refused before a daemon starts") {
    fs::create_directories(o.log_dir);
    fs::permissions(o.log_dir, fs::perms::all);
    // Both the start and the check a sweep makes before its baselines refuse it.
    for (const bool check_only : {true, false}) {
      try {
        if (check_only)
          MpsDaemon::check_can_start_or_adopt(o);
        else
          MpsDaemon::start_or_adopt(o);
        FAIL("no error");
      } catch (const Error& e) {
        CHECK(std::string(e.what()).find(o.log_dir) != std::string::npos);
        CHECK(std::string(e.what()).find("writable by others") != std::string::npos);
      }
    }
    CHECK_FALSE(fs::exists(state));
    // A daemon that answers there is adopted, not judged: the check passes.
    fs::permissions(o.log_dir, fs::perms::owner_all);
    const CommandResult by_hand =
        run_command(o.control_program, {"-d"}, mps_client_environment(o), "", 5000ms);
    REQUIRE(by_hand.status.success());
    fs::permissions(o.log_dir, fs::perms::all);
    CHECK_NOTHROW(MpsDaemon::check_can_start_or_adopt(o));
    run_command(o.control_program, {}, mps_client_environment(o), "quit\n", 5000ms);
    CHECK(test::eventually([&] { return !mps_daemon_answers(o); }, 5000ms));
  }
  SECTION("the check before a start passes where a daemon may start, and starts nothing") {
    CHECK_NOTHROW(MpsDaemon::check_can_start_or_adopt(o));
    CHECK_FALSE(fs::exists(state));
    CHECK_FALSE(mps_daemon_answers(o));
  }
  SECTION("a missing control program is a clear error") {
    o.control_program = dir + "/not-installed";
    try {
      MpsDaemon::start_or_adopt(o);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("not found") != std::string::npos);
      CHECK(std::string(e.what()).find("--no-mps") != std::string::npos);
    }
  }
  SECTION("a control program that fails to start is a clear error") {
    o.control_program = fake_mps_control(dir, FakeStart::kFails);
    try {
      MpsDaemon::start_or_adopt(o);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("already running") != std::string::npos);
    }
  }
  SECTION("a daemon another run started in the same instant is adopted and left running") {
    o.control_program = fake_mps_control(dir, FakeStart::kLosesRace);
    {
      MpsDaemon mps = MpsDaemon::start_or_adopt(o);
      CHECK(mps.active());
    }
    CHECK(fs::exists(o.pipe_dir + "/daemon"));  // not quit: it is the other run's
  }
  fs::remove_all(dir);
}

// scripts/gpu_check.sh with stand-ins for the driver's tools, the build and the programs its steps
// run (in a directory whose name has a space): a step fails, and the script exits 1, where any of
// its runs fails, not only its first.
TEST_CASE("gpu_check.sh exits 1 where any run of a step fails", "[orchestrator][scripts]") {
  const std::string dir = test::temp_dir("gpu check");
  const std::string tools = dir + "/tools", build = dir + "/build";
  fs::create_directories(tools);
  fs::create_directories(build + "/bin");
  const auto program = test::write_script;
  program(tools + "/nvidia-smi",
          "[ \"${FAIL_IF:-}\" = no-gpu ] && exit 9\n"
          "echo 'Stand-in GPU, 80 GiB, Default, 580'\n");
  program(tools + "/cmake", "exit 0\n");  // the build is done already
  for (const char* installer : {"/apt-get", "/sudo"})
    program(tools + installer, "echo \"stand-in $0: installs nothing\" >&2; exit 1\n");
  fs::create_symlink(fake_mps_control(dir), tools + "/nvidia-cuda-mps-control");
  // Each fails where its FAIL_IF variable is set and its arguments or environment match it.
  program(
      build + "/bin/orchestrator",
      "case \" $* \" in *\" ${FAIL_IF:-none} \"*) exit 3;; esac\necho 'throughput 1 frames/s'\n");
  program(build + "/bin/pi0_bench",
          "[ -n \"${FAIL_IF:-}\" ] && [ \"$(printenv \"$FAIL_IF\")\" = 1 ] && exit 4\n"
          "echo 'V=2 C=63 P=0 1 ms'\n");
  const auto gpu_check = [&](const std::string& step, const std::string& fail_if,
                             const std::string& mps_timeout = "10") {
    const EnvOverrides env{{"PATH", tools + ":" + std::getenv("PATH")},
                           {"PI0_MPS_TIMEOUT_S", mps_timeout},
                           {"OUT", dir + "/out"},
                           {"PI0_BUILD_DIR", build},
                           {"PI0_GEMM_TABLE", ""},
                           {"CUDACXX", "stand-in"},
                           {"CUDA_MPS_PIPE_DIRECTORY", dir + "/pipe"},
                           {"CUDA_MPS_LOG_DIRECTORY", dir + "/log"},
                           {"FAIL_IF", fail_if}};
    return run_command("bash", {std::string(PI0_SOURCE_DIR) + "/scripts/gpu_check.sh", step}, env,
                       "", 60000ms);
  };
  for (const std::string step : {"bench", "sweep"}) {
    const CommandResult passed = gpu_check(step, "");
    INFO(passed.output);
    CHECK(passed.status.code == 0);
  }
  SECTION("a camera-rate run after the sweep") {
    const CommandResult r = gpu_check("sweep", "--rate");
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output.find("30 Hz run at 50/50 failed (rc 3)") != std::string::npos);
  }
  SECTION("a sequential run after the sweep") {
    const CommandResult r = gpu_check("sweep", "sequential");
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output.find("sequential run --wait adaptive failed (rc 3)") != std::string::npos);
  }
  SECTION("a deadline for the MPS requests that is not a number of seconds") {
    for (const std::string bad : {"abc", "0", "-1", "1s"}) {
      const CommandResult r = gpu_check("bench", "", bad);
      INFO(bad << ": " << r.output);
      CHECK(r.status.code == 2);
      CHECK(r.output.find("gpu_check: PI0_MPS_TIMEOUT_S='" + bad +
                          "': expected a number of seconds above 0") != std::string::npos);
      CHECK(r.output.find("V=2") == std::string::npos);  // no step ran
    }
    CHECK(gpu_check("bench", "", "2.5").status.code == 0);
  }
  SECTION("no GPU: refused in one line, with no output directory left behind") {
    fs::remove_all(dir + "/out");
    const CommandResult r = gpu_check("bench", "no-gpu");
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output == "gpu_check: no NVIDIA GPU or driver here (nvidia-smi missing or failing)\n");
    CHECK_FALSE(fs::exists(dir + "/out"));
  }
  SECTION("one of the benchmark's alternatives") {
    const CommandResult r = gpu_check("bench", "PI0_DECODER_LAYERS");
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output.find("1 of the alternatives' runs FAILED") != std::string::npos);
  }
  fs::remove_all(dir);
}

// scripts/test.sh over a stand-in build (a cmake that builds nothing; two CPU and two GPU tests,
// the GPU runner skipping as it does without a GPU), in a directory whose name has a space: it
// announced every GPU test as to be skipped even where the selection (-L cpu) held none.
TEST_CASE("test.sh announces only the GPU tests it selected as skipped",
          "[orchestrator][scripts]") {
  const std::string dir = test::temp_dir("test sh");
  const std::string tools = dir + "/tools", build = dir + "/build";
  fs::create_directories(tools);
  fs::create_directories(build + "/tests");
  test::write_script(tools + "/cmake", "exit 0\n");  // the build is done already
  for (const char* installer : {"/apt-get", "/sudo"})
    test::write_script(tools + installer, "echo \"stand-in $0: installs nothing\" >&2; exit 1\n");
  const std::string gpu_runner = build + "/tests/pi0_gpu_tests";
  test::write_script(gpu_runner, "echo 'SKIPPED: no CUDA device (stand-in)'\nexit 77\n");
  {
    std::ofstream ctest_file(build + "/CTestTestfile.cmake");
    for (const char* name : {"cpu: one", "cpu: two"}) {
      ctest_file << "add_test([=[" << name << "]=] /bin/sh -c \"exit 0\")\n"
                 << "set_tests_properties([=[" << name << "]=] PROPERTIES LABELS cpu)\n";
    }
    for (const char* name : {"gpu: one", "gpu: two"}) {
      ctest_file << "add_test([=[" << name << "]=] [=[" << gpu_runner << "]=] [=[" << name
                 << "]=])\n"
                 << "set_tests_properties([=[" << name
                 << "]=] PROPERTIES LABELS gpu SKIP_RETURN_CODE 77)\n";
    }
  }
  const auto test_sh = [&](std::vector<std::string> args) {
    args.insert(args.begin(), std::string(PI0_SOURCE_DIR) + "/scripts/test.sh");
    const EnvOverrides env{{"PATH", tools + ":" + std::getenv("PATH")},
                           {"PI0_BUILD_DIR", build},
                           {"CUDACXX", "stand-in"}};
    return run_command("bash", args, env, "", 60000ms);
  };
  const std::string announced = "[gpu] tests will be reported as Skipped";
  // The last line: the counts, and the reason where a test was skipped.
  const auto last_line = [](const std::string& output) {
    const size_t end = output.find_last_not_of('\n');
    const size_t start = output.rfind('\n', end);
    return output.substr(start == std::string::npos ? 0 : start + 1, end - start);
  };
  for (const std::vector<std::string>& cpu_only :
       {std::vector<std::string>{"-L", "cpu"}, {"-LE", "gpu"}, {"-R", "cpu"}}) {
    const CommandResult r = test_sh(cpu_only);
    INFO(cpu_only[0] << " " << cpu_only[1] << ": " << r.output);
    CHECK(r.status.code == 0);
    CHECK(r.output.find(announced) == std::string::npos);
    CHECK(r.output.find("[gpu] test will") == std::string::npos);
    CHECK(last_line(r.output) == "test: 2 passed, 0 failed, 0 skipped");
  }
  const CommandResult all = test_sh({});
  INFO(all.output);
  CHECK(all.status.code == 0);
  CHECK(all.output.find("test: 2 " + announced + ": no CUDA device (stand-in)\n") !=
        std::string::npos);
  CHECK(last_line(all.output) == "test: 2 passed, 0 failed, 2 skipped (no CUDA device (stand-in))");
  const CommandResult one = test_sh({"-R", "gpu: one"});
  INFO(one.output);
  CHECK(one.output.find("test: 1 [gpu] test will be reported as Skipped: no CUDA device "
                        "(stand-in)\n") != std::string::npos);
  CHECK(last_line(one.output) == "test: 0 passed, 0 failed, 1 skipped (no CUDA device (stand-in))");
  fs::remove_all(dir);
}
