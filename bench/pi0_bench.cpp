// Single-process baseline: CudaEncoder + CudaDecoder on the whole GPU, one frame at a time, from
// the same library code the workers use. The decoder runs on a second stream and follows the
// encoder layer by layer through its first flow step, as the pipeline's workers do
// (PI0_LAYER_WAITS=0: both on one stream). Per shape: latency of encode+decode (median, p99, mean
// and max over >= 200 inferences after warm-up, CUDA events) and the same with the stages serial,
// host to host (inputs uploaded, actions read back), each stage's time alone, achieved TFLOP/s and
// weight GB/s against the GPU's measured ceilings (ceilings.hpp), back-to-back throughput and GPU
// memory per stage.
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "ceilings.hpp"
#include "pi0/check.hpp"
#include "pi0/command_line.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/gemm_table.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/op_timer.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/cuda_encoder.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/log.hpp"
#include "pi0/weights.hpp"

using namespace pi0;

namespace {

constexpr int kInputSets = 2;  // rotate inputs so that no run reads what the last one cached

struct Case {
  int views, chunk, prompt;
  double reference_ms;  // the widely used Triton implementation, same H100 (spec figures)
};

struct Figures {
  Case c{};
  bool overlapped = false;  // the decoder followed the encoder layer by layer
  int frontend_waits = 0;   // of its layer waits, those held in the stream's front end
  double e2e_serial_median = 0;
  double e2e_median = 0, e2e_p99 = 0, enc_median = 0, dec_median = 0, throughput = 0;
  double e2e_mean = 0, e2e_max = 0;  // of the same samples as e2e_median and e2e_p99
  double host_median = 0, host_p99 = 0;
  double enc_tflops = 0, dec_tflops = 0, enc_gbps = 0, dec_gbps = 0, e2e_tflops = 0;
  double enc_flop = 0, dec_flop = 0, enc_bytes = 0, dec_bytes = 0;
  size_t enc_weights = 0, enc_work = 0, dec_weights = 0, dec_work = 0;
  size_t enc_measured = 0, dec_measured = 0;
  std::string first_step_attention, later_attention;  // CudaDecoder::attention_kernels
};

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

// The end-to-end figures of one timed loop's samples.
void set_e2e(Figures& f, const std::vector<double>& total) {
  f.e2e_median = percentile(total, 0.5);
  f.e2e_p99 = percentile(total, 0.99);
  f.e2e_mean = mean(total);
  f.e2e_max = *std::max_element(total.begin(), total.end());
}

size_t used_memory() {
  size_t free_bytes = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return total - free_bytes;
}

double gib(size_t b) {
  return static_cast<double>(b) / (1u << 30);
}

void print_breakdown(const char* stage, const cuda::OpTimer& timer) {
  double total = 0;
  for (const auto& r : timer.rows()) total += r.ms_per_pass;
  std::printf("  %s breakdown (graph with event nodes, %d passes): %.3f ms\n", stage,
              timer.passes(), total);
  for (const auto& r : timer.rows())
    std::printf("    %-34s %8.3f ms %5.1f%% %6d calls %8.2f us/call\n", r.label.c_str(),
                r.ms_per_pass, 100 * r.ms_per_pass / total, r.calls_per_pass,
                1000 * r.ms_per_pass / std::max(r.calls_per_pass, 1));
}

// Median time (ms) of `run`, from `start` (the stream it begins on) to `end` (the one it ends on),
// after its eager run, graph capture and first replay.
double median_stage_ms(const std::function<void()>& run, cudaStream_t start, cudaStream_t end,
                       int reps) {
  for (int i = 0; i < 3; ++i) run();
  CUDA_CHECK(cudaDeviceSynchronize());
  cuda::Event a, b;
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    a.record(start);
    run();
    b.record(end);
    b.synchronize();
    ms.push_back(b.elapsed_since(a));
  }
  return percentile(ms, 0.5);
}

