#include "sweep/sweep.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <chrono>
#include <cmath>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "capture/capture.hpp"
#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "replay/selector.hpp"

namespace hysparse {
namespace {

// The replay's global defaults (hysparse replay --block/--sinks/--window); the axes override them per spec.
const SelectorDefaults kSweepDefaults{64, 0, 0};
constexpr std::int64_t kDefaultAxisValue = -1;
constexpr const char* kDefaultAxisLabel = "default";
// hysparse's schedule when neither the spec nor the schedule axis gives one (as `hysparse replay`).
constexpr const char* kDefaultSweepSchedule = "1:3";

template <class T>
T get_field(const nlohmann::json& json, const char* key, const std::string& where) {
  if (!json.contains(key)) fail(ErrorKind::kInput, "{}: the sweep configuration has no '{}'", where, key);
  try {
    return json.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    fail(ErrorKind::kInput, "{}: the sweep configuration's '{}' has the wrong type", where, key);
  }
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const auto s = static_cast<std::int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

}  // namespace

std::vector<Budget> budgets_from_values(const std::vector<double>& values, bool tokens, const std::string& where) {
  // The command line's own parsers: range checks, ascending budget order, duplicates merged.
  std::string text;
  for (double v : values) {
    if (!std::isfinite(v)) fail(ErrorKind::kInput, "{}: a budget is not a finite number", where);
    if (tokens && (v < 1 || v > 9.0e15 || v != std::floor(v))) {
      fail(ErrorKind::kInput, "{}: token budget {} (expected a positive integer)", where, v);
    }
    text += (text.empty() ? "" : ",") + (tokens ? fmt::format("{}", static_cast<std::int64_t>(v)) : fmt::format("{:.17g}", v));
  }
  if (text.empty()) fail(ErrorKind::kInput, "{}: no budgets", where);
  try {
    return tokens ? parse_token_budgets(text) : parse_sparsity_budgets(text);
  } catch (const Error& e) {
    fail(ErrorKind::kInput, "{}: {}", where, e.what());
  }
}

nlohmann::json SweepConfig::to_json() const {
  nlohmann::json j;
  j["captures"] = captures;
  std::vector<double> values;
  for (const auto& b : budgets) values.push_back(b.value);
  j["budgets"] = values;
  j["budget_kind"] = budgets.empty() || budgets.front().kind == Budget::Kind::kTokens ? "tokens" : "sparsity";
  j["blocks"] = blocks;
  j["windows"] = windows;
  j["sinks"] = sinks;
  j["schedules"] = schedules;
  j["groups"] = groups;
  std::vector<std::string> specs;
  for (const auto& s : selectors) specs.push_back(s.text());
  j["selectors"] = specs;
  j["queries"] = queries;
  j["seed"] = seed;
  j["output_error"] = output_error;
  j["device"] = device;
  j["devices"] = devices;
  j["precision"] = precision;
  j["tile_rows"] = tile_rows;
  return j;
}

SweepConfig SweepConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::kInput, "{}: the configuration is not a JSON object", where);
  SweepConfig c;
  c.captures = get_field<std::vector<std::string>>(j, "captures", where);
  const auto kind = get_field<std::string>(j, "budget_kind", where);
  if (kind != "tokens" && kind != "sparsity") {
    fail(ErrorKind::kInput, "{}: budget_kind '{}' (expected tokens or sparsity)", where, kind);
  }
  c.budgets = budgets_from_values(get_field<std::vector<double>>(j, "budgets", where), kind == "tokens", where);
  c.blocks = get_field<std::vector<std::int64_t>>(j, "blocks", where);
  c.windows = get_field<std::vector<std::int64_t>>(j, "windows", where);
  c.sinks = get_field<std::vector<std::int64_t>>(j, "sinks", where);
  c.schedules = get_field<std::vector<std::string>>(j, "schedules", where);
  c.groups = get_field<std::vector<std::string>>(j, "groups", where);
  const auto specs = get_field<std::vector<std::string>>(j, "selectors", where);
  for (const auto& text : specs) {
    for (auto& spec : parse_selector_list(text)) c.selectors.push_back(std::move(spec));
  }
  c.queries = get_field<std::string>(j, "queries", where);
  if (!j.contains("seed") || !j.at("seed").is_number_unsigned()) {
    fail(ErrorKind::kInput, "{}: the sweep configuration's 'seed' is not a non-negative integer", where);
  }
  c.seed = j.at("seed").get<std::uint64_t>();
  c.output_error = get_field<bool>(j, "output_error", where);
  c.device = get_field<std::string>(j, "device", where);
  c.devices = j.contains("devices") ? get_field<std::vector<std::string>>(j, "devices", where) : std::vector<std::string>{c.device};
  if (c.devices.empty()) fail(ErrorKind::kInput, "{}: the sweep configuration's 'devices' is empty", where);
  c.precision = j.contains("precision") ? get_field<std::string>(j, "precision", where) : std::string("fp32");
  c.tile_rows = get_field<std::int64_t>(j, "tile_rows", where);
  return c;
}

