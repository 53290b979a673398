// One pipeline run: control segment, two supervised workers, frames in, actions out.
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <thread>

#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device_report.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/ipc/control_block.hpp"
#include "pi0/ipc/shm.hpp"
#include "pi0/ipc/worker_runtime.hpp"
#include "pi0/orchestrator.hpp"
#include "pi0/process.hpp"

namespace pi0 {
namespace {

using ipc::Message;
using ipc::MsgType;
using ipc::RingId;
using ipc::WaitStatus;
using Clock = std::chrono::steady_clock;

std::atomic<int> g_stop_signal{0};
// Stop signals received: the first drains the frames in flight, a second stops at once.
std::atomic<int> g_stop_count{0};
static_assert(std::atomic<int>::is_always_lock_free, "the handler's atomics must be lock-free");
void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
  g_stop_count.fetch_add(1);
}

constexpr auto kSlice = std::chrono::milliseconds(20);
constexpr auto kTerminateGrace = std::chrono::milliseconds(500);

// The machine's memory, or the cgroup's limit where one is lower (a container's): what a buffer
// may take before the OOM killer comes. 0 where unknown.
uint64_t usable_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  uint64_t usable = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * page : 0;
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    uint64_t limit = 0;
    // cgroup v2 writes "max" where there is no limit: the read fails and nothing changes.
    if (in >> limit && limit > 0 && (usable == 0 || limit < usable)) usable = limit;
  }
  return usable;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - static_cast<double>(lo));
}

struct Worker {
  ipc::Role role;
  std::string name;
  ChildProcess process;
  bool ready = false;
  bool stopped = false;
};

std::string failure_text(const Worker& w, const std::string& what) {
  std::string text = w.name + " (pid " + std::to_string(w.process.pid()) + ") " + what;
  const auto lines = w.process.last_lines();
  if (!lines.empty()) {
    text += "; its last log lines:";
    const size_t first = lines.size() > 5 ? lines.size() - 5 : 0;
    for (size_t i = first; i < lines.size(); ++i) text += "\n    " + lines[i];
  }
  return text;
}

// What the kernel says of a late worker ("stopped by a signal", "sleeping"), for the line that
// names it, so that a stopped or driver-bound one can be found; empty where /proc cannot tell.
std::string state_note(const Worker& w) {
  const std::string state = process_state(w.process.pid());
  return state.empty() ? std::string() : " (it is " + state + ")";
}

WorkerSummary summarise(const ipc::WorkerInfo& info) {
  WorkerSummary s;
  s.pid = info.pid;
  s.sm_count = info.sm_count;
  s.mps_client = info.mps_client;
  s.active_thread_pct = info.active_thread_pct;
  s.weight_gib = static_cast<double>(info.weight_bytes) / (1ull << 30);
  s.device_gib = static_cast<double>(info.device_bytes) / (1ull << 30);
  s.stage_ms_median = info.stage_ms_median;
  s.stage_ms_mean = info.stage_ms_mean;
  s.backend.assign(info.backend, strnlen(info.backend, sizeof info.backend));
  s.device.assign(info.device_name, strnlen(info.device_name, sizeof info.device_name));
  return s;
}

// The files the CUDA driver leaves in /dev/shm for the interprocess events a worker exported
// (ipc::remove_cuda_event_files): those the worker recorded in its info block, removed once it is
// reaped, on every way out of a run. The control segment that holds the records outlives this.
class WorkerEventFiles {
 public:
  WorkerEventFiles() = default;
  WorkerEventFiles(const WorkerEventFiles&) = delete;
  WorkerEventFiles& operator=(const WorkerEventFiles&) = delete;
  ~WorkerEventFiles() {
    for (const auto& [pid, published] : workers_) {
      for (const std::string& name : ipc::remove_cuda_event_files(pid, *published))
        spdlog::debug("removed /dev/shm/{}, left by the CUDA driver for pid {}", name, pid);
    }
  }
  void add(int pid, const ipc::CudaEventFiles& published) {
    workers_.emplace_back(pid, &published);
  }

 private:
  std::vector<std::pair<int, const ipc::CudaEventFiles*>> workers_;
};

