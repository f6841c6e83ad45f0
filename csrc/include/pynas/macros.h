#pragma once
// Portability macros shared by csrc/cpu and csrc/cuda.

// Functions in headers under csrc/include are compiled twice: by the host compiler for csrc/cpu
// (where the CUDA qualifiers do not exist) and by nvcc for csrc/cuda.
#if defined(__CUDACC__)
#define PYNAS_HOST_DEVICE __host__ __device__
#else
#define PYNAS_HOST_DEVICE
#endif

// Turns a macro's value (even one holding commas) into a string literal.
#define PYNAS_STRINGIFY_(...) #__VA_ARGS__
#define PYNAS_STRINGIFY(...) PYNAS_STRINGIFY_(__VA_ARGS__)
