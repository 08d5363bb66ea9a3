#pragma once
// Batch sweeps: selectors x block sizes x windows x sinks x schedules x group aggregations x
// budgets over one or more captures, in one run and one HDF5 report.
//
// Every selector instance of the sweep (a base spec with the axis values applied) runs in ONE
// replay per capture, so the exact statistics of each (layer, KV group, query tile) are computed
// once and shared by every point. Work units are (capture, layer); after each unit the sweep's
// state (the replay checkpoint of the capture in progress and the results so far) goes to the
// report, atomically, so a sweep killed at any moment resumes with identical numbers.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.hpp"
#include "replay/engine.hpp"
#include "replay/options.hpp"

namespace hysparse {

// The resolved configuration of a sweep; it is stored in the report (/config json) and is all
// that `--from-report` and `--resume` need.
struct SweepConfig {
  std::vector<std::string> captures;
  std::vector<Budget> budgets;  // one kind (tokens or sparsity)
  // Axes applied to every selector that has the parameter (and whose spec does not fix it);
  // an empty list leaves each selector its own default.
  std::vector<std::int64_t> blocks, windows, sinks;
  std::vector<std::string> schedules, groups;
  std::vector<SelectorSpec> selectors;
  std::string queries = "all";
  std::uint64_t seed = 0;
  bool output_error = true;
  std::string device = "cpu";              // the first of `devices`
  std::vector<std::string> devices = {"cpu"};  // several: captures run in parallel, one per device
  std::string precision = "fp32";              // score precision on CUDA devices (fp32, bf16, fp16)
  std::int64_t tile_rows = 0;

  nlohmann::json to_json() const;
  // Error(kInput) naming `where` when the document is not a sweep configuration.
  static SweepConfig from_json(const nlohmann::json& json, const std::string& where);
};

// One selector instance: the spec it runs with and its resolved coordinates.
struct SweepInstance {
  SelectorSpec spec;           // base spec with the axis values filled in
  std::string name;            // selector name
  std::string resolved;        // every parameter resolved: the instance's identity
  std::int64_t block = 0, window = 0, sinks = 0;  // window -1: the budget is the window
  std::string schedule, group;  // "" where the selector has no such parameter
};

// The expansion of a config's axes into instances, and the grid that maps axis coordinates to them.
struct SweepPlan {
  std::vector<SweepInstance> instances;  // unique by `resolved`, in first-seen order
  // Axis values: as requested; an axis not requested has one entry (-1 / "default": the selectors' own).
  std::vector<std::string> selector_axis;  // the base specs as written
  std::vector<std::int64_t> block_axis, window_axis, sinks_axis;
  std::vector<std::string> schedule_axis, group_axis;
  // [selector][block][window][sinks][schedule][group] -> instance index.
  std::vector<std::int64_t> grid;
  std::vector<std::uint64_t> grid_dims() const;
};

// Error(kUsage) when an axis value does not suit a selector that has the parameter.
SweepPlan plan_sweep(const SweepConfig& config);

// Budgets read from a stored configuration, through the command line's checks (range, order,
// duplicates); Error(kInput) naming `where`.
std::vector<Budget> budgets_from_values(const std::vector<double>& values, bool tokens, const std::string& where);

// The replay options that run every instance of the plan at once.
ReplayOptions sweep_replay_options(const SweepConfig& config, const SweepPlan& plan);

// A work unit: one layer of one capture.
struct SweepUnit {
  std::int64_t capture = 0, layer = 0;
  bool done = false;
  double seconds = 0;
};

// Everything a sweep has done so far; what the report holds and `--resume` reads back.
struct SweepState {
  std::vector<ReplayResult> results;                   // per capture: partial or complete (no selectors: not started)
  std::vector<std::vector<std::uint8_t>> checkpoints;  // per capture: its replay checkpoint (empty: not started)
  std::vector<SweepUnit> units;                        // every unit of the sweep, in run order
  std::int64_t units_done() const;
  bool complete() const;
};

// Runs (or continues) the sweep. `on_unit` is called after each finished unit, serialised, with
// capture_io_mutex() held — the caller writes the report there. With several backends (devices),
// captures run in parallel, one per backend at a time, each with an equal share of the OpenMP threads.
void run_sweep(const SweepConfig& config, const SweepPlan& plan, const std::vector<const Backend*>& backends,
               SweepState& state, const std::function<void(const SweepState&)>& on_unit, bool progress_tty,
               bool progress_lines);

// The sweep's units before it runs: every layer of every capture (reads the captures' headers).
std::vector<SweepUnit> sweep_units(const SweepConfig& config);

}  // namespace hysparse
