// DDN K-way selection on the CPU: the heavy passes of fastcomp/ops/ddn/pytorch.py's l2 expansion, the
// exact re-ranking of the near-best candidates, and the chosen candidate's forward and backward.
//
// Why C++: at B=32, Cin=64, K=64, 32x32 the PyTorch formulation spent most of its time outside the flops
// (dtype copies, small batched GEMMs with inner size Cout = 3 that MKL runs slowly, ~40 small ops, the
// chosen candidate and its backward through bmm + index_add). Here each is one pass over the features:
// * stats: the Gram matrices only on and above the diagonal (half the flops of x @ x^T), with register
//   tiles of 4 x 4 rows x one SIMD vector of pixels, plus sum_p e_p f_p^T and the float64 sums;
// * re-rank: each sample's near-best candidates (those its expanded distance does not rule out; a
//   per-sample set, not the batch's largest) are formed once in a per-thread buffer, their exact
//   distances summed, and the winner is written to out (the forward never forms it twice);
// * backward: d features and the per-sample d weight rows in one sweep over the feature rows, then a
//   serial accumulation into the K rows (never a B x K x ... buffer).
// * threshold: the expanded distances, their bound and each row's re-ranking threshold in one pass over
//   B x K (in PyTorch ~30 small ops, ~1 ms of dispatch at K = 64);
// * small K (the K weight Gram triangles fit in cache): stats, A, threshold and re-rank per sample in one
//   task (l2_select), while the sample's features are in cache, instead of four sweeps over the batch.
// All are parallel with OpenMP over samples (or sample x row-block tiles), threads from torch's setting.
//
// Rounding: the Gram tiles (and m_fe) use fused multiply-adds and SIMD-lane partial sums, an accumulation
// order no worse than the BLAS the bound in ops/ddn/pytorch.py expanded_l2 was written for. The candidate values
// are rounded like the reference's (products summed in scalar_t with FMAs as its GEMM does, then + bias,
// then + residual, each rounded to scalar_t), their distances summed in float64.
#include "ddn_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "simd.h"

// The Gram tiles may contract a * b + c into an FMA (FASTCOMP_CONTRACT, simd.h): their error is
// bounded, not compared bit for bit.

