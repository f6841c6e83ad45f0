// Per-plane loops of the CPU fused edge (csrc/cpu/cnn_edge.cpp), included once per instruction set:
// no include guard on purpose. The including file opens a namespace (and, for AVX2, a `#pragma GCC
// target` region) around it, so every function here exists once per ISA; the includer picks one at run
// time. Only raw pointers and inline std:: algorithms are used, so nothing ISA-specific escapes the
// namespace.
//
// Layout trick for stride 1: a plane is copied into a zero-padded buffer of row length Wp, and a conv
// tap becomes ONE loop over ho * Wp elements (out_pad[i] += w * buf[offset + i]); the Wp - wo columns
// past the output's width are garbage that is never copied out. One long loop per tap instead of ho
// short ones is what makes the 8x8 and 16x16 planes of DARTS fast.

// Lanes of the partial sums in dot products: a fixed order that the compiler can put in SIMD registers.
constexpr int kLanes = 8;

// GCC/Clang vector extensions: 32 bytes (8 floats, 4 doubles), lowered to AVX2 registers in the AVX2
// variant and to pairs of SSE registers in the baseline one. Explicit vectors keep a block of outputs in
// registers across all taps, which the auto-vectoriser does not manage.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// dst[i] (+)= sum_t wk[t] * src[offs[t] + i] for i in [0, n): blocks of 4 vectors stay in registers over all
// t. `offs` may be negative. Used by the depthwise convs (t = taps) and the 1x1 convs (t = input channels).
template <typename T>
void tap_sum(const T* src, const int64_t* offs, const T* wk, int64_t taps, int64_t n, bool add, T* dst) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + 4 * E <= n; i += 4 * E) {
    V r0 = {}, r1 = {}, r2 = {}, r3 = {};
    if (add) {
      r0 = vload(dst + i), r1 = vload(dst + i + E), r2 = vload(dst + i + 2 * E), r3 = vload(dst + i + 3 * E);
    }
    for (int64_t t = 0; t < taps; ++t) {
      const T wv = wk[t];
      const T* p = src + offs[t] + i;
      r0 += wv * vload(p);
      r1 += wv * vload(p + E);
      r2 += wv * vload(p + 2 * E);
      r3 += wv * vload(p + 3 * E);
    }
    vstore(dst + i, r0), vstore(dst + i + E, r1), vstore(dst + i + 2 * E, r2), vstore(dst + i + 3 * E, r3);
  }
  for (; i + E <= n; i += E) {
    V r = {};
    if (add) r = vload(dst + i);
    for (int64_t t = 0; t < taps; ++t) r += wk[t] * vload(src + offs[t] + i);
    vstore(dst + i, r);
  }
  for (; i < n; ++i) {
    T r = add ? dst[i] : T(0);
    for (int64_t t = 0; t < taps; ++t) r += wk[t] * src[offs[t] + i];
    dst[i] = r;
  }
}

template <typename T>
inline T relu(T v) {
  return v > T(0) ? v : T(0);
}

template <typename T>
double lane_sum(const T* lanes) {
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

// sum_i a[i], in 2 vector accumulators then double.
template <typename T>
double sum_lanes(const T* __restrict__ a, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  V r0 = {}, r1 = {};
  int64_t i = 0;
  for (; i + 2 * E <= n; i += 2 * E) {
    r0 += vload(a + i);
    r1 += vload(a + i + E);
  }
  r0 += r1;
  double s = 0;
  for (int64_t l = 0; l < E; ++l) s += static_cast<double>(r0[l]);
  for (; i < n; ++i) s += static_cast<double>(a[i]);
  return s;
}

// out[d] = sum_i as[d][i] * b[i] for d < D, each in 2 vector accumulators then double, lanes in order, then the
// tail: per dot exactly dot_lanes's operations, but b is loaded once per block for all D dots and the D lane
// reductions (a chain of dependent double adds each) run side by side instead of one after another.
template <typename T, int D>
inline void dot_lanes_block(const T* const* as, const T* __restrict__ b, int64_t n, double* out) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  V r0[D] = {}, r1[D] = {};
  int64_t i = 0;
  for (; i + 2 * E <= n; i += 2 * E) {
    const V b0 = vload(b + i), b1 = vload(b + i + E);
#pragma GCC unroll 8
    for (int d = 0; d < D; ++d) {
      r0[d] += vload(as[d] + i) * b0;
      r1[d] += vload(as[d] + i + E) * b1;
    }
  }
  double s[D] = {};
#pragma GCC unroll 8
  for (int d = 0; d < D; ++d) r0[d] += r1[d];
#pragma GCC unroll 8
  for (int64_t l = 0; l < E; ++l)
#pragma GCC unroll 8
    for (int d = 0; d < D; ++d) s[d] += static_cast<double>(r0[d][l]);
  // the tail dot by dot, as a loop of its own: vectorised across the dots, GCC no longer contracts the double
  // multiply-add into an FMA (checked in the AVX2 assembly), which would change the float64 results
  for (int d = 0; d < D; ++d) {
    double sd = s[d];
    for (int64_t j = i; j < n; ++j) sd += static_cast<double>(as[d][j]) * static_cast<double>(b[j]);
    out[d] = sd;
  }
}

// sum_i a[i] * b[i], in 2 vector accumulators then double.
template <typename T>
double dot_lanes(const T* a, const T* __restrict__ b, int64_t n) {
  double s;
  dot_lanes_block<T, 1>(&a, b, n, &s);
  return s;
}

// out[d] = dot_lanes(as[d], b, n) for d < count (the same numbers), in blocks of 4 dots.
template <typename T>
void dots_lanes(const T* const* as, int64_t count, const T* __restrict__ b, int64_t n, double* out) {
  int64_t d = 0;
  for (; d + 4 <= count; d += 4) dot_lanes_block<T, 4>(as + d, b, n, out + d);
  if (count - d >= 2) {
    dot_lanes_block<T, 2>(as + d, b, n, out + d);
    d += 2;
  }
  if (d < count) dot_lanes_block<T, 1>(as + d, b, n, out + d);
}

// Mean and sum of squared deviations of n values (two passes over data in L1).
template <typename T>
void moments(const T* y, int64_t n, double* mean, double* m2) {
  const double mu = sum_lanes(y, n) / static_cast<double>(n);
  const T m = static_cast<T>(mu);
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    PYNAS_SIMD
    for (int l = 0; l < kLanes; ++l) {
      const T d = y[i + l] - m;
      lanes[l] += d * d;
    }
  }
  double q = lane_sum(lanes);
  for (; i < n; ++i) {
    const double d = static_cast<double>(y[i]) - static_cast<double>(m);
    q += d * d;
  }
  // the deviations were taken from m (mu rounded to T): correct for the rounding
  const double shift = static_cast<double>(m) - mu;
  *mean = mu;
  *m2 = std::max(0.0, q - static_cast<double>(n) * shift * shift);
}

