#include "common/interrupt.hpp"

#include <csignal>

#include "common/error.hpp"

namespace hysparse {
namespace {
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int signal_number) { g_signal = signal_number; }
}  // namespace

void install_interrupt_handlers() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

bool interrupted() { return g_signal != 0; }

void check_interrupted() {
  if (g_signal != 0) fail(ErrorKind::kInterrupted, "interrupted by signal {}; no output was written", static_cast<int>(g_signal));
}

}  // namespace hysparse
