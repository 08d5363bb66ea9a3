// Self-checks of the naive float64 reference (tests/reference/naive_replay.*) on tiny cases whose
// numbers are computed by hand from the README definitions, plus brute-force optimality checks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

#include "catch.hpp"
#include "common/random.hpp"
#include "reference/naive_replay.hpp"

using namespace hysparse;
using namespace hysparse::reference;

namespace {

std::size_t ix(std::int64_t i) { return static_cast<std::size_t>(i); }

Capture make_capture(std::int64_t layers, std::int64_t hq, std::int64_t hkv, std::int64_t T, std::int64_t d,
                     std::optional<double> scale, bool with_v) {
  Capture c;
  c.header.model = "reference-self-test";
  c.header.source = "test_reference_self.cpp";
  c.header.num_layers = layers;
  c.header.num_q_heads = hq;
  c.header.num_kv_heads = hkv;
  c.header.head_dim = d;
  c.header.seq_len = T;
  c.header.softmax_scale = scale;
  c.layers.resize(ix(layers));
  for (auto& layer : c.layers) {
    layer.q.assign(ix(hq * T * d), 0.0f);
    layer.k.assign(ix(hkv * T * d), 0.0f);
    if (with_v) layer.v.assign(ix(hkv * T * d), 0.0f);
  }
  return c;
}

float& q_at(Capture& c, std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t e) {
  return c.layers[ix(l)].q[ix((h * c.header.seq_len + t) * c.header.head_dim + e)];
}
float& k_at(Capture& c, std::int64_t l, std::int64_t g, std::int64_t j, std::int64_t e) {
  return c.layers[ix(l)].k[ix((g * c.header.seq_len + j) * c.header.head_dim + e)];
}
float& v_at(Capture& c, std::int64_t l, std::int64_t g, std::int64_t j, std::int64_t e) {
  return c.layers[ix(l)].v[ix((g * c.header.seq_len + j) * c.header.head_dim + e)];
}

std::vector<std::int64_t> all_rows(std::int64_t T) {
  std::vector<std::int64_t> rows;
  for (std::int64_t t = 0; t < T; ++t) rows.push_back(t);
  return rows;
}

// One layer, one head, T = 4, d = 1, scale 1, q_t = 1, so z_j = k_j and exp(z_j) = w_j with
// w = [1, 2, 4, 1]; v = [1, 0, 0, 1].
Capture example_capture() {
  Capture c = make_capture(1, 1, 1, 4, 1, 1.0, true);
  const double w[4] = {1, 2, 4, 1};
  const float v[4] = {1, 0, 0, 1};
  for (std::int64_t j = 0; j < 4; ++j) {
    q_at(c, 0, 0, j, 0) = 1.0f;
    k_at(c, 0, 0, j, 0) = static_cast<float>(std::log(w[j]));
    v_at(c, 0, 0, j, 0) = v[j];
  }
  return c;
}

RefSelector oracle(std::int64_t block, std::int64_t sinks = 0, std::int64_t window = 0, const char* group = "none") {
  RefSelector s;
  s.kind = "oracle";
  s.block = block;
  s.sinks = sinks;
  s.window = window;
  s.group = group;
  return s;
}
RefSelector swa(std::int64_t block, std::int64_t window, std::int64_t sinks = 0) {
  RefSelector s;
  s.kind = "swa";
  s.block = block;
  s.window = window;
  s.sinks = sinks;
  return s;
}
RefSelector hysparse_sel(std::int64_t block, std::vector<bool> full, const char* score, const char* group,
                         std::int64_t window = 0, std::int64_t sinks = 0) {
  RefSelector s;
  s.kind = "hysparse";
  s.block = block;
  s.full_layers = std::move(full);
  s.score = score;
  s.group = group;
  s.window = window;
  s.sinks = sinks;
  return s;
}
RefBudget tokens(double k) { return RefBudget{false, k}; }
RefBudget sparsity(double s) { return RefBudget{true, s}; }

// Random capture: standard normal q, k, v scaled so rows are peaky; optional random sinks.
Capture random_capture(std::uint64_t salt, std::int64_t layers, std::int64_t hq, std::int64_t hkv, std::int64_t T,
                       std::int64_t d, bool sinks) {
  Capture c = make_capture(layers, hq, hkv, T, d, std::nullopt, true);
  Rng rng(mix_seed(test::seed(), 0x5E1F, salt));
  for (auto& layer : c.layers) {
    for (float& x : layer.q) x = static_cast<float>(1.7 * rng.normal());
    for (float& x : layer.k) x = static_cast<float>(1.7 * rng.normal());
    for (float& x : layer.v) x = static_cast<float>(rng.normal());
    if (sinks) {
      layer.sink_logits.resize(ix(hq));
      for (float& x : layer.sink_logits) x = static_cast<float>(2.0 * rng.normal());
    }
  }
  return c;
}

}  // namespace

