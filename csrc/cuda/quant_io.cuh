// 8-bit state in the step's passes (quantization=True, docs/FLORA.md §11): an unfactored
// second moment and a dense momentum are read from their codes where the float32 tensors
// would be, and written back as codes by the apply pass, with no float32 copy.
//
// A block of 256 codes shares one absmax, which must be known before any of its codes is
// written. So the pass that first forms the new values (stats for unfactored tensors, rms
// for factored ones) gathers each block's new absmax, and whether the block changed, in
// the call's quant region; the apply pass forms the same values again from the old codes
// (the same arithmetic, so the same bits) and writes the codes of the changed blocks;
// quant_commit_kernel then takes the new absmax of those blocks. The values written are
// bitwise those of the float32 step on the read-back state, quantized as
// requantize_blockwise_ does it (a block left as it read back keeps its codes).
#pragma once

#include "../common/quantize.h"
#include "task_table.cuh"

#include <cstdint>

namespace flora {
namespace cuda_detail {

// The code maps in one device buffer (quant_maps): values of the signed map (momentum),
// of the unsigned map (second moment), then their decision points, padded
// (padded_threshold).
constexpr int kMapSigned = 0, kMapUnsigned = 256, kThresholdSigned = 512,
              kThresholdUnsigned = kThresholdSigned + 264,
              kMapFloats = kThresholdUnsigned + 264;
static_assert(kPaddedThresholds <= 264, "a padded map's decision points fit its place");

// The maps' buffer on `device` (uploaded once; lives as long as the process).
const float* quant_maps(int device);

// Copies the first `count` floats of the maps to shared memory. Every thread of the
// block must call it.
__device__ __forceinline__ void stage_maps(float* smem, const float* maps, int count) {
  for (int k = threadIdx.x; k < count; k += blockDim.x) smem[k] = maps[k];
  __syncthreads();
}

// One float32 multiplication, as dequantize_blockwise_.
__device__ __forceinline__ float decode(const float* values, uint8_t code, float absmax) {
  return __fmul_rn(values[code], absmax);
}

// One IEEE division and the nearest code, as quantize_blockwise_. `thresholds`: padded.
__device__ __forceinline__ uint8_t encode(const float* thresholds, float x, float absmax) {
  return encode_nearest<true>(absmax > 0.0f ? __fdiv_rn(x, absmax) : 0.0f, thresholds);
}

// Whether the L codes from flat index e0 lie in one block and can move as one aligned
// word (4 or 8 bytes): then their absmax, changed flag and codes are one load each, not
// L (the 8-bit dense apply pass was bound by those loads and the byte stores).
template <int L>
__device__ __forceinline__ bool whole_code_word(const uint8_t* codes, int64_t e0, int valid) {
  static_assert(L == 4 || L == 8, "a word of codes is 4 or 8 bytes");
  return valid == L && e0 % kQuantBlock <= kQuantBlock - L &&
         reinterpret_cast<uintptr_t>(codes + e0) % L == 0;
}

// The L codes of one aligned 4- or 8-byte word at p, lowest address in the lowest byte:
// one load or store, not L byte accesses.
template <int L>
__device__ __forceinline__ void load_code_word(const uint8_t* p, uint8_t (&code)[L]) {
  static_assert(L == 4 || L == 8, "a word of codes is 4 or 8 bytes");
  uint32_t w[L / 4];
  if constexpr (L == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  }
#pragma unroll
  for (int c = 0; c < L; ++c) code[c] = static_cast<uint8_t>(w[c / 4] >> (8 * (c % 4)));
}

template <int L>
__device__ __forceinline__ void store_code_word(uint8_t* p, const uint8_t (&code)[L]) {
  static_assert(L == 4 || L == 8, "a word of codes is 4 or 8 bytes");
  uint32_t w[L / 4] = {};
#pragma unroll
  for (int c = 0; c < L; ++c) w[c / 4] |= uint32_t(code[c]) << (8 * (c % 4));
  if constexpr (L == 8) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint32_t*>(p) = w[0];
}

// Reads L codes from flat index e0 (`valid` of them) into floats.
template <int L>
__device__ __forceinline__ void load_codes(const uint8_t* codes, const float* absmax,
                                           const float* values, int64_t e0, int valid,
                                           float x[L]) {
  if (whole_code_word<L>(codes, e0, valid)) {
    const float a = absmax[e0 / kQuantBlock];
    uint8_t code[L];
    load_code_word<L>(codes + e0, code);
#pragma unroll
    for (int c = 0; c < L; ++c) x[c] = decode(values, code[c], a);
    return;
  }
#pragma unroll
  for (int c = 0; c < L; ++c)
    x[c] = c < valid ? decode(values, codes[e0 + c], absmax[(e0 + c) / kQuantBlock]) : 0.0f;
}

// Writes the codes of the `valid` values x from flat index e0 whose blocks changed.
template <int L>
__device__ __forceinline__ void store_codes(uint8_t* codes, const uint32_t* next,
                                            const int32_t* changed, const float* thresholds,
                                            int64_t e0, int valid, const float x[L]) {
  if (whole_code_word<L>(codes, e0, valid)) {
    const int64_t b = e0 / kQuantBlock;
    if (!changed[b]) return;
    const float a = __uint_as_float(next[b]);
    uint8_t code[L];
#pragma unroll
    for (int c = 0; c < L; ++c) code[c] = encode(thresholds, x[c], a);
    store_code_word<L>(codes + e0, code);
    return;
  }
#pragma unroll
  for (int c = 0; c < L; ++c) {
    if (c >= valid) continue;
    const int64_t b = (e0 + c) / kQuantBlock;
    if (changed[b]) codes[e0 + c] = encode(thresholds, x[c], __uint_as_float(next[b]));
  }
}

// Gathers, for the `valid` new values x at flat indices e0.., the new absmax of their
// blocks (max |x| as uint32 bits: non-negative floats order as their bits, and a NaN above
// them all, so a NaN sticks as in quantize_blockwise_) and whether a block changed (x not
// bitwise its read-back `back`). A warp whose elements lie in one block makes one atomic;
// others (a block boundary inside the warp's elements) one an element. Every lane of the
// warp must call it (valid 0 for none).
template <int L>
__device__ __forceinline__ void gather_blocks(uint32_t* next, int32_t* changed, int64_t e0,
                                              int valid, const float x[L], const float back[L]) {
  uint32_t amax = 0u;
  bool moved = false;
#pragma unroll
  for (int c = 0; c < L; ++c) {
    if (c >= valid) continue;
    amax = max(amax, __float_as_uint(fabsf(x[c])));
    moved |= __float_as_uint(x[c]) != __float_as_uint(back[c]);
  }
  const long long b = e0 / kQuantBlock;
  const bool straddles = valid > 0 && (e0 + valid - 1) / kQuantBlock != b;
  const unsigned active = __ballot_sync(0xffffffffu, valid > 0);
  if (active == 0u) return;
  const int leader = __ffs(active) - 1;
  const long long b0 = __shfl_sync(0xffffffffu, b, leader);
  if (__all_sync(0xffffffffu, valid == 0 || (!straddles && b == b0))) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const bool any_moved = __any_sync(0xffffffffu, moved);
    if (static_cast<int>(threadIdx.x % 32) == leader) {
      atomicMax(next + b0, amax);
      if (any_moved) changed[b0] = 1;  // every writer stores 1
    }
    return;
  }
#pragma unroll
  for (int c = 0; c < L; ++c) {
    if (c >= valid) continue;
    const int64_t bc = (e0 + c) / kQuantBlock;
    atomicMax(next + bc, __float_as_uint(fabsf(x[c])));
    if (__float_as_uint(x[c]) != __float_as_uint(back[c])) changed[bc] = 1;
  }
}

// The arithmetic the 8-bit passes repeat, shared with the float32 passes so that both
// compile to the same operations: S = beta2 S + (1 - beta2)(G^2 + eps1), and the dense
// momentum's D = (1 - beta1) U + beta1 M.
// The fused multiply-adds are spelt out: the stats or rms pass and the apply pass must
// round alike, whatever the compiler would contract in each.
__device__ __forceinline__ float next_second_moment(float s, float g, float beta2, float eps1) {
  return __fmaf_rn(beta2, s, __fmul_rn(1.f - beta2, __fmaf_rn(g, g, eps1)));
}

__device__ __forceinline__ float dense_direction(float u, float m, float beta1) {
  return __fmaf_rn(beta1, m, __fmul_rn(1.f - beta1, u));
}

}  // namespace cuda_detail
}  // namespace flora
