// oracle_topp: the smallest set of blocks holding a fraction p of the row's mass (adaptive budget).
#include <fmt/format.h>

#include <algorithm>

#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class OracleTopPSelector final : public Selector {
 public:
  OracleTopPSelector(const SelectorSpec& spec, const SelectorDefaults& defaults)
      : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;  // token level unless block= is given
    window_ = take_int("window", 0, 0);
    p_ = take_double("p", 0.9, 0.0, 1.0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("oracle top-p: per query head, the fewest blocks (by residual mass) whose mass with the forced "
                       "keys reaches p = {:g}; the size adapts per row, whatever the budget",
                       p_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = (block_ == 1 ? std::string("token") : "block of " + std::to_string(block_) + " keys") + ", per query head";
    i.budget = fmt::format("adaptive: the smallest prefix of the residual-mass ranking reaching mass p = {:g} with the "
                           "forced keys; the budget axis is not used (same set at every budget; attended_keys shows the size)",
                           p_);
    i.post_rope = "exact: the true attention mass (the threshold decided on float64 probabilities)";
    i.footprint = "oracle";
    i.source = "oracle top-p (Twilight arXiv 2502.02770; skylight-org/sparse-attention-hub oracle_top_p.py)";
    return i;
  }
  bool ranks_per_head() const override { return true; }
  BudgetUse budget_use() const override { return BudgetUse::kFree; }

  // The threshold decision uses the row's exact probabilities in double (not the float statistics),
  // so that it does not flip with rounding: masses are summed per block in ascending order.
  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(c.group_size, c.rows, v.num_blocks);
    std::vector<double> p, scores(static_cast<std::size_t>(v.num_blocks)), terms;
    std::vector<std::int32_t> heap;
    for (std::int64_t h = 0; h < c.group_size; ++h) {
      const std::int64_t head = c.kv_group * c.group_size + h;
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r], blocks = v.causal_blocks(r);
        proxy::row_probabilities(layer, head, t, p);
        double total = 0.0;
        for (double x : p) total += x;
        const std::int64_t sink_end = std::min(sinks_, t + 1), window_begin = std::max<std::int64_t>(0, t - window_ + 1);
        auto forced = [&](std::int64_t j) { return j < sink_end || (window_ > 0 && j >= window_begin); };
        double cumulative = 0.0;  // the forced keys' share
        for (std::int64_t j = 0; j <= t; ++j) cumulative += forced(j) ? p[static_cast<std::size_t>(j)] / total : 0.0;
        for (std::int64_t b = 0; b < blocks; ++b) {
          terms.clear();
          for (std::int64_t j = b * block_; j < std::min((b + 1) * block_, t + 1); ++j) {
            if (!forced(j)) terms.push_back(p[static_cast<std::size_t>(j)]);
          }
          std::sort(terms.begin(), terms.end());
          double sum = 0.0;
          for (double x : terms) sum += x;
          scores[static_cast<std::size_t>(b)] = sum / total;
        }
        // Pop blocks best first (higher score, then lower index) until the mass reaches p: a heap
        // orders only the prefix that is used.
        heap.resize(static_cast<std::size_t>(blocks));
        for (std::int64_t b = 0; b < blocks; ++b) heap[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b);
        auto worse = [&](std::int32_t a, std::int32_t b) {
          const double sa = scores[static_cast<std::size_t>(a)], sb = scores[static_cast<std::size_t>(b)];
          return sa < sb || (sa == sb && a > b);
        };
        std::make_heap(heap.begin(), heap.end(), worse);
        std::int32_t* order = out.row(h, r);
        std::int64_t count = 0;
        while (count < blocks && cumulative < p_) {
          std::pop_heap(heap.begin(), heap.end() - count, worse);
          order[count] = heap[static_cast<std::size_t>(blocks - 1 - count)];
          cumulative += scores[static_cast<std::size_t>(order[count++])];
        }
        out.size(h, r) = static_cast<std::int32_t>(count);
      }
    }
  }

 private:
  double p_ = 0.9;
};

}  // namespace

std::unique_ptr<Selector> make_oracle_topp_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<OracleTopPSelector>(spec, defaults);
}

}  // namespace hysparse
