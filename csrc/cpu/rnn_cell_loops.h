// Element loops and the small GEMM of the CPU RNN cell sequence (csrc/cpu/rnn_cell.cpp), included once per
// instruction set inside a namespace of its includer, after rnn_mix_loops.h (its activations8 and the 8-float
// vectors): no include guard on purpose.
//
// Each loop is written once over a lane policy L: FloatLanes (8 floats a step, the tail of a row through a
// zero-padded block) and ScalarLanes<double> (one value a step, libm's tanh and exp). A thread calls them on
// its own columns (features [f0, f1)) of row-major (rows x H) planes.

struct FloatLanes {
  using T = float;
  using V = VF;
  static constexpr int64_t W = kW;
  static V splat(float x) { return vsplat(x); }
  static V load(const float* p, int64_t m) {
    if (m == W) return vload(p);
    float t[kW] = {0};
    for (int64_t i = 0; i < m; ++i) t[i] = p[i];
    return vload(t);
  }
  static void store(float* p, V v, int64_t m) {
    if (m == W) return vstore(p, v);
    float t[kW];
    vstore(t, v);
    for (int64_t i = 0; i < m; ++i) p[i] = t[i];
  }
  static float lane_sum(V v) {  // in lane order
    float t[kW];
    vstore(t, v);
    float s = 0.0f;
    for (int64_t i = 0; i < kW; ++i) s += t[i];
    return s;
  }
  static Acts acts(V h) { return activations8(h); }
  static V sigmoid(V x) { return vsplat(1.0f) / (vsplat(1.0f) + rnn_exp(-x)); }
  static V tanh(V x) { return activations8(x).th; }
};

template <typename Real>
struct ScalarLanes {
  using T = Real;
  using V = Real;
  static constexpr int64_t W = 1;
  struct A {
    Real th, rl, sg, pos;
  };
  static V splat(Real x) { return x; }
  static V load(const Real* p, int64_t) { return *p; }
  static void store(Real* p, V v, int64_t) { *p = v; }
  static Real lane_sum(V v) { return v; }
  static A acts(V h) {
    A a;
    a.th = std::tanh(h);
    a.sg = Real(1) / (Real(1) + std::exp(-h));
    a.pos = h > Real(0) ? Real(1) : Real(0);
    a.rl = h < Real(0) ? Real(0) : h;  // relu(NaN) = NaN
    return a;
  }
  static V sigmoid(V x) { return Real(1) / (Real(1) + std::exp(-x)); }
  static V tanh(V x) { return std::tanh(x); }
};

// C[r, c] = sum_k A[r, k] B[k, c] for r < M, c < N (row-major with leading dimensions lda, ldb, ldc), each sum
// in k order: a column's value does not depend on M, N or where the caller cut the columns (at multiples of
// 2 L::W). Register blocks of 4 rows x 2 vectors; B's panel (K x 2 vectors) stays in L1 across the rows.
template <class L>
void gemm_nn(const typename L::T* A, int64_t lda, const typename L::T* B, int64_t ldb, typename L::T* C,
             int64_t ldc, int64_t M, int64_t N, int64_t K) {
  using V = typename L::V;
  constexpr int64_t W = L::W;
  int64_t c = 0;
  for (; c + 2 * W <= N; c += 2 * W) {
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) {
      const auto* a0 = A + r * lda;
      const auto* a1 = a0 + lda;
      const auto* a2 = a1 + lda;
      const auto* a3 = a2 + lda;
      V c00 = L::splat(0), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      for (int64_t k = 0; k < K; ++k) {
        const auto* bk = B + k * ldb + c;
        const V b0 = L::load(bk, W), b1 = L::load(bk + W, W);
        V x = L::splat(a0[k]);
        c00 = c00 + x * b0;
        c01 = c01 + x * b1;
        x = L::splat(a1[k]);
        c10 = c10 + x * b0;
        c11 = c11 + x * b1;
        x = L::splat(a2[k]);
        c20 = c20 + x * b0;
        c21 = c21 + x * b1;
        x = L::splat(a3[k]);
        c30 = c30 + x * b0;
        c31 = c31 + x * b1;
      }
      auto* o = C + r * ldc + c;
      L::store(o, c00, W);
      L::store(o + W, c01, W);
      L::store(o + ldc, c10, W);
      L::store(o + ldc + W, c11, W);
      L::store(o + 2 * ldc, c20, W);
      L::store(o + 2 * ldc + W, c21, W);
      L::store(o + 3 * ldc, c30, W);
      L::store(o + 3 * ldc + W, c31, W);
    }
    for (; r < M; ++r) {
      V c0 = L::splat(0), c1 = c0;
      for (int64_t k = 0; k < K; ++k) {
        const auto* bk = B + k * ldb + c;
        const V x = L::splat(A[r * lda + k]);
        c0 = c0 + x * L::load(bk, W);
        c1 = c1 + x * L::load(bk + W, W);
      }
      L::store(C + r * ldc + c, c0, W);
      L::store(C + r * ldc + c + W, c1, W);
    }
  }
  for (; c < N; c += W) {  // the last columns, one (possibly partial) vector at a time
    const int64_t m = std::min<int64_t>(W, N - c);
    for (int64_t r = 0; r < M; ++r) {
      V acc = L::splat(0);
      for (int64_t k = 0; k < K; ++k) acc = acc + L::splat(A[r * lda + k]) * L::load(B + k * ldb + c, m);
      L::store(C + r * ldc + c, acc, m);
    }
  }
}

