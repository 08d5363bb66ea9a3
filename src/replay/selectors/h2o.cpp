// h2o: heavy hitters by accumulated attention plus recent keys, with eviction simulated step by
// step along the sequence (H2O, arXiv 2306.14048; FMInference/H2O).
#include <omp.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "backend/backend.hpp"
#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

constexpr std::int32_t kNever = std::numeric_limits<std::int32_t>::max();

class H2oSelector final : public Selector {
 public:
  H2oSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;
    if (block_ != 1) fail(ErrorKind::kUsage, "selector h2o: evicts single keys (block must be 1, got {})", block_);
    if (sinks_ != 0) fail(ErrorKind::kUsage, "selector h2o: keeps no forced sinks (sinks must be 0)");
    recent_ = take_int("recent", 50, 0);
    if (recent_ > 100) fail(ErrorKind::kUsage, "selector h2o: recent={} (expected a percentage in [0, 100])", recent_);
    group_ = take_choice("group", {"sum", "none"}, "sum");
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("H2O: a cache of C keys per {}: the {}% most recent keys and the heaviest others by attention "
                       "accumulated over every query so far; the lightest is evicted for good at each step",
                       group_ == "sum" ? "KV head (attention summed over its query heads)" : "query head", recent_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = std::string("token, ") + (group_ == "sum" ? "per KV head (scores summed over the group)" : "per query head");
    i.budget = fmt::format("the budget C is the cache size including the current key ({}% recent, the rest heavy "
                           "hitters); every position is a decoding step from an empty cache",
                           recent_);
    i.post_rope = "accumulates the attention the model computes over its cache (post-RoPE scores, renormalised over the cache)";
    i.footprint = "h2o";
    i.source = "H2O, arXiv 2306.14048; FMInference/H2O: h2o_hf/utils_real_drop/modify_llama.py (heavy 10% + recent 10%)";
    i.evicts = true;
    return i;
  }
  // The cache C includes the current key: its capacity at the row after the last.
  std::int64_t budget_tokens_at_end(const Budget& budget, std::int64_t seq_len) const override {
    return std::min(budget.blocks_for_row(seq_len, 1), seq_len);
  }
  bool ranks_per_head() const override { return group_ == "none"; }
  BudgetUse budget_use() const override { return BudgetUse::kPerBudget; }

  void begin(const ReplayPlan& plan) override { budgets_ = plan.budgets; }

