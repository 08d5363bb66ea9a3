#include "replay/engine.hpp"

#include <omp.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <future>
#include <mutex>
#include <limits>
#include <cstring>
#include <numeric>
#include <system_error>
#include <type_traits>

#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "common/memory.hpp"
#include "common/portable_exp.hpp"
#include "replay/block_view.hpp"
#include "replay/gathered_sum.hpp"
#include "replay/kv_price.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// A tile holds at most this many (head, row, base block) cells, bounding per-thread memory.
constexpr std::int64_t kMaxTileCells = std::int64_t{4} << 20;
// Work items (KV group x query tile) a layer should have for the host threads to share.
constexpr std::int64_t kTargetWorkItems = 64;
constexpr std::int64_t kMinSplitTileRows = 128;
// Output-walk steps (8 bytes each, 16 with importance factors) a work item holds before they are
// evaluated (ReplayOptions::walk_steps_per_flush overrides it).
constexpr std::int64_t kWalkStepsPerFlush = std::int64_t{1} << 22;
// Dense attention rows may exceed one by rounding in the tool that wrote them.
constexpr double kDenseRowSumTolerance = 1e-3;

std::int64_t gcd(std::int64_t a, std::int64_t b) { return b == 0 ? a : gcd(b, a % b); }

// Keys forced into a row's attended set: [0, sink_end) and [window_begin, t].
struct ForcedRanges {
  std::int64_t sink_end = 0, window_begin = 0, t = 0;
  ForcedRanges(std::int64_t sinks, std::int64_t window, std::int64_t t_) : t(t_) {
    sink_end = std::min(sinks, t + 1);
    window_begin = window > 0 ? std::max<std::int64_t>(0, t - window + 1) : t + 1;
    if (window_begin <= sink_end) window_begin = sink_end;  // merge overlapping ranges
  }
  std::int64_t count() const { return sink_end + (t + 1 - window_begin); }
  // Number of forced keys in [lo, hi).
  std::int64_t count_in(std::int64_t lo, std::int64_t hi) const {
    hi = std::min(hi, t + 1);
    const std::int64_t a = std::max<std::int64_t>(0, std::min(hi, sink_end) - lo);
    const std::int64_t b = std::max<std::int64_t>(0, hi - std::max(lo, window_begin));
    return std::max<std::int64_t>(0, a) + std::max<std::int64_t>(0, b);
  }
};

// What the tile workers read of the layer beside its tensors.
struct LayerInputs {
  bool dense = false;  // attn probabilities instead of q/k
  double scale = 1.0;  // the softmax scale of the logits
};

// A row's share of a base block (what the metrics add for whole blocks of a window), from the tile's
// masses per base block where built, else from the statistics with the same formula.
class BaseShares {
 public:
  // `base_view`: a view whose blocks are the tile's, or nullptr.
  BaseShares(const StatsTile& tile, std::int64_t head_local, std::int64_t r, const BlockView* base_view) : tile_(tile) {
    if (base_view) {
      base_mass_ = &base_view->mass[base_view->at(head_local, r, 0)];
    } else {
      cell_ = tile.at(head_local, r, 0);
      lse_tokens_ = tile.lse_tokens[static_cast<std::size_t>(head_local * tile.rows + r)];
    }
  }
  // Share of base block b (0 for a block without causal keys).
  double operator()(std::int64_t b) const {
    if (base_mass_) return base_mass_[b];
    const std::size_t cell = cell_ + static_cast<std::size_t>(b);
    const double m = tile_.block_max[cell];
    return m == kNegInf ? 0.0 : static_cast<double>(tile_.block_sum[cell]) * portable_exp(m - lse_tokens_);
  }

 private:
  const StatsTile& tile_;
  const double* base_mass_ = nullptr;
  std::size_t cell_ = 0;
  double lse_tokens_ = 0;
};

// Forced keys of one (head, row): their total share, and the residual share (mass of the
// non-forced keys) of every block they touch.
struct ForcedSummary {
  double mass = 0;
  std::int64_t count = 0;
  std::vector<std::pair<std::int64_t, double>> residual;  // (block, share of its non-forced keys), few entries
};

// The pieces of a row's forced keys, in the order their shares are summed, given to `visit`:
//   visit.whole(b)             base block b lies inside a forced range: its share from the block statistics;
//   visit.run(j0, j1)          keys [j0, j1) of a base block a range cuts: their shares, key by key (a KeyRun);
//   visit.residual(b, j0, j1)  view block b (`block` keys) touched by the forced keys; its non-forced keys are
//                              [j0, j1), possibly empty, their shares summed in ascending order (a KeyRun).
// Whole base blocks take their share from the statistics, so the cost does not grow with the window; with
// --precision bf16/fp16 they carry the device's rounding of q/k, like every block the selectors rank.
template <typename Visit>
void visit_forced(const ForcedRanges& forced, std::int64_t block, std::int64_t base, Visit& visit) {
  std::int64_t last_block = -1;
  for (auto [j0, j1] : {std::pair<std::int64_t, std::int64_t>{0, forced.sink_end}, {forced.window_begin, forced.t + 1}}) {
    if (j1 <= j0) continue;
    for (std::int64_t j = j0; j < j1;) {
      const std::int64_t b = j / base, lo = b * base, hi = std::min((b + 1) * base, forced.t + 1);
      if (j == lo && hi <= j1) {
        visit.whole(b);
        j = hi;
      } else {
        const std::int64_t end = std::min(hi, j1);
        visit.run(j, end);
        j = end;
      }
    }
    // Blocks touched by this range: their non-forced keys form one run between the two ranges.
    for (std::int64_t b = j0 / block; b <= (j1 - 1) / block; ++b) {
      if (b == last_block) continue;
      last_block = b;
      const std::int64_t lo = std::max(b * block, forced.sink_end);
      const std::int64_t hi = std::min(std::min((b + 1) * block, forced.t + 1), forced.window_begin);
      visit.residual(b, lo, std::max(lo, hi));
    }
  }
}

// Everything one selector needs at one block size, per layer tile.
struct SelectorPlan {
  Selector* selector = nullptr;
  std::int64_t view_index = 0;       // which BlockView
  std::int64_t reference_config = 0; // fixed forced config (oracle reference, residual scores)
  bool budget_window = false;        // swa without a fixed window
  BudgetUse budget_use = BudgetUse::kNested;
  std::int64_t first_scored = 0;     // rows before this position are not scored
  std::vector<char> applicable;      // [budget]: the budget holds at least one of the selector's blocks
};

// The top blocks of every (head, row) of a tile by one score array, ranked once and shared by the
// selectors that compare with them (the prefix of a longer ranking is the shorter one).
struct SharedRanking {
  std::int64_t rows = 0, stride = 0;
  // Ranked beyond what is asked, so that a later, slightly longer request is served as well (the
  // residual rankings ask for as many more blocks as their forced keys touch).
  std::int64_t slack = 0;
  std::vector<std::int32_t> order;   // [heads][rows][stride]
  std::vector<std::int64_t> length;  // [heads][rows]: ranked so far (-1: not yet)
  void reset(std::int64_t heads, std::int64_t rows_, std::int64_t num_blocks, std::int64_t slack_ = 0) {
    rows = rows_;
    stride = num_blocks;
    slack = slack_;
    order.resize(static_cast<std::size_t>(heads * rows * stride));
    length.assign(static_cast<std::size_t>(heads * rows), -1);
  }
  // Takes a backend's ranking of the tile's rows ([sets][rows][ranked]: StatsTile::mass_order, or
  // group_max_order with one set) of `view`'s blocks: rows with fewer ranked blocks than a later request
  // are ranked again here.
  void adopt(const std::vector<std::int32_t>& ranking, std::int64_t ranked, std::int64_t sets, const BlockView& view) {
    if (ranking.size() != static_cast<std::size_t>(sets * rows * ranked) || ranked > stride) {
      throw Error(ErrorKind::kInternal, fmt::format("backend ranking of {} entries for {} sets x {} rows x {} blocks",
                                                    ranking.size(), sets, rows, ranked));
    }
    for (std::int64_t h = 0; h < sets; ++h) {
      for (std::int64_t r = 0; r < rows; ++r) {
        const auto cell = static_cast<std::size_t>(h * rows + r);
        const std::int64_t n = std::min(ranked, view.causal_blocks(r));
        const std::int32_t* from = &ranking[cell * static_cast<std::size_t>(ranked)];
        std::int32_t* to = &order[cell * static_cast<std::size_t>(stride)];
        for (std::int64_t i = 0; i < n; ++i) {
          if (from[i] < 0 || from[i] >= view.causal_blocks(r)) {
            throw Error(ErrorKind::kInternal, fmt::format("backend ranking names block {} of a row of {}", from[i], view.causal_blocks(r)));
          }
          to[i] = from[i];
        }
        length[cell] = n;
      }
    }
  }
  // The first `longest` blocks of (h, r) by score(b), b < causal.
  template <typename Score>
  const std::int32_t* top(std::int64_t h, std::int64_t r, std::int64_t causal, std::int64_t longest, Score score,
                          std::vector<double>& scratch) {
    const auto cell = static_cast<std::size_t>(h * rows + r);
    std::int32_t* out = &order[cell * static_cast<std::size_t>(stride)];
    if (length[cell] < longest) {
      scratch.resize(static_cast<std::size_t>(causal));
      for (std::int64_t b = 0; b < causal; ++b) scratch[static_cast<std::size_t>(b)] = score(b);
      const std::int64_t ranked = std::min(causal, longest + slack);
      rank_top(scratch.data(), causal, ranked, out);
      length[cell] = ranked;
    }
    return out;
  }
};

struct ForcedConfig {
  std::int64_t view, sinks, window;
};

// A budget window's cut base block: *target = the run's sum, or with complement_block >= 0 that block's share
// less the run's sum.
struct PartialRun {
  double* target;
  std::int64_t complement_block;
  std::int64_t head, row;
};

