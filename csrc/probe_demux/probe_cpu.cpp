// Fused demultiplexing of structured Jacobian probes into the per-offset |J| profile (CPU).
//
// The probes' results g [N, B, K, H, W] are read once: per probe n and image row, the |g| mass summed over
// (b, k) is accumulated in a row buffer (the vectorizable inner loop over columns), then each column's
// mass goes to its offset slot or to the outside sum. The per-pixel Jacobian is never formed. Semantics:
// fastcomp.reference.probe.probe_demux_reference.
#include "probe_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastcomp {
namespace {

// The probe pixel nearest `pos` along one axis, modulo the stride: d = (pos - origin + R) mod S - R,
// valid when d <= R and pos - d lies in [0, size). Returns the slot index d + R (or -d + R transposed),
// or -1 when invalid.
inline int64_t axis_slot(int64_t pos, int64_t origin, int64_t stride, int64_t radius, int64_t size,
                         bool transpose) {
  // origin < stride and origin < size, so adding the stride makes the dividend non-negative.
  const int64_t d = (pos - origin + radius + stride) % stride - radius;
  if (d > radius || pos - d < 0 || pos - d >= size) return -1;
  return transpose ? radius - d : radius + d;
}

template <typename scalar_t>
void demux_probe(const scalar_t* p_g, int64_t BK, int64_t H, int64_t W, int64_t o_row, int64_t o_col,
                 int64_t stride, int64_t radius, bool transpose, double* p_sums, double* p_counts,
                 double* p_outside, std::vector<double>& b_row, std::vector<int64_t>& o_col_slot) {
  const int64_t s = 2 * radius + 1;
  const double bk = static_cast<double>(BK);
  std::fill(p_sums, p_sums + s * s, 0.0);
  std::fill(p_counts, p_counts + s * s, 0.0);
  double b_outside = 0.0;
  for (int64_t j = 0; j < W; ++j) o_col_slot[j] = axis_slot(j, o_col, stride, radius, W, transpose);
  for (int64_t i = 0; i < H; ++i) {
    std::fill(b_row.begin(), b_row.end(), 0.0);
    double* p_row = b_row.data();
    for (int64_t c = 0; c < BK; ++c) {
      const scalar_t* p_src = p_g + (c * H + i) * W;
      for (int64_t j = 0; j < W; ++j) p_row[j] += std::abs(static_cast<double>(p_src[j]));
    }
    const int64_t row_slot = axis_slot(i, o_row, stride, radius, H, transpose);
    if (row_slot < 0) {
      for (int64_t j = 0; j < W; ++j) b_outside += p_row[j];
      continue;
    }
    double* p_sums_row = p_sums + row_slot * s;
    double* p_counts_row = p_counts + row_slot * s;
    for (int64_t j = 0; j < W; ++j) {
      const int64_t col_slot = o_col_slot[j];
      if (col_slot < 0) {
        b_outside += p_row[j];
      } else {
        p_sums_row[col_slot] += p_row[j];
        p_counts_row[col_slot] += bk;
      }
    }
  }
  *p_outside = b_outside;
}

template <typename scalar_t>
void demux_all(const scalar_t* p_g, const int64_t* p_origins, int64_t N, int64_t BK, int64_t H, int64_t W,
               int64_t stride, int64_t radius, bool transpose, double* p_sums, double* p_counts, double* p_outside,
               int threads) {
  const int64_t s = 2 * radius + 1;
  const int64_t probe_size = BK * H * W;
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> b_row(W);        // |g| of one image row summed over (b, k)
    std::vector<int64_t> o_col_slot(W);  // each column's slot (or -1) for the current probe
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      demux_probe<scalar_t>(p_g + n * probe_size, BK, H, W, p_origins[2 * n], p_origins[2 * n + 1], stride, radius,
                            transpose, p_sums + n * s * s, p_counts + n * s * s, p_outside + n, b_row, o_col_slot);
    }
  }
}

// tensor_checks.h's check_tensor, restated for CPU only: that header pulls in torch/python.h.
void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* dtype_name) {
  FASTCOMP_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

void probe_demux_cpu(const at::Tensor& g, const at::Tensor& origins, int64_t stride, int64_t radius, bool transpose,
                     at::Tensor& sums, at::Tensor& counts, at::Tensor& outside) {
  FASTCOMP_CHECK(g.device().is_cpu(), "g must be a CPU tensor, got ", g.device().str());
  FASTCOMP_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
                 "g must be float32 or float64, got ", g.scalar_type());
  FASTCOMP_CHECK(g.is_contiguous(), "g must be contiguous");
  FASTCOMP_CHECK(g.dim() == 5, "g must be [N, B, K, H, W], got ", g.sizes());
  FASTCOMP_CHECK(radius >= 0, "radius must be >= 0, got ", radius);
  FASTCOMP_CHECK(stride >= 2 * radius + 1, "stride must be >= 2 * radius + 1 = ", 2 * radius + 1, ", got ", stride);
  check_cpu(origins, "origins", at::kLong, "int64");
  check_cpu(sums, "sums", at::kDouble, "float64");
  check_cpu(counts, "counts", at::kDouble, "float64");
  check_cpu(outside, "outside", at::kDouble, "float64");
  const int64_t N = g.size(0), BK = g.size(1) * g.size(2), H = g.size(3), W = g.size(4);
  const int64_t s = 2 * radius + 1;
  FASTCOMP_CHECK(origins.dim() == 2 && origins.size(0) == N && origins.size(1) == 2,
                 "origins must be [N, 2] with N = ", N, ", got ", origins.sizes());
  FASTCOMP_CHECK(sums.numel() == N * s * s && counts.numel() == N * s * s && outside.numel() == N,
                 "sums and counts must hold N * (2R+1)^2 = ", N * s * s, " elements and outside N = ", N);
  const int64_t* p_origins = origins.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    FASTCOMP_CHECK(p_origins[2 * n] >= 0 && p_origins[2 * n] < std::min(stride, H) && p_origins[2 * n + 1] >= 0 &&
                       p_origins[2 * n + 1] < std::min(stride, W),
                   "origins[", n, "] = (", p_origins[2 * n], ", ", p_origins[2 * n + 1],
                   ") must lie in [0, min(stride, H)) x [0, min(stride, W))");
  }
  double* p_sums = sums.data_ptr<double>();
  double* p_counts = counts.data_ptr<double>();
  double* p_outside = outside.data_ptr<double>();
  const int threads = (N * BK * H * W < (1 << 15)) ? 1 : std::max(1, at::get_num_threads());

  // Dispatched by hand: an OpenMP pragma cannot sit inside the AT_DISPATCH macro's lambda.
  if (g.scalar_type() == at::kDouble) {
    demux_all<double>(g.data_ptr<double>(), p_origins, N, BK, H, W, stride, radius, transpose, p_sums, p_counts,
                      p_outside, threads);
  } else {
    demux_all<float>(g.data_ptr<float>(), p_origins, N, BK, H, W, stride, radius, transpose, p_sums, p_counts,
                     p_outside, threads);
  }
}

}  // namespace fastcomp
