// snapkv: one eviction at the end of the prompt, voted by the attention of the prompt's last queries
// and pooled; the kept keys plus every later key serve the queries after the prompt
// (SnapKV, arXiv 2404.14469; FasterDecoding/SnapKV).
#include <algorithm>
#include <numeric>

#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class SnapKvSelector final : public Selector {
 public:
  SnapKvSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;
    if (block_ != 1) fail(ErrorKind::kUsage, "selector snapkv: evicts single keys (block must be 1, got {})", block_);
    if (sinks_ != 0) fail(ErrorKind::kUsage, "selector snapkv: keeps no forced sinks (sinks must be 0)");
    observe_ = take_int("observe", 32, 1);
    kernel_ = take_int("kernel", 7, 1);
    pool_ = take_choice("pool", {"max", "avg"}, "max");
    group_ = take_choice("group", {"none", "sum"}, "none");
    prompt_ = take_int("prompt", 0, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    const std::string at = prompt_end_ > 0 ? "position " + std::to_string(prompt_end_) : prompt_ > 0 ? "position " + std::to_string(prompt_) : "auto";
    return fmt::format("SnapKV: at the end of the prompt ({}), keys ranked by the attention of the last {} "
                       "prompt queries ({}), {}-pooled with kernel {}; the top (C - {}) and the observation window are "
                       "kept for every later query, with the keys after the prompt",
                       at, observe_, group_ == "none" ? "per query head" : "summed over a KV group", pool_, kernel_,
                       observe_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = std::string("token, ") + (group_ == "none" ? "per query head (repeat_kv)" : "per KV group (sum)");
    i.budget = "the budget C is the compressed prompt's size (the observation window included); keys after the prompt "
               "are appended on top; evaluated on rows after the prompt only (prompt = prompt= tokens, default the "
               "first query row, or T/2 when every position is queried)";
    i.post_rope = "exact attention of the post-RoPE observation queries (as the reference, which compresses post-RoPE keys)";
    i.footprint = "snapkv";
    i.source = "SnapKV, arXiv 2404.14469; FasterDecoding/SnapKV: snapkv/monkeypatch/snapkv_utils.py (window 32, kernel 7 "
               "maxpool in the LongBench configs)";
    i.evicts = true;
    return i;
  }
  bool ranks_per_head() const override { return group_ == "none"; }
  BudgetUse budget_use() const override { return BudgetUse::kPerBudget; }
  std::int64_t first_scored_position() const override { return prompt_end_; }

  // The compressed prompt (its capacity at the prompt's last row, observation window included) and
  // every key after the prompt, appended while decoding.
  std::int64_t budget_tokens_at_end(const Budget& budget, std::int64_t seq_len) const override {
    const std::int64_t P = prompt_end_, w = std::min(observe_, P);
    const std::int64_t capacity = budget.blocks_for_row(std::max<std::int64_t>(0, P - 1), 1);
    return std::clamp<std::int64_t>(capacity - w, 0, P - w) + (seq_len - P + w);
  }

  void begin(const ReplayPlan& plan) override {
    const std::int64_t T = plan.header->seq_len;
    if (prompt_ > 0) {
      prompt_end_ = std::min(prompt_, T);
    } else {
      prompt_end_ = !plan.rows.empty() && plan.rows.front() > 0 ? plan.rows.front() : T / 2;
    }
  }

  void prepare_layer(const LayerContext& layer) override {
    const std::int64_t Hq = layer.header->num_q_heads, G = layer.header->group_size();
    const std::int64_t P = prompt_end_, w = std::min(observe_, P), prefix = P - w;
    const std::int64_t sets = group_ == "none" ? Hq : layer.header->num_kv_heads;
    prefix_ = prefix;
    order_.assign(static_cast<std::size_t>(sets * prefix), 0);
    std::vector<double> votes, p;
    for (std::int64_t s = 0; s < sets; ++s) {
      votes.assign(static_cast<std::size_t>(prefix), 0.0);
      const std::int64_t h0 = group_ == "none" ? s : s * G, h1 = group_ == "none" ? s + 1 : (s + 1) * G;
      for (std::int64_t h = h0; h < h1; ++h) {
        for (std::int64_t t = P - w; t < P; ++t) {
          proxy::row_probabilities(layer, h, t, p);
          for (std::int64_t j = 0; j < prefix; ++j) votes[static_cast<std::size_t>(j)] += p[static_cast<std::size_t>(j)];
        }
      }
      const std::vector<double> pooled = proxy::pool1d(votes, kernel_, pool_ == "max");
      // data() + offset, not &order_[offset]: with an empty prefix (the observation window covers the
      // whole prompt) order_ is empty and indexing it is undefined behaviour.
      rank_top(pooled.data(), prefix, prefix, order_.data() + s * prefix);
    }
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const Budget& budget = *c.budget;
    const std::int64_t P = prompt_end_, w = std::min(observe_, P);
    // The compressed prompt's capacity; a sparsity budget applies to the prompt's length.
    const std::int64_t capacity = budget.blocks_for_row(std::max<std::int64_t>(0, P - 1), 1);
    const std::int64_t kept = std::clamp<std::int64_t>(capacity - w, 0, prefix_);
    const std::int64_t sets = ranks_per_head() ? c.group_size : 1;
    out.reset(sets, c.rows, v.num_blocks);
    for (std::int64_t s = 0; s < sets; ++s) {
      const std::int64_t set = ranks_per_head() ? c.kv_group * c.group_size + s : c.kv_group;
      const std::int32_t* order = order_.data() + set * prefix_;  // order_ may be empty (see prepare_layer)
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r];
        std::int32_t* row = out.row(s, r);
        std::int32_t count = 0;
        if (t >= P) {
          for (std::int64_t i = 0; i < kept; ++i) row[count++] = order[i];
          for (std::int64_t j = P - w; j <= t; ++j) row[count++] = static_cast<std::int32_t>(j);
        }
        out.size(s, r) = count;
      }
    }
  }

 private:
  std::int64_t observe_ = 32, kernel_ = 7, prompt_ = 0, prompt_end_ = 0, prefix_ = 0;
  std::string pool_, group_;
  std::vector<std::int32_t> order_;  // [set][prefix key]: prompt keys before the window, by pooled vote
};

}  // namespace

std::unique_ptr<Selector> make_snapkv_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<SnapKvSelector>(spec, defaults);
}

}  // namespace hysparse
