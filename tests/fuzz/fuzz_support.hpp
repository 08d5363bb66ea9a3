#pragma once
// Shared by the fuzz targets: what counts as a finding, and where scratch files go.
//
// A target may end in a hysparse::Error of the kinds its input can cause (bad input, bad option,
// not enough memory). Anything else is a finding and aborts, so libFuzzer keeps the input:
// an Error of another kind (kInternal is a bug by definition), a message that is not one line or
// does not name the file it is about, any other exception, and every crash, leak or undefined
// behaviour the sanitizers see.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <new>
#include <string>

#include "common/error.hpp"

namespace hysparse::fuzz {

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "\nFUZZ FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Runs `action`; returns normally when it succeeds or fails with an allowed, well-formed Error.
// `must_name`: when not empty, a kInput message must contain it (the file the error is about).
template <typename Action>
void expect_clean(Action&& action, std::initializer_list<ErrorKind> allowed, const std::string& must_name = "") {
  try {
    action();
  } catch (const Error& e) {
    bool ok = false;
    for (ErrorKind kind : allowed) ok = ok || kind == e.kind();
    const std::string message = e.what();
    if (!ok) finding(std::string("unexpected ") + to_string(e.kind()) + ": " + message);
    if (message.find('\n') != std::string::npos) finding("message of several lines: " + message);
    if (message.empty()) finding("empty error message");
    if (!must_name.empty() && e.kind() == ErrorKind::kInput && message.find(must_name) == std::string::npos) {
      finding("input error that does not name " + must_name + ": " + message);
    }
  } catch (const std::bad_alloc&) {
    finding("std::bad_alloc: an allocation that scales with the input was not checked by require_memory");
  } catch (const std::exception& e) {
    finding(std::string("exception that is not a hysparse::Error: ") + e.what());
  }
}

// A scratch file of this process (every execution rewrites it): in $HYSPARSE_FUZZ_SCRATCH when set
// (scripts/run_fuzz.sh makes one and removes it), else on tmpfs when there is one, else in $TMPDIR.
inline std::string scratch_path(const char* name) {
  std::string directory;
  if (const char* scratch = std::getenv("HYSPARSE_FUZZ_SCRATCH"); scratch != nullptr && *scratch != '\0') directory = scratch;
  else if (access("/dev/shm", W_OK) == 0) directory = "/dev/shm";
  else directory = std::getenv("TMPDIR") != nullptr ? std::getenv("TMPDIR") : "/tmp";
  return directory + "/hysparse-fuzz-" + std::to_string(getpid()) + "-" + name;
}

// Work that scales with the input is refused past this budget (Error kResource, an allowed outcome),
// well below libFuzzer's own RSS limit (2 GiB), so a missing check shows up as a bad_alloc or an
// out-of-memory finding instead of passing unnoticed.
inline void limit_memory_budget() { setenv("HYSPARSE_MEMORY_LIMIT", "256M", 1); }

}  // namespace hysparse::fuzz
