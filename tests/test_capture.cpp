// Capture format v1: write/read round trips for every element type and shape class,
// and every malformed-file case the reader must refuse with one clear line.
#include <hdf5.h>
#include <sys/resource.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/error.hpp"
#include "common/half.hpp"
#include "common/random.hpp"
#include "io/h5.hpp"

using namespace hysparse;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// One file per test case (and per variant inside it), under the build's test data directory.
std::string temp_path(const std::string& name) { return std::string(HYSPARSE_TEST_DATA_DIR) + "/capture_" + name + ".h5"; }

std::uint64_t u64(std::int64_t v) { return static_cast<std::uint64_t>(v); }

// Runs `action` and requires a hysparse::Error of kind kInput: one line holding every string of `parts`.
void require_input_error(const std::function<void()>& action, const std::vector<std::string>& parts) {
  bool thrown = false;
  ErrorKind kind = ErrorKind::kInternal;
  std::string message;
  try {
    action();
  } catch (const Error& e) {
    thrown = true;
    kind = e.kind();
    message = e.what();
  } catch (const std::exception& e) {
    message = std::string("not a hysparse::Error: ") + e.what();
  }
  INFO("message: " << message);
  REQUIRE(thrown);
  CHECK(kind == ErrorKind::kInput);
  CHECK(message.find('\n') == std::string::npos);
  for (const auto& part : parts) {
    INFO("expected the message to contain: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

// Runs `action` with the address space capped at its current size plus `extra_bytes`, so a regression
// that allocates in proportion to a hostile header fails fast with bad_alloc instead of exhausting
// the machine. Without /proc/self/status the action runs uncapped.
void with_address_space_limit(std::uint64_t extra_bytes, const std::function<void()>& action) {
  std::ifstream status("/proc/self/status");
  std::string line;
  std::uint64_t vm_kib = 0;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) vm_kib = std::stoull(line.substr(7));
  }
  rlimit old_limit{};
  if (vm_kib == 0 || getrlimit(RLIMIT_AS, &old_limit) != 0) {
    action();
    return;
  }
  rlimit capped = old_limit;
  capped.rlim_cur = std::min<rlim_t>(old_limit.rlim_max, static_cast<rlim_t>(vm_kib * 1024 + extra_bytes));
  setrlimit(RLIMIT_AS, &capped);
  try {
    action();
  } catch (...) {
    setrlimit(RLIMIT_AS, &old_limit);
    throw;
  }
  setrlimit(RLIMIT_AS, &old_limit);
}

// CaptureReader::open must refuse `path`; the message starts with the file name.
void require_open_fails(const std::string& path, std::vector<std::string> parts) {
  parts.push_back(path + ": ");
  require_input_error([&] { (void)CaptureReader::open(path); }, parts);
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// What a float32 value reads back as after storage in `type`.
float stored_value(float x, h5::ElementType type) {
  switch (type) {
    case h5::ElementType::kFloat16: return half_to_float(float_to_half(x));
    case h5::ElementType::kBFloat16: return bfloat16_to_float(float_to_bfloat16(x));
    default: return x;
  }
}

// Index of the first element whose bits differ from `expected` rounded through `type`; -1 when all match.
std::int64_t first_mismatch(const std::vector<float>& expected, const std::vector<float>& actual, h5::ElementType type) {
  if (expected.size() != actual.size()) return static_cast<std::int64_t>(std::min(expected.size(), actual.size()));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    if (bits_of(stored_value(expected[i], type)) != bits_of(actual[i])) return static_cast<std::int64_t>(i);
  }
  return -1;
}

void check_tensor(const char* name, const std::vector<float>& expected, const std::vector<float>& actual,
                  h5::ElementType type) {
  INFO(name << ": " << expected.size() << " values written, " << actual.size() << " read");
  REQUIRE(actual.size() == expected.size());
  const std::int64_t bad = first_mismatch(expected, actual, type);
  if (bad >= 0) {
    const auto i = static_cast<std::size_t>(bad);
    INFO(name << "[" << i << "]: wrote " << expected[i] << ", expected back " << stored_value(expected[i], type)
              << ", read " << actual[i]);
    CHECK(bad == -1);
  }
}

// Random values plus the awkward ones: signed zeros, float16 subnormals, rounding ties, large magnitudes.
std::vector<float> make_values(std::size_t n, Rng& rng) {
  static const float special[] = {0.0f,         -0.0f,         1.0f + 0.00048828125f, 1.0f + 1.0f / 256,
                                  3.0e-6f,      -6.0e-8f,      6.103515625e-05f,      65504.0f,
                                  -1000.3f,     0.333333343f,  1.0e-30f,              -2.5f};
  std::vector<float> values(n);
  for (std::size_t i = 0; i < n; ++i) {
    values[i] = i % 7 == 3 ? special[(i / 7) % std::size(special)] : static_cast<float>(3.0 * rng.normal());
  }
  return values;
}

// ------------------------------------------------------------------------------------------------
// Raw files for the malformed cases: root attributes with overrides, layers written by a callback.

using AttrValue = std::variant<std::string, std::int64_t, double, std::vector<std::string>, std::vector<std::int64_t>>;

struct RawCapture {
  std::int64_t layers = 2, hq = 4, hkv = 2, d = 8, t = 6;
  std::map<std::string, std::optional<AttrValue>> overrides;  // nullopt: attribute left out

  void set(const std::string& name, AttrValue value) { overrides[name] = std::move(value); }
  void drop(const std::string& name) { overrides[name] = std::nullopt; }

  std::vector<std::pair<std::string, AttrValue>> attributes() const {
    std::vector<std::pair<std::string, AttrValue>> attrs = {
        {"format", std::string(kCaptureFormat)}, {"format_version", kCaptureFormatVersion},
        {"model", std::string("raw-test-model")}, {"source", std::string("test_capture.cpp")},
        {"num_layers", layers},                  {"num_q_heads", hq},
        {"num_kv_heads", hkv},                   {"head_dim", d},
        {"seq_len", t}};
    std::vector<std::pair<std::string, AttrValue>> out;
    for (const auto& [name, value] : attrs) {
      auto it = overrides.find(name);
      if (it == overrides.end()) out.emplace_back(name, value);
      else if (it->second) out.emplace_back(name, *it->second);
    }
    for (const auto& [name, value] : overrides) {  // extra attributes (softmax_scale, misspelt names, ...)
      bool known = false;
      for (const auto& a : attrs) known = known || a.first == name;
      if (!known && value) out.emplace_back(name, *value);
    }
    return out;
  }
  std::vector<std::uint64_t> q_dims() const { return {u64(hq), u64(t), u64(d)}; }
  std::vector<std::uint64_t> kv_dims() const { return {u64(hkv), u64(t), u64(d)}; }
};

void write_attr(const h5::File& file, const std::string& name, const AttrValue& value) {
  std::visit([&](const auto& v) { h5::write_attribute(file, "/", name, v); }, value);
}

std::string layer_path(std::int64_t layer) { return "/layers/" + std::to_string(layer); }

std::vector<float> finite_values(std::uint64_t n, std::uint64_t salt) {
  Rng rng(mix_seed(test::seed(), salt, 0x5eed));
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.normal());
  return v;
}

