// The Tuning of a call: the constants of tuning.h, the two environment knobs, and the
// test-only variants (torch.ops.flora._set_tuning).
#include "tuning.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <mutex>

namespace flora {
namespace cuda_detail {
namespace {

// An integer knob from the environment, read once a call (tests change them between
// steps); a value that is not an integer from min_value to max_value is an error.
int64_t env_int(const char* name, int64_t fallback, int64_t min_value,
                int64_t max_value = INT64_MAX) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  const bool ok = errno == 0 && *end == '\0' && v >= min_value && v <= max_value;
  if (max_value == INT64_MAX)
    TORCH_CHECK(ok, "flora: environment variable ", name, " must be an integer >= ", min_value,
                ", got '", env, "'");
  TORCH_CHECK(ok, "flora: environment variable ", name, " must be an integer from ", min_value,
              " to ", max_value, ", got '", env, "'");
  return v;
}

std::mutex tuning_mutex;
Tuning fixed_tuning;  // the constants, or the variants a test set

// A test-only value: -1 (unchanged) or one from min_value to max_value.
int64_t checked(const char* name, int64_t value, int64_t min_value, int64_t max_value) {
  TORCH_CHECK(value == -1 || (value >= min_value && value <= max_value), "flora: _set_tuning: ",
              name, " must be -1 (unchanged) or from ", min_value, " to ", max_value, ", got ",
              value);
  return value;
}

void set_tuning_op(bool reset, int64_t row_stats, int64_t stats_stages, int64_t fused_momentum,
                   int64_t fused_share, int64_t fused_min_bytes, int64_t min_batched,
                   int64_t row_stats_dense, int64_t stats_task_blocks,
                   int64_t wide_row_regs, int64_t down_library, int64_t wide_stats_stages) {
  set_tuning_for_testing(reset, row_stats, stats_stages, fused_momentum, fused_share,
                         fused_min_bytes, min_batched, row_stats_dense, stats_task_blocks,
                         wide_row_regs, down_library, wide_stats_stages);
}

}  // namespace

Tuning call_tuning() {
  Tuning t;
  {
    std::lock_guard<std::mutex> lock(tuning_mutex);
    t = fixed_tuning;
  }
  t.batch_bytes = env_int("FLORA_BATCH_BYTES", kBatchBytes, 1);
  t.side_streams =
      static_cast<int>(env_int("FLORA_SIDE_STREAMS", kSideStreams, 0, kMaxSideStreams));
  return t;
}

void set_tuning_for_testing(bool reset, int64_t row_stats, int64_t stats_stages,
                            int64_t fused_momentum, int64_t fused_share,
                            int64_t fused_min_bytes, int64_t min_batched,
                            int64_t row_stats_dense, int64_t stats_task_blocks,
                            int64_t wide_row_regs, int64_t down_library,
                            int64_t wide_stats_stages) {
  // Every value is checked before any is set: a bad call changes nothing.
  checked("row_stats", row_stats, 0, 1);
  TORCH_CHECK(stats_stages == -1 || stats_stages == 0 || (stats_stages >= 2 && stats_stages <= 4),
              "flora: _set_tuning: stats_stages must be -1 (unchanged), 0 (default) or from 2 "
              "to 4, got ", stats_stages);
  checked("fused_momentum", fused_momentum, 0, 1);
  checked("fused_share", fused_share, 1, INT64_MAX);
  checked("fused_min_bytes", fused_min_bytes, 0, INT64_MAX);
  checked("min_batched", min_batched, 1, INT64_MAX);
  checked("row_stats_dense", row_stats_dense, 0, 1);
  checked("stats_task_blocks", stats_task_blocks, 0, 1 << 20);
  checked("wide_row_regs", wide_row_regs, 0, 1);
  checked("down_library", down_library, 0, 1);
  TORCH_CHECK(wide_stats_stages == -1 || wide_stats_stages == 0 ||
                  (wide_stats_stages >= 2 && wide_stats_stages <= 6),
              "flora: _set_tuning: wide_stats_stages must be -1 (unchanged), 0 (as "
              "stats_stages) or from 2 to 6, got ", wide_stats_stages);
  std::lock_guard<std::mutex> lock(tuning_mutex);
  if (reset) fixed_tuning = Tuning{};
  if (row_stats != -1) fixed_tuning.row_stats = row_stats == 1;
  if (stats_stages != -1) fixed_tuning.stats_stages = stats_stages;
  if (fused_momentum != -1) fixed_tuning.fused_momentum = fused_momentum == 1;
  if (fused_share != -1) fixed_tuning.fused_share = fused_share;
  if (fused_min_bytes != -1) fixed_tuning.fused_min_bytes = fused_min_bytes;
  if (min_batched != -1) fixed_tuning.min_batched = min_batched;
  if (row_stats_dense != -1) fixed_tuning.row_stats_dense = row_stats_dense == 1;
  if (stats_task_blocks != -1) fixed_tuning.stats_task_blocks = stats_task_blocks;
  if (wide_row_regs != -1) fixed_tuning.wide_row_regs = wide_row_regs == 1;
  if (down_library != -1) fixed_tuning.down_library = down_library == 1;
  if (wide_stats_stages != -1) fixed_tuning.wide_stats_stages = wide_stats_stages;
}

}  // namespace cuda_detail
}  // namespace flora

// For tests and benchmarks only: the variants of the CUDA path that the fixed tuning
// leaves out (not part of the user API; no effect on the CPU path).
TORCH_LIBRARY_FRAGMENT(flora, m) {
  m.def("_set_tuning(bool reset=False, int row_stats=-1, int stats_stages=-1, "
        "int fused_momentum=-1, int fused_share=-1, int fused_min_bytes=-1, "
        "int min_batched=-1, int row_stats_dense=-1, int stats_task_blocks=-1, "
        "int wide_row_regs=-1, int down_library=-1, int wide_stats_stages=-1) -> ()",
        &flora::cuda_detail::set_tuning_op);
}
