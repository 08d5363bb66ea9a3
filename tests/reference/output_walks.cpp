#include "reference/output_walks.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/random.hpp"

namespace hysparse::reference {

OutputWalks random_output_walks(const StatsRequest& request, std::uint64_t seed, bool weighted) {
  Rng rng(seed);
  auto below = [&](std::int64_t n) { return static_cast<std::int64_t>(rng.next() % static_cast<std::uint64_t>(n)); };
  // A walk's steps: (begin, end, factor), or a checkpoint (begin -1).
  struct Step {
    std::int64_t begin, end;
    double factor;
  };
  auto random_steps = [&](std::int64_t keys) {
    std::vector<Step> steps;
    if (below(3) == 0) steps.push_back({-1, 0, 1.0});  // nothing attended yet
    const std::int64_t count = below(6);
    for (std::int64_t s = 0; s < count; ++s) {
      std::int64_t begin = below(keys), end = begin + 1 + below(std::min<std::int64_t>(keys - begin, 200));
      if (below(8) == 0) begin = 0, end = keys;  // the whole row
      double factor = 1.0;
      if (weighted && below(2) == 0) factor = std::exp(rng.normal());
      steps.push_back({begin, end, factor});
      if (below(2) == 0) steps.push_back({-1, 0, 1.0});
    }
    steps.push_back({-1, 0, 1.0});
    return steps;
  };
  // Per row: walks of single heads, and walks whose steps every head of the group shares (a selection
  // made per KV group), recorded head by head like the engine does.
  struct Planned {
    std::int64_t head, row;
    std::vector<Step> steps;
  };
  std::vector<Planned> planned;
  for (std::int64_t r = 0; r < request.num_rows; ++r) {
    const std::int64_t keys = request.rows[r] + 1;
    for (std::int64_t h = 0; h < request.heads; ++h) {
      for (std::int64_t w = below(4); w > 0; --w) planned.push_back({h, r, random_steps(keys)});
    }
    for (std::int64_t w = below(3); w > 0; --w) {
      const std::vector<Step> shared = random_steps(keys);
      for (std::int64_t h = 0; h < request.heads; ++h) planned.push_back({h, r, shared});
    }
  }
  std::stable_sort(planned.begin(), planned.end(), [](const Planned& a, const Planned& b) { return a.head < b.head; });
  OutputWalks walks;
  for (const Planned& p : planned) {
    walks.begin_walk(p.head, p.row);
    for (const Step& step : p.steps) {
      if (step.begin < 0) walks.checkpoint();
      else walks.add(step.begin, step.end, step.factor);
    }
  }
  return walks;
}

std::vector<double> naive_output_errors(const StatsRequest& request, const OutputWalks& walks) {
  const std::int64_t d = request.head_dim, T = request.seq_len;
  std::vector<double> errors(static_cast<std::size_t>(walks.checkpoints), std::numeric_limits<double>::quiet_NaN());
  for (const OutputWalk& walk : walks.walks) {
    const std::int64_t t = request.rows[walk.row];
    // Exact probabilities of the row, in double, channels summed in ascending order.
    std::vector<double> z(static_cast<std::size_t>(t + 1));
    double peak = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j <= t; ++j) {
      double dot = 0.0;
      for (std::int64_t c = 0; c < d; ++c) {
        dot += static_cast<double>(request.q[(walk.head * T + t) * d + c]) * static_cast<double>(request.k[j * d + c]);
      }
      z[static_cast<std::size_t>(j)] = request.scale * dot;
      peak = std::max(peak, z[static_cast<std::size_t>(j)]);
    }
    const bool sink = request.sink_logits != nullptr;
    const double sink_logit = sink ? static_cast<double>(request.sink_logits[walk.head]) : 0.0;
    if (sink) peak = std::max(peak, sink_logit);
    double total = sink ? std::exp(sink_logit - peak) : 0.0;
    for (double x : z) total += std::exp(x - peak);
    auto probability = [&](std::int64_t j) { return std::exp(z[static_cast<std::size_t>(j)] - peak) / total; };
    const double sink_probability = sink ? std::exp(sink_logit - peak) / total : 0.0;
    std::vector<double> exact(static_cast<std::size_t>(d), 0.0), numerator(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t j = 0; j <= t; ++j) {
      for (std::int64_t c = 0; c < d; ++c) exact[static_cast<std::size_t>(c)] += probability(j) * request.v[j * d + c];
    }
    double denominator = 0.0;
    for (std::int64_t i = walk.first_step; i < walk.first_step + walk.num_steps; ++i) {
      const OutputStep& step = walks.steps[static_cast<std::size_t>(i)];
      if (step.begin >= 0) {
        const double factor = walks.factors.empty() ? 1.0 : walks.factors[static_cast<std::size_t>(i)];
        for (std::int64_t j = step.begin; j < step.end; ++j) {
          const double p = probability(j) * factor;
          denominator += p;
          for (std::int64_t c = 0; c < d; ++c) numerator[static_cast<std::size_t>(c)] += p * request.v[j * d + c];
        }
        continue;
      }
      double diff = 0.0, norm = 0.0;
      for (std::int64_t c = 0; c < d; ++c) {
        const double o = exact[static_cast<std::size_t>(c)];
        const double approx = denominator + sink_probability > 0 ? numerator[static_cast<std::size_t>(c)] / (denominator + sink_probability) : 0.0;
        diff += (approx - o) * (approx - o);
        norm += o * o;
      }
      errors[static_cast<std::size_t>(step.end)] = norm > 0 ? std::sqrt(diff / norm) : std::numeric_limits<double>::quiet_NaN();
    }
  }
  return errors;
}

}  // namespace hysparse::reference