// In-place tuning: each GEMM's finalists (ranked alone) tried one at a time in the stage itself,
// the whole stage timed. A finalist is kept only where it beats the current choice, timed again
// just before, by more than 0.2% twice in a row: a median of 20 stage runs moves by ~0.1% from
// run to run, and an unconfirmed win would be noise written into the table. The kept choices go
// to the GEMM table recorder (--write-gemm-table).
void tune_in_place(const char* stage, const std::vector<cuda::TunableGemm>& tunables,
                   const std::function<double()>& time_stage, const std::function<void()>& forget) {
  constexpr double kBetter = 0.998;
  if (tunables.empty()) return;
  std::printf("in-place tuning, %s: %.3f ms with each GEMM's fastest alone\n", stage, time_stage());
  for (const cuda::TunableGemm& t : tunables) {
    const int start = t.gemm->chosen_candidate();
    int best = start;
    double best_ms = time_stage();
    for (const int c : t.finalists) {
      if (c == best || !t.gemm->select_candidate(c)) continue;
      forget();
      const double first = time_stage();
      const double again = first < best_ms * kBetter ? time_stage() : first;
      if (first < best_ms * kBetter && again < best_ms * kBetter) {
        best_ms = 0.5 * (first + again);
        best = c;
      }
    }
    PI0_CHECK(t.gemm->select_candidate(best), "in-place tuning lost a checked candidate");
    forget();
    t.gemm->record_choice();
    std::printf("  %-32s candidate %4d -> %4d  (%.3f ms)  %s\n", t.label.c_str(), start, best,
                best_ms, t.gemm->describe_candidate(best).c_str());
  }
  std::fflush(stdout);
}

