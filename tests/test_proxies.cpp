// Proxy selectors: hand-computed cases, the properties of their math, and full replays against the
// float64 reference (tests/reference/naive_proxies).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "replay_test_support.hpp"
#include "common/error.hpp"
#include "common/random.hpp"
#include "kv/footprint.hpp"
#include "reference/naive_proxies.hpp"
#include "reference/random_capture.hpp"
#include "reference/token_score_requests.hpp"
#include "replay/engine.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

using namespace hysparse;
using hysparse::test::replay_capture;
using hysparse::test::replay_options;
using hysparse::test::sparsities;
using hysparse::test::tokens;
namespace ref = hysparse::reference;

namespace {

constexpr double kMassTolerance = 1e-6;
constexpr double kRatioTolerance = 1e-5;
constexpr double kOutputTolerance = 2e-5;
// Rows whose threshold decision (top-p) lies closer than this to the threshold are not compared exactly
// (both sides decide on float64 probabilities, summed in different orders).
constexpr double kThresholdMargin = 1e-12;





double nearest_rank(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const auto rank = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(q * static_cast<double>(v.size()))));
  return v[static_cast<std::size_t>(rank - 1)];
}

double mean_skip_nan(const std::vector<double>& v) {
  double sum = 0;
  std::int64_t n = 0;
  for (double x : v) {
    if (!std::isnan(x)) {
      sum += x;
      ++n;
    }
  }
  return n ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
}

// Compares one selector of a replay with the reference proxy, for every budget, layer and head.
// Returns the number of (budget, layer, head) cells compared.
std::int64_t compare_proxy(const ReplayResult& result, std::size_t index, const Capture& capture, const ref::RefProxy& proxy,
                           std::uint64_t seed = 0) {
  const SelectorResult& s = result.selectors[index];
  INFO("selector " << s.spec);
  const auto L = capture.header.num_layers, H = capture.header.num_q_heads;
  std::int64_t compared = 0, skipped = 0;
  for (std::size_t bi = 0; bi < result.budgets.size(); ++bi) {
    INFO("budget " << result.budgets[bi].label());
    const Budget& budget = result.budgets[bi];
    const auto ub = static_cast<std::uint64_t>(bi);
    if (budget.kind == Budget::Kind::kTokens && budget.value < static_cast<double>(proxy.block) &&
        s.budget_use != BudgetUse::kFree) {
      for (std::int64_t l = 0; l < L; ++l) CHECK(std::isnan(s.layer_mean[kMassRecall].at(ub, static_cast<std::uint64_t>(l))));
      continue;
    }
    const auto rows = ref::naive_proxy_metrics(capture, proxy, {budget.kind == Budget::Kind::kSparsity, budget.value},
                                               result.rows, seed);
    for (std::int64_t l = 0; l < L; ++l) {
      INFO("layer " << l);
      double saturated = 0;
      bool full = false;
      for (std::int64_t h = 0; h < H; ++h) {
        INFO("head " << h);
        std::vector<double> recall, ratio, overlap, attended, error;
        bool ambiguous = false;
        for (const auto& m : rows[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)]) {
          if (!m.scored) continue;
          ambiguous = ambiguous || m.threshold_margin < kThresholdMargin;
          recall.push_back(m.mass_recall);
          ratio.push_back(m.oracle_recall > 0 ? m.mass_recall / m.oracle_recall : std::numeric_limits<double>::quiet_NaN());
          overlap.push_back(m.topk_overlap);
          attended.push_back(m.attended);
          error.push_back(m.output_rel_error);
          saturated += m.saturated && !m.full_layer ? 1 : 0;
          full = m.full_layer;
        }
        const auto ul = static_cast<std::uint64_t>(l), uh = static_cast<std::uint64_t>(h);
        if (recall.empty()) {
          CHECK(std::isnan(s.head_mean[kMassRecall].at(ub, ul, uh)));
          continue;
        }
        if (ambiguous) {
          ++skipped;
          continue;
        }
        ++compared;
        CHECK(s.head_mean[kMassRecall].at(ub, ul, uh) == Approx(mean_skip_nan(recall)).margin(kMassTolerance));
        CHECK(s.head_recall_min.at(ub, ul, uh) == Approx(*std::min_element(recall.begin(), recall.end())).margin(kMassTolerance));
        CHECK(s.head_recall_p10.at(ub, ul, uh) == Approx(nearest_rank(recall, 0.10)).margin(kMassTolerance));
        CHECK(s.head_recall_p50.at(ub, ul, uh) == Approx(nearest_rank(recall, 0.50)).margin(kMassTolerance));
        const double engine_ratio = s.head_mean[kRecallVsOracle].at(ub, ul, uh), reference_ratio = mean_skip_nan(ratio);
        if (std::isnan(reference_ratio)) {
          CHECK(std::isnan(engine_ratio));
        } else {
          CHECK(engine_ratio == Approx(reference_ratio).margin(kRatioTolerance));
        }
        CHECK(s.head_mean[kTopkOverlap].at(ub, ul, uh) == Approx(mean_skip_nan(overlap)).margin(kRatioTolerance));
        CHECK(s.head_mean[kAttendedKeys].at(ub, ul, uh) == Approx(mean_skip_nan(attended)).margin(1e-9));
        const double reference_error = mean_skip_nan(error), engine_error = s.head_mean[kOutputError].at(ub, ul, uh);
        if (result.has_output_error && !std::isnan(reference_error)) {
          CHECK(engine_error == Approx(reference_error).margin(kOutputTolerance));
        } else {
          CHECK(std::isnan(engine_error));
        }
      }
      CHECK(s.is_full_layer[static_cast<std::size_t>(l)] == (full ? 1 : 0));
      const double engine_saturated = s.saturated_rows.at(bi, static_cast<std::uint64_t>(l));
      if (skipped == 0) CHECK(engine_saturated == Approx(full ? 0.0 : saturated));
    }
  }
  // Ambiguous cells are rare: most of them must be compared exactly.
  CHECK(skipped <= compared / 10);
  return compared;
}

ref::RefProxy make_ref(const std::string& kind, std::int64_t block) {
  ref::RefProxy p;
  p.kind = kind;
  p.block = block;
  return p;
}

}  // namespace

// ------------------------------------------------------------------------------------------ quest

TEST_CASE("quest: a hand-computed page bound and page choice", "[proxies]") {
  // q = (1, -2); page keys (1, 3), (-1, 0): max = (1, 3), min = (-1, 0).
  // bound = max(1*1, 1*-1) + max(-2*3, -2*0) = 1 + 0 = 1 >= q.k = (1 - 6, -1 + 0) = (-5, -1).
  const float q[2] = {1.0f, -2.0f};
  const double lo[2] = {-1.0, 0.0}, hi[2] = {1.0, 3.0};
  CHECK(proxy::quest_bound(q, lo, hi, 2) == 1.0);
  CHECK(ref::naive_quest_bound({1, -2}, {{1, 3}, {-1, 0}}) == 1.0);

  // One head, d = 2, pages of 2 over 8 keys; the last query t = 7 sits in page 3 (forced first).
  // Page bounds for q = (1, 0): page 0 keys x = (0, 0.5) -> 0.5; page 1 x = (2, -3) -> 2; page 2 x = (1, 1) -> 1.
  // A budget of 4 tokens = 2 pages: page 3 and page 1 (bound 2).
  Capture c;
  c.header.model = "hand";
  c.header.source = "tests";
  c.header.num_layers = 1;
  c.header.num_q_heads = 1;
  c.header.num_kv_heads = 1;
  c.header.head_dim = 2;
  c.header.seq_len = 8;
  LayerTensors t;
  const float xs[8] = {0.0f, 0.5f, 2.0f, -3.0f, 1.0f, 1.0f, 0.0f, 0.0f};
  for (int j = 0; j < 8; ++j) {
    t.q.push_back(1.0f);
    t.q.push_back(0.0f);
    t.k.push_back(xs[j]);
    t.k.push_back(static_cast<float>(j) * 0.1f);
  }
  c.layers.push_back(t);
  ReplayOptions o = replay_options("quest:block=2,dense=0", tokens({4}));
  o.queries = "last:1";
  const ReplayResult r = replay_capture(c, "proxies_quest_hand", o);
  const std::vector<double> p = ref::naive_probabilities(c, 0, 0, 7);
  const double expected = p[2] + p[3] + p[6] + p[7];
  CHECK(r.selectors[0].head_mean[kMassRecall].at(0, 0, 0) == Approx(expected).margin(1e-7));
  CHECK(r.selectors[0].head_mean[kAttendedKeys].at(0, 0, 0) == 4.0);
}

TEST_CASE("quest: the page bound is at least the true maximum logit of every page", "[proxies][properties]") {
  Rng rng(test::seed() + 101);
  for (int trial = 0; trial < 200; ++trial) {
    const std::int64_t d = 1 + static_cast<std::int64_t>(rng.below(32)), n = 1 + static_cast<std::int64_t>(rng.below(20));
    std::vector<float> q(static_cast<std::size_t>(d)), keys(static_cast<std::size_t>(n * d));
    for (auto& x : q) x = static_cast<float>(3.0 * rng.normal());
    for (auto& x : keys) x = static_cast<float>(rng.normal());
    std::vector<double> lo(static_cast<std::size_t>(d)), hi(static_cast<std::size_t>(d));
    proxy::channel_bounds(keys.data(), n, d, lo.data(), hi.data());
    const double bound = proxy::quest_bound(q.data(), lo.data(), hi.data(), d);
    for (std::int64_t j = 0; j < n; ++j) CHECK(bound >= proxy::dot(q.data(), &keys[static_cast<std::size_t>(j * d)], d) - 1e-12);
  }
}

TEST_CASE("proxy::dots sums every key as proxy::dot does, bit for bit", "[proxies][properties]") {
  // The batched form only interleaves independent sums; any change of a sum's order would move
  // logits by ulps and could flip near ties between the proxies' rankings and their reference.
  Rng rng(test::seed() + 105);
  for (int trial = 0; trial < 300; ++trial) {
    const std::int64_t d = 1 + static_cast<std::int64_t>(rng.below(260)), n = static_cast<std::int64_t>(rng.below(40));
    std::vector<float> q(static_cast<std::size_t>(d)), keys(static_cast<std::size_t>(n * d));
    std::vector<double> wide(keys.size());
    for (auto& x : q) x = static_cast<float>(4.0 * rng.normal());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      keys[i] = static_cast<float>(rng.normal());
      wide[i] = rng.normal() / 3.0;
    }
    // Keys taken out of order, as H2O's cache takes them.
    std::vector<std::int64_t> pick(static_cast<std::size_t>(n));
    for (auto& j : pick) j = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(n)));
    std::vector<double> batched(static_cast<std::size_t>(n)), batched_wide(static_cast<std::size_t>(n));
    proxy::dots(q.data(), d, n, [&](std::int64_t i) { return &keys[static_cast<std::size_t>(pick[static_cast<std::size_t>(i)] * d)]; },
                batched.data());
    proxy::dots(q.data(), d, n, [&](std::int64_t i) { return &wide[static_cast<std::size_t>(i * d)]; }, batched_wide.data());
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t j = pick[static_cast<std::size_t>(i)];
      INFO("trial " << trial << ": d " << d << ", n " << n << ", key " << i);
      REQUIRE(batched[static_cast<std::size_t>(i)] == proxy::dot(q.data(), &keys[static_cast<std::size_t>(j * d)], d));
      REQUIRE(batched_wide[static_cast<std::size_t>(i)] == proxy::dot(q.data(), &wide[static_cast<std::size_t>(i * d)], d));
    }
  }
}