// The step's first node on columns [f0, f1): [c0 | h0] = ch (B x 2H, the GEMM) + xw (B x 2H), c0 = sigmoid,
// h0 = tanh, u = hp + c0 (h0 - hp).
template <class L>
void first_node_forward(const typename L::T* ch, const typename L::T* xw, const typename L::T* hp, int64_t B,
                        int64_t H, int64_t f0, int64_t f1, typename L::T* c0, typename L::T* h0, typename L::T* u) {
  using V = typename L::V;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = f0; q < f1; q += L::W) {
      const int64_t m = std::min<int64_t>(L::W, f1 - q), o = b * H + q, g = b * 2 * H + q;
      const V c = L::sigmoid(L::load(ch + g, m) + L::load(xw + g, m));
      const V h = L::tanh(L::load(ch + g + H, m) + L::load(xw + g + H, m));
      const V p = L::load(hp + o, m);
      L::store(c0 + o, c, m);
      L::store(h0 + o, h, m);
      L::store(u + o, p + c * (h - p), m);
    }
}

// Node with J inputs on columns [f0, f1): c = sigmoid(ch[j, :, :H]), hh = ch[j, :, H:] (ch: J x B x 2H) into
// c, hh (J x B x H), and u (B x H) = sum_j p.. mix of (s_j, c_j, hh_j) (pj: J rows of kFuncs probabilities).
template <class L>
void node_forward(const typename L::T* ch, const typename L::T* s, const typename L::T* pj, int64_t J, int64_t B,
                  int64_t H, int64_t f0, int64_t f1, typename L::T* c, typename L::T* hh, typename L::T* u) {
  using V = typename L::V;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = f0; q < f1; q += L::W) {
      const int64_t m = std::min<int64_t>(L::W, f1 - q);
      V o = L::splat(0);
      for (int64_t j = 0; j < J; ++j) {
        const auto* p = pj + j * kFuncs;
        const int64_t e = (j * B + b) * H + q, g = (j * B + b) * 2 * H + q;
        const V cv = L::sigmoid(L::load(ch + g, m)), h = L::load(ch + g + H, m);
        L::store(c + e, cv, m);
        L::store(hh + e, h, m);
        const auto a = L::acts(h);
        const V A = L::splat(p[1]) * a.th + L::splat(p[2]) * a.rl + L::splat(p[3]) * a.sg + L::splat(p[4]) * h;
        const V Ps = L::splat(p[1] + p[2] + p[3] + p[4]) * L::load(s + e, m);
        o = o + Ps + cv * (A - Ps);
      }
      L::store(u + b * H + q, o, m);
    }
}

