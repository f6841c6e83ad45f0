// CUDA kernels of the fused DARTS CNN edge (contracts in csrc/include/pynas/cnn_edge.h). They compute the
// same sums as the CPU kernels (csrc/cpu/cnn_edge.cpp), which are the ones to read first.
//
// Work is split by (n, c) plane, one block per plane (grid-stride over planes). A block copies the plane
// it reads into shared memory (for the depthwise convs zero-padded and transformed by `pre` on the way),
// and its threads cover the plane's outputs in row-major order, so global reads and writes are coalesced.
// Planes too big for shared memory use the block's slice of a global scratch buffer instead: the same
// code with another pointer.
//
// Sums over the batch are made per plane (a block reduction in a fixed order, or one warp per weight
// tap) and then added over n in a fixed order by the kernel that needs them, never with atomics, so the
// results do not change from run to run. Accumulation is in acc_t (float for float16, bfloat16 and
// float32; double for float64). Nothing here waits for the device: the mixing weights stay on it.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cnn_edge.h"
#include "pynas/cuda_reduce.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

namespace pynas {
namespace cuda {
namespace {

using edge::kPreNone;
using edge::kPreNormRelu;
using edge::kPreRelu;
using edge::out_size;

// Kernel arguments carry their tensors' pointers by value: at most this many per launch (a DARTS edge
// has 4 first depthwise convs and at most 5 candidates in `ps`).
constexpr int kMaxConvs = 16;
constexpr int kMaxPs = 32;
constexpr int kMaxTerms = 2 + kMaxPs;  // BatchNorms of the mix: the two pools, then ps
constexpr int kMaxThreads = 256;
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // what a kernel gets without opting in

// ---- device helpers -------------------------------------------------------------------------------------

// The block's working memory: dynamic shared memory, or the block's slice of a global scratch buffer.
__device__ __forceinline__ unsigned char* block_memory(unsigned char* scratch, size_t stride) {
  extern __shared__ __align__(16) unsigned char edge_shared[];
  return scratch != nullptr ? scratch + static_cast<size_t>(blockIdx.x) * stride : edge_shared;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// sum_{n < count} src[n * stride] by one warp: lane l adds n = l, l + 32, ... in order, then the fixed
// tree. Every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum_strided(const T* src, int64_t count, int64_t stride) {
  T s = T(0);
  for (int64_t n = threadIdx.x & 31; n < count; n += 32) s += src[n * stride];
  return warp_sum_all(s);
}

// Mean and biased variance of one channel from per-plane (mean, sum of squared deviations) pairs at
// src[n * stride], n < count, each over per_plane values: Chan's combination, as the CPU's
// combine_moments. Called by a whole warp; every lane gets the results.
template <typename acc_t>
__device__ __forceinline__ void warp_combine_moments(const acc_t* src, int64_t count, int64_t stride,
                                                     int64_t per_plane, acc_t* mean, acc_t* var) {
  const acc_t mu = warp_sum_strided(src, count, stride) / static_cast<acc_t>(count);
  acc_t q = acc_t(0);
  for (int64_t n = threadIdx.x & 31; n < count; n += 32) {
    const acc_t d = src[n * stride] - mu;
    q += src[n * stride + 1] + static_cast<acc_t>(per_plane) * d * d;
  }
  q = warp_sum_all(q);
  *mean = mu;
  *var = q / (static_cast<acc_t>(count) * static_cast<acc_t>(per_plane));
}

__device__ __forceinline__ float square_root(float v) { return sqrtf(v); }
__device__ __forceinline__ double square_root(double v) { return sqrt(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t inv_std(acc_t var, double eps) {
  return acc_t(1) / square_root(var + static_cast<acc_t>(eps));
}

// running <- (1 - momentum) * running + momentum * batch value (unbiased variance), as BatchNorm2d does; in
// double like the CPU kernels. Either pointer may be null (statistics not tracked).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void update_running(scalar_t* rm, scalar_t* rv, acc_t mean, acc_t var, int64_t count,
                                               double momentum) {
  if (rm != nullptr) {
    const double old = static_cast<double>(static_cast<acc_t>(*rm));
    *rm = static_cast<scalar_t>(static_cast<acc_t>((1.0 - momentum) * old + momentum * static_cast<double>(mean)));
  }
  if (rv != nullptr) {
    const double old = static_cast<double>(static_cast<acc_t>(*rv));
    const double unbiased = static_cast<double>(var) * static_cast<double>(count) / static_cast<double>(count - 1);
    *rv = static_cast<scalar_t>(static_cast<acc_t>((1.0 - momentum) * old + momentum * unbiased));
  }
}

// Copies `n` values of src into dst (acc_t), block-wide.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_plane(const scalar_t* __restrict__ src, int n, acc_t* dst) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<acc_t>(src[i]);
}

// ---- depthwise convs ------------------------------------------------------------------------------------

struct ConvGeom {
  int k, stride, pad, dil, ho, wo;
};

// The convs of one launch. `out`: the outputs (forward) or the weight gradients (backward).
template <typename scalar_t>
struct Convs {
  const scalar_t* w[kMaxConvs];  // (C, 1, k, k)
  const scalar_t* g[kMaxConvs];  // backward: incoming gradients (N, C, ho, wo)
  scalar_t* out[kMaxConvs];
  ConvGeom geom[kMaxConvs];
  int tap_off[kMaxConvs];  // first of conv m's k*k taps among all taps
  int g_off[kMaxConvs];    // backward: offset of conv m's gradient plane in the block's memory
  int count, taps, g_len;
};

// Geometry of the input planes: P is the largest pad, Hp x Wp the padded plane.
struct DwPlanes {
  int64_t planes;
  int C, H, W, P, Hp, Wp;
};

template <typename scalar_t>
__device__ __forceinline__ int conv_of_tap(const Convs<scalar_t>& cv, int t) {
  int m = 0;
  while (m + 1 < cv.count && t >= cv.tap_off[m + 1]) ++m;
  return m;
}

// buf (Hp x Wp) <- pre(plane) at offset P, zeros around; pre as in cnn_edge.h, computed in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_padded(const scalar_t* __restrict__ x, const DwPlanes& pg, int pre, acc_t mu,
                                            acc_t r, acc_t* buf) {
  for (int i = threadIdx.x; i < pg.Hp * pg.Wp; i += blockDim.x) {
    const int row = i / pg.Wp - pg.P, col = i % pg.Wp - pg.P;
    acc_t v = acc_t(0);
    if (row >= 0 && row < pg.H && col >= 0 && col < pg.W) {
      v = static_cast<acc_t>(x[row * pg.W + col]);
      if (pre == kPreNormRelu) v = (v - mu) * r;
      if (pre != kPreNone) v = v > acc_t(0) ? v : acc_t(0);
    }
    buf[i] = v;
  }
}

// wts[tap_off[m] + t] <- ws[m][c, t]: the taps of channel c of every conv.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_taps(const Convs<scalar_t>& cv, int c, acc_t* wts) {
  for (int m = 0; m < cv.count; ++m) {
    const int kk = cv.geom[m].k * cv.geom[m].k;
    for (int t = threadIdx.x; t < kk; t += blockDim.x) {
      wts[cv.tap_off[m] + t] = static_cast<acc_t>(cv.w[m][static_cast<int64_t>(c) * kk + t]);
    }
  }
}

// ys[m] = dwconv(pre(x), ws[m]). Block memory: the padded plane, then the taps.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    dw_forward_kernel(const scalar_t* __restrict__ x, const Convs<scalar_t> cv, const DwPlanes pg, const int pre,
                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, unsigned char* scratch,
                      size_t scratch_stride) {
  acc_t* buf = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  acc_t* wts = buf + pg.Hp * pg.Wp;
  for (int64_t plane = blockIdx.x; plane < pg.planes; plane += gridDim.x) {
    const int c = static_cast<int>(plane % pg.C);
    const acc_t mu = pre == kPreNormRelu ? mean[c] : acc_t(0), r = pre == kPreNormRelu ? rstd[c] : acc_t(1);
    load_padded(x + plane * pg.H * pg.W, pg, pre, mu, r, buf);
    load_taps(cv, c, wts);
    __syncthreads();
    for (int m = 0; m < cv.count; ++m) {
      const ConvGeom g = cv.geom[m];
      const acc_t* wk = wts + cv.tap_off[m];
      const int off = pg.P - g.pad, n_out = g.ho * g.wo;
      scalar_t* y = cv.out[m] + plane * n_out;
      for (int o = threadIdx.x; o < n_out; o += blockDim.x) {
        const int oh = o / g.wo, ow = o - oh * g.wo;
        const acc_t* src = buf + (oh * g.stride + off) * pg.Wp + ow * g.stride + off;
        // taps in row-major order, as the CPU kernel adds them
        acc_t acc = acc_t(0);
        for (int ki = 0; ki < g.k; ++ki) {
          for (int kj = 0; kj < g.k; ++kj) acc += wk[ki * g.k + kj] * src[ki * g.dil * pg.Wp + kj * g.dil];
        }
        y[o] = static_cast<scalar_t>(acc);
      }
    }
    __syncthreads();  // buf is rewritten for the next plane
  }
}

