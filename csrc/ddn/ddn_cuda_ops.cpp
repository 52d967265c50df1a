// Binding of the DDN CUDA launchers (csrc/ddn/ddn.cu): torch headers, no CUDA header (see the convention in
// fastcomp/_build.py). Registered into the CUDA extension by cuda_ops.cpp's PYBIND11_MODULE through
// register_ddn_cuda.
#include <torch/python.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common.h"
#include "launchers.h"
#include "tensor_checks.h"

namespace fastcomp {
namespace {

int ddn_dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kDdnFloat32;
    case at::kDouble: return kDdnFloat64;
    case at::kHalf: return kDdnFloat16;
    case at::kBFloat16: return kDdnBFloat16;
    default: FASTCOMP_CHECK(false, "features must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

const char* dtype_name_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return "a floating dtype";
  }
}

// features [B, Cin, H, W], weight [K, Cout, Cin], bias [K, Cout]?, residual [B, Cout, H, W]?: one dtype,
// one CUDA device, contiguous.
void check_layer(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual) {
  const auto dtype = features.scalar_type();
  const char* name = dtype_name_of(features);
  ddn_dtype_code(features);
  check_tensor(features, "features", at::kCUDA, dtype, name);
  check_tensor(weight, "weight", at::kCUDA, dtype, name);
  FASTCOMP_CHECK(features.dim() == 4 && weight.dim() == 3 && weight.size(2) == features.size(1),
                 "features must be [B, Cin, H, W] and weight [K, Cout, Cin], got ", features.sizes(), " and ",
                 weight.sizes());
  if (bias) {
    check_tensor(*bias, "bias", at::kCUDA, dtype, name);
    FASTCOMP_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == weight.size(1),
                   "bias must be [K, Cout], got ", bias->sizes());
  }
  if (residual) {
    check_tensor(*residual, "residual", at::kCUDA, dtype, name);
    FASTCOMP_CHECK(residual->dim() == 4 && residual->size(0) == features.size(0) &&
                       residual->size(1) == weight.size(1) && residual->size(2) == features.size(2) &&
                       residual->size(3) == features.size(3),
                   "residual must be [B, Cout, H, W], got ", residual->sizes());
  }
}

void check_launch(const char* error, const char* op) {
  if (error != nullptr) throw std::runtime_error(std::string("fastcomp: CUDA error in ") + op + ": " + error);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

void ddn_select_cuda(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& target,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     bool l1, at::Tensor& dist, at::Tensor& index, int64_t stream) {
  check_layer(features, weight, bias, residual);
  const int64_t B = features.size(0), Cin = features.size(1), HW = features.size(2) * features.size(3);
  const int64_t K = weight.size(0), Cout = weight.size(1);
  check_tensor(target, "target", at::kCUDA, features.scalar_type(), dtype_name_of(features));
  FASTCOMP_CHECK(target.numel() == B * Cout * HW, "target must be [B, Cout, H, W], got ", target.sizes());
  const bool f64 = features.scalar_type() == at::kDouble;
  check_tensor(dist, "dist", at::kCUDA, f64 ? at::kDouble : at::kFloat, f64 ? "float64" : "float32");
  check_tensor(index, "index", at::kCUDA, at::kLong, "int64");
  FASTCOMP_CHECK(dist.numel() == B * K && index.numel() == B, "dist must be [B, K] and index [B], got ",
                 dist.sizes(), " and ", index.sizes());
  check_launch(ddn_select_cuda_launch(ddn_dtype_code(features), features.data_ptr(), weight.data_ptr(),
                                      ptr_or_null(bias), ptr_or_null(residual), target.data_ptr(), dist.data_ptr(),
                                      index.data_ptr<int64_t>(), B, K, Cout, Cin, HW, l1, features.get_device(),
                                      reinterpret_cast<void*>(stream)),
               "ddn_select");
}

void ddn_gather_cuda(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& index,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     at::Tensor& out, int64_t stream) {
  check_layer(features, weight, bias, residual);
  const int64_t B = features.size(0), Cin = features.size(1), HW = features.size(2) * features.size(3);
  const int64_t Cout = weight.size(1);
  check_tensor(index, "index", at::kCUDA, at::kLong, "int64");
  check_tensor(out, "out", at::kCUDA, features.scalar_type(), dtype_name_of(features));
  FASTCOMP_CHECK(index.numel() == B && out.numel() == B * Cout * HW, "index must be [B] and out [B, Cout, H, W], got ",
                 index.sizes(), " and ", out.sizes());
  check_launch(ddn_gather_cuda_launch(ddn_dtype_code(features), features.data_ptr(), weight.data_ptr(),
                                      ptr_or_null(bias), ptr_or_null(residual), index.data_ptr<int64_t>(),
                                      out.data_ptr(), B, Cout, Cin, HW, features.get_device(),
                                      reinterpret_cast<void*>(stream)),
               "ddn_gather");
}

}  // namespace

void register_ddn_cuda(pybind11::module_& m) {
  m.def("ddn_select_cuda", &ddn_select_cuda, pybind11::arg("features"), pybind11::arg("weight"),
        pybind11::arg("target"), pybind11::arg("bias"), pybind11::arg("residual"), pybind11::arg("l1"),
        pybind11::arg("dist"), pybind11::arg("index"), pybind11::arg("stream"),
        "distances [B, K] (float32; float64 for float64 inputs) and index [B] int64, both written");
  m.def("ddn_gather_cuda", &ddn_gather_cuda, pybind11::arg("features"), pybind11::arg("weight"),
        pybind11::arg("index"), pybind11::arg("bias"), pybind11::arg("residual"), pybind11::arg("out"),
        pybind11::arg("stream"), "out [B, Cout, H, W] (written): the chosen candidates");
}

}  // namespace fastcomp
