// The CUDA encoder and decoder against the fp32 CPU reference, on fresh random weights and
// inputs. The decoder is fed the reference's K/V rounded to bf16, so each stage is checked on its
// own; one more comparison runs GPU encoder -> GPU decoder end to end.
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/wgmma_attention.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/cuda_encoder.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/reference.hpp"
#include "pi0/weights.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;

namespace {

constexpr double kStageBound = 1e-2;
constexpr double kEndToEndBound = 2e-2;

struct CaseResult {
  double kv_error = 0, decoder_error = 0, end_to_end_error = 0;
};

// One model/shape: reference encode + decode, GPU encode + decode, and the three comparisons.
CaseResult run_case(const std::string& model, int views, int chunk, int prompt, uint64_t seed,
                    const CudaEngineOptions& options = {}) {
  const ModelConfig config = model_config(model);
  const RunShape shape{views, chunk, prompt};
  const StageSizes sizes = stage_sizes(config, shape);
  const int prefix = shape.prefix_len(config);
  const WeightStore weights = WeightStore::random(config, prompt, seed, WeightSet::kAll);
  const FrameInputs in = make_frame_inputs(config, shape, seed + 1000, 3);

  std::vector<float> ref_kv(sizes.kv_values);
  ReferenceEncoder(config, weights).encode(shape, in.images.data(), ref_kv.data());
  const std::vector<float> ref_kv_bf16 = rounded(ref_kv);
  const ReferenceDecoder ref_decoder(config, weights);
  std::vector<float> ref_actions(sizes.action_values), ref_actions_e2e(sizes.action_values);
  ref_decoder.decode(shape, ref_kv_bf16.data(), in.state.data(), in.noise.data(),
                     ref_actions.data());
  ref_decoder.decode(shape, ref_kv.data(), in.state.data(), in.noise.data(),
                     ref_actions_e2e.data());

  CudaEncoder encoder(config, shape, weights, options);
  CudaDecoder decoder(config, shape, weights, options);
  auto images = cuda::upload(in.images, "images");
  auto state = cuda::upload(in.state, "state");
  auto noise = cuda::upload(in.noise, "noise");
  auto kv = poisoned<Bf16>(sizes.kv_slot_values, "kv slot");
  // The decoder's rows of the reference slot are NaN: it must write them before it reads them.
  auto ref_kv_dev =
      cuda::upload(to_bf16(prefix_to_slot(config, shape, ref_kv, NAN)), "reference kv");
  auto actions = poisoned<float>(sizes.action_values, "actions");
  auto actions_e2e = poisoned<float>(sizes.action_values, "actions e2e");

  encoder.encode(images.get(), kv.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto gpu_slot = to_float(cuda::download(kv.get(), kv.size()));
  const auto gpu_kv = slot_to_prefix(config, shape, gpu_slot);
  decoder.decode(ref_kv_dev.get(), state.get(), noise.get(), actions.get(), nullptr);
  decoder.decode(kv.get(), state.get(), noise.get(), actions_e2e.get(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  // The encoder wrote every prefix row and none of the decoder's rows (still poison).
  CHECK(count_nonfinite(gpu_slot) == sizes.kv_slot_values - sizes.kv_values);
  const auto gpu_actions = cuda::download(actions.get(), actions.size());
  const auto gpu_actions_e2e = cuda::download(actions_e2e.get(), actions_e2e.size());
  const std::string name =
      model +
      (options.autotune_gemms ? (options.autotune_wide ? " (autotuned, wide)" : " (autotuned)")
                              : "") +
      " V=" + std::to_string(views) + " C=" + std::to_string(chunk) +
      " P=" + std::to_string(prompt);
  CaseResult r;
  r.kv_error = rel_error(gpu_kv, ref_kv);
  r.decoder_error = rel_error(gpu_actions, ref_actions);
  r.end_to_end_error = rel_error(gpu_actions_e2e, ref_actions_e2e);
  for (int l = 0; l < config.lm_layers; ++l)
    for (int which = 0; which < 2; ++which) {
      const size_t off = kv_offset(config, prefix, l, which);
      const size_t n = static_cast<size_t>(prefix) * config.head_dim;
      report(name + " kv layer " + std::to_string(l) + (which ? " V" : " K"),
             rel_error(gpu_kv.data() + off, ref_kv.data() + off, n));
    }
  report(name + " encoder kv (all)", r.kv_error);
  report(name + " decoder actions (ref kv in)", r.decoder_error);
  report(name + " encoder -> decoder actions", r.end_to_end_error);
  CHECK(count_nonfinite(gpu_kv) == 0);
  CHECK(count_nonfinite(gpu_actions) == 0);
  CHECK(count_nonfinite(gpu_actions_e2e) == 0);
  return r;
}

void require_case(const CaseResult& r) {
  REQUIRE(r.kv_error < kStageBound);
  REQUIRE(r.decoder_error < kStageBound);
  REQUIRE(r.end_to_end_error < kEndToEndBound);
}

}  // namespace

TEST_CASE("tiny stages match the reference", "[gpu]") {
  require_case(run_case("tiny", 2, 63, 0, 101));
  require_case(run_case("tiny", 1, 50, 20, 102));
  require_case(run_case("tiny", 3, 7, 5, 103));
}

TEST_CASE("pi0-1l stages match the reference without a prompt", "[gpu]") {
  require_case(run_case("pi0-1l", 2, 63, 0, 201));
}

TEST_CASE("pi0-1l stages match the reference with a prompt", "[gpu]") {
  require_case(run_case("pi0-1l", 1, 50, 20, 202));
}

TEST_CASE("pi0-2l stages match the reference", "[gpu]") {
  require_case(run_case("pi0-2l", 2, 63, 0, 301));
}

TEST_CASE("stages with autotuned gemms match the reference", "[gpu]") {
  CudaEngineOptions options;
  options.autotune_gemms = true;
  require_case(run_case("pi0-1l", 1, 50, 20, 502, options));
  // The wide search's choices (configurations the heuristic does not offer), as a GEMM table
  // carries them to every process.
  options.autotune_wide = true;
  require_case(run_case("pi0-1l", 2, 63, 0, 503, options));
}

// The decoder's per-step weight GEMMs on the skinny kernel (fused residual / GeGLU epilogues; the
// wgmma mainloop where the build has sm_90a code) instead of cuBLASLt.
TEST_CASE("stages with the decoder on skinny gemms match the reference", "[gpu]") {
  const ScopedEnv skinny_env("PI0_DECODER_SKINNY", "1"), layers_env("PI0_DECODER_LAYERS", nullptr);
  require_case(run_case("pi0-2l", 2, 63, 0, 601));
  require_case(run_case("pi0-1l", 1, 50, 20, 602));
}

// The decoder's work between flow steps as six graph nodes (rms norm, out GEMM, sample to bf16,
// in GEMM, SiLU, state token copy), the path before cuda::flow_step_glue.
TEST_CASE("stages with the decoder's flow-step work as six nodes match the reference", "[gpu]") {
  const ScopedEnv glue_env("PI0_DECODER_STEP_GLUE", "0"),
      layers_env("PI0_DECODER_LAYERS", nullptr), skinny_env("PI0_DECODER_SKINNY", nullptr);
  require_case(run_case("tiny", 2, 63, 0, 701));
  require_case(run_case("pi0-2l", 2, 63, 0, 702));
}

// The opt-in fused qkv kernel (PI0_DECODER_QKV_ROPE=1: flow steps 2-10 on qkv_rope.cu where its
// CTAs fit at once; elsewhere the decoder keeps cuBLASLt's product and rope_split_qkv).
TEST_CASE("stages with the decoder's qkv product on the fused kernel match the reference",
          "[gpu]") {
  const ScopedEnv qkv_env("PI0_DECODER_QKV_ROPE", "1"), layers_env("PI0_DECODER_LAYERS", nullptr),
      skinny_env("PI0_DECODER_SKINNY", nullptr);
  require_case(run_case("pi0-2l", 2, 63, 0, 703));
}

TEST_CASE("encoder rejects weights of another model", "[gpu]") {
  const ModelConfig config = model_config("pi0-1l");
  const WeightStore tiny = WeightStore::random(model_config("tiny"), 0, 7, WeightSet::kEncoder);
  std::string message;
  try {
    CudaEncoder encoder(config, RunShape{2, 63, 0}, tiny);
  } catch (const Error& e) {
    message = e.what();
  }
  INFO(message);
  REQUIRE(message.find("CudaEncoder") != std::string::npos);
  REQUIRE(message.find("vision_") != std::string::npos);
  REQUIRE(message.find("pi0-1l") != std::string::npos);

  const ModelConfig tiny_config = model_config("tiny");
  const WeightStore prompt5 = WeightStore::random(tiny_config, 5, 7, WeightSet::kEncoder);
  REQUIRE_THROWS_AS(CudaEncoder(tiny_config, RunShape{1, 10, 0}, prompt5), Error);
  const WeightStore decoder_only = WeightStore::random(tiny_config, 0, 7, WeightSet::kDecoder);
  REQUIRE_THROWS_AS(CudaEncoder(tiny_config, RunShape{1, 10, 0}, decoder_only), Error);
}

TEST_CASE("decoder rejects weights of another model", "[gpu]") {
  const WeightStore tiny = WeightStore::random(model_config("tiny"), 0, 8, WeightSet::kDecoder);
  std::string message;
  try {
    CudaDecoder decoder(model_config("pi0-1l"), RunShape{2, 63, 0}, tiny);
  } catch (const Error& e) {
    message = e.what();
  }
  INFO(message);
  REQUIRE(message.find("CudaDecoder") != std::string::npos);
  REQUIRE(message.find("decoder_") != std::string::npos);
}

// Out of GPU memory is a one-line error naming the buffer and the free memory, and leaves the
// device usable (the failed cudaMalloc's error is not left for a later call to report).
TEST_CASE("running out of GPU memory names the buffer and leaves the device usable", "[gpu]") {
  std::string message;
  try {
    DeviceBuffer<float> huge(size_t{1} << 48, "an impossible buffer");  // 1 PiB
  } catch (const Error& e) {
    message = e.what();
  }
  INFO(message);
  REQUIRE(message.find("cannot allocate") != std::string::npos);
  REQUIRE(message.find("an impossible buffer") != std::string::npos);
  REQUIRE(message.find("MiB free of") != std::string::npos);
  REQUIRE(message.find('\n') == std::string::npos);
  DeviceBuffer<float> small(1024, "a small buffer");
  CUDA_CHECK(cudaMemset(small.get(), 0, small.bytes()));
  CUDA_CHECK(cudaDeviceSynchronize());
}

// The decoder's first flow step runs beside the encoder, where the wgmma kernel's clusters wait
// for SMs that the encoder's GEMMs hold: it keeps the GEMM attention, and only the later steps run
// wgmma (bench/NOTES.md v21). The MPS pipeline's worker does the same at half the GPU or more,
// and below that keeps the GEMMs in every step (v23).
TEST_CASE("the decoder's first flow step keeps the gemm attention and the later steps run wgmma",
          "[gpu]") {
  const ModelConfig config = model_config("pi0-2l");
  const RunShape shape{2, 63, 0};
  const WeightStore weights = WeightStore::random(config, 0, 71, WeightSet::kDecoder);
  const ScopedEnv no_override("PI0_DECODER_ATTENTION", nullptr);
  cuda::WgmmaAttentionShape later;
  later.rows = (shape.chunk + 1) * config.lm_heads;
  later.keys = shape.prefix_len(config) + shape.chunk + 1;
  const bool wgmma_here = cuda::wgmma_attention_available() &&
                          cuda::wgmma_attention_runs_here(cuda::plan_wgmma_attention(later));
  {
    CudaDecoder decoder(config, shape, weights);
    CHECK(decoder.attention_kernels(0) == "gemm");
    for (int step = 1; step < config.flow_steps; ++step)
      CHECK(decoder.attention_kernels(step) == (wgmma_here ? "wgmma" : "gemm"));
    REQUIRE_THROWS_AS(decoder.attention_kernels(config.flow_steps), Error);
    if (!wgmma_here) WARN("the wgmma attention cannot run here: every step checked on the GEMMs");
  }
  CudaEngineOptions in_pipeline;
  for (const int share : {100, CudaEngineOptions::kWgmmaMinSharePercent}) {
    in_pipeline.decoder_share_percent = share;
    CudaDecoder worker(config, shape, weights, in_pipeline);
    INFO("worker at a " << share << "% share");
    CHECK(worker.attention_kernels(0) == "gemm");
    for (int step = 1; step < config.flow_steps; ++step)
      CHECK(worker.attention_kernels(step) == (wgmma_here ? "wgmma" : "gemm"));
  }
  in_pipeline.decoder_share_percent = CudaEngineOptions::kWgmmaMinSharePercent - 1;
  CudaDecoder small_share(config, shape, weights, in_pipeline);
  for (int step = 0; step < config.flow_steps; ++step)
    CHECK(small_share.attention_kernels(step) == "gemm");
}

TEST_CASE("full pi0 is finite and bitwise deterministic", "[gpu]") {
  EngineRig rig = engine_rig("pi0", RunShape{2, 63, 0}, 401);

  std::vector<FrameOutputs> runs;
  {
    CudaEncoder encoder(rig.config, rig.shape, rig.weights);
    CudaDecoder decoder(rig.config, rig.shape, rig.weights);
    std::printf(
        "  pi0 encoder: %.2f GiB weights, %.1f MiB workspace; decoder: %.2f GiB, %.1f MiB\n",
        encoder.weight_bytes() / 1073741824.0, encoder.workspace_bytes() / 1048576.0,
        decoder.weight_bytes() / 1073741824.0, decoder.workspace_bytes() / 1048576.0);
    // Call 1 runs eagerly, call 2 captures the graphs, call 3 replays them.
    for (int i = 0; i < 3; ++i) runs.push_back(rig.run(encoder, decoder));
  }
  {
    // A second pair of engines on the same weights: same algorithms, same bits.
    CudaEncoder encoder(rig.config, rig.shape, rig.weights);
    CudaDecoder decoder(rig.config, rig.shape, rig.weights);
    runs.push_back(rig.run(encoder, decoder));
  }
  const std::vector<float>& first = runs[0].actions;
  REQUIRE(count_nonfinite(to_float(runs[0].kv)) == 0);
  REQUIRE(count_nonfinite(first) == 0);
  double norm = 0;
  for (float v : first) norm += double(v) * v;
  std::printf("  pi0 actions rms %.4f\n", std::sqrt(norm / first.size()));
  for (size_t i = 1; i < runs.size(); ++i) {
    INFO("run " << i);
    REQUIRE(bitwise_equal(runs[i].kv.data(), runs[0].kv.data(), runs[0].kv.size() * sizeof(Bf16)));
    REQUIRE(bitwise_equal(runs[i].actions.data(), first.data(), first.size() * sizeof(float)));
  }
}

// --decoder-batch: frames decoded in one pass (their rows stacked under the same weight GEMMs,
// each attending to its own slot) get what they get decoded one by one, within bf16 rounding,
// and each matches the reference. Different frames, so a pass that mixed up slots, rows or
// inputs would be far off.
TEST_CASE("frames decoded in one pass match frames decoded one by one", "[gpu]") {
  const ModelConfig config = model_config("pi0-2l");
  const RunShape shape{2, 63, 0};
  const StageSizes sizes = stage_sizes(config, shape);
  constexpr int kFrames = 3;
  const WeightStore weights = WeightStore::random(config, 0, 601, WeightSet::kAll);
  CudaEngineOptions options;
  options.max_decode_batch = kFrames;
  CudaEncoder encoder(config, shape, weights);
  CudaDecoder decoder(config, shape, weights, options);
  REQUIRE(decoder.max_batch() == kFrames);
  const ReferenceDecoder ref_decoder(config, weights);

  std::vector<DeviceBuffer<Bf16>> slots;
  std::vector<Bf16*> slot_ptrs;
  std::vector<Bf16> states, noises;
  std::vector<std::vector<float>> ref_actions, single_actions;
  for (int f = 0; f < kFrames; ++f) {
    const FrameInputs in = make_frame_inputs(config, shape, 602, static_cast<uint64_t>(f));
    auto images = cuda::upload(in.images, "images");
    slots.push_back(poisoned<Bf16>(sizes.kv_slot_values, "kv slot"));
    slot_ptrs.push_back(slots.back().get());
    encoder.encode(images.get(), slots.back().get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto prefix_kv = slot_to_prefix(
        config, shape, to_float(cuda::download(slots.back().get(), sizes.kv_slot_values)));
    std::vector<float> ref(sizes.action_values);
    ref_decoder.decode(shape, prefix_kv.data(), in.state.data(), in.noise.data(), ref.data());
    ref_actions.push_back(ref);

    auto state = cuda::upload(in.state, "state");
    auto noise = cuda::upload(in.noise, "noise");
    auto actions = poisoned<float>(sizes.action_values, "actions");
    decoder.decode(slots.back().get(), state.get(), noise.get(), actions.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    single_actions.push_back(cuda::download(actions.get(), actions.size()));
    states.insert(states.end(), in.state.begin(), in.state.end());
    noises.insert(noises.end(), in.noise.begin(), in.noise.end());
  }
  {
    // One frame per pass is exactly the decoder without batching: same GEMMs, same bits.
    CudaDecoder plain(config, shape, weights);
    const FrameInputs in = make_frame_inputs(config, shape, 602, 0);
    auto state0 = cuda::upload(in.state, "state");
    auto noise0 = cuda::upload(in.noise, "noise");
    auto actions0 = poisoned<float>(sizes.action_values, "actions");
    plain.decode(slot_ptrs[0], state0.get(), noise0.get(), actions0.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto plain_actions = cuda::download(actions0.get(), actions0.size());
    REQUIRE(bitwise_equal(plain_actions.data(), single_actions[0].data(),
                          plain_actions.size() * sizeof(float)));
  }
  auto state = cuda::upload(states, "states");
  auto noise = cuda::upload(noises, "noises");
  for (int count = 2; count <= kFrames; ++count) {
    auto actions = poisoned<float>(sizes.action_values * count, "pass actions");
    std::vector<std::vector<float>> runs;
    // Call 1 runs eagerly, call 2 captures the pass's graph, call 3 replays it.
    for (int i = 0; i < 3; ++i) {
      CUDA_CHECK(cudaMemset(actions.get(), 0xFF, actions.bytes()));
      decoder.decode_batch(slot_ptrs.data(), count, state.get(), noise.get(), actions.get(),
                           nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      runs.push_back(cuda::download(actions.get(), actions.size()));
    }
    REQUIRE(count_nonfinite(runs[0]) == 0);
    for (size_t i = 1; i < runs.size(); ++i)
      REQUIRE(bitwise_equal(runs[0].data(), runs[i].data(), runs[0].size() * sizeof(float)));
    for (int f = 0; f < count; ++f) {
      const float* pass_f = runs[0].data() + static_cast<size_t>(f) * sizes.action_values;
      const double vs_single = rel_error(pass_f, single_actions[f].data(), sizes.action_values);
      const double vs_ref = rel_error(pass_f, ref_actions[f].data(), sizes.action_values);
      const std::string name =
          "pi0-2l pass of " + std::to_string(count) + ", frame " + std::to_string(f);
      report(name + " vs alone", vs_single);
      report(name + " vs reference", vs_ref);
      CHECK(vs_single < kStageBound);
      CHECK(vs_ref < kStageBound);
    }
  }
  CHECK_THROWS_AS(decoder.decode_batch(slot_ptrs.data(), kFrames + 1, state.get(), noise.get(),
                                       nullptr, nullptr),
                  Error);
}

// The opt-in persistent layers kernel (one kernel per flow step) against the per-op path and the
// reference, and the same bits whatever its grid: an MPS share runs it on fewer CTAs, each taking
// several units of a phase, and must not change the actions. Decoder rows of the slot are NaN
// until the kernel writes them; the shapes cover a partial last tile of rows (C = 50) and of
// keys (a 20-token prompt).
TEST_CASE("persistent decoder layers match the per-op path on any grid", "[gpu]") {
  // The decoder's path switches, cleared for this test.
  const ScopedEnv layers_env("PI0_DECODER_LAYERS", nullptr),
      skinny_env("PI0_DECODER_SKINNY", nullptr);
  struct Shape {
    const char* model;
    RunShape shape;
  };
  for (const Shape& c : {Shape{"pi0-2l", {2, 63, 0}}, Shape{"pi0-1l", {1, 50, 20}}}) {
    const ModelConfig config = model_config(c.model);
    const StageSizes sizes = stage_sizes(config, c.shape);
    const WeightStore weights =
        WeightStore::random(config, c.shape.prompt_len, 701, WeightSet::kAll);
    const FrameInputs in = make_frame_inputs(config, c.shape, 702, 0);
    std::vector<float> ref_kv(sizes.kv_values);
    ReferenceEncoder(config, weights).encode(c.shape, in.images.data(), ref_kv.data());
    const std::vector<float> ref_kv_bf16 = rounded(ref_kv);
    std::vector<float> ref_actions(sizes.action_values);
    ReferenceDecoder(config, weights)
        .decode(c.shape, ref_kv_bf16.data(), in.state.data(), in.noise.data(), ref_actions.data());
    const auto slot = to_bf16(prefix_to_slot(config, c.shape, ref_kv, NAN));
    auto state = cuda::upload(in.state, "state");
    auto noise = cuda::upload(in.noise, "noise");

    auto decode = [&](int ctas, bool expect_persistent) {
      CudaEngineOptions options;
      options.decoder_persistent_layers = expect_persistent;
      options.decoder_layers_ctas = ctas;
      CudaDecoder decoder(config, c.shape, weights, options);
      REQUIRE(decoder.persistent_layers() == expect_persistent);
      auto kv = cuda::upload(slot, "kv slot");
      auto actions = poisoned<float>(sizes.action_values, "actions");
      // Call 1 runs eagerly, call 2 captures the decode's graph, call 3 replays it: the
      // cooperative kernel in a graph is what the worker runs.
      std::vector<std::vector<float>> runs;
      for (int i = 0; i < 3; ++i) {
        CUDA_CHECK(cudaMemset(actions.get(), 0xFF, actions.bytes()));
        decoder.decode(kv.get(), state.get(), noise.get(), actions.get(), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        runs.push_back(cuda::download(actions.get(), actions.size()));
      }
      for (size_t i = 1; i < runs.size(); ++i)
        REQUIRE(bitwise_equal(runs[0].data(), runs[i].data(), runs[0].size() * sizeof(float)));
      return runs[0];
    };
    const auto whole = decode(0, true);
    const auto few = decode(7, true);
    const auto per_op = decode(0, false);
    const std::string name = std::string(c.model) + " C=" + std::to_string(c.shape.chunk) +
                             " P=" + std::to_string(c.shape.prompt_len);
    REQUIRE(count_nonfinite(whole) == 0);
    report(name + " persistent layers vs reference", rel_error(whole, ref_actions));
    report(name + " persistent layers vs per-op", rel_error(whole, per_op));
    CHECK(rel_error(whole, ref_actions) < kStageBound);
    CHECK(rel_error(whole, per_op) < kStageBound);
    CHECK(bitwise_equal(whole.data(), few.data(), whole.size() * sizeof(float)));
  }
}

// The decoder's L2 prefetch (on by default; a side stream forked from and rejoined to the decode,
// in the graph too) reads weights early and writes nothing: the actions keep their bits, eager,
// captured and replayed, with one frame and a pass of two.
TEST_CASE("the decoder's L2 prefetch changes no bits", "[gpu]") {
  const ScopedEnv layers_env("PI0_DECODER_LAYERS", nullptr),
      skinny_env("PI0_DECODER_SKINNY", nullptr);
  const ModelConfig config = model_config("pi0-2l");
  const RunShape shape{2, 63, 0};
  const StageSizes sizes = stage_sizes(config, shape);
  const WeightStore weights = WeightStore::random(config, 0, 801, WeightSet::kAll);
  const FrameInputs in = make_frame_inputs(config, shape, 802, 0);
  std::vector<float> ref_kv(sizes.kv_values);
  ReferenceEncoder(config, weights).encode(shape, in.images.data(), ref_kv.data());
  const auto slot = to_bf16(prefix_to_slot(config, shape, ref_kv, NAN));
  std::vector<Bf16> state2(in.state), noise2(in.noise);  // two frames, the same inputs
  state2.insert(state2.end(), in.state.begin(), in.state.end());
  noise2.insert(noise2.end(), in.noise.begin(), in.noise.end());
  auto state = cuda::upload(state2, "state");
  auto noise = cuda::upload(noise2, "noise");

  auto decode = [&](const char* prefetch) {
    const ScopedEnv prefetch_env("PI0_DECODER_PREFETCH", prefetch);
    CudaEngineOptions options;
    options.max_decode_batch = 2;
    CudaDecoder decoder(config, shape, weights, options);
    auto kv0 = cuda::upload(slot, "kv slot 0");
    auto kv1 = cuda::upload(slot, "kv slot 1");
    Bf16* slots[] = {kv0.get(), kv1.get()};
    auto actions = poisoned<float>(2 * sizes.action_values, "actions");
    std::vector<std::vector<float>> runs;  // per count: eager, capture, replay
    for (int count = 1; count <= 2; ++count)
      for (int i = 0; i < 3; ++i) {
        CUDA_CHECK(cudaMemset(actions.get(), 0xFF, actions.bytes()));
        decoder.decode_batch(slots, count, state.get(), noise.get(), actions.get(), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        auto out = cuda::download(actions.get(), actions.size());
        out.resize(static_cast<size_t>(count) * sizes.action_values);
        runs.push_back(std::move(out));
      }
    return runs;
  };
  const auto with = decode(nullptr);
  const auto without = decode("0");
  REQUIRE(with.size() == without.size());
  for (size_t i = 0; i < with.size(); ++i) {
    REQUIRE(count_nonfinite(with[i]) == 0);
    REQUIRE(bitwise_equal(with[i].data(), without[i].data(), with[i].size() * sizeof(float)));
  }
}

// The single-process baseline's overlapped schedule (pi0_bench): the decoder, on its own stream,
// follows the encoder layer by layer through its first flow step. It runs the same kernels on
// the same data, so its actions must be the serial schedule's bits; the slots are poisoned before
// each frame, so a decoder that read a layer before the encoder wrote it would not get them.
TEST_CASE("a decoder following the encoder per layer in one process gives the serial bits",
          "[gpu]") {
  const ModelConfig config = model_config("pi0-2l");
  const RunShape shape{2, 63, 0};
  const StageSizes sizes = stage_sizes(config, shape);
  constexpr int kFrames = 2;
  const WeightStore weights = WeightStore::random(config, 0, 901, WeightSet::kAll);
  CudaEncoder encoder(config, shape, weights);
  CudaDecoder decoder(config, shape, weights);
  struct Frame {
    DeviceBuffer<Bf16> images, state, noise, slot;
    DeviceBuffer<float> actions;
  };
  std::vector<Frame> frames;
  for (int f = 0; f < kFrames; ++f) {
    const FrameInputs in = make_frame_inputs(config, shape, 902, static_cast<uint64_t>(f));
    frames.push_back({cuda::upload(in.images, "images"), cuda::upload(in.state, "state"),
                      cuda::upload(in.noise, "noise"), poisoned<Bf16>(sizes.kv_slot_values),
                      poisoned<float>(sizes.action_values)});
  }
  cuda::Stream encoder_stream, decoder_stream;
  std::vector<std::vector<float>> serial;
  for (Frame& fr : frames) {
    encoder.encode(fr.images.get(), fr.slot.get(), encoder_stream.get());
    decoder.decode(fr.slot.get(), fr.state.get(), fr.noise.get(), fr.actions.get(),
                   encoder_stream.get());
    encoder_stream.synchronize();
    serial.push_back(cuda::download(fr.actions.get(), fr.actions.size()));
    REQUIRE(count_nonfinite(serial.back()) == 0);
  }

  cuda::InProcessHandoff handoff(config.lm_layers, 5'000'000'000ull);
  DeviceBuffer<uint64_t> stamps(2, "stamps");  // the encoder's end, the decoder's last wake-up
  cuda::LayerSignals signals = handoff.signals();
  signals.last_stamp = stamps.get();
  cuda::LayerWait wait = handoff.wait();
  wait.done_at = stamps.get() + 1;
  for (int round = 0; round < 3; ++round) {  // eager, capture, replay
    for (Frame& fr : frames) {
      CUDA_CHECK(cudaMemsetAsync(fr.slot.get(), 0xFF, fr.slot.bytes(), encoder_stream.get()));
      CUDA_CHECK(cudaMemsetAsync(fr.actions.get(), 0xFF, fr.actions.bytes(), encoder_stream.get()));
      handoff.begin_frame(encoder_stream.get(), decoder_stream.get());
      encoder.encode(fr.images.get(), fr.slot.get(), encoder_stream.get(), &signals);
      Bf16* slot = fr.slot.get();
      decoder.decode_batch(&slot, 1, fr.state.get(), fr.noise.get(), fr.actions.get(),
                           decoder_stream.get(), &wait, &handoff.limits());
      handoff.end_frame(decoder_stream.get());
    }
    decoder_stream.synchronize();
    REQUIRE(handoff.timed_out_layer() == 0);
    const auto when = cuda::download(stamps.get(), 2);
    // The decoder's last layer went on after the encoder's end (%globaltimer ticks about once a
    // microsecond and differs slightly between SMs: room for that).
    REQUIRE(when[0] != 0);
    REQUIRE(when[1] + 50'000 >= when[0]);
    for (int f = 0; f < kFrames; ++f) {
      const auto got = cuda::download(frames[f].actions.get(), frames[f].actions.size());
      INFO("round " << round << ", frame " << f);
      REQUIRE(bitwise_equal(got.data(), serial[f].data(), got.size() * sizeof(float)));
    }
  }
}
