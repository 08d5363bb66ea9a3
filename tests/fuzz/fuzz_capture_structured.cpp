// Structured fuzzing of the capture reader: the fuzz bytes choose a capture (root attributes and their
// types, the /layers tree, every dataset's rank, shape, element type, layout and values, links, tokens
// and text), which is built with the HDF5 API so that the file itself is always well-formed HDF5.
// What is exercised is our validation (CaptureReader::open, read_layer, tokens, text), not libhdf5's
// parser; fuzz_capture_raw covers the bytes-level side.
//
// Every choice reads 0 as "the valid option", and FuzzedDataProvider yields 0 once the bytes run out:
// a short input builds a valid capture, and each mutation breaks one or a few things in it, which
// keeps most executions near the valid files where the deep checks (shapes, element types, NaN/Inf,
// tokens) live.
//
// Allowed outcomes: success, Error(kInput) naming the file, Error(kResource) (a layer larger than the
// memory budget set in fuzz_support.hpp). Everything else is a finding.
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "common/half.hpp"
#include "fuzz_support.hpp"
#include "io/h5.hpp"

namespace {

using hysparse::ErrorKind;

// Small shapes keep one execution fast; the edge values probe overflow and allocation checks.
constexpr std::int64_t kEdgeValues[] = {0, -1, -7, 1, 2, 3, 1 << 16, std::int64_t{1} << 31, std::int64_t{1} << 40,
                                        std::int64_t{1} << 62, std::numeric_limits<std::int64_t>::max(),
                                        std::numeric_limits<std::int64_t>::min()};
constexpr std::uint64_t kMaxWrittenElements = 4096;

class Builder {
 public:
  Builder(FuzzedDataProvider& in, hid_t file) : in_(in), file_(file) {}

  // ---- attributes ----
  void scalar_int_attribute(hid_t object, const char* name, std::int64_t value, hid_t file_type) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attribute = H5Acreate2(object, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attribute >= 0) {
      H5Awrite(attribute, H5T_NATIVE_INT64, &value);
      H5Aclose(attribute);
    }
    H5Sclose(space);
  }

  void double_attribute(hid_t object, const char* name, double value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attribute = H5Acreate2(object, name, H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attribute >= 0) {
      H5Awrite(attribute, H5T_NATIVE_DOUBLE, &value);
      H5Aclose(attribute);
    }
    H5Sclose(space);
  }

  void string_list_attribute(hid_t object, const char* name, const std::vector<std::string>& values, bool scalar,
                             bool fixed_length) {
    hid_t type = H5Tcopy(H5T_C_S1);
    std::size_t longest = 1;
    for (const auto& v : values) longest = std::max(longest, v.size() + 1);
    H5Tset_size(type, fixed_length ? longest : H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    const hsize_t count = values.size();
    hid_t space = scalar && count == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &count, nullptr);
    hid_t attribute = H5Acreate2(object, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attribute >= 0) {
      if (fixed_length) {
        std::vector<char> buffer(longest * values.size() + 1, '\0');
        for (std::size_t i = 0; i < values.size(); ++i) std::memcpy(&buffer[i * longest], values[i].data(), values[i].size());
        if (count > 0) H5Awrite(attribute, type, buffer.data());
      } else {
        std::vector<const char*> pointers;
        for (const auto& v : values) pointers.push_back(v.c_str());
        if (count > 0) H5Awrite(attribute, type, pointers.data());
      }
      H5Aclose(attribute);
    }
    H5Sclose(space);
    H5Tclose(type);
  }

  void string_attribute(hid_t object, const char* name, const std::string& value) {
    string_list_attribute(object, name, {value}, true, in_.ConsumeBool());
  }