TEST_CASE("rank_top is the naive sort's prefix: higher score first, ties to the lower index", "[proxies][properties]") {
  // Every selector ranks through rank_top, which compares pairs on short rows and radix-sorts keys on
  // long ones: both must give the order of a plain sort by (score descending, index ascending), on
  // rows of ties, near ties, signed zeros, infinities, subnormals and negative scores, at every cut.
  Rng rng(test::seed() + 106);
  const double inf = std::numeric_limits<double>::infinity();
  const double specials[] = {0.0, -0.0, inf, -inf, 1.0, -1.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e300, -1e300, 0.5};
  for (int trial = 0; trial < 400; ++trial) {
    const std::int64_t sizes[] = {1, 2, 7, 127, 128, 129, 300, 1000, 5000};
    const std::int64_t num = trial < 360 ? sizes[trial % 9] : 1 + static_cast<std::int64_t>(rng.below(20000));
    // 0 distinct, 1 few distinct values, 2 specials, 3 one value, 4 values that differ in their last bits only
    const int kind = trial % 5;
    std::vector<double> scores(static_cast<std::size_t>(num));
    for (auto& x : scores) {
      if (kind == 0) x = rng.normal();
      if (kind == 1) x = static_cast<double>(rng.below(5)) * 0.25 - 0.5;
      if (kind == 2) x = specials[rng.below(sizeof specials / sizeof specials[0])];
      if (kind == 3) x = 0.125;
      if (kind == 4) x = 1.0 + std::ldexp(static_cast<double>(rng.below(6)), -50);
    }
    std::vector<std::int32_t> naive(static_cast<std::size_t>(num));
    std::iota(naive.begin(), naive.end(), 0);
    std::sort(naive.begin(), naive.end(), [&](std::int32_t a, std::int32_t b) {
      const double x = scores[static_cast<std::size_t>(a)], y = scores[static_cast<std::size_t>(b)];
      return x > y || (x == y && a < b);
    });
    const std::int64_t cuts[] = {0, 1, 2, num / 3, num - 1, num, num + 5, static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(num) + 1))};
    for (const std::int64_t count : cuts) {
      const std::int64_t n = std::max<std::int64_t>(0, std::min(count, num));
      std::vector<std::int32_t> ranked(static_cast<std::size_t>(n) + 1, -7);
      rank_top(scores.data(), num, count, ranked.data());
      INFO("trial " << trial << ": " << num << " scores of kind " << kind << ", count " << count);
      for (std::int64_t i = 0; i < n; ++i) REQUIRE(ranked[static_cast<std::size_t>(i)] == naive[static_cast<std::size_t>(i)]);
      REQUIRE(ranked[static_cast<std::size_t>(n)] == -7);  // nothing written past the count
    }
  }
}

// ------------------------------------------------------------------------------------------ moba

TEST_CASE("moba: scores are q . mean(K_block), the current block first", "[proxies]") {
  // d = 1, blocks of 2: keys 1, 3 | -2, 0 | 5 ; query t = 4 (block 2, forced first), q = 1.
  // Means: block 0 = 2, block 1 = -1 -> ranking 2, 0, 1. A budget of 4 tokens = 2 blocks: keys 0, 1, 4.
  Capture c;
  c.header.model = "hand";
  c.header.source = "tests";
  c.header.num_layers = 1;
  c.header.num_q_heads = 1;
  c.header.num_kv_heads = 1;
  c.header.head_dim = 1;
  c.header.seq_len = 5;
  LayerTensors t;
  t.q.assign(5, 1.0f);
  t.k = {1.0f, 3.0f, -2.0f, 0.0f, 5.0f};
  c.layers.push_back(t);
  ReplayOptions o = replay_options("moba:block=2", tokens({4}));
  o.queries = "last:1";
  const ReplayResult r = replay_capture(c, "proxies_moba_hand", o);
  const std::vector<double> p = ref::naive_probabilities(c, 0, 0, 4);
  CHECK(r.selectors[0].head_mean[kMassRecall].at(0, 0, 0) == Approx(p[0] + p[1] + p[4]).margin(1e-7));
  CHECK(r.selectors[0].head_mean[kAttendedKeys].at(0, 0, 0) == 3.0);
}