TEST_CASE("reference: budget in blocks, forced keys and ranking building blocks", "[reference]") {
  CHECK(naive_num_blocks(0, 2) == 1);
  CHECK(naive_num_blocks(1, 2) == 1);
  CHECK(naive_num_blocks(2, 2) == 2);   // keys 0..2: blocks {0,1}, {2} (partial)
  CHECK(naive_num_blocks(63, 64) == 1);
  CHECK(naive_num_blocks(64, 64) == 2);
  CHECK(naive_budget_blocks(tokens(64), 100, 64) == 1);
  CHECK(naive_budget_blocks(tokens(130), 100, 64) == 2);  // floor(130/64)
  CHECK_THROWS_AS(naive_budget_blocks(tokens(63), 100, 64), std::invalid_argument);
  CHECK(naive_budget_blocks(sparsity(0.5), 3, 2) == 1);    // ceil(0.5*4/2) = 1
  CHECK(naive_budget_blocks(sparsity(0.0), 3, 2) == 2);    // ceil(4/2) = 2
  CHECK(naive_budget_blocks(sparsity(0.5), 4, 1) == 3);    // ceil(2.5) = 3
  CHECK(naive_budget_blocks(sparsity(0.75), 7, 1) == 2);   // ceil(0.25*8) = 2
  CHECK(naive_budget_blocks(sparsity(0.9), 0, 64) == 1);   // ceil(0.1/64) = 1, and at least 1
  CHECK(naive_budget_blocks(sparsity(0.99), 9, 64) == 1);

  // sinks s: [0, min(s,t+1)); window w: [max(0,t-w+1), t].
  CHECK(naive_forced(5, 2, 0) == std::vector<bool>{true, true, false, false, false, false});
  CHECK(naive_forced(5, 0, 2) == std::vector<bool>{false, false, false, false, true, true});
  CHECK(naive_forced(5, 1, 3) == std::vector<bool>{true, false, false, true, true, true});
  CHECK(naive_forced(1, 4, 0) == std::vector<bool>{true, true});
  CHECK(naive_forced(2, 0, 9) == std::vector<bool>{true, true, true});
  CHECK(naive_forced(2, 0, 0) == std::vector<bool>{false, false, false});

  // Higher score first; equal scores: lower index first.
  CHECK(naive_rank({0.5, 0.7, 0.5, 0.7}) == std::vector<std::int64_t>{1, 3, 0, 2});
  CHECK(naive_rank({0.0, 0.0, 0.0}) == std::vector<std::int64_t>{0, 1, 2});
  CHECK(naive_rank({0.1, 0.3, 0.2}) == std::vector<std::int64_t>{1, 2, 0});

  CHECK(naive_recall({0.25, 0.25, 0.5}, {false, true, true}) == Approx(0.75).epsilon(1e-15));
  // Sub-normalised rows (a sink took mass): R is relative to the row's token mass.
  CHECK(naive_recall({0.125, 0.125, 0.25}, {false, true, true}) == Approx(0.75).epsilon(1e-15));
}

