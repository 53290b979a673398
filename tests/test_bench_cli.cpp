// pi0_bench's command line: a bad value, a results file that cannot be written, or options that
// contradict each other are refused with one line and exit 2 before any GPU work (so these run
// on any machine).
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "ceilings.hpp"
#include "pi0/process.hpp"
#include "process_utils.hpp"

using namespace pi0;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// pi0_bench's output for `args` (the tiny model: were an argument taken, a GPU run stays short),
// where it exits 2; otherwise a note of how it ended.
std::string refusal(std::vector<std::string> args) {
  args.insert(args.begin(), {"--model", "tiny"});
  const CommandResult r = run_command(PI0_BENCH_EXE, args, {}, "", 120000ms);
  if (r.status.code != 2 || r.status.signaled)
    return "not refused (" + r.status.describe() + "): " + r.output;
  return r.output;
}

}  // namespace

TEST_CASE("pi0_bench reads its counts as decimal", "[bench][cli]") {
  CHECK(refusal({"--iters", "0x10"}) ==
        "pi0_bench: error: --iters: expected a decimal integer, got '0x10'\n");
  CHECK(refusal({"--warmup", "0x1"}) ==
        "pi0_bench: error: --warmup: expected a decimal integer, got '0x1'\n");
  CHECK(refusal({"--iters", "200junk"}) ==
        "pi0_bench: error: --iters: expected a decimal integer, got '200junk'\n");
  // Octal "0200" would have been 128; read as decimal, 0 is still below the range.
  CHECK(refusal({"--iters", "00"}).find("--iters: Value 0 not in range") != std::string::npos);
}

TEST_CASE("pi0_bench refuses an unknown model as a bad command line", "[bench][cli]") {
  const CommandResult r = run_command(PI0_BENCH_EXE, {"--model", "pi0-3l"}, {}, "", 120000ms);
  CHECK(r.status.code == 2);
  CHECK(r.output == "pi0_bench: error: --model: pi0-3l not in {pi0,tiny,pi0-1l,pi0-2l}\n");
}

TEST_CASE("pi0_bench without a usable GPU says so in one line", "[bench][cli]") {
  // An empty CUDA_VISIBLE_DEVICES hides every GPU, so this runs alike on any machine.
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--model", "tiny"}, {"--sm-count"}}) {
    const CommandResult r =
        run_command(PI0_BENCH_EXE, args, {{"CUDA_VISIBLE_DEVICES", ""}}, "", 120000ms);
    INFO(r.output);
    CHECK(r.status.code == 1);
    CHECK(r.output.rfind("pi0_bench: no usable CUDA GPU (", 0) == 0);
    CHECK(r.output.find('\n') == r.output.size() - 1);
    CHECK(r.output.find("CUDA error") == std::string::npos);
  }
}

// What pi0_bench prints is its result: where standard output cannot take it (a full disk) it fails
// with one line, exit 1, as the orchestrator does, where it ended with exit 0 and nothing printed.
// Its report needs a GPU; the help takes the same check (report_write_error) on any machine.
TEST_CASE("pi0_bench fails where standard output cannot take what it prints", "[bench][cli]") {
  const CommandResult full = run_command(
      "sh", {"-c", "exec \"$0\" \"$@\" >/dev/full", PI0_BENCH_EXE, "--help"}, {}, "", 60000ms);
  INFO(full.output);
  CHECK(full.status.code == 1);
  // The reason (ENOSPC) is lost where the help overflowed the buffer and failed before the end.
  CHECK(full.output.rfind("pi0_bench: error: cannot write the help to standard output", 0) == 0);
  CHECK(std::count(full.output.begin(), full.output.end(), '\n') == 1);
  const CommandResult help = run_command(PI0_BENCH_EXE, {"--help"}, {}, "", 60000ms);
  CHECK(help.status.code == 0);
  CHECK(help.output.find("--iters") != std::string::npos);
}

