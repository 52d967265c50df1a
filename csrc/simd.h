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
#include <utility>

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

// Functions whose a * b + c may become fused multiply-adds despite the extensions' -ffp-contract=off
// (which keeps the boundary-deciding sums of the ops exact, see fastcomp/_build.py): register tiles and
// polynomials whose error is bounded, not compared bit for bit. GCC: the attribute on the function;
// clang: FASTCOMP_CONTRACT_BODY as the first statement of its body.
#if defined(__clang__)
#define FASTCOMP_CONTRACT
#define FASTCOMP_CONTRACT_BODY _Pragma("clang fp contract(fast)")
#elif defined(__GNUC__)
#define FASTCOMP_CONTRACT __attribute__((optimize("fp-contract=fast")))
#define FASTCOMP_CONTRACT_BODY
#else
#define FASTCOMP_CONTRACT
#define FASTCOMP_CONTRACT_BODY
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

// Integer lanes of the same width (comparison masks, bit casts).
template <typename T>
struct IntVec;
template <>
struct IntVec<float> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct IntVec<double> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
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
using ivec = typename IntVec<T>::type;

template <typename T>
inline vec<T> zero() {
  return vec<T>{} * T(0);
}

// x in every lane. x - 0 (not 0 + x): the compiler may drop a subtraction of +0 (x - 0 == x for every x,
// -0 included) but not an addition (-0 + 0 is +0), so 0 + x cost an add on the FMA ports and its latency
// before every broadcast of a run-time value.
template <typename T>
inline vec<T> splat(T x) {
  return x - zero<T>();
}

// mask ? a : b per lane, for a mask from a vector comparison (all bits set or clear), without the
// vector ?: operator, which not every compiler accepts on vector_size types.
template <typename T>
inline vec<T> select(const ivec<T>& mask, const vec<T>& a, const vec<T>& b) {
  return (vec<T>)((mask & (ivec<T>)a) | (~mask & (ivec<T>)b));
}

// Lane-wise max / min: the vector ?: of GCC and clang (C++), which they turn into maxps/minps.
template <typename T>
inline vec<T> max(const vec<T>& a, const vec<T>& b) {
  return a > b ? a : b;
}

template <typename T>
inline vec<T> min(const vec<T>& a, const vec<T>& b) {
  return a < b ? a : b;
}

template <typename T>
inline T lane_sum(const vec<T>& v) {
  T s = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) s += v[l];
  return s;
}

// Transposes the kLanes x kLanes block held in rows[0..kLanes) in registers: rows[i][x] becomes the old
// rows[x][i]. log2(kLanes) butterfly stages; at the stage of block size b, rows i and i + b (bit b of i
// clear) swap their off-diagonal b-blocks, each a constant two-input shuffle (unpack/shufps/vperm2f128 on
// AVX2, vpermt2ps on AVX-512), instead of kLanes^2 scalar loads or stores at a stride.
namespace detail {
template <int L, int B, bool High>
constexpr int butterfly_index(int x) {
  // low row:  x's bit B set -> the high row's x - B (its index in the second operand: + L)
  // high row: x's bit B clear -> the low row's x + B; else its own x (+ L)
  return High ? ((x & B) ? L + x : x + B) : ((x & B) ? L + x - B : x);
}

template <typename V, int L, int B, bool High, int... X>
inline V butterfly(const V& lo, const V& hi, std::integer_sequence<int, X...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(lo, hi, butterfly_index<L, B, High>(X)...);
#else
  using I = decltype(lo < lo);
  return __builtin_shuffle(lo, hi, I{butterfly_index<L, B, High>(X)...});
#endif
}

template <typename T, int B>
inline void transpose_stage(vec<T>* rows) {
  constexpr int L = static_cast<int>(kLanes<T>);
  using Seq = std::make_integer_sequence<int, L>;
  for (int i = 0; i < L; ++i) {
    if (i & B) continue;
    const vec<T> lo = rows[i], hi = rows[i + B];
    rows[i] = butterfly<vec<T>, L, B, false>(lo, hi, Seq{});
    rows[i + B] = butterfly<vec<T>, L, B, true>(lo, hi, Seq{});
  }
}
}  // namespace detail

template <typename T>
inline void transpose(vec<T>* rows) {
  constexpr int L = static_cast<int>(kLanes<T>);
  if constexpr (L >= 2) detail::transpose_stage<T, 1>(rows);
  if constexpr (L >= 4) detail::transpose_stage<T, 2>(rows);
  if constexpr (L >= 8) detail::transpose_stage<T, 4>(rows);
  if constexpr (L >= 16) detail::transpose_stage<T, 8>(rows);
  static_assert(L <= 16, "transpose: at most 16 lanes");
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
