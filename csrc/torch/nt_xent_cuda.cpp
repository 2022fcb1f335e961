// CUDA glue of the NT-Xent op (schemas in ops.cpp): checks, then the torch-free launchers of
// csrc/kernels/nt_xent.cu on the current stream of za's device. Compiled in CUDA builds only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/nt_xent_cuda.h"

namespace cbd_fast {

// Defined in nt_xent_cpu.cpp (always compiled): shape, dtype and scalar checks.
void check_nt_xent_views(const at::Tensor& za, const at::Tensor& zb, double inv_temp);

namespace {

kernels::NtXentDtype cuda_dtype(const at::Tensor& za) {
  switch (za.scalar_type()) {
    case at::kFloat: return kernels::NtXentDtype::kFloat32;
    case at::kBFloat16: return kernels::NtXentDtype::kBFloat16;
    case at::kHalf: return kernels::NtXentDtype::kFloat16;
    default:
      TORCH_CHECK(false, "nt_xent (CUDA kernel): za must be float32, bfloat16 or float16; got ", za.scalar_type(),
                  " (float64 runs on the cpp or torch backend)");
  }
}

void check_cuda(const at::Tensor& za, const at::Tensor& zb, double inv_temp) {
  check_nt_xent_views(za, zb, inv_temp);
  TORCH_CHECK(za.is_cuda(), "nt_xent (CUDA kernel): za and zb must be CUDA tensors; got ", za.device());
}

std::tuple<at::Tensor, at::Tensor> nt_xent_fwd_cuda(const at::Tensor& za_in, const at::Tensor& zb_in,
                                                    double inv_temp) {
  check_cuda(za_in, zb_in, inv_temp);
  const auto dtype = cuda_dtype(za_in);
  const at::Tensor za = za_in.contiguous(), zb = zb_in.contiguous();
  const int64_t n = za.size(0), d = za.size(1);
  const c10::cuda::CUDAGuard guard(za.device());
  const auto opts = za.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({2 * n}, opts), term = at::empty({2 * n}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(za.device().index()).stream();
  const cudaError_t err = kernels::nt_xent_fwd_cuda_launch(dtype, za.data_ptr(), zb.data_ptr(), n, d,
                                                           static_cast<float>(inv_temp), lse.data_ptr<float>(),
                                                           term.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "nt_xent_fwd (CUDA kernel): launch failed: ", cudaGetErrorString(err));
  // (3) loss = mean of the 2n row terms, summed in float64
  at::Tensor loss = term.sum(at::kDouble).div_(static_cast<double>(2 * n)).to(at::kFloat);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> nt_xent_bwd_cuda(const at::Tensor& grad, const at::Tensor& za_in,
                                                    const at::Tensor& zb_in, const at::Tensor& lse_in,
                                                    double inv_temp, bool need_a, bool need_b) {
  check_cuda(za_in, zb_in, inv_temp);
  const auto dtype = cuda_dtype(za_in);
  const int64_t n = za_in.size(0), d = za_in.size(1);
  TORCH_CHECK(grad.numel() == 1, "nt_xent_bwd: grad must hold one element (the loss's gradient); got shape ",
              grad.sizes());
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == 2 * n, "nt_xent_bwd: lse must have shape [", 2 * n,
              "] (2N); got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(za_in.device());
  const at::Tensor za = za_in.contiguous(), zb = zb_in.contiguous();
  const at::Tensor lse = lse_in.to(za.device(), at::kFloat).contiguous();
  const at::Tensor g = grad.reshape({1}).to(za.device(), at::kFloat).contiguous();
  at::Tensor ga = need_a ? at::empty_like(za) : at::empty({0}, za.options());
  at::Tensor gb = need_b ? at::empty_like(zb) : at::empty({0}, zb.options());
  if (!(need_a || need_b)) return {ga, gb};
  const int64_t row_start = need_a ? 0 : n, row_end = need_b ? 2 * n : n;  // needed side(s) only
  at::Tensor ws = at::zeros({row_end - row_start, d}, za.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(za.device().index()).stream();
  const cudaError_t err = kernels::nt_xent_bwd_cuda_launch(
      dtype, za.data_ptr(), zb.data_ptr(), n, d, static_cast<float>(inv_temp), lse.data_ptr<float>(),
      g.data_ptr<float>(), row_start, row_end, ws.data_ptr<float>(), need_a ? ga.data_ptr() : nullptr,
      need_b ? gb.data_ptr() : nullptr, stream);
  TORCH_CHECK(err == cudaSuccess, "nt_xent_bwd (CUDA kernel): launch failed: ", cudaGetErrorString(err));
  return {ga, gb};
}

}  // namespace
}  // namespace cbd_fast

TORCH_LIBRARY_IMPL(cbd_fast, CUDA, m) {
  m.impl("nt_xent_fwd", &cbd_fast::nt_xent_fwd_cuda);
  m.impl("nt_xent_bwd", &cbd_fast::nt_xent_bwd_cuda);
}
