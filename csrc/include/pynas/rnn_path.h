#pragma once
// rnn_path: the DARTS RNN evaluation cell of one genotype over a whole sequence (csrc/rnn_path.cpp), and its
// per-element highway step (csrc/cpu/rnn_path.cpp, csrc/cuda/rnn_path.cu).
//
// Per time step t, with the sequence's dropout masks m_x, m_h (absent in eval mode: no multiplication):
//
//   [c | g]_0 = [x_t m_x | h m_h] @ W0,               s_0 = h + sigmoid(c_0) (tanh(g_0) - h)
//   node i (0-based): j = preds[i], f = acts[i],
//   [c | g]_{i+1} = (s_j m_h) @ Ws[i],                s_{i+1} = s_j + sigmoid(c_{i+1}) (f(g_{i+1}) - s_j)
//   h_t = mean over k in concat of s_k
//
// The highway step (node 0 is one with f = tanh and predecessor h), at one element, from the node's GEMM
// output ch = [c | g] (B, 2H) and its predecessor p:
//
//   forward:   s = p + sigmoid(c) (f(g) - p)                 (and m = s m_h, the next GEMMs' input)
//   backward:  for d s = G:  d c = G (f(g) - p) sigmoid'(c),  d g = G sigmoid(c) f'(g),  d p = G (1 - sigmoid(c))
//
// Activation codes are the columns of rnn_mix's probs: 1 tanh, 2 relu, 3 sigmoid, 4 identity. Arithmetic in
// the accumulation type (float for float16/bfloat16/float32, double for float64); activations are recomputed
// in the backward from the saved GEMM outputs, never stored.
#include "pynas/macros.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace pynas {
namespace rnn_path {

constexpr int kTanh = 1, kRelu = 2, kSigmoid = 3, kIdentity = 4;

template <typename acc_t>
PYNAS_HOST_DEVICE inline acc_t sigmoid(acc_t x) {
#ifndef __CUDA_ARCH__
  using std::exp;
#endif
  return acc_t(1) / (acc_t(1) + exp(-x));  // exp(-x) = inf for very negative x: 1 / inf = 0, no NaN
}

// f(x) of activation ACT, and f'(x) in *df.
template <int ACT, typename acc_t>
PYNAS_HOST_DEVICE inline acc_t activation(acc_t x, acc_t* df) {
#ifndef __CUDA_ARCH__
  using std::tanh;
#endif
  if constexpr (ACT == kTanh) {
    const acc_t t = tanh(x);
    *df = acc_t(1) - t * t;
    return t;
  } else if constexpr (ACT == kRelu) {
    *df = x > acc_t(0) ? acc_t(1) : acc_t(0);
    return x < acc_t(0) ? acc_t(0) : x;  // a select, never 0 * x; relu(NaN) = NaN as torch.relu
  } else if constexpr (ACT == kSigmoid) {
    const acc_t sg = sigmoid(x);
    *df = sg * (acc_t(1) - sg);
    return sg;
  } else {
    static_assert(ACT == kIdentity, "rnn_path: activation code must be 1..4");
    *df = acc_t(1);
    return x;
  }
}

// s = p + sigmoid(c) (f(g) - p) at one element.
template <int ACT, typename acc_t>
PYNAS_HOST_DEVICE inline acc_t step_forward(acc_t p, acc_t c, acc_t g) {
  acc_t df;
  const acc_t a = activation<ACT>(g, &df);
  return p + sigmoid(c) * (a - p);
}

// The step's backward at one element from G = d s: writes d c, d g and d p.
template <int ACT, typename acc_t>
PYNAS_HOST_DEVICE inline void step_backward(acc_t G, acc_t p, acc_t c, acc_t g, acc_t* dc, acc_t* dg, acc_t* dp) {
  acc_t df;
  const acc_t a = activation<ACT>(g, &df);
  const acc_t sc = sigmoid(c);
  *dc = G * (a - p) * sc * (acc_t(1) - sc);
  *dg = G * sc * df;
  *dp = G * (acc_t(1) - sc);
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime code act (host side; checked by the callers).
template <typename F>
inline void dispatch_activation(int64_t act, F&& f) {
  switch (act) {
    case kTanh: f(std::integral_constant<int, kTanh>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); break;
    case kIdentity: f(std::integral_constant<int, kIdentity>{}); break;
    default: TORCH_CHECK(false, "rnn_path: act: expected an activation code 1..4 (tanh, relu, sigmoid, identity), got ", act);
  }
}

// The sequence (csrc/rnn_path.cpp; device-generic: GEMMs through ATen, the steps through the kernels below).
// Arguments are checked by the bindings (csrc/bindings.cpp); x_mask / h_mask undefined: eval mode (no masks).
//
// forward(xs (T,B,I), h0 (B,H), x_mask (B,I), h_mask (B,H), W0 (I+H, 2H), Ws: steps x (H, 2H), preds, acts,
//         concat, save)
//   -> {hiddens (T,B,H)} and, with save, the backward's inputs: xm (T,B,I) the masked inputs, S (n,T,B,H) the
//      node outputs s_0..s_steps, CH (n,T,B,2H) the node GEMM outputs (n = steps + 1)
// backward(grad hiddens, h0, hiddens, x_mask, h_mask, W0, Ws, preds, acts, concat, xm, S, CH)
//   -> {d xs, d h0, d W0, d Ws...}
std::vector<at::Tensor> forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                const at::Tensor& h_mask, const at::Tensor& W0, at::TensorList Ws,
                                const std::vector<int64_t>& preds, const std::vector<int64_t>& acts,
                                const std::vector<int64_t>& concat, bool save);

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& h0, const at::Tensor& hiddens,
                                 const at::Tensor& x_mask, const at::Tensor& h_mask, const at::Tensor& W0,
                                 at::TensorList Ws, const std::vector<int64_t>& preds,
                                 const std::vector<int64_t>& acts, const std::vector<int64_t>& concat,
                                 const at::Tensor& xm, const at::Tensor& S, const at::Tensor& CH);

}  // namespace rnn_path

// The step kernels on contiguous tensors: ch (B, 2H), prev, h_mask, s, m, g, g_prev (B, H), gch (B, 2H).
//   step_forward:  s = p + sigmoid(c) (f(g) - p); with h_mask defined also m = s h_mask (m undefined otherwise).
//   step_backward: gch = [d c | d g]; g_prev = d p, or g_prev += d p with accumulate.
namespace cpu {
void rnn_path_step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act, const at::Tensor& h_mask,
                           const at::Tensor& s, const at::Tensor& m);
void rnn_path_step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                            const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate);
}  // namespace cpu

#if defined(PYNAS_WITH_CUDA) || defined(__CUDACC__)
namespace cuda {
void rnn_path_step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act, const at::Tensor& h_mask,
                           const at::Tensor& s, const at::Tensor& m);
void rnn_path_step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                            const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate);
}  // namespace cuda
#endif

}  // namespace pynas
