#pragma once
// SHA-256 (FIPS 180-4) of files, for report provenance.
#include <cstddef>
#include <cstdint>
#include <string>

namespace hysparse {

// Whether this CPU has the SHA extensions that Sha256 uses when allowed (x86-64 SHA-NI).
bool sha256_hardware_available();

class Sha256 {
 public:
  // allow_hardware = false keeps to the portable code (tests compare the two).
  explicit Sha256(bool allow_hardware = true);
  void update(const void* data, std::size_t size);
  std::string hex_digest();  // finalises; call once

 private:
  void compress_blocks(const std::uint8_t* data, std::size_t blocks);
  void compress(const std::uint8_t* block);  // portable
  bool hardware_ = false;
  std::uint32_t state_[8];
  std::uint8_t buffer_[64];
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
};

std::string sha256_hex(const std::string& bytes);
std::string sha256_of_file(const std::string& path);  // throws Error(kInput) when unreadable

}  // namespace hysparse
