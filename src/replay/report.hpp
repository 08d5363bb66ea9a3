#pragma once
// HDF5 report v1 of a replay, and the human summary table.
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "common/provenance.hpp"
#include "replay/engine.hpp"

namespace hysparse {

inline constexpr const char* kReportFormat = "hysparse-report";
inline constexpr std::int64_t kReportFormatVersion = 1;

// Writes atomically to `path` (temporary file, then rename).
void write_replay_report(const std::string& path, const ReplayResult& result, const ReplayOptions& options,
                         const Provenance& provenance);

// The report's content for one replay (capture, axes, selectors, reuse, kv) under `root`: "" for
// a replay report, a group such as /captures/0 in a sweep report. `schedule` prices the hybrid kv rows.
void write_replay_content(const h5::File& file, const std::string& root, const ReplayResult& result,
                          const std::string& schedule);
// A /config group: `config` as one JSON attribute `json` and one attribute per top-level key.
void write_config_group(const h5::File& file, const std::string& group, const nlohmann::json& config);

// Per budget, selectors ranked by mean mass recall over all layers.
void print_replay_summary(std::FILE* out, const ReplayResult& result);

}  // namespace hysparse
