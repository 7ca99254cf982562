// CUDA kernels of the flora ops.
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
#include "flora/ops.h"
#include "../common/random.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
// at::getHostAllocator. The header sizes its structures by
// std::hardware_destructive_interference_size, which GCC warns of on every use.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

namespace flora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 64;                        // factored tile: 64 rows x 128 columns
constexpr int kRowsPerWarp = kTileRows / kWarps;     // 8
constexpr int kFullVecsPerThread = 8;
constexpr int kFinalizeWidth = 256;                  // rows or columns per finalize block
constexpr int kChunksPerRowBlock = kFinalizeWidth / kTileRows;
// Row stats leave many more column partials (a row of them every 80-256 rows): a
// finalize block takes 32 columns, its eight warps a share of the partials each.
constexpr int kRowStatsFinalizeCols = 32;
// Row stats: each block takes whole rows, staged through shared memory kStageBytes
// at a time (a ring of stages: the next ones load while one is summed); the rows of
// a stage are at most kMaxStageRows.
constexpr int64_t kStageBytes = 32 * 1024;
constexpr int kMaxStageRows = 32;
// Rows a row-stats block takes: enough blocks in a launch that its last wave is a
// small part of it (about kStatsBlocksTarget: 8 waves of two blocks on 132 SMs; 1.3
// waves of 128-row blocks cost 1.5 ms a 1.35B step), yet each block's rows hold at
// least kRowBlockMinColBytes of G a column, so that its column sums (two floats a
// column, the workspace) add at most 2.5% to the step's memory (16 rows of bf16 took
// 7% extra peak on 0.1B shapes), and at most kRowBlockMaxColBytes (128 fp32 rows).
// Row sums and column sums do not depend on the rows of a stage (row_stats).
constexpr int64_t kStatsBlocksTarget = 2048;
constexpr int64_t kRowBlockMinColBytes = 320, kRowBlockMaxColBytes = 512;
// Compressed tensors of a batch hold at most 1/kUpdateShare of the call's fp32
// parameter bytes in update buffers (half that share of 16-bit parameter bytes).
constexpr int64_t kUpdateShare = 40;
// Fused tasks' fp16 buffers (P^T, P tiled, M) of a batch: at most 1/kFusedShare of the
// call's parameter bytes. Fewer, larger batches pay the fixed costs of a batch (launch
// tails, small GEMMs) fewer times: on the 1.35B shapes a share of 1/32 stepped in 15.5 ms
// fp32 and 13.7 ms bf16 at 3.4-4.3% extra peak, 1/40 in 16.0 and 14.7 ms at 2.7-3.7%.
constexpr int64_t kFusedShare = 32;
// Fused compressed momentum: the up GEMM runs on the tensor cores (mma.sync, fp16
// operands) in 128 x 128 output tiles, eight warps of 64 x 32, the rank consumed 32 at
// a time through a ring of kUpStages shared-memory buffers; rows padded by 16 bytes so
// that every ldmatrix phase hits 32 distinct banks.
constexpr int kUpBM = 128, kUpBN = 128, kUpBK = 32, kUpStages = 4;
constexpr int kUpAStride = kUpBK + 8, kUpBStride = kUpBN + 8;  // halves
constexpr int kUpStageHalves = kUpBM * kUpAStride + kUpBK * kUpBStride;
constexpr int64_t kUpSmemBytes = int64_t(kUpStages) * kUpStageHalves * 2;
// The fp32 result tile of a 16-bit apply epilogue, through the same shared memory: 8
// floats of padding put the 8 rows of an accumulator store in different banks.
constexpr int kUpXStride = kUpBN + 8;
static_assert(int64_t(kUpBM) * kUpXStride * 4 <= kUpSmemBytes, "the result tile fits the ring");
// The share's floor: a batch may hold kFusedMinBytes of fused buffers (and a quarter of
// that of a shape group's temporaries) however small the model. Below it the buffers,
// large beside small tensors (rank 256 of 768 rows), split a model into many batches,
// and each batch pays ~20 small launches and the idle GPU between them: LLaMA 0.1B
// shapes stepped in 4.84 ms (bf16) and 3.87 ms (fp32) at a share of 1/32, 2.79 and
// 3.06 ms with 64-67 MB a batch (H100, 2026-11-24). The 1.35B shapes are above it.
constexpr int64_t kFusedMinBytes = int64_t(64) << 20;
// Side streams the shape groups of a batch run their momentum work on besides the
// current one (see compressed_work). Fixed streams of torch's pool, one set a device: torch
// gives each stream that runs cuBLAS its own workspace (32 MiB on Hopper), so fresh pool
// streams every step would allocate new ones.
// FLORA_SIDE_STREAMS (0 to kMaxSideStreams) sets their number for comparisons.
constexpr int kSideStreams = 2, kMaxSideStreams = 4;
// Fused tasks of one shape share batched GEMMs from this many on (see group_gemm).
constexpr int kMinBatched = 2;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Rows of a row-stats stage whose rows take row_bytes (of G, or of G and p): the
// planner's stages, and the stages of G alone by which the kernel splits a row's sum
// and the planner sizes its blocks (both must agree for bitwise resumes).
__host__ __device__ constexpr int64_t stage_rows_of(int64_t row_bytes) {
  const int64_t rows = kStageBytes / row_bytes;
  return rows < 1 ? 1 : rows > kMaxStageRows ? kMaxStageRows : rows;
}
// The projection as the sm_90a down GEMM reads it: one 16 KiB tile (256 of the rank
// by 32 of the contraction k, in wgmma's core-matrix order) after another, rank block
// by rank block, zeros past the rank and past k. Halves of it for a rank and k.
constexpr int kTileRank = 256, kTileK = 32, kTileHalves = kTileRank * kTileK;
__host__ __device__ constexpr int64_t tiled_halves(int64_t rank, int64_t k) {
  return ceil_div(rank, kTileRank) * ceil_div(k, kTileK) * kTileHalves;
}
// Where element (rank index rr, k) of P lives in that layout: cores of 8 rank rows x 8
// k (16 bytes a row), k neighbours 64 halves apart, row groups 256.
__host__ __device__ constexpr int64_t tiled_index(int64_t rr, int64_t k, int64_t ktiles) {
  const int64_t rl = rr % kTileRank, kk = k % kTileK;
  return ((rr / kTileRank) * ktiles + k / kTileK) * kTileHalves + (rl / 8) * 256 +
         (kk / 8) * 64 + (rl % 8) * 8 + kk % 8;
}

enum Scalar : int { kRowMean = 0, kStepSize = 1, kInvClip = 2, kDecay = 3, kNumScalars = 4 };
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum TaskKind : int32_t { kFactored = 0, kFull = 1 };

// The down GEMM of fused tasks: kUpBM outputs by kDnBN of the rank a block of
// kDnThreads (16 warps of 64 x 32), the contraction kDnBK at a time through a ring of
// kDnStages<DT> buffers of G (as stored) and P^T (fp16; rows padded by 16 bytes as in
// the up GEMM), plus two buffers of U in fp16; one block an SM. The ring is as deep as
// shared memory allows: with four fp32 stages the block waited on G (DRAM at 40%).
constexpr int kDnBN = 256, kDnBK = 32, kDnThreads = 512;
template <int DT> constexpr int kDnStages = DT == kF32 ? 5 : 7;
constexpr int kDnBStrideLeft = kDnBN + 8;                // halves: P^T tile [k][r]
template <int DT> constexpr int kDnGBytes = kUpBM * kDnBK * (DT == kF32 ? 4 : 2);
constexpr int kDnBBytes = kDnBN * kUpAStride * 2;        // [r][k] right, [k][r] left
constexpr int kDnAHalves = kUpBM * kUpAStride;           // a U tile: [out][k] or [k][out]
constexpr int kDnABytes = 2 * kDnAHalves * 2;             // two of them
template <int DT> constexpr int kDnStageBytes = kDnGBytes<DT> + kDnBBytes;
template <int DT>
constexpr int64_t kDnSmemBytes = int64_t(kDnStages<DT>) * kDnStageBytes<DT> + kDnABytes +
                                 (kDnStages<DT> * kDnBK + kUpBM) * 4;
static_assert(kDnSmemBytes<kF32> <= 227 * 1024 && kDnSmemBytes<kBF16> <= 227 * 1024,
              "one block an SM");
static_assert(kDnBK * kDnBStrideLeft <= kDnBN * kUpAStride, "left P^T tiles fit");
// The epilogue's fp32 tile in the ring: [out][k] (right) or [k][out] (left), rows padded
// so that the fragment writes hit distinct banks.
constexpr int kDnXStrideRight = kDnBN + 8, kDnXStrideLeft = kUpBM + 4;  // floats
static_assert(int64_t(kUpBM) * kDnXStrideRight * 4 <= kDnStages<kF32> * kDnStageBytes<kF32> &&
                  int64_t(kDnBN) * kDnXStrideLeft * 4 <= kDnStages<kBF16> * kDnStageBytes<kBF16>,
              "the epilogue tile fits the ring");
static_assert(kDnBK * kUpBStride <= kUpBM * kUpAStride, "left U tiles fit");

// Task::row_stats: the tile passes, or row stats with the column accumulators in shared
// memory or in registers.
enum RowStats : int32_t { kNoRowStats = 0, kRowStatsShared = 1, kRowStatsRegisters = 2 };

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
};

// Hyper-parameters shared by every tensor of a call.
struct GroupArgs {
  float eps1, beta1;
  double eps2, clip_threshold, weight_decay;
  int32_t scale_parameter, stochastic_rounding;
};

template <int DT> struct StorageOf { using type = uint16_t; };
template <> struct StorageOf<kF32> { using type = float; };
template <int DT> using Storage = typename StorageOf<DT>::type;

template <int DT>
__device__ __forceinline__ float to_float(Storage<DT> v) {
  if constexpr (DT == kF32) return v;
  else if constexpr (DT == kBF16) return __uint_as_float(static_cast<uint32_t>(v) << 16);
  else return __half2float(__ushort_as_half(v));
}

template <int DT>
__device__ __forceinline__ Storage<DT> from_float(float x) {
  if constexpr (DT == kF32) return x;
  else if constexpr (DT == kBF16) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  else return __half_as_ushort(__float2half_rn(x));
}

// Every lane moves 16 bytes a row: 4 fp32 or 8 bf16/fp16 elements. A factored tile
// is 64 rows x 32 lanes' columns; an unfactored one 256 threads x 8 such vectors.
template <int DT> constexpr int kLane = DT == kF32 ? 4 : 8;
template <int DT> constexpr int kTileColsOf = 32 * kLane<DT>;
template <int DT>
constexpr int64_t kFullTileOf = int64_t(kThreads) * kLane<DT> * kFullVecsPerThread;

// A lane's 16 bytes of one row, kept as loaded and converted to floats where used,
// so that eight rows of gradient and parameter in flight cost 64 registers in
// every dtype. `valid` elements exist; missing ones read as 0.
template <int DT>
__device__ __forceinline__ uint4 load_pack(const Storage<DT>* ptr, bool vec, int valid) {
  if (vec && valid == kLane<DT>) return *reinterpret_cast<const uint4*>(ptr);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int c = 0; c < kLane<DT>; ++c) {
    if (c >= valid) continue;
    if constexpr (DT == kF32) w[c] = __float_as_uint(ptr[c]);
    else w[c / 2] |= static_cast<uint32_t>(ptr[c]) << (16 * (c % 2));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int DT>
__device__ __forceinline__ void unpack(const uint4& r, float v[kLane<DT>]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int c = 0; c < kLane<DT>; ++c) {
    if constexpr (DT == kF32) v[c] = __uint_as_float(w[c]);
    else v[c] = to_float<DT>(static_cast<uint16_t>((w[c / 2] >> (16 * (c % 2))) & 0xFFFFu));
  }
}

template <int DT>
__device__ __forceinline__ void store_pack(Storage<DT>* ptr, bool vec, int valid,
                                           const Storage<DT> v[kLane<DT>]) {
  if (vec && valid == kLane<DT>) {
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if constexpr (DT == kF32) w[q] = __float_as_uint(v[q]);
      else w[q] = static_cast<uint32_t>(v[2 * q]) | (static_cast<uint32_t>(v[2 * q + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(ptr) = make_uint4(w[0], w[1], w[2], w[3]);
    return;
  }
#pragma unroll
  for (int c = 0; c < kLane<DT>; ++c)
    if (c < valid) ptr[c] = v[c];
}

// L consecutive floats of a float32 state or workspace array (16-byte loads when aligned).
template <int L>
__device__ __forceinline__ void loadf(const float* ptr, bool vec, int valid, float v[L]) {
  if (vec && valid == L) {
#pragma unroll
    for (int q = 0; q < L / 4; ++q) {
      const float4 x = reinterpret_cast<const float4*>(ptr)[q];
      v[4 * q] = x.x; v[4 * q + 1] = x.y; v[4 * q + 2] = x.z; v[4 * q + 3] = x.w;
    }
    return;
  }
#pragma unroll
  for (int c = 0; c < L; ++c) v[c] = c < valid ? ptr[c] : 0.f;
}

template <int L>
__device__ __forceinline__ void storef(float* ptr, bool vec, int valid, const float v[L]) {
  if (vec && valid == L) {
#pragma unroll
    for (int q = 0; q < L / 4; ++q)
      reinterpret_cast<float4*>(ptr)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2],
                                                      v[4 * q + 3]);
    return;
  }
#pragma unroll
  for (int c = 0; c < L; ++c)
    if (c < valid) ptr[c] = v[c];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, valid in thread 0; every thread must call it.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_totals[32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_totals[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();
  return v;
}

// U of a factored parameter (FLORA.md step 3) is g * row_scale(i) * col_scale[j];
// the factors come from these two formulas only.
__device__ __forceinline__ float row_scale(float row, float row_mean) {
  return 1.0f / sqrtf(row / row_mean);
}
__device__ __forceinline__ float col_scale(float col) { return 1.0f / sqrtf(col); }

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

template <int L>
__device__ __forceinline__ int valid_of(int64_t remaining) {
  return remaining <= 0 ? 0 : remaining >= L ? L : static_cast<int>(remaining);
}

// Row i of tile row-chunk rc handled by warp w in round k; the 8 warps take
// neighbouring rows in each round.
__device__ __forceinline__ int64_t tile_row(int64_t rc, int k, int warp) {
  return rc * kTileRows + k * kWarps + warp;
}

// The lane's columns c0 .. c0 + L - 1 of the warp's rows of row chunk rc of a factored
// tensor x, as loaded (`valid` columns exist; rows past n read as 0).
template <int DT>
__device__ __forceinline__ void load_rows(const Storage<DT>* x, const Task& t, int64_t rc,
                                          int warp, int64_t c0, int valid,
                                          uint4 rows[kRowsPerWarp]) {
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t i = tile_row(rc, k, warp);
    rows[k] = load_pack<DT>(x + i * t.m + c0, t.vec, i < t.n ? valid : 0);
  }
}

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

// 16 bytes global -> shared without a register round trip (sm_80+), so the next
// stage of a row-stats block loads while the current one is summed.
__device__ __forceinline__ void copy16_async(uint4* smem, const uint4* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  *smem = *gmem;
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `pending` committed groups are still in flight (the
// instruction takes an immediate: one case per ring depth).
__device__ __forceinline__ void copy_async_wait(int pending) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::); break;
    default: asm volatile("cp.async.wait_group 5;\n" ::); break;
  }
#endif
}

// Row stats of a factored tensor without momentum: block `local` takes rows
// [local * block_rows, +block_rows), stage_rows at a time through a ring of
// t.stages buffers in shared memory (G, then p when the step size needs sum p^2),
// the next stages loading while one is summed. Per stage: the rows' sums of
// G^2 + eps1 (warp sums, then across warps), their new row EMAs, then for every
// column the sums over the stage's rows of G^2 + eps1 and of G^2 / row, added to
// accumulators of the thread that owns the column (no atomics, a fixed order):
// registers for rows of up to kRegAccVecs vectors a thread (kRegAcc), else shared
// memory after the ring.
template <int DT> constexpr int kRegAccVecs = DT == kF32 ? 6 : 3;  // 6144 columns

template <int DT, bool kRegAcc>
__device__ __forceinline__ void row_stats(const Task& t, int64_t local, const GroupArgs& a,
                                          uint4* smem) {
  constexpr int L = kLane<DT>;
  constexpr int H = L / 4;  // float4s of one lane's accumulator
  constexpr int KV = kRegAcc ? kRegAccVecs<DT> : 1;
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
  const double beta2 = t.beta2;
  const double inv_m = 1.0 / t.m;
  const double m_eps1 = double(t.m) * eps1;  // eps1 of every element of a row
  float reg_sq[KV][L], reg_w[KV][L];
  float4* acc_sq = reinterpret_cast<float4*>(smem + S * stage_vecs);
  float4* acc_w = acc_sq + int64_t(mv) * H;
  if constexpr (kRegAcc) {
#pragma unroll
    for (int k = 0; k < KV; ++k)
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
      row_ema[i] = row;
      inv_row[threadIdx.x] = 1.0f / row;
      row_total += row;
    }
    __syncthreads();
    if constexpr (kRegAcc) {
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
#pragma unroll
        for (int e = 0; e < L; ++e) sq[e] = wsum[e] = 0.f;
#pragma unroll 2
        for (int r = 0; r < rows; ++r) {
          float gv[L];
          unpack<DT>(st[r * mv + c], gv);
          const float ir = inv_row[r];
#pragma unroll
          for (int e = 0; e < L; ++e) {
            const float g2 = gv[e] * gv[e];
            sq[e] += g2;
            wsum[e] = fmaf(g2, ir, wsum[e]);
          }
        }
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
    __syncthreads();  // the stage is free for the load issued next round
  }
  float4* col_out = reinterpret_cast<float4*>(t.col_part + local * t.m);
  float4* w_out = reinterpret_cast<float4*>(t.w_part + local * t.m);
  const float rows_eps1 = static_cast<float>(i_end - i_begin) * eps1;  // of each column
  if constexpr (kRegAcc) {
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
      col_out[q] = make_float4(x.x + rows_eps1, x.y + rows_eps1, x.z + rows_eps1, x.w + rows_eps1);
      w_out[q] = acc_w[q];
    }
  }
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
      sv[c] = b2 * sv[c] + (1.f - b2) * (gv[c] * gv[c] + a.eps1);
      float d = gv[c] / sqrtf(sv[c]);
      if (t.momentum) {
        d = (1.f - a.beta1) * d + a.beta1 * mv[c];
        mv[c] = d;
      }
      p2 += pv[c] * pv[c];
      d2 += d * d;
    }
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

