// The CUDA launchers: plain C++ declarations, the only interface between the .cu files (compiled by
// nvcc, no torch headers) and cuda_ops.cpp (compiled by g++ against torch, no CUDA headers).
//
// Every launcher takes raw pointers, sizes, the CUDA device index and the stream as `void*` (the
// cudaStream_t the Python side passed as an int64), and returns nullptr on success or a static error
// string (cudaGetErrorString) on failure; the binding turns that into a Python exception. Outputs are
// allocated by Python; a launcher never allocates.
#pragma once

#include <cstdint>

namespace fastcomp {

// out[bm, i, j] = (i - points[bm, 0])^2 + (j - points[bm, 1])^2 <= radius_sq, evaluated in float64.
// points: [BM, 2] float64 contiguous; out: [BM, H, W] bool contiguous.
const char* disk_mask_cuda_launch(const double* points, int64_t BM, int64_t H, int64_t W, double radius_sq,
                                  bool* out, int device, void* stream);

// DDN selection (csrc/ddn/ddn.cu). dtype: one of the codes below, for every floating tensor (all the same).
// Tensors contiguous: features [B, Cin, HW], weight [K, Cout, Cin], bias [K, Cout] or nullptr, residual and
// target [B, Cout, HW] (residual may be nullptr). dist: [B, K] float32, float64 for float64 inputs
// (written); index: [B] int64 (written), argmin over K, ties -> smallest k, NaN first as torch.argmin.
enum DdnDtype : int { kDdnFloat32 = 0, kDdnFloat64 = 1, kDdnFloat16 = 2, kDdnBFloat16 = 3 };
const char* ddn_select_cuda_launch(int dtype, const void* features, const void* weight, const void* bias,
                                   const void* residual, const void* target, void* dist, int64_t* index,
                                   int64_t B, int64_t K, int64_t Cout, int64_t Cin, int64_t HW, bool l1,
                                   int device, void* stream);
// out [B, Cout, HW] (written) = weight[index[b]] @ features[b] + bias[index[b]] + residual[b], rounded to
// the dtype after each step as the reference.
const char* ddn_gather_cuda_launch(int dtype, const void* features, const void* weight, const void* bias,
                                   const void* residual, const int64_t* index, void* out, int64_t B, int64_t Cout,
                                   int64_t Cin, int64_t HW, int device, void* stream);

}  // namespace fastcomp
