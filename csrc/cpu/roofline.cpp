// The two roofs of this machine's roofline (contracts in csrc/include/pynas/roofline.h): the float32 FMA
// throughput of independent chains, and the bandwidth of a large buffer copy.
//
// The FMA loop is compiled twice, as the CNN edge's loops are: for the baseline x86-64 ISA and, with GCC
// on x86-64, for AVX2+FMA under `#pragma GCC target`; the variant the edge kernels use (cpu_isa()) runs.
// Threads come from OpenMP where the extension is built with it (as at::parallel_for's do), else from
// std::thread; each thread counts its own operations, so a team smaller than asked still reports truly.

#include "pynas/roofline.h"

#include "pynas/cnn_edge.h"  // isa_is_avx2()

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <new>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYNAS_ROOFLINE_AVX2 1
#include <immintrin.h>
#endif

namespace pynas {
namespace cpu {
namespace {

using Clock = std::chrono::steady_clock;

// One slot per thread, a cache line each (no false sharing between the counters).
struct alignas(64) Slot {
  double flops = 0.0;
  float sink = 0.0f;
};

// Calls body(t, team) on each thread t of a team of (up to) `threads` threads.
template <typename F>
void on_threads(int64_t threads, const F& body) {
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(threads))
  body(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
#else
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back([&body, t, threads] { body(t, threads); });
  body(0, threads);
  for (auto& th : pool) th.join();
#endif
}

// Iterations of the inner block between two looks at the clock (enough that reading it costs nothing).
constexpr int64_t kBlock = 4096;
// acc <- acc * kA + kB converges to kB / (1 - kA) = 10: no overflow, no denormals, whatever the time.
constexpr float kA = 0.9999f;
constexpr float kB = 1e-3f;

// Baseline ISA: a separate multiply and add per lane (2 flops), 32 independent chains that the
// compiler packs into SSE registers.
void fma_base(double seconds, Slot* slot) {
  constexpr int kAcc = 32;
  float acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = 1e-3f * static_cast<float>(i);
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  double flops = 0.0;
  do {
    for (int64_t it = 0; it < kBlock; ++it) {
      for (int i = 0; i < kAcc; ++i) acc[i] = acc[i] * kA + kB;
    }
    flops += 2.0 * kBlock * kAcc;
  } while (Clock::now() < deadline);
  float s = 0.0f;
  for (int i = 0; i < kAcc; ++i) s += acc[i];
  slot->flops = flops;
  slot->sink = s;
}

#ifdef PYNAS_ROOFLINE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// AVX2+FMA: 12 independent 8-lane chains. Two FMA ports with a latency of 4 to 5 cycles need 8 to 10
// FMAs in flight to stay busy; 12 (plus the two constants) still fit in the 16 ymm registers.
void fma_avx2(double seconds, Slot* slot) {
  constexpr int kAcc = 12;
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(1e-3f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(kA);
  const __m256 b = _mm256_set1_ps(kB);
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  double flops = 0.0;
  do {
    for (int64_t it = 0; it < kBlock; ++it) {
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    }
    flops += 2.0 * 8 * kBlock * kAcc;
  } while (Clock::now() < deadline);
  __m256 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float total = 0.0f;
  for (float v : lanes) total += v;
  slot->flops = flops;
  slot->sink = total;
}
#pragma GCC pop_options
#endif

struct AlignedBuffer {
  char* p = nullptr;
  explicit AlignedBuffer(size_t n) : p(static_cast<char*>(::operator new(n, std::align_val_t(64)))) {}
  ~AlignedBuffer() { ::operator delete(p, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// [begin, end) of thread t's share of n bytes, in whole cache lines.
std::pair<size_t, size_t> share(size_t n, int64_t t, int64_t team) {
  const size_t lines = (n + 63) / 64;
  const size_t per = (lines + static_cast<size_t>(team) - 1) / static_cast<size_t>(team);
  const size_t begin = std::min(n, static_cast<size_t>(t) * per * 64);
  const size_t end = std::min(n, begin + per * 64);
  return {begin, end};
}

}  // namespace

double roofline_fma_gflops(int64_t threads, double seconds) {
  std::vector<Slot> slots(static_cast<size_t>(threads));
  const bool avx2 = isa_is_avx2();
  const auto t0 = Clock::now();
  on_threads(threads, [&](int64_t t, int64_t) {
    if (t >= threads) return;
#ifdef PYNAS_ROOFLINE_AVX2
    if (avx2) {
      fma_avx2(seconds, &slots[t]);
      return;
    }
#endif
    (void)avx2;
    fma_base(seconds, &slots[t]);
  });
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  double flops = 0.0, sink = 0.0;
  for (const Slot& s : slots) {
    flops += s.flops;
    sink += s.sink;
  }
  // The accumulators' sum is used, so the chains cannot be optimised away; it converges to a finite value.
  TORCH_CHECK(std::isfinite(sink), "roofline_fma_gflops: the FMA chains diverged (", sink, ")");
  return flops / elapsed / 1e9;
}

double roofline_copy_gbs(int64_t bytes, int64_t threads, double seconds) {
  const size_t n = static_cast<size_t>(bytes);
  AlignedBuffer* src_p = nullptr;
  AlignedBuffer* dst_p = nullptr;
  try {
    src_p = new AlignedBuffer(n);
    dst_p = new AlignedBuffer(n);
  } catch (const std::bad_alloc&) {
    delete src_p;
    TORCH_CHECK(false, "roofline_copy_gbs: bytes: cannot allocate two buffers of ", bytes, " bytes");
  }
  std::unique_ptr<AlignedBuffer> src(src_p), dst(dst_p);
  // First touch by the threads that copy, so the pages are mapped (and placed) before timing.
  on_threads(threads, [&](int64_t t, int64_t team) {
    const auto r = share(n, t, team);
    std::memset(src->p + r.first, 1, r.second - r.first);
    std::memset(dst->p + r.first, 0, r.second - r.first);
  });
  double best = std::numeric_limits<double>::infinity();
  const auto start = Clock::now();
  const auto budget = std::chrono::duration<double>(seconds);
  for (int pass = 0; pass < 3 || Clock::now() - start < budget; ++pass) {
    const auto t0 = Clock::now();
    on_threads(threads, [&](int64_t t, int64_t team) {
      const auto r = share(n, t, team);
      std::memcpy(dst->p + r.first, src->p + r.first, r.second - r.first);
    });
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  TORCH_CHECK(dst->p[n - 1] == 1, "roofline_copy_gbs: the copy did not arrive");
  return 2.0 * static_cast<double>(n) / std::max(best, 1e-9) / 1e9;
}

}  // namespace cpu
}  // namespace pynas
