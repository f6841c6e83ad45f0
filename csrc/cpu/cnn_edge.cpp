// CPU kernels of the fused DARTS CNN edge (contracts in csrc/include/pynas/cnn_edge.h).
//
// Work is split by (n, c) plane: at DARTS's sizes a plane (at most 32x32 here) and its padded copy stay
// in L1. The per-plane loops live in cnn_edge_planes.h, compiled twice: for the baseline x86-64 ISA and
// for AVX2+FMA, picked at run time (`PYNAS_CPU_ISA=base` forces the baseline, for tests and
// comparisons). Sums over the batch are made per plane and added in plane order (in double), never per
// thread, so results do not depend on the thread count.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cnn_edge.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// `omp simd` as a _Pragma, which (unlike #pragma) may stand inside macros and lambdas of AT_DISPATCH.
#ifdef _OPENMP
#define PYNAS_SIMD _Pragma("omp simd")
#else
#define PYNAS_SIMD
#endif

namespace pynas {
namespace cpu {
namespace {

using edge::kPreNone;
using edge::kPreNormRelu;
using edge::kPreRelu;
using edge::out_size;

struct ConvGeom {
  int64_t k, stride, pad, dil, ho, wo;
};

// The stride-2 layout of a padded plane (cnn_edge_planes.h, split_phases): its four phases (row parity x
// column parity), each hq rows of wq, one after the other (q_size with slack); the backward's gradient of
// one stride-2 conv widened to rows of wq after q_margin zeros (q_ext in all). All zero when no conv has
// stride 2.
struct DwPhases {
  int64_t hq, wq, q_size, q_margin, q_ext;
};

// The largest depthwise kernel side the CPU kernels take (checked by the bindings).
constexpr int64_t kMaxKernel = edge::kMaxKernel;

template <typename T>
struct DwArgs {
  const T* x;
  int64_t C, H, W, P, Wp, pre, buf_size, acc_size, n, ext_size, margin;
  DwPhases ph;
  const T* mean;
  const T* rstd;
  const ConvGeom* geoms;
  const T* const* ws;
  T* const* ys;           // forward
  const T* const* gs;     // backward
  T* gx;
  double* partial;
  int64_t taps;
  const int64_t* tap_off;
  double* plane_sums;
};

template <typename T>
struct MixArgs {
  const T* x;
  const T* g;
  int64_t C, H, W, Ho, Wo, HWo, stride, K, J, pool_buf, pool_acc;
  bool has_skip;
  T w_skip;
  const T* inv;
  const T* const* ps;
  T* ymax;  // pool outputs (temporaries), null when the pool is absent
  T* argmax;  // backward: per max-pool output the tap of its first maximum (a temporary of arg_len per plane)
  int64_t arg_len;
  T* yavg;
  double* means;
  double* m2s;
  double* part;
  const T* coef;  // (J, C) forward coefficients, D (C) constant terms
  const T* D;
  T* out;
  const T* A;  // (J, C) backward coefficients
  const T* B;
  const T* Dg;
  T* const* gps;
  T* gx;
};

}  // namespace

namespace isa_base {
#include "cnn_edge_planes.h"
}  // namespace isa_base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYNAS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "cnn_edge_planes.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace {

// -1: not decided yet; 0: baseline; 1: AVX2+FMA.
std::atomic<int> g_isa{-1};

int detect_isa() {
#ifdef PYNAS_HAVE_AVX2
  const char* env = std::getenv("PYNAS_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return 0;
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
  return 0;
#endif
}

bool use_avx2() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = detect_isa();
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

#ifdef PYNAS_HAVE_AVX2
#define PYNAS_ISA_CALL(fn, ...) (use_avx2() ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define PYNAS_ISA_CALL(fn, ...) isa_base::fn(__VA_ARGS__)
#endif

// Units (planes or samples) per parallel task: at least kGrainWork multiply-adds or element visits each,
// so the tiny tensors of small networks run inline instead of paying a parallel region's fork and join.
constexpr int64_t kGrainWork = 1 << 15;
int64_t grain_for(int64_t work_per_unit) { return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_unit)); }

int64_t dw_work(const std::vector<ConvGeom>& geoms) {
  int64_t w = 0;
  for (const auto& g : geoms) w += g.ho * g.wo * g.k * g.k;
  return w;
}

std::vector<ConvGeom> conv_geoms(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                 const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                 const std::vector<int64_t>& dils) {
  std::vector<ConvGeom> g;
  for (size_t m = 0; m < ws.size(); ++m) {
    const int64_t k = ws[m].size(-1);
    g.push_back({k, strides[m], pads[m], dils[m], out_size(x.size(2), k, strides[m], pads[m], dils[m]),
                 out_size(x.size(3), k, strides[m], pads[m], dils[m])});
  }
  return g;
}

// Sizes of the padded input buffer and of the per-conv scratch for a set of convs (see the layout note
// in cnn_edge_planes.h: a stride-1 tap reads ho * Wp elements from its offset).
void dw_sizes(const std::vector<ConvGeom>& geoms, int64_t H, int64_t W, int64_t* P, int64_t* Wp, int64_t* buf,
              int64_t* acc, int64_t* ext = nullptr, int64_t* margin = nullptr) {
  int64_t p = 0;
  for (const auto& g : geoms) p = std::max(p, g.pad);
  *P = p;
  *Wp = W + 2 * p;
  int64_t need = (H + 2 * p) * (*Wp), scratch = 0;
  for (const auto& g : geoms) {
    const int64_t off = p - g.pad, reach = off + (g.k - 1) * g.dil;
    need = std::max(need, reach * (*Wp) + reach + g.ho * (*Wp) + (g.ho - 1) * (g.stride - 1) * (*Wp) + 1);
    scratch = std::max(scratch, g.ho * (*Wp));
  }
  *buf = need;
  *acc = scratch;
  // the backward's zero-margined gradient: a tap's farthest offset before it, up to (P + H) rows after
  int64_t m = 0, tail = (p + H) * (*Wp);
  for (const auto& g : geoms) {
    const int64_t reach = p - g.pad + (g.k - 1) * g.dil;
    m = std::max(m, reach * (*Wp) + reach);
    tail = std::max(tail, g.ho * (*Wp));
  }
  if (ext) *ext = m + tail + 1;
  if (margin) *margin = m;
}

// The phase layout for the stride-2 convs of `geoms` (P, Wp from dw_sizes). A tap at (rr, cc) of the padded
// plane (rr = P - pad + ki dil, likewise cc) reads its phase from row rr / 2, column cc / 2 on, for ho rows
// of wq: wq and hq are large enough that a read past an output row's wo columns stays in the phase's zero
// or garbage columns (never in a real column of the next row: the backward's gather relies on it) and no
// read leaves the buffer. `acc` grows to ho * wq where that is more than the stride-1 scratch.
DwPhases dw_phase_sizes(const std::vector<ConvGeom>& geoms, int64_t H, int64_t P, int64_t Wp, int64_t* acc) {
  DwPhases q{};
  bool any = false;
  int64_t hq = (H + 2 * P + 1) / 2, wq = (Wp + 1) / 2, reach_max = 0;
  for (const auto& g : geoms) {
    if (g.stride != 2) continue;
    any = true;
    const int64_t reach = (P - g.pad + (g.k - 1) * g.dil) / 2;
    reach_max = std::max(reach_max, reach);
    wq = std::max(wq, g.wo + reach);
    hq = std::max(hq, g.ho + reach);
  }
  if (!any) return q;
  q.hq = hq, q.wq = wq;
  q.q_size = 4 * hq * wq + wq;
  q.q_margin = reach_max * wq + reach_max;
  q.q_ext = q.q_margin + hq * wq;
  for (const auto& g : geoms)
    if (g.stride == 2) *acc = std::max(*acc, g.ho * wq);
  return q;
}

// Combines per-plane moments (planes n = 0..N-1 of one channel, `stride` apart) into the biased variance.
void combine_moments(const double* means, const double* m2s, int64_t count, int64_t stride, int64_t per_plane,
                     double* mean, double* var) {
  double mu = 0;
  for (int64_t n = 0; n < count; ++n) mu += means[n * stride];
  mu /= static_cast<double>(count);
  double q = 0;
  for (int64_t n = 0; n < count; ++n) {
    const double d = means[n * stride] - mu;
    q += m2s[n * stride] + static_cast<double>(per_plane) * d * d;
  }
  *mean = mu;
  *var = q / static_cast<double>(count * per_plane);
}

// running <- (1 - momentum) * running + momentum * batch value (unbiased variance), as BatchNorm2d does.
template <typename scalar_t>
void update_running(const at::Tensor& rm, const at::Tensor& rv, int64_t c, double mean, double var, int64_t n,
                    double momentum) {
  if (rm.defined()) {
    scalar_t* p = rm.mutable_data_ptr<scalar_t>() + c;
    *p = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(*p) + momentum * mean);
  }
  if (rv.defined()) {
    scalar_t* p = rv.mutable_data_ptr<scalar_t>() + c;
    const double unbiased = var * static_cast<double>(n) / static_cast<double>(n - 1);
    *p = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(*p) + momentum * unbiased);
  }
}

