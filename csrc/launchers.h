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

}  // namespace fastcomp
