// hysparse: sparse-attention replay and analysis. Errors end in one line on
// stderr and an exit code per class (see ErrorKind).
#include <cstdio>
#include <new>

#include "cli/commands.hpp"
#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "common/provenance.hpp"
#include "io/h5.hpp"

int main(int argc, char** argv) {
  using namespace hysparse;
  set_command_line(argc, argv);
  install_interrupt_handlers();
  h5::silence_hdf5_errors();

  CLI::App app{"hysparse: how much attention mass sparse-attention selections keep, from captured Q/K/V"};
  app.set_version_flag("--version", std::string("hysparse ") + tool_version() + " (git " + git_sha() + ")");
  app.require_subcommand(1);
  cli::add_synth_command(app);
  cli::add_inspect_command(app);
  cli::add_info_command(app);
  cli::add_replay_command(app);
  cli::add_kv_command(app);
  cli::add_list_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "hysparse: usage error: %s\n", e.what());
    std::fprintf(stderr, "Run 'hysparse --help' (or 'hysparse COMMAND --help') for the options.\n");
    return exit_code(ErrorKind::kUsage);
  } catch (const Error& e) {
    std::fprintf(stderr, "hysparse: %s: %s\n", to_string(e.kind()), e.what());
    return exit_code(e.kind());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "hysparse: resource error: out of memory\n");
    return exit_code(ErrorKind::kResource);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hysparse: internal error: %s\n", e.what());
    return exit_code(ErrorKind::kInternal);
  }
  return 0;
}