// Per channel, from per-plane moments (N x C, channel-minor): mean, rstd = 1/sqrt(var + eps), and the
// running statistics updated.
template <typename scalar_t>
void finish_batch_stats(const std::vector<double>& means, const std::vector<double>& m2s, int64_t N, int64_t C,
                        int64_t HW, double eps, double momentum, const at::Tensor& running_mean,
                        const at::Tensor& running_var, scalar_t* mean, scalar_t* rstd) {
  for (int64_t c = 0; c < C; ++c) {
    double mu, var;
    combine_moments(means.data() + c, m2s.data() + c, N, C, HW, &mu, &var);
    mean[c] = static_cast<scalar_t>(mu);
    rstd[c] = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
    update_running<scalar_t>(running_mean, running_var, c, mu, var, N * HW, momentum);
  }
}

// 1/count of each output pixel of the 3x3 avg pool (count_include_pad=False), in rows of length `row`
// (the padded width w + 2 at stride 1, wo at stride 2); zeros past wo.
template <typename T>
std::vector<T> avg_inv_counts(int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo) {
  const int64_t row = s == 1 ? w + 2 : wo;
  std::vector<T> t(static_cast<size_t>(ho * row), T(0));
  for (int64_t oh = 0; oh < ho; ++oh) {
    const int64_t ch = std::min<int64_t>(oh * s + 2, h) - std::max<int64_t>(oh * s - 1, 0);
    for (int64_t ow = 0; ow < wo; ++ow) {
      const int64_t cw = std::min<int64_t>(ow * s + 2, w) - std::max<int64_t>(ow * s - 1, 0);
      t[oh * row + ow] = static_cast<T>(1.0 / static_cast<double>(ch * cw));
    }
  }
  return t;
}