template <int DT>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(TaskTable table, GroupArgs a) {
  extern __shared__ uint4 stage_smem[];
  const Task& t = table.tasks[locate(table.sblock_begins, table.count, blockIdx.x)];
  const int64_t local = blockIdx.x - t.sblock_begin;
  if (t.row_stats == kRowStatsRegisters) row_stats<DT, true>(t, local, a, stage_smem);
  else if (t.row_stats) row_stats<DT, false>(t, local, a, stage_smem);
  else if (t.kind == kFactored) factored_stats<DT>(t, local, a);
  else full_stats<DT>(t, local, a);
}

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
      t.col[j] = c;
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
      t.col[j] = c;
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
    t.row[i] = r;
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
  const double clip = fmax(1.0, sqrt(d2 / t.numel) / a.clip_threshold);
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
    const float row_mean = t.kind == kFactored ? static_cast<float>(rows / t.n) : 1.0f;
    t.scalars[kRowMean] = row_mean;
    double lr = t.base_lr;
    if (a.scale_parameter) lr *= fmax(a.eps2, sqrt(p2 / t.numel));
    t.scalars[kStepSize] = static_cast<float>(lr);
    if (t.fused && !t.needs_rms) t.terms[0] = d2 * row_mean;  // sum U^2 (row stats)
    else if (!t.needs_rms) set_clip(t, a, t.row_stats ? d2 * row_mean : d2);
  }
}

// ---- pass 3 and 5: D of factored tensors, and the parameter write -----------

// Two blocks an SM: eight rows of G and the momentum rows in flight take 80-128
// registers. (When this pass read G alone, for every tensor, four blocks at 64
// registers beat three: 1.91 vs 2.09 ms in bf16; it now serves dense momentum and
// unfused compressed tensors.)
template <int DT>
__global__ void __launch_bounds__(kThreads, 2)
    rms_kernel(TaskTable table, GroupArgs a) {
  const Task& t = task_of_tile(table, blockIdx.x);
  if (!t.needs_rms) return;  // sum D^2 came with the stats
  const int64_t local = blockIdx.x - t.tile_begin;
  constexpr int L = kLane<DT>, TC = kTileColsOf<DT>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rc = local / t.ctiles, ct = local % t.ctiles;
  const int64_t n = t.n, m = t.m;
  const int64_t c0 = ct * TC + lane * L;
  const int valid = valid_of<L>(m - c0);
  const float row_mean = t.scalars[kRowMean];
  float b[L];
  loadf<L>(t.col_factor + c0, false, valid, b);
  uint4 gr[kRowsPerWarp];
  load_rows<DT>(static_cast<const Storage<DT>*>(t.grad), t, rc, warp, c0, valid, gr);
  // Dense momentum (read and written) or an unfused update (read): kExtraRows rows at a
  // time, all loaded before any is written, 16-byte accesses where aligned. Element by
  // element, each row waited on its own DRAM round trip (bf16 embedding and head: 1.44
  // ms a step, DRAM 31% busy).
  const bool dense = !t.fused && t.momentum_kind == static_cast<int>(MomentumKind::kDense);
  const bool update =
      !t.fused && t.momentum_kind == static_cast<int>(MomentumKind::kCompressed);
  const float* extra = dense ? t.momentum : update ? t.update : nullptr;
  const bool extra_vec = t.vec && reinterpret_cast<uintptr_t>(extra) % 16 == 0;
  constexpr int kExtraRows = 16 / L;  // 16 registers
  float d2 = 0.f;
#pragma unroll
  for (int k0 = 0; k0 < kRowsPerWarp; k0 += kExtraRows) {
    float ev[kExtraRows][L];
#pragma unroll
    for (int r = 0; r < kExtraRows; ++r) {
      const int64_t i = tile_row(rc, k0 + r, warp);
      if (extra != nullptr) loadf<L>(extra + i * m + c0, extra_vec, i < n ? valid : 0, ev[r]);
    }
#pragma unroll
    for (int r = 0; r < kExtraRows; ++r) {
      const int64_t i = tile_row(rc, k0 + r, warp);
      if (i >= n) continue;
      const float ai = row_scale(t.row[i], row_mean);
      float gv[L], dv[L];
      unpack<DT>(gr[k0 + r], gv);
#pragma unroll
      for (int c = 0; c < L; ++c) {
        dv[c] = 0.f;
        if (c >= valid) continue;
        const float u = gv[c] * ai * b[c];
        // factored_d's arithmetic, from the loaded rows
        const float d = dense    ? (1.f - a.beta1) * u + a.beta1 * ev[r][c]
                        : update ? (1.f - a.beta1) * u + ev[r][c]
                                 : u;
        dv[c] = d;
        d2 += d * d;
      }
      if (dense) storef<L>(t.momentum + i * m + c0, extra_vec, valid, dv);
    }
  }
  d2 = block_sum(d2);
  if (threadIdx.x == 0) t.tile_d2[local] = d2;
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

// Philox words for elements e0 .. e0 + 3 of the rounding stream of `key`.
__device__ __forceinline__ void rounding_words(uint64_t key, int64_t e0, uint32_t w[4]) {
  curandStatePhilox4_32_10_t state;
  if (e0 % 4 == 0) {
    curand_init(key, static_cast<unsigned long long>(e0 / 4), 0, &state);
    const uint4 x = curand4(&state);
    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
    return;
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t e = e0 + c;
    curand_init(key, static_cast<unsigned long long>(e / 4), 0, &state);
    const uint4 x = curand4(&state);
    const uint32_t words[4] = {x.x, x.y, x.z, x.w};
    w[c] = words[e % 4];
  }
}

// What the apply pass reads of a task, copied to registers once a block: a store
// to p could alias the task table as far as the compiler knows, so fields read
// through the Task reference would be loaded again after every store.
struct ApplyArgs {
  float decay, lr, inv_clip, beta1;
  bool vec;
  uint64_t rounding_key;
};

__device__ __forceinline__ ApplyArgs apply_args(const Task& t, const GroupArgs& a) {
  ApplyArgs s;
  s.decay = t.scalars[kDecay];
  s.lr = t.scalars[kStepSize];
  s.inv_clip = t.scalars[kInvClip];
  s.beta1 = a.beta1;
  s.vec = t.vec;
  s.rounding_key = t.rounding_key;
  return s;
}

// p - decay p - lr D / clip for the L elements starting at flat index e0, rounded
// once into the parameter's dtype.
template <int DT, bool kRound>
__device__ __forceinline__ void write_params(const ApplyArgs& s, Storage<DT>* p, int64_t e0,
                                             int valid, const float pv[kLane<DT>],
                                             const float d[kLane<DT>], float& p2) {
  constexpr int L = kLane<DT>;
  float x[L];
#pragma unroll
  for (int c = 0; c < L; ++c) {
    x[c] = pv[c];
    if (s.decay != 0.f) x[c] -= s.decay * x[c];
    x[c] = x[c] - s.lr * (d[c] * s.inv_clip);
  }
  Storage<DT> out[L];
  if constexpr (kRound) {
    static_assert(DT == kBF16, "stochastic rounding writes bf16");
#pragma unroll
    for (int q = 0; q < L / 4; ++q) {
      uint32_t w[4];
      rounding_words(s.rounding_key, e0 + 4 * q, w);
#pragma unroll
      for (int c = 0; c < 4; ++c) out[4 * q + c] = bfloat16_bits_stochastic(x[4 * q + c], w[c]);
    }
  } else {
#pragma unroll
    for (int c = 0; c < L; ++c) out[c] = from_float<DT>(x[c]);
  }
  store_pack<DT>(p + e0, s.vec, valid, out);
  // The next step's sum p^2 is that of the values stored now.
#pragma unroll
  for (int c = 0; c < L; ++c) {
    const float v = to_float<DT>(out[c]);
    if (c < valid) p2 += v * v;
  }
}

template <int DT, bool kRound>
__device__ __forceinline__ void full_apply(const Task& t, int64_t local, const GroupArgs& a,
                                           float& p2) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>;
  const ApplyArgs s = apply_args(t, a);
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  const float* second_moment = t.second_moment;
  const float* momentum = t.momentum;
  const int64_t numel = t.numel;
  const bool vec = s.vec;
#pragma unroll 2
  for (int k = 0; k < kFullVecsPerThread; ++k) {
    const int64_t e0 = local * kFullTileOf<DT> + (int64_t(k) * kThreads + threadIdx.x) * L;
    const int valid = valid_of<L>(numel - e0);
    if (valid == 0) continue;
    float pv[L], d[L];
    unpack<DT>(load_pack<DT>(p + e0, vec, valid), pv);
    if (momentum) {
      loadf<L>(momentum + e0, vec, valid, d);
    } else {
      float gv[L], sv[L];
      unpack<DT>(load_pack<DT>(g + e0, vec, valid), gv);
      loadf<L>(second_moment + e0, vec, valid, sv);
#pragma unroll
      for (int c = 0; c < L; ++c) d[c] = c < valid ? gv[c] / sqrtf(sv[c]) : 0.f;
    }
    write_params<DT, kRound>(s, p, e0, valid, pv, d, p2);
  }
}

// The rows of a factored tile, for one kind of momentum (a compile-time MK keeps
// the per-element work of the common kinds free of the others' branches and loads).
template <int DT, bool kRound, int MK>
__device__ __forceinline__ void factored_apply_rows(const Task& t, int64_t local,
                                                    const GroupArgs& a, float& p2) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>, TC = kTileColsOf<DT>;
  const ApplyArgs s = apply_args(t, a);
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  const float* row = t.row;
  const float* extra = MK == static_cast<int>(MomentumKind::kDense) ? t.momentum : t.update;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rc = local / t.ctiles, ct = local % t.ctiles;
  const int64_t n = t.n, m = t.m;
  const int64_t c0 = ct * TC + lane * L;
  const int valid = valid_of<L>(m - c0);
  const float row_mean = t.scalars[kRowMean];
  float b[L];
  loadf<L>(t.col_factor + c0, false, valid, b);
  // Rows of G and p in flight at a time: 16-bit tiles all eight (64 registers; 2.35 vs
  // 2.09 TB/s with four), fp32 four (eight left two blocks an SM instead of three:
  // 2.48 vs 2.96 TB/s), stochastic rounding two (its Philox state spills otherwise).
  // With momentum (or update) rows, fp32 two, which keeps the kernel at 80 registers.
  // Momentum (or update) rows come with them, 16-byte loads where aligned: read an
  // element at a time after the group's stores (p may alias them, for the compiler),
  // each row cost its own DRAM round trip. 16-bit tiles take them a row at a time (8
  // registers; groups of two spilled at three blocks an SM).
  constexpr bool kExtra = MK != static_cast<int>(MomentumKind::kNone);
  constexpr int kGroup = kRound ? kRowsPerWarp / 4
                         : kExtra ? (DT != kF32 ? kRowsPerWarp / 8 : kRowsPerWarp / 4)
                                  : kRowsPerWarp / 2;
  const bool extra_vec =
      kExtra && s.vec && reinterpret_cast<uintptr_t>(extra) % 16 == 0;
#pragma unroll
  for (int k0 = 0; k0 < kRowsPerWarp; k0 += kGroup) {
    uint4 gr[kGroup], pr[kGroup];
    float ev[kGroup][kExtra ? L : 1];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t i = tile_row(rc, k0 + k, warp);
      const int row_valid = i < n ? valid : 0;
      gr[k] = load_pack<DT>(g + i * m + c0, s.vec, row_valid);
      pr[k] = load_pack<DT>(p + i * m + c0, s.vec, row_valid);
      if constexpr (kExtra) loadf<L>(extra + i * m + c0, extra_vec, row_valid, ev[k]);
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t i = tile_row(rc, k0 + k, warp);
      if (i >= n || valid == 0) continue;
      const float ai = row_scale(row[i], row_mean);
      float gv[L], pv[L], d[L];
      unpack<DT>(gr[k], gv);
      unpack<DT>(pr[k], pv);
#pragma unroll
      for (int c = 0; c < L; ++c) {
        const float u = gv[c] * ai * b[c];
        if constexpr (MK == static_cast<int>(MomentumKind::kDense))
          d[c] = c < valid ? ev[k][c] : 0.f;
        else if constexpr (MK == static_cast<int>(MomentumKind::kCompressed))
          d[c] = c < valid ? (1.f - s.beta1) * u + ev[k][c] : 0.f;
        else
          d[c] = c < valid ? u : 0.f;
      }
      write_params<DT, kRound>(s, p, i * m + c0, valid, pv, d, p2);
    }
  }
}

template <int DT, bool kRound>
__device__ __forceinline__ void factored_apply(const Task& t, int64_t local,
                                               const GroupArgs& a, float& p2) {
  switch (t.momentum_kind) {
    case static_cast<int>(MomentumKind::kDense):
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kDense)>(t, local, a, p2);
      break;
    case static_cast<int>(MomentumKind::kCompressed):
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kCompressed)>(t, local, a,
                                                                                   p2);
      break;
    default:
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kNone)>(t, local, a, p2);
      break;
  }
}

// At most 80 registers: three blocks an SM. fp32 had run at two (96 registers, which
// four momentum rows in flight took; at an 80-register bound they spilled): its apply
// without momentum took 5.77 ms a 1.35B step against 5.55 ms at three.
// Stochastic rounding (kRound) is a kernel of its own at two blocks: its Philox code
// would otherwise cost every bf16 step registers.
constexpr int kApplyMinBlocks = 3;

template <int DT, bool kRound>
__global__ void __launch_bounds__(kThreads, kRound ? 2 : kApplyMinBlocks)
    apply_kernel(TaskTable table, GroupArgs a) {
  const Task& t = task_of_tile(table, blockIdx.x);
  if (t.fused) return;  // written by fused_apply_kernel
  const int64_t local = blockIdx.x - t.tile_begin;
  float p2 = 0.f;
  if (t.kind == kFull) full_apply<DT, kRound>(t, local, a, p2);
  else factored_apply<DT, kRound>(t, local, a, p2);
  if (t.param_sq == nullptr) return;
  // Sum p^2 of what was written, for the next step; the norms pass adds the tiles'
  // sums (tile_p2 is free again: the scalars pass has read it). A last-block
  // reduction here instead (fence + atomic a block) cost 1.8 ms a 1.35B fp32 step.
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.tile_p2[local] = p2;
}

