// CUDA backend of the multi-tensor ops of the second-order architect step (contracts in
// csrc/include/pynas/multi_tensor.h; schemas defined in csrc/cpu/multi_tensor.cpp; argument checks shared
// through pynas/multi_tensor_checks.h).
//
// How all tensors reach ONE launch: the host cuts every tensor into chunks of at most kChunk elements (a
// chunk never spans two tensors) and writes one descriptor per chunk, {address a, address b, address c,
// length}, with the chunk's element offset already applied, into a pinned CPU int64 tensor. That table is
// copied to the device with non_blocking=true on the current stream (an async copy from pinned memory:
// no host sync; the caching host allocator keeps the pinned block alive until the copy has run), and one
// kernel runs one block per chunk. The number of tensors therefore never changes the number of launches,
// and the kernel parameter space (4 KB / 32 KB) is no limit.
//
// Launches per call (plus one small async host-to-device copy of the table, none when no element exists):
//   mt_virtual_step_  1 kernel
//   mt_sum_squares    2 kernels: per-chunk partial sums (double), then one block adds them in a fixed
//                     order (deterministic on a given GPU, no atomics)
//   mt_perturb_       1 kernel (R = r / max(sqrt(sum_sq), tiny) is computed in every block from the 0-d
//                     device tensor sum_sq; block 0 also stores it as the returned 0-d float64 tensor)
//   mt_copy_          1 kernel (bit copy, in units of the element size)
// Data-dependent scalars (sum_sq, grad_scale) are read on the device, never with .item().
// Arithmetic is in at::opmath_type<scalar_t>: float for half/bfloat16/float, double for double; the
// per-chunk partial sums of squares are stored in double.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/multi_tensor_checks.h"
#include "pynas/cuda_reduce.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

