// KV-cache accounting: schedules, the paper's numbers, GQA/MQA/MLA/window hand
// computations, proxy metadata, the HF config parser and the report writers.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "catch.hpp"
#include "common/error.hpp"
#include "io/h5.hpp"
#include "kv/footprint.hpp"
#include "kv/hf_config.hpp"
#include "kv/kv.hpp"
#include "kv/presets.hpp"
#include "kv/report.hpp"
#include "kv/schedule.hpp"

using namespace hysparse;

namespace {

template <typename F>
void require_error(F&& f, ErrorKind kind, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    INFO("message: " << e.what());
    CHECK(e.kind() == kind);
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
    return;
  }
  FAIL("expected an error containing '" << needle << "'");
}

KvAccounting run(const KvModel& model, const std::string& spec, std::uint64_t context, KvDtype dtype = KvDtype::kBf16,
                 const KvOverrides& overrides = {}, std::uint64_t batch = 1) {
  return account(model, resolve_method(spec, model, overrides), dtype, batch, context);
}

KvModel small_model(std::int64_t layers, std::int64_t q, std::int64_t kv, std::int64_t d) {
  KvModel m;
  m.name = "test";
  m.num_layers = layers;
  m.num_q_heads = q;
  m.num_kv_heads = kv;
  m.head_dim = d;
  return m;
}

std::string temp_path(const std::string& name) { return std::string(HYSPARSE_TEST_DATA_DIR) + "/kv_" + name; }

std::string write_file(const std::string& name, const std::string& text) {
  const std::string path = temp_path(name);
  std::ofstream(path) << text;
  return path;
}

constexpr std::uint64_t K = 1024;

}  // namespace

// ---------------------------------------------------------------- schedules

TEST_CASE("schedules: patterns, ratios, explicit lists and presets", "[kv]") {
  CHECK(schedule_pattern(parse_schedule("FSSS", 8)) == "FSSSFSSS");
  CHECK(schedule_pattern(parse_schedule("FS", 5)) == "FSFSF");
  CHECK(schedule_pattern(parse_schedule("1:3", 8)) == "FSSSFSSF");  // last layer forced full
  CHECK(schedule_pattern(parse_schedule("2:2", 6)) == "FFSSFF");
  CHECK(schedule_pattern(parse_schedule("full=0,4,5", 6)) == "FSSSFF");
  CHECK(schedule_pattern(parse_schedule("F", 3)) == "FFF");

  const auto seven = parse_schedule("hysparse-7b", 36);
  CHECK(full_layer_indices(seven) == std::vector<std::int64_t>{0, 4, 8, 12, 16, 20, 24, 28, 32, 35});
  CHECK(parse_schedule("1:3", 36) == seven);
  const auto eighty = parse_schedule("hysparse-80b-a3b", 49);
  CHECK(full_layer_indices(eighty) == std::vector<std::int64_t>{0, 12, 24, 36, 48});
  CHECK(parse_schedule("1:11", 49) == eighty);
  CHECK(describe_schedule(eighty) == "5 full + 44 sparse layers, full = 0,12,24,36,48");
}

TEST_CASE("schedules: every malformed spec is a usage error naming the problem", "[kv]") {
  require_error([] { parse_schedule("FSXS", 8); }, ErrorKind::kUsage, "'X' at position 2 is not F or S");
  require_error([] { parse_schedule("fsss", 8); }, ErrorKind::kUsage, "not F or S");
  require_error([] { parse_schedule("SFFF", 8); }, ErrorKind::kUsage, "layer 0 must be full");
  require_error([] { parse_schedule("FSSSFSSSF", 8); }, ErrorKind::kUsage, "only 8 layers");
  require_error([] { parse_schedule("0:3", 8); }, ErrorKind::kUsage, "at least one full and one sparse");
  require_error([] { parse_schedule("1:0", 8); }, ErrorKind::kUsage, "at least one full and one sparse");
  require_error([] { parse_schedule("1:", 8); }, ErrorKind::kUsage, "malformed ratio");
  require_error([] { parse_schedule("a:3", 8); }, ErrorKind::kUsage, "malformed ratio");
  require_error([] { parse_schedule("1:3:2", 8); }, ErrorKind::kUsage, "malformed ratio");
  require_error([] { parse_schedule("-1:3", 8); }, ErrorKind::kUsage, "malformed ratio");
  require_error([] { parse_schedule("full=0,8", 8); }, ErrorKind::kUsage, "full layer 8 is out of range");
  require_error([] { parse_schedule("full=1,2", 8); }, ErrorKind::kUsage, "layer 0 must be full");
  require_error([] { parse_schedule("full=0,x", 8); }, ErrorKind::kUsage, "'x' is not a layer index");
  require_error([] { parse_schedule("full=", 8); }, ErrorKind::kUsage, "is not a layer index");
  require_error([] { parse_schedule("full=0,0", 8); }, ErrorKind::kUsage, "listed twice");
  require_error([] { parse_schedule("", 8); }, ErrorKind::kUsage, "empty schedule");
  require_error([] { parse_schedule("hysparse-7b", 49); }, ErrorKind::kUsage, "is for a 36-layer model");
  require_error([] { parse_schedule("hysparse-80b-a3b", 36); }, ErrorKind::kUsage, "is for a 49-layer model");
}

// ---------------------------------------------------------------- the paper's numbers

