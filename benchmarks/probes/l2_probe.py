"""How L2-resident reads share the GPU with a DRAM stream: does a kernel that streams
from DRAM slow down when it also reads operands that sit in L2, as the fused apply
(G and p from DRAM, the up GEMM's operands from L2) and the down GEMM (G from DRAM,
P from L2) do?

A probe kernel streams a 2 GiB buffer (read, or read and write back) and, for every
16 bytes streamed, reads k * 16 bytes from a small buffer that stays in L2 (whole
512-byte runs a warp, spread over the buffer). Printed: time, DRAM and L2 bytes a
second, and their sum. If the L2 reads came free, the time would stay at k = 0's.

Usage (GPU machine): python benchmarks/probes/l2_probe.py  [builds the probe with nvcc, ~1 min]
"""
import os
import statistics
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_step import measured_on, timed_call  # noqa: E402

CUDA_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

// Streams n4 float4 of s (and writes them to w when w != nullptr); k reads of the L2
// buffer l (l4 float4, a power of two) per streamed float4. Unrolled by 4 so that each
// thread has 4 (1 + k) loads in flight.
__global__ void probe_kernel(const float4* __restrict__ s, float4* __restrict__ w,
                             int64_t n4, const float4* __restrict__ l, int64_t l4, int k,
                             bool stream, float* __restrict__ sink) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  float acc = 0.f;
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; base < n4;
       base += 4 * stride) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t i = base + u * stride;
      v[u] = stream && i < n4 ? s[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int j = 0; j < k; ++j) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        // A warp reads 32 consecutive float4; warps and j spread over the buffer.
        const int64_t i = base + u * stride;
        const float4 x = l[(i + int64_t(j) * 40961 * 32) & (l4 - 1)];
        v[u].x += x.x;
        v[u].y += x.y;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t i = base + u * stride;
      if (w != nullptr && i < n4) w[i] = v[u];
      acc += v[u].x + v[u].y + v[u].z + v[u].w;
    }
  }
  if (acc == 1.2345f) sink[0] = acc;  // keeps the loads
}

void probe(torch::Tensor s, torch::Tensor w, torch::Tensor l, int64_t k, bool stream,
           bool write, torch::Tensor sink, int64_t blocks) {
  probe_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const float4*>(s.data_ptr<float>()),
      write ? reinterpret_cast<float4*>(w.data_ptr<float>()) : nullptr, s.numel() / 4,
      reinterpret_cast<const float4*>(l.data_ptr<float>()), l.numel() / 4, static_cast<int>(k),
      stream, sink.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""
CPP_SRC = ("void probe(torch::Tensor s, torch::Tensor w, torch::Tensor l, int64_t k, "
           "bool stream, bool write, torch::Tensor sink, int64_t blocks);")


def main():
    mod = load_inline("l2_probe", CPP_SRC, cuda_sources=CUDA_SRC, functions=["probe"],
                      extra_cuda_cflags=["-O3"], verbose=False)
    props = torch.cuda.get_device_properties(0)
    blocks = props.multi_processor_count * 8
    s = torch.rand(512 << 20, device="cuda")  # 2 GiB
    w = torch.empty_like(s)
    sink = torch.zeros(1, device="cuda")
    print(f"{measured_on()}; stream 2 GiB, {blocks} blocks of 256")
    print("| L2 buffer | stream | k (L2 bytes / streamed bytes read) | ms | DRAM GB/s | "
          "L2 reads GB/s | sum GB/s |")
    print("|---|---|---|---|---|---|---|")
    for l_mib in (8, 32):
        l = torch.rand(l_mib << 18, device="cuda")
        for stream, write in (("read", False), ("read+write", True), ("none", False)):
            for k in (0, 1, 2, 4):
                if stream == "none" and k == 0:
                    continue
                args = (s, w, l, k, stream != "none", write, sink, blocks)
                for _ in range(2):
                    mod.probe(*args)
                ms = statistics.median(timed_call(lambda: mod.probe(*args)) for _ in range(7))
                nbytes = s.numel() * 4
                dram = (nbytes * (2 if write else 1) if stream != "none" else 0) / ms / 1e6
                l2 = nbytes * k / ms / 1e6
                print(f"| {l_mib} MiB | {stream} | {k} | {ms:.3f} | {dram:.0f} | {l2:.0f} | "
                      f"{dram + l2:.0f} |", flush=True)


if __name__ == "__main__":
    main()