// Per-thread scratch, reused across tiles.
struct Workspace {
  StatsTile tile;
  std::vector<BlockView> views;
  std::vector<double> block_exps;  // scratch of build_block_view
  // Per fixed forced config, [heads][rows][num_blocks]: the residual mass of every block, for selectors that
  // read it whole (RankContext::residual_mass). A config without forced keys reads its view's mass; the
  // others patch a copy of it (residual_storage) where a selector reads it, else none (null).
  std::vector<const std::vector<double>*> residual_mass;
  std::vector<std::vector<double>> residual_storage;
  std::vector<std::vector<ForcedSummary>> summaries;  // per fixed forced config: [heads][rows] of the tile
  std::vector<KeyRun> key_runs;                        // the tile's runs of keys summed one by one (forced, cut)
  std::vector<double> key_run_sums;
  std::vector<std::vector<double>> window_partials;    // per budget-window selector: [heads][rows][budgets]
  std::vector<PartialRun> partial_runs;                // the last of key_runs: budget windows' cut blocks
  std::vector<std::vector<Rankings>> rankings;   // per selector: one, or one per budget (kPerBudget)
  std::vector<std::int32_t> stamp;
  std::vector<double> scores;
  std::vector<SharedRanking> oracle_rankings;  // per fixed forced config with forced keys: by residual mass
  std::vector<SharedRanking> mass_rankings;    // per view: by mass
  std::vector<SharedRanking> group_rankings;   // per view that wants it: by max over the group's heads of max_prob
  // The first `count` blocks of row r of `view` (view index v) by max over heads of max_prob, ranked once.
  const std::int32_t* top_by_group_max(const BlockView& view, std::size_t v, std::int64_t r, std::int64_t count) {
    auto group_max = [&](std::int64_t b) {
      double best = 0.0;  // probabilities are >= 0
      for (std::int64_t h = 0; h < view.heads; ++h) best = std::max(best, view.max_prob[view.at(h, r, b)]);
      return best;
    };
    SharedRanking& ranking = group_rankings[v];
    if (view.max_prob.empty() && ranking.length[static_cast<std::size_t>(r)] < count) {
      throw Error(ErrorKind::kInternal, fmt::format("a group ranking of {} blocks asked of a row the backend ranked {} of",
                                                    count, ranking.length[static_cast<std::size_t>(r)]));
    }
    return ranking.top(0, r, view.causal_blocks(r), count, group_max, scores);
  }
  std::vector<std::pair<double, std::int64_t>> touched;  // scratch of top_by_residual
  // The first `longest` blocks of (h, r) of `view` (config c's) by config c's residual mass. Its
  // forced keys touch the few blocks of `forced.residual`; every other block's residual is its mass.
  // So the ranking is the ranking by mass without the touched blocks (ranked once, shared), merged
  // with the touched blocks ranked by residual: rank_top's order, with no sort of the row.
  const std::int32_t* top_by_residual(const ForcedConfig& config, std::size_t c, const BlockView& view, std::int64_t h,
                                      std::int64_t r, std::int64_t longest, const ForcedSummary& forced) {
    const std::int64_t causal = view.causal_blocks(r);
    auto mass = [&](std::int64_t b) { return view.mass[view.at(h, r, b)]; };
    SharedRanking& by_mass = mass_rankings[static_cast<std::size_t>(config.view)];
    if (config.sinks == 0 && config.window == 0) return by_mass.top(h, r, causal, longest, mass, scores);
    SharedRanking& ranking = oracle_rankings[c];
    const auto cell = static_cast<std::size_t>(h * ranking.rows + r);
    std::int32_t* out = &ranking.order[cell * static_cast<std::size_t>(ranking.stride)];
    if (ranking.length[cell] >= longest) return out;
    touched.clear();
    for (const auto& [b, residual] : forced.residual) touched.emplace_back(residual, b);
    // Higher score first, ties to the lower block (rank_top's rule).
    auto better = [](double score_a, std::int64_t a, double score_b, std::int64_t b) {
      return score_a > score_b || (score_a == score_b && a < b);
    };
    std::sort(touched.begin(), touched.end(), [&](const auto& x, const auto& y) { return better(x.first, x.second, y.first, y.second); });
    const std::int64_t base_length = std::min(causal, longest + static_cast<std::int64_t>(touched.size()));
    const std::int32_t* base = by_mass.top(h, r, causal, base_length, mass, scores);
    auto is_touched = [&](std::int64_t b) {
      for (const auto& entry : touched) {
        if (entry.second == b) return true;
      }
      return false;
    };
    std::int64_t i = 0, n = 0;
    std::size_t j = 0;
    while (n < longest) {
      while (i < base_length && is_touched(base[i])) ++i;
      const bool from_base =
          i < base_length && (j == touched.size() || better(mass(base[i]), base[i], touched[j].first, touched[j].second));
      if (!from_base && j == touched.size()) break;  // cannot happen: the two lists hold every causal block
      out[n++] = static_cast<std::int32_t>(from_base ? base[i++] : touched[j++].second);
    }
    ranking.length[cell] = longest;
    return out;
  }
  std::vector<std::int32_t> reuse_ranking;
  // sum.add over a row of residual masses: the row's masses with the blocks the forced keys touch read as
  // their residuals, written into the row for the call and restored after it (no copy of the tile's masses).
  std::vector<double> patched_masses;
  void add_residual(GatheredSum& sum, double* row_mass, const ForcedSummary& forced, const std::int32_t* index,
                    std::int64_t from, std::int64_t to) {
    patched_masses.resize(forced.residual.size());
    for (std::size_t i = 0; i < forced.residual.size(); ++i) {
      const auto b = static_cast<std::size_t>(forced.residual[i].first);
      patched_masses[i] = row_mass[b];
      row_mass[b] = forced.residual[i].second;
    }
    sum.add(row_mass, index, from, to);
    for (std::size_t i = forced.residual.size(); i-- > 0;) row_mass[static_cast<std::size_t>(forced.residual[i].first)] = patched_masses[i];
  }
  // The tile's output-error walks, evaluated by the backend after its metrics: the error of
  // checkpoint i goes to *error_targets[i].
  OutputWalks walks;
  std::vector<double*> error_targets;
  std::vector<double> errors;
};

// Per-row metric values of one layer: [metric][selector][budget][head][row].
class RowMetrics {
 public:
  void reset(std::int64_t selectors, std::int64_t budgets, std::int64_t heads, std::int64_t rows) {
    s_ = selectors;
    b_ = budgets;
    h_ = heads;
    r_ = rows;
    const std::int64_t cells = s_ * b_ * h_ * r_;
    for (auto& values : values_) values.resize(static_cast<std::size_t>(cells));
    saturated_.resize(static_cast<std::size_t>(cells));
    // Hundreds of megabytes a layer at long contexts, cleared by every thread.
    constexpr std::int64_t kChunk = std::int64_t{1} << 16;
#pragma omp parallel for schedule(static)
    for (std::int64_t begin = 0; begin < cells; begin += kChunk) {
      const auto from = static_cast<std::size_t>(begin), to = static_cast<std::size_t>(std::min(cells, begin + kChunk));
      for (auto& values : values_) std::fill(values.begin() + static_cast<std::ptrdiff_t>(from), values.begin() + static_cast<std::ptrdiff_t>(to), kNaN);
      std::fill(saturated_.begin() + static_cast<std::ptrdiff_t>(from), saturated_.begin() + static_cast<std::ptrdiff_t>(to), char{0});
    }
  }
  double& at(int metric, std::int64_t s, std::int64_t b, std::int64_t h, std::int64_t r) {
    return values_[metric][index(s, b, h, r)];
  }
  const double* head_row(int metric, std::int64_t s, std::int64_t b, std::int64_t h) const {
    return &values_[metric][index(s, b, h, 0)];
  }
  char& saturated(std::int64_t s, std::int64_t b, std::int64_t h, std::int64_t r) { return saturated_[index(s, b, h, r)]; }

 private:
  std::size_t index(std::int64_t s, std::int64_t b, std::int64_t h, std::int64_t r) const {
    return static_cast<std::size_t>(((s * b_ + b) * h_ + h) * r_ + r);
  }
  std::int64_t s_ = 0, b_ = 0, h_ = 0, r_ = 0;
  std::vector<double> values_[kNumMetrics];
  std::vector<char> saturated_;
};

double nearest_rank(std::vector<double>& values, double q) {
  if (values.empty()) return kNaN;
  const auto n = static_cast<std::int64_t>(values.size());
  const std::int64_t rank = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(q * static_cast<double>(n))));
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.end());
  return values[static_cast<std::size_t>(rank - 1)];
}

double mean_of(const double* values, std::int64_t n) {
  double sum = 0.0;
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isnan(values[i])) {
      sum += values[i];
      ++count;
    }
  }
  return count ? sum / static_cast<double>(count) : kNaN;
}

// Names a layer's tensors for the backend's key cache: never reused in this process (addresses are).
std::uint64_t next_tensors_id() {
  static std::atomic<std::uint64_t> last{0};
  return ++last;
}

}  // namespace

std::mutex& capture_io_mutex() {
  static std::mutex mutex;
  return mutex;
}

void RecallHistogram::add(double v) {
  const auto bin = std::clamp<std::int64_t>(static_cast<std::int64_t>(v * kModelHistogramBins), 0, kModelHistogramBins - 1);
  ++histogram[static_cast<std::size_t>(bin)];
  min = std::min(min, v);
  ++rows;
}

void RecallHistogram::merge(const RecallHistogram& other) {
  for (std::size_t i = 0; i < histogram.size(); ++i) histogram[i] += other.histogram[i];
  min = std::min(min, other.min);
  rows += other.rows;
}

double RecallHistogram::quantile(double q) const {
  if (rows == 0) return kNaN;
  const auto rank = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(q * static_cast<double>(rows))));
  std::int64_t seen = 0;
  for (int bin = 0; bin < kModelHistogramBins; ++bin) {
    seen += histogram[static_cast<std::size_t>(bin)];
    if (seen >= rank) return std::min(1.0, (bin + 0.5) / kModelHistogramBins);
  }
  return kNaN;
}

double RecallHistogram::minimum() const { return rows ? min : kNaN; }

void ModelSums::merge(const ModelSums& other) {
  for (int part = 0; part < 2; ++part) {
    for (int m = 0; m < kNumMetrics; ++m) {
      sum[part][m] += other.sum[part][m];
      count[part][m] += other.count[part][m];
    }
    recall[part].merge(other.recall[part]);
  }
}

// The model aggregates of one selector from its sums, per budget.
void fill_model_tables(SelectorResult& out, const ModelSums* sums, std::int64_t budgets) {
  for (std::int64_t bi = 0; bi < budgets; ++bi) {
    const auto ub = static_cast<std::uint64_t>(bi);
    const ModelSums& acc = sums[bi];
    for (int m = 0; m < kNumMetrics; ++m) {
      out.model_mean[m].values[ub] = acc.count[0][m] ? acc.sum[0][m] / static_cast<double>(acc.count[0][m]) : kNaN;
      out.model_sparse_mean[m].values[ub] = acc.count[1][m] ? acc.sum[1][m] / static_cast<double>(acc.count[1][m]) : kNaN;
    }
    out.model_recall_min.values[ub] = acc.recall[0].minimum();
    out.model_recall_p10.values[ub] = acc.recall[0].quantile(0.10);
    out.model_recall_p50.values[ub] = acc.recall[0].quantile(0.50);
    out.model_sparse_recall_min.values[ub] = acc.recall[1].minimum();
    out.model_sparse_recall_p10.values[ub] = acc.recall[1].quantile(0.10);
    out.model_sparse_recall_p50.values[ub] = acc.recall[1].quantile(0.50);
  }
}

void Table::reset(std::vector<std::uint64_t> d, double fill) {
  dims = std::move(d);
  std::uint64_t n = 1;
  for (auto x : dims) n *= x;
  values.assign(n, fill);
}

const char* metric_name(int metric) {
  static const char* names[] = {"mass_recall", "recall_vs_oracle", "topk_overlap", "attended_keys", "budget_keys",
                                "output_rel_error"};
  return names[metric];
}
const char* metric_units(int metric) {
  static const char* units[] = {"1", "1", "1", "keys", "keys", "1"};
  return units[metric];
}
const char* metric_long_name(int metric) {
  static const char* names[] = {
      "share of the row's token attention mass inside the attended set",
      "mass recall divided by the per-head oracle's at the same block size, budget and forced keys",
      "share of the keys of the layer's own top-n blocks (by mass) that the attended set contains",
      "keys in the attended set (selected blocks' causal keys and forced keys, counted once)",
      "nominal budget in keys (selected blocks x block size; window + sinks for a fixed window)",
      "||o_A - o|| / ||o||, the relative error of the output renormalised over the attended set"};
  return names[metric];
}

namespace {
// A fixed forced configuration (block view, sinks, window): residual scores and oracle references.
// Checkpoints: a flat little-endian byte stream of counts and arrays (same machine and build).
constexpr char kCheckpointMagic[8] = {'H', 'Y', 'S', 'P', 'C', 'K', 'P', '2'};

class ByteWriter {
 public:
  template <class T>
  void put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const std::uint8_t*>(&value);
    bytes_.insert(bytes_.end(), p, p + sizeof(T));
  }
  template <class T>
  void put_vector(const std::vector<T>& values) {
    put(static_cast<std::uint64_t>(values.size()));
    if (values.empty()) return;
    const auto* p = reinterpret_cast<const std::uint8_t*>(values.data());
    bytes_.insert(bytes_.end(), p, p + values.size() * sizeof(T));
  }
  void put_string(const std::string& text) { put_vector(std::vector<char>(text.begin(), text.end())); }
  std::vector<std::uint8_t> take() { return std::move(bytes_); }

 private:
  std::vector<std::uint8_t> bytes_;
};

class ByteReader {
 public:
  explicit ByteReader(const std::vector<std::uint8_t>& bytes) : bytes_(bytes) {}
  template <class T>
  T get() {
    T value;
    take(&value, sizeof(T));
    return value;
  }
  template <class T>
  std::vector<T> get_vector() {
    const auto n = get<std::uint64_t>();
    if (n > (bytes_.size() - offset_) / sizeof(T)) corrupt();
    std::vector<T> values(static_cast<std::size_t>(n));
    take(values.data(), values.size() * sizeof(T));
    return values;
  }
  // Into an existing vector whose size the configuration fixes.
  template <class T>
  void get_into(std::vector<T>& values) {
    std::vector<T> read = get_vector<T>();
    if (read.size() != values.size()) corrupt();
    values = std::move(read);
  }
  std::string get_string() {
    const auto chars = get_vector<char>();
    return std::string(chars.begin(), chars.end());
  }
  bool at_end() const { return offset_ == bytes_.size(); }
  [[noreturn]] static void corrupt() {
    fail(ErrorKind::kInput, "replay checkpoint does not match this capture and configuration (or is damaged)");
  }