// The backward of dw_forward_kernel for one plane per block: gx (the gradient w.r.t. x, through pre),
// and per plane part[plane * R + t] for t < grad_taps (all convs' taps, or 0 when no weight gradient is
// wanted) = sum over the plane of g_m * input at tap t, then with kPreNormRelu
// part[plane * R + grad_taps + {0, 1}] = (sum gx, sum gx * xhat). Block memory: the padded transformed
// plane, the incoming gradients' planes, the taps.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    dw_backward_kernel(const scalar_t* __restrict__ x, const Convs<scalar_t> cv, const DwPlanes pg, const int pre,
                       const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, scalar_t* __restrict__ gx,
                       acc_t* __restrict__ part, const int R, const int grad_taps, unsigned char* scratch,
                       size_t scratch_stride) {
  acc_t* buf = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  acc_t* gys = buf + pg.Hp * pg.Wp;
  acc_t* wts = gys + cv.g_len;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int HW = pg.H * pg.W;
  for (int64_t plane = blockIdx.x; plane < pg.planes; plane += gridDim.x) {
    const int c = static_cast<int>(plane % pg.C);
    const acc_t mu = pre == kPreNormRelu ? mean[c] : acc_t(0), r = pre == kPreNormRelu ? rstd[c] : acc_t(1);
    const scalar_t* xr = x + plane * HW;
    load_padded(xr, pg, pre, mu, r, buf);
    load_taps(cv, c, wts);
    for (int m = 0; m < cv.count; ++m) {
      const int n_out = cv.geom[m].ho * cv.geom[m].wo;
      load_plane(cv.g[m] + plane * n_out, n_out, gys + cv.g_off[m]);
    }
    __syncthreads();

    // gradient w.r.t. the transformed input, gathered: input (i, j) is read by output (oh, ow) of conv m
    // through tap (ki, kj) where oh * s = i + pad - ki * dil (and the same for columns). Added in the
    // order m, ki, kj, the CPU kernel's scatter order.
    acc_t sg = acc_t(0), sgx = acc_t(0);
    for (int idx = threadIdx.x; idx < HW; idx += blockDim.x) {
      const int i = idx / pg.W, j = idx - i * pg.W;
      acc_t acc = acc_t(0);
      for (int m = 0; m < cv.count; ++m) {
        const ConvGeom g = cv.geom[m];
        const acc_t* wk = wts + cv.tap_off[m];
        const acc_t* gy = gys + cv.g_off[m];
        for (int ki = 0; ki < g.k; ++ki) {
          const int th = i + g.pad - ki * g.dil;
          if (th < 0 || th % g.stride != 0 || th / g.stride >= g.ho) continue;
          const acc_t* grow = gy + (th / g.stride) * g.wo;
          for (int kj = 0; kj < g.k; ++kj) {
            const int tw = j + g.pad - kj * g.dil;
            if (tw < 0 || tw % g.stride != 0 || tw / g.stride >= g.wo) continue;
            acc += wk[ki * g.k + kj] * grow[tw / g.stride];
          }
        }
      }
      // through pre: relu's mask (on x, or on the normalised input xhat)
      const acc_t xv = static_cast<acc_t>(xr[idx]);
      acc_t v = acc;
      if (pre == kPreRelu) {
        v = xv > acc_t(0) ? acc : acc_t(0);
      } else if (pre == kPreNormRelu) {
        const acc_t xhat = (xv - mu) * r;
        v = xhat > acc_t(0) ? acc : acc_t(0);
        sg += v;
        sgx += v * xhat;
      }
      gx[plane * HW + idx] = static_cast<scalar_t>(v);
    }
    if (pre == kPreNormRelu) {  // the same for every thread of the block
      sg = block_sum_all<kMaxThreads>(sg);
      sgx = block_sum_all<kMaxThreads>(sgx);
      if (threadIdx.x == 0) {
        part[plane * R + grad_taps] = sg;
        part[plane * R + grad_taps + 1] = sgx;
      }
    }

    // weight gradient of this plane: one warp per tap, lanes over the outputs
    for (int t = warp; t < grad_taps; t += warps) {
      const int m = conv_of_tap(cv, t);
      const ConvGeom g = cv.geom[m];
      const int tl = t - cv.tap_off[m], ki = tl / g.k, kj = tl - ki * g.k;
      const int off = pg.P - g.pad, n_out = g.ho * g.wo;
      const acc_t* gy = gys + cv.g_off[m];
      const acc_t* src = buf + (off + ki * g.dil) * pg.Wp + off + kj * g.dil;
      acc_t acc = acc_t(0);
      for (int o = lane; o < n_out; o += 32) {
        const int oh = o / g.wo, ow = o - oh * g.wo;
        acc += gy[o] * src[oh * g.stride * pg.Wp + ow * g.stride];
      }
      acc = warp_sum(acc);
      if (lane == 0) part[plane * R + t] = acc;
    }
    __syncthreads();  // block memory is rewritten for the next plane
  }
}

