#include <map>

#include "cli/commands.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/memory.hpp"
#include "synth/synth.hpp"

namespace hysparse::cli {

void add_synth_command(CLI::App& app) {
  auto options = std::make_shared<SynthOptions>();
  auto output = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>("float32");
  auto gzip = std::make_shared<int>(0);
  auto no_v = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("synth", "Write a deterministic synthetic capture (format v1)");
  cmd->add_option("-o,--output", *output, "Output capture (.h5)")->required();
  cmd->add_option("--layers", options->num_layers, "Number of layers")->capture_default_str();
  cmd->add_option("--q-heads", options->num_q_heads, "Query heads")->capture_default_str();
  cmd->add_option("--kv-heads", options->num_kv_heads, "KV heads (divides --q-heads)")->capture_default_str();
  cmd->add_option("--head-dim", options->head_dim, "Head dimension (>= 8)")->capture_default_str();
  cmd->add_option("--seq-len", options->seq_len, "Sequence length")->capture_default_str();
  cmd->add_option("--seed", options->seed, "Random seed")->capture_default_str();
  cmd->add_option("--dtype", *dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_option("--gzip", *gzip, "gzip level 0-9 (0: uncompressed)")->capture_default_str();
  cmd->add_flag("--no-v", *no_v, "Do not write values (v)");
  cmd->add_option("--sink-tokens", options->sink_tokens, "Attention-sink tokens at the start")->capture_default_str();
  cmd->add_option("--sink-strength", options->sink_strength, "Logit added to sink tokens")->capture_default_str();
  cmd->add_option("--locality", options->locality, "Logit of the RoPE-like recency bump at distance 0")->capture_default_str();
  cmd->add_option("--heavy-fraction", options->heavy_fraction, "Share of heavy-hitter positions")->capture_default_str();
  cmd->add_option("--heavy-strength", options->heavy_strength, "Logit added to heavy hitters")->capture_default_str();
  cmd->add_option("--retrieval-heads", options->retrieval_heads, "Share of retrieval query heads")->capture_default_str();
  cmd->add_option("--retrieval-strength", options->retrieval_strength, "Logit added to a retrieval target")->capture_default_str();
  cmd->add_option("--retrieval-min-distance", options->retrieval_min_distance, "Minimum distance of retrieval targets")->capture_default_str();
  cmd->add_option("--content-std", options->content_std, "Std of the random content logits")->capture_default_str();
  cmd->add_option("--cross-layer", options->cross_layer,
                  "Similarity of adjacent layers' important tokens (0 independent, 1 identical)")->capture_default_str();
  cmd->callback([=]() {
    static const std::map<std::string, h5::ElementType> kTypes = {
        {"float32", h5::ElementType::kFloat32}, {"float16", h5::ElementType::kFloat16},
        {"bfloat16", h5::ElementType::kBFloat16}};
    const auto type = kTypes.find(*dtype);
    if (type == kTypes.end()) fail(ErrorKind::kUsage, "--dtype {}: expected float32, float16 or bfloat16", *dtype);
    if (*gzip < 0 || *gzip > 9) fail(ErrorKind::kUsage, "--gzip {}: expected 0..9", *gzip);
    options->with_v = !*no_v;
    validate(*options);
    // Refused before the output is created, naming it (generate_synthetic checks again for library callers).
    require_memory(synth_layer_bytes(*options), fmt::format("{}: synth of a layer of {} q heads, {} kv heads, head_dim {}, "
                                                            "seq_len {}", *output, options->num_q_heads,
                                                            options->num_kv_heads, options->head_dim, options->seq_len));
    CaptureWriteOptions write_options;
    write_options.dtype = type->second;
    write_options.gzip_level = *gzip;
    AtomicOutput out(*output);
    write_synthetic_capture(out.temporary_path(), *options, write_options);
    out.commit();
    fmt::print("wrote {} ({} layers, {} q heads, {} kv heads, head_dim {}, seq_len {}, {})\n", *output,
               options->num_layers, options->num_q_heads, options->num_kv_heads, options->head_dim, options->seq_len,
               *dtype);
  });
}

}  // namespace hysparse::cli
