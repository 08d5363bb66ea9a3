#include "sweep/report.hpp"

#include <cmath>
#include <cstring>
#include <fmt/format.h>
#include <limits>
#include <map>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/provenance.hpp"
#include "common/sha256.hpp"
#include "io/h5.hpp"
#include "replay/report.hpp"

namespace hysparse {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr std::int64_t kPooled = -1;

// The numeric columns of /sweep/points (and datasets of /sweep/grid), in order.
struct MetricColumn {
  const char* name;
  const char* units;
  const char* long_name;
};
const std::vector<MetricColumn>& metric_columns() {
  static const std::vector<MetricColumn> columns = {
      {"sparsity", "1", "realised sparsity: 1 - attended keys / causal keys, summed over every scored (layer, head, row)"},
      {"mass_recall", "1", "mean over layers, heads and rows of the share of the row's token attention mass attended"},
      {"mass_recall_p10", "1", "10th percentile of mass recall over layers, heads and rows (histogram, within 5e-5)"},
      {"mass_recall_p50", "1", "median of mass recall over layers, heads and rows (histogram, within 5e-5)"},
      {"mass_recall_min", "1", "minimum of mass recall over layers, heads and rows"},
      {"mass_recall_sparse_layers", "1", "mean mass recall over the selector's sparse layers only"},
      {"recall_vs_oracle", "1", "mean of mass recall / the per-head oracle's at the same block size, budget and forced keys"},
      {"topk_overlap", "1", "mean share of the keys of the top-n blocks by mass that the attended set contains"},
      {"attended_keys", "keys", "mean keys in the attended set (selected blocks and forced keys, counted once)"},
      {"budget_keys", "keys", "mean nominal budget in keys"},
      {"output_rel_error", "1", "mean ||o_A - o|| / ||o|| (NaN when v was not captured)"},
      {"kv_bytes", "bytes",
       "resident KV-cache bytes of the whole model at the capture's length (bf16, batch 1, K/V + the selector's "
       "metadata); pooled rows: mean over captures"},
      {"kv_full_bytes", "bytes", "full attention's KV-cache bytes for the same model and length (bf16, batch 1)"},
      {"kv_ratio", "1", "kv_full_bytes / kv_bytes"},
  };
  return columns;
}

// The model-level values of one (selector, budget) from its sums.
std::vector<double> metric_values(const ModelSums& sums, double causal_keys, double kv_bytes, double kv_full) {
  auto mean = [&](int part, int m) {
    return sums.count[part][m] ? sums.sum[part][m] / static_cast<double>(sums.count[part][m]) : kNaN;
  };
  const double attended_total = sums.sum[0][kAttendedKeys];
  const double sparsity = sums.count[0][kAttendedKeys] && causal_keys > 0 ? 1.0 - attended_total / causal_keys : kNaN;
  return {sparsity,
          mean(0, kMassRecall),
          sums.recall[0].quantile(0.10),
          sums.recall[0].quantile(0.50),
          sums.recall[0].minimum(),
          mean(1, kMassRecall),
          mean(0, kRecallVsOracle),
          mean(0, kTopkOverlap),
          mean(0, kAttendedKeys),
          mean(0, kBudgetKeys),
          mean(0, kOutputError),
          kv_bytes,
          kv_full,
          kv_bytes > 0 ? kv_full / kv_bytes : kNaN};
}

// Causal keys summed over the rows that entered attended_keys' sum: every layer's heads, the
// selector's scored rows (t >= first_scored).
double causal_keys_total(const ReplayResult& r, const SelectorResult& s, const ModelSums& sums) {
  double per_row = 0;
  std::int64_t rows = 0;
  for (std::int64_t t : r.rows) {
    if (t >= s.first_scored) {
      per_row += static_cast<double>(t + 1);
      ++rows;
    }
  }
  return rows ? per_row / static_cast<double>(rows) * static_cast<double>(sums.count[0][kAttendedKeys]) : 0.0;
}

struct Points {
  std::vector<std::int64_t> capture, block, window, sinks;
  std::vector<std::string> capture_path, selector, spec, label, schedule, group, budget_kind;
  std::vector<double> budget;
  std::vector<std::vector<double>> metrics;  // [column][point]
  std::map<std::tuple<std::int64_t, std::int64_t, std::int64_t>, std::size_t> index;  // (capture, instance, budget)
};

Points build_points(const SweepConfig& config, const SweepPlan& plan, const SweepState& state) {
  Points p;
  p.metrics.resize(metric_columns().size());
  const auto NB = static_cast<std::int64_t>(config.budgets.size());
  // Captures with results (a capture not started yet has none).
  std::vector<std::int64_t> started;
  for (std::size_t c = 0; c < state.results.size(); ++c) {
    if (!state.results[c].selectors.empty()) started.push_back(static_cast<std::int64_t>(c));
  }
  auto add = [&](std::int64_t capture, std::int64_t instance, std::int64_t b, const std::string& path,
                 const std::string& label, const std::vector<double>& values) {
    const SweepInstance& in = plan.instances[static_cast<std::size_t>(instance)];
    p.index[{capture, instance, b}] = p.capture.size();
    p.capture.push_back(capture);
    p.capture_path.push_back(path);
    p.selector.push_back(in.name);
    p.spec.push_back(in.resolved);
    p.label.push_back(label);
    p.block.push_back(in.block);
    p.window.push_back(in.window);
    p.sinks.push_back(in.sinks);
    p.schedule.push_back(in.schedule);
    p.group.push_back(in.group);
    const Budget& budget = config.budgets[static_cast<std::size_t>(b)];
    p.budget.push_back(budget.value);
    p.budget_kind.push_back(budget.kind == Budget::Kind::kTokens ? "tokens" : "sparsity");
    for (std::size_t k = 0; k < values.size(); ++k) p.metrics[k].push_back(values[k]);
  };
  for (std::int64_t c : started) {
    const ReplayResult& r = state.results[static_cast<std::size_t>(c)];
    for (std::size_t i = 0; i < plan.instances.size(); ++i) {
      const SelectorResult& s = r.selectors[i];
      for (std::int64_t b = 0; b < NB; ++b) {
        const ModelSums& sums = r.model_sums[i * static_cast<std::size_t>(NB) + static_cast<std::size_t>(b)];
        add(c, static_cast<std::int64_t>(i), b, r.capture_path, s.label,
            metric_values(sums, causal_keys_total(r, s, sums), s.kv_resident_bytes[static_cast<std::size_t>(b)],
                          r.kv_full_bytes));
      }
    }
  }
  // Pooled over every capture started: sums merge exactly; KV bytes are averaged over captures.
  for (std::size_t i = 0; i < plan.instances.size(); ++i) {
    for (std::int64_t b = 0; b < NB; ++b) {
      ModelSums pooled;
      double causal = 0, kv = 0, kv_full = 0;
      for (std::int64_t c : started) {
        const ReplayResult& r = state.results[static_cast<std::size_t>(c)];
        const ModelSums& sums = r.model_sums[i * static_cast<std::size_t>(NB) + static_cast<std::size_t>(b)];
        pooled.merge(sums);
        causal += causal_keys_total(r, r.selectors[i], sums);
        kv += r.selectors[i].kv_resident_bytes[static_cast<std::size_t>(b)];
        kv_full += r.kv_full_bytes;
      }
      const double n = started.empty() ? kNaN : static_cast<double>(started.size());
      add(kPooled, static_cast<std::int64_t>(i), b, "pooled",
          started.empty() ? std::string() : state.results[static_cast<std::size_t>(started.front())].selectors[i].label,
          metric_values(pooled, causal, kv / n, kv_full / n));
    }
  }
  return p;
}

void write_column(const h5::File& file, const std::string& path, const std::vector<std::int64_t>& values,
                  const char* units, const std::string& long_name) {
  h5::write_ints(file, path, {values.size()}, values.data());
  h5::write_attribute(file, path, "units", units);
  h5::write_attribute(file, path, "long_name", long_name);
}
void write_column(const h5::File& file, const std::string& path, const std::vector<double>& values, const char* units,
                  const std::string& long_name) {
  h5::write_doubles(file, path, {values.size()}, values.data());
  h5::write_attribute(file, path, "units", units);
  h5::write_attribute(file, path, "long_name", long_name);
}
void write_column(const h5::File& file, const std::string& path, const std::vector<std::string>& values,
                  const std::string& long_name) {
  h5::write_strings(file, path, values);
  h5::write_attribute(file, path, "units", "");
  h5::write_attribute(file, path, "long_name", long_name);
}

std::string blob_digest(const std::vector<std::uint8_t>& bytes) {
  Sha256 hash;
  hash.update(bytes.data(), bytes.size());
  return hash.hex_digest();
}

// Opaque bytes stored as int64 (8 bytes per element, the last one zero-padded) with their length.
void write_blob(const h5::File& file, const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::vector<std::int64_t> words((bytes.size() + 7) / 8, 0);
  if (!bytes.empty()) std::memcpy(words.data(), bytes.data(), bytes.size());
  h5::write_ints(file, path, {words.size()}, words.data());
  h5::write_attribute(file, path, "bytes", static_cast<std::int64_t>(bytes.size()));
  h5::write_attribute(file, path, "sha256", blob_digest(bytes));
}
std::vector<std::uint8_t> read_blob(const h5::File& file, const std::string& path) {
  const std::vector<std::int64_t> words = h5::read_ints(file, path);
  const std::int64_t size = h5::read_int_attribute(file, path, "bytes");
  if (size < 0 || static_cast<std::uint64_t>(size) > words.size() * 8) {
    fail_input(file.path(), path, "holds {} words but claims {} bytes", words.size(), size);
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  if (size > 0) std::memcpy(bytes.data(), words.data(), bytes.size());
  if (!h5::has_attribute(file, path, "sha256") || h5::read_string_attribute(file, path, "sha256") != blob_digest(bytes)) {
    fail_input(file.path(), path, "checkpoint does not match its sha256 (damaged or edited)");
  }
  return bytes;
}

}  // namespace

void write_sweep_report(const std::string& path, const SweepConfig& config, const SweepPlan& plan,
                        const SweepState& state, const Provenance& provenance) {
  AtomicOutput output(path);
  h5::File file = h5::File::create(output.temporary_path());
  write_provenance(file, kSweepFormat, kSweepFormatVersion, provenance);
  write_config_group(file, "/config", config.to_json());

  const bool complete = state.complete();
  const auto C = static_cast<std::int64_t>(config.captures.size());
  const auto NB = config.budgets.size();
  const bool tokens = config.budgets.front().kind == Budget::Kind::kTokens;
  h5::create_group(file, "/sweep");
  h5::write_attribute(file, "/sweep", "status", complete ? "complete" : "partial");
  h5::write_attribute(file, "/sweep", "units_total", static_cast<std::int64_t>(state.units.size()));
  h5::write_attribute(file, "/sweep", "units_done", state.units_done());
  h5::write_attribute(file, "/sweep", "budget_kind", tokens ? "tokens" : "sparsity");
  h5::write_attribute(file, "/sweep", "instances", static_cast<std::int64_t>(plan.instances.size()));
  double seconds = 0;
  for (const auto& u : state.units) seconds += u.seconds;
  h5::write_attribute(file, "/sweep", "unit_seconds", seconds);

  // Axes.
  std::vector<std::int64_t> capture_axis;
  std::vector<std::string> capture_labels = config.captures;
  for (std::int64_t c = 0; c <= C; ++c) capture_axis.push_back(c);
  capture_labels.push_back("pooled");
  h5::write_ints(file, "/sweep/axes/capture", {capture_axis.size()}, capture_axis.data());
  h5::write_attribute(file, "/sweep/axes/capture", "labels", capture_labels);
  h5::write_attribute(file, "/sweep/axes/capture", "long_name", "capture index (the last entry pools every capture)");
  h5::write_strings(file, "/sweep/axes/selector", plan.selector_axis);
  h5::write_attribute(file, "/sweep/axes/selector", "long_name", "selector specs as given (axis values applied on top)");
  const std::string default_note = "-1 (or 'default'): the axis was not swept; each selector keeps its own default";
  h5::write_ints(file, "/sweep/axes/block", {plan.block_axis.size()}, plan.block_axis.data());
  h5::write_attribute(file, "/sweep/axes/block", "units", "tokens");
  h5::write_attribute(file, "/sweep/axes/block", "long_name", "selection block size; " + default_note);
  h5::write_ints(file, "/sweep/axes/window", {plan.window_axis.size()}, plan.window_axis.data());
  h5::write_attribute(file, "/sweep/axes/window", "units", "tokens");
  h5::write_attribute(file, "/sweep/axes/window", "long_name", "forced sliding window; " + default_note);
  h5::write_ints(file, "/sweep/axes/sinks", {plan.sinks_axis.size()}, plan.sinks_axis.data());
  h5::write_attribute(file, "/sweep/axes/sinks", "units", "tokens");
  h5::write_attribute(file, "/sweep/axes/sinks", "long_name", "forced sink tokens; " + default_note);
  h5::write_strings(file, "/sweep/axes/schedule", plan.schedule_axis);
  h5::write_attribute(file, "/sweep/axes/schedule", "long_name", "full/sparse layer schedule (hysparse); " + default_note);
  h5::write_strings(file, "/sweep/axes/group", plan.group_axis);
  h5::write_attribute(file, "/sweep/axes/group", "long_name", "aggregation over a KV group's heads; " + default_note);
  std::vector<double> budget_values;
  for (const auto& b : config.budgets) budget_values.push_back(b.value);
  h5::write_doubles(file, "/sweep/axes/budget", {NB}, budget_values.data());
  h5::write_attribute(file, "/sweep/axes/budget", "kind", tokens ? "tokens" : "sparsity");
  h5::write_attribute(file, "/sweep/axes/budget", "units", tokens ? "tokens" : "1");
  h5::write_attribute(file, "/sweep/axes/budget", "long_name",
                      tokens ? "selection budget in tokens" : "sparsity: fraction of the causal row dropped");
  const std::vector<std::string> axes = {"capture", "selector", "block", "window", "sinks", "schedule", "group", "budget"};
  for (const auto& axis : axes) h5::make_scale(file, "/sweep/axes/" + axis, axis);

  // Points, and the same numbers on the grid.
  const Points points = build_points(config, plan, state);
  const std::string pt = "/sweep/points/";
  write_column(file, pt + "capture", points.capture, "1", "capture index (-1: pooled over every capture)");
  write_column(file, pt + "capture_path", points.capture_path, "capture file (\"pooled\" for pooled rows)");
  write_column(file, pt + "selector", points.selector, "selector name");
  write_column(file, pt + "spec", points.spec, "selector spec with every parameter resolved");
  write_column(file, pt + "label", points.label, "the instance's group under /captures/<c>/selectors");
  write_column(file, pt + "block", points.block, "tokens", "block size the selector used");
  write_column(file, pt + "window", points.window, "tokens", "forced window the selector used (-1: the budget is the window)");
  write_column(file, pt + "sinks", points.sinks, "tokens", "forced sink tokens the selector used");
  write_column(file, pt + "schedule", points.schedule, "layer schedule (\"\" where the selector has none)");
  write_column(file, pt + "group", points.group, "KV-group aggregation (\"\" where the selector has none)");
  write_column(file, pt + "budget", points.budget, tokens ? "tokens" : "1", "budget as given");
  write_column(file, pt + "budget_kind", points.budget_kind, "tokens or sparsity");
  for (std::size_t k = 0; k < metric_columns().size(); ++k) {
    const MetricColumn& m = metric_columns()[k];
    write_column(file, pt + m.name, points.metrics[k], m.units, m.long_name);
  }
  std::vector<std::string> column_names = {"capture", "capture_path", "selector", "spec",   "label",  "block",
                                           "window",  "sinks",        "schedule", "group",  "budget", "budget_kind"};
  for (const auto& m : metric_columns()) column_names.emplace_back(m.name);
  h5::write_attribute(file, "/sweep/points", "columns", column_names);
  h5::write_attribute(file, "/sweep/points", "rows", static_cast<std::int64_t>(points.capture.size()));

  std::vector<std::uint64_t> grid_dims = {static_cast<std::uint64_t>(C + 1)};
  for (auto d : plan.grid_dims()) grid_dims.push_back(d);
  grid_dims.push_back(NB);
  const std::size_t cells_per_capture = plan.grid.size();
  for (std::size_t k = 0; k < metric_columns().size(); ++k) {
    const MetricColumn& m = metric_columns()[k];
    std::vector<double> grid;
    grid.reserve(static_cast<std::size_t>(C + 1) * cells_per_capture * NB);
    for (std::int64_t c = 0; c <= C; ++c) {
      const std::int64_t capture = c == C ? kPooled : c;
      for (std::int64_t instance : plan.grid) {
        for (std::size_t b = 0; b < NB; ++b) {
          const auto found = points.index.find({capture, instance, static_cast<std::int64_t>(b)});
          grid.push_back(found == points.index.end() ? kNaN : points.metrics[k][found->second]);
        }
      }
    }
    const std::string grid_path = "/sweep/grid/" + std::string(m.name);
    h5::write_doubles(file, grid_path, grid_dims, grid.data());
    h5::write_attribute(file, grid_path, "units", m.units);
    h5::write_attribute(file, grid_path, "long_name", std::string(m.long_name) +
                                                     "; cells where an axis does not apply to the selector repeat its "
                                                     "values, NaN where nothing ran yet");
    h5::label_dimensions(file, grid_path, axes);
    for (unsigned i = 0; i < axes.size(); ++i) h5::attach_scale(file, grid_path, "/sweep/axes/" + axes[i], i);
  }

  // Work units.
  std::vector<std::int64_t> unit_capture, unit_layer, unit_done;
  std::vector<double> unit_seconds;
  for (const auto& u : state.units) {
    unit_capture.push_back(u.capture);
    unit_layer.push_back(u.layer);
    unit_done.push_back(u.done ? 1 : 0);
    unit_seconds.push_back(u.seconds);
  }
  write_column(file, "/sweep/units/capture", unit_capture, "1", "capture index");
  write_column(file, "/sweep/units/layer", unit_layer, "1", "layer index");
  write_column(file, "/sweep/units/done", unit_done, "1", "1 when the unit's results are in this report");
  write_column(file, "/sweep/units/seconds", unit_seconds, "s", "wall time of the unit (statistics, selections, metrics)");

  // Checkpoints: only while there is work left.
  if (!complete) {
    h5::create_group(file, "/sweep/checkpoint");
    h5::write_attribute(file, "/sweep/checkpoint", "note",
                        "opaque replay state per capture started (this build of hysparse); hysparse sweep --resume reads it");
    for (std::size_t c = 0; c < state.checkpoints.size(); ++c) {
      if (!state.checkpoints[c].empty()) write_blob(file, fmt::format("/sweep/checkpoint/capture_{}", c), state.checkpoints[c]);
    }
  }

  // Each capture's replay content.
  for (std::size_t c = 0; c < state.results.size(); ++c) {
    if (state.results[c].selectors.empty()) continue;  // not started
    const std::string root = fmt::format("/captures/{}", c);
    write_replay_content(file, root, state.results[c], "");
    h5::write_attribute(file, root, "path", config.captures[c]);
    if (c < provenance.input_sha256.size()) h5::write_attribute(file, root, "sha256", provenance.input_sha256[c]);
    if (c < provenance.input_sha256_source.size() && !provenance.input_sha256_source[c].empty()) {
      h5::write_attribute(file, root, "sha256_source", provenance.input_sha256_source[c]);
    }
    std::int64_t done = 0, layers = 0;
    for (const auto& u : state.units) {
      if (u.capture == static_cast<std::int64_t>(c)) {
        ++layers;
        done += u.done ? 1 : 0;
      }
    }
    h5::write_attribute(file, root, "layers_done", done);
    h5::write_attribute(file, root, "status", done == layers ? "complete" : "partial");
  }
  file.close();
  output.commit();
}

SweepConfig read_report_config(const std::string& path) {
  const h5::File file = h5::File::open_read(path);
  const std::string format =
      h5::has_attribute(file, "/", "format") ? h5::read_string_attribute(file, "/", "format") : std::string();
  if (format != kSweepFormat && format != "hysparse-report") {
    fail_input(path, "/", "format '{}' is neither a sweep report ({}) nor a replay report (hysparse-report)", format,
               kSweepFormat);
  }
  const std::int64_t version =
      h5::has_attribute(file, "/", "format_version") ? h5::read_int_attribute(file, "/", "format_version") : -1;
  if (version != 1) fail_input(path, "/", "format_version {} (this build reads version 1)", version);
  if (!h5::has_attribute(file, "/config", "json")) fail_input(path, "/config", "has no 'json' attribute (the configuration)");
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(h5::read_string_attribute(file, "/config", "json"));
  } catch (const nlohmann::json::exception&) {
    fail_input(path, "/config", "attribute json is not valid JSON");
  }
  const std::string where = path + ": /config";
  if (format == kSweepFormat) return SweepConfig::from_json(json, where);

