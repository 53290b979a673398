// Per-frame stage times collected by a worker and summarised when it exits.
#pragma once

#include <algorithm>
#include <numeric>
#include <vector>

namespace pi0 {

class StageTimes {
 public:
  void add(double ms) { samples_.push_back(ms); }
  size_t count() const { return samples_.size(); }
  double median() const {
    if (samples_.empty()) return 0;
    std::vector<double> s = samples_;
    std::nth_element(s.begin(), s.begin() + s.size() / 2, s.end());
    return s[s.size() / 2];
  }
  double mean() const {
    return samples_.empty() ? 0 : std::accumulate(samples_.begin(), samples_.end(), 0.0) /
                                      samples_.size();
  }

 private:
  std::vector<double> samples_;
};

}  // namespace pi0
