#pragma once
// Everything a replay is asked to do, parsed and validated before any work.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace hysparse {

// A budget applies per row: tokens k -> floor(k/B) blocks; sparsity s -> ceil((1-s)(t+1)/B) blocks.
struct Budget {
  enum class Kind { kTokens, kSparsity };
  Kind kind = Kind::kTokens;
  double value = 0;
  std::int64_t blocks_for_row(std::int64_t t, std::int64_t block) const;
  std::string label() const;  // "1024" or "s=0.9"
};

// Parses "256,512,1K" (tokens) or "0.5,0.9" (sparsity) into budgets; errors are kUsage.
std::vector<Budget> parse_token_budgets(const std::string& text);
std::vector<Budget> parse_sparsity_budgets(const std::string& text);
std::int64_t parse_token_count(const std::string& text, const char* what);  // "4K" = 4096

// "all", "last:N", "stride:S", "random:N" -> ascending positions in [0, seq_len).
std::vector<std::int64_t> select_query_rows(const std::string& spec, std::int64_t seq_len, std::uint64_t seed);

// A selector spec "name:key=value,key=value".
struct SelectorSpec {
  std::string name;
  std::map<std::string, std::string> params;
  std::string text() const;  // canonical form, keys sorted
};
// "oracle,swa:window=128,hysparse:group=sum,score=mass": a token with '=' and no ':'
// continues the previous spec.
std::vector<SelectorSpec> parse_selector_list(const std::string& text);

struct ReplayOptions {
  std::vector<Budget> budgets;
  std::int64_t block_size = 64;
  std::int64_t sinks = 0;
  std::int64_t window = 0;
  std::string queries = "all";
  std::vector<SelectorSpec> selectors;
  std::string schedule;                // for hysparse; empty: from layer_types or "1:3"
  std::int64_t reuse_budget = 1024;    // tokens, for the cross-layer reuse matrix; 0 disables it
  bool output_error = true;            // when v is captured
  std::uint64_t seed = 0;
  std::string device = "cpu";
  std::string precision = "fp32";        // logits from fp32, or bf16/fp16 inputs on tensor cores (cuda)
  std::int64_t tile_rows = 0;            // query rows per statistics request; 0: the backend's preference
  std::int64_t walk_steps_per_flush = 0; // output-walk steps held before they are evaluated; 0: the default (tests)
};

}  // namespace hysparse
