#pragma once
// The sweep report (format "hysparse-sweep", version 1), and reading one back for --resume and
// --from-report. Layout (README, "Sweep report"):
//   /config                   the resolved SweepConfig (attribute json)
//   /sweep                    status (complete | partial), units_total, units_done, budget_kind
//   /sweep/axes/*             capture, selector, block, window, sinks, schedule, group, budget (dimension scales)
//   /sweep/grid/<metric>      [capture][selector][block][window][sinks][schedule][group][budget]
//   /sweep/points/<column>    a flat table, one row per (capture or pooled, selector instance, budget)
//   /sweep/units/*            one row per work unit (capture, layer): done, seconds
//   /sweep/checkpoint/*       only while partial: what --resume continues from
//   /captures/<c>/...         each capture's replay report content (capture, axes, selectors, kv)
#include <string>
#include <vector>

#include "common/provenance.hpp"
#include "sweep/sweep.hpp"

namespace hysparse {

inline constexpr const char* kSweepFormat = "hysparse-sweep";
inline constexpr std::int64_t kSweepFormatVersion = 1;

// Writes atomically to `path` (temporary file, then rename): the previous file stays intact until
// the new one is complete.
void write_sweep_report(const std::string& path, const SweepConfig& config, const SweepPlan& plan,
                        const SweepState& state, const Provenance& provenance);

// The configuration stored in a sweep report, or in a replay report (its options become a
// one-capture sweep). Error(kInput) naming the file when it is neither.
SweepConfig read_report_config(const std::string& path);

// What --resume needs from a partial sweep report: the configuration, the units and the
// checkpoints. `input_sha256` lists the captures' digests recorded when the sweep started.
struct SweepResumeState {
  SweepConfig config;
  SweepState state;
  std::vector<std::string> input_sha256;
  std::string status;
  std::string tool;                  // "tool_version git_sha" of the build that wrote the report
  std::vector<std::string> devices;  // the devices it ran on
  // The invocations that wrote it so far, oldest first (Provenance::earlier_runs of the next run).
  std::vector<std::string> runs;
};
SweepResumeState read_sweep_resume_state(const std::string& path);

}  // namespace hysparse