 private:
  void take(void* out, std::size_t n) {
    if (n == 0) return;  // an empty vector's data() may be null: no memcpy
    if (n > bytes_.size() - offset_) corrupt();
    std::memcpy(out, bytes_.data() + offset_, n);
    offset_ += n;
  }
  const std::vector<std::uint8_t>& bytes_;
  std::size_t offset_ = 0;
};

// Every per-layer table of a selector's result, in a fixed order (model tables are derived).
std::vector<Table*> layer_tables(SelectorResult& out) {
  std::vector<Table*> tables;
  for (int m = 0; m < kNumMetrics; ++m) tables.push_back(&out.head_mean[m]);
  for (int m = 0; m < kNumMetrics; ++m) tables.push_back(&out.layer_mean[m]);
  for (Table* t : {&out.head_recall_p10, &out.head_recall_p50, &out.head_recall_min, &out.layer_recall_p10,
                   &out.layer_recall_p50, &out.layer_recall_min, &out.saturated_rows}) {
    tables.push_back(t);
  }
  return tables;
}
}  // namespace

CaptureReader open_capture_locked(const std::string& path) {
  std::lock_guard<std::mutex> lock(capture_io_mutex());
  return CaptureReader::open(path);
}

LayerTensors read_layer_locked(const CaptureReader& reader, std::int64_t layer, bool with_v) {
  std::lock_guard<std::mutex> lock(capture_io_mutex());
  return reader.read_layer(layer, with_v);
}

// Everything a replay holds between layers. Layers run in order; after any layer the state can be
// written to a checkpoint and a later run restored from it continues with identical numbers.
struct ReplayRun::Impl {
  Impl(const std::string& capture_path_, const ReplayOptions& options_, const Backend& backend_, bool progress_)
      : capture_path(capture_path_),
        options(options_),
        backend(backend_),
        progress(progress_),
        reader(std::make_unique<CaptureReader>(open_capture_locked(capture_path_))),
        header(reader->header()),
        L(header.num_layers),
        Hq(header.num_q_heads),
        Hkv(header.num_kv_heads),
        G(header.group_size()) {
    setup();
  }
  // libhdf5 calls happen under capture_io_mutex(), closing the file included; a read of the next
  // layer still running takes that lock, so it finishes first.
  ~Impl() {
    if (prefetch.valid()) prefetch.wait();
    std::lock_guard<std::mutex> lock(capture_io_mutex());
    reader.reset();
  }
  void setup();
  void calibrate();
  void run_layer(std::int64_t layer);
  void fill_model(ReplayResult& target) const;
  // The layer's tensors: read while the previous layer ran when it was prefetched, else now.
  const LayerTensors& take_layer(std::int64_t layer, bool with_v);
  // Starts reading `layer` on a thread of its own (when it exists and two layers fit in memory),
  // then has the backend copy its keys to the device (Backend::prepare_keys).
  void start_prefetch(std::int64_t layer);
  void prepare_keys(std::int64_t layer, const LayerTensors& tensors, std::uint64_t tensors_id) const;
  bool wants_output(std::int64_t layer) const;

  std::string capture_path;
  ReplayOptions options;
  const Backend& backend;
  bool progress = false;
  std::unique_ptr<CaptureReader> reader;
  const CaptureHeader& header;
  std::int64_t L = 0, Hq = 0, Hkv = 0, G = 0;
  ReplayResult result;
  const std::vector<std::int64_t>& rows = result.rows;
  std::int64_t R = 0, NB = 0, S = 0;
  std::vector<std::unique_ptr<Selector>> selectors;
  bool reuse_enabled = false;
  std::vector<std::int64_t> block_sizes;  // every selector's, and the reuse matrix's; statistics at their gcd
  std::vector<ForcedConfig> configs;
  std::vector<std::int64_t> touched_blocks;  // per view: see setup()
  std::vector<SelectorPlan> plans;
  std::int64_t reuse_view = -1, base_block = 0, reuse_count = 0, tile_rows = 1, tiles = 0;
  std::int64_t base_view_index = -1;            // the view whose blocks are the tile's (-1: none)
  std::vector<char> view_needs_max;             // per view: whether a reader needs BlockView::max_prob
  // Per view, per tile: StatsRequest::group_rank_blocks where the reuse matrix or a selector ranks the view's
  // blocks by their largest probability over a KV group's heads in some layer (empty: none does).
  std::vector<std::vector<std::int64_t>> view_group_rank_blocks;
  // This layer's: per view, whether its group ranking is read (shared per tile: Workspace::top_by_group_max;
  // max_prob is filled for it only where the backend did not rank it); the view the backend is asked for.
  std::vector<char> layer_wants_group;
  // [config]: the fixed forced configurations whose residuals this layer reads (of selectors sparse in it).
  std::vector<char> layer_wants_config;
  // [config]: whether a selector of the configuration reads its whole residual array (reads_residual_mass);
  // the metrics read residuals through the view's masses, patched for the call (Workspace::add_residual).
  std::vector<char> config_keeps_residual;
  std::int64_t group_view = -1;
  // Per view a selector reads, per tile: StatsRequest::rank_blocks when the backend ranks that view.
  std::vector<std::vector<std::int64_t>> view_rank_blocks;
  std::int64_t walk_steps_per_flush = kWalkStepsPerFlush;
  ReplayPlan replay_plan;
  LayerInputs inputs;
  std::vector<ModelSums> model;
  std::vector<std::int32_t> reuse_store, reuse_length;
  std::vector<double> reuse_item_sums;  // [work item][source layer], one layer's
  std::vector<Workspace> workspaces;
  RowMetrics metrics;
  LayerContext layer_context;
  bool calibrated = false;
  std::vector<std::string> calibration_notes;  // per selector, once calibrated (or restored)
  std::int64_t next_layer = 0;
  // Layer l is read into layer_buffers[l % 2]; the next layer is read into the other buffer while
  // a layer runs.
  LayerTensors layer_buffers[2];
  // What each buffer holds, named for the backend (StatsRequest::tensors_id): a new id per read.
  std::uint64_t layer_ids[2] = {0, 0};
  std::future<void> prefetch;
  std::int64_t prefetch_layer = -1;
};

bool ReplayRun::Impl::wants_output(std::int64_t layer) const {
  const LayerInfo& info = reader->layer(layer);
  return result.has_output_error && info.has_v && info.has_qk();
}

const LayerTensors& ReplayRun::Impl::take_layer(std::int64_t layer, bool with_v) {
  LayerTensors& buffer = layer_buffers[static_cast<std::size_t>(layer % 2)];
  if (prefetch.valid()) {
    const bool hit = prefetch_layer == layer;
    try {
      prefetch.get();  // rethrows what the read threw: bad values end the run
      if (hit) return buffer;
    } catch (const std::bad_alloc&) {
      // Memory ran short while the previous layer held its peak: read again below, now.
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::kResource) throw;
    }
  }
  // Read now, with the previous layer's buffer given back first: one layer in memory, as when the
  // next-layer read is skipped for lack of room.
  layer_buffers[static_cast<std::size_t>((layer + 1) % 2)] = LayerTensors();
  layer_ids[static_cast<std::size_t>(layer % 2)] = next_tensors_id();
  std::lock_guard<std::mutex> lock(capture_io_mutex());
  reader->read_layer_into(layer, with_v, buffer);
  return buffer;
}

void ReplayRun::Impl::prepare_keys(std::int64_t layer, const LayerTensors& tensors, std::uint64_t tensors_id) const {
  if (!reader->layer(layer).has_qk() || rows.empty()) return;
  for (std::int64_t g = 0; g < Hkv; ++g) {
    StatsRequest request;
    request.heads = G;
    request.seq_len = header.seq_len;
    request.head_dim = header.head_dim;
    request.rows = rows.data();
    request.num_rows = R;
    request.block_size = base_block;
    request.layer = layer;
    request.kv_head = g;
    request.tensors_id = tensors_id;
    request.k = tensors.k.data() + g * header.seq_len * header.head_dim;
    if (!tensors.v.empty()) request.v = tensors.v.data() + g * header.seq_len * header.head_dim;
    try {
      backend.prepare_keys(request);
    } catch (const std::exception&) {
      // A hint only: keys that could not be copied now are copied by the first request that needs them,
      // which reports any error. The other KV heads (perhaps on other devices) are still tried.
    }
  }
}

void ReplayRun::Impl::start_prefetch(std::int64_t layer) {
  if (layer >= L) return;
  const bool with_v = wants_output(layer);
  // Overlapping costs a second layer of memory (once: the two buffers alternate). Without room for
  // it and the margin of a third, the next layer is read when it is needed, into memory given back.
  LayerTensors& buffer = layer_buffers[static_cast<std::size_t>(layer % 2)];
  const std::uint64_t shortfall = reader->layer_shortfall_bytes(layer, with_v, buffer);
  if (shortfall > 0 && shortfall + reader->layer_bytes(layer, with_v) > available_memory_bytes()) return;
  // A new thread starts with the default OpenMP team size: give it the replay's (--threads, a sweep
  // worker's share).
  const int threads = omp_get_max_threads();
  const std::uint64_t tensors_id = next_tensors_id();
  layer_ids[static_cast<std::size_t>(layer % 2)] = tensors_id;
  try {
    prefetch = std::async(std::launch::async, [this, layer, with_v, threads, tensors_id, &buffer] {
      omp_set_num_threads(threads);
      {
        std::lock_guard<std::mutex> lock(capture_io_mutex());
        reader->read_layer_into(layer, with_v, buffer);
      }
      prepare_keys(layer, buffer, tensors_id);
    });
    prefetch_layer = layer;
  } catch (const std::system_error&) {
    prefetch_layer = -1;  // no thread to be had: the layer is read when it is needed
  }
}

