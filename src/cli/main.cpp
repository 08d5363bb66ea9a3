// hysparse: sparse-attention replay and analysis. Errors end in one line on
// stderr and an exit code per class (see ErrorKind).
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <system_error>

#include "cli/commands.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "common/provenance.hpp"
#include "io/h5.hpp"

namespace {

// Text on stdout is output too: a full disk or a closed pipe there is an output error, not a silent success.
// Returns errno of the failure, 0 when stdout is fine.
int stdout_write_error() {
  errno = 0;
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) return errno != 0 ? errno : EIO;
  return 0;
}

// The exit path of every error, after the stack has unwound (temporary outputs removed). When a write or
// close failed (a full disk), libhdf5 1.10 keeps the half-closed file and its exit handler crashes on it
// (SIGSEGV in H5F__close_cb); nothing of ours is left to flush, so exit without running that handler.
int finish_with_error(int code) {
  if (hysparse::h5::open_hdf5_objects() > 0) {
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(code);
  }
  return code;
}

int report_stdout_failure(int error_number) {
  std::fprintf(stderr, "hysparse: %s: standard output: cannot write (%s)\n", hysparse::to_string(hysparse::ErrorKind::kOutput),
               std::strerror(error_number));
  return hysparse::exit_code(hysparse::ErrorKind::kOutput);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace hysparse;
  set_command_line(argc, argv);
  install_interrupt_handlers();
  // Past a file-size limit (ulimit -f) the kernel sends SIGXFSZ, which would kill us mid-write and leave the
  // temporary file behind; ignored, the write fails with EFBIG and becomes an output error like a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  // Every input file is checked again before an output is committed: one rewritten while it was read
  // would otherwise give a report that matches neither version.
  enable_input_watch();
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
  cli::add_sweep_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "hysparse: usage error: %s\n", one_line(e.what()).c_str());
    std::fprintf(stderr, "Run 'hysparse --help' (or 'hysparse COMMAND --help') for the options.\n");
    return exit_code(ErrorKind::kUsage);
  } catch (const Error& e) {
    std::fprintf(stderr, "hysparse: %s: %s\n", to_string(e.kind()), e.what());
    return finish_with_error(exit_code(e.kind()));
  } catch (const std::bad_alloc&) {
    // Sizes that scale with the input are checked by require_memory before allocating; this is the
    // allocation that still did not fit (other processes took the memory meanwhile, or a limit we cannot see).
    std::fprintf(stderr, "hysparse: %s: out of memory: an allocation failed; nothing was written (free memory, or "
                 "lower the sequence length, layers or query rows)\n", to_string(ErrorKind::kResource));
    return finish_with_error(exit_code(ErrorKind::kResource));
  } catch (const std::system_error& e) {
    // fmt::print throws this when stdout cannot take the text (a full disk behind a redirection).
    if (std::ferror(stdout)) return report_stdout_failure(e.code().value() != 0 ? e.code().value() : EIO);
    std::fprintf(stderr, "hysparse: internal error: %s\n", one_line(e.what()).c_str());
    return finish_with_error(exit_code(ErrorKind::kInternal));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hysparse: internal error: %s\n", one_line(e.what()).c_str());
    return finish_with_error(exit_code(ErrorKind::kInternal));
  }
  if (const int error_number = stdout_write_error(); error_number != 0) return report_stdout_failure(error_number);
  return 0;
}
