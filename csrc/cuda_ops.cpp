// The CUDA extension's binding: compiled by g++ against torch's headers, with no CUDA header at all
// (the CPU torch wheel's CUDA headers do not compile), so it checks tensors, pulls out raw pointers and
// calls the plain launchers that the .cu files export (launchers.h).
//
// The stream arrives from Python as an int64 (torch.cuda.current_stream(device).cuda_stream).
#include <torch/python.h>

#include <cstdint>

#include "common.h"
#include "launchers.h"
#include "tensor_checks.h"

namespace fastcomp {
void register_ddn_cuda(pybind11::module_& m);  // csrc/ddn/ddn_cuda_ops.cpp

namespace {

void check_launch(const char* error, const char* op) {
  if (error != nullptr) {
    throw std::runtime_error(std::string("fastcomp: CUDA error in ") + op + ": " + error);
  }
}

// points: [B, M, 2] float64 (row, col); out: [B, M, H, W] bool on the same device, written entirely.
void disk_mask_cuda(const at::Tensor& points, double radius, at::Tensor& out, int64_t stream) {
  check_disk_mask_args(points, radius, out, at::kCUDA);
  check_launch(disk_mask_cuda_launch(points.data_ptr<double>(), out.size(0) * out.size(1), out.size(2),
                                     out.size(3), radius * radius, out.data_ptr<bool>(), out.get_device(),
                                     reinterpret_cast<void*>(stream)),
               "disk_mask");
}

}  // namespace
}  // namespace fastcomp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcomp CUDA kernels (csrc/<op>/*.cu) behind raw-pointer launchers; outputs allocated by Python";
  m.def("disk_mask_cuda", &fastcomp::disk_mask_cuda, pybind11::arg("points"), pybind11::arg("radius"),
        pybind11::arg("out"), pybind11::arg("stream"),
        "points [B, M, 2] float64, out [B, M, H, W] bool (written), stream: cudaStream_t as int64");
  fastcomp::register_ddn_cuda(m);
}