// Everything one run owns. Members are destroyed in reverse order: the workers are terminated
// and reaped first, then the files the driver left for them and the control segment are removed.
class Pipeline {
 public:
  Pipeline(const ResolvedRun& run, const MpsDaemon* mps, int encoder_pct, int decoder_pct,
           const std::string& mode)
      : run_(run),
        mps_(mps),
        encoder_pct_(encoder_pct),
        decoder_pct_(decoder_pct),
        mode_(mode),
        // Read before any worker starts: a bad value is one line, not a failure after the frames.
        stop_poll_(env_integer("PI0_ORCHESTRATOR_STOP_POLL_MS", 1, 1000, 1)) {
    if (run.options.run_timeout_s > 0)
      run_deadline_ = ipc::WorkerRuntime::after(run.options.run_timeout_s);
  }

  RunReport run(std::vector<float>* actions);

 private:
  void start_workers();
  void await_ready();
  void feed(std::vector<float>* actions);
  void stop_workers();
  // False when a worker died or reported an error (failure_ says which) or, if `signals_stop`,
  // a stop signal arrived.
  bool workers_healthy(bool signals_stop);
  [[noreturn]] void fail();
  // Fails the run when --run-timeout has passed (e.g. a split where a GEMM fell back to a slow
  // kernel): `done` frames of `total` so far.
  void check_run_deadline(uint64_t done, uint64_t total);
  void handle_worker_message(Worker& w, const Message& m);
  ipc::SpscRing& ring_from(const Worker& w);
  // try_pop on `w`'s ring to the orchestrator; corrupt counters set failure_ and return false.
  bool try_pop_from(Worker& w, Message& m);
  // The counters of `w`'s ring to the orchestrator are inconsistent.
  void ring_corrupt(const Worker& w);

  const ResolvedRun& run_;
  const MpsDaemon* mps_;
  int encoder_pct_, decoder_pct_;
  std::string mode_;
  // How often stop_workers looks at the workers; a test lengthens it to reproduce a worker that
  // exits between two looks (PI0_ORCHESTRATOR_STOP_POLL_MS).
  std::chrono::milliseconds stop_poll_;
  ipc::ControlBlock control_;
  WorkerEventFiles event_files_;
  Worker encoder_{ipc::Role::kEncoder, "encoder_worker", {}};
  Worker decoder_{ipc::Role::kDecoder, "decoder_worker", {}};
  std::string failure_;
  bool stop_sent_ = false;  // from here on a worker may exit, after its kStopped
  RunReport report_;
  std::vector<double> latencies_ms_, handoffs_us_;
  Clock::time_point run_deadline_ = Clock::time_point::max();
};

void Pipeline::check_run_deadline(uint64_t done, uint64_t total) {
  if (Clock::now() < run_deadline_) return;
  failure_ = fmt::format("the run took longer than --run-timeout {:g} s ({} of {} frames done)",
                         run_.options.run_timeout_s, done, total);
  fail();
}

bool Pipeline::workers_healthy(bool signals_stop) {
  if (!failure_.empty()) return false;
  for (Worker* w : {&encoder_, &decoder_}) {
    if (auto status = w->process.poll()) {
      // A worker told to stop sends kStopped and exits, and one that fails sends kError and exits:
      // we may see the exit before the message. (Its other messages, a frame done among them,
      // are moot once it died without being told to stop.)
      if (!w->stopped) {
        Message m;
        while (!w->stopped && failure_.empty() && try_pop_from(*w, m)) {
          if (stop_sent_ || m.type == static_cast<uint16_t>(MsgType::kError))
            handle_worker_message(*w, m);
        }
        if (!failure_.empty()) return false;
      }
      // One that stopped and then exited badly has done its frames: stop_workers judges its exit.
      if (!w->stopped) {
        w->process.wait_output_closed(std::chrono::milliseconds(200));
        failure_ = failure_text(*w, "died: " + status->describe());
        return false;
      }
    }
  }
  // The encoder reports errors on its own ring; the decoder's arrive on the ring we wait on.
  Message m;
  if (try_pop_from(encoder_, m)) handle_worker_message(encoder_, m);
  if (!failure_.empty()) return false;
  return !(signals_stop && g_stop_signal.load() != 0);
}

