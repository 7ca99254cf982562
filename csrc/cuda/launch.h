// What the files of csrc/cuda offer one another: the launch functions of each pass (the
// kernels stay in the file that defines and instantiates them), the momentum work, and
// the host helpers. The host driver (step_group.cu) sees no kernel body.
#pragma once

#include "config.cuh"
#include "task_table.cuh"
#include "flora/ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/Allocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace flora {
namespace cuda_detail {

// f(std::integral_constant<int, DT>{}) for a run-time dtype code: the one switch from
// the codes to the kernels' template argument.
template <typename F>
inline void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32:
      f(std::integral_constant<int, kF32>{});
      break;
    case kBF16:
      f(std::integral_constant<int, kBF16>{});
      break;
    default:
      f(std::integral_constant<int, kF16>{});
      break;
  }
}

// Shared memory beyond 48 KiB must be allowed per kernel (and device) before a launch
// asks for it: cudaFuncSetAttribute once a kernel, device and size (a call a launch
// cost ~3 us of host time, 37 calls a step on 0.1B shapes).
template <typename Kernel>
inline void allow_smem(Kernel kernel, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel),
                                        static_cast<int>(c10::cuda::current_device())};
  std::lock_guard<std::mutex> lock(mutex);
  int64_t& done = allowed[key];
  if (done >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  done = bytes;
}

// The tiles of a fused task's down GEMM (kUpBM outputs along max(n, m) by kDnBN of the
// rank each): one partial sum of the momentum terms each.
inline int64_t down_tiles(int64_t n, int64_t m, int64_t rank) {
  return ceil_div(std::max(n, m), kUpBM) * ceil_div(rank, kDnBN);
}

// A parameter of the call, ready for the kernels.
struct Item {
  size_t index;           // in the call
  at::Tensor param;       // contiguous (a copy when the parameter is not)
  at::Tensor grad;        // contiguous
  const GroupEntry* entry;
  int dtype;
};

// A fused task's fp16 operands of the up GEMM, in the batch workspace.
struct FusedBuffers {
  uint16_t* plain_t;     // P^T
  uint16_t* momentum16;  // M before this step
  uint16_t* tiled;       // P as the sm_90a down GEMM reads it (tiled_index)
  float* row_factor;     // left: a_i of every row
};

// ---- kernel launches, on `stream` (dtype: a DType code) ----

// stats.cu: with skip_nonfinite, the flag of each task whose gradient is not finite, and
// `counter` (int64) counts them (max_numel: the largest gradient of the table).
// quantization=True: takes the new absmax of every changed block of the tasks' 8-bit
// state (quant_io.cuh), after the last apply pass.
void launch_quant_commit(const TaskTable& table, int64_t max_numel, cudaStream_t stream);
// quantize.cu, 8-bit compressed momentum: the DownJobs of a fused shape group (`count`
// tasks of `numel` momentum elements; jobs without codes are left alone): requantize
// writes each stage back into its codes (requantize_blockwise_'s rule), else the codes
// are read into the stage. launch_momentum_stage does the same for one unfused task.
void launch_momentum_codes(bool requantize, const DownJob* jobs, int count, int64_t numel,
                           cudaStream_t stream);
void launch_momentum_stage(bool requantize, float* stage, uint8_t* codes, float* absmax,
                           int64_t numel, cudaStream_t stream);

void launch_nonfinite(int dtype, const TaskTable& table, int64_t max_numel, int64_t* counter,
                      cudaStream_t stream);
// stats.cu: the stats pass of a stats group (`smem`: dynamic shared memory a block of
// the tasks with narrow rows or none; `smem_wide`, that of the row-stats tasks with rows
// past 6144 columns, which a launch of their own takes; -1: no such tasks);
// any_quantized: some unfactored task keeps 8-bit state (another launch takes those).
void launch_stats(int dtype, const TaskTable& table, int64_t blocks, int64_t smem,
                  int64_t smem_wide, const GroupArgs& args, bool any_quantized,
                  cudaStream_t stream);
// finalize.cu: the EMAs of factored tensors, then one block a task each.
void launch_finalize(const TaskTable& table, int64_t blocks, cudaStream_t stream);
void launch_scalars(const TaskTable& table, const GroupArgs& args, cudaStream_t stream);
void launch_clip(const TaskTable& table, const GroupArgs& args, cudaStream_t stream);
void launch_fused_clip(const TaskTable& table, const GroupArgs& args, cudaStream_t stream);
// apply.cu: the tile passes.
void launch_tile_p2(int dtype, const TaskTable& table, int64_t tiles, cudaStream_t stream);
void launch_rms(int dtype, const TaskTable& table, int64_t tiles, const GroupArgs& args,
                cudaStream_t stream);
