#include "reference/key_runs.hpp"

#include <algorithm>
#include <cmath>
#include <random>

namespace hysparse::reference {

std::vector<KeyRun> random_key_runs(const StatsRequest& request, std::uint64_t seed, bool long_runs) {
  std::mt19937_64 rng(seed);
  std::vector<KeyRun> runs;
  auto add = [&](std::int64_t h, std::int64_t r, std::int64_t begin, std::int64_t end) {
    const std::int64_t keys = request.rows[r] + 1;
    begin = std::clamp<std::int64_t>(begin, 0, keys);
    end = std::clamp<std::int64_t>(end, begin, keys);
    runs.push_back({static_cast<std::int32_t>(h), static_cast<std::int32_t>(r), static_cast<std::int32_t>(begin),
                    static_cast<std::int32_t>(end), static_cast<std::int32_t>(rng() % 2)});
  };
  for (std::int64_t h = 0; h < request.heads; ++h) {
    for (std::int64_t r = 0; r < request.num_rows; ++r) {
      const std::int64_t keys = request.rows[r] + 1;
      std::uniform_int_distribution<std::int64_t> key(0, keys);
      add(h, r, key(rng), 0);              // empty
      add(h, r, keys - 1, keys);           // the row's own key
      add(h, r, 0, keys);                  // the whole row
      for (std::int64_t length : {31, 32, 33, 63, 64, 65}) {
        const std::int64_t begin = std::uniform_int_distribution<std::int64_t>(0, std::max<std::int64_t>(0, keys - length))(rng);
        add(h, r, begin, begin + length);
      }
      for (int i = 0; i < 3; ++i) {
        const std::int64_t a = key(rng), b = key(rng);
        add(h, r, std::min(a, b), std::max(a, b));
      }
      if (long_runs) {
        for (std::int64_t length : {1023, 1024, 1025, 2100}) add(h, r, keys - length, keys);
      }
    }
  }
  return runs;
}

std::vector<double> naive_key_run_shares(const StatsRequest& request, const std::vector<KeyRun>& runs) {
  const std::int64_t T = request.seq_len, d = request.head_dim;
  std::vector<double> sums(runs.size(), 0.0);
  std::vector<double> p;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const KeyRun& run = runs[i];
    const std::int64_t t = request.rows[run.row];
    p.assign(static_cast<std::size_t>(t + 1), 0.0);
    if (request.attn) {
      const float* row = request.attn + (run.head * T + t) * T;
      for (std::int64_t j = 0; j <= t; ++j) p[static_cast<std::size_t>(j)] = row[j];
    } else {
      const float* q = request.q + (run.head * T + t) * d;
      double peak = -INFINITY;
      for (std::int64_t j = 0; j <= t; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * static_cast<double>(request.k[j * d + c]);
        p[static_cast<std::size_t>(j)] = request.scale * dot;
        peak = std::max(peak, request.scale * dot);
      }
      for (double& z : p) z = std::exp(z - peak);
    }
    double total = 0.0;
    for (double value : p) total += value;
    double sum = 0.0;
    for (std::int64_t j = run.begin; j < run.end; ++j) sum += p[static_cast<std::size_t>(j)];
    sums[i] = sum / total;
  }
  return sums;
}

}  // namespace hysparse::reference
