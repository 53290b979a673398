// The whole pipeline on the GPU under MPS: real orchestrator, real workers, real daemon.
// Uses its own MPS pipe directory so that it neither adopts nor stops anybody else's daemon.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/cuda_encoder.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/ipc/shm.hpp"
#include "pi0/mps.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/reference.hpp"
#include "process_utils.hpp"

using namespace pi0;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

constexpr const char* kModel = "pi0-2l";  // full widths, 2 layers per tower: fast to load
constexpr uint64_t kSeed = 11;
constexpr uint64_t kFrames = 24;

MpsOptions test_mps_options() {
  MpsOptions o;
  o.pipe_dir = "/tmp/pi0mps_test_mps_pipe_" + std::to_string(::getpid());
  o.log_dir = "/tmp/pi0mps_test_mps_log_" + std::to_string(::getpid());
  return o;
}

std::vector<std::string> gpu_run(const MpsOptions& mps, std::vector<std::string> extra,
                                 uint64_t frames = kFrames, bool quiet_workers = true) {
  std::vector<std::string> args = {"--backend",      "cuda",
                                   "--model",        kModel,
                                   "--seed",         std::to_string(kSeed),
                                   "--frames",       std::to_string(frames),
                                   "--warmup",       "0",
                                   "--mps-pipe-dir", mps.pipe_dir,
                                   "--mps-log-dir",  mps.log_dir};
  if (quiet_workers) args.push_back("--quiet-workers");
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// Encoder + decoder in this process, back to back: the single-process result for each of the
// distinct input sets the orchestrator cycles through.
std::vector<std::vector<float>> single_process_actions() {
  const ModelConfig config = model_config(kModel);
  RunShape shape;
  const WeightStore weights = WeightStore::random(config, 0, kSeed, WeightSet::kAll);
  CudaEncoder encoder(config, shape, weights);
  CudaDecoder decoder(config, shape, weights);
  const StageSizes sizes = stage_sizes(config, shape);
  auto images = cuda::DeviceBuffer<Bf16>(sizes.image_values, "images");
  auto state = cuda::DeviceBuffer<Bf16>(sizes.state_values, "state");
  auto noise = cuda::DeviceBuffer<Bf16>(sizes.noise_values, "noise");
  auto kv = cuda::DeviceBuffer<Bf16>(sizes.kv_slot_values, "kv slot");
  auto actions = cuda::DeviceBuffer<float>(sizes.action_values, "actions");
  cuda::Stream stream;
  std::vector<std::vector<float>> out;
  for (uint64_t i = 0; i < std::min<uint64_t>(kDistinctInputs, kFrames); ++i) {
    const FrameInputs in = make_frame_inputs(config, shape, input_seed(kSeed), i);
    cuda::copy_to_device(images.get(), in.images.data(), images.bytes());
    cuda::copy_to_device(state.get(), in.state.data(), state.bytes());
    cuda::copy_to_device(noise.get(), in.noise.data(), noise.bytes());
    // Pageable copies on the legacy stream may still be in flight; the engines use their own.
    CUDA_CHECK(cudaDeviceSynchronize());
    encoder.encode(images.get(), kv.get(), stream.get());
    decoder.decode(kv.get(), state.get(), noise.get(), actions.get(), stream.get());
    stream.synchronize();
    out.push_back(cuda::download(actions.get(), sizes.action_values));
    REQUIRE(test::count_nonfinite(out.back()) == 0);  // the yardstick of every frame
  }
  return out;
}

}  // namespace