TEST_CASE("moba with block 1 (current block not forced) equals the token-level oracle", "[proxies][properties]") {
  ref::Shape shape;
  shape.seq_len = 60;
  const Capture capture = ref::random_capture(shape, test::seed() + 102);
  const ReplayResult r = replay_capture(capture, "proxies_moba_oracle", replay_options("oracle:block=1,moba:block=1,current=0", tokens({1, 4, 16, 64})));
  for (std::uint64_t b = 0; b < 4; ++b) {
    for (std::uint64_t l = 0; l < 2; ++l) {
      for (std::uint64_t h = 0; h < 4; ++h) {
        CHECK(r.selectors[1].head_mean[kMassRecall].at(b, l, h) == Approx(r.selectors[0].head_mean[kMassRecall].at(b, l, h)).margin(1e-6));
        CHECK(r.selectors[1].head_recall_min.at(b, l, h) == Approx(r.selectors[0].head_recall_min.at(b, l, h)).margin(1e-6));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ reuse

TEST_CASE("reuse from a layer to itself equals the oracle", "[proxies][properties]") {
  ref::Shape shape;
  shape.layers = 3;
  shape.seq_len = 50;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 103);
  // Every layer a selection layer attending its own exact top-k: the per-head (group none) selection is
  // the oracle's, and with group sum the shared oracle's.
  const ReplayResult r = replay_capture(capture, "proxies_reuse_self",
                                replay_options("oracle:block=1,reuse:layers=0+1+2,anchor=topk,group=none,"
                                            "oracle:block=4,group=sum,reuse:layers=0+1+2,anchor=topk,block=4",
                                            tokens({4, 8, 20})));
  for (std::uint64_t b = 0; b < 3; ++b) {
    for (std::uint64_t l = 0; l < 3; ++l) {
      for (std::uint64_t h = 0; h < 4; ++h) {
        CHECK(r.selectors[1].head_mean[kMassRecall].at(b, l, h) == Approx(r.selectors[0].head_mean[kMassRecall].at(b, l, h)).margin(1e-9));
        CHECK(r.selectors[3].head_mean[kMassRecall].at(b, l, h) == Approx(r.selectors[2].head_mean[kMassRecall].at(b, l, h)).margin(1e-9));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ oracle_topp

TEST_CASE("oracle_topp: every row reaches p with the fewest keys, whatever the budget", "[proxies][properties]") {
  ref::Shape shape;
  shape.seq_len = 80;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 104);
  const ReplayResult r = replay_capture(capture, "proxies_topp", replay_options("oracle_topp:p=0.8,oracle_topp:p=0.95,sinks=2", tokens({8, 32})));
  for (const auto& s : r.selectors) {
    INFO(s.spec);
    CHECK(s.budget_use == BudgetUse::kFree);
    const double p = s.spec.find("p=0.8") != std::string::npos ? 0.8 : 0.95;
    for (std::uint64_t l = 0; l < 2; ++l) {
      CHECK(s.layer_recall_min.at(0, l) >= p - 1e-6);
      // The same set at every budget, and it is the equal-size oracle.
      CHECK(s.layer_mean[kAttendedKeys].at(0, l) == s.layer_mean[kAttendedKeys].at(1, l));
      CHECK(s.layer_mean[kRecallVsOracle].at(0, l) == Approx(1.0).margin(1e-6));
    }
  }
  CHECK(r.selectors[1].model_mean[kAttendedKeys].values[0] > r.selectors[0].model_mean[kAttendedKeys].values[0]);
}

// ------------------------------------------------------------------------------------------ parity

TEST_CASE("proxies match the float64 reference in full replays: quest, moba, reuse, oracle_topp",
          "[proxies][parity]") {
  SECTION("GQA, token budgets, no sinks") {
    ref::Shape shape;
    shape.layers = 3;
    shape.seq_len = 90;
    shape.layer_correlation = 0.7;
    const Capture capture = ref::random_capture(shape, test::seed() + 111);
    ReplayOptions o = replay_options(
        "quest:block=4,dense=1,quest:block=8,dense=0,moba:block=8,moba:block=4,current=0,"
        "reuse:layers=0+2,reuse:layers=1,block=4,group=max,score=prob,sinks=2,window=3,reuse:layers=0,group=none,anchor=topk,"
        "oracle_topp,oracle_topp:p=0.5,block=4,sinks=1,window=2",
        tokens({4, 16, 40}));
    const ReplayResult r = replay_capture(capture, "proxies_parity_a", o);
    ref::RefProxy q1 = make_ref("quest", 4), q2 = make_ref("quest", 8), m1 = make_ref("moba", 8), m2 = make_ref("moba", 4);
    q1.dense = 1;
    m2.current = false;
    ref::RefProxy u1 = make_ref("reuse", 1), u2 = make_ref("reuse", 4), u3 = make_ref("reuse", 1);
    u1.layers = {0, 2};
    u2.layers = {1};
    u2.group = "max";
    u2.score = "prob";
    u2.sinks = 2;
    u2.window = 3;
    u3.layers = {0};
    u3.group = "none";
    u3.anchor = "topk";
    ref::RefProxy t1 = make_ref("oracle_topp", 1), t2 = make_ref("oracle_topp", 4);
    t2.p = 0.5;
    t2.sinks = 1;
    t2.window = 2;
    const ref::RefProxy expected[] = {q1, q2, m1, m2, u1, u2, u3, t1, t2};
    REQUIRE(r.selectors.size() == 9);
    for (std::size_t i = 0; i < 9; ++i) CHECK(compare_proxy(r, i, capture, expected[i]) > 0);
  }
  SECTION("MHA and MQA, sparsity budgets, sink logits") {
    for (const auto& [q_heads, kv_heads] : {std::pair<std::int64_t, std::int64_t>{3, 3}, {4, 1}}) {
      CAPTURE(q_heads, kv_heads);
      ref::Shape shape;
      shape.q_heads = q_heads;
      shape.kv_heads = kv_heads;
      shape.seq_len = 57;
      shape.sinks = true;
      const Capture capture = ref::random_capture(shape, test::seed() + 112 + static_cast<std::uint64_t>(q_heads));
      ReplayOptions o = replay_options("quest:block=4,dense=0,moba:block=4,reuse:layers=0,group=sum,block=2,oracle_topp:p=0.7",
                                    sparsities({0.9, 0.6, 0.2}));
      o.queries = "stride:4";
      const ReplayResult r = replay_capture(capture, "proxies_parity_b_" + std::to_string(q_heads), o);
      ref::RefProxy q = make_ref("quest", 4), u = make_ref("reuse", 2), t = make_ref("oracle_topp", 1);
      u.layers = {0};
      t.p = 0.7;
      compare_proxy(r, 0, capture, q);
      compare_proxy(r, 1, capture, make_ref("moba", 4));
      compare_proxy(r, 2, capture, u);
      compare_proxy(r, 3, capture, t);
    }
  }
  SECTION("ties: integer-valued q and k") {
    ref::Shape shape;
    shape.values = ref::Shape::Values::kTies;
    shape.seq_len = 40;
    shape.logit_scale = 1.0;
    const Capture capture = ref::random_capture(shape, test::seed() + 113);
    const ReplayResult r = replay_capture(capture, "proxies_parity_ties", replay_options("quest:block=4,dense=0,moba:block=4", tokens({4, 12})));
    compare_proxy(r, 0, capture, make_ref("quest", 4));
    compare_proxy(r, 1, capture, make_ref("moba", 4));
  }
}

TEST_CASE("budgets below a selector's block are NaN, not an error; dense attn layers need q/k", "[proxies]") {
  ref::Shape shape;
  shape.seq_len = 40;
  shape.dense_layers = {1};
  const Capture capture = ref::random_capture(shape, test::seed() + 114);
  ReplayOptions o = replay_options("oracle:block=1,moba:block=16", tokens({8, 32}));
  o.queries = "last:5";
  CHECK_THROWS_AS(replay_capture(capture, "proxies_dense_moba", o), Error);
  o.selectors = parse_selector_list("oracle:block=1,oracle:block=16,reuse:layers=0,block=16");
  const ReplayResult r = replay_capture(capture, "proxies_below_block", o);
  CHECK(std::isnan(r.selectors[1].model_mean[kMassRecall].values[0]));
  CHECK(!std::isnan(r.selectors[1].model_mean[kMassRecall].values[1]));
  CHECK(std::isnan(r.selectors[2].model_mean[kMassRecall].values[0]));
  // Selectors that need only probabilities also run on dense attn layers.
  o.selectors = parse_selector_list("oracle_topp,snapkv:observe=4,h2o,duo:sinks=1,recent=2");
  const ReplayResult dense = replay_capture(capture, "proxies_dense_ok", o);
  for (const auto& s : dense.selectors) {
    INFO(s.spec);
    CHECK(s.layer_mean[kMassRecall].at(1, 1) > 0.0);
    CHECK(s.layer_mean[kMassRecall].at(1, 1) <= 1.0 + 1e-9);
  }
}

// ------------------------------------------------------------------------------------------ step 2

namespace {

// Calls a selector directly on every position of one layer (a harness for set-level properties).
struct Harness {
  Capture capture;
  std::vector<std::int64_t> rows;
  std::vector<Budget> budgets;
  std::unique_ptr<Selector> selector;
  ReplayPlan plan;
  LayerContext layer;

  Harness(Capture c, const std::string& spec, std::vector<Budget> b, std::vector<std::int64_t> r = {})
      : capture(std::move(c)), rows(std::move(r)), budgets(std::move(b)) {
    if (rows.empty()) {
      for (std::int64_t t = 0; t < capture.header.seq_len; ++t) rows.push_back(t);
    }
    selector = make_selector(parse_selector_list(spec).front(), SelectorDefaults{});
    plan.header = &capture.header;
    plan.rows = rows;
    plan.budgets = budgets;
    plan.seed = test::seed();
    selector->begin(plan);
  }
  void prepare(std::int64_t l) {
    layer.layer = l;
    layer.header = &capture.header;
    layer.tensors = &capture.layers[static_cast<std::size_t>(l)];
    layer.has_qk = !layer.tensors->q.empty();
    layer.has_v = !layer.tensors->v.empty();
    layer.rows = &rows;
    layer.scale = capture.header.effective_softmax_scale();
    selector->prepare_layer(layer);
  }
  // The attended keys (the ranking's blocks, token level) of every row, for one KV group and budget.
  std::vector<std::vector<std::vector<std::int32_t>>> sets(std::int64_t l, std::int64_t g, std::int64_t budget_index) {
    const std::int64_t G = capture.header.group_size(), R = static_cast<std::int64_t>(rows.size());
    BlockView view;
    view.block = selector->block_size();
    view.heads = G;
    view.rows = R;
    view.positions = rows.data();
    view.num_blocks = rows.back() / view.block + 1;
    view.mass.assign(static_cast<std::size_t>(G * R * view.num_blocks), 0.0);
    view.max_prob = view.mass;
    std::vector<std::int64_t> length(static_cast<std::size_t>(R));
    for (std::int64_t r = 0; r < R; ++r) length[static_cast<std::size_t>(r)] = view.causal_blocks(r);
    RankContext c;
    c.layer = l;
    c.kv_group = g;
    c.group_size = G;
    c.rows = R;
    c.positions = rows.data();
    c.view = &view;
    c.ranking_length = length.data();
    c.residual_mass = &view.mass;
    c.layer_context = &layer;
    c.budget_index = budget_index;
    c.budget = &budgets[static_cast<std::size_t>(budget_index)];
    Rankings out;
    selector->rank(c, out);
    std::vector<std::vector<std::vector<std::int32_t>>> result(static_cast<std::size_t>(out.sets));
    for (std::int64_t s = 0; s < out.sets; ++s) {
      for (std::int64_t r = 0; r < R; ++r) {
        std::vector<std::int32_t> keys(out.row(s, r), out.row(s, r) + out.size(s, r));
        std::sort(keys.begin(), keys.end());
        result[static_cast<std::size_t>(s)].push_back(keys);
      }
    }
    return result;
  }
};

Capture one_head_capture(std::vector<float> q, std::vector<float> k, std::int64_t d) {
  Capture c;
  c.header.model = "hand";
  c.header.source = "tests";
  c.header.num_layers = 1;
  c.header.num_q_heads = 1;
  c.header.num_kv_heads = 1;
  c.header.head_dim = d;
  c.header.seq_len = static_cast<std::int64_t>(k.size()) / d;
  LayerTensors t;
  t.q = std::move(q);
  t.k = std::move(k);
  c.layers.push_back(t);
  return c;
}

}  // namespace

TEST_CASE("snapkv pooling and h2o's accumulation, by hand", "[proxies]") {
  CHECK(proxy::pool1d({0, 5, 1, 0, 0, 3, 0}, 3, true) == std::vector<double>{5, 5, 5, 1, 3, 3, 3});
  const auto avg = proxy::pool1d({0, 3, 3, 0}, 3, false);
  CHECK(avg[0] == Approx(1.0));
  CHECK(avg[1] == Approx(2.0));
  CHECK(avg[3] == Approx(1.0));

  // H2O with a cache of 2 keys, half recent (the current key): key 0 holds all of step 0's attention,
  // so its accumulated score (>= 1) beats every later key's (< 1), and it is never evicted. Row 3
  // attends {0, 3}; keys 1 and 2 went at steps 2 and 3.
  Harness h(one_head_capture({1, 1, 1, 1}, {0.5f, 2.0f, 3.0f, -1.0f}, 1), "h2o:recent=50", tokens({2}));
  h.prepare(0);
  const auto sets = h.sets(0, 0, 0)[0];
  CHECK(sets[0] == std::vector<std::int32_t>{0});
  CHECK(sets[1] == std::vector<std::int32_t>{0, 1});
  CHECK(sets[2] == std::vector<std::int32_t>{0, 2});
  CHECK(sets[3] == std::vector<std::int32_t>{0, 3});
}

TEST_CASE("eviction never brings a key back (h2o, snapkv)", "[proxies][properties]") {
  ref::Shape shape;
  shape.seq_len = 70;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 121);
  for (const std::string spec : {"h2o", "h2o:recent=20,group=none", "snapkv:observe=8,kernel=3"}) {
    CAPTURE(spec);
    std::vector<Budget> budgets = tokens({6, 20});
    budgets.push_back({Budget::Kind::kSparsity, 0.7});
    Harness h(capture, spec, budgets);
    h.prepare(1);
    for (std::int64_t bi = 0; bi < 3; ++bi) {
      for (std::int64_t g = 0; g < 2; ++g) {
        for (const auto& rows : h.sets(1, g, bi)) {
          std::int64_t evicted_once = 0;
          for (std::size_t r = 1; r < rows.size(); ++r) {
            const auto t = static_cast<std::int32_t>(h.rows[r]);
            for (std::int32_t j : rows[r]) {
              const bool was_there = std::binary_search(rows[r - 1].begin(), rows[r - 1].end(), j);
              // A key attended now was attended at the previous step, or is new (the current key; for
              // snapkv also every key of the prompt at its first scored row).
              if (!was_there && !rows[r - 1].empty()) CHECK(j == t);
            }
            for (std::int32_t j : rows[r - 1]) evicted_once += std::binary_search(rows[r].begin(), rows[r].end(), j) ? 0 : 1;
          }
          if (spec.rfind("h2o", 0) == 0 && bi == 0) CHECK(evicted_once > 0);
          // The cache never exceeds the budget (h2o).
          if (spec.rfind("h2o", 0) == 0 && bi < 2) {
            for (const auto& keys : rows) CHECK(static_cast<double>(keys.size()) <= budgets[static_cast<std::size_t>(bi)].value);
          }
        }
      }
    }
  }
}

TEST_CASE("proxies match the float64 reference in full replays: nsa, infllm, snapkv, h2o", "[proxies][parity]") {
  SECTION("GQA, token budgets") {
    ref::Shape shape;
    shape.layers = 2;
    shape.seq_len = 96;
    const Capture capture = ref::random_capture(shape, test::seed() + 131);
    ReplayOptions o = replay_options(
        "nsa:block=8,cmp=4,stride=2,window=6,nsa:block=8,cmp=8,stride=4,window=0,initial=2,local=1,sinks=2,"
        "infllm:block=8,sinks=3,window=12,repr=2,infllm:block=4,sinks=0,window=0,repr=1,"
        "snapkv:observe=8,kernel=3,snapkv:observe=4,kernel=5,pool=avg,group=sum,prompt=60,"
        "h2o,h2o:recent=25,group=none",
        tokens({8, 24, 48}));
    o.queries = "last:40";
    const ReplayResult r = replay_capture(capture, "proxies_parity_c", o);
    ref::RefProxy n1 = make_ref("nsa", 8), n2 = make_ref("nsa", 8);
    n1.cmp = 4, n1.stride = 2, n1.window = 6;
    n2.cmp = 8, n2.stride = 4, n2.window = 0, n2.initial = 2, n2.local = 1, n2.sinks = 2;
    ref::RefProxy f1 = make_ref("infllm", 8), f2 = make_ref("infllm", 4);
    f1.sinks = 3, f1.window = 12, f1.repr = 2;
    f2.sinks = 0, f2.window = 0, f2.repr = 1;
    ref::RefProxy s1 = make_ref("snapkv", 1), s2 = make_ref("snapkv", 1);
    s1.observe = 8, s1.kernel = 3, s1.group = "none";
    s2.observe = 4, s2.kernel = 5, s2.pool = "avg", s2.group = "sum", s2.prompt = 60;
    ref::RefProxy e1 = make_ref("h2o", 1), e2 = make_ref("h2o", 1);
    e1.group = "sum";
    e2.recent = 25, e2.group = "none";
    const ref::RefProxy expected[] = {n1, n2, f1, f2, s1, s2, e1, e2};
    REQUIRE(r.selectors.size() == 8);
    for (std::size_t i = 0; i < 8; ++i) CHECK(compare_proxy(r, i, capture, expected[i]) > 0);
    // SnapKV is scored after the prompt only.
    CHECK(r.selectors[4].first_scored == 56);
    CHECK(r.selectors[5].first_scored == 60);
  }
  SECTION("MQA with sink logits, sparsity budgets, every row") {
    ref::Shape shape;
    shape.q_heads = 4;
    shape.kv_heads = 1;
    shape.seq_len = 48;
    shape.sinks = true;
    const Capture capture = ref::random_capture(shape, test::seed() + 132);
    ReplayOptions o = replay_options("nsa:block=4,cmp=4,stride=2,window=3,infllm:block=4,sinks=1,window=6,snapkv:observe=6,h2o:recent=50",
                                  sparsities({0.8, 0.5}));
    const ReplayResult r = replay_capture(capture, "proxies_parity_d", o);
    ref::RefProxy n = make_ref("nsa", 4), f = make_ref("infllm", 4), s = make_ref("snapkv", 1), e = make_ref("h2o", 1);
    n.cmp = 4, n.stride = 2, n.window = 3;
    f.sinks = 1, f.window = 6;
    s.observe = 6, s.group = "none";
    e.group = "sum";
    compare_proxy(r, 0, capture, n);
    compare_proxy(r, 1, capture, f);
    compare_proxy(r, 2, capture, s);
    compare_proxy(r, 3, capture, e);
    CHECK(r.selectors[2].first_scored == 24);  // every position queried: the prompt is the first half
  }
}

// ------------------------------------------------------------------------------------------ step 3

TEST_CASE("magicpig's sampling probability, channel choice and PCA, by hand", "[proxies]") {
  // u = 1 - theta/pi; p = 1 - (1 - u^K)^L - L u^K (1 - u^K)^(L-1).
  CHECK(proxy::simhash_sample_probability(1.0, 10, 150) == Approx(1.0));
  CHECK(proxy::simhash_sample_probability(-1.0, 10, 150) == Approx(0.0).margin(1e-300));
  CHECK(proxy::simhash_sample_probability(0.0, 1, 2) == Approx(0.25));  // both tables agree on one bit: 0.5^2
  CHECK(proxy::simhash_sample_probability(0.0, 1, 3) == Approx(0.5));   // 1 - 1/8 - 3/8
  double previous = 0.0;
  for (double c = -1.0; c <= 1.0; c += 0.05) {
    const double p = proxy::simhash_sample_probability(c, 4, 20);
    CHECK(p >= previous - 1e-15);
    CHECK(p <= 1.0 + 1e-15);
    previous = p;
  }
  CHECK(proxy::top_channels({1, 5, 3, 5, 0}, 2) == std::vector<std::int64_t>{1, 3});
  CHECK(proxy::top_channels({1, 5, 3, 5, 0}, 3) == std::vector<std::int64_t>{1, 2, 3});
  // Keys spread along (1, 1, 0) with small noise along z: the first principal direction is (1, 1, 0)/sqrt(2).
  std::vector<std::vector<float>> keys = {{2, 2, 0.1f}, {-2, -2, -0.1f}, {1, 1, 0.0f}, {-1, -1, 0.05f}, {0.5f, 0.5f, -0.05f}};
  std::vector<const float*> pointers;
  for (const auto& k : keys) pointers.push_back(k.data());
  const std::vector<double> P = proxy::principal_components(pointers, 3, 1);
  CHECK(std::abs(P[0]) == Approx(1.0 / std::sqrt(2.0)).margin(1e-3));
  CHECK(std::abs(P[1]) == Approx(1.0 / std::sqrt(2.0)).margin(1e-3));
  CHECK(std::abs(P[2]) < 0.05);
}

TEST_CASE("duo streams the heads that sinks and recent keys serve best, by hand", "[proxies]") {
  // One layer of dense probabilities, 2 KV heads: head 0 puts its mass on key 0 and the current key
  // (sink 1 + recent 1 keeps it), head 1 on the middle keys. With half of the heads streaming, head 0
  // streams: its rows attend {0, t}; head 1 attends everything.
  Capture c;
  c.header.model = "hand";
  c.header.source = "tests";
  c.header.num_layers = 1;
  c.header.num_q_heads = 2;
  c.header.num_kv_heads = 2;
  c.header.head_dim = 2;
  c.header.seq_len = 8;
  LayerTensors t;
  t.attn.assign(2 * 8 * 8, 0.0f);
  for (std::int64_t row = 0; row < 8; ++row) {
    for (std::int64_t j = 0; j <= row; ++j) {
      const bool edge = j == 0 || j == row;
      t.attn[static_cast<std::size_t>((0 * 8 + row) * 8 + j)] = edge ? 1.0f : 0.0f;
      t.attn[static_cast<std::size_t>((1 * 8 + row) * 8 + j)] = 1.0f;
    }
    const float edges = row == 0 ? 1.0f : 2.0f;
    for (std::int64_t j = 0; j <= row; ++j) {
      t.attn[static_cast<std::size_t>((0 * 8 + row) * 8 + j)] /= edges;
      t.attn[static_cast<std::size_t>((1 * 8 + row) * 8 + j)] /= static_cast<float>(row + 1);
    }
  }
  c.layers.push_back(t);
  ReplayOptions o = replay_options("duo:sinks=1,recent=1,streaming=50", tokens({4}));
  o.queries = "last:2";
  const ReplayResult r = replay_capture(c, "proxies_duo_hand", o);
  CHECK(r.selectors[0].head_mean[kAttendedKeys].at(0, 0, 0) == 2.0);
  CHECK(r.selectors[0].head_mean[kAttendedKeys].at(0, 0, 1) == Approx(7.5));  // rows 6 and 7: 7 and 8 keys
  CHECK(r.selectors[0].head_mean[kMassRecall].at(0, 0, 0) == Approx(1.0).margin(1e-6));
  CHECK(r.selectors[0].calibration.find("1 of 2 KV heads streaming") != std::string::npos);
}

TEST_CASE("low-rank and channel proxies at full rank equal the token-level oracle", "[proxies][properties]") {
  ref::Shape shape;
  shape.q_heads = 2;
  shape.kv_heads = 2;  // MHA: SparQ's group sum is the head itself
  shape.seq_len = 60;
  const Capture capture = ref::random_capture(shape, test::seed() + 141);
  ReplayOptions o = replay_options("oracle:block=1,doublesparsity:r=16,loki:r=16,sparq:r=16,local=0", tokens({2, 8, 30}));
  o.queries = "last:30";
  const ReplayResult r = replay_capture(capture, "proxies_full_rank", o);
  for (std::size_t s = 1; s < 4; ++s) {
    INFO(r.selectors[s].spec);
    for (std::uint64_t b = 0; b < 3; ++b) {
      for (std::uint64_t l = 0; l < 2; ++l) {
        for (std::uint64_t h = 0; h < 2; ++h) {
          CHECK(r.selectors[s].head_mean[kMassRecall].at(b, l, h) == Approx(r.selectors[0].head_mean[kMassRecall].at(b, l, h)).margin(1e-6));
        }
      }
    }
  }
}

TEST_CASE("magicpig with one hash bit samples (almost) every key and its estimator stays close", "[proxies][properties]") {
  ref::Shape shape;
  shape.seq_len = 50;
  const Capture capture = ref::random_capture(shape, test::seed() + 142);
  ReplayOptions o = replay_options("magicpig:bits=1,tables=60,sinks=0,window=0,magicpig:bits=6,tables=10,sinks=2,window=4", tokens({8}));
  o.queries = "last:20";
  const ReplayResult r = replay_capture(capture, "proxies_magicpig_dense", o);
  CHECK(r.selectors[0].model_mean[kMassRecall].values[0] > 0.999);
  CHECK(r.selectors[0].model_mean[kOutputError].values[0] < 0.01);
  CHECK(r.selectors[1].model_mean[kAttendedKeys].values[0] < r.selectors[0].model_mean[kAttendedKeys].values[0]);
  CHECK(r.selectors[1].model_mean[kAttendedKeys].values[0] >= 6.0);  // the static keys at least
}

TEST_CASE("calibration uses held-out positions and is deterministic for a seed", "[proxies][properties]") {
  CaptureHeader header;
  header.seq_len = 100;
  ReplayPlan plan;
  plan.header = &header;
  for (std::int64_t t = 60; t < 100; ++t) plan.rows.push_back(t);
  plan.seed = 5;
  const CalibrationSplit a = calibration_split(plan, 10, 1), b = calibration_split(plan, 10, 1);
  CHECK(a.positions == b.positions);
  CHECK(a.positions.size() == 10);
  CHECK(a.first_scored == 0);
  for (std::int64_t t : a.positions) CHECK(t < 60);  // outside the query set
  plan.seed = 6;
  CHECK(calibration_split(plan, 10, 1).positions != a.positions);
  CHECK(calibration_split(plan, 0, 1).positions.size() == 60);
  plan.rows.clear();
  for (std::int64_t t = 0; t < 100; ++t) plan.rows.push_back(t);  // every position queried: the first half
  const CalibrationSplit all = calibration_split(plan, 0, 1);
  CHECK(all.first_scored == 50);
  CHECK(all.positions.size() == 50);
  CHECK(all.positions.back() == 49);

  // The same seed gives the same replay; the report names the calibration positions.
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 64;
  const Capture capture = ref::random_capture(shape, test::seed() + 143);
  ReplayOptions o = replay_options("doublesparsity:calib=8,loki:calib=8,r=2,duo:calib=8,sinks=2,recent=4", tokens({4, 16}));
  o.seed = 11;
  const ReplayResult r1 = replay_capture(capture, "proxies_calib_1", o), r2 = replay_capture(capture, "proxies_calib_2", o);
  for (std::size_t s = 0; s < 3; ++s) {
    CHECK(r1.selectors[s].head_mean[kMassRecall].values == r2.selectors[s].head_mean[kMassRecall].values);
    CHECK(r1.selectors[s].calibration.find("8 positions sampled (seed 11) from the first half [0, 32)") != std::string::npos);
    CHECK(r1.selectors[s].first_scored == 32);
    CHECK(std::isnan(r1.selectors[s].head_mean[kMassRecall].at(0, 0, 0)) == false);
  }
}

TEST_CASE("proxies match the float64 reference in full replays: doublesparsity, loki, sparq, magicpig, duo",
          "[proxies][parity]") {
  SECTION("GQA, token budgets, held-out calibration positions") {
    ref::Shape shape;
    shape.layers = 2;
    shape.seq_len = 80;
    shape.layer_correlation = 0.5;
    const Capture capture = ref::random_capture(shape, test::seed() + 151);
    ReplayOptions o = replay_options(
        "doublesparsity,doublesparsity:r=3,channel=q,block=4,sinks=1,window=2,doublesparsity:r=5,channel=k,"
        "loki,loki:r=2,block=2,"
        "sparq,sparq:r=3,local=3,block=4,"
        "magicpig:bits=2,tables=12,sinks=2,window=4,magicpig:bits=3,tables=20,collisions=1,sinks=0,window=0,"
        "duo:sinks=2,recent=6,duo:sinks=1,recent=3,streaming=25,error=output",
        tokens({4, 12, 32}));
    o.queries = "last:30";
    o.seed = 3;
    const ReplayResult r = replay_capture(capture, "proxies_parity_e", o);
    ref::RefProxy d1 = make_ref("doublesparsity", 1), d2 = make_ref("doublesparsity", 4), d3 = make_ref("doublesparsity", 1);
    d2.r = 3, d2.channel = "q", d2.sinks = 1, d2.window = 2;
    d3.r = 5, d3.channel = "k";
    ref::RefProxy l1 = make_ref("loki", 1), l2 = make_ref("loki", 2);
    l2.r = 2;
    ref::RefProxy s1 = make_ref("sparq", 1), s2 = make_ref("sparq", 4);
    s2.r = 3, s2.sparq_local = 3;
    ref::RefProxy m1 = make_ref("magicpig", 1), m2 = make_ref("magicpig", 1);
    m1.bits = 2, m1.tables = 12, m1.sinks = 2, m1.window = 4;
    m2.bits = 3, m2.tables = 20, m2.collisions = 1;
    ref::RefProxy u1 = make_ref("duo", 1), u2 = make_ref("duo", 1);
    u1.sink = 2, u1.recent = 6;
    u2.sink = 1, u2.recent = 3, u2.streaming = 25, u2.error = "output";
    const ref::RefProxy expected[] = {d1, d2, d3, l1, l2, s1, s2, m1, m2, u1, u2};
    REQUIRE(r.selectors.size() == 11);
    for (std::size_t i = 0; i < 11; ++i) CHECK(compare_proxy(r, i, capture, expected[i], 3) > 0);
  }
  SECTION("MQA with sink logits, every row queried (calibration on the first half), sparsity budgets") {
    ref::Shape shape;
    shape.q_heads = 4;
    shape.kv_heads = 1;
    shape.seq_len = 40;
    shape.sinks = true;
    const Capture capture = ref::random_capture(shape, test::seed() + 152);
    ReplayOptions o = replay_options("doublesparsity:r=2,loki:r=3,sparq:r=2,magicpig:bits=2,tables=10,sinks=1,window=2,"
                                  "duo:sinks=1,recent=4",
                                  sparsities({0.8, 0.4}));
    o.seed = 9;
    const ReplayResult r = replay_capture(capture, "proxies_parity_f", o);
    ref::RefProxy d = make_ref("doublesparsity", 1), l = make_ref("loki", 1), s = make_ref("sparq", 1);
    ref::RefProxy m = make_ref("magicpig", 1), u = make_ref("duo", 1);
    d.r = 2, l.r = 3, s.r = 2;
    m.bits = 2, m.tables = 10, m.sinks = 1, m.window = 2;
    u.sink = 1, u.recent = 4;
    compare_proxy(r, 0, capture, d, 9);
    compare_proxy(r, 1, capture, l, 9);
    compare_proxy(r, 2, capture, s, 9);
    compare_proxy(r, 3, capture, m, 9);
    compare_proxy(r, 4, capture, u, 9);
    CHECK(r.selectors[0].first_scored == 20);
    CHECK(r.selectors[2].first_scored == 0);  // SparQ is not calibrated
  }
}

// ------------------------------------------------------------------------------------------ step 4

TEST_CASE("every selector declares its granularity, budget, post-RoPE handling and a KV footprint", "[proxies]") {
  const std::vector<std::string> names = selector_names();
  CHECK(names.size() == 16);
  for (const auto& name : names) {
    INFO(name);
    const auto selector = make_selector(SelectorSpec{name, {}}, SelectorDefaults{});
    const SelectorInfo info = selector->info();
    CHECK(!info.granularity.empty());
    CHECK(!info.budget.empty());
    CHECK(!info.post_rope.empty());
    CHECK(!info.source.empty());
    const KvFootprint& footprint = find_footprint(info.footprint);  // the one KV accounting table
    CHECK(footprint.evicts == info.evicts);
    const SelectorPrice price = selector_price(info, 128, 4, 8);
    CHECK(price.metadata_bytes_per_token >= 0.0);
    CHECK(!selector->description().empty());
  }
  // Quest keeps 2 x head_dim bf16 values per 16-key page: 32 bytes per token per KV head at d = 128.
  const auto quest = make_selector(SelectorSpec{"quest", {}}, SelectorDefaults{});
  CHECK(selector_price(quest->info(), 128, 4, 8).metadata_bytes_per_token == 32.0);
  const auto quest32 = make_selector(SelectorSpec{"quest", {{"block", "32"}}}, SelectorDefaults{});
  CHECK(selector_price(quest32->info(), 128, 4, 8).metadata_bytes_per_token == 16.0);
  CHECK_THROWS_AS(expand_selector_specs(parse_selector_list("all:block=4")), Error);
  CHECK_THROWS_AS(make_selector(SelectorSpec{"quest", {{"bogus", "1"}}}, SelectorDefaults{}), Error);
  CHECK_THROWS_AS(make_selector(SelectorSpec{"reuse", {{"layers", "2,3"}}}, SelectorDefaults{}), Error);
  CHECK_THROWS_AS(make_selector(SelectorSpec{"oracle_topp", {{"p", "1.5"}}}, SelectorDefaults{}), Error);
}

TEST_CASE("selectors=all replays every registered selector with its defaults in one report", "[proxies]") {
  ref::Shape shape;
  shape.layers = 3;
  shape.seq_len = 64;
  const Capture capture = ref::random_capture(shape, test::seed() + 161);
  ReplayOptions o = replay_options("all,oracle:block=16", tokens({16, 64}));
  o.queries = "last:16";
  o.block_size = 16;
  const ReplayResult r = replay_capture(capture, "proxies_all", o);
  const std::vector<std::string> names = selector_names();
  REQUIRE(r.selectors.size() == names.size() + 1);
  for (std::size_t i = 0; i < names.size(); ++i) {
    INFO(names[i]);
    CHECK(r.selectors[i].spec.rfind(names[i], 0) == 0);
    // Budgets that hold at least one of the selector's blocks have a finite recall in [0, 1].
    for (std::size_t b = 0; b < 2; ++b) {
      const double recall = r.selectors[i].model_mean[kMassRecall].values[b];
      const bool usable = r.selectors[i].budget_use == BudgetUse::kFree || static_cast<double>(r.selectors[i].block) <= r.budgets[b].value;
      if (usable) {
        CHECK(recall >= 0.0);
        CHECK(recall <= 1.0 + 1e-9);
      } else {
        CHECK(std::isnan(recall));
      }
    }
  }
  CHECK(r.selectors.back().label != r.selectors.front().label);  // oracle repeated: labels stay unique
}

namespace {

// The CPU backend, plus Quest's page rankings (Backend::page_bound_rankings) made on the host the way a
// device backend makes them: the same bound (proxy::quest_bound), the row's own page first, rank_top's
// order; or, `least_first`, the other way round (the own page still first), so that a report shows
// whether the selector took them; or a malformed answer (one entry short, or a page beyond the row),
// which the selector must refuse.
class PageRankingBackend final : public test::CpuBackedBackend {
 public:
  enum class Answer { kSame, kLeastFirst, kShort, kBeyondRow };
  explicit PageRankingBackend(Answer answer) : least_first_(answer == Answer::kLeastFirst), answer_(answer) {}
  bool page_bound_rankings(const PageBoundRequest& request, std::vector<std::int32_t>& order) const override {
    ++asked_;
    // Called from the engine's threads: a broken contract throws (the replay fails), never a Catch2 macro.
    if (request.count < 1 || request.count > request.pages) throw std::logic_error("page ranking count outside 1..pages");
    order.assign(static_cast<std::size_t>(request.heads * request.num_rows * request.count), -1);
    std::vector<double> scores;
    for (std::int64_t h = 0; h < request.heads; ++h) {
      for (std::int64_t r = 0; r < request.num_rows; ++r) {
        const std::int64_t t = request.rows[r], pages = std::min(t / request.page + 1, request.pages);
        const float* q = request.q + (h * request.seq_len + t) * request.head_dim;
        scores.assign(static_cast<std::size_t>(pages), std::numeric_limits<double>::infinity());
        for (std::int64_t b = 0; b + 1 < pages; ++b) {
          const double bound = proxy::quest_bound(q, request.lo + b * request.head_dim, request.hi + b * request.head_dim, request.head_dim);
          scores[static_cast<std::size_t>(b)] = least_first_ ? -bound : bound;
        }
        rank_top(scores.data(), pages, std::min(request.count, pages),
                 &order[static_cast<std::size_t>((h * request.num_rows + r) * request.count)]);
      }
    }
    if (answer_ == Answer::kShort) order.pop_back();
    if (answer_ == Answer::kBeyondRow) order.front() = static_cast<std::int32_t>(request.rows[0] / request.page + 1);
    return true;
  }
  std::int64_t asked() const { return asked_; }

 private:
  bool least_first_;
  Answer answer_;
  mutable std::atomic<std::int64_t> asked_{0};
};

// Every head mean of every metric of `result` equals `expected`'s, bit for bit (NaN for NaN).
void check_same_head_means(const ReplayResult& expected, const ReplayResult& result) {
  REQUIRE(expected.selectors.size() == result.selectors.size());
  for (std::size_t s = 0; s < expected.selectors.size(); ++s) {
    for (int m = 0; m < kNumMetrics; ++m) {
      INFO(expected.selectors[s].label << " " << metric_name(m));
      const auto& x = expected.selectors[s].head_mean[m].values;
      const auto& y = result.selectors[s].head_mean[m].values;
      REQUIRE(x.size() == y.size());
      for (std::size_t i = 0; i < x.size(); ++i) CHECK((x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i]))));
    }
  }
}

// Whether any head mean of `other` differs from `expected`'s (NaN equals NaN).
bool head_means_differ(const ReplayResult& expected, const ReplayResult& other) {
  for (std::size_t s = 0; s < expected.selectors.size(); ++s) {
    for (int m = 0; m < kNumMetrics; ++m) {
      const auto& x = expected.selectors[s].head_mean[m].values;
      const auto& w = other.selectors[s].head_mean[m].values;
      for (std::size_t i = 0; i < x.size() && i < w.size(); ++i) {
        if (x[i] != w[i] && !(std::isnan(x[i]) && std::isnan(w[i]))) return true;
      }
    }
  }
  return false;
}

}  // namespace

TEST_CASE("quest takes a backend's page rankings where offered: the selector's own report, bit for bit", "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 170;
  shape.head_dim = 16;
  const Capture capture = ref::random_capture(shape, test::seed() + 61);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_quest_backend.h5";
  write_capture(path, capture);
  ReplayOptions options = replay_options("quest:block=8,dense=0,quest:block=16,dense=1,window=20", tokens({16, 48, 96}));
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = PageRankingBackend::Answer;
  const PageRankingBackend same(Answer::kSame), least_first(Answer::kLeastFirst);
  const ReplayResult result = run_replay(path, options, same, false);
  const ReplayResult wrong = run_replay(path, options, least_first, false);
  CHECK(same.asked() > 0);
  check_same_head_means(expected, result);
  // Least-bound pages first: quest:block=8 attends other pages at the smallest budget, and loses recall.
  CHECK(wrong.selectors[0].head_mean[kMassRecall].at(0, 1, 0) < expected.selectors[0].head_mean[kMassRecall].at(0, 1, 0) - 0.01);
  // A malformed answer is a bug of the backend's, reported as one, never read past its end.
  for (const Answer answer : {Answer::kShort, Answer::kBeyondRow}) {
    const PageRankingBackend malformed(answer);
    try {
      (void)run_replay(path, options, malformed, false);
      FAIL("a malformed page ranking was accepted");
    } catch (const Error& error) {
      CHECK(error.kind() == ErrorKind::kInternal);
      CHECK(std::string(error.what()).find("quest: the backend ranked") != std::string::npos);
    }
  }
}

// A CPU-backed backend that records the key ids its requests name, and how many requests it served.
class KeyIdRecordingBackend : public test::CpuBackedBackend {
 public:
  std::set<std::uint64_t> ids() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return ids_;
  }
  std::int64_t requests() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return requests_;
  }

 protected:
  void record(std::uint64_t keys_id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    ids_.insert(keys_id);
    ++requests_;
  }

 private:
  mutable std::mutex mutex_;
  mutable std::set<std::uint64_t> ids_;
  mutable std::int64_t requests_ = 0;
};

