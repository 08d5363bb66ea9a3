// moba: blocks ranked by the query's dot product with the block's mean key, the current block
// first (MoBA, arXiv 2502.13189; MoonshotAI/MoBA), applied training-free.
#include <algorithm>
#include <limits>

#include "replay/proxy_math.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class MobaSelector final : public Selector {
 public:
  MobaSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, SelectorDefaults{4096, 0, 0}) {
    (void)defaults;  // the paper's block (moba_chunk_size 4096), not the global block
    window_ = take_int("window", 0, 0);
    current_ = take_int("current", 1, 0) != 0;
    reject_unknown_keys();
  }
  std::string description() const override {
    return std::string("MoBA: per query head, blocks ranked by q . mean(K_block)") +
           (current_ ? ", the query's own block first" : " (the query's own block scored by its causal keys' mean)");
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "block of " + std::to_string(block_) + " keys, per query head";
    i.budget = current_ ? "floor(k/B) blocks including the query's own block, which is ranked first (moba_topk counts it)"
                        : "floor(k/B) blocks by score, the query's own block included only by its score";
    i.post_rope = "mean of the post-RoPE keys (the reference pools the keys it attends with)";
    i.footprint = "moba";
    i.footprint_params = {{"block", block_}};
    i.source = "MoBA, arXiv 2502.13189; MoonshotAI/MoBA: moba/moba_naive.py";
    return i;
  }
  bool ranks_per_head() const override { return true; }

  void prepare_layer(const LayerContext& layer) override {
    require_qk(layer);
    const std::int64_t T = layer.seq_len(), d = layer.head_dim(), Hkv = layer.header->num_kv_heads;
    blocks_ = T / block_;  // complete blocks
    d_ = d;
    means_.assign(static_cast<std::size_t>(Hkv * blocks_ * d), 0.0);
    for (std::int64_t g = 0; g < Hkv; ++g) {
      for (std::int64_t b = 0; b < blocks_; ++b) {
        proxy::mean_key(layer.k(g, b * block_), block_, d, &means_[static_cast<std::size_t>((g * blocks_ + b) * d)]);
      }
    }
    means_id_ = proxy::next_data_id();
  }

  void rank(const RankContext& c, Rankings& out) override {
    const BlockView& v = *c.view;
    const LayerContext& layer = *c.layer_context;
    out.reset(c.group_size, c.rows, v.num_blocks);
    if (c.rows <= 0) return;
    // The scores q . mean(K_b) of the complete blocks are NSA's logits over compressed keys that are the
    // blocks' means (cmp = stride = block, scale 1): on the replay's device where it offers them
    // (Backend::pooled_key_logits), else here, in chunks of rows that bound the logits held at once.
    NsaScoreRequest request;
    request.q = layer.q(c.kv_group * c.group_size, 0);
    request.keys = means_.data() + c.kv_group * blocks_ * d_;  // no complete block yet: empty
    request.keys_id = means_id_;
    request.heads = c.group_size;
    request.seq_len = layer.seq_len();
    request.head_dim = d_;
    request.compressed = blocks_;
    request.cmp = request.stride = request.block = block_;
    request.scale = 1.0;
    request.kv_head = c.kv_group;
    request.fused = proxy::kMultiplyAddFused;
    request.rows = c.positions;
    request.num_rows = c.rows;
    std::vector<double> scores(static_cast<std::size_t>(v.num_blocks)), partial(static_cast<std::size_t>(d_));
    auto rank_rows = [&](std::int64_t r0, std::int64_t n, std::int64_t width, const std::vector<double>& logits) {
      for (std::int64_t h = 0; h < c.group_size; ++h) {
        for (std::int64_t r = r0; r < r0 + n; ++r) {
          const std::int64_t t = c.positions[r], blocks = v.causal_blocks(r), current = blocks - 1;
          // Every block before the query's own is complete, so among the row's visible keys.
          std::copy_n(logits.data() + (h * n + r - r0) * width, current, scores.begin());
          if (current_) {
            scores[static_cast<std::size_t>(current)] = std::numeric_limits<double>::infinity();
          } else {
            proxy::mean_key(layer.k(c.kv_group, current * block_), t + 1 - current * block_, d_, partial.data());
            scores[static_cast<std::size_t>(current)] = proxy::dot(layer.q(c.kv_group * c.group_size + h, t), partial.data(), d_);
          }
          const std::int64_t count = std::min(c.ranking_length[r], blocks);
          rank_top(scores.data(), blocks, count, out.row(h, r));
          out.size(h, r) = static_cast<std::int32_t>(count);
        }
      }
    };
    proxy::pooled_key_logits_in_chunks(layer.backend, request, kMaxLogits, "moba", rank_rows);
  }

 private:
  // Logits a chunk of a tile's rows holds at once (32 MiB; more only where one row's exceed it).
  static constexpr std::int64_t kMaxLogits = std::int64_t{1} << 22;
  bool current_ = true;
  std::int64_t blocks_ = 0, d_ = 0;
  std::vector<double> means_;  // [kv head][complete block][d]
  std::uint64_t means_id_ = 0;  // names means_' contents for a device that keeps them (NsaScoreRequest::keys_id)
};

}  // namespace

std::unique_ptr<Selector> make_moba_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<MobaSelector>(spec, defaults);
}

}  // namespace hysparse
