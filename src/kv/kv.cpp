#include "kv/kv.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <limits>

#include "common/error.hpp"
#include "common/memory.hpp"
#include "kv/schedule.hpp"

namespace hysparse {
namespace {

constexpr std::uint64_t kMaxU64 = std::numeric_limits<std::uint64_t>::max();

std::uint64_t mul(std::uint64_t a, std::uint64_t b) { return checked_mul(a, b, "KV byte count"); }
std::uint64_t add(std::uint64_t a, std::uint64_t b) {
  if (b > kMaxU64 - a) fail(ErrorKind::kInput, "KV byte count overflows 64 bits ({} + {})", a, b);
  return a + b;
}
std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) { return a / b + (a % b != 0 ? 1 : 0); }
std::uint64_t u(std::int64_t v) { return static_cast<std::uint64_t>(v < 0 ? 0 : v); }

std::string lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

std::string trim(const std::string& text) {
  const auto begin = text.find_first_not_of(" \t");
  if (begin == std::string::npos) return "";
  const auto end = text.find_last_not_of(" \t");
  return text.substr(begin, end - begin + 1);
}

// "123", "16K", "1M", "2G" (binary). Returns false on anything else or on overflow.
bool parse_scaled(const std::string& text, std::uint64_t& value) {
  if (text.empty()) return false;
  std::uint64_t scale = 1;
  std::string digits = text;
  switch (text.back()) {
    case 'k': case 'K': scale = 1ull << 10; digits.pop_back(); break;
    case 'm': case 'M': scale = 1ull << 20; digits.pop_back(); break;
    case 'g': case 'G': scale = 1ull << 30; digits.pop_back(); break;
    default: break;
  }
  if (digits.empty() || digits.size() > 19) return false;
  std::uint64_t number = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    number = number * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (number != 0 && scale > kMaxU64 / number) return false;
  value = number * scale;
  return true;
}

// Sum over t = 1..T of min(t, n): the causal query-key pairs of a window of n keys.
double window_pairs(std::uint64_t T, std::uint64_t n) {
  const double t = static_cast<double>(T);
  if (n >= T) return t * (t + 1) / 2;
  const double w = static_cast<double>(n);
  return w * (w + 1) / 2 + (t - w) * w;
}

double dense_pairs(std::uint64_t T) { return window_pairs(T, T); }

// One group of heads of a layer that behave alike.
struct Segment {
  std::uint64_t heads = 0;           // cached heads
  std::uint64_t resident = 0;        // tokens per head
  double growth = 0;                 // resident tokens added per extra context token
  std::uint64_t attended = 0;        // keys a decoded token attends (per query head)
  std::uint64_t read_tokens = 0;     // tokens per head read by a decoded token
  double prefill_pairs = 0;          // per query head
  const char* bucket = "full";       // full | window | budget
};

Segment full_segment(std::uint64_t heads, std::uint64_t T) {
  return {heads, T, 1.0, T, T, dense_pairs(T), "full"};
}

Segment window_segment(std::uint64_t heads, std::uint64_t T, std::uint64_t n) {
  const std::uint64_t r = std::min(T, n);
  return {heads, r, T < n ? 1.0 : 0.0, r, r, window_pairs(T, n), "window"};
}

Segment chunked_segment(std::uint64_t heads, std::uint64_t T, std::uint64_t chunk) {
  Segment s;
  s.heads = heads;
  s.resident = std::min(T, chunk);  // the peak: one whole chunk
  s.growth = T < chunk ? 1.0 : 0.0;
  s.attended = (T - 1) % chunk + 1;  // keys of the current chunk
  s.read_tokens = s.attended;
  const double c = static_cast<double>(chunk), full = static_cast<double>(T / chunk), rest = static_cast<double>(T % chunk);
  s.prefill_pairs = full * c * (c + 1) / 2 + rest * (rest + 1) / 2;
  s.bucket = "window";
  return s;
}

}  // namespace

// ---------------------------------------------------------------- dtypes, layer types, model

