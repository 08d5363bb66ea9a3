#pragma once
// What each selector of a replay costs in KV-cache memory, priced by the one footprint table
// (kv/footprint.hpp) through the same accounting as `hysparse kv`: the replayed model's shape,
// bf16 K/V, batch 1, at the capture's length, with the selector's own parameters and, per
// budget, the tokens the selector keeps (evicting methods) or attends at the last position.
#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "replay/options.hpp"
#include "replay/selector.hpp"

namespace hysparse {

struct SelectorKvPrice {
  std::vector<double> resident_bytes;  // [budget]: K/V + metadata, whole model; NaN where the budget does not apply
  double full_attention_bytes = 0;     // the same model with every layer full, no metadata
  std::vector<std::string> methods;    // [budget]: the accounting method as resolved ("" where NaN)
};

// `is_full_layer` is the selector's per-layer role (a hybrid layout's schedule); `applicable` is
// per budget (a token budget below one block selects nothing).
SelectorKvPrice price_selector_kv(const CaptureHeader& header, const Selector& selector,
                                  const std::vector<std::int64_t>& is_full_layer, const std::vector<Budget>& budgets,
                                  const std::vector<char>& applicable);

}  // namespace hysparse