namespace fastcomp {
namespace {

using simd::lane_sum;
using simd::load;
using simd::pin;
template <typename T>
using vec_t = simd::vec<T>;
template <typename T>
constexpr int64_t kLanes = simd::kLanes<T>;

// Below this much work (multiply-adds) a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

int threads_for(int64_t work) { return work < kMinParallelWork ? 1 : std::max(1, at::get_num_threads()); }

// Row-block height of the Gram tiles, and the side of the square cross-product tiles: cross_tile's RA x RB
// accumulators plus its RA + RB pinned rows must fit the register file, 4 x 4 + 8 = 24 of 32 registers
// (AVX-512, AArch64) or 3 x 3 + 6 = 15 of 16 (AVX2, SSE2): 4 x 4 tiles on AVX2 spill every accumulator once
// per pixel vector.
constexpr int64_t kTile = simd::kVectorRegisters >= 32 ? 4 : 3;
static_assert(kTile * kTile + 2 * kTile <= simd::kVectorRegisters, "Gram tiles must fit the registers");
// The Gram tiles' width: gram_tile pins its RI rows and streams the RJ column rows one register at a
// time, so RI x RJ accumulators + RI + 1 registers: 3 x 4 on 16 registers (AVX2, SSE2: 7 loads per 12
// FMAs, against 6 per 9 for 3 x 3; the Gram blocks of the bench's K=64 case 5-8% faster, same sums),
// 4 x 4 on 32.
constexpr int64_t kGramCols = 4;
static_assert(kTile * kGramCols + kTile + 1 <= simd::kVectorRegisters, "Gram tiles must fit the registers");

// Values of T per 64-byte cache line.
template <typename T>
constexpr int64_t kLineFloats = 64 / sizeof(T);

// G[i0 + r][j0 + s] for r < RI, s < RJ, kept where j >= i, written to the packed upper triangle.
// x: [Cin, N] one sample's features.
template <typename T, int RI, int RJ>
FASTCOMP_CONTRACT void gram_tile(const T* x, int64_t N, int64_t Cin, int64_t i0, int64_t j0, T* g_packed) {
  FASTCOMP_CONTRACT_BODY
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V b_acc[RI][RJ];  // [RI][RJ] x L partial sums
  for (int r = 0; r < RI; ++r)
    for (int s = 0; s < RJ; ++s) b_acc[r][s] = V{} * 0;
  int64_t p = 0;
  for (; p + L <= N; p += L) {
    V b_i[RI];  // one vector of pixels of each row
    for (int r = 0; r < RI; ++r) pin(b_i[r] = load(x + (i0 + r) * N + p));
    for (int s = 0; s < RJ; ++s) {
      const V b_j = load(x + (j0 + s) * N + p);
      for (int r = 0; r < RI; ++r) b_acc[r][s] += b_i[r] * b_j;
    }
  }
  for (int r = 0; r < RI; ++r) {
    const int64_t i = i0 + r;
    for (int s = 0; s < RJ; ++s) {
      const int64_t j = j0 + s;
      if (j < i) continue;
      T b_sum = lane_sum<T>(b_acc[r][s]);
      for (int64_t q = p; q < N; ++q) b_sum += x[i * N + q] * x[j * N + q];  // the N % L tail
      g_packed[i * Cin - i * (i - 1) / 2 + (j - i)] = b_sum;
    }
  }
}

template <typename T, int RI>
void gram_tile_rj(int64_t rj, const T* x, int64_t N, int64_t Cin, int64_t i0, int64_t j0, T* g) {
  switch (rj) {
    case 4: gram_tile<T, RI, 4>(x, N, Cin, i0, j0, g); break;
    case 3: gram_tile<T, RI, 3>(x, N, Cin, i0, j0, g); break;
    case 2: gram_tile<T, RI, 2>(x, N, Cin, i0, j0, g); break;
    default: gram_tile<T, RI, 1>(x, N, Cin, i0, j0, g); break;
  }
}

template <typename T>
void gram_tile_any(int64_t ri, int64_t rj, const T* x, int64_t N, int64_t Cin, int64_t i0, int64_t j0, T* g) {
  switch (ri) {
    case 4: gram_tile_rj<T, 4>(rj, x, N, Cin, i0, j0, g); break;
    case 3: gram_tile_rj<T, 3>(rj, x, N, Cin, i0, j0, g); break;
    case 2: gram_tile_rj<T, 2>(rj, x, N, Cin, i0, j0, g); break;
    default: gram_tile_rj<T, 1>(rj, x, N, Cin, i0, j0, g); break;
  }
}

// out[r * out_stride_r + s * out_stride_s] = sum_p a[r][p] b[s][p] for r < RA, s < RB (a, b: rows of N
// values at strides N), in register tiles like gram_tile: RA + RB loads feed RA x RB FMAs. With pf, the
// RA x N values from pf on (the next tile's a rows) are prefetched on the way, two lines per step: a
// rows that come from memory are each one page (N = 1024 floats), where the hardware prefetchers stop.
template <typename T, int RA, int RB>
FASTCOMP_CONTRACT void cross_tile(const T* a, const T* b, int64_t N, double* out, int64_t out_stride_r,
                                  int64_t out_stride_s, const T* pf) {
  FASTCOMP_CONTRACT_BODY
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>, LF = kLineFloats<T>;
  V b_acc[RA][RB];  // [RA][RB] x L partial sums
  for (int r = 0; r < RA; ++r)
    for (int s = 0; s < RB; ++s) b_acc[r][s] = V{} * 0;
  const int64_t pf_end = pf ? RA * N : 0;
  int64_t pf_at = 0;
  int64_t p = 0;
  for (; p + L <= N; p += L) {
    if (pf_at < pf_end) {
      __builtin_prefetch(pf + pf_at);
      __builtin_prefetch(pf + pf_at + LF);
      pf_at += 2 * LF;
    }
    V b_a[RA], b_b[RB];
    for (int r = 0; r < RA; ++r) pin(b_a[r] = load(a + r * N + p));
    for (int s = 0; s < RB; ++s) pin(b_b[s] = load(b + s * N + p));
    for (int r = 0; r < RA; ++r)
      for (int s = 0; s < RB; ++s) b_acc[r][s] += b_a[r] * b_b[s];
  }
  for (int r = 0; r < RA; ++r)
    for (int s = 0; s < RB; ++s) {
      T b_sum = lane_sum<T>(b_acc[r][s]);
      for (int64_t q = p; q < N; ++q) b_sum += a[r * N + q] * b[s * N + q];
      out[r * out_stride_r + s * out_stride_s] = static_cast<double>(b_sum);
    }
}

// All products of n_a rows a with n_b rows b (any counts, in kTile x kTile tiles). prefetch: the a rows
// come from memory (each tile prefetches the next tile's rows).
template <typename T>
void cross_products(const T* a, int64_t n_a, const T* b, int64_t n_b, int64_t N, double* out, int64_t out_stride_r,
                    int64_t out_stride_s, bool prefetch) {
  for (int64_t r0 = 0; r0 < n_a; r0 += kTile)
    for (int64_t s0 = 0; s0 < n_b; s0 += kTile) {
      const T* a0 = a + r0 * N;
      const T* b0 = b + s0 * N;
      double* o = out + r0 * out_stride_r + s0 * out_stride_s;
      const int64_t ra = std::min(kTile, n_a - r0), rb = std::min(kTile, n_b - s0);
      const T* pf = prefetch && s0 + kTile >= n_b && r0 + kTile < n_a ? a0 + ra * N : nullptr;
#define FASTCOMP_CROSS(RA_, RB_) cross_tile<T, RA_, RB_>(a0, b0, N, o, out_stride_r, out_stride_s, pf)
#define FASTCOMP_CROSS_RB(RA_)          \
  switch (rb) {                         \
    case 4: FASTCOMP_CROSS(RA_, 4); break; \
    case 3: FASTCOMP_CROSS(RA_, 3); break; \
    case 2: FASTCOMP_CROSS(RA_, 2); break; \
    default: FASTCOMP_CROSS(RA_, 1); break; \
  }
      switch (ra) {
        case 4: FASTCOMP_CROSS_RB(4); break;
        case 3: FASTCOMP_CROSS_RB(3); break;
        case 2: FASTCOMP_CROSS_RB(2); break;
        default: FASTCOMP_CROSS_RB(1); break;
      }
#undef FASTCOMP_CROSS_RB
#undef FASTCOMP_CROSS
    }
}

// sum_p a[p] in float64 with 8 independent partial sums (vectorizable without reassociation).
template <typename T>
double sum64(const T* a, int64_t N) {
  double b_acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= N; p += 8)
    for (int l = 0; l < 8; ++l) b_acc[l] += static_cast<double>(a[p + l]);
  double b_sum = 0;
  for (int l = 0; l < 8; ++l) b_sum += b_acc[l];
  for (; p < N; ++p) b_sum += static_cast<double>(a[p]);
  return b_sum;
}

// One sample's e = residual - target: rounded to T into e [Cout, N] (for m_fe), its sums in float64.
template <typename T>
void sample_e(const T* res, const T* tgt, int64_t Cout, int64_t N, T* e, double* esum, double* esq) {
  double b_sq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < Cout; ++c) {
    const int64_t o_row = c * N;
    double b_sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t p = 0;
    for (; p + 8 <= N; p += 8) {
      for (int l = 0; l < 8; ++l) {
        const double b_r = res ? static_cast<double>(res[o_row + p + l]) : 0.0;
        const double b_diff = b_r - static_cast<double>(tgt[o_row + p + l]);
        e[o_row + p + l] = static_cast<T>(b_diff);
        b_sum[l] += b_diff;
        b_sq[l] += b_diff * b_diff;
      }
    }
    double b_tail = 0;
    for (; p < N; ++p) {
      const double b_r = res ? static_cast<double>(res[o_row + p]) : 0.0;
      const double b_diff = b_r - static_cast<double>(tgt[o_row + p]);
      e[o_row + p] = static_cast<T>(b_diff);
      b_tail += b_diff;
      b_sq[0] += b_diff * b_diff;
    }
    for (int l = 0; l < 8; ++l) b_tail += b_sum[l];
    esum[c] = b_tail;
  }
  double b_total = 0;
  for (int l = 0; l < 8; ++l) b_total += b_sq[l];
  *esq = b_total;
}

// One sample's block of kTile rows i0..: its Gram tiles on and right of the diagonal (into g, the packed
// upper triangle), its rows' s_f and m_fe[c, i] for every c. x [Cin, N], e [Cout, N].
template <typename T>
void sample_block(const T* x, const T* e, int64_t Cin, int64_t Cout, int64_t N, int64_t i0, T* g, double* sf,
                  double* mfe) {
  const int64_t ri = std::min(kTile, Cin - i0);
  for (int64_t j0 = i0; j0 < Cin; j0 += kGramCols)
    gram_tile_any<T>(ri, std::min(kGramCols, Cin - j0), x, N, Cin, i0, j0, g);
  for (int64_t i = i0; i < i0 + ri; ++i) sf[i] = sum64(x + i * N, N);
  cross_products(x + i0 * N, ri, e, Cout, N, mfe + i0, 1, Cin, false);  // x rows: in cache (the Gram tiles')
}

template <typename T>
void l2_stats(const T* p_x, const T* p_res, const T* p_tgt, int64_t B, int64_t Cin, int64_t Cout, int64_t N,
              T* p_gram, double* p_mfe, double* p_sf, double* p_esum, double* p_esq) {
  const int64_t T_packed = Cin * (Cin + 1) / 2;
  // e = residual - target in float64 for its sums, rounded to T for m_fe: [B, Cout, N]
  std::vector<T> b_e(static_cast<size_t>(B * Cout * N));
#pragma omp parallel for schedule(static) num_threads(threads_for(B * Cout * N))
  for (int64_t b = 0; b < B; ++b)
    sample_e(p_res ? p_res + b * Cout * N : nullptr, p_tgt + b * Cout * N, Cout, N, b_e.data() + b * Cout * N,
             p_esum + b * Cout, p_esq + b);

  // Tasks: (sample, block of kTile rows i); each does its rows' tiles on and right of the diagonal, and
  // the rows' s_f and m_fe. Dynamic: the first blocks of a sample have the most tiles.
  const int64_t n_blocks = (Cin + kTile - 1) / kTile;
  const T* p_e = b_e.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(B * T_packed * N))
  for (int64_t task = 0; task < B * n_blocks; ++task) {
    const int64_t b = task / n_blocks;
    const int64_t i0 = (task % n_blocks) * kTile;
    sample_block(p_x + b * Cin * N, p_e + b * Cout * N, Cin, Cout, N, i0, p_gram + b * T_packed, p_sf + b * Cin,
                 p_mfe + b * Cout * Cin);
  }
}

