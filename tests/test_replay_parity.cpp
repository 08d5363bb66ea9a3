// The streaming replay engine against the naive float64 reference (tests/reference),
// on random and adversarial captures: every aggregate the report carries is compared.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "replay_test_support.hpp"
#include "common/random.hpp"
#include "kv/schedule.hpp"
#include "reference/naive_replay.hpp"
#include "reference/random_capture.hpp"
#include "replay/block_view.hpp"
#include "replay/engine.hpp"
#include "replay/gathered_sum.hpp"
#include "replay/selector.hpp"

using namespace hysparse;
using hysparse::test::replay_capture;
using hysparse::test::replay_options;
using hysparse::test::sparsities;
using hysparse::test::tokens;
namespace ref = hysparse::reference;

namespace {

// Mass recall and its quantiles: the README promises 1e-6 against float64.
constexpr double kMassTolerance = 1e-6;
// Ratios and overlaps inherit the mass error; attended keys are exact integers.
constexpr double kRatioTolerance = 1e-5;
// Output error compares fp32 products against float64 sums of up to T terms.
constexpr double kOutputTolerance = 2e-5;
// Properties (bounds, monotonicity) compare numbers that reach the same value by different
// fp32-derived paths (block statistics vs direct dot products).
constexpr double kPropertyTolerance = 1e-7;

using ref::Shape;
using ref::random_capture;


double nearest_rank(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const auto rank = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(q * static_cast<double>(v.size()))));
  return v[static_cast<std::size_t>(rank - 1)];
}

ref::RefBudget to_ref(const Budget& b) { return {b.kind == Budget::Kind::kSparsity, b.value}; }

// Compares one selector of an engine result with the reference, for every budget, layer and head.
void compare_selector(const ReplayResult& result, std::size_t index, const Capture& capture, const ref::RefSelector& selector) {
  const SelectorResult& s = result.selectors[index];
  INFO("selector " << s.spec);
  const auto L = capture.header.num_layers, H = capture.header.num_q_heads;
  for (std::size_t bi = 0; bi < result.budgets.size(); ++bi) {
    INFO("budget " << result.budgets[bi].label());
    const auto rows = ref::naive_metrics(capture, selector, to_ref(result.budgets[bi]), result.rows);
    for (std::int64_t l = 0; l < L; ++l) {
      INFO("layer " << l);
      double saturated = 0;
      bool full = false;
      for (std::int64_t h = 0; h < H; ++h) {
        INFO("head " << h);
        std::vector<double> recall, ratio, overlap, attended, error;
        for (const auto& m : rows[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)]) {
          recall.push_back(m.mass_recall);
          ratio.push_back(m.mass_recall / m.oracle_recall);
          overlap.push_back(m.topk_overlap);
          attended.push_back(m.attended);
          error.push_back(m.output_rel_error);
          saturated += m.saturated && !m.full_layer ? 1 : 0;
          full = m.full_layer;
        }
        auto mean = [](const std::vector<double>& v) {
          double sum = 0;
          for (double x : v) sum += x;
          return sum / static_cast<double>(v.size());
        };
        const auto ub = static_cast<std::uint64_t>(bi), ul = static_cast<std::uint64_t>(l), uh = static_cast<std::uint64_t>(h);
        CHECK(s.head_mean[kMassRecall].at(ub, ul, uh) == Approx(mean(recall)).margin(kMassTolerance));
        CHECK(s.head_recall_min.at(ub, ul, uh) == Approx(*std::min_element(recall.begin(), recall.end())).margin(kMassTolerance));
        CHECK(s.head_recall_p10.at(ub, ul, uh) == Approx(nearest_rank(recall, 0.10)).margin(kMassTolerance));
        CHECK(s.head_recall_p50.at(ub, ul, uh) == Approx(nearest_rank(recall, 0.50)).margin(kMassTolerance));
        CHECK(s.head_mean[kRecallVsOracle].at(ub, ul, uh) == Approx(mean(ratio)).margin(kRatioTolerance));
        CHECK(s.head_mean[kTopkOverlap].at(ub, ul, uh) == Approx(mean(overlap)).margin(kRatioTolerance));
        CHECK(s.head_mean[kAttendedKeys].at(ub, ul, uh) == Approx(mean(attended)).margin(1e-9));
        const double reference_error = mean(error);
        const double engine_error = s.head_mean[kOutputError].at(ub, ul, uh);
        if (result.has_output_error && !std::isnan(reference_error)) {
          CHECK(engine_error == Approx(reference_error).margin(kOutputTolerance));
        } else {
          CHECK(std::isnan(engine_error));
        }
      }
      CHECK(s.saturated_rows.at(bi, static_cast<std::uint64_t>(l)) == Approx(full ? 0.0 : saturated));
      CHECK(s.is_full_layer[static_cast<std::size_t>(l)] == (full ? 1 : 0));
    }
  }
}




