// The CUDA backend against the CPU backend: raw block statistics and whole replay reports,
// on random and adversarial inputs. Runs only where a GPU exists (gpu_main.cpp skips otherwise).
#include <cmath>
#include <string>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/random.hpp"
#include "replay/engine.hpp"
#include "synth/synth.hpp"

using namespace hysparse;

namespace {

// fp32 products on both sides, different summation orders.
constexpr double kGpuMassTolerance = 1e-5;
constexpr double kGpuLogitTolerance = 1e-4;     // block max logits and log-sum-exps
constexpr double kGpuOutputTolerance = 1e-4;    // relative, per output vector

Capture gaussian_capture(std::int64_t layers, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t d, std::int64_t T,
                         bool sinks, bool ties, std::uint64_t seed) {
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
    for (auto& x : t.q) x = 2.0f * draw();
    for (auto& x : t.k) x = draw();
    for (auto& x : t.v) x = static_cast<float>(rng.normal());
    if (sinks) {
      for (std::int64_t h = 0; h < q_heads; ++h) t.sink_logits.push_back(static_cast<float>(rng.normal() + 1.0));
    }
    c.layers.push_back(std::move(t));
  }
  return c;
}

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

void compare_reports(const ReplayResult& cpu, const ReplayResult& gpu) {
  REQUIRE(cpu.selectors.size() == gpu.selectors.size());
  for (std::size_t s = 0; s < cpu.selectors.size(); ++s) {
    const auto& a = cpu.selectors[s];
    const auto& b = gpu.selectors[s];
    for (int m = 0; m < kNumMetrics; ++m) {
      // Keys attended and budgets are integers that depend only on the selection: equal means equal selections.
      const double tolerance = (m == kAttendedKeys || m == kBudgetKeys) ? 1e-9 : (m == kOutputError ? kGpuOutputTolerance : kGpuMassTolerance);
      compare_tables(a.head_mean[m], b.head_mean[m], tolerance, a.label + " " + metric_name(m));
      compare_tables(a.model_mean[m], b.model_mean[m], tolerance, a.label + " model " + metric_name(m));
    }
    compare_tables(a.head_recall_min, b.head_recall_min, kGpuMassTolerance, a.label + " min");
    compare_tables(a.head_recall_p10, b.head_recall_p10, kGpuMassTolerance, a.label + " p10");
    compare_tables(a.saturated_rows, b.saturated_rows, 0.0, a.label + " saturated");
  }
  compare_tables(cpu.reuse, gpu.reuse, kGpuMassTolerance, "reuse matrix");
}

ReplayResult replay_with(const std::string& device, const std::string& path, ReplayOptions options) {
  options.device = device;
  const auto backend = make_backend(device);
  return run_replay(path, options, *backend, false);
}

}  // namespace