// p_tri [K, Cin (Cin + 1) / 2]: the upper triangle of W_k^T W_k, off-diagonal entries doubled, so that
// <W_k^T W_k, G> = sum_t p_tri[k, t] g_packed[t] for a symmetric G stored as its upper triangle.
// One k's triangle: w [Cout, Cin] = W_k into dst [Cin (Cin + 1) / 2].
template <typename T>
void weight_gram_k(const T* w, int64_t Cout, int64_t Cin, T* dst) {
  for (int64_t i = 0; i < Cin; ++i) {
    T* row = dst + i * Cin - i * (i - 1) / 2 - i;  // row[j] for j >= i
    const T b_wi0 = w[i];
    for (int64_t j = i; j < Cin; ++j) row[j] = b_wi0 * w[j];
    for (int64_t c = 1; c < Cout; ++c) {
      const T b_wi = w[c * Cin + i];
      const T* w_c = w + c * Cin;
      for (int64_t j = i; j < Cin; ++j) row[j] += b_wi * w_c[j];
    }
    for (int64_t j = i + 1; j < Cin; ++j) row[j] *= T(2);
  }
}

template <typename T>
void weight_gram(const T* p_w, int64_t K, int64_t Cout, int64_t Cin, T* p_tri) {
  const int64_t n_tri = Cin * (Cin + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(K * n_tri * Cout))
  for (int64_t k = 0; k < K; ++k) weight_gram_k(p_w + k * Cout * Cin, Cout, Cin, p_tri + k * n_tri);
}

// What the expanded distances and their bound need of the weights, per k (transposed so that the
// per-sample dot products run along k: independent sums, vectorized, instead of one serial float64 sum
// per (b, k), which was latency bound, ~0.5 ms at K = 64), and the bound's constants (as in expanded_l2).
struct ThresholdTables {
  std::vector<double> wt;   // [Cout * Cin, K] weight in float64
  std::vector<double> wtb;  // [Cin, K] W_k^T b_k
  std::vector<double> wn;   // [K] ||W_k||^2
  std::vector<double> bn;   // [K] ||b_k||^2
  double N, c_a, c_64, c_x, u, noise_c;
};

template <typename T>
ThresholdTables threshold_tables(const T* p_w, const T* p_bias, int64_t K, int64_t Cin, int64_t Cout, int64_t HW,
                                 double lambda) {
  const int64_t n_w = Cout * Cin;
  ThresholdTables tab;
  tab.wt.assign(static_cast<size_t>(n_w * K), 0);
  tab.wtb.assign(static_cast<size_t>(Cin * K), 0);
  tab.wn.assign(static_cast<size_t>(K), 0);
  tab.bn.assign(static_cast<size_t>(K), 0);
  // The transpose in blocks of 16 k (16 weight rows in L1), every other pass contiguous along k: element
  // by element along k with stride K, the tables cost ~3 ms at K = 512 (cache and TLB misses).
  constexpr int64_t kBlockK = 16;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    for (int64_t j = 0; j < n_w; ++j)
      for (int64_t k = k0; k < k1; ++k) tab.wt[j * K + k] = static_cast<double>(p_w[k * n_w + j]);
  }
  for (int64_t j = 0; j < n_w; ++j)
    for (int64_t k = 0; k < K; ++k) tab.wn[k] += tab.wt[j * K + k] * tab.wt[j * K + k];
  if (p_bias) {
    for (int64_t c = 0; c < Cout; ++c)
      for (int64_t k = 0; k < K; ++k) {
        const double b_b = static_cast<double>(p_bias[k * Cout + c]);
        tab.bn[k] += b_b * b_b;
      }
    for (int64_t i = 0; i < Cin; ++i)
      for (int64_t c = 0; c < Cout; ++c) {
        const double* wt = tab.wt.data() + (c * Cin + i) * K;
        double* wtb = tab.wtb.data() + i * K;
        for (int64_t k = 0; k < K; ++k) wtb[k] += static_cast<double>(p_bias[k * Cout + c]) * wt[k];
      }
  }
  tab.N = static_cast<double>(Cout * HW);
  const double u_a = std::numeric_limits<T>::epsilon(), u64 = std::numeric_limits<double>::epsilon();
  const double n_a = static_cast<double>(HW + Cin * Cin + 4), n_x = static_cast<double>(HW + Cin * Cout + 2);
  // the bound's three coefficients (probabilistic lambda sqrt(n) for the sums in T)
  tab.c_a = std::min(n_a, lambda * std::sqrt(n_a)) * u_a / tab.N;
  tab.c_64 = static_cast<double>(HW + Cin * Cout + 8) * u64 / tab.N;
  tab.c_x = 2 * std::min(n_x, lambda * std::sqrt(n_x)) * u_a / tab.N;
  // the reference's own noise (ops/ddn/pytorch.py reference_noise): u of the dtype = u of the accumulation dtype
  tab.u = u_a / 2;
  tab.noise_c = 4 * std::sqrt(tab.N + 8) * tab.u;
  return tab;
}

