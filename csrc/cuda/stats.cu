// Pass 1, statistics: row/column sums of G^2 + eps1 and sum p^2 of factored tensors
// (tiles, or whole rows a block: "row stats"), or the full second moment and dense
// momentum of unfactored ones.
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "quant_io.cuh"
#include "mma.cuh"
#include "../common/rules.h"

#include <c10/cuda/CUDAException.h>

namespace flora {
namespace cuda_detail {
namespace {


// ---- pass 1: statistics ----------------------------------------------------

template <int DT>
__device__ __forceinline__ void factored_stats(const Task& t, int64_t local,
                                               const GroupArgs& a) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>, TC = kTileColsOf<DT>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rc = local / t.ctiles, ct = local % t.ctiles;
  const int64_t n = t.n, m = t.m;
  const int64_t c0 = ct * TC + lane * L;
  const int valid = valid_of<L>(m - c0);
  const S* g = static_cast<const S*>(t.grad);
  const S* p = static_cast<const S*>(t.param);
  uint4 gr[kRowsPerWarp], pr[kRowsPerWarp];
  load_rows<DT>(g, t, rc, warp, c0, valid, gr);
  load_rows<DT>(p, t, rc, warp, c0, t.stats_p ? valid : 0, pr);
  float col_acc[L];
#pragma unroll
  for (int c = 0; c < L; ++c) col_acc[c] = 0.f;
  float p2 = 0.f;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t i = tile_row(rc, k, warp);
    const int row_valid = i < n ? valid : 0;
    float gv[L], pv[L];
    unpack<DT>(gr[k], gv);
    unpack<DT>(pr[k], pv);
    float row_acc = 0.f;
#pragma unroll
    for (int c = 0; c < L; ++c) {
      if (c < row_valid) {
        const float v = gv[c] * gv[c] + a.eps1;
        row_acc += v;
        col_acc[c] += v;
        p2 += pv[c] * pv[c];
      }
    }
    row_acc = warp_sum(row_acc);
    if (lane == 0 && i < n) t.row_part[i * t.ctiles + ct] = row_acc;
  }
  __shared__ float col_sm[kWarps][TC];
#pragma unroll
  for (int c = 0; c < L; ++c) col_sm[warp][lane * L + c] = col_acc[c];
  __syncthreads();
  for (int c = threadIdx.x; c < TC; c += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += col_sm[w][c];
    const int64_t j = ct * TC + c;
    if (j < m) t.col_part[rc * m + j] = s;
  }
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.tile_p2[local] = p2;
}

// The column sums of a row-stats block: for every column the thread owns, the sums of
// G^2 and of G^2 / row over the block's rows, in registers (kAccRegs, kAccWideRegs:
// reg_sq, reg_w) or in shared memory after the ring (kAccShared: acc_sq, acc_w, a float4
// a lane's vector of columns).
enum ColumnAcc : int { kAccShared = 0, kAccRegs = 1, kAccWideRegs = 2 };
template <int DT, int kAcc>
constexpr int kColumnVecs = kAcc == kAccRegs       ? kRegAccVecs<DT>
                            : kAcc == kAccWideRegs ? kWideRegAccVecs<DT>
                                                   : 1;
template <int DT, int kAcc>
using ColumnRegs = float[kColumnVecs<DT, kAcc>][kLane<DT>];

// Sums over a stage's rows of G^2 and of G^2 / row for the columns of vector c, in
// rounded operations the compiler cannot contract: the shared and the wide register
// accumulators add the same partials (tested to the bit).
template <int DT>
__device__ __forceinline__ void stage_column_sums(const uint4* st, int rows, int mv, int c,
                                                  const float* inv_row, float (&sq)[kLane<DT>],
                                                  float (&wsum)[kLane<DT>]) {
  constexpr int L = kLane<DT>;
#pragma unroll
  for (int e = 0; e < L; ++e) sq[e] = wsum[e] = 0.f;
#pragma unroll 2
  for (int r = 0; r < rows; ++r) {
    float gv[L];
    unpack<DT>(st[r * mv + c], gv);
    const float ir = inv_row[r];
#pragma unroll
    for (int e = 0; e < L; ++e) {
      const float g2 = __fmul_rn(gv[e], gv[e]);
      sq[e] = __fadd_rn(sq[e], g2);
      wsum[e] = fmaf(g2, ir, wsum[e]);
    }
  }
}

// Adds the `rows` rows of a stage (mv vectors a row) of G in shared memory.
template <int DT, int kAcc>
__device__ __forceinline__ void add_stage_columns(ColumnRegs<DT, kAcc>& reg_sq,
                                                  ColumnRegs<DT, kAcc>& reg_w,
                                                  float4* acc_sq, float4* acc_w,
                                                  const uint4* st, int rows, int mv,
                                                  const float* inv_row) {
  constexpr int L = kLane<DT>, H = L / 4, KV = kColumnVecs<DT, kAcc>;
  if constexpr (kAcc == kAccWideRegs) {
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c >= mv) continue;
      float sq[L], wsum[L];
      stage_column_sums<DT>(st, rows, mv, c, inv_row, sq, wsum);
#pragma unroll
      for (int e = 0; e < L; ++e) {
        reg_sq[k][e] = __fadd_rn(reg_sq[k][e], sq[e]);
        reg_w[k][e] = __fadd_rn(reg_w[k][e], wsum[e]);
      }
    }
  } else if constexpr (kAcc == kAccRegs) {
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c >= mv) continue;
      for (int r = 0; r < rows; ++r) {
        float gv[L];
        unpack<DT>(st[r * mv + c], gv);
        const float ir = inv_row[r];
#pragma unroll
        for (int e = 0; e < L; ++e) {
          const float g2 = gv[e] * gv[e];
          reg_sq[k][e] += g2;
          reg_w[k][e] = fmaf(g2, ir, reg_w[k][e]);
        }
      }
    }
  } else {
    for (int c = threadIdx.x; c < mv; c += kThreads) {
      float sq[L], wsum[L];
      stage_column_sums<DT>(st, rows, mv, c, inv_row, sq, wsum);
#pragma unroll
      for (int h = 0; h < H; ++h) {
        float4& x = acc_sq[c * H + h];
        float4& y = acc_w[c * H + h];
        x.x += sq[4 * h]; x.y += sq[4 * h + 1]; x.z += sq[4 * h + 2]; x.w += sq[4 * h + 3];
        y.x += wsum[4 * h]; y.y += wsum[4 * h + 1]; y.z += wsum[4 * h + 2];
        y.w += wsum[4 * h + 3];
      }
    }
  }
}

