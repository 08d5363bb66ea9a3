#pragma once
// Block views: the statistics of a tile at a selector's block size, as every selector and metric reads them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/backend.hpp"
#include "common/portable_exp.hpp"
#include "replay/selector.hpp"

namespace hysparse {

// The share of its row's token mass that a block of the tile holds, from its statistics: l * exp(m - lse_tokens)
// (an empty block, m = -inf and l = 0, gives 0). Every mass the engine reads from a tile's own blocks is this.
inline double tile_block_mass(float block_max, float block_sum, double lse_tokens) {
  return static_cast<double>(block_sum) * portable_exp(static_cast<double>(block_max) - lse_tokens);
}

// The masses (and, with_max, largest probabilities) of `block`-key blocks of every (head, row) of a tile of
// `base`-key blocks (block a multiple of base; positions: the tile's rows). Every cell is written, the
// non-causal ones 0. The operations are fixed (portable_exp, fused sums over a block's tile blocks), so a
// device that ranks by these values ranks the host's bits. `exps`: scratch.
void build_block_view(const StatsTile& tile, std::int64_t base, std::int64_t block, const std::int64_t* positions, bool with_max,
                      BlockView& view, std::vector<double>& exps);
// One (head h, row r at `position`) of it: the causal blocks' masses into mass[0 .. position / block] (and
// largest probabilities into max_prob where not null), by the same operations.
void build_view_row(const StatsTile& tile, std::int64_t base, std::int64_t block, std::int64_t h, std::int64_t r,
                    std::int64_t position, double* mass, double* max_prob, std::vector<double>& exps);

// The view's shape without its arrays (BlockView::unbuilt_from): what the engine makes where no reader needs
// whole arrays, so that a tile whose rankings come from a device costs the host no pass over every block.
// `tile` must outlive the view's use.
void leave_block_view_unbuilt(const StatsTile& tile, std::int64_t base, std::int64_t block, const std::int64_t* positions,
                              BlockView& view);

// The mass of block b of (h, r): the view's cell, or for an unbuilt view build_block_view's value computed
// from its tile (the same operations in the same order, so the same bits). b < the row's causal blocks.
inline double view_mass(const BlockView& view, std::int64_t h, std::int64_t r, std::int64_t b) {
  if (!view.unbuilt_from) return view.mass[view.at(h, r, b)];
  const StatsTile& tile = *view.unbuilt_from;
  const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(h * tile.rows + r)];
  const float* block_max = &tile.block_max[tile.at(h, r, 0)];
  const float* block_sum = &tile.block_sum[tile.at(h, r, 0)];
  const std::int64_t factor = view.block / view.unbuilt_base;
  if (factor == 1) return tile_block_mass(block_max[b], block_sum[b], lse_tokens);
  const std::int64_t first = b * factor, count = std::min((b + 1) * factor, view.positions[r] / view.unbuilt_base + 1) - first;
  float peak = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < count; ++i) peak = std::max(peak, block_max[first + i]);
  if (peak == -std::numeric_limits<float>::infinity()) return 0.0;
  const double m = peak;
  double l = 0.0;
  for (std::int64_t i = 0; i < count; ++i) l = std::fma(static_cast<double>(block_sum[first + i]), portable_exp(static_cast<double>(block_max[first + i]) - m), l);
  return l * portable_exp(m - lse_tokens);
}

// The view a backend built beside the statistics (StatsRequest::view_block), its arrays moved out of the tile
// (Error(kInternal) where the tile does not hold that view, or its largest probabilities with_max).
void adopt_block_view(StatsTile& tile, std::int64_t block, const std::int64_t* positions, bool with_max, BlockView& view);

}  // namespace hysparse