// Copies plane `src` (h x w) into rows of length `wp` of `buf` starting at (pad, pad), transformed by `pre`.
template <typename T>
void load_padded(const T* __restrict__ src, int64_t h, int64_t w, int64_t pad, int64_t wp, int64_t pre, T mu, T r,
                 T* __restrict__ buf) {
  for (int64_t i = 0; i < h; ++i) {
    const T* s = src + i * w;
    T* d = buf + (i + pad) * wp + pad;
    if (pre == kPreNone) {
      PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = s[j];
    } else if (pre == kPreRelu) {
      PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = relu(s[j]);
    } else {
      PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = relu((s[j] - mu) * r);
    }
  }
}

// Copies the first `w` columns of `h` rows of length `wp` (a padded-width result) to a dense plane.
template <typename T>
void crop_rows(const T* __restrict__ src, int64_t h, int64_t w, int64_t wp, T* __restrict__ dst) {
  for (int64_t i = 0; i < h; ++i) std::copy(src + i * wp, src + i * wp + w, dst + i * w);
}

// Dense plane (h x w) into rows of length wp, the extra columns set to `fill`.
template <typename T>
void widen_rows(const T* __restrict__ src, int64_t h, int64_t w, int64_t wp, T fill, T* __restrict__ dst) {
  for (int64_t i = 0; i < h; ++i) {
    std::copy(src + i * w, src + (i + 1) * w, dst + i * wp);
    std::fill(dst + i * wp + w, dst + (i + 1) * wp, fill);
  }
}

// ---- depthwise convs -------------------------------------------------------------------------------

// The most taps a depthwise kernel may have (the bindings reject bigger kernels).
constexpr int64_t kMaxTaps = kMaxKernel * kMaxKernel;

// out[t] = dot_lanes(src + offs[t], b, n) for t < taps (taps <= kMaxTaps): a depthwise filter's weight gradient.
template <typename T>
void tap_dots(const T* src, const int64_t* offs, int64_t taps, const T* __restrict__ b, int64_t n, double* out) {
  const T* wins[kMaxTaps];
  for (int64_t t = 0; t < taps; ++t) wins[t] = src + offs[t];
  dots_lanes(wins, taps, b, n, out);
}

// Layout trick for stride 2: the padded plane (rows x wp) is split into its four phases, q[(2 pr + pc) hq wq +
// i wq + j] = buf[2 i + pr, 2 j + pc] (zero where that is outside the plane; sizes from dw_phase_sizes). Tap
// (rr, cc) of a stride-2 conv reads phase (rr % 2, cc % 2) at (rr / 2, cc / 2) on, so, as at stride 1, a tap
// is one loop over ho * wq elements, and the input gradient one gather per phase.
template <typename T>
void split_phases(const T* __restrict__ buf, int64_t rows, int64_t wp, const DwPhases& ph, T* __restrict__ q) {
  const int64_t PS = ph.hq * ph.wq;
  for (int64_t p = 0; p < 4; ++p) {
    const int64_t pr = p >> 1, pc = p & 1;
    for (int64_t i = 0; i < ph.hq; ++i) {
      T* d = q + p * PS + i * ph.wq;
      const int64_t r = 2 * i + pr;
      if (r >= rows) {
        std::fill(d, d + ph.wq, T(0));
        continue;
      }
      const T* src = buf + r * wp + pc;
      const int64_t n = std::min(ph.wq, (wp - pc + 1) / 2);
      for (int64_t j = 0; j < n; ++j) d[j] = src[2 * j];
      std::fill(d + n, d + ph.wq, T(0));
    }
  }
  std::fill(q + 4 * PS, q + ph.q_size, T(0));
}

// The offsets in the phase layout of a stride-2 conv's taps (the phase's base included).
inline void phase_offsets(const ConvGeom& g, int64_t P, const DwPhases& ph, int64_t* offs) {
  const int64_t off = P - g.pad, PS = ph.hq * ph.wq;
  for (int64_t t = 0; t < g.k * g.k; ++t) {
    const int64_t rr = off + (t / g.k) * g.dil, cc = off + (t % g.k) * g.dil;
    offs[t] = ((rr & 1) * 2 + (cc & 1)) * PS + (rr >> 1) * ph.wq + (cc >> 1);
  }
}

// gin (H rows of length wp: the interior rows P .. P + H - 1 of the padded layout) += the phases of gq that
// `written` marks, back in the plane's layout.
template <typename T>
void merge_phases(const T* __restrict__ gq, const bool* written, int64_t P, int64_t H, int64_t wp,
                  const DwPhases& ph, T* __restrict__ gin) {
  const int64_t PS = ph.hq * ph.wq;
  for (int64_t i = 0; i < H; ++i) {
    const int64_t r = i + P;
    for (int64_t pc = 0; pc < 2; ++pc) {
      const int64_t p = (r & 1) * 2 + pc;
      if (!written[p]) continue;
      const T* src = gq + p * PS + (r >> 1) * ph.wq;
      T* d = gin + i * wp + pc;
      const int64_t n = (wp - pc + 1) / 2;
      for (int64_t j = 0; j < n; ++j) d[2 * j] += src[j];
    }
  }
}

// One stride-2 conv of the phase-split plane `q` into the dense plane `y`. `acc`: ho * wq scratch.
template <typename T>
void dw_conv_phases(const T* __restrict__ q, int64_t P, const DwPhases& ph, const ConvGeom& g, const T* wk,
                    T* __restrict__ acc, T* __restrict__ y) {
  int64_t offs[kMaxTaps];
  phase_offsets(g, P, ph, offs);
  tap_sum(q, offs, wk, g.k * g.k, g.ho * ph.wq, false, acc);
  crop_rows(acc, g.ho, g.wo, ph.wq, y);
}

