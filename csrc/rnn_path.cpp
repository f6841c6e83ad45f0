// The DARTS RNN evaluation cell of one genotype over a whole sequence: forward and backward as two C++ calls.
//
// Device-generic: the GEMMs go through ATen (MKL/oneDNN on the CPU, cuBLAS on a GPU), the highway step of each
// node through pynas's rnn_path step kernels (C++ or CUDA). What this removes is the module path's ~10 autograd
// nodes per node and time step: the loops run here, below autograd, and the Python side
// (pynas/ops/rnn_path.py) sees one autograd node per sequence. Math: csrc/include/pynas/rnn_path.h.
//
// The genotype is an argument (preds, acts, concat), not compiled in: ENAS and RSWS swap it per batch.
// Layout of the saved tensors: node-major, S (n, T, B, H) and CH (n, T, B, 2H), so that after the backward's
// reverse walk the weight gradient of each node is ONE GEMM over all T * B rows (steps + 2 GEMMs per sequence
// instead of T (steps + 1)); the input half of the first GEMM, its weight gradient and the inputs' gradient
// are likewise computed for all steps at once.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <vector>

#include "pynas/rnn_path.h"

namespace pynas {
namespace rnn_path {
namespace {

void step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act, const at::Tensor& h_mask,
                  const at::Tensor& s, const at::Tensor& m) {
#ifdef PYNAS_WITH_CUDA
  if (prev.is_cuda()) return pynas::cuda::rnn_path_step_forward(ch, prev, act, h_mask, s, m);
#endif
  pynas::cpu::rnn_path_step_forward(ch, prev, act, h_mask, s, m);
}

void step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                   const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate) {
#ifdef PYNAS_WITH_CUDA
  if (prev.is_cuda()) return pynas::cuda::rnn_path_step_backward(g, ch, prev, act, gch, g_prev, accumulate);
#endif
  pynas::cpu::rnn_path_step_backward(g, ch, prev, act, gch, g_prev, accumulate);
}

// [a, a + len) when concat is that ascending range (the genotypes DARTS derives), else -1.
int64_t range_start(const std::vector<int64_t>& concat) {
  for (size_t k = 1; k < concat.size(); ++k) {
    if (concat[k] != concat[0] + static_cast<int64_t>(k)) return -1;
  }
  return concat[0];
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                const at::Tensor& h_mask, const at::Tensor& W0, at::TensorList Ws,
                                const std::vector<int64_t>& preds, const std::vector<int64_t>& acts,
                                const std::vector<int64_t>& concat, bool save) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = xs.size(0), B = xs.size(1), I = xs.size(2), H = h0.size(1);
  const int64_t steps = static_cast<int64_t>(Ws.size()), n = steps + 1;
  const bool masked = h_mask.defined();
  auto opts = xs.options();
  const at::Tensor W0x = W0.narrow(0, 0, I), W0h = W0.narrow(0, I, H);
  const at::Tensor hm = masked ? h_mask.contiguous() : at::Tensor();
  const at::Tensor xm = x_mask.defined() ? xs * x_mask : xs;
  const at::Tensor XW = at::mm(xm.reshape({T * B, I}), W0x).view({T, B, 2 * H});  // input half, all steps
  const int64_t Ts = save ? T : 1;  // without save, one step's worth of states, reused
  at::Tensor S = at::empty({n, Ts, B, H}, opts), CH = at::empty({n, Ts, B, 2 * H}, opts);
  at::Tensor M = masked ? at::empty({n, B, H}, opts) : at::Tensor();  // s_k m_h of this step, the GEMMs' input
  at::Tensor hp = masked ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor out = at::empty({T, B, H}, opts);
  const int64_t start = range_start(concat);
  const at::Tensor idx = start < 0 ? at::tensor(concat, opts.dtype(at::kLong)) : at::Tensor();
  const at::Tensor none;
  at::Tensor h = h0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ts = save ? t : 0;
    at::Tensor ch0 = CH[0][ts];
    if (masked) at::mul_out(hp, h, hm);
    at::addmm_out(ch0, XW[t], masked ? hp : h, W0h);
    step_forward(ch0, h, kTanh, hm, S[0][ts], masked ? M[0] : none);
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t j = preds[i];
      at::Tensor ch = CH[i + 1][ts];
      at::mm_out(ch, masked ? M[j] : S[j][ts], Ws[i]);
      step_forward(ch, S[j][ts], acts[i], hm, S[i + 1][ts], masked ? M[i + 1] : none);
    }
    at::Tensor ot = out[t];
    const at::Tensor St = S.select(1, ts);
    at::mean_out(ot, start >= 0 ? St.narrow(0, start, static_cast<int64_t>(concat.size())) : St.index_select(0, idx),
                 {0});
    h = ot;
  }
  if (!save) return {out};
  return {out, xm, S, CH};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& h0, const at::Tensor& hiddens,
                                 const at::Tensor& x_mask, const at::Tensor& h_mask, const at::Tensor& W0,
                                 at::TensorList Ws, const std::vector<int64_t>& preds,
                                 const std::vector<int64_t>& acts, const std::vector<int64_t>& concat,
                                 const at::Tensor& xm, const at::Tensor& S, const at::Tensor& CH) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = S.size(0), T = S.size(1), B = S.size(2), H = S.size(3), I = xm.size(2);
  const int64_t steps = static_cast<int64_t>(Ws.size());
  const bool masked = h_mask.defined();
  auto opts = S.options();
  const at::Tensor W0x = W0.narrow(0, 0, I), W0h = W0.narrow(0, I, H);
  const at::Tensor hm = masked ? h_mask.contiguous() : at::Tensor();
  std::vector<at::Tensor> Wts;  // transposed once, contiguous, for the d(masked state) GEMMs of every step
  for (const auto& w : Ws) Wts.push_back(w.t().contiguous());
  const at::Tensor W0ht = W0h.t().contiguous();
  at::Tensor GCH = at::empty({n, T, B, 2 * H}, opts);  // d CH, node-major as CH
  at::Tensor gS = at::empty({n, B, H}, opts);          // d s_k of the step being walked
  at::Tensor g_h = at::zeros({B, H}, opts);            // d h_t from step t + 1
  const at::Tensor go = grad_out.contiguous();
  const double inv_concat = 1.0 / static_cast<double>(concat.size());
  for (int64_t t = T - 1; t >= 0; --t) {
    const at::Tensor g_ht = go[t] + g_h;
    gS.zero_();
    for (const int64_t k : concat) gS[k].add_(g_ht, inv_concat);  // a repeated index counts twice, as in the mean
    for (int64_t i = steps - 1; i >= 0; --i) {
      const int64_t j = preds[i];
      at::Tensor gch = GCH[i + 1][t];
      at::Tensor gj = gS[j];
      step_backward(gS[i + 1], CH[i + 1][t], S[j][t], acts[i], gch, gj, true);
      const at::Tensor gm = at::mm(gch, Wts[i]);
      if (masked) {
        gj.addcmul_(gm, hm);
      } else {
        gj.add_(gm);
      }
    }
    // s_0 = h + sigmoid(c_0) (tanh(g_0) - h), [c_0 | g_0] = [x m_x | h m_h] @ W0
    const at::Tensor hprev = t > 0 ? hiddens[t - 1] : h0;
    at::Tensor g0 = GCH[0][t];
    step_backward(gS[0], CH[0][t], hprev, kTanh, g0, g_h, false);
    const at::Tensor gm = at::mm(g0, W0ht);
    if (masked) {
      g_h.addcmul_(gm, hm);
    } else {
      g_h.add_(gm);
    }
  }
  // the weight gradients, one GEMM each over all T * B rows
  const at::Tensor G0 = GCH[0].view({T * B, 2 * H});
  at::Tensor HP = at::cat({h0.unsqueeze(0), hiddens.narrow(0, 0, T - 1)}, 0);  // h_{t-1} of every step
  if (masked) HP.mul_(hm);
  const at::Tensor g_W0 = at::cat({at::mm(xm.reshape({T * B, I}).t(), G0), at::mm(HP.view({T * B, H}).t(), G0)}, 0);
  at::Tensor g_xs = at::mm(G0, W0x.t()).view({T, B, I});
  if (x_mask.defined()) g_xs.mul_(x_mask);
  std::vector<at::Tensor> result{g_xs, g_h, g_W0};
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor Sj = S[preds[i]];  // (T, B, H), contiguous
    const at::Tensor Mj = masked ? Sj * hm : Sj;
    result.push_back(at::mm(Mj.reshape({T * B, H}).t(), GCH[i + 1].view({T * B, 2 * H})));
  }
  return result;
}

}  // namespace rnn_path
}  // namespace pynas
