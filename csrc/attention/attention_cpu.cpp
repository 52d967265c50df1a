// Local conditional attention on CPU: forward and backward, float32 and float64.
//
// Semantics (fastcomp/ops/attention/reference.py is the spec): pixel (i, j) attends the kh x kw window of
// image keys whose top-left corner is (clamp(i - kh/2, 0, H - kh), clamp(j - kw/2, 0, W - kw)) plus the
// conditioner keys m with cond_mask[b, m, i, j], in ONE softmax; the log-sum-exp of every query is
// stored for the backward.
//
// Layout. Inputs arrive heads-last, [B, H, W, heads, D] (D contiguous). Work is done per (b, head) in blocks
// of L consecutive queries of a row (L = lanes of one vector register), vectorized over the queries: the
// window of query j is a run of kw key columns that shifts by one when j does, so a block's scores at
// window offset dc are one vector of keys loaded at a shifted address. Key and value rows are first
// transposed into *panels* ([D][2L] per L columns, see KeyRing), built once per key row and used by the kh
// query rows that see it, so those shifted loads stay inside one cache line per channel. The first and
// last kw/2 queries of a row (clamped windows; in the forward also the interior queries a whole block
// would not fill) go through separate border panels. Extra memory: the ring of kh panel rows per thread,
// O(W * D).
//
// Forward (forward_impl, BlockForward): a block's whole softmax over its kh*kw window keys and its allowed
// conditioners stays in registers (scores in the exp2 domain, max, 2^x, sum), then the weighted sum of the
// values; the log-sum-exp of every query is stored for the backward. Tasks are (b, head, block of rows).
//
// Backward (backward_impl): tasks are (b, head[, block of rows]); every dk/dv/dcond element has one
// writer (the rows two blocks share are summed from the blocks' parts at the end: no atomics,
// deterministic). Per query row: recompute P from the stored lse, dP = dO . V, delta = sum P dP,
// dS = P (dP - delta), dq = scale dS K, the conditioner gradients; then dk/dv gathered per tile of key
// columns from the row's dS and P (see the section comment there).
//
// The extensions are compiled with -ffp-contract=off (see fastcomp/_build.py), which keeps the sums that
// decide a boundary elsewhere (disk_mask, the DDN's argmin) exact; this file decides none and contracts
// a * b + c into FMAs where the target has them (the pragma below).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"
#include "common.h"
#include "simd.h"

// This file's kernels contract a * b + c into FMAs (simd.h's FASTCOMP_CONTRACT) and nothing in it decides a
// boundary, so every function here gets the same option: GCC does not inline a function whose optimize
// attribute differs from its caller's, and the kernels (score dots, weighted sums, exp2) then ran as calls,
// their results passed through memory (~3-10% of the forward at 1 thread, x86-64-v3).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

namespace fastcomp {
namespace {

// First row (or column) of the k-wide window of position i in [0, n): centred, clamped to the image.
inline int64_t window_start(int64_t i, int64_t k, int64_t n) {
  return std::min(std::max<int64_t>(i - k / 2, 0), n - k);
}

template <typename T>
struct Problem {
  int64_t B, H, W, NH, D, M, kh, kw;
  T scale;
  const uint8_t* mask;  // [B, M, H, W] or nullptr (every pixel sees every conditioner)
  int64_t ld;           // row length of the transposed [D][ld] buffers: W plus a block of padding
  int64_t pix() const { return NH * D; }  // stride between pixels in the heads-last tensors
  // Offset of pixel (r, 0), head h, channel 0 of batch item b in the heads-last tensors.
  int64_t row_off(int64_t b, int64_t h, int64_t r) const { return ((b * H + r) * W) * pix() + h * D; }
  int64_t keys() const { return kh * kw; }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& q, int64_t M, int64_t kh, int64_t kw, double scale, const uint8_t* mask) {
  Problem<T> p{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), M, kh, kw, static_cast<T>(scale), mask, 0};
  const int64_t blk = simd::kLanes<T>;
  p.ld = (p.W + 2 * blk + blk - 1) / blk * blk;
  return p;
}

// L pixels x L channels (from channel d0) of a heads-last row s (pixels pix apart) as L registers, one per
// channel: L whole-vector loads and a register transpose.
template <typename T>
inline void load_block_t(const T* s, int64_t pix, int64_t d0, simd::vec<T>* rows) {
  constexpr int64_t L = simd::kLanes<T>;
  for (int64_t jj = 0; jj < L; ++jj) rows[jj] = simd::load(s + jj * pix + d0);  // [pixel][channel]
  simd::transpose<T>(rows);                                                    // [channel][pixel]
}

// Prefetches the D channels of the L pixels after s: lines at a stride the hardware prefetcher misses.
template <typename T>
inline void prefetch_next_block(const T* s, int64_t pix, int64_t D) {
  constexpr int64_t L = simd::kLanes<T>;
  for (int64_t jj = 0; jj < L; ++jj)
    for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(s + (L + jj) * pix + d);
}

// Transposes W pixels x D of one (b, row, head) from heads-last into dst [D][ld], times `mul`: blocks of
// L pixels x L channels (L = lanes of a register) go through a register transpose (simd::transpose), so
// every load and store is a whole contiguous vector; the D % L and W % L edges go element by element.
template <typename T>
inline void load_row_t(const Problem<T>& P, const T* src_row, T mul, T* dst, int64_t ld_ = 0) {
  constexpr int64_t L = simd::kLanes<T>;
  const int64_t pix = P.pix(), ld = ld_ ? ld_ : P.ld, D = P.D, W = P.W;
  const int64_t d_vec = D / L * L;
  int64_t j0 = 0;
  for (; j0 + L <= W; j0 += L) {
    const T* s = src_row + j0 * pix;
    if (j0 + 2 * L <= W) prefetch_next_block(s, pix, D);
    for (int64_t d0 = 0; d0 < d_vec; d0 += L) {
      simd::vec<T> b_rows[L];
      load_block_t(s, pix, d0, b_rows);
      for (int64_t dd = 0; dd < L; ++dd) simd::store(dst + (d0 + dd) * ld + j0, b_rows[dd] * mul);
    }
    for (int64_t d = d_vec; d < D; ++d)
      for (int64_t jj = 0; jj < L; ++jj) dst[d * ld + j0 + jj] = s[jj * pix + d] * mul;
  }
  for (int64_t j = j0; j < W; ++j) {
    const T* s = src_row + j * pix;
    for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = s[d] * mul;
  }
}

// The inverse: src times mul (and times scale[j] per pixel where scale is given) into W pixels x D of a
// heads-last row (pixels pix_ apart where given). Channel d of pixel j is at src + d * ld + j: [D][ld]; or,
// with a tile stride ts, at src + (j / L) * ts + d * ld + j % L: tiles of L pixels, [tile][D][L] with
// ld = L and ts = D L (the backward's dk / dv accumulators, stored without a copy into [D][ld] first).
template <typename T>
inline void store_row_t(const Problem<T>& P, const T* src, T mul, T* dst_row, const T* scale = nullptr,
                        int64_t ld_ = 0, int64_t pix_ = 0, int64_t ts_ = 0) {
  constexpr int64_t L = simd::kLanes<T>;
  const int64_t pix = pix_ ? pix_ : P.pix(), ld = ld_ ? ld_ : P.ld, ts = ts_ ? ts_ : L, D = P.D, W = P.W;
  const int64_t d_vec = D / L * L;
  int64_t j0 = 0;
  for (; j0 + L <= W; j0 += L) {
    T* o = dst_row + j0 * pix;
    const T* s = src + j0 / L * ts;
    const simd::vec<T> b_mul = scale ? simd::load(scale + j0) * mul : simd::splat(mul);
    for (int64_t d0 = 0; d0 < d_vec; d0 += L) {
      simd::vec<T> b_rows[L];  // [channel][pixel], then [pixel][channel]
      for (int64_t dd = 0; dd < L; ++dd) b_rows[dd] = simd::load(s + (d0 + dd) * ld) * b_mul;
      simd::transpose<T>(b_rows);
      for (int64_t jj = 0; jj < L; ++jj) simd::store(o + jj * pix + d0, b_rows[jj]);
    }
    for (int64_t d = d_vec; d < D; ++d)
      for (int64_t jj = 0; jj < L; ++jj) o[jj * pix + d] = s[d * ld + jj] * b_mul[jj];
  }
  for (int64_t j = j0; j < W; ++j) {
    T* o = dst_row + j * pix;
    const T* s = src + j / L * ts + j % L;
    const T m = scale ? scale[j] * mul : mul;
    for (int64_t d = 0; d < D; ++d) o[d] = s[d * ld] * m;
  }
}

// A block's queries: channel d of lane l's pixel pixels[l] (l < nvalid; 0 in the other lanes) of a heads-
// last row, times mul, into xb [D][L], by whole-vector loads of L channels per pixel and a register
// transpose (load_row_t's, without the row in between).
template <typename T>
inline void gather_block_t(const Problem<T>& P, const T* row, const int64_t* pixels, int64_t nvalid, T mul, T* xb) {
  constexpr int64_t L = simd::kLanes<T>;
  const int64_t pix = P.pix(), D = P.D, d_vec = D / L * L;
  for (int64_t d0 = 0; d0 < d_vec; d0 += L) {
    simd::vec<T> b_rows[L];  // [pixel][channel], then [channel][pixel]
    for (int64_t l = 0; l < L; ++l) b_rows[l] = l < nvalid ? simd::load(row + pixels[l] * pix + d0) : simd::zero<T>();
    simd::transpose<T>(b_rows);
    for (int64_t dd = 0; dd < L; ++dd) simd::store(xb + (d0 + dd) * L, b_rows[dd] * mul);
  }
  for (int64_t d = d_vec; d < D; ++d)
    for (int64_t l = 0; l < L; ++l) xb[d * L + l] = l < nvalid ? row[pixels[l] * pix + d] * mul : T(0);
}

// The inverse, for a block's outputs: xb [D][L] into the pixels of lanes l < nvalid of a heads-last row.
template <typename T>
inline void scatter_block_t(const Problem<T>& P, const T* xb, const int64_t* pixels, int64_t nvalid, T* row) {
  constexpr int64_t L = simd::kLanes<T>;
  const int64_t pix = P.pix(), D = P.D, d_vec = D / L * L;
  for (int64_t d0 = 0; d0 < d_vec; d0 += L) {
    simd::vec<T> b_rows[L];  // [channel][pixel], then [pixel][channel]
    for (int64_t dd = 0; dd < L; ++dd) b_rows[dd] = simd::load(xb + (d0 + dd) * L);
    simd::transpose<T>(b_rows);
    for (int64_t l = 0; l < nvalid; ++l) simd::store(row + pixels[l] * pix + d0, b_rows[l]);
  }
  for (int64_t d = d_vec; d < D; ++d)
    for (int64_t l = 0; l < nvalid; ++l) row[pixels[l] * pix + d] = xb[d * L + l];
}

// Threads for a region of `tasks` tasks and `work` multiply-adds: below ~1e5 starting threads costs more
// than it saves (tests and gradcheck make thousands of tiny calls).
inline int threads_for(int64_t tasks, int64_t work) {
  if (work < (int64_t{1} << 17)) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads())));
}