std::uint64_t product(const std::vector<std::uint64_t>& dims) {
  std::uint64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

void write_tensor(const h5::File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                  h5::ElementType type = h5::ElementType::kFloat32) {
  const auto data = finite_values(product(dims), std::hash<std::string>{}(path));
  h5::write_floats(file, path, dims, data.data(), type);
}

void write_qk(const h5::File& file, const RawCapture& c, std::int64_t layer) {
  write_tensor(file, layer_path(layer) + "/q", c.q_dims());
  write_tensor(file, layer_path(layer) + "/k", c.kv_dims());
}

void write_default_layers(const h5::File& file, const RawCapture& c) {
  for (std::int64_t i = 0; i < c.layers; ++i) write_qk(file, c, i);
}

// Writes the root attributes, the /layers group, then whatever `body` adds.
std::string write_raw(const std::string& name, const RawCapture& c,
                      const std::function<void(const h5::File&)>& body = {}) {
  const std::string path = temp_path(name);
  h5::File file = h5::File::create(path);
  for (const auto& [attr, value] : c.attributes()) write_attr(file, attr, value);
  h5::create_group(file, "/layers");
  if (body) body(file);
  else write_default_layers(file, c);
  file.close();
  return path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// ------------------------------------------------------------------------------------------------
// In-memory captures for the round trips.

struct Shape {
  const char* name;
  std::int64_t hq, hkv, d, t;
};

Capture make_capture(const Shape& s, bool extras, Rng& rng) {
  Capture c;
  c.header.model = std::string("round-trip ") + s.name;
  c.header.source = "test_capture.cpp, seed " + std::to_string(test::seed());
  c.header.num_layers = 3;
  c.header.num_q_heads = s.hq;
  c.header.num_kv_heads = s.hkv;
  c.header.head_dim = s.d;
  c.header.seq_len = s.t;
  if (extras) {
    c.header.softmax_scale = 0.3125;
    c.header.layer_types = {"full_attention", "sliding_attention", "chunked_attention"};
    c.header.sliding_window = 128;
  }
  const auto Hq = u64(s.hq), Hkv = u64(s.hkv), T = u64(s.t), d = u64(s.d);
  for (int layer = 0; layer < 2; ++layer) {  // layers 0 and 1: q/k; v only on layer 0
    LayerTensors l;
    l.q = make_values(Hq * T * d, rng);
    l.k = make_values(Hkv * T * d, rng);
    if (extras && layer == 0) l.v = make_values(Hkv * T * d, rng);
    if (extras) l.sink_logits = make_values(Hq, rng);
    c.layers.push_back(l);
  }
  LayerTensors dense;  // layer 2: dense attention probabilities instead of q/k
  dense.attn.resize(Hq * T * T);
  for (auto& p : dense.attn) p = static_cast<float>(rng.uniform());
  if (extras) dense.sink_logits = make_values(Hq, rng);
  c.layers.push_back(dense);
  if (extras) {
    for (std::uint64_t i = 0; i < T; ++i) {
      c.tokens.push_back(i == 0 ? std::numeric_limits<std::int32_t>::max()
                                : static_cast<std::int32_t>(rng.below(200000)) - 1000);
    }
    c.text = "round trip: héllo — 世界\nsecond line";
  }
  return c;
}

}  // namespace

// ================================================================================================
// Round trips

TEST_CASE("capture round trip: every dtype, shape class, optional object and compression", "[capture]") {
  const Shape shapes[] = {
      {"MHA_d8", 4, 4, 8, 5},     {"GQA_d64", 8, 2, 64, 17}, {"MQA_d256", 4, 1, 256, 9},
      {"seqlen1_d64", 2, 1, 64, 1}, {"MQA_seqlen1_d256", 3, 1, 256, 1},
  };
  const h5::ElementType dtypes[] = {h5::ElementType::kFloat32, h5::ElementType::kFloat16, h5::ElementType::kBFloat16};
  Rng rng(mix_seed(test::seed(), 101));
  for (const auto& shape : shapes) {
    for (const auto dtype : dtypes) {
      for (const bool extras : {false, true}) {
        for (const int gzip : {0, 6}) {
          const std::string variant = fmt::format("rt_{}_{}_{}_gz{}", shape.name, h5::to_string(dtype),
                                                  extras ? "extras" : "bare", gzip);
          INFO("variant " << variant);
          const Capture written = make_capture(shape, extras, rng);
          const std::string path = temp_path(variant);
          CaptureWriteOptions options;
          options.dtype = dtype;
          options.gzip_level = gzip;
          write_capture(path, written, options);

          const CaptureReader reader = CaptureReader::open(path);
          const CaptureHeader& h = reader.header();
          CHECK(h.model == written.header.model);
          CHECK(h.source == written.header.source);
          CHECK(h.num_layers == 3);
          CHECK(h.num_q_heads == shape.hq);
          CHECK(h.num_kv_heads == shape.hkv);
          CHECK(h.head_dim == shape.d);
          CHECK(h.seq_len == shape.t);
          CHECK(h.group_size() == shape.hq / shape.hkv);
          CHECK(h.kv_head_of(shape.hq - 1) == shape.hkv - 1);
          if (extras) {
            REQUIRE(h.softmax_scale.has_value());
            CHECK(*h.softmax_scale == 0.3125);
            CHECK(h.effective_softmax_scale() == 0.3125);
            CHECK(h.layer_types == written.header.layer_types);
            REQUIRE(h.sliding_window.has_value());
            CHECK(*h.sliding_window == 128);
          } else {
            CHECK_FALSE(h.softmax_scale.has_value());
            CHECK(h.effective_softmax_scale() == 1.0 / std::sqrt(static_cast<double>(shape.d)));
            CHECK(h.layer_types.empty());
            CHECK_FALSE(h.sliding_window.has_value());
          }
          CHECK(reader.has_tokens() == extras);
          CHECK(reader.has_text() == extras);

          for (std::int64_t i = 0; i < 3; ++i) {
            INFO("layer " << i);
            const LayerInfo& info = reader.layer(i);
            const LayerTensors& w = written.layers[static_cast<std::size_t>(i)];
            CHECK(info.has_q == (i < 2));
            CHECK(info.has_k == (i < 2));
            CHECK(info.has_attn == (i == 2));
            CHECK(info.has_v == !w.v.empty());
            CHECK(info.has_sinks == extras);
            CHECK(info.dtype == dtype);
            const std::uint64_t floats = w.q.size() + w.k.size() + w.v.size() + w.attn.size();
            CHECK(reader.layer_bytes(i, true) == 4 * floats);
            CHECK(reader.layer_bytes(i, false) == 4 * (floats - w.v.size()));

            const LayerTensors r = reader.read_layer(i);
            check_tensor("q", w.q, r.q, dtype);
            check_tensor("k", w.k, r.k, dtype);
            check_tensor("v", w.v, r.v, dtype);
            check_tensor("attn", w.attn, r.attn, dtype);
            check_tensor("sink_logits", w.sink_logits, r.sink_logits, h5::ElementType::kFloat32);  // always float32
            if (!w.v.empty()) CHECK(reader.read_layer(i, false).v.empty());
          }
          // One buffer through every layer (q/k layers, then a dense one), as a replay reuses its buffers.
          LayerTensors reused;
          for (const std::int64_t i : {0, 1, 0, 2, 1}) {
            INFO("layer " << i << " into a reused buffer");
            const LayerTensors& w = written.layers[static_cast<std::size_t>(i)];
            const bool with_v = i != 1;
            reader.read_layer_into(i, with_v, reused);
            check_tensor("q", w.q, reused.q, dtype);
            check_tensor("k", w.k, reused.k, dtype);
            check_tensor("v", with_v ? w.v : std::vector<float>{}, reused.v, dtype);
            check_tensor("attn", w.attn, reused.attn, dtype);
            check_tensor("sink_logits", w.sink_logits, reused.sink_logits, h5::ElementType::kFloat32);
          }
          if (extras) {
            const auto tokens = reader.tokens();
            REQUIRE(tokens.size() == written.tokens.size());
            for (std::size_t i = 0; i < tokens.size(); ++i) CHECK(tokens[i] == written.tokens[i]);
            CHECK(reader.text() == written.text);
          }

          const Capture whole = read_capture(path);  // the all-in-memory path agrees
          CHECK(whole.tokens == written.tokens);
          CHECK(whole.text == written.text);
          REQUIRE(whole.layers.size() == 3);
          check_tensor("q via read_capture", written.layers[0].q, whole.layers[0].q, dtype);
          check_tensor("attn via read_capture", written.layers[2].attn, whole.layers[2].attn, dtype);
          std::remove(path.c_str());
        }
      }
    }
  }
}

TEST_CASE("capture: gzip really compresses and float16 halves the file", "[capture]") {
  Capture c;
  c.header.model = "m";
  c.header.source = "s";
  c.header.num_layers = 1;
  c.header.num_q_heads = 2;
  c.header.num_kv_heads = 1;
  c.header.head_dim = 64;
  c.header.seq_len = 256;
  LayerTensors l;
  l.q.assign(2 * 256 * 64, 0.25f);  // constant: compresses to almost nothing
  l.k.assign(256 * 64, -1.5f);
  c.layers.push_back(l);
  const std::string plain = temp_path("size_plain"), gz = temp_path("size_gzip"), half = temp_path("size_f16");
  write_capture(plain, c, {});
  write_capture(gz, c, {h5::ElementType::kFloat32, 6});
  write_capture(half, c, {h5::ElementType::kFloat16, 0});
  const auto plain_size = read_bytes(plain).size(), gz_size = read_bytes(gz).size(), half_size = read_bytes(half).size();
  CAPTURE(plain_size, gz_size, half_size);
  CHECK(gz_size * 4 < plain_size);
  CHECK(half_size < plain_size * 6 / 10);
  CHECK(read_capture(gz).layers[0].k == l.k);
  CHECK(read_capture(half).layers[0].q == l.q);
}

TEST_CASE("capture: the writer refuses tensors of the wrong size as an internal error", "[capture]") {
  CaptureHeader h;
  h.model = "m";
  h.source = "s";
  h.num_layers = 1;
  h.num_q_heads = 2;
  h.num_kv_heads = 1;
  h.head_dim = 8;
  h.seq_len = 4;
  CaptureWriter writer(temp_path("writer_sizes"), h, {});
  LayerTensors l;
  l.q.assign(2 * 4 * 8 - 1, 1.0f);
  l.k.assign(4 * 8, 1.0f);
  try {
    writer.write_layer(0, l);
    FAIL("write_layer accepted a short q");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kInternal);
  }
  writer.close();
}

