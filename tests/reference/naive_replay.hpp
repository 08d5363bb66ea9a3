#pragma once
// Naive float64 reference for the README section "Replay: definitions".
//
// Written independently of src/replay: every quantity is computed the obvious way, one row at a
// time, with the full causal row of probabilities materialised in double. Speed does not matter
// (T <= a few hundred); clarity and literal agreement with the written definitions do. The parity
// tests of the streaming engine compare against these functions.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "capture/capture.hpp"

namespace hysparse::reference {

struct RefSelector {
  std::string kind;            // "oracle", "swa", "hysparse"
  std::int64_t block = 64;
  std::int64_t sinks = 0;
  std::int64_t window = 0;     // for swa: -1 means "window = budget in tokens" (for a sparsity budget: the row's budget in blocks times block, i.e. n_t*B tokens)
  std::string group = "none";  // oracle: none|sum|max ; hysparse: max|sum
  std::string score = "max";   // hysparse: max|mass
  std::vector<bool> full_layers;  // hysparse: which layers are full (size = num_layers); layer 0 must be full
};

struct RefBudget {
  bool is_sparsity = false;
  double value = 0;  // tokens k (is_sparsity = false), or sparsity s in [0,1)
};

struct RefRowMetrics {
  double mass_recall = 0, oracle_recall = 0, topk_overlap = 0, attended = 0,
         output_rel_error = std::numeric_limits<double>::quiet_NaN();
  bool saturated = false;   // budget covered every causal block of the row
  bool full_layer = false;  // hysparse full layer: attends everything
  bool scored = true;       // proxies: false for rows the selector leaves out (prompt, calibration half)
  // Proxies with a threshold (oracle top-p): distance of the row's decisive cumulative sums from the
  // threshold; rows closer than the engine's float statistics can resolve are not compared exactly.
  double threshold_margin = std::numeric_limits<double>::infinity();
};

// result[layer][q_head][i] for rows[i]
std::vector<std::vector<std::vector<RefRowMetrics>>> naive_metrics(const Capture& capture, const RefSelector& selector,
                                                                   const RefBudget& budget,
                                                                   const std::vector<std::int64_t>& rows);

// reuse[f][l] for f <= l (NaN for f > l): mean over heads and rows of layer l's mass recall under the blocks
// layer f selects by block max probability P_b aggregated with max over the heads of each KV group,
// top floor(budget_tokens/block) blocks, no forced keys.
std::vector<std::vector<double>> naive_reuse_matrix(const Capture& capture, std::int64_t block,
                                                    std::int64_t budget_tokens, const std::vector<std::int64_t>& rows);

// Building blocks, also used directly by tests:
// p_j, j = 0..t: the true probabilities (sink logit in the denominator); for a dense `attn` layer attn[h][t][j].
std::vector<double> naive_probabilities(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t);
// o = sum_j p_j v_j (length head_dim). Requires v.
std::vector<double> naive_output(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t);

// Smaller building blocks (extra to the interface above, for the self-checks and for parity tests).
// Number of causal blocks of row t: floor(t/B) + 1.
std::int64_t naive_num_blocks(std::int64_t t, std::int64_t block);
// Budget in blocks for row t: floor(k/B) (k >= B required), or max(1, ceil((1-s)(t+1)/B)) evaluated
// literally in double as ceil(((1 - s) * (t+1)) / B).
std::int64_t naive_budget_blocks(const RefBudget& budget, std::int64_t t, std::int64_t block);
// Forced keys of row t as a mask over j = 0..t: [0, min(sinks, t+1)) and [max(0, t-window+1), t].
std::vector<bool> naive_forced(std::int64_t t, std::int64_t sinks, std::int64_t window);
// Block indices ordered by score, higher first; equal scores: lower index first.
std::vector<std::int64_t> naive_rank(const std::vector<double>& scores);
// R(A) = sum_{j in A} p_j / sum_j p_j over the row (attended.size() == p.size()).
double naive_recall(const std::vector<double>& p, const std::vector<bool>& attended);
// z_j = scale * q_t . k_j, j = 0..t, summed in double over channels in ascending order (q/k layers).
std::vector<double> naive_logits(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t);
// Per block of row t: the mass of its keys outside `excluded`, divided by the row's token mass.
std::vector<double> naive_block_mass(const std::vector<double>& p, std::int64_t block, std::int64_t t,
                                     const std::vector<bool>& excluded);
// Per block of row t: max_{j in b} p_j.
std::vector<double> naive_block_max(const std::vector<double>& p, std::int64_t block, std::int64_t t);
// Mask over keys 0..t of the first n blocks of `ranking`.
std::vector<bool> naive_keys_of_top(const std::vector<std::int64_t>& ranking, std::int64_t n, std::int64_t block,
                                    std::int64_t t);
// Elementwise "sum" or "max" of per-head block scores.
std::vector<double> naive_aggregate(const std::vector<std::vector<double>>& per_head, const std::string& how);

}  // namespace hysparse::reference