ipc::SpscRing& Pipeline::ring_from(const Worker& w) {
  return control_.ring(w.role == ipc::Role::kEncoder ? RingId::kEncoderToOrch
                                                     : RingId::kDecoderToOrch);
}

bool Pipeline::try_pop_from(Worker& w, Message& m) {
  try {
    return ring_from(w).try_pop(m);
  } catch (const Error&) {  // the ring is attached, so its counters are what is wrong
    ring_corrupt(w);
    return false;
  }
}

void Pipeline::ring_corrupt(const Worker& w) {
  // The worker alone moves the ring's tail: inconsistent counters are its doing, and so its
  // failure (exit 3), as a malformed message is, not a setup error.
  failure_ = failure_text(w,
                          "corrupted its ring to the orchestrator (its counters say more "
                          "messages are queued than the ring holds)");
}

void Pipeline::handle_worker_message(Worker& w, const Message& m) {
  const std::string reason = ipc::validate(m, control_.limits());
  if (!reason.empty()) {
    failure_ = failure_text(w, "sent a malformed message: " + reason);
    return;
  }
  switch (static_cast<MsgType>(m.type)) {
    case MsgType::kWorkerReady:
      w.ready = true;
      break;
    case MsgType::kStopped:
      w.stopped = true;
      break;
    case MsgType::kError: {
      // Give it a moment to exit so that its last log lines are complete.
      if (w.process.wait_for(std::chrono::milliseconds(300))) {
        w.process.wait_output_closed(std::chrono::milliseconds(200));
      }
      // The worker's whole error text, from its area of the control segment (the message carries
      // its first 63 bytes).
      failure_ = failure_text(w, "failed: " + ipc::error_text(control_.error_area(w.role), m));
      break;
    }
    case MsgType::kHeartbeat:
      break;
    default:
      failure_ = failure_text(w, "sent an unexpected " +
                                     std::string(ipc::type_name(static_cast<MsgType>(m.type))) +
                                     " message");
  }
}

void Pipeline::fail() {
  const std::string what = failure_;
  throw WorkerFailure(what);
}

void Pipeline::start_workers() {
  ipc::remove_stale_segments();
  const bool host_kv = run_.backend == "cpu";
  const uint64_t total = run_.options.warmup + run_.options.frames;
  control_ = ipc::ControlBlock::create(
      ipc::unique_segment_name("ctl"),
      ipc::compute_layout(run_.config, run_.shape, run_.options.slots, total, host_kv));

  ipc::WorkerOptions wo;
  wo.control_name = control_.name();
  wo.model = run_.config.name;
  wo.config = run_.config;
  wo.shape = run_.shape;
  wo.backend = run_.backend;
  wo.weights_path = run_.options.weights;
  wo.weight_seed = run_.options.seed;
  wo.kv_slots = run_.options.slots;
  wo.decoder_batch = run_.options.decoder_batch;
  wo.wait = run_.options.wait;
  wo.max_frame = total;
  wo.parent_pid = static_cast<int>(::getpid());
  wo.startup_timeout_s = run_.options.startup_timeout_s;
  wo.log_level = run_.options.log_level;
  const std::vector<std::string> args = ipc::worker_arguments(wo);

  const std::string dir =
      run_.options.worker_dir.empty() ? executable_dir() : run_.options.worker_dir;
  // cuBLASLt plans for the whole GPU in both workers, whatever their share: every split then
  // runs the single-process run's algorithms (see PI0_GEMM_PLAN_SMS in pi0/cuda/gemm.hpp).
  const int plan_sms = run_.backend == "cuda" && std::getenv("PI0_GEMM_PLAN_SMS") == nullptr
                           ? cuda::device_sm_count_without_context(run_.gpu_ordinal)
                           : 0;
  for (Worker* w : {&encoder_, &decoder_}) {
    EnvOverrides env;
    const int pct = w == &encoder_ ? encoder_pct_ : decoder_pct_;
    if (mps_ != nullptr) {
      env = mps_client_environment(mps_->options());
      env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = std::to_string(pct);
    } else {
      // A pipe directory with no daemon behind it: the workers must not join a daemon that
      // happens to run at the default location.
      env["CUDA_MPS_PIPE_DIRECTORY"] = "/nonexistent/pi0-mps-no-mps";
      env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = std::nullopt;
    }
    if (plan_sms > 0) env["PI0_GEMM_PLAN_SMS"] = std::to_string(plan_sms);
    if (!run_.options.gpu.empty()) {
      env["CUDA_VISIBLE_DEVICES"] = run_.options.gpu;
    } else if (std::getenv("CUDA_VISIBLE_DEVICES") == nullptr) {
      env["CUDA_VISIBLE_DEVICES"] = "0";
    }
    w->process =
        ChildProcess::spawn(w->name, dir + "/" + w->name, args, env, !run_.options.quiet_workers);
    const ipc::WorkerInfo& info =
        w->role == ipc::Role::kEncoder ? control_.header().encoder : control_.header().decoder;
    event_files_.add(w->process.pid(), info.event_files);
  }
  spdlog::info("started encoder_worker (pid {}) and decoder_worker (pid {}), control segment {}",
               encoder_.process.pid(), decoder_.process.pid(), control_.name());
}