void ReplayRun::Impl::setup() {
  result.header = header;
  result.capture_path = capture_path;
  result.backend = backend.name();
  result.device = backend.device();
  result.rows = select_query_rows(options.queries, header.seq_len, options.seed);
  result.budgets = options.budgets;
  R = static_cast<std::int64_t>(rows.size());
  NB = static_cast<std::int64_t>(options.budgets.size());
  if (NB == 0) fail(ErrorKind::kUsage, "no budgets: give --budget or --sparsity");
  // The metric walk adds blocks budget after budget: budgets must ascend (tokens up, sparsity down).
  for (std::int64_t b = 1; b < NB; ++b) {
    const Budget& x = options.budgets[static_cast<std::size_t>(b - 1)];
    const Budget& y = options.budgets[static_cast<std::size_t>(b)];
    const bool ascending = x.kind == y.kind && (x.kind == Budget::Kind::kTokens ? x.value < y.value : x.value > y.value);
    if (!ascending) fail(ErrorKind::kInternal, "replay: budgets {} and {} are not in ascending order", x.label(), y.label());
  }
  if (options.selectors.empty()) fail(ErrorKind::kUsage, "no selectors: give --selectors");
  if (options.block_size < 1) fail(ErrorKind::kUsage, "--block must be >= 1");
  if (options.sinks < 0 || options.window < 0) fail(ErrorKind::kUsage, "--sinks and --window must be >= 0");

  // Selectors, with unique labels (`all` expands to every registered selector).
  const std::vector<SelectorSpec> specs = expand_selector_specs(options.selectors);
  const SelectorDefaults defaults{options.block_size, options.sinks, options.window};
  // Labels name report groups: the selector's name, or its spec as written when the name repeats.
  std::vector<std::string> labels;
  for (const auto& spec : specs) {
    selectors.push_back(make_selector(spec, defaults));
    const auto repeats = std::count_if(specs.begin(), specs.end(),
                                       [&](const SelectorSpec& other) { return other.name == spec.name; });
    std::string label = repeats > 1 ? spec.text() : spec.name;
    const auto same = std::count(labels.begin(), labels.end(), label);
    if (same > 0) label += "_" + std::to_string(same + 1);
    labels.push_back(label);
    selectors.back()->set_label(label);
  }
  S = static_cast<std::int64_t>(selectors.size());
  reuse_enabled = options.reuse_budget > 0 && L > 0;
  if (reuse_enabled && options.reuse_budget < options.block_size) {
    fail(ErrorKind::kUsage, "--reuse-budget {} is smaller than one block ({})", options.reuse_budget, options.block_size);
  }

  // Block sizes: every selector's, and the reuse matrix's; statistics at their gcd.
  auto view_of = [&](std::int64_t block) {
    const auto found = std::find(block_sizes.begin(), block_sizes.end(), block);
    if (found != block_sizes.end()) return static_cast<std::int64_t>(found - block_sizes.begin());
    block_sizes.push_back(block);
    return static_cast<std::int64_t>(block_sizes.size() - 1);
  };
  // Fixed forced configurations (block view, sinks, window): residual scores and oracle references.
  auto config_of = [&](std::int64_t view, std::int64_t sinks, std::int64_t window) {
    for (std::size_t i = 0; i < configs.size(); ++i) {
      if (configs[i].view == view && configs[i].sinks == sinks && configs[i].window == window) return static_cast<std::int64_t>(i);
    }
    configs.push_back({view, sinks, window});
    return static_cast<std::int64_t>(configs.size() - 1);
  };
  for (const auto& sel : selectors) {
    SelectorPlan plan;
    plan.selector = sel.get();
    plan.view_index = view_of(sel->block_size());
    plan.budget_window = sel->window() < 0;
    plan.reference_config = config_of(plan.view_index, sel->sinks(), std::max<std::int64_t>(0, sel->window()));
    plan.budget_use = sel->budget_use();
    // A token budget below one block selects nothing: that budget's metrics are NaN for the selector
    // (budget-free selectors do not use the budget).
    std::vector<std::string> skipped;
    for (const auto& budget : options.budgets) {
      const bool below = budget.kind == Budget::Kind::kTokens && budget.value < static_cast<double>(sel->block_size()) &&
                         plan.budget_use != BudgetUse::kFree;
      plan.applicable.push_back(below ? 0 : 1);
      if (below) skipped.push_back(budget.label());
    }
    if (!skipped.empty() && progress) {
      fmt::print(stderr, "replay: {} (block {}): budget{} {} below one block, reported as NaN\n", sel->label(),
                 sel->block_size(), skipped.size() > 1 ? "s" : "", fmt::join(skipped, ", "));
    }
    plans.push_back(plan);
  }
  reuse_view = reuse_enabled ? view_of(options.block_size) : -1;
  // Block maxima cost a second pass over every view's cells; only the selectors that read them do (the
  // rankings by group fill them where no backend ranked: run_layer).
  view_needs_max.assign(block_sizes.size(), 0);
  for (const SelectorPlan& plan : plans) {
    if (plan.selector->reads_block_max()) view_needs_max[static_cast<std::size_t>(plan.view_index)] = 1;
  }
  for (auto b : block_sizes) base_block = gcd(base_block, b);

  replay_plan.header = &header;
  replay_plan.rows = rows;
  replay_plan.budgets = options.budgets;
  replay_plan.schedule = options.schedule;
  replay_plan.seed = options.seed;
  for (auto& sel : selectors) sel->begin(replay_plan);
  for (std::size_t s = 0; s < selectors.size(); ++s) plans[s].first_scored = selectors[s]->first_scored_position();

  inputs.scale = header.effective_softmax_scale();
  bool any_v = false;
  for (std::int64_t l = 0; l < L; ++l) any_v = any_v || reader->layer(l).has_v;
  result.has_output_error = options.output_error && any_v;

  // Memory: per-row metrics of one layer, reuse rankings of every layer, one layer of tensors (a
  // second only where it fits: start_prefetch).
  reuse_count = reuse_enabled ? options.reuse_budget / options.block_size : 0;
  const std::uint64_t row_metric_bytes =
      checked_mul(static_cast<std::uint64_t>(S * NB * Hq), static_cast<std::uint64_t>(R) * (kNumMetrics * 8 + 1), "metric storage");
  const std::uint64_t reuse_bytes = static_cast<std::uint64_t>(L * Hkv * R * std::max<std::int64_t>(reuse_count, 0)) * 4;
  require_memory(row_metric_bytes + reuse_bytes + reader->layer_bytes(0, result.has_output_error),
                 fmt::format("replay of {} ({} query rows)", capture_path, R));

  // Results.
  result.selectors.resize(static_cast<std::size_t>(S));
  for (std::int64_t s = 0; s < S; ++s) {
    SelectorResult& out = result.selectors[static_cast<std::size_t>(s)];
    const Selector& sel = *selectors[static_cast<std::size_t>(s)];
    out.label = sel.label();
    out.spec = sel.spec_text();
    out.description = sel.description();
    out.block = sel.block_size();
    out.sinks = sel.sinks();
    out.window = sel.window();
    out.shared_by_group = !sel.ranks_per_head();
    out.info = sel.info();
    out.budget_use = sel.budget_use();
    out.first_scored = sel.first_scored_position();
    for (std::int64_t l = 0; l < L; ++l) out.is_full_layer.push_back(sel.role(l) == LayerRole::kFull ? 1 : 0);
    const auto nb = static_cast<std::uint64_t>(NB), nl = static_cast<std::uint64_t>(L), nh = static_cast<std::uint64_t>(Hq);
    for (int m = 0; m < kNumMetrics; ++m) {
      out.head_mean[m].reset({nb, nl, nh}, kNaN);
      out.layer_mean[m].reset({nb, nl}, kNaN);
      out.model_mean[m].reset({nb}, kNaN);
      out.model_sparse_mean[m].reset({nb}, kNaN);
    }
    for (Table* t : {&out.head_recall_p10, &out.head_recall_p50, &out.head_recall_min}) t->reset({nb, nl, nh}, kNaN);
    for (Table* t : {&out.layer_recall_p10, &out.layer_recall_p50, &out.layer_recall_min, &out.saturated_rows}) {
      t->reset({nb, nl}, kNaN);
    }
    for (Table* t : {&out.model_recall_p10, &out.model_recall_p50, &out.model_recall_min, &out.model_sparse_recall_p10,
                     &out.model_sparse_recall_p50, &out.model_sparse_recall_min}) {
      t->reset({nb}, kNaN);
    }
  }
  model.resize(static_cast<std::size_t>(S * NB));
  if (reuse_enabled) {
    result.reuse_budget = options.reuse_budget;
    result.reuse_block = options.block_size;
    result.reuse.reset({static_cast<std::uint64_t>(L), static_cast<std::uint64_t>(L)}, kNaN);
  }
  reuse_store.assign(static_cast<std::size_t>(L * Hkv * R * std::max<std::int64_t>(reuse_count, 1)), 0);
  reuse_length.assign(static_cast<std::size_t>(L * Hkv * R), 0);

  config_keeps_residual.assign(configs.size(), 0);
  for (const SelectorPlan& plan : plans) {
    if (plan.selector->reads_residual_mass()) config_keeps_residual[static_cast<std::size_t>(plan.reference_config)] = 1;
  }
  // Blocks a configuration's forced keys can touch per row ([0, sinks) and a window starting anywhere),
  // the most over each view's configurations: how much longer its ranking by mass is made.
  touched_blocks.assign(block_sizes.size(), 0);
  for (const ForcedConfig& config : configs) {
    if (config.sinks == 0 && config.window == 0) continue;
    const std::int64_t B = block_sizes[static_cast<std::size_t>(config.view)];
    std::int64_t& most = touched_blocks[static_cast<std::size_t>(config.view)];
    most = std::max(most, (config.sinks + B - 1) / B + (config.window + B - 1) / B + 1);
  }

  // Tiles of consecutive query rows; fewer rows when blocks are many (small blocks, long rows).
  const std::int64_t base_blocks_max = rows.empty() ? 1 : rows.back() / base_block + 1;
  const std::int64_t wanted_rows = options.tile_rows > 0 ? options.tile_rows : backend.preferred_tile_rows();
  tile_rows =
      std::max<std::int64_t>(1, std::min(wanted_rows, kMaxTileCells / std::max<std::int64_t>(1, G * base_blocks_max)));
  // A backend that prefers long tiles (a GPU) still gets enough work items per layer to keep every
  // host thread busy with rankings and metrics while it computes: tiles are split down to
  // kMinSplitTileRows rows. From the capture and the query set only, never from the thread count.
  if (options.tile_rows <= 0 && tile_rows > kMinSplitTileRows && Hkv * ((R + tile_rows - 1) / tile_rows) < kTargetWorkItems) {
    const std::int64_t tiles_wanted = (kTargetWorkItems + Hkv - 1) / Hkv;
    tile_rows = std::min(tile_rows, std::max(kMinSplitTileRows, (R + tiles_wanted - 1) / tiles_wanted));
  }
  tiles = (R + tile_rows - 1) / tile_rows;

  // The ranking by mass a backend may make beside the statistics (StatsRequest::rank_blocks), for each
  // view a selector reads: per tile as long as its rows' longest budget plus the blocks forced keys
  // touch (what nested budgets and residual rankings ask for), or whole rows when a selector's metrics
  // compare with as many blocks as it selected. Which view is asked for is chosen per layer (run_layer).
  const auto base_found = std::find(block_sizes.begin(), block_sizes.end(), base_block);
  base_view_index = base_found == block_sizes.end() ? -1 : static_cast<std::int64_t>(base_found - block_sizes.begin());
  view_rank_blocks.assign(block_sizes.size(), {});
  for (const SelectorPlan& plan : plans) {
    const auto v = static_cast<std::size_t>(plan.view_index);
    if (!view_rank_blocks[v].empty()) continue;
    const std::int64_t B = block_sizes[v];
    bool whole_rows = false;
    for (const SelectorPlan& other : plans) whole_rows |= other.view_index == plan.view_index && other.budget_use != BudgetUse::kNested;
    view_rank_blocks[v].assign(static_cast<std::size_t>(tiles), 0);
    for (std::int64_t i = 0; i < R; ++i) {
      const std::int64_t t = rows[static_cast<std::size_t>(i)];
      std::int64_t n = whole_rows ? t / B + 1 : 0;
      for (const auto& budget : options.budgets) n = std::max(n, budget.blocks_for_row(t, B));
      std::int64_t& wanted = view_rank_blocks[v][static_cast<std::size_t>(i / tile_rows)];
      wanted = std::max(wanted, std::min(t / B + 1, n + touched_blocks[v]));
    }
  }
  // The group ranking a backend may make beside the statistics (StatsRequest::group_rank_blocks), for each
  // view ranked by group in some layer: as long as the reuse matrix's selection and the longest budget of a
  // selector that ranks that view by group. Which view is asked for is chosen per layer (run_layer).
  view_group_rank_blocks.assign(block_sizes.size(), {});
  for (std::size_t v = 0; v < block_sizes.size(); ++v) {
    bool by_selector = false;
    for (const SelectorPlan& plan : plans) {
      if (plan.view_index != static_cast<std::int64_t>(v)) continue;
      for (std::int64_t l = 0; l < L; ++l) by_selector |= plan.selector->ranks_by_group_max(l);
    }
    const bool by_reuse = static_cast<std::int64_t>(v) == reuse_view;
    if (!by_selector && !by_reuse) continue;
    const std::int64_t B = block_sizes[v];
    view_group_rank_blocks[v].assign(static_cast<std::size_t>(tiles), 0);
    for (std::int64_t i = 0; i < R; ++i) {
      const std::int64_t t = rows[static_cast<std::size_t>(i)];
      std::int64_t n = by_reuse ? reuse_count : 0;
      if (by_selector) {
        for (const auto& budget : options.budgets) n = std::max(n, budget.blocks_for_row(t, B));
      }
      std::int64_t& wanted = view_group_rank_blocks[v][static_cast<std::size_t>(i / tile_rows)];
      wanted = std::max(wanted, std::min(t / B + 1, n));
    }
  }
  if (options.walk_steps_per_flush > 0) walk_steps_per_flush = options.walk_steps_per_flush;
  workspaces.resize(static_cast<std::size_t>(omp_get_max_threads()));

  layer_context.header = &header;
  layer_context.rows = &result.rows;
  layer_context.scale = inputs.scale;
  layer_context.backend = &backend;
}

