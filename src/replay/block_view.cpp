#include "replay/block_view.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.hpp"
#include "common/portable_exp.hpp"

namespace hysparse {

namespace {

// The view's shape for `tile`'s heads and rows; returns its cells.
std::size_t shape_view(const StatsTile& tile, std::int64_t block, const std::int64_t* positions, BlockView& view) {
  view.block = block;
  view.heads = tile.heads;
  view.rows = tile.rows;
  view.positions = positions;
  view.num_blocks = positions[tile.rows - 1] / block + 1;
  return static_cast<std::size_t>(view.heads * view.rows * view.num_blocks);
}

}  // namespace

void build_block_view(const StatsTile& tile, std::int64_t base, std::int64_t block, const std::int64_t* positions, bool with_max,
                      BlockView& view, std::vector<double>& exps) {
  const std::int64_t factor = block / base;
  const std::size_t cells = shape_view(tile, block, positions, view);
  // Every cell is written once below (a token-level view is the tile's largest array, and its passes
  // are bound by memory bandwidth on a many-core host): no fill before.
  view.mass.resize(cells);
  if (with_max) {
    view.max_prob.resize(cells);
  } else {
    view.max_prob.clear();
  }
  for (std::int64_t h = 0; h < tile.heads; ++h) {
    for (std::int64_t r = 0; r < tile.rows; ++r) {
      const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(h * tile.rows + r)];
      const double lse_all = tile.lse_all[static_cast<std::size_t>(h * tile.rows + r)];
      const std::int64_t base_blocks = positions[r] / base + 1, causal = view.causal_blocks(r);
      const float* block_max = &tile.block_max[tile.at(h, r, 0)];
      const float* block_sum = &tile.block_sum[tile.at(h, r, 0)];
      double* mass = &view.mass[view.at(h, r, 0)];
      double* max_prob = with_max ? &view.max_prob[view.at(h, r, 0)] : nullptr;
      std::fill(mass + causal, mass + view.num_blocks, 0.0);
      if (with_max) std::fill(max_prob + causal, max_prob + view.num_blocks, 0.0);
      if (factor == 1) {
        // The tile's own blocks: one exponential a block (exp(m - lse_all) is exp(m - lse_tokens)
        // times the row's token share of the mass, sinks excluded). Without a branch, so that the
        // compiler vectorises it: an empty block (m = -inf, l = 0) gets 0 x 0.
        const double token_share = portable_exp(lse_tokens - lse_all);
        if (with_max) {
          for (std::int64_t b = 0; b < base_blocks; ++b) {
            const double e = portable_exp(static_cast<double>(block_max[b]) - lse_tokens);
            mass[b] = static_cast<double>(block_sum[b]) * e;
            max_prob[b] = e * token_share;
          }
        } else {
          for (std::int64_t b = 0; b < base_blocks; ++b) {
            mass[b] = static_cast<double>(block_sum[b]) * portable_exp(static_cast<double>(block_max[b]) - lse_tokens);
          }
        }
        continue;
      }
      // Coarser blocks: a block's largest tile-block max m, its tile blocks' exponentials against m (a
      // vectorised loop), then their sum in tile-block order, each step fused, as the device sums it (an
      // empty tile block adds 0 x 0).
      exps.resize(static_cast<std::size_t>(factor));
      for (std::int64_t b = 0; b < causal; ++b) {
        const std::int64_t first = b * factor, count = std::min((b + 1) * factor, base_blocks) - first;
        float peak = -std::numeric_limits<float>::infinity();
        for (std::int64_t i = 0; i < count; ++i) peak = std::max(peak, block_max[first + i]);
        if (peak == -std::numeric_limits<float>::infinity()) {
          mass[b] = 0.0;
          if (with_max) max_prob[b] = 0.0;
          continue;
        }
        const double m = peak;
        for (std::int64_t i = 0; i < count; ++i) exps[static_cast<std::size_t>(i)] = portable_exp(static_cast<double>(block_max[first + i]) - m);
        double l = 0.0;
        for (std::int64_t i = 0; i < count; ++i) l = std::fma(static_cast<double>(block_sum[first + i]), exps[static_cast<std::size_t>(i)], l);
        mass[b] = l * portable_exp(m - lse_tokens);
        if (with_max) max_prob[b] = portable_exp(m - lse_all);
      }
    }
  }
}

void adopt_block_view(StatsTile& tile, std::int64_t block, const std::int64_t* positions, bool with_max, BlockView& view) {
  const std::size_t cells = shape_view(tile, block, positions, view);
  if (tile.view_blocks != view.num_blocks || tile.view_mass.size() != cells || (with_max && tile.view_max_prob.size() != cells)) {
    fail(ErrorKind::kInternal, "a backend's block view of {} blocks ({} masses, {} maxima) for {} heads x {} rows x {} blocks{}",
         tile.view_blocks, tile.view_mass.size(), tile.view_max_prob.size(), view.heads, view.rows, view.num_blocks,
         with_max ? " with maxima" : "");
  }
  view.mass.swap(tile.view_mass);
  if (with_max) {
    view.max_prob.swap(tile.view_max_prob);
  } else {
    view.max_prob.clear();
  }
}

}  // namespace hysparse
