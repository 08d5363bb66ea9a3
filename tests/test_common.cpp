#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "common/digest_cache.hpp"
#include "common/error.hpp"
#include "common/half.hpp"
#include "common/portable_exp.hpp"
#include "common/random.hpp"
#include "common/sha256.hpp"

using namespace hysparse;

TEST_CASE("sha256 matches the FIPS 180-4 test vectors", "[common]") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// Where the CPU has SHA extensions this compares them with the portable code; everywhere it
// compares whole blocks hashed straight from the input with bytes fed through the buffer.
TEST_CASE("sha256 with the CPU's SHA extensions equals the portable code", "[common]") {
  if (!sha256_hardware_available()) WARN("this CPU has no SHA extensions: portable code on both sides");
  Rng g(test::seed());
  std::string bytes(1 << 16, '\0');
  for (char& c : bytes) c = static_cast<char>(g.next() & 0xFF);
  // Every length around the block and padding boundaries, then long inputs fed in uneven pieces.
  for (std::size_t length = 0; length <= 300; ++length) {
    Sha256 hardware(true), portable(false);
    hardware.update(bytes.data(), length);
    for (std::size_t i = 0; i < length; ++i) portable.update(bytes.data() + i, 1);
    REQUIRE(hardware.hex_digest() == portable.hex_digest());
  }
  for (int trial = 0; trial < 20; ++trial) {
    Sha256 hardware(true), portable(false);
    std::size_t at = 0;
    while (at < bytes.size()) {
      const std::size_t piece = std::min<std::size_t>(bytes.size() - at, g.next() % 5000);
      hardware.update(bytes.data() + at, piece);
      portable.update(bytes.data() + at, piece);
      at += piece;
    }
    REQUIRE(hardware.hex_digest() == portable.hex_digest());
  }
}

TEST_CASE("float16 conversion is exact on representable values and rounds to nearest even", "[common]") {
  for (float v : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.9604644775390625e-08f, 0.333251953125f}) {
    CHECK(half_to_float(float_to_half(v)) == v);
  }
  CHECK(std::isinf(half_to_float(float_to_half(65520.0f))));
  CHECK(half_to_float(float_to_half(65519.0f)) == 65504.0f);
  CHECK(std::isnan(half_to_float(float_to_half(std::numeric_limits<float>::quiet_NaN()))));
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties go to the even mantissa (1).
  CHECK(half_to_float(float_to_half(1.0f + 0.00048828125f)) == 1.0f);
  CHECK(half_to_float(float_to_half(1.0f + 3 * 0.00048828125f)) == 1.0f + 4 * 0.00048828125f);
  // Exhaustive round trip of every finite half value.
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = half_to_float(static_cast<std::uint16_t>(bits));
    if (std::isnan(f)) continue;
    REQUIRE(float_to_half(f) == static_cast<std::uint16_t>(bits));
  }
}