template <typename T>
int64_t work_of(const Problem<T>& P) {
  return P.B * P.NH * P.H * P.W * P.D * (P.keys() + P.M);
}

// --- the forward, by blocks of one register of queries ---------------------------------------------------
//
// Every query block (L consecutive queries of a row, L = lanes of a register) computes its whole softmax
// in registers and L1: its kh*kw window scores and its allowed conditioners' scores (one vector each),
// their max, exp2 and sum, then the weighted sum of the values, D channels at a time, and the output
// block. No score row buffer and no pass over a row of probabilities.
//
// Keys and values come as *panels*: panel p of a key row holds its columns [pL, pL + 2L) for every channel,
// [p][D][2L], one 64-byte line per channel on AVX2. Interior query block t (queries half + tL + lane) sees,
// at window offset dc, key column tL + lane + dc: for a chunk of up to C = min(8, L) offsets starting at
// dc0 = mC, that is panel t + dc0 / L at lane offset dc0 % L + e, e < C, inside one panel row. So the inner
// loop reads one query vector and C shifted key vectors from one line per channel, streaming through
// panels in order (a row-length layout [D][W] reads C vectors from lines W apart per channel, and its L1
// traffic was what bounded the previous kernel at ~40% of the FMA rate). Panels are built once per key row
// (a ring of kh rows per task) and used by the kh query rows that see the row. Each panel stores its
// columns twice over (as the second half of panel p - 1 and the first of p): 2x a row, O(W D) per slot.
//
// Scores are in the exp2 domain (queries scaled by scale * log2(e)): p = 2^(s - max) saves the
// multiplication of the argument and half of the range reduction of exp; the stored lse is natural.
// Border queries (the first and last kw/2 of a row, whose windows are clamped to the first or last kw
// columns, and the interior tail that would leave the last interior block partly empty: see KeyRing) go
// through border panels, one register per (offset, channel) holding each lane's column.

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// 2^x for x <= 0 on a register, relative error ~2e-7: 2^n * 2^r, n = round(x), |r| <= 1/2, 2^r by its
// Taylor series to degree 6 in r ln 2. Clamped below at -125 (finite for -inf scores; masked keys are
// blended to 0 afterwards, never multiplied). Adding 1.5 * 2^23 + 127 rounds x to an integer held in the
// low mantissa bits, already biased: those bits shifted into the exponent field are 2^n, with no
// float-to-int conversion and no bias add (12 instructions instead of 15; the exp2 was ~10% of the
// forward). x > 0 (only the scores of conditioners a lane may not see, blended away) stays finite for
// x < 127.
FASTCOMP_CONTRACT inline simd::vec<float> exp2_neg(simd::vec<float> x) {
  FASTCOMP_CONTRACT_BODY
  using V = simd::vec<float>;
  using I = simd::ivec<float>;
  constexpr float kRoundBiased = 12582912.0f + 127.0f;  // 1.5 * 2^23 + the exponent bias, exact in float
  x = simd::max<float>(x, simd::splat(-125.0f));
  const V t = x + kRoundBiased;
  const V r = x - (t - kRoundBiased);
  V p = simd::splat(1.5403530393381609e-4f);
  p = p * r + 1.3333558146428443e-3f;
  p = p * r + 9.618129107628477e-3f;
  p = p * r + 5.550410866482158e-2f;
  p = p * r + 0.2402265069591007f;
  p = p * r + 0.6931471805599453f;
  p = p * r + 1.0f;
  return p * (V)((I)t << 23);
}

inline simd::vec<double> exp2_neg(simd::vec<double> x) {  // float64: exact, lane by lane (tests, gradcheck)
  for (int64_t l = 0; l < simd::kLanes<double>; ++l) x[l] = std::exp2(x[l] > 0.0 ? 0.0 : x[l]);
  return x;
}

// Offsets per chunk of window columns: at most 8 (accumulators + operands fit AVX2's 16 registers) and at
// most L (a chunk of shifted loads stays inside one 2L panel row).
template <typename T>
constexpr int64_t kChunk = simd::kLanes<T> < 8 ? simd::kLanes<T> : 8;

// A buffer aligned to 64 bytes (a panel row is then exactly whole cache lines).
template <typename T>
struct Aligned {
  std::vector<T> raw;
  T* p = nullptr;
  explicit Aligned(size_t n) : raw(n + 64 / sizeof(T), T(0)) {
    p = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  }
};

// The cache lines of the rows the next query row reads (its new key and value rows, its queries, ...) and
// of the rows it writes, prefetched a few at a time from inside the compute kernels: one line per two
// channels of a score dot (block_dots2), one per key row of a weighted sum (block_wsum). Prefetching a
// whole row at once (512 lines at 64x64 d32) issued far more requests than the core keeps in flight, so the
// prefetch instructions themselves waited for memory and the row's loads still missed (~14% of the forward
// at 1 thread, ~10% at 2, against this queue). A row's D values per pixel sit at a stride of heads * D,
// which the hardware prefetchers do not follow.
struct LineQueue {
  std::vector<uintptr_t> line;  // line addresses; bit 0 set: the line will be written
  size_t head = 0;

  void clear() {
    line.clear();
    head = 0;
  }
  // Row r of (b, h) of the heads-last x: every line its D values per pixel touch.
  template <typename T>
  void add_row(const Problem<T>& P, const T* x, int64_t b, int64_t h, int64_t r, bool write) {
    const T* row = x + P.row_off(b, h, r);
    for (int64_t j = 0; j < P.W; ++j) {
      const uintptr_t first = reinterpret_cast<uintptr_t>(row + j * P.pix()) & ~uintptr_t(63);
      const uintptr_t end = reinterpret_cast<uintptr_t>(row + j * P.pix() + P.D);
      for (uintptr_t a = first; a < end; a += 64) line.push_back(a | uintptr_t(write));
    }
  }
  // Locality hint 1 (prefetcht2 on x86: into the outer caches, not necessarily L1): the lines are used a row
  // later, and into L1 they only crowd out the panels the kernels are reading (driver, 11 alternating runs
  // twice: forward 4-16 % less time than with prefetcht0 at 1 and 2 threads).
  inline void step() {
    if (head == line.size()) return;
    const uintptr_t a = line[head++];
    if (a & 1)
      __builtin_prefetch(reinterpret_cast<const void*>(a & ~uintptr_t(1)), 1, 1);
    else
      __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 1);
  }
};

// s[c] = sum_d qb[d] * key_c[d] for c < NC, key_c[d] the register at kp + c * CS + d * ds (lanes: the
// block's queries; ds = DS, or ds_ when DS is 0). Interior blocks: kp a panel row at the chunk's lane
// offset, CS = 1, DS = 2L (shifted loads inside one panel row); border blocks: their own panels
// [D][kw][L], CS = L, ds = kw L. Compile-time strides keep every load an immediate offset from one
// pointer (run-time ones cost ~10% of the forward in address arithmetic). Two key rows at once
// (block_dots2) share every query load; block_dots2 also issues the prefetches of `next`.
template <typename T, int NC, int CS, int DS>
FASTCOMP_CONTRACT inline void block_dots(const T* __restrict qb, const T* __restrict kp, int64_t ds_, int64_t D,
                                         simd::vec<T>* __restrict s) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  simd::vec<T> acc[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) acc[c] = simd::zero<T>();
  for (int64_t d = 0; d < D; ++d) {
    const simd::vec<T> b_q = simd::load(qb + d * L);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[c] = b_q * simd::load(kp + c * CS + d * (DS ? DS : ds_)) + acc[c];
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) s[c] = acc[c];
}

template <typename T, int NC, int CS, int DS>
FASTCOMP_CONTRACT inline void block_dots2(const T* __restrict qb, const T* __restrict kp0, const T* __restrict kp1,
                                          int64_t ds_, int64_t D, simd::vec<T>* __restrict s0,
                                          simd::vec<T>* __restrict s1, LineQueue& next) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  simd::vec<T> a0[NC], a1[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) a0[c] = a1[c] = simd::zero<T>();
  for (int64_t d = 0; d < D; ++d) {
    if ((d & 1) == 0) next.step();
    const simd::vec<T> b_q = simd::load(qb + d * L);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      a0[c] = b_q * simd::load(kp0 + c * CS + d * (DS ? DS : ds_)) + a0[c];
      a1[c] = b_q * simd::load(kp1 + c * CS + d * (DS ? DS : ds_)) + a1[c];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    s0[c] = a0[c];
    s1[c] = a1[c];
  }
}

// Conditioner scores, up to 8 at once (one query load feeds them all): s[c] = sum_d qb[d] * kc[c][d].
template <typename T, int NC>
FASTCOMP_CONTRACT inline void block_dots_cond(const T* __restrict qb, const T* const* kc, int64_t D,
                                              simd::vec<T>* __restrict s) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  simd::vec<T> acc[NC];
  const T* b_k[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    acc[c] = simd::zero<T>();
    b_k[c] = kc[c];
  }
  for (int64_t d = 0; d < D; ++d) {
    const simd::vec<T> b_q = simd::load(qb + d * L);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[c] = b_q * b_k[c][d] + acc[c];
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) s[c] = acc[c];
}

