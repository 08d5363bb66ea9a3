#pragma once
// The selector interface and registry. A selector ranks key blocks per row;
// a budget of n blocks takes the first n. Forced keys (sinks, window) come on top.
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "replay/options.hpp"

namespace hysparse {

// Exact statistics of one (layer, KV group, row tile) at one block size.
struct BlockView {
  std::int64_t block = 0, heads = 0, rows = 0, num_blocks = 0;  // num_blocks: of the tile's last row
  const std::int64_t* positions = nullptr;                      // t of each row
  std::vector<double> mass;      // [heads][rows][num_blocks]: M_b, normalised by the row's token mass
  std::vector<double> max_prob;  // [heads][rows][num_blocks]: P_b, the largest true probability in the block
  std::int64_t causal_blocks(std::int64_t r) const { return positions[r] / block + 1; }
  std::size_t at(std::int64_t h, std::int64_t r, std::int64_t b) const {
    return static_cast<std::size_t>((h * rows + r) * num_blocks + b);
  }
};

// Ranked blocks: [sets][rows][stride] with a length per (set, row).
struct Rankings {
  std::int64_t sets = 0, rows = 0, stride = 0;
  std::vector<std::int32_t> blocks, length;
  void reset(std::int64_t sets_, std::int64_t rows_, std::int64_t stride_);
  std::int32_t* row(std::int64_t set, std::int64_t r) { return &blocks[static_cast<std::size_t>((set * rows + r) * stride)]; }
  const std::int32_t* row(std::int64_t set, std::int64_t r) const {
    return &blocks[static_cast<std::size_t>((set * rows + r) * stride)];
  }
  std::int32_t& size(std::int64_t set, std::int64_t r) { return length[static_cast<std::size_t>(set * rows + r)]; }
  std::int32_t size(std::int64_t set, std::int64_t r) const { return length[static_cast<std::size_t>(set * rows + r)]; }
};

// Writes the `count` best of `num` scores into `out`: higher score first, ties to the lower index.
void rank_top(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out);

struct RankContext {
  std::int64_t layer = 0, kv_group = 0, group_size = 1;
  std::int64_t row_begin = 0;  // index of the tile's first row in the replay's query set
  std::int64_t rows = 0;
  const std::int64_t* positions = nullptr;
  const BlockView* view = nullptr;          // at the selector's block size
  const std::int64_t* ranking_length = nullptr;  // [rows]: blocks to rank (max budget, capped at the causal blocks)
  // Residual mass per head and block: the block's mass outside the selector's fixed forced keys
  // (equal to its mass for blocks they do not touch), [heads][rows][num_blocks].
  const std::vector<double>* residual_mass = nullptr;
};

struct ReplayPlan {
  const CaptureHeader* header = nullptr;
  std::vector<std::int64_t> rows;
  std::vector<Budget> budgets;
  std::string schedule;  // hysparse schedule option (may be empty)
  // Largest ranking length any row needs at block size B (for state sizing).
  std::int64_t max_ranking_length(std::int64_t block) const;
};

enum class LayerRole { kSparse, kFull };

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

  std::int64_t block_size() const { return block_; }
  std::int64_t sinks() const { return sinks_; }
  std::int64_t window() const { return window_; }   // -1: window = budget (swa)
  virtual bool ranks_per_head() const = 0;          // false: one ranking per KV group
  virtual bool selects_blocks() const { return true; }
  virtual LayerRole role(std::int64_t /*layer*/) const { return LayerRole::kSparse; }
  virtual void begin(const ReplayPlan& /*plan*/) {}
  // Called for every (layer, KV group, tile) in layer order, possibly from several
  // threads for different groups/tiles of the same layer.
  virtual void rank(const RankContext& context, Rankings& out) = 0;

 protected:
  std::int64_t take_int(const std::string& key, std::int64_t fallback, std::int64_t minimum);
  std::string take_choice(const std::string& key, const std::set<std::string>& choices, const std::string& fallback);
  void reject_unknown_keys() const;  // call at the end of the derived constructor
  std::int64_t block_ = 64, sinks_ = 0, window_ = 0;

 private:
  SelectorSpec spec_;
  std::map<std::string, std::string> resolved_;
  std::set<std::string> known_keys_;
  std::string label_;
};

std::unique_ptr<Selector> make_selector(const SelectorSpec& spec, const SelectorDefaults& defaults);
std::vector<std::string> selector_names();

}  // namespace hysparse
