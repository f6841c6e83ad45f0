#pragma once
// The training-mode DARTS RNN search cell over a sequence (csrc/rnn_cell.cpp): one call forward, one call
// backward. Arguments are checked by the bindings (csrc/bindings.cpp).
//
// forward(xs (T,B,I), h0 (B,H), x_mask (B,I), h_mask (B,H), probs (E,5), running_mean (H), running_var (H),
//         W0 (I+H, 2H), Ws: steps x (H, 2H), momentum, eps)
//   -> {hiddens (T,B,H), saved: xm, S, U, MEAN, INVSTD, C, HH, C0, H0, HPREV}; the running statistics are
//      updated in place (steps + 1 BatchNorm calls per time step).
// backward(grad hiddens, x_mask, h_mask, probs, W0, Ws, saved..., eps)
//   -> {d xs, d h0, d probs, d W0, d Ws...}
#include <ATen/core/Tensor.h>

#include <vector>

namespace pynas {
namespace rnn_cell {

std::vector<at::Tensor> forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                const at::Tensor& h_mask, const at::Tensor& probs, at::Tensor& running_mean,
                                at::Tensor& running_var, const at::Tensor& W0, at::TensorList Ws, double momentum,
                                double eps);

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x_mask, const at::Tensor& h_mask,
                                 const at::Tensor& probs, const at::Tensor& W0, at::TensorList Ws,
                                 const at::Tensor& xm, const at::Tensor& S, const at::Tensor& U,
                                 const at::Tensor& MEAN, const at::Tensor& INVSTD, const at::Tensor& C,
                                 const at::Tensor& HH, const at::Tensor& C0, const at::Tensor& H0,
                                 const at::Tensor& HPREV, double eps, bool need_w = true);

}  // namespace rnn_cell

namespace cpu {
// The whole sequence in one parallel region on the CPU for float32/float64 when the running statistics and
// the probabilities have the input's dtype (csrc/cpu/rnn_cell.cpp); elsewhere rnn_cell.cpp runs it op by op
// through ATen and the rnn_mix kernels. Same arguments and results as rnn_cell::forward / backward (backward
// without U, MEAN and eps: it needs only x_hat = S and INVSTD).
bool rnn_cell_supported(const at::Tensor& xs, const at::Tensor& probs, const at::Tensor& running_mean,
                        const at::Tensor& running_var);

std::vector<at::Tensor> rnn_cell_forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                         const at::Tensor& h_mask, const at::Tensor& probs,
                                         at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& W0,
                                         at::TensorList Ws, double momentum, double eps);

std::vector<at::Tensor> rnn_cell_backward(const at::Tensor& grad_out, const at::Tensor& x_mask,
                                          const at::Tensor& h_mask, const at::Tensor& probs, const at::Tensor& W0,
                                          at::TensorList Ws, const at::Tensor& xm, const at::Tensor& S,
                                          const at::Tensor& INVSTD, const at::Tensor& C, const at::Tensor& HH,
                                          const at::Tensor& C0, const at::Tensor& H0, const at::Tensor& HPREV,
                                          bool need_w);
}  // namespace cpu
}  // namespace pynas
