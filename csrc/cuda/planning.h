// Planning of a step_group_ call on the host: the Task of every parameter, the batches
// and stats groups they are launched in, and the workspace each needs.
#pragma once

#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "tuning.h"
#include "flora/ops.h"

#include <cstdint>
#include <vector>

namespace flora {
namespace cuda_detail {


// Bytes of fp32 workspace one task needs, and their layout (offsets in floats, each
// rounded up to 16 bytes), in three regions: kept (the stats pass's results, from the
// stats pass of the task's stats group to the end of its batch), partials (the stats
// pass's partial sums, read by the finalize pass only) and work (its batch's passes).
// Partials and work share memory: a stats group's finalize pass is done with the
// partials before its first batch starts.
struct WorkspacePlan {
  // kept
  int64_t col_factor = 0, row_block_sum = 0, p2_block = 0, colblock_d2 = 0, tile_p2 = 0,
          tile_d2 = 0;
  // partials
  int64_t row_part = 0, col_part = 0, w_part = 0;
  // work
  int64_t scalars = 0, update = 0, terms = 0, plain_t = 0, tiled = 0, momentum16 = 0,
          row_factor = 0, cache_p2 = 0, mc_stage = 0;
  int64_t kept = 0, partials = 0, work = 0;  // floats of each region
};

// What the launches of one batch need besides its task table.
// The stats and finalize passes of a stats group: consecutive batches of one dtype
// (the row-stats blocks are sized over the group's bytes).
struct StatsShape {
  int64_t fblocks = 0, sblocks = 0, smem = 0;
  // Dynamic shared memory of row-stats tasks with rows too wide for the register
  // accumulators of the others (wide_row_stats). Those take a launch of their own, so
  // that their footprint (shared accumulators, or registers) does not hold the other
  // tasks' blocks to one an SM.
  int64_t smem_wide = 0;
  bool any_narrow = false, any_wide = false;  // tasks of each launch
  bool any_factored = false;
  bool any_quantized = false;  // an unfactored task with 8-bit state
};

struct BatchShape {
  int64_t tiles = 0, gtiles = 0;
  bool any_rms = false, any_norms = false;
  bool any_fused_p2 = false, any_tile_p2 = false;
};

struct Batch : BatchShape {
  int first = 0, count = 0;
  int64_t tile_partials = 0;  // bytes of the stats partials of its tile-pass tasks
};

struct StatsGroup : StatsShape {
  int first_batch = 0, batches = 0, first = 0, count = 0;
  int64_t tile_partials = 0;
};

// A shape group of a batch's fused tasks (compressed_work): one launch of each of its
// momentum kernels, on the stream its round gives it. Shape groups take turns on the
// current stream and the side streams, as many at a time (a round) as their
// temporaries together stay within CallLimits::group. Each stream of a round has a
// place in the call's rounds region for its groups' temporaries (they run one after
// another there); every round and batch reuses the region (a round starts after the
// last one's work on every stream is done).
struct FusedGroup {
  std::vector<int> tasks;    // in call order
  bool new_round = false;    // the current stream waits for the side streams first
  int stream = 0;            // 0: the current stream; s: side stream s - 1
  int64_t temps_at = 0;      // floats into the rounds region
  int64_t table_at = 0;      // int64 words into the group tables (after the task table)
  int down_chunk = 0;        // 16-bit tasks: tasks a library down GEMM takes (0: fused_down)
};

// Byte limits of a call's batches (see call_limits).
struct CallLimits {
  int64_t batch = 0;   // gradients and parameters
  int64_t update = 0;  // unfused update buffers (and a stats group's tile partials)
  int64_t fused = 0;   // fused tasks' fp16 buffers
  int64_t group = 0;   // a round of fused shape groups' temporaries
};

// The plan of a call: per task (in item order) its Task, workspace offsets and the
// stats pass's dynamic shared memory; the batches and stats groups; the workspace.
struct StepPlan {
  std::vector<Task> tasks;
  std::vector<WorkspacePlan> plans;  // batch-local offsets
  std::vector<int64_t> stats_smem;
  std::vector<Batch> batches;
  std::vector<StatsGroup> groups;
  CallLimits limits;
  int64_t kept_floats = 0, shared_floats = 0;
  // Compressed momentum: the fused shape groups of every batch in launch order; for
  // each task the fused group it starts (-1: none); floats of the rounds region and of
  // the unfused tasks' temporaries (one task at a time, all on the current stream);
  // words of the groups' tables; side streams used; whether any GEMM runs.
  std::vector<FusedGroup> fused_groups;
  std::vector<int> group_at;
  int64_t rounds_floats = 0, unfused_floats = 0, group_table_words = 0;
  int sides_used = 0;
  bool any_gemm = false;
};

// The call's parameters that have elements, in call order.
std::vector<Item> collect_items(at::TensorList params, at::TensorList grads,
                                const std::vector<GroupEntry>& entries);

GroupArgs group_args(const StepOptions& group);

// Tasks, batches, stats groups, grids and workspace offsets of a call.
StepPlan plan_step(const std::vector<Item>& items, const GroupArgs& args, const Tuning& tuning);

// Points the tasks at their workspace: `shared` (partials and work) and `kept`.
void bind_workspace(StepPlan& plan, float* shared, float* kept, const GroupArgs& args);


}  // namespace cuda_detail
}  // namespace flora