// A backend that scores NSA's blocks the way the host does (proxy::nsa_block_scores), or with the scores
// negated (least attended first: the report must change), or one score short, which the selector must
// refuse. It records the ids the requests give their compressed keys (one per layer).
class NsaScoreBackend final : public KeyIdRecordingBackend {
 public:
  enum class Answer { kSame, kNegated, kShort };
  explicit NsaScoreBackend(Answer answer) : answer_(answer) {}
  bool nsa_block_scores(const NsaScoreRequest& request, std::vector<double>& scores) const override {
    proxy::nsa_block_scores(request, scores);
    if (answer_ == Answer::kNegated) {
      for (double& x : scores) x = -x;
    }
    if (answer_ == Answer::kShort) scores.pop_back();
    record(request.keys_id);
    return true;
  }

 private:
  Answer answer_;
};

TEST_CASE("nsa takes a backend's block scores where offered: the selector's own report, bit for bit", "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 3;
  shape.seq_len = 150;
  shape.head_dim = 16;
  const Capture capture = ref::random_capture(shape, test::seed() + 67);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_nsa_backend.h5";
  write_capture(path, capture);
  ReplayOptions options = replay_options("nsa:block=8,cmp=4,stride=2,window=6,initial=0,local=0", tokens({16, 48}));
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = NsaScoreBackend::Answer;
  const NsaScoreBackend same(Answer::kSame), negated(Answer::kNegated);
  const ReplayResult result = run_replay(path, options, same, false);
  check_same_head_means(expected, result);
  // One id a layer's compressed keys, never 0, never reused.
  const std::set<std::uint64_t> ids = same.ids();
  CHECK(ids.size() == static_cast<std::size_t>(shape.layers));
  CHECK(ids.count(0) == 0);
  // The least attended blocks first: the selector ranked the backend's scores.
  CHECK(head_means_differ(expected, run_replay(path, options, negated, false)));
  const NsaScoreBackend short_answer(Answer::kShort);
  try {
    (void)run_replay(path, options, short_answer, false);
    FAIL("a short answer was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("nsa: ") != std::string::npos);
  }
}

// A backend that gives moba's pooled-key logits the way the host does (proxy::pooled_key_logits), or negated
// (the least similar blocks first: the report must change), or one logit short, which the selector must
// refuse. It records the requests' key ids and the rows they ask for at once.
class PooledLogitBackend final : public KeyIdRecordingBackend {
 public:
  enum class Answer { kSame, kNegated, kShort };
  explicit PooledLogitBackend(Answer answer) : answer_(answer) {}
  bool pooled_key_logits(const NsaScoreRequest& request, std::vector<double>& logits) const override {
    // Written out here, not by proxy::pooled_key_logits (the host path), so that the layout is checked too:
    // proxy::dot sums as the host's dots do.
    const std::int64_t R = request.num_rows, d = request.head_dim;
    const std::int64_t width = proxy::nsa_visible_keys(request, request.rows[R - 1]);
    logits.assign(static_cast<std::size_t>(request.heads * R * width), 0.0);
    for (std::int64_t h = 0; h < request.heads; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const std::int64_t t = request.rows[r];
        for (std::int64_t i = 0; i < proxy::nsa_visible_keys(request, t); ++i) {
          logits[static_cast<std::size_t>((h * R + r) * width + i)] =
              proxy::dot(request.q + (h * request.seq_len + t) * d, request.keys + i * d, d) * request.scale;
        }
      }
    }
    if (answer_ == Answer::kNegated) {
      for (double& x : logits) x = -x;
    }
    if (answer_ == Answer::kShort && !logits.empty()) logits.pop_back();
    record(request.keys_id);
    return true;
  }

 private:
  Answer answer_;
};

