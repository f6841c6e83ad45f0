// CPU kernels of the fused DARTS CNN edge (contracts in csrc/include/pynas/mixed_edge.h).
//
// Work is split by (n, c) plane: at DARTS's sizes a plane (at most 32x32 here) and its padded copy stay
// in L1, so each kernel copies the plane it reads into a zero-padded thread-local buffer, applying the
// input transform on the way, and then runs branch-free loops over rows that the compiler vectorises.
// Sums over the batch are made per plane and added in plane order (in double), never per thread.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/mixed_edge.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// `omp simd` as a _Pragma, which (unlike #pragma) may stand inside the AT_DISPATCH macros' lambdas.
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

// Lanes of the partial sums in dot products (see mixed_sum.cpp): a fixed order the compiler can vectorise.
constexpr int kLanes = 8;

template <typename scalar_t>
inline scalar_t relu(scalar_t v) {
  return v > scalar_t(0) ? v : scalar_t(0);
}

// Copies plane `src` (h x w) into the interior of `buf` (rows of `wp`, `pad` cells of border), transformed
// by `pre`. The border is left as it is (zeros, written once per buffer).
template <typename scalar_t>
void load_padded(const scalar_t* __restrict__ src, int64_t h, int64_t w, int64_t pad, int64_t wp, int64_t pre,
                 scalar_t mu, scalar_t r, scalar_t* __restrict__ buf) {
  for (int64_t i = 0; i < h; ++i) {
    const scalar_t* s = src + i * w;
    scalar_t* d = buf + (i + pad) * wp + pad;
    if (pre == kPreNone) {
      std::copy(s, s + w, d);
    } else if (pre == kPreRelu) {
PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = relu(s[j]);
    } else {
PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = relu((s[j] - mu) * r);
    }
  }
}

// sum_i a[i * stride] * b[i] in kLanes interleaved partial sums.
template <typename scalar_t>
double dot_strided(const scalar_t* __restrict__ a, int64_t stride, const scalar_t* __restrict__ b, int64_t n) {
  scalar_t lanes[kLanes] = {};
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kLanes <= n; i += kLanes) {
PYNAS_SIMD
      for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
    }
  }
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(a[i * stride]) * static_cast<double>(b[i]);
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

struct ConvGeom {
  int64_t k, stride, pad, dil, ho, wo;
};

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

int64_t max_pad(const std::vector<ConvGeom>& geoms) {
  int64_t p = 0;
  for (const auto& g : geoms) p = std::max(p, g.pad);
  return p;
}

// ---- 3x3 pools, padding 1 ---------------------------------------------------------------------------

// Max pool of plane `x` into `y` (ho x wo). `buf`: (h + 2) x (w + 2) scratch.
template <typename scalar_t>
void max_pool_plane(const scalar_t* x, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo, scalar_t* buf,
                    scalar_t* y) {
  const int64_t wp = w + 2;
  std::fill(buf, buf + (h + 2) * wp, -std::numeric_limits<scalar_t>::infinity());
  load_padded(x, h, w, 1, wp, kPreNone, scalar_t(0), scalar_t(1), buf);
  for (int64_t oh = 0; oh < ho; ++oh) {
    scalar_t* yr = y + oh * wo;
    const scalar_t* r0 = buf + (oh * s) * wp;
    if (s == 1) {
PYNAS_SIMD
      for (int64_t ow = 0; ow < wo; ++ow) {
        scalar_t m = r0[ow];
        for (int64_t ki = 0; ki < 3; ++ki)
          for (int64_t kj = 0; kj < 3; ++kj) m = std::max(m, r0[ki * wp + ow + kj]);
        yr[ow] = m;
      }
    } else {
      for (int64_t ow = 0; ow < wo; ++ow) {
        scalar_t m = r0[ow * s];
        for (int64_t ki = 0; ki < 3; ++ki)
          for (int64_t kj = 0; kj < 3; ++kj) m = std::max(m, r0[ki * wp + ow * s + kj]);
        yr[ow] = m;
      }
    }
  }
}

