#include "cli/commands.hpp"
namespace hysparse::cli {
void add_kv_command(CLI::App&) {}
}  // namespace hysparse::cli
