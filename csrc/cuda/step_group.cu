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
//   nonfinite (skip_nonfinite only) a flag a task whose G holds a NaN or inf, counted on
//            the device; every pass below that writes params or state honours it
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

// The tables of a call on the device: the Task descriptors, then the tasks' first
// tiles, first finalize blocks, first stats blocks and first up-GEMM tiles, then the
// fused shape groups' tables (fill_fused_table).
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

// Bytes of the task table of `count` tasks (a multiple of 8: the group tables follow).
int64_t table_bytes(size_t count) {
  static_assert(sizeof(Task) % sizeof(int64_t) == 0, "begins follow the tasks aligned");
  return static_cast<int64_t>(count * (sizeof(Task) + 4 * sizeof(int64_t)));
}

// Writes every task descriptor, then the tasks' first tiles, first finalize blocks,
// first stats blocks and first up-GEMM tiles, at `host_bytes` (the call's pinned block;
// one copy takes them to `device_bytes` with the group tables).
DeviceTable fill_task_table(const std::vector<Task>& tasks, uint8_t* host_bytes,
                            const uint8_t* device_bytes) {
  const size_t count = tasks.size();
  std::memcpy(host_bytes, tasks.data(), count * sizeof(Task));
  auto* host_begins = reinterpret_cast<int64_t*>(host_bytes + count * sizeof(Task));
  for (size_t k = 0; k < count; ++k) {
    host_begins[k] = tasks[k].tile_begin;
    host_begins[count + k] = tasks[k].fblock_begin;
    host_begins[2 * count + k] = tasks[k].sblock_begin;
    host_begins[3 * count + k] = tasks[k].gtile_begin;
  }
  return DeviceTable{reinterpret_cast<const Task*>(device_bytes),
                     reinterpret_cast<const int64_t*>(device_bytes + count * sizeof(Task)),
                     count};
}

// Runs the fused shape groups on the streams the plan gave them (plan_momentum): the
// groups of a round take turns on the current stream and the side streams, so that the
// down GEMM of one fills the last wave of another's, and their small kernels and r x r
// products overlap (one stream paid ~0.2 ms of tails and small launches a batch). A new
// round, and the work after a batch's momentum, waits for the side streams. Results do
// not depend on the order: every reduction is fixed.
class StreamRounds {
 public:
  StreamRounds(int sides)
      : main_(at::cuda::getCurrentCUDAStream()),
        side_(side_streams(main_.device_index(), sides)),
        joined_(sides) {
    // Events are created when first recorded: create them now, before the first write,
    // with every other resource of the call.
    forked_.record(main_);
    for (at::cuda::CUDAEvent& e : joined_) e.record(main_);
  }

  // The stream of shape group g.
  at::cuda::CUDAStream stream_for(const FusedGroup& g) {
    if (g.new_round) join();
    // Side streams of a round start after what the current stream queued before
    // it (the scalars, or the last join).
    if (!started_) {
      forked_.record(main_);
      started_ = true;
    }
    for (; side_used_ < g.stream; ++side_used_) forked_.block(side_[side_used_]);
    return g.stream == 0 ? main_ : side_[g.stream - 1];
  }

  // The current stream waits for the side streams used.
  void join() {
    for (int s = 0; s < side_used_; ++s) {
      joined_[s].record(side_[s]);
      joined_[s].block(main_);
    }
    started_ = false;
    side_used_ = 0;
  }

 private:
  const at::cuda::CUDAStream main_;
  const std::vector<at::cuda::CUDAStream>& side_;
  std::vector<at::cuda::CUDAEvent> joined_;
  at::cuda::CUDAEvent forked_;
  bool started_ = false;
  int side_used_ = 0;
};

// What the launches of a call use besides its plan: all of it allocated before the
// first launch.
struct CallResources {
  DeviceTable table;
  std::vector<FusedWork> fused;       // one a plan.fused_groups entry
  std::optional<StreamRounds> rounds;  // when there are fused groups
  at::Tensor unfused_temps;           // fp32, plan.unfused_floats
};