TEST_CASE("reference: hand-computed 1-head T=4 example", "[reference]") {
  const Capture c = example_capture();
  // Row 3: w = [1,2,4,1], sum 8: p = [0.125, 0.25, 0.5, 0.125].
  const std::vector<double> p3 = naive_probabilities(c, 0, 0, 3);
  REQUIRE(p3.size() == 4);
  CHECK(p3[0] == Approx(0.125));
  CHECK(p3[1] == Approx(0.25));
  CHECK(p3[2] == Approx(0.5));
  CHECK(p3[3] == Approx(0.125));
  // Row 2: w = [1,2,4]: p = [1,2,4]/7.
  const std::vector<double> p2 = naive_probabilities(c, 0, 0, 2);
  REQUIRE(p2.size() == 3);
  CHECK(p2[2] == Approx(4.0 / 7));
  // o_3 = sum p_j v_j = 0.125*1 + 0.125*1 = 0.25; o_2 = 1/7.
  CHECK(naive_output(c, 0, 0, 3)[0] == Approx(0.25));
  CHECK(naive_output(c, 0, 0, 2)[0] == Approx(1.0 / 7));

  const std::vector<std::int64_t> rows = {0, 1, 2, 3};
  SECTION("oracle, block 2, budget 2 tokens (1 block), no forced keys") {
    const auto r = naive_metrics(c, oracle(2), tokens(2), rows);
    REQUIRE(r.size() == 1);
    REQUIRE(r[0].size() == 1);
    REQUIRE(r[0][0].size() == 4);
    // Row 0: 1 causal block, budget 1 block: saturated, R = 1, |A| = 1, o_A = o.
    CHECK(r[0][0][0].saturated);
    CHECK(r[0][0][0].mass_recall == 1.0);
    CHECK(r[0][0][0].attended == 1);
    CHECK(r[0][0][0].output_rel_error == 0.0);
    // Row 1: floor(1/2)+1 = 1 block: saturated, A = {0,1}.
    CHECK(r[0][0][1].saturated);
    CHECK(r[0][0][1].mass_recall == 1.0);
    CHECK(r[0][0][1].attended == 2);
    // Row 2: blocks {0,1} (M = 3/7) and partial {2} (M = 4/7): picks the partial block.
    // A = {2}: R = 4/7, |A| = 1; o_A = v_2 = 0, o = 1/7: error 1.
    CHECK_FALSE(r[0][0][2].saturated);
    CHECK(r[0][0][2].mass_recall == Approx(4.0 / 7));
    CHECK(r[0][0][2].oracle_recall == Approx(4.0 / 7));
    CHECK(r[0][0][2].topk_overlap == 1.0);
    CHECK(r[0][0][2].attended == 1);
    CHECK(r[0][0][2].output_rel_error == Approx(1.0));
    // Row 3: M = [3/8, 5/8]: picks block 1, A = {2,3}: R = 0.625.
    // o_A = (4*0 + 1*1)/(4+1) = 0.2, o = 0.25: error 0.05/0.25 = 0.2.
    CHECK_FALSE(r[0][0][3].saturated);
    CHECK(r[0][0][3].mass_recall == Approx(0.625));
    CHECK(r[0][0][3].oracle_recall == Approx(0.625));
    CHECK(r[0][0][3].topk_overlap == 1.0);
    CHECK(r[0][0][3].attended == 2);
    CHECK(r[0][0][3].output_rel_error == Approx(0.2));
    CHECK_FALSE(r[0][0][3].full_layer);
  }
  SECTION("oracle with one sink: residual mass, forced key counted in A") {
    const auto r = naive_metrics(c, oracle(2, 1, 0), tokens(2), rows);
    // Row 3: F = {0}; residual r_0 = 2/8, r_1 = 5/8: block 1; A = {0,2,3}: R = 6/8, |A| = 3.
    // o_A = (1*1 + 4*0 + 1*1)/(1+4+1) = 1/3; error (1/3 - 1/4)/(1/4) = 1/3.
    CHECK(r[0][0][3].mass_recall == Approx(0.75));
    CHECK(r[0][0][3].oracle_recall == Approx(0.75));
    CHECK(r[0][0][3].attended == 3);
    CHECK(r[0][0][3].topk_overlap == 1.0);  // O = block 1 = {2,3} is inside A
    CHECK(r[0][0][3].output_rel_error == Approx(1.0 / 3));
    // Row 2: F = {0}; residuals r_0 = 2/7, r_1 = 4/7: A = {0,2}: R = 5/7.
    CHECK(r[0][0][2].mass_recall == Approx(5.0 / 7));
    CHECK(r[0][0][2].attended == 2);
  }
  SECTION("oracle with window 2: the residual flips the choice") {
    const auto r = naive_metrics(c, oracle(2, 0, 2), tokens(2), rows);
    // Row 3: F = {2,3}; residual r_0 = 3/8, r_1 = 0: block 0; A = everything, R = 1, not saturated.
    CHECK_FALSE(r[0][0][3].saturated);
    CHECK(r[0][0][3].mass_recall == Approx(1.0));
    CHECK(r[0][0][3].attended == 4);
    CHECK(r[0][0][3].topk_overlap == 1.0);  // O = block 1 (M 5/8) is inside A
    CHECK(r[0][0][3].output_rel_error == Approx(0.0).margin(1e-12));
  }
  SECTION("oracle, budget covering the row: saturated") {
    const auto r = naive_metrics(c, oracle(2), tokens(4), rows);
    for (int i = 0; i < 4; ++i) {
      CHECK(r[0][0][ix(i)].saturated);
      CHECK(r[0][0][ix(i)].mass_recall == 1.0);
      CHECK(r[0][0][ix(i)].oracle_recall == 1.0);
      CHECK(r[0][0][ix(i)].topk_overlap == 1.0);
      CHECK(r[0][0][ix(i)].attended == i + 1);
      CHECK(r[0][0][ix(i)].output_rel_error == 0.0);
    }
  }
  SECTION("sparsity budget") {
    // s = 0.5, B = 2: n_3 = ceil(0.5*4/2) = 1, n_2 = ceil(0.75) = 1: same as 1 block.
    const auto r = naive_metrics(c, oracle(2), sparsity(0.5), rows);
    CHECK(r[0][0][3].mass_recall == Approx(0.625));
    CHECK(r[0][0][2].mass_recall == Approx(4.0 / 7));
    // s = 0.5, B = 1: n_3 = 2 tokens: {2, 1} -> R = 6/8; n_2 = ceil(1.5) = 2: {2, 1} -> 6/7.
    const auto t = naive_metrics(c, oracle(1), sparsity(0.5), rows);
    CHECK(t[0][0][3].mass_recall == Approx(0.75));
    CHECK(t[0][0][3].attended == 2);
    CHECK(t[0][0][2].mass_recall == Approx(6.0 / 7));
    CHECK(t[0][0][0].saturated);  // n_0 = ceil(0.5) = 1 = 1 block
  }
  SECTION("top-k overlap of a poor selection") {
    // swa window 1 at B = 2, 1 block: row 3 A = {3}, O = block 1 = {2,3}: overlap 1/2.
    const auto r = naive_metrics(c, swa(2, 1), tokens(2), rows);
    CHECK(r[0][0][3].topk_overlap == Approx(0.5));
    CHECK(r[0][0][3].mass_recall == Approx(0.125));
    // Row 2: A = {2}, O = block 1 = {2}: overlap 1.
    CHECK(r[0][0][2].topk_overlap == 1.0);
  }
}

TEST_CASE("reference: sink logits reduce p but not the recall of full attention", "[reference]") {
  Capture c = example_capture();
  c.layers[0].sink_logits = {static_cast<float>(std::log(8.0))};
  // Row 3: denominators 8 + 8 = 16: p = [1,2,4,1]/16, token mass 0.5.
  const std::vector<double> p = naive_probabilities(c, 0, 0, 3);
  CHECK(p[0] == Approx(1.0 / 16));
  CHECK(p[2] == Approx(0.25));
  double mass = 0;
  for (double x : p) mass += x;
  CHECK(mass == Approx(0.5));
  // o = (1*1 + 1*1)/16 = 0.125.
  CHECK(naive_output(c, 0, 0, 3)[0] == Approx(0.125));

  const std::vector<std::int64_t> rows = {0, 1, 2, 3};
  // Full attention (budget covers the row): R = 1 exactly, output error 0.
  const auto full = naive_metrics(c, oracle(2), tokens(4), rows);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CHECK(full[0][0][i].mass_recall == 1.0);
    CHECK(full[0][0][i].output_rel_error == 0.0);
  }
  // One block: R is relative to the token mass, so unchanged by the sink: 0.625.
  // o_A = (4*0 + 1*1)/(8 + 4 + 1) = 1/13; error (1/8 - 1/13)/(1/8) = 5/13.
  const auto one = naive_metrics(c, oracle(2), tokens(2), rows);
  CHECK(one[0][0][3].mass_recall == Approx(0.625));
  CHECK(one[0][0][3].output_rel_error == Approx(5.0 / 13));
  // Row 2: p = [1,2,4]/(8+7); R of the partial block {2} = 4/7.
  CHECK(one[0][0][2].mass_recall == Approx(4.0 / 7));
  // A hysparse full layer is R = 1 too.
  Capture two = c;
  two.header.num_layers = 2;
  two.layers.push_back(two.layers[0]);
  const auto hy = naive_metrics(two, hysparse_sel(2, {true, false}, "max", "max"), tokens(2), rows);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CHECK(hy[0][0][i].full_layer);
    CHECK(hy[0][0][i].mass_recall == 1.0);
    CHECK(hy[0][0][i].attended == static_cast<double>(i + 1));
    CHECK(hy[0][0][i].output_rel_error == 0.0);
  }
}

