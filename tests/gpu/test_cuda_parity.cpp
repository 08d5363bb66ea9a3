// The CUDA backend against the CPU backend: raw block statistics and whole replay reports,
// on random and adversarial inputs, in every precision. Runs only where a GPU exists
// (gpu_main.cpp skips otherwise).
//
// What is compared, and why the tolerances are what they are:
// - fp32: both sides form fp32 products of the same fp32 values; only summation orders differ
//   (a few ulps of the largest partial sums), so logits agree to ~1e-6 and block masses
//   M_b = l_b exp(m_b - lse_all) to ~1e-6 relative: tolerance 1e-5 relative on masses, 1e-4
//   absolute on logit-valued numbers (block max, log-sum-exps), 1e-4 relative on outputs.
// - bf16/fp16 on inputs exact in that type (a bf16 capture, the usual case): the device rounding
//   changes nothing, the products are exact in fp32 on both sides, so the same tolerances hold.
//   This checks the tensor-core kernel itself.
// - bf16/fp16 on arbitrary fp32 inputs: each input moves by at most u |x| (u = 2^-9 for bf16,
//   2^-12 for fp16), so a logit moves by at most delta_row = (2u + u^2) |scale| max_j sum_c |q_c k_cj|,
//   and a block mass (a ratio of two sums of exponentials of such logits) by at most a factor
//   exp(+-2 delta_row): the test holds every mass to expm1(2 delta_row) relative (plus the fp32
//   tolerance) and prints the largest errors seen, which are far below that worst case.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/error.hpp"
#include "common/half.hpp"
#include "common/portable_exp.hpp"
#include "common/random.hpp"
#include "cuda_backend.hpp"
#include "device_statistics.hpp"
#include "replay/engine.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"
#include "reference/naive_proxies.hpp"
#include "reference/output_walks.hpp"
#include "reference/token_score_requests.hpp"
#include "replay_test_support.hpp"
#include "synth/synth.hpp"

using namespace hysparse;
using test::group_request;
namespace ref = hysparse::reference;

namespace {

// The longest prefix this GPU ranks (ranked_prefix_limit of its shared memory: 16,384 on Hopper, 8,192 on an
// A100 or a compute capability 8.6/8.9 card); longer ones are left to the host.
std::int64_t device_prefix_limit() {
  int device = 0, shared = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess);
  return hysparse::cuda::ranked_prefix_limit(static_cast<std::size_t>(shared));
}

// The least power of two >= n: the entries a row of n occupies in a thread block's ranking.
int padded_size_of(int n) {
  int padded = 1;
  while (padded < n) padded <<= 1;
  return padded;
}

constexpr double kGpuMassTolerance = 1e-5;      // relative, block masses and mass metrics
constexpr double kGpuLogitTolerance = 1e-4;     // absolute: block max logits and log-sum-exps
constexpr double kGpuOutputTolerance = 1e-4;    // relative, per output vector
constexpr double kGpuOutputErrorTolerance = 1e-5;  // absolute, on output-error metrics (of order 1)
constexpr double kBf16UnitRoundoff = 1.0 / 512.0;   // 2^-9: bf16 keeps 8 significant bits
constexpr double kFp16UnitRoundoff = 1.0 / 4096.0;  // 2^-12: fp16 keeps 11 significant bits (normal range)
// Tensor-core kernels against each other on the same rounded inputs (relative for block maxima
// and sums, absolute for log-sum-exps): the mma.sync layouts form the same products in the same
// order (equal in practice); wgmma's accumulation order inside the tensor core is its own.
constexpr double kKernelAgreementTolerance = 1e-5;
// Received attention (double logits on both sides; GEMM and log-sum-exp orders and exp/log differ):
// relative, per key's sum.
constexpr double kReceivedTolerance = 1e-11;

float round_to(Precision precision, float x) {
  switch (precision) {
    case Precision::kBf16: return bfloat16_to_float(float_to_bfloat16(x));
    case Precision::kFp16: return half_to_float(float_to_half(x));
    case Precision::kFp32: return x;
  }
  return x;
}

Capture gaussian_capture(std::int64_t layers, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t d, std::int64_t T,
                         bool sinks, bool ties, std::uint64_t seed, Precision exact_in = Precision::kFp32) {
  Capture c;
  c.header.model = "gpu-parity";
  c.header.source = "tests";
  c.header.num_layers = layers;
  c.header.num_q_heads = q_heads;
  c.header.num_kv_heads = kv_heads;
  c.header.head_dim = d;
  c.header.seq_len = T;
  Rng rng(seed);
  auto draw = [&]() { return ties ? static_cast<float>(static_cast<int>(rng.below(3)) - 1) : static_cast<float>(rng.normal()); };
  for (std::int64_t l = 0; l < layers; ++l) {
    LayerTensors t;
    t.q.resize(static_cast<std::size_t>(q_heads * T * d));
    t.k.resize(static_cast<std::size_t>(kv_heads * T * d));
    t.v.resize(static_cast<std::size_t>(kv_heads * T * d));
    for (auto& x : t.q) x = round_to(exact_in, 2.0f * draw());
    for (auto& x : t.k) x = round_to(exact_in, draw());
    for (auto& x : t.v) x = static_cast<float>(rng.normal());
    if (sinks) {
      for (std::int64_t h = 0; h < q_heads; ++h) t.sink_logits.push_back(static_cast<float>(rng.normal() + 1.0));
    }
    c.layers.push_back(std::move(t));
  }
  return c;
}

// Query positions: "all", "stride" (every third and the last), "last" (the final quarter), "random".
std::vector<std::int64_t> query_rows(const std::string& pattern, std::int64_t T, std::uint64_t seed) {
  std::vector<std::int64_t> rows;
  if (pattern == "all") {
    for (std::int64_t t = 0; t < T; ++t) rows.push_back(t);
  } else if (pattern == "stride") {
    for (std::int64_t t = 0; t < T; t += 3) rows.push_back(t);
    if (rows.back() != T - 1) rows.push_back(T - 1);
  } else if (pattern == "last") {
    for (std::int64_t t = T - std::max<std::int64_t>(1, T / 4); t < T; ++t) rows.push_back(t);
  } else {
    Rng rng(seed);
    for (std::int64_t t = 0; t < T; ++t) {
      if (rng.below(5) == 0 || t == T - 1) rows.push_back(t);
    }
  }
  return rows;
}

double block_mass(const StatsTile& tile, std::int64_t h, std::int64_t r, std::int64_t b) {
  const float m = tile.block_max[tile.at(h, r, b)];
  if (m == -std::numeric_limits<float>::infinity()) return 0.0;
  return static_cast<double>(tile.block_sum[tile.at(h, r, b)]) *
         std::exp(static_cast<double>(m) - tile.lse_all[static_cast<std::size_t>(h * tile.rows + r)]);
}

struct Deviation {
  double mass_relative = 0, mass_absolute = 0, logit = 0, output = 0;
  // Keeps the larger of each deviation (the worst over several cases).
  void widen(const Deviation& d) {
    mass_relative = std::max(mass_relative, d.mass_relative);
    mass_absolute = std::max(mass_absolute, d.mass_absolute);
    logit = std::max(logit, d.logit);
    output = std::max(output, d.output);
  }
};

// Compares a GPU tile with the CPU tile of the same request. `mass_bound(h, r)` is the relative
// tolerance of that row's block masses; logit-valued numbers get `logit_bound(h, r)` absolute.
template <typename MassBound, typename LogitBound>
Deviation compare_tiles(const StatsTile& cpu, const StatsTile& gpu, MassBound mass_bound, LogitBound logit_bound,
                        double output_tolerance) {
  Deviation worst;
  REQUIRE(cpu.num_blocks == gpu.num_blocks);
  REQUIRE(cpu.block_max.size() == gpu.block_max.size());
  for (std::int64_t h = 0; h < cpu.heads; ++h) {
    for (std::int64_t r = 0; r < cpu.rows; ++r) {
      const double mass_tolerance = mass_bound(h, r), logit_tolerance = logit_bound(h, r);
      for (std::int64_t b = 0; b < cpu.num_blocks; ++b) {
        const std::size_t i = cpu.at(h, r, b);
        // Per-cell checks count only when they fail (a tile holds up to millions of cells).
        if (std::isinf(cpu.block_max[i])) {
          if (!std::isinf(gpu.block_max[i]) || gpu.block_sum[i] != 0.0f) {
            CAPTURE(h, r, b, gpu.block_sum[i]);
            REQUIRE(gpu.block_max[i] == cpu.block_max[i]);
          }
          continue;
        }
        if (!std::isfinite(gpu.block_max[i]) || !std::isfinite(gpu.block_sum[i])) {
          CAPTURE(h, r, b, gpu.block_sum[i]);
          REQUIRE(gpu.block_max[i] == cpu.block_max[i]);
        }
        const double dm = std::fabs(static_cast<double>(gpu.block_max[i]) - cpu.block_max[i]);
        const double ma = block_mass(cpu, h, r, b), mb = block_mass(gpu, h, r, b);
        const double relative = std::fabs(mb - ma) / ma;
        worst.logit = std::max(worst.logit, dm);
        worst.mass_relative = std::max(worst.mass_relative, relative);
        worst.mass_absolute = std::max(worst.mass_absolute, std::fabs(mb - ma));
        if (!(dm <= logit_tolerance) || !(relative <= mass_tolerance)) {
          CAPTURE(h, r, b, cpu.block_max[i], gpu.block_max[i], ma, mb);
          CHECK(dm <= logit_tolerance);
          CHECK(relative <= mass_tolerance);
        }
      }
      const auto row = static_cast<std::size_t>(h * cpu.rows + r);
      const double dl = std::max(std::fabs(gpu.lse_all[row] - cpu.lse_all[row]), std::fabs(gpu.lse_tokens[row] - cpu.lse_tokens[row]));
      worst.logit = std::max(worst.logit, dl);
      if (!(dl <= logit_tolerance)) {
        CAPTURE(h, r, cpu.lse_all[row], gpu.lse_all[row]);
        CHECK(dl <= logit_tolerance);
      }
    }
  }
  if (!cpu.output.empty()) {
    REQUIRE(gpu.output.size() == cpu.output.size());
    const std::int64_t d = cpu.head_dim;
    for (std::int64_t v = 0; v < cpu.heads * cpu.rows; ++v) {
      double diff = 0, norm = 0;
      for (std::int64_t c = 0; c < d; ++c) {
        const auto i = static_cast<std::size_t>(v * d + c);
        diff += (cpu.output[i] - gpu.output[i]) * (cpu.output[i] - gpu.output[i]);
        norm += cpu.output[i] * cpu.output[i];
      }
      const double relative = std::sqrt(diff / norm);
      worst.output = std::max(worst.output, relative);
      if (!(relative < output_tolerance)) {
        CAPTURE(v);
        CHECK(relative < output_tolerance);
      }
    }
  }
  return worst;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

Deviation compare_exact(const StatsTile& cpu, const StatsTile& gpu) {
  return compare_tiles(
      cpu, gpu, [](std::int64_t, std::int64_t) { return kGpuMassTolerance; },
      [](std::int64_t, std::int64_t) { return kGpuLogitTolerance; }, kGpuOutputTolerance);
}


struct StatsCase {
  std::int64_t group_heads, d, T, block;
  const char* rows;
  bool sinks, ties;
  double scale_sign;
};

// Random and adversarial shapes: MHA (1 head per group), GQA (3, 4, 8), a 12-head group split over
// two thread blocks; head_dim padded (8 -> 64, 96 -> 128); blocks inside a key tile (8..64),
// spanning tiles (128, 192), not dividing T, and sizes the tensor cores do not take (1, 7, 24,
// 100: SIMT fallback); one token; rows beyond several key segments (of the statistics and of the
// output pass: 9000 keys make 8 output segments); ties; a negative scale.
const StatsCase kStatsCases[] = {
    {4, 128, 1, 64, "all", true, false, 1.0},     {4, 128, 2500, 64, "all", true, false, 1.0},
    {1, 64, 700, 16, "stride", false, false, 1.0}, {8, 128, 1100, 128, "random", true, false, 1.0},
    {12, 64, 600, 8, "all", false, false, 1.0},   {3, 96, 900, 192, "last", true, false, 1.0},
    {2, 256, 520, 32, "all", false, false, 1.0},  {4, 8, 333, 256, "stride", true, false, 1.0},
    {4, 128, 400, 24, "all", false, false, 1.0},  {4, 64, 300, 7, "random", true, false, 1.0},
    {2, 64, 130, 1, "all", false, false, 1.0},    {4, 64, 500, 64, "all", false, true, 1.0},
    {4, 64, 500, 16, "stride", true, true, 1.0},  {4, 64, 300, 64, "all", true, false, -1.0},
    {4, 128, 777, 100, "last", false, false, 1.0}, {4, 64, 9000, 64, "random", true, false, 1.0},
};

}  // namespace

TEST_CASE("CUDA fp32 block statistics equal the CPU backend's", "[cuda]") {
  const auto cpu = make_cpu_backend();
  const auto gpu = make_backend("cuda");
  CHECK(gpu->precision() == Precision::kFp32);
  Deviation worst;
  for (const StatsCase& k : kStatsCases) {
    CAPTURE(k.group_heads, k.d, k.T, k.block, k.rows, k.sinks, k.ties, k.scale_sign);
    const Capture c = gaussian_capture(1, 2 * k.group_heads, 2, k.d, k.T, k.sinks, k.ties, test::seed() + static_cast<std::uint64_t>(k.T));
    const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
    const StatsRequest req = group_request(c, 1, rows, k.block, true, k.scale_sign);
    StatsTile a, b;
    cpu->block_statistics(req, a);
    gpu->block_statistics(req, b);
    const Deviation d = compare_exact(a, b);
    worst.widen(d);
  }
  std::printf("fp32 vs CPU: largest block-mass relative error %.2e (tolerance %.0e), logit %.2e (%.0e), output %.2e (%.0e)\n",
              worst.mass_relative, kGpuMassTolerance, worst.logit, kGpuLogitTolerance, worst.output, kGpuOutputTolerance);
}

// portable_exp is the block masses' exponential on both sides (build_block_view, the device's ranking keys):
// the device must give the host's bits, over the whole range, at its limits and on NaN.
TEST_CASE("portable_exp gives the host's bits on the device", "[cuda]") {
  Rng g(test::seed());
  std::vector<double> x;
  for (int i = 0; i < 1000000; ++i) x.push_back(-750.0 + 1465.0 * g.uniform());
  for (int i = 0; i < 1000000; ++i) x.push_back(-40.0 * g.uniform());
  for (int k = -1080; k <= 1030; ++k) {
    for (double d : {-1e-12, 0.0, 1e-12}) x.push_back((k + 0.5) * 0.6931471805599453 + d);
  }
  const double inf = std::numeric_limits<double>::infinity();
  for (double special : {-inf, inf, std::numeric_limits<double>::quiet_NaN(), 0.0, -0.0, -745.2, -745.0, 709.78, 709.8, 1e300, -1e300}) {
    x.push_back(special);
  }
  const std::vector<double> device = cuda::portable_exp_on_device(x);
  REQUIRE(device.size() == x.size());
  std::size_t differing = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double host = portable_exp(x[i]);
    if (std::memcmp(&host, &device[i], sizeof host) != 0) {
      if (differing++ < 5) UNSCOPED_INFO("x = " << x[i] << ": host " << host << ", device " << device[i]);
    }
  }
  std::printf("portable_exp: %zu arguments, %zu differ between host and device\n", x.size(), differing);
  CHECK(differing == 0);
}

