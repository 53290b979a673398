// The CPU backend of the decoder: the fp32 reference reading K/V from host shared memory. It
// runs on a thread of its own, so that, as on the GPU, the worker takes the next frame and
// reports the last one while a frame is being decoded.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "pi0/check.hpp"
#include "pi0/decoder_worker.hpp"
#include "pi0/reference.hpp"
#include "pi0/stage_timer.hpp"

namespace pi0 {
namespace {

constexpr uint32_t kInFlight = 2;

class CpuDecoderStage final : public DecoderStage {
 public:
  explicit CpuDecoderStage(ipc::WorkerRuntime& rt)
      : rt_(rt), reference_(make_reference(rt)), thread_([this] { decode_loop(); }) {}

  ~CpuDecoderStage() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    changed_.notify_all();
    thread_.join();  // after the frame it may be decoding: bounded by one frame's time
  }

  CpuDecoderStage(const CpuDecoderStage&) = delete;
  CpuDecoderStage& operator=(const CpuDecoderStage&) = delete;

  uint32_t max_in_flight() const override { return kInFlight; }

  void submit(uint64_t, uint32_t input_slot, uint32_t kv_slot) override {
    {
      std::lock_guard lock(mu_);
      PI0_CHECK(queued_.size() + finished_.size() + (busy_ ? 1 : 0) < kInFlight,
                "more decoder frames submitted than can be in flight");
      queued_.push_back(Job{input_slot, kv_slot});
    }
    changed_.notify_all();
  }

  // A frame takes milliseconds here; waking up every millisecond costs nothing.
  std::chrono::microseconds poll_slice() const override { return std::chrono::milliseconds(1); }

  bool wait_oldest(std::chrono::microseconds timeout) override {
    std::unique_lock lock(mu_);
    return changed_.wait_for(lock, timeout, [this] { return !finished_.empty(); });
  }

  DecodeTiming complete() override {
    std::unique_lock lock(mu_);
    PI0_CHECK(!queued_.empty() || busy_ || !finished_.empty(),
              "complete() without a submitted frame");
    changed_.wait(lock, [this] { return !finished_.empty(); });
    const Result r = finished_.front();
    finished_.pop_front();
    lock.unlock();
    if (r.error) std::rethrow_exception(r.error);
    times_.add(r.timing.decode_ms);
    return r.timing;
  }

  const StageTimes& stage_times() const override { return times_; }

 private:
  struct Job {
    uint32_t input_slot, kv_slot;
  };
  struct Result {
    DecodeTiming timing;
    std::exception_ptr error;  // rethrown by complete() on the worker's thread
  };

  static ReferenceDecoder make_reference(ipc::WorkerRuntime& rt) {
    const WeightStore weights = ipc::load_stage_weights(rt.options(), WeightSet::kDecoder);
    rt.my_info().weight_bytes = weights.total_bytes();
    rt.describe("cpu", "host CPU (fp32 reference)", 0, -1);
    return ReferenceDecoder(rt.options().config, weights);
  }

  void decode_loop() {
    std::unique_lock lock(mu_);
    for (;;) {
      changed_.wait(lock, [this] { return stopping_ || !queued_.empty(); });
      if (stopping_) return;
      const Job job = queued_.front();
      queued_.pop_front();
      busy_ = true;
      lock.unlock();
      Result r;
      try {
        const auto t0 = std::chrono::steady_clock::now();
        auto& c = rt_.control();
        reference_.decode(rt_.options().shape, c.host_kv(job.kv_slot), c.state(job.input_slot),
                          c.noise(job.input_slot), c.actions(job.input_slot));
        r.timing.decode_ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
      } catch (...) {
        r.error = std::current_exception();
      }
      lock.lock();
      busy_ = false;
      finished_.push_back(r);
      changed_.notify_all();
    }
  }

  ipc::WorkerRuntime& rt_;
  const ReferenceDecoder reference_;
  StageTimes times_;  // the worker's thread only
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<Job> queued_;
  std::deque<Result> finished_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once everything it uses exists
};

}  // namespace

std::unique_ptr<DecoderStage> make_cpu_decoder_stage(ipc::WorkerRuntime& rt) {
  return std::make_unique<CpuDecoderStage>(rt);
}

}  // namespace pi0