TEST_CASE("mps pipeline matches the single-process engines and splits the SMs", "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  REQUIRE_FALSE(mps_daemon_answers(mps));
  const std::string dir = test::temp_dir("gpu_mps");
  const std::vector<std::vector<float>> expected = single_process_actions();
  const size_t values = expected.front().size();
  // The fp32 CPU reference of input set 0: the yardstick for both GPU paths.
  std::vector<float> cpu_reference(values);
  {
    const ModelConfig config = model_config(kModel);
    RunShape shape;
    const WeightStore weights = WeightStore::random(config, 0, kSeed, WeightSet::kAll);
    const FrameInputs in = make_frame_inputs(config, shape, input_seed(kSeed), 0);
    std::vector<float> kv(stage_sizes(config, shape).kv_values);
    ReferenceEncoder(config, weights).encode(shape, in.images.data(), kv.data());
    ReferenceDecoder(config, weights)
        .decode(shape, kv.data(), in.state.data(), in.noise.data(), cpu_reference.data());
  }
  const double single_vs_cpu = test::rel_error(expected[0], cpu_reference);
  std::printf("  single-process engines vs fp32 CPU reference (frame 0): %.3e\n", single_vs_cpu);
  CHECK(single_vs_cpu < 2e-2);

  std::vector<float> first;
  for (const std::string mode : {"concurrent", "sequential", "concurrent"}) {
    const std::string actions = dir + "/actions.f32", json = dir + "/run.json";
    const auto run =
        test::run_orchestrator(gpu_run(mps, {"--encoder-pct", "30", "--decoder-pct", "70", "--mode",
                                             mode, "--actions-out", actions, "--json", json}),
                               300s);
    INFO(run.output);
    REQUIRE(run.status.success());
    const nlohmann::json r = read_json(json).at("runs").at(0);
    const int device_sms = r.at("device_sms");
    const int enc_sms = r.at("encoder").at("sm_count"), dec_sms = r.at("decoder").at("sm_count");
    std::printf("  %s 30/70: encoder %d SMs, decoder %d SMs of %d; split applied: %s\n",
                mode.c_str(), enc_sms, dec_sms, device_sms,
                r.at("split_applied").get<bool>() ? "yes" : "no");
    CHECK(r.at("encoder").at("mps_client") == 1);
    CHECK(r.at("decoder").at("mps_client") == 1);
    CHECK(std::abs(enc_sms - device_sms * 0.3) <= 2.0);
    CHECK(std::abs(dec_sms - device_sms * 0.7) <= 2.0);
    CHECK(r.at("split_applied").get<bool>());
    // The driver's file for the encoder's interprocess events went with the encoder.
    const int encoder_pid = test::pid_in_log(run.output, "encoder_worker");
    REQUIRE(encoder_pid > 0);
    CHECK(ipc::cuda_event_files_of_process(encoder_pid).empty());

    const std::vector<float> got = test::read_floats(actions);
    REQUIRE(got.size() == kFrames * values);
    // rel_error is NaN for a non-finite value, which std::max below would pass over.
    REQUIRE(test::count_nonfinite(got) == 0);
    const double pipeline_vs_cpu = test::rel_error(got.data(), cpu_reference.data(), values);
    std::printf("  %s pipeline vs fp32 CPU reference (frame 0): %.3e\n", mode.c_str(),
                pipeline_vs_cpu);
    CHECK(pipeline_vs_cpu < 2e-2);
    double worst = 0;
    for (uint64_t f = 0; f < kFrames; ++f) {
      const auto& want = expected[f % expected.size()];
      worst = std::max(worst, test::rel_error(got.data() + f * values, want.data(), values));
    }
    std::printf("  %s: worst rel error vs single-process over %llu frames: %.3e\n", mode.c_str(),
                static_cast<unsigned long long>(kFrames), worst);
    CHECK(worst < 2e-2);
    if (first.empty()) {
      first = got;
    } else {
      CHECK(test::bitwise_equal(first.data(), got.data(), got.size() * sizeof(float)));
    }
  }
  // The orchestrator started the daemon, so it quit it on exit.
  CHECK_FALSE(mps_daemon_answers(mps));
  fs::remove_all(dir);
}

