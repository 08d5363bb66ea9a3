// Faults and hostile inputs below the CLI: the memory budget and its refusals, one-line messages,
// outputs that cannot be created, inputs that change while they are read, and a regression test for
// every finding of the fuzz targets (tests/fuzz), each named after the input that found it, next to
// the hardening found by review.
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.hpp"
#include "capture/capture.hpp"
#include "catch.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/memory.hpp"
#include "io/h5.hpp"
#include "kv/hf_config.hpp"
#include "kv/kv.hpp"
#include "kv/presets.hpp"
#include "replay/engine.hpp"
#include "replay/options.hpp"
#include "replay/selector.hpp"
#include "replay_test_support.hpp"
#include "synth/synth.hpp"

using namespace hysparse;

namespace {

std::string data_path(const std::string& name) { return std::string(HYSPARSE_TEST_DATA_DIR) + "/faults_" + name; }

// The Error `action` throws: of `kind`, one line, holding every string of `parts`.
void require_error(ErrorKind kind, const std::function<void()>& action, const std::vector<std::string>& parts) {
  std::optional<Error> caught;
  try {
    action();
  } catch (const Error& e) {
    caught = e;
  }
  REQUIRE(caught.has_value());
  const std::string message = caught->what();
  INFO("message: " << message);
  CHECK(caught->kind() == kind);
  CHECK(message.find('\n') == std::string::npos);
  for (const auto& part : parts) {
    INFO("expected the message to contain: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

// Sets an environment variable for one scope, restoring the previous value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// Turns the input watch on for one test and off (forgetting every input) afterwards.
struct ScopedInputWatch {
  ScopedInputWatch() { enable_input_watch(true); }
  ~ScopedInputWatch() { enable_input_watch(false); }
  ScopedInputWatch(const ScopedInputWatch&) = delete;
  ScopedInputWatch& operator=(const ScopedInputWatch&) = delete;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

}  // namespace

TEST_CASE("memory: HYSPARSE_MEMORY_LIMIT caps the budget; refusals say how much is needed", "[faults]") {
  {
    ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", "64K");
    const MemoryBudget budget = available_memory();
    CHECK(budget.bytes == 64 * 1024);
    CHECK(budget.limited_by == "HYSPARSE_MEMORY_LIMIT");
    CHECK_NOTHROW(require_memory(64 * 1024, "exactly the budget"));
    require_error(ErrorKind::kResource, [] { require_memory(64 * 1024 + 1, "one byte too many"); },
                  {"one byte too many needs 64.00 KiB (65537 bytes) of memory", "only 64.00 KiB (65536 bytes)",
                   "limited by HYSPARSE_MEMORY_LIMIT"});
  }
  for (const char* bad : {"lots", "12X", "-1", "99999999999999999999", "K"}) {
    ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", bad);
    require_error(ErrorKind::kUsage, [] { (void)available_memory(); }, {"HYSPARSE_MEMORY_LIMIT", bad});
  }
  {
    ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", "2G");
    CHECK(available_memory().bytes <= (std::uint64_t{2} << 30));
  }
}

TEST_CASE("memory: reading a layer larger than the budget is refused before allocating", "[faults]") {
  SynthOptions options;
  options.num_layers = 1;
  options.seq_len = 64;
  options.head_dim = 16;
  const std::string path = data_path("small_capture.h5");
  write_synthetic_capture(path, options, {});
  const CaptureReader reader = CaptureReader::open(path);
  const std::uint64_t needed = reader.layer_bytes(0, true);
  ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", std::to_string(needed - 1).c_str());
  require_error(ErrorKind::kResource, [&] { (void)reader.read_layer(0, true); },
                {path + ": reading layer 0 needs", std::to_string(needed) + " bytes"});
  ScopedEnv enough("HYSPARSE_MEMORY_LIMIT", std::to_string(needed).c_str());
  CHECK_NOTHROW(reader.read_layer(0, true));
}

TEST_CASE("memory: synth refuses shapes that overflow or do not fit", "[faults]") {
  SynthOptions options;
  options.seq_len = INT64_MAX;
  require_error(ErrorKind::kUsage, [&] { validate(options); }, {"overflows 64 bits", "--seq-len 9223372036854775807"});
  options.seq_len = 1 << 20;
  ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", "1M");
  require_error(ErrorKind::kResource, [&] { generate_synthetic(options, [](std::int64_t, const LayerTensors&) {}); },
                {"synth: a layer of", "needs", "limited by HYSPARSE_MEMORY_LIMIT"});
}

TEST_CASE("errors: messages are one line whatever the input holds", "[faults]") {
  CHECK(one_line("a\nb\rc\td\x1b[31m\x7f") == "a\\nb\\rc\\td\\x1b[31m\\x7f");
  CHECK(one_line("plain UTF-8: \xc3\xa9") == "plain UTF-8: \xc3\xa9");
  const Error e(ErrorKind::kInput, "file.h5: attribute 'format' is \"x\ny\"");
  CHECK(std::string(e.what()) == "file.h5: attribute 'format' is \"x\\ny\"");

  // A capture whose format attribute holds a newline: the reader's message stays one line.
  const std::string path = data_path("newline_format.h5");
  {
    h5::File file = h5::File::create(path);
    h5::write_attribute(file, "/", "format", std::string("hysparse-\ncapture"));
    file.close();
  }
  require_error(ErrorKind::kInput, [&] { (void)CaptureReader::open(path); },
                {path + ": attribute 'format' is \"hysparse-\\ncapture\""});
}

TEST_CASE("outputs: a destination that cannot be written is refused before any work", "[faults]") {
  require_error(ErrorKind::kOutput, [] { AtomicOutput out("/nonexistent-directory/report.h5"); },
                {"/nonexistent-directory/report.h5: cannot write: directory /nonexistent-directory does not exist"});
  const std::string file = data_path("plain_file");
  write_text(file, "x");
  require_error(ErrorKind::kOutput, [&] { AtomicOutput out(file + "/report.h5"); }, {file + " is not a directory"});
  const std::string directory = data_path("a_directory");
  mkdir(directory.c_str(), 0755);
  require_error(ErrorKind::kOutput, [&] { AtomicOutput out(directory); }, {directory + ": cannot write: it is a directory"});
  require_error(ErrorKind::kUsage, [] { AtomicOutput out(""); }, {"empty output path"});
}

TEST_CASE("outputs: the temporary file is removed unless committed", "[faults]") {
  const std::string destination = data_path("atomic.txt");
  std::remove(destination.c_str());
  std::string temporary;
  {
    AtomicOutput out(destination);
    temporary = out.temporary_path();
    write_text(temporary, "partial");
  }
  struct stat st {};
  CHECK(stat(temporary.c_str(), &st) != 0);
  CHECK(stat(destination.c_str(), &st) != 0);
  {
    AtomicOutput out(destination);
    write_text(out.temporary_path(), "whole");
    out.commit();
  }
  CHECK(stat(destination.c_str(), &st) == 0);
}

TEST_CASE("inputs: a file changed while it is read stops the commit", "[faults]") {
  const ScopedInputWatch watch;
  const std::string input = data_path("watched_input.txt");
  const std::string output = data_path("watched_output.txt");
  std::remove(output.c_str());
  write_text(input, "version 1");
  watch_input(input);
  CHECK_NOTHROW(watch_input(input));  // unchanged: seeing it again is fine
  CHECK_NOTHROW(check_inputs_unchanged());
  write_text(input, "version 2, longer");
  CHECK(input_changed(input));
  require_error(ErrorKind::kInput, [&] { watch_input(input); }, {input + ": changed while it was read", "size went from 9 to 17"});
  {
    AtomicOutput out(output);
    write_text(out.temporary_path(), "result");
    require_error(ErrorKind::kInput, [&] { out.commit(); }, {input + ": changed while it was read", "no output was written"});
  }
  struct stat st {};
  CHECK(stat(output.c_str(), &st) != 0);

  // Same size, rewritten: the modification and status-change times give it away. The kernel stamps
  // files with a coarse clock (one tick, 1-10 ms), so the rewrite comes a few ticks later.
  enable_input_watch(true);
  write_text(input, "AAAA");
  watch_input(input);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  write_text(input, "BBBB");
  require_error(ErrorKind::kInput, [] { check_inputs_unchanged(); }, {input + ": changed while it was read"});

  // Removed.
  enable_input_watch(true);
  watch_input(input);
  std::remove(input.c_str());
  require_error(ErrorKind::kInput, [] { check_inputs_unchanged(); }, {"it was removed"});
}

TEST_CASE("inputs: the watch is off unless enabled (library use)", "[faults]") {
  enable_input_watch(false);
  const std::string input = data_path("unwatched.txt");
  write_text(input, "1");
  watch_input(input);
  write_text(input, "22");
  CHECK_FALSE(input_changed(input));
  CHECK_NOTHROW(check_inputs_unchanged());
}

// ---- regressions: one per fuzz finding ----

TEST_CASE("fuzz regression (hf_config, regression-float-beyond-int64.json): a float integer beyond int64 is an input error, not UB", "[faults]") {
  // Converting 1e300 to int64 was undefined behaviour (UBSan: hf_config.cpp "outside the range of
  // representable values"); now a range check comes first.
  for (const char* value : {"1e300", "-1e300", "9.3e18", "18446744073709551615", "1.5"}) {
    const auto config = nlohmann::json::parse(std::string("{\"num_hidden_layers\": ") + value +
                                              ", \"num_attention_heads\": 8, \"head_dim\": 8}");
    require_error(ErrorKind::kInput, [&] { (void)kv_model_from_hf_json(config, "cfg.json"); }, {"cfg.json", "num_hidden_layers"});
  }
  const auto four = nlohmann::json::parse(R"({"num_hidden_layers": 4.0, "num_attention_heads": 8, "head_dim": 8})");
  CHECK(kv_model_from_hf_json(four, "cfg.json").num_layers == 4);
}

TEST_CASE("hardening (hf_config, found by review): a deeply nested value is described, not dumped recursively", "[faults]") {
  std::string nested = std::string(200000, '[') + std::string(200000, ']');
  const auto config = nlohmann::json::parse("{\"num_hidden_layers\": " + nested + ", \"num_attention_heads\": 8}");
  require_error(ErrorKind::kInput, [&] { (void)kv_model_from_hf_json(config, "deep.json"); },
                {"deep.json: num_hidden_layers: is an array of 1 elements (expected an integer)"});
}

TEST_CASE("hardening (hf_config, found by review): a layer count whose records cannot fit is refused first", "[faults]") {
  const auto config = nlohmann::json::parse(R"({"num_hidden_layers": 1000000000000, "num_attention_heads": 8,
                                               "head_dim": 8, "sliding_window": 4})");
  require_error(ErrorKind::kResource, [&] { (void)kv_model_from_hf_json(config, "many.json"); },
                {"many.json: num_hidden_layers = 1000000000000: the per-layer records needs"});
}

TEST_CASE("regression (bad-input table): token counts with a suffix cannot overflow", "[faults]") {
  require_error(ErrorKind::kUsage, [] { (void)parse_token_count("9223372036854775807K", "--budget"); },
                {"--budget '9223372036854775807K': overflows 64 bits"});
  require_error(ErrorKind::kUsage, [] { (void)parse_token_budgets("1,9007199254740992M"); }, {"overflows 64 bits"});
  CHECK(parse_token_count("8796093022207K", "--budget") == 8796093022207LL * 1024);
}

TEST_CASE("fuzz regression (hf_config, regression-head-dim-sum-overflow.json): huge dimensions are refused", "[faults]") {
  // head_dim 6444444444444444444 made KvModel::cached_elements_per_head() (head_dim + value_dim)
  // overflow int64 (UBSan); every config integer is now at most 2^40 in magnitude.
  const auto config = nlohmann::json::parse(R"({"num_hidden_layers": 4, "num_attention_heads": 8,
                                               "num_key_value_heads": 4, "head_dim": 6444444444444444444})");
  require_error(ErrorKind::kInput, [&] { (void)kv_model_from_hf_json(config, "dims.json"); },
                {"dims.json: head_dim: is 6444444444444444444 (expected an integer of magnitude at most 2^40"});
  const auto largest = nlohmann::json::parse(R"({"num_hidden_layers": 1, "num_attention_heads": 1,
                                                "head_dim": 1099511627776, "v_head_dim": 1099511627776})");
  CHECK(kv_model_from_hf_json(largest, "dims.json").cached_elements_per_head() == (std::int64_t{1} << 41));
}

TEST_CASE("fuzz regression (kv_specs, regression-window-sinks-overflow): method parameters are bounded", "[faults]") {
  // swa:window=2^63-1,sinks=2^63-1 overflowed window + sinks in resolve_method (UBSan).
  const KvModel model = find_kv_preset("llama-3.1-8b");
  require_error(ErrorKind::kUsage,
                [&] { (void)resolve_method("swa:window=9223372036854775807,sinks=9223372036854775807", model); },
                {"window is 9223372036854775807 (expected at most 2^40"});
  KvOverrides overrides;
  overrides.values.emplace_back("budget", std::int64_t{1} << 50);
  require_error(ErrorKind::kUsage, [&] { (void)resolve_method("quest", model, overrides); }, {"budget is 1125899906842624"});
  CHECK_NOTHROW(resolve_method("swa:window=1024G,sinks=4", model));  // exactly 2^40
}

TEST_CASE("fuzz regression (replay_options, CI run of 0ba7a3a): selector integers are bounded", "[faults]") {
  // magicpig:tables=<huge> made begin() ask for bits x tables x head_dim hyperplanes (an allocation of
  // 5.9e17 bytes under ASan). Integer parameters now stop at 2^31 - 1; magicpig's tables at 1024.
  auto build = [](const std::string& text) {
    for (const auto& spec : expand_selector_specs(parse_selector_list(text))) (void)make_selector(spec, SelectorDefaults{});
  };
  require_error(ErrorKind::kUsage, [&] { build("magicpig:tables=4611686018427387904"); },
                {"selector magicpig: tables=4611686018427387904 (expected an integer in [1, 1024])"});
  require_error(ErrorKind::kUsage, [&] { build("magicpig:tables=8,collisions=9"); },
                {"selector magicpig: collisions=9 (expected an integer in [1, 8])"});
  require_error(ErrorKind::kUsage, [&] { build("magicpig:bits=31"); }, {"bits=31 (expected an integer in [1, 30])"});
  require_error(ErrorKind::kUsage, [&] { build("oracle:window=2147483648"); },
                {"selector oracle: window=2147483648 (expected an integer in [0, 2147483647])"});
  require_error(ErrorKind::kUsage, [&] { build("reuse:layers=2+2147483648"); }, {"selector reuse: layers=2+2147483648"});
  CHECK_NOTHROW(build("magicpig:tables=1024,collisions=1024,bits=30,oracle:window=2147483647"));
  CHECK_NOTHROW(build("magicpig:tables=1"));  // the default of 2 collisions follows a single table down
}

TEST_CASE("memory: a replay with room for one layer reads each when needed and gives the same numbers", "[faults]") {
  // With room for two layers the next one is read while the current one runs; with room for one (and
  // the replay's other needs) it is read when needed, into memory the finished layer gave back.
  SynthOptions options;
  options.num_layers = 4;
  options.num_q_heads = 4;
  options.num_kv_heads = 2;
  options.head_dim = 128;  // layers large beside the replay's per-row metrics
  options.seq_len = 300;
  const Capture capture = generate_synthetic_capture(options);
  ReplayOptions replay = test::replay_options("oracle,swa,hysparse,quest", test::tokens({64, 128}));
  const ReplayResult roomy = test::replay_capture(capture, "faults_one_layer_room", replay);
  const std::string path = std::string(HYSPARSE_TEST_DATA_DIR) + "/faults_one_layer_room.h5";
  const std::uint64_t layer = CaptureReader::open(path).layer_bytes(0, true);
  ScopedEnv limit("HYSPARSE_MEMORY_LIMIT", std::to_string(2 * layer - 1).c_str());
  const auto backend = make_cpu_backend();
  const ReplayResult tight = run_replay(path, replay, *backend, false);
  REQUIRE(tight.selectors.size() == roomy.selectors.size());
  for (std::size_t s = 0; s < roomy.selectors.size(); ++s) {
    CAPTURE(roomy.selectors[s].label);
    CHECK(tight.selectors[s].layer_mean[kMassRecall].values == roomy.selectors[s].layer_mean[kMassRecall].values);
    CHECK(tight.selectors[s].head_mean[kRecallVsOracle].values == roomy.selectors[s].head_mean[kRecallVsOracle].values);
  }
}

TEST_CASE("sanitizer regression (determinism_tests): snapkv whose observation window covers the prompt", "[faults]") {
  // Every row queried: the prompt is the first half (32 tokens), all of it inside snapkv's 32-token
  // observation window, so the ranked prefix is empty. Indexing the empty ranking was undefined
  // behaviour (UBSan in the sanitized build: reference binding to null pointer, snapkv.cpp).
  SynthOptions options;
  options.num_layers = 1;
  options.num_q_heads = 2;
  options.num_kv_heads = 1;
  options.head_dim = 8;
  options.seq_len = 64;
  const Capture capture = generate_synthetic_capture(options);
  const ReplayResult result =
      test::replay_capture(capture, "faults_snapkv_empty_prefix", test::replay_options("snapkv", test::tokens({16})));
  REQUIRE(result.selectors.size() == 1);
  CHECK(result.rows.size() == 64);
}
