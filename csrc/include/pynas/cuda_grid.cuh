#pragma once
// Grid-stride loops for the elementwise kernels in csrc/cuda, written once:
//   for (int64_t i = first_index(); i < n; i += grid_stride()) ...
// in int64 (a tensor may hold more than 2^31 elements). Included by csrc/cuda/*.cu only.

#if !defined(__CUDACC__)
#error "pynas/cuda_grid.cuh is for nvcc (csrc/cuda/*.cu) only"
#endif

#include <cuda_runtime.h>

#include <cstdint>

namespace pynas {
namespace cuda {

__device__ __forceinline__ int64_t first_index() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace cuda
}  // namespace pynas
