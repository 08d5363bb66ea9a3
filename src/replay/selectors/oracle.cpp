// oracle: the layer's own top blocks by residual mass (exact optimum given the forced keys).
#include <algorithm>

#include "replay/selector.hpp"

namespace hysparse {
namespace {

class OracleSelector final : public Selector {
 public:
  OracleSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, defaults) {
    window_ = take_int("window", defaults.window, 0);
    group_ = take_choice("group", {"none", "sum", "max"}, "none");
    reject_unknown_keys();
  }
  std::string description() const override {
    if (group_ == "none") return "per-head top blocks by residual attention mass (the ideal selection)";
    return "top blocks by residual attention mass, " + group_ + " over the heads of each KV group (one shared selection)";
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "block of " + std::to_string(block_) + " keys, " +
                    (group_ == "none" ? std::string("per query head") : "one selection per KV group (" + group_ + ")");
    i.budget = "selected blocks count against the budget (top-n by residual mass); sinks and window forced on top";
    i.post_rope = "exact: ranks by the true attention mass of the layer itself";
    i.footprint = "oracle";
    i.source = "exact top-k of the true attention (upper bound); group sum is the fair shared oracle (Kascade)";
    return i;
  }
  bool ranks_per_head() const override { return group_ == "none"; }
  // Per head, the engine's shared ranking by residual is this selection; over a group, the residuals are summed.
  bool reads_residual_mass() const override { return group_ != "none"; }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    out.reset(ranks_per_head() ? c.group_size : 1, c.rows, v.num_blocks);
    std::vector<double> scores(static_cast<std::size_t>(v.num_blocks));
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::int64_t blocks = v.causal_blocks(r);
      const std::int64_t count = c.ranking_length[r];
      if (ranks_per_head()) {
        // The engine's shared ranking by residual mass is this selection (ranked here without one).
        for (std::int64_t h = 0; h < c.group_size; ++h) {
          const std::int64_t n = std::min(count, blocks);
          if (c.top_by_residual) {
            const std::int32_t* top = c.top_by_residual(h, r, n);
            std::copy(top, top + n, out.row(h, r));
          } else {
            const std::vector<double>& residual = *c.residual_mass;
            for (std::int64_t b = 0; b < blocks; ++b) scores[static_cast<std::size_t>(b)] = residual[v.at(h, r, b)];
            rank_top(scores.data(), blocks, n, out.row(h, r));
          }
          out.size(h, r) = static_cast<std::int32_t>(n);
        }
      } else {
        const std::vector<double>& residual = *c.residual_mass;
        for (std::int64_t b = 0; b < blocks; ++b) {
          double score = group_ == "sum" ? 0.0 : -1.0;
          for (std::int64_t h = 0; h < c.group_size; ++h) {
            const double value = residual[v.at(h, r, b)];
            score = group_ == "sum" ? score + value : std::max(score, value);
          }
          scores[static_cast<std::size_t>(b)] = score;
        }
        rank_top(scores.data(), blocks, count, out.row(0, r));
        out.size(0, r) = static_cast<std::int32_t>(std::min(count, blocks));
      }
    }
  }

 private:
  std::string group_;
};

}  // namespace

std::unique_ptr<Selector> make_oracle_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<OracleSelector>(spec, defaults);
}

}  // namespace hysparse