KvDtype parse_kv_dtype(const std::string& text) {
  const std::string t = lower(text);
  if (t == "bf16" || t == "bfloat16") return KvDtype::kBf16;
  if (t == "fp16" || t == "float16" || t == "half") return KvDtype::kFp16;
  if (t == "fp32" || t == "float32" || t == "float") return KvDtype::kFp32;
  if (t == "fp8" || t == "float8" || t == "fp8_e4m3" || t == "fp8_e5m2" || t == "e4m3" || t == "e5m2") return KvDtype::kFp8;
  fail(ErrorKind::kUsage, "--dtype {}: expected bf16, fp16, fp32 or fp8", text);
}

const char* to_string(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kFp8: return "fp8";
    case KvDtype::kBf16: return "bf16";
    case KvDtype::kFp16: return "fp16";
    case KvDtype::kFp32: return "fp32";
  }
  return "?";
}

std::int64_t kv_dtype_bits(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kFp8: return 8;
    case KvDtype::kBf16: return 16;
    case KvDtype::kFp16: return 16;
    case KvDtype::kFp32: return 32;
  }
  return 16;
}

const char* to_string(KvLayerType type) {
  switch (type) {
    case KvLayerType::kFull: return "full_attention";
    case KvLayerType::kSliding: return "sliding_attention";
    case KvLayerType::kChunked: return "chunked_attention";
  }
  return "?";
}

KvLayerType parse_layer_type(const std::string& text, const std::string& where) {
  if (text == "full_attention") return KvLayerType::kFull;
  if (text == "sliding_attention") return KvLayerType::kSliding;
  if (text == "chunked_attention") return KvLayerType::kChunked;
  fail(ErrorKind::kInput, "{}: unknown layer type \"{}\" (expected full_attention, sliding_attention or chunked_attention)",
       where, text);
}

bool KvModel::has_non_full_layers() const {
  return std::any_of(layer_types.begin(), layer_types.end(), [](KvLayerType t) { return t != KvLayerType::kFull; });
}

std::string KvModel::attention_kind() const {
  if (is_mla()) return "MLA";
  if (num_kv_heads == 1 && num_q_heads > 1) return "MQA";
  if (num_kv_heads == num_q_heads) return "MHA";
  return "GQA";
}

void validate(const KvModel& m) {
  auto bad = [&](const char* field, std::int64_t value, const char* expected) {
    fail(ErrorKind::kInput, "model {}: {} is {} (expected {})", m.name, field, value, expected);
  };
  if (m.num_layers <= 0) bad("num_layers", m.num_layers, "> 0");
  if (m.num_q_heads <= 0) bad("num_q_heads", m.num_q_heads, "> 0");
  if (m.head_dim <= 0) bad("head_dim", m.head_dim, "> 0");
  if (m.v_head_dim < 0) bad("v_head_dim", m.v_head_dim, ">= 0");
  if (m.is_mla()) {
    if (m.qk_rope_head_dim < 0) bad("qk_rope_head_dim", m.qk_rope_head_dim, ">= 0");
  } else {
    if (m.num_kv_heads <= 0) bad("num_kv_heads", m.num_kv_heads, "> 0");
    if (m.num_q_heads % m.num_kv_heads != 0) {
      fail(ErrorKind::kInput, "model {}: num_q_heads {} is not a multiple of num_kv_heads {}", m.name, m.num_q_heads,
           m.num_kv_heads);
    }
  }
  if (!m.layer_types.empty() && static_cast<std::int64_t>(m.layer_types.size()) != m.num_layers) {
    fail(ErrorKind::kInput, "model {}: {} layer types for {} layers", m.name, m.layer_types.size(), m.num_layers);
  }
  const bool sliding = std::count(m.layer_types.begin(), m.layer_types.end(), KvLayerType::kSliding) > 0;
  const bool chunked = std::count(m.layer_types.begin(), m.layer_types.end(), KvLayerType::kChunked) > 0;
  if (sliding && m.sliding_window <= 0) bad("sliding_window", m.sliding_window, "> 0 for sliding_attention layers");
  if (chunked && m.chunk_size <= 0) bad("attention_chunk_size", m.chunk_size, "> 0 for chunked_attention layers");
  if (m.hybrid_window < 0) bad("hybrid window", m.hybrid_window, ">= 0");
  if (m.hybrid_block <= 0) bad("hybrid block", m.hybrid_block, "> 0");
  if (m.hybrid_topk < 0) bad("hybrid top-k", m.hybrid_topk, ">= 0");
  if (!m.hybrid_schedule.empty()) (void)parse_schedule(m.hybrid_schedule, m.num_layers);
}

