// magicpig: SimHash LSH sampling of keys with MagicPIG's importance-weighted estimator, beside exact
// sink and recent keys (MagicPIG, arXiv 2410.16179; Infini-AI-Lab/MagicPIG).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class MagicPigSelector final : public Selector {
 public:
  static constexpr std::int64_t kMaxTables = 1024;
  MagicPigSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 4, 64}) {
    (void)defaults;
    if (block_ != 1) fail(ErrorKind::kUsage, "selector magicpig: samples single keys (block must be 1, got {})", block_);
    window_ = take_int("window", 64, 0);
    bits_ = take_int("bits", 10, 1, 30);
    // Each table stores a 32-bit code per key and head (MagicPIG's own settings use at most a few hundred).
    tables_ = take_int("tables", 150, 1, kMaxTables);
    collisions_ = take_int("collisions", std::min<std::int64_t>(2, tables_), 1, tables_);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("MagicPIG: per query head, keys whose SimHash ({} bits x {} tables, keys centred) collides with the "
                       "query's in at least {} tables are sampled and weighted by 1/(p + 1e-4), p their collision "
                       "probability; {} sink and {} recent keys exact",
                       bits_, tables_, collisions_, sinks_, window_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "token (sampled), per query head";
    i.budget = fmt::format("adaptive: the sampled keys (as many as collide; the budget axis is not used, attended_keys "
                           "shows the size), with {} sinks and {} recent keys exact on top; the output uses the "
                           "importance-weighted estimator",
                           sinks_, window_);
    i.post_rope = "SimHash of the post-RoPE query and the centred post-RoPE keys (mean over the layer's keys)";
    i.footprint = "magicpig";
    i.footprint_params = {{"tables", tables_}, {"bits", bits_}, {"sinks", sinks_}, {"window", window_}};
    i.source = "MagicPIG, arXiv 2410.16179; Infini-AI-Lab/MagicPIG: evaluations/RULER/pred/cache_ref.py ((K, L) = (10, 150))";
    return i;
  }
  bool ranks_per_head() const override { return true; }
  BudgetUse budget_use() const override { return BudgetUse::kFree; }

  void begin(const ReplayPlan& plan) override {
    const std::int64_t d = plan.header->head_dim, Hkv = plan.header->num_kv_heads;
    planes_.clear();
    for (std::int64_t g = 0; g < Hkv; ++g) planes_.push_back(proxy::simhash_planes(plan.seed, g, d, bits_ * tables_));
  }

  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hkv = layer.header->num_kv_heads;
    seq_len_ = T;
    d_ = d;
    centred_.assign(static_cast<std::size_t>(Hkv * T * d), 0.0);
    norms_.assign(static_cast<std::size_t>(Hkv * T), 0.0);
    std::vector<std::uint32_t> codes(static_cast<std::size_t>(tables_ * T));  // [table][key] of one KV head
    bucket_codes_.assign(static_cast<std::size_t>(Hkv * tables_ * T), 0);
    bucket_keys_.assign(bucket_codes_.size(), 0);
    for (std::int64_t g = 0; g < Hkv; ++g) {
      std::vector<double> mean(static_cast<std::size_t>(d));
      proxy::mean_key(layer.k(g, 0), T, d, mean.data());
#pragma omp parallel for schedule(static)
      for (std::int64_t j = 0; j < T; ++j) {
        double* x = &centred_[static_cast<std::size_t>((g * T + j) * d)];
        const float* k = layer.k(g, j);
        double norm = 0.0;
        for (std::int64_t c = 0; c < d; ++c) {
          x[c] = static_cast<double>(k[c]) - mean[static_cast<std::size_t>(c)];
          norm += x[c] * x[c];
        }
        norms_[static_cast<std::size_t>(g * T + j)] = std::sqrt(norm);
      }
      // Every table's codes of the keys, a chunk of keys at once.
      constexpr std::int64_t kCodeChunk = 256;
#pragma omp parallel for schedule(dynamic, 1)
      for (std::int64_t j0 = 0; j0 < T; j0 += kCodeChunk) {
        const std::int64_t n = std::min(kCodeChunk, T - j0);
        std::vector<double> x_t(static_cast<std::size_t>(d * n));
        for (std::int64_t j = 0; j < n; ++j) {
          for (std::int64_t c = 0; c < d; ++c) x_t[static_cast<std::size_t>(c * n + j)] = centred_[static_cast<std::size_t>((g * T + j0 + j) * d + c)];
        }
        for (std::int64_t l = 0; l < tables_; ++l) {
          proxy::simhash_codes(x_t.data(), n, planes_[static_cast<std::size_t>(g)], d, l, bits_, &codes[static_cast<std::size_t>(l * T + j0)]);
        }
      }
      // Each table's keys grouped by code, ascending within a code: a query finds the keys it collides with
      // in a table by a binary search instead of comparing every key's code.
#pragma omp parallel for schedule(dynamic, 1)
      for (std::int64_t l = 0; l < tables_; ++l) {
        const std::size_t base = static_cast<std::size_t>((g * tables_ + l) * T);
        std::int32_t* keys = &bucket_keys_[base];
        for (std::int64_t j = 0; j < T; ++j) keys[j] = static_cast<std::int32_t>(j);
        const std::uint32_t* table_codes = &codes[static_cast<std::size_t>(l * T)];
        std::stable_sort(keys, keys + T, [&](std::int32_t a, std::int32_t b) { return table_codes[a] < table_codes[b]; });
        for (std::int64_t i = 0; i < T; ++i) bucket_codes_[base + static_cast<std::size_t>(i)] = table_codes[keys[i]];
      }
    }
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(c.group_size, c.rows, v.num_blocks);
    out.enable_weights();
    const auto& planes = planes_[static_cast<std::size_t>(c.kv_group)];
    std::vector<double> q(static_cast<std::size_t>(d_)), q_t(static_cast<std::size_t>(d_ * c.rows));
    std::vector<std::uint32_t> query_codes(static_cast<std::size_t>(tables_ * c.rows));  // [table][row]
    std::vector<std::int32_t> hits(static_cast<std::size_t>(seq_len_), 0), touched, candidates;
    for (std::int64_t h = 0; h < c.group_size; ++h) {
      const std::int64_t head = c.kv_group * c.group_size + h;
      // The tile's queries' codes, every table, all rows at once.
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const float* qf = layer.q(head, c.positions[r]);
        for (std::int64_t ch = 0; ch < d_; ++ch) q_t[static_cast<std::size_t>(ch * c.rows + r)] = static_cast<double>(qf[ch]);
      }
      for (std::int64_t l = 0; l < tables_; ++l) {
        proxy::simhash_codes(q_t.data(), c.rows, planes, d_, l, bits_, &query_codes[static_cast<std::size_t>(l * c.rows)]);
      }
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r];
        const float* qf = layer.q(head, t);
        double q_norm = 0.0;
        for (std::int64_t ch = 0; ch < d_; ++ch) {
          q[static_cast<std::size_t>(ch)] = static_cast<double>(qf[ch]);
          q_norm += q[static_cast<std::size_t>(ch)] * q[static_cast<std::size_t>(ch)];
        }
        q_norm = std::sqrt(q_norm);
        // Candidates: every key outside the static (sink and recent) keys whose code equals the query's in at
        // least `collisions_` tables, in key order.
        const std::int64_t begin = std::min(sinks_, t + 1), end = window_ > 0 ? std::max(begin, t - window_ + 1) : t + 1;
        touched.clear();
        for (std::int64_t l = 0; l < tables_ && begin < end; ++l) {
          const std::uint32_t code = query_codes[static_cast<std::size_t>(l * c.rows + r)];
          const std::size_t base = static_cast<std::size_t>((c.kv_group * tables_ + l) * seq_len_);
          const std::uint32_t* codes = &bucket_codes_[base];
          const auto [lo, hi] = std::equal_range(codes, codes + seq_len_, code);
          const std::int32_t* keys = &bucket_keys_[base];
          const std::int32_t* first = std::lower_bound(keys + (lo - codes), keys + (hi - codes), static_cast<std::int32_t>(begin));
          for (const std::int32_t* k = first; k != keys + (hi - codes) && *k < end; ++k) {
            if (hits[static_cast<std::size_t>(*k)]++ == 0) touched.push_back(*k);
          }
        }
        candidates.clear();
        for (std::int32_t j : touched) {
          if (hits[static_cast<std::size_t>(j)] >= collisions_) candidates.push_back(j);
          hits[static_cast<std::size_t>(j)] = 0;
        }
        std::sort(candidates.begin(), candidates.end());
        std::int32_t* row = out.row(h, r);
        double* weight = out.weights(h, r);
        std::int32_t count = 0;
        for (std::int32_t j : candidates) {
          const double* x = &centred_[static_cast<std::size_t>((c.kv_group * seq_len_ + j) * d_)];
          const double norm = norms_[static_cast<std::size_t>(c.kv_group * seq_len_ + j)];
          double dot = 0.0;
          for (std::int64_t ch = 0; ch < d_; ++ch) dot += q[static_cast<std::size_t>(ch)] * x[ch];
          const double cosine = q_norm > 0 && norm > 0 ? dot / (q_norm * norm) : 0.0;
          const double p = proxy::simhash_sample_probability(cosine, bits_, tables_);
          weight[count] = -std::log(p + 1e-4);
          row[count++] = j;
        }
        out.size(h, r) = count;
      }
    }
  }

 private:
  std::int64_t bits_ = 10, tables_ = 150, collisions_ = 2, seq_len_ = 0, d_ = 0;
  std::vector<std::vector<double>> planes_;  // [kv head][bits * tables][d]
  std::vector<double> centred_, norms_;      // [kv head][key][d], [kv head][key]
  // [kv head][table][i]: each table's key codes in ascending order, and the keys that have them (ascending
  // within a code).
  std::vector<std::uint32_t> bucket_codes_;
  std::vector<std::int32_t> bucket_keys_;
};

}  // namespace

std::unique_ptr<Selector> make_magicpig_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<MagicPigSelector>(spec, defaults);
}

}  // namespace hysparse