void Pipeline::await_ready() {
  const auto deadline = ipc::WorkerRuntime::after(run_.options.startup_timeout_s);
  auto& from_decoder = ring_from(decoder_);
  while (!(encoder_.ready && decoder_.ready)) {
    if (!workers_healthy(true)) {
      if (failure_.empty()) throw Error("interrupted while the workers were starting");
      fail();
    }
    Message m;
    check_run_deadline(0, run_.options.warmup + run_.options.frames);
    const WaitStatus st = from_decoder.pop(m, Clock::now() + kSlice, {});
    if (st == WaitStatus::kOk) {
      handle_worker_message(decoder_, m);
      if (!failure_.empty()) fail();
    } else if (st == WaitStatus::kCorrupt) {
      ring_corrupt(decoder_);
      fail();
    }
    if (Clock::now() > deadline) {
      // Judged on all the workers have sent: an orchestrator that was itself stopped (SIGSTOP,
      // Ctrl-Z) past the deadline finds their "ready" waiting, and they were not late.
      for (Worker* w : {&encoder_, &decoder_}) {
        while (!w->ready && failure_.empty() && try_pop_from(*w, m)) handle_worker_message(*w, m);
      }
      if (!failure_.empty()) fail();
      if (encoder_.ready && decoder_.ready) break;
      Worker& late = !encoder_.ready ? encoder_ : decoder_;
      failure_ = failure_text(late, "did not report ready within " +
                                        fmt::format("{:g}", run_.options.startup_timeout_s) + " s" +
                                        state_note(late));
      fail();
    }
  }
}