ref::RefSelector oracle(std::int64_t block, std::string group = "none", std::int64_t sinks = 0, std::int64_t window = 0) {
  ref::RefSelector s;
  s.kind = "oracle";
  s.block = block;
  s.group = std::move(group);
  s.sinks = sinks;
  s.window = window;
  return s;
}
ref::RefSelector swa(std::int64_t block, std::int64_t window, std::int64_t sinks = 0) {
  ref::RefSelector s;
  s.kind = "swa";
  s.block = block;
  s.window = window;
  s.sinks = sinks;
  return s;
}
ref::RefSelector hysparse_ref(std::int64_t block, std::int64_t window, const std::string& schedule, std::int64_t layers,
                              std::string score = "max", std::string group = "max") {
  ref::RefSelector s;
  s.kind = "hysparse";
  s.block = block;
  s.window = window;
  s.score = std::move(score);
  s.group = std::move(group);
  s.full_layers = parse_schedule(schedule, layers);
  return s;
}

}  // namespace

TEST_CASE("replay matches the float64 reference on a random GQA capture", "[replay][parity]") {
  Shape shape;
  shape.layers = 3;
  shape.seq_len = 150;  // not a multiple of the block size
  const Capture capture = random_capture(shape, test::seed());
  ReplayOptions options = replay_options(
      "oracle,oracle:group=sum,oracle:group=max,swa,swa:window=20,sinks=2,oracle:sinks=3,window=10,"
      "hysparse:block=16,window=8,hysparse:block=16,window=0,score=mass,group=sum",
      tokens({16, 48, 160}));
  options.block_size = 16;
  options.schedule = "FSS";
  const ReplayResult result = replay_capture(capture, "parity_gqa", options);
  REQUIRE(result.selectors.size() == 8);
  compare_selector(result, 0, capture, oracle(16));
  compare_selector(result, 1, capture, oracle(16, "sum"));
  compare_selector(result, 2, capture, oracle(16, "max"));
  compare_selector(result, 3, capture, swa(16, -1));
  compare_selector(result, 4, capture, swa(16, 20, 2));
  compare_selector(result, 5, capture, oracle(16, "none", 3, 10));
  compare_selector(result, 6, capture, hysparse_ref(16, 8, "FSS", 3));
  compare_selector(result, 7, capture, hysparse_ref(16, 0, "FSS", 3, "mass", "sum"));
}

TEST_CASE("replay matches the reference for MHA and MQA with sparsity budgets and sink logits", "[replay][parity]") {
  for (const auto& [q_heads, kv_heads] : {std::pair<std::int64_t, std::int64_t>{3, 3}, {4, 1}}) {
    Shape shape;
    shape.q_heads = q_heads;
    shape.kv_heads = kv_heads;
    shape.seq_len = 77;
    shape.sinks = true;
    CAPTURE(q_heads, kv_heads);
    const Capture capture = random_capture(shape, test::seed() + static_cast<std::uint64_t>(q_heads));
    ReplayOptions options = replay_options("oracle,oracle:group=sum,swa:sinks=1,hysparse:block=8,window=4",
                                         sparsities({0.9, 0.7, 0.5, 0.0}));
    options.block_size = 8;
    options.schedule = "FS";
    const ReplayResult result = replay_capture(capture, "parity_mha_mqa_" + std::to_string(q_heads), options);
    compare_selector(result, 0, capture, oracle(8));
    compare_selector(result, 1, capture, oracle(8, "sum"));
    compare_selector(result, 2, capture, swa(8, -1, 1));
    compare_selector(result, 3, capture, hysparse_ref(8, 4, "FS", 2));
  }
}

