#include "capture/capture.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "common/memory.hpp"

namespace hysparse {
namespace {

const std::set<std::string> kKnownLayerTypes = {"full_attention", "sliding_attention", "chunked_attention"};

std::string layer_path(std::int64_t index) { return "/layers/" + std::to_string(index); }

// A required root attribute: its absence is reported with what the format expects there.
void require_root_attribute(const h5::File& file, const char* name, const std::string& expected) {
  if (!h5::has_attribute(file, "/", name)) {
    fail_input(file.path(), "", "missing root attribute '{}' (expected {})", name, expected);
  }
}

// a * b for a size the header implies; an overflow names the file and the attributes.
std::uint64_t header_mul(const h5::File& file, std::uint64_t a, std::uint64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) {
    fail_input(file.path(), "", "{} overflows 64 bits ({} x {}) (expected dimensions whose product fits in 64 bits)",
               what, a, b);
  }
  return a * b;
}

// "0", "1", ... "N-1" exactly as the writer spells layer groups (no sign, no leading zeros).
bool is_layer_name(const std::string& name, std::int64_t num_layers) {
  if (name.empty() || name.size() > 19 || (name.size() > 1 && name[0] == '0')) return false;
  std::uint64_t value = 0;
  for (char c : name) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<std::uint64_t>(c - '0');  // 19 digits fit in 64 bits
  }
  return value < static_cast<std::uint64_t>(num_layers);
}

std::int64_t read_positive(const h5::File& file, const char* name) {
  require_root_attribute(file, name, "a positive integer");
  const std::int64_t value = h5::read_int_attribute(file, "/", name);
  if (value <= 0) fail_input(file.path(), "", "attribute '{}' is {} (expected a positive integer)", name, value);
  return value;
}

void expect_dims(const h5::File& file, const std::string& path, const h5::DatasetInfo& info,
                 const std::vector<std::uint64_t>& expected, const char* meaning) {
  if (info.dims == expected) return;
  auto join = [](const std::vector<std::uint64_t>& dims) {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  };
  fail_input(file.path(), path, "has shape {} (expected {} = {})", join(info.dims), join(expected), meaning);
}

void expect_float_type(const h5::File& file, const std::string& path, const h5::DatasetInfo& info) {
  using h5::ElementType;
  if (info.element_type == ElementType::kFloat32 || info.element_type == ElementType::kFloat16 ||
      info.element_type == ElementType::kBFloat16 || info.element_type == ElementType::kFloat64) {
    return;
  }
  if (info.element_type == ElementType::kUInt16) {
    fail_input(file.path(), path, "is uint16 without attribute dtype=\"bfloat16\" (expected float32, float16, or "
                                  "bfloat16 stored as uint16 with that attribute)");
  }
  fail_input(file.path(), path, "has element type {} (expected float32, float16, or bfloat16)",
             info.type_description);
}

// Finds the first non-finite value and names its [head, position, column].
void reject_non_finite(const std::string& file, const std::string& path, const std::vector<float>& data,
                       std::uint64_t rows_per_head, std::uint64_t columns, const char* column_name) {
  // The first non-finite value (lowest index): chunks are scanned by every thread with a test that
  // vectorises (all exponent bits set), and only a chunk that holds one is searched value by value.
  constexpr std::int64_t kChunk = 4096;
  const auto n = static_cast<std::int64_t>(data.size());
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  std::int64_t first = n;
#pragma omp parallel for schedule(static) reduction(min : first) if (n > (1 << 16))
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    std::uint32_t special = 0;
    for (std::int64_t i = begin; i < end; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, &data[static_cast<std::size_t>(i)], sizeof bits);
      special |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (!special) continue;
    for (std::int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(data[static_cast<std::size_t>(i)])) {
        first = std::min(first, i);
        break;
      }
    }
  }
  if (first < n) {
    const auto i = static_cast<std::size_t>(first);
    const std::uint64_t per_head = rows_per_head * columns;
    const std::uint64_t head = i / per_head;
    const std::uint64_t position = (i % per_head) / columns;
    const std::uint64_t column = i % columns;
    fail_input(file, path, "holds {} at head {}, position {}, {} {} (expected finite values)",
               std::isnan(data[i]) ? "NaN" : "Inf", head, position, column_name, column);
  }
}

}  // namespace