// Scatters gy (ho x wo) to the first maximum, in row-major window order, of each window (torch's choice),
// adding into `gbuf` ((h + 2) x (w + 2), padded like `buf`, which holds the -inf padded input).
template <typename scalar_t>
void max_pool_plane_backward(const scalar_t* buf, int64_t w, int64_t s, int64_t ho, int64_t wo, const scalar_t* gy,
                             scalar_t* gbuf) {
  const int64_t wp = w + 2;
  for (int64_t oh = 0; oh < ho; ++oh) {
    for (int64_t ow = 0; ow < wo; ++ow) {
      const int64_t base = oh * s * wp + ow * s;
      // torch starts from the window's first input pixel and moves only on a strictly greater value
      int64_t arg = std::max<int64_t>(oh * s, 1) * wp + std::max<int64_t>(ow * s, 1);
      scalar_t m = buf[arg];
      for (int64_t ki = 0; ki < 3; ++ki) {
        for (int64_t kj = 0; kj < 3; ++kj) {
          const int64_t idx = base + ki * wp + kj;
          if (buf[idx] > m) {
            m = buf[idx];
            arg = idx;
          }
        }
      }
      gbuf[arg] += gy[oh * wo + ow];
    }
  }
}

// 1 / (number of input pixels in the window) per output row or column (count_include_pad=False).
std::vector<double> avg_counts(int64_t in, int64_t s, int64_t out) {
  std::vector<double> c(static_cast<size_t>(out));
  for (int64_t o = 0; o < out; ++o) {
    const int64_t a = std::max<int64_t>(o * s - 1, 0), b = std::min<int64_t>(o * s + 2, in);
    c[static_cast<size_t>(o)] = static_cast<double>(b - a);
  }
  return c;
}

// Avg pool of plane `x` into `y`. `buf`: (h + 2) x (w + 2) scratch with a zero border.
template <typename scalar_t>
void avg_pool_plane(const scalar_t* x, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo,
                    const scalar_t* inv_count, scalar_t* buf, scalar_t* y) {
  const int64_t wp = w + 2;
  load_padded(x, h, w, 1, wp, kPreNone, scalar_t(0), scalar_t(1), buf);
  for (int64_t oh = 0; oh < ho; ++oh) {
    scalar_t* yr = y + oh * wo;
    const scalar_t* r0 = buf + (oh * s) * wp;
    const scalar_t* ic = inv_count + oh * wo;
    for (int64_t ow = 0; ow < wo; ++ow) {
      scalar_t acc = 0;
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj) acc += r0[ki * wp + ow * s + kj];
      yr[ow] = acc * ic[ow];
    }
  }
}

template <typename scalar_t>
void avg_pool_plane_backward(int64_t w, int64_t s, int64_t ho, int64_t wo, const scalar_t* inv_count,
                             const scalar_t* gy, scalar_t* gbuf) {
  const int64_t wp = w + 2;
  for (int64_t oh = 0; oh < ho; ++oh) {
    for (int64_t ow = 0; ow < wo; ++ow) {
      const scalar_t v = gy[oh * wo + ow] * inv_count[oh * wo + ow];
      scalar_t* d = gbuf + oh * s * wp + ow * s;
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj) d[ki * wp + kj] += v;
    }
  }
}

// 1/count of every output pixel of an avg pool, as a (ho * wo) table.
template <typename scalar_t>
std::vector<scalar_t> avg_inv_counts(int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo) {
  const auto ch = avg_counts(h, s, ho), cw = avg_counts(w, s, wo);
  std::vector<scalar_t> t(static_cast<size_t>(ho * wo));
  for (int64_t oh = 0; oh < ho; ++oh)
    for (int64_t ow = 0; ow < wo; ++ow) t[oh * wo + ow] = static_cast<scalar_t>(1.0 / (ch[oh] * cw[ow]));
  return t;
}

// Mean and sum of squared deviations of one plane, in double (two passes over data in L1).
template <typename scalar_t>
void plane_moments(const scalar_t* y, int64_t n, double* mean, double* m2) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(y[i]);
  const double mu = s / static_cast<double>(n);
  double q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(y[i]) - mu;
    q += d * d;
  }
  *mean = mu;
  *m2 = q;
}

// Combines per-plane moments (planes n = 0..N-1 of channel c, `stride` apart) into the biased variance.
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

}  // namespace

// ---- depthwise convs ---------------------------------------------------------------------------------

