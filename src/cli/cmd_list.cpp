// hysparse list: every registered selector with its defaults, granularity, budget semantics,
// post-RoPE handling and KV price (from the one footprint table).
#include <fmt/ranges.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "common/error.hpp"
#include "replay/selector.hpp"

namespace hysparse::cli {

void add_list_command(CLI::App& app) {
  struct State {
    std::string name;
    std::int64_t head_dim = 128, group_size = 4, kv_heads = 8;
    bool json = false;
  };
  auto st = std::make_shared<State>();
  CLI::App* cmd = app.add_subcommand("list", "List the replay selectors: defaults, granularity, budget, post-RoPE, KV price");
  cmd->add_option("name", st->name, "Only this selector");
  cmd->add_option("--head-dim", st->head_dim, "Head dimension for the metadata bytes")->capture_default_str();
  cmd->add_option("--group-size", st->group_size, "Query heads per KV head (per-query-head metadata)")->capture_default_str();
  cmd->add_option("--kv-heads", st->kv_heads, "KV heads (per-layer metadata is shared by them)")->capture_default_str();
  cmd->add_flag("--json", st->json, "One JSON document instead of text");
  cmd->callback([st]() {
    if (st->head_dim < 1 || st->group_size < 1 || st->kv_heads < 1) {
      fail(ErrorKind::kUsage, "--head-dim, --group-size and --kv-heads must be positive");
    }
    std::vector<std::string> names = selector_names();
    if (!st->name.empty()) {
      if (std::find(names.begin(), names.end(), st->name) == names.end()) {
        fail(ErrorKind::kUsage, "unknown selector '{}' (expected one of {})", st->name, fmt::join(names, ", "));
      }
      names = {st->name};
    }
    nlohmann::json all = nlohmann::json::array();
    if (!st->json) {
      fmt::print("{} selectors; spec strings show every default. KV metadata in bytes per token per KV head at head_dim "
                 "{}, bf16.\n",
                 names.size(), st->head_dim);
    }
    for (const auto& name : names) {
      const auto selector = make_selector(SelectorSpec{name, {}}, SelectorDefaults{});
      const SelectorInfo info = selector->info();
      const SelectorPrice price = selector_price(info, st->head_dim, st->group_size, st->kv_heads);
      const std::string cache = info.evicts ? "evicts keys for good" : "keeps the full KV cache";
      if (st->json) {
        all.push_back({{"name", name},
                       {"spec", selector->spec_text()},
                       {"description", selector->description()},
                       {"granularity", info.granularity},
                       {"budget", info.budget},
                       {"budget_use", to_string(selector->budget_use())},
                       {"post_rope", info.post_rope},
                       {"evicts", info.evicts},
                       {"kv_footprint", price.footprint},
                       {"kv_residency", price.residency},
                       {"kv_metadata", price.formula},
                       {"kv_metadata_bytes_per_token_per_kv_head", price.metadata_bytes_per_token},
                       {"calibration", info.calibration.empty() ? "none" : info.calibration},
                       {"source", info.source}});
        continue;
      }
      fmt::print("\n{}\n", selector->spec_text());
      fmt::print("  selection    {}\n", selector->description());
      fmt::print("  granularity  {}\n", info.granularity);
      fmt::print("  budget       {} [{}]\n", info.budget, to_string(selector->budget_use()));
      fmt::print("  post-RoPE    {}\n", info.post_rope);
      if (!info.calibration.empty()) fmt::print("  calibration  {}\n", info.calibration);
      fmt::print("  KV           {}; footprint '{}' ({}); metadata {} = {:g} B/token/KV head\n", cache, price.footprint,
                 price.residency, price.formula, price.metadata_bytes_per_token);
      fmt::print("  source       {}\n", info.source);
    }
    if (st->json) fmt::print("{}\n", all.dump(2));
  });
}

}  // namespace hysparse::cli