std::vector<double> to_doubles(const at::Tensor& w) {
  const at::Tensor wd = w.to(at::kDouble).contiguous();
  return std::vector<double>(wd.const_data_ptr<double>(), wd.const_data_ptr<double>() + wd.numel());
}

bool term_present(int64_t j, bool has_max, bool has_avg) { return !((j == 0 && !has_max) || (j == 1 && !has_avg)); }

// Position of term j (0 max, 1 avg, 2 + k ps[k]) in w, whose order is max, avg, skip, ps...
int64_t w_index(int64_t j) { return j < 2 ? j : j + 1; }

}  // namespace

std::string isa() { return use_avx2() ? "avx2" : "base"; }

bool isa_is_avx2() { return use_avx2(); }

void set_isa(const std::string& name) {
  if (name == "base") {
    g_isa.store(0);
  } else if (name == "avx2") {
#ifdef PYNAS_HAVE_AVX2
    __builtin_cpu_init();
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                "set_cpu_isa: name: 'avx2' needs a CPU with AVX2 and FMA, this one lacks them");
    g_isa.store(1);
#else
    TORCH_CHECK(false, "set_cpu_isa: name: 'avx2': this build has no AVX2 variant (x86-64 GCC builds have it)");
#endif
  } else if (name == "auto") {
    g_isa.store(detect_isa());
  } else {
    TORCH_CHECK(false, "set_cpu_isa: name: expected 'auto', 'base' or 'avx2', got '", name, "'");
  }
}

