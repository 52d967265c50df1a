// Small helpers shared by every fastcomp C++ and CUDA source.
//
// This header must stay free of torch and CUDA headers: it is included by .cpp files that g++ compiles
// against torch, and by .cu files that nvcc compiles with nothing but the CUDA runtime (see the
// convention at the top of fastcomp/_build.py).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

// Functions callable from both host and device code (the shared math of an op lives in one place, so
// the CPU and CUDA backends cannot drift apart).
#if defined(__CUDACC__)
#define FASTCOMP_HD __host__ __device__ __forceinline__
#else
#define FASTCOMP_HD inline
#endif

namespace fastcomp {

template <typename... Args>
[[noreturn]] inline void check_failed(const char* file, int line, const char* condition, const Args&... args) {
  std::ostringstream message;
  message << "fastcomp: ";
  (message << ... << args);
  message << " [check `" << condition << "` failed at " << file << ":" << line << "]";
  // pybind11 turns std::invalid_argument into ValueError: these checks guard the arguments that the
  // Python side passes in, so a failure is a caller bug, not a kernel bug.
  throw std::invalid_argument(message.str());
}

// (a - b)^2 + (c - d)^2 style sums are compared exactly against the float64 PyTorch reference, which
// rounds every product and sum separately. nvcc contracts x * x + y * y into an FMA by default (one
// rounding fewer), which moves points that lie exactly on a boundary; the _rn intrinsics forbid it.
// On the host, the extension is compiled with -ffp-contract=off for the same reason.
FASTCOMP_HD double sum_of_squares(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(x, x), __dmul_rn(y, y));
#else
  return x * x + y * y;
#endif
}

}  // namespace fastcomp

// FASTCOMP_CHECK(cond, "message parts", value, ...): throw with a message saying what the caller got
// wrong. Host code only.
#define FASTCOMP_CHECK(cond, ...)                                          \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ::fastcomp::check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);    \
    }                                                                      \
  } while (0)
