// The CPU sequence of the RNN search cell (float32 / float64; math in csrc/rnn_cell.cpp's header comment).
//
// Why not ATen per op: at batch 16 and H = 64 a node's GEMM is 16-128 rows x 64 x 128 (0.3-2 MFLOP), and 35
// steps x 9 GEMMs (and as many BatchNorms, sigmoids, mixes) per pass made ~600 library calls, each a fork and
// join of the thread pool that the small matrices do not pay for (two threads ran them slower than one).
// Here ONE parallel region runs the whole sequence: thread k owns a fixed range of features (columns) and
// computes, for them, its columns of every GEMM and everything per feature after it (sigmoid, mix, BatchNorm
// over the batch, the running statistics, the mean of the states). A barrier follows each new state, as the
// next GEMM reads all of its features: 9 barriers a step forward and backward, no other synchronisation.
// The GEMMs are this file's own (rnn_cell_loops.h, every sum in k order), so results do not depend on the
// thread count; d probs is summed per fixed block of kBlock features and the blocks added in order.
// The weight gradients are not formed per step: the backward keeps every step's d(GEMM outputs) and makes
// each weight's gradient one large ATen GEMM over all steps after the loop.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cnn_edge.h"  // isa_is_avx2
#include "pynas/rnn_cell.h"
#include "pynas/rnn_mix.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pynas {
namespace cpu {
namespace {
using rnn_mix::kFuncs;
constexpr int64_t kBlock = 32;  // features per block (a thread owns whole blocks)
}  // namespace

namespace rnn_cell_isa_base {
#include "rnn_mix_loops.h"
#include "rnn_cell_loops.h"
}  // namespace rnn_cell_isa_base
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnn_cell_isa_avx2 {
#include "rnn_mix_loops.h"
#include "rnn_cell_loops.h"
}  // namespace rnn_cell_isa_avx2
#pragma GCC pop_options
#define PYNAS_RNN_CELL_AVX2 1
#endif

namespace {

// Training BatchNorm (no affine) of u (B x H) on columns [f0, f1) into s, the batch mean and inverse std, and
// the running statistics updated as torch does (unbiased variance in running_var). Sums in double (m, v:
// f1 - f0 scratch values).
template <typename T>
void bn_forward(const T* u, int64_t B, int64_t H, int64_t f0, int64_t f1, double momentum, double eps, T* s,
                T* mean, T* invstd, T* running_mean, T* running_var, double* m, double* v) {
  const int64_t w = f1 - f0;
  for (int64_t k = 0; k < w; ++k) m[k] = v[k] = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < w; ++k) m[k] += static_cast<double>(u[b * H + f0 + k]);
  for (int64_t k = 0; k < w; ++k) m[k] /= static_cast<double>(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < w; ++k) {
      const double d = static_cast<double>(u[b * H + f0 + k]) - m[k];
      v[k] += d * d;
    }
  for (int64_t k = 0; k < w; ++k) {
    const int64_t f = f0 + k;
    const double var = v[k] / static_cast<double>(B);
    const double is = 1.0 / std::sqrt(var + eps);
    mean[f] = static_cast<T>(m[k]);
    invstd[f] = static_cast<T>(is);
    v[k] = is;
    running_mean[f] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_mean[f]) + momentum * m[k]);
    running_var[f] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_var[f]) +
                                    momentum * var * static_cast<double>(B) / static_cast<double>(B - 1));
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < w; ++k)
      s[b * H + f0 + k] = static_cast<T>((static_cast<double>(u[b * H + f0 + k]) - m[k]) * v[k]);
}

// d u (gu, B x H) of that BatchNorm on columns [f0, f1) from d s (g) and its output x_hat:
// invstd (g - mean(g) - x_hat mean(g x_hat)).
template <typename T>
void bn_backward(const T* g, const T* xhat, const T* invstd, int64_t B, int64_t H, int64_t f0, int64_t f1, T* gu,
                 double* sg, double* sgx) {
  const int64_t w = f1 - f0;
  for (int64_t k = 0; k < w; ++k) sg[k] = sgx[k] = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < w; ++k) {
      const int64_t i = b * H + f0 + k;
      sg[k] += static_cast<double>(g[i]);
      sgx[k] += static_cast<double>(g[i]) * static_cast<double>(xhat[i]);
    }
  for (int64_t k = 0; k < w; ++k) {
    sg[k] /= static_cast<double>(B);
    sgx[k] /= static_cast<double>(B);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < w; ++k) {
      const int64_t i = b * H + f0 + k;
      gu[i] = static_cast<T>(static_cast<double>(invstd[f0 + k]) *
                             (static_cast<double>(g[i]) - sg[k] - static_cast<double>(xhat[i]) * sgx[k]));
    }
}