// The backward of dw_conv_phases: gw[tap] = <gy, the tap's input window> (skipped when gw is null) and the
// input gradient gathered per phase into gq (phases of `written` false are overwritten, then marked).
// `gext`: q_ext scratch.
template <typename T>
void dw_conv_phases_backward(const T* __restrict__ q, int64_t P, const DwPhases& ph, const ConvGeom& g,
                             const T* wk, const T* __restrict__ gy, T* __restrict__ gext, T* __restrict__ gq,
                             bool* written, double* gw) {
  const int64_t taps = g.k * g.k, PS = ph.hq * ph.wq, L = g.ho * ph.wq;
  int64_t offs[kMaxTaps];
  phase_offsets(g, P, ph, offs);
  // gy widened to rows of wq (zeros past wo) after q_margin zeros, zeros after it up to the phase's size
  T* gpad = gext + ph.q_margin;
  std::fill(gext, gpad, T(0));
  widen_rows(gy, g.ho, g.wo, ph.wq, T(0), gpad);
  std::fill(gpad + L, gpad + PS, T(0));
  if (gw) {
    tap_dots(q, offs, taps, gpad, L, gw);
  }
  // phase p's gradient at j: sum over its taps of w_t * gpad[j - (offset of t in the phase)]
  for (int64_t p = 0; p < 4; ++p) {
    int64_t neg[kMaxTaps];
    T wsel[kMaxTaps];
    int64_t n = 0;
    for (int64_t t = 0; t < taps; ++t)
      if (offs[t] / PS == p) {
        neg[n] = p * PS - offs[t];
        wsel[n++] = wk[t];
      }
    if (n == 0) continue;
    tap_sum(gpad, neg, wsel, n, PS, written[p], gq + p * PS);
    written[p] = true;
  }
}

// One conv of the padded plane `buf` (row length wp, interior at (P, P)) into the dense plane `y`.
// `acc`: ho * wp scratch.
template <typename T>
void dw_conv_plane(const T* __restrict__ buf, int64_t P, int64_t wp, const ConvGeom& g, const T* wk,
                   T* __restrict__ acc, T* __restrict__ y) {
  const int64_t off = P - g.pad;
  if (g.stride == 1) {
    const int64_t L = g.ho * wp, taps = g.k * g.k;
    int64_t offs[kMaxTaps];
    for (int64_t t = 0; t < taps; ++t) offs[t] = (off + (t / g.k) * g.dil) * wp + off + (t % g.k) * g.dil;
    tap_sum(buf, offs, wk, taps, L, false, acc);
    crop_rows(acc, g.ho, g.wo, wp, y);
    return;
  }
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    T* __restrict__ yr = y + oh * g.wo;
    std::fill(yr, yr + g.wo, T(0));
    for (int64_t ki = 0; ki < g.k; ++ki) {
      const T* irow = buf + (oh * g.stride + off + ki * g.dil) * wp + off;
      for (int64_t kj = 0; kj < g.k; ++kj) {
        const T wv = wk[ki * g.k + kj];
        const T* __restrict__ src = irow + kj * g.dil;
        for (int64_t ow = 0; ow < g.wo; ++ow) yr[ow] += wv * src[ow * g.stride];
      }
    }
  }
}

// Weight gradient of one conv: gw[tap] = <gy, the tap's input window> (skipped when gw is null), and
// the input gradient: at stride 1 gathered into `gin` (H rows of length wp, the interior rows of the
// padded layout, columns offset by P; `gin_fresh` says whether to overwrite or add), at stride 2
// scattered into `gbuf` (padded like buf). `gext`: scratch of ext_size elements.
template <typename T>
void dw_conv_plane_backward(const T* __restrict__ buf, int64_t P, int64_t wp, int64_t H, const ConvGeom& g,
                            const T* wk, const T* __restrict__ gy, T* __restrict__ gext, int64_t ext_size,
                            int64_t margin, T* __restrict__ gin, bool gin_fresh, T* __restrict__ gbuf, double* gw) {
  const int64_t off = P - g.pad, taps = g.k * g.k;
  if (g.stride == 1) {
    const int64_t L = g.ho * wp;
    int64_t offs[kMaxTaps];
    for (int64_t t = 0; t < taps; ++t) offs[t] = (off + (t / g.k) * g.dil) * wp + off + (t % g.k) * g.dil;
    // gy widened to rows of wp (zeros past wo) with `margin` zeros before and zeros after
    T* gpad = gext + margin;
    std::fill(gext, gpad, T(0));
    widen_rows(gy, g.ho, g.wo, wp, T(0), gpad);
    std::fill(gpad + L, gext + ext_size, T(0));
    if (gw) {
      tap_dots(buf, offs, taps, gpad, L, gw);
    }
    // gin[j] = sum_t w_t * gpad[j - offs[t]] over the interior rows j in [P wp, (P + H) wp)
    int64_t neg[kMaxTaps];
    for (int64_t t = 0; t < taps; ++t) neg[t] = -offs[t];
    tap_sum(gpad + P * wp, neg, wk, taps, H * wp, !gin_fresh, gin);
    return;
  }
  for (int64_t ki = 0; ki < g.k; ++ki) {
    for (int64_t kj = 0; kj < g.k; ++kj) {
      const T wv = wk[ki * g.k + kj];
      double s = 0;
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        const int64_t o = (oh * g.stride + off + ki * g.dil) * wp + off + kj * g.dil;
        const T* gr = gy + oh * g.wo;
        const T* src = buf + o;
        T* dst = gbuf + o;
        T part = 0;
        for (int64_t ow = 0; ow < g.wo; ++ow) {
          part += src[ow * g.stride] * gr[ow];
          dst[ow * g.stride] += wv * gr[ow];
        }
        s += static_cast<double>(part);
      }
      if (gw) gw[ki * g.k + kj] = s;
    }
  }
}

// The gradient w.r.t. the untransformed input: pre'(x) * gin, where `gin` and `abuf` (the transformed
// input) point at the plane's top-left with rows of length wp. For kPreNormRelu also returns sum(grad)
// and sum(grad * (x - mu) * r).
template <typename T>
void dw_input_grad(const T* __restrict__ x, const T* __restrict__ abuf, const T* __restrict__ gin, int64_t h,
                   int64_t w, int64_t wp, int64_t pre, T mu, T r, T* __restrict__ gx, double* sg, double* sgx) {
  T lg[kLanes] = {}, lq[kLanes] = {};
  double tg = 0, tq = 0;
  for (int64_t i = 0; i < h; ++i) {
    const T* src = gin + i * wp;
    const T* xi = x + i * w;
    T* d = gx + i * w;
    if (pre == kPreNone) {
      std::copy(src, src + w, d);
    } else if (pre == kPreRelu) {
      PYNAS_SIMD
      for (int64_t j = 0; j < w; ++j) d[j] = xi[j] > T(0) ? src[j] : T(0);
    } else {
      const T* ai = abuf + i * wp;  // relu((x - mu) * r): positive exactly where the mask is
      int64_t j = 0;
      for (; j + kLanes <= w; j += kLanes) {
        PYNAS_SIMD
        for (int l = 0; l < kLanes; ++l) {
          const T v = ai[j + l] > T(0) ? src[j + l] : T(0);
          d[j + l] = v;
          lg[l] += v;
          lq[l] += v * ((xi[j + l] - mu) * r);
        }
      }
      for (; j < w; ++j) {
        const T v = ai[j] > T(0) ? src[j] : T(0);
        d[j] = v;
        tg += static_cast<double>(v);
        tq += static_cast<double>(v) * static_cast<double>((xi[j] - mu) * r);
      }
    }
  }
  if (pre == kPreNormRelu) {
    *sg = tg + lane_sum(lg);
    *sgx = tq + lane_sum(lq);
  }
}