// The node's backward on columns [f0, f1) from gu (B x H, d of its mix output): gS[j] += d s_j, gch_j (B x 2H,
// at gch + j * gch_stride) = [d c_j c (1 - c) | d hh_j], and dp[(j * nblocks + blk) * 4 + f] = the share of d
// p_j[f + 1] of each block of kBlock columns (lanes summed in order): fixed blocks, whichever thread runs them.
template <class L>
void node_backward(const typename L::T* gu, const typename L::T* s, const typename L::T* c,
                   const typename L::T* hh, const typename L::T* pj, int64_t J, int64_t B, int64_t H, int64_t f0,
                   int64_t f1, int64_t block, int64_t nblocks, typename L::T* gS, typename L::T* gch,
                   int64_t gch_stride, typename L::T* dp) {
  using V = typename L::V;
  const V one = L::splat(1);
  for (int64_t j = 0; j < J; ++j) {
    const auto* p = pj + j * kFuncs;
    const V p1 = L::splat(p[1]), p2 = L::splat(p[2]), p3 = L::splat(p[3]), p4 = L::splat(p[4]);
    const V P = L::splat(p[1] + p[2] + p[3] + p[4]);
    auto* gj = gch + j * gch_stride;
    for (int64_t b0 = f0; b0 < f1; b0 += block) {
      const int64_t b1 = std::min(f1, b0 + block);
      V d0 = L::splat(0), d1 = d0, d2 = d0, d3 = d0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t q = b0; q < b1; q += L::W) {
          const int64_t m = std::min<int64_t>(L::W, b1 - q), e = (j * B + b) * H + q;
          const V g = L::load(gu + b * H + q, m), sv = L::load(s + e, m), cv = L::load(c + e, m);
          const V h = L::load(hh + e, m);
          const auto a = L::acts(h);
          const V A = p1 * a.th + p2 * a.rl + p3 * a.sg + p4 * h;
          const V D = p1 * (one - a.th * a.th) + p2 * a.pos + p3 * a.sg * (one - a.sg) + p4;
          L::store(gS + e, L::load(gS + e, m) + g * P * (one - cv), m);
          L::store(gj + b * 2 * H + q, g * (A - P * sv) * cv * (one - cv), m);
          L::store(gj + b * 2 * H + H + q, g * cv * D, m);
          const V base = g * sv * (one - cv), gc = g * cv;  // g (s + c (f - s)); zero-padded lanes have g = 0
          d0 = d0 + base + gc * a.th;
          d1 = d1 + base + gc * a.rl;
          d2 = d2 + base + gc * a.sg;
          d3 = d3 + base + gc * h;
        }
      auto* out = dp + (j * nblocks + b0 / block) * 4;
      out[0] = L::lane_sum(d0);
      out[1] = L::lane_sum(d1);
      out[2] = L::lane_sum(d2);
      out[3] = L::lane_sum(d3);
    }
  }
}

// The step's first node backward on columns [f0, f1) from gu = d u0: g0 (B x 2H) = [d c0 pre-sigmoid |
// d h0 pre-tanh] and gh (B x H) = d hp through the lerp (the GEMM's share is added later).
template <class L>
void first_node_backward(const typename L::T* gu, const typename L::T* c0, const typename L::T* h0,
                         const typename L::T* hp, int64_t B, int64_t H, int64_t f0, int64_t f1, typename L::T* g0,
                         typename L::T* gh) {
  using V = typename L::V;
  const V one = L::splat(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = f0; q < f1; q += L::W) {
      const int64_t m = std::min<int64_t>(L::W, f1 - q), o = b * H + q;
      const V g = L::load(gu + o, m), c = L::load(c0 + o, m), h = L::load(h0 + o, m), p = L::load(hp + o, m);
      L::store(g0 + b * 2 * H + q, g * (h - p) * c * (one - c), m);
      L::store(g0 + b * 2 * H + H + q, g * c * (one - h * h), m);
      L::store(gh + o, g - g * c, m);
    }
}
