// Local conditional attention, CPU kernels (csrc/attention/attention_cpu.cpp), bound in attention_module.cpp.
//
// Python (fastcomp/ops/attention/cpu.py, forward / backward) passes contiguous heads-last
// tensors and allocates every output:
//   q, k, v, out, grad_out, dq, dk, dv: [B, H, W, heads, D]   float32 or float64
//   cond_k, cond_v, dcond_k, dcond_v:   [B, M, heads, D]      (M may be 0)
//   cond_mask: [B, M, H, W] bool, or an empty 1-d tensor meaning "every pixel sees every conditioner"
//   lse: [B, heads, H, W] in q's dtype, written by the forward, read by the backward
#pragma once

#include <ATen/core/Tensor.h>

namespace fastcomp {

void local_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cond_k, const at::Tensor& cond_v, const at::Tensor& cond_mask,
                                 int64_t kh, int64_t kw, double scale, at::Tensor& out, at::Tensor& lse);

void local_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& cond_k, const at::Tensor& cond_v,
                                  const at::Tensor& cond_mask, const at::Tensor& out, const at::Tensor& lse,
                                  int64_t kh, int64_t kw, double scale, at::Tensor& dq, at::Tensor& dk,
                                  at::Tensor& dv, at::Tensor& dcond_k, at::Tensor& dcond_v);

}  // namespace fastcomp
