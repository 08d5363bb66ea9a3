#pragma once
// Helpers shared by the replay test files: write a capture, replay it on the CPU, build options and budgets.
#include <initializer_list>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "replay/engine.hpp"

namespace hysparse::test {

// Writes `capture` to the test data directory as `<name>.h5` and replays it with the CPU backend.
inline ReplayResult replay_capture(const Capture& capture, const std::string& name, const ReplayOptions& options) {
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/" + name + ".h5";
  write_capture(path, capture);
  const auto backend = make_cpu_backend();
  return run_replay(path, options, *backend, false);
}

// No reuse matrix, and tiles of 7 rows: several tiles per group, rows split unevenly.
inline ReplayOptions replay_options(const std::string& selectors, const std::vector<Budget>& budgets) {
  ReplayOptions o;
  o.selectors = parse_selector_list(selectors);
  o.budgets = budgets;
  o.reuse_budget = 0;
  o.tile_rows = 7;
  return o;
}

inline std::vector<Budget> tokens(std::initializer_list<double> values) {
  std::vector<Budget> b;
  for (double v : values) b.push_back({Budget::Kind::kTokens, v});
  return b;
}

inline std::vector<Budget> sparsities(std::initializer_list<double> values) {
  std::vector<Budget> b;
  for (double v : values) b.push_back({Budget::Kind::kSparsity, v});
  return b;
}

}  // namespace hysparse::test
