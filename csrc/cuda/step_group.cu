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
#include "../common/quantize.h"
#include "../common/random.h"
#include "quant_io.cuh"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
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

  // Ready for another call on the now current stream, with the same events (a kept
  // capturable plan's: no event is made or destroyed while a graph captures).
  void restart() {
    main_ = at::cuda::getCurrentCUDAStream();
    forked_.record(main_);
    for (at::cuda::CUDAEvent& e : joined_) e.record(main_);
    started_ = false;
    side_used_ = 0;
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
  at::cuda::CUDAStream main_;
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
  // A task each: the W of unfused orthogonal tasks' current and (resample) next bases.
  std::vector<WSlot> unfused_w, unfused_w_next;
  std::vector<WCacheKey> w_left;      // the W of the bases resample steps leave
};

// The W cache's key of a task's projection with `seed` (docs/cuda.md §4).
WCacheKey w_key(const Item& item, int64_t seed, bool fused, int64_t batch) {
  const ParamLayout& layout = item.entry->layout;
  const std::vector<int64_t> shape = layout.projection_shape();
  WCacheKey key;
  key.device = item.param.device().index();
  key.seed = seed;
  key.r = layout.rank;
  key.length = layout.left ? shape[1] : shape[0];  // P's long side
  key.left = layout.left;
  key.fused = fused;
  key.batch = fused ? batch : 0;
  return key;
}

bool orthogonal(const Item& item) {
  return item.entry->options.projection == Projection::kOrthogonal;
}


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
      const bool with_w = !res.unfused_w.empty() && res.unfused_w[k].w.defined();
      const bool with_next = with_w && res.unfused_w_next[k].w.defined();
      const at::Tensor& state = *items[k].entry->state.momentum;
      if (t.mc_codes == nullptr) {
        compressed_momentum(items[k], t, state, res.unfused_temps,
                            with_w ? &res.unfused_w[k] : nullptr,
                            with_next ? &res.unfused_w_next[k] : nullptr);
        continue;
      }
      // 8-bit momentum: read into its float32 stage, stepped there, written back.
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      const at::Tensor stage = at::from_blob(t.mc_stage, state.sizes(),
                                             state.options().dtype(at::kFloat));
      launch_momentum_stage(false, t.mc_stage, t.mc_codes, t.mc_absmax, state.numel(), stream);
      compressed_momentum(items[k], t, stage, res.unfused_temps,
                          with_w ? &res.unfused_w[k] : nullptr,
                          with_next ? &res.unfused_w_next[k] : nullptr);
      launch_momentum_stage(true, t.mc_stage, t.mc_codes, t.mc_absmax, state.numel(), stream);
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

// What a call launches from: its plan, workspace and tables, all made before the first
// launch. A capturable step keeps one from call to call (CapturedCall).
struct PreparedCall {
  std::vector<GroupEntry> entries;  // capturable: the copy that `items` point at
  std::vector<Item> items;
  GroupArgs args{};
  Tuning tuning;
  StepPlan plan;
  CallResources res;
  at::Tensor workspace;  // unless the caller's
  int64_t workspace_floats = 0;
  at::DataPtr host_tables;  // the fused groups' GEMMs read their pointers here
  int64_t tables_bytes = 0;
  uint8_t* device_bytes = nullptr;
  // skip_nonfinite: the call's counter, and one int32 flag a task (Task::skip) after the
  // tables; null without the option.
  int64_t* skip_counter = nullptr;
  int32_t* skip_flags = nullptr;
  // quantization=True: the quant region (Task::sm_next ...: two words a block of 8-bit
  // state) after the flags, zeroed before the stats pass; empty without 8-bit state.
  uint32_t* quant_region = nullptr;
  int64_t quant_words = 0;
};

// Words of the quant region of `tasks`: the new absmax and the changed flag of every
// block of their 8-bit state.
int64_t quant_words_of(const std::vector<Task>& tasks) {
  int64_t words = 0;
  for (const Task& t : tasks) {
    if (t.sm_codes != nullptr) words += 2 * quant_blocks(t.numel);
    if (t.m_codes != nullptr) words += 2 * quant_blocks(t.numel);
  }
  return words;
}

