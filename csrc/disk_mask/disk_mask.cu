// CUDA kernel for fastcomp.disk_mask: [B, M, H, W] bool, (i - row)^2 + (j - col)^2 <= radius^2.
//
// CUDA runtime headers and fastcomp headers only (no torch): see the convention in fastcomp/_build.py.
#include <cuda_runtime.h>

#include "common.h"
#include "cuda_utils.h"
#include "launchers.h"

namespace fastcomp {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// blockIdx.y walks the B*M*H output rows (grid-stride when there are more than 65535 of them);
// blockIdx.x * blockDim.x + threadIdx.x walks the columns of a row, one byte per thread.
__global__ void disk_mask_kernel(const double* __restrict__ p_points,  // [BM, 2] (row, col)
                                 int64_t n_rows, int64_t H, int64_t W, double radius_sq,
                                 bool* __restrict__ p_out) {  // [BM, H, W]
  const int64_t o_j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o_j >= W) return;
  const double b_j = static_cast<double>(o_j);
  for (int64_t o_row = blockIdx.y; o_row < n_rows; o_row += gridDim.y) {
    const int64_t i_bm = o_row / H;
    const int64_t i_row = o_row - i_bm * H;
    const double b_di = static_cast<double>(i_row) - p_points[2 * i_bm];
    const double b_dj = b_j - p_points[2 * i_bm + 1];
    p_out[o_row * W + o_j] = sum_of_squares(b_di, b_dj) <= radius_sq;
  }
}

}  // namespace

const char* disk_mask_cuda_launch(const double* points, int64_t BM, int64_t H, int64_t W, double radius_sq,
                                  bool* out, int device, void* stream) {
  const int64_t n_rows = BM * H;
  if (n_rows == 0 || W == 0) return nullptr;
  DeviceGuard guard(device);
  const int threads = W >= kThreads ? kThreads : static_cast<int>((W + 31) / 32 * 32);
  const dim3 grid(blocks_for(W, threads), static_cast<unsigned>(n_rows < kMaxGridY ? n_rows : kMaxGridY));
  disk_mask_kernel<<<grid, threads, 0, as_stream(stream)>>>(points, n_rows, H, W, radius_sq, out);
  return launch_result();
}

}  // namespace fastcomp
