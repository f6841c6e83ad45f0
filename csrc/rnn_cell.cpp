// The training-mode DARTS RNN search cell over a whole sequence: forward and backward as two C++ calls.
//
// Device-generic: the GEMMs, activations and BatchNorm go through ATen (MKL/oneDNN on the CPU, cuBLAS and
// torch's kernels on a GPU), the node mix through pynas's rnn_mix kernels (C++ or CUDA). What this file
// removes is the per-op cost of a graph of ~90 autograd nodes per time step: the loops over the 35 steps
// and 8 nodes run here, below autograd, and the Python side (pynas/ops/rnn_cell.py) sees one autograd node
// per sequence. Math, per step t (m_x, m_h the per-sequence dropout masks, all nodes BatchNorm1d without
// affine, in training mode):
//
//   [c0 | h0] = [x_t m_x | h m_h] @ W0,  u_0 = h + sigmoid(c0) (tanh(h0) - h),  s_0 = BN(u_0)
//   node i:   [c_j | h_j] = (s_j m_h) @ W_i (j <= i, one GEMM),  u_{i+1} = rnn_mix(s, sigmoid(c), h, p_i),
//             s_{i+1} = BN(u_{i+1})
//   h_t = mean(s_1 .. s_steps)
//
// Saved for the backward: the node outputs s and their BatchNorm inputs u, the batch statistics, sigmoid(c)
// and h of every edge, c0/h0/h of every step, the masked inputs.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <tuple>
#include <vector>

#include "pynas/rnn_cell.h"
#include "pynas/rnn_mix.h"

