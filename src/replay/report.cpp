#include "replay/report.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/atomic_file.hpp"
#include "io/h5.hpp"
#include "kv/kv.hpp"
#include "kv/report.hpp"

namespace hysparse {
namespace {

// A table at `full` (a path under `root`: "" or a group such as /captures/0), its dimensions attached to root/axes.
void write_table(const h5::File& file, const std::string& root, const std::string& full, const Table& table,
                 const std::vector<std::string>& axes, const char* units, const std::string& long_name) {
  h5::write_doubles(file, full, table.dims, table.values.data());
  h5::write_attribute(file, full, "units", units);
  h5::write_attribute(file, full, "long_name", long_name);
  h5::label_dimensions(file, full, axes);
  for (unsigned i = 0; i < axes.size(); ++i) h5::attach_scale(file, full, root + "/axes/" + axes[i], i);
}

std::string budget_units(const ReplayResult& r) {
  return r.budgets.front().kind == Budget::Kind::kTokens ? "tokens" : "1";
}

nlohmann::json options_json(const ReplayOptions& o) {
  nlohmann::json j;
  std::vector<std::string> budgets, selectors;
  for (const auto& b : o.budgets) budgets.push_back(b.label());
  for (const auto& s : o.selectors) selectors.push_back(s.text());
  j["budgets"] = budgets;
  j["budget_kind"] = o.budgets.empty() || o.budgets.front().kind == Budget::Kind::kTokens ? "tokens" : "sparsity";
  j["block"] = o.block_size;
  j["sinks"] = o.sinks;
  j["window"] = o.window;
  j["queries"] = o.queries;
  j["selectors"] = selectors;
  j["schedule"] = o.schedule;
  j["reuse_budget"] = o.reuse_budget;
  j["output_error"] = o.output_error;
  j["seed"] = o.seed;
  j["device"] = o.device;
  j["precision"] = o.precision;
  j["tile_rows"] = o.tile_rows;
  return j;
}

}  // namespace

void write_replay_report(const std::string& path, const ReplayResult& r, const ReplayOptions& options,
                         const Provenance& provenance) {
  AtomicOutput output(path);
  h5::File file = h5::File::create(output.temporary_path());
  write_provenance(file, kReportFormat, kReportFormatVersion, provenance);
  write_config_group(file, "/config", options_json(options));
  write_replay_content(file, "", r, options.schedule);
  h5::write_attribute(file, "/", "replay_seconds", r.seconds);
  h5::write_attribute(file, "/", "score_elements", static_cast<std::int64_t>(r.score_elements));
  file.close();
  output.commit();
}

void write_config_group(const h5::File& file, const std::string& group, const nlohmann::json& config) {
  // Every option, as attributes and as one JSON document.
  h5::create_group(file, group);
  h5::write_attribute(file, group, "json", config.dump());
  for (const auto& [key, value] : config.items()) {
    if (value.is_string()) h5::write_attribute(file, group, key, value.get<std::string>());
    else if (value.is_number_integer() || value.is_boolean()) h5::write_attribute(file, group, key, value.is_boolean() ? std::int64_t{value.get<bool>()} : value.get<std::int64_t>());
    else h5::write_attribute(file, group, key, value.dump());
  }
}

void write_replay_content(const h5::File& file, const std::string& root, const ReplayResult& r,
                          const std::string& schedule) {
  if (!root.empty()) h5::create_group(file, root);
  // The replayed capture.
  const CaptureHeader& h = r.header;
  h5::create_group(file, root + "/capture");
  h5::write_attribute(file, root + "/capture", "path", r.capture_path);
  h5::write_attribute(file, root + "/capture", "model", h.model);
  h5::write_attribute(file, root + "/capture", "source", h.source);
  h5::write_attribute(file, root + "/capture", "num_layers", h.num_layers);
  h5::write_attribute(file, root + "/capture", "num_q_heads", h.num_q_heads);
  h5::write_attribute(file, root + "/capture", "num_kv_heads", h.num_kv_heads);
  h5::write_attribute(file, root + "/capture", "head_dim", h.head_dim);
  h5::write_attribute(file, root + "/capture", "seq_len", h.seq_len);
  h5::write_attribute(file, root + "/capture", "softmax_scale", h.effective_softmax_scale());

  // Axes, as HDF5 dimension scales.
  std::vector<double> budget_values;
  std::vector<std::string> budget_labels;
  for (const auto& b : r.budgets) {
    budget_values.push_back(b.value);
    budget_labels.push_back(b.label());
  }
  h5::write_doubles(file, root + "/axes/budget", {budget_values.size()}, budget_values.data());
  h5::write_attribute(file, root + "/axes/budget", "kind", r.budgets.front().kind == Budget::Kind::kTokens ? "tokens" : "sparsity");
  h5::write_attribute(file, root + "/axes/budget", "units", budget_units(r));
  h5::write_attribute(file, root + "/axes/budget", "long_name",
                      r.budgets.front().kind == Budget::Kind::kTokens
                          ? "selection budget in tokens (floor(k/B) blocks per row; forced keys extra)"
                          : "sparsity: fraction of the causal row dropped (ceil((1-s)(t+1)/B) blocks per row)");
  h5::write_attribute(file, root + "/axes/budget", "labels", budget_labels);
  std::vector<std::int64_t> layers(static_cast<std::size_t>(h.num_layers)), heads(static_cast<std::size_t>(h.num_q_heads));
  for (std::size_t i = 0; i < layers.size(); ++i) layers[i] = static_cast<std::int64_t>(i);
  for (std::size_t i = 0; i < heads.size(); ++i) heads[i] = static_cast<std::int64_t>(i);
  h5::write_ints(file, root + "/axes/layer", {layers.size()}, layers.data());
  h5::write_ints(file, root + "/axes/head", {heads.size()}, heads.data());
  h5::write_ints(file, root + "/axes/query_position", {r.rows.size()}, r.rows.data());
  h5::write_ints(file, root + "/axes/source_layer", {layers.size()}, layers.data());
  h5::write_attribute(file, root + "/axes/layer", "units", "1");
  h5::write_attribute(file, root + "/axes/layer", "long_name", "layer index (0-based)");
  h5::write_attribute(file, root + "/axes/head", "long_name", "query head index (0-based); KV head = head / (num_q_heads / num_kv_heads)");
  h5::write_attribute(file, root + "/axes/source_layer", "units", "1");
  h5::write_attribute(file, root + "/axes/source_layer", "long_name", "layer whose selection is reused (reuse matrix rows)");
  h5::write_attribute(file, root + "/axes/head", "units", "1");
  h5::write_attribute(file, root + "/axes/query_position", "units", "tokens");
  h5::write_attribute(file, root + "/axes/query_position", "long_name", "evaluated query positions (0-based)");
  for (const char* axis : {"budget", "layer", "head", "query_position", "source_layer"}) {
    h5::make_scale(file, root + "/axes/" + axis, axis);
  }

  // Selectors.
  std::vector<std::string> labels;
  for (const auto& s : r.selectors) labels.push_back(s.label);
  h5::create_group(file, root + "/selectors");
  h5::write_attribute(file, root + "/selectors", "order", labels);
  h5::write_attribute(file, root + "/selectors", "kv_full_bytes", r.kv_full_bytes);
  const std::vector<std::string> bl = {"budget", "layer"}, blh = {"budget", "layer", "head"}, b = {"budget"};
  for (const auto& s : r.selectors) {
    const std::string g = root + "/selectors/" + s.label;
    h5::create_group(file, g);
    h5::write_attribute(file, g, "spec", s.spec);
    h5::write_attribute(file, g, "description", s.description);
    h5::write_attribute(file, g, "block_size", s.block);
    h5::write_attribute(file, g, "sinks", s.sinks);
    h5::write_attribute(file, g, "window", s.window);
    h5::write_attribute(file, g, "window_is_budget", std::int64_t{s.window < 0});
    h5::write_attribute(file, g, "selection", s.shared_by_group ? "shared by the heads of a KV group" : "per query head");
    h5::write_attribute(file, g, "granularity", s.info.granularity);
    h5::write_attribute(file, g, "budget_semantics", s.info.budget);
    h5::write_attribute(file, g, "budget_use", to_string(s.budget_use));
    h5::write_attribute(file, g, "post_rope", s.info.post_rope);
    h5::write_attribute(file, g, "source", s.info.source);
    h5::write_attribute(file, g, "calibrates", s.info.calibration.empty() ? std::string("nothing") : s.info.calibration);
    const SelectorPrice price = selector_price(s.info, h.head_dim, h.group_size(), h.num_kv_heads);
    h5::write_attribute(file, g, "evicts", std::int64_t{s.info.evicts});
    h5::write_attribute(file, g, "kv_footprint", price.footprint);
    h5::write_attribute(file, g, "kv_residency", price.residency);
    h5::write_attribute(file, g, "kv_metadata", price.formula);
    h5::write_attribute(file, g, "kv_metadata_bytes_per_token_per_kv_head", price.metadata_bytes_per_token);
    h5::write_attribute(file, g, "first_scored_position", s.first_scored);
    h5::write_attribute(file, g, "calibration", s.calibration.empty() ? std::string("none") : s.calibration);
    if (!s.kv_resident_bytes.empty()) {
      Table kv;
      kv.reset({s.kv_resident_bytes.size()}, 0.0);
      kv.values = s.kv_resident_bytes;
      write_table(file, root, g + "/kv_resident_bytes", kv, {"budget"}, "bytes",
                  "resident KV-cache bytes at the capture's length (bf16, batch 1, whole model, K/V + metadata) for "
                  "the tokens this selector keeps or attends at the last position; NaN where the budget does not apply");
      h5::write_attribute(file, g + "/kv_resident_bytes", "methods", s.kv_methods);
    }
    h5::write_ints(file, g + "/is_full_layer", {s.is_full_layer.size()}, s.is_full_layer.data());
    h5::write_attribute(file, g + "/is_full_layer", "units", "1");
    h5::write_attribute(file, g + "/is_full_layer", "long_name", "1 where the selector attends every key of the layer");
    h5::write_attribute(file, g, "label", s.label);
    h5::write_attribute(file, g, "name", s.spec.substr(0, s.spec.find(':')));
    h5::label_dimensions(file, g + "/is_full_layer", {"layer"});
    h5::attach_scale(file, g + "/is_full_layer", root + "/axes/layer", 0);
    for (int m = 0; m < kNumMetrics; ++m) {
      if (m == kOutputError && !r.has_output_error) continue;
      const std::string name = metric_name(m);
      write_table(file, root, g + "/" + name + "_mean", s.head_mean[m], blh, metric_units(m),
                  std::string("mean over query rows of the ") + metric_long_name(m));
      write_table(file, root, g + "/layer_" + name + "_mean", s.layer_mean[m], bl, metric_units(m),
                  std::string("mean over heads and rows of the ") + metric_long_name(m));
      write_table(file, root, g + "/model_" + name + "_mean", s.model_mean[m], b, metric_units(m),
                  std::string("mean over layers, heads and rows of the ") + metric_long_name(m));
      write_table(file, root, g + "/model_" + name + "_mean_sparse_layers", s.model_sparse_mean[m], b, metric_units(m),
                  std::string("mean over the selector's sparse layers of the ") + metric_long_name(m));
    }
    const std::pair<const char*, const Table*> head_q[] = {
        {"mass_recall_p10", &s.head_recall_p10}, {"mass_recall_p50", &s.head_recall_p50}, {"mass_recall_min", &s.head_recall_min}};
    for (const auto& [name, table] : head_q) {
      write_table(file, root, g + "/" + name, *table, blh, "1", std::string(name) + " over query rows (nearest rank)");
    }
    const std::pair<const char*, const Table*> layer_q[] = {{"layer_mass_recall_p10", &s.layer_recall_p10},
                                                             {"layer_mass_recall_p50", &s.layer_recall_p50},
                                                             {"layer_mass_recall_min", &s.layer_recall_min}};
    for (const auto& [name, table] : layer_q) {
      write_table(file, root, g + "/" + name, *table, bl, "1", std::string(name) + " over heads and rows (nearest rank)");
    }
    write_table(file, root, g + "/saturated_rows", s.saturated_rows, bl, "rows",
                "rows (over all heads) whose attended set is the whole causal row");
    write_table(file, root, g + "/model_mass_recall_p10", s.model_recall_p10, b, "1",
                "10th percentile over all layers, heads and rows (histogram, within 5e-5)");
    write_table(file, root, g + "/model_mass_recall_p50", s.model_recall_p50, b, "1",
                "median over all layers, heads and rows (histogram, within 5e-5)");
    write_table(file, root, g + "/model_mass_recall_min", s.model_recall_min, b, "1", "minimum over all layers, heads and rows");
    write_table(file, root, g + "/model_mass_recall_p10_sparse_layers", s.model_sparse_recall_p10, b, "1",
                "10th percentile over the selector's sparse layers (histogram, within 5e-5)");
    write_table(file, root, g + "/model_mass_recall_p50_sparse_layers", s.model_sparse_recall_p50, b, "1",
                "median over the selector's sparse layers (histogram, within 5e-5)");
    write_table(file, root, g + "/model_mass_recall_min_sparse_layers", s.model_sparse_recall_min, b, "1",
                "minimum over the selector's sparse layers");
  }

  // Cross-layer reuse matrix.
  if (!r.reuse.values.empty()) {
    write_table(file, root, root + "/reuse/mass_recall", r.reuse, {"source_layer", "layer"}, "1",
                "mean mass recall of layer l (column) under the blocks layer f (row) selects by block max, max over a "
                "KV group, without forced keys; NaN where f > l");
    h5::write_attribute(file, root + "/reuse", "budget_tokens", r.reuse_budget);
    h5::write_attribute(file, root + "/reuse", "block_size", r.reuse_block);
  }
  // KV-cache accounting of the replayed model shape: full attention, the model's own layer
  // types, and the hybrid SWA and HySparse layouts of the replay's schedule (bf16, batch 1).
  {
    KvModel model = kv_model_from_shape(h.model, h.num_layers, h.num_q_heads, h.num_kv_heads, h.head_dim,
                                        h.layer_types, h.sliding_window);
    KvOverrides overrides;
    overrides.schedule = schedule.empty() ? "1:3" : schedule;
    std::vector<KvMethod> methods;
    for (const auto& spec : default_method_specs(model, overrides)) methods.push_back(resolve_method(spec, model, overrides));
    std::vector<std::uint64_t> contexts = {static_cast<std::uint64_t>(h.seq_len), 32768, 131072};
    std::sort(contexts.begin(), contexts.end());
    contexts.erase(std::unique(contexts.begin(), contexts.end()), contexts.end());
    write_kv_table(file, root + "/kv", compute_kv_table(model, methods, KvDtype::kBf16, 1, contexts));
  }
}

void print_replay_summary(std::FILE* out, const ReplayResult& r) {
  const CaptureHeader& h = r.header;
  fmt::print(out, "replayed {}: {} layers x {} q heads ({} kv), seq_len {}, {} query rows, {} on {}, {:.2f} s\n",
             r.capture_path, h.num_layers, h.num_q_heads, h.num_kv_heads, h.seq_len, r.rows.size(), r.backend,
             r.device, r.seconds);
  for (std::size_t bi = 0; bi < r.budgets.size(); ++bi) {
    const Budget& budget = r.budgets[bi];
    fmt::print(out, "\nbudget {}{}\n", budget.label(), budget.kind == Budget::Kind::kTokens ? " tokens" : " (sparsity)");
    fmt::print(out, "  {:<20} {:>9} {:>9} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7}\n", "selector", "recall", "sparse-L",
               "p10", "min", "vs-oracle", "overlap", "attended", "out-err", "sat%");
    std::vector<std::size_t> order(r.selectors.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    // NaN (a budget below the selector's block, or no scored row) sorts last.
    auto key = [&](std::size_t i) {
      const double v = r.selectors[i].model_mean[kMassRecall].values[bi];
      return std::isnan(v) ? -1.0 : v;
    };
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return key(a) > key(b); });
    const double rows_total = static_cast<double>(r.rows.size() * static_cast<std::size_t>(h.num_q_heads * h.num_layers));
    for (std::size_t i : order) {
      const SelectorResult& s = r.selectors[i];
      double saturated = 0;
      for (std::int64_t l = 0; l < h.num_layers; ++l) saturated += s.saturated_rows.at(bi, static_cast<std::uint64_t>(l));
      auto show = [](double v, int digits) { return std::isnan(v) ? std::string("-") : fmt::format("{:.{}f}", v, digits); };
      fmt::print(out, "  {:<20} {:>9} {:>9} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7}\n", s.label,
                 show(s.model_mean[kMassRecall].values[bi], 4), show(s.model_sparse_mean[kMassRecall].values[bi], 4),
                 show(s.model_recall_p10.values[bi], 3), show(s.model_recall_min.values[bi], 3),
                 show(s.model_mean[kRecallVsOracle].values[bi], 4), show(s.model_mean[kTopkOverlap].values[bi], 3),
                 show(s.model_mean[kAttendedKeys].values[bi], 1),
                 r.has_output_error ? show(s.model_mean[kOutputError].values[bi], 4) : std::string("-"),
                 show(100.0 * saturated / rows_total, 1));
    }
  }
  if (!r.reuse.values.empty()) {
    fmt::print(out, "\ncross-layer reuse (mass recall of layer l under layer f's selection, {} tokens, block {}):\n",
               r.reuse_budget, r.reuse_block);
    const auto L = static_cast<std::uint64_t>(h.num_layers);
    fmt::print(out, "  f\\l ");
    for (std::uint64_t l = 0; l < L && l < 16; ++l) fmt::print(out, "{:>6}", l);
    fmt::print(out, "{}\n", L > 16 ? "  ..." : "");
    for (std::uint64_t f = 0; f < L && f < 16; ++f) {
      fmt::print(out, "  {:>3} ", f);
      for (std::uint64_t l = 0; l < L && l < 16; ++l) {
        const double v = r.reuse.at(f, l);
        fmt::print(out, "{:>6}", std::isnan(v) ? std::string(".") : fmt::format("{:.3f}", v));
      }
      fmt::print(out, "\n");
    }
  }
}

}  // namespace hysparse
