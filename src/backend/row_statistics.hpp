#pragma once
// The row log-sum-exps from finished per-block (max, sum) pairs, shared by every
// backend (plain C++: the CUDA side includes it too).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/backend.hpp"
#include "common/portable_exp.hpp"

namespace hysparse {

inline double log_add_exp(double a, double b) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const double m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Fills lse_tokens and lse_all of head h from block_max/block_sum.
inline void finish_row_statistics(const StatsRequest& req, StatsTile& out, std::int64_t h) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (std::int64_t r = 0; r < out.rows; ++r) {
    const std::int64_t blocks = req.rows[r] / req.block_size + 1;
    float row_max = kNegInf;
    for (std::int64_t b = 0; b < blocks; ++b) row_max = std::max(row_max, out.block_max[out.at(h, r, b)]);
    // The exponentials in a loop the compiler vectorises, then their sum in block order (an empty
    // block, m = -inf and l = 0, adds 0 x 0).
    double total = 0.0;
    if (row_max != kNegInf) {
      thread_local std::vector<double> exps;
      exps.resize(static_cast<std::size_t>(blocks));
      const float* block_max = &out.block_max[out.at(h, r, 0)];
      const float* block_sum = &out.block_sum[out.at(h, r, 0)];
      for (std::int64_t b = 0; b < blocks; ++b) {
        exps[static_cast<std::size_t>(b)] = portable_exp(static_cast<double>(block_max[b]) - static_cast<double>(row_max));
      }
      for (std::int64_t b = 0; b < blocks; ++b) total = std::fma(static_cast<double>(block_sum[b]), exps[static_cast<std::size_t>(b)], total);
    }
    const double lse_tokens = static_cast<double>(row_max) + std::log(total);
    double lse_all = lse_tokens;
    if (req.sink_logits) lse_all = log_add_exp(lse_tokens, static_cast<double>(req.sink_logits[h]));
    out.lse_tokens[static_cast<std::size_t>(h * out.rows + r)] = lse_tokens;
    out.lse_all[static_cast<std::size_t>(h * out.rows + r)] = lse_all;
  }
}

// Sizes and clears a tile for `req`: block_max = -inf, block_sum = 0.
inline void allocate_tile(const StatsRequest& req, StatsTile& out) {
  const std::int64_t last = req.rows[req.num_rows - 1];
  out.heads = req.heads;
  out.rows = req.num_rows;
  out.head_dim = req.head_dim;
  out.num_blocks = last / req.block_size + 1;
  const auto cells = static_cast<std::size_t>(out.heads * out.rows * out.num_blocks);
  out.block_max.assign(cells, -std::numeric_limits<float>::infinity());
  out.block_sum.assign(cells, 0.0f);
  out.lse_tokens.assign(static_cast<std::size_t>(out.heads * out.rows), 0.0);
  out.lse_all.assign(static_cast<std::size_t>(out.heads * out.rows), 0.0);
  if (req.v) out.output.assign(static_cast<std::size_t>(out.heads * out.rows * out.head_dim), 0.0f);
  else out.output.clear();
  out.ranked = 0;  // blocks are ranked by the caller
  out.mass_order.clear();
  out.group_ranked = 0;
  out.group_max_order.clear();
  out.view_blocks = 0;  // views are built by the caller
  out.view_mass.clear();
  out.view_max_prob.clear();
}

}  // namespace hysparse
