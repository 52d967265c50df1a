// DDN K-way selection, CPU kernels (csrc/ddn/ddn_cpu.cpp), bound in ddn_module.cpp; used by
// fastcomp/ops/ddn/cpu.py (the cpu backend: float32 and float64 CPU tensors; the torch backend is PyTorch).
//
// Python passes contiguous tensors and allocates every output (torch.empty, so the tests' NaN poisoning
// reaches here); every output element is written. Shapes (N = H * W pixels):
//   features [B, Cin, N], weight [K, Cout, Cin], bias [K, Cout], residual / target / out / d_out
//   [B, Cout, N], all in one dtype scalar_t (float32 or float64); index int64 [B].
#pragma once

// Only the Tensor class: this file compiles without the full torch/pybind11 headers.
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastcomp {

// The per-sample statistics of the l2 expansion in one pass over the features, with e = residual - target
// formed in float64 (residual may be absent: e = -target):
//   gram [B, Cin (Cin + 1) / 2] scalar_t: the upper triangle (row-major, torch.triu_indices order) of
//        G_b = sum_p f_p f_p^T, accumulated in scalar_t;
//   m_fe [B, Cout, Cin] float64: sum_p e_p f_p^T, accumulated in scalar_t from e rounded to scalar_t;
//   s_f [B, Cin], e_sum [B, Cout], e_sq [B] float64: sum_p f_p, sum_p e_p, sum_p ||e_p||^2 in float64.
void ddn_l2_stats_cpu(const at::Tensor& features, const std::optional<at::Tensor>& residual,
                      const at::Tensor& target, at::Tensor& gram, at::Tensor& m_fe, at::Tensor& s_f,
                      at::Tensor& e_sum, at::Tensor& e_sq);

// p_tri [K, Cin (Cin + 1) / 2] scalar_t: the upper triangle of W_k^T W_k (weight [K, Cout, Cin]) with the
// off-diagonal entries doubled, so that <W_k^T W_k, G_b> = p_tri[k] . gram[b] (gram as above).
void ddn_weight_gram_cpu(const at::Tensor& weight, at::Tensor& p_tri);

// The expanded distances and the re-ranking threshold (as ops/ddn/pytorch.py expanded_l2 and ops/ddn/cpu.py select compute
// them): from a [B, K] scalar_t = <W_k^T W_k, G_b> (gram @ p_tri^T), gram, m_fe, s_f, e_sum, e_sq as
// written by ddn_l2_stats_cpu, weight [K, Cout, Cin], bias [K, Cout] (optional), target [B, Cout, N] and the
// bound's confidence factor lambda, writes est [B, K], bound [B, K] and thresh [B] = min_k est + 2 max_k
// bound + the reference's own rounding noise (NaN when the row has a NaN), all float64.
void ddn_l2_threshold_cpu(const at::Tensor& a, const at::Tensor& gram, const at::Tensor& m_fe, const at::Tensor& s_f,
                          const at::Tensor& e_sum, const at::Tensor& e_sq, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target, double lambda,
                          at::Tensor& est, at::Tensor& bound, at::Tensor& thresh);

// The exact re-ranking of l2: per sample b, every k with est[b, k] <= thresh[b] (est [B, K], thresh [B]
// float64; every k when no est of the row passes, e.g. NaN rows) gets the distance the reference computes
// (candidate rounded to scalar_t, squared differences summed in float64, mean rounded to scalar_t),
// written to distances [B, K] float32, the others est rounded to float32. index [B] (int64) = the k of the
// first minimal exact distance (a NaN counts as minimal, as in torch.argmin); out [B, Cout, N] = that
// candidate.
void ddn_rerank_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, const at::Tensor& target, const at::Tensor& est,
                    const at::Tensor& thresh, at::Tensor& distances, at::Tensor& index, at::Tensor& out);

// The whole l2 selection per sample while its features are in cache (small K: the weight Gram triangles
// p_tri [K, Cin (Cin + 1) / 2], written here first as by ddn_weight_gram_cpu, are read once per sample):
// the statistics, A, est, bound and threshold (as ddn_l2_threshold_cpu with the bound's confidence factor
// lambda) and the re-ranking (as ddn_rerank_cpu), writing distances [B, K] float32, index [B] int64 and
// out [B, Cout, N] (the chosen candidate).
void ddn_l2_select_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, const at::Tensor& target, at::Tensor& p_tri,
                       double lambda, at::Tensor& distances, at::Tensor& index, at::Tensor& out);

// out [B, Cout, N] = weight[index[b]] @ features[b] + bias[index[b]] + residual[b].
void ddn_chosen_forward_cpu(const at::Tensor& features, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const at::Tensor& index, at::Tensor& out);

// The chosen candidate's backward, each output optional:
//   d_features [B, Cin, N] = weight[index[b]]^T d_out[b];
//   d_weight [K, Cout, Cin] = sum over b with index[b] = k of d_out[b] features[b]^T (zero rows elsewhere);
//   d_bias [K, Cout] = sum over b with index[b] = k of d_out[b] summed over pixels.
void ddn_chosen_backward_cpu(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& index,
                             const at::Tensor& d_out, const std::optional<at::Tensor>& d_features,
                             const std::optional<at::Tensor>& d_weight, const std::optional<at::Tensor>& d_bias);

}  // namespace fastcomp
