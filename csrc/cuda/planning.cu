// Planning of a step_group_ call (planning.h): Tasks, batches, stats groups, grids and
// workspace offsets, all on the host before any launch.
#include "planning.h"
#include "../common/random.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

namespace flora {
namespace cuda_detail {
namespace {

// Dynamic shared memory a stats block may have on the current device, less room
// for the kernel's static shared memory.
int64_t stats_smem_limit() { return std::max<int64_t>(0, smem_optin() - 8 * 1024); }

// Sets up row stats for factored task t (16-byte aligned rows) when its
// rows are wide enough to keep a block's threads busy and the stages (plus, for rows
// too wide for register accumulators, the column accumulators) fit in shared memory;
// returns the shared memory a block needs, or 0 (tile passes).
int64_t plan_row_stats(Task& t, int64_t elem, int64_t lane_elems, int64_t smem_limit,
                       int64_t stages, bool reads_p, bool wide_regs, int64_t wide_stages) {
  const int64_t mv = t.m / lane_elems;
  if (!t.vec || t.m % lane_elems != 0 || mv < kThreads / 2 || mv > INT_MAX / 4) return 0;
  const int64_t row_bytes = t.m * elem * (reads_p ? 2 : 1);
  const int64_t rows = stage_rows_of(row_bytes);
  const int64_t stage = rows * row_bytes;
  if (stages == 0) stages = elem == 4 ? 3 : 2;  // default
  const bool f32 = lane_elems == kLane<kF32>;
  const int64_t reg_vecs = f32 ? kRegAccVecs<kF32> : kRegAccVecs<kBF16>;
  const int64_t wide_vecs = f32 ? kWideRegAccVecs<kF32> : kWideRegAccVecs<kBF16>;
  t.stage_rows = static_cast<int32_t>(rows);
  const bool in_regs = mv <= reg_vecs * kThreads;
  if (in_regs || (wide_regs && mv <= wide_vecs * kThreads)) {
    for (int64_t s = in_regs || wide_stages == 0 ? stages : wide_stages; s >= 2; --s) {
      if (s * stage <= smem_limit) {
        t.row_stats = in_regs ? kRowStatsRegisters : kRowStatsWideRegisters;
        t.stages = static_cast<int32_t>(s);
        return s * stage;
      }
    }
    return 0;
  }
  const int64_t smem = 2 * stage + 2 * t.m * int64_t(sizeof(float));
  if (smem > smem_limit) return 0;
  t.row_stats = kRowStatsShared;
  t.stages = 2;
  return smem;
}

// The rows of each row-stats block of a batch whose row-stats tasks hold `bytes` of
// G in all: blocks of about equal bytes (a block of wide rows took 2.7x as long as
// one of 2048-wide rows when both had the same rows, and the launch waited for the
// last ones), a whole number of stages each.
void set_block_rows(Task& t, int64_t row_bytes, int64_t bytes, int64_t task_blocks) {
  const int64_t elem = row_bytes / t.m;
  // Whole stages of G alone: a step whose stages also hold p (fewer rows) sums each
  // column over the same blocks of rows, so in the same order.
  const int64_t g_rows = stage_rows_of(row_bytes);
  // The floor keeps the column sums' workspace small next to a launch of many tensors,
  // but would leave a tensor stepped alone (FloraAccumulator steps one a call) with a
  // few dozen blocks: it gives way to kStatsTaskBlocks blocks a tensor. A function of the
  // tensor only, so batching still does not change a small tensor's sums.
  const int64_t floor_rows =
      task_blocks == 0 ? ceil_div(kRowBlockMinColBytes, elem)
                       : std::min(ceil_div(kRowBlockMinColBytes, elem),
                                  std::max(g_rows, ceil_div(t.n, task_blocks)));
  const int64_t wanted = std::clamp(ceil_div(ceil_div(bytes, kStatsBlocksTarget), row_bytes),
                                    floor_rows, kRowBlockMaxColBytes / elem);
  t.block_rows = static_cast<int32_t>(ceil_div(wanted, g_rows) * g_rows);
  t.rchunks = static_cast<int32_t>(ceil_div(t.n, t.block_rows));
}


int64_t aligned(int64_t floats) { return ceil_div(floats, 4) * 4; }

// Floats of the float32 stage of a task's 8-bit compressed momentum (0: none): M's
// rank x max(n, m).
int64_t mc_stage_floats(const Task& t) {
  return t.mc_codes != nullptr ? t.rank * std::max(t.n, t.m) : 0;
}

WorkspacePlan plan_workspace(const Task& t, int64_t kept_base, int64_t partials_base,
                             int64_t work_base) {
  WorkspacePlan w;
  int64_t kept_at = kept_base, partials_at = partials_base, work_at = work_base;
  const auto take = [](int64_t& at, int64_t floats) {
    const int64_t start = at;
    at += aligned(floats);
    return start;
  };
  if (t.kind == kFactored) {
    const int64_t row_blocks = t.row_stats ? t.rchunks : ceil_div(t.n, kFinalizeWidth);
    if (!t.row_stats) w.row_part = take(partials_at, t.n * t.ctiles);
    w.col_part = take(partials_at, int64_t(t.rchunks) * t.m);
    w.col_factor = take(kept_at, t.m);
    w.row_block_sum = take(kept_at, 2 * row_blocks);  // doubles
    w.p2_block = take(kept_at, 2 * row_blocks);
    if (t.row_stats) {
      w.w_part = take(partials_at, int64_t(t.rchunks) * t.m);
      w.colblock_d2 = take(kept_at, 2 * ceil_div(t.m, kRowStatsFinalizeCols));
    }
  }
  w.tile_p2 = take(kept_at, std::max(t.tiles, t.gtiles));
  w.tile_d2 = take(kept_at, t.tiles);
  w.cache_p2 = take(work_at, t.fused ? t.gtiles : t.row_stats ? t.tiles : 0);
  w.scalars = take(work_at, kNumScalars);
  if (t.fused) {
    const int64_t pdim = t.n < t.m ? t.n : t.m;  // P is r x n (left) or m x r (right)
    const int64_t mdim = std::max(t.n, t.m);
    w.terms = take(work_at, 2 * (1 + t.dtiles + kDotBlocks));  // doubles
    w.plain_t = take(work_at, ceil_div(t.rank * pdim, 2));   // fp16
    if (!t.down_library) w.tiled = take(work_at, ceil_div(tiled_halves(t.rank, pdim), 2));
    if (t.n < t.m) w.row_factor = take(work_at, t.n);
    w.momentum16 = take(work_at, ceil_div(t.rank * mdim, 2));
  } else if (t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
    w.update = take(work_at, t.numel);
  }
  w.mc_stage = take(work_at, mc_stage_floats(t));
  w.kept = kept_at - kept_base;
  w.partials = partials_at - partials_base;
  w.work = work_at - work_base;
  return w;
}

bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The fused passes need mma.sync (sm_80+) and, for the down GEMM's ring, up to 217 KiB
// of shared memory a block: an A100 allows 163 KiB and takes the unfused passes.
bool fused_momentum_available(const Tuning& tuning) {
  return tuning.fused_momentum && at::cuda::getCurrentDeviceProperties()->major >= 8 &&
         smem_optin() >=
             std::max({kDnLaunchSmem<kF32>, kDnLaunchSmem<kBF16>, kDnLaunchSmem<kF16>});
}

// Compressed tensors' n x m update buffers live as long as their batch: a batch
// holds at most 1/kUpdateShare of the call's fp32 parameter bytes of them, half that
// share of 16-bit ones (the buffers are fp32, and exact 16-bit projections add an fp32
// copy of a gradient), or a single tensor's. That bounds the step's extra memory;
// batching them saves the fixed cost of each launch (one batch a tensor: ~190
// launches a pass on 1.35B shapes, 39.0 ms against 32.0 ms a fp32 step). Fused
// tasks hold fp16 copies of P^T, P and M instead, whatever the parameters' dtype: up
// to 1/kFusedShare of the call's parameter bytes (Tuning::fused_share), or kFusedMinBytes.
CallLimits call_limits(const std::vector<Item>& items, const Tuning& tuning) {
  int64_t update_limit = 0, fused_limit = 0, group_limit = 0;
  const int64_t share = tuning.fused_share;
  for (const Item& item : items) {
    group_limit += item.param.numel() * 4 / (4 * kUpdateShare);
    const int64_t elem = item.param.element_size();
    update_limit += item.param.numel() * elem / (elem == 4 ? kUpdateShare : 2 * kUpdateShare);
    fused_limit += item.param.numel() * elem / share;
  }
  const int64_t fused_floor = tuning.fused_min_bytes;
  fused_limit = std::max(fused_limit, fused_floor);
  group_limit = std::max(group_limit, fused_floor / 4);
  CallLimits limits;
  limits.batch = tuning.batch_bytes;
  limits.update = update_limit;
  limits.fused = fused_limit;
  limits.group = group_limit;
  return limits;
}

// Points t at its dense momentum: the float32 tensor, or 8-bit codes and absmax.
void bind_dense_momentum(const GroupEntry& e, Task& t) {
  if (e.state.quantized_momentum()) {
    t.m_codes = e.state.momentum->data_ptr<uint8_t>();
    t.m_absmax = e.state.momentum_absmax->data_ptr<float>();
  } else {
    t.momentum = e.state.momentum->data_ptr<float>();
  }
}

// Fills the Task of `item` (all but its place in the grids and the workspace); returns
// the dynamic shared memory its row stats need (0: none, or the tile passes).
int64_t make_task(const Item& item, const GroupArgs& args, const Tuning& tuning, bool fused_on,
                  int64_t smem_limit, Task& t) {
  const GroupEntry& e = *item.entry;
  const ParamLayout& layout = e.layout;
  const bool row_stats_on = tuning.row_stats;
  const int64_t stages = row_stats_on ? tuning.stats_stages : 0;
  int64_t stats_smem = 0;
  t = Task{};
  t.param = item.param.data_ptr();
  t.grad = item.grad.data_ptr();
  t.numel = item.param.numel();
  t.momentum_kind = static_cast<int32_t>(layout.momentum);
  t.beta2 = e.options.beta2();
  t.base_lr = e.options.base_lr();
  t.rounding_key = rounding_key(e.options.seed, e.options.step,
                                static_cast<int64_t>(item.index));
  t.param_sq = e.param_sq;
  t.p2_known = e.param_sq != nullptr && e.param_sq_known;
  t.stats_p = args.scale_parameter && !t.p2_known;
  const int64_t elem = item.param.element_size();
  const int64_t lane_elems = item.dtype == kF32 ? kLane<kF32> : kLane<kBF16>;
  bool vec = aligned_to(t.param, 16) && aligned_to(t.grad, 16);
  if (layout.factored) {
    t.kind = kFactored;
    t.n = layout.rows;
    t.m = layout.cols;
    t.row = e.state.row_second_moment->data_ptr<float>();
    t.col = e.state.col_second_moment->data_ptr<float>();
    t.ctiles = static_cast<int32_t>(ceil_div(t.m, 32 * lane_elems));
    t.rchunks = static_cast<int32_t>(ceil_div(t.n, kTileRows));
    TORCH_CHECK(ceil_div(t.m, 32 * lane_elems) < INT_MAX && ceil_div(t.n, kTileRows) < INT_MAX,
                "flora: parameter of shape ", item.param.sizes(), " is too large");
    t.tiles = int64_t(t.ctiles) * t.rchunks;
    vec = vec && t.m % lane_elems == 0;
    // Factored momentum is read element by element: no alignment needed.
    if (layout.momentum == MomentumKind::kDense) bind_dense_momentum(e, t);
    t.vec = vec;
    // Fused compressed momentum: TF32 asked for, 16-byte rows of every GEMM operand,
    // round-to-nearest writes (stochastic rounding keeps the unfused passes);
    // projection="orthogonal" only up to r = half of P's long side (the shorter side):
    // W = s R^-T from the Gram of the fp16 P loses about cond(Gram) times its rounding in
    // orthonormality, and the Gram's condition number, ((1 + sqrt(c)) / (1 - sqrt(c)))^2
    // at c = r / long, is 34 at 1/2 and without bound as c nears 1.
    const bool compressed = layout.momentum == MomentumKind::kCompressed;
    // 8-bit compressed momentum: the momentum work forms the new M in float32 in the
    // task's stage (workspace) and writes it back as codes; the down GEMM's epilogue
    // reads the codes four at a time (one 32-bit word).
    const bool codes = compressed && e.state.quantized_momentum();
    if (compressed) t.rank = layout.rank;
    if (codes) {
      t.mc_codes = e.state.momentum->data_ptr<uint8_t>();
      t.mc_absmax = e.state.momentum_absmax->data_ptr<float>();
    }
    // 32-bit index arithmetic in the projection and momentum kernels.
    t.fused = compressed && fused_on && e.options.tf32 && !args.stochastic_rounding &&
              aligned_to(t.param, 16) && aligned_to(t.grad, 16) && aligned_to(t.row, 16) &&
              aligned_to(e.state.momentum->data_ptr(), codes ? 4 : 16) && t.n % 4 == 0 &&
              t.m % 8 == 0 && layout.rank % 8 == 0 &&
              layout.rank * std::max(t.n, t.m) < INT_MAX &&
              (e.options.projection == Projection::kGaussian ||
               2 * layout.rank <= std::min(t.n, t.m));
    t.down_library = t.fused && tuning.down_library && item.dtype != kF32;
    // Dense momentum (row_stats_dense) takes row stats for the row EMA and the column
    // sums only: D = (1 - beta1) U + beta1 M and sum D^2 still come from the rms pass,
    // which also writes M, so the stats pass's sum U^2 goes unused there.
    const bool dense = layout.momentum == MomentumKind::kDense;
    // A row-stats stats pass reads p only where no norm cache exists (else, while the
    // cache is not valid, tile_p2_kernel sums p): its stages then hold the same rows on
    // the first step after a resume as on every later step, and so do the per-stage
    // column sums of rows too wide for register accumulators.
    if (row_stats_on &&
        (layout.momentum == MomentumKind::kNone || t.fused || (dense && tuning.row_stats_dense)))
      stats_smem = plan_row_stats(t, elem, lane_elems, smem_limit, stages,
                                  t.stats_p && t.param_sq == nullptr, tuning.wide_row_regs,
                                  tuning.wide_stats_stages);
    t.needs_rms = !t.row_stats || dense;
    // Without a valid norm cache, sum p^2 of these comes from fused_p2_kernel or
    // tile_p2_kernel (in the apply pass's order) rather than the stats pass.
    if ((t.fused || t.row_stats) && t.param_sq != nullptr && !t.p2_known) t.stats_p = 0;
    if (t.fused) {
      t.gcols = static_cast<int32_t>(ceil_div(t.m, kUpBN));
      t.gtiles = ceil_div(t.n, kUpBM) * t.gcols;
      t.dtiles = down_tiles(t.n, t.m, t.rank);
      if (t.row_stats) t.tiles = 0;  // no tile pass touches it
    }
  } else {
    t.kind = kFull;
    t.n = 1;
    t.m = t.numel;
    t.tiles = ceil_div(t.numel, kThreads * lane_elems * kFullVecsPerThread);
    // 8-bit codes are read a byte at a time: only float32 state needs alignment.
    if (e.state.quantized_second_moment()) {
      t.sm_codes = e.state.second_moment->data_ptr<uint8_t>();
      t.sm_absmax = e.state.second_moment_absmax->data_ptr<float>();
    } else {
      t.second_moment = e.state.second_moment->data_ptr<float>();
      vec = vec && aligned_to(t.second_moment, 16);
    }
    if (layout.momentum == MomentumKind::kDense) {
      bind_dense_momentum(e, t);
      if (t.momentum != nullptr) vec = vec && aligned_to(t.momentum, 16);
    }
  }
  t.vec = vec;
  return stats_smem;
}

// What task t adds to a batch: bytes of gradient and parameter, of fused buffers and
// of an unfused update buffer.
struct TaskBytes {
  int64_t bytes, fused, update;
};

TaskBytes task_bytes(const Item& item, const Task& t) {
  const ParamLayout& layout = item.entry->layout;
  const int64_t elem = item.param.element_size();
  const int64_t bytes = 2 * t.numel * elem;  // of gradient and parameter
  // Fused tasks hold P^T and M in fp16 (r x min(n, m), r x max(n, m)) instead, and
  // the tiled P unless cuBLAS takes their down GEMM.
  const int64_t tiled = t.down_library ? 0 : 2 * tiled_halves(layout.rank, std::min(t.n, t.m));
  const int64_t fused = t.fused ? layout.rank * 2 * (t.n + t.m) + tiled : 0;
  const int64_t update = !t.fused && layout.momentum == MomentumKind::kCompressed
                             ? t.numel * int64_t(sizeof(float))
                             : 0;
  // 8-bit compressed momentum: its float32 stage, in the share of its path.
  const int64_t stage = mc_stage_floats(t) * int64_t(sizeof(float));
  return TaskBytes{bytes, fused + (t.fused ? stage : 0), update + (t.fused ? 0 : stage)};
}

// Tasks in call order, cut into batches of consecutive tasks of one dtype within the
// call's limits.
void plan_batches(const std::vector<Item>& items, const GroupArgs& args, const Tuning& tuning,
                  StepPlan& plan) {
  const bool fused_on = fused_momentum_available(tuning);
  const int64_t smem_limit = tuning.row_stats ? stats_smem_limit() : 0;
  const int64_t limit = plan.limits.batch, update_limit = plan.limits.update;
  const int64_t fused_limit = plan.limits.fused;
  std::vector<Batch>& batches = plan.batches;
  int64_t batch_bytes = 0, batch_update = 0, batch_fused = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    const Item& item = items[k];
    Task& t = plan.tasks[k];
    plan.stats_smem[k] = make_task(item, args, tuning, fused_on, smem_limit, t);
    const auto [bytes, fused, update] = task_bytes(item, t);
    const bool fits = !batches.empty() && items[batches.back().first].dtype == item.dtype &&
                      batch_bytes + bytes <= limit && batch_update + update <= update_limit &&
                      batch_fused + fused <= fused_limit;
    if (!fits) {
      batches.push_back(Batch{});
      batches.back().first = static_cast<int>(k);
      batch_bytes = batch_update = batch_fused = 0;
    }
    batches.back().count += 1;
    if (t.kind == kFactored && !t.row_stats)
      batches.back().tile_partials += 4 * (t.n * t.ctiles + int64_t(t.rchunks) * t.m);
    batch_bytes += bytes;
    batch_update += update;
    batch_fused += fused;
  }
}

// Stats groups: consecutive batches of one dtype share a stats and a finalize pass
// (8 launches of them took bf16 1.35B shapes 2.25 ms against 1.39 ms for one), as
// long as the partial sums of their tasks without row stats (one row of column sums
// every 64 rows) stay within a batch's update share: all of a group's partials are
// in memory at once, and the unfused bf16 step's extra peak went from 2.0% to 4.3%
// without that bound (6.1% with exact projections).
void plan_stats_groups(const std::vector<Item>& items, StepPlan& plan) {
  std::vector<StatsGroup>& groups = plan.groups;
  const std::vector<Batch>& batches = plan.batches;
  const int64_t update_limit = plan.limits.update;
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const Batch& b = batches[bi];
    if (groups.empty() || items[groups.back().first].dtype != items[b.first].dtype ||
        groups.back().tile_partials + b.tile_partials > update_limit) {
      groups.push_back(StatsGroup{});
      groups.back().first_batch = static_cast<int>(bi);
      groups.back().first = b.first;
    }
    groups.back().batches += 1;
    groups.back().count += b.count;
    groups.back().tile_partials += b.tile_partials;
  }
}

// Grids and workspace offsets of each stats group and batch.
void plan_grids(const std::vector<Item>& items, const GroupArgs& args, const Tuning& tuning,
                StepPlan& plan) {
  std::vector<Task>& tasks = plan.tasks;
  std::vector<WorkspacePlan>& plans = plan.plans;
  std::vector<Batch>& batches = plan.batches;
  const std::vector<int64_t>& stats_smem = plan.stats_smem;
  int64_t kept_floats = 0, shared_floats = 0;
  for (StatsGroup& g : plan.groups) {
    int64_t row_stats_bytes = 0;  // of G
    for (int k = g.first; k < g.first + g.count; ++k)
      if (tasks[k].row_stats) row_stats_bytes += tasks[k].numel * items[k].param.element_size();
    int64_t partials_at = 0;
    for (int k = g.first; k < g.first + g.count; ++k) {
      Task& t = tasks[k];
      if (t.row_stats)
        set_block_rows(t, t.m * items[k].param.element_size(), row_stats_bytes,
                       tuning.stats_task_blocks);
      t.fblock_begin = g.fblocks;
      t.sblock_begin = g.sblocks;
      g.sblocks += t.row_stats ? t.rchunks : t.tiles;
      if (wide_row_stats(t.row_stats)) {
        g.smem_wide = std::max(g.smem_wide, stats_smem[k]);
        g.any_wide = true;
      } else {
        g.smem = std::max(g.smem, stats_smem[k]);
        g.any_narrow = true;
      }
      if (stats_quantized(t)) g.any_quantized = true;
      if (t.kind == kFactored) {
        g.fblocks += t.row_stats ? ceil_div(t.m, kRowStatsFinalizeCols)
                                 : ceil_div(t.m, kFinalizeWidth) + ceil_div(t.n, kFinalizeWidth);
        g.any_factored = true;
      }
    }
    TORCH_CHECK(g.fblocks < INT_MAX && g.sblocks < INT_MAX,
                "flora: a batch of parameters needs more blocks than a grid holds");
    for (int bi = g.first_batch; bi < g.first_batch + g.batches; ++bi) {
      Batch& b = batches[bi];
      int64_t work_at = 0;
      for (int k = b.first; k < b.first + b.count; ++k) {
        Task& t = tasks[k];
        t.tile_begin = b.tiles;
        t.gtile_begin = b.gtiles;
        b.tiles += t.tiles;
        b.gtiles += t.gtiles;
        const bool cache_p2 = (t.fused || t.row_stats) && t.param_sq != nullptr &&
                              !t.p2_known && args.scale_parameter;
        b.any_fused_p2 = b.any_fused_p2 || (cache_p2 && t.fused);
        b.any_tile_p2 = b.any_tile_p2 || (cache_p2 && !t.fused);
        b.any_norms = b.any_norms || t.param_sq != nullptr;
        if (t.kind == kFactored) b.any_rms = b.any_rms || t.needs_rms;
        // Kept offsets from the start of the kept region, the others from the shared one.
        plans[k] = plan_workspace(t, kept_floats, partials_at, work_at);
        kept_floats += plans[k].kept;
        partials_at += plans[k].partials;
        work_at += plans[k].work;
      }
      TORCH_CHECK(b.tiles < INT_MAX && b.gtiles < INT_MAX,
                  "flora: a batch of parameters needs more blocks than a grid holds");
      shared_floats = std::max(shared_floats, work_at);
    }
    shared_floats = std::max(shared_floats, partials_at);
  }
  plan.kept_floats = kept_floats;
  plan.shared_floats = shared_floats;
}

// Bytes of temporaries the fused momentum work of item q holds while its group runs:
// the two r x r products; on resample steps also the next P^T and tiled P (fused_down's
// only, not for the library down GEMM of task t), the change
// of basis and M in the next basis; projection="orthogonal" adds W (fp16), Gram' on
// resample steps, W P in fp32 and W's float64 scratch. (The limit of a round; the region itself
// is sized by fused_temp_floats.)
int64_t fused_temp_bytes(const Item& item, const Task& t) {
  const ParamLayout& l = item.entry->layout;
  const StepOptions& o = item.entry->options;
  const int64_t r = l.rank, pdim = std::min(l.rows, l.cols);
  const int64_t mdim = std::max(l.rows, l.cols), once = 8 * r * r;
  const int64_t next_tiled = t.down_library ? 0 : 2 * tiled_halves(r, pdim);
  int64_t bytes = o.plans_resample() ? once + 2 * r * pdim + next_tiled + 4 * r * r + 4 * r * mdim
                                     : once;
  if (o.projection == Projection::kOrthogonal)
    bytes += 2 * r * r + (o.plans_resample() ? 4 * r * r : 0) + 4 * r * pdim +
             4 * basis_work_floats(r, 1);
  return bytes;
}

// Tasks of a fused group of `count` whose library down GEMM runs at once (16-bit gradients,
// Tuning::down_library; else 0): as many as the round limit holds of their scaled P^T and
// fp32 results, which lie beside the group's other temporaries and do not count in the
// rounds (so that a round keeps its groups on the side streams).
int down_chunk(const Item& item, int count, int64_t limit, const Tuning& tuning) {
  if (!tuning.down_library || item.dtype == kF32) return 0;
  return static_cast<int>(
      std::clamp<int64_t>(limit / library_down_task_bytes(item), 1, count));
}

// The compressed-momentum work of every batch, planned with the call so that its
// temporaries and tables are part of the call's one workspace and pinned upload:
// fused tasks in groups of one shape (n, m, rank, resample step or not, projection; call
// order within a group) whose temporaries stay within the group limit (at least one task;
// a group is one launch's grid.y: at most 65535 tasks), their rounds and streams; and
// the largest unfused task's temporaries.
void plan_momentum(const std::vector<Item>& items, const Tuning& tuning, StepPlan& plan) {
  plan.group_at.assign(items.size(), -1);
  const int64_t limit = plan.limits.group;
  const int streams = tuning.side_streams + 1;
  // A round's groups on one stream run one after another, so they share one place in
  // the rounds region (as the caching allocator reused a stream's freed temporaries):
  // each stream's place holds its largest group, the places follow one another.
  size_t round_first = 0;  // the round's first group
  const auto close_round = [&]() {
    std::vector<int64_t> place(streams, 0);
    for (size_t gi = round_first; gi < plan.fused_groups.size(); ++gi) {
      const FusedGroup& g = plan.fused_groups[gi];
      place[g.stream] = std::max(place[g.stream], g.temps_at);  // its floats, for now
    }
    std::vector<int64_t> place_at(streams, 0);
    int64_t round_floats = 0;
    for (int s = 0; s < streams; ++s) {
      place_at[s] = round_floats;
      round_floats += place[s];
    }
    for (size_t gi = round_first; gi < plan.fused_groups.size(); ++gi) {
      FusedGroup& g = plan.fused_groups[gi];
      g.temps_at = place_at[g.stream];
    }
    plan.rounds_floats = std::max(plan.rounds_floats, round_floats);
    round_first = plan.fused_groups.size();
  };
  for (const Batch& b : plan.batches) {
    std::vector<bool> done(b.count, false);
    int turn = 0;  // of the batch's current round
    int64_t round_temps = 0;
    for (int k = b.first; k < b.first + b.count; ++k) {
      const Task& t = plan.tasks[k];
      if (t.momentum_kind != static_cast<int>(MomentumKind::kCompressed)) continue;
      plan.any_gemm = true;
      if (!t.fused) {
        plan.unfused_floats = std::max(plan.unfused_floats, compressed_temp_floats(items[k]));
        continue;
      }
      if (done[k - b.first]) continue;
      const ParamLayout& lk = items[k].entry->layout;
      const bool resample = items[k].entry->options.plans_resample();
      const Projection projection = items[k].entry->options.projection;
      FusedGroup g;
      int64_t group_temps = 0;
      for (int q = k; q < b.first + b.count; ++q) {
        const ParamLayout& lq = items[q].entry->layout;
        if (!plan.tasks[q].fused || done[q - b.first] || lq.rows != lk.rows ||
            lq.cols != lk.cols || lq.rank != lk.rank ||
            items[q].entry->options.plans_resample() != resample ||
            items[q].entry->options.projection != projection)
          continue;
        const int64_t temps = fused_temp_bytes(items[q], plan.tasks[q]);
        if (!g.tasks.empty() && (group_temps + temps > limit || g.tasks.size() == 65535))
          break;
        group_temps += temps;
        done[q - b.first] = true;
        g.tasks.push_back(q);
      }
      // A round holds groups while their temporaries stay within the limit; its groups
      // take the current stream and the side streams in turn.
      if (turn > 0 && round_temps + group_temps > limit) {
        close_round();
        g.new_round = true;
        turn = 0;
        round_temps = 0;
      }
      round_temps += group_temps;
      g.stream = turn++ % streams;
      plan.sides_used = std::max(plan.sides_used, g.stream);
      const int count = static_cast<int>(g.tasks.size());
      g.down_chunk = down_chunk(items[k], count, limit, tuning);
      g.temps_at = fused_temp_floats(items[k], count, g.down_chunk);  // until close_round
      g.table_at = plan.group_table_words;
      plan.group_table_words += fused_table_words(count, resample);
      plan.group_at[k] = static_cast<int>(plan.fused_groups.size());
      plan.fused_groups.push_back(std::move(g));
    }
    close_round();  // a batch ends its last round
  }
}

}  // namespace

