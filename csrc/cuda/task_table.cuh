// What the kernels of a step read: the Task descriptor of each parameter of a batch,
// the hyper-parameters of the call, the table a block finds its task in, and the jobs of
// the fused down GEMM.
#pragma once

#include "config.cuh"

#include <cstdint>

namespace flora {
namespace cuda_detail {

// One parameter of a batch, as the kernels see it. Workspace pointers are
// batch-local: batches run one after another on one stream and share it.
struct Task {
  void* param;
  const void* grad;
  float* row;            // factored: row EMA (n)
  float* col;            // factored: column EMA (m)
  float* second_moment;  // unfactored
  float* momentum;       // dense momentum (numel), else nullptr
  float* update;         // compressed: beta1 up(M) (n x m), else nullptr
  float* row_part;       // n x ctiles: row sums of G^2 + eps1 over each tile
  float* col_part;       // rchunks x m: column sums over each tile
  float* col_factor;     // m: 1 / sqrt(col EMA)
  double* row_block_sum; // ceil(n / 256): sums of the new row EMA
  double* p2_block;      // ceil(n / 256): sums of p^2
  float* tile_p2;        // tiles
  float* tile_d2;        // tiles
  float* scalars;        // kNumScalars
  float* w_part;         // row stats: rchunks x m, column sums of G^2 / row EMA
  double* colblock_d2;   // row stats: ceil(m / 256) partial sums of D^2
  double* param_sq;      // cached sum p^2 (step_group_'s param_norms), or nullptr
  // Fused compressed momentum: the apply pass is the up GEMM A B (A n x rank,
  // B rank x m, row-major: P^T and M, or M and P^T) with the parameter write as its
  // epilogue; sum D^2 comes from sum U^2 and `terms` (see fused_clip_kernel).
  const uint16_t* up_a;  // fp16
  const uint16_t* up_b;
  double* terms;         // fused: [0] sum U^2, a partial a down tile, <Gram, S> shares
  // Norm cache not valid, and the stats pass's blocks are not the apply pass's (fused
  // or row stats): sum p^2 of each apply tile (up-GEMM tiles if fused), summed as the
  // norms pass will sum them, so that a resumed run steps as an uninterrupted one.
  float* cache_p2;
  int64_t rank;
  int64_t gtile_begin;   // fused: first up-GEMM tile in the batch's grid
  int64_t gtiles;        // fused: up-GEMM tiles (kUpBM x kUpBN outputs each)
  int64_t dtiles;        // fused: down-GEMM tiles (down_tiles)
  int32_t gcols;         // fused: up-GEMM tiles along m
  int32_t fused;
  int32_t down_library;  // fused, 16-bit, Tuning::down_library: no tiled P (cuBLAS's down GEMM)
  int64_t n, m;          // factored: rows, cols; unfactored: 1, numel
  int64_t numel;
  int64_t tile_begin;    // first tile of this task in the batch's grid
  int64_t fblock_begin;  // first finalize block
  int64_t sblock_begin;  // first stats block (row stats: one per rchunk; else tiles)
  int64_t tiles;
  int32_t ctiles, rchunks;  // row stats: rchunks = stats blocks of block_rows rows
  int32_t kind, momentum_kind, vec;
  int32_t row_stats, needs_rms, stats_p;  // stats_p: the stats pass reads p
  int32_t p2_known;                       // *param_sq is sum p^2 of p as it is
  int32_t stage_rows, block_rows, stages;  // row stats: a ring of `stages` buffers
  double beta2, base_lr;
  uint64_t rounding_key;
  // skip_nonfinite: this task's flag in the workspace, 1 when its gradient holds a NaN or
  // inf (the nonfinite pass sets it before the stats pass); every pass that writes the
  // parameter or its state honours it. nullptr without the option.
  int32_t* skip;
  // quantization=True (quant_io.cuh), else nullptr: the 8-bit codes and absmax of an
  // unfactored second moment (sm_) and of a dense momentum (m_), whose float32 pointers
  // above are then nullptr; the new absmax (uint32 bits) and changed flag of each block,
  // in the call's quant region.
  uint8_t* sm_codes;
  float* sm_absmax;
  uint32_t* sm_next;
  int32_t* sm_changed;
  uint8_t* m_codes;
  float* m_absmax;
  uint32_t* m_next;
  int32_t* m_changed;
  // quantization=True, compressed momentum: its codes and absmax (read by the fused down
  // GEMM's epilogue, or into mc_stage), and mc_stage, float32 workspace of the momentum's
  // shape where the new M is formed before it is written back as codes. Only the momentum
  // work reads these; nullptr otherwise.
  uint8_t* mc_codes;
  float* mc_absmax;
  float* mc_stage;
};

// Whether the task keeps 8-bit state.
__host__ __device__ __forceinline__ bool quantized(const Task& t) {
  return t.sm_codes != nullptr || t.m_codes != nullptr;
}

// Whether the task's stats pass is stats_quantized_kernel's (an unfactored task with 8-bit
// state) rather than stats_kernel's.
__host__ __device__ __forceinline__ bool stats_quantized(const Task& t) {
  return t.kind != kFactored && quantized(t);
}

// Whether the task's step is skipped (skip_nonfinite and a non-finite gradient).
__device__ __forceinline__ bool skipped(const Task& t) {
  return t.skip != nullptr && *t.skip != 0;
}

// Hyper-parameters shared by every tensor of a call.
struct GroupArgs {
  float eps1, beta1;
  double eps2, clip_threshold, weight_decay;
  int32_t scale_parameter, stochastic_rounding;
  const float* quant_maps;  // quant_io.cuh's maps when a task keeps 8-bit state, else nullptr
};

// The tasks of a batch as the kernels see them, with the first tile and first
// finalize block of each task in arrays of their own (ascending, from 0).
struct TaskTable {
  const Task* tasks;
  const int64_t* tile_begins;
  const int64_t* fblock_begins;
  const int64_t* sblock_begins;
  const int64_t* gtile_begins;
  int count;
};

// The task k with begins[k] <= index < begins[k + 1]. A plain binary search over
// global memory puts ~8 dependent loads at the head of every block, which kept
// the streaming passes well below the bandwidth; instead every stride-th begin is
// staged in shared memory by one coalesced load, searched there, and at most
// log2(stride) steps remain in global memory (none up to 256 tasks). Every
// thread of the block must call it.
__device__ __forceinline__ int locate(const int64_t* __restrict__ begins, int count,
                                      int64_t index) {
  __shared__ int64_t staged[kThreads];
  __shared__ int found;
  const int stride = (count + kThreads - 1) / kThreads;
  const int staged_count = (count + stride - 1) / stride;
  if (static_cast<int>(threadIdx.x) < staged_count)
    staged[threadIdx.x] = begins[threadIdx.x * stride];
  __syncthreads();
  if (threadIdx.x == 0) {
    int lo = 0, hi = staged_count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (staged[mid] <= index) lo = mid;
      else hi = mid - 1;
    }
    lo *= stride;
    hi = min(count, lo + stride) - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (begins[mid] <= index) lo = mid;
      else hi = mid - 1;
    }
    found = lo;
  }
  __syncthreads();
  return found;  // rewritten only after every thread passed the next call's first barrier
}