TEST_CASE("capture: the raw-file builder writes a valid capture (baseline for the malformed cases)", "[capture]") {
  RawCapture c;
  c.set("softmax_scale", 0.5);
  c.set("layer_types", std::vector<std::string>{"full_attention", "sliding_attention"});
  c.set("sliding_window", std::int64_t{3});
  const std::string path = write_raw("raw_baseline", c, [&](const h5::File& f) {
    write_default_layers(f, c);
    write_tensor(f, "/layers/0/v", c.kv_dims(), h5::ElementType::kBFloat16);
    write_tensor(f, "/layers/1/sink_logits", {u64(c.hq)});
    const std::vector<std::int32_t> tokens = {1, 2, 3, 4, 5, 6};
    h5::write_int32s(f, "/tokens", {tokens.size()}, tokens.data());
    h5::write_string_dataset(f, "/text", "hello");
  });
  const Capture capture = read_capture(path);
  CHECK(capture.header.num_layers == 2);
  CHECK(capture.header.layer_types.size() == 2);
  CHECK(capture.layers[0].v.size() == 2 * 6 * 8);
  CHECK(capture.layers[1].sink_logits.size() == 4);
  CHECK(capture.tokens == std::vector<std::int32_t>{1, 2, 3, 4, 5, 6});
  CHECK(capture.text == "hello");
  // int64 tokens are accepted too.
  const std::string path64 = write_raw("raw_baseline_tokens64", c, [&](const h5::File& f) {
    write_default_layers(f, c);
    const std::vector<std::int64_t> tokens = {9, 8, 7, 6, 5, 4};
    h5::write_ints(f, "/tokens", {tokens.size()}, tokens.data());
  });
  CHECK(read_capture(path64).tokens == std::vector<std::int32_t>{9, 8, 7, 6, 5, 4});
}

