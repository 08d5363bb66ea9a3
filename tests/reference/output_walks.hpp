#pragma once
// Output-error walks (backend.hpp's OutputWalks): random walks for parity tests, and a float64
// reference that evaluates them from q, k and v alone (its own exact output, one row at a time).
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"

namespace hysparse::reference {

// Walks over the rows and heads of `request` (q/k with v): per (head, row) up to three walks of
// random key ranges inside the row's causal keys, and per row up to two walks that every head
// shares (the same steps for each head, as a selection per KV group gives), with checkpoints
// anywhere, including before the first step (the empty set), after single keys, and after the
// whole row. With `weighted`, steps carry importance factors exp(N(0, 1)) (some of them exactly 1).
OutputWalks random_output_walks(const StatsRequest& request, std::uint64_t seed, bool weighted);

// errors[slot] in float64: o = sum_j p_j v_j over every causal key (p with the sink logit in the
// denominator), o_S = sum_{j in S} f_j p_j v_j / (p_sink + sum_{j in S} f_j p_j), error = |o_S - o| / |o|.
std::vector<double> naive_output_errors(const StatsRequest& request, const OutputWalks& walks);

}  // namespace hysparse::reference