// Dispatch on a run-time count n <= 8 to the instantiation for it (the chunk and D tails).
#define FASTCOMP_UP_TO_8(n, F)                 \
  switch (n) {                                 \
    case 8: F(8); break;                       \
    case 7: F(7); break;                       \
    case 6: F(6); break;                       \
    case 5: F(5); break;                       \
    case 4: F(4); break;                       \
    case 3: F(3); break;                       \
    case 2: F(2); break;                       \
    default: F(1); break;                      \
  }

// acc[n] += sum_r sum_e p[r * ps + e] * value_re[d0 + n] over `rows` key rows, value_re[d] the register at
// vp[r] + e * ES + d * ds (as block_dots: interior ES = 1, DS = 2L; border ES = L, ds = kw L). All the rows in
// one call, so the accumulators stay in registers: a call per key row stored and reloaded them, and the
// FMA chains of the next call waited on that store-to-load forwarding (~1.3x the time of the score dots).
template <typename T, int ND, int NE, int ES, int DS>
FASTCOMP_CONTRACT inline void block_wsum(const simd::vec<T>* __restrict p, int64_t ps, const T* const* vp, int64_t rows,
                                         int64_t ds_, simd::vec<T>* __restrict acc, LineQueue& next) {
  FASTCOMP_CONTRACT_BODY
  simd::vec<T> b_acc[ND];
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) b_acc[n] = acc[n];
  for (int64_t r = 0; r < rows; ++r) {
    next.step();
    const T* __restrict v = vp[r];
    const simd::vec<T>* __restrict pr = p + r * ps;
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) {
      const simd::vec<T> b_p = pr[e];
#pragma GCC unroll 8
      for (int n = 0; n < ND; ++n) b_acc[n] = b_p * simd::load(v + e * ES + n * (DS ? DS : ds_)) + b_acc[n];
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) acc[n] = b_acc[n];
}

// block_wsum for ND channels and a run-time chunk length ne <= 8 (unrolled: the loop over a chunk's
// offsets cost ~5 instructions per 8 FMAs).
template <typename T, int ND, int ES, int DS>
inline void block_wsum_n(const simd::vec<T>* __restrict p, int64_t ps, int64_t ne, const T* const* vp, int64_t rows,
                         int64_t ds_, simd::vec<T>* __restrict acc, LineQueue& next) {
#define FASTCOMP_WSUM_NE(N) block_wsum<T, ND, N, ES, DS>(p, ps, vp, rows, ds_, acc, next)
  FASTCOMP_UP_TO_8(ne, FASTCOMP_WSUM_NE)
#undef FASTCOMP_WSUM_NE
}

// acc[n] += sum_e p[e] * vc[e][n] (conditioners: broadcast values, vc[e] pointing at channel d0).
template <typename T, int ND>
FASTCOMP_CONTRACT inline void block_wsum_cond(const simd::vec<T>* __restrict p, int64_t ne, const T* const* vc,
                                              simd::vec<T>* __restrict acc) {
  FASTCOMP_CONTRACT_BODY
  simd::vec<T> b_acc[ND];
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) b_acc[n] = acc[n];
  for (int64_t e = 0; e < ne; ++e) {
    const simd::vec<T> b_p = p[e];
    const T* b_v = vc[e];
#pragma GCC unroll 8
    for (int n = 0; n < ND; ++n) b_acc[n] = b_p * b_v[n] + b_acc[n];
  }
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) acc[n] = b_acc[n];
}

// One task's ring of kh key rows (slot of row r: r % kh), keys and values each as
//   NP interior panels [p][D][2L]: columns pL .. pL + 2L of the row (0 beyond W), and
//   NBB border panels [u][D][kw][L]: for lane l of border block u, border query g = uL + l (the kw/2
//   first queries of a row, then the last nb - kw/2: `tail` interior queries and the kw/2 last), the
//   column its window has at offset dc: dc for the first ones, its own window's for the others (W - kw +
//   dc for the last kw/2; 0 for lanes past nb). One border block serves both ends of a row (6 queries in
//   one register at kw = 7, where a block per end used 3 lanes of 8 each). The forward also hands the
//   border block the `tail` = (W - 2 (kw/2)) % L interior queries that would leave the last interior block
//   partly empty: at 64x64 k7 on AVX2 those are 2, and with the 6 border queries they fill one register,
//   so a row takes 8 blocks instead of 9 (5 instead of 6 on AVX-512). The backward keeps tail = 0: its
//   border queries' dk / dv go through per-class sums that only the clamped windows share.
template <typename T>
struct KeyRing {
  const Problem<T>& P;
  int64_t half, tail, nb, NP, panel, NBB, bpanel, row_len;  // nb: the border blocks' queries
  Aligned<T> k, v;
  std::vector<int64_t> row_of;  // key row held by each slot (-1: none)

  explicit KeyRing(const Problem<T>& P_, int64_t tail_ = 0)
      : P(P_), half(P_.kw / 2), tail(tail_), nb(2 * (P_.kw / 2) + tail_),
        NP((P_.W + simd::kLanes<T> - 1) / simd::kLanes<T> + 2), panel(P_.D * 2 * simd::kLanes<T>),
        NBB((nb + simd::kLanes<T> - 1) / simd::kLanes<T>), bpanel(P_.kw * P_.D * simd::kLanes<T>),
        row_len(NP * panel + NBB * bpanel), k(P_.kh * row_len), v(P_.kh * row_len), row_of(P_.kh, -1) {}

  // The pixel of border query g (g < nb): the first kw/2 pixels, then the last nb - kw/2.
  int64_t border_pixel(int64_t g) const { return g < half ? g : P.W - nb + g; }

  // Border block u's lanes in a transposed row: lane l (query g = uL + l) is column uL + l when g < kw/2
  // and column W - nb + uL + l when it is one of the last nb - kw/2, so the block's values are two
  // whole-register loads blended (lanes past nb zero), and its results two blended stores: a
  // lane-by-lane gather of D channels through pixels[] cost ~3% of the backward. The row must be
  // readable (and writable) over [uL, uL + L) and [W - nb + uL, ... + L): the transposed rows
  // have L columns of padding past W.
  struct BorderLanes {
    simd::ivec<T> left{}, right{};  // all bits set in the lanes of the first kw/2 / the last nb - kw/2 queries
    int64_t c_left = 0, c_right = 0;
    simd::vec<T> gather(const T* row) const {
      const simd::vec<T> z = simd::zero<T>();
      return simd::select<T>(left, simd::load(row + c_left), simd::select<T>(right, simd::load(row + c_right), z));
    }
    void scatter(T* row, const simd::vec<T>& x) const {  // the other columns keep their values
      simd::store(row + c_left, simd::select<T>(left, x, simd::load(row + c_left)));
      simd::store(row + c_right, simd::select<T>(right, x, simd::load(row + c_right)));
    }
  };
  BorderLanes border_lanes(int64_t u) const {
    constexpr int64_t L = simd::kLanes<T>;
    BorderLanes b;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t g = u * L + l;
      b.left[l] = g < half ? -1 : 0;
      b.right[l] = g >= half && g < nb ? -1 : 0;
    }
    b.c_left = u * L;
    b.c_right = P.W - nb + u * L;
    return b;
  }

  // The slots of key rows r0 .. r0 + kh - 1 (once per query row: a % per panel access cost ~10% of the
  // forward in integer divisions).
  void slots(const Aligned<T>& x, int64_t r0, const T** out) const {
    for (int64_t dr = 0; dr < P.kh; ++dr) out[dr] = x.p + ((r0 + dr) % P.kh) * row_len;
  }
  const T* interior(const T* slot, int64_t pi) const { return slot + pi * panel; }
  const T* border(const T* slot, int64_t u) const { return slot + NP * panel + u * bpanel; }

  void reset() { std::fill(row_of.begin(), row_of.end(), int64_t(-1)); }

  // Row r of (b, h) of the heads-last x into the panels at dst: each register transpose of L pixels x L
  // channels (tile t of the row) goes straight to its two places, the first half of panel t and the
  // second half of panel t - 1 (columns >= W are never written: they stay 0). The border panels then
  // take their columns from the panels.
  void build(const T* x, int64_t b, int64_t h, int64_t r, T* dst) {
    constexpr int64_t L = simd::kLanes<T>;
    const int64_t D = P.D, kw = P.kw, W = P.W, pix = P.pix();
    const T* src = x + P.row_off(b, h, r);
    const int64_t d_vec = D / L * L;
    auto put = [&](int64_t t, int64_t d, int64_t lane, T value) {  // column tL + lane, channel d
      dst[t * panel + d * 2 * L + lane] = value;
      if (t > 0) dst[(t - 1) * panel + d * 2 * L + L + lane] = value;
    };
    int64_t t = 0;
    for (; (t + 1) * L <= W; ++t) {
      const T* s = src + t * L * pix;
      if ((t + 2) * L <= W) prefetch_next_block(s, pix, D);
      for (int64_t d0 = 0; d0 < d_vec; d0 += L) {
        simd::vec<T> b_rows[L];
        load_block_t(s, pix, d0, b_rows);
        for (int64_t dd = 0; dd < L; ++dd) {
          simd::store(dst + t * panel + (d0 + dd) * 2 * L, b_rows[dd]);
          if (t > 0) simd::store(dst + (t - 1) * panel + (d0 + dd) * 2 * L + L, b_rows[dd]);
        }
      }
      for (int64_t d = d_vec; d < D; ++d)
        for (int64_t jj = 0; jj < L; ++jj) put(t, d, jj, s[jj * pix + d]);
    }
    for (int64_t j = t * L; j < W; ++j)
      for (int64_t d = 0; d < D; ++d) put(t, d, j - t * L, src[j * pix + d]);
    T* bp = dst + NP * panel;
    // the kw left and kw right columns of channel d: runs inside one panel row each when kw <= L + 1
    const int64_t p_right = (W - kw) / L, o_right = (W - kw) % L;
    const bool runs = o_right + kw <= 2 * L && kw <= 2 * L;
    auto column = [&](int64_t d, int64_t c) { return dst[(c / L) * panel + d * 2 * L + c % L]; };
    for (int64_t u = 0; u < NBB; ++u) {
      // lanes of the first kw/2 queries take the left column, those of the last kw/2 the right one, the
      // tail queries (pixel p) column p - kw/2 + dc: lane l's is c_tail + l + dc
      simd::ivec<T> left_lane{}, tail_lane{}, used_lane{};
      for (int64_t l = 0; l < L; ++l) {
        const int64_t g = u * L + l;
        left_lane[l] = g < half ? -1 : 0;
        tail_lane[l] = g >= half && g < half + tail ? -1 : 0;
        used_lane[l] = g < nb ? -1 : 0;
      }
      const int64_t c_tail = W - nb + u * L - half;
      const simd::vec<T> zero = simd::zero<T>();
      for (int64_t d = 0; d < D; ++d) {
        T* o = bp + (u * D + d) * kw * L;
        const T* left = dst + d * 2 * L;
        const T* right = dst + p_right * panel + d * 2 * L + o_right;
        for (int64_t dc = 0; dc < kw; ++dc) {
          const T lv = runs ? left[dc] : column(d, dc);
          const T rv = runs ? right[dc] : column(d, W - kw + dc);
          simd::vec<T> x = simd::select<T>(left_lane, simd::splat(lv), simd::splat(rv));
          if (tail > 0) {
            const int64_t c = c_tail + dc;  // lane 0's column: a run of L inside one panel row when >= 0
            simd::vec<T> tv = zero;
            if (c >= 0) {
              tv = simd::load(dst + (c / L) * panel + d * 2 * L + c % L);
            } else {  // tiny rows: lanes before the tail would read before the row
              for (int64_t l = 0; l < L; ++l)
                if (tail_lane[l]) tv[l] = column(d, c + l);
            }
            x = simd::select<T>(tail_lane, tv, x);
          }
          simd::store(o + dc * L, simd::select<T>(used_lane, x, zero));
        }
      }
    }
  }

  // Make the slots hold key rows [r0, r0 + kh).
  void ensure(const T* kx, const T* vx, int64_t b, int64_t h, int64_t r0) {
    for (int64_t r = r0; r < r0 + P.kh; ++r) {
      const int64_t s = r % P.kh;
      if (row_of[s] == r) continue;
      build(kx, b, h, r, k.p + s * row_len);
      build(vx, b, h, r, v.p + s * row_len);
      row_of[s] = r;
    }
  }
};