  // An integer attribute the reader expects; the bytes choose its value and its type.
  std::int64_t shape_attribute(const char* name, std::int64_t small_max) {
    const int mode = in_.ConsumeIntegralInRange(0, 15);
    std::int64_t value = small_max - in_.ConsumeIntegralInRange<std::int64_t>(0, small_max - 1);
    if (mode == 1) return value;  // absent: the reader must say which attribute is missing (value unused)
    if (mode == 2) value = kEdgeValues[in_.ConsumeIntegralInRange<std::size_t>(0, std::size(kEdgeValues) - 1)];
    if (mode == 3) value = in_.ConsumeIntegral<std::int64_t>();
    switch (in_.ConsumeIntegralInRange(0, 9)) {
      case 1: scalar_int_attribute(file_, name, value, H5T_STD_I32LE); break;
      case 2: scalar_int_attribute(file_, name, value, H5T_STD_U64LE); break;
      case 3: double_attribute(file_, name, static_cast<double>(value) + (in_.ConsumeBool() ? 0.5 : 0.0)); break;
      case 4: string_attribute(file_, name, std::to_string(value)); break;
      case 5: {  // two values where one is expected
        const hsize_t two = 2;
        hid_t space = H5Screate_simple(1, &two, nullptr);
        hid_t attribute = H5Acreate2(file_, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
        const std::int64_t values[2] = {value, value};
        if (attribute >= 0) {
          H5Awrite(attribute, H5T_NATIVE_INT64, values);
          H5Aclose(attribute);
        }
        H5Sclose(space);
        break;
      }
      default: scalar_int_attribute(file_, name, value, H5T_STD_I64LE); break;
    }
    return value;
  }

  std::string fuzzed_string(std::size_t max_length) { return in_.ConsumeRandomLengthString(max_length); }

  // ---- datasets ----
  // The element type a dataset is stored with, and how the fuzz values are converted to it.
  enum class Stored { kFloat32, kFloat16, kBFloat16, kUInt16Plain, kBFloat16WrongAttribute, kFloat64, kInt32, kInt8, kString };

  Stored pick_stored() {
    const int choice = in_.ConsumeIntegralInRange(0, 15);
    switch (choice) {
      case 1: return Stored::kFloat16;
      case 2: return Stored::kBFloat16;
      case 3: return Stored::kUInt16Plain;
      case 4: return Stored::kBFloat16WrongAttribute;
      case 5: return Stored::kFloat64;
      case 6: return Stored::kInt32;
      case 7: return Stored::kInt8;
      case 8: return Stored::kString;
      case 9: return Stored::kBFloat16;
      case 10: return Stored::kFloat16;
      default: return Stored::kFloat32;
    }
  }

  // The expected dims, perturbed by the bytes: a dimension off by one, a rank changed, a huge extent
  // (chunked and never written, so it costs nothing on disk), or a zero extent.
  std::vector<hsize_t> perturb(std::vector<hsize_t> dims) {
    switch (in_.ConsumeIntegralInRange(0, 19)) {
      case 1: if (!dims.empty()) dims[in_.ConsumeIntegralInRange<std::size_t>(0, dims.size() - 1)] += 1; break;
      case 2: if (!dims.empty() && dims.back() > 0) dims.back() -= 1; break;
      case 3: dims.push_back(in_.ConsumeIntegralInRange<hsize_t>(0, 3)); break;
      case 4: if (!dims.empty()) dims.pop_back(); break;
      case 5: if (!dims.empty()) dims[in_.ConsumeIntegralInRange<std::size_t>(0, dims.size() - 1)] = hsize_t{1} << in_.ConsumeIntegralInRange(20, 62); break;
      case 6: if (!dims.empty()) dims[in_.ConsumeIntegralInRange<std::size_t>(0, dims.size() - 1)] = 0; break;
      default: break;
    }
    return dims;
  }

  void dataset(hid_t parent, const char* name, const std::vector<hsize_t>& dims) {
    std::uint64_t elements = 1;
    bool huge = false;
    for (hsize_t d : dims) {
      if (d != 0 && elements > kMaxWrittenElements / d) huge = true;
      elements = huge ? kMaxWrittenElements + 1 : elements * d;
    }
    const Stored stored = pick_stored();
    hid_t file_type = -1, memory_type = -1;
    bool owns_type = false;
    switch (stored) {
      case Stored::kFloat32: file_type = H5T_IEEE_F32LE; memory_type = H5T_NATIVE_FLOAT; break;
      case Stored::kFloat64: file_type = H5T_IEEE_F64LE; memory_type = H5T_NATIVE_FLOAT; break;
      case Stored::kFloat16: {
        file_type = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(file_type, 15, 10, 5, 0, 10);
        H5Tset_precision(file_type, 16);
        H5Tset_size(file_type, 2);
        H5Tset_ebias(file_type, 15);
        memory_type = H5T_NATIVE_FLOAT;
        owns_type = true;
        break;
      }
      case Stored::kBFloat16: case Stored::kUInt16Plain: case Stored::kBFloat16WrongAttribute:
        file_type = H5T_STD_U16LE; memory_type = H5T_NATIVE_UINT16; break;
      case Stored::kInt32: file_type = H5T_STD_I32LE; memory_type = H5T_NATIVE_INT32; break;
      case Stored::kInt8: file_type = H5T_STD_I8LE; memory_type = H5T_NATIVE_INT8; break;
      case Stored::kString: {
        file_type = H5Tcopy(H5T_C_S1);
        H5Tset_size(file_type, 4);
        memory_type = file_type;
        owns_type = true;
        break;
      }
    }
    hid_t space = dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    const int layout = in_.ConsumeIntegralInRange(0, 3);
    bool zero_extent = false;
    for (hsize_t d : dims) zero_extent = zero_extent || d == 0;
    if ((huge || layout > 0) && !dims.empty() && !zero_extent) {
      std::vector<hsize_t> chunk(dims.size(), 1);
      for (std::size_t i = 0; i < dims.size(); ++i) chunk[i] = std::min<hsize_t>(dims[i], in_.ConsumeIntegralInRange<hsize_t>(1, 8));
      H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
      if (layout >= 2) H5Pset_shuffle(dcpl);
      if (layout >= 2) H5Pset_deflate(dcpl, 1);
    }
    hid_t dataset = H5Dcreate2(parent, name, file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (dataset >= 0 && !huge && elements > 0) write_values(dataset, stored, memory_type, elements);
    if (dataset >= 0 && (stored == Stored::kBFloat16 || stored == Stored::kBFloat16WrongAttribute)) {
      if (stored == Stored::kBFloat16) string_attribute(dataset, "dtype", "bfloat16");
      else if (in_.ConsumeBool()) scalar_int_attribute(dataset, "dtype", 16, H5T_STD_I64LE);
      else string_attribute(dataset, "dtype", fuzzed_string(12));
    }
    if (dataset >= 0) H5Dclose(dataset);
    H5Pclose(dcpl);
    H5Sclose(space);
    if (owns_type) H5Tclose(file_type);
  }

  void write_values(hid_t dataset, Stored stored, hid_t memory_type, std::uint64_t elements) {
    // Mostly ordinary values; the bytes may also plant NaN, Inf, huge or denormal values anywhere.
    std::vector<float> values(elements);
    for (auto& v : values) {
      if (in_.remaining_bytes() == 0) break;
      const int kind = in_.ConsumeIntegralInRange(0, 63);
      if (kind == 1) v = std::numeric_limits<float>::quiet_NaN();
      else if (kind == 2) v = in_.ConsumeBool() ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
      else if (kind == 3) {
        std::uint32_t bits = in_.ConsumeIntegral<std::uint32_t>();
        std::memcpy(&v, &bits, sizeof v);
      } else v = static_cast<float>(in_.ConsumeIntegralInRange(-64, 64)) / 8.0f;
    }
    switch (stored) {
      case Stored::kBFloat16: case Stored::kUInt16Plain: case Stored::kBFloat16WrongAttribute: {
        std::vector<std::uint16_t> bits(elements);
        for (std::size_t i = 0; i < elements; ++i) bits[i] = hysparse::float_to_bfloat16(values[i]);
        H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bits.data());
        break;
      }
      case Stored::kInt32: case Stored::kInt8: {
        std::vector<std::int32_t> ints(elements);
        for (std::size_t i = 0; i < elements; ++i) ints[i] = std::isfinite(values[i]) ? static_cast<std::int32_t>(std::fmod(values[i], 100.0f)) : 0;
        H5Dwrite(dataset, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, ints.data());
        break;
      }
      case Stored::kString: {
        std::vector<char> text(elements * 4, 'a');
        H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data());
        break;
      }
      default: H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()); break;
    }
  }

  FuzzedDataProvider& in() { return in_; }

 private:
  FuzzedDataProvider& in_;
  hid_t file_;
};

