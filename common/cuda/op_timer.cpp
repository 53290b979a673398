#include "pi0/cuda/op_timer.hpp"

#include <algorithm>

#include "pi0/check.hpp"

namespace pi0::cuda {

void OpTimer::begin(cudaStream_t stream) {
  used_ = 0;
  labels_.clear();
  if (events_.empty()) events_.emplace_back();
  events_[used_++].record_external(stream);
}

void OpTimer::mark(const char* label, cudaStream_t stream) {
  PI0_CHECK(used_ > 0, "OpTimer::mark before begin");
  if (used_ == events_.size()) events_.emplace_back();
  events_[used_++].record_external(stream);
  labels_.emplace_back(label);
}

void OpTimer::collect() {
  if (labels_.empty()) return;
  events_[labels_.size()].synchronize();
  for (size_t i = 0; i < labels_.size(); ++i) {
    const double ms = events_[i + 1].elapsed_since(events_[i]);
    auto it = std::find_if(totals_.begin(), totals_.end(),
                           [&](const auto& t) { return t.first == labels_[i]; });
    if (it == totals_.end()) {
      totals_.emplace_back(labels_[i], 0.0);
      calls_.push_back(0);
      it = totals_.end() - 1;
    }
    it->second += ms;
    calls_[static_cast<size_t>(it - totals_.begin())] += 1;
  }
  ++passes_;
}

void OpTimer::reset_totals() {
  totals_.clear();
  calls_.clear();
  passes_ = 0;
}

std::vector<OpTimer::Row> OpTimer::rows() const {
  std::vector<Row> out;
  const int p = std::max(passes_, 1);
  for (size_t i = 0; i < totals_.size(); ++i)
    out.push_back({totals_[i].first, totals_[i].second / p, calls_[i] / p});
  std::sort(out.begin(), out.end(),
            [](const Row& a, const Row& b) { return a.ms_per_pass > b.ms_per_pass; });
  return out;
}

}  // namespace pi0::cuda
