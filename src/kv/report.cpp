#include "kv/report.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.hpp"
#include "common/memory.hpp"
#include "kv/schedule.hpp"

namespace hysparse {
namespace {

std::string fixed_number(double value) {
  const double rounded = std::round(value);
  if (std::abs(value - rounded) < 1e-9 && rounded >= 0 && rounded < 1.8e19) {
    return group_digits(static_cast<std::uint64_t>(rounded));
  }
  const double whole = std::floor(value);
  const double fraction = value - whole;
  std::string text = fmt::format("{:.2f}", fraction);  // "0.xx" (or "1.00" after rounding)
  if (text == "1.00") return group_digits(static_cast<std::uint64_t>(whole) + 1) + ".00";
  return group_digits(static_cast<std::uint64_t>(whole)) + text.substr(1);
}

std::string short_bytes(std::uint64_t bytes) {
  const std::string full = format_bytes(bytes);
  const std::size_t paren = full.find(" (");
  return paren == std::string::npos ? full : full.substr(0, paren);
}

std::string flops(double value) { return fmt::format("{:.3e}", value); }

// Column-aligned text: the first `left` columns left-aligned, the rest right-aligned.
std::string render(const std::vector<std::vector<std::string>>& rows, std::size_t left) {
  std::vector<std::size_t> width;
  for (const auto& row : rows) {
    width.resize(std::max(width.size(), row.size()), 0);
    for (std::size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (i) line += "  ";
      const std::size_t pad = width[i] - row[i].size();
      line += i < left ? row[i] + std::string(pad, ' ') : std::string(pad, ' ') + row[i];
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

std::string metadata_text(const KvFootprint& fp) {
  if (fp.metadata.empty()) return "none";
  std::string text = fp.metadata.formula + " (" + to_string(fp.metadata.scope) + ")";
  if (!fp.metadata.period_param.empty()) text += ", one entry per " + fp.metadata.period_param + " tokens";
  return text;
}

// "SPEC: N full + M sparse layers, full = ... (method, method)", one line per distinct schedule.
std::vector<std::string> schedule_lines(const KvTable& t) {
  std::vector<std::pair<std::string, std::vector<std::string>>> seen;  // description -> methods
  for (const auto& m : t.methods) {
    if (m.schedule.empty()) continue;
    const std::string line = fmt::format("{}: {}", m.schedule_spec, describe_schedule(m.schedule));
    auto it = std::find_if(seen.begin(), seen.end(), [&](const auto& entry) { return entry.first == line; });
    if (it == seen.end()) {
      seen.push_back({line, {m.name()}});
    } else {
      it->second.push_back(m.name());
    }
  }
  std::vector<std::string> lines;
  for (const auto& [line, methods] : seen) lines.push_back(fmt::format("{} ({})", line, fmt::join(methods, ", ")));
  return lines;
}

// ---- HDF5 helpers

void write_string_array(const h5::File& file, const std::string& path, const std::vector<std::string>& values) {
  h5::Handle type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.id(), H5T_VARIABLE);
  H5Tset_cset(type.id(), H5T_CSET_UTF8);
  const hsize_t dims[1] = {values.size()};
  h5::Handle space(H5Screate_simple(1, dims, nullptr));
  h5::Handle dataset(H5Dcreate2(file.id(), path.c_str(), type.id(), space.id(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  std::vector<const char*> pointers;
  for (const auto& v : values) pointers.push_back(v.c_str());
  if (!dataset.valid() || H5Dwrite(dataset.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, pointers.data()) < 0) {
    fail(ErrorKind::kOutput, "{}: {}: cannot write string dataset", file.path(), path);
  }
}

std::int64_t as_int64(std::uint64_t value, const std::string& what) {
  if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    fail(ErrorKind::kOutput, "{} = {} does not fit the report's int64 datasets", what, value);
  }
  return static_cast<std::int64_t>(value);
}

}  // namespace

std::string group_digits(std::uint64_t value) {
  std::string digits = std::to_string(value);
  std::string out;
  const std::size_t n = digits.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (i && (n - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

const char* kv_flop_convention() {
  return "2 FLOPs per multiply-add, QK^T and PV only (no softmax, projections or selection scoring); a decoded token "
         "at context T attends T keys (itself included); causal prefill counts the lower triangle with the diagonal, "
         "T(T+1)/2 pairs; MLA decode in the absorbed form (keys kv_lora_rank + qk_rope_head_dim, values kv_lora_rank), "
         "MLA prefill in the expanded form";
}

KvTable compute_kv_table(const KvModel& model, const std::vector<KvMethod>& methods, KvDtype dtype,
                         std::uint64_t batch, const std::vector<std::uint64_t>& contexts) {
  KvTable t;
  t.model = model;
  t.dtype = dtype;
  t.batch = batch;
  t.methods = methods;
  t.contexts = contexts;
  for (const auto& method : methods) {
    std::vector<KvAccounting> row;
    for (std::uint64_t context : contexts) row.push_back(account(model, method, dtype, batch, context));
    t.results.push_back(std::move(row));
  }
  return t;
}

std::string describe_model(const KvModel& m) {
  std::string text = fmt::format("{}: {} layers, {} q / {} kv heads ({}), head_dim {}", m.name, m.num_layers,
                                 m.num_q_heads, m.num_kv_heads, m.attention_kind(), m.head_dim);
  if (m.value_dim() != m.head_dim) text += fmt::format(", v_head_dim {}", m.value_dim());
  if (m.is_mla()) text += fmt::format(", MLA latent {} + rope {}", m.kv_lora_rank, m.qk_rope_head_dim);
  if (m.has_non_full_layers()) {
    const auto count = [&](KvLayerType type) { return std::count(m.layer_types.begin(), m.layer_types.end(), type); };
    text += fmt::format("; layer types: {} full", count(KvLayerType::kFull));
    if (count(KvLayerType::kSliding)) text += fmt::format(", {} sliding (window {})", count(KvLayerType::kSliding), m.sliding_window);
    if (count(KvLayerType::kChunked)) text += fmt::format(", {} chunked (chunk {})", count(KvLayerType::kChunked), m.chunk_size);
  }
  return text;
}

std::string format_kv_text(const KvTable& t) {
  const KvModel& m = t.model;
  std::string out;
  out += fmt::format("model     {}\n", describe_model(m));
  out += fmt::format("source    {}\n", m.source);
  out += fmt::format("KV cache  {}, batch {}: {} B per token per layer, {} B per token with every layer full\n",
                     to_string(t.dtype), t.batch, group_digits(kv_bytes_per_token_per_layer(m, t.dtype)),
                     group_digits(kv_bytes_per_token_full(m, t.dtype)));
  for (const auto& line : schedule_lines(t)) out += fmt::format("schedule  {}\n", line);
  out += "\n";

  std::vector<std::vector<std::string>> rows = {{"method", "context", "resident (whole batch)", "B/token",
                                                 "marginal B/token", "x full", "KV read / decoded token",
                                                 "decode FLOPs", "prefill FLOPs"}};
  for (std::size_t i = 0; i < t.methods.size(); ++i) {
    for (const auto& a : t.results[i]) {
      rows.push_back({t.methods[i].name(), format_context(a.context), format_bytes(a.resident_bytes),
                      fixed_number(a.bytes_per_token), fixed_number(a.marginal_bytes_per_token),
                      fmt::format("{:.2f}x", a.ratio_to_full), format_bytes(a.read_bytes_per_decoded_token),
                      flops(a.decode_flops_per_token), flops(a.prefill_flops)});
    }
  }
  out += render(rows, 1);

  out += "\nresident by layer type (whole batch)\n";
  std::vector<std::vector<std::string>> split = {
      {"method", "context", "full layers/heads", "window/sparse layers", "evicting budget", "metadata"}};
  for (std::size_t i = 0; i < t.methods.size(); ++i) {
    for (const auto& a : t.results[i]) {
      split.push_back({t.methods[i].name(), format_context(a.context), short_bytes(a.full_layer_bytes),
                       short_bytes(a.window_layer_bytes), short_bytes(a.budget_layer_bytes),
                       short_bytes(a.metadata_bytes)});
    }
  }
  out += render(split, 1);

  out += "\nmethods\n";
  for (const auto& method : t.methods) {
    const KvFootprint& fp = *method.footprint;
    out += fmt::format("  {}  {}: {}{}\n", method.describe(), fp.title, to_string(fp.residency),
                       fp.evicts ? " (evicts)" : "");
    out += fmt::format("      metadata: {}\n", metadata_text(fp));
    out += fmt::format("      source: {}\n", fp.source);
    if (!fp.note.empty()) out += fmt::format("      note: {}\n", fp.note);
  }
  out += "\nB/token = resident / (batch x context), per sequence; marginal = bytes one more token adds to one "
         "sequence; x full = full-attention bytes / resident bytes; KV read and FLOPs are per sequence (one decoded "
         "token; one prefill of the whole context). Binary units: K = 1024 tokens, KiB = 1024 bytes.\n";
  out += fmt::format("FLOPs: {}.\n", kv_flop_convention());
  return out;
}

nlohmann::json kv_table_json(const KvTable& t) {
  using json = nlohmann::json;
  const KvModel& m = t.model;
  json model = {{"name", m.name},
                {"source", m.source},
                {"num_layers", m.num_layers},
                {"num_q_heads", m.num_q_heads},
                {"num_kv_heads", m.num_kv_heads},
                {"head_dim", m.head_dim},
                {"v_head_dim", m.value_dim()},
                {"attention", m.attention_kind()},
                {"kv_lora_rank", m.kv_lora_rank},
                {"qk_rope_head_dim", m.qk_rope_head_dim},
                {"sliding_window", m.sliding_window},
                {"chunk_size", m.chunk_size},
                {"hybrid_schedule", m.hybrid_schedule}};
  json types = json::array();
  for (std::int64_t l = 0; l < m.num_layers; ++l) types.push_back(to_string(m.layer_type(l)));
  model["layer_types"] = types;

  json methods = json::array();
  for (const auto& method : t.methods) {
    const KvFootprint& fp = *method.footprint;
    json params = json::object();
    for (const auto& p : method.params) params[p.name] = p.value;
    json entry = {{"spec", method.describe()},
                  {"name", fp.method},
                  {"title", fp.title},
                  {"residency", to_string(fp.residency)},
                  {"evicts", fp.evicts},
                  {"params", params},
                  {"metadata", metadata_text(fp)},
                  {"source", fp.source}};
    if (!method.schedule.empty()) {
      entry["schedule"] = method.schedule_spec;
      entry["full_layers"] = full_layer_indices(method.schedule);
    }
    methods.push_back(entry);
  }

  json results = json::array();
  for (std::size_t i = 0; i < t.methods.size(); ++i) {
    for (const auto& a : t.results[i]) {
      json layers = json::array();
      for (const auto& layer : a.layers) layers.push_back(layer.kv_bytes + layer.metadata_bytes);
      results.push_back({{"method", t.methods[i].name()},
                         {"spec", a.method},
                         {"context", a.context},
                         {"resident_bytes", a.resident_bytes},
                         {"resident", format_bytes(a.resident_bytes)},
                         {"kv_bytes", a.kv_bytes},
                         {"metadata_bytes", a.metadata_bytes},
                         {"full_layer_bytes", a.full_layer_bytes},
                         {"window_layer_bytes", a.window_layer_bytes},
                         {"budget_layer_bytes", a.budget_layer_bytes},
                         {"full_attention_bytes", a.full_attention_bytes},
                         {"ratio_to_full", a.ratio_to_full},
                         {"bytes_per_token", a.bytes_per_token},
                         {"marginal_bytes_per_token", a.marginal_bytes_per_token},
                         {"read_bytes_per_decoded_token", a.read_bytes_per_decoded_token},
                         {"decode_flops_per_token", a.decode_flops_per_token},
                         {"prefill_flops", a.prefill_flops},
                         {"resident_bytes_per_layer_per_sequence", layers}});
    }
  }
  return {{"format", kKvReportFormat},
          {"format_version", kKvReportFormatVersion},
          {"model", model},
          {"dtype", to_string(t.dtype)},
          {"batch", t.batch},
          {"bytes_per_token_per_layer", kv_bytes_per_token_per_layer(m, t.dtype)},
          {"bytes_per_token_full_attention", kv_bytes_per_token_full(m, t.dtype)},
          {"flop_convention", kv_flop_convention()},
          {"methods", methods},
          {"results", results}};
}

void write_kv_table(const h5::File& file, const std::string& group_in, const KvTable& t) {
  const std::string group = group_in.empty() ? "/" : group_in;
  if (group != "/") h5::create_group(file, group);
  const std::string prefix = group == "/" ? "/" : group + "/";
  const KvModel& m = t.model;
  const std::size_t M = t.methods.size(), C = t.contexts.size(), L = static_cast<std::size_t>(m.num_layers);

  // Coordinates.
  std::vector<std::string> names, specs, sources, schedules;
  for (const auto& method : t.methods) {
    names.push_back(method.spec);
    specs.push_back(method.describe());
    sources.push_back(method.footprint->source);
    schedules.push_back(method.schedule.empty() ? "" : schedule_pattern(method.schedule));
  }
  write_string_array(file, prefix + "method", names);
  h5::write_attribute(file, prefix + "method", "long_name", "attention method (as given)");
  h5::write_attribute(file, prefix + "method", "units", "1");
  h5::write_attribute(file, prefix + "method", "resolved", specs);
  h5::write_attribute(file, prefix + "method", "source", sources);
  h5::write_attribute(file, prefix + "method", "schedule", schedules);
  h5::make_scale(file, prefix + "method", "method");
  std::vector<std::int64_t> contexts;
  for (std::uint64_t c : t.contexts) contexts.push_back(as_int64(c, "context"));
  h5::write_ints(file, prefix + "context", {C}, contexts.data());
  h5::write_attribute(file, prefix + "context", "long_name", "context length per sequence");
  h5::write_attribute(file, prefix + "context", "units", "tokens");
  h5::make_scale(file, prefix + "context", "context");
  std::vector<std::int64_t> layers(L);
  for (std::size_t l = 0; l < L; ++l) layers[l] = static_cast<std::int64_t>(l);
  h5::write_ints(file, prefix + "layer", {L}, layers.data());
  h5::write_attribute(file, prefix + "layer", "long_name", "layer index");
  h5::write_attribute(file, prefix + "layer", "units", "1");
  h5::make_scale(file, prefix + "layer", "layer");

  auto attach = [&](const std::string& path, const char* units, const char* long_name, bool per_layer) {
    h5::write_attribute(file, path, "units", units);
    h5::write_attribute(file, path, "long_name", long_name);
    h5::attach_scale(file, path, prefix + "method", 0);
    h5::attach_scale(file, path, prefix + "context", 1);
    if (per_layer) h5::attach_scale(file, path, prefix + "layer", 2);
    h5::label_dimensions(file, path, per_layer ? std::vector<std::string>{"method", "context", "layer"}
                                               : std::vector<std::string>{"method", "context"});
  };
  auto ints = [&](const char* name, const char* units, const char* long_name, std::uint64_t KvAccounting::*field) {
    std::vector<std::int64_t> data;
    for (std::size_t i = 0; i < M; ++i) {
      for (const auto& a : t.results[i]) data.push_back(as_int64(a.*field, name));
    }
    h5::write_ints(file, prefix + name, {M, C}, data.data());
    attach(prefix + name, units, long_name, false);
  };
  auto doubles = [&](const char* name, const char* units, const char* long_name, double KvAccounting::*field) {
    std::vector<double> data;
    for (std::size_t i = 0; i < M; ++i) {
      for (const auto& a : t.results[i]) data.push_back(a.*field);
    }
    h5::write_doubles(file, prefix + name, {M, C}, data.data());
    attach(prefix + name, units, long_name, false);
  };
  ints("resident_bytes", "bytes", "resident KV cache, K/V plus metadata, whole batch", &KvAccounting::resident_bytes);
  ints("kv_bytes", "bytes", "resident K/V, whole batch", &KvAccounting::kv_bytes);
  ints("metadata_bytes", "bytes", "resident method metadata, whole batch", &KvAccounting::metadata_bytes);
  ints("full_layer_bytes", "bytes", "K/V in layers or heads that keep every token, whole batch",
       &KvAccounting::full_layer_bytes);
  ints("window_layer_bytes", "bytes", "K/V in window, chunk and sparse layers or streaming heads, whole batch",
       &KvAccounting::window_layer_bytes);
  ints("budget_layer_bytes", "bytes", "K/V kept by evicting budgets, whole batch", &KvAccounting::budget_layer_bytes);
  ints("full_attention_bytes", "bytes", "K/V of the same model with every layer full, whole batch",
       &KvAccounting::full_attention_bytes);
  ints("read_bytes_per_decoded_token", "bytes", "K/V and metadata read by one decoded token of one sequence",
       &KvAccounting::read_bytes_per_decoded_token);
  doubles("ratio_to_full", "1", "full-attention bytes / resident bytes", &KvAccounting::ratio_to_full);
  doubles("bytes_per_token", "bytes/token", "resident bytes per token per sequence (amortised)",
          &KvAccounting::bytes_per_token);
  doubles("marginal_bytes_per_token", "bytes/token", "bytes one more token adds to one sequence",
          &KvAccounting::marginal_bytes_per_token);
  doubles("decode_flops_per_token", "FLOP", "attention FLOPs of one decoded token (QK^T and PV)",
          &KvAccounting::decode_flops_per_token);
  doubles("prefill_flops", "FLOP", "attention FLOPs of one sequence's causal prefill (QK^T and PV)",
          &KvAccounting::prefill_flops);

  std::vector<std::int64_t> per_layer;
  per_layer.reserve(M * C * L);
  for (std::size_t i = 0; i < M; ++i) {
    for (const auto& a : t.results[i]) {
      for (const auto& layer : a.layers) per_layer.push_back(as_int64(layer.kv_bytes + layer.metadata_bytes, "layer bytes"));
    }
  }
  h5::write_ints(file, prefix + "resident_bytes_per_layer", {M, C, L}, per_layer.data());
  attach(prefix + "resident_bytes_per_layer", "bytes", "resident K/V plus metadata of one layer, one sequence", true);

  // Model, dtype, batch and conventions.
  h5::write_attribute(file, group, "model", m.name);
  h5::write_attribute(file, group, "model_description", describe_model(m));
  h5::write_attribute(file, group, "model_source", m.source);
  h5::write_attribute(file, group, "num_layers", m.num_layers);
  h5::write_attribute(file, group, "num_q_heads", m.num_q_heads);
  h5::write_attribute(file, group, "num_kv_heads", m.num_kv_heads);
  h5::write_attribute(file, group, "head_dim", m.head_dim);
  h5::write_attribute(file, group, "v_head_dim", m.value_dim());
  h5::write_attribute(file, group, "attention", m.attention_kind());
  h5::write_attribute(file, group, "kv_lora_rank", m.kv_lora_rank);
  h5::write_attribute(file, group, "qk_rope_head_dim", m.qk_rope_head_dim);
  std::vector<std::string> types;
  for (std::int64_t l = 0; l < m.num_layers; ++l) types.push_back(to_string(m.layer_type(l)));
  h5::write_attribute(file, group, "layer_types", types);
  h5::write_attribute(file, group, "sliding_window", m.sliding_window);
  h5::write_attribute(file, group, "chunk_size", m.chunk_size);
  h5::write_attribute(file, group, "hybrid_schedule", m.hybrid_schedule);
  h5::write_attribute(file, group, "kv_dtype", to_string(t.dtype));
  h5::write_attribute(file, group, "batch", as_int64(t.batch, "batch"));
  h5::write_attribute(file, group, "bytes_per_token_per_layer",
                      as_int64(kv_bytes_per_token_per_layer(m, t.dtype), "bytes per token per layer"));
  h5::write_attribute(file, group, "bytes_per_token_full_attention",
                      as_int64(kv_bytes_per_token_full(m, t.dtype), "bytes per token"));
  h5::write_attribute(file, group, "flop_convention", kv_flop_convention());
  // (An empty list attribute cannot be written by h5::write_attribute: only write it when there is one.)
  const std::vector<std::string> schedules_used = schedule_lines(t);
  if (!schedules_used.empty()) h5::write_attribute(file, group, "schedules", schedules_used);
}

}  // namespace hysparse