namespace pynas {
namespace cuda {
namespace mt {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per block
constexpr int kThreads = 256;

// One chunk: up to three data addresses (unused ones 0) and its number of elements.
struct Desc {
  int64_t a, b, c, n;
};
static_assert(sizeof(Desc) == 4 * sizeof(int64_t), "Desc is read from an int64 table");

// ---- host: descriptor tables --------------------------------------------------------------------------

// The chunk descriptors of tensors ts[0][i] (with partners ts[1][i], ts[2][i] where given; an undefined
// partner gives address 0), on `device`. Returns the device table (undefined when there is no chunk).
at::Tensor chunk_table(const std::vector<const std::vector<at::Tensor>*>& ts, const at::Device& device,
                       int64_t* n_chunks) {
  const std::vector<at::Tensor>& first = *ts[0];
  int64_t count = 0;
  for (const at::Tensor& t : first) count += (t.numel() + kChunk - 1) / kChunk;
  *n_chunks = count;
  if (count == 0) return at::Tensor();
  at::Tensor host = at::empty({count * 4}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  Desc* d = reinterpret_cast<Desc*>(host.mutable_data_ptr<int64_t>());
  int64_t k = 0;
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    const int64_t item = first[i].element_size();
    int64_t base[3] = {0, 0, 0};
    for (size_t j = 0; j < ts.size() && j < 3; ++j) {
      const std::vector<at::Tensor>& list = *ts[j];
      if (i < list.size() && list[i].defined() && n > 0) {
        base[j] = reinterpret_cast<int64_t>(list[i].const_data_ptr());
      }
    }
    for (int64_t b = 0; b < n; b += kChunk, ++k) {
      const int64_t off = b * item;
      d[k] = {base[0] ? base[0] + off : 0, base[1] ? base[1] + off : 0, base[2] ? base[2] + off : 0,
              std::min(kChunk, n - b)};
    }
  }
  at::Tensor dev = at::empty({count * 4}, at::TensorOptions().dtype(at::kLong).device(device));
  dev.copy_(host, /*non_blocking=*/true);  // current stream, no sync
  return dev;
}

const Desc* descs(const at::Tensor& table) {
  return table.defined() ? reinterpret_cast<const Desc*>(table.const_data_ptr<int64_t>()) : nullptr;
}

unsigned grid_of(int64_t n_chunks) {
  TORCH_CHECK(n_chunks < (int64_t{1} << 31), "pynas mt_*: too many chunks (", n_chunks, ")");
  return static_cast<unsigned>(std::max<int64_t>(n_chunks, 1));
}

// ---- device ---------------------------------------------------------------------------------------------

// w <- w - eta * (m * buf + s * g + wd * w); d.a = w, d.b = g, d.c = buf (0: none).
template <typename scalar_t, typename acc_t>
__global__ void virtual_step_kernel(const Desc* __restrict__ table, acc_t eta, acc_t m, acc_t wd,
                                    const double* __restrict__ grad_scale) {
  const Desc d = table[blockIdx.x];
  scalar_t* w = reinterpret_cast<scalar_t*>(d.a);
  const scalar_t* g = reinterpret_cast<const scalar_t*>(d.b);
  const scalar_t* buf = reinterpret_cast<const scalar_t*>(d.c);
  const acc_t s = grad_scale != nullptr ? static_cast<acc_t>(*grad_scale) : acc_t(1);
  if (buf != nullptr && m != acc_t(0)) {
    for (int64_t i = threadIdx.x; i < d.n; i += blockDim.x) {
      const acc_t wi = static_cast<acc_t>(w[i]);
      const acc_t step = s * static_cast<acc_t>(g[i]) + wd * wi + m * static_cast<acc_t>(buf[i]);
      w[i] = static_cast<scalar_t>(wi - eta * step);
    }
  } else {
    for (int64_t i = threadIdx.x; i < d.n; i += blockDim.x) {
      const acc_t wi = static_cast<acc_t>(w[i]);
      w[i] = static_cast<scalar_t>(wi - eta * (s * static_cast<acc_t>(g[i]) + wd * wi));
    }
  }
}

// partial[chunk] = sum of x^2 over the chunk (d.a = x).
template <typename scalar_t, typename acc_t>
__global__ void sum_squares_partial_kernel(const Desc* __restrict__ table, double* __restrict__ partial) {
  const Desc d = table[blockIdx.x];
  const scalar_t* x = reinterpret_cast<const scalar_t*>(d.a);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < d.n; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s += v * v;
  }
  const double total = block_sum_serial<kThreads>(static_cast<double>(s));
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// out = sum of partial[0 .. n), in a fixed order (one block).
__global__ void sum_partials_kernel(const double* __restrict__ partial, int64_t n, double* __restrict__ out) {
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  const double total = block_sum_serial<kThreads>(s);
  if (threadIdx.x == 0) *out = total;
}

// R = r / max(sqrt(sum_sq), tiny); w <- base + sign * R * v (d.a = w, d.b = base, d.c = v). Block 0
// stores R. With no chunk (n_chunks == 0) the single block only stores R.
template <typename scalar_t, typename acc_t>
__global__ void perturb_kernel(const Desc* __restrict__ table, int64_t n_chunks, const double* __restrict__ sum_sq,
                               double r, double sign, double* __restrict__ R_out) {
  const double norm = sqrt(*sum_sq);
  const double R = r / (norm < DBL_MIN ? DBL_MIN : norm);  // not fmax: a NaN norm gives a NaN R, as on the CPU
  if (blockIdx.x == 0 && threadIdx.x == 0) *R_out = R;
  if (blockIdx.x >= n_chunks) return;
  const Desc d = table[blockIdx.x];
  scalar_t* w = reinterpret_cast<scalar_t*>(d.a);
  const scalar_t* w0 = reinterpret_cast<const scalar_t*>(d.b);
  const scalar_t* v = reinterpret_cast<const scalar_t*>(d.c);
  const acc_t a = static_cast<acc_t>(sign * R);
  for (int64_t i = threadIdx.x; i < d.n; i += blockDim.x) {
    w[i] = static_cast<scalar_t>(static_cast<acc_t>(w0[i]) + a * static_cast<acc_t>(v[i]));
  }
}

// dst <- src bit for bit, in words of the element size (d.a = dst, d.b = src).
template <typename word_t>
__global__ void copy_kernel(const Desc* __restrict__ table) {
  const Desc d = table[blockIdx.x];
  word_t* dst = reinterpret_cast<word_t*>(d.a);
  const word_t* src = reinterpret_cast<const word_t*>(d.b);
  for (int64_t i = threadIdx.x; i < d.n; i += blockDim.x) dst[i] = src[i];
}

// ---- host: the ops ------------------------------------------------------------------------------------------

// A 0-d scalar as a double on `device` (no copy when it already is one; never read on the host). A CPU
// scalar goes through pinned memory with non_blocking: a copy from pageable memory would sync the host.
at::Tensor scalar_on(const at::Tensor& t, const at::Device& device) {
  at::Tensor s = t.reshape({}).to(at::kDouble);
  if (s.is_cpu()) s = s.pin_memory();
  return s.to(device, at::kDouble, /*non_blocking=*/true).contiguous();
}

void virtual_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& bufs, double eta, double momentum, double weight_decay,
                  const at::Tensor& grad_scale) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor scale = grad_scale.defined() ? scalar_on(grad_scale, device) : at::Tensor();
  int64_t n_chunks = 0;
  const std::vector<at::Tensor> no_bufs;
  const at::Tensor table = chunk_table({&params, &grads, bufs.empty() ? &no_bufs : &bufs}, device, &n_chunks);
  if (n_chunks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* s = scale.defined() ? scale.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "mt_virtual_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    virtual_step_kernel<scalar_t, acc_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(
        descs(table), static_cast<acc_t>(eta), static_cast<acc_t>(momentum), static_cast<acc_t>(weight_decay), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor sum_squares(const std::vector<at::Tensor>& xs) {
  TORCH_CHECK(!xs.empty(), "mt_sum_squares: no tensor to place the result on");  // dispatch needs one
  const at::Device device = xs[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
  int64_t n_chunks = 0;
  const at::Tensor table = chunk_table({&xs}, device, &n_chunks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({std::max<int64_t>(n_chunks, 1)}, out.options());
  if (n_chunks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mt_sum_squares", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      sum_squares_partial_kernel<scalar_t, acc_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(
          descs(table), partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), n_chunks,
                                                  out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor perturb(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& base,
                   const std::vector<at::Tensor>& v, const at::Tensor& sum_sq, double r, double sign) {
  const at::Device device = params.empty() ? sum_sq.device() : params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor ss = scalar_on(sum_sq, device);
  at::Tensor R = at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
  int64_t n_chunks = 0;
  const at::Tensor table = params.empty() ? at::Tensor() : chunk_table({&params, &base, &v}, device, &n_chunks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mt_perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    perturb_kernel<scalar_t, acc_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(
        descs(table), n_chunks, ss.const_data_ptr<double>(), r, sign, R.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return R;
}

void copy(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  if (dst.empty()) return;
  const at::Device device = dst[0].device();
  const c10::cuda::CUDAGuard guard(device);
  int64_t n_chunks = 0;
  const at::Tensor table = chunk_table({&dst, &src}, device, &n_chunks);
  if (n_chunks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dst[0].element_size()) {
    case 2:
      copy_kernel<uint16_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(descs(table));
      break;
    case 4:
      copy_kernel<uint32_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(descs(table));
      break;
    case 8:
      copy_kernel<uint64_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(descs(table));
      break;
    default:
      copy_kernel<uint8_t><<<grid_of(n_chunks), kThreads, 0, stream>>>(descs(table));
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- registration (same checks and messages as the CPU registration) ------------------------------------

// The kernels above, as CheckedOps (multi_tensor_checks.h) expects them.
struct CudaKernels {
  static constexpr auto virtual_step_ = &virtual_step;
  static constexpr auto sum_squares = &mt::sum_squares;
  static constexpr auto perturb_ = &perturb;
  static constexpr auto copy_ = &copy;
};
using Ops = pynas::multi_tensor::CheckedOps<CudaKernels>;

}  // namespace
}  // namespace mt
}  // namespace cuda
}  // namespace pynas

TORCH_LIBRARY_IMPL(pynas, CUDA, m) {
  m.impl("mt_virtual_step_", &pynas::cuda::mt::Ops::virtual_step_);
  m.impl("mt_sum_squares", &pynas::cuda::mt::Ops::sum_squares);
  m.impl("mt_perturb_", &pynas::cuda::mt::Ops::perturb_);
  m.impl("mt_copy_", &pynas::cuda::mt::Ops::copy_);
}
