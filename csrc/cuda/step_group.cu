// The host driver of the CUDA path (torch.ops.flora.step_ / step_group_ on CUDA).
//
// A step_group_ call steps its parameters in batches: consecutive parameters of
// one dtype (FLORA_BATCH_BYTES of gradients and parameters, default 16 GiB;
// compressed tensors' momentum buffers within 1/40 of the call's parameter bytes,
// 1/80 of 16-bit ones unless fused).
// Every pass over a batch is one launch
// over all its tensors (a table of Task descriptors; a block finds its task by a
// search staged in shared memory), so a model of many small tensors costs a
// handful of launches. Passes:
//   stats    row/column sums of G^2 + eps1 and sum p^2 (factored), or the full
//            second moment, dense momentum and their sums (unfactored). Factored
//            tensors without momentum or with fused compressed momentum take whole
//            rows a block ("row stats"): the row EMA is final within the block, so
//            the block also sums G^2 / row over its rows for every column, and
//            sum U^2 follows in the finalize pass without reading G again.
//   finalize row/col EMAs, column factors, per-256-row partial sums
//   scalars  mean of the row EMA, the step size of each tensor, and the clip
//            factor of every tensor whose sum D^2 is already known
//   (compressed momentum: projections regenerated with cuRAND Philox. Fused (TF32,
//    the default), per shape: Gram = P P^T and M M^T batched in cuBLAS, then the down
//    GEMM on the tensor cores (wgmma in sm_90a code, mma.sync in other targets), which
//    turns G into U in shared memory and leaves the terms of sum D^2, M in fp16 and the
//    new M in its epilogue. Unfused: cuBLAS GEMMs
//    with down(U) = (P diag a) G diag b, and an n x m buffer of beta1 up(M))
//   rms      sum of D^2 (or U^2, fused) of the other factored tensors
//   clip     their RMS clip factor (fused: from sum U^2 and the momentum terms)
//   apply    p = p - decay p - lr D / clip, written once (stochastic rounding optional);
//            fused tensors: the up GEMM on the tensor cores with this as its epilogue
// All reductions have a fixed order, so results do not depend on scheduling.
//
// Files: stats.cu, finalize.cu, apply.cu, projection.cu, fused_momentum.cu,
// down_gemm.cu, fused_apply.cu hold the kernels of each pass and their launch functions
// (launch.h); planning.cu the Tasks, batches and workspace; tuning.cu the Tuning.
#include "launch.h"
#include "planning.h"
#include "tuning.h"
#include "flora/ops.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

namespace flora {
namespace cuda_detail {
namespace {

// The task table of a call on the device: the Task descriptors, then the tasks' first
// tiles, first finalize blocks, first stats blocks and first up-GEMM tiles.
struct DeviceTable {
  const Task* tasks;
  const int64_t* begins;
  size_t count;

  // The table of `n` tasks from task `first`.
  TaskTable slice(int first, int n) const {
    return TaskTable{tasks + first, begins + first, begins + count + first,
                     begins + 2 * count + first, begins + 3 * count + first, n};
  }
};

// Bytes of the task table of `count` tasks.
int64_t table_bytes(size_t count) {
  static_assert(sizeof(Task) % sizeof(int64_t) == 0, "begins follow the tasks aligned");
  return static_cast<int64_t>(count * (sizeof(Task) + 4 * sizeof(int64_t)));
}

// One host-to-device copy (pinned, asynchronous) of every task descriptor, then
// of the tasks' first tiles, first finalize blocks and first stats blocks.
DeviceTable upload_tasks(const std::vector<Task>& tasks, uint8_t* device_bytes) {
  const size_t count = tasks.size();
  const int64_t bytes = table_bytes(count);
  const at::DataPtr host_table = pinned_block(bytes);
  auto* host_bytes = static_cast<uint8_t*>(host_table.get());
  std::memcpy(host_bytes, tasks.data(), count * sizeof(Task));
  auto* host_begins = reinterpret_cast<int64_t*>(host_bytes + count * sizeof(Task));
  for (size_t k = 0; k < count; ++k) {
    host_begins[k] = tasks[k].tile_begin;
    host_begins[count + k] = tasks[k].fblock_begin;
    host_begins[2 * count + k] = tasks[k].sblock_begin;
    host_begins[3 * count + k] = tasks[k].gtile_begin;
  }
  upload(device_bytes, host_table, bytes);
  return DeviceTable{reinterpret_cast<const Task*>(device_bytes),
                     reinterpret_cast<const int64_t*>(device_bytes + count * sizeof(Task)),
                     count};
}

// Shape groups take turns on the current stream and `sides` side streams, as many at
// a time as their temporaries together stay within `limit`: the down GEMM of one fills
// the last wave of another's, and their small kernels and r x r products overlap (one
// stream paid ~0.2 ms of tails and small launches a batch). Results do not depend on
// the order: every reduction is fixed.
class StreamRounds {
 public:
  StreamRounds(int sides, int64_t limit)
      : main_(at::cuda::getCurrentCUDAStream()),
        side_(side_streams(main_.device_index(), sides)),
        sides_(sides),
        limit_(limit) {}