void Pipeline::feed(std::vector<float>* actions) {
  const RunOptions& o = run_.options;
  const uint64_t total = o.warmup + o.frames;
  const uint32_t max_in_flight = mode_ == "sequential" ? 1u : o.slots;
  const ipc::ControlLayout& layout = control_.layout();
  const size_t action_values = layout.action_values;
  PI0_CHECK(!actions || actions->size() == total * action_values,
            "the actions buffer does not match the control segment's layout");

  // Synthetic camera frames are generated once, off the measured path.
  const uint64_t distinct = std::min<uint64_t>(kDistinctInputs, total);
  std::vector<FrameInputs> inputs;
  for (uint64_t i = 0; i < distinct; ++i) {
    inputs.push_back(make_frame_inputs(run_.config, run_.shape, input_seed(o.seed), i));
  }

  std::vector<uint32_t> free_inputs;
  for (uint32_t s = layout.input_slots; s-- > 0;) free_inputs.push_back(s);
  std::vector<Clock::time_point> submitted(total);
  std::vector<int32_t> slot_of_frame(total, -1);
  auto& to_encoder = control_.ring(RingId::kOrchToEncoder);
  auto& from_decoder = ring_from(decoder_);
  // A wait also ends when a stop signal comes that the loop has not seen yet: a worker that never
  // answers must not keep the run from hearing it.
  int stops_seen = 0;
  const auto healthy = [&] { return workers_healthy(false) && g_stop_count.load() == stops_seen; };
  const auto unseen_stop = [&] { return failure_.empty() && g_stop_count.load() != stops_seen; };

  uint64_t next = 0, in_flight = 0;
  const auto t_start = Clock::now();
  // --frame-timeout runs from the last progress: a frame finished, or one entered an idle
  // pipeline. Frames handed in behind a stuck one are no progress: at a camera rate each would
  // otherwise restart the wait, and a hang would be named only once the slots were full.
  const auto frame_timeout =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.frame_timeout_s));
  Clock::time_point t_progress = t_start;
  Clock::time_point t_first_measured{}, t_first_done{}, t_last_done{};
  const auto arrival = [&](uint64_t frame) {
    return t_start + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(static_cast<double>(frame) / o.rate_hz));
  };
  // report_.interrupted: a signal was seen, and the loop drains what is in flight, then stops.
  while (true) {
    if (const int stops = g_stop_count.load(); stops != stops_seen) {
      stops_seen = stops;
      if (report_.interrupted) {
        failure_ = fmt::format("stopped by a second signal ({}) with {} frame(s) in flight",
                               g_stop_signal.load(), in_flight);
        fail();
      }
      report_.interrupted = true;
      spdlog::warn(
          "signal {} received: draining {} frame(s) in flight, then stopping (a second signal "
          "stops at once)",
          g_stop_signal.load(), in_flight);
    }
    while (!report_.interrupted && next < total && in_flight < max_in_flight &&
           !free_inputs.empty() && (o.rate_hz <= 0 || Clock::now() >= arrival(next))) {
      const uint32_t slot = free_inputs.back();
      free_inputs.pop_back();
      const FrameInputs& in = inputs[next % distinct];
      std::memcpy(control_.images(slot), in.images.data(), in.images.size() * sizeof(Bf16));
      std::memcpy(control_.state(slot), in.state.data(), in.state.size() * sizeof(Bf16));
      std::memcpy(control_.noise(slot), in.noise.data(), in.noise.size() * sizeof(Bf16));
      // Open loop: latency counts from the frame's arrival, time spent queued included.
      submitted[next] = o.rate_hz > 0 ? arrival(next) : Clock::now();
      if (next == o.warmup) t_first_measured = submitted[next];
      slot_of_frame[next] = static_cast<int32_t>(slot);
      Message m = ipc::make_message(MsgType::kFrameInput, ipc::Role::kOrchestrator);
      m.frame = next;
      m.input_slot = slot;
      m.submit_ns = static_cast<uint64_t>(submitted[next].time_since_epoch().count());
      const WaitStatus st = to_encoder.push(m, Clock::now() + std::chrono::seconds(10), healthy);
      if (st == WaitStatus::kPeerDead && unseen_stop()) {
        // Not handed over: the frame was never in flight, and the loop's top hears the signal.
        slot_of_frame[next] = -1;
        free_inputs.push_back(slot);
        break;
      }
      if (st != WaitStatus::kOk) {
        if (failure_.empty())
          failure_ =
              std::string("could not hand a frame to the encoder: ") + ipc::wait_status_name(st);
        fail();
      }
      if (in_flight == 0) t_progress = Clock::now();
      ++next;
      ++in_flight;
    }
    if (in_flight == 0) {
      if (report_.interrupted || next >= total) break;
      // Open loop and idle: sleep until the next frame arrives, watching the workers.
      if (!workers_healthy(false)) fail();
      check_run_deadline(next, total);
      std::this_thread::sleep_until(std::min(arrival(next), Clock::now() + kSlice));
      continue;
    }
    const auto frame_deadline = t_progress + frame_timeout;
    auto deadline = frame_deadline;
    const bool waiting_to_submit = !report_.interrupted && o.rate_hz > 0 && next < total &&
                                   in_flight < max_in_flight && !free_inputs.empty();
    if (waiting_to_submit) deadline = std::min(deadline, arrival(next));
    const bool run_deadline_first = run_deadline_ < deadline;
    deadline = std::min(deadline, run_deadline_);
    Message m;
    const WaitStatus st = from_decoder.pop(m, deadline, healthy);
    if (st == WaitStatus::kTimeout) {
      if (run_deadline_first) check_run_deadline(next - in_flight, total);
      if (waiting_to_submit && Clock::now() < frame_deadline) continue;
      // Which worker holds the frames is not known here; what the kernel says of each helps
      // the user find it (a stopped or driver-bound one).
      std::string states;
      for (const Worker* w : {&encoder_, &decoder_}) {
        const std::string state = process_state(w->process.pid());
        states += fmt::format("; {} (pid {}) is {}", w->name, w->process.pid(),
                              state.empty() ? "in an unknown state" : state);
      }
      failure_ = fmt::format("no frame finished within {:g} s (frames in flight: {}){}",
                             o.frame_timeout_s, in_flight, states);
      fail();
    }
    if (st == WaitStatus::kPeerDead && unseen_stop()) continue;
    if (st == WaitStatus::kPeerDead) fail();
    if (st == WaitStatus::kCorrupt) {
      ring_corrupt(decoder_);
      fail();
    }
    const std::string reason = ipc::validate(m, control_.limits());
    if (!reason.empty()) {
      failure_ = failure_text(decoder_, "sent a malformed message: " + reason);
      fail();
    }
    if (m.type != static_cast<uint16_t>(MsgType::kFrameDone)) {
      handle_worker_message(decoder_, m);
      if (!failure_.empty()) fail();
      continue;
    }
    const auto now = Clock::now();
    t_progress = now;
    // validate() has bounded the frame by the run's frame count and the slot by the slot count;
    // `m.frame < next` comes first all the same, so that the frame never indexes unchecked. A
    // frame that is not in flight in that slot is the decoder's fault, as a malformed message is.
    if (m.frame >= next || slot_of_frame[m.frame] != static_cast<int32_t>(m.input_slot)) {
      failure_ = failure_text(
          decoder_, fmt::format("reported frame {} done in input slot {}, where that frame is not "
                                "in flight (frames handed in so far: {})",
                                m.frame, m.input_slot, next));
      fail();
    }
    slot_of_frame[m.frame] = -1;
    if (actions) {
      std::memcpy(actions->data() + m.frame * action_values, control_.actions(m.input_slot),
                  action_values * sizeof(float));
    }
    if (m.frame >= o.warmup) {
      if (latencies_ms_.empty()) t_first_done = now;
      latencies_ms_.push_back(
          std::chrono::duration<double, std::milli>(now - submitted[m.frame]).count());
      if (m.handoff_ns > 0) handoffs_us_.push_back(static_cast<double>(m.handoff_ns) / 1e3);
      t_last_done = now;
    }
    free_inputs.push_back(m.input_slot);
    --in_flight;
  }
  // Stopped early: frames 0 .. next - 1 all finished (the loop drains every frame in flight), and
  // the actions file holds those, not zeros for frames that never ran.
  if (actions && report_.interrupted) actions->resize(next * action_values);
  report_.frames = latencies_ms_.size();
  if (!latencies_ms_.empty()) {
    report_.wall_s = std::chrono::duration<double>(t_last_done - t_first_measured).count();
    // The rate at which frames complete: N frames end N - 1 intervals apart. (N over the wall time
    // would count one latency too few intervals at a camera rate: 30.1 frames/s at 30 Hz.) One
    // frame has no rate.
    const double completing_s = std::chrono::duration<double>(t_last_done - t_first_done).count();
    report_.throughput_fps = latencies_ms_.size() > 1 && completing_s > 0
                                 ? static_cast<double>(latencies_ms_.size() - 1) / completing_s
                                 : 0;
  }
}

