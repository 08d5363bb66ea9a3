#include "replay/selector.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <utility>

#include "common/error.hpp"
#include "common/random.hpp"
#include "kv/footprint.hpp"

namespace hysparse {

std::unique_ptr<Selector> make_oracle_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_oracle_topp_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_swa_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_hysparse_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_reuse_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_quest_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_moba_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_nsa_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_infllm_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_snapkv_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_h2o_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_doublesparsity_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_loki_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_sparq_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_magicpig_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_duo_selector(const SelectorSpec&, const SelectorDefaults&);

namespace {
using Factory = std::function<std::unique_ptr<Selector>(const SelectorSpec&, const SelectorDefaults&)>;
// The registry: one line per selector, in listing order.
const std::vector<std::pair<std::string, Factory>>& registry() {
  static const std::vector<std::pair<std::string, Factory>> entries = {
      {"oracle", make_oracle_selector},
      {"oracle_topp", make_oracle_topp_selector},
      {"swa", make_swa_selector},
      {"hysparse", make_hysparse_selector},
      {"reuse", make_reuse_selector},
      {"quest", make_quest_selector},
      {"moba", make_moba_selector},
      {"nsa", make_nsa_selector},
      {"infllm", make_infllm_selector},
      {"snapkv", make_snapkv_selector},
      {"h2o", make_h2o_selector},
      {"doublesparsity", make_doublesparsity_selector},
      {"loki", make_loki_selector},
      {"sparq", make_sparq_selector},
      {"magicpig", make_magicpig_selector},
      {"duo", make_duo_selector},
  };
  return entries;
}
}  // namespace

void Rankings::reset(std::int64_t sets_, std::int64_t rows_, std::int64_t stride_) {
  sets = sets_;
  rows = rows_;
  stride = stride_;
  blocks.resize(static_cast<std::size_t>(sets * rows * stride));
  length.assign(static_cast<std::size_t>(sets * rows), 0);
  log_weight.clear();
}

namespace {

// Below this many scores, rank_top compares (score, index) pairs; from it on, it radix-sorts keys.
constexpr std::int64_t kRadixRankMinScores = 128;

// An unsigned key per score that orders like rank_top: higher score, smaller key. -0 and +0 are one
// score (the comparison sees them equal), so they map to one key.
inline std::uint64_t descending_key(double score) {
  if (score == 0.0) score = 0.0;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &score, sizeof bits);
  const std::uint64_t ascending = (bits >> 63) != 0 ? ~bits : bits | (std::uint64_t{1} << 63);
  return ~ascending;
}

void rank_top_by_comparison(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out) {
  // (score, index) pairs side by side: the selection compares without chasing indices.
  struct Entry {
    double score;
    std::int32_t index;
  };
  thread_local std::vector<Entry> order;
  order.resize(static_cast<std::size_t>(num));
  for (std::int64_t i = 0; i < num; ++i) order[static_cast<std::size_t>(i)] = {scores[i], static_cast<std::int32_t>(i)};
  auto better = [](const Entry& a, const Entry& b) {
    return a.score > b.score || (a.score == b.score && a.index < b.index);
  };
  if (count < num) std::nth_element(order.begin(), order.begin() + count, order.end(), better);
  std::sort(order.begin(), order.begin() + count, better);
  for (std::int64_t i = 0; i < count; ++i) out[i] = order[static_cast<std::size_t>(i)].index;
}

// The same order without comparing pairs: the count-th smallest key is found on the keys alone; the
// entries that make the cut are gathered in index order (those equal to the cut: the lowest indices),
// and a stable least-significant-digit radix sort of their keys' upper halves leaves ties in index
// order. Keys whose upper halves are equal (scores within about 1e-6 relative, or equal) are then put
// in order by their lower halves, stably, run by run.
void rank_top_by_radix(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out) {
  struct Entry {
    std::uint64_t key;
    std::int32_t index;
  };
  thread_local std::vector<std::uint64_t> keys, cut;
  thread_local std::vector<Entry> entries, swap;
  keys.resize(static_cast<std::size_t>(num));
  for (std::int64_t i = 0; i < num; ++i) keys[static_cast<std::size_t>(i)] = descending_key(scores[i]);
  std::uint64_t threshold = ~std::uint64_t{0};
  if (count < num) {
    cut.assign(keys.begin(), keys.end());
    std::nth_element(cut.begin(), cut.begin() + (count - 1), cut.end());
    threshold = cut[static_cast<std::size_t>(count - 1)];
  }
  std::int64_t below = 0;  // keys strictly inside the cut; the rest of the count are ties at it, lowest index first
  for (std::int64_t i = 0; i < num; ++i) below += keys[static_cast<std::size_t>(i)] < threshold ? 1 : 0;
  std::int64_t ties_left = count - below;
  entries.resize(static_cast<std::size_t>(count));
  swap.resize(static_cast<std::size_t>(count));
  constexpr int kDigitBits = 8, kDigits = 32 / kDigitBits, kBuckets = 1 << kDigitBits;
  auto digit = [](std::uint64_t key, int d) { return static_cast<std::size_t>((key >> (32 + d * kDigitBits)) & (kBuckets - 1)); };
  std::uint32_t histogram[kDigits][kBuckets] = {};
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < num && n < count; ++i) {
    const std::uint64_t key = keys[static_cast<std::size_t>(i)];
    if (key < threshold || (key == threshold && ties_left-- > 0)) {
      entries[static_cast<std::size_t>(n++)] = {key, static_cast<std::int32_t>(i)};
      for (int d = 0; d < kDigits; ++d) ++histogram[d][digit(key, d)];
    }
  }
  Entry* from = entries.data();
  Entry* to = swap.data();
  for (int d = 0; d < kDigits; ++d) {
    std::uint32_t* buckets = histogram[d];
    if (buckets[digit(from[0].key, d)] == static_cast<std::uint32_t>(count)) continue;  // a digit all keys share
    std::uint32_t offset = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const std::uint32_t size = buckets[b];
      buckets[b] = offset;
      offset += size;
    }
    for (std::int64_t i = 0; i < count; ++i) to[buckets[digit(from[i].key, d)]++] = from[i];
    std::swap(from, to);
  }
  auto lower_half_first = [](const Entry& a, const Entry& b) { return (a.key & 0xffffffffu) < (b.key & 0xffffffffu); };
  for (std::int64_t begin = 0; begin < count;) {
    std::int64_t end = begin + 1;
    while (end < count && (from[end].key >> 32) == (from[begin].key >> 32)) ++end;
    if (end - begin > 1 && !std::is_sorted(from + begin, from + end, lower_half_first)) {
      std::stable_sort(from + begin, from + end, lower_half_first);
    }
    begin = end;
  }
  for (std::int64_t i = 0; i < count; ++i) out[i] = from[i].index;
}

}  // namespace

