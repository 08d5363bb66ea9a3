#pragma once
// Capture format v1: the HDF5 contract between capture tools, the synthetic
// generator and replay. The README section "Capture format v1" is the specification.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/h5.hpp"

namespace hysparse {

inline constexpr const char* kCaptureFormat = "hysparse-capture";
inline constexpr std::int64_t kCaptureFormatVersion = 1;

struct CaptureHeader {
  std::string model;
  std::string source;
  std::int64_t num_layers = 0;
  std::int64_t num_q_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t seq_len = 0;
  std::optional<double> softmax_scale;          // absent: 1/sqrt(head_dim)
  std::vector<std::string> layer_types;         // empty when absent
  std::optional<std::int64_t> sliding_window;

  std::int64_t group_size() const { return num_q_heads / num_kv_heads; }
  double effective_softmax_scale() const;
  std::int64_t kv_head_of(std::int64_t q_head) const { return q_head / group_size(); }
};

struct LayerInfo {
  bool has_q = false, has_k = false, has_v = false, has_attn = false, has_sinks = false;
  h5::ElementType dtype = h5::ElementType::kFloat32;  // of q (or attn when only attn exists)
  bool has_qk() const { return has_q && has_k; }
};

// One layer's tensors in float32, row-major:
// q [Hq, T, d], k and v [Hkv, T, d], sink_logits [Hq], attn [Hq, T, T].
struct LayerTensors {
  std::vector<float> q, k, v, sink_logits, attn;
};

// An in-memory capture (tests, the generator's output before writing).
struct Capture {
  CaptureHeader header;
  std::vector<LayerTensors> layers;
  std::vector<std::int32_t> tokens;  // optional
  std::string text;                  // optional
};

class CaptureReader {
 public:
  // Validates the header, every layer's objects, shapes and element types,
  // before any tensor is read. Throws Error(kInput) with a one-line reason.
  static CaptureReader open(const std::string& path);

  const std::string& path() const { return file_.path(); }
  const CaptureHeader& header() const { return header_; }
  const LayerInfo& layer(std::int64_t index) const { return layers_.at(static_cast<std::size_t>(index)); }
  bool has_tokens() const { return has_tokens_; }
  bool has_text() const { return has_text_; }
  std::vector<std::int64_t> tokens() const;
  std::string text() const;

  // Bytes of float32 memory read_layer(index, with_v) allocates.
  std::uint64_t layer_bytes(std::int64_t index, bool with_v) const;

  // Reads one layer as float32 and rejects NaN/Inf naming layer, head and position.
  LayerTensors read_layer(std::int64_t index, bool with_v = true) const;
  // The same into `tensors`, reusing the memory its arrays hold (a replay alternates two buffers);
  // arrays the layer lacks are released.
  void read_layer_into(std::int64_t index, bool with_v, LayerTensors& tensors) const;
  // Bytes read_layer_into(index, with_v, tensors) allocates beyond what `tensors` holds, array by array.
  std::uint64_t layer_shortfall_bytes(std::int64_t index, bool with_v, const LayerTensors& tensors) const;

 private:
  h5::File file_;
  CaptureHeader header_;
  std::vector<LayerInfo> layers_;
  bool has_tokens_ = false, has_text_ = false;
};

struct CaptureWriteOptions {
  h5::ElementType dtype = h5::ElementType::kFloat32;  // float32, float16 or bfloat16
  int gzip_level = 0;                                // 0 = uncompressed
};

// Writes a capture layer by layer so memory stays bounded by one layer.
class CaptureWriter {
 public:
  CaptureWriter(const std::string& path, const CaptureHeader& header, const CaptureWriteOptions& options);
  void write_layer(std::int64_t index, const LayerTensors& tensors);
  void write_tokens(const std::vector<std::int32_t>& tokens);
  void write_text(const std::string& text);
  void close();

 private:
  h5::File file_;
  CaptureHeader header_;
  CaptureWriteOptions options_;
};

void write_capture(const std::string& path, const Capture& capture, const CaptureWriteOptions& options = {});
Capture read_capture(const std::string& path);  // whole file into memory (tests, small inputs)

}  // namespace hysparse