// ---- 3x3 pools, padding 1 ----------------------------------------------------------------------------
// `buf`: (h + 2) x (w + 2) plus slack, `wp` = w + 2. The max pool's border is -inf, the avg pool's 0.

// dst[i] = the max (kMax) or the sum of src[offs[t] + i] over the 9 taps t of a 3x3 window, t in row-major order
// (tap 0 first, then each tap in turn: `v > r ? v : r`, or `r + v`), for i in [0, n). Blocks of 2 vectors stay in
// registers over the taps: each input is loaded once per tap and each output stored once.
template <typename T, bool kMax>
void pool3x3_taps(const T* __restrict__ src, const int64_t* offs, int64_t n, T* __restrict__ dst) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + 2 * E <= n; i += 2 * E) {
    V r0 = vload(src + offs[0] + i), r1 = vload(src + offs[0] + i + E);
    for (int t = 1; t < 9; ++t) {
      const V a0 = vload(src + offs[t] + i), a1 = vload(src + offs[t] + i + E);
      if constexpr (kMax) {
        r0 = a0 > r0 ? a0 : r0;
        r1 = a1 > r1 ? a1 : r1;
      } else {
        r0 += a0;
        r1 += a1;
      }
    }
    vstore(dst + i, r0);
    vstore(dst + i + E, r1);
  }
  for (; i < n; ++i) {
    T r = src[offs[0] + i];
    for (int t = 1; t < 9; ++t) {
      const T v = src[offs[t] + i];
      if constexpr (kMax) {
        r = v > r ? v : r;
      } else {
        r += v;
      }
    }
    dst[i] = r;
  }
}

// pool3x3_taps<T, true> that also writes, per output, the tap (0..8, as a T) of its first maximum in row-major
// order into idx: a tap replaces the running maximum only when strictly greater, so ties keep the earlier tap
// (torch's choice), and the maxima are pool3x3_taps's.
template <typename T>
void max3x3_taps_arg(const T* __restrict__ src, const int64_t* offs, int64_t n, T* __restrict__ dst,
                     T* __restrict__ idx) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + 2 * E <= n; i += 2 * E) {
    V r0 = vload(src + offs[0] + i), r1 = vload(src + offs[0] + i + E);
    V k0 = {}, k1 = {};
    for (int t = 1; t < 9; ++t) {
      const V a0 = vload(src + offs[t] + i), a1 = vload(src + offs[t] + i + E);
      const V tv = V{} + static_cast<T>(t);
      const auto m0 = a0 > r0, m1 = a1 > r1;
      r0 = m0 ? a0 : r0;
      r1 = m1 ? a1 : r1;
      k0 = m0 ? tv : k0;
      k1 = m1 ? tv : k1;
    }
    vstore(dst + i, r0);
    vstore(dst + i + E, r1);
    vstore(idx + i, k0);
    vstore(idx + i + E, k1);
  }
  for (; i < n; ++i) {
    T r = src[offs[0] + i], k = T(0);
    for (int t = 1; t < 9; ++t) {
      const T v = src[offs[t] + i];
      if (v > r) r = v, k = static_cast<T>(t);
    }
    dst[i] = r;
    idx[i] = k;
  }
}

// Where tap t = 3 ki + kj of output 0 reads in the phase layout of pool3x3_phases (output i reads offs[t] + i).
inline void pool3x3_phase_offsets(int64_t ho, int64_t wo, int64_t* offs) {
  const int64_t wq = wo + 1, PS = (ho + 1) * wq;
  for (int t = 0; t < 9; ++t) {
    const int64_t ki = t / 3, kj = t % 3;
    offs[t] = ((ki & 1) * 2 + (kj & 1)) * PS + (ki >> 1) * wq + (kj >> 1);
  }
}

// The row length of a 3x3 pool's loops over its outputs: the padded width w + 2 at stride 1, a phase's wo + 1 at
// stride 2 (ho rows of it).
inline int64_t pool3x3_row_len(int64_t w, int64_t s, int64_t wo) { return s == 1 ? w + 2 : wo + 1; }

// Fills offs with where tap t reads for output 0 (the padded plane at stride 1, its phases at stride 2) and returns
// the loops' row length (pool3x3_row_len).
inline int64_t pool3x3_offsets(int64_t w, int64_t s, int64_t ho, int64_t wo, int64_t* offs) {
  if (s == 1) {
    for (int t = 0; t < 9; ++t) offs[t] = (t / 3) * (w + 2) + t % 3;
  } else {
    pool3x3_phase_offsets(ho, wo, offs);
  }
  return pool3x3_row_len(w, s, wo);
}

// Where the four phases of a padded h x w plane go in a pool3x3_buf_size scratch: after the plane's h + 3 rows.
template <typename T>
inline T* pool3x3_phase_area(T* buf, int64_t h, int64_t w) {
  return buf + (h + 3) * (w + 2);
}

// The scratch a 3x3 pool of an h x w plane at stride s takes: the padded plane (h + 3 rows of w + 2), and at
// stride 2 its four phases after it (pool3x3_plane).
inline int64_t pool3x3_buf_size(int64_t h, int64_t w, int64_t s) {
  const int64_t ho = (h - 1) / s + 1, wo = (w - 1) / s + 1;
  return (h + 3) * (w + 2) + (s == 2 ? 4 * (ho + 1) * (wo + 1) + 1 : 0);
}