void rank_top(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out) {
  count = std::min(count, num);
  if (count <= 0) return;
  if (num < kRadixRankMinScores) {
    rank_top_by_comparison(scores, num, count, out);
  } else {
    rank_top_by_radix(scores, num, count, out);
  }
}

std::int64_t ReplayPlan::max_ranking_length(std::int64_t block) const {
  std::int64_t longest = 0;
  for (std::int64_t t : rows) {
    std::int64_t n = 0;
    for (const auto& budget : budgets) n = std::max(n, budget.blocks_for_row(t, block));
    longest = std::max(longest, std::min(n, t / block + 1));
  }
  return longest;
}

CalibrationSplit calibration_split(const ReplayPlan& plan, std::int64_t max_positions, std::uint64_t purpose) {
  CalibrationSplit split;
  const std::int64_t T = plan.header->seq_len;
  std::vector<char> evaluated(static_cast<std::size_t>(T), 0);
  for (std::int64_t t : plan.rows) evaluated[static_cast<std::size_t>(t)] = 1;
  std::vector<std::int64_t> pool;
  for (std::int64_t t = 0; t < T; ++t) {
    if (!evaluated[static_cast<std::size_t>(t)]) pool.push_back(t);
  }
  std::string where;
  if (pool.empty()) {
    split.first_scored = T / 2;
    for (std::int64_t t = 0; t < T / 2; ++t) pool.push_back(t);
    where = fmt::format("the first half [0, {}) of the positions (the query set is every position; scored on rows >= {})",
                        T / 2, T / 2);
  } else {
    where = fmt::format("the {} positions outside the query set", pool.size());
  }
  const auto available = static_cast<std::int64_t>(pool.size());
  if (max_positions > 0 && available > max_positions) {
    // Partial Fisher-Yates with the replay's seed.
    Rng rng(mix_seed(plan.seed, 0xca11b, purpose));
    for (std::int64_t i = 0; i < max_positions; ++i) {
      const auto j = i + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(available - i)));
      std::swap(pool[static_cast<std::size_t>(i)], pool[static_cast<std::size_t>(j)]);
    }
    pool.resize(static_cast<std::size_t>(max_positions));
    std::sort(pool.begin(), pool.end());
    split.note = fmt::format("{} positions sampled (seed {}) from {}", max_positions, plan.seed, where);
  } else {
    split.note = fmt::format("all {}", where);
  }
  split.positions = std::move(pool);
  return split;
}