TEST_CASE("pi0_bench refuses a case outside what a run takes before making its weights",
          "[bench][cli]") {
  CHECK(refusal({"--case", "2,63,5000"}) ==
        "pi0_bench: --case 2,63,5000: prompt length must be in 0..4096, got 5000\n");
  // Weights for 2^31 - 1 prompt tokens would be terabytes.
  CHECK(refusal({"--case", "2,63,2147483647"}) ==
        "pi0_bench: --case 2,63,2147483647: prompt length must be in 0..4096, got 2147483647\n");
  CHECK(refusal({"--case", "0,63,0"}) ==
        "pi0_bench: --case 0,63,0: views must be in 1..8, got 0\n");
  CHECK(refusal({"--case", "2,-1,0"}) ==
        "pi0_bench: --case 2,-1,0: chunk must be in 1..1024, got -1\n");
  CHECK(refusal({"--case", "2,63"}) == "pi0_bench: --case wants V,C,P, got '2,63'\n");
}

TEST_CASE("pi0_bench refuses results files it could not write, before the run", "[bench][cli]") {
  const std::string dir = test::temp_dir("bench_cli");
  const std::string missing = dir + "/no/such/dir/out.json";
  CHECK(refusal({"--json", missing}) == "pi0_bench: --json: cannot write " + missing + " (" + dir +
                                            "/no/such/dir: No such file or directory)\n");
  CHECK(refusal({"--json", dir}) == "pi0_bench: --json: " + dir + " is a directory\n");
  CHECK(refusal({"--autotune", "--write-gemm-table", missing}) ==
        "pi0_bench: --write-gemm-table: cannot write " + missing + " (" + dir +
            "/no/such/dir: No such file or directory)\n");
  // The figures written over the table read or written.
  const std::string table = dir + "/table.tsv";
  std::ofstream(table) << "# no entries\n";
  CHECK(refusal({"--json", table, "--gemm-table", table}) ==
        "pi0_bench: --json " + table + " is the file of --gemm-table\n");
  CHECK(refusal({"--json", dir + "/../" + fs::path(dir).filename().string() + "/table.tsv",
                 "--autotune", "--write-gemm-table", table}) ==
        "pi0_bench: --json " + dir + "/../" + fs::path(dir).filename().string() +
            "/table.tsv is the file of --write-gemm-table\n");
  {
    const EnvOverrides env{{"PI0_GEMM_TABLE", table}};
    const CommandResult r =
        run_command(PI0_BENCH_EXE, {"--model", "tiny", "--json", table}, env, "", 120000ms);
    CHECK(r.status.code == 2);
    CHECK(r.output == "pi0_bench: --json " + table + " is the file of PI0_GEMM_TABLE\n");
  }
  CHECK(fs::file_size(table) == 13);  // untouched
  fs::remove_all(dir);
}

// The utilisation columns divide by the ceilings of the GPU the run is on: an H200 reads DRAM
// half as fast again as an H100, so its decoder's share of the memory rate must not be put
// against the H100's 3 TB/s; any other GPU is shown the H100's figures and told so.
TEST_CASE("pi0_bench's ceilings follow the GPU it runs on", "[bench]") {
  const bench::Ceilings h200 = bench::ceilings_for("NVIDIA H200");
  CHECK(h200.gbps == 4600.0);
  CHECK(h200.tflops == 800.0);
  CHECK(std::string(h200.of) == "H200");
  const bench::Ceilings h100 = bench::ceilings_for("NVIDIA H100 80GB HBM3");
  CHECK(h100.gbps == 3000.0);
  CHECK(h100.tflops == 800.0);
  CHECK(std::string(h100.of) == "H100");
  const bench::Ceilings other = bench::ceilings_for("NVIDIA A100-SXM4-80GB");
  CHECK(other.gbps == 3000.0);
  CHECK(std::string(other.of).find("none measured for this GPU") != std::string::npos);
}