TEST_CASE("reference: the partial last block is a candidate and counts as one block", "[reference]") {
  // T = 4, B = 3: row 3 has blocks {0,1,2} and the partial {3}.
  Capture c = make_capture(1, 1, 1, 4, 1, 1.0, false);
  const double w[4] = {1, 1, 1, 8};
  for (std::int64_t j = 0; j < 4; ++j) {
    q_at(c, 0, 0, j, 0) = 1.0f;
    k_at(c, 0, 0, j, 0) = static_cast<float>(std::log(w[j]));
  }
  const std::vector<std::int64_t> rows = {3};
  // Budget 3 tokens = 1 block: M = [3/11, 8/11]: the partial block wins, |A| = 1, R = 8/11.
  const auto r = naive_metrics(c, oracle(3), tokens(3), rows);
  CHECK_FALSE(r[0][0][0].saturated);
  CHECK(r[0][0][0].mass_recall == Approx(8.0 / 11));
  CHECK(r[0][0][0].attended == 1);
  CHECK(std::isnan(r[0][0][0].output_rel_error));  // no v captured
  // Budget 5 tokens is still floor(5/3) = 1 block.
  CHECK(naive_metrics(c, oracle(3), tokens(5), rows)[0][0][0].mass_recall == Approx(8.0 / 11));
  // Budget 6 tokens = 2 blocks covers both (the partial one counts as a whole block): saturated.
  const auto s = naive_metrics(c, oracle(3), tokens(6), rows);
  CHECK(s[0][0][0].saturated);
  CHECK(s[0][0][0].mass_recall == 1.0);
  CHECK(s[0][0][0].attended == 4);
  // Sparsity 0.5: n_3 = ceil(0.5*4/3) = 1 block.
  CHECK(naive_metrics(c, oracle(3), sparsity(0.5), rows)[0][0][0].mass_recall == Approx(8.0 / 11));
}

TEST_CASE("reference: ties go to the lower block index", "[reference]") {
  // All logits 0: uniform rows, p_j = 1/(t+1) exactly, every block ties.
  Capture c = make_capture(2, 1, 1, 4, 1, 1.0, false);
  const std::vector<std::int64_t> rows = {3};
  // B = 1, 2 blocks: keys {0,1}: R = 0.5.
  auto r = naive_metrics(c, oracle(1), tokens(2), rows);
  CHECK(r[0][0][0].mass_recall == 0.5);
  CHECK(r[0][0][0].topk_overlap == 1.0);  // O is also {0,1}
  // B = 2, 1 block: block 0.
  r = naive_metrics(c, oracle(2), tokens(2), rows);
  CHECK(r[0][0][0].mass_recall == 0.5);
  // Window 1 forces {3}: residual of block 3 is 0, the others tie at 0.25: {0,1} + {3}.
  r = naive_metrics(c, oracle(1, 0, 1), tokens(2), rows);
  CHECK(r[0][0][0].mass_recall == 0.75);
  CHECK(r[0][0][0].attended == 3);
  // One sink forces {0}: residual of block 0 is 0: {1,2} + {0}.
  r = naive_metrics(c, oracle(1, 1, 0), tokens(2), rows);
  CHECK(r[0][0][0].mass_recall == 0.75);
  CHECK(r[0][0][0].attended == 3);
  CHECK(r[0][0][0].topk_overlap == 1.0);  // O = {0,1}, both in A = {0,1,2}
  // hysparse on layer 1: P_b ties at 0.25 -> block 0 = {0,1}: R = 0.5; with window 1: {0,1,3}.
  r = naive_metrics(c, hysparse_sel(2, {true, false}, "max", "max"), tokens(2), rows);
  CHECK(r[1][0][0].mass_recall == 0.5);
  r = naive_metrics(c, hysparse_sel(2, {true, false}, "max", "max", 1), tokens(2), rows);
  CHECK(r[1][0][0].mass_recall == 0.75);
  CHECK(r[1][0][0].attended == 3);
}

