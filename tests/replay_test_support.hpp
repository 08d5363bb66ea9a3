#pragma once
// Helpers shared by the replay test files: write a capture, replay it on the CPU, build options and budgets,
// and statistics requests for one KV group.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "common/portable_exp.hpp"
#include "replay/engine.hpp"

namespace hysparse::test {

// A test backend that answers every call as the CPU backend does; a test overrides the calls it examines
// (a device's rankings, page bounds, H2O evictions) and reaches the CPU's answers through cpu().
class CpuBackedBackend : public Backend {
 public:
  CpuBackedBackend() : cpu_(make_cpu_backend()) {}
  std::string name() const override { return cpu_->name(); }
  std::string device() const override { return cpu_->device(); }
  void block_statistics(const StatsRequest& request, StatsTile& out) const override { cpu_->block_statistics(request, out); }
  void output_errors(const StatsRequest& request, const StatsTile& tile, const OutputWalks& walks,
                     std::vector<double>& errors) const override {
    cpu_->output_errors(request, tile, walks, errors);
  }

 protected:
  const Backend& cpu() const { return *cpu_; }

 private:
  std::unique_ptr<Backend> cpu_;
};

// Writes `capture` to the test data directory as `<name>.h5` and replays it with the CPU backend.
inline ReplayResult replay_capture(const Capture& capture, const std::string& name, const ReplayOptions& options) {
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/" + name + ".h5";
  write_capture(path, capture);
  const auto backend = make_cpu_backend();
  return run_replay(path, options, *backend, false);
}

// No reuse matrix, and tiles of 7 rows: several tiles per group, rows split unevenly.
inline ReplayOptions replay_options(const std::string& selectors, const std::vector<Budget>& budgets) {
  ReplayOptions o;
  o.selectors = parse_selector_list(selectors);
  o.budgets = budgets;
  o.reuse_budget = 0;
  o.tile_rows = 7;
  return o;
}

// One KV group of layer 0 of `c`: heads [group*G, (group+1)*G), softmax scale scale_sign / sqrt(head_dim).
inline StatsRequest group_request(const Capture& c, std::int64_t group, const std::vector<std::int64_t>& rows,
                                  std::int64_t block, bool with_v, double scale_sign = 1.0) {
  const std::int64_t G = c.header.num_q_heads / c.header.num_kv_heads, T = c.header.seq_len, d = c.header.head_dim;
  StatsRequest req;
  req.q = c.layers[0].q.data() + group * G * T * d;
  req.k = c.layers[0].k.data() + group * T * d;
  req.v = with_v ? c.layers[0].v.data() + group * T * d : nullptr;
  req.sink_logits = c.layers[0].sink_logits.empty() ? nullptr : c.layers[0].sink_logits.data() + group * G;
  req.heads = G;
  req.seq_len = T;
  req.head_dim = d;
  req.scale = scale_sign / std::sqrt(static_cast<double>(d));
  req.rows = rows.data();
  req.num_rows = static_cast<std::int64_t>(rows.size());
  req.block_size = block;
  return req;
}

// The masses of the causal blocks of `factor` tile blocks of (h, r) of a tile whose row r is at
// `position`, as the replay engine computes them from the tile (build_block_view; StatsTile::mass_order):
// the same operations, so the same bits.
inline void view_masses(const StatsTile& tile, std::int64_t h, std::int64_t r, std::int64_t position, std::int64_t tile_block,
                        std::int64_t factor, std::vector<double>& mass) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const std::int64_t tile_blocks = position / tile_block + 1, causal = position / (tile_block * factor) + 1;
  const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(h * tile.rows + r)];
  mass.assign(static_cast<std::size_t>(causal), 0.0);
  for (std::int64_t b = 0; b < causal; ++b) {
    const std::int64_t first = b * factor, last = std::min((b + 1) * factor, tile_blocks);
    double m = kNegInf;
    for (std::int64_t i = first; i < last; ++i) m = std::max(m, static_cast<double>(tile.block_max[tile.at(h, r, i)]));
    if (m == kNegInf) continue;
    if (factor == 1) {
      mass[static_cast<std::size_t>(b)] = static_cast<double>(tile.block_sum[tile.at(h, r, b)]) * portable_exp(m - lse_tokens);
      continue;
    }
    double l = 0.0;
    for (std::int64_t i = first; i < last; ++i) {
      const double mi = tile.block_max[tile.at(h, r, i)];
      if (mi != kNegInf) l = std::fma(static_cast<double>(tile.block_sum[tile.at(h, r, i)]), portable_exp(mi - m), l);
    }
    mass[static_cast<std::size_t>(b)] = l * portable_exp(m - lse_tokens);
  }
}

// The largest probability of each causal block of `factor` tile blocks of row r, max over the tile's heads,
// as the replay engine computes it from the tile (build_block_view's max_prob; StatsTile::group_max_order): the
// same operations, so the same bits.
inline void view_group_max_probabilities(const StatsTile& tile, std::int64_t r, std::int64_t position, std::int64_t tile_block,
                                         std::int64_t factor, std::vector<double>& best) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const std::int64_t tile_blocks = position / tile_block + 1, causal = position / (tile_block * factor) + 1;
  best.assign(static_cast<std::size_t>(causal), 0.0);
  for (std::int64_t h = 0; h < tile.heads; ++h) {
    const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(h * tile.rows + r)];
    const double lse_all = tile.lse_all[static_cast<std::size_t>(h * tile.rows + r)];
    const double token_share = portable_exp(lse_tokens - lse_all);
    for (std::int64_t b = 0; b < causal; ++b) {
      const std::int64_t first = b * factor, last = std::min((b + 1) * factor, tile_blocks);
      float peak = kNegInf;
      for (std::int64_t i = first; i < last; ++i) peak = std::max(peak, tile.block_max[tile.at(h, r, i)]);
      double p = 0.0;
      if (factor == 1) {
        p = portable_exp(static_cast<double>(peak) - lse_tokens) * token_share;  // an empty block: 0 x token_share
      } else if (peak != kNegInf) {
        p = portable_exp(static_cast<double>(peak) - lse_all);
      }
      best[static_cast<std::size_t>(b)] = std::max(best[static_cast<std::size_t>(b)], p);
    }
  }
}

inline std::vector<Budget> tokens(std::initializer_list<double> values) {
  std::vector<Budget> b;
  for (double v : values) b.push_back({Budget::Kind::kTokens, v});
  return b;
}

inline std::vector<Budget> sparsities(std::initializer_list<double> values) {
  std::vector<Budget> b;
  for (double v : values) b.push_back({Budget::Kind::kSparsity, v});
  return b;
}

}  // namespace hysparse::test
