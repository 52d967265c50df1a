// The probe_demux CPU extension's binding (kernel: probe_cpu.cpp).
#include "cpu_module.h"
#include "probe_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp probe_demux CPU kernel (csrc/probe_demux/probe_cpu.cpp); outputs are allocated by the Python caller";
  FASTCOMP_BIND_BUILD_INFO(m);
  m.def("probe_demux_cpu", &fastcomp::probe_demux_cpu, pybind11::arg("g"), pybind11::arg("origins"),
        pybind11::arg("stride"), pybind11::arg("radius"), pybind11::arg("transpose"), pybind11::arg("sums"),
        pybind11::arg("counts"), pybind11::arg("outside"),
        "g [N, B, K, H, W] probe results; writes sums, counts [N, (2R+1)^2] and outside [N] (float64)");
}
