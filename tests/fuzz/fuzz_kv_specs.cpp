// `hysparse kv`'s text parsers on one fuzzed string each run: layer schedules (for several model
// depths), context lists, KV dtypes, layer types, and method lists (split, every method resolved for
// two models, with and without a --schedule, then accounted at two contexts so the overflow checks of
// the byte arithmetic run too). The corpus (tests/fuzz/corpus/kv_specs) holds plain-text specs.
//
// Allowed outcomes: success, Error(kUsage) (bad option), Error(kInput) (a layer type is named as
// input), Error(kResource) (work sized by the option). Everything else is a finding.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "kv/kv.hpp"
#include "kv/presets.hpp"
#include "kv/schedule.hpp"

using hysparse::ErrorKind;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  hysparse::fuzz::limit_memory_budget();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  static const hysparse::KvModel models[] = {hysparse::find_kv_preset("hysparse-80b-a3b"),
                                             hysparse::find_kv_preset("llama-3.1-8b"),
                                             hysparse::find_kv_preset("deepseek-v3")};
  for (std::int64_t layers : {1, 4, 36, 49, 1000}) {
    hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_schedule(text, layers); }, {ErrorKind::kUsage});
  }
  hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_contexts(text); }, {ErrorKind::kUsage});
  hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_kv_dtype(text); }, {ErrorKind::kUsage});
  hysparse::fuzz::expect_clean([&] { (void)hysparse::parse_layer_type(text, "fuzz"); }, {ErrorKind::kInput, ErrorKind::kUsage});
  for (const auto& model : models) {
    for (const char* schedule : {"", "1:3"}) {
      hysparse::KvOverrides overrides;
      overrides.schedule = schedule;
      hysparse::fuzz::expect_clean(
          [&] {
            for (const auto& spec : hysparse::split_method_list(text, model, overrides)) {
              const hysparse::KvMethod method = hysparse::resolve_method(spec, model, overrides);
              (void)method.describe();
              for (std::uint64_t context : {std::uint64_t{4096}, std::uint64_t{1} << 40}) {
                (void)hysparse::account(model, method, hysparse::KvDtype::kBf16, 2, context);
              }
            }
          },
          {ErrorKind::kUsage, ErrorKind::kResource});
    }
  }
  return 0;
}
