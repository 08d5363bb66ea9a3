// reuse: exact top-k at selection layers, reused by the following layers (TidalDecode, OmniKV,
// Kascade). Token level by default; shares HySparse's cross-layer store.
#include <algorithm>

#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

using proxy::CrossLayerStore;

class ReuseSelector final : public Selector {
 public:
  ReuseSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;  // token level unless block= is given
    window_ = take_int("window", 0, 0);
    requested_ = take_int_list("layers", "2+13");
    group_ = take_choice("group", {"sum", "max", "none"}, "sum");
    score_ = take_choice("score", {"mass", "prob"}, "mass");
    anchor_ = take_choice("anchor", {"full", "topk"}, "full");
    reject_unknown_keys();
  }
  std::string description() const override {
    std::string layers;
    for (auto l : layers_.empty() ? requested_ : layers_) layers += (layers.empty() ? "" : ",") + std::to_string(l);
    return "cross-layer reuse: exact top-k (" + std::string(group_ == "none" ? "per query head" : group_ + " over a KV group") +
           ") at selection layers " + layers + (anchor_ == "full" ? " (full attention there)" : " (attending their own top-k)") +
           ", reused by the following layers; layers before the first selection layer are dense";
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = (block_ == 1 ? std::string("token") : "block of " + std::to_string(block_) + " keys") + ", " +
                    (group_ == "none" ? "per query head" : "one selection per KV group (" + group_ + ")");
    i.budget = "the top floor(k/B) blocks of the latest selection layer count against the budget; sinks and window "
               "forced on top; selection layers are " +
               std::string(anchor_ == "full" ? "full" : "sparse (their own exact top-k)") + ", earlier layers dense";
    i.post_rope = "exact scores of the selection layer (no approximation of q or k)";
    i.footprint = "tidaldecode";
    i.source = "TidalDecode arXiv 2410.05076 (per head, layers 2 and 13), OmniKV (max over heads), Kascade arXiv "
               "2512.16391 (sum over a KV group, anchors attend their top-k)";
    return i;
  }
  bool ranks_per_head() const override { return group_ == "none"; }
  bool reads_block_max() const override { return score_ == "prob" && group_ != "max"; }
  bool ranks_by_group_max(std::int64_t layer) const override {
    return score_ == "prob" && group_ == "max" && std::binary_search(layers_.begin(), layers_.end(), layer);
  }
  LayerRole role(std::int64_t layer) const override {
    if (layers_.empty() || layer < layers_.front()) return LayerRole::kFull;
    const bool selection = std::binary_search(layers_.begin(), layers_.end(), layer);
    return selection && anchor_ == "full" ? LayerRole::kFull : LayerRole::kSparse;
  }

  void begin(const ReplayPlan& plan) override {
    const std::int64_t L = plan.header->num_layers;
    layers_.clear();
    for (auto l : requested_) {
      if (l < L) layers_.push_back(l);
    }
    if (layers_.empty()) {
      fail(ErrorKind::kUsage, "selector {}: no selection layer below the capture's {} layers (layers={}); pass e.g. layers=0",
           label(), L, requested_.front());
    }
    const std::int64_t sets = group_ == "none" ? plan.header->num_q_heads : plan.header->num_kv_heads;
    store_.reset(sets, static_cast<std::int64_t>(plan.rows.size()), plan.max_ranking_length(block_),
                 (plan.header->seq_len + block_ - 1) / block_);
  }

  std::vector<std::int32_t> save_state() const override { return store_.state(); }
  void restore_state(const std::vector<std::int32_t>& state) override { store_.restore(state); }

  void rank(const RankContext& c, Rankings& out) override {
    const CrossLayerStore::Group group = group_ == "sum"   ? CrossLayerStore::Group::kSum
                                         : group_ == "max" ? CrossLayerStore::Group::kMax
                                                           : CrossLayerStore::Group::kNone;
    if (c.layer < layers_.front()) {
      out.reset(ranks_per_head() ? c.group_size : 1, c.rows, 0);
      return;
    }
    if (std::binary_search(layers_.begin(), layers_.end(), c.layer)) {
      store_.record(c, score_ == "mass" ? CrossLayerStore::Score::kMass : CrossLayerStore::Score::kMax, group);
      if (anchor_ == "full") {
        out.reset(ranks_per_head() ? c.group_size : 1, c.rows, 0);
        return;
      }
    }
    store_.recall(c, group, out);
  }

 private:
  std::vector<std::int64_t> requested_, layers_;
  std::string group_, score_, anchor_;
  CrossLayerStore store_;
};

}  // namespace

std::unique_ptr<Selector> make_reuse_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<ReuseSelector>(spec, defaults);
}

}  // namespace hysparse