// The forward of one query block of row i: interior block t (queries kw/2 + tL + lane, window start
// j - kw/2) or border block u (queries as in KeyRing). qb [D][L] the queries (scaled by scale * log2 e);
// writes ob [D][L] (normalized) and lse2[L] (log2 domain).
template <typename T>
struct BlockForward {
  const Problem<T>& P;
  std::vector<simd::vec<T>> s;      // [keys + M] scores, then probabilities
  std::vector<simd::vec<T>> allow;  // [M] 0 / 1 per lane of the block's active conditioners
  std::vector<int64_t> active;
  std::vector<simd::vec<T>> acc;    // [D] output accumulators (block_wsum's register tiles pass through here)
  std::vector<const T*> kc, vc;     // [M] the active conditioners' keys and values (at channel 0 / d0)
  std::vector<const T*> vrow;       // [kh] the value rows of a chunk of window offsets (block_wsum)
  LineQueue next;                   // the next query row's lines, prefetched by the kernels

  explicit BlockForward(const Problem<T>& P_)
      : P(P_), s(P_.keys() + P_.M), allow(P_.M), acc(P_.D), kc(P_.M), vc(P_.M), vrow(P_.kh) {
    active.reserve(P_.M);
    next.line.reserve(5 * P_.W * ((P_.D * sizeof(T) + 63) / 64 + 1));  // at most five rows, no reallocation
  }

  // The conditioners some lane of the block may see (lane l: pixel pixels[l], l < nvalid), with lane masks.
  void conditioners(int64_t b, int64_t i, const int64_t* pixels, int64_t nvalid) {
    constexpr int64_t L = simd::kLanes<T>;
    active.clear();
    if (P.mask == nullptr) {  // every pixel sees every conditioner
      simd::vec<T> a = simd::zero<T>();
      for (int64_t l = 0; l < nvalid; ++l) a[l] = T(1);
      for (int64_t m = 0; m < P.M; ++m) {
        allow[m] = a;
        active.push_back(m);
      }
      return;
    }
    const bool contiguous = pixels[nvalid - 1] - pixels[0] == nvalid - 1;
    for (int64_t m = 0; m < P.M; ++m) {
      const uint8_t* row = P.mask + ((b * P.M + m) * P.H + i) * P.W;
      if (contiguous) {  // interior blocks: skip a conditioner none of the block's pixels sees, 8 bytes a test
        uint64_t bits = 0;
        int64_t l = 0;
        for (; l + 8 <= nvalid; l += 8) {
          uint64_t w;
          std::memcpy(&w, row + pixels[0] + l, 8);
          bits |= w;
        }
        for (; l < nvalid; ++l) bits |= row[pixels[0] + l];
        if (bits == 0) continue;
      }
      simd::vec<T> a = simd::zero<T>();
      bool any = false;
      for (int64_t l = 0; l < nvalid; ++l) {
        const bool ok = row[pixels[l]] != 0;
        a[l] = ok ? T(1) : T(0);
        any = any || ok;
      }
      if (any) {
        allow[active.size()] = a;
        active.push_back(m);
      }
    }
    (void)L;
  }

  // ks, vs: the kh key / value slots of the row (KeyRing::slots).
  void run(const KeyRing<T>& ring, const T* const* ks, const T* const* vs, bool interior, int64_t t, const T* qb,
           const T* ck, const T* cv, int64_t c_stride, T* ob, T* lse2) {
    constexpr int64_t L = simd::kLanes<T>;
    if (interior)
      run_as<1, 2 * L>(ks, vs, qb, ck, cv, c_stride, ob, lse2, [&](const T* slot, int64_t dc) {
        return ring.interior(slot, t + dc / L) + dc % L;
      }, 2 * L);
    else
      run_as<L, 0>(ks, vs, qb, ck, cv, c_stride, ob, lse2, [&](const T* slot, int64_t dc) {
        return ring.border(slot, t) + dc * L;
      }, P.kw * L);
  }

  // run() for one layout: key (value) c of a chunk at at(x, dr, dc0) + c * CS, channel d at + d * ds.
  template <int CS, int DS, typename At>
  void run_as(const T* const* ks, const T* const* vs, const T* qb, const T* ck, const T* cv, int64_t c_stride, T* ob,
              T* lse2, At at, int64_t ds) {
    constexpr int64_t L = simd::kLanes<T>, C = kChunk<T>;
    const int64_t D = P.D, kh = P.kh, kw = P.kw, keys = P.keys();
    const int64_t na = static_cast<int64_t>(active.size());
    // scores: the window, two key rows per pass, then the conditioners, up to 8 per pass
    for (int64_t dc0 = 0; dc0 < kw; dc0 += C) {
      const int64_t nc = std::min<int64_t>(C, kw - dc0);
      int64_t dr = 0;
      for (; dr + 2 <= kh; dr += 2) {
        const T *kp0 = at(ks[dr], dc0), *kp1 = at(ks[dr + 1], dc0);
        simd::vec<T>* s0 = s.data() + dr * kw + dc0;
#define FASTCOMP_DOTS2(N) block_dots2<T, N, CS, DS>(qb, kp0, kp1, ds, D, s0, s0 + kw, next)
        FASTCOMP_UP_TO_8(nc, FASTCOMP_DOTS2)
#undef FASTCOMP_DOTS2
      }
      for (; dr < kh; ++dr) {
        const T* kp = at(ks[dr], dc0);
        simd::vec<T>* s0 = s.data() + dr * kw + dc0;
#define FASTCOMP_DOTS(N) block_dots<T, N, CS, DS>(qb, kp, ds, D, s0)
        FASTCOMP_UP_TO_8(nc, FASTCOMP_DOTS)
#undef FASTCOMP_DOTS
      }
    }
    for (int64_t a = 0; a < na; ++a) {
      kc[a] = ck + active[a] * c_stride;
      vc[a] = cv + active[a] * c_stride;
    }
    for (int64_t a0 = 0; a0 < na; a0 += 8) {
      const int64_t n = std::min<int64_t>(8, na - a0);
#define FASTCOMP_DOTSC(N) block_dots_cond<T, N>(qb, kc.data() + a0, D, s.data() + keys + a0)
      FASTCOMP_UP_TO_8(n, FASTCOMP_DOTSC)
#undef FASTCOMP_DOTSC
    }
    // softmax: max over the window and the allowed conditioners, 2^(s - max), sum
    const simd::vec<T> zero = simd::zero<T>(), ninf = simd::splat(-std::numeric_limits<T>::infinity());
    simd::vec<T> b_max = s[0];
    for (int64_t key = 1; key < keys; ++key) b_max = simd::max<T>(b_max, s[key]);
    for (int64_t a = 0; a < na; ++a) b_max = simd::max<T>(b_max, simd::select<T>(allow[a] != zero, s[keys + a], ninf));
    simd::vec<T> b_sum = zero;
    for (int64_t key = 0; key < keys; ++key) {
      s[key] = exp2_neg(s[key] - b_max);
      b_sum += s[key];
    }
    for (int64_t a = 0; a < na; ++a) {
      s[keys + a] = simd::select<T>(allow[a] != zero, exp2_neg(s[keys + a] - b_max), zero);
      b_sum += s[keys + a];
    }
    // weighted sum of the values, up to 8 channels per register tile
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      const int64_t nd = std::min<int64_t>(8, D - d0);
      simd::vec<T>* a_d = acc.data() + d0;
      if (nd == 8) {  // vector stores: the loop with a run-time count became a `rep stos` memset (~2% of the forward)
#pragma GCC unroll 8
        for (int n = 0; n < 8; ++n) a_d[n] = zero;
      } else {
        for (int64_t n = 0; n < nd; ++n) a_d[n] = zero;
      }
      for (int64_t dc0 = 0; dc0 < kw; dc0 += C) {
        const int64_t ne = std::min<int64_t>(C, kw - dc0);
        for (int64_t dr = 0; dr < kh; ++dr) vrow[dr] = at(vs[dr], dc0) + d0 * ds;
        const simd::vec<T>* p = s.data() + dc0;
        if (nd == 8) {
          block_wsum_n<T, 8, CS, DS>(p, kw, ne, vrow.data(), kh, ds, a_d, next);
        } else {  // the D % 8 channels
#define FASTCOMP_WSUM(N) block_wsum_n<T, N, CS, DS>(p, kw, ne, vrow.data(), kh, ds, a_d, next)
          FASTCOMP_UP_TO_8(nd, FASTCOMP_WSUM)
#undef FASTCOMP_WSUM
        }
      }
      if (na) {
        for (int64_t a = 0; a < na; ++a) vc[a] = cv + active[a] * c_stride + d0;
#define FASTCOMP_WSUMC(N) block_wsum_cond<T, N>(s.data() + keys, na, vc.data(), a_d)
        FASTCOMP_UP_TO_8(nd, FASTCOMP_WSUMC)
#undef FASTCOMP_WSUMC
      }
    }
    const simd::vec<T> inv = simd::splat(T(1)) / b_sum;
    for (int64_t d = 0; d < D; ++d) simd::store(ob + d * L, acc[d] * inv);
    for (int64_t l = 0; l < L; ++l) lse2[l] = b_max[l] + std::log2(b_sum[l]);
  }
};

