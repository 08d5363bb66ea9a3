// doublesparsity: tokens scored by the query and keys restricted to r outlier channels calibrated
// offline (Double Sparsity, arXiv 2408.07092; andy-yang-1/DoubleSparse).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class DoubleSparsitySelector final : public Selector {
 public:
  DoubleSparsitySelector(const SelectorSpec& spec, const SelectorDefaults& defaults)
      : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;  // token level unless block= is given
    window_ = take_int("window", 0, 0);
    r_ = take_int("r", 0, 0);
    channel_ = take_choice("channel", {"qk", "q", "k"}, "qk");
    calib_ = take_int("calib", 0, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("Double Sparsity: per query head, tokens ranked by q[C] . k[C] over the r = {} channels with the "
                       "largest mean |{}| on the calibration positions",
                       r_ > 0 ? std::to_string(r_) : "d/8", channel_ == "qk" ? "q*k" : channel_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = (block_ == 1 ? std::string("token") : "block of " + std::to_string(block_) + " keys (max token score)") +
                    ", per query head";
    i.budget = "top floor(k/B) by the channel-restricted score; sinks and window (none by default) forced on top";
    i.post_rope = "channels calibrated and scored on post-RoPE q and k (the reference's 'qk' statistic is post-RoPE)";
    i.footprint = "doublesparsity";
    i.calibration = "the r channels with the largest mean |q*k| (or |q|, |k|) of each query head, on held-out positions (calib= caps them, sampled with --seed)";
    if (r_ > 0) i.footprint_params = {{"r", r_}};
    i.source = "Double Sparsity, arXiv 2408.07092; andy-yang-1/DoubleSparse: config/offline_calibration.py";
    return i;
  }
  bool ranks_per_head() const override { return true; }
  std::int64_t first_scored_position() const override { return split_.first_scored; }
  std::string calibration_note() const override { return split_.note; }

  void begin(const ReplayPlan& plan) override { split_ = calibration_split(plan, calib_, 1); }

  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t d = layer.head_dim(), Hq = layer.header->num_q_heads, G = layer.header->group_size();
    const std::int64_t r = std::min(d, r_ > 0 ? r_ : std::max<std::int64_t>(1, d / 8));
    channels_.assign(static_cast<std::size_t>(Hq), {});
    std::vector<double> stat(static_cast<std::size_t>(d));
    for (std::int64_t h = 0; h < Hq; ++h) {
      std::fill(stat.begin(), stat.end(), 0.0);
      for (std::int64_t t : split_.positions) {
        const float* q = layer.q(h, t);
        const float* k = layer.k(h / G, t);
        for (std::int64_t c = 0; c < d; ++c) {
          const double qc = static_cast<double>(q[c]), kc = static_cast<double>(k[c]);
          stat[static_cast<std::size_t>(c)] += std::abs(channel_ == "qk" ? qc * kc : channel_ == "q" ? qc : kc);
        }
      }
      channels_[static_cast<std::size_t>(h)] = proxy::top_channels(stat, r);
    }
    keys_id_ = proxy::next_data_id();
  }

  void rank(const RankContext& c, Rankings& out) override {
    const LayerContext& layer = *c.layer_context;
    const std::int64_t G = c.group_size, R = c.rows, n = static_cast<std::int64_t>(channels_.front().size());
    // Per query head, its calibrated channels of q (the weights) and of each key: on the replay's device
    // where it offers the rankings (Backend::token_score_rankings), else here.
    std::vector<std::int32_t> channel(static_cast<std::size_t>(G * R * n));
    std::vector<double> weight(channel.size());
    for (std::int64_t h = 0; h < G; ++h) {
      const std::vector<std::int64_t>& channels = channels_[static_cast<std::size_t>(c.kv_group * G + h)];
      for (std::int64_t r = 0; r < R; ++r) {
        const float* q = layer.q(c.kv_group * G + h, c.positions[r]);
        for (std::int64_t i = 0; i < n; ++i) {
          const auto at = static_cast<std::size_t>((h * R + r) * n + i);
          channel[at] = static_cast<std::int32_t>(channels[static_cast<std::size_t>(i)]);
          weight[at] = static_cast<double>(q[channels[static_cast<std::size_t>(i)]]);
        }
      }
    }
    std::vector<std::int64_t> counts;
    TokenScoreRequest request = proxy::tile_token_score_request(c, block_, counts);
    request.keys = layer.k(c.kv_group, 0);
    request.keys_id = keys_id_;
    request.seq_len = layer.seq_len();
    request.width = layer.head_dim();
    request.sets = G;
    request.channels = n;
    request.channel = channel.data();
    request.weight = weight.data();
    proxy::token_score_rankings(layer.backend, request, c.view->num_blocks, "doublesparsity", out);
  }

 private:
  std::int64_t r_ = 0, calib_ = 0;
  std::string channel_;
  CalibrationSplit split_;
  std::vector<std::vector<std::int64_t>> channels_;  // [query head]: the calibrated channels, ascending
  std::uint64_t keys_id_ = 0;  // names the layer's keys for a device that keeps them (TokenScoreRequest::keys_id)
};

}  // namespace

std::unique_ptr<Selector> make_doublesparsity_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<DoubleSparsitySelector>(spec, defaults);
}

}  // namespace hysparse
