// CPU glue of the NT-Xent op: input checks, dtype handling and threading around the torch-free
// core in csrc/kernels/nt_xent_cpu.h. Registers cbd_fast::nt_xent_fwd / nt_xent_bwd for CPU.
//
// float32 and float64 run natively; bfloat16/float16 inputs are converted to float32 once (O(n d)
// extra memory) and the gradients converted back. Rows of u = [za; zb] are split over threads with
// at::parallel_for; each thread runs the core on its own row range (no shared writes).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "kernels/nt_xent_cpu.h"

namespace cbd_fast {

// Shared with nt_xent_cuda.cpp: shape/dtype/scalar checks of the normalised views (any device).
void check_nt_xent_views(const at::Tensor& za, const at::Tensor& zb, double inv_temp) {
  TORCH_CHECK(za.dim() == 2, "nt_xent: za must be 2-D [N, D]; got ", za.dim(), "-D shape ", za.sizes());
  TORCH_CHECK(zb.sizes() == za.sizes(), "nt_xent: zb must have za's shape ", za.sizes(), "; got ",
              zb.sizes());
  TORCH_CHECK(za.size(0) >= 1 && za.size(1) >= 1, "nt_xent: za must have N >= 1 rows and D >= 1 columns; got ",
              za.sizes());
  TORCH_CHECK(zb.scalar_type() == za.scalar_type(), "nt_xent: zb must have za's dtype ", za.scalar_type(),
              "; got ", zb.scalar_type());
  const auto dt = za.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "nt_xent: za must be float32, float64, bfloat16 or float16; got ", dt);
  TORCH_CHECK(zb.device() == za.device(), "nt_xent: zb must be on za's device ", za.device(), "; got ",
              zb.device());
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, "nt_xent: inv_temp must be finite and > 0; got ",
              inv_temp);
}

}  // namespace cbd_fast

namespace {

namespace ntx = cbd_fast::nt_xent_cpu;

void check_views(const at::Tensor& za, const at::Tensor& zb, double inv_temp) {
  cbd_fast::check_nt_xent_views(za, zb, inv_temp);
  TORCH_CHECK(za.device().is_cpu(), "nt_xent (CPU kernel): za and zb must be CPU tensors; got ", za.device());
}

// The compute dtype: float64 stays float64, everything else runs in float32.
at::Tensor to_compute(const at::Tensor& z) {
  const auto ct = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return z.to(ct).contiguous();
}

// Calls fn(r0, r1) over [begin, end) in parallel chunks of whole blocks.
template <typename Fn>
void parallel_rows(int64_t begin, int64_t end, const Fn& fn) {
  if (end <= begin) return;
  at::parallel_for(begin, end, ntx::kBlockRows, fn);
}

std::tuple<at::Tensor, at::Tensor> nt_xent_fwd_cpu(const at::Tensor& za_in, const at::Tensor& zb_in,
                                                   double inv_temp) {
  check_views(za_in, zb_in, inv_temp);
  const at::Tensor za = to_compute(za_in), zb = to_compute(zb_in);
  const int64_t n = za.size(0), d = za.size(1);
  at::Tensor lse = at::empty({2 * n}, za.options());
  at::Tensor term = at::empty({2 * n}, za.options());
  if (za.scalar_type() == at::kDouble) {
    const double *pa = za.data_ptr<double>(), *pb = zb.data_ptr<double>();
    double *pl = lse.data_ptr<double>(), *pt = term.data_ptr<double>();
    parallel_rows(0, 2 * n, [&](int64_t r0, int64_t r1) { ntx::fwd_rows(pa, pb, n, d, inv_temp, r0, r1, pl, pt); });
  } else {
    const float *pa = za.data_ptr<float>(), *pb = zb.data_ptr<float>();
    float *pl = lse.data_ptr<float>(), *pt = term.data_ptr<float>();
    const float it = static_cast<float>(inv_temp);
    parallel_rows(0, 2 * n, [&](int64_t r0, int64_t r1) { ntx::fwd_rows(pa, pb, n, d, it, r0, r1, pl, pt); });
  }
  // (3) loss = mean of the 2n row terms, summed in float64
  at::Tensor loss = term.sum(at::kDouble).div_(static_cast<double>(2 * n)).to(za.scalar_type());
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> nt_xent_bwd_cpu(const at::Tensor& grad, const at::Tensor& za_in,
                                                   const at::Tensor& zb_in, const at::Tensor& lse_in,
                                                   double inv_temp, bool need_a, bool need_b) {
  check_views(za_in, zb_in, inv_temp);
  const int64_t n = za_in.size(0), d = za_in.size(1);
  TORCH_CHECK(grad.numel() == 1, "nt_xent_bwd: grad must hold one element (the loss's gradient); got shape ",
              grad.sizes());
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == 2 * n, "nt_xent_bwd: lse must have shape [", 2 * n,
              "] (2N); got ", lse_in.sizes());
  const at::Tensor za = to_compute(za_in), zb = to_compute(zb_in);
  const at::Tensor lse = lse_in.to(za.scalar_type()).contiguous();
  const double g = grad.to(at::kDouble).item<double>();
  const double coef = g * inv_temp / static_cast<double>(2 * n);
  at::Tensor ga = need_a ? at::empty_like(za) : at::empty({0}, za_in.options());
  at::Tensor gb = need_b ? at::empty_like(zb) : at::empty({0}, za_in.options());
  const int64_t begin = need_a ? 0 : n, end = need_b ? 2 * n : n;  // rows of the needed side(s) only
  if (need_a || need_b) {
    if (za.scalar_type() == at::kDouble) {
      const double *pa = za.data_ptr<double>(), *pb = zb.data_ptr<double>(), *pl = lse.data_ptr<double>();
      double* oa = need_a ? ga.data_ptr<double>() : nullptr;
      double* ob = need_b ? gb.data_ptr<double>() : nullptr;
      parallel_rows(begin, end, [&](int64_t r0, int64_t r1) {
        ntx::bwd_rows(pa, pb, n, d, inv_temp, pl, coef, r0, r1, oa, ob);
      });
    } else {
      const float *pa = za.data_ptr<float>(), *pb = zb.data_ptr<float>(), *pl = lse.data_ptr<float>();
      float* oa = need_a ? ga.data_ptr<float>() : nullptr;
      float* ob = need_b ? gb.data_ptr<float>() : nullptr;
      const float it = static_cast<float>(inv_temp), cf = static_cast<float>(coef);
      parallel_rows(begin, end, [&](int64_t r0, int64_t r1) { ntx::bwd_rows(pa, pb, n, d, it, pl, cf, r0, r1, oa, ob); });
    }
  }
  if (need_a) ga = ga.to(za_in.scalar_type());
  if (need_b) gb = gb.to(za_in.scalar_type());
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbd_fast, CPU, m) {
  m.impl("nt_xent_fwd", &nt_xent_fwd_cpu);
  m.impl("nt_xent_bwd", &nt_xent_bwd_cpu);
}