// The per-plane partials of dw_backward_kernel summed over n in order: column r < grad_taps goes to its
// conv's weight gradient (cv.out), column grad_taps + k to sums[k * C + c]. One thread per (c, column).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    dw_reduce_kernel(const acc_t* __restrict__ part, const Convs<scalar_t> cv, int64_t N, int C, int R,
                     int grad_taps, acc_t* __restrict__ sums) {
  const int64_t total = static_cast<int64_t>(C) * R;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx / R), r = static_cast<int>(idx % R);
    acc_t s = acc_t(0);
#pragma unroll 4
    for (int64_t n = 0; n < N; ++n) s += part[(n * C + c) * R + r];
    if (r < grad_taps) {
      const int m = conv_of_tap(cv, r);
      const int kk = cv.geom[m].k * cv.geom[m].k;
      cv.out[m][static_cast<int64_t>(c) * kk + (r - cv.tap_off[m])] = static_cast<scalar_t>(s);
    } else {
      sums[static_cast<int64_t>(r - grad_taps) * C + c] = s;
    }
  }
}

// ---- BatchNorm ------------------------------------------------------------------------------------------

// part[plane] = (mean, sum of squared deviations) of each plane (two passes, the second from cache).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    bn_moments_kernel(const scalar_t* __restrict__ p, int64_t planes, int64_t HW, acc_t* __restrict__ part) {
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const scalar_t* pr = p + plane * HW;
    acc_t s = acc_t(0);
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) s += static_cast<acc_t>(pr[i]);
    const acc_t mu = block_sum_all<kMaxThreads>(s) / static_cast<acc_t>(HW);
    acc_t q = acc_t(0);
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const acc_t d = static_cast<acc_t>(pr[i]) - mu;
      q += d * d;
    }
    q = block_sum_all<kMaxThreads>(q);
    if (threadIdx.x == 0) {
      part[plane * 2] = mu;
      part[plane * 2 + 1] = q;
    }
  }
}

// Per channel (one warp each): mean, rstd and the running statistics from bn_moments_kernel's partials.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    bn_combine_kernel(const acc_t* __restrict__ part, int64_t N, int64_t C, int64_t HW, double eps, double momentum,
                      acc_t* __restrict__ mean, acc_t* __restrict__ rstd, scalar_t* rm, int64_t rm_stride,
                      scalar_t* rv, int64_t rv_stride) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); c < C; c += warps) {
    acc_t mu, var;
    warp_combine_moments(part + c * 2, N, C * 2, HW, &mu, &var);
    if ((threadIdx.x & 31) == 0) {
      mean[c] = mu;
      rstd[c] = inv_std(var, eps);
      update_running(rm != nullptr ? rm + c * rm_stride : nullptr, rv != nullptr ? rv + c * rv_stride : nullptr, mu,
                     var, N * HW, momentum);
    }
  }
}

// part[plane] = (sum g, sum g * (p - mean) * rstd): the BatchNorm backward's reductions, per plane.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    bn_grad_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ p, const acc_t* __restrict__ mean,
                        const acc_t* __restrict__ rstd, int64_t planes, int64_t C, int64_t HW,
                        acc_t* __restrict__ part) {
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t c = plane % C, base = plane * HW;
    const acc_t mu = mean[c], r = rstd[c];
    acc_t a = acc_t(0), q = acc_t(0);
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const acc_t gv = static_cast<acc_t>(g[base + i]);
      a += gv;
      q += gv * ((static_cast<acc_t>(p[base + i]) - mu) * r);
    }
    a = block_sum_all<kMaxThreads>(a);
    q = block_sum_all<kMaxThreads>(q);
    if (threadIdx.x == 0) {
      part[plane * 2] = a;
      part[plane * 2 + 1] = q;
    }
  }
}

// gp = rstd * (g - sum(g) / M - xhat * sum(g * xhat) / M), per plane; the channel sums from `sums` (2, C),
// or added up here over n from bn_grad_sums_kernel's partials (in the same order by every block).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    bn_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ p, const acc_t* __restrict__ mean,
                       const acc_t* __restrict__ rstd, const acc_t* __restrict__ sums, const acc_t* __restrict__ part,
                       int64_t N, int64_t C, int64_t HW, scalar_t* __restrict__ out) {
  __shared__ acc_t channel_sums[2];
  const acc_t M = static_cast<acc_t>(N * HW);
  for (int64_t plane = blockIdx.x; plane < N * C; plane += gridDim.x) {
    const int64_t c = plane % C, base = plane * HW;
    acc_t sg, sgx;
    if (sums != nullptr) {
      sg = sums[c];
      sgx = sums[C + c];
    } else {
      if (threadIdx.x < 32) {
        const acc_t a = warp_sum_strided(part + c * 2, N, C * 2);
        const acc_t q = warp_sum_strided(part + c * 2 + 1, N, C * 2);
        if (threadIdx.x == 0) {
          channel_sums[0] = a;
          channel_sums[1] = q;
        }
      }
      __syncthreads();
      sg = channel_sums[0];
      sgx = channel_sums[1];
    }
    const acc_t r = rstd[c], mu = mean[c];
    // gp = A * g + B * (p - mu) + D
    const acc_t A = r, B = -r * r * sgx / M, D = -r * sg / M;
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      out[base + i] = static_cast<scalar_t>(A * static_cast<acc_t>(g[base + i]) +
                                            B * (static_cast<acc_t>(p[base + i]) - mu) + D);
    }
    __syncthreads();  // channel_sums is rewritten for the next plane
  }
}

// ---- the mix --------------------------------------------------------------------------------------------

// The mix's terms: BatchNorm j (j < J = 2 + K) normalises the max pool (j = 0), the avg pool (j = 1) or
// ps[j - 2]; its weight is w[0], w[1] or w[j + 1] (w[2] is the skip's).
template <typename scalar_t>
struct MixTerms {
  const scalar_t* p[kMaxPs];
  scalar_t* gp[kMaxPs];  // backward: grad_ps
  int K, J;
  bool has_max, has_avg, has_skip;
};

template <typename scalar_t>
struct RunningStats {
  scalar_t* mean[kMaxTerms];  // null where absent or not tracked
  scalar_t* var[kMaxTerms];
  int64_t mean_stride[kMaxTerms];
  int64_t var_stride[kMaxTerms];
};

struct MixPlanes {
  int64_t N, C;
  int H, W, Ho, Wo, stride;
};

template <typename scalar_t>
__device__ __forceinline__ bool present(const MixTerms<scalar_t>& mt, int j) {
  return j >= 2 || (j == 0 ? mt.has_max : mt.has_avg);
}

__device__ __forceinline__ int weight_index(int j) { return j < 2 ? j : j + 1; }