TEST_CASE("moba takes a backend's pooled-key logits where offered: the selector's own report, bit for bit", "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 150;
  shape.head_dim = 16;
  const Capture capture = ref::random_capture(shape, test::seed() + 71);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_moba_backend.h5";
  write_capture(path, capture);
  // The query's own block forced first, and scored by its causal keys' mean.
  ReplayOptions options = replay_options("moba:block=8,moba:block=4,current=0", tokens({16, 48}));
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = PooledLogitBackend::Answer;
  const PooledLogitBackend same(Answer::kSame), negated(Answer::kNegated);
  const ReplayResult result = run_replay(path, options, same, false);
  check_same_head_means(expected, result);
  // One id per spec and layer, never 0.
  const std::set<std::uint64_t> ids = same.ids();
  CHECK(ids.size() == static_cast<std::size_t>(2 * shape.layers));
  CHECK(ids.count(0) == 0);
  CHECK(same.requests() > 0);
  CHECK(head_means_differ(expected, run_replay(path, options, negated, false)));
  const PooledLogitBackend short_answer(Answer::kShort);
  try {
    (void)run_replay(path, options, short_answer, false);
    FAIL("a short answer was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("moba: ") != std::string::npos);
  }
}

TEST_CASE("pooled-key logits in chunks of rows are the whole request's, row for row", "[proxies]") {
  // The chunks moba asks for (proxy::pooled_key_logits_in_chunks), with limits from one row a chunk to all rows
  // at once, on the host and from a backend, against the whole request's logits.
  const std::int64_t T = 97, d = 5, heads = 3, block = 8, compressed = T / block;
  Rng rng(test::seed() + 79);
  std::vector<float> q(static_cast<std::size_t>(heads * T * d));
  for (float& x : q) x = static_cast<float>(rng.normal());
  std::vector<double> keys(static_cast<std::size_t>(compressed * d));
  for (double& x : keys) x = rng.normal();
  std::vector<std::int64_t> rows;
  for (std::int64_t t = 0; t < T; t += 1 + static_cast<std::int64_t>(rng.below(4))) rows.push_back(t);  // from row 0: no key yet
  NsaScoreRequest request;
  request.q = q.data();
  request.keys = keys.data();
  request.keys_id = proxy::next_data_id();
  request.heads = heads;
  request.seq_len = T;
  request.head_dim = d;
  request.compressed = compressed;
  request.cmp = request.stride = request.block = block;
  request.rows = rows.data();
  request.num_rows = static_cast<std::int64_t>(rows.size());
  request.fused = proxy::kMultiplyAddFused;
  std::vector<double> whole;
  proxy::pooled_key_logits(request, whole);
  const std::int64_t R = request.num_rows, width = proxy::nsa_visible_keys(request, rows.back());
  REQUIRE(whole.size() == static_cast<std::size_t>(heads * R * width));
  const PooledLogitBackend backend(PooledLogitBackend::Answer::kSame);
  for (const Backend* source : {static_cast<const Backend*>(nullptr), static_cast<const Backend*>(&backend)}) {
    for (const std::int64_t limit : {std::int64_t{1}, std::int64_t{5}, std::int64_t{7 * heads * width}, std::int64_t{1} << 22}) {
      CAPTURE(source != nullptr, limit);
      std::int64_t next_row = 0, chunks = 0;
      proxy::pooled_key_logits_in_chunks(source, request, limit, "test",
                                         [&](std::int64_t r0, std::int64_t n, std::int64_t w, const std::vector<double>& logits) {
                                           REQUIRE(r0 == next_row);
                                           REQUIRE(n >= 1);
                                           REQUIRE(n * heads * std::max<std::int64_t>(1, w) <= std::max<std::int64_t>(limit, heads * width));
                                           REQUIRE(w == proxy::nsa_visible_keys(request, rows[static_cast<std::size_t>(r0 + n - 1)]));
                                           for (std::int64_t h = 0; h < heads; ++h) {
                                             for (std::int64_t r = r0; r < r0 + n; ++r) {
                                               for (std::int64_t i = 0; i < w; ++i) {
                                                 REQUIRE(logits[static_cast<std::size_t>((h * n + r - r0) * w + i)] ==
                                                         whole[static_cast<std::size_t>((h * R + r) * width + i)]);
                                               }
                                             }
                                           }
                                           next_row = r0 + n;
                                           ++chunks;
                                         });
      CHECK(next_row == R);
      if (limit == 1) CHECK(chunks == R);
      if (limit == (std::int64_t{1} << 22)) CHECK(chunks == 1);
    }
  }
  const PooledLogitBackend short_answer(PooledLogitBackend::Answer::kShort);
  try {
    proxy::pooled_key_logits_in_chunks(&short_answer, request, 5, "test", [](std::int64_t, std::int64_t, std::int64_t, const std::vector<double>&) {});
    FAIL("a short answer was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("test: ") != std::string::npos);
  }
}

TEST_CASE("pooled-key logits are each visible compressed key's scaled dot product, 0 past a row's keys", "[proxies]") {
  // Against a direct sum in long double over a hand-sized request: cmp 4, stride 2, rows before any key.
  const std::int64_t T = 13, d = 3, heads = 2, cmp = 4, stride = 2, compressed = (T - cmp) / stride + 1;
  Rng rng(test::seed() + 73);
  std::vector<float> q(static_cast<std::size_t>(heads * T * d));
  for (float& x : q) x = static_cast<float>(rng.normal());
  std::vector<double> keys(static_cast<std::size_t>(compressed * d));
  for (double& x : keys) x = rng.normal();
  const std::vector<std::int64_t> rows = {0, 2, 3, 5, 8, 12};
  NsaScoreRequest request;
  request.q = q.data();
  request.keys = keys.data();
  request.heads = heads;
  request.seq_len = T;
  request.head_dim = d;
  request.compressed = compressed;
  request.cmp = cmp;
  request.stride = stride;
  request.block = 4;
  request.scale = 0.5;
  request.rows = rows.data();
  request.num_rows = static_cast<std::int64_t>(rows.size());
  request.fused = proxy::kMultiplyAddFused;
  std::vector<double> logits;
  proxy::pooled_key_logits(request, logits);
  const std::int64_t width = (12 - cmp + 1) / stride + 1;  // the last row's keys: windows ending at 3, 5, 7, 9, 11
  REQUIRE(width == 5);
  REQUIRE(logits.size() == static_cast<std::size_t>(heads * request.num_rows * width));
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t r = 0; r < request.num_rows; ++r) {
      const std::int64_t t = rows[static_cast<std::size_t>(r)];
      for (std::int64_t i = 0; i < width; ++i) {
        CAPTURE(h, t, i);
        const double got = logits[static_cast<std::size_t>((h * request.num_rows + r) * width + i)];
        if (i * stride + cmp - 1 > t) {
          CHECK(got == 0.0);
          continue;
        }
        long double sum = 0.0L;
        for (std::int64_t c = 0; c < d; ++c) {
          sum += static_cast<long double>(q[static_cast<std::size_t>((h * T + t) * d + c)]) * keys[static_cast<std::size_t>(i * d + c)];
        }
        CHECK(std::abs(got - static_cast<double>(0.5L * sum)) <= 1e-14 * (1.0 + std::abs(static_cast<double>(sum))));
      }
    }
  }
}

