// Sweeps: the layer-by-layer replay resumes from a checkpoint with identical numbers, the axes
// expand into the selector instances a researcher expects, every sweep point equals a standalone
// replay of that instance, and pooled points merge the captures exactly.
#include <cmath>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/error.hpp"
#include "common/random.hpp"
#include "reference/random_capture.hpp"
#include "replay/engine.hpp"
#include "replay_test_support.hpp"
#include "sweep/report.hpp"
#include "sweep/sweep.hpp"

using namespace hysparse;
namespace ref = hysparse::reference;

namespace {

// A sweep point and a standalone replay of the same instance differ only where the shared
// statistics pass uses a finer base block (gcd of every block size): the fp32 block sums are
// regrouped, within the replay's documented 1e-6 mass tolerance against float64.
constexpr double kSharedPassTolerance = 1e-6;

std::string write_random_capture(const ref::Shape& shape, std::uint64_t salt, const std::string& name) {
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/" + name + ".h5";
  write_capture(path, ref::random_capture(shape, mix_seed(test::seed(), salt, 0x5eeb)));
  return path;
}

// Every number of two results, exactly (NaN equal to NaN).
void require_identical(const ReplayResult& a, const ReplayResult& b) {
  auto same = [](const std::vector<double>& x, const std::vector<double>& y) {
    if (x.size() != y.size()) return false;
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (!(x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i])))) return false;
    }
    return true;
  };
  REQUIRE(a.selectors.size() == b.selectors.size());
  CHECK(a.score_elements == b.score_elements);
  for (std::size_t s = 0; s < a.selectors.size(); ++s) {
    const SelectorResult& x = a.selectors[s];
    const SelectorResult& y = b.selectors[s];
    INFO("selector " << x.label);
    for (int m = 0; m < kNumMetrics; ++m) {
      INFO("metric " << metric_name(m));
      CHECK(same(x.head_mean[m].values, y.head_mean[m].values));
      CHECK(same(x.layer_mean[m].values, y.layer_mean[m].values));
      CHECK(same(x.model_mean[m].values, y.model_mean[m].values));
      CHECK(same(x.model_sparse_mean[m].values, y.model_sparse_mean[m].values));
    }
    CHECK(same(x.head_recall_p10.values, y.head_recall_p10.values));
    CHECK(same(x.layer_recall_p50.values, y.layer_recall_p50.values));
    CHECK(same(x.model_recall_p10.values, y.model_recall_p10.values));
    CHECK(same(x.model_recall_min.values, y.model_recall_min.values));
    CHECK(same(x.model_sparse_recall_p50.values, y.model_sparse_recall_p50.values));
    CHECK(same(x.saturated_rows.values, y.saturated_rows.values));
    CHECK(same(x.kv_resident_bytes, y.kv_resident_bytes));
    CHECK(x.calibration == y.calibration);
  }
  CHECK(same(a.reuse.values, b.reuse.values));
}

SweepConfig small_config(const std::vector<std::string>& captures) {
  SweepConfig c;
  c.captures = captures;
  c.budgets = test::sparsities({0.8, 0.5});  // ascending budget order, as the CLI sorts them
  c.selectors = parse_selector_list("oracle,swa,hysparse,quest");
  c.tile_rows = 7;
  return c;
}

}  // namespace

