// Shares of runs of keys (Backend::key_run_shares' definition, key_run_shares_on_host) against the float64
// reference: MHA, GQA and MQA groups, head_dim not a multiple of 8, sinks, a negative scale, dense layers;
// key_dot's documented order; equal multisets summing alike when ascending; and the contract every backend
// checks.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "backend/backend.hpp"
#include "catch.hpp"
#include "common/error.hpp"
#include "common/key_share.hpp"
#include "reference/key_runs.hpp"
#include "reference/random_capture.hpp"
#include "replay_test_support.hpp"

using namespace hysparse;

namespace {

// Relative, on sums of shares: the fp32 dot rounds each logit to ~1e-7 of sum_c |q_c k_c| (logits up to a few
// tens here), and the tile's fp32 statistics carry the row's log-sum-exp to the same order.
constexpr double kKeyRunTolerance = 2e-5;

struct RunCase {
  std::int64_t q_heads, kv_heads, head_dim, seq_len;
  bool sinks;
  double scale_sign;
};

// MHA, GQA, MQA; head_dim 13 (no 8-wide step), 40 and 100 (a tail of 4); one token; sinks; a negative scale.
const RunCase kRunCases[] = {
    {4, 4, 13, 90, false, 1.0}, {8, 2, 40, 150, true, 1.0}, {6, 1, 100, 70, true, -1.0}, {4, 2, 16, 1, true, 1.0},
};

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

TEST_CASE("Key runs' shares on the host equal the float64 reference", "[key_runs]") {
  double worst = 0.0;
  std::size_t count = 0;
  const auto cpu = make_cpu_backend();
  for (const RunCase& k : kRunCases) {
    CAPTURE(k.q_heads, k.kv_heads, k.head_dim, k.seq_len, k.sinks, k.scale_sign);
    const Capture c = reference::random_capture(reference::one_layer(k.q_heads, k.kv_heads, k.head_dim, k.seq_len, k.sinks),
                                                test::seed() + static_cast<std::uint64_t>(k.seq_len));
    std::vector<std::int64_t> rows;
    for (std::int64_t t = 0; t < k.seq_len; t += 1 + t % 5) rows.push_back(t);
    for (std::int64_t group = 0; group < k.kv_heads; ++group) {
      const StatsRequest req = test::group_request(c, group, rows, 16, false, k.scale_sign);
      StatsTile tile;
      cpu->block_statistics(req, tile);
      const std::vector<KeyRun> runs = reference::random_key_runs(req, test::seed() + static_cast<std::uint64_t>(group), false);
      std::vector<double> sums;
      CHECK_FALSE(cpu->key_run_shares(req, tile, runs, sums));  // the CPU backend leaves them to its caller
      key_run_shares_on_host(req, tile, runs, sums);
      const std::vector<double> expected = reference::naive_key_run_shares(req, runs);
      REQUIRE(sums.size() == runs.size());
      for (std::size_t i = 0; i < runs.size(); ++i) {
        // The definition, key by key: key_share's bits summed in key order or ascending.
        const KeyRun& run = runs[i];
        const float* q = req.q + (run.head * req.seq_len + req.rows[run.row]) * req.head_dim;
        const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(run.head * req.num_rows + run.row)];
        std::vector<double> shares;
        for (std::int64_t j = run.begin; j < run.end; ++j) shares.push_back(key_share(q, req.k + j * req.head_dim, req.head_dim, req.scale, lse_tokens));
        if (run.ascending) std::sort(shares.begin(), shares.end());
        double defined = 0.0;
        for (double share : shares) defined += share;
        CHECK(same_bits(sums[i], defined));
        const double gap = std::fabs(sums[i] - expected[i]) / std::max(expected[i], 1e-300);
        if (runs[i].begin == runs[i].end) CHECK(sums[i] == 0.0);
        worst = std::max(worst, expected[i] > 0 ? gap : 0.0);
        if (!(expected[i] == 0 ? sums[i] == 0 : gap <= kKeyRunTolerance)) {
          CAPTURE(i, runs[i].head, runs[i].row, runs[i].begin, runs[i].end, runs[i].ascending, sums[i], expected[i]);
          CHECK(gap <= kKeyRunTolerance);
        }
      }
      count += runs.size();
    }
  }
  std::printf("key runs, host vs float64: %zu runs, largest relative difference %.2e (tolerance %.0e)\n", count, worst,
              kKeyRunTolerance);
}

TEST_CASE("Key runs of a dense layer are its probabilities over the row's token mass", "[key_runs]") {
  reference::Shape shape;
  shape.layers = 1;
  shape.q_heads = 4;
  shape.kv_heads = 2;
  shape.seq_len = 80;
  shape.dense_layers = {0};
  const Capture c = reference::random_capture(shape, test::seed());
  const std::vector<std::int64_t> rows = {0, 1, 40, 79};
  StatsRequest req;
  req.attn = c.layers[0].attn.data() + 2 * 80 * 80;  // group 1
  req.heads = 2;
  req.seq_len = 80;
  req.rows = rows.data();
  req.num_rows = 4;
  req.block_size = 16;
  StatsTile tile;
  make_cpu_backend()->block_statistics(req, tile);
  const std::vector<KeyRun> runs = reference::random_key_runs(req, test::seed(), false);
  std::vector<double> sums;
  key_run_shares_on_host(req, tile, runs, sums);
  const std::vector<double> expected = reference::naive_key_run_shares(req, runs);
  for (std::size_t i = 0; i < runs.size(); ++i) {
    CAPTURE(i, runs[i].head, runs[i].row, runs[i].begin, runs[i].end);
    CHECK(sums[i] == Approx(expected[i]).epsilon(kKeyRunTolerance).margin(1e-300));
  }
}