TEST_CASE("token-score rankings are the float64 reference's: random and tied inputs, k = 1 to every block, any block size",
          "[proxies][parity]") {
  // proxy::token_score_rankings (the selectors' host path and the device's definition) against the
  // reference written out key by key; ties ({-1, 0, 1} inputs) test the tie rule in scores and block maxima.
  Rng rng(test::seed() + 181);
  std::int64_t requests = 0, ranked = 0;
  for (const bool ties : {false, true}) {
    for (const std::int64_t block : {1, 3, 8, 64}) {
      for (int variant = 0; variant < 6; ++variant) {
        ref::TokenScoreShape shape;
        shape.ties = ties;
        shape.block = block;
        shape.seq_len = 1 + static_cast<std::int64_t>(rng.below(block == 64 ? 300 : 90));
        shape.width = 1 + static_cast<std::int64_t>(rng.below(9));
        shape.sets = 1 + static_cast<std::int64_t>(rng.below(3));
        shape.terms = 1 + static_cast<std::int64_t>(rng.below(3));
        shape.given_channels = variant % 2 == 0;
        shape.channels = shape.given_channels ? 1 + static_cast<std::int64_t>(rng.below(12)) : 1 + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(shape.width)));
        shape.divisors = variant % 3 == 1;
        shape.double_keys = variant >= 3;
        shape.local = variant == 2 ? 0 : static_cast<std::int64_t>(rng.below(6));
        shape.row_step = 1 + static_cast<std::int64_t>(rng.below(4));
        ref::OwnedTokenScoreRequest owned;
        ref::random_token_score_request(shape, rng, proxy::kMultiplyAddFused, owned);
        CAPTURE(ties, block, variant, shape.seq_len, shape.width, shape.sets, shape.terms, shape.channels, shape.local);
        std::vector<std::int32_t> order;
        proxy::token_score_rankings(owned.request, order);
        const std::vector<std::int32_t> expected = ref::naive_token_score_rankings(owned.request, proxy::kMultiplyAddFused);
        REQUIRE(order.size() == expected.size());
        CHECK(order == expected);
        ++requests;
        for (std::int64_t count : owned.counts) ranked += count * shape.sets;
      }
    }
  }
  // A single token, ranked alone.
  ref::TokenScoreShape single;
  single.seq_len = 1;
  ref::OwnedTokenScoreRequest owned;
  ref::random_token_score_request(single, rng, proxy::kMultiplyAddFused, owned);
  owned.counts.assign(1, 1);
  std::vector<std::int32_t> order;
  proxy::token_score_rankings(owned.request, order);
  CHECK(order == std::vector<std::int32_t>(static_cast<std::size_t>(single.sets), 0));
  INFO(requests << " requests, " << ranked << " blocks ranked");
  CHECK(ranked > 1000);
}