// ranking.cuh's rank_row, which every block and token-score ranking runs, on rows made to break it: all ties,
// two values, +0 and -0, infinities, keys that differ only in their last bits (every radix pass), few distinct
// values across the cut, and rows longer than the shared memory given (selected with keys recomputed), each
// with its top count selected first and sorted whole. rank_top on the host is the definition.
TEST_CASE("The device's row ranking is rank_top's on adversarial rows, selected first or sorted whole", "[cuda]") {
  Rng g(test::seed());
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> rows;
  for (const int n : {1, 2, 3, 31, 255, 256, 257, 1000, 2048, 4096}) {
    rows.emplace_back(static_cast<std::size_t>(n), 0.5);  // all ties
    std::vector<double> row(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = (i % 2) ? 1.0 : 2.0;
    rows.push_back(row);
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = (i % 3 == 0) ? -0.0 : (i % 3 == 1 ? 0.0 : -1e-300);
    rows.push_back(row);
    const double epsilon = std::numeric_limits<double>::epsilon();
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = 1.0 + static_cast<double>(1 + i % 7 + static_cast<int>(g.below(4))) * epsilon;
    rows.push_back(row);
    // Finite doubles whose bits agree in their first `same` bytes: the select decides in byte same + 1 or later.
    for (const int same : {1, 3, 5, 7}) {
      const std::uint64_t common = g.next() & 0x3fffffffffffffffull, keep = ~0ull << (64 - 8 * same);
      for (int i = 0; i < n; ++i) {
        const std::uint64_t bits = (common & keep) | (g.next() & ~keep & 0x3fffffffffffffffull);
        std::memcpy(&row[static_cast<std::size_t>(i)], &bits, sizeof bits);
      }
      rows.push_back(row);
    }
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = static_cast<double>(g.below(5));
    rows.push_back(row);
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = g.normal();
    if (n > 2) {
      row[0] = inf;
      row[static_cast<std::size_t>(n - 1)] = -inf;
      row[static_cast<std::size_t>(n / 2)] = inf;
    }
    rows.push_back(row);
    for (int i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = std::ldexp(1.0 + static_cast<double>(g.below(1u << 20)) * 0x1p-52, -static_cast<int>(g.below(3)));
    rows.push_back(row);
  }
  std::int64_t ranked = 0;
  for (const int count : {1, 2, 7, 64, 255, 1024, 4095}) {
    for (const int capacity : {0, 256, 1024}) {  // 0: the longest row's, 4,096
      if (capacity != 0 && capacity < padded_size_of(count)) continue;
      for (const bool select : {true, false}) {
        CAPTURE(count, capacity, select);
        const auto got = cuda::rank_rows_on_device(rows, count, capacity, select);
        REQUIRE(got.size() == rows.size());
        for (std::size_t r = 0; r < rows.size(); ++r) {
          const auto n = static_cast<std::int64_t>(rows[r].size()), written = std::min<std::int64_t>(count, n);
          std::vector<std::int32_t> expected(static_cast<std::size_t>(written));
          rank_top(rows[r].data(), n, written, expected.data());
          CAPTURE(r, n);
          CHECK(got[r] == expected);
          ++ranked;
        }
      }
    }
  }
  std::printf("row rankings: %lld adversarial rows ranked, every one rank_top's\n", static_cast<long long>(ranked));
}

// StatsTile::mass_order: the device ranks each row's blocks by the mass the engine computes from the
// tile, M_b = l_b exp(m_b - lse_tokens), in double, with the host's operations (portable_exp, fused
// sums), so the ranking must be rank_top's on the host masses entry for entry, ties to the lower block.

//
// StatsTile::group_max_order, asked beside it: one ranking per row by the largest probability of a block, max
// over the heads (build_block_view's max_prob, portable_exp's bits), rank_top's on the host values likewise.

TEST_CASE("CUDA rankings of blocks by mass are rank_top's on the tile's masses, ties to the lower block", "[cuda]") {
  std::int64_t rankings = 0, entries = 0, group_rankings = 0, group_entries = 0;
  // The first n of `got` are the first n of rank_top on `scores` (a row of `causal` blocks).
  auto require_ranked = [](const std::int32_t* got, std::vector<double>& scores, std::int64_t causal, std::int64_t n) {
    std::vector<std::int32_t> expected(static_cast<std::size_t>(n));
    rank_top(scores.data(), causal, n, expected.data());
    std::vector<char> seen(static_cast<std::size_t>(causal), 0);
    for (std::int64_t i = 0; i < n; ++i) {
      REQUIRE(got[i] >= 0);
      REQUIRE(got[i] < causal);
      REQUIRE(!seen[static_cast<std::size_t>(got[i])]);
      seen[static_cast<std::size_t>(got[i])] = 1;
      CAPTURE(i, scores[static_cast<std::size_t>(got[i])], scores[static_cast<std::size_t>(expected[static_cast<std::size_t>(i)])]);
      REQUIRE(got[i] == expected[static_cast<std::size_t>(i)]);
    }
  };
  const std::int64_t limit = device_prefix_limit();
  // factor: tile blocks per ranked block (the engine's view of a larger block size).
  auto check_rankings = [&](const Backend& gpu, const StatsRequest& req, std::int64_t asked, std::int64_t factor) {
    CAPTURE(req.heads, req.seq_len, req.block_size, req.num_rows, asked, factor);
    StatsRequest ranked_request = req;
    ranked_request.rank_blocks = asked;
    ranked_request.rank_block = req.block_size * factor;
    ranked_request.group_rank_blocks = asked;
    ranked_request.group_rank_block = req.block_size * factor;
    StatsTile tile;
    gpu.block_statistics(ranked_request, tile);
    const std::int64_t block = req.block_size * factor;
    const std::int64_t num_blocks = req.rows[req.num_rows - 1] / block + 1, wanted = std::min(asked, num_blocks);
    REQUIRE(tile.ranked == (wanted <= limit ? wanted : 0));  // longer prefixes than the device holds: the host's
    REQUIRE(tile.mass_order.size() == static_cast<std::size_t>(tile.heads * tile.rows * tile.ranked));
    REQUIRE(tile.group_ranked == tile.ranked);
    REQUIRE(tile.group_max_order.size() == static_cast<std::size_t>(tile.rows * tile.group_ranked));
    std::vector<double> scores;
    for (std::int64_t r = 0; r < tile.rows; ++r) {
      const std::int64_t causal = req.rows[r] / block + 1, n = std::min(tile.ranked, causal);
      for (std::int64_t h = 0; h < tile.heads; ++h) {
        CAPTURE(h, r);
        test::view_masses(tile, h, r, req.rows[r], req.block_size, factor, scores);
        require_ranked(&tile.mass_order[static_cast<std::size_t>((h * tile.rows + r) * tile.ranked)], scores, causal, n);
        entries += n;
        ++rankings;
      }
      CAPTURE(r);
      test::view_group_max_probabilities(tile, r, req.rows[r], req.block_size, factor, scores);
      require_ranked(&tile.group_max_order[static_cast<std::size_t>(r * tile.group_ranked)], scores, causal, n);
      group_entries += n;
      ++group_rankings;
    }
  };
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    const auto gpu = make_backend("cuda", precision);
    for (const StatsCase& k : kStatsCases) {
      CAPTURE(k.rows, k.ties, k.scale_sign);
      const Capture c = gaussian_capture(1, 2 * k.group_heads, 2, k.d, k.T, k.sinks, k.ties, test::seed() + static_cast<std::uint64_t>(k.T),
                                         precision);
      const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
      const StatsRequest req = group_request(c, 1, rows, k.block, false, k.scale_sign);
      for (const std::int64_t factor : {1, 3}) {
        const std::int64_t num_blocks = rows.back() / (k.block * factor) + 1;
        for (const std::int64_t asked : {std::int64_t{1}, std::int64_t{5}, num_blocks, num_blocks + 7}) check_rankings(*gpu, req, asked, factor);
      }
    }
    // Rows of 1,024 to 4,096 blocks (the most a thread block sorts whole for short prefixes): every
    // thread compares several pairs a stage. Token-level blocks, with ties.
    for (const bool ties : {false, true}) {
      const Capture c = gaussian_capture(1, 4, 1, 32, 4096, true, ties, test::seed() + 4096, precision);
      const std::vector<std::int64_t> rows = {1023, 1024, 2047, 2048, 4095};
      const StatsRequest req = group_request(c, 0, rows, 1, false);
      for (const std::int64_t asked : {std::int64_t{3}, std::int64_t{1500}, std::int64_t{4096}}) check_rankings(*gpu, req, asked, 1);
      check_rankings(*gpu, req, 700, 2);
    }
    // Rows longer than a thread block sorts whole: their top blocks are selected first (a radix select
    // over the row), ties across the cut to the lower blocks; rows of up to 4,096 blocks of the same tile
    // are sorted whole. Prefixes past 4,096 (a token-level budget plus the blocks a window touches) sort
    // in larger shared memory, and rows up to its size whole.
    for (const bool ties : {false, true}) {
      const Capture c = gaussian_capture(1, 2, 1, 16, 9000, true, ties, test::seed() + 9000, precision);
      const std::vector<std::int64_t> rows = {100, 4095, 4096, 6000, 8192, 8999};
      const StatsRequest req = group_request(c, 0, rows, 1, false);
      for (const std::int64_t asked : {std::int64_t{1}, std::int64_t{10}, std::int64_t{4096}, std::int64_t{4225}, std::int64_t{8999}}) {
        check_rankings(*gpu, req, asked, 1);
      }
      check_rankings(*gpu, req, 2000, 2);  // 4,500 ranked blocks of two
    }
  }
  // The longest prefix a thread block ranks, of a longer row; one more is left to the host.
  const Capture c = gaussian_capture(1, 2, 1, 16, limit + 1000, false, true, test::seed() + 5000);
  const std::vector<std::int64_t> rows = {limit - 1, limit + 999};
  StatsRequest req = group_request(c, 0, rows, 1, false);
  const auto gpu = make_backend("cuda");
  check_rankings(*gpu, req, limit, 1);
  req.rank_blocks = limit + 1;
  req.group_rank_blocks = limit + 1;
  StatsTile tile;
  gpu->block_statistics(req, tile);
  CHECK(tile.ranked == 0);
  CHECK(tile.mass_order.empty());
  CHECK(tile.group_ranked == 0);
  CHECK(tile.group_max_order.empty());
  std::printf("block rankings: %lld (head, row) rankings, %lld entries, every one the host's; by group: %lld rows, %lld entries\n",
              static_cast<long long>(rankings), static_cast<long long>(entries), static_cast<long long>(group_rankings),
              static_cast<long long>(group_entries));
}

// Backend::page_bound_rankings: Quest's bounds are sums of exact products of fp32 values in double, in
// channel order, on both sides (no fused multiply-adds on the device), so the rankings must be equal
// entry for entry, ties (equal pages) to the lower page included.
TEST_CASE("CUDA Quest page rankings equal the host's, entry for entry", "[cuda]") {
  const auto gpu = make_backend("cuda");
  struct Case {
    std::int64_t heads, d, T, page;
    const char* rows;  // a query_rows pattern, or "ends": T/2 and T-1
    bool ties, zero_query;  // zero_query: the first head's q is 0, so every bound is 0 (ties of +-0)
  };
  std::int64_t rankings = 0;
  for (const Case& k : {Case{4, 128, 2000, 16, "all", false, false}, Case{1, 64, 700, 8, "stride", true, false},
                        Case{8, 100, 333, 16, "random", false, false}, Case{2, 256, 520, 32, "all", true, false},
                        Case{4, 16, 4096, 1, "last", false, false}, Case{3, 8, 50, 64, "all", false, false},
                        Case{1, 256, 4096, 1, "ends", false, false},  // the most shared memory: 4,096 pages, head_dim 256
                        Case{4, 32, 600, 16, "all", true, true}}) {
    CAPTURE(k.heads, k.d, k.T, k.page, k.rows, k.ties, k.zero_query);
    Capture c = gaussian_capture(1, 2 * k.heads, 2, k.d, k.T, false, k.ties, test::seed() + static_cast<std::uint64_t>(k.T + 1));
    if (k.zero_query) {
      float* first = c.layers[0].q.data() + k.heads * k.T * k.d;
      std::fill(first, first + k.T * k.d, 0.0f);
    }
    const std::vector<std::int64_t> rows =
        std::string(k.rows) == "ends" ? std::vector<std::int64_t>{k.T / 2, k.T - 1} : query_rows(k.rows, k.T, test::seed());
    const std::int64_t pages = (k.T + k.page - 1) / k.page, d = k.d;
    const float* keys = c.layers[0].k.data() + k.T * d;  // KV head 1
    std::vector<double> lo(static_cast<std::size_t>(pages * d)), hi(lo.size());
    for (std::int64_t b = 0; b < pages; ++b) {
      proxy::channel_bounds(keys + b * k.page * d, std::min(k.page, k.T - b * k.page), d, &lo[static_cast<std::size_t>(b * d)],
                            &hi[static_cast<std::size_t>(b * d)]);
    }
    PageBoundRequest req;
    req.q = c.layers[0].q.data() + k.heads * k.T * d;  // the heads of KV head 1
    req.lo = lo.data();
    req.hi = hi.data();
    req.heads = k.heads;
    req.seq_len = k.T;
    req.head_dim = d;
    req.page = k.page;
    req.pages = pages;
    req.rows = rows.data();
    req.num_rows = static_cast<std::int64_t>(rows.size());
    req.kv_head = 1;
    const std::int64_t row_pages_max = rows.back() / k.page + 1;
    for (const std::int64_t count : {std::int64_t{1}, std::min<std::int64_t>(7, row_pages_max), row_pages_max}) {
      CAPTURE(count);
      req.count = count;
      std::vector<std::int32_t> got;
      REQUIRE(gpu->page_bound_rankings(req, got));
      REQUIRE(got.size() == static_cast<std::size_t>(k.heads * req.num_rows * count));
      std::vector<double> scores;
      std::vector<std::int32_t> expected;
      for (std::int64_t h = 0; h < k.heads; ++h) {
        for (std::int64_t r = 0; r < req.num_rows; ++r) {
          const std::int64_t t = rows[static_cast<std::size_t>(r)], row_pages = t / k.page + 1, n = std::min(count, row_pages);
          const float* q = req.q + (h * k.T + t) * d;
          scores.assign(static_cast<std::size_t>(row_pages), std::numeric_limits<double>::infinity());
          for (std::int64_t b = 0; b + 1 < row_pages; ++b) {
            scores[static_cast<std::size_t>(b)] = proxy::quest_bound(q, &lo[static_cast<std::size_t>(b * d)], &hi[static_cast<std::size_t>(b * d)], d);
          }
          expected.resize(static_cast<std::size_t>(n));
          rank_top(scores.data(), row_pages, n, expected.data());
          for (std::int64_t i = 0; i < n; ++i) {
            CAPTURE(h, r, t, i);
            REQUIRE(got[static_cast<std::size_t>((h * req.num_rows + r) * count + i)] == expected[static_cast<std::size_t>(i)]);
          }
          ++rankings;
        }
      }
    }
  }
  // More pages than one thread block sorts: left to the selector.
  const Capture c = gaussian_capture(1, 1, 1, 8, 5000, false, false, test::seed() + 5001);
  std::vector<double> lo(5000 * 8, 0.0), hi(5000 * 8, 0.0);
  const std::vector<std::int64_t> rows = {4999};
  PageBoundRequest req;
  req.q = c.layers[0].q.data();
  req.lo = lo.data();
  req.hi = hi.data();
  req.seq_len = 5000;
  req.head_dim = 8;
  req.page = 1;
  req.pages = 5000;
  req.rows = rows.data();
  req.num_rows = 1;
  req.count = 10;
  std::vector<std::int32_t> got;
  CHECK_FALSE(gpu->page_bound_rankings(req, got));
  std::printf("quest page rankings: %lld (head, row) rankings equal the host's\n", static_cast<long long>(rankings));
}

// The device keeps every KV head's keys of the layer in flight: tiles of different heads come in
// any order, and a second capture of the same shape under the same layer index (a sweep's next
// capture, perhaps at the same host address) must not be served the first one's keys.
// Output-error walks: the device evaluates the engine's walks (random ones here) from the same q, k,
// v and tile as the CPU, both held to the float64 reference. The device sums in double where the
// host sums each step in fp32, so the two differ by fp32 roundings of |o| at most.
namespace {
// Keys [kv_heads][T][d] of standard normal channels; with repeat_every > 0, key j of a head equals key
// j % repeat_every (scores tied across keys).
std::vector<float> gaussian_keys(std::int64_t kv_heads, std::int64_t T, std::int64_t d, std::int64_t repeat_every, std::uint64_t seed) {
  std::vector<float> keys(static_cast<std::size_t>(kv_heads * T * d));
  for (std::int64_t g = 0; g < kv_heads; ++g) {
    for (std::int64_t j = 0; j < T; ++j) {
      const std::int64_t source = g * T + (repeat_every > 0 ? j % repeat_every : j);
      Rng key_rng(seed + static_cast<std::uint64_t>(source));
      for (std::int64_t c = 0; c < d; ++c) keys[static_cast<std::size_t>((g * T + j) * d + c)] = static_cast<float>(key_rng.normal());
    }
  }
  return keys;
}
}  // namespace

// Backend::nsa_block_scores: the logits are the host's bits (channels ascending, fused as the host's
// multiply-add, or not), the softmax's exp, log and sum order the device's own; a score may differ in its
// last bits (relative to the row's largest score), and rankings only where two host scores are that close.
constexpr double kNsaScoreTolerance = 1e-12;

TEST_CASE("CUDA NSA block scores equal the host's up to rounding, and rank alike", "[cuda]") {
  const auto gpu = make_backend("cuda");
  struct Case {
    std::int64_t q_heads, kv_heads, d, T, cmp, stride, block;
    const char* rows;
    bool ties;
  };
  std::int64_t rows_compared = 0, near_tie_swaps = 0;
  double largest_difference = 0.0;
  for (const Case& k : {Case{8, 2, 128, 3000, 32, 16, 64, "random", false},  // GQA, the paper's lengths
                        Case{4, 4, 64, 700, 4, 2, 8, "all", true},             // MHA, duplicated keys: exact ties
                        Case{8, 1, 100, 1100, 8, 4, 8, "stride", false},       // MQA, head_dim not a power of two
                        Case{2, 1, 256, 5000, 64, 64, 64, "last", false},      // cmp = stride = block
                        Case{3, 1, 16, 90, 32, 16, 48, "all", false}}) {       // rows that see no compressed key
    CAPTURE(k.q_heads, k.kv_heads, k.d, k.T, k.cmp, k.stride, k.block, k.rows, k.ties);
    Capture c = gaussian_capture(1, k.q_heads, k.kv_heads, k.d, k.T, false, k.ties,
                                 test::seed() + static_cast<std::uint64_t>(7 * k.T + k.d));
    const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
    const std::int64_t G = k.q_heads / k.kv_heads, g = k.kv_heads - 1, d = k.d;
    const std::int64_t compressed = k.T >= k.cmp ? (k.T - k.cmp) / k.stride + 1 : 0;
    std::vector<double> keys(static_cast<std::size_t>(std::max<std::int64_t>(1, compressed) * d));
    for (std::int64_t i = 0; i < compressed; ++i) {
      proxy::mean_key(c.layers[0].k.data() + (g * k.T + i * k.stride) * d, k.cmp, d, &keys[static_cast<std::size_t>(i * d)]);
    }
    NsaScoreRequest req;
    req.q = c.layers[0].q.data() + g * G * k.T * d;
    req.keys = keys.data();
    req.heads = G;
    req.seq_len = k.T;
    req.head_dim = d;
    req.compressed = compressed;
    req.cmp = k.cmp;
    req.stride = k.stride;
    req.block = k.block;
    req.scale = 1.0 / std::sqrt(static_cast<double>(d));
    req.rows = rows.data();
    req.num_rows = static_cast<std::int64_t>(rows.size());
    req.kv_head = g;
    req.fused = proxy::kMultiplyAddFused;
    std::vector<double> expected;
    proxy::nsa_block_scores(req, expected);
    const std::int64_t blocks = rows.back() / k.block + 1;
    REQUIRE(expected.size() == static_cast<std::size_t>(req.num_rows * blocks));
    // Uncached keys (id 0), then kept keys (an id; asked twice, the second from the device's copy), and the
    // other multiply-add (the device honours either; the host's scores differ from it by rounding only).
    const std::uint64_t id = proxy::next_data_id();
    for (const auto& [keys_id, fused] : {std::pair<std::uint64_t, bool>{0, req.fused}, {id, req.fused}, {id, req.fused},
                                         {0, !req.fused}}) {
      CAPTURE(keys_id, fused);
      NsaScoreRequest asked = req;
      asked.keys_id = keys_id;
      asked.fused = fused;
      std::vector<double> got;
      REQUIRE(gpu->nsa_block_scores(asked, got));
      REQUIRE(got.size() == expected.size());
      std::vector<std::int32_t> host_order(static_cast<std::size_t>(blocks)), device_order(host_order.size());
      for (std::int64_t r = 0; r < req.num_rows; ++r) {
        const std::int64_t t = rows[static_cast<std::size_t>(r)], row_blocks = t / k.block + 1;
        const double* host = &expected[static_cast<std::size_t>(r * blocks)];
        const double* device = &got[static_cast<std::size_t>(r * blocks)];
        const double largest = *std::max_element(host, host + blocks);
        for (std::int64_t b = 0; b < blocks; ++b) {
          CAPTURE(r, t, b, host[b], device[b]);
          if (b >= row_blocks || largest == 0.0) {
            REQUIRE(device[b] == host[b]);  // past the row, or no compressed key seen: exactly 0
            continue;
          }
          const double difference = std::abs(device[b] - host[b]) / largest;
          largest_difference = std::max(largest_difference, difference);
          REQUIRE(difference <= kNsaScoreTolerance);
        }
        rank_top(host, row_blocks, row_blocks, host_order.data());
        rank_top(device, row_blocks, row_blocks, device_order.data());
        for (std::int64_t i = 0; i < row_blocks; ++i) {
          if (host_order[static_cast<std::size_t>(i)] == device_order[static_cast<std::size_t>(i)]) continue;
          CAPTURE(r, t, i, host_order[static_cast<std::size_t>(i)], device_order[static_cast<std::size_t>(i)]);
          REQUIRE(std::abs(host[host_order[static_cast<std::size_t>(i)]] - host[device_order[static_cast<std::size_t>(i)]]) <=
                  kNsaScoreTolerance * largest);
          ++near_tie_swaps;
        }
        ++rows_compared;
      }
    }
    // New keys under a new id replace the kept ones (a stale copy would give the old scores).
    for (double& x : keys) x = -x;
    std::vector<double> negated, got;
    proxy::nsa_block_scores(req, negated);
    NsaScoreRequest asked = req;
    asked.keys_id = proxy::next_data_id();
    REQUIRE(gpu->nsa_block_scores(asked, got));
    REQUIRE(got.size() == negated.size());
    for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(std::abs(got[i] - negated[i]) <= kNsaScoreTolerance * (1.0 + std::abs(negated[i])));
  }
  std::printf("NSA block scores: %lld rows compared, largest difference %.2e of the row's largest score, %lld ranks swapped by a "
              "near tie\n",
              static_cast<long long>(rows_compared), largest_difference, static_cast<long long>(near_tie_swaps));
}

// Logits whose channels cancel: channel 0 holds -round(3 b_i), channel 1 adds 3 b_i, so a fused
// multiply-add leaves the product's rounding error (~1e-16) and an unfused one exactly 0; a scale of 1e16
// makes those residues logits of order 1. The device must follow the request's multiply-add either way.
TEST_CASE("CUDA NSA logits follow the request's multiply-add: fused and unfused differ, the host's mode matches", "[cuda]") {
  const auto gpu = make_backend("cuda");
  const std::int64_t T = 64, d = 2, cmp = 4, stride = 4, compressed = (T - cmp) / stride + 1;
  std::vector<float> q(static_cast<std::size_t>(T * d));
  for (std::int64_t t = 0; t < T; ++t) {
    q[static_cast<std::size_t>(t * d)] = 1.0f;
    q[static_cast<std::size_t>(t * d + 1)] = 3.0f;
  }
  Rng rng(test::seed() + 83);
  std::vector<double> keys(static_cast<std::size_t>(compressed * d));
  for (std::int64_t i = 0; i < compressed; ++i) {
    const double b = 1.0 + rng.uniform();  // 3 b is exact for some b (0 in both modes), inexact for most
    keys[static_cast<std::size_t>(i * d)] = -(3.0 * b);
    keys[static_cast<std::size_t>(i * d + 1)] = b;
  }
  std::vector<std::int64_t> rows(static_cast<std::size_t>(T));
  std::iota(rows.begin(), rows.end(), std::int64_t{0});
  NsaScoreRequest req;
  req.q = q.data();
  req.keys = keys.data();
  req.heads = 1;
  req.seq_len = T;
  req.head_dim = d;
  req.compressed = compressed;
  req.cmp = cmp;
  req.stride = stride;
  req.block = 8;
  req.scale = 1e16;
  req.rows = rows.data();
  req.num_rows = T;
  req.kv_head = 0;
  req.fused = proxy::kMultiplyAddFused;
  std::vector<double> host, same, other;
  proxy::nsa_block_scores(req, host);
  REQUIRE(gpu->nsa_block_scores(req, same));
  NsaScoreRequest flipped = req;
  flipped.fused = !req.fused;
  REQUIRE(gpu->nsa_block_scores(flipped, other));
  REQUIRE(same.size() == host.size());
  REQUIRE(other.size() == host.size());
  double same_difference = 0.0, other_difference = 0.0;
  for (std::size_t i = 0; i < host.size(); ++i) {
    same_difference = std::max(same_difference, std::abs(same[i] - host[i]));
    other_difference = std::max(other_difference, std::abs(other[i] - host[i]));
  }
  std::printf("NSA multiply-add modes: the host's mode within %.2e of the host, the other %.2e away\n", same_difference,
              other_difference);
  CHECK(same_difference <= kNsaScoreTolerance * 4.0);  // a score sums at most block / stride + cmp / stride - 1 = 2 probabilities; twice that as margin
  CHECK(other_difference > 1e-3);
}

// Backend::pooled_key_logits (moba's block scores): NSA's logits kernel alone, the host's bits.
TEST_CASE("CUDA pooled-key logits (moba's block scores) are the host's bits", "[cuda]") {
  const auto gpu = make_backend("cuda");
  struct Case {
    std::int64_t q_heads, kv_heads, d, T, cmp, stride;
    double scale;
    const char* rows;
  };
  std::int64_t logits_compared = 0;
  for (const Case& k : {Case{8, 2, 128, 3000, 64, 64, 1.0, "random"},  // moba's shape: block means, scale 1
                        Case{4, 4, 64, 700, 8, 8, 1.0, "all"},        // MHA, every row
                        Case{8, 1, 100, 1100, 32, 16, 0.1, "stride"},  // MQA, NSA's overlapping windows, a scale
                        Case{3, 1, 16, 90, 32, 32, 1.0, "all"},        // rows that see no key
                        Case{2, 1, 16, 20, 32, 32, 1.0, "all"}}) {     // no row sees one: no logit
    CAPTURE(k.q_heads, k.kv_heads, k.d, k.T, k.cmp, k.stride, k.rows);
    const Capture c = gaussian_capture(1, k.q_heads, k.kv_heads, k.d, k.T, false, false,
                                       test::seed() + static_cast<std::uint64_t>(11 * k.T + k.d));
    const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
    const std::int64_t G = k.q_heads / k.kv_heads, g = k.kv_heads - 1, d = k.d;
    const std::int64_t compressed = k.T >= k.cmp ? (k.T - k.cmp) / k.stride + 1 : 0;
    std::vector<double> keys(static_cast<std::size_t>(std::max<std::int64_t>(1, compressed) * d));
    for (std::int64_t i = 0; i < compressed; ++i) {
      proxy::mean_key(c.layers[0].k.data() + (g * k.T + i * k.stride) * d, k.cmp, d, &keys[static_cast<std::size_t>(i * d)]);
    }
    NsaScoreRequest req;
    req.q = c.layers[0].q.data() + g * G * k.T * d;
    req.keys = keys.data();
    req.heads = G;
    req.seq_len = k.T;
    req.head_dim = d;
    req.compressed = compressed;
    req.cmp = k.cmp;
    req.stride = k.stride;
    req.block = k.cmp;
    req.scale = k.scale;
    req.rows = rows.data();
    req.num_rows = static_cast<std::int64_t>(rows.size());
    req.kv_head = g;
    req.fused = proxy::kMultiplyAddFused;
    std::vector<double> expected;
    proxy::pooled_key_logits(req, expected);
    // Uncached keys, then kept keys (asked twice: the second from the device's copy).
    const std::uint64_t id = proxy::next_data_id();
    for (const std::uint64_t keys_id : {std::uint64_t{0}, id, id}) {
      CAPTURE(keys_id);
      NsaScoreRequest asked = req;
      asked.keys_id = keys_id;
      std::vector<double> got(3, -1.0);  // resized by the call
      REQUIRE(gpu->pooled_key_logits(asked, got));
      REQUIRE(got.size() == expected.size());
      for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i, expected[i], got[i]);
        REQUIRE(got[i] == expected[i]);
      }
      logits_compared += static_cast<std::int64_t>(got.size());
    }
    // New keys under a new id replace the kept ones (a stale copy would give the old logits).
    for (double& x : keys) x = -x;
    std::vector<double> negated, got;
    proxy::pooled_key_logits(req, negated);
    NsaScoreRequest asked = req;
    asked.keys_id = proxy::next_data_id();
    REQUIRE(gpu->pooled_key_logits(asked, got));
    REQUIRE(got == negated);
  }
  std::printf("pooled-key logits: %lld compared, every one the host's bits\n", static_cast<long long>(logits_compared));
}