// ================================================================================================
// Malformed files: root attributes

TEST_CASE("malformed capture: missing or misnamed root attributes", "[capture]") {
  for (const char* name :
       {"format", "format_version", "model", "source", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len"}) {
    INFO("attribute " << name);
    RawCapture missing;
    missing.drop(name);
    require_open_fails(write_raw(std::string("missing_") + name, missing), {"'" + std::string(name) + "'", "missing", "expected"});

    RawCapture misnamed;  // e.g. "Format", "num_layers_" instead of the real name
    misnamed.drop(name);
    std::string wrong = name;
    wrong[0] = static_cast<char>(wrong[0] - 'a' + 'A');
    const RawCapture defaults;
    for (const auto& [attr, value] : defaults.attributes()) {
      if (attr == name) misnamed.set(wrong, value);
    }
    require_open_fails(write_raw(std::string("misnamed_") + name, misnamed), {"'" + std::string(name) + "'", "expected"});
  }
}

TEST_CASE("malformed capture: wrong format string and format version", "[capture]") {
  RawCapture wrong_format;
  wrong_format.set("format", std::string("hysparse-report"));
  require_open_fails(write_raw("wrong_format", wrong_format),
                     {"attribute 'format'", "\"hysparse-report\"", "expected \"hysparse-capture\""});

  RawCapture v2;
  v2.set("format_version", std::int64_t{2});
  require_open_fails(write_raw("format_version_2", v2), {"attribute 'format_version'", "is 2", "expected 1"});

  RawCapture v0;
  v0.set("format_version", std::int64_t{0});
  require_open_fails(write_raw("format_version_0", v0), {"format_version", "is 0", "expected 1"});
}

TEST_CASE("malformed capture: root attributes of the wrong type", "[capture]") {
  struct Case {
    const char* name;
    AttrValue value;
    const char* expected;
  };
  const Case cases[] = {
      {"num_layers", std::string("2"), "integer"},
      {"seq_len", 6.0, "integer"},
      {"head_dim", std::vector<std::int64_t>{8, 8}, "one integer"},
      {"format_version", std::string("1"), "integer"},
      {"format", std::int64_t{1}, "string"},
      {"model", 3.5, "string"},
      {"source", std::vector<std::string>{"a", "b"}, "one"},
      {"softmax_scale", std::string("0.125"), "expected a float"},
      {"sliding_window", 4.5, "integer"},
      {"layer_types", std::vector<std::int64_t>{0, 1}, "string"},
  };
  for (const auto& c : cases) {
    INFO("attribute " << c.name);
    RawCapture raw;
    raw.set(c.name, c.value);
    require_open_fails(write_raw(std::string("wrong_type_") + c.name, raw),
                       {"attribute '" + std::string(c.name) + "'", c.expected, "expected"});
  }
}

TEST_CASE("malformed capture: zero or negative dimensions", "[capture]") {
  for (const char* name : {"num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len"}) {
    for (const std::int64_t value : {std::int64_t{0}, std::int64_t{-3}}) {
      INFO(name << " = " << value);
      RawCapture raw;
      raw.set(name, value);
      require_open_fails(write_raw(fmt::format("dim_{}_{}", name, value), raw),
                         {"attribute '" + std::string(name) + "'", "is " + std::to_string(value), "expected a positive integer"});
    }
  }
}

TEST_CASE("malformed capture: num_q_heads not a multiple of num_kv_heads", "[capture]") {
  RawCapture raw;
  raw.hq = 6;
  raw.hkv = 4;
  require_open_fails(write_raw("not_multiple", raw), {"num_q_heads = 6", "num_kv_heads = 4", "multiple", "expected"});
}

TEST_CASE("malformed capture: dimensions whose product overflows 64 bits are refused by open", "[capture]") {
  const auto empty_layers = [](std::int64_t n) {
    return [n](const h5::File& f) {
      for (std::int64_t i = 0; i < n; ++i) h5::create_group(f, layer_path(i));
    };
  };
  RawCapture huge;  // seq_len = head_dim = 2^40: q alone would be 2^80 floats
  huge.layers = 1;
  huge.hq = 1;
  huge.hkv = 1;
  huge.t = std::int64_t{1} << 40;
  huge.d = std::int64_t{1} << 40;
  require_open_fails(write_raw("overflow_t_d", huge, empty_layers(1)), {"seq_len", "head_dim", "overflows 64 bits", "expected"});

  RawCapture heads;  // num_q_heads x seq_len already overflows
  heads.layers = 1;
  heads.hq = std::int64_t{1} << 62;
  heads.hkv = 1;
  heads.t = 8;
  heads.d = 8;
  require_open_fails(write_raw("overflow_heads", heads, empty_layers(1)), {"num_q_heads", "overflows 64 bits"});

  // q alone fits (2^61 floats = 2^63 bytes) but q, k and v of one layer do not: still refused up front.
  RawCapture qkv;
  qkv.layers = 1;
  qkv.hq = 1;
  qkv.hkv = 1;
  qkv.t = std::int64_t{1} << 30;
  qkv.d = std::int64_t{1} << 31;
  require_open_fails(write_raw("overflow_qkv", qkv, empty_layers(1)), {"overflows 64 bits", "num_kv_heads"});

  // q fits in 2^64 - 4 bytes, but num_q_heads + 2 x num_kv_heads exceeds the int64 range (no signed overflow).
  RawCapture wide;
  wide.layers = 1;
  wide.hq = (std::int64_t{1} << 62) - 1;
  wide.hkv = wide.hq;
  wide.t = 1;
  wide.d = 1;
  require_open_fails(write_raw("overflow_head_sum", wide, empty_layers(1)), {"overflows 64 bits", "num_kv_heads"});

  // An attn layer: num_q_heads x seq_len x head_dim fits, num_q_heads x seq_len x seq_len does not.
  RawCapture attn;
  attn.layers = 1;
  attn.hq = 1;
  attn.hkv = 1;
  attn.t = std::int64_t{1} << 32;
  attn.d = 1;
  require_open_fails(write_raw("overflow_attn", attn,
                               [](const h5::File& f) {
                                 const float one = 1.0f;
                                 h5::write_floats(f, "/layers/0/attn", {1, 1, 1}, &one);
                               }),
                     {"seq_len x seq_len", "overflows 64 bits"});

  // A huge num_layers with two layers present: refused at the first missing layer, quickly and without
  // building anything of size num_layers (capped at 256 MiB more address space, so a regression fails fast).
  RawCapture many;
  many.layers = std::int64_t{1} << 40;
  const std::string many_path = write_raw("huge_num_layers", many, [&](const h5::File& f) {
    write_qk(f, many, 0);
    write_qk(f, many, 1);
  });
  with_address_space_limit(std::uint64_t{256} << 20, [&] {
    require_open_fails(many_path, {"/layers/2", "missing layer group", "expected"});
  });
}

TEST_CASE("malformed capture: optional root attributes out of range", "[capture]") {
  RawCapture count;
  count.set("layer_types", std::vector<std::string>{"full_attention"});
  require_open_fails(write_raw("layer_types_count", count), {"attribute 'layer_types'", "1 entries", "expected num_layers = 2"});

  RawCapture unknown;
  unknown.set("layer_types", std::vector<std::string>{"full_attention", "linear_attention"});
  require_open_fails(write_raw("layer_types_unknown", unknown),
                     {"attribute 'layer_types'", "\"linear_attention\"", "expected full_attention"});

  for (const std::int64_t window : {std::int64_t{0}, std::int64_t{-4}}) {
    RawCapture raw;
    raw.set("sliding_window", window);
    require_open_fails(write_raw(fmt::format("sliding_window_{}", window), raw),
                       {"attribute 'sliding_window'", "is " + std::to_string(window), "expected a positive integer"});
  }

  const double bad_scales[] = {0.0, -0.125, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()};
  for (std::size_t i = 0; i < std::size(bad_scales); ++i) {
    INFO("softmax_scale " << bad_scales[i]);
    RawCapture raw;
    raw.set("softmax_scale", bad_scales[i]);
    require_open_fails(write_raw(fmt::format("softmax_scale_{}", i), raw),
                       {"attribute 'softmax_scale'", "expected a finite positive number"});
  }
}

// ================================================================================================
// Malformed files: layers and datasets

TEST_CASE("malformed capture: missing, extra and misnamed layers", "[capture]") {
  RawCapture three;
  three.layers = 3;
  require_open_fails(write_raw("layer_missing", three, [&](const h5::File& f) {
                       write_qk(f, three, 0);
                       write_qk(f, three, 1);
                     }),
                     {"/layers/2", "missing layer group", "expected /layers/0 .. /layers/2"});

  RawCapture extra;
  require_open_fails(write_raw("layer_extra", extra, [&](const h5::File& f) {
                       write_default_layers(f, extra);
                       write_qk(f, extra, 5);
                     }),
                     {"/layers/5", "unexpected layer", "expected /layers/0 .. /layers/1"});

  for (const char* name : {"01", "x", "-1", "1.0", "99999999999999999999999"}) {
    INFO("child " << name);
    RawCapture raw;
    require_open_fails(write_raw(std::string("layer_name_") + std::to_string(std::hash<std::string>{}(name) % 100000), raw,
                                 [&](const h5::File& f) {
                                   write_default_layers(f, raw);
                                   h5::create_group(f, std::string("/layers/") + name);
                                 }),
                       {"/layers/" + std::string(name), "unexpected layer"});
  }

  RawCapture no_group;
  require_open_fails(write_raw("no_layers_group", no_group, [](const h5::File& f) { H5Ldelete(f.id(), "/layers", H5P_DEFAULT); }),
                     {"/layers", "missing group", "expected"});

  RawCapture dataset_layer;  // /layers/1 is a dataset, not a group
  require_open_fails(write_raw("layer_is_dataset", dataset_layer, [&](const h5::File& f) {
                       write_qk(f, dataset_layer, 0);
                       write_tensor(f, "/layers/1", dataset_layer.q_dims());
                     }),
                     {"/layers/1", "missing layer group"});
}

TEST_CASE("malformed capture: q/k/v/attn presence", "[capture]") {
  RawCapture c;
  require_open_fails(write_raw("q_without_k", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       write_tensor(f, "/layers/1/q", c.q_dims());
                     }),
                     {"/layers/1/k", "missing dataset", "expected q and k together"});
  require_open_fails(write_raw("k_without_q", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       write_tensor(f, "/layers/1/k", c.kv_dims());
                     }),
                     {"/layers/1/q", "missing dataset", "expected q and k together"});
  require_open_fails(write_raw("v_only", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       write_tensor(f, "/layers/1/v", c.kv_dims());
                     }),
                     {"/layers/1/v", "without q and k", "expected"});
  require_open_fails(write_raw("v_with_attn", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       write_tensor(f, "/layers/1/attn", {u64(c.hq), u64(c.t), u64(c.t)});
                       write_tensor(f, "/layers/1/v", c.kv_dims());
                     }),
                     {"/layers/1/v", "without q and k", "expected"});
  require_open_fails(write_raw("empty_layer", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       h5::create_group(f, "/layers/1");
                     }),
                     {"/layers/1", "neither q/k nor attn", "expected q [Hq, T, d]"});
  require_open_fails(write_raw("layer_with_sinks_only", c, [&](const h5::File& f) {
                       write_qk(f, c, 0);
                       write_tensor(f, "/layers/1/sink_logits", {u64(c.hq)});
                     }),
                     {"/layers/1", "neither q/k nor attn"});
}

