// Local conditional attention on CPU, forward-mode derivative (the tangent of out), float32 and float64.
//
// Semantics: fastcomp/ops/attention/reference.py is the spec and attention_jvp_cpu.h states the formula. With
// the forward's lse saved, p_ij = exp(scale q_i . k_j - lse_i) is known without a max pass, so the tangent
// is one pass over each query's keys (its kh x kw window, then the conditioners it may see):
//   t_ij = scale (dq_i . k_j + q_i . dk_j),   mu_i += p_ij t_ij,   acc_i += p_ij t_ij v_j + p_ij dv_j,
//   dout_i = acc_i - mu_i out_i            (sum_j p_ij (t_ij - mu_i) v_j = acc - mu * sum_j p_ij v_j).
//
// Plain loops over the contiguous head dim D, which the compiler vectorizes at any -march (omp simd
// reductions; the extension is built with -fopenmp and -ffp-contract=off, see fastcomp/_build.py). OpenMP
// over (b, head, image row) tasks; each task writes its own rows of dout, so there are no races.
// This kernel serves torch.func.jvp / forward-mode probes, where the tangents (not the primal) carry the
// batch of probes: it favours simplicity over the forward kernel's transposed-row blocking.
#include "attention_jvp_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastcomp {
namespace {

inline int64_t window_start(int64_t i, int64_t k, int64_t n) {
  return std::min(std::max<int64_t>(i - k / 2, 0), n - k);
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t D) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
inline void axpy(T w, const T* __restrict x, T* __restrict acc, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += w * x[d];
}

// Pointers of one problem; a null tangent is zero.
template <typename T>
struct JvpArgs {
  const T *q, *k, *v, *ck, *cv, *out, *lse, *dq, *dk, *dv, *dck, *dcv;
  const bool* mask;  // [B, M, H, W] or null (every pixel sees every conditioner)
  T* dout;
  int64_t B, H, W, NH, D, M, kh, kw;
  T scale;
};

// One key (image or conditioner) of query (q_i, dq_i): folds it into mu and acc.
template <typename T>
inline void fold_key(const JvpArgs<T>& a, const T* qi, const T* dqi, T lse_i, const T* kj, const T* vj,
                     const T* dkj, const T* dvj, T& mu, T* acc) {
  const int64_t D = a.D;
  const T p = std::exp(a.scale * dot(qi, kj, D) - lse_i);
  T t = 0;
  if (dqi != nullptr) t += dot(dqi, kj, D);
  if (dkj != nullptr) t += dot(qi, dkj, D);
  const T pt = p * a.scale * t;
  mu += pt;
  if (pt != T(0)) axpy(pt, vj, acc, D);
  if (dvj != nullptr) axpy(p, dvj, acc, D);
}

template <typename T>
void jvp_impl(const JvpArgs<T>& a) {
  const int64_t pix = a.NH * a.D;  // stride between pixels of the heads-last tensors
  const int64_t tasks = a.B * a.NH * a.H;
  const int64_t work = tasks * a.W * (a.kh * a.kw + a.M) * a.D;
  const int threads = work < (int64_t{1} << 17) ? 1 : std::max(1, std::min<int>(at::get_num_threads(), tasks));
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(a.D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (a.NH * a.H), h = (task / a.H) % a.NH, i = task % a.H;
      const int64_t r0 = window_start(i, a.kh, a.H);
      for (int64_t j = 0; j < a.W; ++j) {
        const int64_t o_q = ((b * a.H + i) * a.W + j) * pix + h * a.D;
        const T* qi = a.q + o_q;
        const T* dqi = a.dq == nullptr ? nullptr : a.dq + o_q;
        const T lse_i = a.lse[((b * a.NH + h) * a.H + i) * a.W + j];
        std::fill(acc.begin(), acc.end(), T(0));
        T mu = 0;
        const int64_t c0 = window_start(j, a.kw, a.W);
        for (int64_t r = r0; r < r0 + a.kh; ++r) {
          for (int64_t c = c0; c < c0 + a.kw; ++c) {
            const int64_t o_k = ((b * a.H + r) * a.W + c) * pix + h * a.D;
            fold_key(a, qi, dqi, lse_i, a.k + o_k, a.v + o_k, a.dk == nullptr ? nullptr : a.dk + o_k,
                     a.dv == nullptr ? nullptr : a.dv + o_k, mu, acc.data());
          }
        }
        for (int64_t m = 0; m < a.M; ++m) {
          if (a.mask != nullptr && !a.mask[((b * a.M + m) * a.H + i) * a.W + j]) continue;
          const int64_t o_c = ((b * a.M + m) * a.NH + h) * a.D;
          fold_key(a, qi, dqi, lse_i, a.ck + o_c, a.cv + o_c, a.dck == nullptr ? nullptr : a.dck + o_c,
                   a.dcv == nullptr ? nullptr : a.dcv + o_c, mu, acc.data());
        }
        const T* oi = a.out + o_q;
        T* di = a.dout + o_q;
#pragma omp simd
        for (int64_t d = 0; d < a.D; ++d) di[d] = acc[d] - mu * oi[d];
      }
    }
  }
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& q, at::IntArrayRef shape) {
  FASTCOMP_CHECK(t.device().is_cpu(), "local_attention_jvp_cpu: ", name, " must be a CPU tensor, got ",
                 t.device().str());
  FASTCOMP_CHECK(t.scalar_type() == q.scalar_type(), "local_attention_jvp_cpu: ", name, " must have q's dtype ",
                 q.scalar_type(), ", got ", t.scalar_type());
  FASTCOMP_CHECK(t.is_contiguous(), "local_attention_jvp_cpu: ", name, " must be contiguous");
  FASTCOMP_CHECK(t.sizes() == shape, "local_attention_jvp_cpu: ", name, " must have shape ", shape, ", got ",
                 t.sizes());
}