// out[b, f] = a[b, f] * mask[b, f] (or += with add) on columns [f0, f1) of B x H planes.
template <typename T>
void masked_cols(const T* a, const T* mask, int64_t B, int64_t H, int64_t f0, int64_t f1, T* out, bool add) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t i = b * H + f;
      out[i] = add ? out[i] + a[i] * mask[i] : a[i] * mask[i];
    }
}

// Calls body(thread, team) on a team of up to `threads` threads (one where OpenMP is off). The body must not
// throw: it runs plain loops on memory allocated before.
template <typename F>
void in_team(int64_t threads, const F& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    body(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
    return;
  }
#endif
  body(0, 1);
}

inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Thread k's features: whole blocks of kBlock, the blocks split evenly.
struct Cols {
  int64_t f0, f1;
};
Cols cols_of(int64_t thread, int64_t team, int64_t H) {
  const int64_t nb = (H + kBlock - 1) / kBlock;
  const int64_t b0 = thread * nb / team, b1 = (thread + 1) * nb / team;
  return {std::min(H, b0 * kBlock), std::min(H, b1 * kBlock)};
}

int64_t team_size(int64_t H) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + kBlock - 1) / kBlock));
}

template <typename T>
std::vector<const T*> data_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.const_data_ptr<T>());
  return out;
}

template <typename T>
std::vector<T> table(const at::Tensor& probs) {
  const at::Tensor p = probs.contiguous();
  return std::vector<T>(p.const_data_ptr<T>(), p.const_data_ptr<T>() + p.numel());
}

template <class L, class Gemm, class First, class Node>
void forward_loop(const Gemm& gemm, const First& first_node, const Node& node, int64_t T, int64_t B, int64_t H,
                  int64_t steps, const typename L::T* XW, const typename L::T* h0, const typename L::T* hm,
                  const typename L::T* p, const typename L::T* W0h, const std::vector<const typename L::T*>& Ws,
                  double momentum, double eps, typename L::T* S, typename L::T* U, typename L::T* MEAN,
                  typename L::T* INVSTD, typename L::T* C, typename L::T* HH, typename L::T* C0,
                  typename L::T* H0, typename L::T* HPREV, typename L::T* out, typename L::T* rm,
                  typename L::T* rv) {
  using R = typename L::T;
  const int64_t n = steps + 1, E = steps * (steps + 1) / 2, BH = B * H, team = team_size(H);
  std::vector<R> CH(static_cast<size_t>(steps * B * 2 * H)), SM(static_cast<size_t>(n * BH)),
      HM(static_cast<size_t>(BH));
  std::vector<double> scratch(static_cast<size_t>(team * 2 * H));
  in_team(team, [&](int64_t tid, int64_t nth) {
    const Cols k = cols_of(tid, nth, H);
    const int64_t f0 = k.f0, f1 = k.f1, w = f1 - f0;
    double* m = scratch.data() + tid * 2 * H;
    double* v = m + H;
    R* ch = CH.data();
    R* sm = SM.data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = f0; f < f1; ++f) HPREV[b * H + f] = h0[b * H + f];
    masked_cols<R>(h0, hm, B, H, f0, f1, HM.data(), false);
    team_barrier();
    for (int64_t t = 0; t < T; ++t) {
      R* St = S + t * n * BH;
      R* Ut = U + t * n * BH;
      R* Mt = MEAN + t * n * H;
      R* It = INVSTD + t * n * H;
      const R* hp = HPREV + t * BH;
      if (w > 0) {  // [c0 | h0] columns of (h m_h) @ W0h, then the first node
        gemm(HM.data(), H, W0h + f0, 2 * H, ch + f0, 2 * H, B, w, H);
        gemm(HM.data(), H, W0h + H + f0, 2 * H, ch + H + f0, 2 * H, B, w, H);
        first_node(ch, XW + t * B * 2 * H, hp, B, H, f0, f1, C0 + t * BH, H0 + t * BH, Ut);
        bn_forward<R>(Ut, B, H, f0, f1, momentum, eps, St, Mt, It, rm, rv, m, v);
        masked_cols<R>(St, hm, B, H, f0, f1, sm, false);
      }
      team_barrier();
      int64_t off = 0;
      for (int64_t i = 0; i < steps; ++i) {
        const int64_t J = i + 1;
        if (w > 0) {
          gemm(sm, H, Ws[i] + f0, 2 * H, ch + f0, 2 * H, J * B, w, H);
          gemm(sm, H, Ws[i] + H + f0, 2 * H, ch + H + f0, 2 * H, J * B, w, H);
          R* u = Ut + J * BH;
          node(ch, St, p + off * kFuncs, J, B, H, f0, f1, C + (t * E + off) * BH, HH + (t * E + off) * BH, u);
          bn_forward<R>(u, B, H, f0, f1, momentum, eps, St + J * BH, Mt + J * H, It + J * H, rm, rv, m, v);
          if (J < steps) masked_cols<R>(St + J * BH, hm, B, H, f0, f1, sm + J * BH, false);
        }
        off += J;
        if (J < steps) team_barrier();
      }
      // h_t = mean(s_1 .. s_steps), the next step's h
      R* ot = out + t * BH;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t f = f0; f < f1; ++f) {
          R acc = 0;
          for (int64_t j = 1; j < n; ++j) acc += St[j * BH + b * H + f];
          ot[b * H + f] = acc / static_cast<R>(steps);
        }
      if (t + 1 < T) {
        for (int64_t b = 0; b < B; ++b)
          for (int64_t f = f0; f < f1; ++f) HPREV[(t + 1) * BH + b * H + f] = ot[b * H + f];
        masked_cols<R>(ot, hm, B, H, f0, f1, HM.data(), false);
      }
      team_barrier();
    }
  });
}

