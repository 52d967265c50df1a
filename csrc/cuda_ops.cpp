// The CUDA extension's binding: compiled by g++ against torch's headers, with no CUDA header at all
// (the CPU torch wheel's CUDA headers do not compile), so it checks tensors, pulls out raw pointers and
// calls the plain launchers that the .cu files export (launchers.h).
//
// The stream arrives from Python as an int64 (torch.cuda.current_stream(device).cuda_stream).
#include <torch/python.h>

#include <cstdint>

#include "common.h"
#include "launchers.h"

namespace fastcomp {
namespace {

// dtype_name: as Python spells it ("float64"), for the message.
void check_cuda_contiguous(const at::Tensor& t, const char* name, at::ScalarType dtype,
                           const char* dtype_name) {
  FASTCOMP_CHECK(t.device().is_cuda(), name, " must be a CUDA tensor, got ", t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(const char* error, const char* op) {
  if (error != nullptr) {
    throw std::runtime_error(std::string("fastcomp: CUDA error in ") + op + ": " + error);
  }
}

// points: [B, M, 2] float64 (row, col); out: [B, M, H, W] bool on the same device, written entirely.
void disk_mask_cuda(const at::Tensor& points, double radius, at::Tensor& out, int64_t stream) {
  check_cuda_contiguous(points, "points", at::kDouble, "float64");
  check_cuda_contiguous(out, "out", at::kBool, "bool");
  FASTCOMP_CHECK(points.device() == out.device(), "points and out must be on one device, got ",
                 points.device().str(), " and ", out.device().str());
  FASTCOMP_CHECK(points.dim() == 3 && points.size(2) == 2, "points must be [B, M, 2], got ", points.sizes());
  FASTCOMP_CHECK(out.dim() == 4 && out.size(0) == points.size(0) && out.size(1) == points.size(1),
                 "out must be [B, M, H, W] with B, M from points ", points.sizes(), ", got ", out.sizes());
  FASTCOMP_CHECK(radius >= 0, "radius must be >= 0, got ", radius);
  check_launch(disk_mask_cuda_launch(points.data_ptr<double>(), out.size(0) * out.size(1), out.size(2),
                                     out.size(3), radius * radius, out.data_ptr<bool>(), out.get_device(),
                                     reinterpret_cast<void*>(stream)),
               "disk_mask");
}

}  // namespace
}  // namespace fastcomp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp CUDA kernels (csrc/*.cu) behind raw-pointer launchers; outputs allocated by Python";
  m.def("disk_mask_cuda", &fastcomp::disk_mask_cuda, pybind11::arg("points"), pybind11::arg("radius"),
        pybind11::arg("out"), pybind11::arg("stream"),
        "points [B, M, 2] float64, out [B, M, H, W] bool (written), stream: cudaStream_t as int64");
}
