// Fused PGD step, CUDA core: launcher declarations. Torch-free: only CUDA runtime headers, so the
// .cu compiles with nvcc alone (`nvcc -arch=sm_90 -c csrc/kernels/pgd.cu -I csrc`).
//
//   x_adv <- clamp(clamp(x_adv + step * sign(grad), x_clean - eps, x_clean + eps), lower, upper)
//
// elementwise over n elements of dense storage, in float32 opmath, one round-to-nearest-even to
// the storage dtype; sign(+-0) = 0; NaN in any input gives NaN (same contract as pgd_cpu.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cbd_fast {
namespace kernels {

// Storage dtypes served by the CUDA core.
enum class PgdDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Launches the step on `stream`. x_adv is updated in place; grad and x_clean are read-only and
// must not partially overlap x_adv. The scalars are float32 (rounded by the caller). Uses 16-byte
// vector loads when all three pointers are 16-byte aligned, a scalar kernel otherwise.
// Returns the launch status (cudaSuccess, or the error of the launch; n == 0 launches nothing).
cudaError_t pgd_step_cuda_launch(PgdDtype dtype, void* x_adv, const void* grad, const void* x_clean,
                                 int64_t n, float step, float eps, float lower, float upper,
                                 cudaStream_t stream);

}  // namespace kernels
}  // namespace cbd_fast