// ---- depthwise convs ---------------------------------------------------------------------------------

std::vector<at::Tensor> cnn_edge_dw_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean,
                                        const at::Tensor& rstd) {
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ws;
  for (const auto& w : ws_in) ws.push_back(w.contiguous());
  const auto geoms = conv_geoms(x, ws, strides, pads, dils);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  std::vector<at::Tensor> ys;
  for (const auto& g : geoms) ys.push_back(at::empty({N, C, g.ho, g.wo}, x.options()));
  if (x.numel() == 0) return ys;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnn_edge_dw_forward", [&] {
    DwArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.C = C, a.H = H, a.W = W, a.pre = pre, a.n = static_cast<int64_t>(ws.size());
    dw_sizes(geoms, H, W, &a.P, &a.Wp, &a.buf_size, &a.acc_size);
    a.ph = dw_phase_sizes(geoms, H, a.P, a.Wp, &a.acc_size);
    const at::Tensor mean_c = pre == kPreNormRelu ? mean.contiguous() : at::Tensor();
    const at::Tensor rstd_c = pre == kPreNormRelu ? rstd.contiguous() : at::Tensor();
    a.mean = mean_c.defined() ? mean_c.const_data_ptr<scalar_t>() : nullptr;
    a.rstd = rstd_c.defined() ? rstd_c.const_data_ptr<scalar_t>() : nullptr;
    std::vector<const scalar_t*> wp;
    std::vector<scalar_t*> yp;
    for (size_t m = 0; m < ws.size(); ++m) {
      wp.push_back(ws[m].const_data_ptr<scalar_t>());
      yp.push_back(ys[m].mutable_data_ptr<scalar_t>());
    }
    a.geoms = geoms.data();
    a.ws = wp.data();
    a.ys = yp.data();
    at::parallel_for(0, N * C, grain_for(dw_work(geoms)),
                     [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(dw_forward_range<scalar_t>, b, e, a); });
  });
  return ys;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_dw_backward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in, const std::vector<at::Tensor>& gs_in,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_w) {
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ws, gs;
  for (const auto& w : ws_in) ws.push_back(w.contiguous());
  for (const auto& g : gs_in) gs.push_back(g.contiguous());
  const auto geoms = conv_geoms(x, ws, strides, pads, dils);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor gx = at::empty_like(x);
  std::vector<at::Tensor> gws;
  int64_t taps = 0;  // offsets of each conv's taps in the per-plane partial sums
  std::vector<int64_t> tap_off;
  for (const auto& g : geoms) {
    tap_off.push_back(taps);
    taps += g.k * g.k;
  }
  std::vector<double> partial(need_grad_w ? static_cast<size_t>(N * C * taps) : 0, 0.0);
  const bool want_sums = pre == kPreNormRelu;
  std::vector<double> plane_sums(want_sums ? static_cast<size_t>(N * C * 2) : 0, 0.0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnn_edge_dw_backward", [&] {
    DwArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.C = C, a.H = H, a.W = W, a.pre = pre, a.n = static_cast<int64_t>(ws.size());
    dw_sizes(geoms, H, W, &a.P, &a.Wp, &a.buf_size, &a.acc_size, &a.ext_size, &a.margin);
    a.ph = dw_phase_sizes(geoms, H, a.P, a.Wp, &a.acc_size);
    const at::Tensor mean_c = pre == kPreNormRelu ? mean.contiguous() : at::Tensor();
    const at::Tensor rstd_c = pre == kPreNormRelu ? rstd.contiguous() : at::Tensor();
    a.mean = mean_c.defined() ? mean_c.const_data_ptr<scalar_t>() : nullptr;
    a.rstd = rstd_c.defined() ? rstd_c.const_data_ptr<scalar_t>() : nullptr;
    std::vector<const scalar_t*> wp, gp;
    for (size_t m = 0; m < ws.size(); ++m) {
      wp.push_back(ws[m].const_data_ptr<scalar_t>());
      gp.push_back(gs[m].const_data_ptr<scalar_t>());
    }
    a.geoms = geoms.data();
    a.ws = wp.data();
    a.gs = gp.data();
    a.gx = gx.mutable_data_ptr<scalar_t>();
    a.partial = need_grad_w ? partial.data() : nullptr;
    a.taps = taps;
    a.tap_off = tap_off.data();
    a.plane_sums = want_sums ? plane_sums.data() : nullptr;
    if (x.numel() > 0) {
      at::parallel_for(0, N * C, grain_for(2 * dw_work(geoms)),
                       [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(dw_backward_range<scalar_t>, b, e, a); });
    }
    for (size_t m = 0; m < geoms.size() && need_grad_w; ++m) {
      const ConvGeom& g = geoms[m];
      at::Tensor gw = at::empty_like(ws[m]);
      scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
      const int64_t kk = g.k * g.k;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t t = 0; t < kk; ++t) {
          double s = 0;
          for (int64_t n = 0; n < N; ++n) s += partial[(n * C + c) * taps + tap_off[m] + t];
          gwp[c * kk + t] = static_cast<scalar_t>(s);
        }
      }
      gws.push_back(gw);
    }
  });
  at::Tensor sums;
  if (want_sums) {
    sums = at::empty({2, C}, x.options().dtype(at::kDouble));
    double* sp = sums.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, q = 0;
      for (int64_t n = 0; n < N; ++n) {
        a += plane_sums[(n * C + c) * 2];
        q += plane_sums[(n * C + c) * 2 + 1];
      }
      sp[c] = a;
      sp[C + c] = q;
    }
  }
  return {gx, gws, sums};
}