std::vector<Item> collect_items(at::TensorList params, at::TensorList grads,
                                const std::vector<GroupEntry>& entries) {
  // Items in call order; empty parameters have nothing to do.
  std::vector<Item> items;
  items.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    if (params[k].numel() == 0) continue;
    Item item;
    item.index = k;
    item.param = params[k].is_contiguous() ? params[k] : params[k].contiguous();
    item.grad = grads[k].is_contiguous() ? grads[k] : grads[k].contiguous();
    item.entry = &entries[k];
    item.dtype = dtype_code(params[k].scalar_type());
    items.push_back(std::move(item));
  }
  return items;
}

GroupArgs group_args(const StepOptions& group) {
  GroupArgs args;
  args.eps1 = static_cast<float>(group.eps1);
  args.beta1 = static_cast<float>(group.beta1);
  args.eps2 = group.eps2;
  args.clip_threshold = group.clip_threshold;
  args.weight_decay = group.weight_decay;
  args.scale_parameter = group.scale_parameter;
  args.stochastic_rounding = group.stochastic_rounding;
  return args;
}

StepPlan plan_step(const std::vector<Item>& items, const GroupArgs& args, const Tuning& tuning) {
  StepPlan plan;
  plan.tasks.resize(items.size());
  plan.plans.resize(items.size());  // batch-local offsets
  plan.stats_smem.assign(items.size(), 0);  // dynamic shared memory, stats pass
  plan.limits = call_limits(items, tuning);
  plan_batches(items, args, tuning, plan);
  plan_stats_groups(items, plan);
  plan_grids(items, args, tuning, plan);
  plan_momentum(items, tuning, plan);
  return plan;
}

