// Passes 3 and 5 of the tile path: sum D^2 of factored tensors (rms pass) and the
// parameter write p = p - decay p - lr D / clip (apply pass), plus the sums of p^2
// the norm cache keeps.
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "quant_io.cuh"
#include "../common/random.h"
#include "../common/rules.h"
#include "flora/ops.h"

#include <c10/cuda/CUDAException.h>
#include <curand_kernel.h>

namespace flora {
namespace cuda_detail {
namespace {


// ---- pass 3 and 5: D of factored tensors, and the parameter write -----------

// Two blocks an SM: eight rows of G and the momentum rows in flight take 80-128
// registers. (When this pass read G alone, for every tensor, four blocks at 64
// registers beat three: 1.91 vs 2.09 ms in bf16; it now serves dense momentum and
// unfused compressed tensors.)
template <int DT>
__global__ void __launch_bounds__(kThreads, 2)
    rms_kernel(TaskTable table, GroupArgs a) {
  __shared__ float maps[256];  // the signed map's values: 8-bit momentum only
  const Task& t = task_of_tile(table, blockIdx.x);
  if (!t.needs_rms) return;  // sum D^2 came with the stats
  // 8-bit dense momentum: D from the read-back codes, gathered for the apply pass
  // (quant_io.cuh) instead of stored.
  const bool quant = t.m_codes != nullptr;
  if (quant) stage_maps(maps, a.quant_maps + kMapSigned, 256);  // block-uniform
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
      else if (quant) load_codes<L>(t.m_codes, t.m_absmax, maps, i * m + c0, i < n ? valid : 0, ev[r]);
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
        const float d = dense    ? dense_direction(u, ev[r][c], a.beta1)
                        : update ? (1.f - a.beta1) * u + ev[r][c]
                                 : u;
        dv[c] = d;
        d2 += d * d;
      }
      if (dense && !skipped(t)) {
        if (quant) gather_blocks<L>(t.m_next, t.m_changed, i * m + c0, valid, dv, ev[r]);
        else storef<L>(t.momentum + i * m + c0, extra_vec, valid, dv);
      }
    }
  }
  d2 = block_sum(d2);
  if (threadIdx.x == 0) t.tile_d2[local] = d2;
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

// full_apply with 8-bit state (quant_io.cuh): S and D formed again from the gradient and
// the read-back codes, as the stats pass formed them; p written, and the codes of the
// blocks the stats pass found changed. `maps`: the staged maps (kMapFloats).
template <int DT, bool kRound>
__device__ __forceinline__ void full_apply_quantized(const Task& t, int64_t local,
                                                     const GroupArgs& a, const float* maps,
                                                     float& p2) {
  using S = Storage<DT>;
  constexpr int L = kLane<DT>;
  const ApplyArgs s = apply_args(t, a);
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  const bool has_m = t.m_codes != nullptr || t.momentum != nullptr;
  const float b2 = static_cast<float>(t.beta2);
  const int64_t numel = t.numel;
  const bool vec = s.vec;
  for (int k = 0; k < kFullVecsPerThread; ++k) {
    const int64_t e0 = local * kFullTileOf<DT> + (int64_t(k) * kThreads + threadIdx.x) * L;
    const int valid = valid_of<L>(numel - e0);
    if (valid == 0) continue;
    float pv[L], gv[L], sv[L], mv[L], d[L];
    unpack<DT>(load_pack<DT>(p + e0, vec, valid), pv);
    unpack<DT>(load_pack<DT>(g + e0, vec, valid), gv);
    if (t.sm_codes != nullptr)
      load_codes<L>(t.sm_codes, t.sm_absmax, maps + kMapUnsigned, e0, valid, sv);
    else  // float32, already written by the stats pass
      loadf<L>(t.second_moment + e0, vec, valid, sv);
    if (t.m_codes != nullptr)
      load_codes<L>(t.m_codes, t.m_absmax, maps + kMapSigned, e0, valid, mv);
    else if (t.momentum != nullptr)  // float32 D, written by the stats pass
      loadf<L>(t.momentum + e0, vec, valid, mv);
#pragma unroll
    for (int c = 0; c < L; ++c) {
      d[c] = 0.f;
      if (c >= valid) continue;
      if (t.sm_codes != nullptr) sv[c] = next_second_moment(sv[c], gv[c], b2, a.eps1);
      float dc = gv[c] / sqrtf(sv[c]);
      if (t.m_codes != nullptr) dc = dense_direction(dc, mv[c], a.beta1);
      else if (has_m) dc = mv[c];
      mv[c] = dc;
      d[c] = dc;
    }
    write_params<DT, kRound>(s, p, e0, valid, pv, d, p2);
    if (t.sm_codes != nullptr)
      store_codes<L>(t.sm_codes, t.sm_next, t.sm_changed, maps + kThresholdUnsigned, e0, valid,
                     sv);
    if (t.m_codes != nullptr)
      store_codes<L>(t.m_codes, t.m_next, t.m_changed, maps + kThresholdSigned, e0, valid, mv);
  }
}

// The rows of a factored tile, for one kind of momentum (a compile-time MK keeps
// the per-element work of the common kinds free of the others' branches and loads).
template <int DT, bool kRound, int MK>
__device__ __forceinline__ void factored_apply_rows(const Task& t, int64_t local,
                                                    const GroupArgs& a, const float* maps,
                                                    float& p2) {
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
  // 8-bit dense momentum: D formed again from the read-back codes (as the rms pass did),
  // and the codes of the changed blocks written (quant_io.cuh).
  const bool quant = MK == static_cast<int>(MomentumKind::kDense) && t.m_codes != nullptr;
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
      if constexpr (kExtra) {
        if (quant) load_codes<L>(t.m_codes, t.m_absmax, maps + kMapSigned, i * m + c0, row_valid, ev[k]);
        else loadf<L>(extra + i * m + c0, extra_vec, row_valid, ev[k]);
      }
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
          d[c] = c >= valid ? 0.f : quant ? dense_direction(u, ev[k][c], s.beta1) : ev[k][c];
        else if constexpr (MK == static_cast<int>(MomentumKind::kCompressed))
          d[c] = c < valid ? (1.f - s.beta1) * u + ev[k][c] : 0.f;
        else
          d[c] = c < valid ? u : 0.f;
      }
      write_params<DT, kRound>(s, p, i * m + c0, valid, pv, d, p2);
      if constexpr (MK == static_cast<int>(MomentumKind::kDense)) {
        if (quant)
          store_codes<L>(t.m_codes, t.m_next, t.m_changed, maps + kThresholdSigned, i * m + c0,
                         valid, d);
      }
    }
  }
}