// Column sums of G^2 + eps1 (rows_eps1: eps1 of the block's rows) and of G^2 / row.
template <int DT, int kAcc>
__device__ __forceinline__ void write_columns(const ColumnRegs<DT, kAcc>& reg_sq,
                                              const ColumnRegs<DT, kAcc>& reg_w,
                                              const float4* acc_sq, const float4* acc_w,
                                              float4* col_out, float4* w_out, int mv,
                                              float rows_eps1) {
  constexpr int L = kLane<DT>, H = L / 4, KV = kColumnVecs<DT, kAcc>;
  if constexpr (kAcc != kAccShared) {
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c >= mv) continue;
#pragma unroll
      for (int h = 0; h < H; ++h) {
        col_out[c * H + h] = make_float4(
            reg_sq[k][4 * h] + rows_eps1, reg_sq[k][4 * h + 1] + rows_eps1,
            reg_sq[k][4 * h + 2] + rows_eps1, reg_sq[k][4 * h + 3] + rows_eps1);
        w_out[c * H + h] = make_float4(reg_w[k][4 * h], reg_w[k][4 * h + 1],
                                       reg_w[k][4 * h + 2], reg_w[k][4 * h + 3]);
      }
    }
  } else {
    for (int q = threadIdx.x; q < mv * H; q += kThreads) {
      const float4 x = acc_sq[q];
      col_out[q] =
          make_float4(x.x + rows_eps1, x.y + rows_eps1, x.z + rows_eps1, x.w + rows_eps1);
      w_out[q] = acc_w[q];
    }
  }
}

