#pragma once
// The replay engine: streams a capture layer by layer, computes exact block
// statistics per query tile through a Backend, ranks blocks with every selector
// and reduces the per-row metrics into per-head, per-layer and model aggregates.
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "replay/options.hpp"
#include "replay/selector.hpp"

namespace hysparse {

// A dense [d0][d1]... array of doubles with its dimension names.
struct Table {
  std::vector<std::uint64_t> dims;
  std::vector<double> values;
  void reset(std::vector<std::uint64_t> d, double fill);
  double& at(std::uint64_t i, std::uint64_t j) { return values[i * dims[1] + j]; }
  double& at(std::uint64_t i, std::uint64_t j, std::uint64_t k) { return values[(i * dims[1] + j) * dims[2] + k]; }
  double at(std::uint64_t i, std::uint64_t j) const { return values[i * dims[1] + j]; }
  double at(std::uint64_t i, std::uint64_t j, std::uint64_t k) const { return values[(i * dims[1] + j) * dims[2] + k]; }
};

// Metric names, in report order. Per-row metrics reduced over rows.
enum Metric : int { kMassRecall = 0, kRecallVsOracle, kTopkOverlap, kAttendedKeys, kBudgetKeys, kOutputError, kNumMetrics };
const char* metric_name(int metric);
const char* metric_units(int metric);
const char* metric_long_name(int metric);

struct SelectorResult {
  std::string label, spec, description;
  std::int64_t block = 0, sinks = 0, window = 0;  // window -1: equals the budget
  bool shared_by_group = false;
  SelectorInfo info;                 // granularity, budget semantics, post-RoPE handling, KV footprint
  BudgetUse budget_use = BudgetUse::kNested;
  std::int64_t first_scored = 0;     // rows t < first_scored are not scored (NaN)
  std::string calibration;           // which positions calibrated it ("" when not calibrated)
  std::vector<std::int64_t> is_full_layer;  // [layer] 1 where the selector attends everything
  // [budget][layer][head]
  Table head_mean[kNumMetrics];
  Table head_recall_p10, head_recall_p50, head_recall_min;
  // [budget][layer]
  Table layer_mean[kNumMetrics];
  Table layer_recall_p10, layer_recall_p50, layer_recall_min;
  Table saturated_rows;
  // [budget]: all layers, and only the layers where the selector is sparse
  Table model_mean[kNumMetrics], model_sparse_mean[kNumMetrics];
  Table model_recall_p10, model_recall_p50, model_recall_min;
  Table model_sparse_recall_p10, model_sparse_recall_p50, model_sparse_recall_min;  // sparse layers only
};

struct ReplayResult {
  CaptureHeader header;
  std::string capture_path;
  std::vector<std::int64_t> rows;
  std::vector<Budget> budgets;
  std::vector<SelectorResult> selectors;
  bool has_output_error = false;
  std::int64_t reuse_budget = 0, reuse_block = 0;
  Table reuse;  // [source layer f][target layer l], NaN where f > l; empty when disabled
  std::string backend, device;
  double seconds = 0;
  std::uint64_t score_elements = 0;  // sum over heads and rows of causal keys scored
};

ReplayResult run_replay(const std::string& capture_path, const ReplayOptions& options, const Backend& backend,
                        bool progress);

}  // namespace hysparse