TEST_CASE("hysparse-80b-a3b in BF16 reproduces the KV numbers", "[kv]") {
  const KvModel m = find_kv_preset("hysparse-80b-a3b");
  CHECK(kv_bytes_per_token_per_layer(m, KvDtype::kBf16) == 2048);
  CHECK(kv_bytes_per_token_full(m, KvDtype::kBf16) == 100352);

  const KvAccounting full = run(m, "full", 16 * K);
  CHECK(full.marginal_bytes_per_token == 100352.0);
  CHECK(full.bytes_per_token == 100352.0);
  CHECK(full.resident_bytes == 100352ull * 16 * K);
  CHECK(full.ratio_to_full == 1.0);

  const KvAccounting hys = run(m, "hysparse", 16 * K);
  CHECK(hys.marginal_bytes_per_token == 10240.0);
  CHECK(hys.resident_bytes == 179306496ull);  // 5 x 2048 x 16384 + 44 x 128 x 2048 (11 MiB of windows)
  CHECK(hys.window_layer_bytes == 11534336ull);
  CHECK(hys.metadata_bytes == 0);
  CHECK(hys.bytes_per_token == 10944.0);

  struct Row {
    std::uint64_t context;
    double ratio;
    double bytes_per_token;
  };
  for (const Row& row : {Row{4 * K, 7.69, 13056}, Row{8 * K, 8.62, 11648}, Row{16 * K, 9.17, 10944},
                         Row{32 * K, 9.47, 10592}, Row{128 * K, 9.72, 10328}, Row{1024 * K, 9.79, 10251}}) {
    const KvAccounting a = run(m, "hysparse", row.context);
    INFO("context " << row.context);
    CHECK(std::round(a.ratio_to_full * 100) / 100 == Approx(row.ratio));
    CHECK(std::round(a.bytes_per_token) == row.bytes_per_token);
    // Resident KV of HySparse equals the hybrid SWA baseline's; only the reads differ.
    const KvAccounting swa = run(m, "hybrid-swa", row.context);
    CHECK(swa.resident_bytes == a.resident_bytes);
    CHECK(a.read_bytes_per_decoded_token == swa.read_bytes_per_decoded_token + 44ull * 1024 * 2048);
  }
  // The limit is 49 / 5 = 9.8.
  const KvAccounting huge = run(m, "hysparse", 1ull << 34);
  CHECK(huge.ratio_to_full == Approx(9.8).epsilon(1e-4));
  CHECK(huge.ratio_to_full < 9.8);

  // Decode reads at 16K: 5 full layers x T + 44 sparse layers x (128 own + 1024 gathered), x 2,048 B.
  CHECK(hys.read_bytes_per_decoded_token == (5ull * 16 * K + 44ull * (128 + 1024)) * 2048);
  CHECK(static_cast<double>(full.read_bytes_per_decoded_token) / static_cast<double>(hys.read_bytes_per_decoded_token) ==
        Approx(6.05).epsilon(1e-3));
  // Decode FLOPs follow the same key counts: 64 query heads x 2 x (128 + 128) per key.
  CHECK(hys.decode_flops_per_token == Approx(64.0 * 512 * (5.0 * 16 * K + 44.0 * 1152)));
}

TEST_CASE("hysparse-7b: 10 full layers, 40,960 marginal bytes per token", "[kv]") {
  const KvModel m = find_kv_preset("hysparse-7b");
  CHECK(kv_bytes_per_token_full(m, KvDtype::kBf16) == 147456);
  const KvAccounting hys = run(m, "hysparse", 16 * K);
  CHECK(hys.marginal_bytes_per_token == 40960.0);
  CHECK(hys.resident_bytes == 10ull * 4096 * 16 * K + 26ull * 128 * 4096);  // 653 MiB
  CHECK(std::round(hys.ratio_to_full * 100) / 100 == Approx(3.53));
  CHECK(std::round(run(m, "hysparse", 32 * K).ratio_to_full * 100) / 100 == Approx(3.56));
  // The 9-full-layer reading of the paper: full=0,4,...,32.
  KvOverrides nine;
  nine.schedule = "FSSS";
  CHECK(run(m, "hysparse", 16 * K, KvDtype::kBf16, nine).marginal_bytes_per_token == 36864.0);
}

TEST_CASE("the baseline presets are the paper's Full-Attn and Hybrid SWA models", "[kv]") {
  const KvModel full = find_kv_preset("hysparse-80b-a3b-full-attn");
  const KvModel swa = find_kv_preset("hysparse-80b-a3b-hybrid-swa");
  const KvModel hys = find_kv_preset("hysparse-80b-a3b");
  CHECK(run(full, "native", 32 * K).resident_bytes == run(hys, "full", 32 * K).resident_bytes);
  CHECK(run(swa, "native", 32 * K).resident_bytes == run(hys, "hybrid-swa", 32 * K).resident_bytes);
  CHECK(default_method_specs(hys, {}) == std::vector<std::string>{"full", "hybrid-swa", "hysparse"});
  CHECK(default_method_specs(full, {}) == std::vector<std::string>{"full"});
  CHECK(default_method_specs(swa, {}) == std::vector<std::string>{"full", "native", "hybrid-swa", "hysparse"});
}

// ---------------------------------------------------------------- hand-computed shapes