std::vector<at::Tensor> edge_dw_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean,
                                        const at::Tensor& rstd) {
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ws;
  for (const auto& w : ws_in) ws.push_back(w.contiguous());
  const auto geoms = conv_geoms(x, ws, strides, pads, dils);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = max_pad(geoms), Hp = H + 2 * P, Wp = W + 2 * P;
  std::vector<at::Tensor> ys;
  for (const auto& g : geoms) ys.push_back(at::empty({N, C, g.ho, g.wo}, x.options()));
  if (x.numel() == 0) return ys;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_dw_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = pre == kPreNormRelu ? mean.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = pre == kPreNormRelu ? rstd.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf(static_cast<size_t>(Hp * Wp), scalar_t(0));
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        load_padded(xp + plane * H * W, H, W, P, Wp, pre, mp ? mp[c] : scalar_t(0), rp ? rp[c] : scalar_t(1),
                    buf.data());
        for (size_t m = 0; m < geoms.size(); ++m) {
          const ConvGeom& g = geoms[m];
          const scalar_t* wk = ws[m].const_data_ptr<scalar_t>() + c * g.k * g.k;
          scalar_t* y = ys[m].mutable_data_ptr<scalar_t>() + plane * g.ho * g.wo;
          const int64_t off = P - g.pad;
          for (int64_t oh = 0; oh < g.ho; ++oh) {
            scalar_t* __restrict__ yr = y + oh * g.wo;
            std::fill(yr, yr + g.wo, scalar_t(0));
            for (int64_t ki = 0; ki < g.k; ++ki) {
              const scalar_t* irow = buf.data() + (oh * g.stride + off + ki * g.dil) * Wp + off;
              for (int64_t kj = 0; kj < g.k; ++kj) {
                const scalar_t wv = wk[ki * g.k + kj];
                const scalar_t* __restrict__ src = irow + kj * g.dil;
                if (g.stride == 1) {
PYNAS_SIMD
                  for (int64_t ow = 0; ow < g.wo; ++ow) yr[ow] += wv * src[ow];
                } else {
                  for (int64_t ow = 0; ow < g.wo; ++ow) yr[ow] += wv * src[ow * g.stride];
                }
              }
            }
          }
        }
      }
    });
  });
  return ys;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> edge_dw_backward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in, const std::vector<at::Tensor>& gs_in,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean, const at::Tensor& rstd) {
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ws, gs;
  for (const auto& w : ws_in) ws.push_back(w.contiguous());
  for (const auto& g : gs_in) gs.push_back(g.contiguous());
  const auto geoms = conv_geoms(x, ws, strides, pads, dils);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = max_pad(geoms), Hp = H + 2 * P, Wp = W + 2 * P;
  at::Tensor gx = at::empty_like(x);
  std::vector<at::Tensor> gws;
  int64_t taps = 0;  // offsets of each conv's taps in the per-plane partial sums
  std::vector<int64_t> tap_off;
  for (const auto& g : geoms) {
    tap_off.push_back(taps);
    taps += g.k * g.k;
  }
  std::vector<double> partial(static_cast<size_t>(N * C * taps), 0.0);
  const bool want_sums = pre == kPreNormRelu;
  std::vector<double> plane_sums(want_sums ? static_cast<size_t>(N * C * 2) : 0, 0.0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_dw_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = pre == kPreNormRelu ? mean.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = pre == kPreNormRelu ? rstd.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf(static_cast<size_t>(Hp * Wp), scalar_t(0));
      std::vector<scalar_t> gbuf(static_cast<size_t>(Hp * Wp));
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const scalar_t mu = mp ? mp[c] : scalar_t(0), r = rp ? rp[c] : scalar_t(1);
        const scalar_t* xplane = xp + plane * H * W;
        load_padded(xplane, H, W, P, Wp, pre, mu, r, buf.data());
        std::fill(gbuf.begin(), gbuf.end(), scalar_t(0));
        for (size_t m = 0; m < geoms.size(); ++m) {
          const ConvGeom& g = geoms[m];
          const scalar_t* wk = ws[m].const_data_ptr<scalar_t>() + c * g.k * g.k;
          const scalar_t* gy = gs[m].const_data_ptr<scalar_t>() + plane * g.ho * g.wo;
          double* pw = partial.data() + plane * taps + tap_off[m];
          const int64_t off = P - g.pad;
          for (int64_t ki = 0; ki < g.k; ++ki) {
            for (int64_t kj = 0; kj < g.k; ++kj) {
              const scalar_t wv = wk[ki * g.k + kj];
              double acc = 0;
              for (int64_t oh = 0; oh < g.ho; ++oh) {
                const int64_t at = (oh * g.stride + off + ki * g.dil) * Wp + off + kj * g.dil;
                const scalar_t* gr = gy + oh * g.wo;
                acc += dot_strided(buf.data() + at, g.stride, gr, g.wo);
                scalar_t* __restrict__ dst = gbuf.data() + at;
                if (g.stride == 1) {
PYNAS_SIMD
                  for (int64_t ow = 0; ow < g.wo; ++ow) dst[ow] += wv * gr[ow];
                } else {
                  for (int64_t ow = 0; ow < g.wo; ++ow) dst[ow * g.stride] += wv * gr[ow];
                }
              }
              pw[ki * g.k + kj] = acc;
            }
          }
        }
        // grad w.r.t. the untransformed input: the interior of gbuf through the transform's derivative
        scalar_t* gxr = gxp + plane * H * W;
        double sg = 0, sgx = 0;
        for (int64_t i = 0; i < H; ++i) {
          const scalar_t* src = gbuf.data() + (i + P) * Wp + P;
          const scalar_t* xi = xplane + i * W;
          scalar_t* d = gxr + i * W;
          if (pre == kPreNone) {
            std::copy(src, src + W, d);
          } else if (pre == kPreRelu) {
PYNAS_SIMD
            for (int64_t j = 0; j < W; ++j) d[j] = xi[j] > scalar_t(0) ? src[j] : scalar_t(0);
          } else {
            // the normalised input a = (x - mu) * r is buf's interior; its relu mask is a > 0
            const scalar_t* ai = buf.data() + (i + P) * Wp + P;
            for (int64_t j = 0; j < W; ++j) {
              const scalar_t v = ai[j] > scalar_t(0) ? src[j] : scalar_t(0);
              d[j] = v;
              sg += static_cast<double>(v);
              sgx += static_cast<double>(v) * static_cast<double>((xi[j] - mu) * r);
            }
          }
        }
        if (want_sums) {
          plane_sums[plane * 2] = sg;
          plane_sums[plane * 2 + 1] = sgx;
        }
      }
    });
    for (size_t m = 0; m < geoms.size(); ++m) {
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

// ---- BatchNorm ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> edge_bn_stats(const at::Tensor& p_in, double eps, double momentum,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var) {
  const at::Tensor p = p_in.contiguous();
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor mean = at::empty({C}, p.options()), rstd = at::empty({C}, p.options());
  std::vector<double> means(static_cast<size_t>(N * C)), m2s(static_cast<size_t>(N * C));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "edge_bn_stats", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) plane_moments(pp + plane * HW, HW, &means[plane], &m2s[plane]);
    });
    scalar_t* mo = mean.mutable_data_ptr<scalar_t>();
    scalar_t* ro = rstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      double mu, var;
      combine_moments(means.data() + c, m2s.data() + c, N, C, HW, &mu, &var);
      mo[c] = static_cast<scalar_t>(mu);
      ro[c] = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
      update_running<scalar_t>(running_mean, running_var, c, mu, var, N * HW, momentum);
    }
  });
  return {mean, rstd};
}

