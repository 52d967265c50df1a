// Local conditional attention, CPU forward-mode derivative (csrc/attention/attention_jvp_cpu.cpp), bound in
// attention_module.cpp.
//
// Python (fastcomp/ops/attention/cpu.py, jvp) passes contiguous heads-last tensors of one dtype
// (float32 or float64) and allocates the output:
//   q, k, v, out, dout:        [B, H, W, heads, D]   (out and lse from local_attention_forward_cpu)
//   cond_k, cond_v:            [B, M, heads, D]      (M may be 0)
//   cond_mask: [B, M, H, W] bool, or an empty 1-d tensor meaning "every pixel sees every conditioner"
//   lse: [B, heads, H, W], natural-log log-sum-exp of every query's scores
//   dq, dk, dv: tangents shaped like q; dcond_k, dcond_v: like cond_k. An empty tensor is a zero tangent
//   (its terms are skipped).
// dout is the tangent of out: sum_j p_ij (t_ij - mu_i) v_j + sum_j p_ij dv_j, with
// t_ij = scale (dq_i . k_j + q_i . dk_j) and mu_i = sum_j p_ij t_ij, over the window keys and the
// conditioners the pixel may see.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastcomp {

void local_attention_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cond_k,
                             const at::Tensor& cond_v, const at::Tensor& cond_mask, const at::Tensor& out,
                             const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                             const at::Tensor& dcond_k, const at::Tensor& dcond_v, int64_t kh, int64_t kw,
                             double scale, at::Tensor& dout);

}  // namespace fastcomp
