// The CPU backend's output-error walks against the float64 reference (reference/output_walks.hpp):
// random walks over MHA, GQA and MQA groups, with sinks, importance factors, a single token,
// head_dim not a multiple of 32, and a negative scale; and the contract checks every backend runs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/error.hpp"
#include "reference/output_walks.hpp"
#include "reference/random_capture.hpp"
#include "replay/engine.hpp"
#include "replay_test_support.hpp"

using namespace hysparse;

namespace {

// Absolute, on errors of order 1: the host sums each step's weighted values in fp32 and its exact
// output is fp32, so errors carry a few fp32 roundings of |o| (~1e-7 relative) on either side.
constexpr double kOutputWalkTolerance = 1e-5;

struct WalkCase {
  std::int64_t q_heads, kv_heads, head_dim, seq_len;
  bool sinks, weighted;
  double scale_sign;
};

// MHA, GQA, MQA; head_dim 16/40/128; one token; sinks; importance factors; a negative scale.
const WalkCase kWalkCases[] = {
    {4, 4, 16, 90, false, false, 1.0}, {8, 2, 40, 150, true, true, 1.0}, {6, 1, 128, 70, true, false, -1.0},
    {4, 2, 16, 1, true, true, 1.0},    {2, 2, 64, 300, false, true, 1.0},
};

// One layer of one KV group of two query heads, T tokens, with v.
Capture one_group_capture(std::int64_t T) {
  reference::Shape shape;
  shape.layers = 1;
  shape.q_heads = 2;
  shape.kv_heads = 1;
  shape.seq_len = T;
  return reference::random_capture(shape, test::seed());
}

}  // namespace

TEST_CASE("CPU output-error walks equal the float64 reference", "[output]") {
  const auto cpu = make_cpu_backend();
  double worst = 0.0;
  std::int64_t checkpoints = 0;
  for (const WalkCase& k : kWalkCases) {
    CAPTURE(k.q_heads, k.kv_heads, k.head_dim, k.seq_len, k.sinks, k.weighted, k.scale_sign);
    const Capture c = reference::random_capture(reference::one_layer(k.q_heads, k.kv_heads, k.head_dim, k.seq_len, k.sinks),
                                                test::seed() + static_cast<std::uint64_t>(k.seq_len));
    std::vector<std::int64_t> rows;
    for (std::int64_t t = 0; t < k.seq_len; t += 1 + t % 3) rows.push_back(t);
    for (std::int64_t group = 0; group < k.kv_heads; ++group) {
      const StatsRequest req = test::group_request(c, group, rows, 16, true, k.scale_sign);
      StatsTile tile;
      cpu->block_statistics(req, tile);
      const OutputWalks walks = reference::random_output_walks(req, test::seed() + static_cast<std::uint64_t>(group), k.weighted);
      REQUIRE(walks.checkpoints > 0);
      CHECK(walks.factors.empty() == !k.weighted);
      std::vector<double> errors;
      cpu->output_errors(req, tile, walks, errors);
      const std::vector<double> expected = reference::naive_output_errors(req, walks);
      REQUIRE(errors.size() == expected.size());
      for (std::size_t i = 0; i < errors.size(); ++i) {
        const double gap = std::fabs(errors[i] - expected[i]);
        worst = std::max(worst, gap);
        if (!(gap <= kOutputWalkTolerance)) {
          CAPTURE(i, errors[i], expected[i]);
          CHECK(gap <= kOutputWalkTolerance);
        }
      }
      checkpoints += walks.checkpoints;
    }
  }
  std::printf("output walks, CPU vs float64: %lld checkpoints, largest difference %.2e (tolerance %.0e)\n",
              static_cast<long long>(checkpoints), worst, kOutputWalkTolerance);
}