hsize_t small_extent(std::int64_t value, hsize_t fallback) {
  return value >= 1 && value <= 64 ? static_cast<hsize_t>(value) : fallback;
}

void build_capture(const std::string& path, FuzzedDataProvider& in) {
  hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  H5Pclose(fapl);
  if (file < 0) hysparse::fuzz::finding("cannot create the scratch file " + path);
  Builder b(in, file);

  // Root attributes.
  switch (in.ConsumeIntegralInRange(0, 15)) {
    case 1: break;  // absent
    case 2: b.string_attribute(file, "format", b.fuzzed_string(24)); break;
    case 3: b.scalar_int_attribute(file, "format", 1, H5T_STD_I64LE); break;
    case 4: b.string_list_attribute(file, "format", {"hysparse-capture", "hysparse-capture"}, false, in.ConsumeBool()); break;
    default: b.string_attribute(file, "format", "hysparse-capture"); break;
  }
  switch (in.ConsumeIntegralInRange(0, 15)) {
    case 1: break;
    case 2: b.scalar_int_attribute(file, "format_version", in.ConsumeIntegral<std::int64_t>(), H5T_STD_I64LE); break;
    case 3: b.double_attribute(file, "format_version", 1.0); break;
    case 4: b.string_attribute(file, "format_version", "1"); break;
    default: b.scalar_int_attribute(file, "format_version", 1, H5T_STD_I64LE); break;
  }
  for (const char* name : {"model", "source"}) {
    switch (in.ConsumeIntegralInRange(0, 15)) {
      case 1: break;
      case 2: b.scalar_int_attribute(file, name, 7, H5T_STD_I64LE); break;
      case 3: b.string_attribute(file, name, b.fuzzed_string(32)); break;  // any bytes, control characters too
      default: b.string_attribute(file, name, "fuzz"); break;
    }
  }
  const std::int64_t layers = b.shape_attribute("num_layers", 3);
  const std::int64_t q_heads = b.shape_attribute("num_q_heads", 4);
  const std::int64_t kv_heads = b.shape_attribute("num_kv_heads", 2);
  const std::int64_t head_dim = b.shape_attribute("head_dim", 8);
  const std::int64_t seq_len = b.shape_attribute("seq_len", 16);
  switch (in.ConsumeIntegralInRange(0, 9)) {
    case 1: b.double_attribute(file, "softmax_scale", std::numeric_limits<double>::quiet_NaN()); break;
    case 2: b.double_attribute(file, "softmax_scale", in.ConsumeFloatingPoint<double>()); break;
    case 3: b.string_attribute(file, "softmax_scale", "0.5"); break;
    case 4: b.scalar_int_attribute(file, "softmax_scale", in.ConsumeIntegral<std::int64_t>(), H5T_STD_I64LE); break;
    case 5: b.double_attribute(file, "softmax_scale", 0.125); break;
    default: break;
  }
  if (in.ConsumeIntegralInRange(0, 3) == 1) {
    std::vector<std::string> types;
    const std::size_t count = in.ConsumeBool() ? static_cast<std::size_t>(std::max<std::int64_t>(0, std::min<std::int64_t>(layers, 8)))
                                               : in.ConsumeIntegralInRange<std::size_t>(0, 5);
    const char* known[] = {"full_attention", "sliding_attention", "chunked_attention"};
    for (std::size_t i = 0; i < count; ++i) types.push_back(in.ConsumeIntegralInRange(0, 9) == 1 ? b.fuzzed_string(20) : known[in.ConsumeIntegralInRange(0, 2)]);
    if (in.ConsumeIntegralInRange(0, 7) == 1) b.scalar_int_attribute(file, "layer_types", 0, H5T_STD_I64LE);
    else b.string_list_attribute(file, "layer_types", types, false, in.ConsumeBool());
  }
  if (in.ConsumeIntegralInRange(0, 3) == 1) {
    b.scalar_int_attribute(file, "sliding_window", in.ConsumeIntegralInRange<std::int64_t>(-2, 64), H5T_STD_I64LE);
  }

  // The shapes the datasets are built from: the header's when small, else small stand-ins.
  const hsize_t L = small_extent(layers, 2), Hq = small_extent(q_heads, 2), Hkv = small_extent(kv_heads, 1);
  const hsize_t d = small_extent(head_dim, 4), T = small_extent(seq_len, 8);

  // /layers: a group (mostly), missing, or a dataset.
  const int layers_kind = in.ConsumeIntegralInRange(0, 15);
  if (layers_kind == 1) {
    H5Fclose(file);
    return;
  }
  if (layers_kind == 2) {
    b.dataset(file, "layers", {2});
    H5Fclose(file);
    return;
  }
  hid_t group = H5Gcreate2(file, "/layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  const hsize_t built_layers = std::min<hsize_t>(L + (in.ConsumeIntegralInRange(0, 7) == 1 ? 1 : 0), 5);
  for (hsize_t i = 0; i < built_layers; ++i) {
    if (in.ConsumeIntegralInRange(0, 15) == 1) continue;  // a missing layer
    const std::string name = std::to_string(i);
    if (in.ConsumeIntegralInRange(0, 31) == 1) {  // a layer that is a dataset, not a group
      b.dataset(group, name.c_str(), {1});
      continue;
    }
    hid_t layer = H5Gcreate2(group, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const int kind = in.ConsumeIntegralInRange(0, 9);  // 0-5 q/k(/v), 6-7 attn, 8 both, 9 odd mixes
    const bool qk = kind <= 5 || kind == 8 || (kind == 9 && in.ConsumeBool());
    const bool attn = (kind >= 6 && kind <= 8) || (kind == 9 && in.ConsumeBool());
    if (qk || (kind == 9 && in.ConsumeBool())) b.dataset(layer, "q", b.perturb({Hq, T, d}));
    if (qk || (kind == 9 && in.ConsumeBool())) b.dataset(layer, "k", b.perturb({Hkv, T, d}));
    if ((qk && !in.ConsumeBool()) || (kind == 9 && in.ConsumeBool())) b.dataset(layer, "v", b.perturb({Hkv, T, d}));
    if (attn) b.dataset(layer, "attn", b.perturb({Hq, T, T}));
    if (in.ConsumeIntegralInRange(0, 5) == 1) b.dataset(layer, "sink_logits", b.perturb({Hq}));
    switch (in.ConsumeIntegralInRange(0, 23)) {  // links where datasets are expected
      case 1: H5Lcreate_soft("/layers/0/q", layer, "v", H5P_DEFAULT, H5P_DEFAULT); break;
      case 2: H5Lcreate_soft("/nowhere", layer, "k", H5P_DEFAULT, H5P_DEFAULT); break;
      case 3: H5Lcreate_soft("q", layer, "q", H5P_DEFAULT, H5P_DEFAULT); break;  // a link to itself
      case 4: H5Lcreate_external("missing-file.h5", "/x", layer, "attn", H5P_DEFAULT, H5P_DEFAULT); break;
      case 5: H5Gclose(H5Gcreate2(layer, "q", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)); break;  // a group named q
      default: break;
    }
    H5Gclose(layer);
  }
  switch (in.ConsumeIntegralInRange(0, 15)) {  // extra children of /layers
    case 1: H5Gclose(H5Gcreate2(group, "01", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)); break;
    case 2: H5Gclose(H5Gcreate2(group, b.fuzzed_string(12).c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)); break;
    case 3: H5Gclose(H5Gcreate2(group, "99999999999999999999", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)); break;
    default: break;
  }
  H5Gclose(group);

  // Optional /tokens and /text.
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 1: b.dataset(file, "tokens", b.perturb({T})); break;
    case 2: case 3: {
      std::vector<std::int32_t> tokens(T, 7);
      const hsize_t dims[1] = {T};
      hid_t space = H5Screate_simple(1, dims, nullptr);
      hid_t dataset = H5Dcreate2(file, "tokens", H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      if (dataset >= 0) {
        H5Dwrite(dataset, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens.data());
        H5Dclose(dataset);
      }
      H5Sclose(space);
      break;
    }
    default: break;
  }
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 1: b.dataset(file, "text", b.perturb({1})); break;
    case 2: case 3: {
      hid_t type = H5Tcopy(H5T_C_S1);
      H5Tset_size(type, H5T_VARIABLE);
      hid_t space = H5Screate(H5S_SCALAR);
      hid_t dataset = H5Dcreate2(file, "text", type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      const std::string text = b.fuzzed_string(40);
      const char* pointer = text.c_str();
      if (dataset >= 0) {
        H5Dwrite(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, &pointer);
        H5Dclose(dataset);
      }
      H5Sclose(space);
      H5Tclose(type);
      break;
    }
    default: break;
  }
  H5Fclose(file);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  hysparse::fuzz::limit_memory_budget();
  hysparse::h5::silence_hdf5_errors();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = hysparse::fuzz::scratch_path("structured.h5");
  FuzzedDataProvider in(data, size);
  build_capture(path, in);
  hysparse::fuzz::expect_clean(
      [&] {
        const hysparse::CaptureReader reader = hysparse::CaptureReader::open(path);
        const auto& header = reader.header();
        (void)header.effective_softmax_scale();
        for (std::int64_t i = 0; i < header.num_layers; ++i) {
          const bool with_v = (i % 2) == 0;
          (void)reader.layer_bytes(i, with_v);
          const hysparse::LayerTensors tensors = reader.read_layer(i, with_v);
          (void)tensors;
        }
        if (reader.has_tokens()) (void)reader.tokens();
        if (reader.has_text()) (void)reader.text();
      },
      {ErrorKind::kInput, ErrorKind::kResource}, path);
  std::remove(path.c_str());
  return 0;
}