namespace pynas {
namespace rnn_cell {
namespace {

at::Tensor mix_forward(const at::Tensor& s, const at::Tensor& c, const at::Tensor& h, const at::Tensor& p) {
#ifdef PYNAS_WITH_CUDA
  if (s.is_cuda()) return pynas::cuda::rnn_mix_forward(s, c, h, p);
#endif
  return pynas::cpu::rnn_mix_forward(s, c, h, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_backward(const at::Tensor& g, const at::Tensor& s,
                                                                        const at::Tensor& c, const at::Tensor& h,
                                                                        const at::Tensor& p) {
#ifdef PYNAS_WITH_CUDA
  if (s.is_cuda()) return pynas::cuda::rnn_mix_backward(g, s, c, h, p);
#endif
  return pynas::cpu::rnn_mix_backward(g, s, c, h, p);
}

at::ScalarType stats_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                const at::Tensor& h_mask, const at::Tensor& probs, at::Tensor& running_mean,
                                at::Tensor& running_var, const at::Tensor& W0, at::TensorList Ws, double momentum,
                                double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (pynas::cpu::rnn_cell_supported(xs, probs, running_mean, running_var))
    return pynas::cpu::rnn_cell_forward(xs, h0, x_mask, h_mask, probs, running_mean, running_var, W0, Ws, momentum,
                                        eps);
  const int64_t T = xs.size(0), B = xs.size(1), I = xs.size(2), H = h0.size(1);
  const int64_t steps = static_cast<int64_t>(Ws.size()), n = steps + 1, E = steps * (steps + 1) / 2;
  auto opts = xs.options();
  at::Tensor W0x = W0.narrow(0, 0, I), W0h = W0.narrow(0, I, H);
  at::Tensor xm = xs * x_mask;
  at::Tensor XW = at::mm(xm.view({T * B, I}), W0x).view({T, B, 2 * H});  // input half of the first GEMM
  at::Tensor S = at::empty({T, n, B, H}, opts), U = at::empty({T, n, B, H}, opts);
  at::Tensor MEAN = at::empty({T, n, H}, opts.dtype(stats_dtype(xs.scalar_type())));
  at::Tensor INVSTD = at::empty_like(MEAN);
  at::Tensor C = at::empty({T, E, B, H}, opts), HH = at::empty({T, E, B, H}, opts);
  at::Tensor C0 = at::empty({T, B, H}, opts), H0 = at::empty({T, B, H}, opts), HPREV = at::empty({T, B, H}, opts);
  at::Tensor out = at::empty({T, B, H}, opts);
  at::Tensor h = h0;
  const c10::optional<at::Tensor> none;
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor St = S[t], Ut = U[t], Ct = C[t], HHt = HH[t], MEANt = MEAN[t], INVSTDt = INVSTD[t];
    HPREV[t].copy_(h);
    at::Tensor ch0 = at::addmm(XW[t], h * h_mask, W0h);
    at::Tensor c0 = C0[t], hh0 = H0[t];
    at::sigmoid_out(c0, ch0.narrow(1, 0, H));
    at::tanh_out(hh0, ch0.narrow(1, H, H));
    at::Tensor u0 = Ut[0];
    at::lerp_out(u0, h, hh0, c0);
    auto bn0 = at::native_batch_norm(u0, none, none, running_mean, running_var, true, momentum, eps);
    St[0].copy_(std::get<0>(bn0));
    MEANt[0].copy_(std::get<1>(bn0));
    INVSTDt[0].copy_(std::get<2>(bn0));
    int64_t off = 0;
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t J = i + 1;
      at::Tensor st = St.narrow(0, 0, J);
      at::Tensor ch = at::mm((st * h_mask).view({J * B, H}), Ws[i]).view({J, B, 2 * H});
      at::Tensor c = Ct.narrow(0, off, J), hh = HHt.narrow(0, off, J);
      at::sigmoid_out(c, ch.narrow(2, 0, H));
      hh.copy_(ch.narrow(2, H, H));
      at::Tensor u = Ut[J];
      u.copy_(mix_forward(st, c, hh, probs.narrow(0, off, J)));
      auto bn = at::native_batch_norm(u, none, none, running_mean, running_var, true, momentum, eps);
      St[J].copy_(std::get<0>(bn));
      MEANt[J].copy_(std::get<1>(bn));
      INVSTDt[J].copy_(std::get<2>(bn));
      off += J;
    }
    at::Tensor ot = out[t];
    at::mean_out(ot, St.narrow(0, n - steps, steps), {0});
    h = ot;
  }
  return {out, xm, S, U, MEAN, INVSTD, C, HH, C0, H0, HPREV};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x_mask, const at::Tensor& h_mask,
                                 const at::Tensor& probs, const at::Tensor& W0, at::TensorList Ws,
                                 const at::Tensor& xm, const at::Tensor& S, const at::Tensor& U,
                                 const at::Tensor& MEAN, const at::Tensor& INVSTD, const at::Tensor& C,
                                 const at::Tensor& HH, const at::Tensor& C0, const at::Tensor& H0,
                                 const at::Tensor& HPREV, double eps, bool need_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // the CPU sequence needs only what its forward saved (x_hat = S, INVSTD in S's dtype)
  if (S.is_cpu() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble) &&
      INVSTD.scalar_type() == S.scalar_type() && probs.scalar_type() == S.scalar_type())
    return pynas::cpu::rnn_cell_backward(grad_out, x_mask, h_mask, probs, W0, Ws, xm, S, INVSTD, C, HH, C0, H0,
                                         HPREV, need_w);
  const int64_t T = S.size(0), n = S.size(1), B = S.size(2), H = S.size(3), I = xm.size(2);
  const int64_t steps = static_cast<int64_t>(Ws.size()), E = steps * (steps + 1) / 2;
  auto opts = S.options();
  at::Tensor W0x = W0.narrow(0, 0, I), W0h = W0.narrow(0, I, H);
  at::Tensor g_probs = at::zeros_like(probs);
  std::vector<at::Tensor> g_Ws;
  std::vector<at::Tensor> Wts;  // the node weights transposed once, contiguous, for the d(masked states) GEMMs
  for (const auto& w : Ws) {
    g_Ws.push_back(need_w ? at::zeros_like(w) : at::Tensor());
    Wts.push_back(w.t().contiguous());
  }
  at::Tensor W0ht = W0h.t().contiguous();
  at::Tensor g_W0h = need_w ? at::zeros_like(W0h) : at::Tensor();
  at::Tensor G0 = at::empty({T, B, 2 * H}, opts);  // d(first GEMM's output) of every step
  at::Tensor gS = at::empty({n, B, H}, opts);
  at::Tensor gCH = at::empty({steps, B, 2 * H}, opts);
  at::Tensor g_h = at::zeros({B, H}, opts);  // d h_t from step t + 1
  at::Tensor go = grad_out.contiguous();
  const double inv_concat = 1.0 / static_cast<double>(steps);
  const c10::optional<at::Tensor> none;
  const std::array<bool, 3> mask{true, false, false};
  for (int64_t t = T - 1; t >= 0; --t) {
    at::Tensor St = S[t], Ut = U[t], Ct = C[t], HHt = HH[t], MEANt = MEAN[t], INVSTDt = INVSTD[t];
    at::Tensor g_ht = go[t] + g_h;
    gS.narrow(0, 0, n - steps).zero_();
    gS.narrow(0, n - steps, steps).copy_((g_ht * inv_concat).unsqueeze(0).expand({steps, B, H}));
    int64_t off = E;
    for (int64_t i = steps - 1; i >= 0; --i) {
      const int64_t J = i + 1;
      off -= J;
      at::Tensor st = St.narrow(0, 0, J), c = Ct.narrow(0, off, J), hh = HHt.narrow(0, off, J);
      at::Tensor gch = gCH.narrow(0, 0, J);
      at::Tensor gSJ = gS.narrow(0, 0, J);
      at::Tensor g_u = std::get<0>(at::native_batch_norm_backward(gS[J], Ut[J], none, none, none, MEANt[J],
                                                                   INVSTDt[J], true, eps, mask));
      auto d = mix_backward(g_u, st, c, hh, probs.narrow(0, off, J));
      g_probs.narrow(0, off, J).add_(std::get<3>(d));
      at::Tensor gc = gch.narrow(2, 0, H);
      at::sigmoid_backward_out(gc, std::get<1>(d), c);
      gch.narrow(2, H, H).copy_(std::get<2>(d));
      gSJ.add_(std::get<0>(d));
      at::Tensor g2 = gch.view({J * B, 2 * H});
      if (need_w) g_Ws[i].addmm_((st * h_mask).view({J * B, H}).t(), g2);
      at::Tensor gM = at::mm(g2, Wts[i]).view({J, B, H});
      gSJ.addcmul_(gM, h_mask);
    }
    // s_0 = BN(h + c0 (h0 - h)), [c0 | h0] = [x m_x | h m_h] @ W0 through sigmoid / tanh
    at::Tensor g_u0 = std::get<0>(at::native_batch_norm_backward(gS[0], Ut[0], none, none, none, MEANt[0],
                                                                  INVSTDt[0], true, eps, mask));
    at::Tensor c0 = C0[t], hh0 = H0[t], hp = HPREV[t], g0 = G0[t];
    at::Tensor g0c = g0.narrow(1, 0, H), g0h = g0.narrow(1, H, H);
    at::sigmoid_backward_out(g0c, g_u0 * (hh0 - hp), c0);
    at::tanh_backward_out(g0h, g_u0 * c0, hh0);
    if (need_w) g_W0h.addmm_((hp * h_mask).t(), g0);
    g_h = g_u0 - g_u0 * c0;
    g_h.addcmul_(at::mm(g0, W0ht), h_mask);
  }
  at::Tensor G = G0.view({T * B, 2 * H});
  at::Tensor g_W0 = need_w ? at::cat({at::mm(xm.view({T * B, I}).t(), G), g_W0h}, 0) : at::Tensor();
  at::Tensor g_xs = at::mm(G, W0x.t()).view({T, B, I}) * x_mask;
  std::vector<at::Tensor> result{g_xs, g_h, g_probs, g_W0};
  result.insert(result.end(), g_Ws.begin(), g_Ws.end());
  return result;
}

}  // namespace rnn_cell
}  // namespace pynas