void ReplayRun::Impl::calibrate() {
  const auto started = std::chrono::steady_clock::now();
  // Calibration pass over every layer, for selectors calibrated on the whole capture (DuoAttention).
  std::vector<Selector*> calibrating;
  for (auto& sel : selectors) {
    if (sel->calibrates()) calibrating.push_back(sel.get());
  }
  if (!calibrating.empty()) {
    for (std::int64_t layer = 0; layer < L; ++layer) {
      check_interrupted();
      const LayerInfo& info = reader->layer(layer);
      const LayerTensors tensors = read_layer_locked(*reader, layer, info.has_v);
      layer_context.layer = layer;
      layer_context.tensors = &tensors;
      layer_context.has_qk = info.has_qk();
      layer_context.has_v = !tensors.v.empty();
      for (Selector* sel : calibrating) sel->calibrate_layer(layer_context);
    }
    for (Selector* sel : calibrating) sel->finish_calibration();
    if (progress) fmt::print(stderr, "replay: calibration pass over {} layers done\n", L);
  }
  calibrated = true;
  calibration_notes.clear();
  for (auto& sel : selectors) calibration_notes.push_back(sel->calibration_note());
  result.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void ReplayRun::Impl::run_layer(std::int64_t layer) {
  if (!calibrated) calibrate();
  check_interrupted();
  const auto layer_started = std::chrono::steady_clock::now();
  const LayerInfo& info = reader->layer(layer);
  const bool want_output = wants_output(layer);
  const LayerTensors& tensors = take_layer(layer, want_output);
  const std::uint64_t tensors_id = layer_ids[static_cast<std::size_t>(layer % 2)];
  // The next layer is read from the file while this one is computed.
  start_prefetch(layer + 1);
  if (!info.has_qk()) {
    // Dense probabilities must be probabilities.
    for (std::int64_t h = 0; h < Hq; ++h) {
      for (std::int64_t t : rows) {
        const float* p = &tensors.attn[static_cast<std::size_t>((h * header.seq_len + t) * header.seq_len)];
        double sum = 0.0;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (p[j] < 0.0f) {
            fail_input(capture_path, fmt::format("/layers/{}/attn", layer),
                       "holds a negative probability at head {}, query {}, key {} (expected probabilities)", h, t, j);
          }
          sum += p[j];
        }
        if (sum <= 0.0 || sum > 1.0 + kDenseRowSumTolerance) {
          fail_input(capture_path, fmt::format("/layers/{}/attn", layer),
                     "row of head {}, query {} sums to {} over keys 0..{} (expected (0, 1])", h, t, sum, t);
        }
      }
    }
  }
  inputs.dense = !info.has_qk();
  layer_context.layer = layer;
  layer_context.tensors = &tensors;
  layer_context.has_qk = info.has_qk();
  layer_context.has_v = !tensors.v.empty();
  for (auto& sel : selectors) sel->prepare_layer(layer_context);
  metrics.reset(S, NB, Hq, R);
  // The backend ranks one view a tile: of the views a selector reads in this layer (none where every
  // selector attends in full), the one of the smallest blocks, whose ranking costs the host the most.
  std::int64_t ranked_view = -1;
  for (const SelectorPlan& plan : plans) {
    if (plan.selector->role(layer) == LayerRole::kFull) continue;
    if (ranked_view < 0 || block_sizes[static_cast<std::size_t>(plan.view_index)] < block_sizes[static_cast<std::size_t>(ranked_view)]) {
      ranked_view = plan.view_index;
    }
  }
  // Residuals (forced keys' shares, key by key where a window cuts a block) only for the selectors that are
  // sparse in this layer: one attending in full reads none (hysparse's full layers rank by group).
  layer_wants_config.assign(configs.size(), 0);
  for (const SelectorPlan& plan : plans) {
    if (plan.selector->role(layer) != LayerRole::kFull) layer_wants_config[static_cast<std::size_t>(plan.reference_config)] = 1;
  }
  // The views ranked by group in this layer (the reuse matrix's, every layer; a selector's, where it says so),
  // and of them the one of the smallest blocks for the backend, as for the ranking by mass.
  layer_wants_group.assign(block_sizes.size(), 0);
  if (reuse_view >= 0) layer_wants_group[static_cast<std::size_t>(reuse_view)] = 1;
  for (const SelectorPlan& plan : plans) {
    if (plan.selector->ranks_by_group_max(layer)) layer_wants_group[static_cast<std::size_t>(plan.view_index)] = 1;
  }
  group_view = -1;
  for (std::size_t v = 0; v < block_sizes.size(); ++v) {
    if (layer_wants_group[v] && (group_view < 0 || block_sizes[v] < block_sizes[static_cast<std::size_t>(group_view)])) {
      group_view = static_cast<std::int64_t>(v);
    }
  }
  // The view of the smallest blocks is asked of the backend beside the statistics (a device builds it where they
  // are); the tile's block statistics come back only where another view or a base block's share reads them.
  const auto built_view = static_cast<std::size_t>(std::min_element(block_sizes.begin(), block_sizes.end()) - block_sizes.begin());
  const bool statistics_needed = block_sizes.size() > 1 || base_view_index != static_cast<std::int64_t>(built_view);
  // Reuse sums per work item, reduced in item order: the same numbers whatever thread ran what.
  if (reuse_enabled) reuse_item_sums.assign(static_cast<std::size_t>(Hkv * tiles * L), 0.0);

  std::exception_ptr failure;
  // Where the layer's thread time goes (progress lines): the statistics, key runs and output errors
  // (backend calls), and everything else a work item does (views, selections, metrics), in nanoseconds.
  std::atomic<std::int64_t> statistics_ns{0}, key_runs_ns{0}, output_error_ns{0}, item_ns{0};
  auto nanoseconds_since = [](std::chrono::steady_clock::time_point start) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
  };
  // Work items are taken longest first (a tile's work grows with its rows' positions), so that
  // the layer does not end waiting on its longest tiles; nothing computed depends on the order.
  const auto tiles_started = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t step = 0; step < Hkv * tiles; ++step) {
    if (failure || interrupted()) continue;  // a signal stops the layer at the next tile
    const auto item_started = std::chrono::steady_clock::now();
    const std::int64_t g = step % Hkv, tile_index = tiles - 1 - step / Hkv, item = g * tiles + tile_index;
    try {
      Workspace& ws = workspaces[static_cast<std::size_t>(omp_get_thread_num())];
      const std::int64_t i0 = tile_index * tile_rows, i1 = std::min(R, i0 + tile_rows), nr = i1 - i0;
      const std::int64_t* positions = rows.data() + i0;

      StatsRequest request;
      request.heads = G;
      request.seq_len = header.seq_len;
      request.head_dim = header.head_dim;
      request.scale = inputs.scale;
      request.rows = positions;
      request.num_rows = nr;
      request.block_size = base_block;
      request.layer = layer;
      request.kv_head = g;
      request.tensors_id = tensors_id;
      if (ranked_view >= 0) {
        request.rank_blocks = view_rank_blocks[static_cast<std::size_t>(ranked_view)][static_cast<std::size_t>(tile_index)];
        request.rank_block = block_sizes[static_cast<std::size_t>(ranked_view)];
      }
      if (group_view >= 0) {
        request.group_rank_blocks = view_group_rank_blocks[static_cast<std::size_t>(group_view)][static_cast<std::size_t>(tile_index)];
        request.group_rank_block = block_sizes[static_cast<std::size_t>(group_view)];
      }
      request.view_block = block_sizes[built_view];
      request.statistics_needed = statistics_needed;
      // Its largest probabilities where a selector reads them, or a ranking by group of its blocks that the
      // backend is not asked for (one it declines brings them anyway).
      const bool group_asked = group_view == static_cast<std::int64_t>(built_view) && request.group_rank_blocks > 0;
      request.view_max_prob = view_needs_max[built_view] != 0 || (layer_wants_group[built_view] && !group_asked);
      if (inputs.dense) {
        request.attn = tensors.attn.data() + g * G * header.seq_len * header.seq_len;
      } else {
        request.q = tensors.q.data() + g * G * header.seq_len * header.head_dim;
        request.k = tensors.k.data() + g * header.seq_len * header.head_dim;
        if (want_output) request.v = tensors.v.data() + g * header.seq_len * header.head_dim;
      }
      if (!tensors.sink_logits.empty()) request.sink_logits = tensors.sink_logits.data() + g * G;
      const auto statistics_started = std::chrono::steady_clock::now();
      backend.block_statistics(request, ws.tile);
      statistics_ns += nanoseconds_since(statistics_started);

      ws.views.resize(block_sizes.size());
      for (std::size_t v = 0; v < block_sizes.size(); ++v) {
        // The group ranking reads block maxima only where the backend did not rank it as long as asked.
        const bool group_served = static_cast<std::int64_t>(v) == group_view && ws.tile.group_ranked > 0 &&
                                  ws.tile.group_ranked >= std::min(request.group_rank_blocks, positions[nr - 1] / block_sizes[v] + 1);
        const bool group_from_host = layer_wants_group[v] && !group_served;
        const bool with_max = view_needs_max[v] != 0 || group_from_host;
        if (v == built_view && ws.tile.view_blocks > 0) {
          adopt_block_view(ws.tile, block_sizes[v], positions, with_max, ws.views[v]);
        } else {
          build_block_view(ws.tile, base_block, block_sizes[v], positions, with_max, ws.views[v], ws.block_exps);
        }
      }
      const BlockView* base_view = base_view_index >= 0 ? &ws.views[static_cast<std::size_t>(base_view_index)] : nullptr;

      // Forced-key summaries per fixed config, head and row, and the residual mass of every block
      // (its mass outside the forced keys: what selecting it adds); and the share of the base block that
      // each budget's window of a budget-window SWA cuts. Their keys are summed one by one, in runs the
      // backend computes where the keys are (key_run_shares), all of the tile's at once.
      ws.key_runs.clear();
      struct PlanRuns {
        std::vector<KeyRun>& runs;
        std::int32_t h, r;
        void whole(std::int64_t) {}
        void run(std::int64_t j0, std::int64_t j1) { runs.push_back({h, r, static_cast<std::int32_t>(j0), static_cast<std::int32_t>(j1), 0}); }
        void residual(std::int64_t, std::int64_t j0, std::int64_t j1) {
          if (j0 < j1) runs.push_back({h, r, static_cast<std::int32_t>(j0), static_cast<std::int32_t>(j1), 1});
        }
      };
      ws.summaries.resize(configs.size());
      for (std::size_t c = 0; c < configs.size(); ++c) {
        if (!layer_wants_config[c]) continue;
        const BlockView& view = ws.views[static_cast<std::size_t>(configs[c].view)];
        ws.summaries[c].resize(static_cast<std::size_t>(G * nr));
        for (std::int64_t h = 0; h < G; ++h) {
          for (std::int64_t r = 0; r < nr; ++r) {
            PlanRuns plan{ws.key_runs, static_cast<std::int32_t>(h), static_cast<std::int32_t>(r)};
            visit_forced(ForcedRanges(configs[c].sinks, configs[c].window, positions[r]), view.block, base_block, plan);
          }
        }
      }
      // A budget window's cut base block [lo, hi) from `from`: the keys [from, hi), or where they are the larger
      // part, the block's share less the keys [lo, from) (fewer keys computed).
      ws.window_partials.resize(static_cast<std::size_t>(S));
      ws.partial_runs.clear();
      for (std::int64_t s = 0; s < S; ++s) {
        const SelectorPlan& plan = plans[static_cast<std::size_t>(s)];
        if (!plan.budget_window || plan.selector->role(layer) == LayerRole::kFull) continue;
        const std::int64_t B = ws.views[static_cast<std::size_t>(plan.view_index)].block;
        std::vector<double>& partials = ws.window_partials[static_cast<std::size_t>(s)];
        partials.assign(static_cast<std::size_t>(G * nr * NB), 0.0);
        for (std::int64_t h = 0; h < G; ++h) {
          for (std::int64_t r = 0; r < nr; ++r) {
            const std::int64_t t = positions[r];
            if (t < plan.first_scored) continue;
            for (std::int64_t bi = 0; bi < NB; ++bi) {
              if (!plan.applicable[static_cast<std::size_t>(bi)]) continue;
              const ForcedRanges ranges(plan.selector->sinks(), options.budgets[static_cast<std::size_t>(bi)].blocks_for_row(t, B) * B, t);
              const std::int64_t from = std::max(ranges.window_begin, ranges.sink_end);
              if (from % base_block == 0 || from > t) continue;
              const std::int64_t lo = from / base_block * base_block, hi = std::min(lo + base_block, t + 1);
              const bool complement = 2 * (hi - from) > hi - lo;
              ws.partial_runs.push_back({&partials[static_cast<std::size_t>((h * nr + r) * NB + bi)], complement ? from / base_block : -1, h, r});
              ws.key_runs.push_back({static_cast<std::int32_t>(h), static_cast<std::int32_t>(r),
                                     static_cast<std::int32_t>(complement ? lo : from), static_cast<std::int32_t>(complement ? from : hi), 0});
            }
          }
        }
      }
      const std::size_t forced_runs = ws.key_runs.size() - ws.partial_runs.size();
      if (!ws.key_runs.empty()) {
        const auto runs_started = std::chrono::steady_clock::now();
        if (!backend.key_run_shares(request, ws.tile, ws.key_runs, ws.key_run_sums)) {
          key_run_shares_on_host(request, ws.tile, ws.key_runs, ws.key_run_sums);
        }
        key_runs_ns += nanoseconds_since(runs_started);
      }
      for (std::size_t i = 0; i < ws.partial_runs.size(); ++i) {
        const PartialRun& partial = ws.partial_runs[i];
        const double sum = ws.key_run_sums[forced_runs + i];
        // Rounding of the fp32 block sum can undercut the rest.
        *partial.target = partial.complement_block < 0
                              ? sum
                              : std::max(0.0, BaseShares(ws.tile, partial.head, partial.row, base_view)(partial.complement_block) - sum);
      }
      // The summaries from the runs' sums, in the order they were planned.
      struct SumRuns {
        const double* sums;
        BaseShares shares;
        ForcedSummary& summary;
        void whole(std::int64_t b) { summary.mass += shares(b); }
        void run(std::int64_t, std::int64_t) { summary.mass += *sums++; }
        void residual(std::int64_t b, std::int64_t j0, std::int64_t j1) { summary.residual.emplace_back(b, j0 < j1 ? *sums++ : 0.0); }
      };
      const double* next_sum = ws.key_run_sums.data();
      ws.residual_mass.resize(configs.size());
      ws.residual_storage.resize(configs.size());
      for (std::size_t c = 0; c < configs.size(); ++c) {
        if (!layer_wants_config[c]) {
          ws.residual_mass[c] = nullptr;
          continue;
        }
        const BlockView& view = ws.views[static_cast<std::size_t>(configs[c].view)];
        const bool forced = configs[c].sinks != 0 || configs[c].window != 0;
        const bool stored = forced && config_keeps_residual[c];
        if (stored) ws.residual_storage[c] = view.mass;
        ws.residual_mass[c] = !forced ? &view.mass : stored ? &ws.residual_storage[c] : nullptr;
        for (std::int64_t h = 0; h < G; ++h) {
          for (std::int64_t r = 0; r < nr; ++r) {
            const ForcedRanges ranges(configs[c].sinks, configs[c].window, positions[r]);
            ForcedSummary& summary = ws.summaries[c][static_cast<std::size_t>(h * nr + r)];
            summary.mass = 0.0;
            summary.count = ranges.count();
            summary.residual.clear();
            SumRuns sum_runs{next_sum, BaseShares(ws.tile, h, r, base_view), summary};
            visit_forced(ranges, view.block, base_block, sum_runs);
            next_sum = sum_runs.sums;
            if (stored) {
              for (const auto& [b, m] : summary.residual) ws.residual_storage[c][view.at(h, r, b)] = m;
            }
          }
        }
      }
      if (next_sum != ws.key_run_sums.data() + forced_runs) {
        throw Error(ErrorKind::kInternal, fmt::format("forced keys read {} of their {} key runs' sums", next_sum - ws.key_run_sums.data(), forced_runs));
      }

      // Shared rankings of this tile (filled on demand, by selectors and by the metrics below).
      ws.oracle_rankings.resize(configs.size());
      for (std::size_t c = 0; c < configs.size(); ++c) {
        const BlockView& view = ws.views[static_cast<std::size_t>(configs[c].view)];
        ws.oracle_rankings[c].reset(G, nr, view.num_blocks);
      }
      ws.mass_rankings.resize(ws.views.size());
      for (std::size_t v = 0; v < ws.views.size(); ++v) {
        ws.mass_rankings[v].reset(G, nr, ws.views[v].num_blocks, touched_blocks[v]);
      }
      if (ws.tile.ranked > 0 && ranked_view >= 0) {
        ws.mass_rankings[static_cast<std::size_t>(ranked_view)].adopt(ws.tile.mass_order, ws.tile.ranked, ws.tile.heads,
                                                                       ws.views[static_cast<std::size_t>(ranked_view)]);
      }
      ws.group_rankings.resize(ws.views.size());
      for (std::size_t v = 0; v < ws.views.size(); ++v) {
        if (layer_wants_group[v]) ws.group_rankings[v].reset(1, nr, ws.views[v].num_blocks);
      }
      if (ws.tile.group_ranked > 0 && group_view >= 0) {
        ws.group_rankings[static_cast<std::size_t>(group_view)].adopt(ws.tile.group_max_order, ws.tile.group_ranked, 1,
                                                                      ws.views[static_cast<std::size_t>(group_view)]);
      }

      // Rankings from every selector (eviction selectors: one per budget).
      ws.rankings.resize(static_cast<std::size_t>(S));
      for (std::int64_t s = 0; s < S; ++s) {
        const SelectorPlan& plan = plans[static_cast<std::size_t>(s)];
        const BlockView& view = ws.views[static_cast<std::size_t>(plan.view_index)];
        std::vector<std::int64_t> length(static_cast<std::size_t>(nr));
        for (std::int64_t r = 0; r < nr; ++r) {
          std::int64_t n = 0;
          for (const auto& budget : options.budgets) n = std::max(n, budget.blocks_for_row(positions[r], view.block));
          length[static_cast<std::size_t>(r)] = std::min(n, view.causal_blocks(r));
        }
        RankContext context;
        context.layer = layer;
        context.kv_group = g;
        context.group_size = G;
        context.row_begin = i0;
        context.rows = nr;
        context.positions = positions;
        context.view = &view;
        context.ranking_length = length.data();
        const auto config = static_cast<std::size_t>(plan.reference_config);
        context.residual_mass = ws.residual_mass[config];
        if (layer_wants_config[config]) {
          context.top_by_residual = [this, &ws, &view, &plan, nr](std::int64_t h, std::int64_t r, std::int64_t count) {
            const auto c = static_cast<std::size_t>(plan.reference_config);
            return ws.top_by_residual(configs[c], c, view, h, r, count, ws.summaries[c][static_cast<std::size_t>(h * nr + r)]);
          };
        }
        if (plan.selector->ranks_by_group_max(layer)) {
          context.top_by_group_max = [&ws, &view, &plan](std::int64_t r, std::int64_t count) {
            return ws.top_by_group_max(view, static_cast<std::size_t>(plan.view_index), r, count);
          };
        }
        context.layer_context = &layer_context;
        std::vector<Rankings>& out = ws.rankings[static_cast<std::size_t>(s)];
        if (plan.budget_use == BudgetUse::kPerBudget) {
          out.resize(static_cast<std::size_t>(NB));
          for (std::int64_t bi = 0; bi < NB; ++bi) {
            if (!plan.applicable[static_cast<std::size_t>(bi)]) continue;
            context.budget_index = bi;
            context.budget = &options.budgets[static_cast<std::size_t>(bi)];
            plan.selector->rank(context, out[static_cast<std::size_t>(bi)]);
          }
        } else {
          out.resize(1);
          plan.selector->rank(context, out[0]);
        }
      }

      // Metrics per selector, head, row and budget. The output-error walks are evaluated where the
      // keys and values are (the device's memory for a GPU backend), whenever they hold
      // walk_steps_per_flush steps (whole walks: a tile of thousands of rows and token-level
      // selections would otherwise hold gigabytes of steps), and at the end of the tile.
      ws.walks.clear();
      ws.error_targets.clear();
      auto flush_walks = [&]() {
        if (ws.error_targets.empty()) return;
        const auto walks_started = std::chrono::steady_clock::now();
        backend.output_errors(request, ws.tile, ws.walks, ws.errors);
        output_error_ns += nanoseconds_since(walks_started);
        for (std::size_t i = 0; i < ws.error_targets.size(); ++i) *ws.error_targets[i] = ws.errors[i];
        ws.walks.clear();
        ws.error_targets.clear();
      };
      for (std::int64_t s = 0; s < S; ++s) {
        const SelectorPlan& plan = plans[static_cast<std::size_t>(s)];
        const Selector& sel = *plan.selector;
        const BlockView& view = ws.views[static_cast<std::size_t>(plan.view_index)];
        const std::vector<Rankings>& rankings = ws.rankings[static_cast<std::size_t>(s)];
        const bool nested = plan.budget_use == BudgetUse::kNested;
        const bool full_layer = sel.role(layer) == LayerRole::kFull;
        const std::int64_t B = view.block;
        ws.stamp.assign(static_cast<std::size_t>(view.num_blocks), std::numeric_limits<std::int32_t>::max());
        for (std::int64_t h = 0; h < G; ++h) {
          const std::int64_t head = g * G + h;
          for (std::int64_t r = 0; r < nr; ++r) {
            const std::int64_t t = positions[r], row_index = i0 + r;
            const std::int64_t causal = view.causal_blocks(r);
            if (t < plan.first_scored) continue;  // not scored by this selector: its metrics stay NaN
            if (full_layer) {
              for (std::int64_t b = 0; b < NB; ++b) {
                if (!plan.applicable[static_cast<std::size_t>(b)]) continue;
                metrics.at(kMassRecall, s, b, head, row_index) = 1.0;
                metrics.at(kRecallVsOracle, s, b, head, row_index) = 1.0;
                metrics.at(kTopkOverlap, s, b, head, row_index) = 1.0;
                metrics.at(kAttendedKeys, s, b, head, row_index) = static_cast<double>(t + 1);
                metrics.at(kBudgetKeys, s, b, head, row_index) = static_cast<double>(t + 1);
                if (want_output) metrics.at(kOutputError, s, b, head, row_index) = 0.0;
              }
              continue;
            }
            const BaseShares base_share(ws.tile, h, r, base_view);
            const ForcedSummary& fixed = ws.summaries[static_cast<std::size_t>(plan.reference_config)][static_cast<std::size_t>(h * nr + r)];
            const ForcedRanges fixed_ranges(sel.sinks(), std::max<std::int64_t>(0, sel.window()), t);
            auto block_keys = [&](std::int64_t b) { return std::min((b + 1) * B, t + 1) - b * B; };
            const std::int64_t set = sel.ranks_per_head() ? h : 0;

            // Per-head oracle with the fixed forced keys (reference), and the plain top blocks by mass, as
            // long as any budget needs: the budget (nested), or the selection's own size (equal-size oracle).
            std::int64_t longest = 0;
            for (std::int64_t bi = 0; bi < NB; ++bi) {
              if (!plan.applicable[static_cast<std::size_t>(bi)]) continue;
              if (nested) {
                longest = std::max(longest, options.budgets[static_cast<std::size_t>(bi)].blocks_for_row(t, B));
              } else if (sel.selects_blocks()) {
                const Rankings& rk = rankings[plan.budget_use == BudgetUse::kPerBudget ? static_cast<std::size_t>(bi) : 0];
                longest = std::max<std::int64_t>(longest, rk.size(set, r));
              }
            }
            longest = std::min(longest, causal);
            const auto reference = static_cast<std::size_t>(plan.reference_config);
            const std::int32_t* oracle_order = ws.top_by_residual(configs[reference], reference, view, h, r, longest, fixed);
            const std::int32_t* pure_order = ws.mass_rankings[static_cast<std::size_t>(plan.view_index)].top(
                h, r, causal, longest, [&](std::int64_t b) { return view.mass[view.at(h, r, b)]; }, ws.scores);

            // The ranking being walked: its blocks are stamped with their rank; sums grow incrementally.
            const std::int32_t* order = nullptr;
            const double* log_weight = nullptr;
            std::int64_t order_length = 0, taken = 0, selected_keys = 0;
            GatheredSum selected_mass;
            // A walk of the output estimate starts from the fixed forced keys (sinks, then window).
            auto start = [&](const Rankings& rk) {
              for (std::int64_t i = 0; i < order_length; ++i) {
                ws.stamp[static_cast<std::size_t>(order[i])] = std::numeric_limits<std::int32_t>::max();
              }
              order = sel.selects_blocks() ? rk.row(set, r) : nullptr;
              order_length = sel.selects_blocks() ? rk.size(set, r) : 0;
              log_weight = sel.selects_blocks() && rk.weighted() ? rk.weights(set, r) : nullptr;
              for (std::int64_t i = 0; i < order_length; ++i) ws.stamp[static_cast<std::size_t>(order[i])] = static_cast<std::int32_t>(i);
              taken = selected_keys = 0;
              selected_mass.reset();
              if (want_output) {
                ws.walks.begin_walk(h, r);
                ws.walks.add(0, fixed_ranges.sink_end);
                ws.walks.add(fixed_ranges.window_begin, t + 1);
              }
            };
            if (plan.budget_use != BudgetUse::kPerBudget) start(rankings[0]);

            // Walk the budgets in increasing block count (token budgets ascend; sparsity descends).
            // The row's masses, read as residuals by add_residual (fixed's few touched blocks patched for the call).
            double* row_mass = ws.views[static_cast<std::size_t>(plan.view_index)].mass.data() + view.at(h, r, 0);
            GatheredSum oracle_sum;
            std::int64_t oracle_taken = 0;
            // Budget-window SWA: whole base blocks are added once as the window grows; the partial
            // block at the window's start is recomputed per budget. window_begin: keys added to the output.
            double whole_blocks_mass = 0.0;
            std::int64_t first_whole_block = t / base_block + 1, window_begin = t + 1;
            for (std::int64_t bi = 0; bi < NB; ++bi) {
              if (!plan.applicable[static_cast<std::size_t>(bi)]) continue;
              const Budget& budget = options.budgets[static_cast<std::size_t>(bi)];
              const std::int64_t n = std::min(budget.blocks_for_row(t, B), causal);
              if (plan.budget_use == BudgetUse::kPerBudget) start(rankings[static_cast<std::size_t>(bi)]);
              double mass;
              std::int64_t keys, nominal, compared = n;  // compared: blocks of the oracle and overlap references
              if (plan.budget_window) {
                // SWA whose window is the budget: windows grow with the budget, so keys are added incrementally.
                const ForcedRanges ranges(sel.sinks(), budget.blocks_for_row(t, B) * B, t);
                const std::int64_t from = std::max(ranges.window_begin, ranges.sink_end);
                const std::int64_t to = std::max(window_begin, ranges.sink_end);
                if (from < to) {
                  if (want_output) ws.walks.add(from, to);
                  window_begin = from;
                }
                const std::int64_t first_whole = (from + base_block - 1) / base_block;
                for (; first_whole_block > first_whole; --first_whole_block) {
                  whole_blocks_mass += base_share(first_whole_block - 1);
                }
                // The cut base block's keys from the window's start (planned with the tile's key runs; 0 where none).
                const double partial = ws.window_partials[static_cast<std::size_t>(s)][static_cast<std::size_t>((h * nr + r) * NB + bi)];
                mass = fixed.mass + whole_blocks_mass + partial;
                keys = ranges.count();
                nominal = budget.blocks_for_row(t, B) * B;
                // Overlap against the top-n blocks by mass.
                double in = 0, all = 0;
                for (std::int64_t i = 0; i < n; ++i) {
                  const std::int64_t b = pure_order[i];
                  in += static_cast<double>(ranges.count_in(b * B, (b + 1) * B));
                  all += static_cast<double>(block_keys(b));
                }
                metrics.at(kTopkOverlap, s, bi, head, row_index) = all > 0 ? in / all : 1.0;
              } else {
                const std::int64_t use = nested ? std::min<std::int64_t>(n, order_length) : order_length;
                if (taken < use) ws.add_residual(selected_mass, row_mass, fixed, order, taken, use);
                for (; taken < use; ++taken) {
                  const std::int64_t b = order[taken];
                  selected_keys += block_keys(b) - fixed_ranges.count_in(b * B, (b + 1) * B);
                  if (want_output) {
                    // The block's keys outside the forced ranges: at most two runs.
                    const std::int64_t lo = b * B, hi = std::min((b + 1) * B, t + 1);
                    const std::int64_t a0 = std::max(lo, fixed_ranges.sink_end);
                    const std::int64_t a1 = std::min(hi, fixed_ranges.window_begin);
                    ws.walks.add(a0, a1, log_weight ? std::exp(log_weight[taken]) : 1.0);
                  }
                }
                mass = fixed.mass + selected_mass.total();
                keys = fixed.count + selected_keys;
                if (!nested) compared = std::min(use, causal);
                nominal = plan.budget_use == BudgetUse::kFree ? keys : sel.selects_blocks() ? n * B : fixed.count;
                double in = 0, all = 0;
                for (std::int64_t i = 0; i < compared; ++i) {
                  const std::int64_t b = pure_order[i];
                  const bool chosen = ws.stamp[static_cast<std::size_t>(b)] < use;
                  in += static_cast<double>(chosen ? block_keys(b) : fixed_ranges.count_in(b * B, (b + 1) * B));
                  all += static_cast<double>(block_keys(b));
                }
                metrics.at(kTopkOverlap, s, bi, head, row_index) = all > 0 ? in / all : 1.0;
              }
              if (nested) {
                if (oracle_taken < n) ws.add_residual(oracle_sum, row_mass, fixed, oracle_order, oracle_taken, n);
                oracle_taken = std::max(oracle_taken, n);
              } else {
                // Equal-size oracle: as many blocks as the selection holds, beside the same forced keys.
                oracle_sum.reset();
                ws.add_residual(oracle_sum, row_mass, fixed, oracle_order, 0, compared);
              }
              double oracle_mass = fixed.mass + oracle_sum.total();
              const bool whole_row = keys >= t + 1;
              if (whole_row) {
                // Exact: every causal key is attended. With the same forced keys the oracle is never
                // worse, so it attends them all too.
                mass = 1.0;
                if (!plan.budget_window) oracle_mass = 1.0;
              }
              metrics.at(kMassRecall, s, bi, head, row_index) = mass;
              metrics.at(kRecallVsOracle, s, bi, head, row_index) = oracle_mass > 0 ? mass / oracle_mass : kNaN;
              metrics.at(kAttendedKeys, s, bi, head, row_index) = static_cast<double>(keys);
              metrics.at(kBudgetKeys, s, bi, head, row_index) = static_cast<double>(nominal);
              // An importance-weighted estimate is not exact even over the whole row.
              if (want_output) {
                double& error = metrics.at(kOutputError, s, bi, head, row_index);
                if (whole_row && !log_weight) {
                  error = 0.0;
                } else {
                  ws.walks.checkpoint();
                  ws.error_targets.push_back(&error);
                }
              }
              const bool saturated = plan.budget_use == BudgetUse::kFree ? whole_row : budget.blocks_for_row(t, B) >= causal;
              metrics.saturated(s, bi, head, row_index) = saturated ? 1 : 0;
            }
            for (std::int64_t i = 0; i < order_length; ++i) {
              ws.stamp[static_cast<std::size_t>(order[i])] = std::numeric_limits<std::int32_t>::max();
            }
            if (static_cast<std::int64_t>(ws.walks.steps.size()) >= walk_steps_per_flush) flush_walks();
          }
        }
      }
      flush_walks();

      // Cross-layer reuse: this layer's selection is stored; earlier layers' selections are scored here.
      if (reuse_enabled) {
        const BlockView& view = ws.views[static_cast<std::size_t>(reuse_view)];
        for (std::int64_t r = 0; r < nr; ++r) {
          const std::int64_t count = std::min(reuse_count, view.causal_blocks(r));
          const std::size_t slot = static_cast<std::size_t>((layer * Hkv + g) * R + i0 + r);
          const std::int32_t* top = ws.top_by_group_max(view, static_cast<std::size_t>(reuse_view), r, count);
          std::copy(top, top + count, &reuse_store[slot * static_cast<std::size_t>(reuse_count)]);
          reuse_length[slot] = static_cast<std::int32_t>(count);
          for (std::int64_t f = 0; f <= layer; ++f) {
            const std::size_t source = static_cast<std::size_t>((f * Hkv + g) * R + i0 + r);
            const std::int32_t* chosen = &reuse_store[source * static_cast<std::size_t>(reuse_count)];
            for (std::int64_t h = 0; h < G; ++h) {
              double recall = 0.0;
              for (std::int32_t i = 0; i < reuse_length[source]; ++i) recall += view.mass[view.at(h, r, chosen[i])];
              reuse_item_sums[static_cast<std::size_t>(item * L + f)] += std::min(1.0, recall);
            }
          }
        }
      }
    } catch (...) {
#pragma omp critical(hysparse_replay_failure)
      if (!failure) failure = std::current_exception();
    }
    item_ns += nanoseconds_since(item_started);
  }
  if (failure) std::rethrow_exception(failure);
  check_interrupted();
  const auto reduction_started = std::chrono::steady_clock::now();

  // Reduce the layer.
  if (reuse_enabled) {
    for (std::int64_t f = 0; f <= layer; ++f) {
      double sum = 0.0;
      for (std::int64_t item = 0; item < Hkv * tiles; ++item) sum += reuse_item_sums[static_cast<std::size_t>(item * L + f)];
      result.reuse.at(static_cast<std::uint64_t>(f), static_cast<std::uint64_t>(layer)) = sum / static_cast<double>(Hq * R);
    }
  }
  // Every number is reduced in a fixed order, whatever thread does it, in three parallel passes
  // with enough items to keep every thread busy: per (selector, budget, head) the head's numbers;
  // per (selector, budget, metric) the layer's sum over heads, then rows; per (selector, budget) the
  // recall quantiles over the pooled rows and the model's sums.
  const std::int64_t SB = S * NB;
  std::vector<double> layer_sum(static_cast<std::size_t>(SB * kNumMetrics), 0.0);
  std::vector<std::int64_t> layer_count(static_cast<std::size_t>(SB * kNumMetrics), 0);
  std::vector<std::int64_t> head_saturated(static_cast<std::size_t>(SB * Hq), 0);
  std::exception_ptr reduce_failure;
  auto parallel_reduce = [&](std::int64_t count, const auto& body) {
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < count; ++i) {
      try {
        body(i);
      } catch (...) {  // bad_alloc: leaves the parallel region as an exception, not std::terminate
#pragma omp critical(hysparse_reduce_failure)
        if (!reduce_failure) reduce_failure = std::current_exception();
      }
    }
    if (reduce_failure) std::rethrow_exception(reduce_failure);
  };
  const auto ul = static_cast<std::uint64_t>(layer);
  // Rows a selector does not score (or budgets it cannot use) are NaN and left out.
  auto scored_recalls = [&](std::int64_t s, std::int64_t bi, std::int64_t h, std::vector<double>& values) {
    const double* recall = metrics.head_row(kMassRecall, s, bi, h);
    for (std::int64_t r = 0; r < R; ++r) {
      if (!std::isnan(recall[r])) values.push_back(recall[r]);
    }
  };
  parallel_reduce(SB * Hq, [&](std::int64_t i) {
    const std::int64_t s = i / (NB * Hq), bi = i / Hq % NB, h = i % Hq;
    SelectorResult& out = result.selectors[static_cast<std::size_t>(s)];
    const auto ub = static_cast<std::uint64_t>(bi), uh = static_cast<std::uint64_t>(h);
    for (int m = 0; m < kNumMetrics; ++m) out.head_mean[m].at(ub, ul, uh) = mean_of(metrics.head_row(m, s, bi, h), R);
    std::vector<double> values;
    values.reserve(static_cast<std::size_t>(R));
    scored_recalls(s, bi, h, values);
    out.head_recall_min.at(ub, ul, uh) = values.empty() ? kNaN : *std::min_element(values.begin(), values.end());
    out.head_recall_p10.at(ub, ul, uh) = nearest_rank(values, 0.10);
    out.head_recall_p50.at(ub, ul, uh) = nearest_rank(values, 0.50);
    std::int64_t saturated = 0;
    for (std::int64_t r = 0; r < R; ++r) saturated += metrics.saturated(s, bi, h, r);
    head_saturated[static_cast<std::size_t>(i)] = saturated;
  });
  parallel_reduce(SB * kNumMetrics, [&](std::int64_t i) {
    const std::int64_t s = i / (NB * kNumMetrics), bi = i / kNumMetrics % NB;
    const int m = static_cast<int>(i % kNumMetrics);
    double sum = 0;
    std::int64_t count = 0;
    for (std::int64_t h = 0; h < Hq; ++h) {
      const double* values = metrics.head_row(m, s, bi, h);
      for (std::int64_t r = 0; r < R; ++r) {
        if (!std::isnan(values[r])) {
          sum += values[r];
          ++count;
        }
      }
    }
    layer_sum[static_cast<std::size_t>(i)] = sum;
    layer_count[static_cast<std::size_t>(i)] = count;
  });
  parallel_reduce(SB, [&](std::int64_t i) {
    const std::int64_t s = i / NB, bi = i % NB;
    SelectorResult& out = result.selectors[static_cast<std::size_t>(s)];
    const bool sparse = out.is_full_layer[static_cast<std::size_t>(layer)] == 0;
    const auto ub = static_cast<std::uint64_t>(bi);
    ModelSums& acc = model[static_cast<std::size_t>(i)];
    for (int m = 0; m < kNumMetrics; ++m) {
      const double sum = layer_sum[static_cast<std::size_t>(i * kNumMetrics + m)];
      const std::int64_t count = layer_count[static_cast<std::size_t>(i * kNumMetrics + m)];
      out.layer_mean[m].at(ub, ul) = count ? sum / static_cast<double>(count) : kNaN;
      acc.sum[0][m] += sum;
      acc.count[0][m] += count;
      if (sparse) {
        acc.sum[1][m] += sum;
        acc.count[1][m] += count;
      }
    }
    std::int64_t saturated = 0;
    for (std::int64_t h = 0; h < Hq; ++h) saturated += head_saturated[static_cast<std::size_t>(i * Hq + h)];
    out.saturated_rows.at(ub, ul) =
        plans[static_cast<std::size_t>(s)].applicable[static_cast<std::size_t>(bi)] ? static_cast<double>(saturated) : kNaN;
    std::vector<double> pooled;
    pooled.reserve(static_cast<std::size_t>(Hq * R));
    for (std::int64_t h = 0; h < Hq; ++h) scored_recalls(s, bi, h, pooled);
    for (double v : pooled) {
      acc.recall[0].add(v);
      if (sparse) acc.recall[1].add(v);
    }
    out.layer_recall_min.at(ub, ul) = pooled.empty() ? kNaN : *std::min_element(pooled.begin(), pooled.end());
    out.layer_recall_p10.at(ub, ul) = nearest_rank(pooled, 0.10);
    out.layer_recall_p50.at(ub, ul) = nearest_rank(pooled, 0.50);
  });
  std::uint64_t layer_elements = 0;
  if (info.has_qk()) {
    for (std::int64_t t : rows) layer_elements += static_cast<std::uint64_t>(t + 1);
    layer_elements *= static_cast<std::uint64_t>(Hq);
  }
  result.score_elements += layer_elements;
  if (progress) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - layer_started).count();
    const double statistics = 1e-9 * static_cast<double>(statistics_ns.load());
    const double key_runs = 1e-9 * static_cast<double>(key_runs_ns.load());
    const double output_error = 1e-9 * static_cast<double>(output_error_ns.load());
    const double host = 1e-9 * static_cast<double>(item_ns.load()) - statistics - key_runs - output_error;
    auto between = [](std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
      return std::chrono::duration<double>(b - a).count();
    };
    fmt::print(stderr,
               "replay: layer {}/{} done in {:.2f} s ({:.3g} scores/s; reading and setup {:.2f} s, tiles {:.2f} s, "
               "reduction {:.2f} s; thread-seconds of the tiles over {} threads: statistics {:.2f}, key runs {:.2f}, "
               "output error {:.2f}, selections and metrics {:.2f})\n",
               layer + 1, L, seconds, seconds > 0 ? static_cast<double>(layer_elements) / seconds : 0.0,
               between(layer_started, tiles_started), between(tiles_started, reduction_started),
               between(reduction_started, std::chrono::steady_clock::now()), omp_get_max_threads(), statistics,
               key_runs, output_error, host);
  }
  result.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - layer_started).count();
  next_layer = layer + 1;
}

