// infllm: memory blocks represented by their most-attended keys, scored once for all heads of
// the layer, plus initial and local tokens (InfLLM, arXiv 2402.04617; thunlp/InfLLM).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/backend.hpp"
#include "common/error.hpp"
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
    ReceivedRequest request;
    request.q = layer.q(0, 0);
    request.k = layer.k(0, 0);
    request.heads = Hq;
    request.kv_heads = layer.header->num_kv_heads;
    request.seq_len = T;
    request.head_dim = d;
    request.scale = layer.scale;
    std::vector<double> sinks;
    if (layer.has_sinks()) {
      for (std::int64_t h = 0; h < Hq; ++h) sinks.push_back(layer.sink_logit(h));
      request.sink_logits = sinks.data();
    }
    request.window = window_;
    request.stop_requested = interrupted;
    // The backend first (the CUDA one computes it on the device); where it declines, here. Either stops
    // early at a signal.
    std::vector<double> received_all;  // [query head][key]
    const bool on_backend = layer.backend && layer.backend->attention_received(request, received_all);
    check_interrupted();
    if (!on_backend) proxy::attention_received(request, received_all);
    check_interrupted();
    if (received_all.size() != static_cast<std::size_t>(Hq * T)) {
      throw Error(ErrorKind::kInternal,
                  fmt::format("infllm: the backend returned {} received sums for {} heads x {} keys", received_all.size(), Hq, T));
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t h = 0; h < Hq; ++h) {
      const double* received = &received_all[static_cast<std::size_t>(h * T)];
      std::vector<std::int32_t> top(static_cast<std::size_t>(repr_));
      for (std::int64_t b = 0; b < complete_; ++b) {
        const std::int64_t count = std::min(repr_, block_);
        rank_top(received + b * block_, block_, count, top.data());
        std::sort(top.begin(), top.begin() + count);
        double* out = &repr_keys_[static_cast<std::size_t>((h * complete_ + b) * d)];
        for (std::int64_t i = 0; i < count; ++i) {
          const float* key = layer.k(h / G, b * block_ + top[static_cast<std::size_t>(i)]);
          for (std::int64_t c = 0; c < d; ++c) out[c] += static_cast<double>(key[c]);
        }
        for (std::int64_t c = 0; c < d; ++c) out[c] /= static_cast<double>(count);
      }
    }
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