  // A replay report: its options as a one-capture sweep.
  try {
    SweepConfig c;
    c.captures = h5::read_string_list_attribute(file, "/", "input_files");
    const bool is_tokens = json.at("budget_kind").get<std::string>() == "tokens";
    std::vector<double> values;
    for (const auto& label : json.at("budgets").get<std::vector<std::string>>()) {
      const std::string value = label.rfind("s=", 0) == 0 ? label.substr(2) : label;
      values.push_back(std::stod(value));
    }
    c.budgets = budgets_from_values(values, is_tokens, path + ": /config");
    // The selectors as the replay resolved them (its --block/--sinks/--window defaults included), so
    // the sweep runs the same instances; only hysparse's schedule came from a global option.
    for (const auto& label : h5::read_string_list_attribute(file, "/selectors", "order")) {
      const std::string spec = h5::read_string_attribute(file, "/selectors/" + label, "spec");
      for (auto& one : parse_selector_list(spec)) c.selectors.push_back(std::move(one));
    }
    const auto schedule = json.at("schedule").get<std::string>();
    if (!schedule.empty()) c.schedules = {schedule};
    c.queries = json.at("queries").get<std::string>();
    c.seed = json.at("seed").get<std::uint64_t>();
    c.output_error = json.at("output_error").get<bool>();
    c.device = json.at("device").get<std::string>();
    c.devices = {c.device};
    if (json.contains("precision")) c.precision = json.at("precision").get<std::string>();
    c.tile_rows = json.at("tile_rows").get<std::int64_t>();
    return c;
  } catch (const nlohmann::json::exception& e) {
    fail_input(path, "/config", "the replay configuration lacks a field or has the wrong type ({})", e.what());
  } catch (const std::logic_error&) {  // std::stod: invalid_argument, out_of_range
    fail_input(path, "/config", "a budget label is not a number");
  }
}

