// nsa: NSA's selection branch as a training-free proxy: mean-pooled compressed keys, their softmax
// summed over the heads of a KV group and mapped onto selection blocks (NSA, arXiv 2502.11089).
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.hpp"
#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class NsaSelector final : public Selector {
 public:
  NsaSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{64, 0, 512}) {
    (void)defaults;  // the paper's values
    window_ = take_int("window", 512, 0);
    cmp_ = take_int("cmp", 32, 1);
    stride_ = take_int("stride", 16, 1);
    initial_ = take_int("initial", 1, 0);
    local_ = take_int("local", 2, 0);
    reject_unknown_keys();
    if (block_ % stride_ != 0 || cmp_ % stride_ != 0) {
      fail(ErrorKind::kUsage, "selector nsa: block ({}) and cmp ({}) must be multiples of stride ({})", block_, cmp_, stride_);
    }
  }
  std::string description() const override {
    return fmt::format("NSA selection: softmax over mean-pooled compressed keys (length {}, stride {}), summed over a KV "
                       "group's heads and mapped onto {}-key blocks; {} initial and {} local blocks first",
                       cmp_, stride_, block_, initial_, local_);
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "block of " + std::to_string(block_) + " keys, one selection per KV group (sum over its heads)";
    i.budget = fmt::format("floor(k/B) blocks including the {} initial and {} most recent blocks, ranked first (NSA's n = 16 "
                           "counts them); the sliding window ({}) and sinks forced on top",
                           initial_, local_, window_);
    i.post_rope = "mean pooling of post-RoPE keys (training-free stand-in for NSA's learned compression MLP)";
    i.footprint = "nsa";
    i.footprint_params = {{"stride", stride_}, {"block", block_}, {"window", window_}};
    i.source = "NSA, arXiv 2502.11089 Eqs. 7-9; fla-org/native-sparse-attention naive.py (mean pooling), "
               "XunhaoLai/native-sparse-attention-triton (overlap mapping)";
    return i;
  }
  bool ranks_per_head() const override { return false; }

  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hkv = layer.header->num_kv_heads;
    compressed_ = T >= cmp_ ? (T - cmp_) / stride_ + 1 : 0;
    d_ = d;
    keys_.assign(static_cast<std::size_t>(Hkv * compressed_ * d), 0.0);
    for (std::int64_t g = 0; g < Hkv; ++g) {
      for (std::int64_t i = 0; i < compressed_; ++i) {
        proxy::mean_key(layer.k(g, i * stride_), cmp_, d, &keys_[static_cast<std::size_t>((g * compressed_ + i) * d)]);
      }
    }
    keys_id_ = proxy::next_data_id();
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(1, c.rows, v.num_blocks);
    if (c.rows <= 0) return;
    NsaScoreRequest request;
    request.q = layer.q(c.kv_group * c.group_size, 0);
    request.keys = keys_.data() + c.kv_group * compressed_ * d_;  // none compressed yet: empty
    request.keys_id = keys_id_;
    request.heads = c.group_size;
    request.seq_len = layer.seq_len();
    request.head_dim = d_;
    request.compressed = compressed_;
    request.cmp = cmp_;
    request.stride = stride_;
    request.block = block_;
    request.scale = layer.scale;
    request.rows = c.positions;
    request.num_rows = c.rows;
    request.kv_head = c.kv_group;
    request.fused = proxy::kMultiplyAddFused;
    // On the replay's device where it offers them (Backend::nsa_block_scores), else here.
    std::vector<double> scores;
    if (!layer.backend || !layer.backend->nsa_block_scores(request, scores)) proxy::nsa_block_scores(request, scores);
    const std::int64_t row_stride = c.positions[c.rows - 1] / block_ + 1;
    if (scores.size() != static_cast<std::size_t>(c.rows * row_stride)) {
      throw Error(ErrorKind::kInternal,
                  fmt::format("nsa: {} block scores for {} rows of up to {} blocks", scores.size(), c.rows, row_stride));
    }
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::int64_t blocks = v.causal_blocks(r);
      double* row = &scores[static_cast<std::size_t>(r * row_stride)];
      const double forced = std::numeric_limits<double>::infinity();
      for (std::int64_t b = 0; b < std::min(initial_, blocks); ++b) row[b] = forced;
      for (std::int64_t b = std::max<std::int64_t>(0, blocks - local_); b < blocks; ++b) row[b] = forced;
      const std::int64_t count = std::min(c.ranking_length[r], blocks);
      rank_top(row, blocks, count, out.row(0, r));
      out.size(0, r) = static_cast<std::int32_t>(count);
    }
  }

 private:
  std::int64_t cmp_ = 32, stride_ = 16, initial_ = 1, local_ = 2, compressed_ = 0, d_ = 0;
  std::vector<double> keys_;  // [kv head][compressed key][d]
  std::uint64_t keys_id_ = 0;  // names keys_' contents for a device that keeps them (NsaScoreRequest::keys_id)
};

}  // namespace

std::unique_ptr<Selector> make_nsa_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<NsaSelector>(spec, defaults);
}

}  // namespace hysparse