TEST_CASE("CUDA token-score rankings (doublesparsity, loki, sparq) are the host's, entry for entry", "[cuda]") {
  // The device scores with the host's bits, so its rankings equal proxy::token_score_rankings's (and, in the
  // other multiply-add mode, the reference's) exactly: random and tied inputs, every block size, rows that
  // share a score block and rows that fill one alone, whole-row sorts and selections of a long row's top.
  const auto gpu = make_backend("cuda");
  Rng rng(test::seed() + 191);
  struct Case {
    std::int64_t seq_len, width, sets, terms, channels, block, local, row_step, count_cap;
    bool given_channels, divisors, double_keys, ties;
  };
  const Case cases[] = {
      {90, 6, 2, 1, 3, 1, 0, 3, 0, true, false, false, false},        // doublesparsity's shape, token level
      {90, 6, 2, 1, 3, 1, 0, 3, 0, true, false, false, true},         // ties
      {300, 8, 3, 1, 8, 3, 0, 1, 0, false, false, true, false},       // loki's: projected keys, every row (many score blocks)
      {257, 16, 1, 4, 2, 8, 3, 2, 0, true, true, false, false},       // sparq's: terms of the group's heads, divisors, recent keys
      {257, 16, 1, 4, 2, 8, 3, 2, 0, true, true, false, true},        // ties
      {700, 128, 4, 1, 16, 64, 0, 37, 0, true, false, false, false},  // head_dim 128, blocks of 64
      {1, 5, 2, 2, 3, 1, 1, 1, 0, true, true, false, false},          // a single token
      {9000, 12, 2, 2, 3, 1, 2, 1500, 300, true, true, false, false}, // long rows: their top selected, then sorted
      {9000, 12, 1, 1, 4, 1, 0, 1500, 0, false, false, true, true},   // long rows, ties, counts up to every block
      {20000, 4, 1, 1, 2, 1, 0, 6000, 16000, true, false, false, false},  // counts near the device's largest
      {400, 64, 1, 8, 32, 2, 1, 1, 0, true, true, false, false},      // sparq's at 8 heads a group: fewer rows a score block
  };
  std::int64_t rows_compared = 0, entries_compared = 0;
  for (const Case& k : cases) {
    for (const bool fused : {proxy::kMultiplyAddFused, !proxy::kMultiplyAddFused}) {
      CAPTURE(k.seq_len, k.width, k.sets, k.terms, k.channels, k.block, k.local, k.given_channels, k.divisors, k.double_keys,
              k.ties, fused);
      ref::TokenScoreShape shape;
      shape.seq_len = k.seq_len;
      shape.width = k.width;
      shape.sets = k.sets;
      shape.terms = k.terms;
      shape.channels = k.channels;
      shape.block = k.block;
      shape.local = k.local;
      shape.row_step = k.row_step;
      shape.count_cap = k.count_cap;
      shape.given_channels = k.given_channels;
      shape.divisors = k.divisors;
      shape.double_keys = k.double_keys;
      shape.ties = k.ties;
      ref::OwnedTokenScoreRequest owned;
      ref::random_token_score_request(shape, rng, fused, owned);
      TokenScoreRequest& req = owned.request;
      req.kv_head = 0;
      std::vector<std::int32_t> expected;
      if (fused == proxy::kMultiplyAddFused) {
        proxy::token_score_rankings(req, expected);
      } else {
        expected = ref::naive_token_score_rankings(req, fused);
      }
      // Keys uploaded for the request, then kept (asked twice: the second from the device's copy).
      const std::uint64_t id = proxy::next_data_id();
      if (*std::max_element(owned.counts.begin(), owned.counts.end()) > device_prefix_limit()) {
        std::vector<std::int32_t> declined;
        CHECK_FALSE(gpu->token_score_rankings(req, declined));  // this GPU ranks shorter prefixes: the host's
        continue;
      }
      for (const std::uint64_t keys_id : {std::uint64_t{0}, id, id}) {
        CAPTURE(keys_id);
        req.keys_id = keys_id;
        std::vector<std::int32_t> got(3, -1);  // resized by the call
        REQUIRE(gpu->token_score_rankings(req, got));
        REQUIRE(got.size() == expected.size());
        for (std::size_t i = 0; i < got.size(); ++i) {
          CAPTURE(i, expected[i], got[i]);
          REQUIRE(got[i] == expected[i]);
        }
        rows_compared += req.sets * req.num_rows;
        entries_compared += static_cast<std::int64_t>(got.size());
      }
    }
  }
  // Rows in several launches (a workspace of a few rows' block scores), the same rankings.
  const std::int64_t previous = hysparse::cuda::set_token_score_workspace_bytes(4096);
  for (const std::int64_t block : {1, 7}) {
    ref::TokenScoreShape shape;
    shape.seq_len = 600;
    shape.width = 8;
    shape.sets = 3;
    shape.terms = 2;
    shape.channels = 3;
    shape.block = block;
    shape.divisors = true;
    shape.row_step = 2;
    ref::OwnedTokenScoreRequest owned;
    ref::random_token_score_request(shape, rng, proxy::kMultiplyAddFused, owned);
    std::vector<std::int32_t> expected, got;
    proxy::token_score_rankings(owned.request, expected);
    REQUIRE(gpu->token_score_rankings(owned.request, got));
    CHECK(got == expected);
    entries_compared += static_cast<std::int64_t>(got.size());
  }
  hysparse::cuda::set_token_score_workspace_bytes(previous);
  std::printf("token-score rankings: %lld rows, %lld entries compared, every one the host's\n", static_cast<long long>(rows_compared),
              static_cast<long long>(entries_compared));
}

