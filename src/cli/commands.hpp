#pragma once
// Each subcommand lives in its own cmd_<name>.cpp and registers itself here.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace hysparse::cli {

void add_synth_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_info_command(CLI::App& app);
void add_replay_command(CLI::App& app);
void add_kv_command(CLI::App& app);
void add_list_command(CLI::App& app);
void add_sweep_command(CLI::App& app);

}  // namespace hysparse::cli
