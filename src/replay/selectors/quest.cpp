// quest: query-aware page selection by an upper bound of each page's largest logit
// (Quest, arXiv 2406.10774; mit-han-lab/Quest).
#include <algorithm>
#include <limits>

#include "backend/backend.hpp"
#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class QuestSelector final : public Selector {
 public:
  QuestSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{16, 0, 0}) {
    (void)defaults;  // the paper's page of 16, not the global block
    window_ = take_int("window", 0, 0);
    dense_ = take_int("dense", 2, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return "Quest: per query head, pages ranked by sum_i max(q_i max_i, q_i min_i) over the page's per-channel key "
           "bounds; the query's own page first";
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "page of " + std::to_string(block_) + " keys, per query head";
    i.budget = "floor(k/page) pages including the query's own (partial) last page, which is ranked first; layers below " +
               std::to_string(dense_) + " are dense";
    i.post_rope = "page bounds of the post-RoPE keys, scored with the post-RoPE query (as the reference)";
    i.footprint = "quest";
    i.footprint_params = {{"page", block_}};
    i.source = "Quest, arXiv 2406.10774; mit-han-lab/Quest: evaluation/quest_attention.py, quest/ops/csrc/estimate.cu";
    return i;
  }
  bool ranks_per_head() const override { return true; }
  LayerRole role(std::int64_t layer) const override { return layer < dense_ ? LayerRole::kFull : LayerRole::kSparse; }

  void prepare_layer(const LayerContext& layer) override {
    if (layer.layer < dense_) return;
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hkv = layer.header->num_kv_heads;
    pages_ = (T + block_ - 1) / block_;
    d_ = d;
    lo_.assign(static_cast<std::size_t>(Hkv * pages_ * d), 0.0);
    hi_.assign(lo_.size(), 0.0);
    for (std::int64_t g = 0; g < Hkv; ++g) {
      for (std::int64_t b = 0; b < pages_; ++b) {
        const std::int64_t count = std::min(block_, T - b * block_);
        const std::size_t at = static_cast<std::size_t>((g * pages_ + b) * d);
        proxy::channel_bounds(layer.k(g, b * block_), count, d, &lo_[at], &hi_[at]);
      }
    }
  }

  void rank(const RankContext& c, Rankings& out) override {
    if (c.layer < dense_) {  // a dense layer attends everything: no page bounds, no ranking
      out.reset(c.group_size, c.rows, 0);
      return;
    }
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(c.group_size, c.rows, v.num_blocks);
    if (layer.backend && rank_on_backend(c, *layer.backend, out)) return;
    std::vector<double> scores(static_cast<std::size_t>(v.num_blocks));
    for (std::int64_t h = 0; h < c.group_size; ++h) {
      const std::int64_t head = c.kv_group * c.group_size + h;
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r], blocks = v.causal_blocks(r);
        const float* q = layer.q(head, t);
        // Earlier pages are complete (every key <= t): their stored bounds are causal.
        for (std::int64_t b = 0; b + 1 < blocks; ++b) {
          const std::size_t at = static_cast<std::size_t>((c.kv_group * pages_ + b) * d_);
          scores[static_cast<std::size_t>(b)] = proxy::quest_bound(q, &lo_[at], &hi_[at], d_);
        }
        scores[static_cast<std::size_t>(blocks - 1)] = std::numeric_limits<double>::infinity();
        const std::int64_t count = std::min(c.ranking_length[r], blocks);
        rank_top(scores.data(), blocks, count, out.row(h, r));
        out.size(h, r) = static_cast<std::int32_t>(count);
      }
    }
  }

 private:
  // The same ranking from the backend (Backend::page_bound_rankings), where it offers one.
  bool rank_on_backend(const RankContext& c, const Backend& backend, Rankings& out) const {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    PageBoundRequest request;
    for (std::int64_t r = 0; r < c.rows; ++r) request.count = std::max(request.count, std::min(c.ranking_length[r], v.causal_blocks(r)));
    if (request.count <= 0) return false;
    const auto at = static_cast<std::size_t>(c.kv_group * pages_ * d_);
    request.q = layer.q(c.kv_group * c.group_size, 0);
    request.lo = &lo_[at];
    request.hi = &hi_[at];
    request.heads = c.group_size;
    request.seq_len = layer.seq_len();
    request.head_dim = d_;
    request.page = block_;
    request.pages = pages_;
    request.rows = c.positions;
    request.num_rows = c.rows;
    request.kv_head = c.kv_group;
    std::vector<std::int32_t> order;
    if (!backend.page_bound_rankings(request, order)) return false;
    if (order.size() != static_cast<std::size_t>(c.group_size * c.rows * request.count)) {
      throw Error(ErrorKind::kInternal, fmt::format("quest: the backend ranked {} pages for {} heads x {} rows x {}", order.size(),
                                                    c.group_size, c.rows, request.count));
    }
    for (std::int64_t h = 0; h < c.group_size; ++h) {
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t n = std::min(c.ranking_length[r], v.causal_blocks(r));
        const std::int32_t* from = &order[static_cast<std::size_t>((h * c.rows + r) * request.count)];
        std::int32_t* to = out.row(h, r);
        for (std::int64_t i = 0; i < n; ++i) {
          if (from[i] < 0 || from[i] >= v.causal_blocks(r)) {
            throw Error(ErrorKind::kInternal, fmt::format("quest: the backend ranked page {} of a row of {}", from[i], v.causal_blocks(r)));
          }
          to[i] = from[i];
        }
        out.size(h, r) = static_cast<std::int32_t>(n);
      }
    }
    return true;
  }

  std::int64_t dense_ = 2, pages_ = 0, d_ = 0;
  std::vector<double> lo_, hi_;  // [kv head][page][d]
};

}  // namespace

std::unique_ptr<Selector> make_quest_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<QuestSelector>(spec, defaults);
}

}  // namespace hysparse