TEST_CASE("GQA, MQA, MHA and K/V head dims, all dtypes", "[kv]") {
  const KvModel llama = find_kv_preset("llama-3.1-8b");
  CHECK(llama.attention_kind() == "GQA");
  CHECK(kv_bytes_per_token_full(llama, KvDtype::kBf16) == 131072);  // 32 x 2 x 8 x 128 x 2
  CHECK(kv_bytes_per_token_full(llama, KvDtype::kFp16) == 131072);
  CHECK(kv_bytes_per_token_full(llama, KvDtype::kFp8) == 65536);
  CHECK(kv_bytes_per_token_full(llama, KvDtype::kFp32) == 262144);
  CHECK(run(llama, "full", 1000).resident_bytes == 131072000ull);
  CHECK(run(llama, "full", 1000, KvDtype::kFp8, {}, 3).resident_bytes == 3ull * 65536000);
  CHECK(run(find_kv_preset("qwen3-8b"), "full", 1).resident_bytes == 147456);

  const KvModel mqa = small_model(16, 32, 1, 128);
  CHECK(mqa.attention_kind() == "MQA");
  CHECK(kv_bytes_per_token_full(mqa, KvDtype::kFp16) == 16 * 2 * 128 * 2);
  const KvAccounting a = run(mqa, "full", 4, KvDtype::kFp16);
  CHECK(a.resident_bytes == 4 * 8192);
  CHECK(a.read_bytes_per_decoded_token == 4 * 8192);
  // 16 layers x 32 query heads x 4 keys x 2 x (128 + 128).
  CHECK(a.decode_flops_per_token == 16.0 * 32 * 4 * 2 * 256);
  // Causal prefill of 4 tokens: 1 + 2 + 3 + 4 = 10 query-key pairs per head.
  CHECK(a.prefill_flops == 16.0 * 32 * 10 * 2 * 256);

  KvModel mha = small_model(2, 8, 8, 64);
  CHECK(mha.attention_kind() == "MHA");
  CHECK(kv_bytes_per_token_full(mha, KvDtype::kFp32) == 2 * 8 * 128 * 4);

  KvModel split = small_model(3, 16, 4, 192);
  split.v_head_dim = 128;
  CHECK(kv_bytes_per_token_per_layer(split, KvDtype::kBf16) == 4 * (192 + 128) * 2);
  CHECK(run(split, "full", 10).decode_flops_per_token == 3.0 * 16 * 10 * 2 * 320);
}

TEST_CASE("MLA caches one latent plus a rope key per token per layer", "[kv]") {
  const KvModel ds = find_kv_preset("deepseek-v3");
  CHECK(ds.attention_kind() == "MLA");
  CHECK(kv_bytes_per_token_per_layer(ds, KvDtype::kBf16) == (512 + 64) * 2);
  CHECK(kv_bytes_per_token_full(ds, KvDtype::kBf16) == 61 * 1152);  // 70,272 B: the L factor is there
  CHECK(kv_bytes_per_token_full(ds, KvDtype::kFp8) == 61 * 576);
  const std::uint64_t T = 32 * K;
  const KvAccounting a = run(ds, "full", T);
  CHECK(a.resident_bytes == 61ull * 1152 * T);
  CHECK(a.read_bytes_per_decoded_token == 61ull * 1152 * T);  // one latent read serves all 128 heads
  // Decode (absorbed): 128 heads x T keys x 2 x (576 + 512); prefill (expanded): 2 x (192 + 128) per pair.
  CHECK(a.decode_flops_per_token == Approx(61.0 * 128 * static_cast<double>(T) * 2 * 1088));
  const double pairs = static_cast<double>(T) * static_cast<double>(T + 1) / 2;
  CHECK(a.prefill_flops == Approx(61.0 * 128 * pairs * 2 * 320));
  // Per-head metadata on MLA counts the single latent head, keyed by its 576-wide key.
  const KvAccounting q = run(ds, "quest", 16 * K);
  CHECK(q.metadata_bytes == 61ull * 1 * (16 * K / 16) * 2 * 576 * 2);
  require_error([&] { resolve_method("duo", ds); }, ErrorKind::kUsage, "MLA");
}