template <int DT, bool kRound>
__device__ __forceinline__ void factored_apply(const Task& t, int64_t local,
                                               const GroupArgs& a, const float* maps,
                                               float& p2) {
  switch (t.momentum_kind) {
    case static_cast<int>(MomentumKind::kDense):
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kDense)>(t, local, a, maps,
                                                                              p2);
      break;
    case static_cast<int>(MomentumKind::kCompressed):
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kCompressed)>(t, local, a,
                                                                                   maps, p2);
      break;
    default:
      factored_apply_rows<DT, kRound, static_cast<int>(MomentumKind::kNone)>(t, local, a, maps,
                                                                             p2);
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
  __shared__ float maps[kMapFloats];  // 8-bit tasks only
  const Task& t = task_of_tile(table, blockIdx.x);
  if (t.fused) return;  // written by fused_apply_kernel
  if (skipped(t)) return;  // p stays; the norms pass keeps its cache
  const int64_t local = blockIdx.x - t.tile_begin;
  const bool quant = quantized(t);
  if (quant) stage_maps(maps, a.quant_maps, kMapFloats);  // block-uniform
  float p2 = 0.f;
  if (t.kind == kFull) {
    if (quant) full_apply_quantized<DT, kRound>(t, local, a, maps, p2);
    else full_apply<DT, kRound>(t, local, a, p2);
  } else {
    factored_apply<DT, kRound>(t, local, a, maps, p2);
  }
  if (t.param_sq == nullptr) return;
  // Sum p^2 of what was written, for the next step; the norms pass adds the tiles'
  // sums (tile_p2 is free again: the scalars pass has read it). A last-block
  // reduction here instead (fence + atomic a block) cost 1.8 ms a 1.35B fp32 step.
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.tile_p2[local] = p2;
}

// One block per task with a norm cache: sum p^2 of the parameter just written. A
// skipped task's p was not written: the scalars pass left the sum of p in the cache
// with scale_parameter; without it, sum p^2 is read from p here.
__global__ void __launch_bounds__(kThreads)
    norms_kernel(const Task* __restrict__ tasks, int32_t scale_parameter, int dtype) {
  const Task& t = tasks[blockIdx.x];
  if (t.param_sq == nullptr) return;
  double total = 0.0;
  if (skipped(t)) {
    if (scale_parameter) return;
    for (int64_t e = threadIdx.x; e < t.numel; e += blockDim.x) {
      const float v = dtype == kF32 ? static_cast<const float*>(t.param)[e]
                      : dtype == kBF16
                          ? to_float<kBF16>(static_cast<const uint16_t*>(t.param)[e])
                          : to_float<kF16>(static_cast<const uint16_t*>(t.param)[e]);
      total += double(v) * v;
    }
    total = block_sum(total);
    if (threadIdx.x == 0) *t.param_sq = total;
    return;
  }
  const int64_t tiles = t.fused ? t.gtiles : t.tiles;
  for (int64_t k = threadIdx.x; k < tiles; k += blockDim.x) total += t.tile_p2[k];
  total = block_sum(total);
  if (threadIdx.x == 0) *t.param_sq = total;
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

}  // namespace

void launch_tile_p2(int dtype, const TaskTable& table, int64_t tiles, cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    tile_p2_kernel<decltype(dt)::value>
        <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_rms(int dtype, const TaskTable& table, int64_t tiles, const GroupArgs& args,
                cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    rms_kernel<decltype(dt)::value>
        <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// bf16 parameters with stochastic rounding take the kernel that rounds.
void launch_apply(int dtype, const TaskTable& table, int64_t tiles, const GroupArgs& args,
                  cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    const dim3 grid(static_cast<unsigned>(tiles));
    if constexpr (DT == kBF16) {
      if (args.stochastic_rounding) {
        if (tiles > 0) apply_kernel<DT, true><<<grid, kThreads, 0, stream>>>(table, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    if (tiles > 0) {
      apply_kernel<DT, false><<<grid, kThreads, 0, stream>>>(table, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void launch_norms(int dtype, const TaskTable& table, const GroupArgs& args,
                  cudaStream_t stream) {
  norms_kernel<<<table.count, kThreads, 0, stream>>>(table.tasks, args.scale_parameter, dtype);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
