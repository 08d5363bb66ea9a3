// Bytes-level fuzzing of the capture reader: the input is written to a file as is and opened with
// CaptureReader::open, then every layer, the tokens and the text are read. Seeds are small valid
// captures and damaged copies (tests/fuzz/corpus/capture_raw).
//
// This mostly exercises libhdf5's own parser (Debian's libhdf5 1.10, not instrumented). Crashes inside
// libhdf5 on corrupted files are not ours to fix (see the README, "Fuzzing"); CI therefore runs this
// target over its seed corpus only (scripts/run_fuzz.sh), and a longer mutating run is documented.
#include <cstdint>
#include <cstdio>
#include <string>

#include "capture/capture.hpp"
#include "fuzz_support.hpp"
#include "io/h5.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  hysparse::fuzz::limit_memory_budget();
  hysparse::h5::silence_hdf5_errors();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = hysparse::fuzz::scratch_path("raw.h5");
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (!file) hysparse::fuzz::finding("cannot write the scratch file " + path);
  if (size > 0 && std::fwrite(data, 1, size, file) != size) hysparse::fuzz::finding("short write to " + path);
  std::fclose(file);
  hysparse::fuzz::expect_clean(
      [&] {
        const hysparse::CaptureReader reader = hysparse::CaptureReader::open(path);
        for (std::int64_t i = 0; i < reader.header().num_layers; ++i) (void)reader.read_layer(i, true);
        if (reader.has_tokens()) (void)reader.tokens();
        if (reader.has_text()) (void)reader.text();
      },
      {hysparse::ErrorKind::kInput, hysparse::ErrorKind::kResource}, path);
  std::remove(path.c_str());
  return 0;
}
