#include "cli/commands.hpp"
namespace hysparse::cli {
void add_replay_command(CLI::App&) {}
}  // namespace hysparse::cli