TEST_CASE("CUDA block statistics equal the CPU backend's", "[cuda]") {
  const auto cpu = make_cpu_backend();
  const auto gpu = make_backend("cuda");
  for (const auto& [d, block, T] : {std::tuple<std::int64_t, std::int64_t, std::int64_t>{64, 64, 300}, {128, 16, 257},
                                    {32, 1, 77}, {256, 128, 400}, {8, 7, 50}}) {
    CAPTURE(d, block, T);
    const Capture c = gaussian_capture(1, 4, 2, d, T, true, false, test::seed() + static_cast<std::uint64_t>(d));
    std::vector<std::int64_t> rows;
    for (std::int64_t t = 0; t < T; t += 3) rows.push_back(t);
    rows.push_back(T - 1);
    StatsRequest req;
    req.q = c.layers[0].q.data() + 2 * T * d;  // the second KV group
    req.k = c.layers[0].k.data() + T * d;
    req.v = c.layers[0].v.data() + T * d;
    req.sink_logits = c.layers[0].sink_logits.data() + 2;
    req.heads = 2;
    req.seq_len = T;
    req.head_dim = d;
    req.scale = 1.0 / std::sqrt(static_cast<double>(d));
    req.rows = rows.data();
    req.num_rows = static_cast<std::int64_t>(rows.size());
    req.block_size = block;
    StatsTile a, b;
    cpu->block_statistics(req, a);
    gpu->block_statistics(req, b);
    REQUIRE(a.num_blocks == b.num_blocks);
    for (std::size_t i = 0; i < a.block_max.size(); ++i) {
      if (std::isinf(a.block_max[i])) {
        REQUIRE(std::isinf(b.block_max[i]));
        continue;
      }
      CHECK(b.block_max[i] == Approx(a.block_max[i]).margin(kGpuLogitTolerance));
      CHECK(b.block_sum[i] == Approx(a.block_sum[i]).epsilon(kGpuLogitTolerance));
    }
    for (std::size_t i = 0; i < a.lse_all.size(); ++i) {
      CHECK(b.lse_all[i] == Approx(a.lse_all[i]).margin(kGpuLogitTolerance));
      CHECK(b.lse_tokens[i] == Approx(a.lse_tokens[i]).margin(kGpuLogitTolerance));
    }
    for (std::int64_t r = 0; r < a.heads * a.rows; ++r) {
      double diff = 0, norm = 0;
      for (std::int64_t c2 = 0; c2 < d; ++c2) {
        const auto i = static_cast<std::size_t>(r * d + c2);
        diff += (a.output[i] - b.output[i]) * (a.output[i] - b.output[i]);
        norm += a.output[i] * a.output[i];
      }
      CHECK(std::sqrt(diff / norm) < kGpuOutputTolerance);
    }
  }
}

TEST_CASE("CUDA replay reports equal the CPU's: GQA/MHA/MQA, ties, sinks, blocks not dividing T", "[cuda]") {
  struct Case {
    std::int64_t q_heads, kv_heads, d, T, block;
    bool sinks, ties;
  };
  for (const Case& k : {Case{8, 2, 64, 333, 64, true, false}, Case{4, 4, 32, 200, 16, false, false},
                        Case{6, 1, 128, 190, 32, true, false}, Case{4, 2, 16, 130, 8, false, true}}) {
    CAPTURE(k.q_heads, k.kv_heads, k.d, k.T, k.block, k.sinks, k.ties);
    const Capture c = gaussian_capture(3, k.q_heads, k.kv_heads, k.d, k.T, k.sinks, k.ties, test::seed() + static_cast<std::uint64_t>(k.T));
    const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_parity.h5";
    write_capture(path, c);
    ReplayOptions options;
    options.budgets = {{Budget::Kind::kTokens, static_cast<double>(k.block)}, {Budget::Kind::kTokens, static_cast<double>(4 * k.block)},
                       {Budget::Kind::kTokens, static_cast<double>(k.T)}};
    options.selectors = parse_selector_list("oracle,oracle:group=sum,swa,swa:window=24,sinks=2,hysparse:window=16,block=" + std::to_string(k.block));
    options.block_size = k.block;
    options.schedule = "FSS";
    options.reuse_budget = 2 * k.block;
    const ReplayResult cpu = replay_with("cpu", path, options);
    const ReplayResult gpu = replay_with("cuda", path, options);
    CHECK(gpu.backend == "cuda");
    compare_reports(cpu, gpu);
  }
}

TEST_CASE("CUDA replay of a synthetic capture equals the CPU's with sparsity budgets", "[cuda]") {
  SynthOptions synth;
  synth.num_layers = 4;
  synth.seq_len = 1024;
  synth.head_dim = 64;
  synth.seed = test::seed();
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/gpu_synth.h5";
  write_synthetic_capture(path, synth, {});
  ReplayOptions options;
  options.budgets = {{Budget::Kind::kSparsity, 0.95}, {Budget::Kind::kSparsity, 0.8}, {Budget::Kind::kSparsity, 0.5}};
  options.selectors = parse_selector_list("oracle,swa,hysparse");
  options.schedule = "FSSS";
  options.queries = "stride:7";
  compare_reports(replay_with("cpu", path, options), replay_with("cuda", path, options));
}