// Stride 2: the padded plane `buf` (h + 2 rows of wp = w + 2) split into its four phases (row parity x column
// parity), q[(2 pr + pc) PS + i wq + j] = buf[2 i + pr, 2 j + pc] with hq = ho + 1 rows of wq = wo + 1 (PS = hq wq;
// `border` where that is past the plane, and at q[4 PS]). Tap t = 3 ki + kj reads phase (ki % 2, kj % 2) from
// (ki / 2, kj / 2) on (pool3x3_phase_offsets), so output i (ho rows of wq) reads q[offs[t] + i].
template <typename T>
void pool3x3_phases(const T* __restrict__ buf, int64_t h, int64_t w, int64_t ho, int64_t wo, T border,
                    T* __restrict__ q) {
  const int64_t wp = w + 2, hq = ho + 1, wq = wo + 1, PS = hq * wq, rows = h + 2;
  for (int64_t p = 0; p < 4; ++p) {
    const int64_t pr = p >> 1, pc = p & 1;
    for (int64_t i = 0; i < hq; ++i) {
      T* d = q + p * PS + i * wq;
      const int64_t r = 2 * i + pr;
      const int64_t n = r < rows ? std::min(wq, (wp - pc + 1) / 2) : 0;
      const T* src = buf + r * wp + pc;
      for (int64_t j = 0; j < n; ++j) d[j] = src[2 * j];
      std::fill(d + n, d + wq, border);
    }
  }
  q[4 * PS] = border;
}

// gbuf (the padded plane's layout) += the phases gq of pool3x3_phases, at their places in the plane.
template <typename T>
void pool3x3_merge_phases(const T* __restrict__ gq, int64_t h, int64_t w, int64_t ho, int64_t wo,
                          T* __restrict__ gbuf) {
  const int64_t wp = w + 2, hq = ho + 1, wq = wo + 1, PS = hq * wq, rows = h + 2;
  for (int64_t p = 0; p < 4; ++p) {
    const int64_t pr = p >> 1, pc = p & 1;
    for (int64_t i = 0; i < hq; ++i) {
      const int64_t r = 2 * i + pr;
      if (r >= rows) continue;
      const T* src = gq + p * PS + i * wq;
      T* d = gbuf + r * wp + pc;
      const int64_t n = std::min(wq, (wp - pc + 1) / 2);
      for (int64_t j = 0; j < n; ++j) d[2 * j] += src[j];
    }
  }
}

// One 3x3 pool of a plane, max (border -inf) or average (border 0, each window's sum times `inv`, its
// 1 / count); `inv` is unused by the max pool. `buf`: pool3x3_buf_size scratch; `acc`: ho * (w + 2).
// Stride 1: each tap is one loop over ho rows of the padded width. Stride 2: the padded plane is split into
// its four phases (row parity x column parity, ho + 1 rows of wo + 1 each), where tap (ki, kj) reads phase
// (ki % 2, kj % 2) from (ki / 2, kj / 2) on: again one loop per tap over ho rows of wo + 1. The same
// comparisons and sums, in the same order, as a window at a time.
// With `idx` (max pool only) the tap of each output's first maximum goes there too (max3x3_taps_arg), in the
// loops' row layout: ho rows of w + 2 (stride 1) or wo + 1 (stride 2).
template <typename T, bool kMax>
void pool3x3_plane(const T* x, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo, const T* inv,
                   T* __restrict__ buf, T* __restrict__ acc, T* __restrict__ y, T* __restrict__ idx = nullptr) {
  const int64_t wp = w + 2;
  const T border = kMax ? -std::numeric_limits<T>::infinity() : T(0);
  std::fill(buf, buf + (h + 3) * wp, border);
  load_padded(x, h, w, 1, wp, kPreNone, T(0), T(1), buf);
  int64_t offs[9];
  const T* src = buf;
  if (s == 2) {
    T* q = pool3x3_phase_area(buf, h, w);
    pool3x3_phases(buf, h, w, ho, wo, border, q);
    src = q;
  }
  const int64_t wr = pool3x3_offsets(w, s, ho, wo, offs), L = ho * wr;
  if (kMax && idx) {
    max3x3_taps_arg(src, offs, L, acc, idx);
  } else {
    pool3x3_taps<T, kMax>(src, offs, L, acc);
  }
  if (!kMax && s == 1) {  // inv in the loops' layout at stride 1, dense at stride 2
    PYNAS_SIMD
    for (int64_t i = 0; i < L; ++i) acc[i] *= inv[i];
  }
  crop_rows(acc, ho, wo, wr, y);
  if (!kMax && s == 2) {
    const int64_t n = ho * wo;
    PYNAS_SIMD
    for (int64_t i = 0; i < n; ++i) y[i] *= inv[i];
  }
}

template <typename T>
void max_pool_plane(const T* x, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo, T* __restrict__ buf,
                    T* __restrict__ acc, T* __restrict__ y, T* __restrict__ idx = nullptr) {
  pool3x3_plane<T, true>(x, h, w, s, ho, wo, nullptr, buf, acc, y, idx);
}

// gbuf (the padded plane's layout) += gy routed to the first maximum of each window in row-major order (torch's
// choice), whose tap max_pool_plane recorded in `idx` (its row layout); the sums into gbuf in tap order. Stride 2
// adds into the phases gq in gbuf's tail (zero on entry), which the caller merges into gbuf
// (pool3x3_merge_phases). `scratch`: ho (w + 2).
template <typename T>
void max_pool_plane_backward(const T* __restrict__ idx, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo,
                             const T* __restrict__ gy, T* __restrict__ scratch, T* __restrict__ gbuf) {
  int64_t offs[9];
  const int64_t wr = pool3x3_offsets(w, s, ho, wo, offs);  // the row length of idx's layout
  T* dst = s == 1 ? gbuf : pool3x3_phase_area(gbuf, h, w);
  const int64_t L = ho * wr;
  T* gw = scratch;  // gy widened, zeros in the extra columns
  widen_rows(gy, ho, wo, wr, T(0), gw);
  for (int t = 0; t < 9; ++t) {
    const T tt = static_cast<T>(t);
    T* __restrict__ d = dst + offs[t];
    PYNAS_SIMD
    for (int64_t i = 0; i < L; ++i) d[i] += idx[i] == tt ? gw[i] : T(0);
  }
}

// `inv`: 1/count per output pixel, laid out with row length wp (stride 1) or wo (stride 2).
template <typename T>
void avg_pool_plane(const T* x, int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo, const T* inv,
                    T* __restrict__ buf, T* __restrict__ acc, T* __restrict__ y) {
  pool3x3_plane<T, false>(x, h, w, s, ho, wo, inv, buf, acc, y);
}