// An empty tensor is a zero tangent (nullptr); otherwise it must match `shape`.
template <typename T>
const T* tangent(const at::Tensor& t, const char* name, const at::Tensor& q, at::IntArrayRef shape) {
  if (t.numel() == 0 && t.dim() == 1) return nullptr;
  check_like(t, name, q, shape);
  return t.numel() == 0 ? nullptr : t.data_ptr<T>();
}

}  // namespace

void local_attention_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cond_k,
                             const at::Tensor& cond_v, const at::Tensor& cond_mask, const at::Tensor& out,
                             const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                             const at::Tensor& dcond_k, const at::Tensor& dcond_v, int64_t kh, int64_t kw,
                             double scale, at::Tensor& dout) {
  FASTCOMP_CHECK(q.dim() == 5, "local_attention_jvp_cpu: q must be [B, H, W, heads, D], got ", q.sizes());
  FASTCOMP_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                 "local_attention_jvp_cpu: q must be float32 or float64, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), W = q.size(2), NH = q.size(3), D = q.size(4);
  check_like(k, "k", q, q.sizes());
  check_like(v, "v", q, q.sizes());
  check_like(out, "out", q, q.sizes());
  check_like(dout, "dout", q, q.sizes());
  check_like(lse, "lse", q, {B, NH, H, W});
  FASTCOMP_CHECK(kh >= 1 && kh % 2 == 1 && kh <= H, "local_attention_jvp_cpu: kh must be odd and in [1, H], got ", kh);
  FASTCOMP_CHECK(kw >= 1 && kw % 2 == 1 && kw <= W, "local_attention_jvp_cpu: kw must be odd and in [1, W], got ", kw);
  FASTCOMP_CHECK(cond_k.dim() == 4, "local_attention_jvp_cpu: cond_k must be [B, M, heads, D], got ", cond_k.sizes());
  const int64_t M = cond_k.size(1);
  const std::vector<int64_t> cshape{B, M, NH, D};
  check_like(cond_k, "cond_k", q, cshape);
  check_like(cond_v, "cond_v", q, cshape);
  const bool* mask = nullptr;
  if (cond_mask.numel() > 0 || cond_mask.dim() == 4) {
    FASTCOMP_CHECK(cond_mask.scalar_type() == at::kBool && cond_mask.is_contiguous() && cond_mask.device().is_cpu(),
                   "local_attention_jvp_cpu: cond_mask must be a contiguous bool CPU tensor");
    FASTCOMP_CHECK(cond_mask.sizes() == at::IntArrayRef({B, M, H, W}),
                   "local_attention_jvp_cpu: cond_mask must be [B, M, H, W], got ", cond_mask.sizes());
    mask = cond_mask.data_ptr<bool>();
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_jvp_cpu", [&] {
    using T = scalar_t;
    JvpArgs<T> a{q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                 M ? cond_k.data_ptr<T>() : nullptr, M ? cond_v.data_ptr<T>() : nullptr,
                 out.data_ptr<T>(), lse.data_ptr<T>(),
                 tangent<T>(dq, "dq", q, q.sizes()), tangent<T>(dk, "dk", q, q.sizes()),
                 tangent<T>(dv, "dv", q, q.sizes()),
                 M ? tangent<T>(dcond_k, "dcond_k", q, cshape) : nullptr,
                 M ? tangent<T>(dcond_v, "dcond_v", q, cshape) : nullptr,
                 mask, dout.data_ptr<T>(), B, H, W, NH, D, M, kh, kw, static_cast<T>(scale)};
    jvp_impl<T>(a);
  });
}

}  // namespace fastcomp