std::uint64_t kv_bytes_per_token_per_layer(const KvModel& model, KvDtype dtype) {
  return mul(mul(u(model.cached_heads()), u(model.cached_elements_per_head())), u(kv_dtype_bits(dtype) / 8));
}

std::uint64_t kv_bytes_per_token_full(const KvModel& model, KvDtype dtype) {
  return mul(kv_bytes_per_token_per_layer(model, dtype), u(model.num_layers));
}

KvModel kv_model_from_shape(const std::string& name, std::int64_t num_layers, std::int64_t num_q_heads,
                            std::int64_t num_kv_heads, std::int64_t head_dim,
                            const std::vector<std::string>& layer_types, std::optional<std::int64_t> sliding_window,
                            std::optional<std::int64_t> chunk_size) {
  KvModel m;
  m.name = name;
  m.source = "capture header";
  m.num_layers = num_layers;
  m.num_q_heads = num_q_heads;
  m.num_kv_heads = num_kv_heads;
  m.head_dim = head_dim;
  for (std::size_t i = 0; i < layer_types.size(); ++i) {
    m.layer_types.push_back(parse_layer_type(layer_types[i], fmt::format("{}: layer_types[{}]", name, i)));
  }
  if (sliding_window) m.sliding_window = *sliding_window;
  if (chunk_size) m.chunk_size = *chunk_size;
  validate(m);
  return m;
}

// ---------------------------------------------------------------- methods

std::string KvMethod::describe() const {
  std::string text = name();
  for (std::size_t i = 0; i < params.size(); ++i) {
    text += fmt::format("{}{}={}", i == 0 ? ":" : ",", params[i].name, params[i].value);
  }
  return text;
}