double CaptureHeader::effective_softmax_scale() const {
  return softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

CaptureReader CaptureReader::open(const std::string& path) {
  CaptureReader reader;
  reader.file_ = h5::File::open_read(path);
  const h5::File& file = reader.file_;
  CaptureHeader& header = reader.header_;

  if (!h5::has_attribute(file, "/", "format")) {
    fail_input(path, "", "missing root attribute 'format' (expected \"{}\"; is this a hysparse capture?)",
               kCaptureFormat);
  }
  const std::string format = h5::read_string_attribute(file, "/", "format");
  if (format != kCaptureFormat) {
    fail_input(path, "", "attribute 'format' is \"{}\" (expected \"{}\")", format, kCaptureFormat);
  }
  require_root_attribute(file, "format_version", fmt::format("the integer {}", kCaptureFormatVersion));
  const std::int64_t version = h5::read_int_attribute(file, "/", "format_version");
  if (version != kCaptureFormatVersion) {
    fail_input(path, "", "attribute 'format_version' is {} (expected {})", version, kCaptureFormatVersion);
  }
  require_root_attribute(file, "model", "a string naming the model");
  header.model = h5::read_string_attribute(file, "/", "model");
  require_root_attribute(file, "source", "a string naming what produced the file");
  header.source = h5::read_string_attribute(file, "/", "source");
  header.num_layers = read_positive(file, "num_layers");
  header.num_q_heads = read_positive(file, "num_q_heads");
  header.num_kv_heads = read_positive(file, "num_kv_heads");
  header.head_dim = read_positive(file, "head_dim");
  header.seq_len = read_positive(file, "seq_len");
  if (header.num_q_heads % header.num_kv_heads != 0) {
    fail_input(path, "", "num_q_heads = {} is not a multiple of num_kv_heads = {} (expected MHA, GQA or MQA)",
               header.num_q_heads, header.num_kv_heads);
  }
  // Every byte count the replay will form must fit in 64 bits, q, k and v of a layer together included.
  const auto T = static_cast<std::uint64_t>(header.seq_len);
  const auto q_heads = static_cast<std::uint64_t>(header.num_q_heads);
  const auto kv_heads = static_cast<std::uint64_t>(header.num_kv_heads);
  const auto dim = static_cast<std::uint64_t>(header.head_dim);
  header_mul(file, header_mul(file, header_mul(file, q_heads, T, "num_q_heads x seq_len"), dim,
                              "num_q_heads x seq_len x head_dim"),
             sizeof(float), "num_q_heads x seq_len x head_dim x 4 bytes");
  // Here kv_heads <= q_heads < 2^62, so the unsigned head sum cannot overflow.
  header_mul(file,
             header_mul(file, header_mul(file, q_heads + 2 * kv_heads, T, "(num_q_heads + 2 x num_kv_heads) x seq_len"),
                        dim, "(num_q_heads + 2 x num_kv_heads) x seq_len x head_dim"),
             sizeof(float), "(num_q_heads + 2 x num_kv_heads) x seq_len x head_dim x 4 bytes (q, k and v of a layer)");
  if (h5::has_attribute(file, "/", "softmax_scale")) {
    const double scale = h5::read_double_attribute(file, "/", "softmax_scale");
    if (!std::isfinite(scale) || scale <= 0) {
      fail_input(path, "", "attribute 'softmax_scale' is {} (expected a finite positive number)", scale);
    }
    header.softmax_scale = scale;
  }
  if (h5::has_attribute(file, "/", "layer_types")) {
    header.layer_types = h5::read_string_list_attribute(file, "/", "layer_types");
    if (static_cast<std::int64_t>(header.layer_types.size()) != header.num_layers) {
      fail_input(path, "", "attribute 'layer_types' has {} entries (expected num_layers = {})",
                 header.layer_types.size(), header.num_layers);
    }
    for (const auto& type : header.layer_types) {
      if (!kKnownLayerTypes.count(type)) {
        fail_input(path, "", "attribute 'layer_types' holds \"{}\" (expected full_attention, sliding_attention "
                             "or chunked_attention)", type);
      }
    }
  }
  if (h5::has_attribute(file, "/", "sliding_window")) {
    const std::int64_t window = h5::read_int_attribute(file, "/", "sliding_window");
    if (window <= 0) fail_input(path, "", "attribute 'sliding_window' is {} (expected a positive integer)", window);
    header.sliding_window = window;
  }

  if (!h5::is_group(file.id(), "/layers")) fail_input(path, "/layers", "missing group (expected one subgroup per layer)");
  for (const auto& child : h5::list_children(file, "/layers")) {
    if (!is_layer_name(child, header.num_layers)) {
      fail_input(path, "/layers/" + child, "unexpected layer (expected /layers/0 .. /layers/{})", header.num_layers - 1);
    }
  }

  const auto Hq = static_cast<std::uint64_t>(header.num_q_heads);
  const auto Hkv = static_cast<std::uint64_t>(header.num_kv_heads);
  const auto d = static_cast<std::uint64_t>(header.head_dim);
  for (std::int64_t i = 0; i < header.num_layers; ++i) {
    const std::string lp = layer_path(i);
    if (!h5::is_group(file.id(), lp)) {
      fail_input(path, lp, "missing layer group (expected /layers/0 .. /layers/{} for num_layers = {})",
                 header.num_layers - 1, header.num_layers);
    }
    LayerInfo info;
    info.has_q = h5::is_dataset(file.id(), lp + "/q");
    info.has_k = h5::is_dataset(file.id(), lp + "/k");
    info.has_v = h5::is_dataset(file.id(), lp + "/v");
    info.has_attn = h5::is_dataset(file.id(), lp + "/attn");
    info.has_sinks = h5::is_dataset(file.id(), lp + "/sink_logits");
    if (info.has_q != info.has_k) {
      fail_input(path, lp + (info.has_q ? "/k" : "/q"), "missing dataset (expected q and k together)");
    }
    if (info.has_v && !info.has_qk()) {
      fail_input(path, lp + "/v", "present without q and k (expected v only alongside q and k)");
    }
    if (!info.has_qk() && !info.has_attn) {
      fail_input(path, lp, "holds neither q/k nor attn (expected q [Hq, T, d] and k [Hkv, T, d], or attn [Hq, T, T])");
    }
    if (info.has_qk()) {
      const auto q_info = h5::dataset_info(file, lp + "/q");
      expect_dims(file, lp + "/q", q_info, {Hq, T, d}, "[num_q_heads, seq_len, head_dim]");
      expect_float_type(file, lp + "/q", q_info);
      const auto k_info = h5::dataset_info(file, lp + "/k");
      expect_dims(file, lp + "/k", k_info, {Hkv, T, d}, "[num_kv_heads, seq_len, head_dim]");
      expect_float_type(file, lp + "/k", k_info);
      info.dtype = q_info.element_type;
      if (info.has_v) {
        const auto v_info = h5::dataset_info(file, lp + "/v");
        expect_dims(file, lp + "/v", v_info, {Hkv, T, d}, "[num_kv_heads, seq_len, head_dim]");
        expect_float_type(file, lp + "/v", v_info);
      }
    }
    if (info.has_attn) {
      header_mul(file, header_mul(file, header_mul(file, Hq, T, "num_q_heads x seq_len"), T,
                                  "num_q_heads x seq_len x seq_len"),
                 sizeof(float), "attn size in bytes");
      const auto a_info = h5::dataset_info(file, lp + "/attn");
      expect_dims(file, lp + "/attn", a_info, {Hq, T, T}, "[num_q_heads, seq_len, seq_len]");
      expect_float_type(file, lp + "/attn", a_info);
      if (!info.has_qk()) info.dtype = a_info.element_type;
    }
    if (info.has_sinks) {
      const auto s_info = h5::dataset_info(file, lp + "/sink_logits");
      expect_dims(file, lp + "/sink_logits", s_info, {Hq}, "[num_q_heads]");
      expect_float_type(file, lp + "/sink_logits", s_info);
    }
    reader.layers_.push_back(info);
  }

  reader.has_tokens_ = h5::is_dataset(file.id(), "/tokens");
  if (reader.has_tokens_) {
    const auto t_info = h5::dataset_info(file, "/tokens");
    expect_dims(file, "/tokens", t_info, {T}, "[seq_len]");
    if (t_info.element_type != h5::ElementType::kInt32 && t_info.element_type != h5::ElementType::kInt64) {
      fail_input(path, "/tokens", "has element type {} (expected int32)", t_info.type_description);
    }
  }
  reader.has_text_ = h5::is_dataset(file.id(), "/text");
  return reader;
}

std::vector<std::int64_t> CaptureReader::tokens() const { return h5::read_ints(file_, "/tokens"); }
std::string CaptureReader::text() const { return h5::read_string_dataset(file_, "/text"); }

std::uint64_t CaptureReader::layer_bytes(std::int64_t index, bool with_v) const {
  const LayerInfo& info = layer(index);
  const auto Hq = static_cast<std::uint64_t>(header_.num_q_heads);
  const auto Hkv = static_cast<std::uint64_t>(header_.num_kv_heads);
  const auto T = static_cast<std::uint64_t>(header_.seq_len);
  const auto d = static_cast<std::uint64_t>(header_.head_dim);
  std::uint64_t floats = 0;
  if (info.has_qk()) {
    floats += (Hq + Hkv) * T * d;
    if (with_v && info.has_v) floats += Hkv * T * d;
  } else {
    floats += checked_mul(Hq * T, T, "attn elements");
  }
  return checked_mul(floats, sizeof(float), "layer bytes");
}

LayerTensors CaptureReader::read_layer(std::int64_t index, bool with_v) const {
  LayerTensors tensors;
  read_layer_into(index, with_v, tensors);
  return tensors;
}

std::uint64_t CaptureReader::layer_shortfall_bytes(std::int64_t index, bool with_v, const LayerTensors& tensors) const {
  const LayerInfo& info = layer(index);
  const auto Hq = static_cast<std::uint64_t>(header_.num_q_heads);
  const auto Hkv = static_cast<std::uint64_t>(header_.num_kv_heads);
  const auto T = static_cast<std::uint64_t>(header_.seq_len);
  const auto d = static_cast<std::uint64_t>(header_.head_dim);
  auto missing = [](std::uint64_t floats, const std::vector<float>& held) {
    return floats > held.capacity() ? floats - held.capacity() : 0;
  };
  std::uint64_t floats = 0;
  if (info.has_qk()) {
    floats += missing(Hq * T * d, tensors.q) + missing(Hkv * T * d, tensors.k);
    if (with_v && info.has_v) floats += missing(Hkv * T * d, tensors.v);
  } else {
    floats += missing(checked_mul(Hq * T, T, "attn elements"), tensors.attn);
  }
  if (info.has_sinks) floats += missing(Hq, tensors.sink_logits);
  return checked_mul(floats, sizeof(float), "layer bytes");
}

void CaptureReader::read_layer_into(std::int64_t index, bool with_v, LayerTensors& tensors) const {
  const LayerInfo& info = layer(index);
  // Arrays this layer lacks give their memory back; those it has keep theirs and their size where
  // it does not change (no zero fill), so only the shortfall is allocated.
  auto release = [](std::vector<float>& values) { std::vector<float>().swap(values); };
  if (info.has_qk()) {
    release(tensors.attn);
  } else {
    release(tensors.q);
    release(tensors.k);
  }
  if (!(with_v && info.has_v && info.has_qk())) release(tensors.v);
  if (!info.has_sinks) release(tensors.sink_logits);
  const std::uint64_t shortfall = layer_shortfall_bytes(index, with_v, tensors);
  if (shortfall > 0) require_memory(shortfall, fmt::format("{}: reading layer {}", path(), index));
  const std::string lp = layer_path(index);
  const auto T = static_cast<std::uint64_t>(header_.seq_len);
  const auto d = static_cast<std::uint64_t>(header_.head_dim);
  auto load = [&](const std::string& name, std::vector<float>& out, std::uint64_t rows, std::uint64_t cols,
                  const char* column_name) {
    check_interrupted();  // a layer is read in pieces; Ctrl-C need not wait for all of it
    const std::string dataset = lp + "/" + name;
    const auto info_ = h5::dataset_info(file_, dataset);
    out.resize(info_.element_count());
    h5::read_floats(file_, dataset, info_, out.data());
    reject_non_finite(path(), dataset, out, rows, cols, column_name);
  };
  if (info.has_qk()) {
    load("q", tensors.q, T, d, "channel");
    load("k", tensors.k, T, d, "channel");
    if (with_v && info.has_v) load("v", tensors.v, T, d, "channel");
  } else {
    load("attn", tensors.attn, T, T, "key");
  }
  if (info.has_sinks) load("sink_logits", tensors.sink_logits, 1, 1, "entry");
}

CaptureWriter::CaptureWriter(const std::string& path, const CaptureHeader& header, const CaptureWriteOptions& options)
    : file_(h5::File::create(path)), header_(header), options_(options) {
  h5::write_attribute(file_, "/", "format", kCaptureFormat);
  h5::write_attribute(file_, "/", "format_version", kCaptureFormatVersion);
  h5::write_attribute(file_, "/", "model", header.model);
  h5::write_attribute(file_, "/", "source", header.source);
  h5::write_attribute(file_, "/", "num_layers", header.num_layers);
  h5::write_attribute(file_, "/", "num_q_heads", header.num_q_heads);
  h5::write_attribute(file_, "/", "num_kv_heads", header.num_kv_heads);
  h5::write_attribute(file_, "/", "head_dim", header.head_dim);
  h5::write_attribute(file_, "/", "seq_len", header.seq_len);
  if (header.softmax_scale) h5::write_attribute(file_, "/", "softmax_scale", *header.softmax_scale);
  if (!header.layer_types.empty()) h5::write_attribute(file_, "/", "layer_types", header.layer_types);
  if (header.sliding_window) h5::write_attribute(file_, "/", "sliding_window", *header.sliding_window);
  h5::create_group(file_, "/layers");
}

void CaptureWriter::write_layer(std::int64_t index, const LayerTensors& tensors) {
  const std::string lp = layer_path(index);
  h5::create_group(file_, lp);
  const auto Hq = static_cast<std::uint64_t>(header_.num_q_heads);
  const auto Hkv = static_cast<std::uint64_t>(header_.num_kv_heads);
  const auto T = static_cast<std::uint64_t>(header_.seq_len);
  const auto d = static_cast<std::uint64_t>(header_.head_dim);
  h5::WriteOptions chunked;
  if (options_.gzip_level > 0) {
    chunked.chunk = {1, std::min<std::uint64_t>(T, 1024), d};  // one head, a run of positions
    chunked.gzip_level = options_.gzip_level;
    chunked.shuffle = true;
  }
  auto check_size = [&](const std::vector<float>& data, std::uint64_t expected, const char* name) {
    if (data.size() != expected) {
      fail(ErrorKind::kInternal, "write_layer {}: {} has {} values, expected {}", index, name, data.size(), expected);
    }
  };
  if (!tensors.q.empty()) {
    check_size(tensors.q, Hq * T * d, "q");
    check_size(tensors.k, Hkv * T * d, "k");
    h5::write_floats(file_, lp + "/q", {Hq, T, d}, tensors.q.data(), options_.dtype, chunked);
    h5::write_floats(file_, lp + "/k", {Hkv, T, d}, tensors.k.data(), options_.dtype, chunked);
    if (!tensors.v.empty()) {
      check_size(tensors.v, Hkv * T * d, "v");
      h5::write_floats(file_, lp + "/v", {Hkv, T, d}, tensors.v.data(), options_.dtype, chunked);
    }
  }
  if (!tensors.attn.empty()) {
    check_size(tensors.attn, Hq * T * T, "attn");
    h5::WriteOptions attn_chunks = chunked;
    if (!attn_chunks.chunk.empty()) attn_chunks.chunk = {1, std::min<std::uint64_t>(T, 256), T};
    h5::write_floats(file_, lp + "/attn", {Hq, T, T}, tensors.attn.data(), options_.dtype, attn_chunks);
  }
  if (!tensors.sink_logits.empty()) {
    check_size(tensors.sink_logits, Hq, "sink_logits");
    h5::write_floats(file_, lp + "/sink_logits", {Hq}, tensors.sink_logits.data(), h5::ElementType::kFloat32);
  }
}

void CaptureWriter::write_tokens(const std::vector<std::int32_t>& tokens) {
  h5::write_int32s(file_, "/tokens", {tokens.size()}, tokens.data());
}

void CaptureWriter::write_text(const std::string& text) { h5::write_string_dataset(file_, "/text", text); }

void CaptureWriter::close() { file_.close(); }

void write_capture(const std::string& path, const Capture& capture, const CaptureWriteOptions& options) {
  CaptureWriter writer(path, capture.header, options);
  for (std::size_t i = 0; i < capture.layers.size(); ++i) writer.write_layer(static_cast<std::int64_t>(i), capture.layers[i]);
  if (!capture.tokens.empty()) writer.write_tokens(capture.tokens);
  if (!capture.text.empty()) writer.write_text(capture.text);
  writer.close();
}

Capture read_capture(const std::string& path) {
  CaptureReader reader = CaptureReader::open(path);
  Capture capture;
  capture.header = reader.header();
  for (std::int64_t i = 0; i < capture.header.num_layers; ++i) capture.layers.push_back(reader.read_layer(i));
  if (reader.has_tokens()) {
    for (auto t : reader.tokens()) capture.tokens.push_back(static_cast<std::int32_t>(t));
  }
  if (reader.has_text()) capture.text = reader.text();
  return capture;
}

}  // namespace hysparse