TEST_CASE("CUDA token-score keys stay resident under their id, and longer prefixes are left to the host", "[cuda]") {
  const auto gpu = make_backend("cuda");
  Rng rng(test::seed() + 192);
  ref::TokenScoreShape shape;
  shape.seq_len = 500;
  shape.width = 8;
  shape.channels = 4;
  ref::OwnedTokenScoreRequest owned;
  ref::random_token_score_request(shape, rng, proxy::kMultiplyAddFused, owned);
  TokenScoreRequest& req = owned.request;
  req.kv_head = 1;
  req.keys_id = proxy::next_data_id();
  std::vector<std::int32_t> first, again, expected;
  const std::uint64_t before = hysparse::cuda::resident_array_uploads();
  REQUIRE(gpu->token_score_rankings(req, first));
  REQUIRE(gpu->token_score_rankings(req, again));
  CHECK(hysparse::cuda::resident_array_uploads() - before == 1);
  CHECK(first == again);
  // New keys under a new id replace the kept ones (a stale copy would give the old rankings).
  for (float& x : owned.keys) x = -x;
  proxy::token_score_rankings(req, expected);
  req.keys_id = proxy::next_data_id();
  REQUIRE(gpu->token_score_rankings(req, again));
  CHECK(hysparse::cuda::resident_array_uploads() - before == 2);
  CHECK(again == expected);
  CHECK(again != first);
  // A prefix longer than one thread block sorts, or keys wider than a score block stages: declined, the
  // selector ranks on the host.
  ref::TokenScoreShape long_rows;
  long_rows.seq_len = device_prefix_limit() + 100;
  long_rows.width = 2;
  long_rows.channels = 1;
  ref::OwnedTokenScoreRequest longer;
  ref::random_token_score_request(long_rows, rng, proxy::kMultiplyAddFused, longer);
  longer.rows.assign(1, long_rows.seq_len - 1);
  longer.counts.assign(1, device_prefix_limit() + 1);
  longer.request.rows = longer.rows.data();
  longer.request.counts = longer.counts.data();
  longer.request.num_rows = 1;
  std::vector<std::int32_t> declined;
  check_token_score_request(longer.request);  // a valid request
  CHECK_FALSE(gpu->token_score_rankings(longer.request, declined));
  ref::TokenScoreShape wide;
  wide.seq_len = 40;
  wide.width = 700;
  ref::OwnedTokenScoreRequest wider;
  ref::random_token_score_request(wide, rng, proxy::kMultiplyAddFused, wider);
  CHECK_FALSE(gpu->token_score_rankings(wider.request, declined));
  // A request outside the contract is refused before the device reads it.
  wider.channel[0] = 700;
  try {
    (void)gpu->token_score_rankings(wider.request, declined);
    FAIL("a channel past the width was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kInternal);
  }
}

TEST_CASE("CUDA H2O evictions equal the host simulation's", "[cuda]") {
  // Backend::h2o_evictions against proxy::h2o_simulate on the same request: the same logits (an fma chain
  // in double), the device's own exp, log and summation order. Random and adversarial inputs: repeated
  // keys and all-zero queries (scores tied across keys), caches of 1 to more than the sequence, sparsity
  // capacities that grow with the position, no / some / all keys recent, sinks, one to six heads a set,
  // several sets over one or several KV heads.
  const auto gpu = make_backend("cuda");
  const auto twice = make_backend("cuda:0,cuda:0");  // a device list splits the KV heads: the same bits
  Rng rng(test::seed() + 140);
  std::int64_t compared = 0, differing = 0;
  struct Case {
    std::int64_t T, sets, heads, kv_heads, d, recent;
    bool sinks, repeated_keys, zero_queries;
  };
  const Case cases[] = {{1, 1, 1, 1, 8, 50, false, false, false},    {40, 1, 1, 1, 8, 50, false, false, false},
                        {300, 2, 4, 2, 64, 50, true, false, false},  {257, 1, 2, 1, 128, 0, false, true, false},
                        {200, 3, 3, 3, 32, 100, true, false, true},  {600, 4, 1, 2, 16, 25, false, true, false},
                        {2500, 2, 4, 2, 128, 50, false, false, false}};
  std::int64_t simulations = 0;
  for (const Case& k : cases) {
    CAPTURE(k.T, k.sets, k.heads, k.kv_heads, k.d, k.recent, k.sinks, k.repeated_keys, k.zero_queries);
    std::vector<float> q(static_cast<std::size_t>(k.sets * k.heads * k.T * k.d));
    for (auto& x : q) x = k.zero_queries ? 0.0f : static_cast<float>(rng.normal());
    const std::vector<float> keys = gaussian_keys(k.kv_heads, k.T, k.d, k.repeated_keys ? 7 : 0, test::seed() + 141);
    std::vector<double> sinks(static_cast<std::size_t>(k.sets * k.heads));
    for (auto& x : sinks) x = rng.normal();
    // Budgets: caches of 1, 5, 64 and T + 3 keys, and a sparsity of 0.7 (capacity grows with the position).
    const std::int64_t steps = std::max<std::int64_t>(k.T - 1, 0);
    std::vector<std::int64_t> capacity;
    for (const std::int64_t size : {std::int64_t{1}, std::int64_t{5}, std::int64_t{64}, k.T + 3, std::int64_t{-1}}) {
      for (std::int64_t t = 0; t < steps; ++t) {
        const std::int64_t wanted = size > 0 ? size : (3 * (t + 2) + 9) / 10;
        capacity.push_back(std::min(std::max<std::int64_t>(wanted, 1), t + 2));
      }
    }
    H2oRequest request;
    request.q = q.data();
    request.k = keys.data();
    request.sets = k.sets;
    request.heads = k.heads;
    request.kv_heads = k.kv_heads;
    request.seq_len = k.T;
    request.head_dim = k.d;
    request.scale = 1.0 / std::sqrt(static_cast<double>(k.d));
    request.sink_logits = k.sinks ? sinks.data() : nullptr;
    request.recent_percent = k.recent;
    request.budgets = 5;
    request.capacity = capacity.data();
    std::vector<std::int32_t> device;
    REQUIRE(gpu->h2o_evictions(request, device));
    REQUIRE(device.size() == static_cast<std::size_t>(5 * k.sets * k.T));
    std::vector<std::int32_t> split;
    REQUIRE(twice->h2o_evictions(request, split));
    CHECK(split == device);
    for (std::int64_t s = 0; s < k.sets; ++s) {
      const float* set_keys = &keys[static_cast<std::size_t>(s * k.kv_heads / k.sets * k.T * k.d)];
      auto logits = [&](std::int64_t h, std::int64_t t, const std::vector<std::int64_t>& cache, std::vector<double>& z) {
        z.resize(cache.size());
        proxy::dots(&q[static_cast<std::size_t>(((s * k.heads + h) * k.T + t) * k.d)], k.d, static_cast<std::int64_t>(cache.size()),
                    [&](std::int64_t i) { return set_keys + cache[static_cast<std::size_t>(i)] * k.d; }, z.data());
        for (double& x : z) x *= request.scale;
      };
      std::vector<std::int32_t> host(static_cast<std::size_t>(k.T));
      for (std::int64_t b = 0; b < 5; ++b) {
        proxy::h2o_simulate(k.T, k.heads, capacity.data() + b * steps, k.recent, k.sinks ? sinks.data() + s * k.heads : nullptr,
                            logits, host.data());
        ++simulations;
        for (std::int64_t j = 0; j < k.T; ++j) {
          ++compared;
          if (host[static_cast<std::size_t>(j)] != device[static_cast<std::size_t>((b * k.sets + s) * k.T + j)]) ++differing;
        }
      }
    }
  }
  std::printf("H2O on the device: %lld keys' eviction steps over %lld simulations, %lld differ from the host's\n",
              static_cast<long long>(compared), static_cast<long long>(simulations), static_cast<long long>(differing));
  CHECK(differing == 0);
}

TEST_CASE("CUDA attention received equals the host's", "[cuda]") {
  // Backend::attention_received against proxy::attention_received on the same request: logits from a
  // double GEMM in either case (their own summation orders), the device's exp, log and log-sum-exp tree.
  // MHA, GQA and MQA; one token; windows of 1, shorter than and past the sequence; slabs of query rows
  // that do not divide it (several passes, keys whose windows span passes); sinks; repeated keys (ties).
  const auto gpu = make_backend("cuda");
  const auto twice = make_backend("cuda:0,cuda:0");  // a device list splits the KV heads: the same bits
  Rng rng(test::seed() + 150);
  struct Case {
    std::int64_t T, heads, kv_heads, d, window, rows_per_pass;
    bool sinks, repeated_keys;
  };
  const Case cases[] = {{1, 1, 1, 8, 4, 0, false, false},       {300, 2, 2, 64, 50, 64, true, false},
                        {300, 4, 2, 64, 1, 64, false, false},   {257, 3, 1, 128, 1000, 128, true, true},
                        {1000, 4, 2, 128, 200, 192, false, false}, {2100, 8, 2, 32, 4096, 0, true, false}};
  double largest = 0.0;
  std::int64_t compared = 0;
  for (const Case& k : cases) {
    CAPTURE(k.T, k.heads, k.kv_heads, k.d, k.window, k.rows_per_pass, k.sinks, k.repeated_keys);
    std::vector<float> q(static_cast<std::size_t>(k.heads * k.T * k.d));
    for (auto& x : q) x = static_cast<float>(rng.normal());
    const std::vector<float> keys = gaussian_keys(k.kv_heads, k.T, k.d, k.repeated_keys ? 5 : 0, test::seed() + 151);
    std::vector<double> sinks(static_cast<std::size_t>(k.heads));
    for (auto& x : sinks) x = 2.0 * rng.normal();
    ReceivedRequest request;
    request.q = q.data();
    request.k = keys.data();
    request.heads = k.heads;
    request.kv_heads = k.kv_heads;
    request.seq_len = k.T;
    request.head_dim = k.d;
    request.scale = 1.0 / std::sqrt(static_cast<double>(k.d));
    request.sink_logits = k.sinks ? sinks.data() : nullptr;
    request.window = k.window;
    request.rows_per_pass = k.rows_per_pass;
    std::vector<double> device, host;
    REQUIRE(gpu->attention_received(request, device));
    std::vector<double> split;
    REQUIRE(twice->attention_received(request, split));
    CHECK(split == device);
    proxy::attention_received(request, host);
    REQUIRE(device.size() == host.size());
    for (std::size_t i = 0; i < host.size(); ++i) {
      const double error = std::abs(device[i] - host[i]) / std::max(std::abs(host[i]), 1e-300);
      largest = std::max(largest, error);
      ++compared;
      INFO("head " << i / static_cast<std::size_t>(k.T) << ", key " << i % static_cast<std::size_t>(k.T) << ": device "
                   << device[i] << ", host " << host[i]);
      REQUIRE(error <= kReceivedTolerance);
    }
  }
  std::printf("Attention received on the device: %lld sums, largest relative difference from the host's %.2e\n",
              static_cast<long long>(compared), largest);
}

namespace {
// Stop requests for the backend's layer-long work: at once, or at the n-th poll.
std::atomic<int> polls_before_stop{0};
bool stop_after_polls() { return polls_before_stop.fetch_sub(1) <= 0; }

// A device allocation freed at the end of the scope.
template <typename T>
struct DeviceBuffer {
  T* data = nullptr;
  explicit DeviceBuffer(std::size_t count) { REQUIRE(cudaMalloc(&data, sizeof(T) * std::max<std::size_t>(count, 1)) == cudaSuccess); }
  ~DeviceBuffer() { (void)cudaFree(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};
}  // namespace

TEST_CASE("A stop request ends the device's layer-long work early, and the device stays usable", "[cuda]") {
  // H2O's simulations and the received attention run for seconds to minutes a layer at long sequences;
  // a signal (stop_requested) must end them, the backend declining, and the next request must be served.
  const auto gpu = make_backend("cuda");
  const std::int64_t T = 8000, d = 64, heads = 4;  // H2O's kernel runs for tens of milliseconds: polls happen
  Rng rng(test::seed() + 152);
  std::vector<float> q(static_cast<std::size_t>(heads * T * d)), keys(static_cast<std::size_t>(T * d));
  for (auto& x : q) x = static_cast<float>(rng.normal());
  for (auto& x : keys) x = static_cast<float>(rng.normal());
  std::vector<std::int64_t> capacity(static_cast<std::size_t>(T - 1), 100);

  SECTION("the H2O kernel reads the flag: set before the launch, no position is simulated") {
    const std::size_t cells = static_cast<std::size_t>(T * d);
    DeviceBuffer<float> q_device(cells), keys_device(cells), keys_t(cells);
    DeviceBuffer<long long> capacity_device(static_cast<std::size_t>(T - 1));
    DeviceBuffer<int> cache(static_cast<std::size_t>(2 * T)), evicted(static_cast<std::size_t>(T));
    DeviceBuffer<double> score(static_cast<std::size_t>(T)), logits(static_cast<std::size_t>(T));
    REQUIRE(cudaMemcpy(q_device.data, q.data(), cells * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(keys_device.data, keys.data(), cells * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
    static_assert(sizeof(long long) == sizeof(std::int64_t), "capacities are copied as long long");
    REQUIRE(cudaMemcpy(capacity_device.data, capacity.data(), capacity.size() * sizeof(long long), cudaMemcpyHostToDevice) ==
            cudaSuccess);
    int* flag = nullptr;
    REQUIRE(cudaMallocHost(&flag, sizeof(int)) == cudaSuccess);
    void* flag_on_device = nullptr;
    REQUIRE(cudaHostGetDevicePointer(&flag_on_device, flag, 0) == cudaSuccess);
    cuda::H2oSimulationArgs args;
    args.q = q_device.data;
    args.keys_t = keys_t.data;
    args.seq_len = T;
    args.head_dim = static_cast<int>(d);
    args.budgets = 1;
    args.capacity = capacity_device.data;
    args.cache = cache.data;
    args.score = score.data;
    args.logits = logits.data;
    args.evicted = evicted.data;
    args.stop = static_cast<const volatile int*>(flag_on_device);
    std::vector<int> steps(static_cast<std::size_t>(T));
    for (const int stop : {1, 0}) {
      *flag = stop;
      cuda::launch_h2o_simulation(args, keys_device.data, nullptr);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      REQUIRE(cudaMemcpy(steps.data(), evicted.data, steps.size() * sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess);
      std::int64_t gone = 0;
      for (const int step : steps) gone += step != std::numeric_limits<int>::max();
      CAPTURE(stop);
      CHECK(gone == (stop ? 0 : T - 100));  // stopped at position 0; else the last step's cache holds 100 keys
    }
    (void)cudaFreeHost(flag);
  }

  SECTION("the backend declines when stopped at once or part way, then serves the next request") {
    H2oRequest h2o;
    h2o.q = q.data();
    h2o.k = keys.data();
    h2o.sets = 1;
    h2o.heads = heads;
    h2o.seq_len = T;
    h2o.head_dim = d;
    h2o.budgets = 1;
    h2o.capacity = capacity.data();
    ReceivedRequest received;
    received.q = q.data();
    received.k = keys.data();
    received.heads = heads;
    received.seq_len = T;
    received.head_dim = d;
    received.window = 100;
    std::vector<std::int32_t> evicted;
    std::vector<double> sums, host;
    h2o.stop_requested = stop_after_polls;
    received.stop_requested = stop_after_polls;
    for (const int polls : {0, 2}) {  // at the first poll; after two heads' work was queued
      CAPTURE(polls);
      polls_before_stop = polls;
      CHECK_FALSE(gpu->h2o_evictions(h2o, evicted));
      polls_before_stop = polls;
      CHECK_FALSE(gpu->attention_received(received, sums));
    }
    h2o.stop_requested = nullptr;
    received.stop_requested = nullptr;
    REQUIRE(gpu->h2o_evictions(h2o, evicted));
    REQUIRE(gpu->attention_received(received, sums));
    proxy::attention_received(received, host);
    REQUIRE(sums.size() == host.size());
    for (std::size_t i = 0; i < host.size(); ++i) REQUIRE(std::abs(sums[i] - host[i]) <= kReceivedTolerance * std::abs(host[i]));
    std::int64_t gone = 0;
    for (const std::int32_t step : evicted) gone += step != std::numeric_limits<std::int32_t>::max();
    CHECK(gone == T - 100);
  }
}

TEST_CASE("CUDA output-error walks equal the CPU's and the float64 reference", "[cuda]") {
  const auto cpu = make_cpu_backend();
  const auto gpu = make_backend("cuda:0,cuda:0");  // through the multi-device backend, as --gpus does
  double worst_cpu = 0.0, worst_reference = 0.0;
  std::int64_t checkpoints = 0;
  for (const StatsCase& k : kStatsCases) {
    if (k.T > 1200) continue;  // the float64 reference is quadratic per row
    for (const bool weighted : {false, true}) {
      CAPTURE(k.group_heads, k.d, k.T, k.rows, k.sinks, k.ties, k.scale_sign, weighted);
      const Capture c = gaussian_capture(1, 2 * k.group_heads, 2, k.d, k.T, k.sinks, k.ties, test::seed() + static_cast<std::uint64_t>(k.T));
      const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
      StatsRequest req = group_request(c, 1, rows, k.block, true, k.scale_sign);
      req.layer = 0;
      req.kv_head = 1;
      req.tensors_id = 1000 + static_cast<std::uint64_t>(&k - kStatsCases);  // keys stay resident between the two calls
      StatsTile tile, device_tile;
      cpu->block_statistics(req, tile);
      gpu->block_statistics(req, device_tile);
      const OutputWalks walks = reference::random_output_walks(req, test::seed() + 5, weighted);
      std::vector<double> on_cpu, on_gpu;
      cpu->output_errors(req, tile, walks, on_cpu);
      gpu->output_errors(req, tile, walks, on_gpu);
      const std::vector<double> expected = reference::naive_output_errors(req, walks);
      REQUIRE(on_gpu.size() == on_cpu.size());
      for (std::size_t i = 0; i < on_gpu.size(); ++i) {
        const double gap = std::fabs(on_gpu[i] - on_cpu[i]), off = std::fabs(on_gpu[i] - expected[i]);
        worst_cpu = std::max(worst_cpu, gap);
        worst_reference = std::max(worst_reference, off);
        if (!(gap <= kGpuOutputErrorTolerance) || !(off <= kGpuOutputErrorTolerance)) {
          CAPTURE(i, on_gpu[i], on_cpu[i], expected[i]);
          CHECK(gap <= kGpuOutputErrorTolerance);
          CHECK(off <= kGpuOutputErrorTolerance);
        }
      }
      checkpoints += walks.checkpoints;
    }
  }
  std::printf("output walks: %lld checkpoints, largest difference vs CPU %.2e, vs float64 %.2e (tolerance %.0e)\n",
              static_cast<long long>(checkpoints), worst_cpu, worst_reference, kGpuOutputErrorTolerance);
}

TEST_CASE("CUDA resident keys follow the request's tensors, whatever the order of heads and captures", "[cuda]") {
  const auto cpu = make_cpu_backend();
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    const auto gpu = make_backend("cuda", precision);
    std::uint64_t tensors_id = 0;
    for (int capture = 0; capture < 2; ++capture) {
      const Capture c = gaussian_capture(1, 8, 4, 64, 700, false, false, test::seed() + 17 + static_cast<std::uint64_t>(capture),
                                         precision);
      const std::vector<std::int64_t> all = query_rows("all", 700, test::seed());
      ++tensors_id;
      // Heads interleaved tile by tile: 0, 2, 1, 3, 0, 2, ...
      for (std::size_t r0 = 0; r0 < all.size(); r0 += 175) {
        const std::vector<std::int64_t> rows(all.begin() + static_cast<std::ptrdiff_t>(r0),
                                             all.begin() + static_cast<std::ptrdiff_t>(std::min(all.size(), r0 + 175)));
        for (const std::int64_t group : {0, 2, 1, 3}) {
          CAPTURE(to_string(precision), capture, r0, group);
          StatsRequest req = group_request(c, group, rows, 64, false);
          req.layer = 0;
          req.kv_head = group;
          req.tensors_id = tensors_id;
          StatsTile a, b;
          cpu->block_statistics(req, a);
          gpu->block_statistics(req, b);
          compare_exact(a, b);  // inputs exact in the precision: the fp32 tolerances hold
        }
      }
    }
  }
}

// The backend serves the engine's threads at once, each request on a lane (stream) of its own, and
// copies the next layer's keys while a layer runs (prepare_keys). Neither may change a number: tiles
// and output-error walks of requests made by 8 threads at once, over 3 layers (each layer's keys
// prepared during the previous one, so both generations of every KV head are in play), then layer 0
// again (its keys replaced since), equal those of one request at a time on a fresh backend, bit for bit.
TEST_CASE("Concurrent CUDA requests and prepared keys give the numbers of one request at a time", "[cuda]") {
  constexpr std::int64_t kLayers = 3, kKvHeads = 4, kT = 1500, kTileRows = 250;
  constexpr int kThreads = 8;
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    const Capture c = gaussian_capture(kLayers, 8, kKvHeads, 64, kT, true, false, test::seed() + 23, precision);
    const std::vector<std::int64_t> all = query_rows("all", kT, test::seed());
    const std::int64_t tiles = (kT + kTileRows - 1) / kTileRows;
    std::vector<std::vector<std::int64_t>> tile_rows;
    for (std::int64_t i = 0; i < tiles; ++i) {
      tile_rows.emplace_back(all.begin() + i * kTileRows, all.begin() + std::min(kT, (i + 1) * kTileRows));
    }
    auto request = [&](std::int64_t layer, std::int64_t group, std::int64_t tile) {
      const std::int64_t G = 2, d = 64;
      StatsRequest req = group_request(c, group, tile_rows[static_cast<std::size_t>(tile)], 64, true);
      const LayerTensors& t = c.layers[static_cast<std::size_t>(layer)];
      req.q = t.q.data() + group * G * kT * d;
      req.k = t.k.data() + group * kT * d;
      req.v = t.v.data() + group * kT * d;
      req.sink_logits = t.sink_logits.data() + group * G;
      req.layer = layer;
      req.kv_head = group;
      req.tensors_id = static_cast<std::uint64_t>(layer + 1);
      return req;
    };
    struct Result {
      StatsTile tile;
      std::vector<double> errors;
    };
    auto compute = [&](const Backend& backend, std::int64_t layer, std::int64_t group, std::int64_t tile, Result& out) {
      const StatsRequest req = request(layer, group, tile);
      backend.block_statistics(req, out.tile);
      const OutputWalks walks = reference::random_output_walks(req, test::seed() + static_cast<std::uint64_t>(tile), true);
      backend.output_errors(req, out.tile, walks, out.errors);
    };
    const std::vector<std::int64_t> order = {0, 1, 2, 0};
    const std::int64_t items = kKvHeads * tiles;
    // One request at a time.
    std::vector<Result> expected(static_cast<std::size_t>(kLayers * items));
    {
      const auto gpu = make_backend("cuda", precision);
      for (std::int64_t layer = 0; layer < kLayers; ++layer) {
        for (std::int64_t item = 0; item < items; ++item) {
          compute(*gpu, layer, item / tiles, item % tiles, expected[static_cast<std::size_t>(layer * items + item)]);
        }
      }
    }
    // Threads at once, the next layer's keys prepared meanwhile.
    const auto gpu = make_backend("cuda", precision);
    for (std::size_t step = 0; step < order.size(); ++step) {
      const std::int64_t layer = order[step];
      std::vector<Result> got(static_cast<std::size_t>(items));
      std::atomic<std::int64_t> next{0};
      std::atomic<int> failures{0};
      std::vector<std::thread> pool;
      for (int i = 0; i < kThreads; ++i) {
        pool.emplace_back([&] {
          try {
            for (std::int64_t item = next++; item < items; item = next++) {
              compute(*gpu, layer, item / tiles, item % tiles, got[static_cast<std::size_t>(item)]);
            }
          } catch (const std::exception& e) {
            std::printf("  request failed: %s\n", e.what());
            ++failures;
          }
        });
      }
      if (step + 1 < order.size()) {
        pool.emplace_back([&] {
          try {
            for (std::int64_t group = 0; group < kKvHeads; ++group) {
              StatsRequest req = request(order[step + 1], group, tiles - 1);
              req.rows = all.data();
              req.num_rows = kT;
              gpu->prepare_keys(req);
            }
          } catch (const std::exception& e) {
            std::printf("  prepare_keys failed: %s\n", e.what());
            ++failures;
          }
        });
      }
      for (auto& thread : pool) thread.join();
      REQUIRE(failures == 0);
      for (std::int64_t item = 0; item < items; ++item) {
        CAPTURE(step, layer, item);
        const Result& a = expected[static_cast<std::size_t>(layer * items + item)];
        const Result& b = got[static_cast<std::size_t>(item)];
        CHECK(same_bits(a.tile.block_max, b.tile.block_max));
        CHECK(same_bits(a.tile.block_sum, b.tile.block_sum));
        CHECK(same_bits(a.tile.lse_tokens, b.tile.lse_tokens));
        CHECK(same_bits(a.tile.lse_all, b.tile.lse_all));
        CHECK(same_bits(a.tile.output, b.tile.output));
        CHECK(same_bits(a.errors, b.errors));  // NaN where an exact output is zero: compared as bits
      }
    }
  }
}

TEST_CASE("Concurrent fp32 requests of two head_dims on one device give the numbers of one at a time", "[cuda]") {
  // The tiled fp32 kernel's shared memory grows with head_dim (32 KiB at 64, 80 KiB at 256): its allowance is
  // the device's, set once, so a request of the smaller head_dim cannot lower it under the larger one's launch.
  constexpr std::int64_t kT = 700, kRounds = 24;
  constexpr int kThreads = 6;
  const Capture narrow = gaussian_capture(1, 2, 1, 64, kT, false, false, test::seed() + 31);
  const Capture wide = gaussian_capture(1, 2, 1, 256, kT, false, false, test::seed() + 32);
  const std::vector<std::int64_t> rows = query_rows("all", kT, test::seed());
  auto request = [&](const Capture& c, std::uint64_t id) {
    StatsRequest req = group_request(c, 0, rows, 64, false);
    req.layer = 0;
    req.kv_head = 0;
    req.tensors_id = id;
    return req;
  };
  const auto gpu = make_backend("cuda", Precision::kFp32);
  StatsTile expected[2];
  gpu->block_statistics(request(narrow, 1), expected[0]);
  gpu->block_statistics(request(wide, 2), expected[1]);
  std::atomic<int> failures{0}, mismatches{0};
  std::vector<std::thread> pool;
  for (int i = 0; i < kThreads; ++i) {
    pool.emplace_back([&, i] {
      try {
        StatsTile tile;
        for (std::int64_t round = 0; round < kRounds; ++round) {
          const int which = static_cast<int>((i + round) % 2);
          gpu->block_statistics(request(which ? wide : narrow, which ? 2 : 1), tile);
          if (!same_bits(tile.block_max, expected[which].block_max) || !same_bits(tile.block_sum, expected[which].block_sum)) {
            ++mismatches;
          }
        }
      } catch (const std::exception& e) {
        std::printf("  request failed: %s\n", e.what());
        ++failures;
      }
    });
  }
  for (auto& thread : pool) thread.join();
  CHECK(failures == 0);
  CHECK(mismatches == 0);
}

TEST_CASE("CUDA bf16/fp16 statistics equal the CPU's on inputs exact in that type", "[cuda]") {
  const auto cpu = make_cpu_backend();
  for (const Precision precision : {Precision::kBf16, Precision::kFp16}) {
    const auto gpu = make_backend("cuda", precision);
    CHECK(gpu->precision() == precision);
    Deviation worst;
    for (const StatsCase& k : kStatsCases) {
      CAPTURE(to_string(precision), k.group_heads, k.d, k.T, k.block, k.rows, k.sinks, k.ties, k.scale_sign);
      const Capture c = gaussian_capture(1, 2 * k.group_heads, 2, k.d, k.T, k.sinks, k.ties,
                                         test::seed() + static_cast<std::uint64_t>(k.T), precision);
      const std::vector<std::int64_t> rows = query_rows(k.rows, k.T, test::seed());
      const StatsRequest req = group_request(c, 1, rows, k.block, true, k.scale_sign);
      StatsTile a, b;
      cpu->block_statistics(req, a);
      gpu->block_statistics(req, b);
      const Deviation d = compare_exact(a, b);
      worst.widen(d);
    }
    std::printf("%s on %s-exact inputs vs CPU: largest block-mass relative error %.2e (tolerance %.0e), logit %.2e (%.0e), "
                "output %.2e (%.0e)\n",
                to_string(precision), to_string(precision), worst.mass_relative, kGpuMassTolerance, worst.logit,
                kGpuLogitTolerance, worst.output, kGpuOutputTolerance);
  }
}

TEST_CASE("CUDA bf16/fp16 statistics on fp32 inputs stay within the input-rounding bound", "[cuda]") {
  const auto cpu = make_cpu_backend();
  for (const Precision precision : {Precision::kBf16, Precision::kFp16}) {
    const double u = precision == Precision::kBf16 ? kBf16UnitRoundoff : kFp16UnitRoundoff;
    const auto gpu = make_backend("cuda", precision);
    Deviation worst;
    double widest_bound = 0;
    for (const auto& [G, d, T, block] : {std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>{4, 128, 1500, 64},
                                          {8, 64, 800, 16}, {2, 128, 700, 128}, {4, 64, 300, 24}}) {
      CAPTURE(to_string(precision), G, d, T, block);
      const Capture c = gaussian_capture(1, 2 * G, 2, d, T, true, false, test::seed() + 17 * static_cast<std::uint64_t>(T));
      const std::vector<std::int64_t> rows = query_rows("all", T, test::seed());
      const StatsRequest req = group_request(c, 0, rows, block, false);
      // delta_row = (2u + u^2) |scale| max_j sum_c |q_c k_jc|: the largest logit change rounding can cause.
      std::vector<double> delta(static_cast<std::size_t>(G * T));
      for (std::int64_t h = 0; h < G; ++h) {
        for (std::int64_t t = 0; t < T; ++t) {
          double largest = 0;
          for (std::int64_t j = 0; j <= t; ++j) {
            double s = 0;
            for (std::int64_t x = 0; x < d; ++x) s += std::fabs(req.q[(h * T + t) * d + x] * req.k[j * d + x]);
            largest = std::max(largest, s);
          }
          delta[static_cast<std::size_t>(h * T + t)] = (2 * u + u * u) * std::fabs(req.scale) * largest;
        }
      }
      StatsTile a, b;
      cpu->block_statistics(req, a);
      gpu->block_statistics(req, b);
      const auto row_delta = [&](std::int64_t h, std::int64_t r) { return delta[static_cast<std::size_t>(h * T + rows[static_cast<std::size_t>(r)])]; };
      const Deviation dev = compare_tiles(
          a, b, [&](std::int64_t h, std::int64_t r) { return std::expm1(2 * row_delta(h, r)) + kGpuMassTolerance; },
          [&](std::int64_t h, std::int64_t r) { return row_delta(h, r) + kGpuLogitTolerance; }, kGpuOutputTolerance);
      worst.widen(dev);
      for (double x : delta) widest_bound = std::max(widest_bound, std::expm1(2 * x));
    }
    std::printf("%s on fp32 inputs vs CPU fp32: largest block-mass error %.2e relative, %.2e absolute; logit %.2e "
                "(worst-case rounding bound on these inputs: %.2e relative)\n",
                to_string(precision), worst.mass_relative, worst.mass_absolute, worst.logit, widest_bound);
  }
}

TEST_CASE("The tensor-core kernel runs for the block sizes it supports", "[cuda]") {
  CHECK(cuda::tensor_core_supports(8, 128));
  CHECK(cuda::tensor_core_supports(64, 128));
  CHECK(cuda::tensor_core_supports(192, 64));
  CHECK_FALSE(cuda::tensor_core_supports(24, 128));
  CHECK_FALSE(cuda::tensor_core_supports(1, 128));
  CHECK_FALSE(cuda::tensor_core_supports(64, 32));
  // Straight through the device pass: the plan picks the kernel the header promises. All-zero
  // inputs make every causal logit 0, so row t's log-sum-exp is log(t + 1) on either kernel.
  const int rows = 100, d = 128, stride = cuda::input_stride(cuda::InputType::kBfloat16, d);
  std::vector<long long> positions(rows);
  for (int r = 0; r < rows; ++r) positions[static_cast<std::size_t>(r)] = 3 * r;
  const long long keys = 320, most_blocks = positions.back() / 8 + 1;
  void *q = nullptr, *k = nullptr;
  long long* pos = nullptr;
  float *m = nullptr, *l = nullptr;
  double *lse_tokens = nullptr, *lse_all = nullptr;
  REQUIRE(cudaMalloc(&q, static_cast<std::size_t>(rows * stride * 2)) == cudaSuccess);
  REQUIRE(cudaMalloc(&k, static_cast<std::size_t>(keys * stride * 2)) == cudaSuccess);
  REQUIRE(cudaMalloc(&pos, sizeof(long long) * rows) == cudaSuccess);
  REQUIRE(cudaMalloc(&m, sizeof(float) * static_cast<std::size_t>(rows * most_blocks)) == cudaSuccess);
  REQUIRE(cudaMalloc(&l, sizeof(float) * static_cast<std::size_t>(rows * most_blocks)) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_tokens, sizeof(double) * rows) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_all, sizeof(double) * rows) == cudaSuccess);
  REQUIRE(cudaMemset(q, 0, static_cast<std::size_t>(rows * stride * 2)) == cudaSuccess);
  REQUIRE(cudaMemset(k, 0, static_cast<std::size_t>(keys * stride * 2)) == cudaSuccess);
  REQUIRE(cudaMemcpy(pos, positions.data(), sizeof(long long) * rows, cudaMemcpyHostToDevice) == cudaSuccess);
  cuda::StatsPass pass(1);
  cuda::StatsPassArgs args;
  args.type = cuda::InputType::kBfloat16;
  args.q = q;
  args.k = k;
  args.positions = pos;
  args.host_positions = positions.data();
  args.heads = 1;
  args.rows = rows;
  args.head_dim = d;
  args.score_scale = 0.1f;
  args.block_max = m;
  args.block_sum = l;
  args.lse_tokens = lse_tokens;
  args.lse_all = lse_all;
  // The default tensor-core kernel is wgmma on compute capability 9.0, mma.sync elsewhere.
  const std::string tensor_core = pass.wgmma() ? "wgmma" : "mma";
  for (const auto& [block, kernel] : {std::pair<long long, std::string>{64, tensor_core}, {8, tensor_core},
                                      {128, tensor_core}, {24, "simt"}, {1, "simt"}}) {
    CAPTURE(block);
    args.block = block;
    args.num_blocks = positions.back() / block + 1;
    if (args.num_blocks > most_blocks) {
      args.rows = 20;  // block 1: fewer rows, so the cells fit the buffers
      args.num_blocks = positions[19] / block + 1;
    }
    CHECK(pass.run(args, nullptr) == kernel);
    std::vector<double> lse(static_cast<std::size_t>(args.rows));
    REQUIRE(cudaMemcpy(lse.data(), lse_tokens, sizeof(double) * lse.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
    for (int r = 0; r < args.rows; ++r) CHECK(lse[static_cast<std::size_t>(r)] == Approx(std::log(3.0 * r + 1.0)).margin(1e-6));
  }
  for (void* p : {q, k, static_cast<void*>(pos), static_cast<void*>(m), static_cast<void*>(l), static_cast<void*>(lse_tokens),
                  static_cast<void*>(lse_all)}) {
    cudaFree(p);
  }
}

TEST_CASE("The tensor-core kernels and layouts give the same statistics", "[cuda]") {
  // The reference is the mma.sync kernel at 16 rows per warp (the default off compute capability
  // 9.0); this holds the 32-row layout and, on 9.0, the wgmma kernel (the default there) to it on random bf16
  // inputs: strided rows (the last row group part empty), three heads (a thread block's second
  // head chunk half empty), head_dim 64, 128 and 256, blocks inside a key tile and across tiles.
  const int heads = 3, T = 3000;
  std::vector<long long> positions;
  for (long long t = 5; t < T; t += 3) positions.push_back(t);
  const int rows = static_cast<int>(positions.size());
  const long long padded_keys = (T + 63) / 64 * 64, most_blocks = positions.back() / 8 + 1;
  const auto cells = static_cast<std::size_t>(heads) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(most_blocks);
  float *q32 = nullptr, *k32 = nullptr, *m = nullptr, *l = nullptr;
  void *q = nullptr, *k = nullptr;
  long long* pos = nullptr;
  double *lse_tokens = nullptr, *lse_all = nullptr;
  REQUIRE(cudaMalloc(&q32, sizeof(float) * static_cast<std::size_t>(heads * rows * 256)) == cudaSuccess);
  REQUIRE(cudaMalloc(&k32, sizeof(float) * static_cast<std::size_t>(T * 256)) == cudaSuccess);
  REQUIRE(cudaMalloc(&q, static_cast<std::size_t>(heads * rows * 256 * 2)) == cudaSuccess);
  REQUIRE(cudaMalloc(&k, static_cast<std::size_t>(padded_keys * 256 * 2)) == cudaSuccess);
  REQUIRE(cudaMalloc(&pos, sizeof(long long) * positions.size()) == cudaSuccess);
  REQUIRE(cudaMalloc(&m, sizeof(float) * cells) == cudaSuccess);
  REQUIRE(cudaMalloc(&l, sizeof(float) * cells) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_tokens, sizeof(double) * static_cast<std::size_t>(heads * rows)) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_all, sizeof(double) * static_cast<std::size_t>(heads * rows)) == cudaSuccess);
  REQUIRE(cudaMemcpy(pos, positions.data(), sizeof(long long) * positions.size(), cudaMemcpyHostToDevice) == cudaSuccess);
  cuda::StatsPass pass(132);
  if (!pass.wgmma()) {
    std::printf("no wgmma on this device (compute capability 9.0 only): mma.sync layouts compared\n");
    cuda::StatsPassArgs args;
    args.type = cuda::InputType::kBfloat16;
    args.heads = 1;
    args.rows = 1;
    args.head_dim = 128;
    args.tensor_core_kernel = cuda::TensorCoreKernel::kWgmma;
    try {
      (void)pass.run(args, nullptr);
      FAIL("wgmma asked for on a device without it ran");
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::kUsage);
    }
  }

  struct Variant {
    const char* name;
    cuda::TensorCoreKernel kernel;
    int rows_per_warp;
  };
  std::vector<Variant> variants = {{"mma/32", cuda::TensorCoreKernel::kMma, 32}};
  if (pass.wgmma()) {
    variants.push_back({"wgmma", cuda::TensorCoreKernel::kWgmma, 0});
  }
  int device = 0, shared_optin = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess);
  for (const int d : {64, 128, 256}) {
    const int stride = cuda::input_stride(cuda::InputType::kBfloat16, d);
    if (cuda::mma_shared_bytes(stride) > static_cast<std::size_t>(shared_optin)) {
      std::printf("head_dim %d: the mma.sync kernel's %zu bytes of shared memory exceed this GPU's %d a block\n", d,
                  cuda::mma_shared_bytes(stride), shared_optin);
      continue;
    }
    cuda::fill_normal(q32, static_cast<std::size_t>(heads * rows * d), test::seed() + static_cast<std::uint64_t>(d), nullptr);
    cuda::fill_normal(k32, static_cast<std::size_t>(T * d), test::seed() + 1 + static_cast<std::uint64_t>(d), nullptr);
    REQUIRE(cudaMemset(k, 0, static_cast<std::size_t>(padded_keys * stride * 2)) == cudaSuccess);
    cuda::convert_rows(cuda::InputType::kBfloat16, q32, heads * rows, d, 2.0f, q, nullptr, nullptr);
    cuda::convert_rows(cuda::InputType::kBfloat16, k32, T, d, 1.0f, k, nullptr, nullptr);
    cuda::StatsPassArgs args;
    args.type = cuda::InputType::kBfloat16;
    args.q = q;
    args.k = k;
    args.positions = pos;
    args.host_positions = positions.data();
    args.heads = heads;
    args.rows = rows;
    args.head_dim = d;
    args.score_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    args.block_max = m;
    args.block_sum = l;
    args.lse_tokens = lse_tokens;
    args.lse_all = lse_all;
    for (const long long block : {8LL, 16LL, 64LL, 192LL}) {
      CAPTURE(d, block);
      args.block = block;
      args.num_blocks = positions.back() / block + 1;
      const auto n = static_cast<std::size_t>(heads) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(args.num_blocks);
      auto run = [&](cuda::TensorCoreKernel kernel, int rows_per_warp, std::vector<float>& mo, std::vector<float>& lo,
                     std::vector<double>& so) {
        args.tensor_core_kernel = kernel;
        args.tensor_core_rows_per_warp = rows_per_warp;
        const std::string used = pass.run(args, nullptr);
        REQUIRE(used == (kernel == cuda::TensorCoreKernel::kMma ? "mma" : "wgmma"));
        mo.resize(n);
        lo.resize(n);
        so.resize(static_cast<std::size_t>(heads * rows));
        REQUIRE(cudaMemcpy(mo.data(), m, sizeof(float) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
        REQUIRE(cudaMemcpy(lo.data(), l, sizeof(float) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
        REQUIRE(cudaMemcpy(so.data(), lse_tokens, sizeof(double) * so.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
      };
      std::vector<float> m_ref, l_ref, m_other, l_other;
      std::vector<double> lse_ref, lse_other;
      run(cuda::TensorCoreKernel::kMma, 16, m_ref, l_ref, lse_ref);
      for (const Variant& variant : variants) {
        if (variant.rows_per_warp == 32 && cuda::tensor_core_rows_per_warp(stride, 32) != 32) continue;  // depth 256
        run(variant.kernel, variant.rows_per_warp, m_other, l_other, lse_other);
        double worst = 0;
        std::size_t mismatched_empty = 0;
        for (std::size_t i = 0; i < n; ++i) {
          if (std::isinf(m_ref[i]) || std::isinf(m_other[i])) {  // empty blocks: both -inf, sum 0
            if (m_ref[i] != m_other[i] || l_ref[i] != l_other[i]) ++mismatched_empty;
            continue;
          }
          worst = std::max({worst, std::fabs(static_cast<double>(m_ref[i]) - m_other[i]) / (1.0 + std::fabs(m_ref[i])),
                            std::fabs(static_cast<double>(l_ref[i]) - l_other[i]) / l_ref[i]});
        }
        for (std::size_t i = 0; i < lse_ref.size(); ++i) worst = std::max(worst, std::fabs(lse_ref[i] - lse_other[i]));
        std::printf("tensor-core %s vs mma/16, head_dim %d, block %lld: largest difference %.2e\n", variant.name, d, block, worst);
        CHECK(mismatched_empty == 0);
        CHECK(worst <= kKernelAgreementTolerance);
      }
    }
  }
  for (void* p : {static_cast<void*>(q32), static_cast<void*>(k32), q, k, static_cast<void*>(pos), static_cast<void*>(m),
                  static_cast<void*>(l), static_cast<void*>(lse_tokens), static_cast<void*>(lse_all)}) {
    cudaFree(p);
  }
}

TEST_CASE("The tiled fp32 kernel gives the basic SIMT kernel's statistics", "[cuda]") {
  // Both form every logit as the same fmaf chain over channels in ascending order: block maxima must be
  // equal bit for bit; block sums differ only in the order a block's exponentials are added. Random
  // fp32 inputs, strided rows (the last row tile part empty), three heads, head_dim 4 to 256 (not all
  // multiples of the 32-channel slice), every block size the tiled kernel takes.
  const int heads = 3, T = 2100;
  std::vector<long long> positions;
  for (long long t = 2; t < T; t += 3) positions.push_back(t);
  const int rows = static_cast<int>(positions.size());
  const long long most_blocks = positions.back() / 8 + 1;
  const auto cells = static_cast<std::size_t>(heads) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(most_blocks);
  float *q = nullptr, *k = nullptr, *m = nullptr, *l = nullptr;
  long long* pos = nullptr;
  double *lse_tokens = nullptr, *lse_all = nullptr;
  REQUIRE(cudaMalloc(&q, sizeof(float) * static_cast<std::size_t>(heads * rows * 256)) == cudaSuccess);
  REQUIRE(cudaMalloc(&k, sizeof(float) * static_cast<std::size_t>(T * 256)) == cudaSuccess);
  REQUIRE(cudaMalloc(&pos, sizeof(long long) * positions.size()) == cudaSuccess);
  REQUIRE(cudaMalloc(&m, sizeof(float) * cells) == cudaSuccess);
  REQUIRE(cudaMalloc(&l, sizeof(float) * cells) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_tokens, sizeof(double) * static_cast<std::size_t>(heads * rows)) == cudaSuccess);
  REQUIRE(cudaMalloc(&lse_all, sizeof(double) * static_cast<std::size_t>(heads * rows)) == cudaSuccess);
  REQUIRE(cudaMemcpy(pos, positions.data(), sizeof(long long) * positions.size(), cudaMemcpyHostToDevice) == cudaSuccess);
  cuda::StatsPass pass(132);
  cuda::StatsPassArgs args;
  args.type = cuda::InputType::kFloat32;
  args.q = q;
  args.k = k;
  args.positions = pos;
  args.host_positions = positions.data();
  args.heads = heads;
  args.rows = rows;
  args.block_max = m;
  args.block_sum = l;
  args.lse_tokens = lse_tokens;
  args.lse_all = lse_all;
  double worst = 0;
  std::size_t compared = 0;
  for (const int d : {4, 36, 64, 128, 200, 256}) {
    cuda::fill_normal(q, static_cast<std::size_t>(heads * rows * d), test::seed() + 7 + static_cast<std::uint64_t>(d), nullptr);
    cuda::fill_normal(k, static_cast<std::size_t>(T * d), test::seed() + 8 + static_cast<std::uint64_t>(d), nullptr);
    args.head_dim = d;
    args.score_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    for (const long long block : {8LL, 16LL, 32LL, 64LL, 192LL}) {
      CAPTURE(d, block);
      args.block = block;
      args.num_blocks = positions.back() / block + 1;
      const auto n = static_cast<std::size_t>(heads) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(args.num_blocks);
      auto run = [&](cuda::SimtKernel kernel, const char* expected, std::vector<float>& mo, std::vector<float>& lo,
                     std::vector<double>& so) {
        args.simt_kernel = kernel;
        REQUIRE(std::string(pass.run(args, nullptr)) == expected);
        mo.resize(n);
        lo.resize(n);
        so.resize(static_cast<std::size_t>(heads * rows));
        REQUIRE(cudaMemcpy(mo.data(), m, sizeof(float) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
        REQUIRE(cudaMemcpy(lo.data(), l, sizeof(float) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
        REQUIRE(cudaMemcpy(so.data(), lse_tokens, sizeof(double) * so.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
      };
      std::vector<float> m_basic, l_basic, m_tiled, l_tiled;
      std::vector<double> lse_basic, lse_tiled;
      run(cuda::SimtKernel::kBasic, "simt", m_basic, l_basic, lse_basic);
      run(cuda::SimtKernel::kAuto, "simt-tiled", m_tiled, l_tiled, lse_tiled);
      std::size_t maxima_differ = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (std::memcmp(&m_basic[i], &m_tiled[i], sizeof(float)) != 0) ++maxima_differ;
        if (!std::isinf(m_basic[i])) {
          worst = std::max(worst, std::fabs(static_cast<double>(l_basic[i]) - l_tiled[i]) / l_basic[i]);
          ++compared;
        } else {
          CHECK(l_tiled[i] == 0.0f);
        }
      }
      for (std::size_t i = 0; i < lse_basic.size(); ++i) worst = std::max(worst, std::fabs(lse_basic[i] - lse_tiled[i]));
      CHECK(maxima_differ == 0);
    }
  }
  std::printf("tiled vs basic fp32 SIMT kernel: %zu block sums, largest difference %.2e (tolerance %.0e); block maxima equal\n",
              compared, worst, kKernelAgreementTolerance);
  CHECK(worst <= kKernelAgreementTolerance);
  // Shapes the tiled kernel does not take: the default falls back to the basic kernel; asking for it is a usage error.
  args.head_dim = 30;
  args.block = 64;
  args.num_blocks = positions.back() / 64 + 1;
  args.simt_kernel = cuda::SimtKernel::kAuto;
  CHECK(std::string(pass.run(args, nullptr)) == "simt");
  args.head_dim = 64;
  args.block = 24;
  args.num_blocks = positions.back() / 24 + 1;
  CHECK(std::string(pass.run(args, nullptr)) == "simt");
  args.simt_kernel = cuda::SimtKernel::kTiled;
  try {
    (void)pass.run(args, nullptr);
    FAIL("the tiled SIMT kernel ran on blocks of 24 keys");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kUsage);
  }
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(pos), static_cast<void*>(m),
                  static_cast<void*>(l), static_cast<void*>(lse_tokens), static_cast<void*>(lse_all)}) {
    cudaFree(p);
  }
}

TEST_CASE("Precision choices the device cannot honour are usage errors", "[cuda]") {
  auto kind_of = [](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      std::printf("  expected error: %s\n", e.what());
      return e.kind();
    }
    return ErrorKind::kInternal;
  };
  CHECK(kind_of([] { make_backend("cpu", "bf16"); }) == ErrorKind::kUsage);
  CHECK(kind_of([] { make_backend("cuda", "tf32"); }) == ErrorKind::kUsage);
  // fp16 tops out at 65504: a larger input is refused, never turned into inf or NaN.
  Capture c = gaussian_capture(1, 2, 1, 64, 100, false, false, test::seed());
  c.layers[0].k[5 * 64 + 3] = 1e5f;
  const std::vector<std::int64_t> rows = query_rows("all", 100, 0);
  const StatsRequest req = group_request(c, 0, rows, 64, false);
  const auto gpu = make_backend("cuda", Precision::kFp16);
  StatsTile tile;
  CHECK(kind_of([&] { gpu->block_statistics(req, tile); }) == ErrorKind::kUsage);
  const auto bf16 = make_backend("cuda", Precision::kBf16);  // bf16 has fp32's range
  bf16->block_statistics(req, tile);
  CHECK(std::isfinite(tile.lse_all[0]));
}

TEST_CASE("A layer too large for the device is a resource error, and the device stays usable", "[cuda]") {
  // A request that claims 2^29 keys of head_dim 256 (512 GiB in fp32): the key buffer cannot be
  // allocated, which must be ErrorKind::kResource before any host array is read past its end.
  const Capture c = gaussian_capture(1, 2, 1, 64, 100, false, false, test::seed() + 41);
  const std::vector<std::int64_t> rows = query_rows("all", 100, 0);
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    const auto gpu = make_backend("cuda", precision);
    std::vector<float> q(256, 0.5f);
    const std::int64_t first_row = 0;
    StatsRequest huge;
    huge.q = q.data();
    huge.k = q.data();  // never read: the allocation fails first
    huge.heads = 1;
    huge.seq_len = std::int64_t{1} << 29;
    huge.head_dim = 256;
    huge.scale = 0.0625;
    huge.rows = &first_row;
    huge.num_rows = 1;
    huge.layer = 0;
    huge.kv_head = 0;
    huge.tensors_id = 1;
    StatsTile tile;
    try {
      gpu->block_statistics(huge, tile);
      FAIL("a 512 GiB key buffer was allocated");
    } catch (const Error& e) {
      std::printf("  expected error: %s\n", e.what());
      CHECK(e.kind() == ErrorKind::kResource);
    }
    // The same backend then serves an ordinary request (no stale CUDA error reported by a launch).
    const auto cpu = make_cpu_backend();
    StatsRequest req = group_request(c, 0, rows, 64, false);
    StatsTile a, b;
    cpu->block_statistics(req, a);
    gpu->block_statistics(req, b);
    if (precision == Precision::kFp32) compare_exact(a, b);
    else CHECK(b.lse_tokens.size() == a.lse_tokens.size());
  }
}

namespace {

void compare_tables(const Table& cpu, const Table& gpu, double tolerance, const std::string& what) {
  INFO(what);
  REQUIRE(cpu.values.size() == gpu.values.size());
  for (std::size_t i = 0; i < cpu.values.size(); ++i) {
    if (std::isnan(cpu.values[i])) {
      CHECK(std::isnan(gpu.values[i]));
    } else {
      CHECK(gpu.values[i] == Approx(cpu.values[i]).margin(tolerance));
    }
  }
}

// Every table of the two reports. exact: every number equal (the same kernels on the same
// inputs); else the CPU-vs-GPU tolerances, and the model quantiles, which come from a histogram
// of kModelHistogramBins bins, to one bin (a row whose recall moves by 1e-6 may cross an edge).
void compare_reports(const ReplayResult& cpu, const ReplayResult& gpu, bool exact = false) {
  REQUIRE(cpu.selectors.size() == gpu.selectors.size());
  const double mass_tolerance = exact ? 0.0 : kGpuMassTolerance;
  const double histogram_tolerance = exact ? 0.0 : kGpuMassTolerance + 1.0 / kModelHistogramBins;
  for (std::size_t s = 0; s < cpu.selectors.size(); ++s) {
    const auto& a = cpu.selectors[s];
    const auto& b = gpu.selectors[s];
    CHECK(a.first_scored == b.first_scored);
    CHECK(a.is_full_layer == b.is_full_layer);
    compare_tables(Table{{}, a.kv_resident_bytes}, Table{{}, b.kv_resident_bytes}, 0.0, a.label + " kv bytes");
    for (int m = 0; m < kNumMetrics; ++m) {
      // Keys attended and budgets are integers that depend only on the selection: equal means equal selections.
      const double tolerance = exact ? 0.0
                               : (m == kAttendedKeys || m == kBudgetKeys) ? 1e-9
                               : (m == kOutputError ? kGpuOutputTolerance : kGpuMassTolerance);
      const std::string name = a.label + " " + metric_name(m);
      compare_tables(a.head_mean[m], b.head_mean[m], tolerance, name);
      compare_tables(a.layer_mean[m], b.layer_mean[m], tolerance, name + " layer");
      compare_tables(a.model_mean[m], b.model_mean[m], tolerance, name + " model");
      compare_tables(a.model_sparse_mean[m], b.model_sparse_mean[m], tolerance, name + " model, sparse layers");
    }
    for (const auto& [x, y, what] : {std::tuple{&a.head_recall_p10, &b.head_recall_p10, "head p10"},
                                     {&a.head_recall_p50, &b.head_recall_p50, "head p50"},
                                     {&a.head_recall_min, &b.head_recall_min, "head min"},
                                     {&a.layer_recall_p10, &b.layer_recall_p10, "layer p10"},
                                     {&a.layer_recall_p50, &b.layer_recall_p50, "layer p50"},
                                     {&a.layer_recall_min, &b.layer_recall_min, "layer min"},
                                     {&a.model_recall_min, &b.model_recall_min, "model min"},
                                     {&a.model_sparse_recall_min, &b.model_sparse_recall_min, "model sparse min"}}) {
      compare_tables(*x, *y, mass_tolerance, a.label + " " + what);
    }
    for (const auto& [x, y, what] : {std::tuple{&a.model_recall_p10, &b.model_recall_p10, "model p10"},
                                     {&a.model_recall_p50, &b.model_recall_p50, "model p50"},
                                     {&a.model_sparse_recall_p10, &b.model_sparse_recall_p10, "model sparse p10"},
                                     {&a.model_sparse_recall_p50, &b.model_sparse_recall_p50, "model sparse p50"}}) {
      compare_tables(*x, *y, histogram_tolerance, a.label + " " + what);
    }
    compare_tables(a.saturated_rows, b.saturated_rows, 0.0, a.label + " saturated");
  }
  compare_tables(cpu.reuse, gpu.reuse, mass_tolerance, "reuse matrix");
}

ReplayResult replay_with(const std::string& device, Precision precision, const std::string& path, ReplayOptions options) {
  options.device = device;
  options.precision = to_string(precision);
  const auto backend = make_backend(device, precision);
  return run_replay(path, options, *backend, false);
}

}  // namespace

TEST_CASE("CUDA replay reports equal the CPU's: GQA/MHA/MQA, ties, sinks, blocks not dividing T", "[cuda]") {
  struct Case {
    std::int64_t q_heads, kv_heads, d, T, block;
    bool sinks, ties;
  };
  for (const Precision precision : {Precision::kFp32, Precision::kBf16, Precision::kFp16}) {
    for (const Case& k : {Case{8, 2, 64, 333, 64, true, false}, Case{4, 4, 32, 200, 16, false, false},
                          Case{6, 1, 128, 190, 32, true, false}, Case{4, 2, 16, 130, 8, false, true},
                          Case{8, 2, 128, 700, 128, true, false}}) {
      CAPTURE(to_string(precision), k.q_heads, k.kv_heads, k.d, k.T, k.block, k.sinks, k.ties);
      // Inputs exact in the precision under test (as a capture stored in it is): the reports must match.
      const Capture c = gaussian_capture(3, k.q_heads, k.kv_heads, k.d, k.T, k.sinks, k.ties,
                                         test::seed() + static_cast<std::uint64_t>(k.T), precision);
      const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_parity.h5";
      write_capture(path, c);
      ReplayOptions options;
      options.budgets = {{Budget::Kind::kTokens, static_cast<double>(k.block)}, {Budget::Kind::kTokens, static_cast<double>(4 * k.block)},
                         {Budget::Kind::kTokens, static_cast<double>(k.T)}};
      options.selectors = parse_selector_list("oracle,oracle:group=sum,swa,swa:window=24,sinks=2,hysparse:window=16,block=" + std::to_string(k.block));
      options.block_size = k.block;
      options.schedule = "FSS";
      options.reuse_budget = 2 * k.block;
      const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
      const ReplayResult gpu = replay_with("cuda", precision, path, options);
      CHECK(gpu.backend == "cuda");
      compare_reports(cpu, gpu);
    }
  }
}

TEST_CASE("CUDA replay of a synthetic capture equals the CPU's with sparsity budgets", "[cuda]") {
  // Stored as bfloat16, as captures of bf16 models are: every precision sees the same values.
  SynthOptions synth;
  synth.num_layers = 4;
  synth.seq_len = 1024;
  synth.head_dim = 64;
  synth.seed = test::seed();
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_synth.h5";
  CaptureWriteOptions write;
  write.dtype = h5::ElementType::kBFloat16;
  write_synthetic_capture(path, synth, write);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kSparsity, 0.95}, {Budget::Kind::kSparsity, 0.8}, {Budget::Kind::kSparsity, 0.5}};
  options.selectors = parse_selector_list("oracle,swa,hysparse");
  options.schedule = "FSSS";
  options.queries = "stride:7";
  const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    compare_reports(cpu, replay_with("cuda", precision, path, options));
  }
}

TEST_CASE("Several CUDA devices give the report of one, bit for bit", "[cuda]") {
  // KV heads go to the devices round-robin (MultiDeviceBackend), and a layer's H2O and InfLLM work is
  // split by KV heads over them. With one GPU the same device is listed twice: two backends, each with
  // its own resident keys and streams of work.
  const CudaStatus status = cuda_status();
  const std::string several = status.devices.size() >= 2 ? "cuda:0,cuda:1" : "cuda:0,cuda:0";
  std::printf("several devices: %s (%zu visible)\n", several.c_str(), status.devices.size());
  const Capture c = gaussian_capture(2, 8, 4, 64, 500, true, false, test::seed() + 29, Precision::kBf16);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_several.h5";
  write_capture(path, c);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kTokens, 64}, {Budget::Kind::kTokens, 256}};
  options.selectors = parse_selector_list("oracle,swa,hysparse,quest,h2o,infllm:block=16,window=64");
  options.schedule = "FS";
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    const ReplayResult one = replay_with("cuda:0", precision, path, options);
    const ReplayResult spread = replay_with(several, precision, path, options);
    CHECK(spread.device.find("2 devices") != std::string::npos);
    compare_reports(one, spread, true);
  }
}