TEST_CASE("reference: swa window equals the budget", "[reference]") {
  const Capture c = example_capture();  // w = [1,2,4,1]
  const std::vector<std::int64_t> rows = {0, 1, 2, 3};
  // B = 2, budget 2 tokens: 1 block, window 2.
  const auto r = naive_metrics(c, swa(2, -1), tokens(2), rows);
  CHECK(r[0][0][3].mass_recall == Approx(5.0 / 8));  // A = {2,3}
  CHECK(r[0][0][3].attended == 2);
  CHECK(r[0][0][2].mass_recall == Approx(6.0 / 7));  // A = {1,2}
  CHECK(r[0][0][2].attended == 2);
  CHECK(r[0][0][0].mass_recall == 1.0);
  // The per-head oracle spends the same budget on blocks (the budget window is not a fixed forced key):
  // row 3's best single block is block 1 = {2, 3}, 5/8 of the mass.
  CHECK(r[0][0][3].oracle_recall == Approx(5.0 / 8));
  CHECK(r[0][0][3].topk_overlap == 1.0);  // O = block 1 = {2,3}
  // Same as an explicit window 2.
  const auto e = naive_metrics(c, swa(2, 2), tokens(2), rows);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CHECK(e[0][0][i].mass_recall == r[0][0][i].mass_recall);
    CHECK(e[0][0][i].attended == r[0][0][i].attended);
  }
  // Budget 3 tokens at B = 2 is still 1 block: window n*B = 2, not 3.
  const auto k3 = naive_metrics(c, swa(2, -1), tokens(3), rows);
  CHECK(k3[0][0][3].attended == 2);
  CHECK(k3[0][0][3].mass_recall == Approx(5.0 / 8));
  // B = 1, 3 tokens: window 3: A = {1,2,3}: R = 7/8.
  const auto b1 = naive_metrics(c, swa(1, -1), tokens(3), rows);
  CHECK(b1[0][0][3].attended == 3);
  CHECK(b1[0][0][3].mass_recall == Approx(7.0 / 8));
  // Sparsity 0.5, B = 1: n_3 = 2 -> window 2; n_2 = ceil(1.5) = 2 -> window 2.
  const auto sp = naive_metrics(c, swa(1, -1), sparsity(0.5), rows);
  CHECK(sp[0][0][3].mass_recall == Approx(5.0 / 8));
  CHECK(sp[0][0][2].mass_recall == Approx(6.0 / 7));
  CHECK(sp[0][0][2].attended == 2);
  // With one sink: A = {0} + {2,3}: R = 6/8; o_A = (1 + 0 + 1)/(1 + 4 + 1) = 1/3.
  const auto sk = naive_metrics(c, swa(2, -1, 1), tokens(2), rows);
  CHECK(sk[0][0][3].mass_recall == Approx(0.75));
  CHECK(sk[0][0][3].attended == 3);
  CHECK(sk[0][0][3].output_rel_error == Approx(1.0 / 3));
  // An explicit window ignores the budget: at a saturating budget the row is flagged saturated
  // (the budget covers every block) but swa still attends only its forced keys.
  const auto sat = naive_metrics(c, swa(2, 1), tokens(4), rows);
  CHECK(sat[0][0][3].saturated);
  CHECK(sat[0][0][3].attended == 1);
  CHECK(sat[0][0][3].mass_recall == Approx(1.0 / 8));
  CHECK(sat[0][0][3].oracle_recall == 1.0);
}

TEST_CASE("reference: hysparse ranks by the full layer's true block max (sink in the denominator)", "[reference]") {
  // 2 layers (identical), 2 query heads sharing 1 KV head, d = 2, T = 4, scale 1.
  // k_j = (a_j, b_j), a = [ln4, 0, 0, 0], b = [0, 0, ln2, 0]; head 0 reads a (q = (1,0)), head 1 reads b (q = (0,1)).
  // Row 3 weights: head 0 w = [4,1,1,1] (sum 7), head 1 w = [1,1,2,1] (sum 5).
  Capture c = make_capture(2, 2, 1, 4, 2, 1.0, true);
  for (std::int64_t l = 0; l < 2; ++l) {
    const double a[4] = {4, 1, 1, 1}, b[4] = {1, 1, 2, 1};
    for (std::int64_t j = 0; j < 4; ++j) {
      k_at(c, l, 0, j, 0) = static_cast<float>(std::log(a[j]));
      k_at(c, l, 0, j, 1) = static_cast<float>(std::log(b[j]));
      q_at(c, l, 0, j, 0) = 1.0f;
      q_at(c, l, 1, j, 1) = 1.0f;
      v_at(c, l, 0, j, 0) = static_cast<float>(j);
      v_at(c, l, 0, j, 1) = 1.0f;
    }
  }
  const std::vector<std::int64_t> rows = {3};
  const std::vector<bool> full = {true, false};

  SECTION("without sinks") {
    // P_b: head 0 [4/7, 1/7], head 1 [1/5, 2/5]; group max: [4/7, 2/5] -> block 0.
    // Layer 1 R: head 0 M_0 = 5/7, head 1 M_0 = 2/5.
    const auto r = naive_metrics(c, hysparse_sel(2, full, "max", "max"), tokens(2), rows);
    CHECK(r[0][0][0].full_layer);
    CHECK(r[0][1][0].full_layer);
    CHECK(r[0][0][0].mass_recall == 1.0);
    CHECK(r[0][0][0].oracle_recall == 1.0);
    CHECK(r[0][0][0].topk_overlap == 1.0);
    CHECK(r[0][0][0].attended == 4);
    CHECK(r[0][0][0].output_rel_error == 0.0);
    CHECK_FALSE(r[1][0][0].full_layer);
    CHECK(r[1][0][0].mass_recall == Approx(5.0 / 7));
    CHECK(r[1][1][0].mass_recall == Approx(2.0 / 5));
    CHECK(r[1][1][0].oracle_recall == Approx(3.0 / 5));  // head 1's own best block is 1
    CHECK(r[1][1][0].topk_overlap == 0.0);
    CHECK(r[1][0][0].topk_overlap == 1.0);
  }
  SECTION("with sinks: s = [ln 93, 0]") {
    for (auto& layer : c.layers) layer.sink_logits = {static_cast<float>(std::log(93.0)), 0.0f};
    // Head 0: p = [4,1,1,1]/(93+7) -> P_b = [0.04, 0.01]. Head 1: p = [1,1,2,1]/(1+5) -> P_b = [1/6, 1/3].
    // score max, group max: [1/6, 1/3] -> block 1: R head 0 = 2/7, head 1 = 3/5.
    auto r = naive_metrics(c, hysparse_sel(2, full, "max", "max"), tokens(2), rows);
    CHECK(r[1][0][0].mass_recall == Approx(2.0 / 7));
    CHECK(r[1][1][0].mass_recall == Approx(3.0 / 5));
    CHECK(r[1][0][0].oracle_recall == Approx(5.0 / 7));
    CHECK(r[1][0][0].topk_overlap == 0.0);
    CHECK(r[1][1][0].topk_overlap == 1.0);
    CHECK(r[1][0][0].attended == 2);
    // score max, group sum: [0.04 + 1/6, 0.01 + 1/3] -> block 1.
    r = naive_metrics(c, hysparse_sel(2, full, "max", "sum"), tokens(2), rows);
    CHECK(r[1][0][0].mass_recall == Approx(2.0 / 7));
    // score mass ignores the sink: M head 0 [5/7, 2/7], head 1 [2/5, 3/5]; max: [5/7, 3/5] -> block 0.
    r = naive_metrics(c, hysparse_sel(2, full, "mass", "max"), tokens(2), rows);
    CHECK(r[1][0][0].mass_recall == Approx(5.0 / 7));
    CHECK(r[1][1][0].mass_recall == Approx(2.0 / 5));
    // sum: [5/7 + 2/5, 2/7 + 3/5] -> block 0.
    r = naive_metrics(c, hysparse_sel(2, full, "mass", "sum"), tokens(2), rows);
    CHECK(r[1][1][0].mass_recall == Approx(2.0 / 5));
    // The layer's own window is added: window 2 with score mass -> block 0 + {2,3} = everything.
    r = naive_metrics(c, hysparse_sel(2, full, "mass", "max", 2), tokens(2), rows);
    CHECK(r[1][1][0].mass_recall == Approx(1.0));
    CHECK(r[1][1][0].attended == 4);
    // Sinks 1 with score max: block 1 + {0}: head 0 R = (4+1+1)/7.
    r = naive_metrics(c, hysparse_sel(2, full, "max", "max", 0, 1), tokens(2), rows);
    CHECK(r[1][0][0].mass_recall == Approx(6.0 / 7));
    CHECK(r[1][0][0].attended == 3);
  }
}