TEST_CASE("replay matches the reference at token level (block 1), for a single token, and on sampled rows",
          "[replay][parity]") {
  SECTION("block size 1") {
    Shape shape;
    shape.seq_len = 37;
    const Capture capture = random_capture(shape, test::seed() + 11);
    ReplayOptions options = replay_options("oracle,swa,oracle:group=max", tokens({1, 5, 40}));
    options.block_size = 1;
    const ReplayResult result = replay_capture(capture, "parity_block1", options);
    compare_selector(result, 0, capture, oracle(1));
    compare_selector(result, 1, capture, swa(1, -1));
    compare_selector(result, 2, capture, oracle(1, "max"));
  }
  SECTION("seq_len 1") {
    Shape shape;
    shape.seq_len = 1;
    const Capture capture = random_capture(shape, test::seed() + 12);
    ReplayOptions options = replay_options("oracle,swa,hysparse:block=4", tokens({4, 8}));
    options.block_size = 4;
    options.schedule = "FS";
    const ReplayResult result = replay_capture(capture, "parity_single", options);
    compare_selector(result, 0, capture, oracle(4));
    compare_selector(result, 1, capture, swa(4, -1));
    compare_selector(result, 2, capture, hysparse_ref(4, 128, "FS", 2));
    CHECK(result.selectors[0].model_mean[kMassRecall].values[0] == 1.0);
  }
  SECTION("sampled query rows") {
    Shape shape;
    shape.seq_len = 120;
    const Capture capture = random_capture(shape, test::seed() + 13);
    for (const std::string queries : {"last:17", "stride:9", "random:23"}) {
      CAPTURE(queries);
      ReplayOptions options = replay_options("oracle,swa", tokens({8, 32}));
      options.block_size = 8;
      options.queries = queries;
      options.seed = test::seed();
      const ReplayResult result = replay_capture(capture, "parity_sampled", options);
      compare_selector(result, 0, capture, oracle(8));
      compare_selector(result, 1, capture, swa(8, -1));
    }
  }
}

TEST_CASE("replay resolves ties exactly as the reference (lower index first)", "[replay][parity]") {
  for (const auto values : {Shape::Values::kTies, Shape::Values::kIdentical}) {
    Shape shape;
    shape.values = values;
    shape.seq_len = 64;
    shape.logit_scale = 1.0;
    const Capture capture = random_capture(shape, test::seed() + 21);
    ReplayOptions options = replay_options("oracle,oracle:group=sum,oracle:sinks=2,window=5,hysparse:block=4,window=2",
                                         tokens({4, 12, 28}));
    options.block_size = 4;
    options.schedule = "FS";
    const ReplayResult result = replay_capture(capture, "parity_ties", options);
    compare_selector(result, 0, capture, oracle(4));
    compare_selector(result, 1, capture, oracle(4, "sum"));
    compare_selector(result, 2, capture, oracle(4, "none", 2, 5));
    compare_selector(result, 3, capture, hysparse_ref(4, 2, "FS", 2));
  }
}

TEST_CASE("replay reads dense attn layers like q/k layers (mass metrics only)", "[replay][parity]") {
  Shape shape;
  shape.layers = 3;
  shape.seq_len = 50;
  shape.dense_layers = {0, 2};
  shape.sinks = true;
  const Capture capture = random_capture(shape, test::seed() + 31);
  ReplayOptions options = replay_options("oracle,swa,hysparse:block=8,window=4", tokens({8, 24}));
  options.block_size = 8;
  options.schedule = "FSS";
  const ReplayResult result = replay_capture(capture, "parity_dense", options);
  compare_selector(result, 0, capture, oracle(8));
  compare_selector(result, 1, capture, swa(8, -1));
  compare_selector(result, 2, capture, hysparse_ref(8, 4, "FSS", 3));
}

TEST_CASE("selectors with different block sizes share one statistics pass (gcd) and the reuse matrix matches",
          "[replay][parity]") {
  Shape shape;
  shape.layers = 4;
  shape.seq_len = 130;
  const Capture capture = random_capture(shape, test::seed() + 41);
  ReplayOptions options = replay_options("oracle:block=8,hysparse:block=32,window=16,swa:window=24", tokens({32, 64}));
  options.block_size = 16;
  options.reuse_budget = 48;
  options.schedule = "FSFS";
  const ReplayResult result = replay_capture(capture, "parity_gcd", options);
  compare_selector(result, 0, capture, oracle(8));
  compare_selector(result, 1, capture, hysparse_ref(32, 16, "FSFS", 4));
  compare_selector(result, 2, capture, swa(16, 24));
  const auto reuse = ref::naive_reuse_matrix(capture, 16, 48, result.rows);
  for (std::uint64_t f = 0; f < 4; ++f) {
    for (std::uint64_t l = 0; l < 4; ++l) {
      CAPTURE(f, l);
      if (f > l) {
        CHECK(std::isnan(result.reuse.at(f, l)));
      } else {
        CHECK(result.reuse.at(f, l) == Approx(reuse[f][l]).margin(kMassTolerance));
      }
    }
  }
}

