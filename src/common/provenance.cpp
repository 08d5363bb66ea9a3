#include "common/provenance.hpp"

#include <ctime>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/sha256.hpp"

namespace hysparse {
namespace build {
extern const char* const kGitSha;  // generated: build_info.cpp
}

namespace {
std::string& stored_command_line() {
  static std::string line;
  return line;
}
}  // namespace

const char* tool_version() { return HYSPARSE_VERSION; }
const char* git_sha() { return build::kGitSha; }

std::string shell_quote(const std::string& word) {
  if (!word.empty() && word.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                              "@%_+=:,./-") == std::string::npos) {
    return word;
  }
  std::string quoted = "'";
  for (char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

void set_command_line(int argc, const char* const* argv) {
  std::string line;
  for (int i = 0; i < argc; ++i) line += (i ? " " : "") + shell_quote(argv[i]);
  stored_command_line() = line;
}

const std::string& command_line() { return stored_command_line(); }

std::string utc_now_iso8601() {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buffer;
}

void Provenance::add_input(const std::string& path) {
  // Watched before hashing and checked after: the hash (and, at commit, the output) then describes
  // the bytes that were actually read.
  watch_input(path);
  input_files.push_back(path);
  input_sha256.push_back(sha256_of_file(path));
  watch_input(path);
}

void Provenance::add_input_in_background(const std::string& path) {
  watch_input(path);
  pending_sha256_.emplace_back(input_sha256.size(), std::async(std::launch::async, [path] {
                                                       std::string digest = sha256_of_file(path);
                                                       watch_input(path);
                                                       return digest;
                                                     }).share());
  input_files.push_back(path);
  input_sha256.emplace_back();  // filled by finish_inputs()
}

void Provenance::finish_inputs() {
  for (const auto& [index, digest] : pending_sha256_) input_sha256[index] = digest.get();
  pending_sha256_.clear();
}

Provenance make_provenance(int argc, const char* const* argv) {
  Provenance p;
  if (argc > 0) set_command_line(argc, argv);
  p.command_line = command_line();
  p.created_utc = utc_now_iso8601();
  return p;
}

void write_provenance(const h5::File& file, const std::string& format, std::int64_t format_version,
                      const Provenance& p) {
  if (p.pending() || p.input_sha256.size() != p.input_files.size()) {
    fail(ErrorKind::kInternal, "provenance: {} inputs, {} digests (finish_inputs() not called)", p.input_files.size(),
         p.input_sha256.size());
  }
  h5::write_attribute(file, "/", "format", format);
  h5::write_attribute(file, "/", "format_version", format_version);
  h5::write_attribute(file, "/", "tool", "hysparse");
  h5::write_attribute(file, "/", "tool_version", tool_version());
  h5::write_attribute(file, "/", "git_sha", git_sha());
  h5::write_attribute(file, "/", "command_line", p.command_line.empty() ? command_line() : p.command_line);
  h5::write_attribute(file, "/", "created_utc", p.created_utc.empty() ? utc_now_iso8601() : p.created_utc);
  h5::write_attribute(file, "/", "backend", p.backend);
  h5::write_attribute(file, "/", "device", p.device);
  h5::write_attribute(file, "/", "seed", static_cast<std::int64_t>(p.seed));
  h5::write_attribute(file, "/", "threads", static_cast<std::int64_t>(p.threads));
  h5::write_attribute(file, "/", "input_files", p.input_files);
  h5::write_attribute(file, "/", "input_sha256", p.input_sha256);
  if (!p.earlier_runs.empty()) h5::write_attribute(file, "/", "earlier_runs", p.earlier_runs);
}

std::string provenance_run_line(const std::string& created_utc, const std::string& device, const std::string& command_line) {
  return created_utc + " | " + device + " | " + command_line;
}

}  // namespace hysparse