// ---- 1x1 convs ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_pw_forward(const at::Tensor& u_in, const at::Tensor& w_in,
                                                               bool stats, double eps, double momentum,
                                                               const at::Tensor& running_mean,
                                                               const at::Tensor& running_var) {
  const at::Tensor u = u_in.contiguous(), w = w_in.contiguous();
  const int64_t N = u.size(0), Ci = u.size(1), HW = u.size(2) * u.size(3), Co = w.size(0);
  at::Tensor p = at::empty({N, Co, u.size(2), u.size(3)}, u.options());
  at::Tensor mean, rstd;
  std::vector<double> means(stats ? static_cast<size_t>(N * Co) : 0), m2s(means.size());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cnn_edge_pw_forward", [&] {
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(Ci * Co * HW), [&](int64_t b, int64_t e) {
      PYNAS_ISA_CALL(pw_range<scalar_t>, b, e, up, wp, Ci, Co, HW, false, pp, stats ? means.data() : nullptr,
                     stats ? m2s.data() : nullptr);
    });
    if (stats) {
      mean = at::empty({Co}, u.options());
      rstd = at::empty({Co}, u.options());
      finish_batch_stats<scalar_t>(means, m2s, N, Co, HW, eps, momentum, running_mean, running_var,
                                   mean.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>());
    }
  });
  return {p, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> cnn_edge_pw_backward(const at::Tensor& g_in, const at::Tensor& u_in,
                                                    const at::Tensor& w_in, bool need_grad_w) {
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous(), w = w_in.contiguous();
  const int64_t N = u.size(0), Ci = u.size(1), HW = u.size(2) * u.size(3), Co = w.size(0);
  at::Tensor gu = at::empty_like(u), gw = need_grad_w ? at::empty_like(w) : at::Tensor();
  std::vector<double> partial(need_grad_w ? static_cast<size_t>(N * Co * Ci) : 0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cnn_edge_pw_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gup = gu.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(2 * Ci * Co * HW), [&](int64_t b, int64_t e) {
      PYNAS_ISA_CALL(pw_range<scalar_t>, b, e, gp, wp, Co, Ci, HW, true, gup, nullptr, nullptr);
      if (need_grad_w) PYNAS_ISA_CALL(pw_weight_grad_range<scalar_t>, b, e, gp, up, Ci, Co, HW, partial.data());
    });
    if (!need_grad_w) return;
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    for (int64_t q = 0; q < Co * Ci; ++q) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += partial[n * Co * Ci + q];
      gwp[q] = static_cast<scalar_t>(s);
    }
  });
  return {gu, gw};
}