at::Tensor edge_bn_backward(const at::Tensor& g_in, const at::Tensor& p_in, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& sums_in) {
  const at::Tensor g = g_in.contiguous(), p = p_in.contiguous();
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor gp = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "edge_bn_backward", [&] {
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
      at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
        for (int64_t plane = b; plane < e; ++plane) {
          const int64_t c = plane % C;
          const scalar_t* gr = gpp + plane * HW;
          const scalar_t* pr = pp + plane * HW;
          double a = 0, q = 0;
          for (int64_t i = 0; i < HW; ++i) {
            a += static_cast<double>(gr[i]);
            q += static_cast<double>(gr[i]) * static_cast<double>((pr[i] - mp[c]) * rp[c]);
          }
          part[plane * 2] = a;
          part[plane * 2 + 1] = q;
        }
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
    const double M = static_cast<double>(N * HW);
    scalar_t* out = gp.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const double r = static_cast<double>(rp[c]), mu = static_cast<double>(mp[c]);
        // gp = r * (g - sg/M - (p - mu) * r * sgx/M) = A * g + B * p + D
        const scalar_t A = static_cast<scalar_t>(r);
        const scalar_t B = static_cast<scalar_t>(-r * r * sgx[c] / M);
        const scalar_t D = static_cast<scalar_t>(-r * sg[c] / M + r * r * mu * sgx[c] / M);
        const scalar_t* gr = gpp + plane * HW;
        const scalar_t* pr = pp + plane * HW;
        scalar_t* o = out + plane * HW;
PYNAS_SIMD
        for (int64_t i = 0; i < HW; ++i) o[i] = A * gr[i] + B * pr[i] + D;
      }
    });
  });
  return gp;
}