// One sample's est [K], bound [K] (float64) from its A [K] (in T), packed Gram g, m_fe [Cout, Cin], s_f
// [Cin], sum_p e_p [Cout], sum_p ||e_p||^2 and target [Cout, HW]; returns the re-ranking threshold.
template <typename T>
double threshold_row(const ThresholdTables& tab, const T* a, const T* g, const double* mfe, const double* sf,
                     const double* esum, double e_sq, const T* p_bias, const T* tgt, int64_t K, int64_t Cin,
                     int64_t Cout, int64_t HW, double* est, double* bound) {
  const int64_t n_w = Cout * Cin;
  double tr_ff = 0;  // tr(G_b) from the packed diagonal, summed in float64
  for (int64_t i = 0; i < Cin; ++i) tr_ff += static_cast<double>(g[i * Cin - i * (i - 1) / 2]);
  const double tr_aug = tr_ff + static_cast<double>(HW) + e_sq;
  // X_k = <W_k, M_b> and s_b . W_k^T b_k for all k at once, along k
  std::vector<double> b_x(static_cast<size_t>(K), 0), b_sw(static_cast<size_t>(K), 0);  // [K] each
  for (int64_t j = 0; j < n_w; ++j) {
    const double b_m = mfe[j];
    const double* wt = tab.wt.data() + j * K;
    for (int64_t k = 0; k < K; ++k) b_x[k] += b_m * wt[k];
  }
  if (p_bias)
    for (int64_t i = 0; i < Cin; ++i) {
      const double b_s = sf[i];
      const double* wtb = tab.wtb.data() + i * K;
      for (int64_t k = 0; k < K; ++k) b_sw[k] += b_s * wtb[k];
    }
  bool any_nan = false;
  double est_min = INFINITY, bound_max = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    double b_d = static_cast<double>(a[k]) + 2 * b_x[k] + e_sq;
    if (p_bias) {
      double b_eb = 0;  // sum_p e_p . b_k
      for (int64_t c = 0; c < Cout; ++c) b_eb += esum[c] * static_cast<double>(p_bias[k * Cout + c]);
      b_d += 2 * b_sw[k] + 2 * b_eb + static_cast<double>(HW) * tab.bn[k];
    }
    b_d /= tab.N;
    const double w_aug = tab.wn[k] + static_cast<double>(Cout) + tab.bn[k];  // ||[W | b | I]||_F^2
    const double b_bound = tab.c_a * tr_ff * tab.wn[k] + tab.c_64 * tr_aug * w_aug +
                           tab.c_x * std::sqrt(tr_ff * tab.wn[k] * e_sq);
    est[k] = b_d;
    bound[k] = b_bound;
    // amin / amax semantics: a NaN anywhere in the row makes the result NaN
    any_nan = any_nan || std::isnan(b_d) || std::isnan(b_bound);
    est_min = std::min(est_min, b_d);
    bound_max = std::max(bound_max, b_bound);
  }
  double b_tsq[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // sum of target^2 in float64, 8 partial sums
  int64_t p = 0;
  for (; p + 8 <= Cout * HW; p += 8)
    for (int l = 0; l < 8; ++l) b_tsq[l] += static_cast<double>(tgt[p + l]) * static_cast<double>(tgt[p + l]);
  double t_sq = 0;
  for (; p < Cout * HW; ++p) t_sq += static_cast<double>(tgt[p]) * static_cast<double>(tgt[p]);
  for (int l = 0; l < 8; ++l) t_sq += b_tsq[l];
  const double rms_t = std::sqrt(t_sq / tab.N);
  const double rms_d = std::sqrt(std::max(est_min, 0.0));
  const double rms_c = rms_d + rms_t;
  const double noise = 4 * tab.u * rms_c * rms_d + 2 * tab.u * tab.u * rms_c * rms_c + tab.noise_c * std::fabs(est_min);
  return any_nan ? NAN : est_min + (2 * bound_max + noise);
}

// The expanded distances, their error bound and each row's re-ranking threshold in one pass over B x K
// (what ops/ddn/pytorch.py expanded_l2 and ops/ddn/cpu.py select compute in ~30 small torch ops, each costing tens of
// microseconds of dispatch, far more on busy cores). Same formulas, float64 throughout; p_a [B, K] is
// A = <W_k^T W_k, G_b> in T.
template <typename T>
void l2_threshold(const T* p_a, const T* p_gram, const double* p_mfe, const double* p_sf, const double* p_esum,
                  const double* p_esq, const T* p_w, const T* p_bias, const T* p_tgt, int64_t B, int64_t K,
                  int64_t Cin, int64_t Cout, int64_t HW, double lambda, double* p_est, double* p_bound,
                  double* p_thresh) {
  const int64_t n_tri = Cin * (Cin + 1) / 2, n_w = Cout * Cin;
  const ThresholdTables tab = threshold_tables(p_w, p_bias, K, Cin, Cout, HW, lambda);
#pragma omp parallel for schedule(static) num_threads(threads_for(B * K * (n_w + Cin)))
  for (int64_t b = 0; b < B; ++b)
    p_thresh[b] = threshold_row(tab, p_a + b * K, p_gram + b * n_tri, p_mfe + b * n_w, p_sf + b * Cin,
                                p_esum + b * Cout, p_esq[b], p_bias, p_tgt + b * Cout * HW, K, Cin, Cout, HW,
                                p_est + b * K, p_bound + b * K);
}

// Up to kRows output rows at once: rows[r][p] = sum_i w[r * r_stride + i * w_stride] x[i, p]
// (+ bias[r] + res[r][p]), rounded to T like the reference's einsum (its GEMM also accumulates with
// FMAs in T), then + bias, then + residual, each rounded to T. Per vector of pixels the RR partial rows
// stay in registers while the Cin feature rows stream past, instead of a load and store of the row per
// feature.
constexpr int64_t kRows = 4;

// Pixel vectors per step of candidate_rows: RR x PV accumulators and the PV pinned feature vectors in
// the registers, two left for the broadcast weight and the address arithmetic; at most 4 (4 x 4 on
// AVX-512; 2 x 4, 3 x 3 on AVX2's 16 registers, where 4 x 4 spilled).
constexpr int pixel_vectors(int rows) {
  const int fit = (simd::kVectorRegisters - 2) / (rows + 1);
  return fit < 1 ? 1 : (fit > 4 ? 4 : fit);
}

template <typename T, int RR>
FASTCOMP_CONTRACT void candidate_rows(const T* x, const T* w, int64_t r_stride, int64_t w_stride, int64_t Cin, int64_t N,
                    const T* bias, int64_t bias_stride, const T* res, T* rows) {
  FASTCOMP_CONTRACT_BODY
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  constexpr int PV = pixel_vectors(RR);  // pixel vectors per step: each broadcast weight feeds PV FMAs
  int64_t p = 0;
  for (; p + PV * L <= N; p += PV * L) {
    V b_acc[RR][PV];  // RR rows x PV * L pixels
    for (int v = 0; v < PV; ++v) {
      const V b_x0 = load(x + p + v * L);
      for (int r = 0; r < RR; ++r) b_acc[r][v] = w[r * r_stride] * b_x0;
    }
    for (int64_t i = 1; i < Cin; ++i) {
      V b_x[PV];
      for (int v = 0; v < PV; ++v) pin(b_x[v] = load(x + i * N + p + v * L));
      // The next step's lines of this channel (Cin streams N apart are more than the hardware
      // prefetchers follow: the re-ranked candidates waited on memory for most of their time)
      for (int64_t l = 0; l < PV * L; l += kLineFloats<T>) __builtin_prefetch(x + i * N + p + PV * L + l);
      for (int r = 0; r < RR; ++r) {
        const T b_w = w[r * r_stride + i * w_stride];
        for (int v = 0; v < PV; ++v) b_acc[r][v] += b_w * b_x[v];
      }
    }
    for (int r = 0; r < RR; ++r)
      for (int v = 0; v < PV; ++v) {
        // b_row, not b_acc[r][v], goes to memory: a memcpy out of the accumulator array made GCC keep the
        // whole array on the stack and copy it out in a loop (~2.5x slower backward d features)
        V b_row = b_acc[r][v];
        if (bias) b_row = b_row + bias[r * bias_stride];
        if (res) b_row = b_row + load(res + r * N + p + v * L);
        simd::store(rows + r * N + p + v * L, b_row);
      }
  }
  for (; p + L <= N; p += L) {  // the remaining whole vectors, same order
    V b_acc[RR];  // RR rows x L pixels
    const V b_x0 = load(x + p);
    for (int r = 0; r < RR; ++r) b_acc[r] = w[r * r_stride] * b_x0;
    for (int64_t i = 1; i < Cin; ++i) {
      const V b_x = load(x + i * N + p);
      for (int r = 0; r < RR; ++r) b_acc[r] += w[r * r_stride + i * w_stride] * b_x;
    }
    for (int r = 0; r < RR; ++r) {
      // separate statements: the additions of bias and residual are never fused with a product
      V b_row = b_acc[r];
      if (bias) b_row = b_row + bias[r * bias_stride];
      if (res) b_row = b_row + load(res + r * N + p);
      simd::store(rows + r * N + p, b_row);
    }
  }
  for (; p < N; ++p) {  // the N % L tail, same order
    for (int r = 0; r < RR; ++r) {
      T b_v = w[r * r_stride] * x[p];
      for (int64_t i = 1; i < Cin; ++i) b_v += w[r * r_stride + i * w_stride] * x[i * N + p];
      if (bias) b_v += bias[r * bias_stride];
      if (res) b_v += res[r * N + p];
      rows[r * N + p] = b_v;
    }
  }
}