SweepResumeState read_sweep_resume_state(const std::string& path) {
  SweepResumeState resume;
  resume.config = read_report_config(path);
  const h5::File file = h5::File::open_read(path);
  if (h5::read_string_attribute(file, "/", "format") != kSweepFormat) {
    fail_input(path, "/", "is a replay report; --resume continues a sweep report (use --from-report to re-run it)");
  }
  resume.status = h5::read_string_attribute(file, "/sweep", "status");
  resume.tool = h5::read_string_attribute(file, "/", "tool_version") + " " + h5::read_string_attribute(file, "/", "git_sha");
  resume.devices = resume.config.devices;
  resume.input_sha256 = h5::read_string_list_attribute(file, "/", "input_sha256");
  if (h5::has_attribute(file, "/", "earlier_runs")) resume.runs = h5::read_string_list_attribute(file, "/", "earlier_runs");
  resume.runs.push_back(provenance_run_line(h5::read_string_attribute(file, "/", "created_utc"),
                                            h5::read_string_attribute(file, "/", "device"),
                                            h5::read_string_attribute(file, "/", "command_line")));
  const auto capture = h5::read_ints(file, "/sweep/units/capture");
  const auto layer = h5::read_ints(file, "/sweep/units/layer");
  const auto done = h5::read_ints(file, "/sweep/units/done");
  const auto seconds = h5::read_doubles(file, "/sweep/units/seconds");
  if (layer.size() != capture.size() || done.size() != capture.size() || seconds.size() != capture.size()) {
    fail_input(path, "/sweep/units", "columns of different lengths");
  }
  const auto C = static_cast<std::int64_t>(resume.config.captures.size());
  for (std::size_t i = 0; i < capture.size(); ++i) {
    if (capture[i] < 0 || capture[i] >= C || layer[i] < 0) fail_input(path, "/sweep/units", "unit {} is out of range", i);
    resume.state.units.push_back({capture[i], layer[i], done[i] != 0, seconds[i]});
  }
  if (resume.status == "complete") return resume;
  resume.state.checkpoints.resize(static_cast<std::size_t>(C));
  for (std::int64_t c = 0; c < C; ++c) {
    const std::string blob = fmt::format("/sweep/checkpoint/capture_{}", c);
    if (h5::is_dataset(file.id(), blob)) resume.state.checkpoints[static_cast<std::size_t>(c)] = read_blob(file, blob);
  }
  return resume;
}

}  // namespace hysparse