// ---- the mix -----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mix_forward(
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
  const std::vector<double> wv = [&] {
    const at::Tensor wd = w.to(at::kDouble).contiguous();
    return std::vector<double>(wd.const_data_ptr<double>(), wd.const_data_ptr<double>() + wd.numel());
  }();
  const bool pools = has_max || has_avg;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_mix_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto inv_count = avg_inv_counts<scalar_t>(H, W, stride, Ho, Wo);
    // pass 1: moments of every BatchNorm input, per plane
    std::vector<double> means(static_cast<size_t>(N * C * J), 0.0), m2s(static_cast<size_t>(N * C * J), 0.0);
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf(pools ? static_cast<size_t>((H + 2) * (W + 2)) : 0, scalar_t(0));
      std::vector<scalar_t> y(pools ? static_cast<size_t>(HWo) : 0);
      for (int64_t plane = b; plane < e; ++plane) {
        const scalar_t* xr = xp + plane * H * W;
        double* mo = means.data() + plane * J;
        double* qo = m2s.data() + plane * J;
        if (has_max) {
          max_pool_plane(xr, H, W, stride, Ho, Wo, buf.data(), y.data());
          plane_moments(y.data(), HWo, &mo[0], &qo[0]);
        }
        if (has_avg) {
          std::fill(buf.begin(), buf.end(), scalar_t(0));
          avg_pool_plane(xr, H, W, stride, Ho, Wo, inv_count.data(), buf.data(), y.data());
          plane_moments(y.data(), HWo, &mo[1], &qo[1]);
        }
        for (int64_t j = 0; j < K; ++j)
          plane_moments(ps[j].const_data_ptr<scalar_t>() + plane * HWo, HWo, &mo[2 + j], &qo[2 + j]);
      }
    });
    scalar_t* mu = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rs = rstd.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < J; ++j) {
      if ((j == 0 && !has_max) || (j == 1 && !has_avg)) continue;
      for (int64_t c = 0; c < C; ++c) {
        double m, var;
        combine_moments(means.data() + c * J + j, m2s.data() + c * J + j, N, C * J, HWo, &m, &var);
        mu[j * C + c] = static_cast<scalar_t>(m);
        rs[j * C + c] = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
        const at::Tensor none;
        update_running<scalar_t>(j < static_cast<int64_t>(running_means.size()) ? running_means[j] : none,
                                 j < static_cast<int64_t>(running_vars.size()) ? running_vars[j] : none, c, m, var,
                                 N * HWo, momentum);
      }
    }
    // pass 2: out = D + w_skip * x + sum_j a_j * y_j with a_j = w_j * rstd_j, D = -sum_j a_j * mean_j
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf(pools ? static_cast<size_t>((H + 2) * (W + 2)) : 0, scalar_t(0));
      std::vector<scalar_t> y(pools ? static_cast<size_t>(HWo) : 0);
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const scalar_t* xr = xp + plane * H * W;
        scalar_t* o = op + plane * HWo;
        double D = 0;
        std::vector<double> a(static_cast<size_t>(J), 0.0);
        for (int64_t j = 0; j < J; ++j) {
          if ((j == 0 && !has_max) || (j == 1 && !has_avg)) continue;
          a[j] = wv[j == 0 ? 0 : j == 1 ? 1 : j + 1] * static_cast<double>(rs[j * C + c]);
          D -= a[j] * static_cast<double>(mu[j * C + c]);
        }
        const scalar_t Ds = static_cast<scalar_t>(D);
        if (has_skip) {
          const scalar_t ws = static_cast<scalar_t>(wv[2]);
PYNAS_SIMD
          for (int64_t i = 0; i < HWo; ++i) o[i] = Ds + ws * xr[i];
        } else {
          std::fill(o, o + HWo, Ds);
        }
        if (has_max) {
          max_pool_plane(xr, H, W, stride, Ho, Wo, buf.data(), y.data());
          const scalar_t aj = static_cast<scalar_t>(a[0]);
PYNAS_SIMD
          for (int64_t i = 0; i < HWo; ++i) o[i] += aj * y[i];
        }
        if (has_avg) {
          std::fill(buf.begin(), buf.end(), scalar_t(0));
          avg_pool_plane(xr, H, W, stride, Ho, Wo, inv_count.data(), buf.data(), y.data());
          const scalar_t aj = static_cast<scalar_t>(a[1]);
PYNAS_SIMD
          for (int64_t i = 0; i < HWo; ++i) o[i] += aj * y[i];
        }
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t* pr = ps[j].const_data_ptr<scalar_t>() + plane * HWo;
          const scalar_t aj = static_cast<scalar_t>(a[2 + j]);