TEST_CASE("malformed capture: dataset shapes", "[capture]") {
  RawCapture c;  // Hq 4, Hkv 2, T 6, d 8
  struct Case {
    const char* name;
    const char* dataset;
    std::vector<std::uint64_t> dims;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"q_rank2", "q", {24, 8}, {"/layers/1/q", "shape [24, 8]", "expected [4, 6, 8] = [num_q_heads, seq_len, head_dim]"}},
      {"q_rank4", "q", {4, 6, 8, 1}, {"/layers/1/q", "[4, 6, 8, 1]", "expected [4, 6, 8]"}},
      {"q_head_dim", "q", {4, 6, 9}, {"/layers/1/q", "[4, 6, 9]", "expected [4, 6, 8]"}},
      {"q_seq_len", "q", {4, 5, 8}, {"/layers/1/q", "[4, 5, 8]", "expected [4, 6, 8]"}},
      {"k_heads", "k", {3, 6, 8}, {"/layers/1/k", "[3, 6, 8]", "expected [2, 6, 8] = [num_kv_heads, seq_len, head_dim]"}},
      {"k_as_q", "k", {4, 6, 8}, {"/layers/1/k", "[4, 6, 8]", "expected [2, 6, 8]"}},
      {"v_shape", "v", {2, 6, 7}, {"/layers/1/v", "[2, 6, 7]", "expected [2, 6, 8]"}},
      {"sinks_long", "sink_logits", {5}, {"/layers/1/sink_logits", "[5]", "expected [4] = [num_q_heads]"}},
      {"sinks_2d", "sink_logits", {4, 1}, {"/layers/1/sink_logits", "[4, 1]", "expected [4]"}},
      {"sinks_kv", "sink_logits", {2}, {"/layers/1/sink_logits", "[2]", "expected [4]"}},
  };
  for (const auto& k : cases) {
    INFO("case " << k.name);
    require_open_fails(write_raw(std::string("shape_") + k.name, c,
                                 [&](const h5::File& f) {
                                   write_qk(f, c, 0);
                                   const std::string lp = "/layers/1/";
                                   if (std::string(k.dataset) != "q") write_tensor(f, lp + "q", c.q_dims());
                                   if (std::string(k.dataset) != "k") write_tensor(f, lp + "k", c.kv_dims());
                                   write_tensor(f, lp + k.dataset, k.dims);
                                 }),
                       k.parts);
  }
  // attn layers
  for (const auto& [name, dims] : std::vector<std::pair<std::string, std::vector<std::uint64_t>>>{
           {"attn_square", {4, 6, 7}}, {"attn_rank2", {4, 6}}, {"attn_heads", {2, 6, 6}}}) {
    INFO("case " << name);
    require_open_fails(write_raw(name, c,
                                 [&, d = dims](const h5::File& f) {
                                   write_qk(f, c, 0);
                                   write_tensor(f, "/layers/1/attn", d);
                                 }),
                       {"/layers/1/attn", "expected [4, 6, 6] = [num_q_heads, seq_len, seq_len]"});
  }
  // tokens
  require_open_fails(write_raw("tokens_shape", c,
                               [&](const h5::File& f) {
                                 write_default_layers(f, c);
                                 const std::vector<std::int32_t> t(5, 1);
                                 h5::write_int32s(f, "/tokens", {5}, t.data());
                               }),
                     {"/tokens", "[5]", "expected [6] = [seq_len]"});
  // /text is read on demand; one that is not a string is refused when read, naming /text.
  const std::string text_path = write_raw("text_not_string", c, [&](const h5::File& f) {
    write_default_layers(f, c);
    write_tensor(f, "/text", {3});
  });
  require_input_error([&] { (void)read_capture(text_path); }, {text_path, "/text", "not a scalar string", "expected"});
  require_open_fails(write_raw("tokens_float", c,
                               [&](const h5::File& f) {
                                 write_default_layers(f, c);
                                 write_tensor(f, "/tokens", {6});
                               }),
                     {"/tokens", "32-bit float", "expected int32"});
}