TEST_CASE("reference: hysparse with layer 1 == layer 0 matches the group oracle on layer 0", "[reference]") {
  // GQA: 4 query heads, 2 KV heads; T = 37 with B = 8 (partial last block).
  Capture c = random_capture(1, 2, 4, 2, 37, 8, false);
  c.layers[1] = c.layers[0];
  const std::vector<std::int64_t> rows = all_rows(37);
  for (const char* group : {"max", "sum"}) {
    for (const RefBudget& budget : {tokens(8), tokens(16), tokens(24), sparsity(0.6)}) {
      // Without forced keys the oracle's residual mass is M_b, which is hysparse's "mass" score.
      const auto hy = naive_metrics(c, hysparse_sel(8, {true, false}, "mass", group), budget, rows);
      const auto orc = naive_metrics(c, oracle(8, 0, 0, group), budget, rows);
      for (std::size_t h = 0; h < 4; ++h) {
        for (std::size_t i = 0; i < rows.size(); ++i) {
          CHECK(hy[1][h][i].mass_recall == Approx(orc[0][h][i].mass_recall).epsilon(1e-12));
          CHECK(hy[1][h][i].attended == orc[0][h][i].attended);
          CHECK(hy[1][h][i].oracle_recall == Approx(orc[0][h][i].oracle_recall).epsilon(1e-12));
        }
      }
    }
  }
}

