// Python bindings of pynas._C: validate the arguments, then hand them to the backend of their device.
// One binding per fused op; the math lives in csrc/include/pynas/<op>.h, the backends in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu.

#include "pynas/checks.h"
#include "pynas/macros.h"
#include "pynas/mixed_sum.h"

#include <torch/python.h>

#include <string>
#include <utility>
#include <vector>

// Set by setup.py (only on the C++ side): PYNAS_WITH_CUDA when csrc/cuda is compiled in,
// PYNAS_CUDA_ARCHS (TORCH_CUDA_ARCH_LIST of the build), PYNAS_TORCH_VERSION (torch.__version__).
#ifndef PYNAS_TORCH_VERSION
#define PYNAS_TORCH_VERSION "unknown"
#endif
#ifndef PYNAS_CUDA_ARCHS
#define PYNAS_CUDA_ARCHS ""
#endif

#ifdef PYNAS_WITH_CUDA
namespace pynas {
namespace cuda {
std::string compiled_cuda_version();  // csrc/cuda/mixed_sum.cu
}  // namespace cuda
}  // namespace pynas
#endif

namespace {

[[noreturn]] void fail_device(const char* op, const at::Tensor& x, const char* name) {
#ifndef PYNAS_WITH_CUDA
  if (x.is_cuda()) {
    TORCH_CHECK(false, op, ": pynas._C was built without CUDA, got `", name, "` on ", x.device(),
                " (rebuild with a CUDA toolkit, see csrc/README.md)");
  }
#endif
  TORCH_CHECK(false, op, ": pynas._C has no kernel for device ", x.device(), " (got `", name, "` on it)");
}

void check_mixed_sum_args(const char* op, const std::vector<at::Tensor>& xs, const at::Tensor& weights) {
  pynas::checks::check_tensor_list(op, xs, "xs");
  pynas::checks::check_vector(op, weights, "weights", static_cast<int64_t>(xs.size()), "one per tensor in `xs`",
                              xs[0], "xs[0]");
}

at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs, const at::Tensor& weights) {
  constexpr const char* op = "mixed_sum_forward";
  check_mixed_sum_args(op, xs, weights);
  if (xs[0].is_cpu()) return pynas::cpu::mixed_sum_forward(xs, weights);
#ifdef PYNAS_WITH_CUDA
  if (xs[0].is_cuda()) return pynas::cuda::mixed_sum_forward(xs, weights);
#endif
  fail_device(op, xs[0], "xs[0]");
}

std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out,
                                                                  const std::vector<at::Tensor>& xs,
                                                                  const at::Tensor& weights) {
  constexpr const char* op = "mixed_sum_backward";
  check_mixed_sum_args(op, xs, weights);
  pynas::checks::check_like(op, grad_out, "grad_out", xs[0], "xs[0]");
  if (xs[0].is_cpu()) return pynas::cpu::mixed_sum_backward(grad_out, xs, weights);
#ifdef PYNAS_WITH_CUDA
  if (xs[0].is_cuda()) return pynas::cuda::mixed_sum_backward(grad_out, xs, weights);
#endif
  fail_device(op, xs[0], "xs[0]");
}

const char* host_compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " PYNAS_STRINGIFY(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef PYNAS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = pynas::cuda::compiled_cuda_version();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_archs"] = std::string(PYNAS_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version_built"] = std::string(PYNAS_TORCH_VERSION);
  info["compiler"] = std::string(host_compiler());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pynas._C: C++/CUDA kernels of pynas's fused ops (see csrc/README.md).";
  // The kernels touch no Python objects: let other Python threads run meanwhile.
  m.def("mixed_sum_forward", &mixed_sum_forward, pybind11::arg("xs"), pybind11::arg("weights"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "sum_k weights[k] * xs[k], for K tensors xs of one shape, dtype and device and weights of shape (K,).");
  m.def("mixed_sum_backward", &mixed_sum_backward, pybind11::arg("grad_out"), pybind11::arg("xs"),
        pybind11::arg("weights"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(grad_xs, grad_weights) with grad_xs[k] = weights[k] * grad_out and grad_weights[k] = sum(grad_out * xs[k]).");
  m.def("build_info", &build_info,
        "How pynas._C was built: dict of cuda, cuda_version, cuda_archs, openmp, torch_version_built, compiler.");
}