TEST_CASE("malformed capture: element types", "[capture]") {
  RawCapture c;
  // bfloat16 data stored as uint16 without the dtype attribute: ambiguous, refused.
  require_open_fails(write_raw("uint16_no_dtype", c,
                               [&](const h5::File& f) {
                                 write_qk(f, c, 0);
                                 write_tensor(f, "/layers/1/q", c.q_dims(), h5::ElementType::kBFloat16);
                                 H5Adelete_by_name(f.id(), "/layers/1/q", "dtype", H5P_DEFAULT);
                                 write_tensor(f, "/layers/1/k", c.kv_dims());
                               }),
                     {"/layers/1/q", "uint16 without attribute dtype=\"bfloat16\"", "expected"});
  require_open_fails(write_raw("uint16_wrong_dtype", c,
                               [&](const h5::File& f) {
                                 write_qk(f, c, 0);
                                 write_tensor(f, "/layers/1/q", c.q_dims());
                                 write_tensor(f, "/layers/1/k", c.kv_dims(), h5::ElementType::kBFloat16);
                                 h5::write_attribute(f, "/layers/1/k", "dtype", "bf16");
                               }),
                     {"/layers/1/k", "uint16 without attribute dtype=\"bfloat16\""});
  require_open_fails(write_raw("int32_q", c,
                               [&](const h5::File& f) {
                                 write_qk(f, c, 0);
                                 const std::vector<std::int32_t> q(4 * 6 * 8, 1);
                                 h5::write_int32s(f, "/layers/1/q", c.q_dims(), q.data());
                                 write_tensor(f, "/layers/1/k", c.kv_dims());
                               }),
                     {"/layers/1/q", "element type 32-bit integer", "expected float32, float16, or bfloat16"});
  require_open_fails(write_raw("int64_v", c,
                               [&](const h5::File& f) {
                                 write_default_layers(f, c);
                                 const std::vector<std::int64_t> v(2 * 6 * 8, 1);
                                 h5::write_ints(f, "/layers/0/v", c.kv_dims(), v.data());
                               }),
                     {"/layers/0/v", "64-bit integer", "expected float32"});
  require_open_fails(write_raw("string_attn", c,
                               [&](const h5::File& f) {
                                 write_qk(f, c, 0);
                                 h5::write_string_dataset(f, "/layers/1/attn", "not a tensor");
                               }),
                     {"/layers/1/attn", "expected"});
  // A 16-bit float that is not IEEE binary16 (8 exponent bits, i.e. bfloat16 declared as a float type).
  require_open_fails(write_raw("odd_float16", c,
                               [&](const h5::File& f) {
                                 write_qk(f, c, 0);
                                 write_tensor(f, "/layers/1/q", c.q_dims());
                                 h5::Handle type(H5Tcopy(H5T_IEEE_F32LE));
                                 H5Tset_fields(type.id(), 15, 7, 8, 0, 7);
                                 H5Tset_precision(type.id(), 16);
                                 H5Tset_size(type.id(), 2);
                                 H5Tset_ebias(type.id(), 127);
                                 const hsize_t dims[3] = {2, 6, 8};
                                 h5::Handle space(H5Screate_simple(3, dims, nullptr));
                                 h5::Handle ds(H5Dcreate2(f.id(), "/layers/1/k", type.id(), space.id(), H5P_DEFAULT,
                                                          H5P_DEFAULT, H5P_DEFAULT));
                                 REQUIRE(ds.valid());
                               }),
                     {"/layers/1/k", "16-bit float with 8 exponent bits", "expected float32"});
}