std::vector<std::uint64_t> SweepPlan::grid_dims() const {
  return {selector_axis.size(), block_axis.size(), window_axis.size(), sinks_axis.size(), schedule_axis.size(),
          group_axis.size()};
}

SweepPlan plan_sweep(const SweepConfig& config) {
  if (config.captures.empty()) fail(ErrorKind::kUsage, "sweep: no captures");
  if (config.budgets.empty()) fail(ErrorKind::kUsage, "sweep: no budgets: give --budget or --sparsity");
  if (config.selectors.empty()) fail(ErrorKind::kUsage, "sweep: no selectors: give --selectors");
  auto check_unique = [](const auto& values, const char* axis) {
    auto sorted = values;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      fail(ErrorKind::kUsage, "sweep: --{} lists a value twice (expected distinct values)", axis);
    }
  };
  check_unique(config.captures, "captures");
  check_unique(config.blocks, "block");
  check_unique(config.windows, "window");
  check_unique(config.sinks, "sinks");
  check_unique(config.schedules, "schedule");
  check_unique(config.groups, "group");
  for (auto b : config.blocks) {
    if (b < 1) fail(ErrorKind::kUsage, "sweep: --block {} (expected >= 1)", b);
  }
  for (auto w : config.windows) {
    if (w < 0) fail(ErrorKind::kUsage, "sweep: --window {} (expected >= 0)", w);
  }
  for (auto s : config.sinks) {
    if (s < 0) fail(ErrorKind::kUsage, "sweep: --sinks {} (expected >= 0)", s);
  }

  SweepPlan plan;
  const std::vector<SelectorSpec> bases = expand_selector_specs(config.selectors);
  for (const auto& base : bases) plan.selector_axis.push_back(base.text());
  auto int_axis = [](const std::vector<std::int64_t>& values) {
    return values.empty() ? std::vector<std::int64_t>{kDefaultAxisValue} : values;
  };
  auto string_axis = [](const std::vector<std::string>& values) {
    return values.empty() ? std::vector<std::string>{kDefaultAxisLabel} : values;
  };
  plan.block_axis = int_axis(config.blocks);
  plan.window_axis = int_axis(config.windows);
  plan.sinks_axis = int_axis(config.sinks);
  plan.schedule_axis = string_axis(config.schedules);
  plan.group_axis = string_axis(config.groups);

  for (const auto& base : bases) {
    // What the selector accepts, and whether its window is the budget (swa: the window axis does not apply).
    const std::unique_ptr<Selector> probe = make_selector(base, kSweepDefaults);
    // Token-level selectors (default block 1: h2o, snapkv, reuse, ...) keep their granularity.
    const bool budget_window = probe->window() < 0, token_level = probe->block_size() == 1;
    auto applies = [&](const std::string& key, bool requested) {
      return requested && probe->accepts(key) && !base.params.count(key) && !(key == "window" && budget_window) &&
             !(key == "block" && token_level);
    };
    for (std::int64_t block : plan.block_axis) {
      for (std::int64_t window : plan.window_axis) {
        for (std::int64_t sinks : plan.sinks_axis) {
          for (const std::string& schedule : plan.schedule_axis) {
            for (const std::string& group : plan.group_axis) {
              SelectorSpec spec = base;
              if (applies("block", !config.blocks.empty())) spec.params["block"] = std::to_string(block);
              if (applies("window", !config.windows.empty())) spec.params["window"] = std::to_string(window);
              if (applies("sinks", !config.sinks.empty())) spec.params["sinks"] = std::to_string(sinks);
              if (applies("schedule", !config.schedules.empty())) {
                std::string value = schedule;
                std::replace(value.begin(), value.end(), ',', '+');  // commas separate specs
                spec.params["schedule"] = value;
              } else if (applies("schedule", true)) {
                spec.params["schedule"] = kDefaultSweepSchedule;  // explicit, so the points table names it
              }
              if (applies("group", !config.groups.empty())) spec.params["group"] = group;
              const std::unique_ptr<Selector> selector = make_selector(spec, kSweepDefaults);
              const std::string resolved = selector->spec_text();
              auto found = std::find_if(plan.instances.begin(), plan.instances.end(),
                                        [&](const SweepInstance& i) { return i.resolved == resolved; });
              if (found == plan.instances.end()) {
                SweepInstance instance;
                instance.spec = spec;
                instance.name = spec.name;
                instance.resolved = resolved;
                instance.block = selector->block_size();
                instance.window = selector->window();
                instance.sinks = selector->sinks();
                if (selector->accepts("schedule")) {
                  instance.schedule = selector->resolved("schedule");
                  std::replace(instance.schedule.begin(), instance.schedule.end(), '+', ',');
                }
                if (selector->accepts("group")) instance.group = selector->resolved("group");
                plan.instances.push_back(std::move(instance));
                found = plan.instances.end() - 1;
              }
              plan.grid.push_back(found - plan.instances.begin());
            }
          }
        }
      }
    }
  }
  return plan;
}