// 3x3 max and avg pools (padding 1) at output (oh, ow) of the plane xs (H x W). `arg`: the max's index
// in xs, the first maximum in row-major window order (torch's choice, and the CPU kernel's); the avg
// divides by the number of pixels in the window (count_include_pad=False).
template <typename acc_t>
__device__ __forceinline__ void pool3x3(const acc_t* xs, const MixPlanes& mp, int oh, int ow, acc_t* mx, int* arg,
                                        acc_t* avg) {
  const int r0 = imax(oh * mp.stride - 1, 0), r1 = imin(oh * mp.stride + 2, mp.H);
  const int c0 = imax(ow * mp.stride - 1, 0), c1 = imin(ow * mp.stride + 2, mp.W);
  int a = r0 * mp.W + c0;
  acc_t m = xs[a], s = acc_t(0);
  for (int r = r0; r < r1; ++r) {
    for (int c = c0; c < c1; ++c) {
      const acc_t v = xs[r * mp.W + c];
      if (v > m) {
        m = v;
        a = r * mp.W + c;
      }
      s += v;
    }
  }
  *mx = m;
  *arg = a;
  // 1/count rounded from double, as the CPU kernel's table
  *avg = s * static_cast<acc_t>(1.0 / static_cast<double>((r1 - r0) * (c1 - c0)));
}

// Pass 1 of the mix: part[(plane * J + j) * 2 + {0, 1}] = (mean, sum of squared deviations) over the plane
// of every present BatchNorm input. Block memory: x's plane (when pooling), then one output plane.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    mix_moments_kernel(const scalar_t* __restrict__ x, const MixTerms<scalar_t> mt, const MixPlanes mp,
                       acc_t* __restrict__ part, unsigned char* scratch, size_t scratch_stride) {
  const bool pools = mt.has_max || mt.has_avg;
  const int HW = mp.H * mp.W, HWo = mp.Ho * mp.Wo;
  acc_t* xs = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  acc_t* ys = xs + (pools ? HW : 0);
  for (int64_t plane = blockIdx.x; plane < mp.N * mp.C; plane += gridDim.x) {
    if (pools) {
      load_plane(x + plane * HW, HW, xs);
      __syncthreads();
    }
    for (int j = 0; j < mt.J; ++j) {
      if (!present(mt, j)) continue;
      // each thread keeps the values it computes in ys and reads back only those
      acc_t s = acc_t(0);
      for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
        acc_t v;
        if (j < 2) {
          acc_t mx, avg;
          int arg;
          pool3x3(xs, mp, o / mp.Wo, o % mp.Wo, &mx, &arg, &avg);
          v = j == 0 ? mx : avg;
        } else {
          v = static_cast<acc_t>(mt.p[j - 2][plane * HWo + o]);
        }
        ys[o] = v;
        s += v;
      }
      const acc_t mu = block_sum_all<kMaxThreads>(s) / static_cast<acc_t>(HWo);
      acc_t q = acc_t(0);
      for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
        const acc_t d = ys[o] - mu;
        q += d * d;
      }
      q = block_sum_all<kMaxThreads>(q);
      if (threadIdx.x == 0) {
        part[(plane * mt.J + j) * 2] = mu;
        part[(plane * mt.J + j) * 2 + 1] = q;
      }
    }
    __syncthreads();  // xs is rewritten for the next plane
  }
}

// Pass 2 of the mix: out = w_skip * x + sum_j w_j * rstd_j * (y_j - mean_j). Each block adds up its
// channel's statistics from the partials (every block in the same order); the block of the channel's
// first plane (n = 0) writes them to mean/rstd (J, C) and updates the running statistics. Block memory:
// x's plane when pooling.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    mix_forward_kernel(const scalar_t* __restrict__ x, const MixTerms<scalar_t> mt, const RunningStats<scalar_t> rs,
                       const MixPlanes mp, const acc_t* __restrict__ w, const acc_t* __restrict__ part, double eps,
                       double momentum, acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                       scalar_t* __restrict__ out, unsigned char* scratch, size_t scratch_stride) {
  __shared__ acc_t term_mean[kMaxTerms], term_coef[kMaxTerms];
  const bool pools = mt.has_max || mt.has_avg;
  const int HW = mp.H * mp.W, HWo = mp.Ho * mp.Wo;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  acc_t* xs = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  for (int64_t plane = blockIdx.x; plane < mp.N * mp.C; plane += gridDim.x) {
    const int64_t n = plane / mp.C, c = plane % mp.C;
    for (int j = warp; j < mt.J; j += warps) {  // one warp per BatchNorm
      acc_t mu = acc_t(0), var = acc_t(0), r = acc_t(1);
      if (present(mt, j)) {
        warp_combine_moments(part + (c * mt.J + j) * 2, mp.N, mp.C * mt.J * 2, HWo, &mu, &var);
        r = inv_std(var, eps);
      }
      if (lane == 0) {
        term_mean[j] = mu;
        term_coef[j] = w[weight_index(j)] * r;
        if (n == 0) {
          mean_out[j * mp.C + c] = mu;
          rstd_out[j * mp.C + c] = r;
          if (present(mt, j)) {
            update_running(rs.mean[j] != nullptr ? rs.mean[j] + c * rs.mean_stride[j] : nullptr,
                           rs.var[j] != nullptr ? rs.var[j] + c * rs.var_stride[j] : nullptr, mu, var, mp.N * HWo,
                           momentum);
          }
        }
      }
    }
    if (pools) load_plane(x + plane * HW, HW, xs);
    __syncthreads();
    const acc_t w_skip = mt.has_skip ? w[2] : acc_t(0);
    for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
      acc_t acc = acc_t(0);
      if (mt.has_skip) acc = w_skip * static_cast<acc_t>(x[plane * HW + o]);  // stride 1: HWo == HW
      if (pools) {
        acc_t mx, avg;
        int arg;
        pool3x3(xs, mp, o / mp.Wo, o % mp.Wo, &mx, &arg, &avg);
        if (mt.has_max) acc += term_coef[0] * (mx - term_mean[0]);
        if (mt.has_avg) acc += term_coef[1] * (avg - term_mean[1]);
      }
      for (int j = 2; j < mt.J; ++j) {
        acc += term_coef[j] * (static_cast<acc_t>(mt.p[j - 2][plane * HWo + o]) - term_mean[j]);
      }
      out[plane * HWo + o] = static_cast<scalar_t>(acc);
    }
    __syncthreads();  // term_* and xs are rewritten for the next plane
  }
}

