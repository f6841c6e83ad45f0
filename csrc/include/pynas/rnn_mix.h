#pragma once
// rnn_mix: the node mix of the DARTS RNN search cell, fused.
//
//   states, c, h: (J, B, H), c already through the sigmoid; probs: (J, 5) over
//   none, tanh, relu, sigmoid, identity (column 0, 'none', contributes nothing):
//
//   out[b, k] = sum_j sum_{f = 1..4} probs[j, f] * (s + c * (f(h) - s))      (s, c, h at [j, b, k])
//             = sum_j ( P_j * s + c * (A - P_j * s) ),   P_j = sum_{f>=1} probs[j, f],  A = sum_f probs[j, f] f(h)
//
// Backward, for g = d out:
//   d s = g * P_j * (1 - c)
//   d c = g * (A - P_j * s)
//   d h = g * c * sum_f probs[j, f] * f'(h)
//   d probs[j, f] = sum_{b, k} g * (s + c * (f(h) - s))   (f >= 1; d probs[j, 0] = 0)
// The activations are recomputed in backward, never stored. Arithmetic in the accumulation type
// (float for float16/bfloat16/float32, double for float64); d probs reduced per fixed tile, then in tile
// order, so it does not depend on the thread count or launch configuration.

#include "pynas/macros.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <tuple>

namespace pynas {
namespace rnn_mix {

constexpr int kFuncs = 5;  // none, tanh, relu, sigmoid, identity

// f(h) and f'(h) for f = tanh, relu, sigmoid, identity (indices 1..4; slot 0 unused).
// Defined for every h, as torch's own functions are: h = +inf / -inf gives tanh = 1 / -1, sigmoid = 1 / 0
// and their derivatives 0 (exp(-h) = inf only ever divides 1, never inf); large finite |h| saturates the
// same way (exp(-h) may overflow to inf: 1 / (1 + inf) = 0); and no value or derivative is formed as 0 * h
// (NaN for an infinite h: relu is a select). A NaN h gives NaN values, relu's included (torch.relu(NaN) is
// NaN), and relu'(NaN) = 0 as torch's.
template <typename acc_t>
PYNAS_HOST_DEVICE inline void activations(acc_t h, acc_t* f, acc_t* df) {
#ifndef __CUDA_ARCH__
  using std::exp;  // the float overloads on the host (nvcc's device code has its own)
  using std::tanh;
#endif
  const acc_t t = tanh(h);
  const acc_t sg = acc_t(1) / (acc_t(1) + exp(-h));
  f[0] = acc_t(0);
  df[0] = acc_t(0);
  f[1] = t;
  df[1] = acc_t(1) - t * t;
  f[2] = h < acc_t(0) ? acc_t(0) : h;  // relu(NaN) = NaN, as torch.relu
  df[2] = h > acc_t(0) ? acc_t(1) : acc_t(0);
  f[3] = sg;
  df[3] = sg * (acc_t(1) - sg);
  f[4] = h;
  df[4] = acc_t(1);
}

// One node's term of the forward at one element.
template <typename acc_t>
PYNAS_HOST_DEVICE inline acc_t forward_term(acc_t s, acc_t c, acc_t h, const acc_t* p) {
  acc_t f[kFuncs], df[kFuncs];
  activations(h, f, df);
  acc_t P = 0, A = 0;
  for (int k = 1; k < kFuncs; ++k) {
    P += p[k];
    A += p[k] * f[k];
  }
  return P * s + c * (A - P * s);
}

// One node's backward at one element: writes ds, dc, dh and adds g * (s + c (f(h) - s)) to dp[1..4].
template <typename acc_t>
PYNAS_HOST_DEVICE inline void backward_term(acc_t g, acc_t s, acc_t c, acc_t h, const acc_t* p, acc_t* ds, acc_t* dc,
                                            acc_t* dh, acc_t* dp) {
  acc_t f[kFuncs], df[kFuncs];
  activations(h, f, df);
  acc_t P = 0, A = 0, D = 0;
  for (int k = 1; k < kFuncs; ++k) {
    P += p[k];
    A += p[k] * f[k];
    D += p[k] * df[k];
    dp[k] += g * (s + c * (f[k] - s));
  }
  *ds = g * P * (acc_t(1) - c);
  *dc = g * (A - P * s);
  *dh = g * c * D;
}

}  // namespace rnn_mix

namespace cpu {
at::Tensor rnn_mix_forward(const at::Tensor& states, const at::Tensor& c, const at::Tensor& h,
                           const at::Tensor& probs);
// (d states, d c, d h, d probs)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_mix_backward(const at::Tensor& grad_out,
                                                                            const at::Tensor& states,
                                                                            const at::Tensor& c,
                                                                            const at::Tensor& h,
                                                                            const at::Tensor& probs);
}  // namespace cpu

#if defined(PYNAS_WITH_CUDA) || defined(__CUDACC__)
namespace cuda {
at::Tensor rnn_mix_forward(const at::Tensor& states, const at::Tensor& c, const at::Tensor& h,
                           const at::Tensor& probs);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_mix_backward(const at::Tensor& grad_out,
                                                                            const at::Tensor& states,
                                                                            const at::Tensor& c,
                                                                            const at::Tensor& h,
                                                                            const at::Tensor& probs);
}  // namespace cuda
#endif

}  // namespace pynas