TEST_CASE("windows shorter and longer than the context", "[kv]") {
  const KvModel oss = find_kv_preset("gpt-oss-120b");
  CHECK(oss.layer_type(0) == KvLayerType::kSliding);
  CHECK(oss.layer_type(1) == KvLayerType::kFull);
  const std::uint64_t c = 8 * (64 + 64) * 2;  // 2,048 B per layer per token
  // T = 100 < window 128: every layer keeps everything, and all grow.
  const KvAccounting short_ctx = run(oss, "native", 100);
  CHECK(short_ctx.resident_bytes == 36 * 100 * c);
  CHECK(short_ctx.marginal_bytes_per_token == 36.0 * c);
  CHECK(short_ctx.ratio_to_full == 1.0);
  // T = 128 = window: still everything, but window layers stop growing.
  CHECK(run(oss, "native", 128).resident_bytes == 36 * 128 * c);
  CHECK(run(oss, "native", 128).marginal_bytes_per_token == 18.0 * c);
  // T = 4096 > window.
  const KvAccounting long_ctx = run(oss, "native", 4096);
  CHECK(long_ctx.resident_bytes == 18 * 4096 * c + 18 * 128 * c);
  CHECK(long_ctx.full_layer_bytes == 18 * 4096 * c);
  CHECK(long_ctx.window_layer_bytes == 18 * 128 * c);
  CHECK(long_ctx.marginal_bytes_per_token == 18.0 * c);
  CHECK(long_ctx.read_bytes_per_decoded_token == 18 * 4096 * c + 18 * 128 * c);

  const KvModel gemma = find_kv_preset("gemma-3-27b");
  CHECK(std::count(gemma.layer_types.begin(), gemma.layer_types.end(), KvLayerType::kFull) == 10);
  CHECK(gemma.layer_type(5) == KvLayerType::kFull);
  CHECK(gemma.layer_type(0) == KvLayerType::kSliding);
  const std::uint64_t g = 16 * 256 * 2;
  CHECK(run(gemma, "native", 32 * K).resident_bytes == 10 * 32 * K * g + 52 * 1024 * g);
  CHECK(run(gemma, "native", 512).resident_bytes == 62 * 512 * g);

  // Prefill pairs of a window of 4 over 10 tokens: 1 + 2 + 3 + 4 x 7 = 34.
  const KvModel one = small_model(1, 2, 1, 8);
  const KvAccounting w = run(one, "swa:window=4", 10, KvDtype::kFp32);
  CHECK(w.resident_bytes == 4 * 16 * 4);
  CHECK(w.prefill_flops == 2.0 * 34 * 2 * 16);
  CHECK(w.decode_flops_per_token == 2.0 * 4 * 2 * 16);
  // StreamingLLM keeps sinks + window.
  CHECK(run(one, "streamingllm:sinks=4,window=6", 100, KvDtype::kFp32).resident_bytes == 10 * 16 * 4);
  CHECK(run(one, "streamingllm:sinks=4,window=6", 7, KvDtype::kFp32).resident_bytes == 7 * 16 * 4);

  // Chunked attention keeps at most one chunk (its peak) and attends the current chunk.
  KvModel chunked = small_model(2, 4, 2, 16);
  chunked.layer_types = {KvLayerType::kChunked, KvLayerType::kFull};
  chunked.chunk_size = 8;
  const KvAccounting ch = run(chunked, "native", 20, KvDtype::kFp32);
  CHECK(ch.resident_bytes == (8 + 20) * 2 * 32 * 4);
  CHECK(ch.read_bytes_per_decoded_token == (4 + 20) * 2 * 32 * 4);  // token 20 sits 4th in its chunk
}

TEST_CASE("hybrid schedules on a model that has none, and with windows longer than the context", "[kv]") {
  const KvModel m = small_model(8, 8, 2, 64);
  KvOverrides o;
  o.schedule = "1:3";  // FSSSFSSF
  const std::uint64_t c = 2 * 128 * 2;
  const KvAccounting a = run(m, "hybrid-swa:window=16", 100, KvDtype::kBf16, o);
  CHECK(a.resident_bytes == 3 * 100 * c + 5 * 16 * c);
  const KvAccounting shorter = run(m, "hybrid-swa:window=16", 10, KvDtype::kBf16, o);
  CHECK(shorter.resident_bytes == 8 * 10 * c);
  CHECK(shorter.ratio_to_full == 1.0);
  // HySparse with T below top-k gathers every token.
  const KvAccounting h = run(m, "hysparse:window=16,topk=64,block=16", 40, KvDtype::kBf16, o);
  CHECK(h.read_bytes_per_decoded_token == (3 * 40 + 5 * (16 + 40)) * c);
  CHECK(h.resident_bytes == 3 * 40 * c + 5 * 16 * c);
  require_error([&] { resolve_method("hysparse", m); }, ErrorKind::kUsage, "needs a full/sparse layer schedule");
  require_error([&] { resolve_method("hysparse:topk=100,block=64", m, o); }, ErrorKind::kUsage, "not a multiple of block");
}

// ---------------------------------------------------------------- proxies