// Points the tasks' 8-bit state at their share of the quant region.
void bind_quant_region(std::vector<Task>& tasks, uint32_t* region) {
  for (Task& t : tasks) {
    const int64_t blocks = quant_blocks(t.numel);
    if (t.sm_codes != nullptr) {
      t.sm_next = region;
      t.sm_changed = reinterpret_cast<int32_t*>(region + blocks);
      region += 2 * blocks;
    }
    if (t.m_codes != nullptr) {
      t.m_next = region;
      t.m_changed = reinterpret_cast<int32_t*>(region + blocks);
      region += 2 * blocks;
    }
  }
}

// The workspace floats of a plan: the shared region (partials, work), the kept region,
// the rounds of fused shape groups, the unfused tasks' temporaries, then the tables.
struct WorkspaceLayout {
  int64_t task_bytes, tables_bytes, rounds_at, unfused_at, tables_at, floats;
};

WorkspaceLayout workspace_layout(const StepPlan& plan) {
  WorkspaceLayout w;
  w.task_bytes = table_bytes(plan.tasks.size());
  w.tables_bytes = w.task_bytes + plan.group_table_words * 8;
  w.rounds_at = plan.shared_floats + plan.kept_floats;
  w.unfused_at = w.rounds_at + ceil_div(plan.rounds_floats, 4) * 4;
  w.tables_at = w.unfused_at + ceil_div(plan.unfused_floats, 4) * 4;
  w.floats = w.tables_at + ceil_div(w.tables_bytes, 16) * 4;
  return w;
}

