// The Hugging Face config.json reader: the input is the file's text. It is parsed as JSON, turned
// into a KV model (kv_model_from_hf_json, the reader behind `hysparse kv --config`), and the model is
// priced with its default methods at one context, so the model's validation and arithmetic run too.
// The corpus (tests/fuzz/corpus/hf_config) holds small synthetic configs of every supported family.
//
// Allowed outcomes: success, Error(kInput) naming the file, Error(kUsage) from the pricing options,
// Error(kResource). Everything else is a finding.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_support.hpp"
#include "kv/hf_config.hpp"
#include "kv/kv.hpp"

using hysparse::ErrorKind;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  hysparse::fuzz::limit_memory_budget();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string where = "fuzz/config.json";
  nlohmann::json config = nlohmann::json::parse(data, data + size, nullptr, false);
  if (config.is_discarded()) return 0;  // not JSON: the CLI reports the parser's message (tested in CLI tests)
  hysparse::fuzz::expect_clean(
      [&] {
        const hysparse::KvModel model = hysparse::kv_model_from_hf_json(config, where);
        hysparse::KvOverrides overrides;
        overrides.schedule = "1:3";
        for (const auto& spec : hysparse::default_method_specs(model, overrides)) {
          const hysparse::KvMethod method = hysparse::resolve_method(spec, model, overrides);
          (void)hysparse::account(model, method, hysparse::KvDtype::kBf16, 1, 16384);
        }
      },
      {ErrorKind::kInput, ErrorKind::kUsage, ErrorKind::kResource}, where);
  return 0;
}
