#pragma once
// Warp and block sums for the kernels in csrc/cuda, written once. Each is a fixed pattern of shuffles and
// shared-memory slots, so a sum comes out the same from run to run (no atomics). These are the first
// stage of the two-stage reductions that README.md asks for: a block leaves its partial, and a later
// kernel (or a later pass) adds the partials in a fixed order.
//
// Rules: blockDim.x is a multiple of 32 and at most MaxThreads (MaxThreads sizes the shared memory;
// __launch_bounds__(MaxThreads) on the kernel makes a bigger launch fail). Every thread of the block
// calls the block_* functions, the same number of times (they contain __syncthreads). All of them end
// with a barrier, so the next call can reuse their shared memory. Included by csrc/cuda/*.cu only.

#if !defined(__CUDACC__)
#error "pynas/cuda_reduce.cuh is for nvcc (csrc/cuda/*.cu) only"
#endif

#include <cuda_runtime.h>

namespace pynas {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over the 32 lanes of a warp: shuffle down by 16, 8, 4, 2, 1. Only lane 0 gets the full sum.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullWarpMask, v, offset);
  return v;
}

// warp_sum, then lane 0's sum is sent to every lane.
template <typename T>
__device__ __forceinline__ T warp_sum_all(T v) {
  return __shfl_sync(kFullWarpMask, warp_sum(v), 0);
}

namespace reduce_detail {

// Stage 1 of every block sum: smem[j][w] = warp_sum(v[j]) of warp w, then a barrier.
template <int MaxWarps, int N, typename T>
__device__ __forceinline__ void warp_sums_to_shared(const T (&v)[N], T (&smem)[N][MaxWarps]) {
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const T s = warp_sum(v[j]);
    if (lane == 0) smem[j][warp] = s;
  }
  __syncthreads();
}

template <int MaxThreads>
constexpr int max_warps() {
  static_assert(MaxThreads > 0 && MaxThreads % kWarpSize == 0 && MaxThreads <= 1024,
                "MaxThreads: a multiple of 32, at most 1024");
  return MaxThreads / kWarpSize;
}

}  // namespace reduce_detail

// v[j] <- sum of v[j] over the block, for each j < N at once; the sums are valid in thread 0 only.
// Order: warp_sum in each warp, then warp 0 runs warp_sum over the warps' sums (lane w holds warp w's,
// lanes past the last warp hold 0).
template <int MaxThreads, int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  constexpr int kMaxWarps = reduce_detail::max_warps<MaxThreads>();
  __shared__ T smem[N][kMaxWarps];
  reduce_detail::warp_sums_to_shared(v, smem);
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_sum(lane < warps ? smem[j][lane] : T(0));
  }
  __syncthreads();
}

// Sum of v over the block, in block_sum's order, returned to every thread.
template <int MaxThreads, typename T>
__device__ __forceinline__ T block_sum_all(T v) {
  constexpr int kMaxWarps = reduce_detail::max_warps<MaxThreads>();
  __shared__ T smem[1][kMaxWarps];
  __shared__ T total;
  const T in[1] = {v};
  reduce_detail::warp_sums_to_shared(in, smem);
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  if (warp == 0) {
    const T t = warp_sum(lane < warps ? smem[0][lane] : T(0));
    if (lane == 0) total = t;
  }
  __syncthreads();
  const T result = total;
  __syncthreads();
  return result;
}

// Sum of v over the block, valid in thread 0 (the other threads get T(0)). Another order than block_sum's:
// warp_sum in each warp, then thread 0 adds the warps' sums one by one, warp 0 first, starting from T(0).
template <int MaxThreads, typename T>
__device__ __forceinline__ T block_sum_serial(T v) {
  constexpr int kMaxWarps = reduce_detail::max_warps<MaxThreads>();
  __shared__ T smem[1][kMaxWarps];
  const T in[1] = {v};
  reduce_detail::warp_sums_to_shared(in, smem);
  const int warps = blockDim.x / kWarpSize;
  T s = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) s += smem[0][w];
  }
  __syncthreads();
  return s;
}

}  // namespace cuda
}  // namespace pynas