TEST_CASE("A GPU with less shared memory ranks the prefixes it holds and leaves longer ones to the host", "[cuda]") {
  // Played on this GPU by capping the shared memory a backend counts on (set_shared_memory_limit): an A100's
  // 163 KiB and a compute capability 8.6/8.9 card's 99 KiB hold prefixes of 8,192 entries where Hopper holds
  // 16,384. What such a device declines, the host ranks: the same reports.
  struct RestoreLimit {
    std::int64_t previous;
    ~RestoreLimit() { hysparse::cuda::set_shared_memory_limit(previous); }
  };
  const RestoreLimit restore{hysparse::cuda::set_shared_memory_limit(0)};
  // The mma.sync kernel's key stages at head_dim 256 fit an A100's block but not a 99 KiB one's (the
  // statistics pass computes bf16 scores in SIMT there).
  CHECK(hysparse::cuda::mma_shared_bytes(256) > 101376);
  CHECK(hysparse::cuda::mma_shared_bytes(256) <= 166912);
  CHECK(hysparse::cuda::mma_shared_bytes(128) <= 101376);
  if (device_prefix_limit() < hysparse::cuda::kMaxRankedPrefix) {
    WARN("this GPU's own shared memory ranks prefixes of " << device_prefix_limit() << ": the smaller GPUs are not played");
    return;
  }
  const auto full = make_backend("cuda");
  constexpr std::int64_t kHeld = 8192;
  const Capture c = gaussian_capture(2, 2, 1, 16, kHeld + 900, true, true, test::seed() + 8192);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_small_shared.h5";
  write_capture(path, c);
  Rng rng(test::seed() + 193);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kTokens, 100}, {Budget::Kind::kTokens, static_cast<double>(kHeld + 300)}};
  options.selectors = parse_selector_list("oracle:block=1,swa:block=1,window=64,hysparse:block=1,loki:block=1,oracle");
  options.schedule = "FS";
  options.queries = "last:3";
  const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
  const ReplayResult on_hopper = replay_with("cuda", Precision::kFp32, path, options);
  for (const std::int64_t limit : {std::int64_t{166912}, std::int64_t{101376}}) {
    CAPTURE(limit);
    hysparse::cuda::set_shared_memory_limit(limit);
    const auto small = make_backend("cuda");
    // Block rankings: 8,192 of a 9,092-block row on the device, entry for entry the full device's; one more declined.
    const std::vector<std::int64_t> rows = {kHeld - 1, kHeld + 899};
    StatsRequest req = group_request(c, 0, rows, 1, false);
    req.rank_block = 1;
    req.group_rank_block = 1;
    StatsTile expected, got;
    for (const std::int64_t asked : {kHeld, kHeld + 1}) {
      req.rank_blocks = asked;
      req.group_rank_blocks = asked;
      full->block_statistics(req, expected);
      small->block_statistics(req, got);
      REQUIRE(expected.ranked == asked);
      REQUIRE(expected.group_ranked == asked);
      CHECK(got.ranked == (asked <= kHeld ? asked : 0));
      CHECK(got.group_ranked == got.ranked);
      if (got.ranked > 0) CHECK(got.mass_order == expected.mass_order);
      if (got.group_ranked > 0) CHECK(got.group_max_order == expected.group_max_order);
      CHECK(got.block_sum == expected.block_sum);
    }
    // Token-score rankings: the same rule.
    ref::TokenScoreShape shape;
    shape.seq_len = kHeld + 400;
    shape.width = 4;
    shape.channels = 2;
    ref::OwnedTokenScoreRequest owned;
    ref::random_token_score_request(shape, rng, proxy::kMultiplyAddFused, owned);
    owned.rows.assign(1, shape.seq_len - 1);
    owned.request.rows = owned.rows.data();
    owned.request.num_rows = 1;
    for (const std::int64_t count : {kHeld, kHeld + 1}) {
      owned.counts.assign(1, count);
      owned.request.counts = owned.counts.data();
      std::vector<std::int32_t> host, device;
      proxy::token_score_rankings(owned.request, host);
      CHECK(small->token_score_rankings(owned.request, device) == (count <= kHeld));
      if (count <= kHeld) CHECK(device == host);
      CHECK(full->token_score_rankings(owned.request, device));
      CHECK(device == host);
    }
    // Keys of 400 channels in double: a score block stages 32 x 401 x 8 = 102,656 bytes of them, which 163 KiB
    // hold and 99 KiB do not (the host ranks them there).
    ref::TokenScoreShape wide;
    wide.seq_len = 300;
    wide.width = 400;
    wide.channels = 3;
    ref::OwnedTokenScoreRequest wider;
    ref::random_token_score_request(wide, rng, proxy::kMultiplyAddFused, wider);
    std::vector<std::int32_t> host, device;
    proxy::token_score_rankings(wider.request, host);
    CHECK(small->token_score_rankings(wider.request, device) == (limit > 102656));
    if (limit > 102656) CHECK(device == host);
    // A replay whose token-level budget passes the prefix: the CPU's report, and the full device's bit for bit.
    ReplayOptions on_small = options;
    on_small.device = "cuda";
    on_small.precision = "fp32";
    const ReplayResult report = run_replay(path, on_small, *small, false);
    compare_reports(cpu, report);
    compare_reports(on_hopper, report, true);
  }
  // Less than the rankings need (no GPU of compute capability 7.0 or newer has so little): the device is refused.
  hysparse::cuda::set_shared_memory_limit(40 * 1024);
  try {
    (void)make_backend("cuda");
    FAIL("a device with 40 KiB of shared memory a block was accepted");
  } catch (const Error& error) {
    CHECK(error.kind() == ErrorKind::kDevice);
    CHECK(std::string(error.what()).find("shared memory") != std::string::npos);
  }
}