void bind_workspace(StepPlan& plan, float* ws, float* kept, const GroupArgs& args) {
  std::vector<Task>& tasks = plan.tasks;
  const std::vector<WorkspacePlan>& plans = plan.plans;
  for (size_t k = 0; k < tasks.size(); ++k) {
    Task& t = tasks[k];
    const WorkspacePlan& w = plans[k];
    if (t.kind == kFactored) {
      t.row_part = ws + w.row_part;
      t.col_part = ws + w.col_part;
      t.col_factor = kept + w.col_factor;
      t.row_block_sum = reinterpret_cast<double*>(kept + w.row_block_sum);
      t.p2_block = reinterpret_cast<double*>(kept + w.p2_block);
    }
    if (t.row_stats) {
      t.w_part = ws + w.w_part;
      t.colblock_d2 = reinterpret_cast<double*>(kept + w.colblock_d2);
    }
    t.tile_p2 = kept + w.tile_p2;
    t.tile_d2 = kept + w.tile_d2;
    if ((t.fused || t.row_stats) && t.param_sq != nullptr && !t.p2_known &&
        args.scale_parameter)
      t.cache_p2 = ws + w.cache_p2;
    t.scalars = ws + w.scalars;
    if (t.fused) {
      t.terms = reinterpret_cast<double*>(ws + w.terms);
      // up(M) = P^T M (left: A = P^T, n x r; B = M) or M P^T (right: A = M; B = P^T,
      // r x m), both fp16 copies in the workspace.
      const uint16_t* plain_t = reinterpret_cast<const uint16_t*>(ws + w.plain_t);
      const uint16_t* momentum16 = reinterpret_cast<const uint16_t*>(ws + w.momentum16);
      const bool left = t.n < t.m;
      t.up_a = left ? plain_t : momentum16;
      t.up_b = left ? momentum16 : plain_t;
    } else if (t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
      t.update = ws + w.update;
    }
    if (t.mc_codes != nullptr) t.mc_stage = ws + w.mc_stage;
  }
}

}  // namespace cuda_detail
}  // namespace flora