TEST_CASE("proxy metadata and budgets follow the footprint table", "[kv]") {
  const KvModel llama = find_kv_preset("llama-3.1-8b");
  const std::uint64_t T = 16 * K, c = 8 * 256 * 2, per_head = 256 * 2;
  // Quest: 2*d bf16 elements per 16-token page per KV head = 1/16 of K+V.
  const KvAccounting quest = run(llama, "quest", T);
  CHECK(quest.kv_bytes == 32 * T * c);
  CHECK(quest.metadata_bytes == 32ull * 8 * (T / 16) * 2 * 128 * 2);
  CHECK(quest.metadata_bytes * 16 == quest.kv_bytes);
  CHECK(quest.marginal_bytes_per_token == 131072.0 * 17 / 16);
  // A partial page still has its entry.
  CHECK(run(llama, "quest", 17).metadata_bytes == 32ull * 8 * 2 * 512);
  // Reads: all page summaries + the 1,024-token budget.
  CHECK(quest.read_bytes_per_decoded_token == 32 * (1024 * c + 8 * (T / 16) * 512));
  CHECK(run(llama, "quest:page=32", T).metadata_bytes == quest.metadata_bytes / 2);

  // H2O: keeps 20% with one fp32 score per resident token per KV head.
  const KvAccounting h2o = run(llama, "h2o", 1000);
  CHECK(h2o.kv_bytes == 32 * 200 * c);
  CHECK(h2o.budget_layer_bytes == h2o.kv_bytes);
  CHECK(h2o.metadata_bytes == 32 * 8 * 200 * 4);
  CHECK(run(llama, "h2o:budget=300", 1000).kv_bytes == 32 * 300 * c);
  // SnapKV: a budget of 2,048 tokens, no metadata.
  const KvAccounting snap = run(llama, "snapkv", T);
  CHECK(snap.resident_bytes == 32 * 2048 * c);
  CHECK(snap.marginal_bytes_per_token == 0.0);
  CHECK(run(llama, "snapkv", 1000).resident_bytes == 32 * 1000 * c);
  // Double Sparsity: r = d/8 = 16 bf16 labels = 32 B per token per KV head.
  CHECK(run(llama, "doublesparsity", T).metadata_bytes == 32ull * 8 * T * 32);
  CHECK(run(llama, "doublesparsity:r=32,bits=4", T).metadata_bytes == 32ull * 8 * T * 16);
  // MagicPIG: L*K = 1,500 bits per token per KV head.
  CHECK(run(llama, "magicpig", 8).metadata_bytes == 32ull * 8 * 8 * 1500 / 8);
  // Loki: no metadata, but each decoded token scans d/4 channels of every key.
  const KvAccounting loki = run(llama, "loki", 1000);
  CHECK(loki.metadata_bytes == 0);
  CHECK(loki.read_bytes_per_decoded_token == 32 * (250 * c + 8 * 1000 * 32 * 2));
  // SparQ stores K twice by default (+50%); copy=0 gathers channels in place.
  CHECK(run(llama, "sparq", 100).metadata_bytes == 32ull * 8 * 100 * per_head / 2);
  CHECK(run(llama, "sparq:copy=0", 100).metadata_bytes == 0);
  // InfLLM: one d vector per 128-token block per query head (64 B/token/layer for 32 heads).
  CHECK(run(llama, "infllm", T).metadata_bytes == 32ull * 64 * T);
  // DSA: 128 fp8 + a 4-byte scale per token per layer.
  CHECK(run(llama, "dsa", T).metadata_bytes == 32ull * 132 * T);
  // DuoAttention: half the KV heads keep sink 128 + recent 256, gates are one fp32 per KV head.
  const KvAccounting duo = run(llama, "duo", T);
  CHECK(duo.kv_bytes == 128 * T * per_head + 128 * 384 * per_head);
  CHECK(duo.metadata_bytes == 32 * 8 * 4);
  CHECK(duo.full_layer_bytes == 128 * T * per_head);
  CHECK(duo.window_layer_bytes == 128 * 384 * per_head);
  CHECK(run(llama, "duo:streaming=75", T).kv_bytes == 64 * T * per_head + 192 * 384 * per_head);

  // Proxies leave a model's own window layers alone.
  const KvModel oss = find_kv_preset("gpt-oss-120b");
  const KvAccounting oq = run(oss, "quest", 4096);
  CHECK(oq.metadata_bytes == 18ull * 8 * 256 * 2 * 64 * 2);
  CHECK(oq.kv_bytes == run(oss, "native", 4096).kv_bytes);
}

TEST_CASE("the footprint table is complete and cited", "[kv]") {
  std::vector<std::string> names;
  for (const KvFootprint& f : kv_footprints()) {
    INFO(f.method);
    CHECK(!f.source.empty());
    CHECK(!f.title.empty());
    CHECK(std::find(names.begin(), names.end(), f.method) == names.end());
    names.push_back(f.method);
    if (!f.metadata.empty()) CHECK(!f.metadata.formula.empty());
  }
  for (const char* required : {"full", "swa", "streamingllm", "hybrid-swa", "hysparse", "quest", "moba", "nsa", "infllm",
                               "h2o", "snapkv", "doublesparsity", "loki", "sparq", "magicpig", "duo"}) {
    INFO(required);
    CHECK(std::find(names.begin(), names.end(), required) != names.end());
  }
  CHECK(find_footprint("h2o").evicts);
  CHECK(find_footprint("snapkv").evicts);
  CHECK(!find_footprint("quest").evicts);
  require_error([] { find_footprint("bogus"); }, ErrorKind::kUsage, "unknown method 'bogus'");
}

TEST_CASE("method specs: keys, global overrides, lists and errors", "[kv]") {
  const KvModel m = find_kv_preset("hysparse-80b-a3b");
  KvOverrides o;
  o.values = {{"window", 256}, {"budget", 4096}};
  const KvMethod h = resolve_method("hysparse:topk=2048", m, o);
  CHECK(h.param("window") == 256);
  CHECK(h.param("topk") == 2048);
  CHECK(h.describe() == "hysparse:window=256,topk=2048,block=64,sinks=0");
  CHECK(resolve_method("quest", m, o).param("budget") == 4096);
  CHECK(resolve_method("quest:budget=2K", m, o).param("budget") == 2048);

  CHECK(split_method_list("full,quest:page=32,budget=512,h2o", m, {}) ==
        std::vector<std::string>{"full", "quest:page=32,budget=512", "h2o"});
  const auto all = split_method_list("all", m, {});
  CHECK(std::find(all.begin(), all.end(), "hysparse") != all.end());
  CHECK(std::find(all.begin(), all.end(), "native") == all.end());
  const auto all_llama = split_method_list("all", find_kv_preset("llama-3.1-8b"), {});
  CHECK(std::find(all_llama.begin(), all_llama.end(), "hysparse") == all_llama.end());
  for (const auto& spec : all) CHECK_NOTHROW(account(m, resolve_method(spec, m), KvDtype::kBf16, 2, 128 * K));

  require_error([&] { resolve_method("quest:pages=3", m); }, ErrorKind::kUsage, "has no parameter 'pages'");
  require_error([&] { resolve_method("quest:page=0", m); }, ErrorKind::kUsage, "page is 0");
  require_error([&] { resolve_method("quest:page", m); }, ErrorKind::kUsage, "is not key=value");
  require_error([&] { resolve_method("quest:page=-1", m); }, ErrorKind::kUsage, "not a non-negative integer");
  require_error([&] { resolve_method("h2o:keep=101", m); }, ErrorKind::kUsage, "expected 0..100");
  require_error([&] { resolve_method("snapkv:budget=0", m); }, ErrorKind::kUsage, "nothing would be attended");
  require_error([&] { resolve_method("swa:window=0", m); }, ErrorKind::kUsage, "window + sinks is 0");
  require_error([&] { split_method_list("budget=3,full", m, {}); }, ErrorKind::kUsage, "without a method");
  require_error([&] { split_method_list("full,,quest", m, {}); }, ErrorKind::kUsage, "empty method name");
}

