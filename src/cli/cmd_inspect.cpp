#include <cmath>

#include "capture/capture.hpp"
#include "cli/commands.hpp"
#include "common/interrupt.hpp"

namespace hysparse::cli {
namespace {

struct ValueStats {
  double min = INFINITY, max = -INFINITY, sum = 0, sum_squares = 0;
  std::uint64_t count = 0;
  void add(const std::vector<float>& values) {
    for (float v : values) {
      min = std::min(min, static_cast<double>(v));
      max = std::max(max, static_cast<double>(v));
      sum += v;
      sum_squares += static_cast<double>(v) * v;
    }
    count += values.size();
  }
  std::string describe() const {
    if (count == 0) return "-";
    const double mean = sum / static_cast<double>(count);
    const double variance = std::max(0.0, sum_squares / static_cast<double>(count) - mean * mean);
    return fmt::format("min {:+.3g} max {:+.3g} mean {:+.3g} std {:.3g}", min, max, mean, std::sqrt(variance));
  }
};

}  // namespace

void add_inspect_command(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto header_only = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("inspect", "Validate a capture and print its shape and value statistics");
  cmd->add_option("capture", *path, "Capture file (.h5)")->required();
  cmd->add_flag("--header-only", *header_only, "Validate structure only; do not read the tensors");
  cmd->callback([=]() {
    const CaptureReader reader = CaptureReader::open(*path);
    const CaptureHeader& h = reader.header();
    const char* attention = h.num_kv_heads == h.num_q_heads ? "MHA" : (h.num_kv_heads == 1 ? "MQA" : "GQA");
    fmt::print("capture   {}\n", *path);
    fmt::print("model     {}\n", h.model);
    fmt::print("source    {}\n", h.source);
    fmt::print("shape     {} layers, {} q heads, {} kv heads ({}, group {}), head_dim {}, seq_len {}\n", h.num_layers,
               h.num_q_heads, h.num_kv_heads, attention, h.group_size(), h.head_dim, h.seq_len);
    fmt::print("scale     {:.6g}{}\n", h.effective_softmax_scale(), h.softmax_scale ? "" : " (default 1/sqrt(head_dim))");
    if (h.sliding_window) fmt::print("window    {}\n", *h.sliding_window);
    if (reader.has_tokens()) fmt::print("tokens    {} ids\n", h.seq_len);
    if (reader.has_text()) fmt::print("text      present\n");
    fmt::print("\n{:>5}  {:<9} {:<3} {:<3} {:<3} {:<4} {:<5} {:<17}  {}\n", "layer", "dtype", "q", "k", "v", "attn", "sinks",
               "type", "value statistics");
    for (std::int64_t i = 0; i < h.num_layers; ++i) {
      check_interrupted();
      const LayerInfo& info = reader.layer(i);
      std::string stats;
      if (!*header_only) {
        const LayerTensors t = reader.read_layer(i, true);
        ValueStats q, k, v, attn;
        q.add(t.q);
        k.add(t.k);
        v.add(t.v);
        attn.add(t.attn);
        stats = info.has_qk() ? fmt::format("q: {} | k: {}{}", q.describe(), k.describe(),
                                            info.has_v ? " | v: " + v.describe() : std::string())
                              : fmt::format("attn: {}", attn.describe());
      }
      const std::string type = h.layer_types.empty() ? "-" : h.layer_types[static_cast<std::size_t>(i)];
      auto yes = [](bool b) { return b ? "yes" : "-"; };
      fmt::print("{:>5}  {:<9} {:<3} {:<3} {:<3} {:<4} {:<5} {:<17}  {}\n", i, h5::to_string(info.dtype), yes(info.has_q),
                 yes(info.has_k), yes(info.has_v), yes(info.has_attn), yes(info.has_sinks), type, stats);
    }
    fmt::print("\nvalid hysparse capture (format v{})\n", kCaptureFormatVersion);
  });
}

}  // namespace hysparse::cli