// The workers read a weights file into their own memory and upload it: the same weights drawn
// from the seed inside the workers give the same bits.
TEST_CASE("a weights file gives the actions of the same weights drawn in the workers",
          "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  REQUIRE_FALSE(mps_daemon_answers(mps));
  const std::string dir = test::temp_dir("gpu_weights_file");
  const std::string weights = dir + "/pi0-2l.safetensors";
  WeightStore::random(model_config(kModel), 0, kSeed, WeightSet::kAll).save_safetensors(weights);
  std::vector<std::vector<float>> actions;
  for (const bool from_file : {false, true}) {
    const std::string out = dir + (from_file ? "/file.f32" : "/drawn.f32");
    std::vector<std::string> extra = {"--actions-out", out};
    if (from_file) extra.insert(extra.end(), {"--weights", weights});
    const auto run = test::run_orchestrator(gpu_run(mps, extra, 8), 300s);
    INFO(run.output);
    REQUIRE(run.status.success());
    actions.push_back(test::read_floats(out));
    REQUIRE(actions.back().size() ==
            8 * stage_sizes(model_config(kModel), RunShape{}).action_values);
    REQUIRE(test::count_nonfinite(actions.back()) == 0);
  }
  CHECK(
      test::bitwise_equal(actions[0].data(), actions[1].data(), actions[0].size() * sizeof(float)));
  CHECK_FALSE(mps_daemon_answers(mps));
  fs::remove_all(dir);
}

// --decoder-batch 2 with the decoder on a small share, so that frames pile up behind it and
// pass through it two at a time: each frame's actions still match the single-process engines
// (within bf16 rounding: a pass of two runs other GEMM algorithms) and come out in frame order.
TEST_CASE("mps pipeline with decoder batching keeps every frame's actions", "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  REQUIRE_FALSE(mps_daemon_answers(mps));
  const std::string dir = test::temp_dir("gpu_mps_batch");
  const std::vector<std::vector<float>> expected = single_process_actions();
  const size_t values = expected.front().size();
  const std::string actions = dir + "/actions.f32", json = dir + "/run.json";
  const auto run = test::run_orchestrator(
      gpu_run(mps,
              {"--encoder-pct", "90", "--decoder-pct", "10", "--decoder-batch", "2",
               "--actions-out", actions, "--json", json},
              kFrames, /*quiet_workers=*/false),
      300s);
  INFO(run.output);
  REQUIRE(run.status.success());
  const nlohmann::json r = read_json(json).at("runs").at(0);
  CHECK(r.at("decoder_batch") == 2);
  CHECK(r.at("slots") == 4);
  // The decoder worker logs "decoder: N frames in M passes (X frames per pass)" as it stops:
  // passes of two must have happened, or this test would not test them.
  const size_t at = run.output.find(" frames per pass)");
  REQUIRE(at != std::string::npos);
  const size_t open = run.output.rfind('(', at);
  REQUIRE(open != std::string::npos);
  const double per_pass = std::stod(run.output.substr(open + 1, at - open - 1));
  std::printf("  decoder batch 2 at 90/10: %.2f frames per pass\n", per_pass);
  CHECK(per_pass > 1.2);
  const std::vector<float> got = test::read_floats(actions);
  REQUIRE(got.size() == kFrames * values);
  REQUIRE(test::count_nonfinite(got) == 0);  // NaN would pass std::max below
  double worst = 0;
  for (uint64_t f = 0; f < kFrames; ++f) {
    const auto& want = expected[f % expected.size()];
    worst = std::max(worst, test::rel_error(got.data() + f * values, want.data(), values));
  }
  std::printf(
      "  decoder batch 2 at 90/10: worst rel error vs single-process over %llu frames: "
      "%.3e\n",
      static_cast<unsigned long long>(kFrames), worst);
  CHECK(worst < 2e-2);
  CHECK_FALSE(mps_daemon_answers(mps));
  fs::remove_all(dir);
}

