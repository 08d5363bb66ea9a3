// hysparse kv: KV-cache memory accounting for a model shape x methods x contexts.
#include <fmt/ranges.h>

#include <cstdio>
#include <memory>

#include "cli/commands.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/memory.hpp"
#include "common/provenance.hpp"
#include "common/sha256.hpp"
#include "kv/footprint.hpp"
#include "kv/hf_config.hpp"
#include "kv/kv.hpp"
#include "kv/presets.hpp"
#include "kv/report.hpp"
#include "kv/schedule.hpp"

namespace hysparse::cli {
namespace {

struct KvCliOptions {
  std::string preset, config, contexts = "4K,16K,32K,128K,1M", methods, dtype = "bf16", schedule, output;
  std::int64_t batch = 1, window = 128, topk = 1024, block = 64, budget = 1024, sinks = 0;
  bool json = false, list_presets = false, list_methods = false;
};

void print_presets() {
  for (const KvModel& m : kv_presets()) {
    fmt::print("{}\n    {}\n", m.name, describe_model(m).substr(m.name.size() + 2));
    if (!m.hybrid_schedule.empty()) {
      fmt::print("    hybrid: schedule {} ({}), window {}, top-k {}, block {}\n", m.hybrid_schedule,
                 describe_schedule(parse_schedule(m.hybrid_schedule, m.num_layers)), m.hybrid_window, m.hybrid_topk,
                 m.hybrid_block);
    }
    fmt::print("    source: {}\n", m.source);
  }
}

void print_methods() {
  for (const KvFootprint& f : kv_footprints()) {
    std::vector<std::string> params;
    for (const auto& p : f.params) params.push_back(fmt::format("{}={} ({})", p.name, p.value, p.meaning));
    fmt::print("{}  {}: {}{}\n", f.method, f.title, to_string(f.residency), f.evicts ? " (evicts)" : "");
    if (!params.empty()) fmt::print("    parameters: {}\n", fmt::join(params, "; "));
    fmt::print("    metadata: {}{}\n", f.metadata.empty() ? "none" : f.metadata.formula,
               f.metadata.empty() ? "" : std::string(" (") + to_string(f.metadata.scope) + ")");
    fmt::print("    source: {}\n", f.source);
    if (!f.note.empty()) fmt::print("    note: {}\n", f.note);
  }
}

}  // namespace

void add_kv_command(CLI::App& app) {
  auto o = std::make_shared<KvCliOptions>();
  CLI::App* cmd = app.add_subcommand(
      "kv", "KV-cache memory accounting: resident bytes, bytes read and attention FLOPs per method and context");
  cmd->add_option("--preset", o->preset, "Built-in model (see --list-presets), e.g. hysparse-80b-a3b");
  cmd->add_option("--config", o->config, "Hugging Face config.json of the model");
  cmd->add_option("--context", o->contexts, "Context lengths, K/M/G binary suffixes, e.g. 4K,32K,128K,1M")
      ->capture_default_str();
  cmd->add_option("--method", o->methods,
                  "Methods (see --list-methods), e.g. full,hybrid-swa,hysparse,quest:page=32,h2o or 'all'; default: "
                  "full, native (when the model has window layers), hybrid-swa and hysparse (when a schedule is known)");
  cmd->add_option("--dtype", o->dtype, "KV element type: bf16, fp16, fp32 or fp8")->capture_default_str();
  cmd->add_option("--batch", o->batch, "Sequences held at once (multiplies resident bytes)")->capture_default_str();
  cmd->add_option("--schedule", o->schedule,
                  "Full/sparse layers for hybrid-swa and hysparse: FSSS, 1:3 (last layer full), full=0,4,8, "
                  "hysparse-7b or hysparse-80b-a3b; default: the preset's");
  CLI::Option* window =
      cmd->add_option("--window", o->window, "Window tokens of every method that has one (default: each method's own)");
  CLI::Option* topk = cmd->add_option("--topk", o->topk, "HySparse top-k tokens per KV group (default: the preset's or 1024)");
  CLI::Option* block =
      cmd->add_option("--block", o->block, "Block size of every method that has one (default: each method's own)");
  CLI::Option* budget = cmd->add_option("--budget", o->budget,
                                        "Token budget of every selecting or evicting method (default: each method's own)");
  CLI::Option* sinks =
      cmd->add_option("--sinks", o->sinks, "Sink tokens of every method that has them (default: each method's own)");
  cmd->add_flag("--json", o->json, "Print JSON instead of the table");
  cmd->add_option("-o,--output", o->output, "Also write an HDF5 report");
  cmd->add_flag("--list-presets", o->list_presets, "List the built-in models and exit");
  cmd->add_flag("--list-methods", o->list_methods, "List the methods with their parameters, metadata and sources");
  cmd->footer(
      "Numbers are per sequence unless marked 'whole batch'. Byte counts are exact (uint64, overflow-checked). "
      "Global --window/--topk/--block/--budget/--sinks apply only when given; method keys (quest:page=32) win.");

  cmd->callback([=]() {
    if (o->list_presets || o->list_methods) {
      if (o->list_presets) print_presets();
      if (o->list_methods) print_methods();
      return;
    }
    if (o->preset.empty() == o->config.empty()) {
      fail(ErrorKind::kUsage, "give exactly one of --preset NAME or --config config.json (see --list-presets)");
    }
    if (o->batch <= 0) fail(ErrorKind::kUsage, "--batch {}: expected a positive integer", o->batch);
    const std::vector<std::pair<CLI::Option*, std::int64_t>> globals = {
        {window, o->window}, {topk, o->topk}, {block, o->block}, {budget, o->budget}, {sinks, o->sinks}};
    for (const auto& [option, value] : globals) {
      if (option->count() > 0 && value < 0) fail(ErrorKind::kUsage, "{} {}: expected >= 0", option->get_name(), value);
    }
    if (block->count() > 0 && o->block == 0) fail(ErrorKind::kUsage, "--block 0: expected >= 1");

    Provenance provenance = make_provenance(0, nullptr);
    provenance.backend = "cpu";
    provenance.device = "analytic";
    const KvModel model = o->preset.empty() ? kv_model_from_hf_config(o->config) : find_kv_preset(o->preset);
    if (!o->config.empty()) provenance.add_input(o->config);

    KvOverrides overrides;
    overrides.schedule = o->schedule;
    if (!o->schedule.empty()) (void)parse_schedule(o->schedule, model.num_layers);  // early, clear error
    if (window->count()) overrides.values.emplace_back("window", o->window);
    if (topk->count()) overrides.values.emplace_back("topk", o->topk);
    if (block->count()) overrides.values.emplace_back("block", o->block);
    if (budget->count()) overrides.values.emplace_back("budget", o->budget);
    if (sinks->count()) overrides.values.emplace_back("sinks", o->sinks);

    const std::vector<std::string> specs =
        o->methods.empty() ? default_method_specs(model, overrides) : split_method_list(o->methods, model, overrides);
    std::vector<KvMethod> methods;
    for (const auto& spec : specs) methods.push_back(resolve_method(spec, model, overrides));
    const KvDtype dtype = parse_kv_dtype(o->dtype);
    const std::vector<std::uint64_t> contexts = parse_contexts(o->contexts);

    // Check the destination before any work; the report appears whole or not at all.
    std::unique_ptr<AtomicOutput> out = o->output.empty() ? nullptr : std::make_unique<AtomicOutput>(o->output);
    // One record per layer, method and context: refused before building when it cannot fit.
    require_memory(checked_mul(checked_mul(methods.size(), contexts.size(), "KV table size"),
                               checked_mul(static_cast<std::uint64_t>(model.num_layers), sizeof(KvLayerAccount), "KV table size"),
                               "KV table size"),
                   fmt::format("the KV table of {} ({} layers x {} methods x {} contexts)", model.name, model.num_layers,
                               methods.size(), contexts.size()));
    const KvTable table = compute_kv_table(model, methods, dtype, static_cast<std::uint64_t>(o->batch), contexts);
    if (o->json) {
      fmt::print("{}\n", kv_table_json(table).dump(2));
    } else {
      fmt::print("{}", format_kv_text(table));
    }
    if (out) {
      if (o->config.empty()) {
        // A preset is built in: record its name and a hash of its definition as the input.
        provenance.input_files.push_back("preset:" + model.name);
        provenance.input_sha256.push_back(sha256_hex(kv_table_json(table)["model"].dump()));
      }
      {
        h5::File file = h5::File::create(out->temporary_path());
        write_provenance(file, kKvReportFormat, kKvReportFormatVersion, provenance);
        write_kv_table(file, "/", table);
        file.close();
      }
      out->commit();
      std::fprintf(o->json ? stderr : stdout, "wrote %s\n", o->output.c_str());
    }
  });
}

}  // namespace hysparse::cli
