// The local conditional attention CPU extension's binding (kernels: attention_cpu.cpp, attention_jvp_cpu.cpp).
#include "attention_cpu.h"
#include "attention_jvp_cpu.h"
#include "cpu_module.h"
#include "output_cache.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp local conditional attention CPU kernels (csrc/attention/attention_cpu.cpp); outputs are allocated "
            "by the Python caller (output_empty: from the cache of csrc/output_cache.h)";
  FASTCOMP_BIND_BUILD_INFO(m);
  FASTCOMP_BIND_OUTPUT_CACHE(m);
  m.def("local_attention_forward_cpu", &fastcomp::local_attention_forward_cpu,
        "local conditional attention forward (csrc/attention/attention_cpu.h): writes out and lse");
  m.def("local_attention_backward_cpu", &fastcomp::local_attention_backward_cpu,
        "local conditional attention backward (csrc/attention/attention_cpu.h): writes dq, dk, dv, dcond_k, dcond_v");
  m.def("local_attention_jvp_cpu", &fastcomp::local_attention_jvp_cpu,
        "local conditional attention forward-mode derivative (csrc/attention/attention_jvp_cpu.h): writes dout");
}
