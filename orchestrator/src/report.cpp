#include <cstdio>
#include <nlohmann/json.hpp>

#include "pi0/orchestrator.hpp"

namespace pi0 {
namespace {

nlohmann::json worker_json(const WorkerSummary& w) {
  return {{"pid", w.pid},
          {"backend", w.backend},
          {"device", w.device},
          {"sm_count", w.sm_count},
          {"mps_client", w.mps_client},
          {"active_thread_pct", w.active_thread_pct},
          {"weight_gib", w.weight_gib},
          {"device_gib", w.device_gib},
          {"stage_ms_median", w.stage_ms_median},
          {"stage_ms_mean", w.stage_ms_mean}};
}

}  // namespace

nlohmann::json report_to_json(const RunReport& r) {
  nlohmann::json j = {{"label", r.label},
                      {"backend", r.backend},
                      {"model", r.model},
                      {"mode", r.mode},
                      {"views", r.views},
                      {"chunk", r.chunk},
                      {"prompt_len", r.prompt_len},
                      {"slots", r.slots},
                      {"decoder_batch", r.decoder_batch},
                      {"wait", r.wait},
                      {"encoder_pct", r.encoder_pct},
                      {"decoder_pct", r.decoder_pct},
                      {"mps", r.mps},
                      {"split_applied", r.split_applied},
                      {"split_note", r.split_note},
                      {"device_sms", r.device_sms},
                      {"frames", r.frames},
                      {"rate_hz", r.rate_hz},
                      {"latency_ms",
                       {{"p50", r.latency_p50_ms},
                        {"p99", r.latency_p99_ms},
                        {"max", r.latency_max_ms},
                        {"mean", r.latency_mean_ms}}},
                      {"throughput_fps", r.throughput_fps},
                      {"handoff_us_median", r.handoff_us_median},
                      {"wall_s", r.wall_s},
                      {"interrupted", r.interrupted},
                      {"error", r.error},
                      {"encoder", worker_json(r.encoder)},
                      {"decoder", worker_json(r.decoder)}};
  // The single-process baseline's inferences timed host to host; pipeline runs have no such figure.
  if (r.host_to_host_p50_ms > 0)
    j["host_to_host_ms"] = {{"p50", r.host_to_host_p50_ms}, {"p99", r.host_to_host_p99_ms}};
  return j;
}

std::string report_json(const std::vector<RunReport>& reports) {
  nlohmann::json out;
  out["runs"] = nlohmann::json::array();
  for (const auto& r : reports) out["runs"].push_back(report_to_json(r));
  return json_text(out);
}

std::string json_text(const nlohmann::json& document) {
  // Error texts come from workers (cut at 511 bytes, maybe inside a character) and paths: invalid
  // UTF-8 is replaced rather than losing the whole file.
  return document.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

void print_report(const RunReport& r) {
  const auto sms = [&](const WorkerSummary& w) {
    return r.backend == "cuda" ? std::to_string(w.sm_count) + "/" + std::to_string(r.device_sms)
                               : std::string("-");
  };
  std::printf("\n== pi0-mps run: %s backend, model %s, %s mode, V=%d C=%d P=%d ==\n",
              r.backend.c_str(), r.model.c_str(), r.mode.c_str(), r.views, r.chunk, r.prompt_len);
  if (r.backend == "cuda") {
    std::printf("split %d/%d (encoder/decoder %%): %s\n", r.encoder_pct, r.decoder_pct,
                r.split_note.c_str());
  } else {
    std::printf("MPS: %s\n", r.split_note.c_str());
  }
  std::printf("%-22s %12s\n", "frames", std::to_string(r.frames).c_str());
  // As asked for (%.1f made 29.97 Hz 30.0, and --rate 0.01 0.0, which reads as back to back).
  if (r.rate_hz > 0) std::printf("%-22s %12g\n", "camera rate (Hz)", r.rate_hz);
  std::printf("%-22s %12.3f\n", "latency p50 (ms)", r.latency_p50_ms);
  std::printf("%-22s %12.3f\n", "latency p99 (ms)", r.latency_p99_ms);
  std::printf("%-22s %12.3f\n", "latency max (ms)", r.latency_max_ms);
  // One frame has no completion rate: its 0 (the JSON's) would read as a pipeline that stalled.
  if (r.frames > 1) {
    std::printf("%-22s %12.2f\n", "throughput (frames/s)", r.throughput_fps);
  } else {
    std::printf("%-22s %12s\n", "throughput (frames/s)", "-");
  }
  std::printf("%-22s %12.3f   (%s SMs, %.2f GiB weights)\n", "encoder stage (ms)",
              r.encoder.stage_ms_median, sms(r.encoder).c_str(), r.encoder.weight_gib);
  std::printf("%-22s %12.3f   (%s SMs, %.2f GiB weights)\n",
              r.decoder_batch > 1 ? "decoder pass (ms)" : "decoder stage (ms)",
              r.decoder.stage_ms_median, sms(r.decoder).c_str(), r.decoder.weight_gib);
  if (r.decoder_batch > 1)
    std::printf("%-22s %12u   (frames that wait together share a pass; %u slots)\n",
                "decoder batch (max)", r.decoder_batch, r.slots);
  if (r.handoff_us_median >= 0) {
    std::printf("%-22s %12.1f\n", "handoff median (us)", r.handoff_us_median);
  }
  std::printf("%-22s %12s\n", "waiting for messages", r.wait.c_str());
  if (r.interrupted) std::printf("(interrupted: figures cover the frames completed)\n");
  std::fflush(stdout);
}

}  // namespace pi0