TEST_CASE("a replay resumed from a checkpoint after any layer gives the numbers of an uninterrupted run",
          "[sweep][resume]") {
  ref::Shape shape;
  shape.layers = 4;
  shape.seq_len = 90;
  shape.layer_correlation = 0.5;
  const std::string path = write_random_capture(shape, 1, "sweep_resume");
  // Every selector, with cross-layer state (hysparse, reuse), calibration (duo) and the reuse matrix.
  ReplayOptions options = test::replay_options("all,reuse:layers=1,hysparse:schedule=1:1", test::tokens({16, 32, 64}));
  options.block_size = 16;
  options.reuse_budget = 32;
  const auto backend = make_cpu_backend();
  const ReplayResult uninterrupted = run_replay(path, options, *backend, false);
  for (std::int64_t stop = 0; stop <= shape.layers; ++stop) {
    INFO("checkpoint after " << stop << " layers");
    std::vector<std::uint8_t> checkpoint;
    {
      ReplayRun first(path, options, *backend, false);
      for (std::int64_t l = 0; l < stop; ++l) first.run_next_layer();
      checkpoint = first.checkpoint();
    }
    ReplayRun second(path, options, *backend, false);
    second.restore(checkpoint);
    CHECK(second.next_layer() == stop);
    while (!second.done()) second.run_next_layer();
    require_identical(uninterrupted, second.result());
  }
}

TEST_CASE("a checkpoint of another configuration or a damaged one is refused", "[sweep][resume]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 40;
  const std::string path = write_random_capture(shape, 2, "sweep_refuse");
  const auto backend = make_cpu_backend();
  const ReplayOptions options = test::replay_options("oracle,hysparse", test::tokens({16}));
  ReplayRun run(path, options, *backend, false);
  run.run_next_layer();
  std::vector<std::uint8_t> checkpoint = run.checkpoint();

  ReplayRun other(path, test::replay_options("oracle,hysparse,swa", test::tokens({16})), *backend, false);
  CHECK_THROWS_AS(other.restore(checkpoint), Error);
  std::vector<std::uint8_t> truncated(checkpoint.begin(), checkpoint.end() - 3);
  ReplayRun same(path, options, *backend, false);
  CHECK_THROWS_AS(same.restore(truncated), Error);
  checkpoint[0] ^= 0xff;
  ReplayRun again(path, options, *backend, false);
  CHECK_THROWS_AS(again.restore(checkpoint), Error);
}

TEST_CASE("sweep axes expand into selector instances: applicable axes only, duplicates merged", "[sweep][plan]") {
  SweepConfig config = small_config({"unused.h5"});
  config.selectors = parse_selector_list("oracle,swa,hysparse,h2o,quest:block=16");
  config.blocks = {32, 64};
  config.windows = {0, 128};
  config.schedules = {"1:3", "full=0,2"};
  const SweepPlan plan = plan_sweep(config);
  CHECK(plan.grid.size() == 5 * 2 * 2 * 2 * 1 * 1);
  auto count = [&](const std::string& name) {
    return std::count_if(plan.instances.begin(), plan.instances.end(), [&](const SweepInstance& i) { return i.name == name; });
  };
  CHECK(count("oracle") == 4);    // block x window
  CHECK(count("swa") == 2);       // its window is the budget: block only
  CHECK(count("hysparse") == 8);  // block x window x schedule
  CHECK(count("h2o") == 1);       // token level: no block, no window parameter swept
  CHECK(count("quest") == 2);     // block fixed by its spec: window only
  for (const auto& instance : plan.instances) {
    if (instance.name == "quest") CHECK(instance.block == 16);
    if (instance.name == "swa") CHECK(instance.window == -1);
    if (instance.name == "h2o") CHECK(instance.block == 1);
  }
  // The schedule with commas reaches the selector, and reads back with its commas.
  const auto full_list = std::find_if(plan.instances.begin(), plan.instances.end(),
                                      [](const SweepInstance& i) { return i.schedule == "full=0,2"; });
  CHECK(full_list != plan.instances.end());
  // Each grid cell of swa along the window axis maps to the same instance.
  const auto dims = plan.grid_dims();
  const std::size_t swa = 1;
  for (std::size_t b = 0; b < dims[1]; ++b) {
    const auto cell = [&](std::size_t w, std::size_t sch) {
      return plan.grid[((((swa * dims[1] + b) * dims[2] + w) * dims[3]) * dims[4] + sch) * dims[5]];
    };
    CHECK(cell(0, 0) == cell(1, 1));
  }

  SweepConfig bad = config;
  bad.groups = {"none"};  // hysparse aggregates over a group: max or sum
  CHECK_THROWS_AS(plan_sweep(bad), Error);
  bad = config;
  bad.blocks = {32, 32};
  CHECK_THROWS_AS(plan_sweep(bad), Error);
  bad = config;
  bad.budgets.clear();
  CHECK_THROWS_AS(plan_sweep(bad), Error);
}

