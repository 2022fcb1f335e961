// CPU implementation of cbd_fast::pgd_step_ (schema in ops.cpp): checks, dtype dispatch, and a
// parallel loop over chunks of the flat storage calling the torch-free core in kernels/pgd_cpu.h.
// The Python wrapper (cbd_fast/ops/pgd.py) validates first with friendlier messages; the checks
// here are the second line for direct torch.ops callers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "kernels/pgd_cpu.h"

namespace {

namespace k = cbd_fast::kernels;

// Elements per task: large enough to amortise the task start, small enough to split 4M elements.
constexpr int64_t kGrain = 1 << 15;

template <typename T>
void run(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_clean, double step,
         double eps, double lower, double upper) {
  using C = typename k::ComputeOf<T>::type;
  T* xa = reinterpret_cast<T*>(x_adv.data_ptr());
  const T* g = reinterpret_cast<const T*>(grad.data_ptr());
  const T* xc = reinterpret_cast<const T*>(x_clean.data_ptr());
  // Scalars rounded once to the compute type, as the PyTorch reference does.
  const C s = static_cast<C>(step), e = static_cast<C>(eps);
  const C lo = static_cast<C>(lower), hi = static_cast<C>(upper);
  at::parallel_for(0, x_adv.numel(), kGrain, [&](int64_t begin, int64_t end) {
    k::pgd_step_range<T>(xa, g, xc, begin, end, s, e, lo, hi);
  });
}

// Same strides on every dimension of size > 1 (size-1 dims do not affect the layout).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

}  // namespace

namespace cbd_fast {

void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_clean,
                         double step_size, double epsilon, double lower, double upper) {
  const auto dt = x_adv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "pgd_step_: x_adv must be float32, bfloat16, float16 or float64; got ", dt);
  TORCH_CHECK(grad.scalar_type() == dt, "pgd_step_: grad dtype ", grad.scalar_type(),
              " differs from x_adv dtype ", dt);
  TORCH_CHECK(x_clean.scalar_type() == dt, "pgd_step_: x_clean dtype ", x_clean.scalar_type(),
              " differs from x_adv dtype ", dt);
  TORCH_CHECK(grad.sizes() == x_adv.sizes(), "pgd_step_: grad shape ", grad.sizes(),
              " differs from x_adv shape ", x_adv.sizes());
  TORCH_CHECK(x_clean.sizes() == x_adv.sizes(), "pgd_step_: x_clean shape ", x_clean.sizes(),
              " differs from x_adv shape ", x_adv.sizes());
  TORCH_CHECK(grad.device() == x_adv.device(), "pgd_step_: grad is on ", grad.device(),
              " but x_adv is on ", x_adv.device());
  TORCH_CHECK(x_clean.device() == x_adv.device(), "pgd_step_: x_clean is on ", x_clean.device(),
              " but x_adv is on ", x_adv.device());
  TORCH_CHECK(x_adv.is_non_overlapping_and_dense(),
              "pgd_step_: x_adv must be dense and non-overlapping (contiguous or channels_last); "
              "got strides ", x_adv.strides());
  TORCH_CHECK(same_layout(grad, x_adv), "pgd_step_: grad strides ", grad.strides(),
              " differ from x_adv strides ", x_adv.strides());
  TORCH_CHECK(same_layout(x_clean, x_adv), "pgd_step_: x_clean strides ", x_clean.strides(),
              " differ from x_adv strides ", x_adv.strides());
  TORCH_CHECK(std::isfinite(step_size) && step_size >= 0.0,
              "pgd_step_: step_size must be finite and >= 0; got ", step_size);
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0.0,
              "pgd_step_: epsilon must be finite and >= 0; got ", epsilon);
  TORCH_CHECK(std::isfinite(lower) && std::isfinite(upper) && lower <= upper,
              "pgd_step_: lower and upper must be finite with lower <= upper; got lower=", lower,
              ", upper=", upper);
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_clean,
                  double step_size, double epsilon, double lower, double upper) {
  TORCH_CHECK(x_adv.device().is_cpu(), "pgd_step_ (CPU kernel): x_adv is on ", x_adv.device());
  check_pgd_step_args(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
  if (x_adv.numel() == 0) return;
  switch (x_adv.scalar_type()) {
    case at::kFloat:
      run<float>(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
      break;
    case at::kDouble:
      run<double>(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
      break;
    case at::kBFloat16:
      run<k::Bf16Bits>(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
      break;
    case at::kHalf:
      run<k::HalfBits>(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
      break;
    default:
      TORCH_CHECK(false, "pgd_step_: unsupported dtype ", x_adv.scalar_type());
  }
}

}  // namespace cbd_fast

TORCH_LIBRARY_IMPL(cbd_fast, CPU, m) { m.impl("pgd_step_", &cbd_fast::pgd_step_cpu); }