void launch_apply(int dtype, const TaskTable& table, int64_t tiles, const GroupArgs& args,
                  cudaStream_t stream);
void launch_norms(int dtype, const TaskTable& table, const GroupArgs& args,
                  cudaStream_t stream);
// fused_apply.cu: the up GEMM tiles of fused tasks.
void launch_fused_p2(int dtype, const TaskTable& table, int64_t gtiles, cudaStream_t stream);
void launch_fused_apply(int dtype, const TaskTable& table, int64_t gtiles,
                        const GroupArgs& args, cudaStream_t stream);
// down_gemm.cu: the down GEMM of a fused shape group (grid: down_tiles x tasks).
void launch_down(int dtype, bool left, dim3 grid, const DownJob* jobs, int n, int m, int rank,
                 float beta1, bool update, cudaStream_t stream);
// The same tiles' momentum epilogue after the library down GEMM (DownJob::x).
void launch_down_epilogue(bool left, dim3 grid, const DownJob* jobs, int n, int m, int rank,
                          float beta1, bool update, cudaStream_t stream);

// ---- momentum work between the scalars and rms passes ----

// Every temporary of these is planned with the call and lives in its workspace (a
// failed allocation must come before the first write: see run_group_cuda).

// projection.cu: the unfused compressed momentum of one task, and the projection op.
// `temps`: fp32, compressed_temp_floats(item) of the call's workspace.
int64_t compressed_temp_floats(const Item& item);
// projection="orthogonal": `w_now` and (resample steps) `w_next`, the W of the current and
// the next basis; null otherwise.
struct WSlot;
void compressed_momentum(const Item& item, const Task& t, const at::Tensor& momentum,
                         const at::Tensor& temps, const WSlot* w_now, const WSlot* w_next);
void fill_projection_cuda(const at::Tensor& out, int64_t seed, double scale);

// The W cache (orthogonal.cu; docs/cuda.md §4): W = s R^-T of projection="orthogonal"
// depends only on the seed, the rank, P's long side and side, and how it was computed (the
// fused path's from cuBLAS's Gram of the fp16 P, batched over `batch` tensors or 1; the
// unfused path's in float64: batch 0), so a process keeps each W until its tensor changes
// basis. A call takes a slot a W it needs while it plans (the misses' tensors are allocated
// then, before any write), waits for a hit (w_ready) or computes a miss into slot.w and
// publishes it (w_publish), then drops the W of the bases it left (w_drop).
struct WCacheKey {
  int device = 0;
  int64_t seed = 0, r = 0, length = 0, batch = 0;
  bool left = false, fused = false;
  bool operator==(const WCacheKey& o) const {
    return device == o.device && seed == o.seed && r == o.r && length == o.length &&
           batch == o.batch && left == o.left && fused == o.fused;
  }
};
struct WReadyEvent;  // a CUDA event recorded after a W was written
struct WSlot {
  WCacheKey key;
  at::Tensor w;  // W, r x r: fp16 (fused) or float64 (unfused)
  bool miss = false;
  std::shared_ptr<WReadyEvent> ready;
};
// Looks `key` up; on a miss allocates an empty W (and its event) that is not yet cached.
WSlot w_take(const WCacheKey& key);
// A hit: the current stream waits for the call that wrote W.
void w_ready(const WSlot& slot);
// A miss, once the copy that writes slot.w is queued on the current stream: cached.
void w_publish(const WSlot& slot);
// Drops the entries of `key` whatever their batch (a tensor left that basis).
void w_drop(const WCacheKey& key);
// Test hooks: the number of entries dropped / cached.
int64_t w_cache_clear();
int64_t w_cache_entries();