// Plans `call.items` (collected from call.entries), allocates the workspace (or, when
// `workspace` is given, resizes that one, with `extra_floats` after the tables, and keeps
// no reference to it) and fills the tables in call.host_tables, for one upload.
void prepare_call(PreparedCall& call, const at::Tensor* workspace, int64_t extra_floats = 0) {
  call.tuning = call_tuning();  // read (and checked) before anything runs
  call.plan = plan_step(call.items, call.args, call.tuning);
  StepPlan& plan = call.plan;
  const WorkspaceLayout layout = workspace_layout(plan);
  const int64_t tasks = static_cast<int64_t>(plan.tasks.size());
  const int64_t flag_floats = call.skip_counter ? ceil_div(tasks, 4) * 4 : 0;
  call.quant_words = quant_words_of(plan.tasks);
  const int64_t quant_floats = ceil_div(call.quant_words, 4) * 4;
  at::Tensor workspace_tensor;
  if (workspace != nullptr) {
    workspace->resize_({layout.floats + flag_floats + quant_floats + extra_floats});
    workspace_tensor = *workspace;
  } else {
    call.workspace = workspace_tensor =
        at::empty({layout.floats + flag_floats + quant_floats},
                  call.items[0].param.options().dtype(at::kFloat));
  }
  call.workspace_floats = layout.floats + flag_floats + quant_floats;
  float* ws = workspace_tensor.data_ptr<float>();
  float* kept = ws + plan.shared_floats;
  bind_workspace(plan, ws, kept, call.args);
  if (call.skip_counter != nullptr) {
    call.skip_flags = reinterpret_cast<int32_t*>(ws + layout.floats);
    for (int64_t k = 0; k < tasks; ++k) plan.tasks[k].skip = call.skip_flags + k;
  }
  if (call.quant_words > 0) {
    call.quant_region = reinterpret_cast<uint32_t*>(ws + layout.floats + flag_floats);
    bind_quant_region(plan.tasks, call.quant_region);
  }
  if (std::any_of(plan.tasks.begin(), plan.tasks.end(),
                  [](const Task& t) { return quantized(t) || t.mc_codes != nullptr; }))
    call.args.quant_maps = quant_maps(call.items[0].param.device().index());

  CallResources& res = call.res;
  if (plan.unfused_floats > 0)
    res.unfused_temps = workspace_tensor.narrow(0, layout.unfused_at, plan.unfused_floats);
  call.device_bytes = reinterpret_cast<uint8_t*>(ws + layout.tables_at);  // 16-byte aligned
  call.tables_bytes = layout.tables_bytes;
  call.host_tables = pinned_block(layout.tables_bytes);
  auto* host_bytes = static_cast<uint8_t*>(call.host_tables.get());
  res.table = fill_task_table(plan.tasks, host_bytes, call.device_bytes);
  auto* host_groups = reinterpret_cast<int64_t*>(host_bytes + layout.task_bytes);
  const auto* device_groups =
      reinterpret_cast<const int64_t*>(call.device_bytes + layout.task_bytes);
  res.fused.resize(plan.fused_groups.size());
  for (size_t gi = 0; gi < plan.fused_groups.size(); ++gi) {
    const FusedGroup& g = plan.fused_groups[gi];
    FusedWork& w = res.fused[gi];
    for (const int q : g.tasks) {
      w.items.push_back(&call.items[q]);
      w.tasks.push_back(&plan.tasks[q]);
      const WorkspacePlan& p = plan.plans[q];
      w.bufs.push_back({reinterpret_cast<uint16_t*>(ws + p.plain_t),
                        reinterpret_cast<uint16_t*>(ws + p.momentum16),
                        plan.tasks[q].down_library ? nullptr
                                                   : reinterpret_cast<uint16_t*>(ws + p.tiled),
                        call.items[q].entry->layout.left ? ws + p.row_factor : nullptr});
    }
    w.temps = ws + layout.rounds_at + g.temps_at;
    w.host = host_groups + g.table_at;
    w.device = device_groups + g.table_at;
    w.quant_maps = call.args.quant_maps;
    w.down_chunk = g.down_chunk;
    // projection="orthogonal" (a whole group or none): the cached W of the current and
    // (resample steps) next basis, or a tensor for it.
    const int64_t count = static_cast<int64_t>(g.tasks.size());
    const int64_t batch = count >= call.tuning.min_batched ? count : 1;
    for (const Item* item : w.items) {
      if (!orthogonal(*item)) continue;
      const StepOptions& o = item->entry->options;
      w.wslots.push_back(w_take(w_key(*item, o.seed, true, batch)));
      if (o.plans_resample())
        w.wslots_next.push_back(w_take(w_key(*item, next_seed(o.seed), true, batch)));
    }
    fill_fused_table(w);
  }
  // The unfused orthogonal tasks' W, and the bases every orthogonal resample step leaves.
  for (size_t q = 0; q < call.items.size(); ++q) {
    const Item& item = call.items[q];
    const Task& t = plan.tasks[q];
    if (t.momentum_kind != static_cast<int>(MomentumKind::kCompressed) || !orthogonal(item))
      continue;
    const StepOptions& o = item.entry->options;
    if (!t.fused) {
      if (res.unfused_w.empty()) {
        res.unfused_w.resize(call.items.size());
        res.unfused_w_next.resize(call.items.size());
      }
      res.unfused_w[q] = w_take(w_key(item, o.seed, false, 0));
      if (o.plans_resample())
        res.unfused_w_next[q] = w_take(w_key(item, next_seed(o.seed), false, 0));
    }
    if (item.entry->options.plans_resample())
      res.w_left.push_back(w_key(item, item.entry->options.seed, t.fused, 0));
  }
}

// The cuBLAS workspaces torch gives each stream are allocated (through the caching
// allocator) when the stream first gets the handle: get it now, for every stream a GEMM
// of this call runs on, rather than inside the first GEMM after the stats pass wrote.
// The events of the side streams are made here too (a kept call's first: later ones
// record the same events on the current stream).
void prepare_streams(PreparedCall& call) {
  const StepPlan& plan = call.plan;
  if (plan.any_gemm) at::cuda::getCurrentCUDABlasHandle();
  if (!plan.fused_groups.empty()) {
    if (call.res.rounds) call.res.rounds->restart();
    else call.res.rounds.emplace(plan.sides_used);
    const std::vector<at::cuda::CUDAStream>& sides =
        side_streams(call.items[0].param.device().index(), plan.sides_used);
    for (int s = 0; s < plan.sides_used; ++s) {
      const c10::cuda::CUDAStreamGuard on_side(sides[s]);
      at::cuda::getCurrentCUDABlasHandle();
    }
  }
}