__device__ __forceinline__ const Task& task_of_tile(const TaskTable& table, int64_t tile) {
  return table.tasks[locate(table.tile_begins, table.count, tile)];
}

// One task of a fused group's down GEMM (fused_down_kernel): down(U) in the basis of
// `proj`, then its epilogue on the momentum M (before this step):
//   partials: per tile, 2 beta1 (1 - beta1) M . down(U); skipped when null. After
//             them, kDotBlocks shares of beta1^2 Gram . S (S = M M^T or M^T M of fp16(M),
//             r x r: <M, Gram M> = <Gram, S> without an r x max(n, m) product), from
//             gram_dot_kernel once S exists
//   momentum16: fp16(M) for the up GEMM and for S; skipped when null
//   update: M = beta1 M' + (1 - beta1) down(U), M' = M or `base` (M moved to the next
//           basis on resample steps; M' alone on a skip)
// With 8-bit momentum (quantization=True) `momentum` is the task's float32 stage: the
// epilogue reads M from `codes` (read_codes; through the signed map `map`) or, where the
// stage already holds it read back (resample steps), from the stage, and writes the new
// M there; launch_momentum_codes (quantize.cu) then writes it into `codes` and `absmax`.
struct DownJob {
  const void* grad;
  const uint16_t* proj;  // P^T, fp16: n x rank (left) or rank x m (right)
  const uint16_t* proj_tiled;  // P in the tiled layout of the sm_90a GEMM
  float* momentum;       // rank x m (left) or n x rank (right)
  const float* base;
  uint16_t* momentum16;
  double* partials;      // one a tile of the task
  const float* gram;      // r x r, for gram_dot_kernel
  const float* sq;
  const float* row;
  const float* scalars;
  const float* col_factor;
  float* row_factor;     // left: a_i of every row, for the down GEMM (row_factor_kernel)
  const int32_t* skip;   // the task's Task::skip: on a skip, update writes M' alone
  uint8_t* codes;        // 8-bit momentum, else nullptr
  float* absmax;
  const float* map;      // the signed map's values (quant_maps + kMapSigned)
  const float* x;        // the library down GEMM's result (momentum's layout), else nullptr
  int32_t read_codes, pad;
};

}  // namespace cuda_detail
}  // namespace flora