// One block per task with a norm cache: sum p^2 of the parameter just written.
__global__ void __launch_bounds__(kThreads)
    norms_kernel(const Task* __restrict__ tasks) {
  const Task& t = tasks[blockIdx.x];
  if (t.param_sq == nullptr) return;
  double total = 0.0;
  const int64_t tiles = t.fused ? t.gtiles : t.tiles;
  for (int64_t k = threadIdx.x; k < tiles; k += blockDim.x) total += t.tile_p2[k];
  total = block_sum(total);
  if (threadIdx.x == 0) *t.param_sq = total;
}

// ---- projections -------------------------------------------------------------

__device__ __forceinline__ void projection_values(uint64_t seed, int64_t q, double scale,
                                                  float z[4]) {
  curandStatePhilox4_32_10_t state;
  curand_init(seed, static_cast<unsigned long long>(q), 0, &state);
  const uint4 w = curand4(&state);
  box_muller(w.x, w.y, scale, &z[0], &z[1]);
  box_muller(w.z, w.w, scale, &z[2], &z[3]);
}

__global__ void fill_projection_kernel(float* __restrict__ out, int64_t numel, uint64_t seed,
                                       double scale) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (4 * q >= numel) return;
  float z[4];
  projection_values(seed, q, scale, z);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * q + k < numel) out[4 * q + k] = z[k];
}

// The projection P (rows x cols, fp32; skipped when plain is null) and P scaled
// along the parameter's dimension, in the dtype of the down GEMM: left (P is
// r x n) P[k, i] a_i; right (P is m x r) P[j, k] b_j.
template <int DT>
__global__ void projection_pair_kernel(float* __restrict__ plain,
                                       Storage<DT>* __restrict__ scaled, int64_t rows,
                                       int64_t cols, uint64_t seed, double scale, bool left,
                                       const float* __restrict__ row,
                                       const float* __restrict__ scalars,
                                       const float* __restrict__ col_factor) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t numel = rows * cols;
  if (4 * q >= numel) return;
  float z[4];
  projection_values(seed, q, scale, z);
  const float row_mean = scalars[kRowMean];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t e = 4 * q + k;
    if (e >= numel) break;
    if (plain) plain[e] = z[k];
    const float s = left ? row_scale(row[e % cols], row_mean) : col_factor[e / cols];
    scaled[e] = from_float<DT>(z[k] * s);
  }
}

// New compressed momentum: M = beta1 M' + (1 - beta1) down(U), with down(U) the GEMM
// result X scaled along the other dimension: left (r x m) X[k, j] b_j, right (n x r)
// X[i, k] a_i.
__global__ void momentum_mix_kernel(float* __restrict__ momentum,
                                    const float* __restrict__ base,
                                    const float* __restrict__ x, int64_t numel, int64_t cols,
                                    bool left, const float* __restrict__ row,
                                    const float* __restrict__ scalars,
                                    const float* __restrict__ col_factor, float beta1) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float row_mean = scalars[kRowMean];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const float s = left ? col_factor[e % cols] : row_scale(row[e / cols], row_mean);
    momentum[e] = base[e] * beta1 + (x[e] * s) * (1.f - beta1);
  }
}

// ---- fused compressed momentum ------------------------------------------------
//
// D = (1 - beta1) U + beta1 up(M) is never stored: the apply pass computes up(M)
// tile by tile on the tensor cores and writes p from it. Its clip factor needs
// sum D^2 first, from (FLORA.md's identities, M the momentum before this step)
//   sum D^2 = (1 - beta1)^2 sum U^2 + 2 beta1 (1 - beta1) <down(U), M>
//             + beta1^2 <M, Gram M>,
// Gram = P P^T (left) or P^T P (right), r x r: <U, up(M)> = <down(U), M> and
// |up(M)|^2 = <M, Gram M>. sum U^2 comes with the row stats (or the rms pass), and
// down(U) is the GEMM the momentum needs anyway (fused_down_kernel).
//
// Both GEMMs read their operands as fp16: the 10-bit mantissa of TF32 (what cuBLAS's
// TF32 mode keeps) at half the bytes, which they stream from L2 for every tile (8 bytes
// an output element in fp32), and twice the tensor-core rate. P ~ N(0, 1/r) is far
// inside fp16's range; so are U (RMS ~1; a lone element reaches ~sqrt(n) / (1 - beta2))
// and M, a projection of U, |M| <~ n / sqrt(r); values past 65504 saturate instead of
// becoming inf (a gradient spike that large is clipped in D anyway).

// Two floats as fp16 (round to nearest), saturated at +-65504; NaN stays NaN.
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const __half2 top = __float2half2_rn(65504.f);
  const __half2 c = __hmin2_nan(__hmax2_nan(h, __hneg2(top)), top);
#else
  const __half2 c = h;  // the fused path runs on sm_80 and newer only
#endif
  return *reinterpret_cast<const uint32_t*>(&c);
}
__device__ __forceinline__ uint16_t to_half_bits(float x) {
  return static_cast<uint16_t>(pack_half2(x, 0.f) & 0xFFFFu);
}

// P^T in fp16 for every task of a fused group, P being prow x pcol (pcol % 4 == 0);
// blockIdx.y picks the task's seed and output. Thread `idx` draws the Philox group of
// P's row kr, columns 4 cg .. 4 cg + 3 (the same numbers as projection_pair_kernel);
// neighbouring threads take neighbouring rows, so the transposed writes coalesce.
// Also P in the tiled layout of the wgmma down GEMM (tiled_index; its padding zeroed
// beforehand), the contraction k being P's columns (left) or rows (right).
// Sizes are below 2^31 groups (checked on the host): 32-bit index arithmetic.
__global__ void projection_t_kernel(uint16_t* const* __restrict__ outs,
                                    uint16_t* const* __restrict__ tiled, bool left,
                                    const uint64_t* __restrict__ seeds, int prow, int pcol,
                                    double scale) {
  const int groups_per_row = pcol / 4;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= prow * groups_per_row) return;
  uint16_t* plain_t = outs[blockIdx.y];
  const int kr = idx % prow, cg = idx / prow;
  float z[4];
  projection_values(seeds[blockIdx.y], int64_t(kr) * groups_per_row + cg, scale, z);
  uint16_t h[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    h[u] = to_half_bits(z[u]);
    plain_t[int64_t(4 * cg + u) * prow + kr] = h[u];
  }
  uint16_t* out = tiled[blockIdx.y];
  if (left) {  // rank kr, k 4 cg .. 4 cg + 3: one half of a core row
    const int64_t ktiles = ceil_div(pcol, kTileK);
    *reinterpret_cast<uint2*>(out + tiled_index(kr, 4 * cg, ktiles)) =
        make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
  } else {  // k kr, rank 4 cg .. 4 cg + 3
    const int64_t ktiles = ceil_div(prow, kTileK);
#pragma unroll
    for (int u = 0; u < 4; ++u) out[tiled_index(4 * cg + u, kr, ktiles)] = h[u];
  }
}

// One task of a fused group's down GEMM (fused_down_kernel): down(U) in the basis of
// `proj`, then its epilogue on the momentum M (before this step):
//   partials: per tile, 2 beta1 (1 - beta1) M . down(U); skipped when null. After
//             them, kDotBlocks shares of beta1^2 Gram . S (S = M M^T or M^T M of fp16(M),
//             r x r: <M, Gram M> = <Gram, S> without an r x max(n, m) product), from
//             gram_dot_kernel once S exists
//   momentum16: fp16(M) for the up GEMM and for S; skipped when null
//   update: M = beta1 M' + (1 - beta1) down(U), M' = M or `base` (M moved to the next
//           basis on resample steps)
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
};

// The row factors a_i = row_scale(row_i) of left fused tasks, once a step: the down
// GEMM's conversion reads them instead of taking a division and a square root for every
// element (which made the sm_90a GEMM's left tasks issue-bound).
__global__ void row_factor_kernel(const DownJob* __restrict__ jobs, int n) {
  const DownJob& job = jobs[blockIdx.y];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) job.row_factor[i] = row_scale(job.row[i], job.scalars[kRowMean]);
}

// beta1^2 <Gram, S> of a fused task in kDotBlocks partials, partials[tiles + b] from
// block b (grid: kDotBlocks, tasks), each over rr / kDotBlocks consecutive elements
// (rr = r^2, r % 8 == 0: whole float4s), summed by fused_clip_kernel in a fixed order.
// (One block a task took 25 us a launch: 0.6 ms a bf16 1.35B step.)
constexpr int kDotBlocks = 16;
__global__ void __launch_bounds__(kThreads)
    gram_dot_kernel(const DownJob* __restrict__ jobs, int rr, int tiles, float beta1) {
  const DownJob& job = jobs[blockIdx.y];
  const int chunk4 = rr / 4 / kDotBlocks;
  const float4* g = reinterpret_cast<const float4*>(job.gram) + blockIdx.x * chunk4;
  const float4* q = reinterpret_cast<const float4*>(job.sq) + blockIdx.x * chunk4;
  double sum = 0.0;
  for (int e = threadIdx.x; e < chunk4; e += kThreads) {
    const float4 a = g[e], b = q[e];
    sum += double(a.x) * b.x + double(a.y) * b.y + double(a.z) * b.z + double(a.w) * b.w;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0)
    job.partials[tiles + blockIdx.x] = static_cast<double>(beta1) * beta1 * sum;
}

// One block per fused task: sum D^2 from sum U^2 and the momentum terms, then the
// clip factor. Rounding can leave a tiny negative sum where D is ~0: clamped.
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
  set_clip(t, a, fmax(0.0, keep * keep * t.terms[0] + d2));
}

__device__ __forceinline__ void copy16_async_zfill(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : uint4{};
#endif
}

// Four 8 x 8 fp16 matrices from shared memory (row addresses from lanes 0-31).
template <bool kTrans>
__device__ __forceinline__ void load_matrix_x4(uint32_t r[4], const uint16_t* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#else
  __trap();
#endif
}

// c += a b for one m16n8k16 fp16 tile, fp32 accumulation. The host plans the fused
// path on sm_80 and newer only.
__device__ __forceinline__ void mma_f16(float c[4], const uint32_t a[4], uint32_t b0,
                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// One k16 step of a warp's 64 x 32 tile (both GEMMs): acc[mt][nt] += a[mt] b[nt], with
// b as two ldmatrix.x4 loads of 16 columns each (registers 0-1 and 2-3: two n8 tiles).
__device__ __forceinline__ void mma_warp_tile(float acc[4][4][4], const uint32_t af[4][4],
                                              const uint32_t bf[2][4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      mma_f16(acc[mt][nt], af[mt], bf[nt / 2][2 * (nt % 2)], bf[nt / 2][2 * (nt % 2) + 1]);
}

// Two neighbouring elements of a row (the columns of one accumulator pair).
template <int DT>
__device__ __forceinline__ void load_pair(const Storage<DT>* ptr, float v[2]) {
  if constexpr (DT == kF32) {
    const float2 x = *reinterpret_cast<const float2*>(ptr);
    v[0] = x.x;
    v[1] = x.y;
  } else {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(ptr);
    v[0] = to_float<DT>(static_cast<uint16_t>(w & 0xFFFFu));
    v[1] = to_float<DT>(static_cast<uint16_t>(w >> 16));
  }
}

template <int DT>
__device__ __forceinline__ void store_pair(Storage<DT>* ptr, const Storage<DT> v[2]) {
  if constexpr (DT == kF32) {
    *reinterpret_cast<float2*>(ptr) = make_float2(v[0], v[1]);
  } else {
    *reinterpret_cast<uint32_t*>(ptr) =
        static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
}

// The outputs of thread (warp, lane) in a fused tile: rows i0 + wm 64 + mt 16 + g
// (+ 8 h), column pairs j0 + wn 32 + nt 8 + 2 q. An fp32 apply pass writes them in
// this order (ApplyChunks' in 16-bit), and fused_p2_kernel visits them in the same, so
// that the sum p^2 each leaves is the same to the bit.
struct UpTile {
  int64_t i0, j0;
  int wm, wn, g, q;
  __device__ UpTile(const Task& t, int64_t local) {
    i0 = (local / t.gcols) * kUpBM;
    j0 = (local % t.gcols) * kUpBN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    wm = warp / 4;
    wn = warp % 4;
    g = lane / 4;
    q = lane % 4;
  }
  __device__ int64_t row(int mt, int h) const { return i0 + wm * 64 + mt * 16 + g + 8 * h; }
  __device__ int64_t col(int nt) const { return j0 + wn * 32 + nt * 8 + 2 * q; }
};

// The elements of thread tid in a 16-bit fused tile's parameter write: the 16-byte
// chunk tid % kRowChunks of tile rows tid / kRowChunks + pass kPassRows.
template <int DT>
struct ApplyChunks {
  static constexpr int kChunk = kLane<DT>;
  static constexpr int kRowChunks = kUpBN / kChunk;
  static constexpr int kPassRows = kThreads / kRowChunks;
  static constexpr int kPasses = kUpBM / kPassRows;
  int64_t i0, j;  // the first row (pass 0) and the column, in the tensor
  int row0, col;  // the same in the tile
  __device__ ApplyChunks(const Task& t, int64_t local) {
    row0 = threadIdx.x / kRowChunks;
    col = (threadIdx.x % kRowChunks) * kChunk;
    i0 = (local / t.gcols) * kUpBM + row0;
    j = (local % t.gcols) * kUpBN + col;
  }
  __device__ int64_t row(int pass) const { return i0 + pass * kPassRows; }
};

// sum p^2 of a fused task's tiles, as the apply pass sums what it writes: where the
// norm cache does not hold it (the first step, or p written in between), so that a
// resumed run steps exactly as an uninterrupted one.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    fused_p2_kernel(TaskTable table) {
  const Task& t = table.tasks[locate(table.gtile_begins, table.count, blockIdx.x)];
  if (t.cache_p2 == nullptr) return;
  const int64_t local = blockIdx.x - t.gtile_begin;
  const Storage<DT>* p = static_cast<const Storage<DT>*>(t.param);
  float p2 = 0.f;
  if constexpr (DT != kF32) {
    using Chunks = ApplyChunks<DT>;
    const Chunks ch(t, local);
    if (ch.j < t.m) {
#pragma unroll
      for (int pass = 0; pass < Chunks::kPasses; ++pass) {
        const int64_t i = ch.row(pass);
        if (i >= t.n) continue;
        float pv[Chunks::kChunk];
        unpack<DT>(*reinterpret_cast<const uint4*>(p + i * t.m + ch.j), pv);
#pragma unroll
        for (int c = 0; c < Chunks::kChunk; ++c) p2 += pv[c] * pv[c];
      }
    }
    p2 = block_sum(p2);
    if (threadIdx.x == 0) t.cache_p2[local] = p2;
    return;
  }
  const UpTile tile(t, local);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = tile.row(mt, h);
      if (i >= t.n) continue;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int64_t j = tile.col(nt);
        if (j >= t.m) continue;
        float pv[2];
        load_pair<DT>(p + i * t.m + j, pv);
#pragma unroll
        for (int c = 0; c < 2; ++c) p2 += pv[c] * pv[c];
      }
    }
  }
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.cache_p2[local] = p2;
}

// The same for a row-stats task: sum p^2 of each factored apply tile, in
// factored_apply_rows's order (rows k = 0..7 of the warp, then the lane's columns).
template <int DT>
__global__ void __launch_bounds__(kThreads)
    tile_p2_kernel(TaskTable table) {
  const Task& t = task_of_tile(table, blockIdx.x);
  if (t.cache_p2 == nullptr || t.fused) return;
  constexpr int L = kLane<DT>, TC = kTileColsOf<DT>;
  const int64_t local = blockIdx.x - t.tile_begin;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rc = local / t.ctiles, ct = local % t.ctiles;
  const int64_t c0 = ct * TC + lane * L;
  const int valid = valid_of<L>(t.m - c0);
  const Storage<DT>* p = static_cast<const Storage<DT>*>(t.param);
  float p2 = 0.f;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t i = tile_row(rc, k, warp);
    if (i >= t.n || valid == 0) continue;
    float pv[L];
    unpack<DT>(load_pack<DT>(p + i * t.m + c0, t.vec, valid), pv);
#pragma unroll
    for (int c = 0; c < L; ++c)
      if (c < valid) p2 += pv[c] * pv[c];
  }
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.cache_p2[local] = p2;
}

