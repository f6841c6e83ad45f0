#pragma once
// Micro-benchmarks of this machine's attainable limits, the two roofs of a roofline model
// (pynas.bench's `roofline` rows): the float32 FMA throughput and the bandwidth of a large copy.
// Arguments are checked by the bindings (csrc/bindings.cpp).

#include <cstdint>

namespace pynas {
namespace cpu {

// GFLOP/s of independent float32 FMA chains (2 flops per FMA per lane) on `threads` threads for about
// `seconds`: AVX2+FMA 8-lane FMAs where the CPU kernels use AVX2 (cpu_isa() == "avx2"), else the baseline
// ISA's separate multiply and add. threads >= 1, seconds > 0.
double roofline_fma_gflops(int64_t threads, double seconds);

// GB/s (1e9 bytes/s, the bytes read plus the bytes written) of the best of several passes copying a
// buffer of `bytes` bytes into another, split over `threads` threads, for about `seconds` (3 passes at
// least). bytes >= 4096, threads >= 1, seconds > 0.
double roofline_copy_gbs(int64_t bytes, int64_t threads, double seconds);

}  // namespace cpu
}  // namespace pynas
