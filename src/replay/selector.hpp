#pragma once
// The selector interface and registry. A selector ranks key blocks per row;
// a budget of n blocks takes the first n. Forced keys (sinks, window) come on top.
//
// Beyond that nested ranking, a selector may (see BudgetUse) return one attended set per
// budget (eviction methods, whose sets are not nested) or one set per row whatever the budget
// (adaptive and fixed-pattern methods); it may read the layer's q/k/v once per layer
// (prepare_layer), calibrate on held-out positions, weight the keys of its output estimate
// (Rankings::log_weight), and leave rows out of its metrics (first_scored_position).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "replay/options.hpp"

namespace hysparse {

class Backend;

// Exact statistics of one (layer, KV group, row tile) at one block size.
struct BlockView {
  std::int64_t block = 0, heads = 0, rows = 0, num_blocks = 0;  // num_blocks: of the tile's last row
  const std::int64_t* positions = nullptr;                      // t of each row
  std::vector<double> mass;      // [heads][rows][num_blocks]: M_b, normalised by the row's token mass
  std::vector<double> max_prob;  // [heads][rows][num_blocks]: P_b, the largest true probability in the block;
                                 // empty in a view whose selectors do not read it (Selector::reads_block_max)
  std::int64_t causal_blocks(std::int64_t r) const { return positions[r] / block + 1; }
  std::size_t at(std::int64_t h, std::int64_t r, std::int64_t b) const {
    return static_cast<std::size_t>((h * rows + r) * num_blocks + b);
  }
};

// Ranked blocks: [sets][rows][stride] with a length per (set, row). A selector whose output
// estimate is not the plain renormalised softmax (MagicPIG's importance sampling) also fills
// log_weight, parallel to blocks: the keys of a block enter the output with exp(z_j + log_weight).
struct Rankings {
  std::int64_t sets = 0, rows = 0, stride = 0;
  std::vector<std::int32_t> blocks, length;
  std::vector<double> log_weight;  // empty: every weight is 1
  void reset(std::int64_t sets_, std::int64_t rows_, std::int64_t stride_);
  void enable_weights() { log_weight.assign(blocks.size(), 0.0); }
  bool weighted() const { return !log_weight.empty(); }
  std::int32_t* row(std::int64_t set, std::int64_t r) { return &blocks[index(set, r)]; }
  const std::int32_t* row(std::int64_t set, std::int64_t r) const { return &blocks[index(set, r)]; }
  double* weights(std::int64_t set, std::int64_t r) { return &log_weight[index(set, r)]; }
  const double* weights(std::int64_t set, std::int64_t r) const { return &log_weight[index(set, r)]; }
  std::int32_t& size(std::int64_t set, std::int64_t r) { return length[static_cast<std::size_t>(set * rows + r)]; }
  std::int32_t size(std::int64_t set, std::int64_t r) const { return length[static_cast<std::size_t>(set * rows + r)]; }