// The passes of a prepared call, on the current stream (and the side streams).
void launch_call(PreparedCall& call) {
  const StepPlan& plan = call.plan;
  const std::vector<Item>& items = call.items;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (call.skip_flags != nullptr) {
    C10_CUDA_CHECK(cudaMemsetAsync(call.skip_flags, 0, plan.tasks.size() * sizeof(int32_t),
                                   stream));
  }
  if (call.quant_region != nullptr) {
    C10_CUDA_CHECK(cudaMemsetAsync(call.quant_region, 0, call.quant_words * sizeof(uint32_t),
                                   stream));
  }
  for (const StatsGroup& g : plan.groups) {
    const TaskTable group_table = call.res.table.slice(g.first, g.count);
    // skip_nonfinite: every flag is known before the stats pass writes any state.
    if (call.skip_flags != nullptr) {
      int64_t max_numel = 0;
      for (int k = g.first; k < g.first + g.count; ++k)
        max_numel = std::max(max_numel, plan.tasks[k].numel);
      launch_nonfinite(items[g.first].dtype, group_table, max_numel, call.skip_counter, stream);
    }
    launch_stats(items[g.first].dtype, group_table, g.sblocks, g.any_narrow ? g.smem : -1,
                 g.any_wide ? g.smem_wide : -1, call.args, g.any_quantized, stream);
    if (g.any_factored) launch_finalize(group_table, g.fblocks, stream);
    for (int bi = g.first_batch; bi < g.first_batch + g.batches; ++bi) {
      const Batch& b = plan.batches[bi];
      launch_batch(items, plan, b, call.res.table.slice(b.first, b.count), call.args, call.res,
                   call.tuning);
    }
  }
  // The new absmax of 8-bit state, once every apply pass has read the old one.
  if (call.quant_region != nullptr) {
    int64_t max_numel = 0;
    for (const Task& t : plan.tasks)
      if (quantized(t)) max_numel = std::max(max_numel, t.numel);
    launch_quant_commit(call.res.table.slice(0, static_cast<int>(plan.tasks.size())), max_numel,
                        stream);
  }
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

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
  // A graph would replay this step's plan, tables and step counts as they are now.
  TORCH_CHECK(!capturing(at::cuda::getCurrentCUDAStream()),
              "flora: capturing opt.step() in a CUDA graph needs Flora(..., capturable=True): "
              "this step plans on the host from host step counts, which every replay would "
              "repeat as they were at capture");
  HostPhase phase;
  phase.begin("flora::plan");
  PreparedCall call;
  call.args = group_args(entries[0].options);
  call.items = collect_items(params, grads, entries);
  if (call.items.empty()) return;
  call.skip_counter = entries[0].nonfinite_skips;
  prepare_call(call, nullptr);
  prepare_streams(call);

  phase.begin("flora::launch");
  upload(call.device_bytes, call.host_tables, call.tables_bytes);
  launch_call(call);
  for (const WCacheKey& key : call.res.w_left) w_drop(key);
  for (const Item& item : call.items) {
    if (!item.param.is_same(params[item.index])) params[item.index].copy_(item.param);
  }
}

// ---- capturable steps (step_group_capturable_; docs/cuda.md, "CUDA graphs") ----------

// A capturable call's prepared call, kept from one call to the next with the same tensors
// and settings: such a call launches the advance kernel and the passes, and plans,
// allocates and uploads nothing, so a CUDA graph can capture it. Its device memory is
// the caller's workspace tensor: the task tables, then the StepCounters.
struct CapturedCall {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> owner;  // the workspace's storage
  std::vector<int64_t> key;
  std::vector<const void*> grads;  // what a graph's capture most often finds changed
  PreparedCall call;
  const StepCounter* counters = nullptr;  // in the workspace
  int count = 0;
  at::DataPtr host_counters;
};

