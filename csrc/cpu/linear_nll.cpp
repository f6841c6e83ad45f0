// CPU rows kernel of linear_nll (pynas/ops/linear_nll.py drives it over chunks of rows; contract in
// csrc/include/pynas/linear_nll.h).
//
// Rows are split over threads with at::parallel_for; each row is one task's alone (its max, its sum of
// exponentials in 8 lanes added in lane order, its NLL), so nothing depends on the thread count. float rows
// take the 8-lane loops of linear_nll_rows.h (AVX2+FMA where the CPU kernels use it), double rows plain loops.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cnn_edge.h"  // isa_is_avx2
#include "pynas/linear_nll.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pynas {
namespace cpu {

namespace lnll_isa_base {
#include "linear_nll_rows.h"
}  // namespace lnll_isa_base
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace lnll_isa_avx2 {
#include "linear_nll_rows.h"
}  // namespace lnll_isa_avx2
#pragma GCC pop_options
#define PYNAS_LNLL_ISA_CALL(fn, ...) \
  (isa_is_avx2() ? lnll_isa_avx2::fn(__VA_ARGS__) : lnll_isa_base::fn(__VA_ARGS__))
#else
#define PYNAS_LNLL_ISA_CALL(fn, ...) lnll_isa_base::fn(__VA_ARGS__)
#endif

namespace {

// The double row: the same math as nll_row, in double, without lanes.
double row_nll(double* x, int64_t V, int64_t t, bool grad, double scale) {
  const double xt = x[t];
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) m = x[i] > m ? x[i] : m;
  double s = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  if (grad) {
    const double f = scale / s;
    for (int64_t i = 0; i < V; ++i) x[i] *= f;
    x[t] -= scale;
  }
  return (m + std::log(s)) - xt;
}

// The float row: the 8-lane loop of the ISA in use.
float row_nll(float* x, int64_t V, int64_t t, bool grad, double scale) {
  return PYNAS_LNLL_ISA_CALL(nll_row, x, V, t, grad, static_cast<float>(scale));
}

}  // namespace

void linear_nll_rows_(at::Tensor& logits, const at::Tensor& target, at::Tensor& nll, bool grad, double scale) {
  const int64_t R = logits.size(0), V = logits.size(1);
  const int64_t* tp = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "linear_nll: target: expected class indices in [0, ", V, "), got ",
                tp[r], " at row ", r);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, V));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "linear_nll_rows_", [&] {
    scalar_t* xp = logits.mutable_data_ptr<scalar_t>();
    scalar_t* np = nll.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) np[r] = row_nll(xp + r * V, V, tp[r], grad, scale);
    });
  });
}

}  // namespace cpu
}  // namespace pynas
