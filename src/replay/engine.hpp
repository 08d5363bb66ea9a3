#pragma once
// The replay engine: streams a capture layer by layer, computes exact block
// statistics per query tile through a Backend, ranks blocks with every selector
// and reduces the per-row metrics into per-head, per-layer and model aggregates.
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
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

// Model-level recall quantiles come from a histogram of this many bins on [0, 1]
// (value = bin centre, so within 0.5 / kModelHistogramBins of the exact quantile).
inline constexpr int kModelHistogramBins = 10000;

// Recall values of many rows, kept as a histogram on [0, 1] (bounded memory at any size);
// histograms of disjoint row sets merge exactly (captures pooled by a sweep).
struct RecallHistogram {
  std::vector<std::int64_t> histogram = std::vector<std::int64_t>(kModelHistogramBins, 0);
  double min = std::numeric_limits<double>::infinity();
  std::int64_t rows = 0;
  void add(double v);
  void merge(const RecallHistogram& other);
  double quantile(double q) const;  // nearest rank, as the centre of its bin; NaN without rows
  double minimum() const;           // NaN without rows
};

// Sums behind one (selector, budget)'s model aggregates: [0] every layer, [1] the selector's sparse layers.
struct ModelSums {
  double sum[2][kNumMetrics] = {};
  std::int64_t count[2][kNumMetrics] = {};
  RecallHistogram recall[2];
  void merge(const ModelSums& other);
};

struct SelectorResult {
  std::string label, spec, description;
  std::int64_t block = 0, sinks = 0, window = 0;  // window -1: equals the budget
  bool shared_by_group = false;
  SelectorInfo info;                 // granularity, budget semantics, post-RoPE handling, KV footprint
  BudgetUse budget_use = BudgetUse::kNested;
  std::int64_t first_scored = 0;     // rows t < first_scored are not scored (NaN)
  std::string calibration;           // which positions calibrated it ("" when not calibrated)
  std::vector<std::int64_t> is_full_layer;  // [layer] 1 where the selector attends everything
  // [budget]: resident KV-cache bytes at the capture's length (bf16, batch 1, whole model, K/V + metadata),
  // priced by the footprint table with the selector's parameters (replay/kv_price.hpp); NaN where n/a.
  std::vector<double> kv_resident_bytes;
  std::vector<std::string> kv_methods;  // [budget]: the accounting method as resolved
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
  std::vector<ModelSums> model_sums;  // [selector][budget]: what the model aggregates are made of
  double kv_full_bytes = 0;           // full attention of the same model at the capture's length (bf16, batch 1)
  double seconds = 0;
  std::uint64_t score_elements = 0;  // sum over heads and rows of causal keys scored
};

// A replay that runs one layer at a time (layers in order). After any layer its state can be saved
// (checkpoint) and a new run of the same capture and options restored from it, which then
// continues with the same numbers as an uninterrupted run: sweeps resume this way.
class ReplayRun {
 public:
  // Opens and validates the capture and the options; no layer runs yet.
  ReplayRun(const std::string& capture_path, const ReplayOptions& options, const Backend& backend, bool progress);
  ~ReplayRun();
  ReplayRun(ReplayRun&&) noexcept;
  ReplayRun(const ReplayRun&) = delete;
  ReplayRun& operator=(const ReplayRun&) = delete;

  std::int64_t num_layers() const;
  std::int64_t next_layer() const;
  bool done() const;
  void run_next_layer();
  // The results so far: layers not run yet are NaN; model aggregates cover the layers run.
  ReplayResult result() const;
  // Everything needed to continue after the layers run so far (an opaque byte string).
  std::vector<std::uint8_t> checkpoint() const;
  // Before any layer runs: continue from a checkpoint of the same capture and options
  // (Error(kInput) when it does not match).
  void restore(const std::vector<std::uint8_t>& checkpoint);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Replays running in several threads at once (a sweep over several devices) open, read and close
// captures, and write reports, under this lock: libhdf5 builds without its thread-safe option
// (the default) must not be entered by two threads.
std::mutex& capture_io_mutex();

// Model aggregates (model_* tables) of one selector from its sums, for `budgets` budgets.
void fill_model_tables(SelectorResult& out, const ModelSums* sums, std::int64_t budgets);

ReplayResult run_replay(const std::string& capture_path, const ReplayOptions& options, const Backend& backend,
                        bool progress);

}  // namespace hysparse