// One 128 x 128 tile of a fused task: acc = (A B)[tile] on the tensor cores (fp16
// operands, fp32 accumulation), then D = (1 - beta1) U + beta1 acc and
// p = p - decay p - lr D / clip, rounded once. Needs rank and m multiples of 8
// (16-byte rows of A and B); rows and columns past the tensor and the rank's last
// partial slice read as zeros.
template <int DT>
__global__ void __launch_bounds__(kThreads, 2)
    fused_apply_kernel(TaskTable table, GroupArgs a) {
  using S = Storage<DT>;
  extern __shared__ uint4 up_smem[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(up_smem);
  const Task& t = table.tasks[locate(table.gtile_begins, table.count, blockIdx.x)];
  const int64_t local = blockIdx.x - t.gtile_begin;
  const UpTile tile(t, local);
  const int64_t i0 = tile.i0, j0 = tile.j0;
  const int64_t n = t.n, m = t.m, K = t.rank;
  const uint16_t* A = t.up_a;
  const uint16_t* B = t.up_b;
  const int tid = threadIdx.x, lane = tid % 32;
  const int ktiles = static_cast<int>(ceil_div(K, kUpBK));

  const auto load_stage = [&](int stage, int kt) {
    uint16_t* As = smem + stage * kUpStageHalves;
    uint16_t* Bs = As + kUpBM * kUpAStride;
    const int64_t k0 = int64_t(kt) * kUpBK;
#pragma unroll
    for (int c2 = 0; c2 < 2; ++c2) {
      const int c = tid + c2 * kThreads;
      const int ar = c / (kUpBK / 8), ak = (c % (kUpBK / 8)) * 8;
      const bool av = i0 + ar < n && k0 + ak < K;
      copy16_async_zfill(As + ar * kUpAStride + ak, av ? A + (i0 + ar) * K + k0 + ak : A, av);
      const int br = c / (kUpBN / 8), bc = (c % (kUpBN / 8)) * 8;
      const bool bv = k0 + br < K && j0 + bc < m;
      copy16_async_zfill(Bs + br * kUpBStride + bc, bv ? B + (k0 + br) * m + j0 + bc : B, bv);
    }
  };

  float acc[4][4][4] = {};

#pragma unroll
  for (int s = 0; s < kUpStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    copy_async_commit();
  }
  // ldmatrix row addresses: A, lanes 0-15 rows 0-15 at k 0, lanes 16-31 at k 8; B
  // (transposed), lanes 0-15 k rows 0-15 at column 0, lanes 16-31 at column 8.
  const int a_row = tile.wm * 64 + lane % 16, a_col = (lane / 16) * 8;
  const int b_row = lane % 16, b_col = tile.wn * 32 + (lane / 16) * 8;
  for (int kt = 0; kt < ktiles; ++kt) {
    copy_async_wait(kUpStages - 2);
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free again
    const int next = kt + kUpStages - 1;
    if (next < ktiles) load_stage(next % kUpStages, next);
    copy_async_commit();
    const uint16_t* As = smem + (kt % kUpStages) * kUpStageHalves;
    const uint16_t* Bs = As + kUpBM * kUpAStride;
#pragma unroll
    for (int kk = 0; kk < kUpBK; kk += 16) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        load_matrix_x4<false>(af[mt], As + (a_row + mt * 16) * kUpAStride + kk + a_col);
#pragma unroll
      for (int np = 0; np < 2; ++np)
        load_matrix_x4<true>(bf[np], Bs + (kk + b_row) * kUpBStride + b_col + np * 16);
      mma_warp_tile(acc, af, bf);
    }
  }

  const float row_mean = t.scalars[kRowMean], lr = t.scalars[kStepSize];
  const float inv_clip = t.scalars[kInvClip], decay = t.scalars[kDecay];
  const float beta1 = a.beta1, keep = 1.f - a.beta1;
  S* p = static_cast<S*>(t.param);
  const S* gr = static_cast<const S*>(t.grad);
  float p2 = 0.f;
  if constexpr (DT != kF32) {
    // 16-bit: the accumulators go through shared memory (the ring is free once every
    // copy has landed), so that G and p move in 16-byte chunks, all of a thread's
    // loads in flight before its stores. In fragment pairs, one row a round (as fp32
    // below), each thread waited on eight DRAM round trips a tile, and bf16 took about
    // as long as fp32 (7.45 against 5.63 ms a 1.35B step). fp32 stays with the pairs:
    // this way measured 7.49 against 7.19 ms there.
    copy_async_wait(0);
    __syncthreads();
    float* xs = reinterpret_cast<float*>(up_smem);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          *reinterpret_cast<float2*>(xs + (tile.row(mt, h) - i0) * kUpXStride +
                                     (tile.col(nt) - j0)) =
              make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
    __syncthreads();
    using Chunks = ApplyChunks<DT>;
    constexpr int L = Chunks::kChunk;
    const Chunks ch(t, local);
    if (ch.j < m) {
      float bj[L];
#pragma unroll
      for (int c = 0; c < L; ++c) bj[c] = t.col_factor[ch.j + c];
      uint4 gv[Chunks::kPasses], pv[Chunks::kPasses];
#pragma unroll
      for (int u = 0; u < Chunks::kPasses; ++u) {
        const int64_t i = ch.row(u);
        if (i >= n) continue;
        gv[u] = __ldcs(reinterpret_cast<const uint4*>(gr + i * m + ch.j));
        pv[u] = *reinterpret_cast<const uint4*>(p + i * m + ch.j);
      }
#pragma unroll
      for (int u = 0; u < Chunks::kPasses; ++u) {
        const int64_t i = ch.row(u);
        if (i >= n) continue;
        const float ai = row_scale(t.row[i], row_mean);
        const float* x = xs + (ch.row0 + u * Chunks::kPassRows) * kUpXStride + ch.col;
        float gf[L], pf[L];
        unpack<DT>(gv[u], gf);
        unpack<DT>(pv[u], pf);
        S out[L];
#pragma unroll
        for (int c = 0; c < L; ++c) {
          const float d = keep * (gf[c] * ai * bj[c]) + beta1 * x[c];
          float v = pf[c];
          if (decay != 0.f) v -= decay * v;
          v = v - lr * (d * inv_clip);
          out[c] = from_float<DT>(v);
          const float w = to_float<DT>(out[c]);
          p2 += w * w;
        }
        store_pack<DT>(p + i * m + ch.j, true, L, out);
      }
    }
  } else {
    const float* row = t.row;
    float b[4][2];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int64_t j = tile.col(nt);
      b[nt][0] = j < m ? t.col_factor[j] : 0.f;
      b[nt][1] = j < m ? t.col_factor[j + 1] : 0.f;
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = tile.row(mt, h);
        if (i >= n) continue;
        const float ai = row_scale(row[i], row_mean);
        float gv[4][2], pv[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int64_t j = tile.col(nt);
          if (j < m) {
            load_pair<DT>(gr + i * m + j, gv[nt]);
            load_pair<DT>(p + i * m + j, pv[nt]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int64_t j = tile.col(nt);
          if (j >= m) continue;
          S out[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float d = keep * (gv[nt][c] * ai * b[nt][c]) + beta1 * acc[mt][nt][2 * h + c];
            float x = pv[nt][c];
            if (decay != 0.f) x -= decay * x;
            x = x - lr * (d * inv_clip);
            out[c] = from_float<DT>(x);
            const float v = to_float<DT>(out[c]);
            p2 += v * v;
          }
          store_pair<DT>(p + i * m + j, out);
        }
      }
    }
  }
  if (t.param_sq == nullptr) return;
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.tile_p2[local] = p2;
}

// The G tile of a down-GEMM stage (kDnBK of the contraction by kUpBM outputs) by
// cp.async, both variants: [k][out] as stored (left), or [out][k] (right) with the
// 16-byte chunk j of row orow at chunk swizzle(orow, j) of its row; zeros past the
// tensor.
template <int DT, bool kLeft, typename Swizzle>
__device__ __forceinline__ void copy_g_stage(Storage<DT>* Gs, const Storage<DT>* G, int k0,
                                             int o0, int n, int m, Swizzle swizzle) {
  constexpr int E = 16 / int(sizeof(Storage<DT>));  // elements of G in a 16-byte chunk
  constexpr int kRowChunks = kDnBK / E;                // right: chunks of a tile row
  constexpr int kGRounds = kUpBM * kDnBK / E / kDnThreads;  // 2 fp32, 1 16-bit
#pragma unroll
  for (int u = 0; u < kGRounds; ++u) {
    const int c = threadIdx.x + u * kDnThreads;
    if constexpr (kLeft) {
      const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
      const bool v = k0 + kr < n && o0 + oc < m;
      copy16_async_zfill(Gs + kr * kUpBM + oc, v ? G + int64_t(k0 + kr) * m + o0 + oc : G, v);
    } else {
      const int orow = c / kRowChunks, j = c % kRowChunks;
      const bool v = o0 + orow < n && k0 + j * E < m;
      copy16_async_zfill(Gs + orow * kDnBK + swizzle(orow, j) * E,
                         v ? G + int64_t(o0 + orow) * m + k0 + j * E : G, v);
    }
  }
}

// The kDnBK scales of a stage's k (b_j right, a_i left) by cp.async; K % 4 == 0, so a 16-byte chunk is all in or all out (0 past the tensor).
__device__ __forceinline__ void copy_k_scales(float* dst, const float* src, int k0, int K) {
  const int tid = threadIdx.x;
  if (tid >= kDnBK / 4) return;
  const bool v = k0 + 4 * tid < K;
  copy16_async_zfill(dst + 4 * tid, v ? src + k0 + 4 * tid : src, v);
}

// ---- sm_90a: the down GEMM on wgmma ---------------------------------------------
//
// Built only for the sm_90a target (TORCH_CUDA_ARCH_LIST 9.0a): the code of
// fused_down_kernel for that target runs down_tile_wgmma, every other target the
// mma.sync loop. Both leave the same tile in shared memory for the same epilogue.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLORA_DOWN_WGMMA 1
#endif

// wgmma reads its operands from shared memory in the canonical no-swizzle layout:
// 8 x 16-byte "core matrices" of 128 contiguous bytes (8 rows of 8 halves along k),
// `lbo` bytes apart along k and `sbo` bytes apart along the rows. Every operand here
// is k-major (the conversion writes U so, and P comes in as [rank][k]).
constexpr int kWgBBytes = kDnBN * kDnBK * 2;  // a P tile, [rank][k]
constexpr int kWgABytes = kUpBM * kDnBK * 2;  // a U tile, [out][k]
constexpr int kWgABuffers = 3;                // converted, being read, being written
// The ring keeps kWgStages - 3 stages of G in flight (one is converted, one read by
// the tensor cores while the next is converted).
template <int DT> constexpr int kWgStages = DT == kF32 ? 6 : 8;
template <int DT> constexpr int kWgStageBytes = kDnGBytes<DT> + kWgBBytes;
template <int DT>
constexpr int64_t kWgSmemBytes = int64_t(kWgStages<DT>) * kWgStageBytes<DT> +
                                 kWgABuffers * kWgABytes + (kWgStages<DT> * kDnBK + kUpBM) * 4;
static_assert(kWgSmemBytes<kF32> <= 227 * 1024 && kWgSmemBytes<kBF16> <= 227 * 1024,
              "one block an SM");
static_assert(int64_t(kUpBM) * kDnXStrideRight * 4 <= kWgStages<kF32> * kWgStageBytes<kF32> &&
                  int64_t(kDnBN) * kDnXStrideLeft * 4 <= kWgStages<kBF16> * kWgStageBytes<kBF16>,
              "the epilogue tile fits the wgmma ring");
// What the host asks for: the kernel runs whichever variant the device's code has.
template <int DT>
constexpr int64_t kDnLaunchSmem = std::max(kDnSmemBytes<DT>, kWgSmemBytes<DT>);

#ifdef FLORA_DOWN_WGMMA
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32);
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async, read next by the tensor cores.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// d (64 x 128, fp32, the warpgroup's registers) += A (64 x 16) B (16 x 128), fp16.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(1));
}

