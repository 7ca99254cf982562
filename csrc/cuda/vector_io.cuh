// Loads and stores of the kernels' 16-byte lanes in every parameter dtype, and the
// warp and block sums every reduction uses (fixed orders: results do not depend on
// scheduling).
#pragma once

#include "config.cuh"
#include "task_table.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flora {
namespace cuda_detail {

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

}  // namespace cuda_detail
}  // namespace flora