 private:
  std::size_t index(std::int64_t set, std::int64_t r) const { return static_cast<std::size_t>((set * rows + r) * stride); }
};

// Writes the `count` best of `num` scores into `out`: higher score first, ties to the lower index.
void rank_top(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out);

// One layer's tensors, given to selectors once per layer before any rank() of that layer.
struct LayerContext {
  std::int64_t layer = 0;
  const CaptureHeader* header = nullptr;
  const LayerTensors* tensors = nullptr;  // float32; q/k empty on a dense `attn` layer, v empty unless read
  bool has_qk = false, has_v = false;
  const std::vector<std::int64_t>* rows = nullptr;  // the evaluated query positions, ascending
  double scale = 1.0;                               // softmax scale
  // The replay's compute device: a selector may hand it work the backend offers (e.g.
  // Backend::page_bound_rankings) and does it itself where the backend declines.
  const Backend* backend = nullptr;
  std::int64_t seq_len() const { return header->seq_len; }
  std::int64_t head_dim() const { return header->head_dim; }
  // Row pointers (q/k layers): q of query head h at t, k / v of KV head g at j.
  const float* q(std::int64_t h, std::int64_t t) const {
    return tensors->q.data() + (h * header->seq_len + t) * header->head_dim;
  }
  const float* k(std::int64_t g, std::int64_t j) const {
    return tensors->k.data() + (g * header->seq_len + j) * header->head_dim;
  }
  const float* v(std::int64_t g, std::int64_t j) const {
    return tensors->v.data() + (g * header->seq_len + j) * header->head_dim;
  }
  bool has_sinks() const { return !tensors->sink_logits.empty(); }
  double sink_logit(std::int64_t h) const { return static_cast<double>(tensors->sink_logits[static_cast<std::size_t>(h)]); }
};

struct RankContext {
  std::int64_t layer = 0, kv_group = 0, group_size = 1;
  std::int64_t row_begin = 0;  // index of the tile's first row in the replay's query set
  std::int64_t rows = 0;
  const std::int64_t* positions = nullptr;
  const BlockView* view = nullptr;          // at the selector's block size
  const std::int64_t* ranking_length = nullptr;  // [rows]: blocks to rank (max budget, capped at the causal blocks)
  // Residual mass per head and block: the block's mass outside the selector's fixed forced keys
  // (equal to its mass for blocks they do not touch), [heads][rows][num_blocks]: the view's masses for a
  // selector without forced keys; for one with forced keys, null unless it reads_residual_mass(). Null, with
  // top_by_residual empty, in layers where the selector attends in full (role kFull): the engine computes
  // residuals only for the selectors sparse in a layer.
  const std::vector<double>* residual_mass = nullptr;
  // The first `count` blocks of (head, row) by residual mass, ranked once per tile by the engine
  // and shared with its oracle references (rank_top's order and tie rule); count <= ranking_length[row].
  std::function<const std::int32_t*(std::int64_t head, std::int64_t row, std::int64_t count)> top_by_residual;
  // The first `count` blocks of the row by max over the group's heads of BlockView::max_prob (rank_top's
  // order and tie rule; count <= ranking_length[row]): ranked once per tile, shared with the reuse matrix,
  // and by the device where it ranks them. Set in the layers where the selector's ranks_by_group_max(layer).
  std::function<const std::int32_t*(std::int64_t row, std::int64_t count)> top_by_group_max;
  const LayerContext* layer_context = nullptr;  // the layer's tensors (q/k for proxies)
  // BudgetUse::kPerBudget only: the budget this call ranks for (index into the replay's budgets).
  std::int64_t budget_index = -1;
  const Budget* budget = nullptr;
};

struct ReplayPlan {
  const CaptureHeader* header = nullptr;
  std::vector<std::int64_t> rows;
  std::vector<Budget> budgets;
  std::string schedule;  // hysparse schedule option (may be empty)
  std::uint64_t seed = 0;
  // Largest ranking length any row needs at block size B (for state sizing).
  std::int64_t max_ranking_length(std::int64_t block) const;
};

// Positions that calibrate a selector, and the rows it is scored on. Calibration uses the
// capture's positions that are not evaluated (outside the query set); when the query set is
// every position, it uses the first half [0, T/2) and the selector is scored on rows t >= T/2
// only. At most `max_positions` positions are kept, sampled without replacement with the
// replay's seed (all of them when there are fewer).
struct CalibrationSplit {
  std::vector<std::int64_t> positions;  // ascending
  std::int64_t first_scored = 0;        // rows t < first_scored are not scored
  std::string note;                     // for the report: which positions calibrated
};
CalibrationSplit calibration_split(const ReplayPlan& plan, std::int64_t max_positions, std::uint64_t purpose);

enum class LayerRole { kSparse, kFull };

// How a selector's output meets the budget axis.
enum class BudgetUse {
  kNested,     // one ranking per row; a budget of n blocks takes its first n (nested sets)
  kPerBudget,  // rank() runs once per budget; the whole ranking is that budget's attended set (eviction)
  kFree,       // one attended set per row whatever the budget (adaptive or fixed pattern): all of it is used
};
const char* to_string(BudgetUse use);

// What a selector is, for `hysparse list` and the report.
struct SelectorInfo {
  std::string granularity;  // "block of 64 keys", "token", ...
  std::string budget;       // what counts against the budget, what is forced
  std::string post_rope;    // how the post-RoPE capture is used
  std::string footprint;    // its KV accounting entry: find_footprint(footprint)
  std::string source;       // paper / reference code
  std::string calibration;  // what it calibrates on held-out positions ("" when nothing)
  bool evicts = false;      // keys leave the cache for good
  // The selector's values of the footprint's parameters (page, r, tables, ...), overriding its defaults.
  std::map<std::string, std::int64_t> footprint_params;
};

// A selector's KV price, from the one footprint table (kv/footprint.hpp) with its own parameters:
// the metadata it keeps besides K and V, in bytes per token per KV head (bf16 elements unless the
// method sets its own width), and whether it keeps the full cache.
struct SelectorPrice {
  std::string footprint, residency, formula;
  double metadata_bytes_per_token = 0;  // per KV head, per layer
  bool evicts = false;
};
SelectorPrice selector_price(const SelectorInfo& info, std::int64_t head_dim, std::int64_t group_size,
                             std::int64_t num_kv_heads);

// Defaults taken from the global options when a spec leaves a key out.
struct SelectorDefaults {
  std::int64_t block = 64, sinks = 0, window = 0;
};

class Selector {
 public:
  Selector(const SelectorSpec& spec, const SelectorDefaults& defaults);
  virtual ~Selector() = default;

  const std::string& name() const { return spec_.name; }
  const std::string& label() const { return label_; }
  void set_label(std::string label) { label_ = std::move(label); }
  std::string spec_text() const;  // every parameter, defaults resolved
  virtual std::string description() const = 0;
  virtual SelectorInfo info() const = 0;