// ---------------------------------------------------------------- contexts, overflow

TEST_CASE("contexts accept binary suffixes and reject nonsense", "[kv]") {
  CHECK(parse_contexts("4K,32K,128K,1M") == std::vector<std::uint64_t>{4096, 32768, 131072, 1048576});
  CHECK(parse_contexts("16384") == std::vector<std::uint64_t>{16384});
  CHECK(parse_contexts(" 1k, 2m ,1G") == std::vector<std::uint64_t>{1024, 2ull << 20, 1ull << 30});
  CHECK(format_context(16384) == "16K");
  CHECK(format_context(1ull << 20) == "1M");
  CHECK(format_context(1000) == "1000");
  require_error([] { parse_contexts("0"); }, ErrorKind::kUsage, "0 tokens");
  require_error([] { parse_contexts("4X"); }, ErrorKind::kUsage, "'4X' is not a token count");
  require_error([] { parse_contexts(""); }, ErrorKind::kUsage, "is not a token count");
  require_error([] { parse_contexts("1,,2"); }, ErrorKind::kUsage, "is not a token count");
  require_error([] { parse_contexts("-5"); }, ErrorKind::kUsage, "is not a token count");
  require_error([] { parse_contexts("99999999999999999999"); }, ErrorKind::kUsage, "is not a token count");
  require_error([] { parse_contexts("99999999999G"); }, ErrorKind::kUsage, "is not a token count");
  CHECK(parse_kv_dtype("bf16") == KvDtype::kBf16);
  CHECK(parse_kv_dtype("FP8") == KvDtype::kFp8);
  require_error([] { parse_kv_dtype("int4"); }, ErrorKind::kUsage, "--dtype int4");
}

TEST_CASE("byte counts that overflow 64 bits are errors, not wraps", "[kv]") {
  const KvModel m = find_kv_preset("hysparse-80b-a3b");
  require_error([&] { run(m, "full", 1ull << 62); }, ErrorKind::kUsage, "overflows 64 bits");
  require_error([&] { run(m, "full", 1ull << 62); }, ErrorKind::kUsage, "at context 4611686018427387904");
  require_error([&] { run(m, "hysparse", 1ull << 50, KvDtype::kBf16, {}, 1ull << 20); }, ErrorKind::kUsage,
                "overflows 64 bits");
  CHECK_NOTHROW(run(m, "full", 1ull << 40));
  require_error([&] { run(m, "full", 0); }, ErrorKind::kUsage, "context of 0");
}

// ---------------------------------------------------------------- Hugging Face configs

