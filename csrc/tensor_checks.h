// Argument checks shared by the CPU and CUDA bindings (disk_mask_cpu.cpp, cuda_ops.cpp): torch's tensor
// header, no CUDA headers, so never include this from a .cu file (see the convention in fastcomp/_build.py).
//
// The Python side validates user input; these guard what it hands to the kernels, so that the CPU and
// CUDA bindings of an op refuse exactly the same misuse with the same words.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastcomp {

// t must live on `device` (kCPU or kCUDA), have `dtype` (spelled as Python does in dtype_name, e.g.
// "float64") and be contiguous.
inline void check_tensor(const at::Tensor& t, const char* name, at::DeviceType device, at::ScalarType dtype,
                         const char* dtype_name) {
  FASTCOMP_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device, true),
                 " tensor, got ", t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// disk_mask: points [B, M, 2] float64 (row, col); out [B, M, H, W] bool on the same device.
inline void check_disk_mask_args(const at::Tensor& points, double radius, const at::Tensor& out,
                                 at::DeviceType device) {
  check_tensor(points, "points", device, at::kDouble, "float64");
  check_tensor(out, "out", device, at::kBool, "bool");
  FASTCOMP_CHECK(points.device() == out.device(), "points and out must be on one device, got ",
                 points.device().str(), " and ", out.device().str());
  FASTCOMP_CHECK(points.dim() == 3 && points.size(2) == 2, "points must be [B, M, 2], got ", points.sizes());
  FASTCOMP_CHECK(out.dim() == 4 && out.size(0) == points.size(0) && out.size(1) == points.size(1),
                 "out must be [B, M, H, W] with B, M from points ", points.sizes(), ", got ", out.sizes());
  FASTCOMP_CHECK(radius >= 0, "radius must be >= 0, got ", radius);
}

}  // namespace fastcomp