// Row stats of a factored tensor without momentum: block `local` takes rows
// [local * block_rows, +block_rows), stage_rows at a time through a ring of
// t.stages buffers in shared memory (G, then p when the step size needs sum p^2),
// the next stages loading while one is summed. Per stage: the rows' sums of
// G^2 + eps1 (warp sums, then across warps), their new row EMAs, then for every
// column the sums over the stage's rows of G^2 + eps1 and of G^2 / row, added to
// accumulators of the thread that owns the column (no atomics, a fixed order):
// registers for rows of up to kRegAccVecs vectors a thread (kAccRegs) or, in the wide
// rows' launch, kWideRegAccVecs (kAccWideRegs), else shared memory after the ring.
template <int DT, int kAcc>
__device__ __forceinline__ void row_stats(const Task& t, int64_t local, const GroupArgs& a,
                                          uint4* smem) {
  constexpr int L = kLane<DT>;
  __shared__ float partial[kWarps][kMaxStageRows];
  __shared__ float inv_row[kMaxStageRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mv = static_cast<int>(t.m / L);  // 16-byte vectors a row
  const int R = t.stage_rows, S = t.stages;
  // Warps that sum one row: as many as the stages of G alone leave to a row, so that
  // the order of a row's sum does not depend on whether the stages also hold p (the
  // first step after a resume reads p, the next ones do not).
  const int g_rows = static_cast<int>(stage_rows_of(int64_t(mv) * 16));
  const int wpr = g_rows < kWarps ? kWarps / g_rows : 1;
  const bool stats_p = t.stats_p;
  const float eps1 = a.eps1;
  const int64_t stage_vecs = int64_t(R) * mv * (stats_p ? 2 : 1);
  const int64_t i_begin = local * t.block_rows;
  const int64_t i_end = min(i_begin + t.block_rows, t.n);
  const int stages = static_cast<int>((i_end - i_begin + R - 1) / R);
  const uint4* g = static_cast<const uint4*>(t.grad);
  const uint4* p = static_cast<const uint4*>(t.param);
  float* row_ema = t.row;
  const bool skip = skipped(t);  // the row EMA stays; the sums below are workspace
  const double beta2 = t.beta2;
  const double inv_m = 1.0 / t.m;
  const double m_eps1 = double(t.m) * eps1;  // eps1 of every element of a row
  constexpr int H = L / 4;  // float4s of one lane's accumulator
  float reg_sq[kColumnVecs<DT, kAcc>][L], reg_w[kColumnVecs<DT, kAcc>][L];
  float4* acc_sq = reinterpret_cast<float4*>(smem + S * stage_vecs);
  float4* acc_w = acc_sq + int64_t(mv) * H;
  if constexpr (kAcc != kAccShared) {
#pragma unroll
    for (int k = 0; k < kColumnVecs<DT, kAcc>; ++k)
#pragma unroll
      for (int e = 0; e < L; ++e) reg_sq[k][e] = reg_w[k][e] = 0.f;
  } else {
    for (int q = threadIdx.x; q < mv * H; q += kThreads) {
      acc_sq[q] = make_float4(0.f, 0.f, 0.f, 0.f);
      acc_w[q] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  // A stage's rows are contiguous in G (and p) and in shared memory: one flat loop
  // (a loop over rows, then columns, spent ~100 instructions a 16-byte copy on
  // address arithmetic: half of the pass's instructions, ncu).
  const auto issue = [&](int s) {
    if (s < stages) {
      uint4* dst = smem + (s % S) * stage_vecs;
      const int64_t r0 = i_begin + int64_t(s) * R;
      const int count = static_cast<int>(min(int64_t(R), i_end - r0)) * mv;
      const uint4* gs = g + r0 * mv;
      for (int q = threadIdx.x; q < count; q += kThreads) copy16_async(dst + q, gs + q);
      if (stats_p) {
        const uint4* ps = p + r0 * mv;
        uint4* pd = dst + R * mv;
        for (int q = threadIdx.x; q < count; q += kThreads) copy16_async(pd + q, ps + q);
      }
    }
    copy_async_commit();  // empty past the last stage: the waits stay uniform
  };
  for (int s = 0; s + 1 < S; ++s) issue(s);
  double row_total = 0.0;  // new row EMAs of this block (thread r of each stage)
  float p2 = 0.f;
  for (int s = 0; s < stages; ++s) {
    issue(s + S - 1);  // into the buffer the last round freed
    const int64_t r0 = i_begin + int64_t(s) * R;
    const int rows = static_cast<int>(min(int64_t(R), i_end - r0));
    // The stage's old row EMAs, loaded now: their latency passes during the row sums.
    const float old_row = static_cast<int>(threadIdx.x) < rows ? row_ema[r0 + threadIdx.x] : 0.f;
    copy_async_wait(S - 1);
    __syncthreads();
    const uint4* st = smem + (s % S) * stage_vecs;
    // Sums of G^2 (eps1 is added once a row below: m eps1, and once a column at the
    // end). A row is summed in wpr segments (strided shares of its vectors), a warp
    // a segment, then by thread r over the segments in a fixed order: one warp
    // reduction a segment, where a reduction over the whole block for every row cost
    // ~12 instructions a row and warp (ncu).
    for (int job = warp; job < rows * wpr; job += kWarps) {
      const int r = job % rows, seg = job / rows;
      const uint4* gr = st + r * mv;
      const uint4* pr = st + (R + r) * mv;
      float sum = 0.f;
#pragma unroll 2
      for (int c = seg * 32 + lane; c < mv; c += wpr * 32) {
        float gv[L];
        unpack<DT>(gr[c], gv);
#pragma unroll
        for (int e = 0; e < L; ++e) sum = fmaf(gv[e], gv[e], sum);
        if (stats_p) {
          unpack<DT>(pr[c], gv);
#pragma unroll
          for (int e = 0; e < L; ++e) p2 = fmaf(gv[e], gv[e], p2);
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) partial[seg][r] = sum;
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < rows) {
      double total = m_eps1;
      for (int w = 0; w < wpr; ++w) total += partial[w][threadIdx.x];
      const int64_t i = r0 + threadIdx.x;
      const float row = static_cast<float>(beta2 * old_row + (1.0 - beta2) * (total * inv_m));
      if (!skip) row_ema[i] = row;
      inv_row[threadIdx.x] = 1.0f / row;
      row_total += row;
    }
    __syncthreads();
    add_stage_columns<DT, kAcc>(reg_sq, reg_w, acc_sq, acc_w, st, rows, mv, inv_row);
    __syncthreads();  // the stage is free for the load issued next round
  }
  float4* col_out = reinterpret_cast<float4*>(t.col_part + local * t.m);
  float4* w_out = reinterpret_cast<float4*>(t.w_part + local * t.m);
  const float rows_eps1 = static_cast<float>(i_end - i_begin) * eps1;  // of each column
  write_columns<DT, kAcc>(reg_sq, reg_w, acc_sq, acc_w, col_out, w_out, mv, rows_eps1);
  row_total = block_sum(row_total);
  p2 = block_sum(p2);
  if (threadIdx.x == 0) {
    t.row_block_sum[local] = row_total;
    t.p2_block[local] = p2;
  }
}

// Unfactored: S = beta2 S + (1 - beta2)(G^2 + eps1); D = G / sqrt(S), mixed with
// dense momentum (which then stores D). Sums of p^2 and D^2 per tile.
template <int DT>
__device__ __forceinline__ void full_stats(const Task& t, int64_t local, const GroupArgs& a) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>;
  const S* g = static_cast<const S*>(t.grad);
  const S* p = static_cast<const S*>(t.param);
  const bool vec = t.vec;
  const bool skip = skipped(t);  // S and M stay; sum p^2 is still made (scalars pass)
  const float b2 = static_cast<float>(t.beta2);
  float p2 = 0.f, d2 = 0.f;
#pragma unroll 2
  for (int k = 0; k < kFullVecsPerThread; ++k) {
    const int64_t e0 = local * kFullTileOf<DT> + (int64_t(k) * kThreads + threadIdx.x) * L;
    const int valid = valid_of<L>(t.numel - e0);
    if (valid == 0) continue;
    float gv[L], pv[L], sv[L], mv[L];
    unpack<DT>(load_pack<DT>(g + e0, vec, valid), gv);
    unpack<DT>(load_pack<DT>(p + e0, vec, t.stats_p ? valid : 0), pv);
    loadf<L>(t.second_moment + e0, vec, valid, sv);
    if (t.momentum) loadf<L>(t.momentum + e0, vec, valid, mv);
#pragma unroll
    for (int c = 0; c < L; ++c) {
      if (c >= valid) continue;
      sv[c] = next_second_moment(sv[c], gv[c], b2, a.eps1);
      float d = gv[c] / sqrtf(sv[c]);
      if (t.momentum) {
        d = dense_direction(d, mv[c], a.beta1);
        mv[c] = d;
      }
      p2 += pv[c] * pv[c];
      d2 += d * d;
    }
    if (skip) continue;
    storef<L>(t.second_moment + e0, vec, valid, sv);
    if (t.momentum) storef<L>(t.momentum + e0, vec, valid, mv);
  }
  p2 = block_sum(p2);
  d2 = block_sum(d2);
  if (threadIdx.x == 0) {
    t.tile_p2[local] = p2;
    t.tile_d2[local] = d2;
  }
}

// full_stats with 8-bit state (quant_io.cuh): the same values from the read-back codes,
// stored nowhere; the new absmax and changed flag of each block gathered for the apply
// pass, which forms the values again and writes the codes. `maps`: quant_io.cuh's maps.
template <int DT>
__device__ __forceinline__ void full_stats_quantized(const Task& t, int64_t local,
                                                     const GroupArgs& a, const float* maps) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>;
  const S* g = static_cast<const S*>(t.grad);
  const S* p = static_cast<const S*>(t.param);
  const bool vec = t.vec;
  const bool skip = skipped(t);
  const bool has_m = t.m_codes != nullptr || t.momentum != nullptr;
  const float b2 = static_cast<float>(t.beta2);
  float p2 = 0.f, d2 = 0.f;
  for (int k = 0; k < kFullVecsPerThread; ++k) {
    // No lane leaves the loop early: gather_blocks is a warp operation.
    const int64_t e0 = local * kFullTileOf<DT> + (int64_t(k) * kThreads + threadIdx.x) * L;
    const int valid = valid_of<L>(t.numel - e0);
    float gv[L], pv[L], sv[L], mv[L], s_back[L], m_back[L];
    unpack<DT>(load_pack<DT>(g + e0, vec, valid), gv);
    unpack<DT>(load_pack<DT>(p + e0, vec, t.stats_p ? valid : 0), pv);
    if (t.sm_codes != nullptr)
      load_codes<L>(t.sm_codes, t.sm_absmax, maps + kMapUnsigned, e0, valid, s_back);
    else
      loadf<L>(t.second_moment + e0, vec, valid, s_back);
    if (t.m_codes != nullptr)
      load_codes<L>(t.m_codes, t.m_absmax, maps + kMapSigned, e0, valid, m_back);
    else if (t.momentum != nullptr)
      loadf<L>(t.momentum + e0, vec, valid, m_back);
#pragma unroll
    for (int c = 0; c < L; ++c) {
      sv[c] = s_back[c];
      mv[c] = has_m ? m_back[c] : 0.f;
      if (c >= valid) continue;
      sv[c] = next_second_moment(s_back[c], gv[c], b2, a.eps1);
      float d = gv[c] / sqrtf(sv[c]);
      if (has_m) {
        d = dense_direction(d, m_back[c], a.beta1);
        mv[c] = d;
      }
      p2 += pv[c] * pv[c];
      d2 += d * d;
    }
    if (skip) continue;  // task-uniform
    if (t.sm_codes != nullptr)
      gather_blocks<L>(t.sm_next, t.sm_changed, e0, valid, sv, s_back);
    else if (valid > 0)
      storef<L>(t.second_moment + e0, vec, valid, sv);
    if (t.m_codes != nullptr)
      gather_blocks<L>(t.m_next, t.m_changed, e0, valid, mv, m_back);
    else if (t.momentum != nullptr && valid > 0)
      storef<L>(t.momentum + e0, vec, valid, mv);
  }
  p2 = block_sum(p2);
  d2 = block_sum(d2);
  if (threadIdx.x == 0) {
    t.tile_p2[local] = p2;
    t.tile_d2[local] = d2;
  }
}

// Pass 0 with skip_nonfinite: whether each task's gradient holds a NaN or inf. Grid:
// (blocks striding over a task's elements, tasks); the first block to find one sets the
// task's flag and counts the skip, on the device.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(TaskTable table, unsigned long long* __restrict__ counter) {
  const Task& t = table.tasks[blockIdx.y];
  const Storage<DT>* g = static_cast<const Storage<DT>*>(t.grad);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < t.numel; e += stride)
    bad |= (__float_as_uint(to_float<DT>(g[e])) & 0x7f800000u) == 0x7f800000u;  // inf, NaN
  if (__syncthreads_or(bad) && threadIdx.x == 0) {
    if (atomicExch(t.skip, 1) == 0) atomicAdd(counter, 1ull);
  }
}