// n_rows rows (any count) by blocks of kRows; row r's weights start at w + r * r_stride.
template <typename T>
void candidate_block(const T* x, const T* w, int64_t r_stride, int64_t w_stride, int64_t n_rows, int64_t Cin,
                     int64_t N, const T* bias, int64_t bias_stride, const T* res, T* rows) {
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRows) {
    const T* w_r = w + r0 * r_stride;
    const T* b_r = bias ? bias + r0 * bias_stride : nullptr;
    const T* res_r = res ? res + r0 * N : nullptr;
    T* out_r = rows + r0 * N;
    switch (std::min(kRows, n_rows - r0)) {
      case 4: candidate_rows<T, 4>(x, w_r, r_stride, w_stride, Cin, N, b_r, bias_stride, res_r, out_r); break;
      case 3: candidate_rows<T, 3>(x, w_r, r_stride, w_stride, Cin, N, b_r, bias_stride, res_r, out_r); break;
      case 2: candidate_rows<T, 2>(x, w_r, r_stride, w_stride, Cin, N, b_r, bias_stride, res_r, out_r); break;
      default: candidate_rows<T, 1>(x, w_r, r_stride, w_stride, Cin, N, b_r, bias_stride, res_r, out_r); break;
    }
  }
}

// One sample's candidate k into cand [Cout, N].
template <typename T>
void candidate(const T* x, const T* p_w, const T* p_bias, const T* res, int64_t k, int64_t Cin, int64_t Cout,
               int64_t N, T* cand) {
  candidate_block(x, p_w + k * Cout * Cin, Cin, 1, Cout, Cin, N, p_bias ? p_bias + k * Cout : nullptr, 1, res, cand);
}

// sum_p (a[p] - t[p])^2 in float64 with 8 partial sums.
template <typename T>
double sq_dist64(const T* a, const T* t, int64_t n) {
  double b_acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= n; p += 8)
    for (int l = 0; l < 8; ++l) {
      const double b_d = static_cast<double>(a[p + l]) - static_cast<double>(t[p + l]);
      b_acc[l] += b_d * b_d;
    }
  double b_sum = 0;
  for (; p < n; ++p) {
    const double b_d = static_cast<double>(a[p]) - static_cast<double>(t[p]);
    b_sum += b_d * b_d;
  }
  for (int l = 0; l < 8; ++l) b_sum += b_acc[l];
  return b_sum;
}

// One sample: every k with est[k] <= thresh (in increasing k; all K when none is, e.g. a NaN row) gets its
// exact distance (written to dist[k]; the others get est rounded to float32), the first minimal one (a
// NaN counting as minimal, as torch.argmin) is returned and its candidate copied to out [Cout, N].
// cand and best: [Cout, N] scratch rows of the calling thread.
template <typename T>
int64_t rerank_row(const T* x, const T* p_w, const T* p_bias, const T* res, const T* tgt, const double* est,
                   double thresh, int64_t K, int64_t Cin, int64_t Cout, int64_t N, float* dist, T* out,
                   std::vector<T>& cand, std::vector<T>& best_cand) {
  const int64_t n_el = Cout * N;
  bool any_near = false;
  for (int64_t k = 0; k < K; ++k) any_near = any_near || est[k] <= thresh;
  double best = 0;
  int64_t best_k = -1;
  for (int64_t k = 0; k < K; ++k) {
    if (any_near && !(est[k] <= thresh)) {
      dist[k] = static_cast<float>(est[k]);
      continue;
    }
    candidate(x, p_w, p_bias, res, k, Cin, Cout, N, cand.data());
    // the exact distance, rounded to T first as the reference's accumulation dtype
    const T d = static_cast<T>(sq_dist64(cand.data(), tgt, n_el) / static_cast<double>(n_el));
    dist[k] = static_cast<float>(d);
    const bool better = best_k < 0 || (std::isnan(d) && !std::isnan(best)) || d < best;
    if (better) {
      best = d;
      best_k = k;
      cand.swap(best_cand);
    }
  }
  std::copy(best_cand.begin(), best_cand.end(), out);
  return best_k;
}

// rerank_row for every sample (est [B, K], thresh [B]).
template <typename T>
void rerank(const T* p_x, const T* p_w, const T* p_bias, const T* p_res, const T* p_tgt, const double* p_est,
            const double* p_thresh, int64_t B, int64_t K, int64_t Cin, int64_t Cout, int64_t N, float* p_dist,
            int64_t* p_index, T* p_out) {
  const int64_t n_el = Cout * N;
#pragma omp parallel num_threads(threads_for(B * n_el * Cin * 2))
  {
    std::vector<T> b_cand(static_cast<size_t>(n_el)), b_best(static_cast<size_t>(n_el));  // [Cout, N] each
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      p_index[b] = rerank_row(p_x + b * Cin * N, p_w, p_bias, p_res ? p_res + b * n_el : nullptr, p_tgt + b * n_el,
                              p_est + b * K, p_thresh[b], K, Cin, Cout, N, p_dist + b * K, p_out + b * n_el, b_cand,
                              b_best);
  }
}

// sum_t a[t] b[t] in T with SIMD-lane partial sums and FMAs (as a GEMM accumulates).
template <typename T>
FASTCOMP_CONTRACT T dot_simd(const T* a, const T* b, int64_t n) {
  FASTCOMP_CONTRACT_BODY
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V b_acc0 = V{} * 0, b_acc1 = V{} * 0;  // two chains: L x 2 partial sums
  int64_t t = 0;
  for (; t + 2 * L <= n; t += 2 * L) {
    b_acc0 += load(a + t) * load(b + t);
    b_acc1 += load(a + t + L) * load(b + t + L);
  }
  for (; t + L <= n; t += L) b_acc0 += load(a + t) * load(b + t);
  T b_sum = lane_sum<T>(b_acc0 + b_acc1);
  for (; t < n; ++t) b_sum += a[t] * b[t];
  return b_sum;
}