PYNAS_SIMD
          for (int64_t i = 0; i < HWo; ++i) o[i] += aj * pr[i];
        }
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> edge_mix_backward(
    const at::Tensor& g_in, const at::Tensor& x_in, const std::vector<at::Tensor>& ps_in, const at::Tensor& w,
    int64_t stride, bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  std::vector<at::Tensor> ps;
  for (const auto& p : ps_in) ps.push_back(p.contiguous());
  const int64_t K = static_cast<int64_t>(ps.size()), J = 2 + K;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3), HWo = Ho * Wo;
  const bool pools = has_max || has_avg;
  at::Tensor gx;
  if (pools || has_skip) gx = at::empty_like(x);
  std::vector<at::Tensor> gps;
  for (const auto& p : ps) gps.push_back(at::empty_like(p));
  const std::vector<double> wv = [&] {
    const at::Tensor wd = w.to(at::kDouble).contiguous();
    return std::vector<double>(wd.const_data_ptr<double>(), wd.const_data_ptr<double>() + wd.numel());
  }();
  // per plane: [0] sum g, [1 + j] sum g * y_j (j < J), [1 + J] sum g * x
  const int64_t S = J + 2;
  std::vector<double> part(static_cast<size_t>(N * C * S), 0.0);
  std::vector<double> gw(static_cast<size_t>(3 + K), 0.0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_mix_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* mu = mean.const_data_ptr<scalar_t>();
    const scalar_t* rs = rstd.const_data_ptr<scalar_t>();
    const auto inv_count = avg_inv_counts<scalar_t>(H, W, stride, Ho, Wo);
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf(pools ? static_cast<size_t>((H + 2) * (W + 2)) : 0, scalar_t(0));
      std::vector<scalar_t> y(pools ? static_cast<size_t>(HWo) : 0);
      for (int64_t plane = b; plane < e; ++plane) {
        const scalar_t* xr = xp + plane * H * W;
        const scalar_t* gr = gp + plane * HWo;
        double* s = part.data() + plane * S;
        double sg = 0;
        for (int64_t i = 0; i < HWo; ++i) sg += static_cast<double>(gr[i]);
        s[0] = sg;
        if (has_max) {
          max_pool_plane(xr, H, W, stride, Ho, Wo, buf.data(), y.data());
          s[1] = dot_strided(y.data(), 1, gr, HWo);
        }
        if (has_avg) {
          std::fill(buf.begin(), buf.end(), scalar_t(0));
          avg_pool_plane(xr, H, W, stride, Ho, Wo, inv_count.data(), buf.data(), y.data());
          s[2] = dot_strided(y.data(), 1, gr, HWo);
        }
        for (int64_t j = 0; j < K; ++j) s[3 + j] = dot_strided(ps[j].const_data_ptr<scalar_t>() + plane * HWo, 1, gr, HWo);
        if (has_skip) s[1 + J] = dot_strided(xr, 1, gr, HWo);
      }
    });
    // per channel: Sg, and Sgxhat_j = rstd_j * (sum g*y_j - mean_j * Sg)
    std::vector<double> Sg(static_cast<size_t>(C), 0.0), Sgx(static_cast<size_t>(C * J), 0.0);
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, sx = 0;
      std::vector<double> gy(static_cast<size_t>(J), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const double* s = part.data() + (n * C + c) * S;
        a += s[0];
        for (int64_t j = 0; j < J; ++j) gy[j] += s[1 + j];
        sx += s[1 + J];
      }
      Sg[c] = a;
      for (int64_t j = 0; j < J; ++j) {
        if ((j == 0 && !has_max) || (j == 1 && !has_avg)) continue;
        Sgx[c * J + j] = static_cast<double>(rs[j * C + c]) * (gy[j] - static_cast<double>(mu[j * C + c]) * a);
      }
      if (has_skip) gw[2] += sx;
    }
    for (int64_t j = 0; j < J; ++j) {
      if ((j == 0 && !has_max) || (j == 1 && !has_avg)) continue;
      double t = 0;
      for (int64_t c = 0; c < C; ++c) t += Sgx[c * J + j];
      gw[j == 0 ? 0 : j == 1 ? 1 : j + 1] = t;
    }
    // pass 2: grad of each BN input = A_j * g + B_j * y_j + D_j, then through the pools
    const double M = static_cast<double>(N * HWo);
    scalar_t* gxp = gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      const int64_t wp = W + 2;
      std::vector<scalar_t> buf(pools ? static_cast<size_t>((H + 2) * wp) : 0, scalar_t(0));
      std::vector<scalar_t> gbuf(pools ? static_cast<size_t>((H + 2) * wp) : 0);
      std::vector<scalar_t> y(pools ? static_cast<size_t>(HWo) : 0), gy(pools ? static_cast<size_t>(HWo) : 0);
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const scalar_t* xr = xp + plane * H * W;
        const scalar_t* gr = gp + plane * HWo;
        auto coeffs = [&](int64_t j, scalar_t* A, scalar_t* B, scalar_t* D) {
          const double wj = wv[j == 0 ? 0 : j == 1 ? 1 : j + 1];
          const double r = static_cast<double>(rs[j * C + c]), m = static_cast<double>(mu[j * C + c]);
          const double sgx = Sgx[c * J + j];
          *A = static_cast<scalar_t>(wj * r);
          *B = static_cast<scalar_t>(-wj * r * r * sgx / M);
          *D = static_cast<scalar_t>(-wj * r * Sg[c] / M + wj * r * r * m * sgx / M);
        };
        for (int64_t j = 0; j < K; ++j) {
          scalar_t A, B, D;
          coeffs(2 + j, &A, &B, &D);
          const scalar_t* pr = ps[j].const_data_ptr<scalar_t>() + plane * HWo;
          scalar_t* o = gps[j].mutable_data_ptr<scalar_t>() + plane * HWo;
PYNAS_SIMD
          for (int64_t i = 0; i < HWo; ++i) o[i] = A * gr[i] + B * pr[i] + D;
        }
        if (!gxp) continue;
        scalar_t* gxr = gxp + plane * H * W;
        if (pools) {
          std::fill(gbuf.begin(), gbuf.end(), scalar_t(0));
          if (has_max) {
            scalar_t A, B, D;
            coeffs(0, &A, &B, &D);
            max_pool_plane(xr, H, W, stride, Ho, Wo, buf.data(), y.data());
PYNAS_SIMD
            for (int64_t i = 0; i < HWo; ++i) gy[i] = A * gr[i] + B * y[i] + D;
            max_pool_plane_backward(buf.data(), W, stride, Ho, Wo, gy.data(), gbuf.data());
          }
          if (has_avg) {
            scalar_t A, B, D;
            coeffs(1, &A, &B, &D);
            std::fill(buf.begin(), buf.end(), scalar_t(0));
            avg_pool_plane(xr, H, W, stride, Ho, Wo, inv_count.data(), buf.data(), y.data());
PYNAS_SIMD
            for (int64_t i = 0; i < HWo; ++i) gy[i] = A * gr[i] + B * y[i] + D;
            avg_pool_plane_backward(W, stride, Ho, Wo, inv_count.data(), gy.data(), gbuf.data());
          }
          for (int64_t i = 0; i < H; ++i) std::copy(gbuf.data() + (i + 1) * wp + 1, gbuf.data() + (i + 1) * wp + 1 + W, gxr + i * W);
        } else {
          std::fill(gxr, gxr + H * W, scalar_t(0));
        }
        if (has_skip) {
          const scalar_t ws = static_cast<scalar_t>(wv[2]);
PYNAS_SIMD
          for (int64_t i = 0; i < H * W; ++i) gxr[i] += ws * gr[i];
        }
      }
    });
  });
  at::Tensor gw_t = at::empty({3 + K}, w.options().dtype(at::kDouble));
  std::copy(gw.begin(), gw.end(), gw_t.mutable_data_ptr<double>());
  return {gx, gps, gw_t.to(w.scalar_type())};
}

}  // namespace cpu
}  // namespace pynas
