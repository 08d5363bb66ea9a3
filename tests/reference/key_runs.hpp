#pragma once
// Runs of keys (backend.hpp's KeyRun): random and adversarial runs for parity tests, and a float64 reference
// of their sums from q and k (or dense probabilities) alone.
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"

namespace hysparse::reference {

// Runs over the heads and rows of `request`: per (head, row) empty runs, single keys, the whole row, runs of
// 31 to 65 keys (a warp's width and a block's), random runs, half of them ascending; with `long_runs`, runs
// of up to 2,100 keys where the row has them.
std::vector<KeyRun> random_key_runs(const StatsRequest& request, std::uint64_t seed, bool long_runs);

// sums[i] in float64: the sum over run i's keys of p_j / sum_{j' <= t} p_j' (the share of the row's token
// mass), with z_j = scale * q . k_j in double, or p_j the dense layer's probabilities.
std::vector<double> naive_key_run_shares(const StatsRequest& request, const std::vector<KeyRun>& runs);

}  // namespace hysparse::reference