TEST_CASE("GatheredSum's total is its four lanes' whatever segments it is added in", "[replay][metrics]") {
  // Values of many magnitudes, so that sums in another order (or lanes counted from a segment's start)
  // round differently.
  Rng rng(test::seed() + 77);
  std::int64_t compared = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const std::int64_t n = 1 + static_cast<std::int64_t>(rng.next() % 700);
    std::vector<double> values(static_cast<std::size_t>(n));
    for (double& v : values) v = rng.uniform() * std::pow(10.0, -static_cast<double>(rng.next() % 12));
    std::vector<std::int32_t> index(static_cast<std::size_t>(n));
    std::iota(index.begin(), index.end(), 0);
    for (std::int64_t i = n - 1; i > 0; --i) std::swap(index[static_cast<std::size_t>(i)], index[rng.next() % static_cast<std::uint64_t>(i + 1)]);
    double lanes[4] = {0.0, 0.0, 0.0, 0.0};
    for (std::int64_t i = 0; i < n; ++i) lanes[i % 4] += values[static_cast<std::size_t>(index[static_cast<std::size_t>(i)])];
    const double expected = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    GatheredSum whole, cut;
    whole.add(values.data(), index.data(), 0, n);
    CHECK(whole.total() == expected);
    // Random cuts, empty segments and ones that start off a multiple of four included.
    std::int64_t at = 0;
    while (at < n) {
      const std::int64_t next = std::min(n, at + static_cast<std::int64_t>(rng.next() % 9));
      cut.add(values.data(), index.data(), at, next);
      at = next;
    }
    CAPTURE(trial, n);
    CHECK(cut.total() == expected);
    cut.reset();
    cut.add(values.data(), index.data(), 0, 0);
    CHECK(cut.total() == 0.0);
    ++compared;
  }
  std::printf("GatheredSum: %lld sums, each equal to its lanes' whatever the cuts\n", static_cast<long long>(compared));
}

TEST_CASE("replay properties: full budget gives recall 1, the oracle bounds every selector, recall grows with budget",
          "[replay][properties]") {
  Shape shape;
  shape.layers = 3;
  shape.seq_len = 96;
  shape.sinks = true;
  const Capture capture = random_capture(shape, test::seed() + 51);
  ReplayOptions options = replay_options("oracle,oracle:group=sum,swa,hysparse:block=8,window=8", tokens({8, 16, 32, 64, 96}));
  options.block_size = 8;
  options.schedule = "FSS";
  const ReplayResult result = replay_capture(capture, "parity_properties", options);
  const std::uint64_t last = result.budgets.size() - 1;
  for (const auto& s : result.selectors) {
    INFO(s.spec);
    CHECK(s.model_mean[kMassRecall].values[last] == Approx(1.0).margin(1e-12));
    for (std::uint64_t l = 0; l < 3; ++l) {
      for (std::uint64_t h = 0; h < 4; ++h) {
        for (std::uint64_t b = 0; b < result.budgets.size(); ++b) {
          CHECK(s.head_mean[kRecallVsOracle].at(b, l, h) <= 1.0 + kPropertyTolerance);
          // Selectors with no forced keys and no full layers cannot beat the per-head oracle.
          if (s.sinks == 0 && s.window <= 0 && s.label != "hysparse") {
            CHECK(s.head_mean[kMassRecall].at(b, l, h) <= result.selectors[0].head_mean[kMassRecall].at(b, l, h) + kPropertyTolerance);
          }
          if (b > 0) CHECK(s.head_mean[kMassRecall].at(b, l, h) >= s.head_mean[kMassRecall].at(b - 1, l, h) - kPropertyTolerance);
          if (b > 0) CHECK(s.head_recall_min.at(b, l, h) >= s.head_recall_min.at(b - 1, l, h) - kPropertyTolerance);
        }
      }
    }
  }
  // A per-head oracle is its own reference: its mass and the reference's are the same sum, added in the
  // same order however the budgets cut it, so the ratio is exactly 1 in every row. One long, flat row
  // per layer (a mean over rows would hide a last-bit difference), where a sum in another order rounds
  // differently somewhere.
  Shape long_rows;
  long_rows.layers = 6;
  long_rows.seq_len = 2000;
  long_rows.sinks = true;
  long_rows.logit_scale = 0.25;
  const Capture long_capture = random_capture(long_rows, test::seed() + 52);
  ReplayOptions own_options = replay_options("oracle:block=1,oracle:block=1,sinks=2,window=5,oracle:block=4", tokens({64, 300, 1000}));
  own_options.queries = "last:1";
  const ReplayResult own = replay_capture(long_capture, "parity_oracle_self", own_options);
  for (const auto& s : own.selectors) {
    INFO(s.spec);
    for (const double ratio : s.head_mean[kRecallVsOracle].values) CHECK(ratio == 1.0);
  }
}