SelectorPrice selector_price(const SelectorInfo& info, std::int64_t head_dim, std::int64_t group_size,
                             std::int64_t num_kv_heads) {
  const KvFootprint& f = find_footprint(info.footprint);
  std::vector<KvParam> params = f.params;
  for (auto& p : params) {
    const auto found = info.footprint_params.find(p.name);
    if (found != info.footprint_params.end()) p.value = found->second;
  }
  SelectorPrice price;
  price.footprint = f.method;
  price.residency = to_string(f.residency);
  price.formula = f.metadata.formula.empty() ? "none" : f.metadata.formula;
  price.evicts = f.evicts;
  constexpr std::int64_t kBf16Bits = 16;
  double bits = static_cast<double>(metadata_bits_per_entry(f.metadata, head_dim, kBf16Bits, params)) /
                static_cast<double>(metadata_period(f.metadata, params));
  if (f.metadata.scope == KvMetaScope::kQueryHead) bits *= static_cast<double>(group_size);
  if (f.metadata.scope == KvMetaScope::kLayer) bits /= static_cast<double>(std::max<std::int64_t>(1, num_kv_heads));
  price.metadata_bytes_per_token = bits / 8.0;
  return price;
}

const char* to_string(BudgetUse use) {
  switch (use) {
    case BudgetUse::kNested: return "nested";
    case BudgetUse::kPerBudget: return "per-budget";
    case BudgetUse::kFree: return "budget-free";
  }
  return "?";
}

Selector::Selector(const SelectorSpec& spec, const SelectorDefaults& defaults) : spec_(spec), label_(spec.name) {
  block_ = take_int("block", defaults.block, 1);
  sinks_ = take_int("sinks", defaults.sinks, 0);
  window_ = defaults.window;
}

std::int64_t Selector::take_int(const std::string& key, std::int64_t fallback, std::int64_t minimum,
                                std::int64_t maximum) {
  known_keys_.insert(key);
  std::int64_t value = fallback;
  const auto found = spec_.params.find(key);
  if (found != spec_.params.end()) {
    try {
      std::size_t used = 0;
      value = std::stoll(found->second, &used);
      if (used != found->second.size()) throw std::invalid_argument("trailing");
    } catch (const std::exception&) {
      fail(ErrorKind::kUsage, "selector {}: {}={} is not an integer", spec_.name, key, found->second);
    }
  }
  if (value < minimum || value > maximum) {
    fail(ErrorKind::kUsage, "selector {}: {}={} (expected an integer in [{}, {}])", spec_.name, key, value, minimum, maximum);
  }
  resolved_[key] = std::to_string(value);
  return value;
}

double Selector::take_double(const std::string& key, double fallback, double minimum, double maximum) {
  known_keys_.insert(key);
  double value = fallback;
  const auto found = spec_.params.find(key);
  if (found != spec_.params.end()) {
    try {
      std::size_t used = 0;
      value = std::stod(found->second, &used);
      if (used != found->second.size()) throw std::invalid_argument("trailing");
    } catch (const std::exception&) {
      fail(ErrorKind::kUsage, "selector {}: {}={} is not a number", spec_.name, key, found->second);
    }
  }
  if (!(value >= minimum && value <= maximum)) {
    fail(ErrorKind::kUsage, "selector {}: {}={} (expected a value in [{}, {}])", spec_.name, key, value, minimum, maximum);
  }
  resolved_[key] = fmt::format("{:g}", value);
  return value;
}

