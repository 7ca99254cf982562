// The apply pass of fused compressed momentum: the up GEMM up(M) on the tensor cores
// (mma.sync, fp16 operands) with the parameter write as its epilogue, and the sums of
// p^2 of its tiles where the norm cache does not hold them.
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "mma.cuh"
#include "../common/rules.h"

#include <c10/cuda/CUDAException.h>

namespace flora {
namespace cuda_detail {
namespace {


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

// The scalars of a fused task's parameter write.
struct FusedScalars {
  float row_mean, lr, inv_clip, decay, beta1, keep;
};

// The parameter write of a 16-bit fused tile from its accumulators (the epilogue of
// fused_apply_kernel); adds the sum of the p^2 written to p2.
template <int DT>
__device__ __forceinline__ void write_tile_16bit(const float (&acc)[4][4][4], uint4* up_smem,
                                                 const Task& t, int64_t local, int64_t n,
                                                 int64_t m, const UpTile& tile,
                                                 const FusedScalars& s, float& p2) {
  using S = Storage<DT>;
  const float row_mean = s.row_mean, lr = s.lr, inv_clip = s.inv_clip, decay = s.decay;
  const float beta1 = s.beta1, keep = s.keep;
  S* p = static_cast<S*>(t.param);
  const S* gr = static_cast<const S*>(t.grad);
  const int64_t i0 = tile.i0, j0 = tile.j0;
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
}

// The same for an fp32 tile, straight from the accumulator fragments.
template <int DT>
__device__ __forceinline__ void write_tile_f32(const float (&acc)[4][4][4], const Task& t,
                                               int64_t n, int64_t m, const UpTile& tile,
                                               const FusedScalars& s, float& p2) {
  using S = Storage<DT>;
  const float row_mean = s.row_mean, lr = s.lr, inv_clip = s.inv_clip, decay = s.decay;
  const float beta1 = s.beta1, keep = s.keep;
  S* p = static_cast<S*>(t.param);
  const S* gr = static_cast<const S*>(t.grad);
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

// One 128 x 128 tile of a fused task: acc = (A B)[tile] on the tensor cores (fp16
// operands, fp32 accumulation), then D = (1 - beta1) U + beta1 acc and
// p = p - decay p - lr D / clip, rounded once. Needs rank and m multiples of 8
// (16-byte rows of A and B); rows and columns past the tensor and the rank's last
// partial slice read as zeros.
template <int DT>
__global__ void __launch_bounds__(kThreads, 2)
    fused_apply_kernel(TaskTable table, GroupArgs a) {
  extern __shared__ uint4 up_smem[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(up_smem);
  const Task& t = table.tasks[locate(table.gtile_begins, table.count, blockIdx.x)];
  if (skipped(t)) return;  // p stays; the norms pass keeps its cache
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

  const FusedScalars s{t.scalars[kRowMean], t.scalars[kStepSize], t.scalars[kInvClip],
                       t.scalars[kDecay],   a.beta1,              1.f - a.beta1};
  float p2 = 0.f;
  if constexpr (DT != kF32) write_tile_16bit<DT>(acc, up_smem, t, local, n, m, tile, s, p2);
  else write_tile_f32<DT>(acc, t, n, m, tile, s, p2);
  if (t.param_sq == nullptr) return;
  p2 = block_sum(p2);
  if (threadIdx.x == 0) t.tile_p2[local] = p2;
}

}  // namespace

void launch_fused_p2(int dtype, const TaskTable& table, int64_t gtiles, cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    fused_p2_kernel<decltype(dt)::value>
        <<<static_cast<unsigned>(gtiles), kThreads, 0, stream>>>(table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_fused_apply(int dtype, const TaskTable& table, int64_t gtiles,
                        const GroupArgs& args, cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    allow_smem(fused_apply_kernel<DT>, kUpSmemBytes);
    fused_apply_kernel<DT><<<static_cast<unsigned>(gtiles), kThreads, kUpSmemBytes, stream>>>(
        table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_detail
}  // namespace flora