TEST_CASE("HF config.json: Llama, Gemma 3, gpt-oss, Qwen and DeepSeek-V3 shapes", "[kv]") {
  {
    const KvModel m = kv_model_from_hf_config(write_file("llama.json", R"({
      "_name_or_path": "meta-llama/Llama-3.1-8B", "model_type": "llama", "hidden_size": 4096,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "torch_dtype": "bfloat16"})"));
    CHECK(m.name == "meta-llama/Llama-3.1-8B");
    CHECK(m.head_dim == 128);
    CHECK(m.layer_types.empty());
    CHECK(kv_bytes_per_token_full(m, KvDtype::kBf16) == 131072);
  }
  {
    // Gemma 3: multimodal root, text_config, sliding_window_pattern 6.
    const KvModel m = kv_model_from_hf_config(write_file("gemma3.json", R"({
      "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
      "text_config": {"model_type": "gemma3_text", "hidden_size": 5376, "head_dim": 128, "num_hidden_layers": 62,
                      "num_attention_heads": 32, "num_key_value_heads": 16, "sliding_window": 1024,
                      "sliding_window_pattern": 6},
      "vision_config": {"num_hidden_layers": 27}})"));
    CHECK(m.num_layers == 62);
    CHECK(m.head_dim == 128);
    CHECK(m.sliding_window == 1024);
    CHECK(m.layer_types == find_kv_preset("gemma-3-27b").layer_types);
  }
  {
    // Gemma 3 written with explicit layer_types (newer transformers).
    std::string types;
    for (int i = 0; i < 12; ++i) types += std::string(i ? "," : "") + ((i + 1) % 6 == 0 ? "\"full_attention\"" : "\"sliding_attention\"");
    const KvModel m = kv_model_from_hf_config(write_file("gemma3_types.json",
        R"({"num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "sliding_window": 512, "layer_types": [)" + types + "]}"));
    CHECK(m.layer_type(5) == KvLayerType::kFull);
    CHECK(m.layer_type(11) == KvLayerType::kFull);
    CHECK(m.layer_type(4) == KvLayerType::kSliding);
    CHECK(run(m, "native", 4096).resident_bytes == (2ull * 4096 + 10ull * 512) * 4 * 512 * 2);
  }
  {
    std::string types;
    for (int i = 0; i < 36; ++i) types += std::string(i ? "," : "") + (i % 2 ? "\"full_attention\"" : "\"sliding_attention\"");
    const KvModel m = kv_model_from_hf_config(write_file("gptoss.json",
        R"({"model_type": "gpt_oss", "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 64, "hidden_size": 2880, "sliding_window": 128, "layer_types": [)" + types + "]}"));
    CHECK(m.layer_types == find_kv_preset("gpt-oss-120b").layer_types);
    CHECK(run(m, "native", 128 * K).resident_bytes == run(find_kv_preset("gpt-oss-120b"), "native", 128 * K).resident_bytes);
  }
  {
    const KvModel m = kv_model_from_hf_config(write_file("qwen3.json", R"({
      "model_type": "qwen3", "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
      "head_dim": 128, "hidden_size": 4096, "sliding_window": null, "use_sliding_window": false,
      "max_window_layers": 36})"));
    CHECK(m.layer_types.empty());
    const KvModel w = kv_model_from_hf_config(write_file("qwen2_window.json", R"({
      "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
      "sliding_window": 32, "use_sliding_window": true, "max_window_layers": 2})"));
    CHECK(w.layer_type(1) == KvLayerType::kFull);
    CHECK(w.layer_type(2) == KvLayerType::kSliding);
    const KvModel mistral = kv_model_from_hf_config(write_file("mistral01.json", R"({
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
      "sliding_window": 4096})"));
    CHECK(run(mistral, "native", 32 * K).resident_bytes == run(find_kv_preset("mistral-7b-v0.1"), "native", 32 * K).resident_bytes);
  }
  {
    const KvModel m = kv_model_from_hf_config(write_file("deepseek.json", R"({
      "model_type": "deepseek_v3", "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
      "hidden_size": 7168, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
      "qk_nope_head_dim": 128, "v_head_dim": 128})"));
    CHECK(m.is_mla());
    CHECK(m.head_dim == 192);
    CHECK(m.value_dim() == 128);
    CHECK(kv_bytes_per_token_full(m, KvDtype::kBf16) == 70272);
    CHECK(run(m, "full", 4 * K).prefill_flops == run(find_kv_preset("deepseek-v3"), "full", 4 * K).prefill_flops);
  }
}

TEST_CASE("HF config.json: clear errors for what cannot be interpreted", "[kv]") {
  require_error([] { kv_model_from_hf_config(write_file("no_layers.json", R"({"num_attention_heads": 8, "hidden_size": 512})")); },
                ErrorKind::kInput, "num_hidden_layers: missing (expected a positive integer)");
  require_error([] {
    kv_model_from_hf_config(write_file("bad_heads.json",
                                       R"({"num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 5, "head_dim": 64})"));
  }, ErrorKind::kInput, "num_key_value_heads: 5 does not divide num_attention_heads 12");
  require_error([] {
    kv_model_from_hf_config(write_file("bad_hidden.json", R"({"num_hidden_layers": 2, "num_attention_heads": 12, "hidden_size": 1000})"));
  }, ErrorKind::kInput, "hidden_size: 1000 is not a multiple of num_attention_heads 12");
  require_error([] { kv_model_from_hf_config(write_file("malformed.json", R"({"num_hidden_layers": 2,)")); },
                ErrorKind::kInput, "not valid JSON");
  require_error([] {
    kv_model_from_hf_config(write_file("unknown_type.json",
        R"({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64, "layer_types": ["full_attention", "linear_attention"]})"));
  }, ErrorKind::kInput, "layer_types[1]: unknown layer type \"linear_attention\"");
  require_error([] {
    kv_model_from_hf_config(write_file("short_types.json",
        R"({"num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 64, "layer_types": ["full_attention"]})"));
  }, ErrorKind::kInput, "layer_types: has 1 entries (expected num_hidden_layers = 3)");
  require_error([] {
    kv_model_from_hf_config(write_file("no_window.json",
        R"({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64, "layer_types": ["full_attention", "sliding_attention"]})"));
  }, ErrorKind::kInput, "sliding_window: missing");
  require_error([] {
    kv_model_from_hf_config(write_file("string_layers.json", R"({"num_hidden_layers": "32", "num_attention_heads": 4, "head_dim": 64})"));
  }, ErrorKind::kInput, "num_hidden_layers: is \"32\" (expected an integer)");
  require_error([] {
    kv_model_from_hf_config(write_file("mla_no_rope.json",
        R"({"num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 512, "qk_nope_head_dim": 128})"));
  }, ErrorKind::kInput, "qk_rope_head_dim: missing");
  require_error([] {
    kv_model_from_hf_config(write_file("jamba.json",
        R"({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64, "layers_block_type": ["mamba", "attention"]})"));
  }, ErrorKind::kInput, "not supported");
  require_error([] { kv_model_from_hf_config(write_file("array.json", "[1, 2]")); }, ErrorKind::kInput, "expected a JSON object");
  require_error([] { kv_model_from_hf_config(temp_path("does_not_exist.json")); }, ErrorKind::kInput, "cannot open");
}

