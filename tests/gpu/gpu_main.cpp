// GPU test runner: reports SKIPPED (exit 77, CTest's skip code) when no CUDA device is usable,
// so a machine without a GPU never counts these tests as passed.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <cstdlib>
#include <string>

#include "backend/backend.hpp"
#include "catch.hpp"
#include "io/h5.hpp"

namespace hysparse::test {
namespace {
std::uint64_t g_seed = 20261128;
}
std::uint64_t seed() { return g_seed; }
}  // namespace hysparse::test

int main(int argc, char** argv) {
  const hysparse::CudaStatus status = hysparse::cuda_status();
  if (status.devices.empty()) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", status.why_none.c_str());
    return 77;
  }
  for (const auto& device : status.devices) std::printf("GPU: %s\n", device.c_str());
  if (const char* text = std::getenv("HYSPARSE_TEST_SEED")) hysparse::test::g_seed = std::stoull(text);
  std::printf("hysparse GPU tests: seed %llu (set HYSPARSE_TEST_SEED to override)\n",
              static_cast<unsigned long long>(hysparse::test::g_seed));
  hysparse::h5::silence_hdf5_errors();
  return Catch::Session().run(argc, argv);
}