std::string Selector::take_choice(const std::string& key, const std::set<std::string>& choices,
                                  const std::string& fallback) {
  known_keys_.insert(key);
  const auto found = spec_.params.find(key);
  const std::string value = found == spec_.params.end() ? fallback : found->second;
  if (!choices.count(value)) {
    std::string expected;
    for (const auto& c : choices) expected += (expected.empty() ? "" : ", ") + c;
    fail(ErrorKind::kUsage, "selector {}: {}={} (expected one of {})", spec_.name, key, value, expected);
  }
  resolved_[key] = value;
  return value;
}

std::vector<std::int64_t> Selector::take_int_list(const std::string& key, const std::string& fallback) {
  known_keys_.insert(key);
  const auto found = spec_.params.find(key);
  const std::string text = found == spec_.params.end() ? fallback : found->second;
  std::vector<std::int64_t> values;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t end = std::min(text.find('+', begin), text.size());
    const std::string part = text.substr(begin, end - begin);
    try {
      std::size_t used = 0;
      const long long value = std::stoll(part, &used);
      if (used != part.size() || value < 0 || value > kMaxSelectorInteger) throw std::invalid_argument("bad");
      values.push_back(value);
    } catch (const std::exception&) {
      fail(ErrorKind::kUsage, "selector {}: {}={} (expected non-negative integers joined by '+', e.g. 2+13)", spec_.name,
           key, text);
    }
    begin = end + 1;
  }
  std::sort(values.begin(), values.end());
  values.erase(std::unique(values.begin(), values.end()), values.end());
  std::string canonical;
  for (auto v : values) canonical += (canonical.empty() ? "" : "+") + std::to_string(v);
  resolved_[key] = canonical;
  return values;
}

std::string Selector::take_string(const std::string& key, const std::string& fallback) {
  known_keys_.insert(key);
  const auto found = spec_.params.find(key);
  const std::string value = found == spec_.params.end() ? fallback : found->second;
  if (!value.empty()) resolved_[key] = value;
  return value;
}

void Selector::restore_state(const std::vector<std::int32_t>& state) {
  if (!state.empty()) fail(ErrorKind::kInput, "selector {}: a checkpoint holds state for a selector that keeps none", label_);
}

std::string Selector::resolved(const std::string& key) const {
  const auto found = resolved_.find(key);
  return found == resolved_.end() ? std::string() : found->second;
}

void Selector::reject_unknown_keys() const {
  for (const auto& [key, value] : spec_.params) {
    if (!known_keys_.count(key)) {
      std::string expected;
      for (const auto& k : known_keys_) expected += (expected.empty() ? "" : ", ") + k;
      fail(ErrorKind::kUsage, "selector {}: unknown parameter '{}' (expected {})", spec_.name, key, expected);
    }
  }
}

void Selector::require_qk(const LayerContext& layer) const {
  if (!layer.has_qk) {
    fail(ErrorKind::kInput,
         "selector {} scores from q and k, but layer {} of the capture stores only attention probabilities (attn)",
         label_, layer.layer);
  }
}

std::string Selector::spec_text() const {
  std::string out = spec_.name;
  char separator = ':';
  for (const auto& [key, value] : resolved_) {
    out += separator + key + "=" + value;
    separator = ',';
  }
  return out;
}

std::unique_ptr<Selector> make_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  for (const auto& [name, factory] : registry()) {
    if (name == spec.name) return factory(spec, defaults);
  }
  std::string names;
  for (const auto& [name, factory] : registry()) names += (names.empty() ? "" : ", ") + name;
  fail(ErrorKind::kUsage, "unknown selector '{}' (expected one of {}, or all)", spec.name, names);
}

std::vector<std::string> selector_names() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : registry()) names.push_back(name);
  return names;
}

std::vector<SelectorSpec> expand_selector_specs(const std::vector<SelectorSpec>& specs) {
  std::vector<SelectorSpec> out;
  for (const auto& spec : specs) {
    if (spec.name != "all") {
      out.push_back(spec);
      continue;
    }
    if (!spec.params.empty()) fail(ErrorKind::kUsage, "--selectors: 'all' takes no parameters (got {})", spec.text());
    for (const auto& name : selector_names()) out.push_back({name, {}});
  }
  return out;
}

}  // namespace hysparse