ReplayOptions sweep_replay_options(const SweepConfig& config, const SweepPlan& plan) {
  ReplayOptions o;
  o.budgets = config.budgets;
  o.block_size = kSweepDefaults.block;
  o.sinks = kSweepDefaults.sinks;
  o.window = kSweepDefaults.window;
  o.queries = config.queries;
  for (const auto& instance : plan.instances) o.selectors.push_back(instance.spec);
  o.reuse_budget = 0;  // the cross-layer reuse matrix is a replay diagnostic, not a sweep axis
  o.output_error = config.output_error;
  o.seed = config.seed;
  o.device = config.device;
  o.precision = config.precision;
  o.tile_rows = config.tile_rows;
  return o;
}

std::int64_t SweepState::units_done() const {
  return std::count_if(units.begin(), units.end(), [](const SweepUnit& u) { return u.done; });
}

bool SweepState::complete() const { return !units.empty() && units_done() == static_cast<std::int64_t>(units.size()); }

std::vector<SweepUnit> sweep_units(const SweepConfig& config) {
  std::vector<SweepUnit> units;
  for (std::size_t c = 0; c < config.captures.size(); ++c) {
    const CaptureReader reader = CaptureReader::open(config.captures[c]);
    for (std::int64_t l = 0; l < reader.header().num_layers; ++l) units.push_back({static_cast<std::int64_t>(c), l, false, 0.0});
  }
  return units;
}