// The GEMM of one fused_down_kernel tile (kUpBM outputs from o0 by kDnBN of the rank
// from r0) with wgmma: four warpgroups of 64 outputs x 128 of the rank. Stages come
// in by cp.async as in the mma.sync loop; each thread turns one 16-byte row piece of
// U (8 k of one output) a step into fp16, written k-major for the tensor cores. A
// step issues its wgmmas, converts the next U while they run, then waits for the
// previous step's: one barrier a step. Leaves the tile, [out][k] (right) or [k][out]
// (left) in fp32, at the start of shared memory.
template <int DT, bool kLeft>
__device__ __forceinline__ void down_tile_wgmma(const DownJob& job, uint8_t* smem, int n,
                                                int m, int rank, int o0, int r0,
                                                float row_mean) {
  using S = Storage<DT>;
  constexpr int kStages = kWgStages<DT>, kStageBytes = kWgStageBytes<DT>;
  constexpr int kGBytes = kDnGBytes<DT>;
  constexpr int E = 16 / int(sizeof(S));  // elements of G in a 16-byte chunk
  // U: right [out/8][k/8] cores (k neighbours 128 bytes apart, row groups 512);
  // left [k/8][out] (row groups 128 bytes apart, k neighbours 2048): either way a
  // warp's 16-byte stores and its reads of G hit distinct banks.
  constexpr uint32_t kALbo = kLeft ? kUpBM * 16 : 128, kASbo = kLeft ? 128 : (kDnBK / 8) * 128;
  constexpr uint32_t kBLbo = 128, kBSbo = (kDnBK / 8) * 128;  // P: [rank/8][k/8] cores
  uint8_t* abuf = smem + kStages * kStageBytes;
  float* kscale = reinterpret_cast<float*>(abuf + kWgABuffers * kWgABytes);
  float* col_scale_s = kscale + kStages * kDnBK;
  const int K = kLeft ? n : m;
  const S* G = static_cast<const S*>(job.grad);
  // This block's rank block of the tiled projection, one 16 KiB tile a step.
  const uint8_t* P = reinterpret_cast<const uint8_t*>(job.proj_tiled) +
                     int64_t(r0 / kTileRank) * ceil_div(K, kTileK) * kTileHalves * 2;
  const int tid = threadIdx.x, wg = tid / 128;
  // Right: G's rows in shared memory are kRowChunks 16-byte chunks (8 fp32, 4 bf16),
  // permuted by row so that the 8 rows a quarter warp reads hit distinct banks.
  constexpr int kRowChunks = kDnBK / E;
  const auto g_swizzle = [](int row) { return (row * kRowChunks / 8) % kRowChunks; };
  // Every warpgroup issues its wgmmas, also past a small rank (zeros there): under a
  // branch ptxas serializes them (C7518).
  const int wgm = wg / 2, wgn = wg % 2;
  const int ktiles = static_cast<int>(ceil_div(K, kDnBK));

  const auto load_stage = [&](int stage, int kt) {
    uint8_t* Bs = smem + stage * kStageBytes + kGBytes;
    const int k0 = kt * kDnBK;
    copy_g_stage<DT, kLeft>(reinterpret_cast<S*>(smem + stage * kStageBytes), G, k0, o0, n, m,
                            [&](int row, int j) { return j ^ g_swizzle(row); });
    // P: the step's tile as it is stored (padded with zeros), a straight copy.
    static_assert(kWgBBytes == kTileHalves * 2 && kDnBN == kTileRank && kDnBK == kTileK,
                  "one tile of the tiled projection a stage");
#pragma unroll
    for (int u = 0; u < kWgBBytes / 16 / kDnThreads; ++u) {
      const int c = tid + u * kDnThreads;
      copy16_async_zfill(Bs + c * 16, P + int64_t(kt) * kWgBBytes + c * 16, true);
    }
    copy_k_scales(kscale + stage * kDnBK, kLeft ? job.row_factor : job.col_factor, k0, K);
  };

  // Thread tid converts output `out`, k 8 kc .. 8 kc + 7 of each step: left, a warp
  // takes 32 neighbouring outputs of one k (one row of G in shared memory); right, a
  // quarter warp the 8 rows of one core matrix of U, their G chunks apart in banks by
  // the swizzle.
  const int out = kLeft ? tid % kUpBM : (tid / 32) * 8 + tid % 8;
  const int kc = kLeft ? tid / kUpBM : (tid / 8) % (kDnBK / 8);
  const int a_offset = kLeft ? kc * kALbo + out * 16
                             : (out / 8) * kASbo + kc * kALbo + (out % 8) * 16;
  struct Pending {
    float g[8], ks[8];
  };
  const auto convert_read = [&](int stage, Pending& pend) {
    const S* Gs = reinterpret_cast<const S*>(smem + stage * kStageBytes);
    const float* ks = kscale + stage * kDnBK + 8 * kc;
#pragma unroll
    for (int e = 0; e < 8; ++e) pend.ks[e] = ks[e];
    if constexpr (kLeft) {  // a warp reads 32 neighbouring outputs of one k
#pragma unroll
      for (int e = 0; e < 8; ++e) pend.g[e] = to_float<DT>(Gs[(8 * kc + e) * kUpBM + out]);
    } else {
#pragma unroll
      for (int u = 0; u < 8 / E; ++u) {
        const int j = (8 * kc) / E + u;
        const uint4 w =
            *reinterpret_cast<const uint4*>(Gs + out * kDnBK + (j ^ g_swizzle(out)) * E);
        unpack<DT>(w, pend.g + u * E);
      }
    }
  };
  float out_scale = 0.f;  // right: a_i of the thread's output row
  const auto convert_write = [&](const Pending& pend, int buffer) {
    float sc[8];
    if constexpr (kLeft) {  // a_k (0 past n) b_out
#pragma unroll
      for (int e = 0; e < 8; ++e) sc[e] = pend.ks[e] * col_scale_s[out];
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) sc[e] = out_scale * pend.ks[e];
    }
    uint32_t h[4];
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      h[e / 2] = pack_half2(pend.g[e] * sc[e], pend.g[e + 1] * sc[e + 1]);
    *reinterpret_cast<uint4*>(abuf + buffer * kWgABytes + a_offset) =
        make_uint4(h[0], h[1], h[2], h[3]);
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < ktiles) load_stage(s, s);
    copy_async_commit();
  }
  if constexpr (kLeft) {
    if (tid < kUpBM) col_scale_s[tid] = o0 + tid < m ? job.col_factor[o0 + tid] : 0.f;
  } else {
    out_scale = o0 + out < n ? row_scale(job.row[o0 + out], row_mean) : 0.f;
  }
  copy_async_wait(kStages - 3);
  __syncthreads();  // stage 0 and the column scales landed
  {
    Pending first;
    convert_read(0, first);
    convert_write(first, 0);
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // Committed: kStages - 2 + kt groups; stages up to kt + 1 must have landed.
    copy_async_wait(kStages - 4);
    fence_async_shared();  // this thread's U and cp.async data, for the tensor cores
    // U of step kt is complete; every warpgroup is done with the wgmmas of kt - 2,
    // so U buffer (kt + 1) % 3 and stage slot (kt - 2) % kStages are free.
    __syncthreads();
    const int next = kt + kStages - 2;
    if (next < ktiles) load_stage(next % kStages, next);
    copy_async_commit();
    const bool more = kt + 1 < ktiles;
    Pending pend;
    if (more) convert_read((kt + 1) % kStages, pend);
    {
      const uint8_t* As = abuf + (kt % kWgABuffers) * kWgABytes +
                          (kLeft ? wgm * 64 * 16 : wgm * 8 * kASbo);
      const uint8_t* Bs = smem + (kt % kStages) * kStageBytes + kGBytes + wgn * 16 * kBSbo;
      pin(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDnBK; kk += 16) {
        wgmma_m64n128k16(acc, smem_desc(As + (kk / 8) * kALbo, kALbo, kASbo),
                         smem_desc(Bs + (kk / 8) * kBLbo, kBLbo, kBSbo));
      }
      wgmma_commit();
    }
    if (more) convert_write(pend, (kt + 1) % kWgABuffers);
    wgmma_wait<1>();
    pin(acc);
  }
  wgmma_wait<0>();
  pin(acc);
  copy_async_wait(0);
  __syncthreads();  // the ring is free for the tile
  float* xs = reinterpret_cast<float*>(smem);
  constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
  if (r0 + wgn * 128 < rank) {
    const int lane = tid % 32, w = (tid % 128) / 32, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ol = wgm * 64 + w * 16 + g + 8 * h, kl = wgn * 128 + j * 8 + 2 * q;
        const float x0 = acc[4 * j + 2 * h], x1 = acc[4 * j + 2 * h + 1];
        if constexpr (kLeft) {  // [k][out]
          xs[kl * kXStride + ol] = x0;
          xs[(kl + 1) * kXStride + ol] = x1;
        } else {  // [out][k]
          *reinterpret_cast<float2*>(xs + ol * kXStride + kl) = make_float2(x0, x1);
        }
      }
  }
  __syncthreads();
}
#endif  // FLORA_DOWN_WGMMA

// The down GEMM of fused tasks: down(U) = P U (left, r x m) or U P (right, n x r), on
// the tensor cores with fp16 operands. A block of kDnThreads takes kUpBM outputs along
// m (left) or n (right) by kDnBN of the rank (all of it up to 256), so that G is read
// and converted once, contracting over n (left) or m (right) kDnBK at a time: G and P^T
// arrive through a ring of kDnStages<DT> buffers (cp.async); each step turns the next G
// tile into U = g a_i b_j in fp16 (pack_half2: U has RMS ~1, and its 10-bit mantissa
// is what TF32 keeps) in one of two buffers while the tensor cores work on the other,
// one barrier a step. U never exists in global memory, and the GEMM result goes
// straight into the momentum epilogue of DownJob. Grid: (tiles of a task, tasks).
// sm_90a code runs the main loop of down_tile_wgmma instead (same tile, same epilogue).
template <int DT, bool kLeft>
__global__ void __launch_bounds__(kDnThreads, 1)
    fused_down_kernel(const DownJob* __restrict__ jobs, int n, int m, int rank, float beta1,
                      int update) {
  extern __shared__ uint4 dn_smem[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(dn_smem);
  const DownJob job = jobs[blockIdx.y];  // in registers: the epilogue's stores may alias
  const int rblocks = static_cast<int>(ceil_div(rank, kDnBN));
  const int local = blockIdx.x;
  const int o0 = (local / rblocks) * kUpBM, r0 = (local % rblocks) * kDnBN;
  const int tid = threadIdx.x;
  const float row_mean = job.scalars[kRowMean];
#ifdef FLORA_DOWN_WGMMA
  down_tile_wgmma<DT, kLeft>(job, smem, n, m, rank, o0, r0, row_mean);
#else
  using S = Storage<DT>;
  constexpr int kStages = kDnStages<DT>, kStageBytes = kDnStageBytes<DT>;
  constexpr int kGBytes = kDnGBytes<DT>;
  constexpr int E = 16 / int(sizeof(S));  // elements of G in a 16-byte chunk
  constexpr int kGRounds = kUpBM * kDnBK / E / kDnThreads;  // chunks a thread: 2 fp32, 1 16-bit
  constexpr int kAStride = kLeft ? kUpBStride : kUpAStride;  // U: [k][out] or [out][k]
  constexpr int kBStride = kLeft ? kDnBStrideLeft : kUpAStride;  // P^T: [k][r] or [r][k]
  uint16_t* a16 = reinterpret_cast<uint16_t*>(smem + kStages * kStageBytes);
  float* kscale = reinterpret_cast<float*>(smem + kStages * kStageBytes + kDnABytes);
  const int K = kLeft ? n : m;
  const S* G = static_cast<const S*>(job.grad);
  const uint16_t* P = job.proj;
  const int lane = tid % 32, warp = tid / 32;
  const int wm = warp / 8, wn = warp % 8;  // warp tile: 64 outputs x 32 of the rank
  const bool active = r0 + wn * 32 < rank;  // warps past a small rank skip their MMAs
  const int ktiles = static_cast<int>(ceil_div(K, kDnBK));

  // Stage: G [out][k] (right) or [k][out] (left) as stored, P^T, and the scale of each
  // k of the stage (b_j right, a_i left; 0 past the tensor), all by cp.async: nothing
  // on a step's critical path waits for global memory.
  const auto load_stage = [&](int stage, int kt) {
    uint16_t* Bs = reinterpret_cast<uint16_t*>(smem + stage * kStageBytes + kGBytes);
    const int k0 = kt * kDnBK;
    copy_g_stage<DT, kLeft>(reinterpret_cast<S*>(smem + stage * kStageBytes), G, k0, o0, n, m,
                            [](int, int j) { return j; });
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int c = tid + u * kDnThreads;
      if constexpr (kLeft) {
        const int kr = c / (kDnBN / 8), rc = (c % (kDnBN / 8)) * 8;
        const bool v = k0 + kr < n && r0 + rc < rank;
        copy16_async_zfill(Bs + kr * kBStride + rc,
                           v ? P + int64_t(k0 + kr) * rank + r0 + rc : P, v);
      } else {
        const int rr = c / (kDnBK / 8), kc = (c % (kDnBK / 8)) * 8;
        const bool v = r0 + rr < rank && k0 + kc < m;
        copy16_async_zfill(Bs + rr * kBStride + kc, v ? P + int64_t(r0 + rr) * m + k0 + kc : P,
                           v);
      }
    }
    copy_k_scales(kscale + stage * kDnBK, kLeft ? job.row_factor : job.col_factor, k0, K);
  };

  // The scales of the thread's chunks along the output dimension, the same every step:
  // right, a_i of its rows; left, b_j of the block's columns, in shared memory (which
  // spares the registers). 0 past the tensor. Set after the first stages are issued.
  float out_scale[kLeft ? 1 : kGRounds];
  float* col_scale_s = kscale + kStages * kDnBK;
  // U of a stage in two halves: read G (and the k scales) from shared memory, then,
  // after the step's MMAs have been issued, scale, round and store into `dst_buf`.
  struct Pending {
    uint4 g[kGRounds];
    float ks[kLeft ? kGRounds : E];
  };
  const auto convert_read = [&](int stage, Pending& pend) {
    const S* Gs = reinterpret_cast<const S*>(smem + stage * kStageBytes);
    const float* ks = kscale + stage * kDnBK;
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int c = tid + u * kDnThreads;
      if constexpr (kLeft) {
        const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
        pend.g[u] = *reinterpret_cast<const uint4*>(Gs + kr * kUpBM + oc);
        pend.ks[u] = ks[kr];
      } else {
        const int orow = c / (kDnBK / E), kc = (c % (kDnBK / E)) * E;
        pend.g[u] = *reinterpret_cast<const uint4*>(Gs + orow * kDnBK + kc);
      }
    }
    if constexpr (!kLeft) {
      const int kc = (tid % (kDnBK / E)) * E;
#pragma unroll
      for (int e = 0; e < E; ++e) pend.ks[e] = ks[kc + e];
    }
  };
  const auto convert_write = [&](const Pending& pend, uint16_t* dst_buf) {
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int c = tid + u * kDnThreads;
      float g[E], sc[E];
      unpack<DT>(pend.g[u], g);
      int dst;
      if constexpr (kLeft) {  // a_k (0 past n) b_out
        const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) sc[e] = pend.ks[u] * col_scale_s[oc + e];
        dst = kr * kAStride + oc;
      } else {
        const int orow = c / (kDnBK / E), kc = (c % (kDnBK / E)) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) sc[e] = out_scale[u] * pend.ks[e];
        dst = orow * kAStride + kc;
      }
      uint32_t h[E / 2];
#pragma unroll
      for (int e = 0; e < E; e += 2) h[e / 2] = pack_half2(g[e] * sc[e], g[e + 1] * sc[e + 1]);
      if constexpr (E == 4) {
        *reinterpret_cast<uint2*>(dst_buf + dst) = make_uint2(h[0], h[1]);
      } else {
        *reinterpret_cast<uint4*>(dst_buf + dst) = make_uint4(h[0], h[1], h[2], h[3]);
      }
    }
  };

  float acc[4][4][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    copy_async_commit();
  }
  // The scales along the output dimension, read while the first stages load.
  if constexpr (kLeft) {
    if (tid < kUpBM) col_scale_s[tid] = o0 + tid < m ? job.col_factor[o0 + tid] : 0.f;
  } else {
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int i = o0 + (tid + u * kDnThreads) / (kDnBK / E);
      out_scale[u] = i < n ? row_scale(job.row[i], row_mean) : 0.f;
    }
  }
  copy_async_wait(kStages - 2);
  __syncthreads();  // stage 0 landed
  {
    Pending first;
    convert_read(0, first);
    convert_write(first, a16);
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // Committed: kStages - 1 + kt groups; stages up to kt + 1 must have landed.
    copy_async_wait(kStages - 3);
    // U of step kt is in a16[kt % 2] for every thread; the MMAs of kt - 1 are done
    // with the other buffer and with stage kt - 1, whose slot loads step kt + 3 next.
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    copy_async_commit();
    const bool more = kt + 1 < ktiles;
    Pending pend;
    if (more) convert_read((kt + 1) % kStages, pend);
    if (active) {
      const uint16_t* As = a16 + (kt % 2) * kDnAHalves;
      const uint16_t* Bs = reinterpret_cast<const uint16_t*>(
          smem + (kt % kStages) * kStageBytes + kGBytes);
#pragma unroll
      for (int kk = 0; kk < kDnBK; kk += 16) {
        uint32_t af[4][4], bf[2][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          if constexpr (kLeft) {  // [k][out]: transposed loads
            load_matrix_x4<true>(af[mt], As + (kk + (lane / 16) * 8 + lane % 8) * kAStride +
                                             wm * 64 + mt * 16 + ((lane / 8) % 2) * 8);
          } else {
            load_matrix_x4<false>(af[mt], As + (wm * 64 + mt * 16 + lane % 16) * kAStride + kk +
                                              (lane / 16) * 8);
          }
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          if constexpr (kLeft) {  // [k][r]
            load_matrix_x4<true>(bf[np], Bs + (kk + lane % 16) * kBStride + wn * 32 + np * 16 +
                                             (lane / 16) * 8);
          } else {  // [r][k]
            load_matrix_x4<false>(bf[np], Bs + (wn * 32 + np * 16 + (lane / 16) * 8 + lane % 8) *
                                                   kBStride + kk + ((lane / 8) % 2) * 8);
          }
        }
        mma_warp_tile(acc, af, bf);
      }
    }
    if (more) convert_write(pend, a16 + ((kt + 1) % 2) * kDnAHalves);
  }

  // The tile goes through shared memory (the ring is free now), [k][out] (left) or
  // [out][k] (right), for the epilogue below.
  copy_async_wait(0);
  __syncthreads();
  if (active) {
    float* xt = reinterpret_cast<float*>(smem);
    constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int ol = wm * 64 + mt * 16 + g + 8 * h, kl = wn * 32 + nt * 8 + 2 * q;
          if constexpr (kLeft) {  // [k][out]
            xt[kl * kXStride + ol] = acc[mt][nt][2 * h];
            xt[(kl + 1) * kXStride + ol] = acc[mt][nt][2 * h + 1];
          } else {  // [out][k]
            *reinterpret_cast<float2*>(xt + ol * kXStride + kl) =
                make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          }
        }
  }
  __syncthreads();
#endif
  // Epilogue: the momentum is read and written in whole 16-byte chunks along its rows:
  // M[o, k] (right, the tile's rows are contiguous) or M[k, o] (left, 512-byte row
  // pieces). Scattered fragment-sized accesses took about a third of the kernel's time.
  const float* xs = reinterpret_cast<const float*>(smem);
  constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
  const float keep = 1.f - beta1, cross = 2.f * beta1 * keep;
  float sum = 0.f;
  constexpr int kRowChunks = kLeft ? kUpBM / 4 : kDnBN / 4;  // float4s along a tile row
  constexpr int kBatch = 8, kRounds = kUpBM * kDnBN / 4 / kDnThreads / kBatch;  // 2
  // kBatch chunks a thread at a time, their loads issued before any store: the stores
  // might alias the next loads as far as the compiler knows, and one DRAM round trip a
  // chunk kept the kernel waiting.