template <typename T>
void forward_impl(const Problem<T>& P, const T* q, const T* k, const T* v, const T* cond_k, const T* cond_v, T* out,
                  T* lse) {
  constexpr int64_t L = simd::kLanes<T>;
  // Enough row blocks that every thread has several tasks even when B*heads is small
  // (8 per thread: dynamic scheduling then evens out threads slowed by other processes on shared cores).
  const int64_t bh = P.B * P.NH;
  const int64_t want = 8 * static_cast<int64_t>(at::get_num_threads());
  const int64_t blocks = std::min<int64_t>(P.H, std::max<int64_t>(1, (want + bh - 1) / bh));
  const int64_t rows_per = (P.H + blocks - 1) / blocks;
  const int64_t tasks = bh * blocks;
  const int64_t c_stride = P.NH * P.D;
  const int64_t half = P.kw / 2, n_int = P.W - 2 * half;
  const int64_t n_blocks_int = n_int / L;  // whole blocks; the rest go with the border queries (KeyRing)

#pragma omp parallel num_threads(threads_for(tasks, work_of(P)))
  {
    KeyRing<T> ring(P, n_int % L);
    BlockForward<T> F(P);
    Aligned<T> qb(P.D * L), ob(P.D * L), lse2(L);
    int64_t pixels[L];
    std::vector<const T*> ks(P.kh), vs(P.kh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (P.NH * blocks), h = (task / blocks) % P.NH, blk = task % blocks;
      const int64_t i0 = blk * rows_per, i1 = std::min(P.H, i0 + rows_per);
      if (i0 >= i1) continue;
      ring.reset();
      const T* ck = cond_k == nullptr ? nullptr : cond_k + (b * P.M * P.NH + h) * P.D;
      const T* cv = cond_v == nullptr ? nullptr : cond_v + (b * P.M * P.NH + h) * P.D;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r_first = window_start(i, P.kh, P.H);
        ring.ensure(k, v, b, h, r_first);
        F.next.clear();
        if (i + 1 < i1) {  // the next row's new key/value row, its queries and its output, in the order it uses them
          const int64_t r_next = window_start(i + 1, P.kh, P.H) + P.kh - 1;
          if (r_next != r_first + P.kh - 1) {
            F.next.add_row(P, k, b, h, r_next, false);
            F.next.add_row(P, v, b, h, r_next, false);
          }
          F.next.add_row(P, q, b, h, i + 1, false);
          F.next.add_row(P, out, b, h, i + 1, true);
        }
        ring.slots(ring.k, r_first, ks.data());
        ring.slots(ring.v, r_first, vs.data());
        const int64_t row_off = P.row_off(b, h, i);
        T* lse_row = lse + ((b * P.NH + h) * P.H + i) * P.W;
        // one block: its queries transposed straight from q (scaled into the exp2 domain), its outputs
        // straight into out (no transposed copy of the row in between)
        auto block = [&](bool interior, int64_t t, int64_t nvalid) {
          gather_block_t(P, q + row_off, pixels, nvalid, static_cast<T>(P.scale * kLog2e), qb.p);
          F.conditioners(b, i, pixels, nvalid);
          F.run(ring, ks.data(), vs.data(), interior, t, qb.p, ck, cv, c_stride, ob.p, lse2.p);
          scatter_block_t(P, ob.p, pixels, nvalid, out + row_off);
          for (int64_t l = 0; l < nvalid; ++l) lse_row[pixels[l]] = lse2.p[l] * static_cast<T>(kLn2);
        };
        for (int64_t t = 0; t < n_blocks_int; ++t) {  // interior blocks
          for (int64_t l = 0; l < L; ++l) pixels[l] = half + t * L + l;
          block(true, t, L);
        }
        for (int64_t u = 0; u < ring.NBB; ++u) {  // border blocks
          const int64_t nvalid = std::min<int64_t>(L, ring.nb - u * L);
          for (int64_t l = 0; l < nvalid; ++l) pixels[l] = ring.border_pixel(u * L + l);
          block(false, u, nvalid);
        }
      }
    }
  }
}

// --- the backward, by the forward's blocks ---------------------------------------------------------------
//
// Tasks are (b, head, block of rows), see backward_impl; every dk / dv / dcond element has one writer (no
// atomics, deterministic). Per query row, two phases:
//  1. per query block (as the forward: interior blocks over the key/value panels, the border block over
//     the border panels): recompute the scores and P = 2^(s log2 e - lse log2 e), dP = dO . V, delta =
//     sum P dP, dS = P (dP - delta); dq = scale dS K (the forward's weighted sum, over the key panels);
//     conditioner gradients accumulate lane by lane; the border block's dk / dv are summed per class of
//     border queries (the first kw/2 all see key column dc at offset dc, the last kw/2 column W - kw + dc)
//     into a [2][kw][D] accumulator per key row.
//  2. dk / dv of the interior queries, gathered per tile of L key columns: key column c' gets
//     sum_dc dS[dc][u] x[u] over the queries u = c' + kw/2 - dc that see it at offset dc (dS kept for
//     the row as [key][column], zero outside the interior queries; x = scale q or dO as query panels,
//     the same 2L-wide rows as the key panels, so the shifted loads stay inside one line per channel).
//     Accumulated in registers, added to the tile once per (key row, tile, 8 channels). The accumulators
//     of the kh key rows the query row sees form a ring; a key row goes to dk / dv (tiles transposed, the
//     border sums added) once no later query row sees it.

// Query panels of the scatter: panel j holds columns jL + f .. jL + f + 2L of a transposed row (f =
// kw/2 - L + 1), for j from -JOFF (so the gathers of the far offsets have panels) to NT.
template <typename T>
struct QueryPanels {
  int64_t f, JOFF, NJ, panel;
  Aligned<T> x;
  QueryPanels(const Problem<T>& P, int64_t NT)
      : f(P.kw / 2 - simd::kLanes<T> + 1), JOFF((P.kw + simd::kLanes<T> - 1) / simd::kLanes<T>),
        NJ(NT + JOFF + 1), panel(P.D * 2 * simd::kLanes<T>), x(NJ * P.D * 2 * simd::kLanes<T>) {}
  // from a transposed row xt [D][ldx] whose column c sits at xt + FP + c (zero outside [0, W))
  void build(const T* xt, int64_t ldx, int64_t FP, int64_t D) {
    constexpr int64_t L = simd::kLanes<T>;
    for (int64_t jj = 0; jj < NJ; ++jj) {
      const int64_t c0 = (jj - JOFF) * L + f;
      for (int64_t d = 0; d < D; ++d) {
        const T* src = xt + d * ldx + FP + c0;
        T* o = x.p + jj * panel + d * 2 * L;
        simd::store(o, simd::load(src));
        simd::store(o + L, simd::load(src + L));
      }
    }
  }
  const T* at(int64_t j) const { return x.p + (j + JOFF) * panel; }
};

// acc[n] += sum_e w_e * x_e[n]: the gather of one chunk of window offsets for 8 (ND) channels.
// w_e = weights of offset dc0 + e at the queries u0 - e (w + e * (ldw - 1)), x_e at xp - e (channel n at
// + n * 2L): the query that sees the tile's lane l at offset dc0 + e is one column left per offset.
template <typename T, int ND, int NE>
FASTCOMP_CONTRACT inline void block_gather(const T* __restrict w, int64_t ldw, const T* __restrict xp,
                                           simd::vec<T>* __restrict acc) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  simd::vec<T> b_acc[ND];
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) b_acc[n] = acc[n];
#pragma GCC unroll 16
  for (int e = 0; e < NE; ++e) {
    const simd::vec<T> b_w = simd::load(w + e * (ldw - 1));
#pragma GCC unroll 8
    for (int n = 0; n < ND; ++n) b_acc[n] = b_w * simd::load(xp + n * 2 * L - e) + b_acc[n];
  }
#pragma GCC unroll 8
  for (int n = 0; n < ND; ++n) acc[n] = b_acc[n];
}

// A whole tile's gather of one chunk: g [D][L] (a key row's dk or dv accumulators for L key columns) +=
// block_gather over every 8 channels, the accumulators loaded from and stored to g in the kernel (per 8
// channels through a register array and a call per group, the loop overhead and the array's round trip
// through the stack cost as much as the gather's FMAs). The D % 8 channels go through block_gather; the
// whole groups keep their own copy of its loop: calling block_gather<T, 8, NE> for them measured 10%
// slower on the backward (driver, 1 thread).
template <typename T, int NE>
FASTCOMP_CONTRACT inline void tile_gather(const T* __restrict w, int64_t ldw, const T* __restrict xp, int64_t D,
                                          T* __restrict g) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  int64_t d0 = 0;
  for (; d0 + 8 <= D; d0 += 8) {
    T* gd = g + d0 * L;
    const T* xd = xp + d0 * 2 * L;
    simd::vec<T> b_acc[8];
#pragma GCC unroll 8
    for (int n = 0; n < 8; ++n) b_acc[n] = simd::load(gd + n * L);
#pragma GCC unroll 16
    for (int e = 0; e < NE; ++e) {
      const simd::vec<T> b_w = simd::load(w + e * (ldw - 1));
#pragma GCC unroll 8
      for (int n = 0; n < 8; ++n) b_acc[n] = b_w * simd::load(xd + n * 2 * L - e) + b_acc[n];
    }
#pragma GCC unroll 8
    for (int n = 0; n < 8; ++n) simd::store(gd + n * L, b_acc[n]);
  }
  if (d0 < D) {
    const int64_t nd = D - d0;
    simd::vec<T> b_acc[8];
    for (int64_t n = 0; n < nd; ++n) b_acc[n] = simd::load(g + (d0 + n) * L);
    switch (nd) {
#define FASTCOMP_GT(N) case N: block_gather<T, N, NE>(w, ldw, xp + d0 * 2 * L, b_acc); break;
      FASTCOMP_GT(7) FASTCOMP_GT(6) FASTCOMP_GT(5) FASTCOMP_GT(4) FASTCOMP_GT(3) FASTCOMP_GT(2)
#undef FASTCOMP_GT
      default: block_gather<T, 1, NE>(w, ldw, xp + d0 * 2 * L, b_acc); break;
    }
    for (int64_t n = 0; n < nd; ++n) simd::store(g + (d0 + n) * L, b_acc[n]);
  }
}

