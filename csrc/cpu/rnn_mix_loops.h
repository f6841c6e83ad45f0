// Element loops of the CPU rnn_mix for float (csrc/cpu/rnn_mix.cpp), included once per instruction set:
// no include guard on purpose (the includer opens a namespace and, for AVX2, a `#pragma GCC target`
// region around it, as for cnn_edge_planes.h).
//
// The loops run over one node j at a time across a tile of elements, 8 at a time in GCC vector types
// (AVX2 registers in the AVX2 variant, pairs of SSE registers in the baseline one); the tail goes
// through the same code on a zero-padded block. No libm calls inside. One exponential per element gives both sigmoid and tanh:
//   E = exp(-h),  sigmoid(h) = 1 / (1 + E),  tanh(h) = 2 / (1 + E^2) - 1 for |h| >= 0.625
// (below, where that form loses its relative accuracy, an odd polynomial). The clamp keeps E finite
// and nonzero for every h, +-inf included (sigmoid, tanh saturate to 0/1, -1/1; their derivatives to 0 or
// about 2e-19), and nothing multiplies h by 0 (relu is a select): an infinite h reaches the result only
// through the identity and relu columns, as in the reference.
// exp: vec8.h's vexp on inputs clamped to [-43, 43] (see rnn_exp).

#include "vec8.h"

inline VF rnn_exp(VF x) {
  // |x| <= 43 keeps E and E^2 normal floats (E^2 >= 4e-38): no denormal, whose arithmetic is slow on many
  // CPUs; sigmoid and tanh are then exact to float rounding except sigmoid(h < -43) = 2e-19 instead of less.
  x = x < vsplat(-43.0f) ? vsplat(-43.0f) : x;
  x = x > vsplat(43.0f) ? vsplat(43.0f) : x;
  return vexp(x);
}

// tanh, relu, sigmoid of 8 values (and relu's 0/1 derivative).
struct Acts {
  VF th, rl, sg, pos;
};

inline Acts activations8(VF h) {
  const VF E = rnn_exp(-h);
  const VF one = vsplat(1.0f), zero = vsplat(0.0f);
  Acts a;
  a.sg = one / (one + E);
  // |h| < 0.625: tanh(h) = h + h^3 P(h^2), P of degree 4 fitted to the relative error (8e-8 in float); there
  // 2 / (1 + E^2) - 1 is off by about an ulp of 1, which BatchNorm over a batch of nearly equal small values
  // turns into a large error.
  const VF z = h * h;
  const VF P = (((vsplat(-5.705006e-3f) * z + vsplat(2.0639128e-2f)) * z - vsplat(5.3739738e-2f)) * z +
                vsplat(1.33314426e-1f)) * z - vsplat(3.3333282e-1f);
  const VF small = h + h * z * P;
  const VF large = vsplat(2.0f) / (one + E * E) - one;
  a.th = z < vsplat(0.390625f) ? small : large;  // 0.625^2
  a.pos = h > zero ? one : zero;
  // a select, not h * pos: that is -inf * 0 = NaN at h = -inf (and relu(NaN) stays NaN, as torch's)
  a.rl = h < zero ? zero : h;
  return a;
}

// o[0..m) += sum over the node's term at m elements (m <= kW on the tail), through 8-lane blocks.
inline void forward_block(const float* sj, const float* cj, const float* hj, float* o, int64_t m, float p1,
                          float p2, float p3, float p4, float P) {
  float sb[kW] = {0}, cb[kW] = {0}, hb[kW] = {0}, ob[kW] = {0};
  for (int64_t i = 0; i < m; ++i) {
    sb[i] = sj[i];
    cb[i] = cj[i];
    hb[i] = hj[i];
    ob[i] = o[i];
  }
  const VF h = vload(hb), s = vload(sb), c = vload(cb);
  const Acts a = activations8(h);
  const VF A = vsplat(p1) * a.th + vsplat(p2) * a.rl + vsplat(p3) * a.sg + vsplat(p4) * h;
  const VF Ps = vsplat(P) * s;
  vstore(ob, vload(ob) + Ps + c * (A - Ps));
  for (int64_t i = 0; i < m; ++i) o[i] = ob[i];
}

