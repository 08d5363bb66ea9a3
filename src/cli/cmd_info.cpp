#include <omp.h>

#include <Eigen/Core>

#include <hdf5.h>

#include "backend/backend.hpp"
#include "cli/commands.hpp"
#include "common/provenance.hpp"

namespace hysparse::cli {

void add_info_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("info", "Print build options, threads and the CUDA devices found");
  cmd->callback([]() {
    unsigned major = 0, minor = 0, release = 0;
    H5get_libversion(&major, &minor, &release);
    fmt::print("hysparse      {} (git {})\n", tool_version(), git_sha());
    fmt::print("compiler      {}\n", __VERSION__);
    fmt::print("Eigen         {}.{}.{}\n", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
    fmt::print("HDF5          {}.{}.{}\n", major, minor, release);
    fmt::print("OpenMP        {} threads (OMP_NUM_THREADS to change)\n", omp_get_max_threads());
    const CudaStatus cuda = cuda_status();
    fmt::print("CUDA backend  {}\n", cuda.compiled ? "compiled" : "not compiled");
    if (cuda.devices.empty()) {
      fmt::print("CUDA devices  none: {}\n", cuda.why_none);
    } else {
      for (const auto& device : cuda.devices) fmt::print("CUDA device   {}\n", device);
    }
  });
}

}  // namespace hysparse::cli
