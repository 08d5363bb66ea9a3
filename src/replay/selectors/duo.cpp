// duo: DuoAttention's per-head split into full (retrieval) heads and sink + recent (streaming) heads,
// the heads chosen on held-out positions by their streaming error (DuoAttention, arXiv 2410.10819).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class DuoSelector final : public Selector {
 public:
  DuoSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 128, 0}) {
    (void)defaults;
    if (block_ != 1) fail(ErrorKind::kUsage, "selector duo: token level with per-head patterns (block must be 1, got {})", block_);
    // sinks= and recent= shape the streaming heads only: nothing is forced on the retrieval heads.
    sink_ = sinks_;
    sinks_ = 0;
    recent_ = take_int("recent", 256, 0);
    streaming_ = take_int("streaming", 50, 0);
    if (streaming_ > 100) fail(ErrorKind::kUsage, "selector duo: streaming={} (expected a percentage in [0, 100])", streaming_);
    error_ = take_choice("error", {"mass", "output"}, "mass");
    calib_ = take_int("calib", 256, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("DuoAttention: the {}% of KV heads (over all layers) with the lowest streaming error ({}) on the "
                       "calibration positions attend {} sink + {} recent keys; the others attend everything",
                       streaming_, error_ == "mass" ? "1 - mass recall" : "squared relative output error", sink_, recent_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "per KV head: full, or sink + recent tokens";
    i.budget = fmt::format("fixed per head: streaming heads {} sinks + {} recent keys, retrieval heads the whole row; the "
                           "budget axis is not used (attended_keys shows the size)",
                           sink_, recent_);
    i.post_rope = "positions only at replay; heads calibrated on the post-RoPE attention of held-out positions";
    i.footprint = "duo";
    i.calibration = "each KV head's mean streaming error on held-out positions (calib= caps them, sampled with --seed), over the whole capture before the replay";
    i.footprint_params = {{"streaming", streaming_}, {"sinks", sink_}, {"window", recent_}};
    i.source = "DuoAttention, arXiv 2410.10819; mit-han-lab/duo-attention: duo_attn/utils.py (sink 128, recent 256, "
               "sparsity 0.5); gates replaced by each head's streaming error on the capture";
    i.evicts = true;
    return i;
  }
  bool ranks_per_head() const override { return true; }
  BudgetUse budget_use() const override { return BudgetUse::kFree; }
  bool calibrates() const override { return true; }
  std::int64_t first_scored_position() const override { return split_.first_scored; }
  std::string calibration_note() const override {
    return fmt::format("{}; {} of {} KV heads streaming", split_.note,
                       std::count(streaming_head_.begin(), streaming_head_.end(), char{1}), streaming_head_.size());
  }

  void begin(const ReplayPlan& plan) override {
    split_ = calibration_split(plan, calib_, 3);
    kv_heads_ = plan.header->num_kv_heads;
    errors_.assign(static_cast<std::size_t>(plan.header->num_layers * kv_heads_), 0.0);
    streaming_head_.assign(errors_.size(), 0);
  }

  // Streaming error of every KV head of the layer: the mean over its query heads and the calibration
  // positions of 1 - R(sink + recent) or ||o_stream - o||^2 / ||o||^2.
  void calibrate_layer(const LayerContext& layer) override {
    if (error_ == "output" && (!layer.has_qk || !layer.has_v)) {
      fail(ErrorKind::kInput, "selector {}: error=output needs q, k and v, which layer {} does not have", label(), layer.layer);
    }
    const std::int64_t G = layer.header->group_size(), d = layer.head_dim();
    std::vector<double> p;
    for (std::int64_t g = 0; g < kv_heads_; ++g) {
      double sum = 0.0;
      std::int64_t count = 0;
      for (std::int64_t h = g * G; h < (g + 1) * G; ++h) {
        for (std::int64_t t : split_.positions) {
          proxy::row_probabilities(layer, h, t, p);
          if (error_ == "mass") {
            double kept = 0.0, total = 0.0;
            for (std::int64_t j = 0; j <= t; ++j) {
              total += p[static_cast<std::size_t>(j)];
              if (streams(j, t)) kept += p[static_cast<std::size_t>(j)];
            }
            sum += 1.0 - kept / total;
          } else {
            // p_j holds the sink in its denominator: o = sum_j p_j v_j and o_S = sum_S p_j v_j / (p_sink + sum_S p_j).
            std::vector<double> full(static_cast<std::size_t>(d), 0.0), stream(static_cast<std::size_t>(d), 0.0);
            double stream_weight = 0.0;
            if (layer.has_sinks()) {
              stream_weight = 1.0;
              for (double x : p) stream_weight -= x;
              stream_weight = std::max(0.0, stream_weight);
            }
            for (std::int64_t j = 0; j <= t; ++j) {
              const float* v = layer.v(g, j);
              const double pj = p[static_cast<std::size_t>(j)];
              for (std::int64_t c = 0; c < d; ++c) full[static_cast<std::size_t>(c)] += pj * static_cast<double>(v[c]);
              if (streams(j, t)) {
                stream_weight += pj;
                for (std::int64_t c = 0; c < d; ++c) stream[static_cast<std::size_t>(c)] += pj * static_cast<double>(v[c]);
              }
            }
            double diff = 0.0, norm = 0.0;
            for (std::int64_t c = 0; c < d; ++c) {
              const double o = full[static_cast<std::size_t>(c)];
              const double os = stream_weight > 0 ? stream[static_cast<std::size_t>(c)] / stream_weight : 0.0;
              diff += (os - o) * (os - o);
              norm += o * o;
            }
            sum += norm > 0 ? diff / norm : 0.0;
          }
          ++count;
        }
      }
      errors_[static_cast<std::size_t>(layer.layer * kv_heads_ + g)] = count ? sum / static_cast<double>(count) : 0.0;
    }
  }

  // The heads with the lowest errors stream (ties: the earlier layer and head).
  void finish_calibration() override {
    std::vector<std::int32_t> order(errors_.size());
    std::vector<double> negated(errors_.size());
    for (std::size_t i = 0; i < errors_.size(); ++i) negated[i] = -errors_[i];
    rank_top(negated.data(), static_cast<std::int64_t>(negated.size()), static_cast<std::int64_t>(negated.size()), order.data());
    const auto streaming = static_cast<std::size_t>(static_cast<std::int64_t>(errors_.size()) * streaming_ / 100);
    std::fill(streaming_head_.begin(), streaming_head_.end(), 0);
    for (std::size_t i = 0; i < streaming; ++i) streaming_head_[static_cast<std::size_t>(order[i])] = 1;
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    out.reset(c.group_size, c.rows, v.num_blocks);
    const bool streaming = streaming_head_[static_cast<std::size_t>(c.layer * kv_heads_ + c.kv_group)] != 0;
    for (std::int64_t h = 0; h < c.group_size; ++h) {
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const std::int64_t t = c.positions[r];
        std::int32_t* row = out.row(h, r);
        std::int32_t count = 0;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (!streaming || streams(j, t)) row[count++] = static_cast<std::int32_t>(j);
        }
        out.size(h, r) = count;
      }
    }
  }

 private:
  bool streams(std::int64_t j, std::int64_t t) const { return j < sink_ || j > t - recent_; }

  std::int64_t sink_ = 128, recent_ = 256, streaming_ = 50, calib_ = 256, kv_heads_ = 0;
  std::string error_;
  CalibrationSplit split_;
  std::vector<double> errors_;         // [layer][kv head]
  std::vector<char> streaming_head_;   // [layer][kv head]
};

}  // namespace

std::unique_ptr<Selector> make_duo_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<DuoSelector>(spec, defaults);
}

}  // namespace hysparse