KvMethod resolve_method(const std::string& spec_in, const KvModel& model, const KvOverrides& overrides) {
  const std::string spec = trim(spec_in);
  const std::size_t colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  KvMethod method;
  method.spec = spec;
  method.footprint = &find_footprint(name);
  const KvFootprint& fp = *method.footprint;
  method.params = fp.params;
  auto set = [&](const std::string& key, std::int64_t value) {
    for (auto& p : method.params) {
      if (p.name == key) p.value = value;
    }
  };
  const bool hybrid = fp.residency == KvResidency::kHybridWindow || fp.residency == KvResidency::kHybridSparse;
  if (hybrid) {
    set("window", model.hybrid_window);
    set("topk", model.hybrid_topk);
    set("block", model.hybrid_block);
  }
  for (const auto& [key, value] : overrides.values) set(key, value);
  if (colon != std::string::npos) {
    const std::string keys = spec.substr(colon + 1);
    std::size_t begin = 0;
    while (begin <= keys.size()) {
      const std::size_t comma = std::min(keys.find(',', begin), keys.size());
      const std::string item = trim(keys.substr(begin, comma - begin));
      begin = comma + 1;
      const std::size_t eq = item.find('=');
      if (eq == std::string::npos) {
        fail(ErrorKind::kUsage, "method '{}': '{}' is not key=value", spec, item);
      }
      const std::string key = trim(item.substr(0, eq));
      if (!has_param(method.params, key)) {
        std::vector<std::string> known;
        for (const auto& p : fp.params) known.push_back(p.name);
        fail(ErrorKind::kUsage, "method '{}': {} has no parameter '{}' (expected {})", spec, name, key,
             known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", ")));
      }
      std::uint64_t value = 0;
      if (!parse_scaled(trim(item.substr(eq + 1)), value) ||
          value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail(ErrorKind::kUsage, "method '{}': {}='{}' is not a non-negative integer", spec, key, item.substr(eq + 1));
      }
      set(key, static_cast<std::int64_t>(value));
    }
  }

  // Parameter checks.
  // At most 2^40 (far above any real window, budget or page): sums such as sinks + window + budget
  // below, and in the accounting, then cannot overflow.
  constexpr std::int64_t kMaxParam = std::int64_t{1} << 40;
  for (const auto& p : method.params) {
    if (p.value < 0) fail(ErrorKind::kUsage, "method '{}': {} is {} (expected >= 0)", spec, p.name, p.value);
    if (p.value > kMaxParam) {
      fail(ErrorKind::kUsage, "method '{}': {} is {} (expected at most 2^40 = {})", spec, p.name, p.value, kMaxParam);
    }
  }
  for (const char* period : {"page", "block", "stride"}) {
    if (has_param(method.params, period) && method.param(period) < 1) {
      fail(ErrorKind::kUsage, "method '{}': {} is {} (expected >= 1)", spec, period, method.param(period));
    }
  }
  for (const char* percent : {"keep", "streaming"}) {
    if (has_param(method.params, percent) && method.param(percent) > 100) {
      fail(ErrorKind::kUsage, "method '{}': {} is {} percent (expected 0..100)", spec, percent, method.param(percent));
    }
  }
  const bool windowed = fp.residency == KvResidency::kWindowAll || hybrid || fp.residency == KvResidency::kHeadSplit;
  if (windowed && method.param("window") + method.param("sinks") < 1) {
    fail(ErrorKind::kUsage, "method '{}': window + sinks is 0 (a token attends at least itself)", spec);
  }
  if ((fp.residency == KvResidency::kSelect || fp.residency == KvResidency::kEvict) && method.param("budget") == 0 &&
      method.param("keep") == 0) {
    fail(ErrorKind::kUsage, "method '{}': budget is 0{} (nothing would be attended)", spec,
         has_param(method.params, "keep") ? " and keep is 0" : "");
  }
  if (fp.residency == KvResidency::kHybridSparse && method.param("topk") % method.param("block") != 0) {
    fail(ErrorKind::kUsage, "method '{}': topk {} is not a multiple of block {} (top-k selects whole blocks)", spec,
         method.param("topk"), method.param("block"));
  }
  if (fp.residency == KvResidency::kHeadSplit && model.is_mla()) {
    fail(ErrorKind::kUsage, "method '{}': {} keeps KV per head, but {} (MLA) caches one latent shared by all heads",
         spec, name, model.name);
  }
  if (hybrid) {
    method.schedule_spec = overrides.schedule.empty() ? model.hybrid_schedule : overrides.schedule;
    if (method.schedule_spec.empty()) {
      fail(ErrorKind::kUsage,
           "method '{}' needs a full/sparse layer schedule and model {} has none: give --schedule (e.g. 1:3, FSSS or "
           "full=0,4,8)",
           spec, model.name);
    }
    method.schedule = parse_schedule(method.schedule_spec, model.num_layers);
  }
  return method;
}

std::vector<std::string> split_method_list(const std::string& list, const KvModel& model,
                                           const KvOverrides& overrides) {
  std::vector<std::string> specs;
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t comma = std::min(list.find(',', begin), list.size());
    const std::string item = trim(list.substr(begin, comma - begin));
    begin = comma + 1;
    if (item.empty()) fail(ErrorKind::kUsage, "--method '{}': empty method name", list);
    if (item.find('=') != std::string::npos && item.find(':') == std::string::npos) {
      if (specs.empty()) fail(ErrorKind::kUsage, "--method '{}': '{}' is a parameter without a method", list, item);
      specs.back() += "," + item;
      continue;
    }
    if (item == "all") {
      const bool has_schedule = !overrides.schedule.empty() || !model.hybrid_schedule.empty();
      for (const auto& f : kv_footprints()) {
        const bool hybrid = f.residency == KvResidency::kHybridWindow || f.residency == KvResidency::kHybridSparse;
        if (hybrid && !has_schedule) continue;
        if (f.residency == KvResidency::kNative && !model.has_non_full_layers()) continue;
        if (f.residency == KvResidency::kHeadSplit && model.is_mla()) continue;
        specs.push_back(f.method);
      }
      continue;
    }
    specs.push_back(item);
  }
  return specs;
}

