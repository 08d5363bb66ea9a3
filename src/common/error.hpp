#pragma once
// One exception type for every user-facing failure. Each kind maps to one
// process exit code, so scripts can tell bad input from a full disk.
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace hysparse {

enum class ErrorKind {
  kInternal = 1,      // a bug: an invariant of ours broke
  kUsage = 2,         // bad command-line option or value
  kInput = 3,         // a malformed or unreadable input file
  kOutput = 4,        // the output cannot be written
  kResource = 5,      // not enough memory for the requested work
  kDevice = 6,        // the requested compute device is unusable
  kInterrupted = 7,   // stopped by SIGINT/SIGTERM
};

int exit_code(ErrorKind kind);
const char* to_string(ErrorKind kind);

// The message with control characters escaped ("\n", "\x1b"): names and values taken from input
// files or the command line cannot break an error into several lines or drive the terminal.
std::string one_line(const std::string& message);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(one_line(message)), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

template <typename... Args>
[[noreturn]] void fail(ErrorKind kind, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(kind, fmt::format(format, std::forward<Args>(args)...));
}

// For malformed inputs: "FILE: DATASET: what is wrong (expected ...)".
template <typename... Args>
[[noreturn]] void fail_input(const std::string& file, const std::string& object,
                             fmt::format_string<Args...> format, Args&&... args) {
  std::string what = fmt::format(format, std::forward<Args>(args)...);
  if (object.empty()) throw Error(ErrorKind::kInput, fmt::format("{}: {}", file, what));
  throw Error(ErrorKind::kInput, fmt::format("{}: {}: {}", file, object, what));
}

}  // namespace hysparse
