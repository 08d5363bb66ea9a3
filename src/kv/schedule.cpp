#include "kv/schedule.hpp"

#include <algorithm>
#include <limits>

#include <fmt/ranges.h>

#include "common/error.hpp"

namespace hysparse {
namespace {

struct SchedulePreset {
  const char* name;
  std::int64_t num_layers;
  const char* rule;  // the equivalent spec
};

// HySparse (arXiv 2602.03560) Table 1 and Section 3: 7B dense is 1:3 over 36 layers with the final layer
// full (10 full layers); 80B-A3B is 1:11 over 49 layers, "only 5 layers use full attention".
const SchedulePreset kPresets[] = {
    {"hysparse-7b", 36, "1:3"},
    {"hysparse-80b-a3b", 49, "1:11"},
};

bool all_digits(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A non-negative decimal integer without sign, spaces or overflow.
bool parse_count(const std::string& text, std::int64_t& value) {
  if (!all_digits(text) || text.size() > 18) return false;
  value = std::stoll(text);
  return true;
}

std::vector<bool> ratio_schedule(std::int64_t full, std::int64_t sparse, std::int64_t num_layers) {
  const std::int64_t period = full + sparse;
  std::vector<bool> result(static_cast<std::size_t>(num_layers));
  for (std::int64_t i = 0; i < num_layers; ++i) result[static_cast<std::size_t>(i)] = i % period < full;
  result.back() = true;  // "for all hybrid models, the final layer uses full attention"
  return result;
}

}  // namespace

std::vector<std::string> schedule_preset_names() {
  std::vector<std::string> names;
  for (const auto& preset : kPresets) names.emplace_back(preset.name);
  return names;
}

std::vector<bool> parse_schedule(const std::string& spec, std::int64_t num_layers) {
  if (num_layers <= 0) fail(ErrorKind::kUsage, "schedule '{}': the model has {} layers (expected > 0)", spec, num_layers);
  if (spec.empty()) {
    fail(ErrorKind::kUsage, "empty schedule (expected a pattern like FSSS, a ratio like 1:3, full=0,4,8 or a preset: {})",
         fmt::join(schedule_preset_names(), ", "));
  }
  std::vector<bool> full;

  // Presets.
  for (const auto& preset : kPresets) {
    if (spec != preset.name) continue;
    if (num_layers != preset.num_layers) {
      fail(ErrorKind::kUsage, "schedule '{}' is for a {}-layer model, but this model has {} layers", spec,
           preset.num_layers, num_layers);
    }
    return parse_schedule(preset.rule, num_layers);
  }

  if (spec.rfind("full=", 0) == 0) {
    // Explicit list of full layers.
    const std::string list = spec.substr(5);
    full.assign(static_cast<std::size_t>(num_layers), false);
    std::size_t begin = 0;
    while (true) {
      const std::size_t comma = list.find(',', begin);
      const std::string item = list.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
      std::int64_t index = 0;
      if (!parse_count(item, index)) {
        fail(ErrorKind::kUsage, "schedule '{}': '{}' is not a layer index (expected full=I,J,... with integers >= 0)",
             spec, item);
      }
      if (index >= num_layers) {
        fail(ErrorKind::kUsage, "schedule '{}': full layer {} is out of range (the model has layers 0..{})", spec, index,
             num_layers - 1);
      }
      if (full[static_cast<std::size_t>(index)]) fail(ErrorKind::kUsage, "schedule '{}': layer {} is listed twice", spec, index);
      full[static_cast<std::size_t>(index)] = true;
      if (comma == std::string::npos) break;
      begin = comma + 1;
    }
  } else if (spec.find(':') != std::string::npos) {
    // Ratio full:sparse.
    const std::size_t colon = spec.find(':');
    std::int64_t f = 0, s = 0;
    if (!parse_count(spec.substr(0, colon), f) || !parse_count(spec.substr(colon + 1), s)) {
      fail(ErrorKind::kUsage, "schedule '{}': malformed ratio (expected FULL:SPARSE with positive integers, e.g. 1:3)",
           spec);
    }
    if (f == 0 || s == 0) {
      fail(ErrorKind::kUsage,
           "schedule '{}': a ratio needs at least one full and one sparse layer per block (use the pattern F for "
           "all-full)",
           spec);
    }
    full = ratio_schedule(f, s, num_layers);
  } else {
    // Pattern of F/S repeated over the layers.
    for (std::size_t i = 0; i < spec.size(); ++i) {
      if (spec[i] != 'F' && spec[i] != 'S') {
        fail(ErrorKind::kUsage,
             "schedule '{}': character '{}' at position {} is not F or S (expected a pattern like FSSS, a ratio like "
             "1:3, full=0,4,8 or a preset: {})",
             spec, spec[i], i, fmt::join(schedule_preset_names(), ", "));
      }
    }
    if (static_cast<std::int64_t>(spec.size()) > num_layers) {
      fail(ErrorKind::kUsage, "schedule '{}': the pattern has {} letters but the model has only {} layers", spec,
           spec.size(), num_layers);
    }
    full.resize(static_cast<std::size_t>(num_layers));
    for (std::int64_t i = 0; i < num_layers; ++i) {
      full[static_cast<std::size_t>(i)] = spec[static_cast<std::size_t>(i) % spec.size()] == 'F';
    }
  }
  if (!full.front()) {
    fail(ErrorKind::kUsage, "schedule '{}': layer 0 must be full (a sparse layer reads the preceding full layer)", spec);
  }
  return full;
}

std::vector<std::int64_t> full_layer_indices(const std::vector<bool>& full) {
  std::vector<std::int64_t> indices;
  for (std::size_t i = 0; i < full.size(); ++i) {
    if (full[i]) indices.push_back(static_cast<std::int64_t>(i));
  }
  return indices;
}

std::string schedule_pattern(const std::vector<bool>& full) {
  std::string pattern;
  pattern.reserve(full.size());
  for (bool f : full) pattern += f ? 'F' : 'S';
  return pattern;
}

std::string describe_schedule(const std::vector<bool>& full) {
  const std::vector<std::int64_t> indices = full_layer_indices(full);
  const std::size_t sparse = full.size() - indices.size();
  return fmt::format("{} full + {} sparse layers, full = {}", indices.size(), sparse, fmt::join(indices, ","));
}

}  // namespace hysparse
