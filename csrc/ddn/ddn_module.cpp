// The DDN selection CPU extension's binding (kernels: ddn_cpu.cpp).
#include "cpu_module.h"
#include "ddn_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp DDN selection CPU kernels (csrc/ddn/ddn_cpu.cpp); outputs are allocated by the Python caller";
  FASTCOMP_BIND_BUILD_INFO(m);
  m.def("ddn_l2_stats_cpu", &fastcomp::ddn_l2_stats_cpu,
        "DDN l2 expansion statistics (csrc/ddn/ddn_cpu.h): writes gram (upper triangle), m_fe, s_f, e_sum, e_sq");
  m.def("ddn_weight_gram_cpu", &fastcomp::ddn_weight_gram_cpu,
        "DDN weight Gram matrices (csrc/ddn/ddn_cpu.h): writes p_tri, upper triangles of W_k^T W_k, off-diagonal x2");
  m.def("ddn_l2_threshold_cpu", &fastcomp::ddn_l2_threshold_cpu,
        "DDN expanded l2 distances, bound and re-rank threshold (csrc/ddn/ddn_cpu.h): writes est, bound, thresh");
  m.def("ddn_l2_select_cpu", &fastcomp::ddn_l2_select_cpu,
        "DDN l2 selection per sample in one pass (csrc/ddn/ddn_cpu.h): writes p_tri, distances, index, the chosen candidate out");
  m.def("ddn_rerank_cpu", &fastcomp::ddn_rerank_cpu,
        "DDN exact re-ranking of the near-best (csrc/ddn/ddn_cpu.h): writes distances, index, the chosen candidate out");
  m.def("ddn_chosen_forward_cpu", &fastcomp::ddn_chosen_forward_cpu,
        "DDN chosen candidate (csrc/ddn/ddn_cpu.h): writes out");
  m.def("ddn_chosen_backward_cpu", &fastcomp::ddn_chosen_backward_cpu,
        "DDN chosen candidate backward (csrc/ddn/ddn_cpu.h): writes d_features, d_weight, d_bias (each optional)");
}