// The decoder worker follows the encoder per layer with its stream held in the front end, waits
// that only the encoder's signals or the decoder's own host can let go. With the encoder killed
// mid-run the run must still end at once, naming it, with no worker and no segment left.
TEST_CASE("kill -9 of the encoder worker on the GPU stops the run naming it", "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  REQUIRE_FALSE(mps_daemon_answers(mps));
  ChildProcess orch = ChildProcess::spawn(
      "orchestrator", test::orchestrator_exe(),
      gpu_run(mps, {"--encoder-pct", "50", "--decoder-pct", "50"}, 1'000'000, false), {}, false);
  REQUIRE(test::eventually(
      [&] { return orch.output().find("streaming frames") != std::string::npos; }, 120'000ms));
  std::this_thread::sleep_for(500ms);  // frames are flowing
  REQUIRE(orch.running());
  const int victim = test::pid_in_log(orch.output(), "encoder_worker");
  REQUIRE(victim > 0);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(victim, SIGKILL) == 0);
  const auto status = orch.wait_for(10'000ms);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(orch.output());
  REQUIRE(status.has_value());
  std::printf("  encoder killed: the run ended after %.2f s with status %d\n", secs, status->code);
  CHECK(secs < 3.0);
  CHECK(status->code == 3);
  CHECK(orch.output().find("encoder_worker (pid " + std::to_string(victim) +
                           ") died: killed by signal 9") != std::string::npos);
  CHECK(test::eventually([&] { return test::workers_of(orch.pid()).empty(); }, 2000ms));
  CHECK(test::segments_of(orch.pid()).empty());
  CHECK(ipc::cuda_event_files_of_process(victim).empty());
  CHECK(test::eventually([&] { return !mps_daemon_answers(mps); }, 5000ms));
}

// An encoder hung inside a frame (here one that never signals Gemma layer 0, by fault injection)
// must not hang the decoder waiting for that layer: the wait's deadline (10 s) ends the run with
// the layer named, whether the decoder waits in its stream's front end (layer 0 of pi0-2l's two)
// or in a wait kernel, and nothing is left behind.
TEST_CASE("an encoder that never signals a layer ends the run at the wait deadline, naming it",
          "[gpu][mps]") {
  for (const std::string frontend : {"1", "0"}) {
    INFO("PI0_FRONTEND_WAITS=" << frontend);
    const MpsOptions mps = test_mps_options();
    REQUIRE_FALSE(mps_daemon_answers(mps));
    const auto run = test::run_orchestrator(
        gpu_run(mps, {"--encoder-pct", "50", "--decoder-pct", "50"}, 10, false), 120s,
        {{"PI0_TEST_WITHHOLD_LAYER_SIGNAL", "0"}, {"PI0_FRONTEND_WAITS", frontend}});
    INFO(run.output);
    REQUIRE(run.seconds < 120.0);  // ended by itself, not killed by run_orchestrator
    std::printf(
        "  layer 0 withheld, PI0_FRONTEND_WAITS=%s: the run ended after %.1f s with "
        "status %d\n",
        frontend.c_str(), run.seconds, run.status.code);
    CHECK(run.status.code != 0);
    CHECK(run.seconds >= 10.0);  // not before the deadline
    CHECK(run.output.find("the encoder did not signal layer 0") != std::string::npos);
    CHECK(test::eventually([&] { return test::workers_of(run.pid).empty(); }, 2000ms));
    CHECK(test::segments_of(run.pid).empty());
    const int encoder_pid = test::pid_in_log(run.output, "encoder_worker");
    REQUIRE(encoder_pid > 0);
    CHECK(ipc::cuda_event_files_of_process(encoder_pid).empty());
    CHECK(test::eventually([&] { return !mps_daemon_answers(mps); }, 5000ms));
  }
}

TEST_CASE("a daemon that was already running is adopted and left running", "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  MpsDaemon ours = MpsDaemon::start_or_adopt(mps);
  REQUIRE(ours.started_here());
  const auto run = test::run_orchestrator(gpu_run(mps, {}, 5), 300s);
  INFO(run.output);
  REQUIRE(run.status.success());
  CHECK(run.output.find("adopted") != std::string::npos);
  CHECK(mps_daemon_answers(mps));
  ours.stop();
  CHECK_FALSE(mps_daemon_answers(mps));
}

TEST_CASE("without mps the split is reported as not applied", "[gpu][mps]") {
  const MpsOptions mps = test_mps_options();
  const std::string dir = test::temp_dir("gpu_nomps");
  const auto run =
      test::run_orchestrator(gpu_run(mps, {"--no-mps", "--json", dir + "/r.json"}, 5), 300s);
  INFO(run.output);
  REQUIRE(run.status.success());
  const nlohmann::json r = read_json(dir + "/r.json").at("runs").at(0);
  CHECK_FALSE(r.at("split_applied").get<bool>());
  CHECK(r.at("encoder").at("mps_client") == 0);
  CHECK(run.output.find("not applied") != std::string::npos);
  CHECK_FALSE(mps_daemon_answers(mps));
  fs::remove_all(dir);
}
