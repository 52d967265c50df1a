// CUDA kernels for fastcomp.ddn_select / ddn_gather: no B x K x Cout x H x W candidates anywhere.
//
// ddn_distances_kernel: one block per (tile of kTileK candidates, sample b). Its threads stride over the
// pixels; a thread loads features[b, c, p] once per channel and updates kTileK candidate accumulators
// (weights are warp-uniform loads, served by L1/broadcast), rounds the candidate where the reference
// rounds (einsum result, + bias, + residual, each in the input dtype), and accumulates (c - t)^2 or
// |c - t|. A block reduction gives distances[b, k] (mean over Cout * H * W).
// ddn_argmin_kernel: one block per sample, argmin over K with torch's rules (first minimum; NaN counts
// as the minimum, as torch.argmin).
// ddn_gather_kernel: the chosen candidate only, one thread per (b, pixel).
//
// CUDA runtime headers and fastcomp headers only (no torch): see the convention in fastcomp/_build.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"
#include "cuda_utils.h"
#include "launchers.h"

namespace fastcomp {
namespace {

constexpr int kThreads = 256;
constexpr int kTileK = 8;  // candidates per block: each features load feeds kTileK multiply-adds
constexpr int64_t kMaxGridY = 65535;

// Element type -> accumulation type and back (rounding to nearest, as torch's casts).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A> __device__ __forceinline__ A to_acc(float x) { return x; }
template <typename A> __device__ __forceinline__ A to_acc(double x) { return x; }
template <typename A> __device__ __forceinline__ A to_acc(__half x) { return __half2float(x); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// x rounded to T, as a value of the accumulation type: where the reference's tensors in T round.
template <typename T, typename A> __device__ __forceinline__ A round_to(A x) { return to_acc<A>(from_acc<T>(x)); }

// Block-wide sum of one value per thread; every thread gets the result. `scratch` holds 32 values.
template <typename A>
__device__ A block_sum(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  value = threadIdx.x < n_warps ? scratch[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

template <typename T, bool kL1>
__global__ void ddn_distances_kernel(const T* __restrict__ p_features,  // [B, Cin, HW]
                                     const T* __restrict__ p_weight,    // [K, Cout, Cin]
                                     const T* __restrict__ p_bias,      // [K, Cout] or nullptr
                                     const T* __restrict__ p_residual,  // [B, Cout, HW] or nullptr
                                     const T* __restrict__ p_target,    // [B, Cout, HW]
                                     typename Acc<T>::type* __restrict__ p_dist,  // [B, K]
                                     int64_t B, int64_t K, int64_t Cout, int64_t Cin, int64_t HW) {
  using A = typename Acc<T>::type;
  __shared__ A s_scratch[32];
  const int64_t o_k0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const int n_k = static_cast<int>(K - o_k0 < kTileK ? K - o_k0 : kTileK);
  for (int64_t i_b = blockIdx.y; i_b < B; i_b += gridDim.y) {
    const T* p_f = p_features + i_b * Cin * HW;
    A b_err[kTileK];
#pragma unroll
    for (int j = 0; j < kTileK; ++j) b_err[j] = A(0);
    for (int64_t o_p = threadIdx.x; o_p < HW; o_p += blockDim.x) {
      for (int64_t o = 0; o < Cout; ++o) {
        A b_cand[kTileK];
#pragma unroll
        for (int j = 0; j < kTileK; ++j) b_cand[j] = A(0);
        for (int64_t c = 0; c < Cin; ++c) {
          const A b_f = to_acc<A>(p_f[c * HW + o_p]);
#pragma unroll
          for (int j = 0; j < kTileK; ++j) {
            if (j < n_k) b_cand[j] += to_acc<A>(__ldg(&p_weight[((o_k0 + j) * Cout + o) * Cin + c])) * b_f;
          }
        }
        const int64_t o_out = (i_b * Cout + o) * HW + o_p;
        const A b_res = p_residual != nullptr ? to_acc<A>(p_residual[o_out]) : A(0);
        const A b_t = to_acc<A>(p_target[o_out]);
#pragma unroll
        for (int j = 0; j < kTileK; ++j) {
          if (j >= n_k) continue;
          A b_c = round_to<T>(b_cand[j]);
          if (p_bias != nullptr) b_c = round_to<T>(b_c + to_acc<A>(__ldg(&p_bias[(o_k0 + j) * Cout + o])));
          if (p_residual != nullptr) b_c = round_to<T>(b_c + b_res);
          const A b_diff = b_c - b_t;
          b_err[j] += kL1 ? (b_diff < A(0) ? -b_diff : b_diff) : b_diff * b_diff;
        }
      }
    }
    const A inv_n = A(1) / static_cast<A>(Cout * HW);
#pragma unroll
    for (int j = 0; j < kTileK; ++j) {
      const A total = block_sum(b_err[j], s_scratch);  // every thread takes part: no early exit above
      if (threadIdx.x == 0 && j < n_k) p_dist[i_b * K + o_k0 + j] = total * inv_n;
    }
  }
}

// (d, k) better than (best_d, best_k) under torch.argmin's rules: NaN is the minimum, ties -> smaller k.
template <typename A>
__device__ __forceinline__ bool better(A d, int64_t k, A best_d, int64_t best_k) {
  const bool nan = d != d, best_nan = best_d != best_d;
  if (nan != best_nan) return nan;
  if (nan || d == best_d) return k < best_k;
  return d < best_d;
}

template <typename A>
__global__ void ddn_argmin_kernel(const A* __restrict__ p_dist, int64_t* __restrict__ p_index, int64_t B,
                                  int64_t K) {
  __shared__ A s_d[kThreads];
  __shared__ int64_t s_k[kThreads];
  for (int64_t i_b = blockIdx.x; i_b < B; i_b += gridDim.x) {
    A b_best = A(0);
    int64_t b_k = -1;
    for (int64_t o_k = threadIdx.x; o_k < K; o_k += blockDim.x) {
      const A d = p_dist[i_b * K + o_k];
      if (b_k < 0 || better(d, o_k, b_best, b_k)) {
        b_best = d;
        b_k = o_k;
      }
    }
    s_d[threadIdx.x] = b_best;
    s_k[threadIdx.x] = b_k;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        const int other = threadIdx.x + stride;
        if (s_k[other] >= 0 && (s_k[threadIdx.x] < 0 ||
                                better(s_d[other], s_k[other], s_d[threadIdx.x], s_k[threadIdx.x]))) {
          s_d[threadIdx.x] = s_d[other];
          s_k[threadIdx.x] = s_k[other];
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) p_index[i_b] = s_k[0];
    __syncthreads();
  }
}

template <typename T>
__global__ void ddn_gather_kernel(const T* __restrict__ p_features,  // [B, Cin, HW]
                                  const T* __restrict__ p_weight,    // [K, Cout, Cin]
                                  const T* __restrict__ p_bias,      // [K, Cout] or nullptr
                                  const T* __restrict__ p_residual,  // [B, Cout, HW] or nullptr
                                  const int64_t* __restrict__ p_index,  // [B]
                                  T* __restrict__ p_out,             // [B, Cout, HW]
                                  int64_t B, int64_t Cout, int64_t Cin, int64_t HW) {
  using A = typename Acc<T>::type;
  const int64_t o_p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o_p >= HW) return;
  for (int64_t i_b = blockIdx.y; i_b < B; i_b += gridDim.y) {
    const int64_t i_k = p_index[i_b];
    const T* p_f = p_features + i_b * Cin * HW;
    for (int64_t o = 0; o < Cout; ++o) {
      const T* p_w = p_weight + (i_k * Cout + o) * Cin;
      A b_acc = A(0);
      for (int64_t c = 0; c < Cin; ++c) b_acc += to_acc<A>(__ldg(&p_w[c])) * to_acc<A>(p_f[c * HW + o_p]);
      A b_c = round_to<T>(b_acc);
      const int64_t o_out = (i_b * Cout + o) * HW + o_p;
      if (p_bias != nullptr) b_c = round_to<T>(b_c + to_acc<A>(p_bias[i_k * Cout + o]));
      if (p_residual != nullptr) b_c = round_to<T>(b_c + to_acc<A>(p_residual[o_out]));
      p_out[o_out] = from_acc<T>(b_c);
    }
  }
}

template <typename T>
const char* launch_distances(const void* features, const void* weight, const void* bias, const void* residual,
                             const void* target, void* dist, int64_t B, int64_t K, int64_t Cout, int64_t Cin,
                             int64_t HW, bool l1, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 grid(blocks_for(K, kTileK), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  const auto* f = static_cast<const T*>(features);
  const auto* w = static_cast<const T*>(weight);
  const auto* b = static_cast<const T*>(bias);
  const auto* r = static_cast<const T*>(residual);
  const auto* t = static_cast<const T*>(target);
  auto* d = static_cast<A*>(dist);
  if (l1) {
    ddn_distances_kernel<T, true><<<grid, kThreads, 0, stream>>>(f, w, b, r, t, d, B, K, Cout, Cin, HW);
  } else {
    ddn_distances_kernel<T, false><<<grid, kThreads, 0, stream>>>(f, w, b, r, t, d, B, K, Cout, Cin, HW);
  }
  return launch_result();
}

template <typename T>
const char* launch_gather(const void* features, const void* weight, const void* bias, const void* residual,
                          const int64_t* index, void* out, int64_t B, int64_t Cout, int64_t Cin, int64_t HW,
                          cudaStream_t stream) {
  const dim3 grid(blocks_for(HW, kThreads), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  ddn_gather_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(features), static_cast<const T*>(weight), static_cast<const T*>(bias),
      static_cast<const T*>(residual), index, static_cast<T*>(out), B, Cout, Cin, HW);
  return launch_result();
}

}  // namespace

const char* ddn_select_cuda_launch(int dtype, const void* features, const void* weight, const void* bias,
                                   const void* residual, const void* target, void* dist, int64_t* index,
                                   int64_t B, int64_t K, int64_t Cout, int64_t Cin, int64_t HW, bool l1,
                                   int device, void* stream) {
  if (B == 0 || K == 0) return nullptr;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const char* error = nullptr;
  switch (dtype) {
    case kDdnFloat32: error = launch_distances<float>(features, weight, bias, residual, target, dist, B, K, Cout, Cin, HW, l1, s); break;
    case kDdnFloat64: error = launch_distances<double>(features, weight, bias, residual, target, dist, B, K, Cout, Cin, HW, l1, s); break;
    case kDdnFloat16: error = launch_distances<__half>(features, weight, bias, residual, target, dist, B, K, Cout, Cin, HW, l1, s); break;
    case kDdnBFloat16: error = launch_distances<__nv_bfloat16>(features, weight, bias, residual, target, dist, B, K, Cout, Cin, HW, l1, s); break;
    default: return "ddn_select: unsupported dtype code";
  }
  if (error != nullptr) return error;
  const unsigned blocks = static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY);
  if (dtype == kDdnFloat64) {
    ddn_argmin_kernel<double><<<blocks, kThreads, 0, s>>>(static_cast<const double*>(dist), index, B, K);
  } else {
    ddn_argmin_kernel<float><<<blocks, kThreads, 0, s>>>(static_cast<const float*>(dist), index, B, K);
  }
  return launch_result();
}

const char* ddn_gather_cuda_launch(int dtype, const void* features, const void* weight, const void* bias,
                                   const void* residual, const int64_t* index, void* out, int64_t B, int64_t Cout,
                                   int64_t Cin, int64_t HW, int device, void* stream) {
  if (B == 0 || HW == 0) return nullptr;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kDdnFloat32: return launch_gather<float>(features, weight, bias, residual, index, out, B, Cout, Cin, HW, s);
    case kDdnFloat64: return launch_gather<double>(features, weight, bias, residual, index, out, B, Cout, Cin, HW, s);
    case kDdnFloat16: return launch_gather<__half>(features, weight, bias, residual, index, out, B, Cout, Cin, HW, s);
    case kDdnBFloat16: return launch_gather<__nv_bfloat16>(features, weight, bias, residual, index, out, B, Cout, Cin, HW, s);
    default: return "ddn_gather: unsupported dtype code";
  }
}

}  // namespace fastcomp