  // The stream of the next shape group, whose temporaries take `temps` bytes.
  at::cuda::CUDAStream stream_for(int64_t temps) {
    if (turn_ > 0 && turn_temps_ + temps > limit_) join();
    // Side streams of a round start after what the current stream queued before
    // it (the scalars, or the last join).
    if (turn_ == 0) forked_.record(main_);
    turn_temps_ += temps;
    const int s = turn_++ % (sides_ + 1);
    if (s == 0) return main_;
    if (s > side_used_) {
      forked_.block(side_[s - 1]);
      side_used_ = s;
    }
    return side_[s - 1];
  }

  // The current stream waits for the side streams used.
  void join() {
    for (int s = 0; s < side_used_; ++s) {
      at::cuda::CUDAEvent joined;
      joined.record(side_[s]);
      joined.block(main_);
    }
    turn_ = side_used_ = 0;
    turn_temps_ = 0;
  }

 private:
  const at::cuda::CUDAStream main_;
  const std::vector<at::cuda::CUDAStream>& side_;
  const int sides_;
  const int64_t limit_;
  int turn_ = 0, side_used_ = 0;
  int64_t turn_temps_ = 0;
  at::cuda::CUDAEvent forked_;
};

// The fused tasks from k on of batch b with k's shape (n, m, rank, resample step or
// not), in call order, whose temporaries together stay within the group limit (at
// least one), marked done; their Items, Tasks and buffers; returns their temporaries.
int64_t take_shape_group(const std::vector<Item>& items, const StepPlan& plan, const Batch& b,
                         int k, float* ws, std::vector<bool>& done,
                         std::vector<const Item*>& group_items,
                         std::vector<const Task*>& group_tasks,
                         std::vector<FusedBuffers>& group_bufs) {
  const ParamLayout& lk = items[k].entry->layout;
  int64_t group_temps = 0;
  for (int q = k; q < b.first + b.count; ++q) {
    const ParamLayout& lq = items[q].entry->layout;
    if (!plan.tasks[q].fused || done[q - b.first] || lq.rows != lk.rows ||
        lq.cols != lk.cols || lq.rank != lk.rank ||
        items[q].entry->options.resample() != items[k].entry->options.resample())
      continue;
    const int64_t temps = fused_temp_bytes(items[q]);
    if (!group_items.empty() &&
        (group_temps + temps > plan.limits.group || group_items.size() == 65535))
      break;
    group_temps += temps;
    done[q - b.first] = true;
    group_items.push_back(&items[q]);
    group_tasks.push_back(&plan.tasks[q]);
    const WorkspacePlan& w = plan.plans[q];
    group_bufs.push_back({reinterpret_cast<uint16_t*>(ws + w.plain_t),
                          reinterpret_cast<uint16_t*>(ws + w.momentum16),
                          reinterpret_cast<uint16_t*>(ws + w.tiled),
                          lq.left ? ws + w.row_factor : nullptr});
  }
  return group_temps;
}

// The compressed-momentum work of batch b, between its scalars and rms passes.
// Fused tasks in groups of one shape (in call order within a group) whose
// temporaries (two r x r products; on resample steps also the next P^T, the
// change of basis and M in the next basis) stay within a quarter of the update
// share of the call's parameters counted as fp32 (they do not shrink with them),
// or of kFusedMinBytes. A group is one launch's grid.y: at most 65535 tasks.
void compressed_work(const std::vector<Item>& items, const StepPlan& plan, const Batch& b,
                     float* ws, const Tuning& tuning) {
  StreamRounds rounds(tuning.side_streams, plan.limits.group);
  std::vector<bool> done(b.count, false);
  for (int k = b.first; k < b.first + b.count; ++k) {
    const Task& t = plan.tasks[k];
    if (t.fused) {
      if (done[k - b.first]) continue;
      std::vector<const Item*> group_items;
      std::vector<const Task*> group_tasks;
      std::vector<FusedBuffers> group_bufs;
      const int64_t group_temps = take_shape_group(items, plan, b, k, ws, done, group_items,
                                                   group_tasks, group_bufs);
      const c10::cuda::CUDAStreamGuard on_turn(rounds.stream_for(group_temps));
      fused_momentum_group(group_items, group_tasks, group_bufs, tuning.min_batched);
    } else if (t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
      compressed_momentum(items[k], t, *items[k].entry->state.momentum);
    }
  }
  rounds.join();
}

// The passes over one batch; the compressed-momentum work needs the scalars and must
// come before the rms pass.
void launch_batch(const std::vector<Item>& items, const StepPlan& plan, const Batch& b,
                  const TaskTable& table, const GroupArgs& args, float* ws,
                  const Tuning& tuning) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int dtype = items[b.first].dtype;
  if (b.any_fused_p2) launch_fused_p2(dtype, table, b.gtiles, stream);
  if (b.any_tile_p2) launch_tile_p2(dtype, table, b.tiles, stream);
  launch_scalars(table, args, stream);
  compressed_work(items, plan, b, ws, tuning);
  if (b.any_rms) {
    launch_rms(dtype, table, b.tiles, args, stream);
    launch_clip(table, args, stream);
  }
  if (b.gtiles > 0) launch_fused_clip(table, args, stream);
  launch_apply(dtype, table, b.tiles, args, stream);
  if (b.gtiles > 0) launch_fused_apply(dtype, table, b.gtiles, args, stream);
  if (b.any_norms) launch_norms(table, stream);
}

// Host phases, for torch.profiler (benchmarks/probes/host_trace.py): planning, then launches.
class HostPhase {
 public:
  void begin(const char* name) {
    phase_.reset();
    if (at::hasCallbacks()) {
      phase_.emplace(at::RecordScope::USER_SCOPE);
      if (phase_->isActive())
        phase_->before(std::string_view(name), c10::ArrayRef<const c10::IValue>{});
    }
  }