TEST_CASE("token-score requests outside their contract are internal errors", "[proxies]") {
  Rng rng(test::seed() + 182);
  ref::TokenScoreShape shape;
  shape.block = 4;
  auto expect_error = [&](const char* what, const std::function<void(ref::OwnedTokenScoreRequest&)>& spoil) {
    INFO(what);
    ref::OwnedTokenScoreRequest owned;
    ref::random_token_score_request(shape, rng, proxy::kMultiplyAddFused, owned);
    spoil(owned);
    std::vector<std::int32_t> order;
    try {
      proxy::token_score_rankings(owned.request, order);
      FAIL("accepted");
    } catch (const Error& error) {
      CHECK(error.kind() == ErrorKind::kInternal);
      CHECK(std::string(error.what()).find("token-score rankings") != std::string::npos);
    }
  };
  expect_error("a channel past the width", [](auto& o) { o.channel[0] = static_cast<std::int32_t>(o.request.width); });
  expect_error("more blocks than the row has", [](auto& o) { o.counts.back() = o.rows.back() / o.request.block + 2; });
  expect_error("rows out of order", [](auto& o) { std::swap(o.rows.front(), o.rows.back()); });
  expect_error("a row past the keys", [](auto& o) { o.rows.back() = o.request.seq_len; });
  expect_error("both kinds of keys", [](auto& o) { o.request.keys64 = o.weight.data(); });
  expect_error("the other multiply-add", [](auto& o) { o.request.fused = !proxy::kMultiplyAddFused; });
  expect_error("implicit channels past the width", [](auto& o) {
    o.request.channel = nullptr;
    o.request.channels = o.request.width + 1;
  });
}

// A backend that ranks token scores by the reference (ref::naive_token_score_rankings), or with every score
// negated (the lowest first: the report must change), or one entry short, which the selector must refuse. It
// records the requests' key ids.
class TokenScoreBackend final : public KeyIdRecordingBackend {
 public:
  enum class Answer { kSame, kNegated, kShort };
  explicit TokenScoreBackend(Answer answer) : answer_(answer) {}
  bool token_score_rankings(const TokenScoreRequest& request, std::vector<std::int32_t>& order) const override {
    if (answer_ == Answer::kNegated) {
      // Every score negated exactly (the recent keys' stay +infinity): the lowest-scored blocks first.
      std::vector<double> negated(request.weight, request.weight + request.sets * request.num_rows * request.terms * request.channels);
      for (double& w : negated) w = -w;
      TokenScoreRequest lowest = request;
      lowest.weight = negated.data();
      order = ref::naive_token_score_rankings(lowest, request.fused);
    } else {
      order = ref::naive_token_score_rankings(request, request.fused);
    }
    if (answer_ == Answer::kShort && !order.empty()) order.pop_back();
    record(request.keys_id);
    return true;
  }

 private:
  Answer answer_;
};

TEST_CASE("doublesparsity, loki and sparq take a backend's token-score rankings where offered: their own report, bit for bit",
          "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.seq_len = 90;
  shape.head_dim = 16;
  const Capture capture = ref::random_capture(shape, test::seed() + 183);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_token_score_backend.h5";
  write_capture(path, capture);
  ReplayOptions options = replay_options("doublesparsity:r=3,loki:r=4,block=4,sparq:r=5,local=3", tokens({8, 24}));
  options.queries = "last:40";
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = TokenScoreBackend::Answer;
  const TokenScoreBackend same(Answer::kSame), negated(Answer::kNegated);
  const ReplayResult result = run_replay(path, options, same, false);
  check_same_head_means(expected, result);
  // One id per spec and layer, never 0.
  const std::set<std::uint64_t> ids = same.ids();
  CHECK(ids.size() == static_cast<std::size_t>(3 * shape.layers));
  CHECK(ids.count(0) == 0);
  CHECK(same.requests() > 0);
  const ReplayResult negated_result = run_replay(path, options, negated, false);
  for (std::size_t s = 0; s < 3; ++s) {
    INFO(expected.selectors[s].label);
    CHECK(negated_result.selectors[s].model_mean[kMassRecall].values[0] < expected.selectors[s].model_mean[kMassRecall].values[0]);
  }
  const TokenScoreBackend short_answer(Answer::kShort);
  try {
    (void)run_replay(path, options, short_answer, false);
    FAIL("a short answer was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("token-score rankings") != std::string::npos);
  }
}

// A backend that simulates H2O's caches the way the host does (proxy::h2o_simulate, the request's logits),
// or with no recent keys protected (a different policy: the report must change), or malformed (one
// eviction short; a key evicted before it was cached), which the selector must refuse.
class H2oBackend final : public test::CpuBackedBackend {
 public:
  enum class Answer { kSame, kNoRecent, kShort, kEarly };
  explicit H2oBackend(Answer answer) : answer_(answer) {}
  bool h2o_evictions(const H2oRequest& request, std::vector<std::int32_t>& evicted) const override {
    ++asked_;
    const std::int64_t T = request.seq_len, d = request.head_dim, S = request.sets;
    evicted.assign(static_cast<std::size_t>(request.budgets * S * T), 0);
    for (std::int64_t s = 0; s < S; ++s) {
      const float* keys = request.k + s * request.kv_heads / S * T * d;
      auto logits = [&](std::int64_t h, std::int64_t t, const std::vector<std::int64_t>& cache, std::vector<double>& z) {
        z.resize(cache.size());
        for (std::size_t i = 0; i < cache.size(); ++i) {
          z[i] = request.scale * proxy::dot(request.q + ((s * request.heads + h) * T + t) * d, keys + cache[i] * d, d);
        }
      };
      for (std::int64_t b = 0; b < request.budgets; ++b) {
        proxy::h2o_simulate(T, request.heads, request.capacity + b * (T - 1), answer_ == Answer::kNoRecent ? 0 : request.recent_percent,
                            request.sink_logits ? request.sink_logits + s * request.heads : nullptr, logits,
                            &evicted[static_cast<std::size_t>((b * S + s) * T)]);
      }
    }
    if (answer_ == Answer::kShort) evicted.pop_back();
    if (answer_ == Answer::kEarly) evicted[1] = 1;  // key 1 cannot leave at step 1: it arrives then
    return true;
  }
  std::int64_t asked() const { return asked_; }

 private:
  Answer answer_;
  mutable std::atomic<std::int64_t> asked_{0};
};

TEST_CASE("h2o takes a backend's evictions where offered: the selector's own report, bit for bit", "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 1;
  shape.q_heads = 4;
  shape.kv_heads = 2;
  shape.seq_len = 90;
  shape.head_dim = 8;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 62);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_h2o_backend.h5";
  write_capture(path, capture);
  ReplayOptions options = replay_options("h2o,h2o:recent=25,group=none", tokens({8, 20, 50}));
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = H2oBackend::Answer;
  const H2oBackend same(Answer::kSame), no_recent(Answer::kNoRecent);
  const ReplayResult result = run_replay(path, options, same, false);
  const ReplayResult other = run_replay(path, options, no_recent, false);
  CHECK(same.asked() == 2);  // once per layer and selector: every set (2 KV groups; 4 query heads) and budget in one request
  check_same_head_means(expected, result);
  CHECK(head_means_differ(expected, other));  // the evictions are the backend's: another policy's change the report
  for (const Answer answer : {Answer::kShort, Answer::kEarly}) {
    const H2oBackend malformed(answer);
    try {
      (void)run_replay(path, options, malformed, false);
      FAIL("malformed evictions were accepted");
    } catch (const Error& error) {
      CHECK(error.kind() == ErrorKind::kInternal);
      CHECK(std::string(error.what()).find("h2o: the backend") != std::string::npos);
    }
  }
}