// The stats pass of every task but those of wide rows' row stats (stats_wide_kernel)
// and unfactored ones with 8-bit state (stats_quantized_kernel).
template <int DT>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(TaskTable table, GroupArgs a) {
  extern __shared__ uint4 stage_smem[];
  const Task& t = table.tasks[locate(table.sblock_begins, table.count, blockIdx.x)];
  const int64_t local = blockIdx.x - t.sblock_begin;
  if (stats_quantized(t) || wide_row_stats(t.row_stats)) return;
  if (t.row_stats == kRowStatsRegisters) row_stats<DT, kAccRegs>(t, local, a, stage_smem);
  else if (t.kind == kFactored) factored_stats<DT>(t, local, a);
  else full_stats<DT>(t, local, a);
}

// Row stats of rows too wide for stats_kernel's register accumulators: a launch of their
// own, whose larger footprint (96 accumulators a thread, or 2 m floats of shared memory
// a block past kWideRegAccVecs) holds only its own blocks to it.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    stats_wide_kernel(TaskTable table, GroupArgs a) {
  extern __shared__ uint4 stage_smem[];
  const Task& t = table.tasks[locate(table.sblock_begins, table.count, blockIdx.x)];
  const int64_t local = blockIdx.x - t.sblock_begin;
  if (t.row_stats == kRowStatsWideRegisters) row_stats<DT, kAccWideRegs>(t, local, a, stage_smem);
  else if (t.row_stats == kRowStatsShared) row_stats<DT, kAccShared>(t, local, a, stage_smem);
}

