// CUDA implementation of cbd_fast::pgd_step_ (schema in ops.cpp): checks, then the torch-free
// launcher in kernels/pgd.cu on the current stream of x_adv's device. Compiled in CUDA builds only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/pgd_cuda.h"

namespace cbd_fast {

// Defined in pgd_cpu.cpp (always compiled): the shared argument checks.
void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_clean,
                         double step_size, double epsilon, double lower, double upper);

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_clean,
                   double step_size, double epsilon, double lower, double upper) {
  TORCH_CHECK(x_adv.is_cuda(), "pgd_step_ (CUDA kernel): x_adv is on ", x_adv.device());
  check_pgd_step_args(x_adv, grad, x_clean, step_size, epsilon, lower, upper);
  kernels::PgdDtype dtype;
  switch (x_adv.scalar_type()) {
    case at::kFloat:
      dtype = kernels::PgdDtype::kFloat32;
      break;
    case at::kBFloat16:
      dtype = kernels::PgdDtype::kBFloat16;
      break;
    case at::kHalf:
      dtype = kernels::PgdDtype::kFloat16;
      break;
    default:
      TORCH_CHECK(false, "pgd_step_ (CUDA kernel): x_adv must be float32, bfloat16 or float16; got ",
                  x_adv.scalar_type(), " (float64 runs on the torch backend)");
  }
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_adv.device().index()).stream();
  const cudaError_t err = kernels::pgd_step_cuda_launch(
      dtype, x_adv.data_ptr(), grad.data_ptr(), x_clean.data_ptr(), x_adv.numel(),
      static_cast<float>(step_size), static_cast<float>(epsilon), static_cast<float>(lower),
      static_cast<float>(upper), stream);
  TORCH_CHECK(err == cudaSuccess, "pgd_step_ (CUDA kernel): launch failed: ", cudaGetErrorString(err));
}

}  // namespace cbd_fast

TORCH_LIBRARY_IMPL(cbd_fast, CUDA, m) { m.impl("pgd_step_", &cbd_fast::pgd_step_cuda); }