namespace {

// The CPU backend, plus a ranking of every tile's blocks by mass made the way a device backend
// makes it (StatsTile::mass_order), optionally shorter than asked (`shorten` blocks fewer, at least
// one): the engine must take it where it serves and rank the rest itself, with the same report.
// `least_first` ranks the other way round, so that a report shows whether the ranking was taken.
class HostRankingBackend final : public test::CpuBackedBackend {
 public:
  explicit HostRankingBackend(std::int64_t shorten, bool least_first = false) : shorten_(shorten), least_first_(least_first) {}
  void block_statistics(const StatsRequest& request, StatsTile& out) const override {
    cpu().block_statistics(request, out);
    rank_by_group(request, out);
    if (request.rank_blocks <= 0) return;
    ++asked_;
    const std::int64_t block = request.rank_block > 0 ? request.rank_block : request.block_size;
    const std::int64_t factor = block / request.block_size, num_blocks = request.rows[request.num_rows - 1] / block + 1;
    rank_blocks_seen_ |= std::uint64_t{1} << std::min<std::int64_t>(block, 63);
    out.ranked = std::max<std::int64_t>(1, std::min(request.rank_blocks, num_blocks) - shorten_);
    out.mass_order.assign(static_cast<std::size_t>(out.heads * out.rows * out.ranked), -1);
    std::vector<double> mass;
    for (std::int64_t h = 0; h < out.heads; ++h) {
      for (std::int64_t r = 0; r < out.rows; ++r) {
        const std::int64_t causal = request.rows[r] / block + 1;
        test::view_masses(out, h, r, request.rows[r], request.block_size, factor, mass);
        if (least_first_) {
          for (double& x : mass) x = -x;
        }
        rank_top(mass.data(), causal, std::min(out.ranked, causal),
                 &out.mass_order[static_cast<std::size_t>((h * out.rows + r) * out.ranked)]);
      }
    }
  }
  // StatsTile::group_max_order, shortened and reversed alike.
  void rank_by_group(const StatsRequest& request, StatsTile& out) const {
    if (request.group_rank_blocks <= 0) return;
    ++group_asked_;
    group_layers_ |= std::uint64_t{1} << std::min<std::int64_t>(std::max<std::int64_t>(request.layer, 0), 63);
    const std::int64_t block = request.group_rank_block > 0 ? request.group_rank_block : request.block_size;
    const std::int64_t factor = block / request.block_size, num_blocks = request.rows[request.num_rows - 1] / block + 1;
    out.group_ranked = std::max<std::int64_t>(1, std::min(request.group_rank_blocks, num_blocks) - shorten_);
    out.group_max_order.assign(static_cast<std::size_t>(out.rows * out.group_ranked), -1);
    std::vector<double> best;
    for (std::int64_t r = 0; r < out.rows; ++r) {
      test::view_group_max_probabilities(out, r, request.rows[r], request.block_size, factor, best);
      if (least_first_) {
        for (double& x : best) x = -x;
      }
      const auto causal = static_cast<std::int64_t>(best.size());
      rank_top(best.data(), causal, std::min(out.group_ranked, causal), &out.group_max_order[static_cast<std::size_t>(r * out.group_ranked)]);
    }
  }
  std::int64_t group_rankings_asked() const { return group_asked_; }
  // Bit l set: a group ranking was asked in layer l (l < 63).
  std::uint64_t group_layers() const { return group_layers_; }
  std::int64_t rankings_asked() const { return asked_; }
  // Bit b set: blocks of b keys were ranked (b < 63).
  std::uint64_t rank_blocks_seen() const { return rank_blocks_seen_; }

 private:
  std::int64_t shorten_;
  bool least_first_;
  mutable std::atomic<std::int64_t> asked_{0}, group_asked_{0};
  mutable std::atomic<std::uint64_t> group_layers_{0};
  mutable std::atomic<std::uint64_t> rank_blocks_seen_{0};
};

void require_identical(const Table& a, const Table& b, const std::string& what) {
  INFO(what);
  REQUIRE(a.dims == b.dims);
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    if (std::isnan(a.values[i]) && std::isnan(b.values[i])) continue;
    REQUIRE(a.values[i] == b.values[i]);
  }
}

// The report tables the rankings feed: per selector, every metric's head and model means, head quantiles and
// saturated rows; and the reuse matrix.
void require_same_report(const ReplayResult& expected, const ReplayResult& result) {
  REQUIRE(result.selectors.size() == expected.selectors.size());
  for (std::size_t s = 0; s < result.selectors.size(); ++s) {
    const SelectorResult& a = expected.selectors[s];
    const SelectorResult& b = result.selectors[s];
    for (int m = 0; m < kNumMetrics; ++m) {
      require_identical(a.head_mean[m], b.head_mean[m], a.label + " " + metric_name(m));
      require_identical(a.model_mean[m], b.model_mean[m], a.label + " model " + metric_name(m));
    }
    require_identical(a.head_recall_min, b.head_recall_min, a.label + " head min");
    require_identical(a.head_recall_p10, b.head_recall_p10, a.label + " head p10");
    require_identical(a.saturated_rows, b.saturated_rows, a.label + " saturated");
  }
  require_identical(expected.reuse, result.reuse, "reuse matrix");
}