// The compressed-momentum work of batch b, between its scalars and rms passes: its
// fused shape groups (plan_momentum) and unfused tasks, in call order.
void compressed_work(const std::vector<Item>& items, const StepPlan& plan, const Batch& b,
                     CallResources& res, const Tuning& tuning) {
  for (int k = b.first; k < b.first + b.count; ++k) {
    const Task& t = plan.tasks[k];
    const int group = plan.group_at[k];
    if (group >= 0) {
      const c10::cuda::CUDAStreamGuard on_turn(
          res.rounds->stream_for(plan.fused_groups[group]));
      fused_momentum_group(res.fused[group], tuning.min_batched);
    } else if (!t.fused && t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
      compressed_momentum(items[k], t, *items[k].entry->state.momentum, res.unfused_temps);
    }
  }
  if (res.rounds) res.rounds->join();
}

// The passes over one batch; the compressed-momentum work needs the scalars and must
// come before the rms pass.
void launch_batch(const std::vector<Item>& items, const StepPlan& plan, const Batch& b,
                  const TaskTable& table, const GroupArgs& args, CallResources& res,
                  const Tuning& tuning) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int dtype = items[b.first].dtype;
  if (b.any_fused_p2) launch_fused_p2(dtype, table, b.gtiles, stream);
  if (b.any_tile_p2) launch_tile_p2(dtype, table, b.tiles, stream);
  launch_scalars(table, args, stream);
  compressed_work(items, plan, b, res, tuning);
  if (b.any_rms) {
    launch_rms(dtype, table, b.tiles, args, stream);
    launch_clip(table, args, stream);
  }
  if (b.gtiles > 0) launch_fused_clip(table, args, stream);
  launch_apply(dtype, table, b.tiles, args, stream);
  if (b.gtiles > 0) launch_fused_apply(dtype, table, b.gtiles, args, stream);
  if (b.any_norms) launch_norms(dtype, table, args, stream);
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
//
// A step must leave params and state as they were when it fails, and a CUDA
// out-of-memory is the failure that can come mid-step. So everything the call
// allocates comes before the first kernel that writes params or state (the stats
// pass): one device workspace for all batches (each batch and round reuses its share),
// the fused groups' and unfused tasks' temporaries, one pinned block for every table,
// the cuBLAS workspaces torch gives each stream a GEMM runs on, and the events of the
// side streams. After the first launch nothing allocates.
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

  // The workspace: the shared region (partials, work), the kept region, the rounds of
  // fused shape groups, the unfused tasks' temporaries, then the tables.
  const int64_t task_bytes = table_bytes(plan.tasks.size());
  const int64_t tables_bytes = task_bytes + plan.group_table_words * 8;
  const int64_t rounds_at = plan.shared_floats + plan.kept_floats;
  const int64_t unfused_at = rounds_at + ceil_div(plan.rounds_floats, 4) * 4;
  const int64_t tables_at = unfused_at + ceil_div(plan.unfused_floats, 4) * 4;
  // skip_nonfinite: one int32 flag a task (Task::skip), after the tables.
  int64_t* const skip_counter = entries[0].nonfinite_skips;
  const int64_t flags_at = tables_at + ceil_div(tables_bytes, 16) * 4;
  const int64_t flag_floats = skip_counter ? ceil_div(static_cast<int64_t>(plan.tasks.size()), 4) * 4 : 0;
  const int64_t workspace_floats = flags_at + flag_floats;
  const auto f32 = items[0].param.options().dtype(at::kFloat);
  at::Tensor workspace = at::empty({workspace_floats}, f32);
  float* ws = workspace.data_ptr<float>();
  float* kept = ws + plan.shared_floats;
  bind_workspace(plan, ws, kept, args);
  int32_t* const skip_flags = skip_counter ? reinterpret_cast<int32_t*>(ws + flags_at) : nullptr;
  if (skip_flags != nullptr) {
    for (size_t k = 0; k < plan.tasks.size(); ++k) plan.tasks[k].skip = skip_flags + k;
  }

  CallResources res;
  if (plan.unfused_floats > 0)
    res.unfused_temps = workspace.narrow(0, unfused_at, plan.unfused_floats);
  auto* device_bytes = reinterpret_cast<uint8_t*>(ws + tables_at);  // 16-byte aligned
  const at::DataPtr host_tables = pinned_block(tables_bytes);
  auto* host_bytes = static_cast<uint8_t*>(host_tables.get());
  res.table = fill_task_table(plan.tasks, host_bytes, device_bytes);
  auto* host_groups = reinterpret_cast<int64_t*>(host_bytes + task_bytes);
  const auto* device_groups = reinterpret_cast<const int64_t*>(device_bytes + task_bytes);
  res.fused.resize(plan.fused_groups.size());
  for (size_t gi = 0; gi < plan.fused_groups.size(); ++gi) {
    const FusedGroup& g = plan.fused_groups[gi];
    FusedWork& w = res.fused[gi];
    for (const int q : g.tasks) {
      w.items.push_back(&items[q]);
      w.tasks.push_back(&plan.tasks[q]);
      const WorkspacePlan& p = plan.plans[q];
      w.bufs.push_back({reinterpret_cast<uint16_t*>(ws + p.plain_t),
                        reinterpret_cast<uint16_t*>(ws + p.momentum16),
                        reinterpret_cast<uint16_t*>(ws + p.tiled),
                        items[q].entry->layout.left ? ws + p.row_factor : nullptr});
    }
    w.temps = ws + rounds_at + g.temps_at;
    w.host = host_groups + g.table_at;
    w.device = device_groups + g.table_at;
    fill_fused_table(w);
  }
  // torch gives each stream its own cuBLAS workspace, allocated (through the caching
  // allocator) when the stream first gets the handle: now, for every stream a GEMM of
  // this call runs on, rather than inside the first GEMM after the stats pass wrote.
  if (plan.any_gemm) at::cuda::getCurrentCUDABlasHandle();
  if (!plan.fused_groups.empty()) {
    res.rounds.emplace(plan.sides_used);
    const std::vector<at::cuda::CUDAStream>& sides =
        side_streams(params[0].device().index(), plan.sides_used);
    for (int s = 0; s < plan.sides_used; ++s) {
      const c10::cuda::CUDAStreamGuard on_side(sides[s]);
      at::cuda::getCurrentCUDABlasHandle();
    }
  }

  phase.begin("flora::launch");
  upload(device_bytes, host_tables, tables_bytes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (skip_flags != nullptr) {
    C10_CUDA_CHECK(cudaMemsetAsync(skip_flags, 0, plan.tasks.size() * sizeof(int32_t), stream));
  }
  for (const StatsGroup& g : plan.groups) {
    const TaskTable group_table = res.table.slice(g.first, g.count);
    // skip_nonfinite: every flag is known before the stats pass writes any state.
    if (skip_flags != nullptr) {
      int64_t max_numel = 0;
      for (int k = g.first; k < g.first + g.count; ++k)
        max_numel = std::max(max_numel, plan.tasks[k].numel);
      launch_nonfinite(items[g.first].dtype, group_table, max_numel, skip_counter, stream);
    }
    launch_stats(items[g.first].dtype, group_table, g.sblocks, g.smem, args, stream);
    if (g.any_factored) launch_finalize(group_table, g.fblocks, stream);
    for (int bi = g.first_batch; bi < g.first_batch + g.batches; ++bi) {
      const Batch& b = plan.batches[bi];
      launch_batch(items, plan, b, res.table.slice(b.first, b.count), args, res, tuning);
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