// The stats pass of unfactored tasks with 8-bit state, a launch of its own over the stats
// group's grid (the other tasks' blocks return at once): inside stats_kernel its registers
// made the float32 path spill (ptxas, sm_90a: 0 -> 42 bytes of spill stores in fp32). The
// maps are read from global memory (1 KiB each, cached).
template <int DT>
__global__ void __launch_bounds__(kThreads)
    stats_quantized_kernel(TaskTable table, GroupArgs a) {
  const Task& t = table.tasks[locate(table.sblock_begins, table.count, blockIdx.x)];
  if (!stats_quantized(t)) return;
  full_stats_quantized<DT>(t, blockIdx.x - t.sblock_begin, a, a.quant_maps);
}

}  // namespace

void launch_nonfinite(int dtype, const TaskTable& table, int64_t max_numel, int64_t* counter,
                      cudaStream_t stream) {
  constexpr int kMaxBlocks = 64;  // a task's blocks; enough to read a large gradient fast
  const unsigned blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, ceil_div(max_numel, kThreads * 8))));
  constexpr int kMaxTasks = 65535;  // grid.y
  with_dtype(dtype, [&](auto dt) {
    for (int first = 0; first < table.count; first += kMaxTasks) {
      TaskTable part = table;
      part.tasks += first;
      part.count = std::min(kMaxTasks, table.count - first);
      nonfinite_kernel<decltype(dt)::value>
          <<<dim3(blocks, static_cast<unsigned>(part.count)), kThreads, 0, stream>>>(
              part, reinterpret_cast<unsigned long long*>(counter));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void launch_stats(int dtype, const TaskTable& table, int64_t blocks, int64_t smem,
                  int64_t smem_wide, const GroupArgs& args, bool any_quantized,
                  cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    const auto launch = [&](auto kernel, int64_t bytes) {
      allow_smem(kernel, bytes);
      kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(table, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Wide rows' accumulators (2 m floats of shared memory, or 96 registers a thread)
    // allow one block an SM, and in one launch every block would have their footprint.
    // LLaMA-7B bf16 (a fifth of it 4096 x 11008): 9.0 ms at 1.5 TB/s in one launch;
    // apart, 3.8 ms for the rest (2.8 TB/s) and 3.4 ms for the wide tensors (H100).
    if (smem >= 0) launch(stats_kernel<DT>, smem);
    if (smem_wide >= 0) launch(stats_wide_kernel<DT>, smem_wide);
    if (any_quantized) {
      stats_quantized_kernel<DT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table,
                                                                                        args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda_detail
}  // namespace flora