template <class L, class Gemm, class NodeB, class FirstB>
void backward_loop(const Gemm& gemm, const NodeB& node_b, const FirstB& first_b, int64_t T, int64_t B, int64_t H,
                   int64_t steps, bool keep_steps, const typename L::T* go, const typename L::T* hm,
                   const typename L::T* p, const std::vector<const typename L::T*>& Wts, const typename L::T* W0ht,
                   const typename L::T* S, const typename L::T* INVSTD, const typename L::T* C,
                   const typename L::T* HH, const typename L::T* C0, const typename L::T* H0,
                   const typename L::T* HPREV, typename L::T* GCH, typename L::T* G0, typename L::T* GH,
                   typename L::T* DP) {
  using R = typename L::T;
  const int64_t n = steps + 1, E = steps * (steps + 1) / 2, BH = B * H, team = team_size(H);
  const int64_t nblocks = (H + kBlock - 1) / kBlock;
  const int64_t gstride = (keep_steps ? T : 1) * B * 2 * H;  // GCH: (E, T or 1, B, 2H)
  std::vector<R> GS(static_cast<size_t>(n * BH)), GU(static_cast<size_t>(BH)), GM(static_cast<size_t>(steps * BH));
  std::vector<double> scratch(static_cast<size_t>(team * 2 * H));
  const R inv_concat = static_cast<R>(1.0 / static_cast<double>(steps));
  in_team(team, [&](int64_t tid, int64_t nth) {
    const Cols k = cols_of(tid, nth, H);
    const int64_t f0 = k.f0, f1 = k.f1, w = f1 - f0;
    double* m = scratch.data() + tid * 2 * H;
    double* v = m + H;
    R* gS = GS.data();
    R* gu = GU.data();  // columns [f0, f1) only: each thread its own
    R* gm = GM.data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = f0; f < f1; ++f) GH[b * H + f] = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const R* St = S + t * n * BH;
      const R* It = INVSTD + t * n * H;
      R* gch_t = GCH + (keep_steps ? t : 0) * B * 2 * H;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t f = f0; f < f1; ++f) {
          const int64_t i = b * H + f;
          const R g = (go[t * BH + i] + GH[i]) * inv_concat;
          gS[i] = 0;
          for (int64_t j = 1; j < n; ++j) gS[j * BH + i] = g;
        }
      int64_t off = E;
      for (int64_t i = steps - 1; i >= 0; --i) {
        const int64_t J = i + 1;
        off -= J;
        if (w > 0) {
          bn_backward<R>(gS + J * BH, St + J * BH, It + J * H, B, H, f0, f1, gu, m, v);
          node_b(gu, St, C + (t * E + off) * BH, HH + (t * E + off) * BH, p + off * kFuncs, J, B, H, f0, f1, kBlock,
                 nblocks, gS, gch_t + off * gstride, gstride, DP + (t * E + off) * nblocks * 4);
        }
        team_barrier();
        if (w > 0) {  // d(masked states) = gch @ W_i^T on columns [f0, f1), through h_mask into gS
          for (int64_t j = 0; j < J; ++j)
            gemm(gch_t + (off + j) * gstride, 2 * H, Wts[i] + f0, H, gm + j * BH + f0, H, B, w, 2 * H);
          for (int64_t j = 0; j < J; ++j) masked_cols<R>(gm + j * BH, hm, B, H, f0, f1, gS + j * BH, true);
        }
      }
      R* g0 = G0 + t * B * 2 * H;
      if (w > 0) {
        bn_backward<R>(gS, St, It, B, H, f0, f1, gu, m, v);
        first_b(gu, C0 + t * BH, H0 + t * BH, HPREV + t * BH, B, H, f0, f1, g0, GH);
      }
      team_barrier();
      if (w > 0) {
        gemm(g0, 2 * H, W0ht + f0, H, gm + f0, H, B, w, 2 * H);
        masked_cols<R>(gm, hm, B, H, f0, f1, GH, true);
      }
      // no barrier: the next step reads GH and gS on this thread's columns only, and its GEMMs read gch and
      // g0 planes the other threads have finished before the barrier above
    }
  });
}

