#pragma once
// HDF5 report v1 of a replay, and the human summary table.
#include <cstdio>
#include <string>

#include "common/provenance.hpp"
#include "replay/engine.hpp"

namespace hysparse {

inline constexpr const char* kReportFormat = "hysparse-report";
inline constexpr std::int64_t kReportFormatVersion = 1;

// Writes atomically to `path` (temporary file, then rename).
void write_replay_report(const std::string& path, const ReplayResult& result, const ReplayOptions& options,
                         const Provenance& provenance);

// Per budget, selectors ranked by mean mass recall over all layers.
void print_replay_summary(std::FILE* out, const ReplayResult& result);

}  // namespace hysparse
