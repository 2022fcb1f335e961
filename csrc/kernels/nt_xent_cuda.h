// NT-Xent on CUDA: launcher declarations of the torch-free core (csrc/kernels/nt_xent.cu).
// Only CUDA runtime headers, so the .cu compiles with nvcc alone
// (`nvcc -arch=sm_90 -c csrc/kernels/nt_xent.cu -I csrc`).
//
// Same algorithm and contract as csrc/kernels/nt_xent_cpu.h: inputs are the L2-normalised views
// za, zb [n, d] (contiguous, float32/bfloat16/float16); row i of u = [za; zb] is za[i] for i < n,
// zb[i - n] otherwise; s_ij = inv_temp <u_i, u_j>, accumulated in float32.
//   forward:  lse_i = log sum_{j != i} exp(s_ij), term_i = lse_i - s_{i,p(i)}  (loss = mean(term))
//   backward: dL/du_k = grad inv_temp / (2n) (sum_{j != k} (exp(s_kj - lse_k) + exp(s_kj - lse_j)) u_j
//             - 2 u_{p(k)}) for the rows k in [row_start, row_end) only.
// Nothing of size O(n^2) is stored. A NaN input gives NaN outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cbd_fast {
namespace kernels {

// Storage dtypes served by the CUDA core.
enum class NtXentDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Forward on `stream`: writes lse [2n] and term [2n] (float32). Returns the launch status.
cudaError_t nt_xent_fwd_cuda_launch(NtXentDtype dtype, const void* za, const void* zb, int64_t n, int64_t d,
                                    float inv_temp, float* lse, float* term, cudaStream_t stream);

// Backward on `stream` for rows [row_start, row_end) of u (0 <= row_start < row_end <= 2n).
// grad: device pointer to the loss's incoming gradient (one float32, read on the device: no sync).
// workspace: float32 [row_end - row_start, d], zero-filled by the caller. Rows k < n are written
// to ga[k] and rows k >= n to gb[k - n] (in the input dtype); a side outside the range may be null.
cudaError_t nt_xent_bwd_cuda_launch(NtXentDtype dtype, const void* za, const void* zb, int64_t n, int64_t d,
                                    float inv_temp, const float* lse, const float* grad, int64_t row_start,
                                    int64_t row_end, float* workspace, void* ga, void* gb,
                                    cudaStream_t stream);

}  // namespace kernels
}  // namespace cbd_fast