// Everything a prepared capturable call was made for: where every tensor is, their
// shapes and dtypes, and the settings but lr (an argument of the advance kernel).
std::vector<int64_t> captured_key(at::TensorList params, at::TensorList grads,
                                  at::TensorList steps, at::TensorList seeds,
                                  const std::vector<GroupEntry>& entries,
                                  const at::Tensor& workspace,
                                  const std::optional<at::Tensor>& lr_tensor) {
  std::vector<int64_t> key;
  const auto add_ptr = [&](const void* p) { key.push_back(reinterpret_cast<intptr_t>(p)); };
  const auto add_real = [&](double x) {
    int64_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    key.push_back(bits);
  };
  key.push_back(params[0].device().index());
  add_ptr(workspace.data_ptr());
  key.push_back(static_cast<int64_t>(params.size()));
  for (size_t k = 0; k < params.size(); ++k) {
    add_ptr(params[k].data_ptr());
    add_ptr(grads[k].data_ptr());
    add_ptr(steps[k].data_ptr());
    key.push_back(static_cast<int64_t>(params[k].scalar_type()));
    key.push_back(params[k].dim());
    for (const int64_t size : params[k].sizes()) key.push_back(size);
    for (const int64_t stride : params[k].strides()) key.push_back(stride);
    for (const int64_t stride : grads[k].strides()) key.push_back(stride);
    const ParamState& st = entries[k].state;
    for (const auto* t : {&st.row_second_moment, &st.col_second_moment, &st.second_moment,
                          &st.momentum})
      add_ptr(t->has_value() ? (*t)->data_ptr() : nullptr);
  }
  for (const at::Tensor& seed : seeds) add_ptr(seed.data_ptr());
  const bool has_lr = lr_tensor.has_value() && lr_tensor->defined();
  add_ptr(has_lr ? lr_tensor->data_ptr() : nullptr);
  key.push_back(has_lr ? static_cast<int64_t>(lr_tensor->scalar_type()) : -1);
  const StepOptions& o = entries[0].options;
  for (const double x : {o.beta1, o.eps1, o.eps2, o.clip_threshold, o.decay_rate,
                         o.weight_decay})
    add_real(x);
  for (const int64_t x : {o.rank, o.kappa})
    key.push_back(x);
  for (const bool x : {o.scale_parameter, o.relative_step, o.warmup_init,
                       o.factorize_second_moment, o.tf32, o.stochastic_rounding})
    key.push_back(x);
  return key;
}