// ---------------------------------------------------------------- reports

TEST_CASE("the HDF5 report, JSON and text carry the same accounting", "[kv]") {
  const KvModel m = find_kv_preset("hysparse-80b-a3b");
  std::vector<KvMethod> methods;
  for (const char* spec : {"full", "hybrid-swa", "hysparse", "quest"}) methods.push_back(resolve_method(spec, m));
  const KvTable table = compute_kv_table(m, methods, KvDtype::kBf16, 2, {16 * K, 32 * K, 128 * K});

  const std::string path = temp_path("report.h5");
  {
    h5::File file = h5::File::create(path);
    write_kv_table(file, "/", table);
    write_kv_table(file, "/kv", table);  // as a replay report would embed it
    file.close();
  }
  const h5::File file = h5::File::open_read(path);
  for (const std::string prefix : {"/", "/kv/"}) {
    const h5::DatasetInfo info = h5::dataset_info(file, prefix + "resident_bytes");
    CHECK(info.dims == std::vector<std::uint64_t>{4, 3});
    const std::vector<std::int64_t> resident = h5::read_ints(file, prefix + "resident_bytes");
    CHECK(resident[0] == 2 * 100352ll * 16 * 1024);
    CHECK(resident[2 * 3 + 0] == 2 * 179306496ll);
    CHECK(h5::read_string_attribute(file, prefix + "resident_bytes", "units") == "bytes");
    CHECK(h5::has_attribute(file, prefix + "ratio_to_full", "long_name"));
    const std::vector<double> ratio = h5::read_doubles(file, prefix + "ratio_to_full");
    CHECK(ratio[2 * 3 + 0] == Approx(9.1696).epsilon(1e-4));
    CHECK(h5::read_ints(file, prefix + "context") == std::vector<std::int64_t>{16384, 32768, 131072});
    CHECK(h5::dataset_info(file, prefix + "resident_bytes_per_layer").dims == std::vector<std::uint64_t>{4, 3, 49});
    const std::string group = prefix == "/" ? "/" : "/kv";
    CHECK(h5::read_string_attribute(file, group, "model") == "hysparse-80b-a3b");
    CHECK(h5::read_int_attribute(file, group, "num_layers") == 49);
    CHECK(h5::read_int_attribute(file, group, "batch") == 2);
    CHECK(h5::read_string_attribute(file, group, "kv_dtype") == "bf16");
    CHECK(h5::read_string_list_attribute(file, group, "layer_types").size() == 49);
    for (const std::string name : {"resident_bytes", "kv_bytes", "metadata_bytes", "marginal_bytes_per_token",
                                   "read_bytes_per_decoded_token", "decode_flops_per_token", "prefill_flops",
                                   "context", "layer", "method"}) {
      INFO(name);
      CHECK(h5::has_attribute(file, prefix + name, "units"));
      CHECK(h5::has_attribute(file, prefix + name, "long_name"));
    }
  }

  const nlohmann::json j = kv_table_json(table);
  CHECK(j["model"]["num_layers"] == 49);
  CHECK(j["results"].size() == 12);
  CHECK(j["results"][6]["method"] == "hysparse");
  CHECK(j["results"][6]["resident_bytes"] == 2ull * 179306496);
  CHECK(j["results"][6]["marginal_bytes_per_token"] == 10240.0);
  CHECK(j["methods"][2]["full_layers"] == nlohmann::json({0, 12, 24, 36, 48}));

  const std::string text = format_kv_text(table);
  CHECK(text.find("100,352 B per token with every layer full") != std::string::npos);
  CHECK(text.find("9.17x") != std::string::npos);
  CHECK(text.find("10,240") != std::string::npos);
  CHECK(text.find("(358612992 bytes)") != std::string::npos);  // 2 x 179,306,496
  CHECK(group_digits(100352) == "100,352");
  CHECK(group_digits(999) == "999");
  CHECK(group_digits(1000000) == "1,000,000");
  std::remove(path.c_str());
}

TEST_CASE("a replay can build the model from a capture header", "[kv]") {
  const KvModel m = kv_model_from_shape("capture", 4, 8, 2, 64, {"sliding_attention", "full_attention",
                                                                 "sliding_attention", "full_attention"}, 16);
  CHECK(run(m, "native", 100, KvDtype::kFp32).resident_bytes == (2 * 100 + 2 * 16) * 2 * 128 * 4);
  CHECK(kv_model_from_shape("plain", 2, 4, 4, 32, {}, std::nullopt).layer_types.empty());
  require_error([] { kv_model_from_shape("c", 2, 4, 4, 32, {"full_attention", "sliding_attention"}, std::nullopt); },
                ErrorKind::kInput, "sliding_window");
  require_error([] { kv_model_from_shape("c", 2, 6, 4, 32, {}, std::nullopt); }, ErrorKind::kInput, "not a multiple");
  require_error([] { kv_model_from_shape("c", 1, 4, 4, 32, {"mamba"}, std::nullopt); }, ErrorKind::kInput,
                "unknown layer type \"mamba\"");
}
