// The replay's text parsers on one fuzzed string each run: selector lists (parsed, expanded, every
// selector built and its parameters resolved and checked against a small replay plan), token budgets,
// sparsity budgets, token counts and query-row specs. The corpus (tests/fuzz/corpus/replay_options)
// holds plain-text specs, valid and invalid.
//
// Allowed outcomes: success or Error(kUsage) (a bad option); Error(kResource) only for work sized by
// the option itself. Everything else is a finding.
#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "fuzz_support.hpp"
#include "replay/options.hpp"
#include "replay/selector.hpp"

namespace {

using hysparse::ErrorKind;

hysparse::CaptureHeader small_header() {
  hysparse::CaptureHeader header;
  header.model = "fuzz";
  header.source = "fuzz";
  header.num_layers = 4;
  header.num_q_heads = 4;
  header.num_kv_heads = 2;
  header.head_dim = 16;
  header.seq_len = 256;
  return header;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  hysparse::fuzz::limit_memory_budget();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  static const hysparse::CaptureHeader header = small_header();

  std::vector<hysparse::Budget> budgets = {{hysparse::Budget::Kind::kTokens, 64}};
  hysparse::fuzz::expect_clean([&] { budgets = hysparse::parse_token_budgets(text); }, {ErrorKind::kUsage});
  hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_sparsity_budgets(text); }, {ErrorKind::kUsage});
  hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_token_count(text, "--fuzz"); }, {ErrorKind::kUsage});
  for (std::int64_t seq_len : {1, 256}) {
    hysparse::fuzz::expect_clean([&] { (void)hysparse::select_query_rows(text, seq_len, 7); }, {ErrorKind::kUsage});
  }
  hysparse::fuzz::expect_clean(
      [&] {
        const auto specs = hysparse::expand_selector_specs(hysparse::parse_selector_list(text));
        hysparse::ReplayPlan plan;
        plan.header = &header;
        plan.rows = {200, 230, 255};
        plan.budgets = budgets;
        plan.seed = 7;
        for (const auto& spec : specs) {
          const auto selector = hysparse::make_selector(spec, hysparse::SelectorDefaults{});
          (void)selector->spec_text();
          (void)selector->description();
          (void)selector->info();
          selector->begin(plan);
          for (std::int64_t layer = 0; layer < header.num_layers; ++layer) (void)selector->role(layer);
          for (const auto& budget : budgets) (void)selector->budget_tokens_at_end(budget, header.seq_len);
        }
      },
      {ErrorKind::kUsage, ErrorKind::kResource});
  return 0;
}