#pragma unroll 1
  for (int round = 0; round < kRounds; ++round) {
    int64_t idx[kBatch];
    bool ok[kBatch];
    float4 m4[kBatch], b4[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = tid + (round * kBatch + u) * kDnThreads;
      const int row = c / kRowChunks, col = (c % kRowChunks) * 4;  // of the tile as stored
      if constexpr (kLeft) {  // row: rank index, col: output
        ok[u] = r0 + row < rank && o0 + col < m;
        idx[u] = int64_t(r0 + row) * m + o0 + col;
      } else {  // row: output, col: rank index (rank % 8 == 0: whole chunks)
        ok[u] = o0 + row < n && r0 + col < rank;
        idx[u] = int64_t(o0 + row) * rank + r0 + col;
      }
      if (!ok[u]) continue;
      m4[u] = *reinterpret_cast<const float4*>(job.momentum + idx[u]);
      b4[u] = update && job.base != nullptr ? *reinterpret_cast<const float4*>(job.base + idx[u])
                                            : m4[u];
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (!ok[u]) continue;
      const int c = tid + (round * kBatch + u) * kDnThreads;
      const int row = c / kRowChunks, col = (c % kRowChunks) * 4;
      const float4 x4 = *reinterpret_cast<const float4*>(xs + row * kXStride + col);
      const float x[4] = {x4.x, x4.y, x4.z, x4.w};
      const float mo[4] = {m4[u].x, m4[u].y, m4[u].z, m4[u].w};
      const float bv[4] = {b4[u].x, b4[u].y, b4[u].z, b4[u].w};
      if (job.partials != nullptr) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += mo[e] * (cross * x[e]);
      }
      if (job.momentum16 != nullptr)
        *reinterpret_cast<uint2*>(job.momentum16 + idx[u]) =
            make_uint2(pack_half2(mo[0], mo[1]), pack_half2(mo[2], mo[3]));
      if (update)
        *reinterpret_cast<float4*>(job.momentum + idx[u]) =
            make_float4(bv[0] * beta1 + x[0] * keep, bv[1] * beta1 + x[1] * keep,
                        bv[2] * beta1 + x[2] * keep, bv[3] * beta1 + x[3] * keep);
    }
  }
  if (job.partials == nullptr) return;
  const double total = block_sum(static_cast<double>(sum));
  if (tid == 0) job.partials[local] = total;
}

// ---- host side -----------------------------------------------------------------

// f(std::integral_constant<int, DT>{}) for a run-time dtype code: the one switch from
// the codes to the kernels' template argument.
template <typename F>
void with_dtype(int dtype, F&& f) {
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


int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT_MAX, "flora: ", what, " = ", v, " exceeds the cuBLAS int range");
  return static_cast<int>(v);
}

cudaDataType_t cuda_type(int dt) {
  return dt == kF32 ? CUDA_R_32F : dt == kBF16 ? CUDA_R_16BF : CUDA_R_16F;
}

// Row-major C (M x N, fp32) = alpha op(A) op(B) + beta C, through cuBLAS's
// column-major API as C^T = op(B)^T op(A)^T: run(handle, opB, opA, N, M, K, ldb, lda,
// ldc, type of A and B, compute type) makes the call. A and B share the type `ab`.
// fp32 inputs run on TF32 tensor cores when tf32 is set; 16-bit inputs always use the
// tensor cores with fp32 accumulation.
template <typename Run>
void cublas_row_major(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int ab,
                      bool tf32, const Run& run) {
  const int lda = as_int(trans_a ? M : K, "lda"), ldb = as_int(trans_b ? K : N, "ldb");
  const bool fast = ab == kF32 && tf32;
  const cublasComputeType_t compute = fast ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // torch sets the shared handle's math mode from allow_tf32, and TF32 math mode lets
  // cuBLAS use TF32 even for CUBLAS_COMPUTE_32F: our option decides, not that flag.
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasMath_t previous;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &previous));
  TORCH_CUDABLAS_CHECK(
      cublasSetMathMode(handle, fast ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  const cublasStatus_t status =
      run(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          as_int(N, "N"), as_int(M, "M"), as_int(K, "K"), ldb, lda, as_int(N, "ldc"),
          cuda_type(ab), compute);
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, previous));
  TORCH_CUDABLAS_CHECK(status);
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, const void* B, int ab, float beta, float* C, bool tf32) {
  cublas_row_major(trans_a, trans_b, M, N, K, ab, tf32,
                   [&](cublasHandle_t handle, cublasOperation_t op_b, cublasOperation_t op_a,
                       int n, int m, int k, int ldb, int lda, int ldc, cudaDataType_t type,
                       cublasComputeType_t compute) {
                     return cublasGemmEx(handle, op_b, op_a, n, m, k, &alpha, B, type, ldb, A,
                                         type, lda, &beta, C, CUDA_R_32F, ldc, compute,
                                         CUBLAS_GEMM_DEFAULT);
                   });
}

void fill_projection_cuda(const at::Tensor& out, int64_t seed, double scale) {
  detail::check_projection_output(out, seed, scale);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t groups = ceil_div(numel, 4);
  fill_projection_kernel<<<ceil_div(groups, kThreads), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), numel, static_cast<uint64_t>(seed), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "flora: unsupported param dtype ", t);
  }
}

// An integer tuning knob from the environment, read on every call (tests change
// them between steps); a value that is not an integer from min_value to max_value is
// an error (a switch: min_value or min_value + 1).
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
  if (max_value == min_value + 1)  // a switch
    TORCH_CHECK(ok, "flora: environment variable ", name, " must be ", min_value, " or ",
                max_value, ", got '", env, "'");
  TORCH_CHECK(ok, "flora: environment variable ", name, " must be an integer from ", min_value,
              " to ", max_value, ", got '", env, "'");
  return v;
}

// Side streams of the shape groups (FLORA_SIDE_STREAMS, default kSideStreams).
int side_stream_count() {
  return static_cast<int>(env_int("FLORA_SIDE_STREAMS", kSideStreams, 0, kMaxSideStreams));
}

// The first `count` side streams of a device: created once, kept for every step.
const std::vector<at::cuda::CUDAStream>& side_streams(c10::DeviceIndex device, int count) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, std::vector<at::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto& s = streams[device];
  s.reserve(kMaxSideStreams);  // never moves: another step may hold its streams
  while (static_cast<int>(s.size()) < count)
    s.push_back(at::cuda::getStreamFromPool(false, device));
  return s;
}

// Bytes of gradients and parameters per batch. Measured on an H100 (LLaMA 1.35B
// shapes): 32 MiB batches were no faster in L2 than 1 GiB ones and paid ~5 ms of
// launch gaps a step; 4 GiB batches stepped fp32 in 9.1 ms against 10.3 ms at 1 GiB
// (fewer launches, fewer partial last waves); one 16 GiB batch (every tensor of a
// 1.35B model) stepped fp32 in 8.17-8.70 ms against 8.32-8.98 ms at 4 GiB (two
// rounds, 2026-11-24), so the default batches a whole model of that size. The
// row-stats workspace grows with the batch: 1.7% of the parameter bytes (fp32).
int64_t batch_bytes_limit() { return env_int("FLORA_BATCH_BYTES", int64_t(16) << 30, 1); }

// 1/FLORA_FUSED_SHARE of the call's parameter bytes for fused tasks' fp16 buffers in a
// batch (default kFusedShare; larger values use less memory and more batches).
int64_t fused_share() { return env_int("FLORA_FUSED_SHARE", kFusedShare, 1); }

// ...but at least FLORA_FUSED_MIN_BYTES (default kFusedMinBytes; 0: the share alone).
int64_t fused_min_bytes() { return env_int("FLORA_FUSED_MIN_BYTES", kFusedMinBytes, 0); }

// Groups of FLORA_MIN_BATCHED (default kMinBatched) or more fused tensors of one shape
// take one batched GEMM a product; smaller ones one GEMM a tensor.
int64_t min_batched() { return env_int("FLORA_MIN_BATCHED", kMinBatched, 1); }

// Row stats (one stats pass, no rms pass) for factored tensors without momentum,
// on unless FLORA_ROW_STATS=0 (kept for comparisons: the tile passes serve every
// tensor too).
bool row_stats_enabled() { return env_int("FLORA_ROW_STATS", 1, 0, 1) == 1; }

// Shared memory a block may have on the current device (after cudaFuncSetAttribute).
int64_t smem_optin() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// Dynamic shared memory a stats block may have on the current device, less room
// for the kernel's static shared memory.
int64_t stats_smem_limit() { return std::max<int64_t>(0, smem_optin() - 8 * 1024); }

// Buffers in a row-stats block's ring of stages (FLORA_STATS_STAGES, 2-4).
int64_t stats_stages() { return env_int("FLORA_STATS_STAGES", 0, 2, 4); }