void run_sweep(const SweepConfig& config, const SweepPlan& plan, const std::vector<const Backend*>& backends,
               SweepState& state, const std::function<void(const SweepState&)>& on_unit, bool progress_tty,
               bool progress_lines) {
  if (backends.empty()) fail(ErrorKind::kInternal, "sweep: no backend");
  if (state.units.empty()) state.units = sweep_units(config);
  const ReplayOptions options = sweep_replay_options(config, plan);
  const auto C = static_cast<std::int64_t>(config.captures.size());
  state.results.resize(static_cast<std::size_t>(C));
  state.checkpoints.resize(static_cast<std::size_t>(C));
  const std::int64_t total = static_cast<std::int64_t>(state.units.size());
  const std::int64_t points = static_cast<std::int64_t>(plan.instances.size() * config.budgets.size());
  const auto workers = static_cast<std::int64_t>(std::min<std::size_t>(backends.size(), static_cast<std::size_t>(C)));
  if (progress_tty || progress_lines) {
    fmt::print(stderr, "sweep: {} capture{}, {} selector instances x {} budgets = {} points per capture, {} units ({} done){}\n",
               C, C > 1 ? "s" : "", plan.instances.size(), config.budgets.size(), points, total, state.units_done(),
               workers > 1 ? fmt::format(", {} devices in parallel", workers) : std::string());
  }
  const auto started = std::chrono::steady_clock::now();
  std::mutex state_mutex;  // guards `state`, the callback and the progress line; taken before capture_io_mutex()
  std::atomic<std::int64_t> next_capture{0};
  std::atomic<std::int64_t> ran{0};
  std::atomic<bool> stop{false};
  std::exception_ptr failure;

  auto run_capture = [&](std::int64_t c, const Backend& backend) {
    const auto uc = static_cast<std::size_t>(c);
    ReplayRun run(config.captures[uc], options, backend, false);
    {
      std::lock_guard<std::mutex> lock(state_mutex);
      if (!state.checkpoints[uc].empty()) run.restore(state.checkpoints[uc]);
      state.results[uc] = run.result();
      if (run.done()) return;
      state.checkpoints[uc] = run.checkpoint();
    }
    while (!run.done()) {
      check_interrupted();
      if (stop) return;
      const std::int64_t layer = run.next_layer();
      const auto unit_started = std::chrono::steady_clock::now();
      run.run_next_layer();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - unit_started).count();
      ReplayResult result = run.result();
      std::vector<std::uint8_t> checkpoint = run.checkpoint();
      std::lock_guard<std::mutex> lock(state_mutex);
      auto unit = std::find_if(state.units.begin(), state.units.end(),
                               [&](const SweepUnit& u) { return u.capture == c && u.layer == layer; });
      if (unit == state.units.end()) fail(ErrorKind::kInternal, "sweep: no unit for capture {} layer {}", c, layer);
      unit->done = true;
      unit->seconds = seconds;
      state.results[uc] = std::move(result);
      state.checkpoints[uc] = std::move(checkpoint);
      {
        std::lock_guard<std::mutex> io(capture_io_mutex());
        on_unit(state);
      }
      ++ran;
      const std::int64_t done = state.units_done();
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      const double rate = elapsed > 0 ? static_cast<double>(ran) / elapsed : 0.0;
      const double eta = rate > 0 ? static_cast<double>(total - done) / rate : -1.0;
      const std::string line = fmt::format("sweep: capture {}/{} layer {}/{} | {}/{} units, {} points | {:.2f} units/s | ETA {}",
                                           c + 1, C, layer + 1, run.num_layers(), done, total, points * C, rate,
                                           format_duration(eta));
      if (progress_tty) {
        fmt::print(stderr, "\r\033[K{}", line);
        if (done == total) fmt::print(stderr, "\n");
      } else if (progress_lines) {
        fmt::print(stderr, "{} ({:.2f} s)\n", line, seconds);
      }
    }
  };
  // Each worker takes the next capture; its OpenMP team gets an equal share of the threads.
  const int threads_per_worker = std::max(1, omp_get_max_threads() / static_cast<int>(workers));
  auto worker = [&](const Backend* backend) {
    try {
      if (workers > 1) omp_set_num_threads(threads_per_worker);
      for (std::int64_t c = next_capture++; c < C && !stop; c = next_capture++) run_capture(c, *backend);
    } catch (...) {
      std::lock_guard<std::mutex> lock(state_mutex);
      if (!failure) failure = std::current_exception();
      stop = true;
    }
  };
  if (workers == 1) {
    worker(backends.front());
  } else {
    std::vector<std::thread> pool;
    for (std::int64_t w = 0; w < workers; ++w) pool.emplace_back(worker, backends[static_cast<std::size_t>(w)]);
    for (auto& t : pool) t.join();
  }
  if (failure) std::rethrow_exception(failure);
  if (progress_tty && ran == 0) fmt::print(stderr, "sweep: nothing left to run\n");
}

}  // namespace hysparse
