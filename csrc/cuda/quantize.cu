// CUDA kernels of the 8-bit state format (csrc/common/quantize.h): the same map, the same
// float32 operations (one IEEE division to scale, one multiplication to read back) and the
// same tie rule as the CPU kernels, so both write the same bytes for the same input.
#include "../common/quantize.h"
#include "launch.h"
#include "quant_io.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace flora {
namespace {

static_assert(kQuantBlock == 256, "one thread per element of a block");
constexpr int kMaxGrid = 65535;  // blocks loop over the rest

__device__ inline float absmax_combine(float a, float b) {
  return (b > a || isnan(b)) ? b : a;  // NaN sticks, as on the CPU
}

// kKeep: requantize_blockwise_ (a block whose values are bitwise its read-back keeps its
// codes and absmax).
template <bool kKeep>
__global__ void quantize_kernel(const float* __restrict__ x, uint8_t* __restrict__ q,
                                float* __restrict__ amax, int64_t numel, int64_t blocks,
                                QuantMap map) {
  __shared__ float threshold[255];
  __shared__ float value[kKeep ? 256 : 1];
  __shared__ float partial[kQuantBlock];
  for (int k = threadIdx.x; k < 255; k += blockDim.x) threshold[k] = map.threshold[k];
  if constexpr (kKeep)
    for (int k = threadIdx.x; k < 256; k += blockDim.x) value[k] = map.value[k];
  __syncthreads();
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t e = b * kQuantBlock + threadIdx.x;
    const float v = e < numel ? x[e] : 0.0f;
    if constexpr (kKeep) {
      const bool same =
          e >= numel || __float_as_uint(__fmul_rn(value[q[e]], amax[b])) == __float_as_uint(v);
      if (__syncthreads_and(same)) continue;  // uniform across the block
    }
    partial[threadIdx.x] = fabsf(v);
    __syncthreads();
    for (int stride = kQuantBlock / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride)
        partial[threadIdx.x] = absmax_combine(partial[threadIdx.x], partial[threadIdx.x + stride]);
      __syncthreads();
    }
    const float a = partial[0];
    if (threadIdx.x == 0) amax[b] = a;
    if (e < numel) {
      const float scaled = a > 0.0f ? __fdiv_rn(v, a) : 0.0f;
      q[e] = encode_nearest(scaled, threshold);
    }
    __syncthreads();  // partial[0] is read before the next block overwrites it
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ amax,
                                  float* __restrict__ x, int64_t numel, int64_t blocks,
                                  QuantMap map) {
  __shared__ float value[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) value[k] = map.value[k];
  __syncthreads();
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t e = b * kQuantBlock + threadIdx.x;
    if (e < numel) x[e] = __fmul_rn(value[q[e]], amax[b]);
  }
}

int grid_for(int64_t blocks) {
  return static_cast<int>(std::min<int64_t>(blocks, kMaxGrid));
}

template <bool kKeep>
void quantize_cuda(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                   bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const int64_t numel = values.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t blocks = quant_blocks(numel);
  quantize_kernel<kKeep><<<grid_for(blocks), kQuantBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      values.data_ptr<float>(), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), numel,
      blocks, dynamic_map(is_signed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& values, bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const int64_t numel = values.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t blocks = quant_blocks(numel);
  dequantize_kernel<<<grid_for(blocks), kQuantBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), values.data_ptr<float>(), numel,
      blocks, dynamic_map(is_signed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace cuda_detail {
namespace {

// The new absmax of every changed block of the tasks' 8-bit state (quant_io.cuh). Grid:
// (blocks striding over a task's absmax, tasks).
__global__ void __launch_bounds__(kThreads) quant_commit_kernel(TaskTable table) {
  const Task& t = table.tasks[blockIdx.y];
  if (!quantized(t) || skipped(t)) return;
  const int64_t blocks = quant_blocks(t.numel);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    if (t.sm_codes != nullptr && t.sm_changed[b]) t.sm_absmax[b] = __uint_as_float(t.sm_next[b]);
    if (t.m_codes != nullptr && t.m_changed[b]) t.m_absmax[b] = __uint_as_float(t.m_next[b]);
  }
}

}  // namespace

const float* quant_maps(int device) {
  static std::mutex mutex;
  static std::vector<at::Tensor*> maps;  // never freed: CUDA may be gone at process exit
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(maps.size()) <= device) maps.resize(device + 1, nullptr);
  if (maps[device] == nullptr) {
    at::Tensor host = at::zeros({kMapFloats}, at::TensorOptions().dtype(at::kFloat));
    float* h = host.data_ptr<float>();
    const QuantMap& s = dynamic_map(true);
    const QuantMap& u = dynamic_map(false);
    std::copy(s.value, s.value + 256, h + kMapSigned);
    std::copy(u.value, u.value + 256, h + kMapUnsigned);
    std::copy(s.threshold, s.threshold + 255, h + kThresholdSigned);
    std::copy(u.threshold, u.threshold + 255, h + kThresholdUnsigned);
    maps[device] = new at::Tensor(
        host.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))));
  }
  return maps[device]->data_ptr<float>();
}

void launch_quant_commit(const TaskTable& table, int64_t max_numel, cudaStream_t stream) {
  constexpr int kMaxBlocks = 64;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(kMaxBlocks, ceil_div(quant_blocks(max_numel), kThreads))));
  constexpr int kMaxTasks = 65535;  // grid.y
  for (int first = 0; first < table.count; first += kMaxTasks) {
    TaskTable part = table;
    part.tasks += first;
    part.count = std::min(kMaxTasks, table.count - first);
    quant_commit_kernel<<<dim3(blocks, static_cast<unsigned>(part.count)), kThreads, 0,
                          stream>>>(part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda_detail
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("quantize_blockwise_", &flora::quantize_cuda<false>);
  m.impl("requantize_blockwise_", &flora::quantize_cuda<true>);
  m.impl("dequantize_blockwise_", &flora::dequantize_blockwise_cuda);
}
