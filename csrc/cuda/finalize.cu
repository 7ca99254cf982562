// Pass 2 and the per-tensor scalars: the row/column EMAs of factored tensors, the mean
// of the row EMA, the step size, and the clip factor (from the stats, the rms pass, or
// the fused momentum terms).
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "../common/rules.h"

#include <c10/cuda/CUDAException.h>

namespace flora {
namespace cuda_detail {
namespace {


// ---- pass 2: EMAs of factored tensors ---------------------------------------

// Finalize blocks of a row-stats task: column EMA and factor of 32 columns, and
// their part of sum D^2 = row_mean sum_j b_j^2 sum_i G^2 / row_i. Of other
// factored tasks: blocks [0, ceil(m/256)) column EMA and factor; the rest row EMA
// of 256 rows, with that row block's sums of the row EMA and of p^2.
__global__ void __launch_bounds__(kFinalizeWidth)
    finalize_kernel(TaskTable table) {
  const Task& t = table.tasks[locate(table.fblock_begins, table.count, blockIdx.x)];
  const int64_t local = blockIdx.x - t.fblock_begin;
  const int64_t col_blocks = (t.m + kFinalizeWidth - 1) / kFinalizeWidth;
  const double b2 = t.beta2;
  if (t.row_stats) {
    __shared__ double sums[kWarps][kRowStatsFinalizeCols], wsums[kWarps][kRowStatsFinalizeCols];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t j = local * kRowStatsFinalizeCols + lane;
    double s = 0.0, w = 0.0;
    if (j < t.m) {
      for (int64_t rc = warp; rc < t.rchunks; rc += kWarps) {
        s += t.col_part[rc * t.m + j];
        w += t.w_part[rc * t.m + j];
      }
    }
    sums[warp][lane] = s;
    wsums[warp][lane] = w;
    __syncthreads();
    if (warp != 0) return;
    double d2 = 0.0;
    if (j < t.m) {
      s = w = 0.0;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) {
        s += sums[k][lane];
        w += wsums[k][lane];
      }
      const float c = static_cast<float>(b2 * t.col[j] + (1.0 - b2) * (s / t.n));
      const float b = col_scale(c);
      if (!skipped(t)) t.col[j] = c;
      t.col_factor[j] = b;
      d2 = w * b * b;
    }
    d2 = warp_sum(d2);
    if (lane == 0) t.colblock_d2[local] = d2;
    return;
  }
  if (local < col_blocks) {
    const int64_t j = local * kFinalizeWidth + threadIdx.x;
    if (j < t.m) {
      double s = 0.0;
      for (int64_t rc = 0; rc < t.rchunks; ++rc) s += t.col_part[rc * t.m + j];
      const float c = static_cast<float>(b2 * t.col[j] + (1.0 - b2) * (s / t.n));
      if (!skipped(t)) t.col[j] = c;
      t.col_factor[j] = col_scale(c);
    }
    return;
  }
  const int64_t rb = local - col_blocks;
  const int64_t i = rb * kFinalizeWidth + threadIdx.x;
  double row_value = 0.0;
  if (i < t.n) {
    double s = 0.0;
    for (int64_t ct = 0; ct < t.ctiles; ++ct) s += t.row_part[i * t.ctiles + ct];
    const float r = static_cast<float>(b2 * t.row[i] + (1.0 - b2) * (s / t.m));
    if (!skipped(t)) t.row[i] = r;
    row_value = r;
  }
  const int64_t first_tile = rb * kChunksPerRowBlock * t.ctiles;
  const int64_t row_block_end = (rb + 1) * kChunksPerRowBlock * t.ctiles;
  const int64_t last_tile = row_block_end < t.tiles ? row_block_end : t.tiles;
  double p2 = 0.0;
  for (int64_t k = first_tile + threadIdx.x; k < last_tile; k += blockDim.x) p2 += t.tile_p2[k];
  row_value = block_sum(row_value);
  p2 = block_sum(p2);
  if (threadIdx.x == 0) {
    t.row_block_sum[rb] = row_value;
    t.p2_block[rb] = p2;
  }
}

// The clip factor (step 5) and the weight-decay factor, from sum D^2.
__device__ __forceinline__ void set_clip(const Task& t, const GroupArgs& a, double d2) {
  const double clip = clip_factor(d2, t.numel, a.clip_threshold);
  t.scalars[kInvClip] = static_cast<float>(1.0 / clip);
  t.scalars[kDecay] = static_cast<float>(a.weight_decay * t.scalars[kStepSize]);
}

// One block per task: mean of the row EMA and this step's learning rate (step 1);
// the clip factor too where sum D^2 is known (unfactored tensors, row stats).
__global__ void __launch_bounds__(kThreads)
    scalars_kernel(const Task* __restrict__ tasks, GroupArgs a) {
  const Task& t = tasks[blockIdx.x];
  double rows = 0.0, p2 = 0.0, d2 = 0.0;
  if (t.kind == kFactored) {
    const int64_t blocks =
        t.row_stats ? t.rchunks : (t.n + kFinalizeWidth - 1) / kFinalizeWidth;
    for (int64_t k = threadIdx.x; k < blocks; k += blockDim.x) {
      rows += t.row_block_sum[k];
      p2 += t.p2_block[k];
    }
    if (t.row_stats) {
      const int64_t col_blocks = ceil_div(t.m, kRowStatsFinalizeCols);
      for (int64_t k = threadIdx.x; k < col_blocks; k += blockDim.x) d2 += t.colblock_d2[k];
    }
  } else {
    for (int64_t k = threadIdx.x; k < t.tiles; k += blockDim.x) {
      p2 += t.tile_p2[k];
      d2 += t.tile_d2[k];
    }
  }
  // Tasks with cache_p2: sum p^2 as norms_kernel will sum the apply pass's tiles (the
  // same partials, the same order).
  double cache_p2 = 0.0;
  if (t.cache_p2 != nullptr) {
    const int64_t tiles = t.fused ? t.gtiles : t.tiles;
    for (int64_t k = threadIdx.x; k < tiles; k += blockDim.x) cache_p2 += t.cache_p2[k];
  }
  rows = block_sum(rows);
  p2 = block_sum(p2);
  d2 = block_sum(d2);
  cache_p2 = block_sum(cache_p2);
  if (threadIdx.x == 0) {
    if (t.cache_p2 != nullptr) p2 = cache_p2;
    if (t.p2_known) p2 = *t.param_sq;
    // A skipped task's norm cache gets sum p^2 of p as it stays (the norms pass leaves
    // it), summed as a step that reads p would sum it.
    if (skipped(t) && t.param_sq != nullptr && a.scale_parameter) *t.param_sq = p2;
    const float row_mean = t.kind == kFactored ? static_cast<float>(rows / t.n) : 1.0f;
    t.scalars[kRowMean] = row_mean;
    const double lr = scaled_lr(t.base_lr, a.scale_parameter, a.eps2, p2, t.numel);
    t.scalars[kStepSize] = static_cast<float>(lr);
    if (t.fused && !t.needs_rms) t.terms[0] = d2 * row_mean;  // sum U^2 (row stats)
    else if (!t.needs_rms) set_clip(t, a, t.row_stats ? d2 * row_mean : d2);
  }
}

// One block per task whose sum D^2 the rms pass made: its clip factor.
__global__ void __launch_bounds__(kThreads)
    clip_kernel(const Task* __restrict__ tasks, GroupArgs a) {
  const Task& t = tasks[blockIdx.x];
  if (!t.needs_rms) return;
  double d2 = 0.0;
  for (int64_t k = threadIdx.x; k < t.tiles; k += blockDim.x) d2 += t.tile_d2[k];
  d2 = block_sum(d2);
  if (threadIdx.x != 0) return;
  if (t.fused) t.terms[0] = d2;  // sum U^2; the fused clip pass adds the momentum terms
  else set_clip(t, a, d2);
}

// One block per fused task: sum D^2 from sum U^2 and the momentum terms, then the
// clip factor. Rounding can leave a tiny negative sum where D is ~0: clamped (a NaN
// sum stays NaN, as on every path).
__global__ void __launch_bounds__(kThreads)
    fused_clip_kernel(const Task* __restrict__ tasks, GroupArgs a) {
  const Task& t = tasks[blockIdx.x];
  if (!t.fused) return;
  double d2 = 0.0;
  for (int64_t k = threadIdx.x; k < t.dtiles + kDotBlocks; k += blockDim.x)
    d2 += t.terms[1 + k];
  d2 = block_sum(d2);
  if (threadIdx.x != 0) return;
  const double keep = 1.0 - static_cast<double>(a.beta1);
  set_clip(t, a, max_nan(0.0, keep * keep * t.terms[0] + d2));
}

}  // namespace

void launch_finalize(const TaskTable& table, int64_t blocks, cudaStream_t stream) {
  finalize_kernel<<<static_cast<unsigned>(blocks), kFinalizeWidth, 0, stream>>>(table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scalars(const TaskTable& table, const GroupArgs& args, cudaStream_t stream) {
  scalars_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_clip(const TaskTable& table, const GroupArgs& args, cudaStream_t stream) {
  clip_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fused_clip(const TaskTable& table, const GroupArgs& args, cudaStream_t stream) {
  fused_clip_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