TEST_CASE("CUDA replays every registered selector (selectors=all) with the CPU's report", "[cuda]") {
  // The proxies score keys from q and k on the host; the device's block statistics feed every
  // mass and every selection ranked by attention. All sixteen, defaults, blocks of 16.
  for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
    CAPTURE(to_string(precision));
    const Capture c = gaussian_capture(3, 8, 2, 64, 300, true, false, test::seed() + 31, precision);
    const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_all_selectors.h5";
    write_capture(path, c);
    ReplayOptions options;
    options.budgets = {{Budget::Kind::kTokens, 64}, {Budget::Kind::kTokens, 160}};
    options.selectors = parse_selector_list("all");
    options.block_size = 16;
    options.queries = "last:64";
    const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
    const ReplayResult gpu = replay_with("cuda", precision, path, options);
    REQUIRE(gpu.selectors.size() == selector_names().size());
    compare_reports(cpu, gpu);
  }
}

TEST_CASE("CUDA replays with two nsa specs (their own compressed keys) give the CPU's report", "[cuda]") {
  const Capture c = gaussian_capture(2, 8, 2, 64, 700, false, false, test::seed() + 37);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_two_nsa.h5";
  write_capture(path, c);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kTokens, 64}, {Budget::Kind::kTokens, 256}};
  options.selectors = parse_selector_list("nsa:block=16,cmp=8,stride=4,window=32,nsa:block=32,cmp=16,stride=8,window=0");
  options.queries = "all";
  const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
  const std::uint64_t uploads_before = hysparse::cuda::resident_array_uploads();
  const ReplayResult gpu = replay_with("cuda", Precision::kFp32, path, options);
  compare_reports(cpu, gpu);
  // Each spec's keys go up once a (layer, KV head) at most, however many query tiles read them: both specs'
  // sets stay resident side by side.
  const std::uint64_t uploads = hysparse::cuda::resident_array_uploads() - uploads_before;
  INFO("compressed-key uploads: " << uploads);
  CHECK(uploads > 0);
  CHECK(uploads <= static_cast<std::uint64_t>(2 * c.header.num_layers * c.header.num_kv_heads));
}

