#pragma once
// Who made a report, from what, when and how: written to every HDF5 report.
#include <cstdint>
#include <future>
#include <string>
#include <utility>
#include <vector>

#include "common/digest_cache.hpp"
#include "io/h5.hpp"

namespace hysparse {

inline constexpr const char* kDigestComputed = "computed";
inline constexpr const char* kDigestFromCache = "cache";

const char* tool_version();
const char* git_sha();

struct Provenance {
  std::string command_line;           // shell-quoted argv
  std::string created_utc;            // ISO 8601, e.g. 2026-11-28T03:00:00Z
  std::string backend = "cpu";        // cpu | cuda
  std::string device;                 // human description of the device
  std::uint64_t seed = 0;
  int threads = 1;
  std::vector<std::string> input_files;
  std::vector<std::string> input_sha256;
  // Per input: kDigestComputed (hashed by this run) or kDigestFromCache (common/digest_cache.hpp:
  // the file's identity unchanged since this machine hashed it). Missing entries are "computed".
  std::vector<std::string> input_sha256_source;
  // A resumed sweep: every earlier invocation that wrote the report, oldest first, one line each
  // ("created_utc | device | command_line"); empty for a report made in one run.
  std::vector<std::string> earlier_runs;

  void add_input(const std::string& path);  // hashes the file
  // The same, hashing on a thread of its own while the caller works (a capture of tens of
  // gigabytes hashes while it is replayed); finish_inputs() waits and fills input_sha256.
  void add_input_in_background(const std::string& path);
  void finish_inputs();
  bool pending() const { return !pending_sha256_.empty(); }

 private:
  std::vector<std::pair<std::size_t, std::shared_future<FileDigest>>> pending_sha256_;  // (input index, digest)
};

// Fills command_line and created_utc; backend/device/seed/inputs are set by the caller.
Provenance make_provenance(int argc, const char* const* argv);
void set_command_line(int argc, const char* const* argv);  // called once by main()
const std::string& command_line();

std::string utc_now_iso8601();
std::string shell_quote(const std::string& word);

// Root attributes: format, format_version, tool_version, git_sha, command_line,
// created_utc, backend, device, seed, threads, input_files, input_sha256, input_sha256_source, and
// earlier_runs when there were any.
// One line of Provenance::earlier_runs.
std::string provenance_run_line(const std::string& created_utc, const std::string& device, const std::string& command_line);
void write_provenance(const h5::File& file, const std::string& format, std::int64_t format_version,
                      const Provenance& provenance);

}  // namespace hysparse