// fused_momentum.cu: the fused tasks of one shape group (same n, m, rank, dtype, resample
// step or not, projection), in call order.
struct FusedWork {
  std::vector<const Item*> items;
  std::vector<const Task*> tasks;
  std::vector<FusedBuffers> bufs;
  float* temps = nullptr;        // fused_temp_floats of the workspace
  int64_t* host = nullptr;       // fused_table_words of the call's pinned table
  const int64_t* device = nullptr;  // the same words in the workspace
  const float* quant_maps = nullptr;  // the call's (GroupArgs::quant_maps): 8-bit momentum
  // projection="orthogonal": the W of each task's current basis and (resample steps) of
  // its next one, taken while the call is planned.
  std::vector<WSlot> wslots, wslots_next;
  // The down GEMM in cuBLAS and down_epilogue_kernel (Tuning::down_library, 16-bit): this
  // many tasks at a time (FusedGroup::down_chunk); 0: fused_down_kernel.
  int down_chunk = 0;
};
// Floats of workspace the group's temporaries take (Gram and S; on resample steps also
// the next P^T and tiled P, the change of basis and M in the next basis).
int64_t fused_temp_floats(const Item& first, int count, int down_chunk);
// Bytes of those temporaries a task adds to a chunk of the library down GEMM (its scaled
// P^T in the gradient's dtype and its fp32 result).
int64_t library_down_task_bytes(const Item& first);
// int64 words of the group's table (pointer arrays, seeds, down GEMM jobs).
int64_t fused_table_words(int count, bool resample);
// Writes the group's table at w.host (uploaded with the call's task table).
void fill_fused_table(const FusedWork& w);
// Launches the group's momentum work on the current stream.
void fused_momentum_group(const FusedWork& w, int64_t min_batched);

// Where a fused task's step-dependent words lie in its group's uploaded table: the seeds
// of its current and next projection, and the base of its next-basis down job (M moved
// to the next basis on resample steps, none otherwise).
struct FusedCounterWords {
  int64_t* seed_now;
  int64_t* seed_next;
  const float** next_base;  // null when the group plans no change of basis
  const float* base;        // what next_base holds on a resample step
};
FusedCounterWords fused_counter_words(const FusedWork& w, int k);

// orthogonal.cu: W_k = s R_k^-T (r x r, lower triangular; Gram_k = R_k^T R_k, the basis
// of projection="orthogonal" being W P on the left and P W^T on the right) for `count`
// symmetric positive definite Grams stored one after another, from fp32 `grams32`, or
// (grams32 null) from the float64 Grams already at the start of `work`;
// `work`: basis_work_floats(r, count) of the workspace (float64, 8-byte aligned). W goes to
// `outs16` (fp16 bits) or `outs64` (float64). A Gram that is not positive definite gets an
// all-NaN W (a kernel cannot raise).
int64_t basis_work_floats(int64_t r, int64_t count);
void launch_basis_w(const float* grams32, double* work, uint16_t* outs16, double* outs64,
                    int64_t r, int64_t count, double s, cudaStream_t stream);
// The unfused path's float64 Gram of one fp32 P (r x length left, length x r right) into
// `gram` (r x r float64, the start of the basis work), and out = W x (left, x r x others)
// or x W^T (right, x others x r) accumulated in float64 from W in float64.
void launch_gram_f64(const float* p, double* gram, int64_t r, int64_t length, bool left,
                     cudaStream_t stream);
void launch_basis_f64(const double* w, const float* x, float* out, int64_t r, int64_t others,
                      bool left, cudaStream_t stream);

// ---- capturable steps (capturable.cu) ----

// One parameter of a capturable call: advance_kernel reads its step count and seed from
// the state tensors, advances them, and writes what depends on them where the passes
// read it (the Task, the fused group's words).
struct StepCounter {
  int64_t* step;             // state step: the count before this step
  int64_t* seed;             // compressed: state seed; else null
  Task* task;                // null: a parameter without elements
  FusedCounterWords fused;   // all null unless fused
  int64_t index;             // in the call: the stochastic rounding key's
};

struct AdvanceArgs {
  double lr, decay_rate;
  const float* lr_f32;   // lr_tensor, when it is float32
  const double* lr_f64;  // ... float64
  int64_t kappa;
  int32_t relative_step, warmup_init;
};

void launch_advance(const StepCounter* counters, int count, const AdvanceArgs& args,
                    cudaStream_t stream);

// ---- host helpers (host_util.cu) ----

// Row-major C (M x N, fp32) = alpha op(A) op(B) + beta C in cuBLAS; A and B of type `ab`
// (a DType code); fp32 inputs on TF32 tensor cores when tf32 is set.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, const void* B, int ab, float beta, float* C, bool tf32);
void gemm_batched(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const void* const* a, const void* const* b, int ab, float beta,
                  void* const* c, int count, bool tf32);
int dtype_code(at::ScalarType t);
const std::vector<at::cuda::CUDAStream>& side_streams(c10::DeviceIndex device, int count);
int64_t smem_optin();
at::DataPtr pinned_block(int64_t bytes);
void upload(void* device, const at::DataPtr& host, int64_t bytes);

}  // namespace cuda_detail
}  // namespace flora
