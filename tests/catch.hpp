#pragma once
// One include for Catch2 2.13 (Debian 12) and 3.x (Ubuntu 24.04, the GPU machine).
#if defined(HYSPARSE_CATCH2_V3)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_session.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif

#include <cstdint>

namespace hysparse::test {
// The seed every randomised test derives its inputs from: printed at start,
// overridable with HYSPARSE_TEST_SEED=N.
std::uint64_t seed();
}  // namespace hysparse::test
