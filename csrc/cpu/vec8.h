// 8-float vectors for the CPU loops (GCC vector extensions: one AVX2 register in the AVX2 variant, a pair of
// SSE registers in the baseline one), included inside each per-ISA namespace of its includer (rnn_mix_loops.h,
// linear_nll_rows.h): no include guard on purpose.

typedef float VF __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
constexpr int kW = 8;

inline VF vsplat(float x) { return VF{x, x, x, x, x, x, x, x}; }

inline VF vload(const float* p) {
  VF v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, VF v) { __builtin_memcpy(p, &v, sizeof(v)); }

// exp of 8 floats in [-87, 88] (or NaN): Cody-Waite range reduction to |r| <= ln2/2 and a degree-6 polynomial
// (relative error < 2e-7), the 2^k scale built from its bits (k in [-126, 127]: a normal float). No libm call.
inline VF vexp(VF x) {
  const VF magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  // k from a NaN-free copy (a NaN lane gives k = 0; r and the result stay NaN), so the float-to-int
  // conversion below only sees integers in [-126, 127]
  const VF xk = x == x ? x : vsplat(0.0f);
  const VF k = (xk * vsplat(1.44269504088896341f) + magic) - magic;
  const VF r = (x - k * vsplat(0.693145751953125f)) - k * vsplat(1.42860682030941723212e-6f);
  VF p = vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  const VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
  VF scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