TEST_CASE("every sweep point equals a standalone replay of its instance; pooled points merge captures",
          "[sweep][parity]") {
  ref::Shape shape;
  shape.layers = 3;
  shape.seq_len = 70;
  const std::string a = write_random_capture(shape, 3, "sweep_a");
  shape.seq_len = 45;
  shape.layers = 3;
  const std::string b = write_random_capture(shape, 4, "sweep_b");
  SweepConfig config = small_config({a, b});
  config.blocks = {8, 16};
  config.windows = {0, 8};
  const SweepPlan plan = plan_sweep(config);
  const auto backend = make_cpu_backend();
  SweepState state;
  std::int64_t units_seen = 0;
  run_sweep(config, plan, {backend.get()}, state, [&](const SweepState&) { ++units_seen; }, false, false);
  CHECK(units_seen == 6);
  REQUIRE(state.complete());
  REQUIRE(state.results.size() == 2);

  const auto NB = config.budgets.size();
  for (std::size_t c = 0; c < 2; ++c) {
    for (std::size_t i = 0; i < plan.instances.size(); ++i) {
      const SweepInstance& instance = plan.instances[i];
      INFO("capture " << c << ", instance " << instance.resolved);
      ReplayOptions options = sweep_replay_options(config, plan);
      options.selectors = {instance.spec};
      const ReplayResult alone = run_replay(config.captures[c], options, *backend, false);
      const SelectorResult& x = alone.selectors[0];
      const SelectorResult& y = state.results[c].selectors[i];
      CHECK(x.spec == y.spec);
      for (std::size_t bi = 0; bi < NB; ++bi) {
        for (int m = 0; m < kNumMetrics; ++m) {
          const double u = x.model_mean[m].values[bi], v = y.model_mean[m].values[bi];
          if (std::isnan(u)) CHECK(std::isnan(v));
          else CHECK(std::abs(u - v) <= kSharedPassTolerance * std::max(1.0, std::abs(u)));
        }
        CHECK(x.kv_resident_bytes[bi] == y.kv_resident_bytes[bi]);
      }
    }
  }
  // Pooled: the row-weighted mean of the captures' means, and quantiles of the merged histograms.
  for (std::size_t i = 0; i < plan.instances.size(); ++i) {
    for (std::size_t bi = 0; bi < NB; ++bi) {
      ModelSums pooled;
      double weighted = 0, rows = 0;
      for (std::size_t c = 0; c < 2; ++c) {
        const ModelSums& sums = state.results[c].model_sums[i * NB + bi];
        pooled.merge(sums);
        weighted += state.results[c].selectors[i].model_mean[kMassRecall].values[bi] * static_cast<double>(sums.count[0][kMassRecall]);
        rows += static_cast<double>(sums.count[0][kMassRecall]);
      }
      CHECK(std::abs(pooled.sum[0][kMassRecall] / static_cast<double>(pooled.count[0][kMassRecall]) - weighted / rows) < 1e-12);
      CHECK(pooled.recall[0].rows == static_cast<std::int64_t>(rows));
    }
  }

  // The report carries the same numbers on its points table (read back through its checkpoint-free state).
  const std::string report = std::string(HYSPARSE_TEST_DATA_DIR) + "/sweep_report.h5";
  Provenance provenance = make_provenance(0, nullptr);
  write_sweep_report(report, config, plan, state, provenance);
  const SweepConfig back = read_report_config(report);
  CHECK(back.to_json() == config.to_json());
  const SweepResumeState resume = read_sweep_resume_state(report);
  CHECK(resume.status == "complete");
  CHECK(resume.state.units.size() == 6);
}