// A backend that computes InfLLM's received attention the way the host does (proxy::attention_received),
// or with every query's attention counted only on its own key (a different statistic: the report must
// change), or malformed (one head short), which the selector must refuse.
class ReceivedBackend final : public test::CpuBackedBackend {
 public:
  enum class Answer { kSame, kOwnKeyOnly, kShort };
  explicit ReceivedBackend(Answer answer) : answer_(answer) {}
  bool attention_received(const ReceivedRequest& request, std::vector<double>& received) const override {
    ++asked_;
    if (request.stop_requested == nullptr) ++unstoppable_;  // the replay's signal must reach the work
    ReceivedRequest changed = request;
    if (answer_ == Answer::kOwnKeyOnly) changed.window = 1;
    proxy::attention_received(changed, received);
    if (answer_ == Answer::kShort) received.resize(received.size() - static_cast<std::size_t>(request.seq_len));
    return true;
  }
  std::int64_t asked() const { return asked_; }
  std::int64_t unstoppable() const { return unstoppable_; }

 private:
  Answer answer_;
  mutable std::atomic<std::int64_t> asked_{0}, unstoppable_{0};
};

TEST_CASE("infllm takes a backend's received attention where offered: the selector's own report, bit for bit",
          "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.q_heads = 4;
  shape.kv_heads = 2;
  shape.seq_len = 150;
  shape.head_dim = 8;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 63);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_infllm_backend.h5";
  write_capture(path, capture);
  ReplayOptions options = replay_options("infllm:block=8,sinks=4,window=24,repr=3", tokens({16, 40, 80}));
  const auto cpu = make_cpu_backend();
  const ReplayResult expected = run_replay(path, options, *cpu, false);
  using Answer = ReceivedBackend::Answer;
  const ReceivedBackend same(Answer::kSame), own_key(Answer::kOwnKeyOnly);
  const ReplayResult result = run_replay(path, options, same, false);
  const ReplayResult other = run_replay(path, options, own_key, false);
  CHECK(same.asked() == 2);  // once per layer: every head in one request
  CHECK(same.unstoppable() == 0);
  check_same_head_means(expected, result);
  CHECK(head_means_differ(expected, other));  // the sums are the backend's: another statistic changes the report
  const ReceivedBackend malformed(Answer::kShort);
  try {
    (void)run_replay(path, options, malformed, false);
    FAIL("a malformed answer was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("infllm: the backend returned") != std::string::npos);
  }
}

namespace {
// A device list whose device returns a part of the wrong size: the replay fails with an internal error.
void check_refused_part(const std::string& path, const ReplayOptions& options, const Backend& devices) {
  try {
    (void)run_replay(path, options, devices, false);
    FAIL("a device's malformed part was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
    CHECK(std::string(error.what()).find("a device returned") != std::string::npos);
  }
}
}  // namespace

// Several devices (Backend::h2o_evictions / attention_received through a device list) split a layer's
// work by KV heads, a contiguous run per device, all at once: the report is one device's, bit for bit.
TEST_CASE("A device list splits H2O's and InfLLM's layer work by KV heads: one device's report, bit for bit",
          "[proxies][parity]") {
  ref::Shape shape;
  shape.layers = 2;
  shape.q_heads = 6;
  shape.kv_heads = 3;  // over 2 devices: one KV head and two
  shape.seq_len = 70;
  shape.head_dim = 8;
  shape.sinks = true;
  const Capture capture = ref::random_capture(shape, test::seed() + 64);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/proxies_device_list.h5";
  write_capture(path, capture);
  const auto cpu = make_cpu_backend();
  // Devices of one kind, the last `declining` of them plain CPU backends (which leave the work to the host).
  auto device_list = [](auto make_one, int devices, int declining, std::vector<const Backend*>& members) {
    std::vector<std::unique_ptr<Backend>> list;
    members.clear();
    for (int i = 0; i < devices; ++i) {
      list.push_back(i < devices - declining ? make_one() : std::unique_ptr<Backend>(make_cpu_backend()));
      members.push_back(list.back().get());
    }
    return make_multi_device_backend(std::move(list));
  };
  std::vector<const Backend*> members;

  SECTION("h2o: sets of a KV group and sets of one head") {
    const ReplayOptions options = replay_options("h2o,h2o:recent=25,group=none", tokens({8, 20}));
    const ReplayResult expected = run_replay(path, options, *cpu, false);
    auto make_one = [] { return std::unique_ptr<Backend>(new H2oBackend(H2oBackend::Answer::kSame)); };
    for (const int devices : {2, 4}) {
      INFO(devices << " devices");
      const auto list = device_list(make_one, devices, 0, members);
      check_same_head_means(expected, run_replay(path, options, *list, false));
      for (int i = 0; i < devices; ++i) {
        // Two h2o specs a layer, each one request a device; a fourth device has no KV head of three.
        CHECK(static_cast<const H2oBackend*>(members[static_cast<std::size_t>(i)])->asked() == (i < 3 ? 4 : 0));
      }
    }
    const auto one_declines = device_list(make_one, 2, 1, members);
    check_same_head_means(expected, run_replay(path, options, *one_declines, false));  // the host computed it all
    CHECK(static_cast<const H2oBackend*>(members[0])->asked() == 4);
    auto make_short = [] { return std::unique_ptr<Backend>(new H2oBackend(H2oBackend::Answer::kShort)); };
    const auto malformed = device_list(make_short, 2, 0, members);
    check_refused_part(path, options, *malformed);
  }
  SECTION("infllm: the heads of each KV group") {
    const ReplayOptions options = replay_options("infllm:block=8,sinks=4,window=24,repr=3", tokens({16, 40}));
    const ReplayResult expected = run_replay(path, options, *cpu, false);
    auto make_one = [] { return std::unique_ptr<Backend>(new ReceivedBackend(ReceivedBackend::Answer::kSame)); };
    const auto list = device_list(make_one, 2, 0, members);
    check_same_head_means(expected, run_replay(path, options, *list, false));
    for (const Backend* member : members) {
      CHECK(static_cast<const ReceivedBackend*>(member)->asked() == 2);  // once a layer
      CHECK(static_cast<const ReceivedBackend*>(member)->unstoppable() == 0);
    }
    auto make_other = [] { return std::unique_ptr<Backend>(new ReceivedBackend(ReceivedBackend::Answer::kOwnKeyOnly)); };
    const auto other = device_list(make_other, 2, 0, members);
    CHECK(head_means_differ(expected, run_replay(path, options, *other, false)));  // every part is the devices' answer
    auto make_short = [] { return std::unique_ptr<Backend>(new ReceivedBackend(ReceivedBackend::Answer::kShort)); };
    const auto malformed = device_list(make_short, 2, 0, members);
    check_refused_part(path, options, *malformed);
  }
}

TEST_CASE("attention received: the definition, by hand, with sinks and windows past the end", "[proxies]") {
  // One head, 3 keys, head_dim 1: q = k = (1, 2, 3) / scale 1, a sink of logit 0.
  const std::vector<float> q = {1.0f, 2.0f, 3.0f}, k = {1.0f, 2.0f, 3.0f};
  const double sink = 0.0;
  ReceivedRequest request;
  request.q = q.data();
  request.k = k.data();
  request.seq_len = 3;
  request.head_dim = 1;
  request.sink_logits = &sink;
  // p_t(j) = exp(q_t k_j) / (1 + sum_{i <= t} exp(q_t k_i))
  auto p = [&](int t, int j) {
    double z = 1.0;
    for (int i = 0; i <= t; ++i) z += std::exp(static_cast<double>(q[t] * k[i]));
    return std::exp(static_cast<double>(q[t] * k[j])) / z;
  };
  std::vector<double> received;
  for (const std::int64_t window : {1, 2, 10}) {
    request.window = window;
    proxy::attention_received(request, received);
    REQUIRE(received.size() == 3);
    for (int j = 0; j < 3; ++j) {
      double expected = 0.0;
      for (int t = j; t < 3 && t < j + window; ++t) expected += p(t, j);
      INFO("window " << window << ", key " << j);
      CHECK(received[static_cast<std::size_t>(j)] == Approx(expected).epsilon(1e-14));
    }
  }
  request.window = 0;  // InfLLM without a local window: nothing is received
  proxy::attention_received(request, received);
  CHECK(received == std::vector<double>(3, 0.0));
  request.window = 2;  // a stop request ends the work before its first slab of queries
  request.stop_requested = [] { return true; };
  proxy::attention_received(request, received);
  CHECK(received == std::vector<double>(3, 0.0));
}

TEST_CASE("a cross-layer store ranks by block maxima only from a view that holds them", "[proxies]") {
  // The engine fills BlockView::max_prob only in views whose selectors say they read it
  // (Selector::reads_block_max); a selector that reads it without saying so is an internal error, never a
  // read past an empty array.
  const std::vector<std::int64_t> positions = {5, 9};
  BlockView view;
  view.block = 2;
  view.heads = 2;
  view.rows = 2;
  view.positions = positions.data();
  view.num_blocks = positions.back() / view.block + 1;
  for (std::int64_t i = 0; i < view.heads * view.rows * view.num_blocks; ++i) view.mass.push_back(1.0 / static_cast<double>(i + 1));
  std::vector<std::int64_t> length = {2, 2};
  RankContext c;
  c.kv_group = 0;
  c.group_size = 2;
  c.rows = 2;
  c.positions = positions.data();
  c.view = &view;
  c.ranking_length = length.data();
  proxy::CrossLayerStore store;
  store.reset(1, 2, 2, view.num_blocks);
  store.record(c, proxy::CrossLayerStore::Score::kMass, proxy::CrossLayerStore::Group::kMax);  // mass: always there
  try {
    store.record(c, proxy::CrossLayerStore::Score::kMax, proxy::CrossLayerStore::Group::kMax);
    FAIL("block maxima read from a view without them");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
  }
  view.max_prob = view.mass;
  store.record(c, proxy::CrossLayerStore::Score::kMax, proxy::CrossLayerStore::Group::kMax);
  Rankings out;
  store.recall(c, proxy::CrossLayerStore::Group::kMax, out);
  CHECK(out.size(0, 0) == 2);
  CHECK(out.row(0, 0)[0] == 0);  // the largest value: the first block
}