void ReplayRun::Impl::fill_model(ReplayResult& target) const {
  for (std::int64_t s = 0; s < S; ++s) {
    fill_model_tables(target.selectors[static_cast<std::size_t>(s)], &model[static_cast<std::size_t>(s * NB)], NB);
  }
  target.model_sums = model;
  for (std::int64_t s = 0; s < S; ++s) {
    SelectorResult& out = target.selectors[static_cast<std::size_t>(s)];
    const SelectorKvPrice price = price_selector_kv(header, *selectors[static_cast<std::size_t>(s)], out.is_full_layer,
                                                    options.budgets, plans[static_cast<std::size_t>(s)].applicable);
    out.kv_resident_bytes = price.resident_bytes;
    out.kv_methods = price.methods;
    target.kv_full_bytes = price.full_attention_bytes;
  }
  for (std::size_t s = 0; s < target.selectors.size() && s < calibration_notes.size(); ++s) {
    target.selectors[s].calibration = calibration_notes[s];
  }
}

ReplayRun::ReplayRun(const std::string& capture_path, const ReplayOptions& options, const Backend& backend,
                     bool progress)
    : impl_(std::make_unique<Impl>(capture_path, options, backend, progress)) {}
ReplayRun::~ReplayRun() = default;
ReplayRun::ReplayRun(ReplayRun&&) noexcept = default;

