// Fused demultiplexing of structured Jacobian probes (csrc/probe_demux/probe_cpu.cpp), bound in probe_module.cpp.
#pragma once

// Only the Tensor class: this file compiles without the full torch/pybind11 headers, which keeps the
// extension's build (and the build tests that compile it repeatedly) short.
#include <ATen/core/Tensor.h>

namespace fastcomp {

// g: [N, B, K, H, W] float32/float64 probe results; origins: [N, 2] int64 (row, col) of each probe's first
// pixel; writes sums [N, (2R+1)^2], counts [N, (2R+1)^2] and outside [N] (float64). The semantics are
// those of fastcomp.reference.probe.probe_demux_reference.
void probe_demux_cpu(const at::Tensor& g, const at::Tensor& origins, int64_t stride, int64_t radius, bool transpose,
                     at::Tensor& sums, at::Tensor& counts, at::Tensor& outside);

}  // namespace fastcomp
