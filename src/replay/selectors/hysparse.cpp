// hysparse: sparse layers reuse the block selection of the preceding full layer
// (block max probability, max over the heads of a KV group), plus their own window.
#include <algorithm>

#include "common/error.hpp"
#include "kv/schedule.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

constexpr const char* kDefaultSchedule = "1:3";

class HySparseSelector final : public Selector {
 public:
  HySparseSelector(const SelectorSpec& spec, const SelectorDefaults& defaults)
      : Selector(spec, SelectorDefaults{64, 0, 128}) {
    (void)defaults;  // the paper's values, not the global ones, are the defaults here
    window_ = take_int("window", 128, 0);
    score_ = take_choice("score", {"max", "mass"}, "max");
    group_ = take_choice("group", {"max", "sum"}, "max");
    reject_unknown_keys();
  }
  std::string description() const override {
    return "HySparse: sparse layers attend to the blocks the preceding full layer ranks highest by block " +
           std::string(score_ == "max" ? "max probability" : "mass") + " (" + group_ +
           " over a KV group's heads), plus their own window";
  }
  bool ranks_per_head() const override { return false; }
  LayerRole role(std::int64_t layer) const override {
    return full_[static_cast<std::size_t>(layer)] ? LayerRole::kFull : LayerRole::kSparse;
  }
  const std::vector<bool>& schedule() const { return full_; }

  void begin(const ReplayPlan& plan) override {
    const std::string spec = plan.schedule.empty() ? kDefaultSchedule : plan.schedule;
    full_ = parse_schedule(spec, plan.header->num_layers);
    schedule_text_ = spec;
    rows_ = static_cast<std::int64_t>(plan.rows.size());
    stride_ = std::max<std::int64_t>(1, plan.max_ranking_length(block_));
    stored_.assign(static_cast<std::size_t>(plan.header->num_kv_heads * rows_ * stride_), 0);
    stored_length_.assign(static_cast<std::size_t>(plan.header->num_kv_heads * rows_), 0);
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    if (full_[static_cast<std::size_t>(c.layer)]) {
      // Full layer: rank by this layer's statistics and keep the ranking for the sparse layers after it.
      std::vector<double> scores(static_cast<std::size_t>(v.num_blocks));
      const std::vector<double>& source = score_ == "max" ? v.max_prob : v.mass;
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t blocks = v.causal_blocks(r);
        for (std::int64_t b = 0; b < blocks; ++b) {
          double score = group_ == "sum" ? 0.0 : -1.0;
          for (std::int64_t h = 0; h < c.group_size; ++h) {
            const double s = source[v.at(h, r, b)];
            score = group_ == "sum" ? score + s : std::max(score, s);
          }
          scores[static_cast<std::size_t>(b)] = score;
        }
        const std::int64_t count = std::min(c.ranking_length[r], blocks);
        const std::size_t slot = static_cast<std::size_t>(c.kv_group * rows_ + c.row_begin + r);
        rank_top(scores.data(), blocks, count, &stored_[slot * static_cast<std::size_t>(stride_)]);
        stored_length_[slot] = static_cast<std::int32_t>(count);
      }
      out.reset(1, c.rows, 0);
      return;
    }
    out.reset(1, c.rows, stride_);
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::size_t slot = static_cast<std::size_t>(c.kv_group * rows_ + c.row_begin + r);
      const std::int32_t count = stored_length_[slot];
      std::copy_n(&stored_[slot * static_cast<std::size_t>(stride_)], count, out.row(0, r));
      out.size(0, r) = count;
    }
  }

 private:
  std::string score_, group_, schedule_text_;
  std::vector<bool> full_;
  std::int64_t rows_ = 0, stride_ = 1;
  std::vector<std::int32_t> stored_, stored_length_;  // [kv group][row][stride] of the latest full layer
};

}  // namespace

std::unique_ptr<Selector> make_hysparse_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<HySparseSelector>(spec, defaults);
}

}  // namespace hysparse
