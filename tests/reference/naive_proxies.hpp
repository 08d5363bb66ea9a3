#pragma once
// Naive float64 reference for the proxy selectors (the README table "Proxy selectors").
//
// Independent of src/replay: every proxy is written from its definition, one row at a time, with
// whole causal rows of probabilities materialised in double and eviction simulated with explicit
// key sets. Scores that rank keys are computed in double with channels summed in ascending order, so
// that the engine (which does the same) and this reference break near-ties alike; everything else
// (sets, block bounds, tie rules, metrics) is coded separately from the engine.
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "reference/naive_replay.hpp"

namespace hysparse::reference {

struct RefProxy {
  std::string kind;  // quest, moba, reuse, oracle_topp, nsa, infllm, snapkv, h2o, doublesparsity, loki, sparq, magicpig, duo
  std::int64_t block = 1, sinks = 0, window = 0;  // window = forced recent keys
  std::int64_t dense = 0;                 // quest: layers below this attend everything
  bool current = true;                    // moba: the query's own block ranked first
  std::vector<std::int64_t> layers;       // reuse: selection layers (those >= num_layers are ignored)
  std::string group = "sum";              // reuse: sum|max|none; nsa/sparq: shared over the group (sum); snapkv/h2o: none|sum
  std::string score = "mass";             // reuse: mass|prob
  std::string anchor = "full";            // reuse: full|topk
  double p = 0.9;                         // oracle_topp
  std::int64_t cmp = 32, stride = 16, initial = 1, local = 2;  // nsa (block = selection block)
  std::int64_t repr = 4;                  // infllm: representative keys per block (window = n_local)
  std::int64_t observe = 32, kernel = 7, prompt = 0;  // snapkv (pool: "max" | "avg"; prompt 0 = auto)
  std::string pool = "max";
  std::int64_t recent = 50;               // h2o: percent of the cache that is recent; duo: recent keys of a streaming head
  std::int64_t r = 0;                     // doublesparsity (0: d/8), loki (0: d/4), sparq (0: d/8)
  std::string channel = "qk";             // doublesparsity: qk|q|k
  std::int64_t sparq_local = 1;           // sparq: most recent keys ranked first (its local=)
  std::int64_t bits = 10, tables = 150, collisions = 2;  // magicpig (sinks/window: the static keys)
  std::int64_t sink = 128, streaming = 50;                // duo (recent: above)
  std::string error = "mass";             // duo: mass|output
};

// Calibration positions of the calibrated proxies (every position is used, no sampling): the positions
// outside the query set, or the first half [0, T/2) when the query set is every position (then rows
// t < T/2 are not scored). Returns (positions, first scored row).
std::pair<std::vector<std::int64_t>, std::int64_t> naive_calibration(std::int64_t seq_len, const std::vector<std::int64_t>& rows);

// Eigenvalues (descending) and unit eigenvectors (columns, same order) of a symmetric matrix, by cyclic Jacobi.
void naive_symmetric_eigen(std::vector<std::vector<double>> a, std::vector<double>& values,
                           std::vector<std::vector<double>>& vectors);

// result[layer][q_head][i] for rows[i], at one budget. Rows the proxy leaves out have scored = false.
std::vector<std::vector<std::vector<RefRowMetrics>>> naive_proxy_metrics(const Capture& capture, const RefProxy& proxy,
                                                                         const RefBudget& budget,
                                                                         const std::vector<std::int64_t>& rows,
                                                                         std::uint64_t seed = 0);

// Quest's page bound written out: sum_i max(q_i * max_j k_j[i], q_i * min_j k_j[i]) over the keys given.
double naive_quest_bound(const std::vector<double>& q, const std::vector<std::vector<double>>& keys);

// Backend::token_score_rankings written out: per (set, row), every key's score one key at a time (each
// multiply-add fused where `fused`, channels ascending, terms in order), the recent keys' +infinity, each
// block's largest score by a scan, then the blocks stably sorted by score (ties keep the lower block).
// [sets][rows][stride], stride the largest count, entries past a row's count 0.
std::vector<std::int32_t> naive_token_score_rankings(const TokenScoreRequest& request, bool fused);

}  // namespace hysparse::reference
