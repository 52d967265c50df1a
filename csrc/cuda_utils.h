// Helpers for the .cu files' launchers. CUDA runtime only (no torch): include from .cu files, never from
// the bindings (cuda_ops.cpp is compiled by g++ without CUDA headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastcomp {

// Makes `device` current for a launch and restores the caller's device afterwards, as torch's CUDAGuard
// would (which cannot be used here: it lives in torch's CUDA headers).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      changed_ = cudaSetDevice(device) == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

// What a launcher returns after its kernel launches: nullptr, or the static CUDA error string.
inline const char* launch_result() {
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace fastcomp