TEST_CASE("reference: reuse matrix", "[reference]") {
  SECTION("hand-computed: block max ranking differs from block mass ranking") {
    // Layer 0: w = [3,3,4,1]; layer 1: uniform (all logits 0).
    Capture c = make_capture(2, 1, 1, 4, 1, 1.0, false);
    const double w[4] = {3, 3, 4, 1};
    for (std::int64_t j = 0; j < 4; ++j) {
      q_at(c, 0, 0, j, 0) = 1.0f;
      k_at(c, 0, 0, j, 0) = static_cast<float>(std::log(w[j]));
    }
    const auto m = naive_reuse_matrix(c, 2, 2, {2, 3});
    // Layer 0, row 3: P_b = [3/11, 4/11] -> block 1 (though M_b = [6/11, 5/11]): R = 5/11.
    //          row 2: P_b = [3/10, 4/10] -> block 1 = {2}: R = 4/10.
    CHECK(m[0][0] == Approx((5.0 / 11 + 0.4) / 2));
    // Layer 1 under layer 0's blocks: row 3 {2,3} -> 1/2; row 2 {2} -> 1/3.
    CHECK(m[0][1] == Approx((0.5 + 1.0 / 3) / 2));
    // Layer 1 on its own: ties -> block 0: row 3 {0,1} -> 1/2; row 2 {0,1} -> 2/3.
    CHECK(m[1][1] == Approx((0.5 + 2.0 / 3) / 2));
    CHECK(std::isnan(m[1][0]));
    // The oracle picks block 0 on layer 0 row 3: 6/11 > 5/11.
    CHECK(naive_metrics(c, oracle(2), tokens(2), {3})[0][0][0].mass_recall == Approx(6.0 / 11));
  }
  SECTION("1-head model: the diagonal is the per-head P_b-ranked recall") {
    const Capture c = random_capture(2, 3, 1, 1, 29, 4, true);
    const std::vector<std::int64_t> rows = all_rows(29);
    const std::int64_t B = 4, k = 8;
    const auto m = naive_reuse_matrix(c, B, k, rows);
    for (std::int64_t l = 0; l < 3; ++l) {
      double sum = 0;
      for (std::int64_t t : rows) {
        const std::vector<double> p = naive_probabilities(c, l, 0, t);
        const std::int64_t nb = naive_num_blocks(t, B);
        std::vector<double> pb(ix(nb), 0.0);
        for (std::int64_t j = 0; j <= t; ++j) pb[ix(j / B)] = std::max(pb[ix(j / B)], p[ix(j)]);
        const std::vector<std::int64_t> order = naive_rank(pb);
        std::vector<bool> A(ix(t + 1), false);
        for (std::int64_t i = 0; i < std::min<std::int64_t>(k / B, nb); ++i) {
          for (std::int64_t j = order[ix(i)] * B; j < std::min((order[ix(i)] + 1) * B, t + 1); ++j) A[ix(j)] = true;
        }
        sum += naive_recall(p, A);
      }
      CHECK(m[ix(l)][ix(l)] == Approx(sum / static_cast<double>(rows.size())).epsilon(1e-12));
      for (std::int64_t f = l + 1; f < 3; ++f) CHECK(std::isnan(m[ix(f)][ix(l)]));
    }
  }
  SECTION("GQA: row f of the matrix is the mean hysparse recall of the layers after full layer f") {
    const Capture c = random_capture(3, 4, 4, 2, 33, 8, true);
    const std::vector<std::int64_t> rows = all_rows(33);
    const auto m = naive_reuse_matrix(c, 8, 16, rows);
    // Full layers 0 and 2: layer 1 reads layer 0, layer 3 reads layer 2.
    const auto hy = naive_metrics(c, hysparse_sel(8, {true, false, true, false}, "max", "max"), tokens(16), rows);
    for (std::int64_t l : {1, 3}) {
      double sum = 0;
      for (std::size_t h = 0; h < 4; ++h) {
        for (std::size_t i = 0; i < rows.size(); ++i) sum += hy[ix(l)][h][i].mass_recall;
      }
      CHECK(m[ix(l - 1)][ix(l)] == Approx(sum / static_cast<double>(4 * rows.size())).epsilon(1e-12));
    }
  }
}

TEST_CASE("reference: dense attn layers give probabilities directly and no output error", "[reference]") {
  Capture c = make_capture(1, 1, 1, 4, 1, std::nullopt, false);
  c.layers[0].q.clear();
  c.layers[0].k.clear();
  // Lower triangle given (row 3 sums to 0.5, as if a sink took half); j > t holds garbage to be ignored.
  c.layers[0].attn = {1.0f, 9.0f, 9.0f, 9.0f,   //
                      0.5f, 0.5f, 9.0f, 9.0f,   //
                      0.2f, 0.3f, 0.5f, 9.0f,   //
                      0.05f, 0.1f, 0.15f, 0.2f};
  const std::vector<double> p1 = naive_probabilities(c, 0, 0, 1);
  REQUIRE(p1.size() == 2);
  CHECK(p1[1] == Approx(0.5));
  const auto r = naive_metrics(c, oracle(2), tokens(2), {1, 2, 3});
  // Row 3: M = [0.15/0.5, 0.35/0.5] -> block 1: R = 0.7.
  CHECK(r[0][0][2].mass_recall == Approx(0.7));
  // Row 2: M = [0.5, 0.5] tie -> block 0: R = 0.5.
  CHECK(r[0][0][1].mass_recall == Approx(0.5));
  CHECK(r[0][0][0].saturated);
  for (const auto& row : r[0][0]) CHECK(std::isnan(row.output_rel_error));
  c.layers[0].v.assign(4, 1.0f);  // even with v: no logits, no output error
  CHECK(std::isnan(naive_metrics(c, oracle(2), tokens(2), {3})[0][0][0].output_rel_error));
  // Reuse on a dense layer: row 3 P_b = [0.1, 0.2] -> block 1: R = 0.7.
  CHECK(naive_reuse_matrix(c, 2, 2, {3})[0][0] == Approx(0.7));
}

TEST_CASE("reference: the oracle is optimal given the forced keys (brute force)", "[reference]") {
  // 2 query heads sharing a KV head, with sinks: per-head oracle maximises each head's R, the sum
  // oracle maximises the group-mean R, over every choice of n blocks.
  const Capture c = random_capture(4, 1, 2, 1, 13, 4, true);
  const std::int64_t B = 2;
  for (std::int64_t sinks : {0, 1}) {
    for (std::int64_t window : {0, 3}) {
      for (std::int64_t t = 0; t < 13; ++t) {
        const std::int64_t nb = naive_num_blocks(t, B);
        const std::vector<bool> F = naive_forced(t, sinks, window);
        const std::vector<double> p0 = naive_probabilities(c, 0, 0, t), p1 = naive_probabilities(c, 0, 1, t);
        for (std::int64_t n = 1; n <= nb; ++n) {
          const auto none = naive_metrics(c, oracle(B, sinks, window, "none"), tokens(static_cast<double>(n * B)), {t});
          const auto sum = naive_metrics(c, oracle(B, sinks, window, "sum"), tokens(static_cast<double>(n * B)), {t});
          double best0 = 0, best1 = 0, best_mean = 0;
          for (std::uint32_t mask = 0; mask < (1u << nb); ++mask) {
            if (static_cast<std::int64_t>(__builtin_popcount(mask)) != n) continue;
            std::vector<bool> A = F;
            for (std::int64_t j = 0; j <= t; ++j) {
              if (mask & (1u << (j / B))) A[ix(j)] = true;
            }
            const double r0 = naive_recall(p0, A), r1 = naive_recall(p1, A);
            best0 = std::max(best0, r0);
            best1 = std::max(best1, r1);
            best_mean = std::max(best_mean, (r0 + r1) / 2);
          }
          CHECK(none[0][0][0].mass_recall == Approx(best0).epsilon(1e-12));
          CHECK(none[0][1][0].mass_recall == Approx(best1).epsilon(1e-12));
          CHECK(none[0][0][0].oracle_recall == none[0][0][0].mass_recall);
          CHECK((sum[0][0][0].mass_recall + sum[0][1][0].mass_recall) / 2 == Approx(best_mean).epsilon(1e-12));
          CHECK(sum[0][0][0].saturated == (n == nb));
        }
      }
    }
  }
}