TEST_CASE("Output walks: the empty set has error 1 and the whole row error 0", "[output]") {
  const Capture c = one_group_capture(50);
  const std::vector<std::int64_t> rows = {0, 17, 49};
  const StatsRequest req = test::group_request(c, 0, rows, 16, true);
  StatsTile tile;
  const auto cpu = make_cpu_backend();
  cpu->block_statistics(req, tile);
  OutputWalks walks;
  for (std::int64_t r = 0; r < 3; ++r) {
    walks.begin_walk(1, r);
    walks.checkpoint();
    walks.add(0, rows[static_cast<std::size_t>(r)] / 2);
    walks.add(rows[static_cast<std::size_t>(r)] / 2, rows[static_cast<std::size_t>(r)] + 1);
    walks.checkpoint();
  }
  std::vector<double> errors;
  cpu->output_errors(req, tile, walks, errors);
  REQUIRE(errors.size() == 6);
  for (std::size_t r = 0; r < 3; ++r) {
    CHECK(errors[2 * r] == 1.0);
    CHECK(errors[2 * r + 1] < kOutputWalkTolerance);
  }
}

TEST_CASE("Output walks outside the tile are refused before any key is read", "[output]") {
  const Capture c = one_group_capture(20);
  const std::vector<std::int64_t> rows = {5, 10};
  const StatsRequest req = test::group_request(c, 0, rows, 16, true);
  StatsTile tile;
  const auto cpu = make_cpu_backend();
  cpu->block_statistics(req, tile);
  std::vector<double> errors;
  auto refused = [&](const OutputWalks& walks) {
    try {
      cpu->output_errors(req, tile, walks, errors);
    } catch (const Error& e) {
      return e.kind() == ErrorKind::kInternal;
    }
    return false;
  };
  OutputWalks beyond_causal;
  beyond_causal.begin_walk(0, 0);
  beyond_causal.add(3, 7);  // row 0 is position 5: keys 0..5
  beyond_causal.checkpoint();
  CHECK(refused(beyond_causal));
  OutputWalks bad_head;
  bad_head.begin_walk(2, 0);
  bad_head.checkpoint();
  CHECK(refused(bad_head));
  OutputWalks fine;
  fine.begin_walk(1, 1);
  fine.add(0, 11);
  fine.checkpoint();
  CHECK_FALSE(refused(fine));
  StatsRequest without_v = req;
  without_v.v = nullptr;
  CHECK_THROWS_AS(cpu->output_errors(without_v, tile, fine, errors), Error);
}

// The engine evaluates a tile's walks whenever they hold walk_steps_per_flush steps (and at the end of
// the tile): where it cuts them changes nothing but which walks the CPU evaluates together.
TEST_CASE("Output errors do not depend on how often the engine hands its walks over", "[output]") {
  reference::Shape shape;
  shape.layers = 3;
  shape.seq_len = 120;
  shape.sinks = true;
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/walk_flush.h5";
  write_capture(path, reference::random_capture(shape, test::seed() + 41));
  ReplayOptions options = test::replay_options("all,hysparse:schedule=1:1", test::tokens({16, 48}));
  options.block_size = 16;
  options.tile_rows = 50;
  const auto cpu = make_cpu_backend();
  const ReplayResult whole = run_replay(path, options, *cpu, false);
  REQUIRE(whole.has_output_error);
  for (const std::int64_t steps : {1, 37}) {
    INFO("walk steps per flush " << steps);
    options.walk_steps_per_flush = steps;
    const ReplayResult cut = run_replay(path, options, *cpu, false);
    REQUIRE(cut.selectors.size() == whole.selectors.size());
    for (std::size_t s = 0; s < whole.selectors.size(); ++s) {
      INFO("selector " << whole.selectors[s].label);
      for (int m = 0; m < kNumMetrics; ++m) {
        const auto& a = whole.selectors[s].head_mean[m].values;
        const auto& b = cut.selectors[s].head_mean[m].values;
        REQUIRE(a.size() == b.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
          if (std::isnan(a[i]) && std::isnan(b[i])) continue;
          // Mass metrics do not involve the walks at all; output errors only through rounding.
          const double tolerance = m == kOutputError ? kOutputWalkTolerance : 0.0;
          if (!(std::fabs(a[i] - b[i]) <= tolerance)) {
            CAPTURE(metric_name(m), i, a[i], b[i]);
            CHECK(std::fabs(a[i] - b[i]) <= tolerance);
          }
        }
      }
    }
  }
}