std::int64_t ReplayRun::num_layers() const { return impl_->L; }
std::int64_t ReplayRun::next_layer() const { return impl_->next_layer; }
bool ReplayRun::done() const { return impl_->next_layer >= impl_->L; }

void ReplayRun::run_next_layer() {
  if (done()) fail(ErrorKind::kInternal, "replay of {}: every layer has run", impl_->capture_path);
  impl_->run_layer(impl_->next_layer);
}

ReplayResult ReplayRun::result() const {
  ReplayResult out = impl_->result;
  impl_->fill_model(out);
  return out;
}

std::vector<std::uint8_t> ReplayRun::checkpoint() const {
  const Impl& m = *impl_;
  ByteWriter w;
  w.put(kCheckpointMagic);
  for (std::int64_t v : {m.L, m.Hq, m.R, m.NB, m.S, m.next_layer}) w.put(v);
  w.put(m.result.seconds);
  w.put(m.result.score_elements);
  w.put(static_cast<std::uint8_t>(m.calibrated));
  for (std::int64_t s = 0; s < m.S; ++s) {
    SelectorResult& out = const_cast<SelectorResult&>(m.result.selectors[static_cast<std::size_t>(s)]);
    for (Table* t : layer_tables(out)) w.put_vector(t->values);
    w.put_string(m.calibrated ? m.calibration_notes[static_cast<std::size_t>(s)] : std::string());
    // A finished run needs no cross-layer state to continue (and it can be large).
    w.put_vector(m.next_layer < m.L ? m.selectors[static_cast<std::size_t>(s)]->save_state() : std::vector<std::int32_t>{});
  }
  w.put_vector(m.result.reuse.values);
  w.put_vector(m.reuse_store);
  w.put_vector(m.reuse_length);
  for (const ModelSums& acc : m.model) {
    for (int part = 0; part < 2; ++part) {
      for (int k = 0; k < kNumMetrics; ++k) {
        w.put(acc.sum[part][k]);
        w.put(acc.count[part][k]);
      }
      // The recall histogram, sparse: (bin, count) of the non-empty bins.
      const RecallHistogram& d = acc.recall[part];
      std::vector<std::int64_t> sparse;
      for (std::size_t bin = 0; bin < d.histogram.size(); ++bin) {
        if (d.histogram[bin] != 0) {
          sparse.push_back(static_cast<std::int64_t>(bin));
          sparse.push_back(d.histogram[bin]);
        }
      }
      w.put_vector(sparse);
      w.put(d.min);
      w.put(d.rows);
    }
  }
  return w.take();
}

