#pragma once
// partial_channel: the output of a PC-DARTS partial-channel edge, written in one pass.
//
// For an edge input x (N, C, H, W), K groups (C divisible by K, Cg = C / K), stride s in {1, 2} and
// t (N, Cg, Ho, Wo), the inner mixed op's output on x[:, :Cg] (Ho = H / s, Wo = W / s):
//
//   bypass = x[:, Cg:]                         s == 1
//          = max_pool2d(x[:, Cg:], 2, 2)       s == 2   (H and W even)
//   ans    = cat([t, bypass], 1)
//   out    = channel_shuffle(ans, K)           out channel c' * K + g = ans channel g * Cg + c'
//
// forward   out from t and x; neither `ans` nor the pooled bypass is stored.
// backward  from g = d out: g_t (N, Cg, Ho, Wo) and g_x (N, C, H, W), whose first Cg channels are zero
//           (the caller adds the inner op's input gradient there) and whose other channels hold the
//           bypass gradient: the shuffled g at s == 1; at s == 2 each 2x2 window's gradient goes to the
//           position of its maximum, ties to the first maximum in row-major window order, NaN counting
//           as a maximum (exactly as torch's max_pool2d and its backward).
//
// Everything is a copy or a comparison: results are exact in every dtype.
//
// This header holds the index maps and the window's argmax once, as functions that the CPU loops
// (csrc/cpu/partial_channel.cpp) and the CUDA kernels (csrc/cuda/partial_channel.cu) both call. It also
// declares each backend's entry points, called by csrc/bindings.cpp (arguments already checked there:
// t and x 4-D of one dtype and device, C % groups == 0, t (N, C / groups, H / stride, W / stride),
// stride 1 or 2, an even H and W at stride 2, g of out's shape).

#include "pynas/macros.h"

#include <cstdint>
#include <tuple>

namespace at {
class Tensor;
}

namespace pynas {
namespace partial_channel {

// The channel of `ans` that out channel `oc` shows: g * Cg + c' for oc = c' * K + g.
PYNAS_HOST_DEVICE inline int64_t ans_channel(int64_t oc, int64_t groups, int64_t cg) {
  return (oc % groups) * cg + oc / groups;
}

// The out channel that shows channel `a` of `ans` (the inverse of ans_channel).
PYNAS_HOST_DEVICE inline int64_t out_channel(int64_t a, int64_t groups, int64_t cg) {
  return (a % cg) * groups + a / cg;
}

// Whether v is NaN, without <cmath> (v != v holds for NaN only); for float, double and the converted
// float of float16/bfloat16.
template <typename T>
PYNAS_HOST_DEVICE inline bool is_nan(T v) {
  return v != v;
}

// The tap (0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)) of the maximum of the 2x2 window whose top-left
// value is at p in a plane of row length W, compared in cmp_t: the first maximum in row-major order,
// a NaN taking the place (as torch's max_pool2d: a later value wins when greater, or when NaN).
template <typename cmp_t, typename scalar_t>
PYNAS_HOST_DEVICE inline int window_argmax(const scalar_t* p, int64_t W) {
  cmp_t best = static_cast<cmp_t>(p[0]);
  int arg = 0;
  const cmp_t v[3] = {static_cast<cmp_t>(p[1]), static_cast<cmp_t>(p[W]), static_cast<cmp_t>(p[W + 1])};
  for (int k = 0; k < 3; ++k) {
    if (v[k] > best || is_nan(v[k])) {
      best = v[k];
      arg = k + 1;
    }
  }
  return arg;
}

// The offset of tap `arg` from the window's top-left value.
PYNAS_HOST_DEVICE inline int64_t tap_offset(int arg, int64_t W) { return (arg >> 1) * W + (arg & 1); }

}  // namespace partial_channel

namespace cpu {
// out (N, C, Ho, Wo) in x's dtype, contiguous. float32 and float64.
at::Tensor partial_channel_forward(const at::Tensor& t, const at::Tensor& x, int64_t groups, int64_t stride);
// (g_t (N, C / groups, Ho, Wo), g_x (N, C, H, W)), both contiguous, in g's dtype.
std::tuple<at::Tensor, at::Tensor> partial_channel_backward(const at::Tensor& g, const at::Tensor& x, int64_t groups,
                                                            int64_t stride);
}  // namespace cpu

// The same on a CUDA device (float16, bfloat16, float32, float64); declared only where compiled.
#if defined(PYNAS_WITH_CUDA) || defined(__CUDACC__)
namespace cuda {
at::Tensor partial_channel_forward(const at::Tensor& t, const at::Tensor& x, int64_t groups, int64_t stride);
std::tuple<at::Tensor, at::Tensor> partial_channel_backward(const at::Tensor& g, const at::Tensor& x, int64_t groups,
                                                            int64_t stride);
}  // namespace cuda
#endif

}  // namespace pynas