// Plans a capturable call into `captured` (its workspace resized to hold the tables and
// the counters), uploads its tables and counters. Outside capture only.
void prepare_captured(CapturedCall& captured, at::TensorList params, at::TensorList grads,
                      const std::vector<GroupEntry>& entries, at::TensorList steps,
                      at::TensorList seeds, const at::Tensor& workspace) {
  for (size_t k = 0; k < params.size(); ++k) {
    // A copy made here would be another tensor every call: the plan points at these.
    TORCH_CHECK(params[k].is_contiguous() && grads[k].is_contiguous(),
                "flora: capturable=True needs contiguous parameters and gradients; parameter ",
                k, " (shape ", params[k].sizes(), ") has strides ", params[k].strides(),
                " and its gradient ", grads[k].strides());
  }
  for (const GroupEntry& entry : entries) {
    // Its W would be the one of the seed at capture: the cache works from host seeds.
    TORCH_CHECK(entry.layout.momentum != MomentumKind::kCompressed ||
                    entry.options.projection != Projection::kOrthogonal,
                "flora: projection='orthogonal' is not supported with capturable=True");
  }
  PreparedCall& call = captured.call;
  call.entries = entries;
  call.args = group_args(entries[0].options);
  call.items = collect_items(params, grads, call.entries);
  const int64_t counter_bytes = static_cast<int64_t>(params.size() * sizeof(StepCounter));
  const int64_t counter_floats = ceil_div(counter_bytes, 16) * 4;
  if (call.items.empty()) workspace.resize_({counter_floats});
  else prepare_call(call, &workspace, counter_floats);
  for (const Item& item : call.items) {
    const Task& t = call.plan.tasks[&item - call.items.data()];
    TORCH_CHECK(t.momentum_kind != static_cast<int>(MomentumKind::kCompressed) || t.fused,
                "flora: capturable=True steps compressed momentum on the fused tensor-core "
                "path only (tf32=True, stochastic_rounding=False, 16-byte aligned tensors, "
                "n % 4 == 0, m % 8 == 0, rank % 8 == 0, an sm_80+ GPU with enough shared "
                "memory); parameter ", item.index, " (shape ", item.param.sizes(), ", rank ",
                item.entry->layout.rank, ") would take the unfused path: pass "
                "capturable=False, or settings and shapes that fuse");
  }
  // The counters go after the tables, 16-byte aligned, in the same workspace.
  std::vector<StepCounter> counters(params.size());
  std::vector<int> task_of(params.size(), -1);
  for (size_t q = 0; q < call.items.size(); ++q)
    task_of[call.items[q].index] = static_cast<int>(q);
  std::vector<std::pair<int, int>> fused_at(call.items.size(), {-1, -1});  // group, slot
  for (size_t gi = 0; gi < call.plan.fused_groups.size(); ++gi) {
    const std::vector<int>& tasks = call.plan.fused_groups[gi].tasks;
    for (size_t slot = 0; slot < tasks.size(); ++slot)
      fused_at[tasks[slot]] = {static_cast<int>(gi), static_cast<int>(slot)};
  }
  size_t next_seed_tensor = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    StepCounter& c = counters[k];
    c = StepCounter{};
    c.step = steps[k].data_ptr<int64_t>();
    c.index = static_cast<int64_t>(k);
    if (entries[k].layout.momentum == MomentumKind::kCompressed)
      c.seed = seeds[next_seed_tensor++].data_ptr<int64_t>();
    const int q = task_of[k];
    if (q < 0) continue;
    c.task = const_cast<Task*>(call.res.table.tasks) + q;
    if (fused_at[q].first >= 0)
      c.fused = fused_counter_words(call.res.fused[fused_at[q].first], fused_at[q].second);
  }
  auto* counter_bytes_at =
      reinterpret_cast<uint8_t*>(workspace.data_ptr<float>() + call.workspace_floats);
  captured.host_counters = pinned_block(counter_bytes);
  std::memcpy(captured.host_counters.get(), counters.data(), counter_bytes);
  captured.counters = reinterpret_cast<const StepCounter*>(counter_bytes_at);
  captured.count = static_cast<int>(counters.size());
  if (!call.items.empty()) upload(call.device_bytes, call.host_tables, call.tables_bytes);
  upload(counter_bytes_at, captured.host_counters, counter_bytes);
}

// The prepared calls of capturable steps, one a workspace tensor (a weak reference to its
// storage tells a workspace from a later one at the same address). They hold the
// parameters, gradients and state they were made for: the Python optimizer forgets the
// one of a workspace it drops (forget_capturable). Never destroyed: tensors freed at exit
// could outlive the allocator.
std::mutex captured_mutex;
auto& captured_calls =
    *new std::unordered_map<const c10::StorageImpl*, std::unique_ptr<CapturedCall>>();

void forget_capturable(int64_t workspace_storage) {
  std::lock_guard<std::mutex> lock(captured_mutex);
  captured_calls.erase(reinterpret_cast<const c10::StorageImpl*>(workspace_storage));
}

