#include "replay/options.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "common/error.hpp"
#include "common/random.hpp"

namespace hysparse {
namespace {

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream stream(text);
  while (std::getline(stream, part, separator)) parts.push_back(part);
  if (!text.empty() && text.back() == separator) parts.emplace_back();
  return parts;
}

std::string trim(const std::string& s) {
  const auto begin = s.find_first_not_of(" \t");
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(" \t") - begin + 1);
}

std::int64_t parse_positive_integer(const std::string& text, const char* what) {
  try {
    std::size_t used = 0;
    const long long value = std::stoll(text, &used);
    if (used == text.size() && value > 0) return value;
  } catch (const std::exception&) {
  }
  fail(ErrorKind::kUsage, "{} '{}': expected a positive integer", what, text);
}

}  // namespace

std::int64_t Budget::blocks_for_row(std::int64_t t, std::int64_t block) const {
  if (kind == Kind::kTokens) return static_cast<std::int64_t>(value) / block;
  // The 1e-9 keeps decimal sparsities (0.7 of 10 keys = 3 keys) from rounding up by binary error.
  const double keep = (1.0 - value) * static_cast<double>(t + 1);
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(keep / static_cast<double>(block) - 1e-9)));
}

std::string Budget::label() const {
  if (kind == Kind::kTokens) return std::to_string(static_cast<std::int64_t>(value));
  return fmt::format("s={:g}", value);
}

std::int64_t parse_token_count(const std::string& raw, const char* what) {
  std::string text = trim(raw);
  std::int64_t multiplier = 1;
  if (!text.empty() && (text.back() == 'K' || text.back() == 'k')) multiplier = 1024;
  if (!text.empty() && (text.back() == 'M' || text.back() == 'm')) multiplier = 1024 * 1024;
  if (multiplier != 1) text.pop_back();
  const std::int64_t count = parse_positive_integer(text, what);
  if (count > std::numeric_limits<std::int64_t>::max() / multiplier) {
    fail(ErrorKind::kUsage, "{} '{}': overflows 64 bits (expected a token count below 2^63)", what, raw);
  }
  return count * multiplier;
}

std::vector<Budget> parse_token_budgets(const std::string& text) {
  std::vector<Budget> budgets;
  for (const auto& part : split(text, ',')) {
    budgets.push_back({Budget::Kind::kTokens, static_cast<double>(parse_token_count(part, "--budget"))});
  }
  if (budgets.empty()) fail(ErrorKind::kUsage, "--budget: expected a list of token counts such as 256,1024");
  std::sort(budgets.begin(), budgets.end(), [](const Budget& a, const Budget& b) { return a.value < b.value; });
  budgets.erase(std::unique(budgets.begin(), budgets.end(), [](const Budget& a, const Budget& b) { return a.value == b.value; }),
                budgets.end());
  return budgets;
}

std::vector<Budget> parse_sparsity_budgets(const std::string& text) {
  std::vector<Budget> budgets;
  for (const auto& part : split(text, ',')) {
    double value = -1;
    try {
      std::size_t used = 0;
      value = std::stod(trim(part), &used);
      if (used != trim(part).size()) value = -1;
    } catch (const std::exception&) {
    }
    if (!(value >= 0.0 && value < 1.0)) {
      fail(ErrorKind::kUsage, "--sparsity '{}': expected a fraction of the row to drop, in [0, 1)", part);
    }
    budgets.push_back({Budget::Kind::kSparsity, value});
  }
  // Ascending budget = descending sparsity, so the budget axis grows like the token one.
  std::sort(budgets.begin(), budgets.end(), [](const Budget& a, const Budget& b) { return a.value > b.value; });
  budgets.erase(std::unique(budgets.begin(), budgets.end(), [](const Budget& a, const Budget& b) { return a.value == b.value; }),
                budgets.end());
  return budgets;
}

std::vector<std::int64_t> select_query_rows(const std::string& spec, std::int64_t seq_len, std::uint64_t seed) {
  std::vector<std::int64_t> rows;
  const auto colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string argument = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (kind == "all" && colon == std::string::npos) {
    for (std::int64_t t = 0; t < seq_len; ++t) rows.push_back(t);
  } else if (kind == "last" && !argument.empty()) {
    const std::int64_t n = std::min(seq_len, parse_token_count(argument, "--queries last:N"));
    for (std::int64_t t = seq_len - n; t < seq_len; ++t) rows.push_back(t);
  } else if (kind == "stride" && !argument.empty()) {
    const std::int64_t stride = parse_token_count(argument, "--queries stride:S");
    for (std::int64_t t = seq_len - 1; t >= 0; t -= stride) rows.push_back(t);
    std::reverse(rows.begin(), rows.end());
  } else if (kind == "random" && !argument.empty()) {
    const std::int64_t n = std::min(seq_len, parse_token_count(argument, "--queries random:N"));
    // Partial Fisher-Yates over positions with our deterministic generator.
    std::vector<std::int64_t> all(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) all[static_cast<std::size_t>(t)] = t;
    Rng rng(mix_seed(seed, 0x51e7));
    for (std::int64_t i = 0; i < n; ++i) {
      const auto j = i + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(seq_len - i)));
      std::swap(all[static_cast<std::size_t>(i)], all[static_cast<std::size_t>(j)]);
    }
    rows.assign(all.begin(), all.begin() + n);
    std::sort(rows.begin(), rows.end());
  } else {
    fail(ErrorKind::kUsage, "--queries '{}': expected all, last:N, stride:S or random:N", spec);
  }
  return rows;
}

std::string SelectorSpec::text() const {
  std::string out = name;
  char separator = ':';
  for (const auto& [key, value] : params) {
    out += separator + key + "=" + value;
    separator = ',';
  }
  return out;
}

std::vector<SelectorSpec> parse_selector_list(const std::string& text) {
  std::vector<SelectorSpec> specs;
  for (const auto& raw : split(text, ',')) {
    const std::string token = trim(raw);
    if (token.empty()) fail(ErrorKind::kUsage, "--selectors '{}': empty entry", text);
    const auto colon = token.find(':');
    const auto equals = token.find('=');
    std::string assignment;
    if (colon != std::string::npos && (equals == std::string::npos || colon < equals)) {
      specs.push_back({token.substr(0, colon), {}});
      assignment = token.substr(colon + 1);
    } else if (equals != std::string::npos) {
      if (specs.empty()) fail(ErrorKind::kUsage, "--selectors '{}': parameter '{}' before any selector name", text, token);
      assignment = token;
    } else {
      specs.push_back({token, {}});
      continue;
    }
    const auto eq = assignment.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == assignment.size()) {
      fail(ErrorKind::kUsage, "--selectors: '{}' is not key=value", assignment);
    }
    const std::string key = trim(assignment.substr(0, eq));
    if (specs.back().params.count(key)) fail(ErrorKind::kUsage, "--selectors: '{}' given twice for {}", key, specs.back().name);
    specs.back().params[key] = trim(assignment.substr(eq + 1));
  }
  return specs;
}

}  // namespace hysparse