// tile_gather for a run-time chunk length ne <= L (16 with AVX-512 float32).
template <typename T>
inline void tile_gather_n(const T* w, int64_t ldw, const T* xp, int64_t ne, int64_t D, T* g) {
  switch (ne) {
#define FASTCOMP_TG(N) case N: tile_gather<T, N>(w, ldw, xp, D, g); break;
    FASTCOMP_TG(16) FASTCOMP_TG(15) FASTCOMP_TG(14) FASTCOMP_TG(13) FASTCOMP_TG(12) FASTCOMP_TG(11) FASTCOMP_TG(10)
    FASTCOMP_TG(9) FASTCOMP_TG(8) FASTCOMP_TG(7) FASTCOMP_TG(6) FASTCOMP_TG(5) FASTCOMP_TG(4) FASTCOMP_TG(3)
    FASTCOMP_TG(2)
#undef FASTCOMP_TG
    default: tile_gather<T, 1>(w, ldw, xp, D, g); break;
  }
}

// One class of border queries' dk (or dv) over the whole window: for every key (dr, dc),
// acc[dr][dc * D + d] += sum_j w[(dr kw + dc) L + j] rows[j][d], d < D, the channels as lanes and the n <= L
// queries' terms summed in registers before the one read-modify-write of the accumulator (see
// backward_impl). Per L channels the n query rows are loaded once for all kh kw keys: a call per key
// reloaded them and cost ~5% of the backward in loads and call overhead.
template <typename T>
FASTCOMP_CONTRACT inline void border_class_sums(T* const* acc, int64_t kh, int64_t kw, const T* w,
                                                const T* const* rows, int64_t n, int64_t D) {
  FASTCOMP_CONTRACT_BODY
  constexpr int64_t L = simd::kLanes<T>;
  if (n <= 0) return;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    simd::vec<T> r[L];
    for (int64_t j = 0; j < n; ++j) r[j] = simd::load(rows[j] + d);
    for (int64_t dr = 0; dr < kh; ++dr)
      for (int64_t dc = 0; dc < kw; ++dc) {
        T* a_p = acc[dr] + dc * D + d;
        const T* w_key = w + (dr * kw + dc) * L;
        simd::vec<T> a = simd::load(a_p);
        for (int64_t j = 0; j < n; ++j) a = simd::splat(w_key[j]) * r[j] + a;
        simd::store(a_p, a);
      }
  }
  for (; d < D; ++d)
    for (int64_t dr = 0; dr < kh; ++dr)
      for (int64_t dc = 0; dc < kw; ++dc) {
        const T* w_key = w + (dr * kw + dc) * L;
        T a = acc[dr][dc * D + d];
        for (int64_t j = 0; j < n; ++j) a = w_key[j] * rows[j][d] + a;
        acc[dr][dc * D + d] = a;
      }
}

template <typename T>
void backward_impl(const Problem<T>& P, const T* go, const T* q, const T* k, const T* v, const T* cond_k,
                   const T* cond_v, const T* out, const T* lse, T* dq, T* dk, T* dv, T* dck, T* dcv) {
  (void)out;  // delta = sum_keys P dP (= dO . out) is formed from the recomputed P, see phase 1
  constexpr int64_t L = simd::kLanes<T>, C = kChunk<T>;
  const int64_t c_stride = P.NH * P.D;
  const int64_t D = P.D, kh = P.kh, kw = P.kw, keys = P.keys(), half = kw / 2, W = P.W, H = P.H;
  // Tasks: (b, head, block of rows) when B * heads alone would leave threads idle (at least two tasks per
  // thread; on 2 cores the bench case keeps one block per (b, head): each block costs kh - 1 extra key
  // rows and the shared rows' parts, ~4% there). A block is at least 2 kh rows tall, so the queries that
  // see a key row lie in at most two blocks. Of a row two blocks share (at most kh per boundary), the upper
  // block writes its part to dk / dv and the lower one its part to `side`, added after both are done: a
  // fixed sum of two parts (deterministic for a given thread count; the blocks, and so the last bits,
  // follow the thread count).
  const int64_t bh = P.B * P.NH;
  const int64_t want = (2 * static_cast<int64_t>(at::get_num_threads()) + bh - 1) / bh;
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(want, H / (2 * kh)));
  const int64_t tasks = bh * nblk;
  auto block_start = [&](int64_t j) { return j * H / nblk; };
  const int64_t row_size = W * D;  // a shared row's part: [W][D]
  std::vector<T> side(nblk > 1 ? bh * (nblk - 1) * kh * 2 * row_size : 0);  // [bh][boundary][row][dk/dv]
  auto side_row = [&](int64_t bhi, int64_t j, int64_t rr, int pass) {
    return side.data() + (((bhi * (nblk - 1) + j) * kh + rr) * 2 + pass) * row_size;
  };
  std::vector<T> cond_part(tasks * P.M * D * 2);  // [task][m][dk/dv][D]: each block's conditioner gradients
  const int64_t n_int = W - 2 * half, n_blocks_int = (n_int + L - 1) / L;
  const int64_t NT = (W + L - 1) / L;                 // key tiles of a row
  const T log2e = static_cast<T>(kLog2e);

