// loki: tokens scored in the top-r principal components of the keys, calibrated on held-out
// positions (Loki, arXiv 2406.02542; hpcgroup/loki).
#include <fmt/format.h>

#include <algorithm>

#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class LokiSelector final : public Selector {
 public:
  LokiSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{1, 0, 0}) {
    (void)defaults;  // token level unless block= is given
    window_ = take_int("window", 0, 0);
    r_ = take_int("r", 0, 0);
    calib_ = take_int("calib", 0, 0);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("Loki: per query head, tokens ranked by (q P_r) . (k P_r) with P_r the top r = {} principal "
                       "directions of the KV head's keys on the calibration positions",
                       r_ > 0 ? std::to_string(r_) : "d/4");
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = (block_ == 1 ? std::string("token") : "block of " + std::to_string(block_) + " keys (max token score)") +
                    ", per query head";
    i.budget = "top floor(k/B) by the low-rank score; sinks and window (none by default) forced on top";
    i.post_rope = "PCA of the post-RoPE keys (Loki's post-rotary variant); keys projected without centring";
    i.footprint = "loki";
    i.calibration = "the top-r principal directions of each KV head's keys at held-out positions (calib= caps them, sampled with --seed)";
    if (r_ > 0) i.footprint_params = {{"r", r_}};
    i.source = "Loki, arXiv 2406.02542; hpcgroup/loki: methods/pca_topk/utils.py (d_f = 0.25)";
    return i;
  }
  bool ranks_per_head() const override { return true; }
  std::int64_t first_scored_position() const override { return split_.first_scored; }
  std::string calibration_note() const override { return split_.note; }

  void begin(const ReplayPlan& plan) override { split_ = calibration_split(plan, calib_, 2); }

  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hkv = layer.header->num_kv_heads;
    rank_ = std::min(d, r_ > 0 ? r_ : std::max<std::int64_t>(1, d / 4));
    d_ = d;
    components_.assign(static_cast<std::size_t>(Hkv), {});
    projected_.assign(static_cast<std::size_t>(Hkv * T * rank_), 0.0);
    for (std::int64_t g = 0; g < Hkv; ++g) {
      std::vector<const float*> keys;
      for (std::int64_t t : split_.positions) keys.push_back(layer.k(g, t));
      std::vector<double>& P = components_[static_cast<std::size_t>(g)];
      P = proxy::principal_components(keys, d, rank_);
      // Every key of the layer projected: the bulk of the layer's setup, which runs before its tiles.
#pragma omp parallel for schedule(static)
      for (std::int64_t j = 0; j < T; ++j) project(layer.k(g, j), P, &projected_[static_cast<std::size_t>((g * T + j) * rank_)]);
    }
    seq_len_ = T;
    keys_id_ = proxy::next_data_id();
  }

  void rank(const RankContext& c, Rankings& out) override {
    const LayerContext& layer = *c.layer_context;
    const std::int64_t G = c.group_size, R = c.rows;
    const std::vector<double>& P = components_[static_cast<std::size_t>(c.kv_group)];
    // Each query row projected here; the scores against the projected keys on the replay's device where
    // it offers the rankings (Backend::token_score_rankings), else here.
    std::vector<double> weight(static_cast<std::size_t>(G * R * rank_));
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        project(layer.q(c.kv_group * G + h, c.positions[r]), P, &weight[static_cast<std::size_t>((h * R + r) * rank_)]);
      }
    }
    std::vector<std::int64_t> counts;
    TokenScoreRequest request = proxy::tile_token_score_request(c, block_, counts);
    request.keys64 = &projected_[static_cast<std::size_t>(c.kv_group * seq_len_ * rank_)];
    request.keys_id = keys_id_;
    request.seq_len = seq_len_;
    request.width = rank_;
    request.sets = G;
    request.channels = rank_;
    request.weight = weight.data();
    proxy::token_score_rankings(layer.backend, request, c.view->num_blocks, "loki", out);
  }

 private:
  // out[i] = sum over channels c, ascending, of x[c] P[c][i], each step proxy::multiply_add (fused where
  // the build has fused multiply-adds: the compiler's choice would differ between loop forms); the loop
  // over outputs vectorises.
  void project(const float* x, const std::vector<double>& P, double* out) const {
    std::fill(out, out + rank_, 0.0);
    for (std::int64_t c = 0; c < d_; ++c) {
      const double xc = static_cast<double>(x[c]);
      const double* row = &P[static_cast<std::size_t>(c * rank_)];
      for (std::int64_t i = 0; i < rank_; ++i) out[i] = proxy::multiply_add(xc, row[i], out[i]);
    }
  }

  std::int64_t r_ = 0, calib_ = 0, rank_ = 1, d_ = 0, seq_len_ = 0;
  CalibrationSplit split_;
  std::vector<std::vector<double>> components_;  // [kv head]: d x rank, row-major
  std::vector<double> projected_;                // [kv head][key][rank]
  std::uint64_t keys_id_ = 0;  // names projected_'s contents for a device that keeps them (TokenScoreRequest::keys_id)
};

}  // namespace

std::unique_ptr<Selector> make_loki_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<LokiSelector>(spec, defaults);
}

}  // namespace hysparse
