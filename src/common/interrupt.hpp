#pragma once
// SIGINT/SIGTERM set a flag; long loops call check_interrupted() so the stack
// unwinds and temporary outputs are removed instead of left half-written.
namespace hysparse {

void install_interrupt_handlers();
bool interrupted();
void check_interrupted();  // throws Error(kInterrupted)

}  // namespace hysparse