TEST_CASE("CUDA replays with moba (its block scores on the device) give the CPU's report", "[cuda]") {
  const Capture c = gaussian_capture(2, 8, 2, 64, 700, false, false, test::seed() + 41);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_moba.h5";
  write_capture(path, c);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kTokens, 64}, {Budget::Kind::kTokens, 256}};
  options.selectors = parse_selector_list("moba:block=16,moba:block=32,current=0");
  options.queries = "all";
  const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
  const std::uint64_t uploads_before = hysparse::cuda::resident_array_uploads();
  const ReplayResult gpu = replay_with("cuda", Precision::kFp32, path, options);
  compare_reports(cpu, gpu);
  // The blocks' means went to the device (each spec's once a layer and KV head).
  const std::uint64_t uploads = hysparse::cuda::resident_array_uploads() - uploads_before;
  INFO("mean-key uploads: " << uploads);
  CHECK(uploads > 0);
  CHECK(uploads <= static_cast<std::uint64_t>(2 * c.header.num_layers * c.header.num_kv_heads));
}

TEST_CASE("CUDA replays with doublesparsity, loki and sparq (their rankings on the device) give the CPU's report", "[cuda]") {
  // No tied inputs: a tie in mass may fall either way between the fp32 statistics of the two devices and move
  // topk_overlap (the oracle's top k); the rankings' ties are the unit test's.
  const Capture c = gaussian_capture(2, 8, 2, 64, 600, false, false, test::seed() + 43);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_token_proxies.h5";
  write_capture(path, c);
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kTokens, 32}, {Budget::Kind::kTokens, 200}};
  options.selectors = parse_selector_list("doublesparsity,doublesparsity:r=4,channel=q,block=8,loki,loki:r=3,block=16,sinks=2,"
                                          "sparq,sparq:r=5,local=4,block=4");
  options.queries = "all";
  const ReplayResult cpu = replay_with("cpu", Precision::kFp32, path, options);
  const std::uint64_t uploads_before = hysparse::cuda::resident_array_uploads();
  const ReplayResult gpu = replay_with("cuda", Precision::kFp32, path, options);
  compare_reports(cpu, gpu);
  // Each spec's keys went to the device once a layer and KV head.
  const std::uint64_t uploads = hysparse::cuda::resident_array_uploads() - uploads_before;
  INFO("token-score key uploads: " << uploads);
  CHECK(uploads > 0);
  CHECK(uploads <= static_cast<std::uint64_t>(6 * c.header.num_layers * c.header.num_kv_heads));
}
