// NT-Xent on CUDA: the torch-free core (declarations and contract in nt_xent_cuda.h).
//
// Correctness over cleverness: 64 x 64 score tiles built from 32-wide feature chunks staged in
// shared memory as float32, 256 threads per block, each thread owning a 4 x 4 register tile
// (rows ty + 16 i, columns tx + 16 j). The math, numbered as in the CPU core:
//   (1) s_ij = inv_temp * <u_i, u_j>                                     (score tile)
//   (2) lse_i = log sum_{j != i} exp(s_ij): running max m_i and sum l_i per row, reduced over the
//       16 lanes that share a row with warp shuffles (flash-style; no 2n x 2n buffer)
//   (3) term_i = lse_i - s_{i,p(i)}
//   (4) dL/du_k = grad * inv_temp / (2n) * (sum_{j != k} W_kj u_j - 2 u_{p(k)}),
//       W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j): per column tile, W goes to shared memory and
//       W @ u_J is added to a float32 workspace row block that only this thread block touches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/nt_xent_cuda.h"

namespace cbd_fast {
namespace kernels {
namespace {

constexpr int kBM = 64;       // rows of u per block
constexpr int kBN = 64;       // columns per score tile
constexpr int kBK = 32;       // features per shared-memory chunk
constexpr int kBD = 64;       // gradient features per W @ U chunk
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPad = kBM + 1; // shared-memory row stride (no bank conflicts)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Element k of row `row` of u = [za; zb]; 0 outside [0, 2n) x [0, d).
template <typename T>
__device__ __forceinline__ float load_u(const T* za, const T* zb, int64_t n, int64_t d, int64_t row, int64_t k) {
  if (row < 0 || row >= 2 * n || k >= d) return 0.0f;
  return row < n ? to_float(za[row * d + k]) : to_float(zb[(row - n) * d + k]);
}

__device__ __forceinline__ float reduce16_max(float v) {
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float reduce16_sum(float v) {
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// (1) s[i][j] = inv_temp <u_{row0 + ty + 16 i}, u_{col0 + tx + 16 j}> for this thread's 4 x 4 tile.
// sa, sb: shared [kBK][kPad] staging buffers. Ends with a __syncthreads.
template <typename T>
__device__ __forceinline__ void score_tile(const T* za, const T* zb, int64_t n, int64_t d, float inv_temp,
                                           int64_t row0, int64_t col0, float* sa, float* sb, float s[4][4]) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK, k = e % kBK;
      sa[k * kPad + r] = load_u(za, zb, n, d, row0 + r, k0 + k);
      sb[k * kPad + r] = load_u(za, zb, n, d, col0 + r, k0 + k);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      float a[4], b[4];
      for (int i = 0; i < 4; ++i) a[i] = sa[k * kPad + ty + 16 * i];
      for (int j = 0; j < 4; ++j) b[j] = sb[k * kPad + tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(a[i], b[j], s[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) s[i][j] *= inv_temp;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nt_xent_fwd_kernel(const T* __restrict__ za, const T* __restrict__ zb,
                                                               int64_t n, int64_t d, float inv_temp,
                                                               float* __restrict__ lse, float* __restrict__ term) {
  __shared__ float sa[kBK * kPad];
  __shared__ float sb[kBK * kPad];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const float neg_inf = -INFINITY;
  float m[4], l[4];
  bool nan_seen[4];
  for (int i = 0; i < 4; ++i) {
    m[i] = neg_inf;
    l[i] = 0.0f;
    nan_seen[i] = false;
  }
  float s[4][4];
  for (int64_t col0 = 0; col0 < 2 * n; col0 += kBN) {
    score_tile(za, zb, n, d, inv_temp, row0, col0, sa, sb, s);
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + ty + 16 * i;
      // (2) mask j == i and j >= 2n, then the running log-sum-exp
      float tmax = neg_inf;
      bool nan_here = false;
      for (int j = 0; j < 4; ++j) {
        const int64_t col = col0 + tx + 16 * j;
        if (col >= 2 * n || col == row) s[i][j] = neg_inf;
        nan_here = nan_here || (s[i][j] != s[i][j]);
        tmax = fmaxf(tmax, s[i][j]);
      }
      tmax = reduce16_max(tmax);
      nan_seen[i] = nan_seen[i] || nan_here;
      const float m_new = fmaxf(m[i], tmax);
      float part = 0.0f;
      if (m_new != neg_inf)
        for (int j = 0; j < 4; ++j) part += s[i][j] == neg_inf ? 0.0f : __expf(s[i][j] - m_new);
      part = reduce16_sum(part);
      if (m_new != neg_inf) {
        const float alpha = m[i] == neg_inf ? 0.0f : __expf(m[i] - m_new);
        l[i] = l[i] * alpha + part;
        m[i] = m_new;
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    // a NaN seen by any of the 16 lanes of this row poisons the row
    const float any_nan = reduce16_max(nan_seen[i] ? 1.0f : 0.0f);
    // (3) the positive pair's score, the dot product split over the 16 lanes
    const int64_t partner = row < n ? row + n : row - n;
    float pos = 0.0f;
    for (int64_t k = tx; k < d; k += 16) pos += load_u(za, zb, n, d, row, k) * load_u(za, zb, n, d, partner, k);
    pos = reduce16_sum(pos) * inv_temp;
    if (tx == 0 && row < 2 * n) {
      const float v = any_nan > 0.0f ? NAN : m[i] + logf(l[i]);
      lse[row] = v;
      term[row] = v - pos;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nt_xent_bwd_kernel(const T* __restrict__ za, const T* __restrict__ zb, int64_t n, int64_t d, float inv_temp,
                       const float* __restrict__ lse, const float* __restrict__ grad, int64_t row_start,
                       int64_t row_end, float* __restrict__ ws, T* __restrict__ ga, T* __restrict__ gb) {
  __shared__ float sab[2 * kBK * kPad];  // score staging; reused as the u_J chunk [kBN][kPad]
  __shared__ float sw[kBM * kPad];       // W tile [kBM][kPad]
  float* sa = sab;
  float* sb = sab + kBK * kPad;
  float* su = sab;
  static_assert(2 * kBK * kPad >= kBN * kPad, "the u_J chunk must fit in the staging buffers");
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row0 = row_start + static_cast<int64_t>(blockIdx.x) * kBM;
  float lse_k[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    lse_k[i] = row < row_end ? lse[row] : 0.0f;
  }
  float s[4][4];
  for (int64_t col0 = 0; col0 < 2 * n; col0 += kBN) {
    score_tile(za, zb, n, d, inv_temp, row0, col0, sa, sb, s);  // (1) recomputed
    // (4) W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j); 0 on the diagonal and outside the matrix
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      const float lse_j = col < 2 * n ? lse[col] : 0.0f;
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + ty + 16 * i;
        const bool keep = row < row_end && col < 2 * n && col != row;
        sw[(ty + 16 * i) * kPad + tx + 16 * j] = keep ? __expf(s[i][j] - lse_k[i]) + __expf(s[i][j] - lse_j) : 0.0f;
      }
    }
    // workspace[rows, x] += W @ u_J[:, x], one kBD-feature chunk at a time
    for (int64_t x0 = 0; x0 < d; x0 += kBD) {
      for (int e = tid; e < kBN * kBD; e += kThreads) {
        const int c = e / kBD, x = e % kBD;
        su[c * kPad + x] = load_u(za, zb, n, d, col0 + c, x0 + x);
      }
      __syncthreads();  // also publishes sw on the first chunk
      float acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
#pragma unroll 8
      for (int c = 0; c < kBN; ++c) {
        float w[4], u[4];
        for (int i = 0; i < 4; ++i) w[i] = sw[(ty + 16 * i) * kPad + c];
        for (int j = 0; j < 4; ++j) u[j] = su[c * kPad + tx + 16 * j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(w[i], u[j], acc[i][j]);
      }
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + ty + 16 * i;
        if (row >= row_end) continue;
        for (int j = 0; j < 4; ++j) {
          const int64_t x = x0 + tx + 16 * j;
          if (x < d) ws[(row - row_start) * d + x] += acc[i][j];  // only this thread owns (row, x)
        }
      }
      __syncthreads();  // su is overwritten next
    }
  }
  // out_k = coef * (workspace_k - 2 u_{p(k)}), in the input dtype
  const float coef = grad[0] * inv_temp / static_cast<float>(2 * n);
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= row_end) continue;
    const int64_t partner = row < n ? row + n : row - n;
    T* out = row < n ? ga + row * d : gb + (row - n) * d;
    for (int64_t x = tx; x < d; x += 16) {
      const float v = coef * (ws[(row - row_start) * d + x] - 2.0f * load_u(za, zb, n, d, partner, x));
      out[x] = from_float<T>(v);
    }
  }
}

template <typename T>
cudaError_t launch_fwd(const void* za, const void* zb, int64_t n, int64_t d, float inv_temp, float* lse,
                       float* term, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((2 * n + kBM - 1) / kBM));
  nt_xent_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(za), static_cast<const T*>(zb), n, d,
                                                       inv_temp, lse, term);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* za, const void* zb, int64_t n, int64_t d, float inv_temp, const float* lse,
                       const float* grad, int64_t row_start, int64_t row_end, float* ws, void* ga, void* gb,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((row_end - row_start + kBM - 1) / kBM));
  nt_xent_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(za), static_cast<const T*>(zb), n, d,
                                                       inv_temp, lse, grad, row_start, row_end, ws,
                                                       static_cast<T*>(ga), static_cast<T*>(gb));
  return cudaGetLastError();
}

}  // namespace

cudaError_t nt_xent_fwd_cuda_launch(NtXentDtype dtype, const void* za, const void* zb, int64_t n, int64_t d,
                                    float inv_temp, float* lse, float* term, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  switch (dtype) {
    case NtXentDtype::kFloat32: return launch_fwd<float>(za, zb, n, d, inv_temp, lse, term, stream);
    case NtXentDtype::kBFloat16: return launch_fwd<__nv_bfloat16>(za, zb, n, d, inv_temp, lse, term, stream);
    case NtXentDtype::kFloat16: return launch_fwd<__half>(za, zb, n, d, inv_temp, lse, term, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nt_xent_bwd_cuda_launch(NtXentDtype dtype, const void* za, const void* zb, int64_t n, int64_t d,
                                    float inv_temp, const float* lse, const float* grad, int64_t row_start,
                                    int64_t row_end, float* workspace, void* ga, void* gb, cudaStream_t stream) {
  if (n <= 0 || d <= 0 || row_end <= row_start) return cudaSuccess;
  switch (dtype) {
    case NtXentDtype::kFloat32:
      return launch_bwd<float>(za, zb, n, d, inv_temp, lse, grad, row_start, row_end, workspace, ga, gb, stream);
    case NtXentDtype::kBFloat16:
      return launch_bwd<__nv_bfloat16>(za, zb, n, d, inv_temp, lse, grad, row_start, row_end, workspace, ga, gb,
                                       stream);
    case NtXentDtype::kFloat16:
      return launch_bwd<__half>(za, zb, n, d, inv_temp, lse, grad, row_start, row_end, workspace, ga, gb, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace cbd_fast
