// hysparse: sparse layers reuse the block selection of the preceding full layer
// (block max probability, max over the heads of a KV group), plus their own window.
#include <algorithm>

#include "common/error.hpp"
#include "kv/schedule.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

constexpr const char* kDefaultSchedule = "1:3";
using proxy::CrossLayerStore;

class HySparseSelector final : public Selector {
 public:
  HySparseSelector(const SelectorSpec& spec, const SelectorDefaults& defaults)
      : Selector(spec, SelectorDefaults{64, 0, 128}) {
    (void)defaults;  // the paper's values, not the global ones, are the defaults here
    window_ = take_int("window", 128, 0);
    score_ = take_choice("score", {"max", "mass"}, "max");
    group_ = take_choice("group", {"max", "sum"}, "max");
    // A schedule in the spec ('+' for the commas of an explicit list: full=0+4+8) overrides --schedule.
    schedule_ = take_string("schedule", "");
    std::replace(schedule_.begin(), schedule_.end(), '+', ',');
    reject_unknown_keys();
  }
  std::string description() const override {
    return "HySparse: sparse layers attend to the blocks the preceding full layer ranks highest by block " +
           std::string(score_ == "max" ? "max probability" : "mass") + " (" + group_ +
           " over a KV group's heads), plus their own window";
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "block of " + std::to_string(block_) + " keys, one selection per KV group";
    i.budget = "selected blocks count against the budget; the window (" + std::to_string(window_) +
               ") and sinks are forced on top; full layers of the schedule attend everything";
    i.post_rope = "uses only the exact softmax statistics of the full layer (no approximation of q or k)";
    i.footprint = "hysparse";
    i.source = "HySparse, arXiv 2602.03560, Sec. 3 (block max score, group max, top-k from the preceding full layer)";
    return i;
  }
  bool ranks_per_head() const override { return false; }
  bool reads_block_max() const override { return score_ == "max" && group_ != "max"; }
  bool ranks_by_group_max(std::int64_t layer) const override {
    return score_ == "max" && group_ == "max" && role(layer) == LayerRole::kFull;  // full layers record the selection
  }
  LayerRole role(std::int64_t layer) const override {
    return full_[static_cast<std::size_t>(layer)] ? LayerRole::kFull : LayerRole::kSparse;
  }

  void begin(const ReplayPlan& plan) override {
    const std::string spec = !schedule_.empty() ? schedule_ : plan.schedule.empty() ? kDefaultSchedule : plan.schedule;
    full_ = parse_schedule(spec, plan.header->num_layers);
    store_.reset(plan.header->num_kv_heads, static_cast<std::int64_t>(plan.rows.size()), plan.max_ranking_length(block_),
                 (plan.header->seq_len + block_ - 1) / block_);
  }

  std::vector<std::int32_t> save_state() const override { return store_.state(); }
  void restore_state(const std::vector<std::int32_t>& state) override { store_.restore(state); }

  void rank(const RankContext& c, Rankings& out) override {
    const auto group = group_ == "max" ? CrossLayerStore::Group::kMax : CrossLayerStore::Group::kSum;
    if (full_[static_cast<std::size_t>(c.layer)]) {
      // Full layer: rank by this layer's statistics and keep the ranking for the sparse layers after it.
      store_.record(c, score_ == "max" ? CrossLayerStore::Score::kMax : CrossLayerStore::Score::kMass, group);
      out.reset(1, c.rows, 0);
      return;
    }
    store_.recall(c, group, out);
  }

 private:
  std::string score_, group_, schedule_;
  std::vector<bool> full_;
  CrossLayerStore store_;  // the latest full layer's rankings, per KV group
};

}  // namespace

std::unique_ptr<Selector> make_hysparse_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<HySparseSelector>(spec, defaults);
}

}  // namespace hysparse