// Either ISA's loops for lane policy L (float: AVX2 or the baseline; double: scalar).
template <typename R>
struct Loops;

template <>
struct Loops<float> {
#ifdef PYNAS_RNN_CELL_AVX2
  static bool avx2() { return isa_is_avx2(); }
#define PYNAS_RNN_CELL_CALL(fn, ...) \
  (avx2() ? rnn_cell_isa_avx2::fn<rnn_cell_isa_avx2::FloatLanes>(__VA_ARGS__) \
          : rnn_cell_isa_base::fn<rnn_cell_isa_base::FloatLanes>(__VA_ARGS__))
#else
#define PYNAS_RNN_CELL_CALL(fn, ...) rnn_cell_isa_base::fn<rnn_cell_isa_base::FloatLanes>(__VA_ARGS__)
#endif
  template <typename... A>
  static void gemm(A... a) { PYNAS_RNN_CELL_CALL(gemm_nn, a...); }
  template <typename... A>
  static void first_node(A... a) { PYNAS_RNN_CELL_CALL(first_node_forward, a...); }
  template <typename... A>
  static void node(A... a) { PYNAS_RNN_CELL_CALL(node_forward, a...); }
  template <typename... A>
  static void node_b(A... a) { PYNAS_RNN_CELL_CALL(node_backward, a...); }
  template <typename... A>
  static void first_b(A... a) { PYNAS_RNN_CELL_CALL(first_node_backward, a...); }
#undef PYNAS_RNN_CELL_CALL
  using L = rnn_cell_isa_base::FloatLanes;
};

template <>
struct Loops<double> {
  using L = rnn_cell_isa_base::ScalarLanes<double>;
  template <typename... A>
  static void gemm(A... a) { rnn_cell_isa_base::gemm_nn<L>(a...); }
  template <typename... A>
  static void first_node(A... a) { rnn_cell_isa_base::first_node_forward<L>(a...); }
  template <typename... A>
  static void node(A... a) { rnn_cell_isa_base::node_forward<L>(a...); }
  template <typename... A>
  static void node_b(A... a) { rnn_cell_isa_base::node_backward<L>(a...); }
  template <typename... A>
  static void first_b(A... a) { rnn_cell_isa_base::first_node_backward<L>(a...); }
};

}  // namespace