// gbuf += the average pool's input gradient from gy: each output's gy * inv to its 9 inputs, in tap order.
// Stride 2 adds into the phases gq in gbuf's tail instead (as max_pool_plane_backward). `scratch`: ho (w + 2).
template <typename T>
void avg_pool_plane_backward(int64_t h, int64_t w, int64_t s, int64_t ho, int64_t wo, const T* inv,
                             const T* __restrict__ gy, T* __restrict__ scratch, T* __restrict__ gbuf) {
  int64_t offs[9];
  const int64_t wr = pool3x3_offsets(w, s, ho, wo, offs), L = ho * wr;
  T* dst = s == 1 ? gbuf : pool3x3_phase_area(gbuf, h, w);
  // gy * inv in the loops' layout, zero in the extra columns (inv laid out like that at stride 1, dense at stride 2)
  if (s == 1) {
    widen_rows(gy, ho, wo, wr, T(0), scratch);
    PYNAS_SIMD
    for (int64_t i = 0; i < L; ++i) scratch[i] *= inv[i];
  } else {
    for (int64_t i = 0; i < ho; ++i) {
      PYNAS_SIMD
      for (int64_t j = 0; j < wo; ++j) scratch[i * wr + j] = gy[i * wo + j] * inv[i * wo + j];
      scratch[i * wr + wo] = T(0);
    }
  }
  for (int t = 0; t < 9; ++t) {
    T* __restrict__ d = dst + offs[t];
    PYNAS_SIMD
    for (int64_t i = 0; i < L; ++i) d[i] += scratch[i];
  }
}

// o[i] = A * g[i] + B * y[i] + D (a BatchNorm backward with its per-channel sums folded into A, B, D).
template <typename T>
void affine2(const T* __restrict__ g, const T* __restrict__ y, T A, T B, T D, int64_t n, T* __restrict__ o) {
  PYNAS_SIMD
  for (int64_t i = 0; i < n; ++i) o[i] = A * g[i] + B * y[i] + D;
}

// o[i] += a * y[i]
template <typename T>
void axpy(T a, const T* __restrict__ y, int64_t n, T* __restrict__ o) {
  PYNAS_SIMD
  for (int64_t i = 0; i < n; ++i) o[i] += a * y[i];
}

// ---- plane ranges: the bodies of the kernels' parallel loops --------------------------------------------

template <typename T>
void dw_forward_range(int64_t b, int64_t e, const DwArgs<T>& a) {
  std::vector<T> buf(static_cast<size_t>(a.buf_size), T(0)), acc(static_cast<size_t>(a.acc_size));
  std::vector<T> q(static_cast<size_t>(a.ph.q_size));
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % a.C;
    load_padded(a.x + plane * a.H * a.W, a.H, a.W, a.P, a.Wp, a.pre, a.mean ? a.mean[c] : T(0),
                a.rstd ? a.rstd[c] : T(1), buf.data());
    if (a.ph.q_size) split_phases(buf.data(), a.H + 2 * a.P, a.Wp, a.ph, q.data());
    for (int64_t m = 0; m < a.n; ++m) {
      const ConvGeom& g = a.geoms[m];
      T* y = a.ys[m] + plane * g.ho * g.wo;
      if (g.stride == 2) {
        dw_conv_phases(q.data(), a.P, a.ph, g, a.ws[m] + c * g.k * g.k, acc.data(), y);
      } else {
        dw_conv_plane(buf.data(), a.P, a.Wp, g, a.ws[m] + c * g.k * g.k, acc.data(), y);
      }
    }
  }
}

template <typename T>
void dw_backward_range(int64_t b, int64_t e, const DwArgs<T>& a) {
  std::vector<T> buf(static_cast<size_t>(a.buf_size), T(0)), gbuf(static_cast<size_t>(a.buf_size));
  std::vector<T> gin(static_cast<size_t>(a.H * a.Wp)), gext(static_cast<size_t>(a.ext_size));
  std::vector<T> q(static_cast<size_t>(a.ph.q_size)), gq(static_cast<size_t>(4 * a.ph.hq * a.ph.wq)),
      qext(static_cast<size_t>(a.ph.q_ext));
  bool strided = false;  // a stride other than 1 and 2 (the scalar scatter into gbuf)
  for (int64_t m = 0; m < a.n; ++m) strided = strided || (a.geoms[m].stride != 1 && a.geoms[m].stride != 2);
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % a.C;
    const T mu = a.mean ? a.mean[c] : T(0), r = a.rstd ? a.rstd[c] : T(1);
    const T* x = a.x + plane * a.H * a.W;
    load_padded(x, a.H, a.W, a.P, a.Wp, a.pre, mu, r, buf.data());
    if (a.ph.q_size) split_phases(buf.data(), a.H + 2 * a.P, a.Wp, a.ph, q.data());
    if (strided) std::fill(gbuf.begin(), gbuf.end(), T(0));
    bool fresh = true, written[4] = {false, false, false, false};
    for (int64_t m = 0; m < a.n; ++m) {
      const ConvGeom& g = a.geoms[m];
      const T* wk = a.ws[m] + c * g.k * g.k;
      const T* gy = a.gs[m] + plane * g.ho * g.wo;
      double* gw = a.partial ? a.partial + plane * a.taps + a.tap_off[m] : nullptr;
      if (g.stride == 2) {
        dw_conv_phases_backward(q.data(), a.P, a.ph, g, wk, gy, qext.data(), gq.data(), written, gw);
        continue;
      }
      dw_conv_plane_backward(buf.data(), a.P, a.Wp, a.H, g, wk, gy, gext.data(), a.ext_size, a.margin, gin.data(),
                             fresh, gbuf.data(), gw);
      fresh = fresh && g.stride != 1;
    }
    if (fresh) std::fill(gin.begin(), gin.end(), T(0));
    if (a.ph.q_size) merge_phases(gq.data(), written, a.P, a.H, a.Wp, a.ph, gin.data());
    if (strided) {  // the scattered part: gbuf's interior rows into gin
      const T* src = gbuf.data() + a.P * a.Wp;
      T* dst = gin.data();
      PYNAS_SIMD
      for (int64_t i = 0; i < a.H * a.Wp; ++i) dst[i] += src[i];
    }
    double sg = 0, sgx = 0;
    dw_input_grad(x, buf.data() + a.P * a.Wp + a.P, gin.data() + a.P, a.H, a.W, a.Wp, a.pre, mu, r,
                  a.gx + plane * a.H * a.W, &sg, &sgx);
    if (a.plane_sums) {
      a.plane_sums[plane * 2] = sg;
      a.plane_sums[plane * 2 + 1] = sgx;
    }
  }
}