// Pass 1 of the mix backward, per plane: part[plane * S + s] with S = J + 2: s = 0 sum g; s = 1 + j
// sum g * y_j (present j, else 0); s = 1 + J sum g * x (skip, else 0). Block memory: x's plane when pooling.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    mix_grad_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const MixTerms<scalar_t> mt,
                         const MixPlanes mp, acc_t* __restrict__ part, unsigned char* scratch,
                         size_t scratch_stride) {
  const bool pools = mt.has_max || mt.has_avg;
  const int HW = mp.H * mp.W, HWo = mp.Ho * mp.Wo, S = mt.J + 2;
  acc_t* xs = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  for (int64_t plane = blockIdx.x; plane < mp.N * mp.C; plane += gridDim.x) {
    const scalar_t* gr = g + plane * HWo;
    acc_t* pp = part + plane * S;
    if (pools) {
      load_plane(x + plane * HW, HW, xs);
      __syncthreads();
    }
    acc_t s = acc_t(0);
    for (int o = threadIdx.x; o < HWo; o += blockDim.x) s += static_cast<acc_t>(gr[o]);
    s = block_sum_all<kMaxThreads>(s);
    if (threadIdx.x == 0) pp[0] = s;
    for (int j = 0; j < mt.J; ++j) {
      if (!present(mt, j)) {
        if (threadIdx.x == 0) pp[1 + j] = acc_t(0);
        continue;
      }
      acc_t d = acc_t(0);
      for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
        acc_t v;
        if (j < 2) {
          acc_t mx, avg;
          int arg;
          pool3x3(xs, mp, o / mp.Wo, o % mp.Wo, &mx, &arg, &avg);
          v = j == 0 ? mx : avg;
        } else {
          v = static_cast<acc_t>(mt.p[j - 2][plane * HWo + o]);
        }
        d += static_cast<acc_t>(gr[o]) * v;
      }
      d = block_sum_all<kMaxThreads>(d);
      if (threadIdx.x == 0) pp[1 + j] = d;
    }
    acc_t sx = acc_t(0);
    if (mt.has_skip) {
      for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
        sx += static_cast<acc_t>(gr[o]) * static_cast<acc_t>(x[plane * HW + o]);  // stride 1: HWo == HW
      }
      sx = block_sum_all<kMaxThreads>(sx);
    }
    if (threadIdx.x == 0) pp[1 + mt.J] = sx;
    __syncthreads();  // xs is rewritten for the next plane
  }
}

// Pass 2 of the mix backward. Each block adds up its channel's sums over n (every block in the same
// order) and applies the BatchNorm backwards: the gradient of BN input j is A_j * g + B_j * (y_j - mean_j)
// + D_j; grad_ps directly, the pools' through the pools into gx (gathered: input (i, j) takes the
// gradient of every window holding it, the max pool's only where it is the window's argmax), plus the
// skip's w_skip * g. The block of the channel's first plane writes chan[c * S + s]: s = 0 sum g,
// s = 1 + j sum g * xhat_j (present j), s = 1 + J sum g * x; mix_grad_w_kernel turns them into grad_w.
// Block memory (when pooling): x's plane, the max and avg pools' output gradients, the max's argmax.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    mix_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const MixTerms<scalar_t> mt,
                        const MixPlanes mp, const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                        const acc_t* __restrict__ rstd, const acc_t* __restrict__ part, acc_t* __restrict__ chan,
                        scalar_t* __restrict__ gx, unsigned char* scratch, size_t scratch_stride) {
  __shared__ acc_t sums[kMaxTerms + 2], coef_a[kMaxTerms], coef_b[kMaxTerms], coef_d[kMaxTerms],
      term_mean[kMaxTerms];
  const bool pools = mt.has_max || mt.has_avg;
  const int HW = mp.H * mp.W, HWo = mp.Ho * mp.Wo, S = mt.J + 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const acc_t M = static_cast<acc_t>(mp.N * HWo);
  acc_t* xs = reinterpret_cast<acc_t*>(block_memory(scratch, scratch_stride));
  acc_t* gmax = xs + HW;
  acc_t* gavg = gmax + HWo;
  int* argmax = reinterpret_cast<int*>(gavg + HWo);
  for (int64_t plane = blockIdx.x; plane < mp.N * mp.C; plane += gridDim.x) {
    const int64_t n = plane / mp.C, c = plane % mp.C;
    const scalar_t* gr = g + plane * HWo;
    for (int s = warp; s < S; s += warps) {
      const acc_t v = warp_sum_strided(part + c * S + s, mp.N, mp.C * S);
      if (lane == 0) sums[s] = v;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < mt.J; j += blockDim.x) {
      acc_t sgx = acc_t(0), A = acc_t(0), B = acc_t(0), D = acc_t(0), m = acc_t(0);
      if (present(mt, j)) {
        const acc_t wj = w[weight_index(j)], r = rstd[j * mp.C + c];
        m = mean[j * mp.C + c];
        sgx = r * (sums[1 + j] - m * sums[0]);
        A = wj * r;
        B = -wj * r * r * sgx / M;
        D = -wj * r * sums[0] / M;
      }
      coef_a[j] = A;
      coef_b[j] = B;
      coef_d[j] = D;
      term_mean[j] = m;
      if (n == 0) chan[c * S + 1 + j] = sgx;
    }
    if (n == 0 && threadIdx.x == 0) {
      chan[c * S] = sums[0];
      chan[c * S + 1 + mt.J] = sums[1 + mt.J];
    }
    if (pools && gx != nullptr) load_plane(x + plane * HW, HW, xs);
    __syncthreads();

    for (int j = 2; j < mt.J; ++j) {
      const scalar_t* pr = mt.p[j - 2] + plane * HWo;
      scalar_t* o = mt.gp[j - 2] + plane * HWo;
      for (int i = threadIdx.x; i < HWo; i += blockDim.x) {
        o[i] = static_cast<scalar_t>(coef_a[j] * static_cast<acc_t>(gr[i]) +
                                     coef_b[j] * (static_cast<acc_t>(pr[i]) - term_mean[j]) + coef_d[j]);
      }
    }
    if (gx != nullptr) {
      if (pools) {
        for (int o = threadIdx.x; o < HWo; o += blockDim.x) {
          acc_t mx, avg;
          int arg;
          const int oh = o / mp.Wo, ow = o - oh * mp.Wo;
          pool3x3(xs, mp, oh, ow, &mx, &arg, &avg);
          const acc_t gv = static_cast<acc_t>(gr[o]);
          if (mt.has_max) {
            gmax[o] = coef_a[0] * gv + coef_b[0] * (mx - term_mean[0]) + coef_d[0];
            argmax[o] = arg;
          }
          if (mt.has_avg) {
            const int ch = imin(oh * mp.stride + 2, mp.H) - imax(oh * mp.stride - 1, 0);
            const int cw = imin(ow * mp.stride + 2, mp.W) - imax(ow * mp.stride - 1, 0);
            gavg[o] = (coef_a[1] * gv + coef_b[1] * (avg - term_mean[1]) + coef_d[1]) *
                      static_cast<acc_t>(1.0 / static_cast<double>(ch * cw));
          }
        }
        __syncthreads();
      }
      const acc_t w_skip = mt.has_skip ? w[2] : acc_t(0);
      for (int idx = threadIdx.x; idx < HW; idx += blockDim.x) {
        acc_t acc = acc_t(0);
        if (pools) {
          // the windows holding (i, j): rows oh with oh * s - 1 <= i <= oh * s + 1, the same for columns;
          // added in output order, max then avg, as the CPU kernel's scatter
          const int i = idx / mp.W, jj = idx - i * mp.W, s = mp.stride;
          const int oh0 = i == 0 ? 0 : (i + s - 2) / s, oh1 = imin((i + 1) / s, mp.Ho - 1);
          const int ow0 = jj == 0 ? 0 : (jj + s - 2) / s, ow1 = imin((jj + 1) / s, mp.Wo - 1);
          if (mt.has_max) {
            for (int oh = oh0; oh <= oh1; ++oh) {
              for (int ow = ow0; ow <= ow1; ++ow) {
                if (argmax[oh * mp.Wo + ow] == idx) acc += gmax[oh * mp.Wo + ow];
              }
            }
          }
          if (mt.has_avg) {
            for (int oh = oh0; oh <= oh1; ++oh) {
              for (int ow = ow0; ow <= ow1; ++ow) acc += gavg[oh * mp.Wo + ow];
            }
          }
        }
        if (mt.has_skip) acc += w_skip * static_cast<acc_t>(gr[idx]);  // stride 1: HWo == HW
        gx[plane * HW + idx] = static_cast<scalar_t>(acc);
      }
    }
    __syncthreads();  // shared values and block memory are rewritten for the next plane
  }
}