// The whole l2 selection per sample, while the sample's features are in cache (one task per sample):
// statistics, A = p_tri . G_b (p_tri [K, n_tri] as weight_gram writes it, first, in the same parallel
// region: one wake-up of the threads, not two), est / bound / threshold, the exact re-ranking and the
// chosen candidate. The same arithmetic as l2_stats + GEMM + l2_threshold + rerank, except A's sum order
// (a SIMD dot product instead of the GEMM's; its rounding is within the bound).
template <typename T>
void l2_select(const T* p_x, const T* p_w, const T* p_bias, const T* p_res, const T* p_tgt, T* p_tri, int64_t B,
               int64_t K, int64_t Cin, int64_t Cout, int64_t N, double lambda, float* p_dist, int64_t* p_index,
               T* p_out) {
  const int64_t n_el = Cout * N, n_tri = Cin * (Cin + 1) / 2, n_w = Cout * Cin;
  const ThresholdTables tab = threshold_tables(p_w, p_bias, K, Cin, Cout, N, lambda);
#pragma omp parallel num_threads(threads_for(B * n_tri * N))
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) weight_gram_k(p_w + k * Cout * Cin, Cout, Cin, p_tri + k * n_tri);
    // (the implicit barrier: every task below reads all K triangles)
    // per-thread scratch: e [Cout, N], the packed Gram, m_fe, s_f, e sums, A, est, bound, candidates
    std::vector<T> b_e(static_cast<size_t>(n_el)), b_g(static_cast<size_t>(n_tri)), b_a(static_cast<size_t>(K));
    std::vector<double> b_mfe(static_cast<size_t>(n_w)), b_sf(static_cast<size_t>(Cin));
    std::vector<double> b_esum(static_cast<size_t>(Cout)), b_est(static_cast<size_t>(K)), b_bound(static_cast<size_t>(K));
    std::vector<T> b_cand(static_cast<size_t>(n_el)), b_best(static_cast<size_t>(n_el));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const T* x = p_x + b * Cin * N;
      const T* res = p_res ? p_res + b * n_el : nullptr;
      const T* tgt = p_tgt + b * n_el;
      double e_sq = 0;
      sample_e(res, tgt, Cout, N, b_e.data(), b_esum.data(), &e_sq);
      for (int64_t i0 = 0; i0 < Cin; i0 += kTile)
        sample_block(x, b_e.data(), Cin, Cout, N, i0, b_g.data(), b_sf.data(), b_mfe.data());
      for (int64_t k = 0; k < K; ++k) b_a[k] = dot_simd(p_tri + k * n_tri, b_g.data(), n_tri);
      const double thresh = threshold_row(tab, b_a.data(), b_g.data(), b_mfe.data(), b_sf.data(), b_esum.data(), e_sq,
                                          p_bias, tgt, K, Cin, Cout, N, b_est.data(), b_bound.data());
      p_index[b] = rerank_row(x, p_w, p_bias, res, tgt, b_est.data(), thresh, K, Cin, Cout, N, p_dist + b * K,
                              p_out + b * n_el, b_cand, b_best);
    }
  }
}

template <typename T>
void chosen_forward(const T* p_x, const T* p_w, const T* p_bias, const T* p_res, const int64_t* p_index, int64_t B,
                    int64_t Cin, int64_t Cout, int64_t N, T* p_out) {
#pragma omp parallel for schedule(static) num_threads(threads_for(B * Cout * N * Cin))
  for (int64_t b = 0; b < B; ++b)
    candidate(p_x + b * Cin * N, p_w, p_bias, p_res ? p_res + b * Cout * N : nullptr, p_index[b], Cin, Cout, N,
              p_out + b * Cout * N);
}

template <typename T>
void chosen_backward(const T* p_x, const T* p_w, const int64_t* p_index, const T* p_dout, int64_t B, int64_t K,
                     int64_t Cin, int64_t Cout, int64_t N, T* p_dx, T* p_dw, T* p_db) {
  // Per-sample d weight [B, Cout, Cin] and d bias [B, Cout], summed into the K rows afterwards in b order.
  std::vector<double> b_dw(p_dw ? static_cast<size_t>(B * Cout * Cin) : 0);
  std::vector<T> b_db(p_db ? static_cast<size_t>(B * Cout) : 0);
#pragma omp parallel for schedule(static) num_threads(threads_for(B * Cout * N * Cin))
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k = p_index[b];
    const T* d = p_dout + b * Cout * N;  // [Cout, N]
    const T* x = p_x + b * Cin * N;
    if (p_dw)  // [Cout, Cin] = d x^T: each feature row once, against the Cout rows of d (in L1)
      cross_products(x, Cin, d, Cout, N, b_dw.data() + b * Cout * Cin, 1, Cin, true);
    if (p_db)
      for (int64_t c = 0; c < Cout; ++c) b_db[b * Cout + c] = static_cast<T>(sum64(d + c * N, N));
    if (p_dx) {
      // d features[i, p] = sum_c W[k, c, i] d[c, p]: a "candidate row" with weights strided by Cin
      candidate_block(d, p_w + k * Cout * Cin, 1, Cin, Cin, Cout, N, static_cast<const T*>(nullptr), 0,
                      static_cast<const T*>(nullptr), p_dx + b * Cin * N);
    }
  }
  if (p_dw) {
    std::fill(p_dw, p_dw + K * Cout * Cin, T(0));
    for (int64_t b = 0; b < B; ++b) {
      T* dst = p_dw + p_index[b] * Cout * Cin;
      const double* src = b_dw.data() + b * Cout * Cin;  // rounded to T before the sum, as index_add
      for (int64_t j = 0; j < Cout * Cin; ++j) dst[j] += static_cast<T>(src[j]);
    }
  }
  if (p_db) {
    std::fill(p_db, p_db + K * Cout, T(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < Cout; ++c) p_db[p_index[b] * Cout + c] += b_db[b * Cout + c];
  }
}

// --- argument checks (tensor_checks.h restated without torch/python.h) -------------------------------

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  FASTCOMP_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_numel(const at::Tensor& t, const char* name, int64_t numel, const char* layout) {
  FASTCOMP_CHECK(t.numel() == numel, name, " must be ", layout, " (", numel, " elements), got ", t.sizes());
}

// features [B, Cin, N] (or [B, Cin, H, W]): float32 or float64, contiguous, on the CPU.
at::ScalarType check_features(const at::Tensor& features) {
  FASTCOMP_CHECK(features.device().is_cpu(), "features must be a CPU tensor, got ", features.device().str());
  const at::ScalarType st = features.scalar_type();
  FASTCOMP_CHECK(st == at::kFloat || st == at::kDouble, "features must be float32 or float64, got ", st);
  FASTCOMP_CHECK(features.is_contiguous(), "features must be contiguous");
  FASTCOMP_CHECK(features.dim() >= 3, "features must be [B, Cin, H, W] or [B, Cin, N], got ", features.sizes());
  return st;
}

int64_t pixels(const at::Tensor& features) { return features.numel() / (features.size(0) * features.size(1)); }

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_optional(const std::optional<at::Tensor>& t, const char* name, at::ScalarType st, int64_t numel,
                    const char* layout) {
  if (!t.has_value() || !t->defined()) return;
  check_cpu(*t, name, st);
  check_numel(*t, name, numel, layout);
}

void check_index(const at::Tensor& index, int64_t B, int64_t K) {
  check_cpu(index, "index", at::kLong);
  check_numel(index, "index", B, "[B]");
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    FASTCOMP_CHECK(p[b] >= 0 && p[b] < K, "index[", b, "] = ", p[b], " must lie in [0, K = ", K, ")");
}