 private:
  std::optional<at::RecordFunction> phase_;
};

// Every parameter of a call whose inputs the checks accepted.
void run_group_cuda(at::TensorList params, at::TensorList grads,
                    const std::vector<GroupEntry>& entries) {
  c10::cuda::CUDAGuard guard(params[0].device());
  HostPhase phase;
  phase.begin("flora::plan");
  const GroupArgs args = group_args(entries[0].options);
  const std::vector<Item> items = collect_items(params, grads, entries);
  if (items.empty()) return;
  const Tuning tuning = call_tuning();  // read (and checked) before anything runs
  StepPlan plan = plan_step(items, args, tuning);

  // The workspace: the shared region (partials, work), the kept region, then the
  // task table.
  const int64_t workspace_floats = plan.shared_floats + plan.kept_floats +
                                   ceil_div(table_bytes(plan.tasks.size()), 16) * 4;
  const auto f32 = items[0].param.options().dtype(at::kFloat);
  at::Tensor workspace = at::empty({workspace_floats}, f32);
  float* ws = workspace.data_ptr<float>();
  float* kept = ws + plan.shared_floats;
  bind_workspace(plan, ws, kept, args);

  phase.begin("flora::launch");
  auto* device_bytes = reinterpret_cast<uint8_t*>(kept + plan.kept_floats);  // 16-byte aligned
  const DeviceTable device_table = upload_tasks(plan.tasks, device_bytes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const StatsGroup& g : plan.groups) {
    const TaskTable group_table = device_table.slice(g.first, g.count);
    launch_stats(items[g.first].dtype, group_table, g.sblocks, g.smem, args, stream);
    if (g.any_factored) launch_finalize(group_table, g.fblocks, stream);
    for (int bi = g.first_batch; bi < g.first_batch + g.batches; ++bi) {
      const Batch& b = plan.batches[bi];
      launch_batch(items, plan, b, device_table.slice(b.first, b.count), args, ws, tuning);
    }
  }
  for (const Item& item : items) {
    if (!item.param.is_same(params[item.index])) params[item.index].copy_(item.param);
  }
}

}  // namespace
}  // namespace cuda_detail
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("step_", &flora::detail::step_op<&flora::cuda_detail::run_group_cuda>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::cuda_detail::run_group_cuda>);
  m.impl("fill_projection_", &flora::cuda_detail::fill_projection_cuda);
}
