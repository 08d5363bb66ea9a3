#include "common/interrupt.hpp"

#include <atomic>
#include <csignal>

#include "common/error.hpp"

namespace hysparse {
namespace {
// Written by the handler, read by every worker thread: a lock-free atomic is both signal-safe and
// free of data races (a volatile sig_atomic_t is only the former).
std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free flag");
extern "C" void on_signal(int signal_number) { g_signal.store(signal_number, std::memory_order_relaxed); }
}  // namespace

void install_interrupt_handlers() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

bool interrupted() { return g_signal.load(std::memory_order_relaxed) != 0; }

void check_interrupted() {
  const int signal_number = g_signal.load(std::memory_order_relaxed);
  if (signal_number != 0) fail(ErrorKind::kInterrupted, "interrupted by signal {}; no output was written", signal_number);
}

}  // namespace hysparse
