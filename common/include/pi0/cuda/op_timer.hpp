// Attributes GPU time to the named operations of a forward pass, for finding where time goes.
// The pass records an event after each operation (mark); the time between two consecutive events
// is charged to the later mark's label. Works eagerly and inside a captured graph: event records
// become graph nodes and replay with it, and the labels of the last recorded pass are reused.
// Event nodes add a little time of their own (about a microsecond each), so the totals read a bit
// high; use it to rank costs, and time without it.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>
#include <vector>

#include "pi0/cuda/device.hpp"

namespace pi0::cuda {

class OpTimer {
 public:
  // Called by the forward pass (also while it is being captured).
  void begin(cudaStream_t stream);
  void mark(const char* label, cudaStream_t stream);

  // After the pass completed: waits for it and adds its intervals to the totals.
  void collect();
  void reset_totals();
  // Per-pass average milliseconds and call counts per label, largest first.
  struct Row {
    std::string label;
    double ms_per_pass;
    int calls_per_pass;
  };
  std::vector<Row> rows() const;
  int passes() const { return passes_; }

 private:
  std::vector<Event> events_;
  std::vector<std::string> labels_;  // labels_[i] ends at events_[i + 1]
  size_t used_ = 0;
  std::vector<std::pair<std::string, double>> totals_;
  std::vector<int> calls_;
  int passes_ = 0;
};

}  // namespace pi0::cuda
