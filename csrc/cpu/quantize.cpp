// CPU kernels of the 8-bit state format (csrc/common/quantize.h).
#include "../common/quantize.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace flora {
namespace {

void quantize_blockwise_cpu(const at::Tensor& values, const at::Tensor& codes,
                            const at::Tensor& absmax, bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const QuantMap& map = dynamic_map(is_signed);
  const float* x = values.data_ptr<float>();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
  const int64_t numel = values.numel();
  at::parallel_for(0, quant_blocks(numel), 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kQuantBlock, hi = std::min(numel, lo + kQuantBlock);
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

}  // namespace
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("quantize_blockwise_", &flora::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise_", &flora::dequantize_blockwise_cpu);
}