template <typename T>
void moments_range(int64_t b, int64_t e, const T* p, int64_t hw, double* means, double* m2s) {
  for (int64_t plane = b; plane < e; ++plane) moments(p + plane * hw, hw, &means[plane], &m2s[plane]);
}

template <typename T>
void bn_sums_range(int64_t b, int64_t e, const T* g, const T* p, const T* mean, const T* rstd, int64_t C, int64_t hw,
                   std::vector<T>& scratch, double* part) {
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % C;
    const T* gr = g + plane * hw;
    const T* pr = p + plane * hw;
    const T mu = mean[c], r = rstd[c];
    PYNAS_SIMD
    for (int64_t i = 0; i < hw; ++i) scratch[i] = (pr[i] - mu) * r;
    part[plane * 2] = sum_lanes(gr, hw);
    part[plane * 2 + 1] = dot_lanes(gr, scratch.data(), hw);
  }
}

// gp = A[c] * g + B[c] * p + D[c] per plane.
template <typename T>
void affine2_range(int64_t b, int64_t e, const T* g, const T* p, const T* A, const T* B, const T* D, int64_t C,
                   int64_t hw, T* out) {
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % C;
    affine2(g + plane * hw, p + plane * hw, A[c], B[c], D[c], hw, out + plane * hw);
  }
}

// Forward pass 1: the pools into ymax / yavg, and the moments of every BatchNorm input (J per plane).
template <typename T>
void mix_stats_range(int64_t b, int64_t e, const MixArgs<T>& a) {
  std::vector<T> buf(static_cast<size_t>(a.pool_buf), T(0)), acc(static_cast<size_t>(a.pool_acc));
  for (int64_t plane = b; plane < e; ++plane) {
    const T* x = a.x + plane * a.H * a.W;
    double* mo = a.means + plane * a.J;
    double* qo = a.m2s + plane * a.J;
    if (a.ymax) {
      T* y = a.ymax + plane * a.HWo;
      max_pool_plane(x, a.H, a.W, a.stride, a.Ho, a.Wo, buf.data(), acc.data(), y);
      moments(y, a.HWo, &mo[0], &qo[0]);
    }
    if (a.yavg) {
      T* y = a.yavg + plane * a.HWo;
      avg_pool_plane(x, a.H, a.W, a.stride, a.Ho, a.Wo, a.inv, buf.data(), acc.data(), y);
      moments(y, a.HWo, &mo[1], &qo[1]);
    }
    for (int64_t j = 0; j < a.K; ++j) moments(a.ps[j] + plane * a.HWo, a.HWo, &mo[2 + j], &qo[2 + j]);
  }
}

// Forward pass 2: out = D[c] + w_skip * x + sum_j coef[j, c] * y_j.
template <typename T>
void mix_out_range(int64_t b, int64_t e, const MixArgs<T>& a) {
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % a.C;
    T* o = a.out + plane * a.HWo;
    const T D = a.D[c];
    if (a.has_skip) {
      const T* x = a.x + plane * a.H * a.W;
      const T ws = a.w_skip;
      PYNAS_SIMD
      for (int64_t i = 0; i < a.HWo; ++i) o[i] = D + ws * x[i];
    } else {
      std::fill(o, o + a.HWo, D);
    }
    if (a.ymax) axpy(a.coef[0 * a.C + c], a.ymax + plane * a.HWo, a.HWo, o);
    if (a.yavg) axpy(a.coef[1 * a.C + c], a.yavg + plane * a.HWo, a.HWo, o);
    for (int64_t j = 0; j < a.K; ++j) axpy(a.coef[(2 + j) * a.C + c], a.ps[j] + plane * a.HWo, a.HWo, o);
  }
}

// Backward pass 1: the pools into ymax / yavg; per plane sum(g), sum(g * y_j), sum(g * x) (S = J + 2 each).
template <typename T>
void mix_sums_range(int64_t b, int64_t e, const MixArgs<T>& a) {
  std::vector<T> buf(static_cast<size_t>(a.pool_buf), T(0)), acc(static_cast<size_t>(a.pool_acc));
  const int64_t S = a.J + 2;
  std::vector<const T*> ys(static_cast<size_t>(S));
  std::vector<int64_t> at(static_cast<size_t>(S));
  std::vector<double> dots(static_cast<size_t>(S));
  for (int64_t plane = b; plane < e; ++plane) {
    const T* x = a.x + plane * a.H * a.W;
    const T* g = a.g + plane * a.HWo;
    double* s = a.part + plane * S;
    s[0] = sum_lanes(g, a.HWo);
    // the dots with g, all in one dots_lanes call: the pools', the BatchNorm inputs', the skip's
    int64_t count = 0;
    if (a.ymax) {
      T* y = a.ymax + plane * a.HWo;
      max_pool_plane(x, a.H, a.W, a.stride, a.Ho, a.Wo, buf.data(), acc.data(), y, a.argmax + plane * a.arg_len);
      ys[count] = y, at[count++] = 1;
    }
    if (a.yavg) {
      T* y = a.yavg + plane * a.HWo;
      avg_pool_plane(x, a.H, a.W, a.stride, a.Ho, a.Wo, a.inv, buf.data(), acc.data(), y);
      ys[count] = y, at[count++] = 2;
    }
    for (int64_t j = 0; j < a.K; ++j) ys[count] = a.ps[j] + plane * a.HWo, at[count++] = 3 + j;
    if (a.has_skip) ys[count] = x, at[count++] = 1 + a.J;
    dots_lanes(ys.data(), count, g, a.HWo, dots.data());
    for (int64_t d = 0; d < count; ++d) s[at[d]] = dots[d];
  }
}