TEST_CASE("malformed capture: NaN and Inf are named by layer, head, position and channel", "[capture]") {
  RawCapture c;  // Hq 4, Hkv 2, T 6, d 8
  // Poison one element of `dataset` (written as `type`) at [head, position, column].
  const auto poisoned = [&](const std::string& name, const std::string& dataset, std::vector<std::uint64_t> dims,
                            std::uint64_t head, std::uint64_t position, std::uint64_t column, float value,
                            h5::ElementType type = h5::ElementType::kFloat32) {
    return write_raw(name, c, [=](const h5::File& f) {
      for (std::int64_t i = 0; i < c.layers; ++i) {
        const std::string lp = layer_path(i);
        if (dataset == lp + "/attn") continue;  // that layer holds attn only
        write_tensor(f, lp + "/q", c.q_dims());
        write_tensor(f, lp + "/k", c.kv_dims());
      }
      // (Re)write the target with one poisoned element.
      std::vector<float> data = finite_values(product(dims), 77);
      const std::uint64_t rows = dims.size() >= 2 ? dims[1] : 1, cols = dims.size() >= 3 ? dims[2] : 1;
      data[(head * rows + position) * cols + column] = value;
      if (h5::is_dataset(f.id(), dataset)) H5Ldelete(f.id(), dataset.c_str(), H5P_DEFAULT);
      h5::write_floats(f, dataset, dims, data.data(), type);
    });
  };
  const auto read_fails = [](const std::string& path, std::int64_t layer, const std::vector<std::string>& parts,
                             bool with_v = true) {
    require_input_error([&] { (void)CaptureReader::open(path).read_layer(layer, with_v); }, parts);
    require_input_error([&] { (void)read_capture(path); }, parts);
  };

  read_fails(poisoned("nan_q", "/layers/1/q", c.q_dims(), 1, 3, 2, kNaN), 1,
             {"/layers/1/q", "holds NaN at head 1, position 3, channel 2", "expected finite values"});
  read_fails(poisoned("inf_k", "/layers/0/k", c.kv_dims(), 1, 5, 7, kInf), 0,
             {"/layers/0/k", "holds Inf at head 1, position 5, channel 7", "expected finite values"});
  read_fails(poisoned("neg_inf_k", "/layers/1/k", c.kv_dims(), 0, 0, 0, -kInf), 1,
             {"/layers/1/k", "holds Inf at head 0, position 0, channel 0"});
  read_fails(poisoned("nan_v", "/layers/0/v", c.kv_dims(), 1, 2, 3, kNaN), 0,
             {"/layers/0/v", "holds NaN at head 1, position 2, channel 3"});
  read_fails(poisoned("nan_sinks", "/layers/1/sink_logits", {4}, 3, 0, 0, kNaN), 1,
             {"/layers/1/sink_logits", "holds NaN at head 3"});
  read_fails(poisoned("inf_attn", "/layers/1/attn", {4, 6, 6}, 2, 4, 1, kInf), 1,
             {"/layers/1/attn", "holds Inf at head 2, position 4, key 1"});
  // float16 and bfloat16 storage carry NaN/Inf too.
  read_fails(poisoned("nan_q_bf16", "/layers/0/q", c.q_dims(), 3, 5, 6, kNaN, h5::ElementType::kBFloat16), 0,
             {"/layers/0/q", "holds NaN at head 3, position 5, channel 6"});
  read_fails(poisoned("inf_k_f16", "/layers/1/k", c.kv_dims(), 0, 4, 1, kInf, h5::ElementType::kFloat16), 1,
             {"/layers/1/k", "holds Inf at head 0, position 4, channel 1"});
  // A float16 overflow on write becomes Inf in the file, which the reader refuses.
  read_fails(poisoned("overflow_f16", "/layers/0/q", c.q_dims(), 2, 1, 0, 1.0e6f, h5::ElementType::kFloat16), 0,
             {"/layers/0/q", "holds Inf at head 2, position 1, channel 0"});

  // The other layer of a poisoned file still reads, and v is checked only when it is read.
  const std::string nan_v = poisoned("nan_v_skip", "/layers/0/v", c.kv_dims(), 0, 1, 1, kNaN);
  const CaptureReader reader = CaptureReader::open(nan_v);
  CHECK(reader.read_layer(1).q.size() == 4 * 6 * 8);
  CHECK(reader.read_layer(0, false).v.empty());
}

