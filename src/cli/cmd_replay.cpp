#include <omp.h>
#include <unistd.h>

#include "backend/backend.hpp"
#include "cli/commands.hpp"
#include "common/error.hpp"
#include "replay/engine.hpp"
#include "replay/report.hpp"

namespace hysparse::cli {

void add_replay_command(CLI::App& app) {
  struct State {
    std::string capture, output, budgets, sparsity, selectors = "oracle,swa,hysparse";
    ReplayOptions options;
    std::string gpus;
    int threads = 0;
    bool quiet = false, no_output_error = false;
  };
  auto st = std::make_shared<State>();
  CLI::App* cmd = app.add_subcommand("replay", "Replay a capture: exact attention statistics, selections, recall metrics");
  cmd->add_option("capture", st->capture, "Capture file (format v1)")->required();
  cmd->add_option("-o,--output", st->output, "HDF5 report to write (atomically)")->required();
  auto* budget = cmd->add_option("--budget", st->budgets, "Budgets in tokens, comma-separated (4K accepted); default 256,512,1024,2048");
  auto* sparsity = cmd->add_option("--sparsity", st->sparsity, "Budgets as fractions of the causal row dropped, e.g. 0.5,0.9,0.95");
  budget->excludes(sparsity);
  cmd->add_option("--selectors", st->selectors,
                  "Selector specs, comma-separated, with name:key=value parameters, or all ('hysparse list' shows them)")
      ->capture_default_str();
  cmd->add_option("--block", st->options.block_size, "Default block size in tokens (and the reuse matrix's)")->capture_default_str();
  cmd->add_option("--sinks", st->options.sinks, "Default forced sink tokens")->capture_default_str();
  cmd->add_option("--window", st->options.window, "Default forced window (oracle); swa defaults to the budget")->capture_default_str();
  cmd->add_option("--schedule", st->options.schedule,
                  "hysparse layer schedule: FSSS, 1:3, full=0,4,8, hysparse-7b, hysparse-80b-a3b (default 1:3)");
  cmd->add_option("--queries", st->options.queries, "Query rows: all, last:N, stride:S, random:N")->capture_default_str();
  cmd->add_option("--reuse-budget", st->options.reuse_budget, "Tokens for the cross-layer reuse matrix (0: off)")->capture_default_str();
  cmd->add_flag("--no-output-error", st->no_output_error, "Skip the output-error metric even when v is captured");
  cmd->add_option("--seed", st->options.seed, "Seed for random:N query sampling")->capture_default_str();
  auto* device = cmd->add_option("--device", st->options.device,
                                 "cpu, cuda or cuda:N; a list (cuda:0,cuda:1) spreads the KV heads over the devices")
                     ->capture_default_str();
  cmd->add_option("--gpus", st->gpus, "GPU indices, e.g. 0,1: the same as --device cuda:0,cuda:1")->excludes(device);
  cmd->add_option("--precision", st->options.precision,
                  "Logits from fp32 inputs (exact), or from q/k rounded once to bf16 or fp16 on tensor cores (cuda only)")
      ->capture_default_str();
  cmd->add_option("--threads", st->threads, "OpenMP threads (default: OMP_NUM_THREADS or all cores)");
  cmd->add_flag("-q,--quiet", st->quiet, "No progress on stderr");
  cmd->callback([st]() {
    ReplayOptions options = st->options;
    if (!st->sparsity.empty()) options.budgets = parse_sparsity_budgets(st->sparsity);
    else options.budgets = parse_token_budgets(st->budgets.empty() ? "256,512,1024,2048" : st->budgets);
    options.selectors = parse_selector_list(st->selectors);
    options.output_error = !st->no_output_error;
    if (st->threads < 0) fail(ErrorKind::kUsage, "--threads {}: expected a positive count", st->threads);
    if (st->threads > 0) omp_set_num_threads(st->threads);
    if (!st->gpus.empty()) options.device = gpu_device_list(st->gpus);
    const auto backend = make_backend(options.device, options.precision);

    Provenance provenance = make_provenance(0, nullptr);
    provenance.backend = backend->name();
    provenance.device = backend->device();
    provenance.seed = options.seed;
    provenance.threads = omp_get_max_threads();
    provenance.add_input_in_background(st->capture);

    const bool progress = !st->quiet && isatty(STDERR_FILENO);
    const ReplayResult result = run_replay(st->capture, options, *backend, progress || !st->quiet);
    provenance.finish_inputs();
    write_replay_report(st->output, result, options, provenance);
    print_replay_summary(stdout, result);
    fmt::print("\nwrote {}\n", st->output);
  });
}

}  // namespace hysparse::cli