// A 3-layer, 150-token capture with sinks for the backend-ranking tests, written to `name`; its path.
std::string write_ranking_capture(Shape::Values values, std::uint64_t seed, const char* name) {
  Shape shape;
  shape.values = values;
  shape.layers = 3;
  shape.seq_len = 150;
  shape.sinks = true;
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/" + name;
  write_capture(path, random_capture(shape, seed));
  return path;
}

// The options of the tests of a backend's rankings and views: blocks of 8, schedule FSS, four token budgets.
ReplayOptions backend_test_options(const char* selectors, std::int64_t reuse_budget) {
  ReplayOptions options = replay_options(selectors, tokens({8, 24, 56, 200}));
  options.block_size = 8;
  options.schedule = "FSS";
  options.reuse_budget = reuse_budget;
  return options;
}

}  // namespace

TEST_CASE("a backend's ranking of blocks by mass gives the report of the engine's own, also when it is short",
          "[replay][parity]") {
  // The ranked view is, per layer, the one of the smallest blocks a selector reads there: the statistics'
  // own blocks (8, quest's 16 beside them); or blocks of four statistics blocks (16) while quest (4) is
  // dense, then quest's.
  struct Config {
    const char* selectors;
    std::uint64_t ranked_blocks;  // bit b: blocks of b keys
  };
  for (const auto& [selectors, ranked_blocks] :
       {Config{"oracle,oracle:sinks=2,window=9,swa,hysparse:window=12,quest", std::uint64_t{1} << 8},
        Config{"oracle:block=16,oracle:block=16,sinks=2,window=9,swa:block=16,hysparse:block=16,window=12,quest:block=4",
               (std::uint64_t{1} << 16) | (std::uint64_t{1} << 4)}}) {
  for (const auto values : {Shape::Values::kGaussian, Shape::Values::kTies}) {
    const std::string path = write_ranking_capture(values, test::seed() + 51, "parity_backend_ranking.h5");
    const ReplayOptions options = backend_test_options(selectors, 0);
    const auto cpu = make_cpu_backend();
    const ReplayResult expected = run_replay(path, options, *cpu, false);
    for (const std::int64_t shorten : {0, 3}) {
      CAPTURE(selectors, static_cast<int>(values), shorten);
      const HostRankingBackend ranking(shorten);
      const ReplayResult result = run_replay(path, options, ranking, false);
      CHECK(ranking.rankings_asked() > 0);
      CHECK(ranking.rank_blocks_seen() == ranked_blocks);
      require_same_report(expected, result);
    }
    // The engine must take the backend's ranking, not rank again: the oracle's nested budgets take
    // the first blocks of it, so the least massive first gives it less recall at a budget below the row.
    const HostRankingBackend least_first(0, true);
    const ReplayResult wrong = run_replay(path, options, least_first, false);
    const Table& expected_recall = expected.selectors[0].head_mean[kMassRecall];
    const Table& wrong_recall = wrong.selectors[0].head_mean[kMassRecall];
    CHECK(wrong_recall.at(1, 1, 0) < expected_recall.at(1, 1, 0) - 0.05);
  }
  }
}

