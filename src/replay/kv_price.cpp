#include "replay/kv_price.hpp"

#include <algorithm>
#include <limits>

#include "kv/kv.hpp"

namespace hysparse {

SelectorKvPrice price_selector_kv(const CaptureHeader& header, const Selector& selector,
                                  const std::vector<std::int64_t>& is_full_layer, const std::vector<Budget>& budgets,
                                  const std::vector<char>& applicable) {
  const KvModel model = kv_model_from_shape(header.model, header.num_layers, header.num_q_heads, header.num_kv_heads,
                                            header.head_dim, header.layer_types, header.sliding_window);
  const SelectorInfo info = selector.info();
  // The selector's own footprint parameters take precedence (spec keys beat overrides).
  std::string spec = info.footprint;
  char separator = ':';
  for (const auto& [key, value] : info.footprint_params) {
    spec += separator + key + "=" + std::to_string(value);
    separator = ',';
  }
  KvOverrides overrides;
  for (std::int64_t full : is_full_layer) overrides.schedule += full ? 'F' : 'S';
  const auto T = static_cast<std::uint64_t>(header.seq_len);

  SelectorKvPrice price;
  for (std::size_t bi = 0; bi < budgets.size(); ++bi) {
    if (!applicable[bi]) {
      price.resident_bytes.push_back(std::numeric_limits<double>::quiet_NaN());
      price.methods.emplace_back();
      continue;
    }
    const std::int64_t wanted = std::max<std::int64_t>(0, selector.budget_tokens_at_end(budgets[bi], header.seq_len));
    const std::int64_t tokens = std::min(wanted, header.seq_len);
    // top-k counts whole blocks: at most the blocks covering the capture.
    const std::int64_t B = std::max<std::int64_t>(1, selector.block_size());
    const std::int64_t topk = std::min(wanted / B * B, (header.seq_len + B - 1) / B * B);
    // A window of 0 without sinks is priced as 1: a layer stores at least the current token's own K/V.
    const std::int64_t window = selector.window() >= 0 ? selector.window() : tokens;
    overrides.values = {{"budget", tokens},
                        {"topk", topk},
                        {"window", window + selector.sinks() > 0 ? window : 1},
                        {"sinks", selector.sinks()},
                        {"block", selector.block_size()}};
    const KvMethod method = resolve_method(spec, model, overrides);
    const KvAccounting account_at_end = account(model, method, KvDtype::kBf16, 1, T);
    price.resident_bytes.push_back(static_cast<double>(account_at_end.resident_bytes));
    price.full_attention_bytes = static_cast<double>(account_at_end.full_attention_bytes);
    price.methods.push_back(method.describe());
  }
  if (price.full_attention_bytes == 0) {
    price.full_attention_bytes = static_cast<double>(kv_bytes_per_token_full(model, KvDtype::kBf16)) * static_cast<double>(T);
  }
  return price;
}

}  // namespace hysparse
