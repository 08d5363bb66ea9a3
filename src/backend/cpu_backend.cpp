// CPU backend: Eigen for the tile products, exact one-pass block statistics.
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/backend.hpp"
#include "backend/row_statistics.hpp"
#include "common/error.hpp"

namespace hysparse {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys are streamed in chunks of whole blocks of at least this many keys.
constexpr std::int64_t kMinKeyChunk = 256;

// Sums in double over eight lanes: vectorises, and is exact whenever a sequential double
// sum is, so blocks holding the same logits in another order tie exactly.
double sum_in_double(const float* values, std::int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(values[j + l]);
  }
  for (; j < n; ++j) lanes[0] += static_cast<double>(values[j]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

void dense_layer_statistics(const StatsRequest& req, StatsTile& out) {
  const std::int64_t T = req.seq_len, B = req.block_size;
  for (std::int64_t h = 0; h < req.heads; ++h) {
    for (std::int64_t r = 0; r < req.num_rows; ++r) {
      const std::int64_t t = req.rows[r];
      const float* p = req.attn + (h * T + t) * T;
      for (std::int64_t b = 0; b * B <= t; ++b) {
        const std::int64_t end = std::min(t + 1, (b + 1) * B);
        float peak = 0.0f;
        double sum = 0.0;
        for (std::int64_t j = b * B; j < end; ++j) {
          peak = std::max(peak, p[j]);
          sum += p[j];
        }
        if (peak > 0.0f) {
          out.block_max[out.at(h, r, b)] = std::log(peak);
          out.block_sum[out.at(h, r, b)] = static_cast<float>(sum / peak);
        }
      }
    }
    finish_row_statistics(req, out, h);
    for (std::int64_t r = 0; r < req.num_rows; ++r) out.lse_all[static_cast<std::size_t>(h * out.rows + r)] = 0.0;
  }
}

void qk_layer_statistics(const StatsRequest& req, StatsTile& out) {
  const std::int64_t d = req.head_dim, B = req.block_size, R = req.num_rows;
  const std::int64_t last = req.rows[R - 1];
  const std::int64_t chunk = ((std::max(kMinKeyChunk, B) + B - 1) / B) * B;
  const auto scale = static_cast<float>(req.scale);

  RowMatrix q_rows(R, d), scores, probabilities, output;
  Eigen::ArrayXf exps(std::max<std::int64_t>(B, 1));
  std::vector<float> running_max(static_cast<std::size_t>(R));
  Eigen::Map<const RowMatrix> keys(req.k, req.seq_len, d);
  for (std::int64_t h = 0; h < req.heads; ++h) {
    const float* q_head = req.q + h * req.seq_len * d;
    for (std::int64_t r = 0; r < R; ++r) {
      q_rows.row(r) = Eigen::Map<const Eigen::RowVectorXf>(q_head + req.rows[r] * d, d) * scale;
    }
    if (req.v) {
      output.setZero(R, d);
      std::fill(running_max.begin(), running_max.end(), kNegInf);
    }
    for (std::int64_t c0 = 0; c0 <= last; c0 += chunk) {
      const std::int64_t width = std::min(chunk, last + 1 - c0);
      // First row that sees any key of this chunk (rows are ascending).
      const std::int64_t r_begin = std::lower_bound(req.rows, req.rows + R, c0) - req.rows;
      const std::int64_t active = R - r_begin;
      if (active <= 0) continue;
      scores.noalias() = q_rows.bottomRows(active) * keys.middleRows(c0, width).transpose();
      if (req.v) probabilities.setZero(active, width);
      for (std::int64_t i = 0; i < active; ++i) {
        const std::int64_t r = r_begin + i;
        const std::int64_t visible = std::min(width, req.rows[r] + 1 - c0);
        float* z = scores.row(i).data();
        for (std::int64_t b0 = 0; b0 < visible; b0 += B) {
          const std::int64_t len = std::min(B, visible - b0);
          Eigen::Map<Eigen::ArrayXf> segment(z + b0, len);
          const float m = segment.maxCoeff();
          exps.head(len) = (segment - m).exp();  // vectorised (a cast in the expression would not be)
          const auto l = static_cast<float>(sum_in_double(exps.data(), len));
          const std::size_t cell = out.at(h, r, (c0 + b0) / B);
          out.block_max[cell] = m;
          out.block_sum[cell] = l;
        }
        if (req.v) {
          Eigen::Map<Eigen::ArrayXf> visible_scores(z, visible);
          const float previous = running_max[static_cast<std::size_t>(r)];
          const float current = std::max(previous, visible_scores.maxCoeff());
          if (previous != kNegInf) output.row(r) *= std::exp(previous - current);
          running_max[static_cast<std::size_t>(r)] = current;
          probabilities.row(i).head(visible) = (visible_scores - current).exp().matrix().transpose();
        }
      }
      if (req.v) {
        Eigen::Map<const RowMatrix> values(req.v + c0 * d, width, d);
        output.bottomRows(active).noalias() += probabilities * values;
      }
    }
    finish_row_statistics(req, out, h);
    if (req.v) {
      for (std::int64_t r = 0; r < R; ++r) {
        const double lse_all = out.lse_all[static_cast<std::size_t>(h * R + r)];
        const auto factor = static_cast<float>(std::exp(static_cast<double>(running_max[static_cast<std::size_t>(r)]) - lse_all));
        Eigen::Map<Eigen::RowVectorXf>(&out.output[static_cast<std::size_t>((h * R + r) * d)], d) = output.row(r) * factor;
      }
    }
  }
}

// One walk of OutputWalks (backend.hpp): fp32 q.k products (Eigen), weights exp(scale * z - lse_all)
// in double, each step's weighted values summed in fp32 and accumulated in double (the replay
// engine's host arithmetic before walks existed, kept so that CPU reports did not move).
void evaluate_walk(const StatsRequest& req, const StatsTile& tile, const OutputWalks& walks, const OutputWalk& walk,
                   std::vector<double>& errors) {
  const std::int64_t d = req.head_dim, h = walk.head, r = walk.row;
  const std::size_t cell = static_cast<std::size_t>(h * tile.rows + r);
  const double lse_all = tile.lse_all[cell];
  const float* exact = &tile.output[cell * static_cast<std::size_t>(d)];
  const double sink_weight = req.sink_logits ? std::exp(static_cast<double>(req.sink_logits[h]) - lse_all) : 0.0;
  Eigen::Map<const Eigen::VectorXf> query(req.q + (h * req.seq_len + req.rows[r]) * d, d);
  thread_local Eigen::VectorXf dots, weights, sum;
  thread_local std::vector<double> numerator;
  numerator.assign(static_cast<std::size_t>(d), 0.0);
  double denominator = 0.0;
  for (std::int64_t i = walk.first_step; i < walk.first_step + walk.num_steps; ++i) {
    const OutputStep& step = walks.steps[static_cast<std::size_t>(i)];
    if (step.begin < 0) {
      const double total = denominator + sink_weight;
      double diff = 0.0, norm = 0.0;
      for (std::int64_t c = 0; c < d; ++c) {
        const double approx = total > 0 ? numerator[static_cast<std::size_t>(c)] / total : 0.0;
        diff += (approx - exact[c]) * (approx - exact[c]);
        norm += static_cast<double>(exact[c]) * exact[c];
      }
      errors[static_cast<std::size_t>(step.end)] = norm > 0 ? std::sqrt(diff / norm) : std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const std::int64_t j0 = step.begin, n = step.end - step.begin;
    const double factor = walks.factors.empty() ? 1.0 : walks.factors[static_cast<std::size_t>(i)];
    Eigen::Map<const RowMatrix> keys(req.k + j0 * d, n, d);
    dots.noalias() = keys * query;
    weights.resize(n);
    for (std::int64_t j = 0; j < n; ++j) {
      const double w = std::exp(req.scale * static_cast<double>(dots[j]) - lse_all) * factor;
      weights[j] = static_cast<float>(w);
      denominator += w;
    }
    Eigen::Map<const RowMatrix> values(req.v + j0 * d, n, d);
    sum.noalias() = values.transpose() * weights;
    for (std::int64_t c = 0; c < d; ++c) numerator[static_cast<std::size_t>(c)] += sum[c];
  }
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  std::string device() const override {
    return fmt::format("CPU, {} OpenMP threads, Eigen {}.{}.{}", omp_get_max_threads(), EIGEN_WORLD_VERSION,
                       EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
  }
  void block_statistics(const StatsRequest& req, StatsTile& out) const override {
    if (req.num_rows <= 0) throw Error(ErrorKind::kInternal, "block_statistics: no rows");
    allocate_tile(req, out);
    if (req.attn) dense_layer_statistics(req, out);
    else qk_layer_statistics(req, out);
  }
  void output_errors(const StatsRequest& req, const StatsTile& tile, const OutputWalks& walks,
                     std::vector<double>& errors) const override {
    check_output_request(req, tile, walks);
    errors.assign(static_cast<std::size_t>(walks.checkpoints), std::numeric_limits<double>::quiet_NaN());
    for (const OutputWalk& walk : walks.walks) evaluate_walk(req, tile, walks, walk, errors);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace hysparse