// ---- BatchNorm ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cnn_edge_bn_stats(const at::Tensor& p_in, double eps, double momentum,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var) {
  const at::Tensor p = p_in.contiguous();
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor mean = at::empty({C}, p.options()), rstd = at::empty({C}, p.options());
  std::vector<double> means(static_cast<size_t>(N * C)), m2s(static_cast<size_t>(N * C));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cnn_edge_bn_stats", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
      PYNAS_ISA_CALL(moments_range<scalar_t>, b, e, pp, HW, means.data(), m2s.data());
    });
    finish_batch_stats<scalar_t>(means, m2s, N, C, HW, eps, momentum, running_mean, running_var,
                                 mean.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>());
  });
  return {mean, rstd};
}

at::Tensor cnn_edge_bn_backward(const at::Tensor& g_in, const at::Tensor& p_in, const at::Tensor& mean_in,
                            const at::Tensor& rstd_in, const at::Tensor& sums_in) {
  const at::Tensor g = g_in.contiguous(), p = p_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor gp = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cnn_edge_bn_backward", [&] {
    const scalar_t* gpp = g.const_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* rp = rstd.const_data_ptr<scalar_t>();
    std::vector<double> sg(static_cast<size_t>(C)), sgx(static_cast<size_t>(C));
    if (sums_in.defined()) {
      const at::Tensor sums = sums_in.contiguous();
      const double* sp = sums.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) {
        sg[c] = sp[c];
        sgx[c] = sp[C + c];
      }
    } else {
      std::vector<double> part(static_cast<size_t>(N * C * 2));
      at::parallel_for(0, N * C, grain_for(3 * HW), [&](int64_t b, int64_t e) {
        std::vector<scalar_t> scratch(static_cast<size_t>(HW));
        PYNAS_ISA_CALL(bn_sums_range<scalar_t>, b, e, gpp, pp, mp, rp, C, HW, scratch, part.data());
      });
      for (int64_t c = 0; c < C; ++c) {
        double a = 0, q = 0;
        for (int64_t n = 0; n < N; ++n) {
          a += part[(n * C + c) * 2];
          q += part[(n * C + c) * 2 + 1];
        }
        sg[c] = a;
        sgx[c] = q;
      }
    }
    // gp = r * (g - sg/M - (p - mu) * r * sgx/M) = A * g + B * p + D
    const double M = static_cast<double>(N * HW);
    std::vector<scalar_t> A(static_cast<size_t>(C)), B(static_cast<size_t>(C)), D(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      const double r = static_cast<double>(rp[c]), mu = static_cast<double>(mp[c]);
      A[c] = static_cast<scalar_t>(r);
      B[c] = static_cast<scalar_t>(-r * r * sgx[c] / M);
      D[c] = static_cast<scalar_t>(-r * sg[c] / M + r * r * mu * sgx[c] / M);
    }
    scalar_t* out = gp.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t b, int64_t e) {
      PYNAS_ISA_CALL(affine2_range<scalar_t>, b, e, gpp, pp, A.data(), B.data(), D.data(), C, HW, out);
    });
  });
  return gp;
}

// ---- the mix -----------------------------------------------------------------------------------------