// Backward pass 2: grad of each BatchNorm input = A * g + B * y + D (coefficients per (j, c)); the ps'
// go out, the pools' go back through the pools into gx, plus w_skip * g.
template <typename T>
void mix_grads_range(int64_t b, int64_t e, const MixArgs<T>& a) {
  const int64_t wp = a.W + 2;
  std::vector<T> gbuf(static_cast<size_t>(a.pool_buf));
  std::vector<T> gy(static_cast<size_t>(a.HWo)), scratch(static_cast<size_t>(a.pool_acc));
  for (int64_t plane = b; plane < e; ++plane) {
    const int64_t c = plane % a.C;
    const T* g = a.g + plane * a.HWo;
    for (int64_t j = 0; j < a.K; ++j) {
      const int64_t q = (2 + j) * a.C + c;
      affine2(g, a.ps[j] + plane * a.HWo, a.A[q], a.B[q], a.Dg[q], a.HWo, a.gps[j] + plane * a.HWo);
    }
    if (!a.gx) continue;
    T* gx = a.gx + plane * a.H * a.W;
    if (a.ymax || a.yavg) {
      std::fill(gbuf.begin(), gbuf.end(), T(0));
      if (a.ymax) {
        const T* y = a.ymax + plane * a.HWo;
        affine2(g, y, a.A[c], a.B[c], a.Dg[c], a.HWo, gy.data());
        max_pool_plane_backward(a.argmax + plane * a.arg_len, a.H, a.W, a.stride, a.Ho, a.Wo, gy.data(),
                                scratch.data(), gbuf.data());
      }
      if (a.yavg) {
        const int64_t q = a.C + c;
        affine2(g, a.yavg + plane * a.HWo, a.A[q], a.B[q], a.Dg[q], a.HWo, gy.data());
        avg_pool_plane_backward(a.H, a.W, a.stride, a.Ho, a.Wo, a.inv, gy.data(), scratch.data(), gbuf.data());
      }
      if (a.stride == 2) pool3x3_merge_phases(pool3x3_phase_area(gbuf.data(), a.H, a.W), a.H, a.W, a.Ho, a.Wo, gbuf.data());
      for (int64_t i = 0; i < a.H; ++i) std::copy(&gbuf[(i + 1) * wp + 1], &gbuf[(i + 1) * wp + 1] + a.W, gx + i * a.W);
    } else {
      std::fill(gx, gx + a.H * a.W, T(0));
    }
    if (a.has_skip) axpy(a.w_skip, g, a.HWo, gx);
  }
}

// ---- 1x1 convs ------------------------------------------------------------------------------------------

// d_o[i] = sum_c w4[c * 4 + o] * src[c * hw + i] for o < 4 and i in [0, hw): four outputs per pass over the
// inputs, each input vector loaded once for the four (tap_sum loads it once per output). Per output value
// the same products are added in the same order (c ascending, from 0) as tap_sum's: the same results.
template <typename T>
void tap_sum4(const T* src, int64_t hw, const T* w4, int64_t cin, T* d0, T* d1, T* d2, T* d3) {
  using V = typename Vec<T>::type;
  constexpr int64_t E = sizeof(V) / sizeof(T);
  T* d[4] = {d0, d1, d2, d3};
  int64_t i = 0;
  for (; i + 2 * E <= hw; i += 2 * E) {
    V a0 = {}, a1 = {}, b0 = {}, b1 = {}, c0 = {}, c1 = {}, e0 = {}, e1 = {};
    for (int64_t c = 0; c < cin; ++c) {
      const T* p = src + c * hw + i;
      const V v0 = vload(p), v1 = vload(p + E);
      const T* wc = w4 + c * 4;
      a0 += wc[0] * v0, a1 += wc[0] * v1;
      b0 += wc[1] * v0, b1 += wc[1] * v1;
      c0 += wc[2] * v0, c1 += wc[2] * v1;
      e0 += wc[3] * v0, e1 += wc[3] * v1;
    }
    vstore(d0 + i, a0), vstore(d0 + i + E, a1), vstore(d1 + i, b0), vstore(d1 + i + E, b1);
    vstore(d2 + i, c0), vstore(d2 + i + E, c1), vstore(d3 + i, e0), vstore(d3 + i + E, e1);
  }
  for (; i < hw; ++i) {
    for (int o = 0; o < 4; ++o) {
      T r = T(0);
      for (int64_t c = 0; c < cin; ++c) r += w4[c * 4 + o] * src[c * hw + i];
      d[o][i] = r;
    }
  }
}

// out[n, o, :] = sum_c W(o, c) * in[n, c, :] for n in [b, e); W(o, c) = w[o * cin + c], or w[c * cout + o]
// when `transposed` (the backward's W^T). With `means`/`m2s`, also the moments of every output plane.
// Outputs go four at a time through tap_sum4, the last cout % 4 one at a time through tap_sum.
template <typename T>
void pw_range(int64_t b, int64_t e, const T* in, const T* w, int64_t cin, int64_t cout, int64_t hw, bool transposed,
              T* out, double* means, double* m2s) {
  std::vector<int64_t> offs(static_cast<size_t>(cin));
  std::vector<T> wcol(static_cast<size_t>(cin)), w4(static_cast<size_t>(4 * cin));
  for (int64_t c = 0; c < cin; ++c) offs[c] = c * hw;
  auto W = [&](int64_t o, int64_t c) { return transposed ? w[c * cout + o] : w[o * cin + c]; };
  const int64_t cout4 = cout - cout % 4;
  for (int64_t n = b; n < e; ++n) {
    const T* src = in + n * cin * hw;
    T* dst = out + n * cout * hw;
    for (int64_t o = 0; o < cout4; o += 4) {
      for (int64_t c = 0; c < cin; ++c)
        for (int64_t k = 0; k < 4; ++k) w4[c * 4 + k] = W(o + k, c);
      tap_sum4(src, hw, w4.data(), cin, dst + o * hw, dst + (o + 1) * hw, dst + (o + 2) * hw, dst + (o + 3) * hw);
    }
    for (int64_t o = cout4; o < cout; ++o) {
      for (int64_t c = 0; c < cin; ++c) wcol[c] = W(o, c);
      tap_sum(src, offs.data(), wcol.data(), cin, hw, false, dst + o * hw);
    }
    if (means)
      for (int64_t o = 0; o < cout; ++o) moments(dst + o * hw, hw, &means[n * cout + o], &m2s[n * cout + o]);
  }
}

// partial[n, o, c] = <g[n, o, :], in[n, c, :]> for n in [b, e) (the 1x1 conv's weight gradient, per sample).
template <typename T>
void pw_weight_grad_range(int64_t b, int64_t e, const T* g, const T* in, int64_t cin, int64_t cout, int64_t hw,
                          double* partial) {
  std::vector<const T*> rows(static_cast<size_t>(cin));
  for (int64_t n = b; n < e; ++n) {
    for (int64_t c = 0; c < cin; ++c) rows[c] = in + (n * cin + c) * hw;
    for (int64_t o = 0; o < cout; ++o) dots_lanes(rows.data(), cin, g + (n * cout + o) * hw, hw, partial + (n * cout + o) * cin);
  }
}
