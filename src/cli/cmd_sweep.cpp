#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "backend/backend.hpp"
#include "cli/commands.hpp"

#include <fmt/ranges.h>
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/provenance.hpp"
#include "io/h5.hpp"
#include "sweep/report.hpp"
#include "sweep/sweep.hpp"

namespace hysparse::cli {
namespace {

// auto checkpoints: rewrite the report when the time since the last rewrite is at least this many
// times what that rewrite took (the rewrites then cost at most ~1/ratio of the run).
constexpr double kAutoCheckpointCostRatio = 10.0;

std::vector<std::int64_t> parse_int_list(const std::vector<std::string>& items, const char* option) {
  std::vector<std::int64_t> values;
  // 0 is a value here (no window, no sinks); other counts accept the K suffix.
  for (const auto& item : items) values.push_back(item == "0" ? 0 : parse_token_count(item, option));
  return values;
}

// A sweep killed with SIGKILL while rewriting its report leaves that rewrite's temporary file
// (AtomicOutput names it OUTPUT.tmp-PID); --resume removes those of processes no longer running.
void remove_stale_temporaries(const std::string& output) {
  namespace fs = std::filesystem;
  const fs::path destination(output);
  const fs::path directory = destination.has_parent_path() ? destination.parent_path() : fs::path(".");
  const std::string prefix = destination.filename().string() + ".tmp-";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(directory, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string pid = name.substr(prefix.size());
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (kill(static_cast<pid_t>(std::stoll(pid)), 0) == 0 || errno == EPERM) continue;  // still running
    fs::remove(entry.path(), ec);
  }
}

bool is_partial_sweep_report(const std::string& path) {
  try {
    h5::silence_hdf5_errors();
    if (H5Fis_hdf5(path.c_str()) <= 0) return false;
    const h5::File file = h5::File::open_read(path);
    const bool partial = h5::has_attribute(file, "/", "format") &&
                         h5::read_string_attribute(file, "/", "format") == kSweepFormat &&
                         h5::has_attribute(file, "/sweep", "status") &&
                         h5::read_string_attribute(file, "/sweep", "status") == "partial";
    unwatch_input(path);
    return partial;
  } catch (const Error&) {
    unwatch_input(path);
    return false;  // not a report we can read: a fresh sweep replaces it as any output
  }
}

// Options that set the same thing: a config file's value of one yields to the command line's of another.
const std::vector<std::vector<std::string>> kOptionGroups = {
    {"--budget", "--sparsity"}, {"--device", "--gpus"}, {"CAPTURE", "--captures"}};

// Options from a TOML/INI file (CLI11's reader), for the options the command line did not give.
// CLI11 2.1 reads config files for the top-level app only, so the sweep applies its own.
void apply_config_file(CLI::App& cmd, const std::string& path) {
  std::vector<CLI::ConfigItem> items;
  try {
    items = CLI::ConfigTOML().from_file(path);
  } catch (const CLI::FileError&) {
    fail(ErrorKind::kInput, "--config {}: cannot read the file", path);
  } catch (const CLI::ParseError& e) {
    fail(ErrorKind::kInput, "--config {}: {}", path, e.what());
  }
  for (const auto& item : items) {
    if (item.name == "++" || item.name == "--") continue;  // section markers
    if (!item.parents.empty()) {
      fail(ErrorKind::kUsage, "--config {}: '{}' is inside a section (expected top-level keys)", path, item.fullname());
    }
    CLI::Option* option = cmd.get_option_no_throw("--" + item.name);
    if (option == nullptr || item.name == "config" || item.name == "resume" || item.name == "output") {
      fail(ErrorKind::kUsage, "--config {}: unknown or not configurable key '{}'", path, item.name);
    }
    if (option->count() > 0) continue;  // the command line wins
    // ... also over the file's value of an option that excludes or merges with one it gave.
    bool overridden = false;
    for (const auto& group : kOptionGroups) {
      if (std::find(group.begin(), group.end(), "--" + item.name) == group.end()) continue;
      for (const auto& other : group) overridden = overridden || cmd.get_option(other)->count() > 0;
    }
    if (overridden) continue;
    try {
      option->add_result(item.inputs);
      option->run_callback();
    } catch (const CLI::ParseError& e) {
      fail(ErrorKind::kUsage, "--config {}: {}: {}", path, item.name, e.what());
    }
  }
}

}  // namespace

void add_sweep_command(CLI::App& app) {
  struct State {
    std::vector<std::string> captures, named_captures, blocks, windows, sinks, schedules, groups;
    std::string output, budgets, sparsity, selectors, queries, device, gpus, precision, from_report, config_file;
    std::uint64_t seed = 0;
    std::int64_t tile_rows = 0;
    std::string checkpoint_every = "auto";
    int threads = 0;
    bool resume = false, quiet = false, no_output_error = false;
  };
  auto st = std::make_shared<State>();
  CLI::App* cmd = app.add_subcommand(
      "sweep", "Sweep selectors x budgets x blocks x windows x sinks x schedules x groups over captures: one run, one HDF5");
  // The positional's name differs from --captures: CLI11 2.4 refuses a positional and an option of one name.
  cmd->add_option("CAPTURE", st->captures, "Capture files (format v1); results per capture and pooled");
  // The same list by name, so that a config file can give it (captures = ["a.h5", "b.h5"]).
  cmd->add_option("--captures", st->named_captures, "Capture files, comma-separated (as the positional arguments)")
      ->delimiter(',');
  cmd->add_option("-o,--output", st->output, "HDF5 sweep report (rewritten atomically after every layer)")->required();
  auto* budget = cmd->add_option("--budget", st->budgets, "Budgets in tokens, comma-separated (4K accepted); default 256,512,1024,2048");
  auto* sparsity = cmd->add_option("--sparsity", st->sparsity, "Budgets as sparsity ratios, e.g. 0.5,0.8,0.9,0.95");
  budget->excludes(sparsity);
  cmd->add_option("--selectors", st->selectors,
                  "Selector specs (name:key=value), comma-separated, or all; default oracle,swa,hysparse");
  cmd->add_option("--block", st->blocks, "Block sizes to sweep, e.g. 32,64,128 (each selector with a block parameter)")
      ->delimiter(',');
  cmd->add_option("--window", st->windows, "Forced windows to sweep, e.g. 0,128,512 (selectors with a window; not swa)")
      ->delimiter(',');
  cmd->add_option("--sinks", st->sinks, "Forced sink tokens to sweep, e.g. 0,4")->delimiter(',');
  cmd->add_option("--schedule", st->schedules,
                  "hysparse schedules to sweep; repeat the option (--schedule 1:3 --schedule 1:7 --schedule full=0,4,8)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--group", st->groups, "KV-group aggregations to sweep, e.g. max,sum (selectors with a group parameter)")
      ->delimiter(',');
  cmd->add_option("--queries", st->queries, "Query rows: all, last:N, stride:S, random:N (default all)");
  cmd->add_option("--seed", st->seed, "Seed for random:N query sampling and calibration");
  cmd->add_option("--device", st->device,
                  "cpu, cuda or cuda:N, or a comma-separated list: captures then run in parallel, one per device (default cpu)");
  cmd->add_option("--gpus", st->gpus, "GPU indices, e.g. 0,1: the same as --device cuda:0,cuda:1");
  cmd->add_option("--precision", st->precision, "Score precision on CUDA devices: fp32, bf16 or fp16 (default fp32; cpu: fp32)");
  cmd->add_option("--tile-rows", st->tile_rows, "Query rows per statistics request (0: the backend's choice)");
  cmd->add_flag("--no-output-error", st->no_output_error, "Skip the output-error metric even when v is captured");
  cmd->add_option("--from-report", st->from_report,
                  "Take the configuration from a sweep or replay report; options given here override it");
  cmd->add_flag("--resume", st->resume,
                "Continue the partial sweep in --output (its stored configuration; killed sweeps resume here)");
  cmd->add_option("--checkpoint-every", st->checkpoint_every,
                  "Seconds between report rewrites while running: 0 after every unit (layer); auto (default) after "
                  "every unit unless rewriting costs more than a tenth of the compute since the last one")
      ->capture_default_str();
  cmd->add_option("--threads", st->threads, "OpenMP threads (default: OMP_NUM_THREADS or all cores)");
  cmd->add_flag("-q,--quiet", st->quiet, "No progress on stderr");
  cmd->add_option("--config", st->config_file,
                  "A TOML/INI file of these options, keys as the long names (block = [32, 64], sparsity = \"0.5,0.9\"); "
                  "options on the command line win");

  cmd->callback([st, cmd]() {
    if (!st->config_file.empty()) apply_config_file(*cmd, st->config_file);
    if (st->threads < 0) fail(ErrorKind::kUsage, "--threads {}: expected a positive count", st->threads);
    if (st->threads > 0) omp_set_num_threads(st->threads);
    auto given = [&](const char* name) { return cmd->get_option(name)->count() > 0; };
    auto apply_devices = [&](SweepConfig& c) {
      if (given("--gpus") && given("--device")) fail(ErrorKind::kUsage, "--gpus and --device: give one of them");
      std::vector<std::string> devices;
      if (given("--gpus")) {
        devices = split_device_list(gpu_device_list(st->gpus));
      } else if (given("--device")) {
        devices = split_device_list(st->device);
      } else {
        return;
      }
      c.devices = devices;
      c.device = devices.front();
    };

    SweepConfig config;
    SweepState state;
    std::vector<std::string> recorded_sha256, earlier_runs;
    if (st->resume) {
      for (const char* name : {"CAPTURE", "--captures", "--budget", "--sparsity", "--selectors", "--block", "--window",
                               "--sinks", "--schedule", "--group", "--queries", "--seed", "--tile-rows", "--no-output-error",
                               "--from-report", "--precision"}) {
        if (given(name)) fail(ErrorKind::kUsage, "--resume takes the configuration from {}; drop {}", st->output, name);
      }
      if (!std::filesystem::exists(st->output)) {
        fail(ErrorKind::kUsage, "--resume: {} does not exist (nothing to continue)", st->output);
      }
      SweepResumeState resume = read_sweep_resume_state(st->output);
      unwatch_input(st->output);  // read once here, then replaced by every rewrite
      remove_stale_temporaries(st->output);
      if (resume.status == "complete") {
        fmt::print("{} is complete ({} units); nothing to resume\n", st->output, resume.state.units.size());
        return;
      }
      config = resume.config;
      state = std::move(resume.state);
      recorded_sha256 = resume.input_sha256;
      earlier_runs = resume.runs;
      // Bit-identical continuation needs the same build and the same kind of device.
      const std::string tool = std::string(tool_version()) + " " + git_sha();
      if (resume.tool != tool) {
        fail_input(st->output, "/", "was started by hysparse {}, this is {}: resume it with that build, or start again",
                   resume.tool, tool);
      }
      apply_devices(config);
      // cuda:N -> cuda; the set of kinds must not change (cpu and cuda agree only within tolerances).
      auto kinds = [](std::vector<std::string> devices) {
        for (auto& d : devices) d = d.rfind("cuda", 0) == 0 ? "cuda" : d;
        std::sort(devices.begin(), devices.end());
        devices.erase(std::unique(devices.begin(), devices.end()), devices.end());
        return fmt::format("{}", fmt::join(devices, ","));
      };
      if (kinds(resume.devices) != kinds(config.devices)) {
        fail(ErrorKind::kUsage, "--resume: the sweep ran on {} and cannot continue on {} (the numbers would mix devices)",
             kinds(resume.devices), kinds(config.devices));
      }
      // The units must be exactly the captures' layers.
      std::vector<std::pair<std::int64_t, std::int64_t>> expected, found;
      for (const auto& u : sweep_units(config)) expected.emplace_back(u.capture, u.layer);
      for (const auto& u : state.units) found.emplace_back(u.capture, u.layer);
      std::sort(expected.begin(), expected.end());
      std::sort(found.begin(), found.end());
      if (expected != found) {
        fail_input(st->output, "/sweep/units", "lists {} units, the captures have {} layers in all (expected one unit each)",
                   found.size(), expected.size());
      }
    } else {
      if (!st->from_report.empty()) {
        config = read_report_config(st->from_report);  // its devices and precision too (override them here)
        unwatch_input(st->from_report);                 // read once: -o may even replace it... (refused below)
      }
      if (given("CAPTURE") || given("--captures")) {
        config.captures = st->captures;
        config.captures.insert(config.captures.end(), st->named_captures.begin(), st->named_captures.end());
      }
      if (given("--sparsity")) config.budgets = parse_sparsity_budgets(st->sparsity);
      else if (given("--budget")) config.budgets = parse_token_budgets(st->budgets);
      else if (config.budgets.empty()) config.budgets = parse_token_budgets("256,512,1024,2048");
      if (given("--selectors")) config.selectors = parse_selector_list(st->selectors);
      else if (config.selectors.empty()) config.selectors = parse_selector_list("oracle,swa,hysparse");
      if (given("--block")) config.blocks = parse_int_list(st->blocks, "--block");
      if (given("--window")) config.windows = parse_int_list(st->windows, "--window");
      if (given("--sinks")) config.sinks = parse_int_list(st->sinks, "--sinks");
      if (given("--schedule")) config.schedules = st->schedules;
      if (given("--group")) config.groups = st->groups;
      if (given("--queries")) config.queries = st->queries;
      if (given("--seed")) config.seed = st->seed;
      apply_devices(config);
      if (given("--precision")) config.precision = st->precision;
      if (given("--tile-rows")) config.tile_rows = st->tile_rows;
      if (given("--no-output-error")) config.output_error = !st->no_output_error;
      if (config.captures.empty()) fail(ErrorKind::kUsage, "sweep: no captures (give capture files or --from-report)");
    }
    // The report must not replace one of the sweep's inputs.
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::exists(st->output, ec)) {
      std::vector<std::string> inputs = config.captures;
      if (!st->from_report.empty()) inputs.push_back(st->from_report);
      for (const auto& input : inputs) {
        if (fs::exists(input, ec) && fs::equivalent(st->output, input, ec)) {
          fail(ErrorKind::kUsage, "-o {}: is an input of this sweep ({}); choose another output path", st->output, input);
        }
      }
      // Protect a long sweep's partial results from a fresh run.
      if (!st->resume && is_partial_sweep_report(st->output)) {
        fail(ErrorKind::kUsage, "-o {}: holds a partial sweep; continue it with --resume -o {}, or remove it first",
             st->output, st->output);
      }
    }
    const SweepPlan plan = plan_sweep(config);
    std::vector<std::unique_ptr<Backend>> backends;
    std::vector<const Backend*> backend_list;
    std::vector<std::string> device_descriptions;
    for (const auto& device : config.devices) {
      backends.push_back(make_backend(device, config.precision));
      backend_list.push_back(backends.back().get());
      device_descriptions.push_back(backends.back()->device());
    }

    Provenance provenance = make_provenance(0, nullptr);
    provenance.backend = backends.front()->name();
    provenance.device = fmt::format("{}", fmt::join(device_descriptions, "; "));
    provenance.seed = config.seed;
    provenance.threads = omp_get_max_threads();
    provenance.earlier_runs = earlier_runs;
    for (const auto& capture : config.captures) provenance.add_input(capture);
    if (st->resume) {
      // The same captures, byte for byte, or the resumed numbers would mix two inputs.
      for (std::size_t c = 0; c < config.captures.size(); ++c) {
        if (c >= recorded_sha256.size() || recorded_sha256[c] != provenance.input_sha256[c]) {
          fail_input(config.captures[c], "/", "changed since the sweep in {} started (sha256 {} recorded, {} now)",
                     st->output, c < recorded_sha256.size() ? recorded_sha256[c] : "none", provenance.input_sha256[c]);
        }
      }
    }

    double every = -1;  // < 0: auto
    if (st->checkpoint_every != "auto") {
      try {
        std::size_t used = 0;
        every = std::stod(st->checkpoint_every, &used);
        if (used != st->checkpoint_every.size() || every < 0) throw std::invalid_argument("bad");
      } catch (const std::exception&) {
        fail(ErrorKind::kUsage, "--checkpoint-every {}: expected auto or a number of seconds >= 0", st->checkpoint_every);
      }
    }
    // The report is rewritten after a unit when due; every rewrite replaces the whole file atomically.
    using Clock = std::chrono::steady_clock;
    auto last_write = Clock::now();
    double last_write_seconds = 0;
    bool unwritten = false;
    auto write_report = [&](const SweepState& s) {
      const auto begin = Clock::now();
      write_sweep_report(st->output, config, plan, s, provenance);
      last_write = Clock::now();
      last_write_seconds = std::chrono::duration<double>(last_write - begin).count();
      unwritten = false;
    };
    auto on_unit = [&](const SweepState& s) {
      unwritten = true;
      const double since = std::chrono::duration<double>(Clock::now() - last_write).count();
      const bool due = every < 0 ? since >= kAutoCheckpointCostRatio * last_write_seconds : since >= every;
      if (due) write_report(s);
    };
    const bool tty = !st->quiet && isatty(STDERR_FILENO);
    try {
      run_sweep(config, plan, backend_list, state, on_unit, tty, !st->quiet && !tty);
    } catch (...) {
      // Interrupted (or failed) after finishing units that are not in the report yet: save them for --resume.
      if (tty) fmt::print(stderr, "\n");  // end the progress line before the error
      bool saved = !unwritten && state.units_done() > 0;
      if (unwritten) {
        try {
          write_report(state);
          saved = true;
        } catch (const Error&) {
          // The original error is the one to report.
        }
      }
      if (saved) {
        try {
          throw;
        } catch (const Error& e) {
          const std::string where = fmt::format("{} of {} units are in {}; continue with: hysparse sweep --resume -o {}",
                                                state.units_done(), state.units.size(), st->output, st->output);
          if (e.kind() == ErrorKind::kInterrupted) throw Error(e.kind(), "sweep interrupted: " + where);
          throw Error(e.kind(), std::string(e.what()) + " (" + where + ")");
        }
      }
      throw;
    }
    // The final report (also when every unit was already done: it drops the checkpoints).
    write_sweep_report(st->output, config, plan, state, provenance);
    fmt::print("sweep: {} selector instances x {} budgets over {} capture{}: wrote {}\n", plan.instances.size(),
               config.budgets.size(), config.captures.size(), config.captures.size() > 1 ? "s" : "", st->output);
  });
}

}  // namespace hysparse::cli
