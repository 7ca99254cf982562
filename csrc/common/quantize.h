// The 8-bit state format of quantization=True (docs/FLORA.md §11): blockwise dynamic
// quantization. A float32 tensor, flat, is cut into blocks of kQuantBlock elements; each
// block keeps its absolute maximum (float32) and one uint8 code per element, the index of
// the entry of a 256-value code map nearest to element / absmax. Shared by the CPU and
// CUDA kernels, which therefore write the same bytes for the same input.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __CUDACC__
#define FLORA_HOST_DEVICE __host__ __device__
#else
#define FLORA_HOST_DEVICE
#endif

namespace flora {

constexpr int64_t kQuantBlock = 256;

FLORA_HOST_DEVICE inline int64_t quant_blocks(int64_t numel) {
  return (numel + kQuantBlock - 1) / kQuantBlock;
}

// A code map, sorted ascending, and the 255 decision points between neighbours (their
// midpoints): code q stands for value[q] * absmax. Passed to CUDA kernels by value (2 KiB).
struct QuantMap {
  float value[256];
  float threshold[255];
};

// The dynamic (tree) map of Dettmers et al. (2022), built from its published
// construction: for decade i = 0..6 the fraction range [0.1, 1] is cut into 2^i equal bins
// (2^(i+1) unsigned: the sign bit becomes a fraction bit) and each bin's midpoint, times
// 10^(i-6), is a code; the signed map mirrors them to negative values; 0 and 1 complete it.
// Signed: 2 * 127 + 2 = 256 codes; unsigned: 254 + 2 = 256. Built in double, then rounded.
const QuantMap& dynamic_map(bool is_signed);

// The checks of quantize_blockwise_ / dequantize_blockwise_: values float32, codes uint8
// with values' shape, absmax float32 of quant_blocks(numel) entries, all contiguous, on
// one device, and no two of them sharing memory.
void check_quantized_args(const at::Tensor& values, const at::Tensor& codes,
                          const at::Tensor& absmax);

// The CPU kernels of quantize_blockwise_, requantize_blockwise_ and dequantize_blockwise_
// (csrc/cpu/quantize.cpp), for the CPU step of 8-bit state.
void quantize_blockwise_cpu(const at::Tensor& values, const at::Tensor& codes,
                            const at::Tensor& absmax, bool is_signed);
void requantize_blockwise_cpu(const at::Tensor& values, const at::Tensor& codes,
                              const at::Tensor& absmax, bool is_signed);
void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& values, bool is_signed);

// Where decision point i lies in a padded copy of the 255 (CUDA shared memory): at
// i + i / 32. The search's probes at one step are i = j * 2 * step + step - 1; sorted and
// unpadded, those of the first five steps all fall in one bank, and a warp's lanes (each on
// its own element) took up to 8-way conflicts a step. Padded, they fall in distinct banks.
constexpr int kPaddedThresholds = 255 + 254 / 32;
FLORA_HOST_DEVICE constexpr int padded_threshold(int i) { return i + (i >> 5); }

// Index of the code nearest to x (x already divided by the block's absmax, in [-1, 1]):
// the number of decision points below x, by binary search in eight fixed steps (no
// data-dependent trip count, so the searches of a thread's elements interleave); a tie
// goes to the lower code. NaN compares false everywhere and gets code 0 (its block's
// absmax is NaN anyway). `threshold` is a QuantMap's, or with kPadded its padded copy.
template <bool kPadded = false>
FLORA_HOST_DEVICE inline uint8_t encode_nearest(float x, const float* threshold) {
  int below = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) {
    const int i = below + step - 1;  // at most 254: the steps sum to 255
    if (x > threshold[kPadded ? padded_threshold(i) : i]) below += step;
  }
  return static_cast<uint8_t>(below);
}

}  // namespace flora
