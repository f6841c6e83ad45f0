// CUDA backend of partial_channel (math and index maps in csrc/include/pynas/partial_channel.h, shared
// with the CPU loops of csrc/cpu/partial_channel.cpp, which are the ones to read first).
//
// Both kernels are elementwise, one thread per value of a (Ho, Wo) plane, grid-stride:
// - forward: per value of `out` (consecutive threads, consecutive values: coalesced writes), a load of t,
//   of x, or the four values of x's 2x2 window and its maximum;
// - backward: per value of g in the planes of `ans` order, (n, a, oh, ow): a < Cg gives g_t's value and
//   zeros g_x's 1 (stride 1) or 4 (stride 2) values below it; any other a gives g_x's values: g's value
//   (stride 1), or g's value at the window's argmax and zeros at its three other positions (stride 2).
// Every output value is written once, without atomics; values are copied, never rounded: exact in
// float16, bfloat16, float32 and float64. Comparisons are made in at::opmath_type (float for the 16-bit
// dtypes, which converts exactly).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/partial_channel.h"
#include "pynas/cuda_grid.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace pynas {
namespace cuda {
namespace {

using partial_channel::ans_channel;
using partial_channel::out_channel;
using partial_channel::tap_offset;
using partial_channel::window_argmax;

constexpr int kThreads = 256;

struct Geometry {
  int64_t C, groups, cg, H, W, Ho, Wo, HW, HWo;
  int stride;
};

template <typename scalar_t, typename cmp_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                   int64_t total, Geometry geo) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t p = i % geo.HWo, plane = i / geo.HWo;
    const int64_t n = plane / geo.C, oc = plane % geo.C;
    const int64_t a = ans_channel(oc, geo.groups, geo.cg);
    if (a < geo.cg) {
      out[i] = t[(n * geo.cg + a) * geo.HWo + p];
    } else if (geo.stride == 1) {
      out[i] = x[(n * geo.C + a) * geo.HW + p];
    } else {
      const int64_t oh = p / geo.Wo, ow = p % geo.Wo;
      const scalar_t* w = x + (n * geo.C + a) * geo.HW + 2 * oh * geo.W + 2 * ow;
      out[i] = w[tap_offset(window_argmax<cmp_t>(w, geo.W), geo.W)];
    }
  }
}

template <typename scalar_t, typename cmp_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ g_t,
                    scalar_t* __restrict__ g_x, int64_t total, Geometry geo) {
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t p = i % geo.HWo, plane = i / geo.HWo;  // plane = n * C + a
    const int64_t n = plane / geo.C, a = plane % geo.C;
    const scalar_t v = g[(n * geo.C + out_channel(a, geo.groups, geo.cg)) * geo.HWo + p];
    const bool inner = a < geo.cg;
    if (inner) g_t[(n * geo.cg + a) * geo.HWo + p] = v;
    if (geo.stride == 1) {
      g_x[plane * geo.HW + p] = inner ? zero : v;
    } else {
      const int64_t oh = p / geo.Wo, ow = p % geo.Wo;
      const int64_t base = plane * geo.HW + 2 * oh * geo.W + 2 * ow;
      const int arg = inner ? -1 : window_argmax<cmp_t>(x + base, geo.W);
#pragma unroll
      for (int k = 0; k < 4; ++k) g_x[base + tap_offset(k, geo.W)] = k == arg ? v : zero;
    }
  }
}

// Enough blocks to fill the GPU; grid-stride loops cover the rest.
unsigned int num_blocks(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(sms) * (2048 / kThreads))));
}

Geometry geometry_of(const at::Tensor& x, int64_t groups, int64_t stride) {
  Geometry geo;
  geo.C = x.size(1);
  geo.groups = groups;
  geo.cg = geo.C / groups;
  geo.H = x.size(2);
  geo.W = x.size(3);
  geo.Ho = geo.H / stride;
  geo.Wo = geo.W / stride;
  geo.HW = geo.H * geo.W;
  geo.HWo = geo.Ho * geo.Wo;
  geo.stride = static_cast<int>(stride);
  return geo;
}

}  // namespace

at::Tensor partial_channel_forward(const at::Tensor& t_in, const at::Tensor& x_in, int64_t groups, int64_t stride) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor t = t_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const Geometry geo = geometry_of(x, groups, stride);
  at::Tensor out = at::empty({x.size(0), geo.C, geo.Ho, geo.Wo}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_channel_forward_cuda", [&] {
    using cmp_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, cmp_t><<<num_blocks(total), kThreads, 0, stream>>>(
        t.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> partial_channel_backward(const at::Tensor& g_in, const at::Tensor& x_in,
                                                            int64_t groups, int64_t stride) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = g_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const Geometry geo = geometry_of(x, groups, stride);
  at::Tensor g_t = at::empty({x.size(0), geo.cg, geo.Ho, geo.Wo}, g.options());
  at::Tensor g_x = at::empty(x.sizes(), g.options());
  const int64_t total = g.numel();  // N * C * Ho * Wo: one thread per value of g
  if (total == 0 || g_x.numel() == 0) return {g_t, g_x};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_channel_backward_cuda", [&] {
    using cmp_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, cmp_t><<<num_blocks(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g_t.mutable_data_ptr<scalar_t>(),
        g_x.mutable_data_ptr<scalar_t>(), total, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_t, g_x};
}

}  // namespace cuda
}  // namespace pynas