// grad_w (3 + K,) from mix_backward_kernel's channel sums: one warp per weight, lanes over channels.
// Entries: 0 max, 1 avg, 2 skip, 3 + k ps[k]; zero where a term is absent.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    mix_grad_w_kernel(const acc_t* __restrict__ chan, const MixTerms<scalar_t> mt, int64_t C,
                      acc_t* __restrict__ grad_w) {
  const int S = mt.J + 2, warps = blockDim.x >> 5;
  for (int e = threadIdx.x >> 5; e < 3 + mt.K; e += warps) {
    int s = -1;  // column of chan
    if (e == 2) {
      s = mt.has_skip ? 1 + mt.J : -1;
    } else {
      const int j = e < 2 ? e : e - 1;
      s = present(mt, j) ? 1 + j : -1;
    }
    const acc_t v = s >= 0 ? warp_sum_strided(chan + s, C, S) : acc_t(0);
    if ((threadIdx.x & 31) == 0) grad_w[e] = v;
  }
}

// ---- host helpers ---------------------------------------------------------------------------------------

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Threads per block for a plane of `work` outputs: a multiple of 32 in [64, kMaxThreads].
int threads_for(int64_t work) {
  const int64_t t = (work + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, 64), kMaxThreads));
}

int64_t grid_for(int64_t blocks) { return std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)); }

// Where a kernel's blocks keep their plane: `bytes` of dynamic shared memory (opting in above 48 KiB
// where the device allows), else slices of a global scratch buffer (then fewer blocks, grid-stride).
struct BlockMemory {
  at::Tensor scratch;
  unsigned char* ptr = nullptr;
  size_t stride = 0;
  size_t shared = 0;
  int64_t blocks = 0;
};

