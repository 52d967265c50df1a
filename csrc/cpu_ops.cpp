// The CPU extension: OpenMP + auto-vectorized loops over tensors that Python allocated.
//
// Each op takes its inputs and its preallocated outputs (torch.empty* in Python, so the tests' NaN
// poisoning reaches here) and writes every output element. Threads: torch's setting
// (torch.set_num_threads), passed to each parallel region explicitly.
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_cpu.h"
#include "attention_jvp_cpu.h"
#include "common.h"
#include "ddn_cpu.h"
#include "probe_cpu.h"
#include "tensor_checks.h"

namespace fastcomp {
namespace {

// Below this many output elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

int num_threads_for(int64_t work) {
  return work < kMinParallelWork ? 1 : std::max(1, at::get_num_threads());
}

// points: [B, M, 2] float64 (row, col); out: [B, M, H, W] bool, written entirely.
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

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
  info["openmp_max_threads"] = 1;
#endif
  info["torch_threads"] = at::get_num_threads();
  pybind11::list simd;
#ifdef __SSE4_2__
  simd.append("SSE4.2");
#endif
#ifdef __AVX__
  simd.append("AVX");
#endif
#ifdef __AVX2__
  simd.append("AVX2");
#endif
#ifdef __FMA__
  simd.append("FMA");
#endif
#ifdef __AVX512F__
  simd.append("AVX512F");
#endif
#ifdef __ARM_NEON
  simd.append("NEON");
#endif
#ifdef __ARM_FEATURE_SVE
  simd.append("SVE");
#endif
  info["simd"] = simd;
  return info;
}

}  // namespace
}  // namespace fastcomp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp CPU kernels (csrc/cpu_ops.cpp); outputs are allocated by the Python caller";
  m.def("build_info", &fastcomp::build_info,
        "How this extension was compiled: compiler, OpenMP, SIMD instruction sets enabled");
  m.def("disk_mask_cpu", &fastcomp::disk_mask_cpu, pybind11::arg("points"), pybind11::arg("radius"),
        pybind11::arg("out"), "points [B, M, 2] float64, out [B, M, H, W] bool (written)");
  m.def("probe_demux_cpu", &fastcomp::probe_demux_cpu, pybind11::arg("g"), pybind11::arg("origins"),
        pybind11::arg("stride"), pybind11::arg("radius"), pybind11::arg("transpose"), pybind11::arg("sums"),
        pybind11::arg("counts"), pybind11::arg("outside"),
        "g [N, B, K, H, W] probe results; writes sums, counts [N, (2R+1)^2] and outside [N] (float64)");
  m.def("local_attention_forward_cpu", &fastcomp::local_attention_forward_cpu,
        "local conditional attention forward (csrc/attention_cpu.h): writes out and lse");
  m.def("local_attention_backward_cpu", &fastcomp::local_attention_backward_cpu,
        "local conditional attention backward (csrc/attention_cpu.h): writes dq, dk, dv, dcond_k, dcond_v");
  m.def("local_attention_jvp_cpu", &fastcomp::local_attention_jvp_cpu,
        "local conditional attention forward-mode derivative (csrc/attention_jvp_cpu.h): writes dout");
  m.def("ddn_l2_stats_cpu", &fastcomp::ddn_l2_stats_cpu,
        "DDN l2 expansion statistics (csrc/ddn_cpu.h): writes gram (upper triangle), m_fe, s_f, e_sum, e_sq");
  m.def("ddn_weight_gram_cpu", &fastcomp::ddn_weight_gram_cpu,
        "DDN weight Gram matrices (csrc/ddn_cpu.h): writes p_tri, upper triangles of W_k^T W_k, off-diagonal x2");
  m.def("ddn_l2_threshold_cpu", &fastcomp::ddn_l2_threshold_cpu,
        "DDN expanded l2 distances, bound and re-rank threshold (csrc/ddn_cpu.h): writes est, bound, thresh");
  m.def("ddn_l2_select_cpu", &fastcomp::ddn_l2_select_cpu,
        "DDN l2 selection per sample in one pass (csrc/ddn_cpu.h): writes distances, index, the chosen candidate out");
  m.def("ddn_rerank_cpu", &fastcomp::ddn_rerank_cpu,
        "DDN exact re-ranking of the near-best (csrc/ddn_cpu.h): writes distances, index, the chosen candidate out");
  m.def("ddn_chosen_forward_cpu", &fastcomp::ddn_chosen_forward_cpu,
        "DDN chosen candidate (csrc/ddn_cpu.h): writes out");
  m.def("ddn_chosen_backward_cpu", &fastcomp::ddn_chosen_backward_cpu,
        "DDN chosen candidate backward (csrc/ddn_cpu.h): writes d_features, d_weight, d_bias (each optional)");
}