void run_group_capturable_cuda(at::TensorList params, at::TensorList grads,
                               std::vector<GroupEntry>& entries, at::TensorList steps,
                               at::TensorList seeds, const at::Tensor& workspace,
                               const std::optional<at::Tensor>& lr_tensor) {
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<int64_t> key =
      captured_key(params, grads, steps, seeds, entries, workspace, lr_tensor);
  const c10::StorageImpl* storage = workspace.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(captured_mutex);
  std::unique_ptr<CapturedCall>& slot = captured_calls[storage];
  if (!slot || slot->owner->expired() || slot->key != key) {
    if (capturing(stream)) {
      // Name the gradient that changed: torch's capture examples set the gradients to None
      // before capturing, so that backward makes new ones inside the graph.
      for (size_t k = 0; slot && k < params.size() && k < slot->grads.size(); ++k) {
        TORCH_CHECK(grads[k].data_ptr() == slot->grads[k],
                    "flora: capturable=True: the gradient of parameter ", k, " (shape ",
                    params[k].sizes(), ") is another tensor than at the eager step that "
                    "prepared this step's plan; a CUDA graph captures a step with the very "
                    "gradient tensors of the eager step before it: keep them between the "
                    "warm-up and the capture (zero_grad(set_to_none=False), or no zero_grad "
                    "before the capture), or run one eager opt.step() with the new ones "
                    "before capturing");
      }
      TORCH_CHECK(false,
                  "flora: capturable=True: a CUDA graph captures a step that an eager step "
                  "with the same parameters, gradients, state and settings prepared (its "
                  "plan and tables); run one eager opt.step() right before capturing "
                  "(torch.cuda.graph's warm-up on a side stream does), and capture again "
                  "after any of them changes");
    }
    slot.reset();
    for (auto it = captured_calls.begin(); it != captured_calls.end();) {
      if (it->second && it->second->owner->expired()) it = captured_calls.erase(it);
      else ++it;
    }
    auto fresh = std::make_unique<CapturedCall>();
    prepare_captured(*fresh, params, grads, entries, steps, seeds, workspace);
    fresh->owner.emplace(workspace.storage().getWeakStorageImpl());
    fresh->key = captured_key(params, grads, steps, seeds, entries, workspace, lr_tensor);
    for (const at::Tensor& grad : grads) fresh->grads.push_back(grad.data_ptr());
    captured_calls[storage] = std::move(fresh);
  }
  CapturedCall& captured = *captured_calls[storage];
  PreparedCall& call = captured.call;
  const StepOptions& o = entries[0].options;
  AdvanceArgs args{};
  args.lr = o.lr;
  args.decay_rate = o.decay_rate;
  args.kappa = o.kappa;
  args.relative_step = o.relative_step;
  args.warmup_init = o.warmup_init;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    if (lr_tensor->scalar_type() == at::kDouble) args.lr_f64 = lr_tensor->data_ptr<double>();
    else args.lr_f32 = lr_tensor->data_ptr<float>();
  }
  if (!call.items.empty()) prepare_streams(call);
  launch_advance(captured.counters, captured.count, args, stream);
  if (!call.items.empty()) launch_call(call);
}

}  // namespace
}  // namespace cuda_detail
}  // namespace flora

// No tensor argument: a catch-all kernel. Takes workspace.untyped_storage()._cdata.
TORCH_LIBRARY_FRAGMENT(flora, m) {
  m.def("forget_capturable(int workspace_storage) -> ()",
        &flora::cuda_detail::forget_capturable);
  // Test hooks of the W cache (docs/cuda.md §4): entries dropped / cached.
  m.def("_clear_orthogonal_cache() -> int", &flora::cuda_detail::w_cache_clear);
  m.def("_orthogonal_cache_entries() -> int", &flora::cuda_detail::w_cache_entries);
}

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("step_", &flora::detail::step_op<&flora::cuda_detail::run_group_cuda>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::cuda_detail::run_group_cuda>);
  m.impl("step_group_capturable_",
         &flora::detail::step_group_capturable_op<
             &flora::cuda_detail::run_group_capturable_cuda>);
  m.impl("fill_projection_", &flora::cuda_detail::fill_projection_cuda);
}