TEST_CASE("bfloat16 conversion rounds to nearest even", "[common]") {
  CHECK(bfloat16_to_float(float_to_bfloat16(1.0f)) == 1.0f);
  CHECK(bfloat16_to_float(float_to_bfloat16(-3.0f)) == -3.0f);
  CHECK(bfloat16_to_float(float_to_bfloat16(1.0f + 1.0f / 256)) == 1.0f);            // tie -> even
  CHECK(bfloat16_to_float(float_to_bfloat16(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);  // tie -> even
  CHECK(std::isnan(bfloat16_to_float(float_to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("the random generator is deterministic and roughly normal", "[common]") {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 100; ++i) REQUIRE(a.next() == b.next());
  CHECK(Rng(42).next() != c.next());
  Rng g(test::seed());
  double sum = 0, sum2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = g.normal();
    sum += x;
    sum2 += x * x;
  }
  CHECK(std::abs(sum / n) < 0.02);
  CHECK(std::abs(sum2 / n - 1.0) < 0.02);
}

namespace {

// Measured worst case 0.87 ulp (2e7 inputs); exp itself is within 0.51 of the long double value.
constexpr double kPortableExpUlps = 1.0;

// |value - exact| in units of the last place of the double nearest to exact.
double ulps_from(double value, long double exact) {
  const double nearest = static_cast<double>(exact);
  const double spacing = std::nextafter(std::fabs(nearest), std::numeric_limits<double>::infinity()) - std::fabs(nearest);
  return static_cast<double>(std::fabs(static_cast<long double>(value) - exact) / spacing);
}

// A call the compiler does not vectorise or fold, to set against a loop it does vectorise.
__attribute__((noinline)) double portable_exp_scalar(double x) { return portable_exp(x); }

}  // namespace

TEST_CASE("portable_exp is within one ulp of exp, exact at its limits, and the same bits vectorised", "[common]") {
  // Long double carries 11 more bits than double here (x86); elsewhere compare with exp at 1.5 ulp more.
  constexpr bool kExtended = std::numeric_limits<long double>::digits > std::numeric_limits<double>::digits + 8;
  const double tolerance = kExtended ? kPortableExpUlps : kPortableExpUlps + 1.5;
  Rng g(test::seed());
  std::vector<double> xs;
  // The whole finite range, the range block masses take (x <= 0, most within 40 of 0), the subnormal
  // results, and around the halfway points of the argument reduction (x near (k + 1/2) ln 2).
  for (int i = 0; i < 200000; ++i) xs.push_back(-745.0 + 1454.7 * g.uniform());
  for (int i = 0; i < 200000; ++i) xs.push_back(-40.0 * g.uniform());
  for (int i = 0; i < 20000; ++i) xs.push_back(-745.1 + 37.0 * g.uniform());
  for (int k = -1070; k <= 1020; ++k) {
    const double half = (k + 0.5) * 0.6931471805599453;
    for (double d : {-1e-12, 0.0, 1e-12}) xs.push_back(half + d);
  }
  double worst = 0.0, worst_at = 0.0;
  for (double x : xs) {
    const long double exact = kExtended ? expl(static_cast<long double>(x)) : std::exp(x);
    const double error = ulps_from(portable_exp(x), exact);
    if (error > worst) worst = error, worst_at = x;
  }
  INFO("worst " << worst << " ulp at x = " << worst_at << " over " << xs.size() << " inputs");
  CHECK(worst <= tolerance);

  const double inf = std::numeric_limits<double>::infinity();
  CHECK(portable_exp(-inf) == 0.0);
  CHECK(portable_exp(inf) == inf);
  CHECK(std::isnan(portable_exp(std::numeric_limits<double>::quiet_NaN())));
  CHECK(portable_exp(0.0) == 1.0);
  CHECK(portable_exp(-0.0) == 1.0);
  CHECK(portable_exp(-746.0) == 0.0);
  CHECK(portable_exp(-745.0) == std::numeric_limits<double>::denorm_min());
  CHECK(portable_exp(709.78) == std::exp(709.78));
  CHECK(portable_exp(709.8) == inf);
  CHECK(portable_exp(1e300) == inf);
  CHECK(portable_exp(-1e300) == 0.0);

  // The engine's loops are vectorised by the compiler: the same bits as one call at a time.
  std::vector<double> vectorised(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) vectorised[i] = portable_exp(xs[i]);
  std::size_t differing = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double scalar = portable_exp_scalar(xs[i]);
    if (std::memcmp(&scalar, &vectorised[i], sizeof scalar) != 0) ++differing;
  }
  CHECK(differing == 0);
}

TEST_CASE("portable_exp's scaling by 2^k is exact: the integer construction's bits for every exponent", "[common]") {
  // portable_exp scales by 2^half * 2^(k - half), half = k / 2 rounded toward zero, for the integers k that
  // rint(clamped x log2 e) takes. Its powers of two come from double arithmetic and a shift (vectorisable
  // with AVX2); every step is exact, so they must be the bits of the plain integer construction (a double to
  // int64 conversion, what the host did before and any device does alike), for every k.
  std::int64_t checked = 0;
  for (std::int64_t k = -1076; k <= 1025; ++k) {
    const double half = std::trunc(static_cast<double>(k) * 0.5);
    REQUIRE(half == static_cast<double>(k / 2));
    for (const std::int64_t e : {k / 2, k - k / 2}) {
      const std::uint64_t expected = static_cast<std::uint64_t>(e + 1023) << 52;
      const double value = portable_exp_detail::power_of_two(static_cast<double>(e));
      std::uint64_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      CAPTURE(k, e);
      REQUIRE(bits == expected);
      ++checked;
    }
  }
  CHECK(checked == 2 * 2102);
}

namespace {

// HYSPARSE_SHA256_CACHE for one test, restored afterwards.
class CacheDirectory {
 public:
  explicit CacheDirectory(const std::string& value) {
    if (const char* old = std::getenv("HYSPARSE_SHA256_CACHE")) saved_ = old, had_ = true;
    setenv("HYSPARSE_SHA256_CACHE", value.c_str(), 1);
  }
  ~CacheDirectory() {
    if (had_) setenv("HYSPARSE_SHA256_CACHE", saved_.c_str(), 1);
    else unsetenv("HYSPARSE_SHA256_CACHE");
  }

 private:
  std::string saved_;
  bool had_ = false;
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

}  // namespace

TEST_CASE("input digests are reused only while the file is unchanged", "[common]") {
  const std::string dir = std::string(HYSPARSE_TEST_DATA_DIR) + "/digest_cache";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/files");
  const CacheDirectory cache(dir + "/cache");
  const std::string path = dir + "/files/input.bin";
  const auto settle = std::chrono::duration<double>(kDigestCacheSettleSeconds + 0.1);
  const bool covered = digest_cache_covers(dir);
  if (!covered) WARN("the test directory's filesystem is not one the digest cache trusts: only 'never from the cache' is checked");
  // Writes the file and hashes it at once: recorded only if the hash started within the settle time
  // of the write (a slow machine may take longer; then that part is not checked).
  auto write_and_hash = [&](const std::string& bytes) {
    write_file(path, bytes);
    const auto written = std::chrono::steady_clock::now();
    const FileDigest d = sha256_of_file_cached(path);
    const bool prompt = std::chrono::steady_clock::now() - written < std::chrono::duration<double>(kDigestCacheSettleSeconds);
    CHECK_FALSE(d.from_cache);
    CHECK(d.sha256 == sha256_of_file(path));
    if (prompt) CHECK_FALSE(sha256_of_file_cached(path).from_cache);  // fresh: never recorded
    return d;
  };

  const FileDigest first = write_and_hash(std::string(100000, 'x'));
  std::this_thread::sleep_for(settle);
  sha256_of_file_cached(path);  // settled: hashed and recorded
  const FileDigest again = sha256_of_file_cached(path);
  CHECK(again.from_cache == covered);
  CHECK(again.sha256 == first.sha256);

  // Same size, other bytes: the times move, the digest is computed afresh.
  const FileDigest rewritten = write_and_hash(std::string(100000, 'y'));
  CHECK(rewritten.sha256 != first.sha256);

  // A corrupt entry only costs a hash.
  std::this_thread::sleep_for(settle);
  sha256_of_file_cached(path);
  CHECK(sha256_of_file_cached(path).from_cache == covered);
  if (std::filesystem::exists(dir + "/cache")) {
    for (const auto& entry : std::filesystem::directory_iterator(dir + "/cache")) {
      write_file(entry.path().string(), "hysparse-sha256-v1 100000 0 0 0 0 " + std::string(64, 'a') + "\n");
    }
  }
  const FileDigest after_corruption = sha256_of_file_cached(path);
  CHECK_FALSE(after_corruption.from_cache);
  CHECK(after_corruption.sha256 == rewritten.sha256);
}

TEST_CASE("the digest cache can be turned off, and an unusable one changes no digest", "[common]") {
  const std::string dir = std::string(HYSPARSE_TEST_DATA_DIR) + "/digest_cache_off";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/input.bin";
  write_file(path, "abc");
  std::this_thread::sleep_for(std::chrono::duration<double>(kDigestCacheSettleSeconds + 0.1));
  const std::string abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
  {
    const CacheDirectory off("off");
    CHECK(digest_cache_directory().empty());
    for (int i = 0; i < 2; ++i) {
      const FileDigest d = sha256_of_file_cached(path);
      CHECK_FALSE(d.from_cache);
      CHECK(d.sha256 == abc);
    }
  }
  {
    // The cache "directory" is a regular file: nothing can be recorded, every digest is computed.
    write_file(dir + "/not_a_directory", "");
    const CacheDirectory unusable(dir + "/not_a_directory");
    for (int i = 0; i < 2; ++i) {
      const FileDigest d = sha256_of_file_cached(path);
      CHECK_FALSE(d.from_cache);
      CHECK(d.sha256 == abc);
    }
  }
  CHECK_THROWS_AS(sha256_of_file_cached(dir + "/missing.bin"), Error);
  // Which filesystems are trusted: procfs never, tmpfs (/dev/shm on Linux) always.
  CHECK_FALSE(digest_cache_covers("/proc"));
  if (std::filesystem::is_directory("/dev/shm")) CHECK(digest_cache_covers("/dev/shm"));
}