Figures run_case(const ModelConfig& config, const Case& c, const WeightStore& enc_weights,
                 const WeightStore& dec_weights, int iters, int warmup,
                 const CudaEngineOptions& enc_options, const CudaEngineOptions& dec_options,
                 bool breakdown) {
  const RunShape shape{c.views, c.chunk, c.prompt};
  const StageSizes sizes = stage_sizes(config, shape);
  Figures f;
  f.c = c;

  CUDA_CHECK(cudaDeviceSynchronize());
  const size_t before = used_memory();
  CudaEncoder encoder(config, shape, enc_weights, enc_options);
  CUDA_CHECK(cudaDeviceSynchronize());
  const size_t after_encoder = used_memory();
  CudaDecoder decoder(config, shape, dec_weights, dec_options);
  CUDA_CHECK(cudaDeviceSynchronize());
  f.enc_measured = after_encoder - before;
  f.dec_measured = used_memory() - after_encoder;
  f.enc_weights = encoder.weight_bytes();
  f.enc_work = encoder.workspace_bytes();
  f.dec_weights = decoder.weight_bytes();
  f.dec_work = decoder.workspace_bytes();
  f.enc_flop = encoder.flops();
  f.dec_flop = decoder.flops();
  f.enc_bytes = static_cast<double>(encoder.weight_bytes());
  f.dec_bytes = decoder.weight_bytes_read();
  if (!decoder.persistent_layers()) {
    f.first_step_attention = decoder.attention_kernels(0);
    f.later_attention = decoder.attention_kernels(config.flow_steps - 1);
  }

  struct Inputs {
    cuda::DeviceBuffer<Bf16> images, state, noise, kv;
    cuda::DeviceBuffer<float> actions;
  };
  std::vector<Inputs> sets;
  for (int i = 0; i < kInputSets; ++i) {
    const FrameInputs in = make_frame_inputs(config, shape, 9000, static_cast<uint64_t>(i));
    sets.push_back({cuda::upload(in.images, "images"), cuda::upload(in.state, "state"),
                    cuda::upload(in.noise, "noise"),
                    cuda::DeviceBuffer<Bf16>(sizes.kv_slot_values, "kv slot"),
                    cuda::DeviceBuffer<float>(sizes.action_values, "actions")});
  }
  // Two schedules of the same kernels. Serial: both stages on one stream, which times each stage
  // alone. Overlapped (the default): the decoder on a second stream follows the encoder layer by
  // layer through its first flow step (pi0/cuda/layer_signal.hpp), as the pipeline's workers do;
  // frames stay one at a time. PI0_LAYER_WAITS=0 keeps the serial schedule for every figure.
  // One process: its two streams run side by side, as two MPS clients do.
  const bool overlap = cuda::layer_handoff_wanted(/*mps_client=*/true);
  cuda::Stream stream;          // the encoder's, and the serial schedule's
  cuda::Stream decoder_stream;  // the overlapped decoder's
  cuda::InProcessHandoff handoff(config.lm_layers, cuda::kLayerWaitTimeoutNs);
  const cuda::LayerSignals signals = handoff.signals();
  const cuda::LayerWait wait = handoff.wait();
  // The stream the frame's actions are written on (and its end is recorded on).
  cudaStream_t const out_stream = overlap ? decoder_stream.get() : stream.get();
  auto encode = [&](Inputs& s) {
    if (overlap) handoff.begin_frame(stream.get(), decoder_stream.get());
    encoder.encode(s.images.get(), s.kv.get(), stream.get(), overlap ? &signals : nullptr);
  };
  auto decode = [&](Inputs& s) {
    Bf16* slot = s.kv.get();
    decoder.decode_batch(&slot, 1, s.state.get(), s.noise.get(), s.actions.get(), out_stream,
                         overlap ? &wait : nullptr, &handoff.limits());
    if (overlap) handoff.end_frame(decoder_stream.get());
  };
  auto infer_serial = [&](int i) {
    Inputs& s = sets[static_cast<size_t>(i % kInputSets)];
    encoder.encode(s.images.get(), s.kv.get(), stream.get());
    decoder.decode(s.kv.get(), s.state.get(), s.noise.get(), s.actions.get(), stream.get());
  };
  auto infer = [&](int i) {
    Inputs& s = sets[static_cast<size_t>(i % kInputSets)];
    encode(s);
    decode(s);
  };
  if (dec_options.autotune_inplace || enc_options.autotune_inplace) {
    Inputs& s = sets[0];
    constexpr int kReps = 20;
    // A real prefix for the decoder to attend to: zeros or leftovers can time differently.
    encoder.encode(s.images.get(), s.kv.get(), stream.get());
    // The encoder first: the decoder's first step is then tuned beside the encoder it will run
    // beside.
    tune_in_place(
        "encoder", encoder.tunable_gemms(),
        [&] {
          return median_stage_ms([&] { encoder.encode(s.images.get(), s.kv.get(), stream.get()); },
                                 stream.get(), stream.get(), kReps);
        },
        [&] { encoder.forget_graphs(); });
    // The decoder's first-step products are tuned by the time of the two stages overlapped
    // (where they are), the others by the decoder's alone.
    std::vector<cuda::TunableGemm> alone, beside;
    for (const cuda::TunableGemm& t : decoder.tunable_gemms())
      (t.overlapped && overlap ? beside : alone).push_back(t);
    tune_in_place(
        "decoder", alone,
        [&] {
          return median_stage_ms(
              [&] {
                decoder.decode(s.kv.get(), s.state.get(), s.noise.get(), s.actions.get(),
                               stream.get());
              },
              stream.get(), stream.get(), kReps);
        },
        [&] { decoder.forget_graphs(); });
    tune_in_place(
        "decoder's first step beside the encoder", beside,
        [&] {
          return median_stage_ms(
              [&] {
                encode(s);
                decode(s);
              },
              stream.get(), out_stream, kReps);
        },
        [&] { decoder.forget_graphs(); });
  }
  // Eager run, graph capture and first replay for every input set, then plain warm-up.
  for (int i = 0; i < 3 * kInputSets + warmup; ++i) {
    infer_serial(i);
    if (overlap) infer(i);
  }
  CUDA_CHECK(cudaDeviceSynchronize());

  cuda::Event e0, e1, e2;
  {
    std::vector<double> enc, dec, total;
    for (int i = 0; i < iters; ++i) {
      Inputs& s = sets[static_cast<size_t>(i % kInputSets)];
      e0.record(stream.get());
      encoder.encode(s.images.get(), s.kv.get(), stream.get());
      e1.record(stream.get());
      decoder.decode(s.kv.get(), s.state.get(), s.noise.get(), s.actions.get(), stream.get());
      e2.record(stream.get());
      e2.synchronize();
      enc.push_back(e1.elapsed_since(e0));
      dec.push_back(e2.elapsed_since(e1));
      total.push_back(e2.elapsed_since(e0));
    }
    set_e2e(f, total);
    f.e2e_serial_median = f.e2e_median;
    f.enc_median = percentile(enc, 0.5);
    f.dec_median = percentile(dec, 0.5);
  }
  if (overlap) {
    std::vector<double> total;
    for (int i = 0; i < iters; ++i) {
      Inputs& s = sets[static_cast<size_t>(i % kInputSets)];
      e0.record(stream.get());
      encode(s);
      decode(s);
      e2.record(out_stream);
      e2.synchronize();
      total.push_back(e2.elapsed_since(e0));
    }
    set_e2e(f, total);
  }

  // Host to host, as a one-process deployment sees a frame: inputs uploaded from pinned host
  // memory, encode + decode, actions read back, the host waiting on the stream. This is the
  // measure of the pipeline's latency (input handed in to actions available to the host).
  {
    const FrameInputs in = make_frame_inputs(config, shape, 9000, 0);
    cuda::PinnedBuffer<Bf16> images(in.images.size(), "host images");
    cuda::PinnedBuffer<Bf16> state(in.state.size(), "host state");
    cuda::PinnedBuffer<Bf16> noise(in.noise.size(), "host noise");
    cuda::PinnedBuffer<float> actions(sizes.action_values, "host actions");
    std::copy(in.images.begin(), in.images.end(), images.get());
    std::copy(in.state.begin(), in.state.end(), state.get());
    std::copy(in.noise.begin(), in.noise.end(), noise.get());
    Inputs& s = sets[0];
    // On the encoder's stream, before the frame starts: the decoder's stream waits for that.
    const auto upload = [&](Bf16* dst, const cuda::PinnedBuffer<Bf16>& src) {
      CUDA_CHECK(
          cudaMemcpyAsync(dst, src.get(), src.bytes(), cudaMemcpyHostToDevice, stream.get()));
    };
    std::vector<double> host;
    for (int i = 0; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      upload(s.images.get(), images);
      upload(s.state.get(), state);
      upload(s.noise.get(), noise);
      encode(s);
      decode(s);
      CUDA_CHECK(cudaMemcpyAsync(actions.get(), s.actions.get(), actions.bytes(),
                                 cudaMemcpyDeviceToHost, out_stream));
      CUDA_CHECK(cudaStreamSynchronize(out_stream));
      host.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    f.host_median = percentile(host, 0.5);
    f.host_p99 = percentile(host, 0.99);
  }

  // Back to back: the host enqueues all inferences without waiting.
  cuda::Event start, stop;
  start.record(stream.get());
  for (int i = 0; i < iters; ++i) infer(i);
  stop.record(out_stream);
  stop.synchronize();
  f.throughput = iters / (stop.elapsed_since(start) / 1000.0);
  if (const uint32_t layer = handoff.timed_out_layer())
    throw Error("the decoder's wait for the encoder's layer " + std::to_string(layer - 1) +
                " ran into its deadline");
  f.overlapped = overlap;
  f.frontend_waits = overlap ? handoff.limits().frontend_layers : 0;

  const std::vector<float> actions = cuda::download(sets[0].actions.get(), sets[0].actions.size());
  for (float a : actions) PI0_CHECK(std::isfinite(a), "non-finite action in the benchmark run");

  if (breakdown) {
    cuda::OpTimer enc_timer, dec_timer;
    encoder.set_op_timer(&enc_timer);
    decoder.set_op_timer(&dec_timer);
    for (int i = 0; i < 3 + 30; ++i) {
      if (i == 3) {  // eager pass and capture done
        enc_timer.reset_totals();
        dec_timer.reset_totals();
      }
      Inputs& s = sets[0];
      encoder.encode(s.images.get(), s.kv.get(), stream.get());
      enc_timer.collect();
      decoder.decode(s.kv.get(), s.state.get(), s.noise.get(), s.actions.get(), stream.get());
      dec_timer.collect();
    }
    encoder.set_op_timer(nullptr);
    decoder.set_op_timer(nullptr);
    std::printf("V=%d C=%d P=%d\n", c.views, c.chunk, c.prompt);
    print_breakdown("encoder", enc_timer);
    print_breakdown("decoder", dec_timer);
    std::printf("%s", decoder.layers_trace().c_str());
  }

  f.enc_tflops = f.enc_flop / (f.enc_median * 1e-3) / 1e12;
  f.dec_tflops = f.dec_flop / (f.dec_median * 1e-3) / 1e12;
  f.e2e_tflops = (f.enc_flop + f.dec_flop) / (f.e2e_median * 1e-3) / 1e12;
  f.enc_gbps = f.enc_bytes / (f.enc_median * 1e-3) / 1e9;
  f.dec_gbps = f.dec_bytes / (f.dec_median * 1e-3) / 1e9;
  return f;
}

void print_case(const Figures& f, const bench::Ceilings& peak) {
  std::printf(
      "V=%d C=%d P=%d: e2e median %.3f ms p99 %.3f ms mean %.3f ms max %.3f ms (%s%s; serial "
      "%.3f ms) | host to host median %.3f ms p99 %.3f ms "
      "| encoder %.3f ms (%.2f TFLOP, %.0f TFLOP/s "
      "= %.0f%% of %.0f (%s); weights %.2f GB at %.0f GB/s) | decoder %.3f ms (%.3f TFLOP, %.0f "
      "TFLOP/s; %.2f GB weight reads at %.0f GB/s = %.0f%% of %.0f (%s)) | %.1f inf/s back to "
      "back | "
      "memory: encoder %.2f GiB weights + %.0f MiB workspace (measured %.2f GiB), decoder %.2f "
      "GiB + %.0f MiB (measured %.2f GiB)%s\n",
      f.c.views, f.c.chunk, f.c.prompt, f.e2e_median, f.e2e_p99, f.e2e_mean, f.e2e_max,
      f.overlapped ? "decoder following the encoder per layer" : "serial",
      f.frontend_waits > 0
          ? (", " + std::to_string(f.frontend_waits) + " of its waits in the front end").c_str()
          : "",
      f.e2e_serial_median, f.host_median, f.host_p99, f.enc_median, f.enc_flop / 1e12, f.enc_tflops,
      100 * f.enc_tflops / peak.tflops, peak.tflops, peak.of, f.enc_bytes / 1e9, f.enc_gbps,
      f.dec_median, f.dec_flop / 1e12, f.dec_tflops, f.dec_bytes / 1e9, f.dec_gbps,
      100 * f.dec_gbps / peak.gbps, peak.gbps, peak.of, f.throughput, gib(f.enc_weights),
      f.enc_work / 1048576.0, gib(f.enc_measured), gib(f.dec_weights), f.dec_work / 1048576.0,
      gib(f.dec_measured),
      f.later_attention.empty() ? ""
                                : (" | decoder attention: first flow step " +
                                   f.first_step_attention + ", later steps " + f.later_attention)
                                      .c_str());
  std::fflush(stdout);
}

// --case V,C,P, checked as a run's shape: a prompt of 2^31 - 1 tokens would otherwise size the
// encoder's weights (terabytes) before the engine refuses the shape.
Case parse_case(const std::string& spec) {
  Case c{0, 0, 0, 0.0};
  char comma1 = 0, comma2 = 0;
  std::istringstream in(spec);
  in >> c.views >> comma1 >> c.chunk >> comma2 >> c.prompt;
  const bool parsed = in && comma1 == ',' && comma2 == ',';
  in >> std::ws;
  PI0_CHECK(parsed && in.eof(), "--case wants V,C,P, got '" + spec + "'");
  try {
    RunShape{c.views, c.chunk, c.prompt}.validate();
  } catch (const Error& e) {
    throw Error("--case " + spec + ": " + e.what());
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pi0 single-process GPU baseline (encoder + decoder, one frame at a time)"};
  std::string model = "pi0";
  int iters = 200, warmup = 20;
  std::string json_path;
  bool autotune = false, autotune_decoder = false, autotune_wide = false, autotune_inplace = false;
  std::string gemm_table, write_gemm_table;
  bool breakdown = false;
  bool sm_count_only = false;
  std::string log_level = "warn";
  std::string handover;
  std::vector<std::string> case_specs;
  app.add_option("--model", model, "model config (pi0, pi0-1l, pi0-2l, tiny)")
      ->check(CLI::IsMember(model_config_names()));
  app.add_option("--iters", iters, "timed inferences per shape (>= 200 for the report)")
      ->transform(decimal_integer())
      ->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", warmup, "untimed inferences after graph capture")
      ->transform(decimal_integer())
      ->check(CLI::Range(0, 1000000));
  app.add_option("--json", json_path, "write the figures to this file");
  app.add_flag("--autotune", autotune, "time cuBLASLt candidates per GEMM at construction");
  app.add_flag("--autotune-decoder", autotune_decoder, "the same for the decoder's GEMMs only");
  app.add_flag("--autotune-wide", autotune_wide,
               "with --autotune[-decoder]: search cuBLASLt's configurations beyond its "
               "heuristic's (minutes; for --write-gemm-table)");
  app.add_flag("--autotune-inplace", autotune_inplace,
               "with --autotune[-decoder]: the wide search's few fastest alone per GEMM, tried "
               "one at a time in the stage itself (for --write-gemm-table)");
  app.add_option("--gemm-table", gemm_table,
                 "read tuned GEMM choices from this file (as PI0_GEMM_TABLE does)");
  app.add_option("--write-gemm-table", write_gemm_table,
                 "write the choices autotuning made to this file, for PI0_GEMM_TABLE");
  app.add_option("--kernel-handover", handover,
                 "how the graphs hand over from kernel to kernel: completion or early "
                 "(as PI0_KERNEL_HANDOVER does; see pi0/cuda/device.hpp)")
      ->check(CLI::IsMember({"completion", "early"}));
  app.add_flag("--breakdown", breakdown, "also time every operation (event nodes in the graph)");
  app.add_option("--case", case_specs, "V,C,P (repeatable); default: the four report shapes");
  app.add_flag("--sm-count", sm_count_only, "print the SM count this process sees and exit");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check([](const std::string& v) {
        return is_valid_log_level(v) ? std::string() : "unknown log level '" + v + "'";
      });
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return exit_for_help(app, e, "pi0_bench");
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "pi0_bench: error: %s\n", e.what());
    return 2;
  }
  init_logging("pi0_bench", log_level);
  // A report piped into a reader that quits early (`| head`) would end the run at its first
  // write, before its JSON and GEMM table are written; ignored, the write fails (EPIPE) and the
  // run fails at its end, files written, as for a full disk (the help, above, keeps the default).
  ::signal(SIGPIPE, SIG_IGN);
  if ((!write_gemm_table.empty() || autotune_wide || autotune_inplace) && !autotune &&
      !autotune_decoder) {
    std::fprintf(stderr, "pi0_bench: --%s needs --autotune or --autotune-decoder\n",
                 autotune_inplace ? "autotune-inplace"
                 : autotune_wide  ? "autotune-wide"
                                  : "write-gemm-table");
    return 2;
  }
  if (!handover.empty()) setenv("PI0_KERNEL_HANDOVER", handover.c_str(), 1);
  // Before any Gemm exists: the table is read once per process, at the first one.
  if (!gemm_table.empty()) setenv("PI0_GEMM_TABLE", gemm_table.c_str(), 1);
  // Before any work: a run can take an hour (--autotune-wide), and its results must not be lost
  // to a path that cannot be written, nor written over the table it read or wrote.
  std::vector<Case> cases;
  try {
    for (const std::string& spec : case_specs) cases.push_back(parse_case(spec));
    check_writable(json_path, "--json");
    check_writable(write_gemm_table, "--write-gemm-table");
    const char* read_table = std::getenv("PI0_GEMM_TABLE");
    for (const auto& [path, option] :
         {std::pair{std::string(read_table ? read_table : ""),
                    gemm_table.empty() ? "PI0_GEMM_TABLE" : "--gemm-table"},
          std::pair{write_gemm_table, "--write-gemm-table"}})
      PI0_CHECK(!same_file(json_path, path), "--json " + json_path + " is the file of " + option);
  } catch (const Error& e) {
    std::fprintf(stderr, "pi0_bench: %s\n", e.what());
    return 2;
  }

  try {
    const ModelConfig config = model_config(model);
    if (cases.empty())
      cases = {{1, 63, 0, 15.2}, {2, 63, 0, 17.7}, {3, 63, 0, 20.6}, {2, 50, 20, 20.3}};
    // Without a GPU, say so as the orchestrator does, not as a CUDA error at a source line.
    std::string why_no_gpu;
    PI0_CHECK(cuda::cuda_device_present(&why_no_gpu), "no usable CUDA GPU (" + why_no_gpu + ")");
    cudaDeviceProp props{};
    CUDA_CHECK(cudaGetDeviceProperties(&props, 0));
    if (sm_count_only) {
      std::printf("%d\n", props.multiProcessorCount);
      const std::string report_error = report_write_error();
      PI0_CHECK(report_error.empty(), report_error);
      return 0;
    }
    const bench::Ceilings peak = bench::ceilings_for(props.name);
    std::printf(
        "pi0_bench: model %s on %s (%d SMs), %d timed inferences per shape%s, kernel handover "
        "at %s\n",
        config.name.c_str(), props.name, props.multiProcessorCount, iters,
        autotune ? ", autotuned GEMMs" : "", cuda::handover_name(cuda::kernel_handover()));
    std::fflush(stdout);

    // Decoder weights do not depend on the prompt; encoder weights do (language_embeds).
    const WeightStore dec_weights = WeightStore::random(config, 0, 1234, WeightSet::kDecoder);
    std::map<int, WeightStore> enc_weights;
    std::vector<Figures> results;
    CudaEngineOptions enc_options, dec_options;
    enc_options.autotune_gemms = autotune;
    dec_options.autotune_gemms = autotune || autotune_decoder;
    enc_options.autotune_wide = dec_options.autotune_wide = autotune_wide || autotune_inplace;
    enc_options.autotune_inplace = autotune && autotune_inplace;
    dec_options.autotune_inplace = autotune_inplace;

    for (const Case& c : cases) {
      if (!enc_weights.count(c.prompt))
        enc_weights.emplace(c.prompt,
                            WeightStore::random(config, c.prompt, 1234, WeightSet::kEncoder));
      results.push_back(run_case(config, c, enc_weights.at(c.prompt), dec_weights, iters, warmup,
                                 enc_options, dec_options, breakdown));
      print_case(results.back(), peak);
    }
    if (!write_gemm_table.empty()) {
      const cuda::GemmTable tuned = cuda::tuned_gemm_choices();
      tuned.save(write_gemm_table);
      std::printf("pi0_bench: %zu tuned GEMM choices written to %s\n", tuned.size(),
                  write_gemm_table.c_str());
    }

    if (!json_path.empty()) {
      nlohmann::json j;
      j["model"] = config.name;
      j["device"] = props.name;
      j["ceiling_tflops"] = peak.tflops;
      j["ceiling_gbps"] = peak.gbps;
      j["ceilings_of"] = peak.of;
      j["iters"] = iters;
      j["autotune"] = autotune;
      j["autotune_decoder"] = autotune_decoder;
      j["autotune_wide"] = autotune_wide || autotune_inplace;
      j["autotune_inplace"] = autotune_inplace;
      const char* table = std::getenv("PI0_GEMM_TABLE");
      j["gemm_table"] = table ? table : "";
      j["kernel_handover"] = cuda::handover_name(cuda::kernel_handover());
      for (const Figures& f : results) {
        j["cases"].push_back({{"views", f.c.views},
                              {"chunk", f.c.chunk},
                              {"prompt", f.c.prompt},
                              {"e2e_median_ms", f.e2e_median},
                              {"e2e_p99_ms", f.e2e_p99},
                              {"e2e_mean_ms", f.e2e_mean},
                              {"e2e_max_ms", f.e2e_max},
                              {"stages_overlapped", f.overlapped},
                              {"frontend_layer_waits", f.frontend_waits},
                              {"e2e_serial_median_ms", f.e2e_serial_median},
                              {"host_to_host_median_ms", f.host_median},
                              {"host_to_host_p99_ms", f.host_p99},
                              {"encoder_median_ms", f.enc_median},
                              {"decoder_median_ms", f.dec_median},
                              {"throughput_per_s", f.throughput},
                              {"encoder_tflop", f.enc_flop / 1e12},
                              {"decoder_tflop", f.dec_flop / 1e12},
                              {"encoder_tflops", f.enc_tflops},
                              {"decoder_tflops", f.dec_tflops},
                              {"encoder_weight_gbps", f.enc_gbps},
                              {"decoder_weight_gbps", f.dec_gbps},
                              {"encoder_weight_bytes", f.enc_weights},
                              {"encoder_workspace_bytes", f.enc_work},
                              {"decoder_weight_bytes", f.dec_weights},
                              {"decoder_workspace_bytes", f.dec_work},
                              {"encoder_measured_bytes", f.enc_measured},
                              {"decoder_measured_bytes", f.dec_measured},
                              {"decoder_first_step_attention", f.first_step_attention},
                              {"decoder_later_attention", f.later_attention},
                              {"reference_ms", f.c.reference_ms}});
      }
      // A file name that is not UTF-8 (gemm_table) is replaced, not thrown over after the run.
      try {
        write_results_file(json_path,
                           j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
      } catch (const Error& e) {
        throw Error(std::string("--json: ") + e.what());
      }
    }

    std::printf("\n%-14s %9s %9s %9s %9s %9s %9s %9s %9s %9s %8s %8s %9s\n", "shape", "e2e med",
                "e2e p99", "serial", "h2h med", "enc med", "dec med", "enc TF/s", "dec GB/s",
                "inf/s b2b", "enc GiB", "dec GiB", "Triton");
    for (const Figures& f : results) {
      char shape_name[32];
      std::snprintf(shape_name, sizeof shape_name, "V=%d C=%d P=%d", f.c.views, f.c.chunk,
                    f.c.prompt);
      char reference[16] = "-";
      if (f.c.reference_ms > 0)
        std::snprintf(reference, sizeof reference, "%.1f ms", f.c.reference_ms);
      std::printf(
          "%-14s %6.2f ms %6.2f ms %6.2f ms %6.2f ms %6.2f ms %6.2f ms %9.0f %9.0f %9.1f %8.2f "
          "%8.2f %9s\n",
          shape_name, f.e2e_median, f.e2e_p99, f.e2e_serial_median, f.host_median, f.enc_median,
          f.dec_median, f.enc_tflops, f.dec_gbps, f.throughput, gib(f.enc_weights + f.enc_work),
          gib(f.dec_weights + f.dec_work), reference);
    }
    // After the files: as the orchestrator does, a report that cannot be printed fails the run
    // (exit 1) with its JSON and GEMM table written.
    const std::string report_error = report_write_error();
    PI0_CHECK(report_error.empty(), report_error);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pi0_bench: %s\n", e.what());
    return 1;
  }
}