template <typename Kernel>
BlockMemory block_memory_for(Kernel* kernel, int64_t planes, size_t bytes, const at::Tensor& like) {
  BlockMemory m;
  bytes = (bytes + 15) / 16 * 16;
  const size_t reserve = 2048;  // the kernels' static shared arrays
  const size_t optin = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  if (bytes + reserve <= kDefaultSharedBytes) {
    m.shared = bytes;
    m.blocks = planes;
  } else if (bytes + reserve <= optin) {
    // Always the same value (the most a launch can have), never this launch's size: two host threads
    // launching the kernel with different sizes cannot lower the limit under each other.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(optin - reserve)));
    m.shared = bytes;
    m.blocks = planes;
  } else {
    const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
    const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 30) / static_cast<int64_t>(bytes));
    m.blocks = std::min<int64_t>({planes, sms * 4, by_memory});
    m.scratch = at::empty({m.blocks * static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    m.ptr = m.scratch.mutable_data_ptr<unsigned char>();
    m.stride = bytes;
  }
  m.blocks = grid_for(m.blocks);
  return m;
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_int_sizes(const char* op, int64_t plane_values) {
  TORCH_CHECK(plane_values < (int64_t{1} << 30), op, ": planes of ", plane_values,
              " values are too large for the CUDA kernel (at most 2^30 per plane)");
}

template <typename scalar_t>
Convs<scalar_t> make_convs(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& ws,
                           const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                           const std::vector<int64_t>& dils, int64_t* max_pad) {
  TORCH_CHECK(ws.size() <= static_cast<size_t>(kMaxConvs), op, ": the CUDA kernel takes at most ", kMaxConvs,
              " weights in ws, got ", ws.size());
  Convs<scalar_t> cv{};
  cv.count = static_cast<int>(ws.size());
  int64_t taps = 0, g_len = 0, P = 0;
  for (int m = 0; m < cv.count; ++m) {
    const int64_t k = ws[m].size(-1);
    const int64_t ho = out_size(x.size(2), k, strides[m], pads[m], dils[m]);
    const int64_t wo = out_size(x.size(3), k, strides[m], pads[m], dils[m]);
    check_int_sizes(op, ho * wo);
    check_int_sizes(op, k * k);
    TORCH_CHECK(strides[m] < INT_MAX && pads[m] < (1 << 20) && dils[m] < (1 << 20), op, ": conv ", m,
                " has a stride, pad or dilation too large for the CUDA kernel");
    cv.w[m] = ws[m].const_data_ptr<scalar_t>();
    cv.geom[m] = {static_cast<int>(k), static_cast<int>(strides[m]), static_cast<int>(pads[m]),
                  static_cast<int>(dils[m]), static_cast<int>(ho), static_cast<int>(wo)};
    cv.tap_off[m] = static_cast<int>(taps);
    cv.g_off[m] = static_cast<int>(g_len);
    taps += k * k;
    g_len += ho * wo;
    P = std::max(P, pads[m]);
  }
  check_int_sizes(op, taps);
  check_int_sizes(op, g_len);
  cv.taps = static_cast<int>(taps);
  cv.g_len = static_cast<int>(g_len);
  *max_pad = P;
  return cv;
}

DwPlanes dw_planes(const char* op, const at::Tensor& x, int64_t P) {
  const int64_t Hp = x.size(2) + 2 * P, Wp = x.size(3) + 2 * P;
  check_int_sizes(op, Hp * Wp);
  return {x.size(0) * x.size(1), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
          static_cast<int>(x.size(3)), static_cast<int>(P), static_cast<int>(Hp), static_cast<int>(Wp)};
}

template <typename scalar_t>
MixTerms<scalar_t> make_terms(const char* op, const std::vector<at::Tensor>& ps, bool has_max, bool has_avg,
                              bool has_skip) {
  TORCH_CHECK(ps.size() <= static_cast<size_t>(kMaxPs), op, ": the CUDA kernel takes at most ", kMaxPs,
              " tensors in ps, got ", ps.size());
  MixTerms<scalar_t> mt{};
  mt.K = static_cast<int>(ps.size());
  mt.J = 2 + mt.K;
  mt.has_max = has_max;
  mt.has_avg = has_avg;
  mt.has_skip = has_skip;
  for (int k = 0; k < mt.K; ++k) mt.p[k] = ps[k].const_data_ptr<scalar_t>();
  return mt;
}

MixPlanes mix_planes(const char* op, const at::Tensor& x, int64_t stride) {
  const int64_t Ho = out_size(x.size(2), 3, stride, 1, 1), Wo = out_size(x.size(3), 3, stride, 1, 1);
  check_int_sizes(op, x.size(2) * x.size(3));
  return {x.size(0), x.size(1), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<int>(Ho),
          static_cast<int>(Wo), static_cast<int>(stride)};
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------------------

std::vector<at::Tensor> cnn_edge_dw_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean_in,
                                        const at::Tensor& rstd_in) {
  constexpr const char* op = "cnn_edge_dw_forward";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const std::vector<at::Tensor> ws = contiguous_all(ws_in);
  at::Tensor mean, rstd;
  if (pre == kPreNormRelu) {
    mean = mean_in.contiguous();
    rstd = rstd_in.contiguous();
  }
  std::vector<at::Tensor> ys;
  for (size_t m = 0; m < ws.size(); ++m) {
    const int64_t k = ws[m].size(-1);
    ys.push_back(at::empty({x.size(0), x.size(1), out_size(x.size(2), k, strides[m], pads[m], dils[m]),
                            out_size(x.size(3), k, strides[m], pads[m], dils[m])},
                           x.options()));
  }
  if (x.size(0) * x.size(1) == 0) return ys;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnn_edge_dw_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t P = 0;
    Convs<scalar_t> cv = make_convs<scalar_t>(op, x, ws, strides, pads, dils, &P);
    int64_t work = x.size(2) * x.size(3);
    for (int m = 0; m < cv.count; ++m) {
      cv.out[m] = ys[m].mutable_data_ptr<scalar_t>();
      work = std::max<int64_t>(work, static_cast<int64_t>(cv.geom[m].ho) * cv.geom[m].wo);
    }
    const DwPlanes pg = dw_planes(op, x, P);
    auto* kernel = &dw_forward_kernel<scalar_t, acc_t>;
    const BlockMemory mem =
        block_memory_for(kernel, pg.planes, sizeof(acc_t) * (static_cast<size_t>(pg.Hp) * pg.Wp + cv.taps), x);
    kernel<<<static_cast<unsigned int>(mem.blocks), threads_for(work), mem.shared, stream>>>(
        x.const_data_ptr<scalar_t>(), cv, pg, static_cast<int>(pre),
        pre == kPreNormRelu ? mean.const_data_ptr<acc_t>() : nullptr,
        pre == kPreNormRelu ? rstd.const_data_ptr<acc_t>() : nullptr, mem.ptr, mem.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ys;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_dw_backward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& ws_in, const std::vector<at::Tensor>& gs_in,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean_in, const at::Tensor& rstd_in, bool need_grad_w) {
  constexpr const char* op = "cnn_edge_dw_backward";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const std::vector<at::Tensor> ws = contiguous_all(ws_in), gs = contiguous_all(gs_in);
  at::Tensor mean, rstd;
  if (pre == kPreNormRelu) {
    mean = mean_in.contiguous();
    rstd = rstd_in.contiguous();
  }
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor gx = at::empty_like(x);
  std::vector<at::Tensor> gws;  // empty unless need_grad_w, as on the CPU
  if (need_grad_w) {
    for (const auto& w : ws) gws.push_back(at::empty_like(w));
  }
  const bool want_sums = pre == kPreNormRelu;
  at::Tensor sums;
  if (want_sums) sums = at::empty({2, C}, x.options().dtype(acc_dtype(x)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnn_edge_dw_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t P = 0;
    Convs<scalar_t> cv = make_convs<scalar_t>(op, x, ws, strides, pads, dils, &P);
    int64_t work = x.size(2) * x.size(3);
    for (int m = 0; m < cv.count; ++m) {
      cv.g[m] = gs[m].const_data_ptr<scalar_t>();
      if (need_grad_w) cv.out[m] = gws[m].mutable_data_ptr<scalar_t>();
      work = std::max<int64_t>(work, static_cast<int64_t>(cv.geom[m].ho) * cv.geom[m].wo);
    }
    const DwPlanes pg = dw_planes(op, x, P);
    const int grad_taps = need_grad_w ? cv.taps : 0, R = grad_taps + (want_sums ? 2 : 0);
    at::Tensor part = at::empty({pg.planes * R}, x.options().dtype(acc_dtype(x)));
    if (pg.planes > 0) {
      auto* kernel = &dw_backward_kernel<scalar_t, acc_t>;
      const size_t values = static_cast<size_t>(pg.Hp) * pg.Wp + cv.g_len + cv.taps;
      const BlockMemory mem = block_memory_for(kernel, pg.planes, sizeof(acc_t) * values, x);
      kernel<<<static_cast<unsigned int>(mem.blocks), threads_for(work), mem.shared, stream>>>(
          x.const_data_ptr<scalar_t>(), cv, pg, static_cast<int>(pre),
          want_sums ? mean.const_data_ptr<acc_t>() : nullptr, want_sums ? rstd.const_data_ptr<acc_t>() : nullptr,
          gx.mutable_data_ptr<scalar_t>(), R > 0 ? part.mutable_data_ptr<acc_t>() : nullptr, R, grad_taps, mem.ptr,
          mem.stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t outputs = C * R;
    if (outputs > 0) {
      dw_reduce_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned int>(grid_for((outputs + kMaxThreads - 1) / kMaxThreads)), kMaxThreads, 0,
             stream>>>(pg.planes > 0 ? part.const_data_ptr<acc_t>() : nullptr, cv, N, static_cast<int>(C), R,
                       grad_taps, want_sums ? sums.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gws, sums};
}

std::tuple<at::Tensor, at::Tensor> cnn_edge_bn_stats(const at::Tensor& p_in, double eps, double momentum,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var) {
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor mean = at::empty({C}, p.options().dtype(acc_dtype(p)));
  at::Tensor rstd = at::empty({C}, p.options().dtype(acc_dtype(p)));
  if (N * C == 0) return {mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "cnn_edge_bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part = at::empty({N * C * 2}, mean.options());
    bn_moments_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(grid_for(N * C)), threads_for(HW), 0, stream>>>(
        p.const_data_ptr<scalar_t>(), N * C, HW, part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kWarpsPerBlock = kMaxThreads / 32;
    bn_combine_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(grid_for((C + kWarpsPerBlock - 1) / kWarpsPerBlock)), kMaxThreads, 0, stream>>>(
            part.const_data_ptr<acc_t>(), N, C, HW, eps, momentum, mean.mutable_data_ptr<acc_t>(),
            rstd.mutable_data_ptr<acc_t>(),
            running_mean.defined() ? running_mean.mutable_data_ptr<scalar_t>() : nullptr,
            running_mean.defined() ? running_mean.stride(0) : 0,
            running_var.defined() ? running_var.mutable_data_ptr<scalar_t>() : nullptr,
            running_var.defined() ? running_var.stride(0) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, rstd};
}

at::Tensor cnn_edge_bn_backward(const at::Tensor& g_in, const at::Tensor& p_in, const at::Tensor& mean_in,
                            const at::Tensor& rstd_in, const at::Tensor& sums_in) {
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor g = g_in.contiguous(), p = p_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor sums = sums_in.defined() ? sums_in.contiguous() : sums_in;
  const int64_t N = p.size(0), C = p.size(1), HW = p.size(2) * p.size(3);
  at::Tensor gp = at::empty_like(p);
  if (p.numel() == 0) return gp;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "cnn_edge_bn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const unsigned int grid = static_cast<unsigned int>(grid_for(N * C));
    at::Tensor part;
    if (!sums.defined()) {
      part = at::empty({N * C * 2}, mean.options());
      bn_grad_sums_kernel<scalar_t, acc_t><<<grid, threads_for(HW), 0, stream>>>(
          g.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          rstd.const_data_ptr<acc_t>(), N * C, C, HW, part.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    bn_backward_kernel<scalar_t, acc_t><<<grid, threads_for(HW), 0, stream>>>(
        g.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), sums.defined() ? sums.const_data_ptr<acc_t>() : nullptr,
        sums.defined() ? nullptr : part.const_data_ptr<acc_t>(), N, C, HW, gp.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gp;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_mix_forward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& ps_in, const at::Tensor& w, int64_t stride, bool has_max,
    bool has_avg, bool has_skip, double eps, double momentum, const std::vector<at::Tensor>& running_means,
    const std::vector<at::Tensor>& running_vars) {
  constexpr const char* op = "cnn_edge_mix_forward";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const std::vector<at::Tensor> ps = contiguous_all(ps_in);
  const MixPlanes mp = mix_planes(op, x, stride);
  const int64_t K = static_cast<int64_t>(ps.size()), J = 2 + K, N = mp.N, C = mp.C;
  const int64_t HW = static_cast<int64_t>(mp.H) * mp.W, HWo = static_cast<int64_t>(mp.Ho) * mp.Wo;
  const bool pools = has_max || has_avg;
  at::Tensor out = at::empty({N, C, mp.Ho, mp.Wo}, x.options());
  at::Tensor mean = at::empty({J, C}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd = at::empty({J, C}, x.options().dtype(acc_dtype(x)));
  if (N * C == 0) return {out, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnn_edge_mix_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MixTerms<scalar_t> mt = make_terms<scalar_t>(op, ps, has_max, has_avg, has_skip);
    RunningStats<scalar_t> rs{};
    for (int64_t j = 0; j < J; ++j) {
      const at::Tensor& rm = j < static_cast<int64_t>(running_means.size()) ? running_means[j] : at::Tensor();
      const at::Tensor& rv = j < static_cast<int64_t>(running_vars.size()) ? running_vars[j] : at::Tensor();
      if (rm.defined()) {
        rs.mean[j] = rm.mutable_data_ptr<scalar_t>();
        rs.mean_stride[j] = rm.stride(0);
      }
      if (rv.defined()) {
        rs.var[j] = rv.mutable_data_ptr<scalar_t>();
        rs.var_stride[j] = rv.stride(0);
      }
    }
    const at::Tensor w_acc = w.to(acc_dtype(x)).contiguous();  // on the device: no sync
    at::Tensor part = at::empty({N * C * J * 2}, mean.options());
    const int threads = threads_for(std::max(HW, HWo));

    auto* moments = &mix_moments_kernel<scalar_t, acc_t>;
    const BlockMemory mem1 =
        block_memory_for(moments, N * C, sizeof(acc_t) * static_cast<size_t>((pools ? HW : 0) + HWo), x);
    moments<<<static_cast<unsigned int>(mem1.blocks), threads, mem1.shared, stream>>>(
        x.const_data_ptr<scalar_t>(), mt, mp, part.mutable_data_ptr<acc_t>(), mem1.ptr, mem1.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto* mix = &mix_forward_kernel<scalar_t, acc_t>;
    const BlockMemory mem2 = block_memory_for(mix, N * C, sizeof(acc_t) * static_cast<size_t>(pools ? HW : 0), x);
    mix<<<static_cast<unsigned int>(mem2.blocks), threads, mem2.shared, stream>>>(
        x.const_data_ptr<scalar_t>(), mt, rs, mp, w_acc.const_data_ptr<acc_t>(), part.const_data_ptr<acc_t>(), eps,
        momentum, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        mem2.ptr, mem2.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_mix_backward(
    const at::Tensor& g_in, const at::Tensor& x_in, const std::vector<at::Tensor>& ps_in, const at::Tensor& w,
    int64_t stride, bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  constexpr const char* op = "cnn_edge_mix_backward";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const std::vector<at::Tensor> ps = contiguous_all(ps_in);
  const MixPlanes mp = mix_planes(op, x, stride);
  const int64_t K = static_cast<int64_t>(ps.size()), J = 2 + K, S = J + 2, N = mp.N, C = mp.C;
  const int64_t HW = static_cast<int64_t>(mp.H) * mp.W, HWo = static_cast<int64_t>(mp.Ho) * mp.Wo;
  const bool pools = has_max || has_avg;
  at::Tensor gx;
  if (pools || has_skip) gx = at::empty_like(x);
  std::vector<at::Tensor> gps;
  for (const auto& p : ps) gps.push_back(at::empty_like(p));
  if (N * C == 0) return {gx, gps, at::zeros({3 + K}, w.options())};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_w;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnn_edge_mix_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MixTerms<scalar_t> mt = make_terms<scalar_t>(op, ps, has_max, has_avg, has_skip);
    for (int64_t k = 0; k < K; ++k) mt.gp[k] = gps[k].mutable_data_ptr<scalar_t>();
    const at::Tensor w_acc = w.to(acc_dtype(x)).contiguous();  // on the device: no sync
    at::Tensor part = at::empty({N * C * S}, mean.options());
    at::Tensor chan = at::empty({C * S}, mean.options());
    at::Tensor grad_w_acc = at::empty({3 + K}, mean.options());
    const int threads = threads_for(std::max(HW, HWo));

    auto* sums = &mix_grad_sums_kernel<scalar_t, acc_t>;
    const BlockMemory mem1 = block_memory_for(sums, N * C, sizeof(acc_t) * static_cast<size_t>(pools ? HW : 0), x);
    sums<<<static_cast<unsigned int>(mem1.blocks), threads, mem1.shared, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mt, mp, part.mutable_data_ptr<acc_t>(), mem1.ptr,
        mem1.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto* apply = &mix_backward_kernel<scalar_t, acc_t>;
    // x's plane, the pools' output gradients and the max's argmax
    const size_t bytes2 =
        pools ? sizeof(acc_t) * static_cast<size_t>(HW + 2 * HWo) + sizeof(int) * static_cast<size_t>(HWo) : 0;
    const BlockMemory mem2 = block_memory_for(apply, N * C, bytes2, x);
    apply<<<static_cast<unsigned int>(mem2.blocks), threads, mem2.shared, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mt, mp, w_acc.const_data_ptr<acc_t>(),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), part.const_data_ptr<acc_t>(),
        chan.mutable_data_ptr<acc_t>(), gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr, mem2.ptr,
        mem2.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    mix_grad_w_kernel<scalar_t, acc_t><<<1, kMaxThreads, 0, stream>>>(chan.const_data_ptr<acc_t>(), mt, C,
                                                                      grad_w_acc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_w = grad_w_acc.to(w.scalar_type());
  });
  return {gx, gps, grad_w};
}

}  // namespace cuda
}  // namespace pynas