  std::int64_t block_size() const { return block_; }
  std::int64_t sinks() const { return sinks_; }
  std::int64_t window() const { return window_; }   // -1: window = budget (swa)
  virtual bool ranks_per_head() const = 0;          // false: one ranking per KV group
  virtual bool selects_blocks() const { return true; }
  // Whether rank() reads BlockView::max_prob: the engine fills it only in the views someone reads it from.
  virtual bool reads_block_max() const { return false; }
  // Whether rank() reads RankContext::residual_mass, the whole array (the engine builds it only for those;
  // top_by_residual is there for every selector sparse in the layer).
  virtual bool reads_residual_mass() const { return false; }
  // Whether rank() in `layer` (after begin()) ranks blocks by their largest probability, max over the KV
  // group's heads, through RankContext::top_by_group_max (and reads no other max_prob): the engine asks a
  // backend for that ranking in such layers only.
  virtual bool ranks_by_group_max(std::int64_t /*layer*/) const { return false; }
  virtual BudgetUse budget_use() const { return BudgetUse::kNested; }
  virtual LayerRole role(std::int64_t /*layer*/) const { return LayerRole::kSparse; }
  virtual void begin(const ReplayPlan& /*plan*/) {}
  // Whole-capture calibration before the replay: calibrate_layer() for every layer in order,
  // then finish_calibration(). Only when calibrates() is true.
  virtual bool calibrates() const { return false; }
  virtual void calibrate_layer(const LayerContext& /*layer*/) {}
  virtual void finish_calibration() {}
  // Once per layer, single-threaded, before any rank() of the layer. A selector that needs q/k
  // throws Error(kInput) on a dense `attn` layer (require_qk).
  virtual void prepare_layer(const LayerContext& /*layer*/) {}
  // Called for every (layer, KV group, tile) in layer order, possibly from several
  // threads for different groups/tiles of the same layer (kPerBudget: also once per budget).
  virtual void rank(const RankContext& context, Rankings& out) = 0;
  // Rows t < first_scored_position() are left out of the selector's metrics (NaN): an eviction
  // method's prompt, a calibrated method's calibration half.
  virtual std::int64_t first_scored_position() const { return 0; }
  // Which positions calibrated it, for the report ("" when it does not calibrate).
  virtual std::string calibration_note() const { return ""; }
  // Tokens per KV head and layer that the method keeps (evicting methods) or attends (the others) at
  // the last position of a capture of seq_len tokens under `budget`, forced keys excluded: the `budget`
  // (and `topk`) of its KV-accounting entry. Default: the budget's blocks at row seq_len - 1.
  virtual std::int64_t budget_tokens_at_end(const Budget& budget, std::int64_t seq_len) const {
    return budget.blocks_for_row(seq_len - 1, block_) * block_;
  }
  // State carried from one layer to the next (cross-layer selections), for checkpoints: a
  // selector with such state returns it here and takes it back in restore_state() after begin().
  virtual std::vector<std::int32_t> save_state() const { return {}; }
  virtual void restore_state(const std::vector<std::int32_t>& state);
  // Whether the spec accepts `key` (known after construction), and its resolved value ("" if none).
  bool accepts(const std::string& key) const { return known_keys_.count(key) > 0; }
  std::string resolved(const std::string& key) const;

 protected:
  // Integer parameters count tokens, blocks, layers or tables; positions and block indices are 32-bit
  // in the rankings, so no parameter may exceed kMaxSelectorInteger (products of them stay in range).
  static constexpr std::int64_t kMaxSelectorInteger = 2147483647;
  std::int64_t take_int(const std::string& key, std::int64_t fallback, std::int64_t minimum,
                        std::int64_t maximum = kMaxSelectorInteger);
  double take_double(const std::string& key, double fallback, double minimum, double maximum);
  std::string take_choice(const std::string& key, const std::set<std::string>& choices, const std::string& fallback);
  // A list of non-negative integers separated by '+' (commas separate specs): "2+13".
  std::vector<std::int64_t> take_int_list(const std::string& key, const std::string& fallback);
  std::string take_string(const std::string& key, const std::string& fallback);
  void reject_unknown_keys() const;  // call at the end of the derived constructor
  void require_qk(const LayerContext& layer) const;  // Error(kInput) on a dense attn layer
  std::int64_t block_ = 64, sinks_ = 0, window_ = 0;

 private:
  SelectorSpec spec_;
  std::map<std::string, std::string> resolved_;
  std::set<std::string> known_keys_;
  std::string label_;
};

std::unique_ptr<Selector> make_selector(const SelectorSpec& spec, const SelectorDefaults& defaults);
// Registered names, in listing order (oracles and baselines first, then the proxies).
std::vector<std::string> selector_names();
// Replaces an `all` entry by every registered selector with its defaults (Error(kUsage) if
// `all` carries parameters).
std::vector<SelectorSpec> expand_selector_specs(const std::vector<SelectorSpec>& specs);

}  // namespace hysparse