TEST_CASE("malformed capture: unreadable files", "[capture]") {
  // Missing file.
  const std::string missing = temp_path("does_not_exist");
  std::remove(missing.c_str());
  require_open_fails(missing, {"cannot open"});
  require_input_error([&] { (void)read_capture(missing); }, {missing, "cannot open"});

  // A text file.
  const std::string text = temp_path("text_file");
  write_bytes(text, "format = hysparse-capture\nthis is not HDF5\n");
  require_open_fails(text, {"not an HDF5 file"});

  // An empty file.
  const std::string empty = temp_path("empty_file");
  write_bytes(empty, "");
  require_open_fails(empty, {"not an HDF5 file"});

  // A valid capture cut in half.
  Capture capture;
  capture.header.model = "m";
  capture.header.source = "s";
  capture.header.num_layers = 2;
  capture.header.num_q_heads = 4;
  capture.header.num_kv_heads = 2;
  capture.header.head_dim = 32;
  capture.header.seq_len = 64;
  Rng rng(mix_seed(test::seed(), 202));
  for (int i = 0; i < 2; ++i) {
    LayerTensors l;
    l.q = make_values(4 * 64 * 32, rng);
    l.k = make_values(2 * 64 * 32, rng);
    l.v = make_values(2 * 64 * 32, rng);
    capture.layers.push_back(l);
  }
  for (const int gzip : {0, 4}) {
    INFO("gzip " << gzip);
    const std::string whole = temp_path(fmt::format("truncate_source_gz{}", gzip));
    write_capture(whole, capture, {h5::ElementType::kFloat32, gzip});
    REQUIRE_NOTHROW(read_capture(whole));
    const std::string bytes = read_bytes(whole);
    const std::string half = temp_path(fmt::format("truncated_gz{}", gzip));
    write_bytes(half, bytes.substr(0, bytes.size() / 2));
    require_open_fails(half, {"truncated"});
    // Only the superblock's first bytes left.
    const std::string fragment = temp_path(fmt::format("truncated_fragment_gz{}", gzip));
    write_bytes(fragment, bytes.substr(0, 100));
    require_open_fails(fragment, {});
  }
}
