#include "kv/hf_config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <optional>
#include <sstream>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/memory.hpp"

namespace hysparse {
namespace {

using json = nlohmann::json;

// A JSON value for an error message: scalars as written (long ones cut), containers by size. Never
// json::dump() on a container: it recurses once per nesting level, and a hostile config nested a
// million deep would overflow the stack.
std::string describe(const json& v) {
  if (v.is_array()) return fmt::format("an array of {} elements", v.size());
  if (v.is_object()) return fmt::format("an object with {} keys", v.size());
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

class Reader {
 public:
  Reader(const json& config, const std::string& where) : c_(config), where_(where) {}

  bool present(const char* key) const { return c_.contains(key) && !c_.at(key).is_null(); }

  // Every integer of a config (layer and head counts, dimensions, windows) is at most 2^40 in magnitude,
  // far above any model's, so that the model's own sums (head_dim + v_head_dim, kv_lora_rank +
  // qk_rope_head_dim, ...) cannot overflow; byte counts are then formed with checked products.
  static constexpr std::int64_t kMaxValue = std::int64_t{1} << 40;

  // An integer value (null counts as absent). Error(kInput) for other types and for |value| > 2^40.
  std::optional<std::int64_t> optional_int(const char* key) const {
    if (!present(key)) return std::nullopt;
    const json& v = c_.at(key);
    std::optional<std::int64_t> value;
    if (v.is_number_unsigned()) {
      if (v.get<std::uint64_t>() <= static_cast<std::uint64_t>(kMaxValue)) value = static_cast<std::int64_t>(v.get<std::uint64_t>());
    } else if (v.is_number_integer()) {
      if (v.get<std::int64_t>() >= -kMaxValue && v.get<std::int64_t>() <= kMaxValue) value = v.get<std::int64_t>();
    } else if (v.is_number_float()) {
      // 4.0 is accepted as 4; the range check comes first (converting 1e300 to int64 is undefined).
      const double d = v.get<double>();
      if (d == std::trunc(d) && d >= -static_cast<double>(kMaxValue) && d <= static_cast<double>(kMaxValue)) {
        value = static_cast<std::int64_t>(d);
      } else if (d != std::trunc(d)) {
        fail_input(where_, key, "is {} (expected an integer)", describe(v));
      }
    } else {
      fail_input(where_, key, "is {} (expected an integer)", describe(v));
    }
    if (!value) fail_input(where_, key, "is {} (expected an integer of magnitude at most 2^40 = {})", describe(v), kMaxValue);
    return value;
  }

  std::int64_t positive(const char* key, std::initializer_list<const char*> aliases = {}) const {
    std::optional<std::int64_t> value = optional_int(key);
    const char* used = key;
    for (const char* alias : aliases) {
      if (value) break;
      value = optional_int(alias);
      used = alias;
    }
    if (!value) fail_input(where_, key, "missing (expected a positive integer)");
    if (*value <= 0) fail_input(where_, used, "is {} (expected a positive integer)", *value);
    return *value;
  }

  std::optional<std::int64_t> optional_positive(const char* key) const {
    const std::optional<std::int64_t> value = optional_int(key);
    if (value && *value <= 0) fail_input(where_, key, "is {} (expected a positive integer)", *value);
    return value;
  }

  std::optional<bool> optional_bool(const char* key) const {
    if (!present(key)) return std::nullopt;
    const json& v = c_.at(key);
    if (!v.is_boolean()) fail_input(where_, key, "is {} (expected true or false)", describe(v));
    return v.get<bool>();
  }

  std::string optional_string(const char* key) const {
    if (!present(key)) return "";
    const json& v = c_.at(key);
    if (!v.is_string()) fail_input(where_, key, "is {} (expected a string)", describe(v));
    return v.get<std::string>();
  }

  const json& at(const char* key) const { return c_.at(key); }

 private:
  const json& c_;
  const std::string& where_;
};

}  // namespace

KvModel kv_model_from_hf_json(const json& root, const std::string& where) {
  if (!root.is_object()) fail_input(where, "", "the root is {} (expected a JSON object)", root.type_name());
  // Multimodal configs (Gemma 3, Llama 4, ...) keep the language model in text_config.
  const bool nested = !root.contains("num_hidden_layers") && !root.contains("n_layer") && root.contains("text_config") &&
                      root.at("text_config").is_object();
  const json& config = nested ? root.at("text_config") : root;
  const std::string place = nested ? where + ": text_config" : where;
  const Reader r(config, place);

  for (const char* key : {"layers_block_type", "hybrid_override_pattern", "attn_layer_indices", "attn_layer_period"}) {
    if (r.present(key)) {
      fail_input(place, key, "present: attention/state-space hybrids are not supported (only attention layers can be "
                             "accounted)");
    }
  }

  KvModel m;
  m.name = Reader(root, where).optional_string("_name_or_path");
  if (m.name.empty()) m.name = where;
  m.source = where;
  m.num_layers = r.positive("num_hidden_layers", {"n_layer", "num_layers"});
  // Layer types, schedules and the accounting's per-layer records all scale with the layer count:
  // a count whose records cannot fit is refused here, before any of them is built (the count is at
  // most 2^40, so the product cannot overflow).
  constexpr std::uint64_t kBytesPerLayer = sizeof(KvLayerAccount) + sizeof(KvLayerType) + 1;
  require_memory(static_cast<std::uint64_t>(m.num_layers) * kBytesPerLayer,
                 fmt::format("{}: num_hidden_layers = {}: the per-layer records", place, m.num_layers));
  m.num_q_heads = r.positive("num_attention_heads", {"n_head"});
  const std::string model_type = r.optional_string("model_type");

  // MLA (DeepSeek-V2/V3).
  if (const auto rank = r.optional_int("kv_lora_rank"); rank && *rank > 0) {
    m.kv_lora_rank = *rank;
    m.qk_rope_head_dim = r.positive("qk_rope_head_dim");
    const std::int64_t nope = r.positive("qk_nope_head_dim");
    m.head_dim = nope + m.qk_rope_head_dim;
    m.v_head_dim = r.optional_positive("v_head_dim").value_or(nope);
    m.num_kv_heads = r.optional_positive("num_key_value_heads").value_or(m.num_q_heads);
  } else {
    std::optional<std::int64_t> kv = r.optional_positive("num_key_value_heads");
    if (!kv) kv = r.optional_positive("num_kv_heads");
    if (!kv && r.optional_bool("multi_query").value_or(false)) kv = 1;
    m.num_kv_heads = kv.value_or(m.num_q_heads);
    if (m.num_q_heads % m.num_kv_heads != 0) {
      fail_input(place, "num_key_value_heads", "{} does not divide num_attention_heads {}", m.num_kv_heads,
                 m.num_q_heads);
    }
    if (const auto head_dim = r.optional_positive("head_dim")) {
      m.head_dim = *head_dim;
    } else {
      const std::int64_t hidden = r.positive("hidden_size", {"n_embd", "d_model"});
      if (hidden % m.num_q_heads != 0) {
        fail_input(place, "hidden_size", "{} is not a multiple of num_attention_heads {} and head_dim is absent", hidden,
                   m.num_q_heads);
      }
      m.head_dim = hidden / m.num_q_heads;
    }
    if (const auto v = r.optional_positive("v_head_dim")) m.v_head_dim = *v;
  }

  // Layer types.
  const std::optional<std::int64_t> window = r.optional_positive("sliding_window");
  const std::optional<std::int64_t> chunk = r.optional_positive("attention_chunk_size");
  if (window) m.sliding_window = *window;
  if (chunk) m.chunk_size = *chunk;
  if (r.present("layer_types")) {
    const json& types = r.at("layer_types");
    if (!types.is_array()) fail_input(place, "layer_types", "is {} (expected a list of strings)", types.type_name());
    if (static_cast<std::int64_t>(types.size()) != m.num_layers) {
      fail_input(place, "layer_types", "has {} entries (expected num_hidden_layers = {})", types.size(), m.num_layers);
    }
    for (std::size_t i = 0; i < types.size(); ++i) {
      if (!types[i].is_string()) fail_input(place, fmt::format("layer_types[{}]", i), "is {} (expected a string)", describe(types[i]));
      m.layer_types.push_back(parse_layer_type(types[i].get<std::string>(), fmt::format("{}: layer_types[{}]", place, i)));
    }
  } else if (window) {
    std::vector<KvLayerType> types(static_cast<std::size_t>(m.num_layers), KvLayerType::kSliding);
    if (const auto pattern = r.optional_positive("sliding_window_pattern")) {
      for (std::int64_t i = 0; i < m.num_layers; ++i) {
        if ((i + 1) % *pattern == 0) types[static_cast<std::size_t>(i)] = KvLayerType::kFull;
      }
    } else if (model_type == "gemma2") {
      for (std::int64_t i = 1; i < m.num_layers; i += 2) types[static_cast<std::size_t>(i)] = KvLayerType::kFull;
    } else if (const auto use = r.optional_bool("use_sliding_window")) {
      const std::int64_t first = r.optional_int("max_window_layers").value_or(0);
      for (std::int64_t i = 0; i < m.num_layers; ++i) {
        if (!*use || i < first) types[static_cast<std::size_t>(i)] = KvLayerType::kFull;
      }
    }
    m.layer_types = types;
  }
  if (!m.layer_types.empty() && !m.has_non_full_layers()) m.layer_types.clear();
  const bool has_sliding = std::count(m.layer_types.begin(), m.layer_types.end(), KvLayerType::kSliding) > 0;
  const bool has_chunked = std::count(m.layer_types.begin(), m.layer_types.end(), KvLayerType::kChunked) > 0;
  if (has_sliding && !window) fail_input(place, "sliding_window", "missing (layer_types has sliding_attention layers)");
  if (has_chunked && !chunk) {
    fail_input(place, "attention_chunk_size", "missing (layer_types has chunked_attention layers)");
  }
  try {
    validate(m);
  } catch (const Error& e) {
    fail_input(where, "", "{}", e.what());
  }
  return m;
}

KvModel kv_model_from_hf_config(const std::string& path) {
  watch_input(path);  // checked again before a report is committed
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_input(path, "", "cannot open (no such file or not readable)");
  std::ostringstream text;
  text << in.rdbuf();
  json config;
  try {
    config = json::parse(text.str());
  } catch (const json::parse_error& e) {
    fail_input(path, "", "not valid JSON: {}", e.what());
  }
  return kv_model_from_hf_json(config, path);
}

}  // namespace hysparse
