// CPU kernels of the 8-bit state format (csrc/common/quantize.h).
#include "../common/quantize.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace flora {
namespace {

// Whether the `count` values are bitwise what codes `q` with `absmax` read back.
bool block_reads_back(const float* x, const uint8_t* q, int64_t count, float absmax,
                      const QuantMap& map) {
  for (int64_t e = 0; e < count; ++e) {
    const float back = map.value[q[e]] * absmax;
    if (std::memcmp(&back, x + e, sizeof(float)) != 0) return false;
  }
  return true;
}

// keep_unchanged: requantize_blockwise_ (a block whose values are bitwise its read-back
// keeps its codes and absmax).
void quantize_cpu(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                  bool is_signed, bool keep_unchanged) {
  check_quantized_args(values, codes, absmax);
  const QuantMap& map = dynamic_map(is_signed);
  const float* x = values.data_ptr<float>();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
  const int64_t numel = values.numel();
  at::parallel_for(0, quant_blocks(numel), 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kQuantBlock, hi = std::min(numel, lo + kQuantBlock);
      if (keep_unchanged && block_reads_back(x + lo, q + lo, hi - lo, amax[b], map)) continue;
      float a = 0.0f;
      for (int64_t e = lo; e < hi; ++e) {
        const float v = std::fabs(x[e]);
        a = (v > a || std::isnan(v)) ? v : a;  // NaN sticks: the block reads back NaN
      }
      amax[b] = a;
      for (int64_t e = lo; e < hi; ++e)
        q[e] = encode_nearest(a > 0.0f ? x[e] / a : 0.0f, map.threshold);
    }
  });
}

}  // namespace

void quantize_blockwise_cpu(const at::Tensor& values, const at::Tensor& codes,
                            const at::Tensor& absmax, bool is_signed) {
  quantize_cpu(values, codes, absmax, is_signed, false);
}

void requantize_blockwise_cpu(const at::Tensor& values, const at::Tensor& codes,
                              const at::Tensor& absmax, bool is_signed) {
  quantize_cpu(values, codes, absmax, is_signed, true);
}

void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& values, bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const QuantMap& map = dynamic_map(is_signed);
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const float* amax = absmax.data_ptr<float>();
  float* x = values.data_ptr<float>();
  at::parallel_for(0, values.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) x[e] = map.value[q[e]] * amax[e / kQuantBlock];
  });
}

}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("quantize_blockwise_", &flora::quantize_blockwise_cpu);
  m.impl("requantize_blockwise_", &flora::requantize_blockwise_cpu);
  m.impl("dequantize_blockwise_", &flora::dequantize_blockwise_cpu);
}