// weight [K, Cout, Cin]: float32 or float64, contiguous, on the CPU; returns its dtype (the op's dtype).
at::ScalarType check_weight(const at::Tensor& weight) {
  FASTCOMP_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor, got ", weight.device().str());
  const at::ScalarType st = weight.scalar_type();
  FASTCOMP_CHECK(st == at::kFloat || st == at::kDouble, "weight must be float32 or float64, got ", st);
  FASTCOMP_CHECK(weight.is_contiguous(), "weight must be contiguous");
  FASTCOMP_CHECK(weight.dim() == 3, "weight must be [K, Cout, Cin], got ", weight.sizes());
  return st;
}

// The l2 expansion's per-sample statistics, as ddn_l2_stats_cpu writes them and ddn_l2_threshold_cpu reads them:
// gram [B, Cin (Cin + 1) / 2] in the input dtype, the rest float64.
void check_l2_stats(const at::Tensor& gram, const at::Tensor& m_fe, const at::Tensor& s_f, const at::Tensor& e_sum,
                    const at::Tensor& e_sq, at::ScalarType st, int64_t B, int64_t Cin, int64_t Cout) {
  check_cpu(gram, "gram", st);
  check_numel(gram, "gram", B * Cin * (Cin + 1) / 2, "[B, Cin (Cin + 1) / 2]");
  check_cpu(m_fe, "m_fe", at::kDouble);
  check_numel(m_fe, "m_fe", B * Cout * Cin, "[B, Cout, Cin]");
  check_cpu(s_f, "s_f", at::kDouble);
  check_numel(s_f, "s_f", B * Cin, "[B, Cin]");
  check_cpu(e_sum, "e_sum", at::kDouble);
  check_numel(e_sum, "e_sum", B * Cout, "[B, Cout]");
  check_cpu(e_sq, "e_sq", at::kDouble);
  check_numel(e_sq, "e_sq", B, "[B]");
}

}  // namespace

void ddn_l2_stats_cpu(const at::Tensor& features, const std::optional<at::Tensor>& residual,
                      const at::Tensor& target, at::Tensor& gram, at::Tensor& m_fe, at::Tensor& s_f,
                      at::Tensor& e_sum, at::Tensor& e_sq) {
  const at::ScalarType st = check_features(features);
  const int64_t B = features.size(0), Cin = features.size(1), N = pixels(features);
  check_cpu(target, "target", st);
  FASTCOMP_CHECK(target.dim() >= 2 && target.size(0) == B && target.numel() % (B * N) == 0,
                 "target must be [B, Cout, H, W] with B, H, W from features, got ", target.sizes());
  const int64_t Cout = target.numel() / (B * N);
  check_optional(residual, "residual", st, B * Cout * N, "[B, Cout, H, W]");
  check_l2_stats(gram, m_fe, s_f, e_sum, e_sq, st, B, Cin, Cout);
  double *p_mfe = m_fe.data_ptr<double>(), *p_sf = s_f.data_ptr<double>();
  double *p_esum = e_sum.data_ptr<double>(), *p_esq = e_sq.data_ptr<double>();
  if (st == at::kFloat) {
    l2_stats<float>(features.data_ptr<float>(), opt_ptr<float>(residual), target.data_ptr<float>(), B, Cin, Cout, N,
                    gram.data_ptr<float>(), p_mfe, p_sf, p_esum, p_esq);
  } else {
    l2_stats<double>(features.data_ptr<double>(), opt_ptr<double>(residual), target.data_ptr<double>(), B, Cin,
                     Cout, N, gram.data_ptr<double>(), p_mfe, p_sf, p_esum, p_esq);
  }
}

void ddn_weight_gram_cpu(const at::Tensor& weight, at::Tensor& p_tri) {
  const at::ScalarType st = check_weight(weight);
  const int64_t K = weight.size(0), Cout = weight.size(1), Cin = weight.size(2);
  check_cpu(p_tri, "p_tri", st);
  check_numel(p_tri, "p_tri", K * Cin * (Cin + 1) / 2, "[K, Cin (Cin + 1) / 2]");
  if (st == at::kFloat) {
    weight_gram<float>(weight.data_ptr<float>(), K, Cout, Cin, p_tri.data_ptr<float>());
  } else {
    weight_gram<double>(weight.data_ptr<double>(), K, Cout, Cin, p_tri.data_ptr<double>());
  }
}

void ddn_l2_threshold_cpu(const at::Tensor& a, const at::Tensor& gram, const at::Tensor& m_fe, const at::Tensor& s_f,
                          const at::Tensor& e_sum, const at::Tensor& e_sq, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target, double lambda,
                          at::Tensor& est, at::Tensor& bound, at::Tensor& thresh) {
  const at::ScalarType st = check_weight(weight);
  const int64_t K = weight.size(0), Cout = weight.size(1), Cin = weight.size(2);
  check_cpu(e_sq, "e_sq", at::kDouble);
  const int64_t B = e_sq.numel();
  FASTCOMP_CHECK(B > 0, "e_sq must be [B] with B >= 1, got ", e_sq.sizes());
  check_cpu(target, "target", st);
  FASTCOMP_CHECK(target.numel() % (B * Cout) == 0, "target must be [B, Cout, H, W] with B = e_sq.numel() and Cout = ",
                 "weight.size(1), got ", target.sizes());
  const int64_t HW = target.numel() / (B * Cout);
  check_cpu(a, "a", st);
  check_numel(a, "a", B * K, "[B, K]");
  check_l2_stats(gram, m_fe, s_f, e_sum, e_sq, st, B, Cin, Cout);
  check_optional(bias, "bias", st, K * Cout, "[K, Cout]");
  check_cpu(est, "est", at::kDouble);
  check_numel(est, "est", B * K, "[B, K]");
  check_cpu(bound, "bound", at::kDouble);
  check_numel(bound, "bound", B * K, "[B, K]");
  check_cpu(thresh, "thresh", at::kDouble);
  check_numel(thresh, "thresh", B, "[B]");
  const double *p_mfe = m_fe.data_ptr<double>(), *p_sf = s_f.data_ptr<double>();
  const double *p_esum = e_sum.data_ptr<double>(), *p_esq = e_sq.data_ptr<double>();
  double *p_est = est.data_ptr<double>(), *p_bound = bound.data_ptr<double>(), *p_thresh = thresh.data_ptr<double>();
  if (st == at::kFloat) {
    l2_threshold<float>(a.data_ptr<float>(), gram.data_ptr<float>(), p_mfe, p_sf, p_esum, p_esq, weight.data_ptr<float>(),
                        opt_ptr<float>(bias), target.data_ptr<float>(), B, K, Cin, Cout, HW, lambda, p_est, p_bound,
                        p_thresh);
  } else {
    l2_threshold<double>(a.data_ptr<double>(), gram.data_ptr<double>(), p_mfe, p_sf, p_esum, p_esq,
                         weight.data_ptr<double>(), opt_ptr<double>(bias), target.data_ptr<double>(), B, K, Cin, Cout,
                         HW, lambda, p_est, p_bound, p_thresh);
  }
}

