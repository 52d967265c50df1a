// The vector registers of the instruction set this file is compiled for, and the few helpers the
// register-tiled kernels (ddn_cpu.cpp, attention_cpu.cpp) build on.
//
// Every fastcomp C++ kernel is written once, with GCC/Clang vector extensions and `#pragma omp simd`
// loops, and compiled once per target (fastcomp/_build.py: -march=native, x86-64-v3, x86-64-v4, the
// compiler's default, or a `dispatch` build holding several of them and choosing at run time). What
// differs between targets is only what this header derives from the compiler's predefined macros:
//
//   kVectorBytes      width of one register: 64 (AVX-512), 32 (AVX/AVX2), 16 (SSE2, NEON, portable)
//   kVectorRegisters  how many the register allocator has: 32 (AVX-512, AArch64), 16 (x86 otherwise)
//   vec<T>            one register of T
//   pin(v)            keep v in a register (see below)
//
// and the tile sizes each kernel picks from them, so that a tile's accumulators and operands fit the
// register file of the target instead of spilling (tiles sized for 32 registers of 64 bytes spill on
// AVX2's 16 of 32 bytes; a 64-byte vector pinned to an AVX register does not even compile).
//
// This header is free of torch and CUDA headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastcomp {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
constexpr const char* kName = "AVX-512";
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
constexpr const char* kName = "AVX2";  // AVX without AVX2 has no integer ops of this width; floats do
#elif defined(__SSE2__)
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 16;
constexpr const char* kName = "SSE2";
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 32;
constexpr const char* kName = "NEON";
#else
constexpr int kVectorBytes = 16;  // the compiler lowers a 16-byte vector to whatever the target has
constexpr int kVectorRegisters = 16;
constexpr const char* kName = "portable";
#endif

// a * b + c in one instruction where the target has FMA, else a multiply and an add. std::fma on a
// target without FMA (the x86-64 default, SSE2) is a libm call that emulates the single rounding in
// software, ~50x slower than the two instructions: the kernels' inner loops must never call it there.
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
constexpr bool kHasFma = true;
template <typename T>
inline T mul_add(T a, T b, T c) {
  return std::fma(a, b, c);
}
#else
constexpr bool kHasFma = false;
template <typename T>
inline T mul_add(T a, T b, T c) {
  return a * b + c;  // two roundings (the extensions are compiled with -ffp-contract=off)
}
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

// One vector register of T.
template <typename T>
using vec = typename Vec<T>::type;

// Lanes of T in one vector register.
template <typename T>
constexpr int64_t kLanes = static_cast<int64_t>(kVectorBytes / sizeof(T));

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, const vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline vec<T> zero() {
  return vec<T>{} * T(0);
}

template <typename T>
inline T lane_sum(const vec<T>& v) {
  T s = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) s += v[l];
  return s;
}

// Keeps a loaded vector in a register: without it GCC re-reads every row from memory as an FMA operand
// for each product of a register tile (2 loads per FMA: load-port bound, measured ~2x slower). The
// constraint names the register class that holds a vector of exactly kVectorBytes on this target.
template <typename V>
inline void pin(V& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__) && (defined(__AVX__) || defined(__SSE2__))
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  (void)v;
#endif
}

}  // namespace simd
}  // namespace fastcomp