void Pipeline::stop_workers() {
  // Every frame is done, so the figures stand: a worker that fails from here on (it cannot be told
  // to stop, dies, reports an error or misbehaves before it says it stopped, does not say so
  // within the stop deadline, or exits badly after it did) is the run's error, reported after
  // them (exit 3), not a failure that loses them. failure_ holds the first such failure and the
  // end of this function makes it the report's error; the run's end kills and reaps a worker that
  // did not stop. Only a second signal still stops the run at once, with no figures.
  Message stop = ipc::make_message(MsgType::kStop, ipc::Role::kOrchestrator);
  stop_sent_ = true;
  const auto healthy = [this] { return workers_healthy(false); };
  // Both waits below give way to a second signal at once (no figures, the first failure named).
  const auto stop_if_signalled_twice = [this] {
    if (g_stop_count.load() < 2) return;
    if (failure_.empty()) failure_ = "stopped by a second signal while the workers were stopping";
    fail();
  };
  const WaitStatus pushed = control_.ring(RingId::kOrchToEncoder)
                                .push(stop, Clock::now() + std::chrono::seconds(5), healthy);
  // A full ring or corrupt counters leave no failure behind: the line must still say why.
  if (pushed != WaitStatus::kOk && failure_.empty())
    failure_ = failure_text(
        encoder_, std::string("could not be told to stop: ") + ipc::wait_status_name(pushed));
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (failure_.empty() && !(encoder_.stopped && decoder_.stopped)) {
    Message m;
    if (try_pop_from(decoder_, m)) {
      handle_worker_message(decoder_, m);
      continue;
    }
    if (!workers_healthy(false)) break;
    stop_if_signalled_twice();
    // Judged after workers_healthy read the encoder's ring: an orchestrator that was itself
    // stopped (SIGSTOP, Ctrl-Z) past the deadline can find both kStopped only now, and then no
    // worker is late (the run failed with an empty error line, exit 3).
    if (encoder_.stopped && decoder_.stopped) break;
    if (Clock::now() >= deadline) {
      for (Worker* w : {&encoder_, &decoder_})
        if (!w->stopped && failure_.empty())
          failure_ = failure_text(*w, "did not stop within 30 s of being told to" + state_note(*w));
      break;
    }
    std::this_thread::sleep_for(stop_poll_);
  }
  // A worker that stopped and then exits badly (a crash in its teardown) fails the run as well.
  for (Worker* w : {&encoder_, &decoder_}) {
    if (!w->stopped) continue;  // failed or late above: the run's end kills and reaps it
    // In slices, so that a second signal still stops the run at once, a worker hung in its
    // teardown included.
    const auto exit_deadline = Clock::now() + std::chrono::seconds(10);
    std::optional<ExitStatus> status;
    while (!(status = w->process.wait_for(kSlice)) && Clock::now() < exit_deadline)
      stop_if_signalled_twice();
    if (status && status->success()) continue;
    if (status) w->process.wait_output_closed(std::chrono::milliseconds(200));
    if (failure_.empty())
      failure_ = failure_text(
          *w, "stopped, then did not exit cleanly: " +
                  (status ? status->describe() : std::string("still running after 10 s")));
  }
  report_.error = failure_;
}

