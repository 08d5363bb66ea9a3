// sparq: the r largest components of |q| (summed over a KV group) select the channels of an
// approximate score (SparQ Attention, arXiv 2312.04985; graphcore-research/llm-inference-research).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class SparqSelector final : public Selector {
 public:
  SparqSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;  // token level unless block= is given
    window_ = take_int("window", 0, 0);
    r_ = take_int("r", 0, 0);
    local_ = take_int("local", 1, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("SparQ: per KV group and row, the r = {} largest channels of sum_h |q_h| select an approximate "
                       "logit q_h[i] . k[i] / sqrt(d |q_h[i]|_1 / |q_h|_1), summed over the group's heads; the {} most "
                       "recent keys first",
                       r_ > 0 ? std::to_string(r_) : "d/8", local_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = (block_ == 1 ? std::string("token") : "block of " + std::to_string(block_) + " keys (max token score)") +
                    ", one selection per KV group";
    i.budget = fmt::format("top floor(k/B) including the {} most recent keys (the current one included), ranked first; the "
                           "output is the plain renormalised softmax (SparQ's mean-value reallocation is not modelled)",
                           local_);
    i.post_rope = "post-RoPE q and k channels (as the reference)";
    i.footprint = "sparq";
    if (r_ > 0) i.footprint_params = {{"r", r_}};
    i.source = "SparQ Attention, arXiv 2312.04985; graphcore-research/llm-inference-research: llminference/methods/"
               "ann_attention.py (r = d/8 as in Twilight's re-implementation)";
    return i;
  }
  bool ranks_per_head() const override { return false; }

  void prepare_layer(const LayerContext& layer) override { require_qk(layer); }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    const std::int64_t d = layer.head_dim(), r_channels = std::min(d, r_ > 0 ? r_ : std::max<std::int64_t>(1, d / 8));
    out.reset(1, c.rows, v.num_blocks);
    std::vector<double> magnitude(static_cast<std::size_t>(d)), token, scores(static_cast<std::size_t>(v.num_blocks));
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::int64_t t = c.positions[r], blocks = v.causal_blocks(r);
      std::fill(magnitude.begin(), magnitude.end(), 0.0);
      for (std::int64_t h = 0; h < c.group_size; ++h) {
        const float* q = layer.q(c.kv_group * c.group_size + h, t);
        for (std::int64_t ch = 0; ch < d; ++ch) magnitude[static_cast<std::size_t>(ch)] += std::abs(static_cast<double>(q[ch]));
      }
      const std::vector<std::int64_t> channels = proxy::top_channels(magnitude, r_channels);
      token.assign(static_cast<std::size_t>(t + 1), 0.0);
      for (std::int64_t h = 0; h < c.group_size; ++h) {
        const float* q = layer.q(c.kv_group * c.group_size + h, t);
        double kept = 0.0, all = 0.0;
        for (std::int64_t ch = 0; ch < d; ++ch) all += std::abs(static_cast<double>(q[ch]));
        for (std::int64_t ch : channels) kept += std::abs(static_cast<double>(q[ch]));
        const double temperature = kept > 0 ? std::sqrt(static_cast<double>(d) * kept / all) : 1.0;
        for (std::int64_t j = 0; j <= t; ++j) {
          const float* k = layer.k(c.kv_group, j);
          double s = 0.0;
          for (std::int64_t ch : channels) s += static_cast<double>(q[ch]) * static_cast<double>(k[ch]);
          token[static_cast<std::size_t>(j)] += s / temperature;
        }
      }
      for (std::int64_t j = std::max<std::int64_t>(0, t - local_ + 1); j <= t; ++j) {
        token[static_cast<std::size_t>(j)] = std::numeric_limits<double>::infinity();
      }
      proxy::max_over_blocks(token.data(), t + 1, block_, scores.data());
      const std::int64_t count = std::min(c.ranking_length[r], blocks);
      rank_top(scores.data(), blocks, count, out.row(0, r));
      out.size(0, r) = static_cast<std::int32_t>(count);
    }
  }

 private:
  std::int64_t r_ = 0, local_ = 1;
};

}  // namespace

std::unique_ptr<Selector> make_sparq_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<SparqSelector>(spec, defaults);
}

}  // namespace hysparse
