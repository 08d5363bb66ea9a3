#include "replay/selector.hpp"

#include <algorithm>
#include <functional>
#include <numeric>

#include "common/error.hpp"

namespace hysparse {

std::unique_ptr<Selector> make_oracle_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_swa_selector(const SelectorSpec&, const SelectorDefaults&);
std::unique_ptr<Selector> make_hysparse_selector(const SelectorSpec&, const SelectorDefaults&);

namespace {
using Factory = std::function<std::unique_ptr<Selector>(const SelectorSpec&, const SelectorDefaults&)>;
// The registry: one line per selector.
const std::map<std::string, Factory>& registry() {
  static const std::map<std::string, Factory> entries = {
      {"oracle", make_oracle_selector},
      {"swa", make_swa_selector},
      {"hysparse", make_hysparse_selector},
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
}

void rank_top(const double* scores, std::int64_t num, std::int64_t count, std::int32_t* out) {
  thread_local std::vector<std::int32_t> order;
  order.resize(static_cast<std::size_t>(num));
  std::iota(order.begin(), order.end(), 0);
  count = std::min(count, num);
  auto better = [scores](std::int32_t a, std::int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  if (count < num) {
    std::nth_element(order.begin(), order.begin() + count, order.end(), better);
  }
  std::sort(order.begin(), order.begin() + count, better);
  std::copy(order.begin(), order.begin() + count, out);
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

Selector::Selector(const SelectorSpec& spec, const SelectorDefaults& defaults) : spec_(spec), label_(spec.name) {
  block_ = take_int("block", defaults.block, 1);
  sinks_ = take_int("sinks", defaults.sinks, 0);
  window_ = defaults.window;
}

std::int64_t Selector::take_int(const std::string& key, std::int64_t fallback, std::int64_t minimum) {
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
  if (value < minimum) fail(ErrorKind::kUsage, "selector {}: {}={} (expected >= {})", spec_.name, key, value, minimum);
  resolved_[key] = std::to_string(value);
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

void Selector::reject_unknown_keys() const {
  for (const auto& [key, value] : spec_.params) {
    if (!known_keys_.count(key)) {
      std::string expected;
      for (const auto& k : known_keys_) expected += (expected.empty() ? "" : ", ") + k;
      fail(ErrorKind::kUsage, "selector {}: unknown parameter '{}' (expected {})", spec_.name, key, expected);
    }
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
  const auto found = registry().find(spec.name);
  if (found == registry().end()) {
    std::string names;
    for (const auto& [name, factory] : registry()) names += (names.empty() ? "" : ", ") + name;
    fail(ErrorKind::kUsage, "unknown selector '{}' (expected one of {})", spec.name, names);
  }
  return found->second(spec, defaults);
}

std::vector<std::string> selector_names() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : registry()) names.push_back(name);
  return names;
}

}  // namespace hysparse