RunReport Pipeline::run(std::vector<float>* actions) {
  const RunOptions& o = run_.options;
  report_.backend = run_.backend;
  report_.model = run_.config.name;
  report_.mode = mode_;
  report_.views = run_.shape.views;
  report_.slots = run_.options.slots;
  report_.decoder_batch = run_.options.decoder_batch;
  report_.wait = ipc::wait_policy_name(ipc::wait_policy());
  report_.chunk = run_.shape.chunk;
  report_.prompt_len = run_.shape.prompt_len;
  report_.encoder_pct = encoder_pct_;
  report_.decoder_pct = decoder_pct_;
  report_.mps = mps_ != nullptr;
  report_.rate_hz = o.rate_hz;
  report_.device_sms =
      run_.backend == "cuda" ? cuda::device_sm_count_without_context(run_.gpu_ordinal) : 0;

  if (actions) {
    // Held in memory until the run ends: found too large now, not after the workers loaded (and
    // not by the OOM killer: zero-filling more than the machine has would summon it).
    const uint64_t values =
        (o.warmup + o.frames) * uint64_t{stage_sizes(run_.config, run_.shape).action_values};
    const double gib = static_cast<double>(values * sizeof(float)) / double(1ull << 30);
    const auto too_large = [&] {
      return Error(
          fmt::format("--actions-out: {} frames of actions need {:.1f} GiB of memory, "
                      "more than half of what this process may use; record fewer frames",
                      o.warmup + o.frames, gib));
    };
    const uint64_t usable = usable_memory_bytes();
    if (usable > 0 && values * sizeof(float) > usable / 2) throw too_large();
    try {
      actions->assign(values, 0.0f);
    } catch (const std::bad_alloc&) {
      throw too_large();
    }
  }
  start_workers();
  await_ready();
  report_.encoder = summarise(control_.header().encoder);
  report_.decoder = summarise(control_.header().decoder);
  if (run_.backend == "cuda") {
    const auto share_ok = [&](const WorkerSummary& w, int pct) {
      const int expected = (report_.device_sms * pct + 99) / 100;
      return w.mps_client == 1 && report_.device_sms > 0 && std::abs(w.sm_count - expected) <= 2;
    };
    report_.split_applied = report_.mps && share_ok(report_.encoder, encoder_pct_) &&
                            share_ok(report_.decoder, decoder_pct_);
    report_.split_note =
        !report_.mps ? "not applied: run without MPS (the workers time-share the whole GPU)"
        : report_.split_applied
            ? "applied"
            : "NOT applied: a worker is not an MPS client or sees another SM count";
    spdlog::info(
        "encoder_worker: {} of {} SMs, MPS client: {}; decoder_worker: {} of {} SMs, "
        "MPS client: {}; split {}/{} {}",
        report_.encoder.sm_count, report_.device_sms,
        report_.encoder.mps_client == 1 ? "yes" : "no", report_.decoder.sm_count,
        report_.device_sms, report_.decoder.mps_client == 1 ? "yes" : "no", encoder_pct_,
        decoder_pct_, report_.split_note);
  } else {
    report_.split_note = "not applicable: MPS does not apply to the CPU backend";
  }

  spdlog::info("workers ready; streaming frames");
  feed(actions);
  stop_workers();
  report_.encoder = summarise(control_.header().encoder);
  report_.decoder = summarise(control_.header().decoder);
  report_.latency_p50_ms = percentile(latencies_ms_, 50);
  report_.latency_p99_ms = percentile(latencies_ms_, 99);
  report_.latency_max_ms =
      latencies_ms_.empty() ? 0 : *std::max_element(latencies_ms_.begin(), latencies_ms_.end());
  report_.latency_mean_ms =
      latencies_ms_.empty()
          ? 0
          : std::accumulate(latencies_ms_.begin(), latencies_ms_.end(), 0.0) / latencies_ms_.size();
  report_.handoff_us_median = handoffs_us_.empty() ? -1 : percentile(handoffs_us_, 50);
  return report_;
}

}  // namespace

