// Test runner: prints the seed so any failure can be replayed with HYSPARSE_TEST_SEED.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <cstdlib>
#include <string>

#include "catch.hpp"
#include "io/h5.hpp"

namespace hysparse::test {
namespace {
std::uint64_t g_seed = 20261128;
}
std::uint64_t seed() { return g_seed; }
}  // namespace hysparse::test

int main(int argc, char** argv) {
  if (const char* text = std::getenv("HYSPARSE_TEST_SEED")) hysparse::test::g_seed = std::stoull(text);
  // On stderr: test discovery reads test names from stdout.
  std::fprintf(stderr, "hysparse tests: seed %llu (set HYSPARSE_TEST_SEED to override)\n",
              static_cast<unsigned long long>(hysparse::test::g_seed));
  hysparse::h5::silence_hdf5_errors();
  return Catch::Session().run(argc, argv);
}