TEST_CASE("key_dot sums channel c into sum c mod 8, one fused multiply-add each, combined pairwise", "[key_runs]") {
  std::mt19937_64 rng(test::seed());
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (std::int64_t d : {1, 2, 7, 8, 9, 15, 16, 17, 40, 64, 100, 127, 128, 129, 256}) {
    CAPTURE(d);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> q(static_cast<std::size_t>(d)), k(static_cast<std::size_t>(d));
      for (auto& x : q) x = normal(rng);
      for (auto& x : k) x = normal(rng);
      float s[8] = {};
      for (std::int64_t c = 0; c < d; ++c) s[c % 8] = std::fma(q[static_cast<std::size_t>(c)], k[static_cast<std::size_t>(c)], s[c % 8]);
      const float expected = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
      const float got = key_dot(q.data(), k.data(), d);
      CHECK(std::memcmp(&got, &expected, sizeof got) == 0);
      double exact = 0.0;
      for (std::int64_t c = 0; c < d; ++c) exact += static_cast<double>(q[static_cast<std::size_t>(c)]) * k[static_cast<std::size_t>(c)];
      double magnitude = 0.0;
      for (std::int64_t c = 0; c < d; ++c) magnitude += std::fabs(static_cast<double>(q[static_cast<std::size_t>(c)]) * k[static_cast<std::size_t>(c)]);
      CHECK(std::fabs(static_cast<double>(got) - exact) <= 1e-6 * magnitude + 1e-30);
    }
  }
}

TEST_CASE("Ascending key runs over equal multisets of keys sum to the same bits", "[key_runs]") {
  // Keys 0..15 random, keys 16..31 the same keys in another order: the two runs' shares are one multiset.
  reference::Shape shape;
  shape.layers = 1;
  shape.q_heads = 2;
  shape.kv_heads = 1;
  shape.head_dim = 24;
  shape.seq_len = 40;
  Capture c = reference::random_capture(shape, test::seed());
  std::vector<int> order(16);
  for (int i = 0; i < 16; ++i) order[static_cast<std::size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(test::seed()));
  float* keys = c.layers[0].k.data();
  for (int i = 0; i < 16; ++i) std::copy(keys + order[static_cast<std::size_t>(i)] * 24, keys + (order[static_cast<std::size_t>(i)] + 1) * 24, keys + (16 + i) * 24);
  const std::vector<std::int64_t> rows = {31, 39};
  const StatsRequest req = test::group_request(c, 0, rows, 8, false);
  StatsTile tile;
  make_cpu_backend()->block_statistics(req, tile);
  std::vector<KeyRun> runs;
  for (std::int32_t h = 0; h < 2; ++h) {
    for (std::int32_t r = 0; r < 2; ++r) {
      runs.push_back({h, r, 0, 16, 1});
      runs.push_back({h, r, 16, 32, 1});
    }
  }
  std::vector<double> sums;
  key_run_shares_on_host(req, tile, runs, sums);
  for (std::size_t i = 0; i < runs.size(); i += 2) {
    CAPTURE(i, sums[i], sums[i + 1]);
    CHECK(same_bits(sums[i], sums[i + 1]));
    CHECK(sums[i] > 0.0);
  }
}

TEST_CASE("Key runs outside their tile are the engine's error, not a read", "[key_runs]") {
  reference::Shape shape;
  shape.layers = 1;
  const Capture c = reference::random_capture(shape, test::seed());
  const std::vector<std::int64_t> rows = {10, 50};
  const StatsRequest req = test::group_request(c, 0, rows, 16, false);
  StatsTile tile;
  make_cpu_backend()->block_statistics(req, tile);
  std::vector<double> sums;
  for (const KeyRun& bad : {KeyRun{0, 0, 0, 12, 0}, KeyRun{2, 0, 0, 1, 0}, KeyRun{0, 2, 0, 1, 0}, KeyRun{0, 1, 5, 4, 0},
                            KeyRun{0, 1, -1, 4, 0}, KeyRun{0, 1, 0, 4, 2}}) {
    CAPTURE(bad.head, bad.row, bad.begin, bad.end, bad.ascending);
    CHECK_THROWS_AS(key_run_shares_on_host(req, tile, {KeyRun{0, 0, 0, 11, 1}, bad}, sums), Error);
  }
  StatsRequest without_k = req;
  without_k.k = nullptr;
  CHECK_THROWS_AS(key_run_shares_on_host(without_k, tile, {KeyRun{0, 0, 0, 1, 0}}, sums), Error);
  key_run_shares_on_host(req, tile, {KeyRun{0, 0, 0, 11, 1}, KeyRun{1, 1, 51, 51, 0}}, sums);
  CHECK(sums[0] == Approx(1.0).epsilon(kKeyRunTolerance));  // the whole row
  CHECK(sums[1] == 0.0);
}