uint64_t input_seed(uint64_t run_seed) {
  return run_seed ^ 0x5eed'f00d'cafe'0001ull;
}

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  // SIGHUP (a closed terminal) and SIGQUIT stop the run the same way, so that an MPS daemon we
  // started is still quit; the default action would end us with it left running. A signal our
  // caller set to be ignored stays ignored (nohup's SIGHUP, a background job's SIGINT and SIGQUIT):
  // catching it would stop the run the caller meant to outlive them. SIGTERM is always a stop.
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) {
    struct sigaction before {};
    if (sig != SIGTERM && ::sigaction(sig, nullptr, &before) == 0 && before.sa_handler == SIG_IGN)
      continue;
    ::sigaction(sig, &action, nullptr);
  }
  ::signal(SIGPIPE, SIG_IGN);
  // An ignored SIGCHLD (or SA_NOCLDWAIT) survives exec, and then the kernel reaps our children
  // itself: waitpid could not tell a worker's or the MPS control program's exit from a hang.
  struct sigaction child {};
  child.sa_handler = SIG_DFL;
  sigemptyset(&child.sa_mask);
  ::sigaction(SIGCHLD, &child, nullptr);
}

int stop_signal() {
  return g_stop_signal.load();
}

RunReport run_pipeline(const ResolvedRun& run, const MpsDaemon* mps, int encoder_pct,
                       int decoder_pct, const std::string& mode, std::vector<float>* actions) {
  // The workers get the same policy on their command line.
  ipc::set_wait_policy(ipc::parse_wait_policy(run.options.wait));
  Pipeline pipeline(run, mps, encoder_pct, decoder_pct, mode);
  return pipeline.run(actions);
}

}  // namespace pi0