  // Simulates the cache of every set over all positions for every budget: evicted_[budget][set][j] is
  // the first step whose cache no longer holds key j (kNever if none). On q/k layers they go to the
  // backend first (the CUDA one runs them on the device); where it declines, they run here.
  void prepare_layer(const LayerContext& layer) override {
    const std::int64_t T = layer.seq_len();
    const std::int64_t sets = group_ == "none" ? layer.header->num_q_heads : layer.header->num_kv_heads;
    const auto NB = static_cast<std::int64_t>(budgets_.size());
    seq_len_ = T;
    sets_ = sets;
    evicted_.assign(static_cast<std::size_t>(NB * sets * T), kNever);
    // capacity_[b][t]: the cache size of step t + 1 under budget b, the current key included.
    const std::int64_t steps = std::max<std::int64_t>(T - 1, 0);
    capacity_.resize(static_cast<std::size_t>(NB * steps));
    for (std::int64_t bi = 0; bi < NB; ++bi) {
      for (std::int64_t t = 0; t < steps; ++t) {
        capacity_[static_cast<std::size_t>(bi * steps + t)] = std::min(budgets_[static_cast<std::size_t>(bi)].blocks_for_row(t + 1, 1), t + 2);
      }
    }
    if (layer.backend && layer.has_qk && simulate_on_backend(layer)) return;
    check_interrupted();  // a backend stops early at a signal, and declines
    // One simulation per (budget, set), the largest caches first: their cost grows with the cache,
    // so that the layer does not end waiting on a large one started last.
    std::vector<std::int64_t> order(static_cast<std::size_t>(NB));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return budgets_[static_cast<std::size_t>(a)].blocks_for_row(T, 1) > budgets_[static_cast<std::size_t>(b)].blocks_for_row(T, 1);
    });
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < NB * sets; ++item) {
      const std::int64_t bi = order[static_cast<std::size_t>(item / sets)], s = item % sets;
      simulate(layer, bi, s, &evicted_[static_cast<std::size_t>((bi * sets + s) * T)]);
    }
    check_interrupted();  // a signal left the simulations unfinished
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const std::int64_t sets = ranks_per_head() ? c.group_size : 1;
    out.reset(sets, c.rows, v.num_blocks);
    for (std::int64_t s = 0; s < sets; ++s) {
      const std::int64_t set = ranks_per_head() ? c.kv_group * c.group_size + s : c.kv_group;
      const std::int32_t* evicted = &evicted_[static_cast<std::size_t>((c.budget_index * sets_ + set) * seq_len_)];
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r];
        std::int32_t* row = out.row(s, r);
        std::int32_t count = 0;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (evicted[j] > t) row[count++] = static_cast<std::int32_t>(j);
        }
        out.size(s, r) = count;
      }
    }
  }

 private:
  // The set's query heads [h0, h1).
  std::pair<std::int64_t, std::int64_t> heads_of(const LayerContext& layer, std::int64_t set) const {
    const std::int64_t G = layer.header->group_size();
    return group_ == "none" ? std::pair<std::int64_t, std::int64_t>{set, set + 1} : std::pair<std::int64_t, std::int64_t>{set * G, (set + 1) * G};
  }

  // proxy::h2o_simulate on this layer's logits (scale * q . k in double, or log p on a dense attn layer).
  void simulate(const LayerContext& layer, std::int64_t budget_index, std::int64_t set, std::int32_t* evicted) const {
    const std::int64_t T = layer.seq_len();
    const std::pair<std::int64_t, std::int64_t> heads = heads_of(layer, set);
    const std::int64_t h0 = heads.first, h1 = heads.second;  // plain names: lambdas capture them (C++17)
    std::vector<double> sinks;
    for (std::int64_t h = h0; h < h1 && layer.has_sinks(); ++h) sinks.push_back(layer.sink_logit(h));
    auto logits = [&](std::int64_t h, std::int64_t t, const std::vector<std::int64_t>& cache, std::vector<double>& z) {
      const std::int64_t head = h0 + h;
      const auto n = static_cast<std::int64_t>(cache.size());
      z.resize(cache.size());
      if (!layer.has_qk) {
        const float* p = &layer.tensors->attn[static_cast<std::size_t>((head * T + t) * T)];
        for (std::int64_t i = 0; i < n; ++i) {
          const float pj = p[cache[static_cast<std::size_t>(i)]];
          z[static_cast<std::size_t>(i)] = pj > 0.0f ? std::log(static_cast<double>(pj)) : -std::numeric_limits<double>::infinity();
        }
        return;
      }
      const std::int64_t g = head / layer.header->group_size();
      proxy::dots(layer.q(head, t), layer.head_dim(), n, [&](std::int64_t i) { return layer.k(g, cache[static_cast<std::size_t>(i)]); },
                  z.data());
      for (double& x : z) x *= layer.scale;
    };
    const std::int64_t steps = std::max<std::int64_t>(T - 1, 0);
    proxy::h2o_simulate(T, h1 - h0, capacity_.data() + budget_index * steps, recent_,
                        sinks.empty() ? nullptr : sinks.data(), logits, evicted);
  }

  // Every budget and set of the layer on the backend (Backend::h2o_evictions); false where it declines.
  bool simulate_on_backend(const LayerContext& layer) {
    const std::int64_t T = layer.seq_len(), Hq = layer.header->num_q_heads;
    const auto NB = static_cast<std::int64_t>(budgets_.size());
    std::vector<double> sinks;
    for (std::int64_t h = 0; h < Hq && layer.has_sinks(); ++h) sinks.push_back(layer.sink_logit(h));
    H2oRequest request;
    request.q = layer.q(0, 0);
    request.k = layer.k(0, 0);
    request.sets = sets_;
    request.heads = Hq / sets_;
    request.kv_heads = layer.header->num_kv_heads;
    request.seq_len = T;
    request.head_dim = layer.head_dim();
    request.scale = layer.scale;
    request.sink_logits = sinks.empty() ? nullptr : sinks.data();
    request.recent_percent = recent_;
    request.budgets = NB;
    request.capacity = capacity_.data();
    request.stop_requested = interrupted;
    std::vector<std::int32_t> evicted;
    if (!layer.backend->h2o_evictions(request, evicted)) return false;
    if (evicted.size() != evicted_.size()) {
      throw Error(ErrorKind::kInternal, fmt::format("h2o: the backend returned {} evictions for {} budgets x {} sets x {} keys",
                                                    evicted.size(), NB, sets_, T));
    }
    for (std::size_t i = 0; i < evicted.size(); ++i) {
      const auto j = static_cast<std::int64_t>(i) % T;
      const std::int32_t step = evicted[i];
      if (step != kNever && (step <= j || step >= T)) {
        throw Error(ErrorKind::kInternal, fmt::format("h2o: the backend evicted key {} at step {} of {}", j, step, T));
      }
    }
    evicted_ = std::move(evicted);
    return true;
  }

  std::int64_t recent_ = 50, seq_len_ = 0, sets_ = 0;
  std::string group_;
  std::vector<Budget> budgets_;
  std::vector<std::int32_t> evicted_;   // [budget][set][key]
  std::vector<std::int64_t> capacity_;  // [budget][step]: see prepare_layer
};

}  // namespace

std::unique_ptr<Selector> make_h2o_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<H2oSelector>(spec, defaults);
}

}  // namespace hysparse