TEST_CASE("reference: budgets are nested and no selector beats the per-head oracle", "[reference]") {
  const Capture c = random_capture(5, 3, 4, 2, 41, 6, true);
  const std::vector<std::int64_t> rows = all_rows(41);
  const std::vector<RefSelector> selectors = {
      oracle(4, 1, 4, "none"), oracle(4, 0, 0, "sum"), oracle(4, 2, 0, "max"), swa(4, -1, 1),
      hysparse_sel(4, {true, false, false}, "max", "max", 4, 1), hysparse_sel(4, {true, false, true}, "mass", "sum")};
  for (const RefSelector& sel : selectors) {
    std::vector<std::vector<std::vector<RefRowMetrics>>> previous;
    for (double k : {4.0, 8.0, 12.0, 24.0, 44.0}) {
      const auto r = naive_metrics(c, sel, tokens(k), rows);
      for (std::size_t l = 0; l < 3; ++l) {
        for (std::size_t h = 0; h < 4; ++h) {
          for (std::size_t i = 0; i < rows.size(); ++i) {
            const RefRowMetrics& m = r[l][h][i];
            // A budget-sized window spans up to n+1 blocks, so it may beat the n-block oracle.
            if (!(sel.kind == "swa" && sel.window == -1)) CHECK(m.mass_recall <= m.oracle_recall + 1e-12);
            CHECK(m.mass_recall <= 1.0 + 1e-12);
            CHECK(m.topk_overlap >= 0.0);
            CHECK(m.topk_overlap <= 1.0);
            CHECK(m.attended <= static_cast<double>(rows[i] + 1));
            if (m.saturated && sel.kind != "swa") CHECK(m.mass_recall == 1.0);
            if (!previous.empty()) {
              CHECK(m.mass_recall >= previous[l][h][i].mass_recall - 1e-12);
              CHECK(m.attended >= previous[l][h][i].attended);
            }
          }
        }
      }
      previous = r;
    }
  }
}

TEST_CASE("reference: naive_output is sum_j p_j v_j", "[reference]") {
  const Capture c = random_capture(6, 1, 2, 1, 9, 3, true);
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t t = 0; t < 9; ++t) {
      const std::vector<double> p = naive_probabilities(c, 0, h, t);
      const std::vector<double> o = naive_output(c, 0, h, t);
      for (std::int64_t e = 0; e < 3; ++e) {
        double expect = 0;
        for (std::int64_t j = 0; j <= t; ++j) expect += p[ix(j)] * static_cast<double>(c.layers[0].v[ix(j * 3 + e)]);
        CHECK(o[ix(e)] == Approx(expect).epsilon(1e-12).margin(1e-15));
      }
    }
  }
}

TEST_CASE("reference: invalid selectors and budgets are rejected", "[reference]") {
  const Capture c = example_capture();
  Capture two = c;
  two.header.num_layers = 2;
  two.layers.push_back(two.layers[0]);
  const std::vector<std::int64_t> rows = {3};
  CHECK_THROWS_AS(naive_metrics(c, oracle(2), tokens(1), rows), std::invalid_argument);      // k < B
  CHECK_THROWS_AS(naive_metrics(c, oracle(2), sparsity(1.0), rows), std::invalid_argument);  // s not in [0,1)
  CHECK_THROWS_AS(naive_metrics(c, oracle(2), tokens(2), {4}), std::invalid_argument);       // row >= T
  CHECK_THROWS_AS(naive_metrics(c, oracle(2, 0, 0, "mean"), tokens(2), rows), std::invalid_argument);
  RefSelector unknown = oracle(2);
  unknown.kind = "quest";
  CHECK_THROWS_AS(naive_metrics(c, unknown, tokens(2), rows), std::invalid_argument);
  CHECK_THROWS_AS(naive_metrics(two, hysparse_sel(2, {false, true}, "max", "max"), tokens(2), rows),
                  std::invalid_argument);  // layer 0 sparse
  CHECK_THROWS_AS(naive_metrics(two, hysparse_sel(2, {true}, "max", "max"), tokens(2), rows), std::invalid_argument);
  CHECK_THROWS_AS(naive_metrics(two, hysparse_sel(2, {true, false}, "max", "none"), tokens(2), rows),
                  std::invalid_argument);
  CHECK_THROWS_AS(naive_metrics(two, hysparse_sel(2, {true, false}, "sum", "max"), tokens(2), rows),
                  std::invalid_argument);
  CHECK_THROWS_AS(naive_reuse_matrix(c, 4, 2, rows), std::invalid_argument);  // budget < block
}