// Sets up row stats for factored task t (no momentum, 16-byte aligned rows) when its
// rows are wide enough to keep a block's threads busy and the stages (plus, for rows
// too wide for register accumulators, the column accumulators) fit in shared memory;
// returns the shared memory a block needs, or 0 (tile passes).
int64_t plan_row_stats(Task& t, int64_t elem, int64_t lane_elems, int64_t smem_limit,
                       int64_t stages) {
  const int64_t mv = t.m / lane_elems;
  if (!t.vec || t.m % lane_elems != 0 || mv < kThreads / 2 || mv > INT_MAX / 4) return 0;
  const int64_t row_bytes = t.m * elem * (t.stats_p ? 2 : 1);
  const int64_t rows = stage_rows_of(row_bytes);
  const int64_t stage = rows * row_bytes;
  if (stages == 0) stages = elem == 4 ? 3 : 2;  // default
  const int64_t reg_vecs = lane_elems == kLane<kF32> ? kRegAccVecs<kF32> : kRegAccVecs<kBF16>;
  t.stage_rows = static_cast<int32_t>(rows);
  if (mv <= reg_vecs * kThreads) {
    for (int64_t s = stages; s >= 2; --s) {
      if (s * stage <= smem_limit) {
        t.row_stats = kRowStatsRegisters;
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
void set_block_rows(Task& t, int64_t row_bytes, int64_t bytes) {
  const int64_t elem = row_bytes / t.m;
  const int64_t wanted = std::clamp(ceil_div(ceil_div(bytes, kStatsBlocksTarget), row_bytes),
                                    ceil_div(kRowBlockMinColBytes, elem),
                                    kRowBlockMaxColBytes / elem);
  // Whole stages of G alone: a step whose stages also hold p (fewer rows) sums each
  // column over the same blocks of rows, so in the same order.
  const int64_t g_rows = stage_rows_of(row_bytes);
  t.block_rows = static_cast<int32_t>(ceil_div(wanted, g_rows) * g_rows);
  t.rchunks = static_cast<int32_t>(ceil_div(t.n, t.block_rows));
}

// A parameter of the call, ready for the kernels.
struct Item {
  size_t index;           // in the call
  at::Tensor param;       // contiguous (a copy when the parameter is not)
  at::Tensor grad;        // contiguous
  const GroupEntry* entry;
  int dtype;
};

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
          row_factor = 0, cache_p2 = 0;
  int64_t kept = 0, partials = 0, work = 0;  // floats of each region
};

int64_t aligned(int64_t floats) { return ceil_div(floats, 4) * 4; }

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
    w.tiled = take(work_at, ceil_div(tiled_halves(t.rank, pdim), 2));
    if (t.n < t.m) w.row_factor = take(work_at, t.n);
    w.momentum16 = take(work_at, ceil_div(t.rank * mdim, 2));
  } else if (t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
    w.update = take(work_at, t.numel);
  }
  w.kept = kept_at - kept_base;
  w.partials = partials_at - partials_base;
  w.work = work_at - work_base;
  return w;
}

bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The compressed-momentum work of one task between the scalars and rms passes
// (FLORA.md step 4): fills `update` with beta1 up_s(M) (old M), then moves M to
// beta1 M' + (1 - beta1) down(U), M' = M or its transfer to the next basis.
void compressed_momentum(const Item& item, const Task& t, const at::Tensor& momentum) {
  const GroupEntry& entry = *item.entry;
  const StepOptions& o = entry.options;
  const ParamLayout& layout = entry.layout;
  const int64_t n = layout.rows, m = layout.cols, r = layout.rank;
  const bool left = layout.left;
  const auto shape = layout.projection_shape();
  const int64_t prow = shape[0], pcol = shape[1];
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = item.param.options().dtype(at::kFloat);
  const bool resample = o.resample();
  // The down GEMM reads G as it is: 16-bit gradients meet a 16-bit scaled P
  // (tensor cores, fp32 accumulation) unless exact fp32 was asked for.
  const bool exact_16bit = item.dtype != kF32 && !o.tf32;
  const int down_type = exact_16bit ? kF32 : item.dtype;
  const at::Tensor grad = exact_16bit ? item.grad.to(at::kFloat) : item.grad;
  const at::ScalarType scaled_dtype = down_type == kF32 ? at::kFloat : item.grad.scalar_type();

  at::Tensor p_now = at::empty({prow, pcol}, f32);
  at::Tensor p_next = resample ? at::empty({prow, pcol}, f32) : at::Tensor();
  at::Tensor scaled = at::empty({prow, pcol}, f32.dtype(scaled_dtype));
  const int64_t groups = ceil_div(prow * pcol, 4);
  const auto fill_pair = [&](float* plain, int64_t seed, bool with_scaled) {
    const int blocks = static_cast<int>(ceil_div(groups, kThreads));
    const uint64_t s = static_cast<uint64_t>(seed);
    if (!with_scaled) {
      fill_projection_kernel<<<blocks, kThreads, 0, stream>>>(plain, prow * pcol, s, scale);
    } else if (down_type == kF32) {
      projection_pair_kernel<kF32><<<blocks, kThreads, 0, stream>>>(
          plain, scaled.data_ptr<float>(), prow, pcol, s, scale, left, t.row, t.scalars,
          t.col_factor);
    } else if (down_type == kBF16) {
      projection_pair_kernel<kBF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled.data_ptr()), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    } else {
      projection_pair_kernel<kF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled.data_ptr()), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  fill_pair(p_now.data_ptr<float>(), o.seed, !resample);
  if (resample) fill_pair(p_next.data_ptr<float>(), next_seed(o.seed), true);

  // X = (P diag a) G (left, r x m) or G (diag b P) (right, n x r).
  at::Tensor x = at::empty(momentum.sizes(), f32);
  if (left) {
    gemm(false, false, r, m, n, 1.f, scaled.data_ptr(), grad.data_ptr(), down_type, 0.f,
         x.data_ptr<float>(), o.tf32);
  } else {
    gemm(false, false, n, r, m, 1.f, grad.data_ptr(), scaled.data_ptr(), down_type, 0.f,
         x.data_ptr<float>(), o.tf32);
  }
  // update = beta1 up_now(M): P^T M (left) or M P^T (right), from the old M.
  const float b1 = static_cast<float>(o.beta1);
  float* mom = momentum.data_ptr<float>();
  if (left) {
    gemm(true, false, n, m, r, b1, p_now.data_ptr<float>(), mom, kF32, 0.f, t.update, o.tf32);
  } else {
    gemm(false, true, n, m, r, b1, mom, p_now.data_ptr<float>(), kF32, 0.f, t.update, o.tf32);
  }
  // M' = down_next(up_now(M)) through the r x r product of the two bases.
  at::Tensor base = momentum;
  if (resample) {
    at::Tensor bases = at::empty({r, r}, f32);
    base = at::empty(momentum.sizes(), f32);
    if (left) {
      gemm(false, true, r, r, n, 1.f, p_next.data_ptr<float>(), p_now.data_ptr<float>(), kF32,
           0.f, bases.data_ptr<float>(), o.tf32);
      gemm(false, false, r, m, r, 1.f, bases.data_ptr<float>(), mom, kF32, 0.f,
           base.data_ptr<float>(), o.tf32);
    } else {
      gemm(true, false, r, r, m, 1.f, p_now.data_ptr<float>(), p_next.data_ptr<float>(), kF32,
           0.f, bases.data_ptr<float>(), o.tf32);
      gemm(false, false, n, r, r, 1.f, mom, bases.data_ptr<float>(), kF32, 0.f,
           base.data_ptr<float>(), o.tf32);
    }
  }
  const int64_t numel = momentum.numel();
  momentum_mix_kernel<<<static_cast<int>(std::min<int64_t>(ceil_div(numel, kThreads), 4096)),
                        kThreads, 0, stream>>>(mom, base.data_ptr<float>(),
                                               x.data_ptr<float>(), numel, left ? m : r, left,
                                               t.row, t.scalars, t.col_factor, b1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// FLORA_FUSED_MOMENTUM=0 sends compressed momentum through the unfused passes (an
// n x m update buffer and the rms pass) even with TF32 on; kept for comparisons.
bool fused_momentum_enabled() { return env_int("FLORA_FUSED_MOMENTUM", 1, 0, 1) == 1; }

// Batched gemm(): C_k = alpha op(A_k) op(B_k) + beta C_k for the `count` pointer
// triples in device arrays a, b, c (one cuBLAS launch for tensors of one shape).
void gemm_batched(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const void* const* a, const void* const* b, int ab, float beta,
                  void* const* c, int count, bool tf32) {
  cublas_row_major(trans_a, trans_b, M, N, K, ab, tf32,
                   [&](cublasHandle_t handle, cublasOperation_t op_b, cublasOperation_t op_a,
                       int n, int m, int k, int ldb, int lda, int ldc, cudaDataType_t type,
                       cublasComputeType_t compute) {
                     return cublasGemmBatchedEx(handle, op_b, op_a, n, m, k, &alpha, b, type,
                                                ldb, a, type, lda, &beta, c, CUDA_R_32F, ldc,
                                                count, compute, CUBLAS_GEMM_DEFAULT);
                   });
}

// A fused task's fp16 operands of the up GEMM, in the batch workspace.
struct FusedBuffers {
  uint16_t* plain_t;     // P^T
  uint16_t* momentum16;  // M before this step
  uint16_t* tiled;       // P as the sm_90a down GEMM reads it (tiled_index)
  float* row_factor;     // left: a_i of every row
};

// Host-to-device copies of a step's tables (task descriptors, pointer arrays, jobs):
// a pinned block of torch's caching host allocator, filled by the caller, then copied
// on the current stream and kept from reuse until that copy is done. What
// Tensor::to(non_blocking) does, without its dispatch and two tensors a copy.
at::DataPtr pinned_block(int64_t bytes) {
  return at::getHostAllocator(at::kCUDA)->allocate(static_cast<size_t>(bytes));
}

void upload(void* device, const at::DataPtr& host, int64_t bytes) {
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(device, host.get(), static_cast<size_t>(bytes),
                                 cudaMemcpyHostToDevice, stream));
  at::getHostAllocator(at::kCUDA)->record_event(host.get(), host.get_context(),
                                                 stream.unwrap());
}

// Shared memory beyond 48 KiB must be allowed per kernel (and device) before a launch
// asks for it: cudaFuncSetAttribute once a kernel, device and size (a call a launch
// cost ~3 us of host time, 37 calls a step on 0.1B shapes).
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
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

template <int DT, bool kLeft>
void launch_down(dim3 grid, const DownJob* jobs, int n, int m, int rank, float beta1,
                 bool update, cudaStream_t stream) {
  allow_smem(fused_down_kernel<DT, kLeft>, kDnLaunchSmem<DT>);
  fused_down_kernel<DT, kLeft><<<grid, kDnThreads, kDnLaunchSmem<DT>, stream>>>(
      jobs, n, m, rank, beta1, update ? 1 : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int DT>
void launch_down(bool left, dim3 grid, const DownJob* jobs, int n, int m, int rank, float beta1,
                 bool update, cudaStream_t stream) {
  if (left) launch_down<DT, true>(grid, jobs, n, m, rank, beta1, update, stream);
  else launch_down<DT, false>(grid, jobs, n, m, rank, beta1, update, stream);
}

// The tiles of a fused task's down GEMM (kUpBM outputs along max(n, m) by kDnBN of the
// rank each): one partial sum of the momentum terms each.
int64_t down_tiles(int64_t n, int64_t m, int64_t rank) {
  return ceil_div(std::max(n, m), kUpBM) * ceil_div(rank, kDnBN);
}

// The momentum work of fused tasks of one shape (same n, m, rank, dtype), before the
// apply pass: P^T of the current basis (and of the next one on resample steps), the
// r x r products Gram = P P^T and S = M M^T (batched cuBLAS: one tensor's are too small
// to fill the GPU), then the down GEMM, whose epilogue leaves the momentum terms of
// sum D^2, M in fp16 for the up GEMM, and the new M. On resample steps the down GEMM
// runs twice: in the current basis for the terms, in the next one for the new M.
// Groups of min_batched tensors or more batch their GEMMs.
void fused_momentum_group(const std::vector<const Item*>& items,
                          const std::vector<const Task*>& tasks,
                          const std::vector<FusedBuffers>& bufs, int64_t min_batched) {
  const Item& first = *items[0];
  const ParamLayout& layout = first.entry->layout;
  const StepOptions& o0 = first.entry->options;
  const int64_t n = layout.rows, m = layout.cols, r = layout.rank;
  const bool left = layout.left;
  const auto shape = layout.projection_shape();
  const int64_t prow = shape[0], pcol = shape[1], psize = prow * pcol;
  const int64_t msize = first.entry->state.momentum->numel();
  const int count = static_cast<int>(items.size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = first.param.options().dtype(at::kFloat);
  const bool resample = o0.resample();  // the same for the whole group

  at::Tensor next_t, next_p, bases, base;  // next_p: the next basis's tiled P
  // P tiled for the sm_90a down GEMM; zeros where the tiles pass the rank or k.
  const int64_t kdim = left ? n : m, tsize = tiled_halves(r, kdim);
  const bool tile_padding = r % kTileRank != 0 || kdim % kTileK != 0;
  if (resample) {
    next_t = at::empty({count, pcol, prow}, f32.dtype(at::kHalf));
    next_p = tile_padding ? at::zeros({count, tsize}, f32.dtype(at::kHalf))
                          : at::empty({count, tsize}, f32.dtype(at::kHalf));
    bases = at::empty({count, r, r}, f32);
    base = at::empty({count, msize}, f32);
  }
  const auto at_k = [](const at::Tensor& t, int k, int64_t elems) -> void* {
    return t.defined() ? static_cast<uint8_t*>(t.data_ptr()) + k * elems * t.element_size()
                       : nullptr;
  };

  // One pinned copy to the device: the pointer arrays of the batched GEMMs and of the
  // projection kernel, the projection seeds, then the down GEMM's jobs (one pass, two
  // on resample steps).
  enum { kGramA, kGramC, kSqA, kSqC, kBasesA, kBasesB, kBasesC, kBaseA, kBaseB, kBaseC,
         kProjNow, kProjNext, kPlainNow, kPlainNext, kSeedNow, kSeedNext, kArrays };
  static_assert(sizeof(DownJob) % sizeof(int64_t) == 0, "jobs follow the arrays aligned");
  const int passes = resample ? 2 : 1;
  const int64_t job_words = int64_t(sizeof(DownJob) / sizeof(int64_t));
  const int64_t table_words = kArrays * count + passes * count * job_words;
  const at::DataPtr host = pinned_block(table_words * 8);
  // One device allocation: Gram, S (count r x r each), then the table.
  const int64_t rr = int64_t(count) * r * r;  // even: r is a multiple of 8
  const at::Tensor scratch = at::empty({2 * rr + 2 * table_words}, f32);
  float* const gram = scratch.data_ptr<float>();
  float* const sq = gram + rr;
  int64_t* const dwords = reinterpret_cast<int64_t*>(sq + rr);
  int64_t* words = static_cast<int64_t*>(host.get());
  auto* ptrs = reinterpret_cast<const void**>(words);
  const auto set = [&](int array, int k, const void* p) { ptrs[array * count + k] = p; };
  auto* jobs = reinterpret_cast<DownJob*>(words + kArrays * count);
  for (int k = 0; k < count; ++k) {
    const StepOptions& o = items[k]->entry->options;
    const Task& t = *tasks[k];
    float* mom = items[k]->entry->state.momentum->data_ptr<float>();
    set(kGramA, k, bufs[k].plain_t);
    set(kGramC, k, gram + k * r * r);
    set(kSqA, k, bufs[k].momentum16);  // written by the down GEMM before S
    set(kSqC, k, sq + k * r * r);
    // bases = P_next P_now^T (left) or P_now^T P_next (right), from the transposes.
    set(kBasesA, k, left ? at_k(next_t, k, psize) : bufs[k].plain_t);
    set(kBasesB, k, left ? static_cast<const void*>(bufs[k].plain_t) : at_k(next_t, k, psize));
    set(kBasesC, k, at_k(bases, k, r * r));
    set(kBaseA, k, left ? at_k(bases, k, r * r) : mom);
    set(kBaseB, k, left ? mom : at_k(bases, k, r * r));
    set(kBaseC, k, at_k(base, k, msize));
    set(kProjNow, k, bufs[k].plain_t);
    set(kProjNext, k, at_k(next_t, k, psize));
    set(kPlainNow, k, bufs[k].tiled);
    set(kPlainNext, k, at_k(next_p, k, tsize));
    if (tile_padding)
      C10_CUDA_CHECK(cudaMemsetAsync(bufs[k].tiled, 0, tsize * 2, stream));
    words[kSeedNow * count + k] = static_cast<int64_t>(o.seed);
    words[kSeedNext * count + k] = static_cast<int64_t>(next_seed(o.seed));
    DownJob now{items[k]->grad.data_ptr(), bufs[k].plain_t,
                bufs[k].tiled, mom, nullptr, bufs[k].momentum16,
                t.terms + 1, gram + k * r * r, sq + k * r * r, t.row, t.scalars, t.col_factor,
                bufs[k].row_factor};
    jobs[k] = now;
    if (resample) {
      DownJob next = now;
      next.proj = static_cast<const uint16_t*>(at_k(next_t, k, psize));
      next.proj_tiled = static_cast<const uint16_t*>(at_k(next_p, k, tsize));
      next.base = static_cast<const float*>(at_k(base, k, msize));
      next.momentum16 = nullptr;
      next.partials = nullptr;
      jobs[count + k] = next;
    }
  }
  upload(dwords, host, table_words * 8);
  const auto arr = [&](int array) { return reinterpret_cast<void* const*>(dwords + array * count); };
  const auto carr = [&](int array) {
    return reinterpret_cast<const void* const*>(dwords + array * count);
  };

  const unsigned pblocks = static_cast<unsigned>(ceil_div(prow * (pcol / 4), kThreads));
  const dim3 pgrid(pblocks, static_cast<unsigned>(count));
  const auto draw = [&](int outs, int outs_p, int seeds) {
    projection_t_kernel<<<pgrid, kThreads, 0, stream>>>(
        reinterpret_cast<uint16_t* const*>(dwords + outs * count),
        reinterpret_cast<uint16_t* const*>(dwords + outs_p * count), left,
        reinterpret_cast<const uint64_t*>(dwords + seeds * count),
        static_cast<int>(prow), static_cast<int>(pcol), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  draw(kProjNow, kPlainNow, kSeedNow);
  if (resample) draw(kProjNext, kPlainNext, kSeedNext);

  // Batched from two tensors on. A lone GEMM gets split-K from cuBLAS and a batched one
  // does not; once that made groups of two or three faster one GEMM a tensor (bf16 1.35B
  // shapes, an early version: 24 against 31 ms a step). Now the batched calls win: bf16
  // 1.35B cuBLAS time 0.73 against 0.94 ms a step (48 launches against 104), the resample
  // step ~1 ms shorter, and each call saved is ~10 us of host time on small models.
  const auto group_gemm = [&](bool ta, bool tb, int64_t M, int64_t N, int64_t K, int a, int b,
                              int type, int c) {
    if (count >= min_batched) {
      gemm_batched(ta, tb, M, N, K, 1.f, carr(a), carr(b), type, 0.f, arr(c), count, true);
      return;
    }
    for (int k = 0; k < count; ++k)
      gemm(ta, tb, M, N, K, 1.f, ptrs[a * count + k], ptrs[b * count + k], type, 0.f,
           static_cast<float*>(const_cast<void*>(ptrs[c * count + k])), true);
  };
  // Gram = P P^T (left) or P^T P (right).
  if (left) group_gemm(true, false, r, r, n, kGramA, kGramA, kF16, kGramC);
  else group_gemm(false, true, r, r, m, kGramA, kGramA, kF16, kGramC);
  if (resample) {
    if (left) group_gemm(true, false, r, r, n, kBasesA, kBasesB, kF16, kBasesC);
    else group_gemm(false, true, r, r, m, kBasesA, kBasesB, kF16, kBasesC);
    // M' = down_next(up_now(M)) = bases M (left) or M bases (right).
    if (left) group_gemm(false, false, r, m, r, kBaseA, kBaseB, kF32, kBaseC);
    else group_gemm(false, false, n, r, r, kBaseA, kBaseB, kF32, kBaseC);
  }

  const dim3 dgrid(static_cast<unsigned>(down_tiles(n, m, r)), static_cast<unsigned>(count));
  const auto* djobs = reinterpret_cast<const DownJob*>(dwords + kArrays * count);
  const float beta1 = static_cast<float>(o0.beta1);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), ri = static_cast<int>(r);
  if (left) {  // the same for both passes
    row_factor_kernel<<<dim3(static_cast<unsigned>(ceil_div(n, kThreads)), count), kThreads, 0,
                        stream>>>(djobs, ni);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int pass = 0; pass < passes; ++pass) {
    // Resample steps: the terms and M16 in the current basis, then the new M in the next.
    const bool update = !resample || pass == 1;
    with_dtype(first.dtype, [&](auto dt) {
      launch_down<decltype(dt)::value>(left, dgrid, djobs + pass * count, ni, mi, ri, beta1,
                                       update, stream);
    });
  }
  // S = M M^T (left) or M^T M (right) of fp16(M) before this step, which the down GEMM
  // left for the up GEMM: fp16 tensor cores at half the bytes of M (TF32 from M took
  // the products 0.8 ms a fp32 1.35B step), the same 10-bit mantissa, and the very M
  // the apply pass's up(M) reads. Then beta1^2 <Gram, S> for the clip.
  if (left) group_gemm(false, true, r, r, m, kSqA, kSqA, kF16, kSqC);
  else group_gemm(true, false, r, r, n, kSqA, kSqA, kF16, kSqC);
  gram_dot_kernel<<<dim3(kDotBlocks, static_cast<unsigned>(count)), kThreads, 0, stream>>>(
      djobs, static_cast<int>(r * r), static_cast<int>(down_tiles(n, m, r)), beta1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The passes over one batch; `between` runs the compressed-momentum work, which
// needs the scalars and must come before the rms pass.
// What the launches of one batch need besides its task table.
// The stats and finalize passes of a stats group: consecutive batches of one dtype
// (the row-stats blocks are sized over the group's bytes).
struct StatsShape {
  int64_t fblocks = 0, sblocks = 0, smem = 0;
  bool any_factored = false;
};

struct BatchShape {
  int64_t tiles = 0, gtiles = 0;
  bool any_rms = false, any_norms = false;
  bool any_fused_p2 = false, any_tile_p2 = false;
};

template <int DT>
void launch_stats(const TaskTable& table, const StatsShape& g, const GroupArgs& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  allow_smem(stats_kernel<DT>, g.smem);
  stats_kernel<DT><<<static_cast<unsigned>(g.sblocks), kThreads, g.smem, stream>>>(table,
                                                                                    args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (g.any_factored) {
    finalize_kernel<<<static_cast<unsigned>(g.fblocks), kFinalizeWidth, 0, stream>>>(table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <int DT, typename Between>
void launch_batch(const TaskTable& table, const BatchShape& b, const GroupArgs& args,
                  const Between& between) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 tile_grid(static_cast<unsigned>(b.tiles));
  if (b.any_fused_p2) {
    fused_p2_kernel<DT><<<static_cast<unsigned>(b.gtiles), kThreads, 0, stream>>>(table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (b.any_tile_p2) {
    tile_p2_kernel<DT><<<tile_grid, kThreads, 0, stream>>>(table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scalars_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  between();
  if (b.any_rms) {
    rms_kernel<DT><<<tile_grid, kThreads, 0, stream>>>(table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    clip_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (b.gtiles > 0) {
    fused_clip_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bool rounded = false;
  if constexpr (DT == kBF16) {
    if (args.stochastic_rounding) {
      if (b.tiles > 0) apply_kernel<DT, true><<<tile_grid, kThreads, 0, stream>>>(table, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rounded = true;
    }
  }
  if (!rounded && b.tiles > 0) {
    apply_kernel<DT, false><<<tile_grid, kThreads, 0, stream>>>(table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (b.gtiles > 0) {
    allow_smem(fused_apply_kernel<DT>, kUpSmemBytes);
    fused_apply_kernel<DT><<<static_cast<unsigned>(b.gtiles), kThreads, kUpSmemBytes, stream>>>(
        table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (b.any_norms) {
    norms_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Every parameter of a call whose inputs the checks accepted.
void run_group_cuda(at::TensorList params, at::TensorList grads,
                    const std::vector<GroupEntry>& entries) {
  c10::cuda::CUDAGuard guard(params[0].device());
  // Host phases, for torch.profiler (tools/host_trace.py): planning, then launches.
  std::optional<at::RecordFunction> phase;
  const auto begin_phase = [&](const char* name) {
    phase.reset();
    if (at::hasCallbacks()) {
      phase.emplace(at::RecordScope::USER_SCOPE);
      if (phase->isActive())
        phase->before(std::string_view(name), c10::ArrayRef<const c10::IValue>{});
    }
  };
  begin_phase("flora::plan");
  const StepOptions& group = entries[0].options;
  GroupArgs args;
  args.eps1 = static_cast<float>(group.eps1);
  args.beta1 = static_cast<float>(group.beta1);
  args.eps2 = group.eps2;
  args.clip_threshold = group.clip_threshold;
  args.weight_decay = group.weight_decay;
  args.scale_parameter = group.scale_parameter;
  args.stochastic_rounding = group.stochastic_rounding;

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
  if (items.empty()) return;

  // Tasks, batches, and each batch's workspace needs.
  std::vector<Task> tasks(items.size());
  std::vector<WorkspacePlan> plans(items.size());  // batch-local offsets
  std::vector<int64_t> stats_smem(items.size(), 0);  // dynamic shared memory, stats pass
  struct Batch : BatchShape {
    int first = 0, count = 0;
    int64_t tile_partials = 0;  // bytes of the stats partials of its tile-pass tasks
  };
  std::vector<Batch> batches;
  const int64_t limit = batch_bytes_limit();
  const bool row_stats_on = row_stats_enabled();
  // The fused passes need mma.sync (sm_80+) and, for the down GEMM's ring, up to 217 KiB
  // of shared memory a block: an A100 allows 163 KiB and takes the unfused passes.
  const bool fused_on =
      fused_momentum_enabled() && at::cuda::getCurrentDeviceProperties()->major >= 8 &&
      smem_optin() >= std::max({kDnLaunchSmem<kF32>, kDnLaunchSmem<kBF16>, kDnLaunchSmem<kF16>});
  const int64_t smem_limit = row_stats_on ? stats_smem_limit() : 0;
  const int64_t stages = row_stats_on ? stats_stages() : 0;
  // Compressed tensors' n x m update buffers live as long as their batch: a batch
  // holds at most 1/kUpdateShare of the call's fp32 parameter bytes of them, half that
  // share of 16-bit ones (the buffers are fp32, and exact 16-bit projections add an fp32
  // copy of a gradient), or a single tensor's. That bounds the step's extra memory;
  // batching them saves the fixed cost of each launch (one batch a tensor: ~190
  // launches a pass on 1.35B shapes, 39.0 ms against 32.0 ms a fp32 step). Fused
  // tasks hold fp16 copies of P^T, P and M instead, whatever the parameters' dtype: up
  // to 1/kFusedShare of the call's parameter bytes (fused_share), or kFusedMinBytes.
  int64_t update_limit = 0, fused_limit = 0, group_limit = 0;
  const int64_t share = fused_share();
  const int64_t batched_from = min_batched();  // read (and checked) before anything runs
  const int sides = side_stream_count();
  for (const Item& item : items) {
    group_limit += item.param.numel() * 4 / (4 * kUpdateShare);
    const int64_t elem = item.param.element_size();
    update_limit += item.param.numel() * elem / (elem == 4 ? kUpdateShare : 2 * kUpdateShare);
    fused_limit += item.param.numel() * elem / share;
  }
  const int64_t fused_floor = fused_min_bytes();
  fused_limit = std::max(fused_limit, fused_floor);
  group_limit = std::max(group_limit, fused_floor / 4);
  int64_t batch_bytes = 0, batch_update = 0, batch_fused = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    const Item& item = items[k];
    const GroupEntry& e = *item.entry;
    const ParamLayout& layout = e.layout;
    Task& t = tasks[k];
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
      if (layout.momentum == MomentumKind::kDense)
        t.momentum = e.state.momentum->data_ptr<float>();
      t.vec = vec;
      // Fused compressed momentum: TF32 asked for, 16-byte rows of every GEMM operand,
      // round-to-nearest writes (stochastic rounding keeps the unfused passes).
      const bool compressed = layout.momentum == MomentumKind::kCompressed;
      // 32-bit index arithmetic in the projection and momentum kernels.
      t.fused = compressed && fused_on && e.options.tf32 && !args.stochastic_rounding &&
                aligned_to(t.param, 16) && aligned_to(t.grad, 16) && aligned_to(t.row, 16) &&
                aligned_to(e.state.momentum->data_ptr(), 16) && t.n % 4 == 0 &&
                t.m % 8 == 0 && layout.rank % 8 == 0 &&
                layout.rank * std::max(t.n, t.m) < INT_MAX;
      if (row_stats_on && (layout.momentum == MomentumKind::kNone || t.fused))
        stats_smem[k] = plan_row_stats(t, elem, lane_elems, smem_limit, stages);
      t.needs_rms = !t.row_stats;
      // Without a valid norm cache, sum p^2 of these comes from fused_p2_kernel or
      // tile_p2_kernel (in the apply pass's order) rather than the stats pass.
      if ((t.fused || t.row_stats) && t.param_sq != nullptr && !t.p2_known) t.stats_p = 0;
      if (t.fused) {
        t.rank = layout.rank;
        t.gcols = static_cast<int32_t>(ceil_div(t.m, kUpBN));
        t.gtiles = ceil_div(t.n, kUpBM) * t.gcols;
        t.dtiles = down_tiles(t.n, t.m, t.rank);
        if (t.row_stats) t.tiles = 0;  // no tile pass touches it
      }
    } else {
      t.kind = kFull;
      t.n = 1;
      t.m = t.numel;
      t.second_moment = e.state.second_moment->data_ptr<float>();
      t.tiles = ceil_div(t.numel, kThreads * lane_elems * kFullVecsPerThread);
      vec = vec && aligned_to(t.second_moment, 16);
      if (layout.momentum == MomentumKind::kDense) {
        t.momentum = e.state.momentum->data_ptr<float>();
        vec = vec && aligned_to(t.momentum, 16);
      }
    }
    t.vec = vec;
    const int64_t bytes = 2 * t.numel * elem;  // of gradient and parameter
    // Fused tasks hold P^T and M in fp16 (r x min(n, m), r x max(n, m)) instead, and
    // the tiled P.
    const int64_t fused = t.fused ? layout.rank * 2 * (t.n + t.m) +
                                        2 * tiled_halves(layout.rank, std::min(t.n, t.m))
                                  : 0;
    const int64_t update = !t.fused && layout.momentum == MomentumKind::kCompressed
                               ? t.numel * int64_t(sizeof(float))
                               : 0;
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
  // Stats groups: consecutive batches of one dtype share a stats and a finalize pass
  // (8 launches of them took bf16 1.35B shapes 2.25 ms against 1.39 ms for one), as
  // long as the partial sums of their tasks without row stats (one row of column sums
  // every 64 rows) stay within a batch's update share: all of a group's partials are
  // in memory at once, and the unfused bf16 step's extra peak went from 2.0% to 4.3%
  // without that bound (6.1% with exact projections).
  struct Group : StatsShape {
    int first_batch = 0, batches = 0, first = 0, count = 0;
    int64_t tile_partials = 0;
  };
  std::vector<Group> groups;
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const Batch& b = batches[bi];
    if (groups.empty() || items[groups.back().first].dtype != items[b.first].dtype ||
        groups.back().tile_partials + b.tile_partials > update_limit) {
      groups.push_back(Group{});
      groups.back().first_batch = static_cast<int>(bi);
      groups.back().first = b.first;
    }
    groups.back().batches += 1;
    groups.back().count += b.count;
    groups.back().tile_partials += b.tile_partials;
  }
  // Grids and workspace of each group and batch.
  int64_t kept_floats = 0, shared_floats = 0;
  for (Group& g : groups) {
    int64_t row_stats_bytes = 0;  // of G
    for (int k = g.first; k < g.first + g.count; ++k)
      if (tasks[k].row_stats) row_stats_bytes += tasks[k].numel * items[k].param.element_size();
    int64_t partials_at = 0;
    for (int k = g.first; k < g.first + g.count; ++k) {
      Task& t = tasks[k];
      if (t.row_stats)
        set_block_rows(t, t.m * items[k].param.element_size(), row_stats_bytes);
      t.fblock_begin = g.fblocks;
      t.sblock_begin = g.sblocks;
      g.sblocks += t.row_stats ? t.rchunks : t.tiles;
      g.smem = std::max(g.smem, stats_smem[k]);
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
  // The task table (below) follows the kept region in the workspace.
  static_assert(sizeof(Task) % sizeof(int64_t) == 0, "begins follow the tasks aligned");
  const size_t count = tasks.size();
  const int64_t table_bytes = static_cast<int64_t>(count * (sizeof(Task) + 4 * sizeof(int64_t)));
  const int64_t workspace_floats = shared_floats + kept_floats + ceil_div(table_bytes, 16) * 4;
  const auto f32 = items[0].param.options().dtype(at::kFloat);
  at::Tensor workspace = at::empty({workspace_floats}, f32);
  float* ws = workspace.data_ptr<float>();  // the shared region (partials, work)
  float* kept = ws + shared_floats;
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
  }

  begin_phase("flora::launch");
  // One host-to-device copy (pinned, asynchronous) of every task descriptor, then
  // of the tasks' first tiles, first finalize blocks and first stats blocks.
  const at::DataPtr host_table = pinned_block(table_bytes);
  auto* host_bytes = static_cast<uint8_t*>(host_table.get());
  std::memcpy(host_bytes, tasks.data(), count * sizeof(Task));
  auto* host_begins = reinterpret_cast<int64_t*>(host_bytes + count * sizeof(Task));
  for (size_t k = 0; k < count; ++k) {
    host_begins[k] = tasks[k].tile_begin;
    host_begins[count + k] = tasks[k].fblock_begin;
    host_begins[2 * count + k] = tasks[k].sblock_begin;
    host_begins[3 * count + k] = tasks[k].gtile_begin;
  }
  auto* device_bytes = reinterpret_cast<uint8_t*>(kept + kept_floats);  // 16-byte aligned
  upload(device_bytes, host_table, table_bytes);
  const Task* device_tasks = reinterpret_cast<const Task*>(device_bytes);
  const int64_t* device_begins =
      reinterpret_cast<const int64_t*>(device_bytes + count * sizeof(Task));

  for (const Group& g : groups) {
    const TaskTable group_table{device_tasks + g.first, device_begins + g.first,
                                device_begins + count + g.first,
                                device_begins + 2 * count + g.first,
                                device_begins + 3 * count + g.first, g.count};
    with_dtype(items[g.first].dtype,
               [&](auto dt) { launch_stats<decltype(dt)::value>(group_table, g, args); });
    for (int bi = g.first_batch; bi < g.first_batch + g.batches; ++bi) {
      const Batch& b = batches[bi];
      const auto compressed_work = [&] {
        // Fused tasks in groups of one shape (in call order within a group) whose
        // temporaries (two r x r products; on resample steps also the next P^T, the
        // change of basis and M in the next basis) stay within a quarter of the update
        // share of the call's parameters counted as fp32 (they do not shrink with them),
        // or of kFusedMinBytes. A group is one launch's grid.y: at most 65535 tasks.
        // Shape groups take turns on the current stream and `sides` side streams,
        // as many at a time as their temporaries together stay within the same limit:
        // the down GEMM of one fills the last wave of another's, and their small kernels
        // and r x r products overlap (one stream paid ~0.2 ms of tails and small launches
        // a batch). Results do not depend on the order: every reduction is fixed.
        const at::cuda::CUDAStream main_stream = at::cuda::getCurrentCUDAStream();
        const auto& side = side_streams(main_stream.device_index(), sides);
        int turn = 0, side_used = 0;
        int64_t turn_temps = 0;
        at::cuda::CUDAEvent forked;
        const auto join = [&] {  // the current stream waits for the side streams used
          for (int s = 0; s < side_used; ++s) {
            at::cuda::CUDAEvent joined;
            joined.record(side[s]);
            joined.block(main_stream);
          }
          turn = side_used = 0;
          turn_temps = 0;
        };
        const auto stream_for = [&](int64_t temps) {
          if (turn > 0 && turn_temps + temps > group_limit) join();
          // Side streams of a round start after what the current stream queued before
          // it (the scalars, or the last join).
          if (turn == 0) forked.record(main_stream);
          turn_temps += temps;
          const int s = turn++ % (sides + 1);
          if (s == 0) return main_stream;
          if (s > side_used) {
            forked.block(side[s - 1]);
            side_used = s;
          }
          return side[s - 1];
        };
        std::vector<bool> done(b.count, false);
        const auto temp_bytes = [&](int q) {
          const ParamLayout& l = items[q].entry->layout;
          const int64_t r = l.rank, pdim = std::min(l.rows, l.cols);
          const int64_t mdim = std::max(l.rows, l.cols), once = 8 * r * r;
          // next P^T and tiled P, the change of basis, M in the next basis
          return items[q].entry->options.resample()
                     ? once + 2 * r * pdim + 2 * tiled_halves(r, pdim) + 4 * r * r +
                           4 * r * mdim
                     : once;
        };
        for (int k = b.first; k < b.first + b.count; ++k) {
          const Task& t = tasks[k];
          if (t.fused) {
            if (done[k - b.first]) continue;
            std::vector<const Item*> group_items;
            std::vector<const Task*> group_tasks;
            std::vector<FusedBuffers> group_bufs;
            const ParamLayout& lk = items[k].entry->layout;
            int64_t group_temps = 0;
            for (int q = k; q < b.first + b.count; ++q) {
              const ParamLayout& lq = items[q].entry->layout;
              if (!tasks[q].fused || done[q - b.first] || lq.rows != lk.rows ||
                  lq.cols != lk.cols || lq.rank != lk.rank ||
                  items[q].entry->options.resample() != items[k].entry->options.resample())
                continue;
              if (!group_items.empty() &&
                  (group_temps + temp_bytes(q) > group_limit || group_items.size() == 65535))
                break;
              group_temps += temp_bytes(q);
              done[q - b.first] = true;
              group_items.push_back(&items[q]);
              group_tasks.push_back(&tasks[q]);
              group_bufs.push_back({reinterpret_cast<uint16_t*>(ws + plans[q].plain_t),
                                    reinterpret_cast<uint16_t*>(ws + plans[q].momentum16),
                                    reinterpret_cast<uint16_t*>(ws + plans[q].tiled),
                                    lq.left ? ws + plans[q].row_factor : nullptr});
            }
            const c10::cuda::CUDAStreamGuard on_turn(stream_for(group_temps));
            fused_momentum_group(group_items, group_tasks, group_bufs, batched_from);
          } else if (t.momentum_kind == static_cast<int>(MomentumKind::kCompressed)) {
            compressed_momentum(items[k], t, *items[k].entry->state.momentum);
          }
        }
        join();
      };
      const TaskTable table{device_tasks + b.first, device_begins + b.first,
                            device_begins + count + b.first, device_begins + 2 * count + b.first,
                            device_begins + 3 * count + b.first, b.count};
      with_dtype(items[b.first].dtype, [&](auto dt) {
        launch_batch<decltype(dt)::value>(table, b, args, compressed_work);
      });
    }
  }
  for (const Item& item : items) {
    if (!item.param.is_same(params[item.index])) params[item.index].copy_(item.param);
  }
}

}  // namespace
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("step_", &flora::detail::step_op<&flora::run_group_cuda>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::run_group_cuda>);
  m.impl("fill_projection_", &flora::fill_projection_cuda);
}
