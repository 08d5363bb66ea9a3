#pragma once
// A sum of gathered values for the replay's metrics (engine.cpp): the masses of a ranking's blocks.
#include <cstdint>

namespace hysparse {

// values[index[i]] for i = 0, 1, ... added in segments, in four independent running sums (element i into
// sum i % 4), so that the gather's loads overlap instead of waiting on one chain of additions; the total is
// (s0 + s1) + (s2 + s3). Segments compose: the total of [0, n) does not depend on where they were cut, so a
// walk cut at each budget and one cut nowhere give the same bits.
class GatheredSum {
 public:
  void reset() { lanes_[0] = lanes_[1] = lanes_[2] = lanes_[3] = 0.0; }
  // Adds elements [from, to); the previous call, if any, ended at `from`.
  void add(const double* values, const std::int32_t* index, std::int64_t from, std::int64_t to) {
    std::int64_t i = from;
    for (; i < to && (i & 3) != 0; ++i) lanes_[i & 3] += values[index[i]];
    double s0 = lanes_[0], s1 = lanes_[1], s2 = lanes_[2], s3 = lanes_[3];
    for (; i + 4 <= to; i += 4) {
      s0 += values[index[i]];
      s1 += values[index[i + 1]];
      s2 += values[index[i + 2]];
      s3 += values[index[i + 3]];
    }
    lanes_[0] = s0, lanes_[1] = s1, lanes_[2] = s2, lanes_[3] = s3;
    for (; i < to; ++i) lanes_[i & 3] += values[index[i]];
  }
  double total() const { return (lanes_[0] + lanes_[1]) + (lanes_[2] + lanes_[3]); }

 private:
  double lanes_[4] = {0.0, 0.0, 0.0, 0.0};
};

}  // namespace hysparse
