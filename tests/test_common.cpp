#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>

#include "catch.hpp"
#include "common/digest_cache.hpp"
#include "common/error.hpp"
#include "common/half.hpp"
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
