// How the CUDA path batches and schedules a step: one Tuning a call, filled once at its
// start. Two documented user knobs come from the environment:
//   FLORA_BATCH_BYTES   bytes of gradients and parameters a batch holds (default 16 GiB);
//                       lower it to bound a step's temporaries on a full GPU
//   FLORA_SIDE_STREAMS  side streams the fused momentum work may use (0-4, default 2)
// The other fields are fixed by the constants below; tests reach the other variants
// through set_tuning_for_testing (torch.ops.flora._set_tuning), never the environment.
#pragma once

#include <cstdint>

namespace flora {
namespace cuda_detail {

// Bytes of gradients and parameters per batch. Measured on an H100 (LLaMA 1.35B
// shapes): 32 MiB batches were no faster in L2 than 1 GiB ones and paid ~5 ms of
// launch gaps a step; 4 GiB batches stepped fp32 in 9.1 ms against 10.3 ms at 1 GiB
// (fewer launches, fewer partial last waves); one 16 GiB batch (every tensor of a
// 1.35B model) stepped fp32 in 8.17-8.70 ms against 8.32-8.98 ms at 4 GiB (two
// rounds, 2026-11-24), so the default batches a whole model of that size. The
// row-stats workspace grows with the batch: 1.7% of the parameter bytes (fp32).
constexpr int64_t kBatchBytes = int64_t(16) << 30;

// Fused tasks' fp16 buffers (P^T, P tiled, M) of a batch: at most 1/kFusedShare of the
// call's parameter bytes. Fewer, larger batches pay the fixed costs of a batch (launch
// tails, small GEMMs) fewer times: on the 1.35B shapes a share of 1/32 stepped in 15.5 ms
// fp32 and 13.7 ms bf16 at 3.4-4.3% extra peak, 1/40 in 16.0 and 14.7 ms at 2.7-3.7%.
constexpr int64_t kFusedShare = 32;

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
// FLORA_SIDE_STREAMS (0 to kMaxSideStreams) sets their number.
constexpr int kSideStreams = 2, kMaxSideStreams = 4;
// Fused tasks of one shape share batched GEMMs from this many on (see group_gemm).
constexpr int kMinBatched = 2;
// Row stats (one stats pass, no rms pass) for factored tensors without momentum or with
// fused momentum; off, the tile passes serve every tensor.
constexpr bool kRowStats = true;
// Row stats also for factored tensors with dense momentum (embeddings and heads past the
// aspect-ratio limit) when kRowStats is on; their rms pass still runs (it forms D from U
// and M and updates M). Off: the tile passes gather their statistics (1.05x the fp32
// step on a 128256-token vocabulary, H100: docs/cuda.md §6).
constexpr bool kRowStatsDense = true;
// Buffers in a row-stats block's ring of stages (2-4); 0: 3 for fp32, 2 for 16-bit.
constexpr int64_t kStatsStages = 0;
// Row-stats blocks a factored tensor gets at least before the floor of column bytes a
// block (config.cuh, kRowBlockMinColBytes) applies; 0: the floor alone. A 4096-row bf16
// tensor alone in a launch (FloraAccumulator steps one a call) had 26 blocks of 160 rows
// for 132 SMs under the floor.
constexpr int64_t kStatsTaskBlocks = 256;
// Fused compressed momentum where TF32 is on (else an n x m update buffer and the rms
// pass).
constexpr bool kFusedMomentum = true;
// Rows past the stats pass's register accumulators (6144 columns) keep their column sums
// in registers of the wide rows' launch up to 12288 columns (off: shared memory, the
// same sums to the bit).
constexpr bool kWideRowRegs = true;
// Buffers in the ring of the wide rows' launch with register accumulators (2-6; one
// block an SM, a 16-bit row of 11008 columns a stage); 0: as kStatsStages. The stages
// hold the same rows whatever their number, so the sums keep their bits.
constexpr int64_t kWideStatsStages = 0;
// On: the down GEMM of fused 16-bit tasks as a cuBLAS batched GEMM of the gradient as it
// is with P scaled by the factors along the contraction and rounded to the gradient's
// dtype (the unfused path's operands), a chunk of a group's tasks at a time, then a
// momentum epilogue kernel. Off (default): fused_down_kernel, which forms U in fp16 on the
// way. On is faster at LLaMA-7B shapes and takes more workspace; see docs/cuda.md §6.
// fp32 tasks always take fused_down_kernel.
constexpr bool kDownLibrary = false;

struct Tuning {
  int64_t batch_bytes = kBatchBytes;  // FLORA_BATCH_BYTES
  int side_streams = kSideStreams;    // FLORA_SIDE_STREAMS
  bool row_stats = kRowStats;
  bool row_stats_dense = kRowStatsDense;
  int64_t stats_stages = kStatsStages;
  bool fused_momentum = kFusedMomentum;
  int64_t fused_share = kFusedShare;
  int64_t fused_min_bytes = kFusedMinBytes;
  int64_t min_batched = kMinBatched;
  int64_t stats_task_blocks = kStatsTaskBlocks;
  bool wide_row_regs = kWideRowRegs;
  bool down_library = kDownLibrary;
  int64_t wide_stats_stages = kWideStatsStages;
};

// The tuning of one call: the constants (or what set_tuning_for_testing set) and the two
// environment knobs, read now; a bad knob is an error naming it, before anything runs.
Tuning call_tuning();

// Test-only variants of the fixed fields (each argument: -1 keeps the current value);
// reset first restores the constants. A value out of range is an error naming it, and
// then nothing is set.
void set_tuning_for_testing(bool reset, int64_t row_stats, int64_t stats_stages,
                            int64_t fused_momentum, int64_t fused_share,
                            int64_t fused_min_bytes, int64_t min_batched,
                            int64_t row_stats_dense, int64_t stats_task_blocks = -1,
                            int64_t wide_row_regs = -1, int64_t down_library = -1,
                            int64_t wide_stats_stages = -1);

}  // namespace cuda_detail
}  // namespace flora
