// infllm: memory blocks represented by their most-attended keys, scored once for all heads of
// the layer, plus initial and local tokens (InfLLM, arXiv 2402.04617; thunlp/InfLLM).
#include <omp.h>

#include <fmt/format.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/interrupt.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class InfLlmSelector final : public Selector {
 public:
  InfLlmSelector(const SelectorSpec& spec, const SelectorDefaults& defaults)
      : Selector(spec, SelectorDefaults{128, 128, 4096}) {
    (void)defaults;  // the paper's values (Llama-3 / Mistral configs)
    window_ = take_int("window", 4096, 0);
    repr_ = take_int("repr", 4, 1);
    reject_unknown_keys();
  }
  std::string description() const override {
    return fmt::format("InfLLM: memory blocks of {} keys, each represented by the mean of its {} most-attended keys "
                       "(attention received from the {} queries after them); score sum over all heads of q_h . repr_h; "
                       "{} initial and {} local keys forced",
                       block_, repr_, window_, sinks_, window_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "block of " + std::to_string(block_) + " keys, one selection for all heads of the layer";
    i.budget = fmt::format("floor(k/B) memory blocks (complete blocks before the query's own) count against the budget; "
                           "{} initial and {} local keys forced on top",
                           sinks_, window_);
    i.post_rope = "post-RoPE keys and queries (InfLLM scores un-rotated memory keys with one rotation angle; not reproduced)";
    i.footprint = "infllm";
    i.footprint_params = {{"block", block_}, {"sinks", sinks_}, {"window", window_}};
    i.source = "InfLLM, arXiv 2402.04617; thunlp/InfLLM: inf_llm/attention/context_manager.py (repr_topk 4, block 128, "
               "n_init 128, n_local 4096)";
    return i;
  }
  bool ranks_per_head() const override { return false; }

  // Representative score r_h[j]: the true attention key j receives from queries j .. j + window - 1
  // (InfLLM accumulates it while the key is in the local window); blocks outside the window at row t
  // therefore only use queries before t.
  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hq = layer.header->num_q_heads;
    const std::int64_t G = layer.header->group_size();
    complete_ = T / block_;
    d_ = d;
    hq_ = Hq;
    repr_keys_.assign(static_cast<std::size_t>(Hq * complete_ * d), 0.0);
    // Keys of every KV head in double, once: logits come from blocked double GEMMs.
    std::vector<Eigen::MatrixXd> keys(static_cast<std::size_t>(layer.header->num_kv_heads));
    for (std::int64_t g = 0; g < layer.header->num_kv_heads; ++g) {
      keys[static_cast<std::size_t>(g)] =
          Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(layer.k(g, 0), T, d).cast<double>();
    }
    constexpr std::int64_t kChunk = 64;
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t h = 0; h < Hq; ++h) {
      std::vector<double> received(static_cast<std::size_t>(T), 0.0);
      Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Z;  // [rows][keys]
      const Eigen::MatrixXd& K = keys[static_cast<std::size_t>(h / G)];
      for (std::int64_t t0 = 0; t0 < T && window_ > 0; t0 += kChunk) {
        if (interrupted()) break;  // O(T^2) a head: a signal must not wait for it (checked below)
        const std::int64_t rows = std::min(kChunk, T - t0), width = t0 + rows;
        const Eigen::MatrixXd Q =
            Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(layer.q(h, t0), rows, d).cast<double>();
        // Row-major: each query's logits are contiguous for the passes over them below.
        Z.noalias() = Q * K.topRows(width).transpose();
        Z *= layer.scale;
        for (std::int64_t i = 0; i < rows; ++i) {
          const std::int64_t t = t0 + i;
          double m = layer.has_sinks() ? layer.sink_logit(h) : -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j <= t; ++j) m = std::max(m, Z(i, j));
          double sum = layer.has_sinks() ? std::exp(layer.sink_logit(h) - m) : 0.0;
          for (std::int64_t j = 0; j <= t; ++j) sum += std::exp(Z(i, j) - m);
          const double lse = m + std::log(sum);
          for (std::int64_t j = std::max<std::int64_t>(0, t - window_ + 1); j <= t; ++j) {
            received[static_cast<std::size_t>(j)] += std::exp(Z(i, j) - lse);
          }
        }
      }
      std::vector<std::int32_t> top(static_cast<std::size_t>(repr_));
      for (std::int64_t b = 0; b < complete_; ++b) {
        const std::int64_t count = std::min(repr_, block_);
        rank_top(&received[static_cast<std::size_t>(b * block_)], block_, count, top.data());
        std::sort(top.begin(), top.begin() + count);
        double* out = &repr_keys_[static_cast<std::size_t>((h * complete_ + b) * d)];
        for (std::int64_t i = 0; i < count; ++i) {
          const float* key = layer.k(h / G, b * block_ + top[static_cast<std::size_t>(i)]);
          for (std::int64_t c = 0; c < d; ++c) out[c] += static_cast<double>(key[c]);
        }
        for (std::int64_t c = 0; c < d; ++c) out[c] /= static_cast<double>(count);
      }
    }
    check_interrupted();
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(1, c.rows, v.num_blocks);
    std::vector<double> scores(static_cast<std::size_t>(v.num_blocks)), head_scores(scores.size());
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::int64_t t = c.positions[r];
      const std::int64_t memory = t / block_;  // complete blocks before the query's own (its block is local context)
      // score_b = sum over heads, in head order, of q_h . repr_h[b].
      std::fill(scores.begin(), scores.begin() + memory, 0.0);
      for (std::int64_t h = 0; h < hq_; ++h) {
        const double* repr = repr_keys_.data() + h * complete_ * d_;  // no complete block yet: empty
        proxy::dots(layer.q(h, t), d_, memory, [&](std::int64_t b) { return repr + b * d_; }, head_scores.data());
        for (std::int64_t b = 0; b < memory; ++b) scores[static_cast<std::size_t>(b)] += head_scores[static_cast<std::size_t>(b)];
      }
      const std::int64_t count = std::min(c.ranking_length[r], memory);
      rank_top(scores.data(), memory, count, out.row(0, r));
      out.size(0, r) = static_cast<std::int32_t>(count);
    }
  }

 private:
  std::int64_t repr_ = 4, complete_ = 0, d_ = 0, hq_ = 0;
  std::vector<double> repr_keys_;  // [query head][complete block][d]
};

}  // namespace

std::unique_ptr<Selector> make_infllm_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<InfLlmSelector>(spec, defaults);
}

}  // namespace hysparse