std::vector<std::string> default_method_specs(const KvModel& model, const KvOverrides& overrides) {
  const bool native = model.has_non_full_layers();
  const bool hybrid = !overrides.schedule.empty() || !model.hybrid_schedule.empty();
  std::vector<std::string> specs;
  specs.reserve(4);
  for (const char* name : {"full", "native", "hybrid-swa", "hysparse"}) {
    const std::string method(name);
    if (method == "full" || (method == "native" && native) || (method != "native" && hybrid)) specs.push_back(method);
  }
  return specs;
}

// ---------------------------------------------------------------- contexts

std::vector<std::uint64_t> parse_contexts(const std::string& list) {
  std::vector<std::uint64_t> contexts;
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t comma = std::min(list.find(',', begin), list.size());
    const std::string item = trim(list.substr(begin, comma - begin));
    begin = comma + 1;
    std::uint64_t value = 0;
    if (!parse_scaled(item, value)) {
      fail(ErrorKind::kUsage,
           "--context '{}': '{}' is not a token count (expected integers or K/M/G binary suffixes, e.g. 4K,32K,128K,1M)",
           list, item);
    }
    if (value == 0) fail(ErrorKind::kUsage, "--context '{}': a context of 0 tokens", list);
    contexts.push_back(value);
  }
  return contexts;
}

std::string format_context(std::uint64_t tokens) {
  if (tokens != 0 && tokens % (1ull << 30) == 0) return fmt::format("{}G", tokens >> 30);
  if (tokens != 0 && tokens % (1ull << 20) == 0) return fmt::format("{}M", tokens >> 20);
  if (tokens != 0 && tokens % (1ull << 10) == 0) return fmt::format("{}K", tokens >> 10);
  return fmt::format("{}", tokens);
}

// ---------------------------------------------------------------- accounting