#pragma omp parallel num_threads(threads_for(tasks, work_of(P)))
  {
    KeyRing<T> ring(P);
    BlockForward<T> F(P);  // conditioners(), the score and weighted-sum kernels' scratch, the prefetch queue
    QueryPanels<T> xq(P, NT), xo(P, NT);
    const int64_t FP = (xq.JOFF + 2) * L;               // front padding of the transposed query-side rows
    const int64_t ldx = FP + (NT + xq.JOFF + 4) * L;    // their length
    Aligned<T> qt(D * ldx), got(D * ldx), dqt(D * ldx), qb(D * L), gob(D * L), dqb(D * L), lse2(W + 2 * L);
    Aligned<T> p_row((keys + 1) * ldx), ds_row((keys + 1) * ldx);  // interior P, dS by [key][column]
    Aligned<T> w_k(keys * L), w_v(keys * L);  // the border block's dk / dv weights by [key][lane]
    std::vector<T*> class_acc(4 * kh);         // its classes' accumulator rows: dk left, right, dv left, right
    const int64_t tile = D * L;
    // dk / dv accumulators of the kh key rows the current query row sees (slot r % kh), flushed to dk / dv
    // as soon as no later query row sees their row: a whole (b, head) plane of them (1 MB at 64x64 d32)
    // left L2 and cost ~10% of the backward in cache misses when read back at the end.
    std::vector<T> gk(kh * NT * tile), gv(kh * NT * tile);             // [slot][tile][D][L]
    const int64_t bsz = 2 * kw * D;                                    // border accumulators per key row
    std::vector<T> bk(kh * bsz), bv(kh * bsz);  // [slot][first / last border queries][kw][D]
    std::vector<simd::vec<T>> ckv(P.M * D), cvv(P.M * D);              // conditioner gradients, lane-wise
    std::vector<simd::vec<T>> sp(keys + P.M), dpv(keys + P.M);
    std::vector<const T*> ks(kh), vs(kh), kc(P.M), vc(P.M), krow(kh);
    int64_t pixels[L];
    simd::vec<T> b_acc[8];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bhi = task / nblk, blk = task % nblk, b = bhi / P.NH, h = bhi % P.NH;
      const int64_t i0 = block_start(blk), i1 = block_start(blk + 1);
      ring.reset();
      std::fill(gk.begin(), gk.end(), T(0));
      std::fill(gv.begin(), gv.end(), T(0));
      std::fill(bk.begin(), bk.end(), T(0));
      std::fill(bv.begin(), bv.end(), T(0));
      std::fill(ckv.begin(), ckv.end(), simd::zero<T>());
      std::fill(cvv.begin(), cvv.end(), simd::zero<T>());
      const T* ck = cond_k == nullptr ? nullptr : cond_k + (b * P.M * P.NH + h) * D;
      const T* cv = cond_v == nullptr ? nullptr : cond_v + (b * P.M * P.NH + h) * D;
      // dk, dv of key row r: the tiles, then the border queries' sums added to their columns, into dk / dv
      // or, for a row the previous block's queries see too, into `side`; the slot is zeroed for the row
      // that takes it next
      const int64_t shared_below = blk > 0 ? window_start(i0 - 1, kh, H) + kh : 0;  // rows < this
      const int64_t first_row = window_start(i0, kh, H), end_row = window_start(i1 - 1, kh, H) + kh;
      int64_t flushed = first_row;  // key rows of this block before this one are written
      auto flush_row = [&](int64_t r) {
        const int64_t slot = r % kh;
        for (int pass = 0; pass < 2; ++pass) {
          T* out_row = (pass == 0 ? dk : dv) + P.row_off(b, h, r);
          int64_t out_pix = P.pix();
          if (r < shared_below) {
            out_row = side_row(bhi, blk - 1, r - first_row, pass);
            out_pix = D;
          }
          std::vector<T>& g = pass == 0 ? gk : gv;
          std::vector<T>& bb = pass == 0 ? bk : bv;
          store_row_t(P, g.data() + slot * NT * tile, T(1), out_row, static_cast<const T*>(nullptr), L, out_pix, tile);
          const T* sums = bb.data() + slot * bsz;  // first border queries: column dc; last: W - kw + dc
          for (int64_t dc = 0; dc < kw; ++dc) {
            for (int64_t d = 0; d < D; ++d) out_row[dc * out_pix + d] += sums[dc * D + d];
            for (int64_t d = 0; d < D; ++d) out_row[(W - kw + dc) * out_pix + d] += sums[(kw + dc) * D + d];
          }
          std::fill(g.begin() + slot * NT * tile, g.begin() + (slot + 1) * NT * tile, T(0));
          std::fill(bb.begin() + slot * bsz, bb.begin() + (slot + 1) * bsz, T(0));
        }
      };
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r_first = window_start(i, kh, H);
        ring.ensure(k, v, b, h, r_first);
        F.next.clear();
        if (i + 1 < i1) {  // as the forward's: the next row's new key/value row, q, dO, and its dq row
          const int64_t r_next = window_start(i + 1, kh, H) + kh - 1;
          if (r_next != r_first + kh - 1) {
            F.next.add_row(P, k, b, h, r_next, false);
            F.next.add_row(P, v, b, h, r_next, false);
          }
          F.next.add_row(P, q, b, h, i + 1, false);
          F.next.add_row(P, go, b, h, i + 1, false);
          F.next.add_row(P, dq, b, h, i + 1, true);
        }
        ring.slots(ring.k, r_first, ks.data());
        ring.slots(ring.v, r_first, vs.data());
        const int64_t row_off = P.row_off(b, h, i);
        load_row_t(P, q + row_off, P.scale, qt.p + FP, ldx);  // columns outside [0, W) stay 0
        load_row_t(P, go + row_off, T(1), got.p + FP, ldx);
        const T* lse_row = lse + ((b * P.NH + h) * H + i) * W;
        for (int64_t j = 0; j < W; ++j) lse2.p[j] = lse_row[j] * log2e;

        // phase 1: one block of queries at a time
        auto block = [&](bool interior, int64_t t, int64_t nvalid) {
          const int64_t j0 = interior ? half + t * L : 0;
          for (int64_t l = 0; l < L; ++l)
            pixels[l] = interior ? j0 + l : (t * L + l < 2 * half ? ring.border_pixel(t * L + l) : 0);
          simd::vec<T> b_lse = simd::zero<T>();
          typename KeyRing<T>::BorderLanes lanes;  // the border block's columns
          if (interior) {  // contiguous pixels: whole registers (lanes past the row hold zeros or its queries)
            b_lse = simd::load(lse2.p + j0);
            for (int64_t d = 0; d < D; ++d) {
              simd::store(qb.p + d * L, simd::load(qt.p + d * ldx + FP + j0));
              simd::store(gob.p + d * L, simd::load(got.p + d * ldx + FP + j0));
            }
          } else {
            lanes = ring.border_lanes(t);
            b_lse = lanes.gather(lse2.p);
            for (int64_t d = 0; d < D; ++d) {
              simd::store(qb.p + d * L, lanes.gather(qt.p + d * ldx + FP));
              simd::store(gob.p + d * L, lanes.gather(got.p + d * ldx + FP));
            }
          }
          F.conditioners(b, i, pixels, nvalid);
          const int64_t na = static_cast<int64_t>(F.active.size());
          for (int64_t a = 0; a < na; ++a) {
            kc[a] = ck + F.active[a] * c_stride;
            vc[a] = cv + F.active[a] * c_stride;
          }
          // scores (s) and dP (dpv) over the window and the conditioners
          const int64_t ds_ = interior ? 2 * L : kw * L;
          auto kat = [&](const T* slot, int64_t dc) {
            return interior ? ring.interior(slot, t + dc / L) + dc % L : ring.border(slot, t) + dc * L;
          };
          auto dots = [&](const T* x, const T* const* slots, simd::vec<T>* s) {
            for (int64_t dc0 = 0; dc0 < kw; dc0 += C) {
              const int64_t nc = std::min<int64_t>(C, kw - dc0);
              int64_t dr = 0;
              for (; dr + 2 <= kh; dr += 2) {
                const T *kp0 = kat(slots[dr], dc0), *kp1 = kat(slots[dr + 1], dc0);
                simd::vec<T>* s0 = s + dr * kw + dc0;
                if (interior) {
#define FASTCOMP_D2(N) block_dots2<T, N, 1, 2 * L>(x, kp0, kp1, ds_, D, s0, s0 + kw, F.next)
                  FASTCOMP_UP_TO_8(nc, FASTCOMP_D2)
#undef FASTCOMP_D2
                } else {
#define FASTCOMP_D2B(N) block_dots2<T, N, L, 0>(x, kp0, kp1, ds_, D, s0, s0 + kw, F.next)
                  FASTCOMP_UP_TO_8(nc, FASTCOMP_D2B)
#undef FASTCOMP_D2B
                }
              }
              for (; dr < kh; ++dr) {
                const T* kp = kat(slots[dr], dc0);
                simd::vec<T>* s0 = s + dr * kw + dc0;
                if (interior) {
#define FASTCOMP_D1(N) block_dots<T, N, 1, 2 * L>(x, kp, ds_, D, s0)
                  FASTCOMP_UP_TO_8(nc, FASTCOMP_D1)
#undef FASTCOMP_D1
                } else {
#define FASTCOMP_D1B(N) block_dots<T, N, L, 0>(x, kp, ds_, D, s0)
                  FASTCOMP_UP_TO_8(nc, FASTCOMP_D1B)
#undef FASTCOMP_D1B
                }
              }
            }
          };
          dots(qb.p, ks.data(), sp.data());
          dots(gob.p, vs.data(), dpv.data());
          for (int64_t a0 = 0; a0 < na; a0 += 8) {
            const int64_t n = std::min<int64_t>(8, na - a0);
#define FASTCOMP_DC(N)                                                                  \
  block_dots_cond<T, N>(qb.p, kc.data() + a0, D, sp.data() + keys + a0);               \
  block_dots_cond<T, N>(gob.p, vc.data() + a0, D, dpv.data() + keys + a0)
            FASTCOMP_UP_TO_8(n, FASTCOMP_DC)
#undef FASTCOMP_DC
          }
          // P, delta = sum P dP, dS = P (dP - delta) (into dpv)
          const simd::vec<T> zero = simd::zero<T>();
          simd::vec<T> b_delta = zero;
          for (int64_t key = 0; key < keys + na; ++key) {
            simd::vec<T> p = exp2_neg(sp[key] * log2e - b_lse);
            if (key >= keys) p = simd::select<T>(F.allow[key - keys] != zero, p, zero);
            sp[key] = p;
            b_delta += p * dpv[key];
          }
          for (int64_t key = 0; key < keys + na; ++key) dpv[key] = sp[key] * (dpv[key] - b_delta);
          // dq = scale dS K, 8 channels per register tile
          for (int64_t d0 = 0; d0 < D; d0 += 8) {
            const int64_t nd = std::min<int64_t>(8, D - d0);
            for (int64_t n = 0; n < nd; ++n) b_acc[n] = zero;
            for (int64_t dc0 = 0; dc0 < kw; dc0 += C) {
              const int64_t ne = std::min<int64_t>(C, kw - dc0);
              for (int64_t dr = 0; dr < kh; ++dr) krow[dr] = kat(ks[dr], dc0) + d0 * ds_;
              const simd::vec<T>* w = dpv.data() + dc0;
              if (interior) {
#define FASTCOMP_W(N) block_wsum_n<T, N, 1, 2 * L>(w, kw, ne, krow.data(), kh, ds_, b_acc, F.next)
                FASTCOMP_UP_TO_8(nd, FASTCOMP_W)
#undef FASTCOMP_W
              } else {
#define FASTCOMP_WB(N) block_wsum_n<T, N, L, 0>(w, kw, ne, krow.data(), kh, ds_, b_acc, F.next)
                FASTCOMP_UP_TO_8(nd, FASTCOMP_WB)
#undef FASTCOMP_WB
              }
            }
            if (na) {
              for (int64_t a = 0; a < na; ++a) kc[a] = ck + F.active[a] * c_stride + d0;
#define FASTCOMP_WC(N) block_wsum_cond<T, N>(dpv.data() + keys, na, kc.data(), b_acc)
              FASTCOMP_UP_TO_8(nd, FASTCOMP_WC)
#undef FASTCOMP_WC
            }
            for (int64_t n = 0; n < nd; ++n) simd::store(dqb.p + (d0 + n) * L, b_acc[n] * P.scale);
          }
          // conditioner gradients, lane by lane: dcond_k += dS q scale, dcond_v += P dO
          for (int64_t a = 0; a < na; ++a) {
            simd::vec<T>* gk_m = ckv.data() + F.active[a] * D;
            simd::vec<T>* gv_m = cvv.data() + F.active[a] * D;
            const simd::vec<T> w_k = dpv[keys + a], w_v = sp[keys + a];
            for (int64_t d = 0; d < D; ++d) {
              gk_m[d] += w_k * simd::load(qb.p + d * L);
              gv_m[d] += w_v * simd::load(gob.p + d * L);
            }
          }
          if (interior) {  // dq, and P / dS for the gathers of phase 2
            for (int64_t d = 0; d < D; ++d) simd::store(dqt.p + d * ldx + FP + j0, simd::load(dqb.p + d * L));
            for (int64_t key = 0; key < keys; ++key) {
              simd::store(p_row.p + key * ldx + FP + j0, sp[key]);
              simd::store(ds_row.p + key * ldx + FP + j0, dpv[key]);
            }
          } else {  // dq of the valid lanes; the border dk / dv, lane-wise, into the border accumulators
            for (int64_t d = 0; d < D; ++d) lanes.scatter(dqt.p + d * ldx + FP, simd::load(dqb.p + d * L));
            // the border dk += scale dS q, dv += P dO: the first kw/2 border queries all see key column dc at
            // window offset dc and the last kw/2 column W - kw + dc, so each class's sum over its queries is
            // formed in registers (channels as lanes, from the queries' heads-last rows) and added once to the
            // class's [kw][D] accumulator of the key row; a lane-wise [kw][D][L] accumulator per key row was
            // 4x the data and read-modified-written by every query row (~8% of the backward)
            const int64_t n_left = std::max<int64_t>(0, std::min<int64_t>(nvalid, half - t * L));
            const T *q_rows[L], *o_rows[L];
            for (int64_t l = 0; l < nvalid; ++l) {
              q_rows[l] = q + row_off + pixels[l] * P.pix();
              o_rows[l] = go + row_off + pixels[l] * P.pix();
            }
            for (int64_t key = 0; key < keys; ++key) {  // the weights by [key][lane]: scale dS for dk, P for dv
              simd::store(w_k.p + key * L, dpv[key] * P.scale);
              simd::store(w_v.p + key * L, sp[key]);
            }
            T **k_left = class_acc.data(), **k_right = k_left + kh, **v_left = k_right + kh, **v_right = v_left + kh;
            for (int64_t dr = 0; dr < kh; ++dr) {  // each key row's accumulators of the two classes
              k_left[dr] = bk.data() + ((r_first + dr) % kh) * bsz;
              v_left[dr] = bv.data() + ((r_first + dr) % kh) * bsz;
              k_right[dr] = k_left[dr] + kw * D;
              v_right[dr] = v_left[dr] + kw * D;
            }
            border_class_sums(k_left, kh, kw, w_k.p, q_rows, n_left, D);
            border_class_sums(k_right, kh, kw, w_k.p + n_left, q_rows + n_left, nvalid - n_left, D);
            border_class_sums(v_left, kh, kw, w_v.p, o_rows, n_left, D);
            border_class_sums(v_right, kh, kw, w_v.p + n_left, o_rows + n_left, nvalid - n_left, D);
          }
        };
        for (int64_t t = 0; t < n_blocks_int; ++t) block(true, t, std::min<int64_t>(L, n_int - t * L));
        for (int64_t u = 0; u < ring.NBB; ++u) block(false, u, std::min<int64_t>(L, 2 * half - u * L));
        // the gathers below read P and dS of the interior queries only (the last interior block wrote lanes
        // past them); dq of the row
        for (int64_t key = 0; key < keys; ++key)
          for (int64_t j = W - half; j < half + n_blocks_int * L; ++j) {
            p_row.p[key * ldx + FP + j] = T(0);
            ds_row.p[key * ldx + FP + j] = T(0);
          }
        store_row_t(P, dqt.p + FP, T(1), dq + row_off, static_cast<const T*>(nullptr), ldx);

        // phase 2: dk / dv of the interior queries, per tile of key columns
        xq.build(qt.p, ldx, FP, D);
        xo.build(got.p, ldx, FP, D);
        const int64_t n_chunks = (kw + L - 1) / L;
        for (int64_t dr = 0; dr < kh; ++dr) {
          const int64_t r = r_first + dr;
          for (int pass = 0; pass < 2; ++pass) {
            const Aligned<T>& wrow = pass == 0 ? ds_row : p_row;
            const QueryPanels<T>& xp = pass == 0 ? xq : xo;
            T* g_row = (pass == 0 ? gk : gv).data() + (r % kh) * NT * tile;
            // offset dc0 + e of chunk m: the query c L + lane + kw/2 - dc0 - e; weights of key dr * kw + dc0 + e
            const T* w_row = wrow.p + dr * kw * ldx + FP + half;
            for (int64_t c = 0; c < NT; ++c) {
              T* g = g_row + c * tile;
              F.next.step();
              for (int64_t m = 0; m < n_chunks; ++m) {
                const int64_t dc0 = m * L, ne = std::min<int64_t>(L, kw - dc0);
                tile_gather_n<T>(w_row + dc0 * ldx + c * L - dc0, ldx, xp.at(c - m) + L - 1, ne, D, g);
              }
            }
          }
        }
        // key rows no later query row sees are final
        const int64_t done = i + 1 < i1 ? window_start(i + 1, kh, H) : end_row;
        for (; flushed < done; ++flushed) flush_row(flushed);
      }
      for (int64_t m = 0; m < P.M; ++m) {
        T* part = cond_part.data() + (task * P.M + m) * 2 * D;
        for (int64_t d = 0; d < D; ++d) {
          part[d] = simd::lane_sum<T>(ckv[m * D + d]);
          part[D + d] = simd::lane_sum<T>(cvv[m * D + d]);
        }
      }
    }
    // the rows two blocks share: the upper block's part (in dk / dv) + the lower one's; the conditioner
    // gradients: the blocks' parts in block order