namespace {

// Shared checks of the candidate-producing arguments; returns (B, K, Cin, Cout, N) through references.
at::ScalarType check_layer(const at::Tensor& features, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           int64_t& B, int64_t& K, int64_t& Cin, int64_t& Cout, int64_t& N) {
  const at::ScalarType st = check_features(features);
  check_cpu(weight, "weight", st);
  FASTCOMP_CHECK(weight.dim() == 3 && weight.size(2) == features.size(1),
                 "weight must be [K, Cout, Cin] with Cin = features.size(1), got ", weight.sizes());
  B = features.size(0);
  Cin = features.size(1);
  N = pixels(features);
  K = weight.size(0);
  Cout = weight.size(1);
  check_optional(bias, "bias", st, K * Cout, "[K, Cout]");
  check_optional(residual, "residual", st, B * Cout * N, "[B, Cout, H, W]");
  return st;
}

}  // namespace

void ddn_rerank_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, const at::Tensor& target, const at::Tensor& est,
                    const at::Tensor& thresh, at::Tensor& distances, at::Tensor& index, at::Tensor& out) {
  int64_t B, K, Cin, Cout, N;
  const at::ScalarType st = check_layer(features, weight, bias, residual, B, K, Cin, Cout, N);
  check_cpu(target, "target", st);
  check_numel(target, "target", B * Cout * N, "[B, Cout, H, W]");
  check_cpu(est, "est", at::kDouble);
  check_numel(est, "est", B * K, "[B, K]");
  check_cpu(thresh, "thresh", at::kDouble);
  check_numel(thresh, "thresh", B, "[B]");
  check_cpu(distances, "distances", at::kFloat);
  check_numel(distances, "distances", B * K, "[B, K]");
  check_cpu(index, "index", at::kLong);
  check_numel(index, "index", B, "[B]");
  check_cpu(out, "out", st);
  check_numel(out, "out", B * Cout * N, "[B, Cout, H, W]");
  const double *p_est = est.data_ptr<double>(), *p_thresh = thresh.data_ptr<double>();
  float* p_dist = distances.data_ptr<float>();
  if (st == at::kFloat) {
    rerank<float>(features.data_ptr<float>(), weight.data_ptr<float>(), opt_ptr<float>(bias), opt_ptr<float>(residual),
                  target.data_ptr<float>(), p_est, p_thresh, B, K, Cin, Cout, N, p_dist, index.data_ptr<int64_t>(),
                  out.data_ptr<float>());
  } else {
    rerank<double>(features.data_ptr<double>(), weight.data_ptr<double>(), opt_ptr<double>(bias),
                   opt_ptr<double>(residual), target.data_ptr<double>(), p_est, p_thresh, B, K, Cin, Cout, N, p_dist,
                   index.data_ptr<int64_t>(), out.data_ptr<double>());
  }
}

void ddn_l2_select_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, const at::Tensor& target, at::Tensor& p_tri,
                       double lambda, at::Tensor& distances, at::Tensor& index, at::Tensor& out) {
  int64_t B, K, Cin, Cout, N;
  const at::ScalarType st = check_layer(features, weight, bias, residual, B, K, Cin, Cout, N);
  check_cpu(target, "target", st);
  check_numel(target, "target", B * Cout * N, "[B, Cout, H, W]");
  check_cpu(p_tri, "p_tri", st);
  check_numel(p_tri, "p_tri", K * Cin * (Cin + 1) / 2, "[K, Cin (Cin + 1) / 2]");
  check_cpu(distances, "distances", at::kFloat);
  check_numel(distances, "distances", B * K, "[B, K]");
  check_cpu(index, "index", at::kLong);
  check_numel(index, "index", B, "[B]");
  check_cpu(out, "out", st);
  check_numel(out, "out", B * Cout * N, "[B, Cout, H, W]");
  float* p_dist = distances.data_ptr<float>();
  int64_t* p_index = index.data_ptr<int64_t>();
  if (st == at::kFloat) {
    l2_select<float>(features.data_ptr<float>(), weight.data_ptr<float>(), opt_ptr<float>(bias),
                     opt_ptr<float>(residual), target.data_ptr<float>(), p_tri.data_ptr<float>(), B, K, Cin, Cout, N,
                     lambda, p_dist, p_index, out.data_ptr<float>());
  } else {
    l2_select<double>(features.data_ptr<double>(), weight.data_ptr<double>(), opt_ptr<double>(bias),
                      opt_ptr<double>(residual), target.data_ptr<double>(), p_tri.data_ptr<double>(), B, K, Cin, Cout,
                      N, lambda, p_dist, p_index, out.data_ptr<double>());
  }
}

void ddn_chosen_forward_cpu(const at::Tensor& features, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const at::Tensor& index, at::Tensor& out) {
  int64_t B, K, Cin, Cout, N;
  const at::ScalarType st = check_layer(features, weight, bias, residual, B, K, Cin, Cout, N);
  check_index(index, B, K);
  check_cpu(out, "out", st);
  check_numel(out, "out", B * Cout * N, "[B, Cout, H, W]");
  if (st == at::kFloat) {
    chosen_forward<float>(features.data_ptr<float>(), weight.data_ptr<float>(), opt_ptr<float>(bias),
                          opt_ptr<float>(residual), index.data_ptr<int64_t>(), B, Cin, Cout, N, out.data_ptr<float>());
  } else {
    chosen_forward<double>(features.data_ptr<double>(), weight.data_ptr<double>(), opt_ptr<double>(bias),
                           opt_ptr<double>(residual), index.data_ptr<int64_t>(), B, Cin, Cout, N,
                           out.data_ptr<double>());
  }
}

void ddn_chosen_backward_cpu(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& index,
                             const at::Tensor& d_out, const std::optional<at::Tensor>& d_features,
                             const std::optional<at::Tensor>& d_weight, const std::optional<at::Tensor>& d_bias) {
  int64_t B, K, Cin, Cout, N;
  const at::ScalarType st = check_layer(features, weight, std::nullopt, std::nullopt, B, K, Cin, Cout, N);
  check_index(index, B, K);
  check_cpu(d_out, "d_out", st);
  check_numel(d_out, "d_out", B * Cout * N, "[B, Cout, H, W]");
  check_optional(d_features, "d_features", st, B * Cin * N, "[B, Cin, H, W]");
  check_optional(d_weight, "d_weight", st, K * Cout * Cin, "[K, Cout, Cin]");
  check_optional(d_bias, "d_bias", st, K * Cout, "[K, Cout]");
  if (st == at::kFloat) {
    chosen_backward<float>(features.data_ptr<float>(), weight.data_ptr<float>(), index.data_ptr<int64_t>(),
                           d_out.data_ptr<float>(), B, K, Cin, Cout, N, opt_mut_ptr<float>(d_features),
                           opt_mut_ptr<float>(d_weight), opt_mut_ptr<float>(d_bias));
  } else {
    chosen_backward<double>(features.data_ptr<double>(), weight.data_ptr<double>(), index.data_ptr<int64_t>(),
                            d_out.data_ptr<double>(), B, K, Cin, Cout, N, opt_mut_ptr<double>(d_features),
                            opt_mut_ptr<double>(d_weight), opt_mut_ptr<double>(d_bias));
  }
}

}  // namespace fastcomp
