// The float row loop of the CPU linear_nll (csrc/cpu/linear_nll.cpp), included once per instruction set
// inside its includer's namespaces: no include guard on purpose (as rnn_mix_loops.h).

#include "vec8.h"

// Lanes 0..7 of v summed in lane order (a fixed order: the result does not depend on the thread count).
inline float lane_sum(VF v) {
  float s = 0.0f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

// One row x[0..V) of logits with target t: returns lse(x) - x[t] (the row's NLL); with `grad`, overwrites x
// with (softmax(x) - onehot(t)) * scale. exp(x - max) below -87 (under 1.7e-38) counts as 0; a NaN, an
// infinite max or a row of -inf gives NaN, as log_softmax does.
inline float nll_row(float* x, int64_t V, int64_t t, bool grad, float scale) {
  const float xt = x[t];
  const float ninf = -std::numeric_limits<float>::infinity();
  VF m8 = vsplat(ninf);
  int64_t i = 0;
  for (; i + kW <= V; i += kW) {
    const VF v = vload(x + i);
    m8 = v > m8 ? v : m8;
  }
  float m = ninf;
  for (int l = 0; l < kW; ++l) m = m8[l] > m ? m8[l] : m;
  for (; i < V; ++i) m = x[i] > m ? x[i] : m;
  const VF mv = vsplat(m), lo = vsplat(-87.0f), zero = vsplat(0.0f);
  VF s8 = zero;
  for (i = 0; i + kW <= V; i += kW) {
    const VF d = vload(x + i) - mv;
    const VF e = d < lo ? zero : vexp(d);  // NaN lanes stay NaN
    vstore(x + i, e);
    s8 += e;
  }
  float s = lane_sum(s8);
  for (; i < V; ++i) {
    const float d = x[i] - m;
    const float e = d < -87.0f ? 0.0f : std::exp(d);
    x[i] = e;
    s += e;
  }
  if (grad) {
    const float f = scale / s;
    const VF fv = vsplat(f);
    for (i = 0; i + kW <= V; i += kW) vstore(x + i, vload(x + i) * fv);
    for (; i < V; ++i) x[i] *= f;
    x[t] -= scale;
  }
  return (m + std::log(s)) - xt;
}