bool rnn_cell_supported(const at::Tensor& xs, const at::Tensor& probs, const at::Tensor& running_mean,
                        const at::Tensor& running_var) {
  const auto t = xs.scalar_type();
  return xs.is_cpu() && (t == at::kFloat || t == at::kDouble) && probs.scalar_type() == t &&
         running_mean.scalar_type() == t && running_var.scalar_type() == t;
}

std::vector<at::Tensor> rnn_cell_forward(const at::Tensor& xs_in, const at::Tensor& h0_in,
                                         const at::Tensor& x_mask, const at::Tensor& h_mask_in,
                                         const at::Tensor& probs, at::Tensor& running_mean, at::Tensor& running_var,
                                         const at::Tensor& W0_in, at::TensorList Ws_in, double momentum,
                                         double eps) {
  const at::Tensor xs = xs_in.contiguous(), h0 = h0_in.contiguous(), hm = h_mask_in.contiguous(),
                   W0 = W0_in.contiguous();
  std::vector<at::Tensor> Ws;
  for (const auto& w : Ws_in) Ws.push_back(w.contiguous());
  const int64_t T = xs.size(0), B = xs.size(1), I = xs.size(2), H = h0.size(1);
  const int64_t steps = static_cast<int64_t>(Ws.size()), n = steps + 1, E = steps * (steps + 1) / 2;
  auto opts = xs.options();
  at::Tensor xm = at::mul(xs, x_mask);
  at::Tensor XW = at::mm(xm.view({T * B, I}), W0.narrow(0, 0, I)).contiguous();  // input half, every step
  at::Tensor S = at::empty({T, n, B, H}, opts), U = at::empty({T, n, B, H}, opts);
  at::Tensor MEAN = at::empty({T, n, H}, opts), INVSTD = at::empty({T, n, H}, opts);
  at::Tensor C = at::empty({T, E, B, H}, opts), HH = at::empty({T, E, B, H}, opts);
  at::Tensor C0 = at::empty({T, B, H}, opts), H0 = at::empty({T, B, H}, opts), HPREV = at::empty({T, B, H}, opts);
  at::Tensor out = at::empty({T, B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "rnn_cell_forward_cpu", [&] {
    using R = scalar_t;
    using K = Loops<R>;
    const std::vector<R> p = table<R>(probs);
    const std::vector<const R*> wp = data_ptrs<R>(Ws);
    forward_loop<typename K::L>(
        [](auto... a) { K::gemm(a...); }, [](auto... a) { K::first_node(a...); }, [](auto... a) { K::node(a...); },
        T, B, H, steps, XW.const_data_ptr<R>(), h0.const_data_ptr<R>(), hm.const_data_ptr<R>(), p.data(),
        W0.const_data_ptr<R>() + I * 2 * H, wp, momentum, eps, S.mutable_data_ptr<R>(), U.mutable_data_ptr<R>(),
        MEAN.mutable_data_ptr<R>(), INVSTD.mutable_data_ptr<R>(), C.mutable_data_ptr<R>(), HH.mutable_data_ptr<R>(),
        C0.mutable_data_ptr<R>(), H0.mutable_data_ptr<R>(), HPREV.mutable_data_ptr<R>(), out.mutable_data_ptr<R>(),
        running_mean.mutable_data_ptr<R>(), running_var.mutable_data_ptr<R>());
  });
  return {out, xm, S, U, MEAN, INVSTD, C, HH, C0, H0, HPREV};
}

std::vector<at::Tensor> rnn_cell_backward(const at::Tensor& grad_out, const at::Tensor& x_mask,
                                          const at::Tensor& h_mask_in, const at::Tensor& probs,
                                          const at::Tensor& W0_in, at::TensorList Ws, const at::Tensor& xm,
                                          const at::Tensor& S_in, const at::Tensor& INVSTD_in, const at::Tensor& C_in,
                                          const at::Tensor& HH_in, const at::Tensor& C0_in, const at::Tensor& H0_in,
                                          const at::Tensor& HPREV_in, bool need_w) {
  const at::Tensor go = grad_out.contiguous(), hm = h_mask_in.contiguous(), W0 = W0_in.contiguous();
  const at::Tensor S = S_in.contiguous(), INVSTD = INVSTD_in.contiguous(), C = C_in.contiguous(),
                   HH = HH_in.contiguous(), C0 = C0_in.contiguous(), H0 = H0_in.contiguous(),
                   HPREV = HPREV_in.contiguous();
  const int64_t T = S.size(0), B = S.size(2), H = S.size(3), I = xm.size(2);
  const int64_t steps = static_cast<int64_t>(Ws.size()), E = steps * (steps + 1) / 2;
  const int64_t nblocks = (H + kBlock - 1) / kBlock;
  auto opts = S.options();
  std::vector<at::Tensor> Wts;  // the node weights transposed, contiguous: the d(masked states) GEMMs' B
  for (const auto& w : Ws) Wts.push_back(w.t().contiguous());
  at::Tensor W0x = W0.narrow(0, 0, I), W0ht = W0.narrow(0, I, H).t().contiguous();
  at::Tensor GCH = at::empty({E, need_w ? T : 1, B, 2 * H}, opts);  // d(node GEMM outputs), kept for d Ws
  at::Tensor G0 = at::empty({T, B, 2 * H}, opts);                     // d(first GEMM outputs) of every step
  at::Tensor GH = at::empty({B, H}, opts);                            // d h of the step before
  at::Tensor DP = at::empty({T, E, nblocks, 4}, opts);                // d probs per step, edge and block
  at::Tensor g_probs = at::zeros({E, kFuncs}, probs.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "rnn_cell_backward_cpu", [&] {
    using R = scalar_t;
    using K = Loops<R>;
    const std::vector<R> p = table<R>(probs);
    const std::vector<const R*> wp = data_ptrs<R>(Wts);
    backward_loop<typename K::L>(
        [](auto... a) { K::gemm(a...); }, [](auto... a) { K::node_b(a...); }, [](auto... a) { K::first_b(a...); },
        T, B, H, steps, need_w, go.const_data_ptr<R>(), hm.const_data_ptr<R>(), p.data(), wp,
        W0ht.const_data_ptr<R>(), S.const_data_ptr<R>(), INVSTD.const_data_ptr<R>(), C.const_data_ptr<R>(),
        HH.const_data_ptr<R>(), C0.const_data_ptr<R>(), H0.const_data_ptr<R>(), HPREV.const_data_ptr<R>(),
        GCH.mutable_data_ptr<R>(), G0.mutable_data_ptr<R>(), GH.mutable_data_ptr<R>(), DP.mutable_data_ptr<R>());
    // d probs: per step (last first, as the loop ran) the blocks added in order in double
    const R* dp = DP.const_data_ptr<R>();
    R* gp = g_probs.mutable_data_ptr<R>();
    for (int64_t t = T - 1; t >= 0; --t)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t f = 0; f < 4; ++f) {
          double s = 0;
          for (int64_t b = 0; b < nblocks; ++b) s += static_cast<double>(dp[((t * E + e) * nblocks + b) * 4 + f]);
          gp[e * kFuncs + f + 1] += static_cast<R>(s);
        }
  });
  at::Tensor G = G0.view({T * B, 2 * H});
  at::Tensor g_xs = at::mul(at::mm(G, W0x.t()).view({T, B, I}), x_mask);
  std::vector<at::Tensor> result{g_xs, GH, g_probs, at::Tensor()};
  if (need_w) {  // every weight's gradient as one GEMM over all steps: rows (j, t, b)
    at::Tensor SM = at::mul(S, hm).transpose(0, 1).contiguous();  // (n, T, B, H): the masked states
    at::Tensor HPM = at::mul(HPREV, hm).view({T * B, H});
    result[3] = at::cat({at::mm(xm.reshape({T * B, I}).t(), G), at::mm(HPM.t(), G)}, 0);
    int64_t off = 0;
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t J = i + 1;
      result.push_back(at::mm(SM.narrow(0, 0, J).reshape({J * T * B, H}).t(),
                              GCH.narrow(0, off, J).view({J * T * B, 2 * H})));
      off += J;
    }
  } else {
    for (int64_t i = 0; i < steps; ++i) result.push_back(at::Tensor());
  }
  return result;
}

}  // namespace cpu
}  // namespace pynas
