#pragma once
// Block views: the statistics of a tile at a selector's block size, as every selector and metric reads them.
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "replay/selector.hpp"

namespace hysparse {

// The masses (and, with_max, largest probabilities) of `block`-key blocks of every (head, row) of a tile of
// `base`-key blocks (block a multiple of base; positions: the tile's rows). Every cell is written, the
// non-causal ones 0. The operations are fixed (portable_exp, fused sums over a block's tile blocks), so a
// device that ranks by these values ranks the host's bits. `exps`: scratch.
void build_block_view(const StatsTile& tile, std::int64_t base, std::int64_t block, const std::int64_t* positions, bool with_max,
                      BlockView& view, std::vector<double>& exps);

// The view a backend built beside the statistics (StatsRequest::view_block), its arrays moved out of the tile
// (Error(kInternal) where the tile does not hold that view, or its largest probabilities with_max).
void adopt_block_view(StatsTile& tile, std::int64_t block, const std::int64_t* positions, bool with_max, BlockView& view);

}  // namespace hysparse
