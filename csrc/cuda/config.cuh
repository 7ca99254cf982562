// Geometry of the CUDA kernels: block sizes, tiles, shared-memory rings, and the codes
// the host and the kernels share. Constants only; every .cu file of csrc/cuda sees them.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flora {
namespace cuda_detail {

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
// ...except that a tensor gets at least about kStatsTaskBlocks blocks (tuning.h) before
// that floor applies.
// Compressed tensors of a batch hold at most 1/kUpdateShare of the call's fp32
// parameter bytes in update buffers (half that share of 16-bit parameter bytes).
constexpr int64_t kUpdateShare = 40;
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
// memory or in registers (kRowStatsWideRegisters: rows past kRegAccVecs, whose launch
// apart from the others can afford the registers).
enum RowStats : int32_t {
  kNoRowStats = 0, kRowStatsShared = 1, kRowStatsRegisters = 2, kRowStatsWideRegisters = 3
};
// Tasks the wide rows' stats launch takes.
__host__ __device__ constexpr bool wide_row_stats(int32_t row_stats) {
  return row_stats == kRowStatsShared || row_stats == kRowStatsWideRegisters;
}

// Row stats keep their column accumulators in registers for rows of up to this many
// 16-byte vectors a thread (row_stats); wide rows up to kWideRegAccVecs (12288
// columns, 96 accumulators a thread) in the wide launch.
template <int DT> constexpr int kRegAccVecs = DT == kF32 ? 6 : 3;  // 6144 columns
template <int DT> constexpr int kWideRegAccVecs = 2 * kRegAccVecs<DT>;

// The down GEMM's wgmma variant (sm_90a code) and what the host asks for.

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
// The down GEMM's result tile in shared memory, as the epilogue reads it; after it, the
// signed map of 8-bit momentum (256 floats).
constexpr int64_t kDnTileBytes =
    std::max(int64_t(kUpBM) * kDnXStrideRight, int64_t(kDnBN) * kDnXStrideLeft) * 4;
static_assert(kDnTileBytes + 1024 <= kDnSmemBytes<kF32> && kDnTileBytes + 1024 <= kDnSmemBytes<kBF16> &&
                  kDnTileBytes + 1024 <= kWgSmemBytes<kF32> && kDnTileBytes + 1024 <= kWgSmemBytes<kBF16>,
              "the map of 8-bit momentum fits after the tile");

// Fused tasks: beta1^2 <Gram, S> in this many partials a task (gram_dot_kernel).
constexpr int kDotBlocks = 16;

// Every lane moves 16 bytes a row: 4 fp32 or 8 bf16/fp16 elements. A factored tile
// is 64 rows x 32 lanes' columns; an unfactored one 256 threads x 8 such vectors.
template <int DT> constexpr int kLane = DT == kF32 ? 4 : 8;
template <int DT> constexpr int kTileColsOf = 32 * kLane<DT>;
template <int DT>
constexpr int64_t kFullTileOf = int64_t(kThreads) * kLane<DT> * kFullVecsPerThread;

}  // namespace cuda_detail
}  // namespace flora