namespace {

template <typename T>
void mix_common(MixArgs<T>& a, const at::Tensor& x, const std::vector<at::Tensor>& ps, int64_t stride, bool has_skip,
                int64_t Ho, int64_t Wo, const std::vector<T>& inv, std::vector<const T*>& pp) {
  a.x = x.const_data_ptr<T>();
  a.C = x.size(1), a.H = x.size(2), a.W = x.size(3), a.Ho = Ho, a.Wo = Wo, a.HWo = Ho * Wo;
  a.stride = stride;
  a.K = static_cast<int64_t>(ps.size());
  a.J = 2 + a.K;
  a.pool_buf = isa_base::pool3x3_buf_size(a.H, a.W, stride);
  a.pool_acc = Ho * (a.W + 2);
  a.has_skip = has_skip;
  a.inv = inv.data();
  for (const auto& p : ps) pp.push_back(p.const_data_ptr<T>());
  a.ps = pp.data();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_mix_forward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& ps_in, const at::Tensor& w, int64_t stride, bool has_max,
    bool has_avg, bool has_skip, double eps, double momentum, const std::vector<at::Tensor>& running_means,
    const std::vector<at::Tensor>& running_vars) {
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ps;
  for (const auto& p : ps_in) ps.push_back(p.contiguous());
  const int64_t K = static_cast<int64_t>(ps.size()), J = 2 + K;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = out_size(H, 3, stride, 1, 1), Wo = out_size(W, 3, stride, 1, 1), HWo = Ho * Wo;
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options());
  at::Tensor mean = at::zeros({J, C}, x.options()), rstd = at::ones({J, C}, x.options());
  // the pools' outputs, kept between the two passes and freed on return
  at::Tensor ymax = has_max ? at::empty({N, C, Ho, Wo}, x.options()) : at::Tensor();
  at::Tensor yavg = has_avg ? at::empty({N, C, Ho, Wo}, x.options()) : at::Tensor();
  const std::vector<double> wv = to_doubles(w);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnn_edge_mix_forward", [&] {
    const auto inv = avg_inv_counts<scalar_t>(H, W, stride, Ho, Wo);
    MixArgs<scalar_t> a{};
    std::vector<const scalar_t*> pp;
    mix_common(a, x, ps, stride, has_skip, Ho, Wo, inv, pp);
    a.ymax = has_max ? ymax.mutable_data_ptr<scalar_t>() : nullptr;
    a.yavg = has_avg ? yavg.mutable_data_ptr<scalar_t>() : nullptr;
    std::vector<double> means(static_cast<size_t>(N * C * J), 0.0), m2s(static_cast<size_t>(N * C * J), 0.0);
    a.means = means.data();
    a.m2s = m2s.data();
    at::parallel_for(0, N * C, grain_for((J + 9) * HWo),
                     [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(mix_stats_range<scalar_t>, b, e, a); });