void ReplayRun::restore(const std::vector<std::uint8_t>& blob) {
  Impl& m = *impl_;
  if (m.next_layer != 0) fail(ErrorKind::kInternal, "replay of {}: restore after layers ran", m.capture_path);
  ByteReader r(blob);
  const auto magic = r.get<std::array<char, 8>>();
  if (std::memcmp(magic.data(), kCheckpointMagic, sizeof(kCheckpointMagic)) != 0) ByteReader::corrupt();
  for (std::int64_t v : {m.L, m.Hq, m.R, m.NB, m.S}) {
    if (r.get<std::int64_t>() != v) ByteReader::corrupt();
  }
  const auto next = r.get<std::int64_t>();
  if (next < 0 || next > m.L) ByteReader::corrupt();
  m.result.seconds = r.get<double>();
  m.result.score_elements = r.get<std::uint64_t>();
  const bool calibrated = r.get<std::uint8_t>() != 0;
  std::vector<std::string> notes;
  std::vector<std::vector<std::int32_t>> states;
  for (std::int64_t s = 0; s < m.S; ++s) {
    for (Table* t : layer_tables(m.result.selectors[static_cast<std::size_t>(s)])) r.get_into(t->values);
    notes.push_back(r.get_string());
    states.push_back(r.get_vector<std::int32_t>());
  }
  r.get_into(m.result.reuse.values);
  r.get_into(m.reuse_store);
  r.get_into(m.reuse_length);
  for (ModelSums& acc : m.model) {
    for (int part = 0; part < 2; ++part) {
      for (int k = 0; k < kNumMetrics; ++k) {
        acc.sum[part][k] = r.get<double>();
        acc.count[part][k] = r.get<std::int64_t>();
      }
      RecallHistogram& d = acc.recall[part];
      const auto sparse = r.get_vector<std::int64_t>();
      if (sparse.size() % 2 != 0) ByteReader::corrupt();
      std::fill(d.histogram.begin(), d.histogram.end(), 0);
      std::int64_t counted = 0;
      for (std::size_t i = 0; i < sparse.size(); i += 2) {
        if (sparse[i] < 0 || sparse[i] >= kModelHistogramBins || sparse[i + 1] <= 0) ByteReader::corrupt();
        d.histogram[static_cast<std::size_t>(sparse[i])] = sparse[i + 1];
        counted += sparse[i + 1];
      }
      d.min = r.get<double>();
      d.rows = r.get<std::int64_t>();
      if (d.rows != counted) ByteReader::corrupt();
    }
  }
  if (!r.at_end()) ByteReader::corrupt();
  if (next < m.L) {
    for (std::int64_t s = 0; s < m.S; ++s) m.selectors[static_cast<std::size_t>(s)]->restore_state(states[static_cast<std::size_t>(s)]);
  }
  m.next_layer = next;
  // A finished run needs no calibration; an unfinished one recalibrates (deterministic) before its next layer.
  if (calibrated && next == m.L) {
    m.calibrated = true;
    m.calibration_notes = notes;
  }
}

ReplayResult run_replay(const std::string& capture_path, const ReplayOptions& options, const Backend& backend,
                        bool progress) {
  ReplayRun run(capture_path, options, backend, progress);
  while (!run.done()) run.run_next_layer();
  return run.result();
}

}  // namespace hysparse
