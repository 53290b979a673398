// The sweep's reporting on synthetic results: best split choice, failed splits, JSON and plot.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "catch.hpp"
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
  r.encoder_pct = pct;
  r.decoder_pct = 100 - pct;
  r.throughput_fps = fps;
  r.latency_p50_ms = p99 * 0.9;
  r.latency_p99_ms = p99;
  r.error = error;
  return r;
}

SweepResult synthetic() {
  SweepResult s;
  s.points = {point(20, 40, 45), point(40, 66, 31), point(50, 90, 40, "no correct GEMM algorithm"),
              point(60, 75, 27), point(80, 70, 22)};
  RunReport single = point(100, 60, 16);
  single.label = "single-process";
  s.baselines = {single};
  s.latency_budget_ms = 25;
  choose_best_splits(s);
  return s;
}

}  // namespace

TEST_CASE("sweep picks the best split among the runs that succeeded", "[orchestrator][sweep]") {
  SweepResult s = synthetic();
  REQUIRE(s.best_throughput.has_value());
  CHECK(s.points[*s.best_throughput].encoder_pct == 60);  // 50/50 failed, so its 90/s is no result
  REQUIRE(s.best_within_budget.has_value());
  CHECK(s.points[*s.best_within_budget].encoder_pct == 80);  // the only p99 <= 25 ms
  s.latency_budget_ms = 10;
  choose_best_splits(s);
  CHECK_FALSE(s.best_within_budget.has_value());
}

TEST_CASE("sweep JSON and plot carry every split and skip failed ones in the curves", "[orchestrator][sweep]") {
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
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1)) ++circles;
  CHECK(circles == 3 * 4);
  std::filesystem::remove_all(dir);
}