    scalar_t* mu = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rs = rstd.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> coef(static_cast<size_t>(J * C), scalar_t(0)), D(static_cast<size_t>(C));
    std::vector<double> Dd(static_cast<size_t>(C), 0.0);
    for (int64_t j = 0; j < J; ++j) {
      if (!term_present(j, has_max, has_avg)) continue;
      for (int64_t c = 0; c < C; ++c) {
        double m, var;
        combine_moments(means.data() + c * J + j, m2s.data() + c * J + j, N, C * J, HWo, &m, &var);
        const double r = 1.0 / std::sqrt(var + eps);
        mu[j * C + c] = static_cast<scalar_t>(m);
        rs[j * C + c] = static_cast<scalar_t>(r);
        // out = sum_j w_j * (y_j - mean_j) * rstd_j, with the rounded statistics the backward will use
        const double aj = wv[w_index(j)] * static_cast<double>(rs[j * C + c]);
        coef[j * C + c] = static_cast<scalar_t>(aj);
        Dd[c] -= aj * static_cast<double>(mu[j * C + c]);
        const at::Tensor none;
        update_running<scalar_t>(j < static_cast<int64_t>(running_means.size()) ? running_means[j] : none,
                                 j < static_cast<int64_t>(running_vars.size()) ? running_vars[j] : none, c, m, var,
                                 N * HWo, momentum);
      }
    }
    for (int64_t c = 0; c < C; ++c) D[c] = static_cast<scalar_t>(Dd[c]);
    a.coef = coef.data();
    a.D = D.data();
    a.w_skip = static_cast<scalar_t>(wv[2]);
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(J * HWo),
                     [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(mix_out_range<scalar_t>, b, e, a); });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_mix_backward(
    const at::Tensor& g_in, const at::Tensor& x_in, const std::vector<at::Tensor>& ps_in, const at::Tensor& w,
    int64_t stride, bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  std::vector<at::Tensor> ps;
  for (const auto& p : ps_in) ps.push_back(p.contiguous());
  const int64_t K = static_cast<int64_t>(ps.size()), J = 2 + K, S = J + 2;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3), HWo = Ho * Wo;
  at::Tensor gx;
  if (has_max || has_avg || has_skip) gx = at::empty_like(x);
  std::vector<at::Tensor> gps;
  for (const auto& p : ps) gps.push_back(at::empty_like(p));
  at::Tensor ymax = has_max ? at::empty({N, C, Ho, Wo}, x.options()) : at::Tensor();
  at::Tensor yavg = has_avg ? at::empty({N, C, Ho, Wo}, x.options()) : at::Tensor();
  // the max pool's taps per output, in the pool's row layout (ho rows of w + 2 at stride 1, of wo + 1 at stride 2)
  const int64_t arg_len = Ho * isa_base::pool3x3_row_len(W, stride, Wo);
  at::Tensor argmax = has_max ? at::empty({N * C * arg_len}, x.options()) : at::Tensor();
  const std::vector<double> wv = to_doubles(w);
  std::vector<double> part(static_cast<size_t>(N * C * S), 0.0);
  std::vector<double> gw(static_cast<size_t>(3 + K), 0.0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cnn_edge_mix_backward", [&] {
    const auto inv = avg_inv_counts<scalar_t>(H, W, stride, Ho, Wo);
    MixArgs<scalar_t> a{};
    std::vector<const scalar_t*> pp;
    mix_common(a, x, ps, stride, has_skip, Ho, Wo, inv, pp);
    a.g = g.const_data_ptr<scalar_t>();
    a.ymax = has_max ? ymax.mutable_data_ptr<scalar_t>() : nullptr;
    a.yavg = has_avg ? yavg.mutable_data_ptr<scalar_t>() : nullptr;
    a.argmax = has_max ? argmax.mutable_data_ptr<scalar_t>() : nullptr;
    a.arg_len = arg_len;
    a.part = part.data();
    at::parallel_for(0, N * C, grain_for((J + 9) * HWo),
                     [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(mix_sums_range<scalar_t>, b, e, a); });

    const scalar_t* mu = mean.const_data_ptr<scalar_t>();
    const scalar_t* rs = rstd.const_data_ptr<scalar_t>();
    // per (j, c): Sgxhat = rstd * (sum g*y - mean * sum g); grad_w[j] = sum_c Sgxhat; BN backward coefficients
    const double M = static_cast<double>(N * HWo);
    std::vector<scalar_t> A(static_cast<size_t>(J * C), scalar_t(0)), B(A), Dg(A);
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0, sx = 0;
      std::vector<double> sy(static_cast<size_t>(J), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const double* s = part.data() + (n * C + c) * S;
        sg += s[0];
        for (int64_t j = 0; j < J; ++j) sy[j] += s[1 + j];
        sx += s[1 + J];
      }
      if (has_skip) gw[2] += sx;
      for (int64_t j = 0; j < J; ++j) {
        if (!term_present(j, has_max, has_avg)) continue;
        const double r = static_cast<double>(rs[j * C + c]), m = static_cast<double>(mu[j * C + c]);
        const double sgx = r * (sy[j] - m * sg);
        gw[w_index(j)] += sgx;
        const double wj = wv[w_index(j)];
        A[j * C + c] = static_cast<scalar_t>(wj * r);
        B[j * C + c] = static_cast<scalar_t>(-wj * r * r * sgx / M);
        Dg[j * C + c] = static_cast<scalar_t>(-wj * r * sg / M + wj * r * r * m * sgx / M);
      }
    }
    a.A = A.data();
    a.B = B.data();
    a.Dg = Dg.data();
    a.w_skip = static_cast<scalar_t>(wv[2]);
    std::vector<scalar_t*> gpp;
    for (auto& t : gps) gpp.push_back(t.mutable_data_ptr<scalar_t>());
    a.gps = gpp.data();
    a.gx = gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N * C, grain_for((J + 18) * HWo),
                     [&](int64_t b, int64_t e) { PYNAS_ISA_CALL(mix_grads_range<scalar_t>, b, e, a); });
  });
  at::Tensor gw_t = at::empty({3 + K}, w.options().dtype(at::kDouble));
  std::copy(gw.begin(), gw.end(), gw_t.mutable_data_ptr<double>());
  return {gx, gps, gw_t.to(w.scalar_type())};
}

}  // namespace cpu
}  // namespace pynas