TEST_CASE("a backend's ranking of blocks by group max gives the report of the engine's own, also when it is short",
          "[replay][parity]") {
  // The reuse matrix and the selectors that rank by the largest probability over a KV group (hysparse in its
  // full layers, reuse with score=prob,group=max in its selection layers) share one ranking per tile; a backend
  // is asked, in the layers that read one, for the one of the smallest blocks. hysparse:block=16 beside the reuse
  // matrix's 8, or hysparse:block=8 beside the reuse selector's single tokens (its default block), is ranked by
  // the host; without the reuse matrix only the full layer 0 asks (schedule FSS).
  struct Config {
    const char* selectors;
    std::int64_t reuse_budget;
    bool hysparse_ranked;       // whether hysparse's view is the one the backend ranks
    std::uint64_t asked_layers; // bit l: layer l asks the backend
  };
  for (const auto& [selectors, reuse_budget, hysparse_ranked, asked_layers] :
       {Config{"oracle,hysparse:block=8,window=12", 24, true, 7}, Config{"oracle,hysparse:block=16,window=12", 24, false, 7},
        Config{"oracle,reuse:score=prob,group=max,layers=0,block=8,hysparse:block=8,sinks=2,window=12", 0, true, 1},
        Config{"oracle,reuse:score=prob,group=max,layers=0,hysparse:block=8,sinks=2,window=12", 0, false, 1},  // reuse's token blocks
        Config{"oracle,hysparse:block=16,window=12,hysparse:block=8,window=12", 0, true, 1}}) {
    for (const auto values : {Shape::Values::kGaussian, Shape::Values::kTies}) {
      const std::string path = write_ranking_capture(values, test::seed() + 53, "parity_backend_group_ranking.h5");
      const ReplayOptions options = backend_test_options(selectors, reuse_budget);
      const auto cpu = make_cpu_backend();
      const ReplayResult expected = run_replay(path, options, *cpu, false);
      for (const std::int64_t shorten : {0, 2}) {
        CAPTURE(selectors, static_cast<int>(values), shorten);
        const HostRankingBackend ranking(shorten);
        const ReplayResult result = run_replay(path, options, ranking, false);
        CHECK(ranking.group_rankings_asked() > 0);
        CHECK(ranking.group_layers() == asked_layers);
        require_same_report(expected, result);
      }
      if (values != Shape::Values::kGaussian) continue;
      CAPTURE(selectors);
      // The engine must take the backend's ranking: the least probable blocks first move hysparse's sparse
      // layers' recall (and the reuse matrix's).
      const HostRankingBackend least_first(0, true);
      const ReplayResult wrong = run_replay(path, options, least_first, false);
      const auto hysparse = static_cast<std::size_t>(expected.selectors.size() - 1);
      const Table& expected_recall = expected.selectors[hysparse].layer_mean[kMassRecall];
      const Table& wrong_recall = wrong.selectors[hysparse].layer_mean[kMassRecall];
      if (reuse_budget > 0) CHECK(std::abs(wrong.reuse.at(0, 0) - expected.reuse.at(0, 0)) > 0.01);
      if (hysparse_ranked) {
        CHECK(std::abs(wrong_recall.at(1, 1) - expected_recall.at(1, 1)) > 0.01);
      } else {
        CHECK(wrong_recall.at(1, 1) == expected_recall.at(1, 1));  // hysparse's view is the host's
      }
    }
  }
}

namespace {

// A backend that builds the block view asked beside the statistics (StatsRequest::view_block) as a device
// does: build_block_view's arrays (halved with `halve`, to show the engine reads them), the largest
// probabilities where asked or where it declines a ranking by group of the same blocks (it declines every
// ranking, like the CPU), and NaN statistics where the caller says it reads only the view.
class HostViewBackend final : public test::CpuBackedBackend {
 public:
  explicit HostViewBackend(bool halve = false) : halve_(halve) {}
  void block_statistics(const StatsRequest& request, StatsTile& out) const override {
    cpu().block_statistics(request, out);
    if (request.view_block <= 0) return;
    ++views_;
    const bool group_left = request.group_rank_blocks > 0 &&
                            (request.group_rank_block > 0 ? request.group_rank_block : request.block_size) == request.view_block;
    const bool with_max = request.view_max_prob || group_left;
    if (with_max) ++with_max_;
    BlockView view;
    std::vector<double> exps;
    build_block_view(out, request.block_size, request.view_block, request.rows, with_max, view, exps);
    if (halve_) {
      for (double& m : view.mass) m *= 0.5;
    }
    out.view_blocks = view.num_blocks;
    out.view_mass = view.mass;
    out.view_max_prob = view.max_prob;
    if (!request.statistics_needed) {
      ++without_statistics_;
      std::fill(out.block_max.begin(), out.block_max.end(), std::numeric_limits<float>::quiet_NaN());
      std::fill(out.block_sum.begin(), out.block_sum.end(), std::numeric_limits<float>::quiet_NaN());
    }
  }
  std::int64_t views() const { return views_; }
  std::int64_t with_max() const { return with_max_; }
  std::int64_t without_statistics() const { return without_statistics_; }

 private:
  bool halve_;
  mutable std::atomic<std::int64_t> views_{0}, with_max_{0}, without_statistics_{0};
};

}  // namespace