#pragma omp for schedule(static)
    for (int64_t jj = 0; jj < bh * (nblk - 1); ++jj) {
      const int64_t bhi = jj / (nblk - 1), j = jj % (nblk - 1), b = bhi / P.NH, h = bhi % P.NH;
      const int64_t i1 = block_start(j + 1);
      const int64_t r0 = window_start(i1, kh, H), r1 = window_start(i1 - 1, kh, H) + kh;
      for (int64_t r = r0; r < r1; ++r)
        for (int pass = 0; pass < 2; ++pass) {
          const T* c = side_row(bhi, j, r - r0, pass);
          T* o = (pass == 0 ? dk : dv) + P.row_off(b, h, r);
          for (int64_t j2 = 0; j2 < W; ++j2)
            for (int64_t d = 0; d < D; ++d) o[j2 * P.pix() + d] += c[j2 * D + d];
        }
    }
#pragma omp for schedule(static)
    for (int64_t bhi = 0; bhi < bh; ++bhi) {
      const int64_t b = bhi / P.NH, h = bhi % P.NH;
      for (int64_t m = 0; m < P.M; ++m) {
        T* pk = dck + ((b * P.M + m) * P.NH + h) * D;
        T* pv = dcv + ((b * P.M + m) * P.NH + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          T sk = 0, sv = 0;
          for (int64_t blk = 0; blk < nblk; ++blk) {
            const T* part = cond_part.data() + ((bhi * nblk + blk) * P.M + m) * 2 * D;
            sk += part[d];
            sv += part[D + d];
          }
          pk[d] = sk;
          pv[d] = sv;
        }
      }
    }
  }
}

// --- argument checks ----------------------------------------------------------------------------------

void check_like(const at::Tensor& t, const char* name, const at::Tensor& q, at::IntArrayRef shape) {
  FASTCOMP_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                 t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), name, " must be contiguous");
  FASTCOMP_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

struct Args {
  int64_t M;
  const uint8_t* mask;
};

Args check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cond_k,
                  const at::Tensor& cond_v, const at::Tensor& cond_mask, int64_t kh, int64_t kw) {
  FASTCOMP_CHECK(q.dim() == 5, "q must be [B, H, W, heads, D], got ", q.sizes());
  FASTCOMP_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                 "q must be float32 or float64, got ", q.scalar_type());
  check_like(q, "q", q, q.sizes());
  check_like(k, "k", q, q.sizes());
  check_like(v, "v", q, q.sizes());
  FASTCOMP_CHECK(kh >= 1 && kh % 2 == 1 && kh <= q.size(1), "kh must be odd and in [1, H], got ", kh);
  FASTCOMP_CHECK(kw >= 1 && kw % 2 == 1 && kw <= q.size(2), "kw must be odd and in [1, W], got ", kw);
  FASTCOMP_CHECK(cond_k.dim() == 4, "cond_k must be [B, M, heads, D], got ", cond_k.sizes());
  const int64_t M = cond_k.size(1);
  const std::vector<int64_t> cshape{q.size(0), M, q.size(3), q.size(4)};
  check_like(cond_k, "cond_k", q, cshape);
  check_like(cond_v, "cond_v", q, cshape);
  const uint8_t* mask = nullptr;
  if (cond_mask.numel() > 0 || cond_mask.dim() == 4) {
    FASTCOMP_CHECK(cond_mask.scalar_type() == at::kBool, "cond_mask must be bool, got ", cond_mask.scalar_type());
    FASTCOMP_CHECK(cond_mask.is_contiguous() && cond_mask.device().is_cpu(), "cond_mask must be a contiguous CPU tensor");
    FASTCOMP_CHECK(cond_mask.sizes() == at::IntArrayRef({q.size(0), M, q.size(1), q.size(2)}),
                   "cond_mask must be [B, M, H, W], got ", cond_mask.sizes());
    mask = reinterpret_cast<const uint8_t*>(cond_mask.data_ptr<bool>());
  }
  return {M, mask};
}

}  // namespace

// See attention_cpu.h. cond_k/cond_v are [B, M, heads, D] (M may be 0); cond_mask is [B, M, H, W] bool,
// or an empty 1-d tensor for "every pixel sees every conditioner".
void local_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cond_k, const at::Tensor& cond_v, const at::Tensor& cond_mask,
                                 int64_t kh, int64_t kw, double scale, at::Tensor& out, at::Tensor& lse) {
  const Args a = check_common(q, k, v, cond_k, cond_v, cond_mask, kh, kw);
  check_like(out, "out", q, q.sizes());
  check_like(lse, "lse", q, {q.size(0), q.size(3), q.size(1), q.size(2)});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_forward_cpu", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(q, a.M, kh, kw, scale, a.mask);
    const scalar_t* ck = a.M ? cond_k.data_ptr<scalar_t>() : nullptr;
    const scalar_t* cv = a.M ? cond_v.data_ptr<scalar_t>() : nullptr;
    forward_impl<scalar_t>(P, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ck, cv,
                           out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
}

void local_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& cond_k, const at::Tensor& cond_v,
                                  const at::Tensor& cond_mask, const at::Tensor& out, const at::Tensor& lse,
                                  int64_t kh, int64_t kw, double scale, at::Tensor& dq, at::Tensor& dk,
                                  at::Tensor& dv, at::Tensor& dcond_k, at::Tensor& dcond_v) {
  const Args a = check_common(q, k, v, cond_k, cond_v, cond_mask, kh, kw);
  check_like(grad_out, "grad_out", q, q.sizes());
  check_like(out, "out", q, q.sizes());
  check_like(lse, "lse", q, {q.size(0), q.size(3), q.size(1), q.size(2)});
  for (const at::Tensor* t : {&dq, &dk, &dv}) check_like(*t, "dq/dk/dv", q, q.sizes());
  check_like(dcond_k, "dcond_k", q, cond_k.sizes());
  check_like(dcond_v, "dcond_v", q, cond_k.sizes());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_backward_cpu", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(q, a.M, kh, kw, scale, a.mask);
    const scalar_t* ck = a.M ? cond_k.data_ptr<scalar_t>() : nullptr;
    const scalar_t* cv = a.M ? cond_v.data_ptr<scalar_t>() : nullptr;
    backward_impl<scalar_t>(P, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), ck, cv, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                            a.M ? dcond_k.data_ptr<scalar_t>() : nullptr, a.M ? dcond_v.data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace fastcomp
