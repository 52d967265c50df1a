// The disk_mask CPU extension: kernel and binding in one source (the kernel is one loop).
//
// points [B, M, 2] float64 (row, col); out [B, M, H, W] bool, allocated by Python and written entirely.
// Pixel (i, j) is inside disk m when (i - row)^2 + (j - col)^2 <= radius^2, rounded exactly as the
// float64 reference rounds it (sum_of_squares; the extension is compiled with -ffp-contract=off).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cpu_module.h"
#include "tensor_checks.h"

namespace fastcomp {
namespace {

// Below this many output elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

int num_threads_for(int64_t work) { return work < kMinParallelWork ? 1 : std::max(1, at::get_num_threads()); }

void disk_mask_cpu(const at::Tensor& points, double radius, at::Tensor& out) {
  check_disk_mask_args(points, radius, out, at::kCPU);
  const int64_t H = out.size(2), W = out.size(3);
  const int64_t n_rows = out.size(0) * out.size(1) * H;  // one task per output row (b, m, i)
  const double radius_sq = radius * radius;              // == Python's float(radius) ** 2
  const double* p_points = points.data_ptr<double>();
  bool* p_out = out.data_ptr<bool>();

#pragma omp parallel for schedule(static) num_threads(num_threads_for(n_rows * W))
  for (int64_t o_row = 0; o_row < n_rows; ++o_row) {
    const int64_t i_bm = o_row / H;
    const double b_di = static_cast<double>(o_row - i_bm * H) - p_points[2 * i_bm];
    const double b_col = p_points[2 * i_bm + 1];
    bool* p_out_row = p_out + o_row * W;
    for (int64_t j = 0; j < W; ++j) {
      p_out_row[j] = sum_of_squares(b_di, static_cast<double>(j) - b_col) <= radius_sq;
    }
  }
}

}  // namespace
}  // namespace fastcomp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp disk_mask CPU kernel (csrc/disk_mask/disk_mask_cpu.cpp); outputs are allocated by the Python caller";
  FASTCOMP_BIND_BUILD_INFO(m);
  m.def("disk_mask_cpu", &fastcomp::disk_mask_cpu, pybind11::arg("points"), pybind11::arg("radius"),
        pybind11::arg("out"), "points [B, M, 2] float64, out [B, M, H, W] bool (written)");
}