TEST_CASE("a sweep resumed from its partial state finishes with the numbers of an uninterrupted sweep",
          "[sweep][resume]") {
  ref::Shape shape;
  shape.layers = 3;
  shape.seq_len = 60;
  const std::string a = write_random_capture(shape, 5, "sweep_resume_a");
  const std::string b = write_random_capture(shape, 6, "sweep_resume_b");
  SweepConfig config = small_config({a, b});
  config.groups = {"max", "sum"};
  const SweepPlan plan = plan_sweep(config);
  const auto backend = make_cpu_backend();
  SweepState uninterrupted;
  run_sweep(config, plan, {backend.get()}, uninterrupted, [](const SweepState&) {}, false, false);

  for (std::int64_t stop_after = 1; stop_after < 6; ++stop_after) {
    INFO("stopped after " << stop_after << " units");
    // Stop by interrupting from the callback, then resume from a report written at that point.
    const std::string report = std::string(HYSPARSE_TEST_DATA_DIR) + "/sweep_partial.h5";
    SweepState partial;
    std::int64_t seen = 0;
    Provenance provenance = make_provenance(0, nullptr);
    try {
      run_sweep(config, plan, {backend.get()}, partial,
                [&](const SweepState& s) {
                  if (++seen == stop_after) {
                    write_sweep_report(report, config, plan, s, provenance);
                    throw Error(ErrorKind::kInterrupted, "test stop");
                  }
                },
                false, false);
    } catch (const Error& e) {
      REQUIRE(e.kind() == ErrorKind::kInterrupted);
    }
    SweepResumeState resume = read_sweep_resume_state(report);
    CHECK(resume.status == "partial");
    CHECK(resume.state.units_done() == stop_after);
    run_sweep(resume.config, plan_sweep(resume.config), {backend.get()}, resume.state, [](const SweepState&) {}, false, false);
    REQUIRE(resume.state.complete());
    for (std::size_t c = 0; c < 2; ++c) require_identical(uninterrupted.results[c], resume.state.results[c]);
  }
}

TEST_CASE("captures spread over several devices give the numbers of one device", "[sweep][parallel]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 50;
  std::vector<std::string> captures;
  for (int i = 0; i < 3; ++i) captures.push_back(write_random_capture(shape, 10 + static_cast<std::uint64_t>(i), "sweep_par_" + std::to_string(i)));
  const SweepConfig config = small_config(captures);
  const SweepPlan plan = plan_sweep(config);
  const auto first = make_cpu_backend();
  const auto second = make_cpu_backend();
  SweepState one, two;
  run_sweep(config, plan, {first.get()}, one, [](const SweepState&) {}, false, false);
  std::int64_t calls = 0;
  run_sweep(config, plan, {first.get(), second.get()}, two, [&](const SweepState& s) {
    ++calls;
    CHECK(s.units_done() == calls);  // serialised, one call per finished unit
  }, false, false);
  CHECK(calls == 6);
  REQUIRE(two.complete());
  for (std::size_t c = 0; c < captures.size(); ++c) require_identical(one.results[c], two.results[c]);
}

TEST_CASE("a replay with its KV heads spread over several devices gives the numbers of one device", "[sweep][parallel]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.q_heads = 6;
  shape.kv_heads = 3;
  shape.seq_len = 64;
  const std::string path = write_random_capture(shape, 20, "multi_device");
  const ReplayOptions options = test::replay_options("oracle,hysparse,quest,swa", test::tokens({16, 32}));
  const auto one = make_backend("cpu");
  const auto two = make_backend("cpu,cpu");
  CHECK(two->device().find("2 devices") != std::string::npos);
  require_identical(run_replay(path, options, *one, false), run_replay(path, options, *two, false));
  CHECK_THROWS_AS(make_backend("cpu,,cpu"), Error);
}