// out[i] = sum_j forward_term(s[j, i], c[j, i], h[j, i], p[j]) for i in [b, e).
inline void forward_tile(const float* s, const float* c, const float* h, const float* p, int64_t J, int64_t n,
                         int64_t b, int64_t e, float* out) {
  const int64_t m = e - b, mv = m - m % kW;
  float* o = out + b;
  for (int64_t i = 0; i < m; ++i) o[i] = 0.0f;
  for (int64_t j = 0; j < J; ++j) {
    const float* pj = p + j * kFuncs;
    const float p1 = pj[1], p2 = pj[2], p3 = pj[3], p4 = pj[4];
    const float P = p1 + p2 + p3 + p4;
    const VF vp1 = vsplat(p1), vp2 = vsplat(p2), vp3 = vsplat(p3), vp4 = vsplat(p4), vP = vsplat(P);
    const float* sj = s + j * n + b;
    const float* cj = c + j * n + b;
    const float* hj = h + j * n + b;
    for (int64_t i = 0; i < mv; i += kW) {
      const VF hv = vload(hj + i), sv = vload(sj + i), cv = vload(cj + i);
      const Acts a = activations8(hv);
      const VF A = vp1 * a.th + vp2 * a.rl + vp3 * a.sg + vp4 * hv;
      const VF Ps = vP * sv;
      vstore(o + i, vload(o + i) + Ps + cv * (A - Ps));
    }
    if (mv < m) forward_block(sj + mv, cj + mv, hj + mv, o + mv, m - mv, p1, p2, p3, p4, P);
  }
}

// The backward at 8 elements: ds, dc, dh, and the 4 products g (s + c (f(h) - s)) added to d1..d4.
struct BwdCoefs {
  VF p1, p2, p3, p4, P;
};

inline BwdCoefs coefs_of(const float* pj) {
  BwdCoefs k;
  k.p1 = vsplat(pj[1]);
  k.p2 = vsplat(pj[2]);
  k.p3 = vsplat(pj[3]);
  k.p4 = vsplat(pj[4]);
  k.P = vsplat(pj[1] + pj[2] + pj[3] + pj[4]);
  return k;
}

// dpj[1..4] += the lanes of d[0..3], each summed in lane order.
inline void add_lane_sums(const VF* d, float* dpj) {
  for (int f = 0; f < 4; ++f) {
    float lanes[kW];
    vstore(lanes, d[f]);
    float sum = 0.0f;
    for (int l = 0; l < kW; ++l) sum += lanes[l];
    dpj[f + 1] += sum;
  }
}

inline void backward8(VF g, VF s, VF c, VF h, const BwdCoefs& k, VF* ds, VF* dc, VF* dh, VF* d) {
  const VF one = vsplat(1.0f);
  const Acts a = activations8(h);
  const VF A = k.p1 * a.th + k.p2 * a.rl + k.p3 * a.sg + k.p4 * h;
  const VF D = k.p1 * (one - a.th * a.th) + k.p2 * a.pos + k.p3 * a.sg * (one - a.sg) + k.p4;
  *ds = g * k.P * (one - c);
  *dc = g * (A - k.P * s);
  *dh = g * c * D;
  const VF base = g * s * (one - c);  // g (s + c (f - s)) = g s (1 - c) + g c f
  const VF gc = g * c;
  d[0] += base + gc * a.th;
  d[1] += base + gc * a.rl;
  d[2] += base + gc * a.sg;
  d[3] += base + gc * h;
}

// ds, dc, dh at [j, i] for i in [b, e), and dp[j * kFuncs + f] += sum_i g (s + c (f(h) - s)), summed in 8
// lanes and the lanes in order (fixed for a tile: independent of the thread count).
inline void backward_tile(const float* g, const float* s, const float* c, const float* h, const float* p, int64_t J,
                          int64_t n, int64_t b, int64_t e, float* ds, float* dc, float* dh, float* dp) {
  const int64_t m = e - b, mv = m - m % kW;
  const float* gb = g + b;
  for (int64_t j = 0; j < J; ++j) {
    const BwdCoefs k = coefs_of(p + j * kFuncs);
    const int64_t o = j * n + b;
    VF d[4] = {vsplat(0.0f), vsplat(0.0f), vsplat(0.0f), vsplat(0.0f)};
    VF a, bb, cc;
    for (int64_t i = 0; i < mv; i += kW) {
      backward8(vload(gb + i), vload(s + o + i), vload(c + o + i), vload(h + o + i), k, &a, &bb, &cc, d);
      vstore(ds + o + i, a);
      vstore(dc + o + i, bb);
      vstore(dh + o + i, cc);
    }
    if (mv < m) {  // the tail: zero-padded lanes (g = 0 there, so they add nothing)
      float gt[kW] = {0}, st[kW] = {0}, ct[kW] = {0}, ht[kW] = {0}, at[kW], bt[kW], ctt[kW];
      for (int64_t i = mv; i < m; ++i) {
        gt[i - mv] = gb[i];
        st[i - mv] = s[o + i];
        ct[i - mv] = c[o + i];
        ht[i - mv] = h[o + i];
      }
      backward8(vload(gt), vload(st), vload(ct), vload(ht), k, &a, &bb, &cc, d);
      vstore(at, a);
      vstore(bt, bb);
      vstore(ctt, cc);
      for (int64_t i = mv; i < m; ++i) {
        ds[o + i] = at[i - mv];
        dc[o + i] = bt[i - mv];
        dh[o + i] = ctt[i - mv];
      }
    }
    add_lane_sums(d, dp + j * kFuncs);
  }
}