TEST_CASE("a backend's block view gives the report of the engine's own", "[replay][parity]") {
  // One view (its statistics stay with the backend), several views (the others built from the statistics; hysparse's
  // blocks are 64 by default), a view whose largest probabilities a selector reads, rankings by group that the
  // backend declines (their largest probabilities come with the view), token level.
  struct Config {
    const char* selectors;
    std::int64_t reuse_budget;
    bool one_view, with_max;
  };
  for (const auto& [selectors, reuse_budget, one_view, with_max] :
       {Config{"oracle,swa,hysparse:block=8", 24, true, true}, Config{"oracle,swa,hysparse", 24, false, true},
        Config{"oracle,oracle:sinks=2,window=9,swa,hysparse:block=8,window=12", 0, true, true},
        Config{"oracle,swa:sinks=3", 0, true, false}, Config{"oracle:block=16,swa,hysparse:block=8,window=12", 24, false, true},
        Config{"hysparse:score=max,group=sum,block=16,window=20,swa:block=16", 0, true, true},
        Config{"oracle:block=1,sinks=1,window=3,swa:block=1", 0, true, false}}) {
    for (const auto values : {Shape::Values::kGaussian, Shape::Values::kTies}) {
      CAPTURE(selectors, static_cast<int>(values));
      const std::string path = write_ranking_capture(values, test::seed() + 57, "parity_backend_view.h5");
      const ReplayOptions options = backend_test_options(selectors, reuse_budget);
      const auto cpu = make_cpu_backend();
      const ReplayResult expected = run_replay(path, options, *cpu, false);
      const HostViewBackend viewing;
      const ReplayResult result = run_replay(path, options, viewing, false);
      CHECK(viewing.views() > 0);
      CHECK((viewing.without_statistics() == viewing.views()) == one_view);
      CHECK((viewing.with_max() > 0) == with_max);
      require_same_report(expected, result);
      // The engine reads the backend's view, not one of its own.
      const HostViewBackend halving(true);
      const ReplayResult halved = run_replay(path, options, halving, false);
      CHECK(halved.selectors[0].model_mean[kMassRecall].at(0, 0) != expected.selectors[0].model_mean[kMassRecall].at(0, 0));
    }
  }
}

TEST_CASE("block views' masses and largest probabilities are the bits the device-ranking references compute", "[replay][parity]") {
  // test::view_masses and test::view_group_max_probabilities are what the GPU tests hold the device's rankings to;
  // the engine ranks build_block_view's values. They must be the same numbers, bit for bit, for the GPU tests
  // to mean the engine's order: random and tied logits, sinks, a row without its own full block, blocks of
  // one to three tile blocks.
  const auto cpu = make_cpu_backend();
  std::int64_t cells = 0;
  for (const auto values : {Shape::Values::kGaussian, Shape::Values::kTies, Shape::Values::kIdentical}) {
    Shape shape;
    shape.values = values;
    shape.layers = 1;
    shape.q_heads = 6;
    shape.kv_heads = 2;
    shape.seq_len = 203;
    shape.sinks = true;
    const Capture capture = random_capture(shape, test::seed() + 57);
    std::vector<std::int64_t> rows;
    for (std::int64_t t = 0; t < shape.seq_len; t += 7) rows.push_back(t);
    rows.push_back(shape.seq_len - 1);
    for (const std::int64_t base : {1, 4, 5}) {
      StatsTile tile;
      cpu->block_statistics(test::group_request(capture, 1, rows, base, false), tile);
      for (const std::int64_t factor : {1, 2, 3}) {
        CAPTURE(static_cast<int>(values), base, factor);
        BlockView view;
        std::vector<double> scratch, expected;
        build_block_view(tile, base, base * factor, rows.data(), true, view, scratch);
        for (std::int64_t r = 0; r < tile.rows; ++r) {
          const std::int64_t causal = view.causal_blocks(r);
          for (std::int64_t h = 0; h < tile.heads; ++h) {
            test::view_masses(tile, h, r, rows[static_cast<std::size_t>(r)], base, factor, expected);
            REQUIRE(static_cast<std::int64_t>(expected.size()) == causal);
            for (std::int64_t b = 0; b < causal; ++b) {
              CAPTURE(r, h, b);
              REQUIRE(view.mass[view.at(h, r, b)] == expected[static_cast<std::size_t>(b)]);
            }
          }
          test::view_group_max_probabilities(tile, r, rows[static_cast<std::size_t>(r)], base, factor, expected);
          REQUIRE(static_cast<std::int64_t>(expected.size()) == causal);
          for (std::int64_t b = 0; b < causal; ++b) {
            double best = 0.0;
            for (std::int64_t h = 0; h < tile.heads; ++h) best = std::max(best, view.max_prob[view.at(h, r, b)]);
            CAPTURE(r, b);
            REQUIRE(best == expected[static_cast<std::size_t>(b)]);
            ++cells;
          }
        }
      }
    }
  }
  CHECK(cells > 1000);
}