namespace {

KvAccounting account_unchecked(const KvModel& model, const KvMethod& method, KvDtype dtype, std::uint64_t batch,
                               std::uint64_t T) {
  const KvFootprint& fp = *method.footprint;
  const std::int64_t dtype_bits = kv_dtype_bits(dtype);
  const std::uint64_t H = u(model.cached_heads());
  const std::uint64_t group = u(model.num_q_heads) / H;  // query heads per cached head
  const std::uint64_t head_bytes = mul(u(model.cached_elements_per_head()), u(dtype_bits / 8));
  const std::int64_t d = model.cached_key_dim();
  const double decode_dims = model.is_mla() ? static_cast<double>(2 * model.kv_lora_rank + model.qk_rope_head_dim)
                                            : static_cast<double>(model.head_dim + model.value_dim());
  const double prefill_dims = static_cast<double>(model.head_dim + model.value_dim());

  const std::uint64_t sinks = u(method.param("sinks"));
  const std::uint64_t window = u(method.param("window"));
  const std::uint64_t budget = u(method.param("budget"));
  const std::uint64_t keep = u(method.param("keep"));

  KvAccounting a;
  a.method = method.describe();
  a.context = T;
  a.batch = batch;

  // Duo: spread the streaming heads over the layers so the total is floor(L * H * streaming%).
  const std::uint64_t streaming_percent = u(method.param("streaming"));
  auto streaming_heads_before = [&](std::uint64_t layer) { return layer * H * streaming_percent / 100; };

  std::uint64_t kv_total = 0, meta_total = 0, read_total = 0, full_bytes = 0, window_bytes = 0, budget_bytes = 0;
  double marginal = 0;
  for (std::int64_t l = 0; l < model.num_layers; ++l) {
    const std::size_t li = static_cast<std::size_t>(l);
    const KvLayerType native = model.layer_type(l);
    std::vector<Segment> segments;
    std::uint64_t extra_read_tokens = 0;  // HySparse: tokens read from the preceding full layer's cache
    bool governed = false;                // the method's metadata applies to this layer
    std::string role;
    auto native_segment = [&]() {
      if (native == KvLayerType::kSliding) {
        role = "window";
        return window_segment(H, T, u(model.sliding_window));
      }
      if (native == KvLayerType::kChunked) {
        role = "chunk";
        return chunked_segment(H, T, u(model.chunk_size));
      }
      role = "full";
      return full_segment(H, T);
    };
    switch (fp.residency) {
      case KvResidency::kAllFull:
        segments.push_back(full_segment(H, T));
        role = "full";
        break;
      case KvResidency::kNative:
        segments.push_back(native_segment());
        break;
      case KvResidency::kWindowAll:
        segments.push_back(window_segment(H, T, sinks + window));
        role = "window";
        break;
      case KvResidency::kHybridWindow:
      case KvResidency::kHybridSparse:
        if (method.schedule[li]) {
          segments.push_back(full_segment(H, T));
          role = "full";
        } else {
          Segment s = window_segment(H, T, sinks + window);
          role = "window";
          if (fp.residency == KvResidency::kHybridSparse) {
            extra_read_tokens = std::min(T, u(method.param("topk")));
            s.attended += extra_read_tokens;
            s.prefill_pairs += window_pairs(T, u(method.param("topk")));
            role = "sparse";
          }
          segments.push_back(s);
        }
        break;
      case KvResidency::kSelect:
      case KvResidency::kEvict:
      case KvResidency::kHeadSplit:
        if (native != KvLayerType::kFull) {
          segments.push_back(native_segment());
          break;
        }
        governed = true;
        if (fp.residency == KvResidency::kSelect) {
          Segment s = full_segment(H, T);
          const std::uint64_t forced = sinks + window;
          if (budget > 0) {
            s.attended = std::min(T, forced + budget);
            s.read_tokens = s.attended;
            if (fp.sparse_prefill) s.prefill_pairs = window_pairs(T, forced + budget);
          } else {
            s.attended = std::min(T, forced + ceil_div(mul(T, keep), 100));
            s.read_tokens = s.attended;
            if (fp.sparse_prefill) {
              const double t = static_cast<double>(T);
              s.prefill_pairs = std::min(dense_pairs(T), static_cast<double>(forced) * t +
                                                             static_cast<double>(keep) / 100.0 * t * (t + 1) / 2);
            }
          }
          segments.push_back(s);
          role = "select";
        } else if (fp.residency == KvResidency::kEvict) {
          Segment s = full_segment(H, T);
          s.bucket = "budget";
          if (budget > 0) {
            s.resident = std::min(T, budget);
            s.growth = T < budget ? 1.0 : 0.0;
          } else {
            s.resident = std::min(T, std::max<std::uint64_t>(1, ceil_div(mul(T, keep), 100)));
            s.growth = static_cast<double>(keep) / 100.0;
          }
          s.attended = s.resident;
          s.read_tokens = s.resident;
          segments.push_back(s);  // prefill stays dense: eviction happens after it
          role = "evict";
        } else {
          const std::uint64_t streaming = streaming_heads_before(u(l) + 1) - streaming_heads_before(u(l));
          if (H - streaming > 0) segments.push_back(full_segment(H - streaming, T));
          if (streaming > 0) segments.push_back(window_segment(streaming, T, sinks + window));
          role = "duo";
        }
        break;
    }

    KvLayerAccount layer;
    layer.role = role;
    std::uint64_t layer_read = 0;
    double layer_growth_bytes = 0;
    std::uint64_t governed_resident = 0;
    double governed_growth = 0;
    for (const Segment& s : segments) {
      const std::uint64_t bytes = mul(mul(s.heads, s.resident), head_bytes);
      layer.kv_bytes = add(layer.kv_bytes, bytes);
      if (std::string(s.bucket) == "full") full_bytes = add(full_bytes, bytes);
      else if (std::string(s.bucket) == "window") window_bytes = add(window_bytes, bytes);
      else budget_bytes = add(budget_bytes, bytes);
      layer_read = add(layer_read, mul(mul(s.heads, s.read_tokens), head_bytes));
      layer_growth_bytes += static_cast<double>(s.heads) * s.growth * static_cast<double>(head_bytes);
      const double q_heads = static_cast<double>(s.heads * group);
      layer.decode_flops += q_heads * static_cast<double>(s.attended) * 2.0 * decode_dims;
      layer.prefill_flops += q_heads * s.prefill_pairs * 2.0 * prefill_dims;
      governed_resident = std::max(governed_resident, s.resident);
      governed_growth = std::max(governed_growth, s.growth);
    }
    if (extra_read_tokens > 0) layer_read = add(layer_read, mul(mul(H, extra_read_tokens), head_bytes));

    if (governed) {
      auto units = [&](KvMetaScope scope) -> std::uint64_t {
        switch (scope) {
          case KvMetaScope::kNone: return 0;
          case KvMetaScope::kKvHead: return H;
          case KvMetaScope::kQueryHead: return u(model.num_q_heads);
          case KvMetaScope::kLayer: return 1;
        }
        return 0;
      };
      const KvMetadata& meta = fp.metadata;
      const std::uint64_t meta_units = units(meta.scope);
      const std::uint64_t period = u(metadata_period(meta, method.params));
      const std::uint64_t entry_bits = metadata_bits_per_entry(meta, d, dtype_bits, method.params);
      const std::uint64_t fixed_bits = metadata_fixed_bits(meta, d, dtype_bits, method.params);
      const std::uint64_t entries = ceil_div(governed_resident, period);
      const std::uint64_t meta_bits = mul(meta_units, add(mul(entries, entry_bits), fixed_bits));
      layer.metadata_bytes = ceil_div(meta_bits, 8);
      layer_growth_bytes += static_cast<double>(meta_units) * governed_growth * static_cast<double>(entry_bits) /
                            static_cast<double>(period) / 8.0;
      std::uint64_t scan_bits = 0;
      if (fp.scan_is_metadata) {
        scan_bits = mul(meta_units, mul(entries, entry_bits));
      } else {
        const std::uint64_t scan_period = u(metadata_period(fp.scan, method.params));
        scan_bits = mul(units(fp.scan.scope), mul(ceil_div(governed_resident, scan_period),
                                                  metadata_bits_per_entry(fp.scan, d, dtype_bits, method.params)));
      }
      layer_read = add(layer_read, ceil_div(scan_bits, 8));
    }
    layer.read_bytes = layer_read;
    kv_total = add(kv_total, layer.kv_bytes);
    meta_total = add(meta_total, layer.metadata_bytes);
    read_total = add(read_total, layer_read);
    marginal += layer_growth_bytes;
    a.decode_flops_per_token += layer.decode_flops;
    a.prefill_flops += layer.prefill_flops;
    a.layers.push_back(layer);
  }

  const std::uint64_t per_sequence = add(kv_total, meta_total);
  a.kv_bytes = mul(kv_total, batch);
  a.metadata_bytes = mul(meta_total, batch);
  a.resident_bytes = mul(per_sequence, batch);
  a.full_layer_bytes = mul(full_bytes, batch);
  a.window_layer_bytes = mul(window_bytes, batch);
  a.budget_layer_bytes = mul(budget_bytes, batch);
  a.full_attention_bytes = mul(mul(kv_bytes_per_token_full(model, dtype), T), batch);
  a.ratio_to_full = a.resident_bytes == 0 ? 0.0
                                          : static_cast<double>(a.full_attention_bytes) / static_cast<double>(a.resident_bytes);
  a.bytes_per_token = static_cast<double>(per_sequence) / static_cast<double>(T);
  a.marginal_bytes_per_token = marginal;
  a.read_bytes_per_decoded_token = read_total;
  return a;
}

}  // namespace

KvAccounting account(const KvModel& model, const KvMethod& method, KvDtype dtype, std::uint64_t batch,
                     std::uint64_t context) {
  if (method.footprint == nullptr) fail(ErrorKind::kInternal, "account(): method '{}' was not resolved", method.spec);
  if (context == 0) fail(ErrorKind::kUsage, "a context of 0 tokens");
  if (batch == 0) fail(ErrorKind::kUsage, "a batch of 0 sequences");
  validate(model);
  const bool hybrid = method.footprint->residency == KvResidency::kHybridWindow ||
                      method.footprint->residency == KvResidency::kHybridSparse;
  if (hybrid && static_cast<std::int64_t>(method.schedule.size()) != model.num_layers) {
    fail(ErrorKind::kUsage, "method '{}': its schedule has {} layers but model {} has {}", method.spec,
         method.schedule.size(), model.name, model.num_layers);
  }
  try {
    return account_unchecked(model, method, dtype, batch, context);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kInput) throw;
    fail(ErrorKind::kUsage, "{} at context {} x batch {} ({}, {}): {}", method.describe(), context, batch, model.name,
         to_string(dtype), e.what());
  }
}

}  // namespace hysparse
