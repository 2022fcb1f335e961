// Fused PGD step, CUDA core (see pgd_cuda.h for the contract). Memory-bound: one pass, three
// loads and one store per element, 16-byte vector loads (4 x float32 or 8 x bfloat16/float16) in
// a grid-stride loop, then a scalar tail; a scalar kernel when a pointer is not 16-byte aligned.
//
// Bit-exactness with the float32 PyTorch reference, whatever the nvcc flags: --use_fast_math (or
// -ftz=true) would turn on flush-to-zero for float32 add/compare/min/max. The arithmetic here uses
// explicit non-ftz PTX (add.rn.f32 / sub.rn.f32, max.NaN.f32 / min.NaN.f32 on sm_80+) or integer
// operations on the bit patterns, so subnormals and NaN behave as in IEEE float32 opmath:
//   1. d  = step * sign(g): +step / -step / 0 for +-0 / NaN for NaN      (from g's bit pattern)
//   2. y  = x_adv + d                                                      (add.rn.f32)
//   3. y  = min(max(y, x_clean - eps), x_clean + eps)   NaN-propagating    (sub/add.rn, max/min.NaN)
//   4. y  = min(max(y, lower), upper)                    NaN-propagating
//   5. x_adv = round_to_nearest_even(y) in the storage dtype (cvt.rn)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pgd_cuda.h"

namespace cbd_fast {
namespace kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
// Pre-sm_80 fallbacks for max.NaN/min.NaN.
__device__ __forceinline__ bool is_nan_bits(float a) {
  return (__float_as_uint(a) & 0x7FFFFFFFu) > 0x7F800000u;
}

// Total order on non-NaN float32 bit patterns, as signed integers (immune to flush-to-zero).
__device__ __forceinline__ int ordered(float a) {
  const int i = __float_as_int(a);
  return i >= 0 ? i : (i ^ 0x7FFFFFFF);
}
#endif

// max / min that return NaN when either operand is NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  if (is_nan_bits(a)) return a;
  if (is_nan_bits(b)) return b;
  return ordered(a) < ordered(b) ? b : a;
#endif
}

__device__ __forceinline__ float min_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  if (is_nan_bits(a)) return a;
  if (is_nan_bits(b)) return b;
  return ordered(b) < ordered(a) ? b : a;
#endif
}

__device__ __forceinline__ float pgd_value(float a, float g, float c, float step, float eps,
                                           float lower, float upper) {
  // 1. step * sign(g) from g's bits: zero for +-0, NaN for NaN, else step with g's sign.
  const uint32_t gb = __float_as_uint(g);
  const uint32_t mag = gb & 0x7FFFFFFFu;
  const float d = mag == 0u ? 0.0f
                  : mag > 0x7F800000u ? g
                                      : __uint_as_float(__float_as_uint(step) | (gb & 0x80000000u));
  // 2. Ascent step.
  float y = add_rn(a, d);
  // 3. Ball [c - eps, c + eps]; a NaN c makes both bounds NaN and the result NaN.
  y = min_nan(max_nan(y, sub_rn(c, eps)), add_rn(c, eps));
  // 4. Box [lower, upper].
  return min_nan(max_nan(y, lower), upper);
}

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

// VEC elements that travel as one 16-byte (or sizeof(T)-byte when VEC == 1) load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    pgd_step_kernel(T* x_adv, const T* grad, const T* x_clean, int64_t n, float step, float eps,
                    float lower, float upper) {
  using P = Pack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  P* xa = reinterpret_cast<P*>(x_adv);
  const P* g = reinterpret_cast<const P*>(grad);
  const P* xc = reinterpret_cast<const P*>(x_clean);
  // Vector body: grid-stride over VEC-element packs.
  for (int64_t i = tid; i < nvec; i += stride) {
    P a = xa[i];
    const P gg = g[i];
    const P c = xc[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      a.v[j] = Conv<T>::store(pgd_value(Conv<T>::load(a.v[j]), Conv<T>::load(gg.v[j]),
                                        Conv<T>::load(c.v[j]), step, eps, lower, upper));
    }
    xa[i] = a;
  }
  // Scalar tail: the last n % VEC elements.
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    x_adv[i] = Conv<T>::store(pgd_value(Conv<T>::load(x_adv[i]), Conv<T>::load(grad[i]),
                                        Conv<T>::load(x_clean[i]), step, eps, lower, upper));
  }
}

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 132;
  return count > 0 ? count : 132;
}

template <typename T>
cudaError_t launch(void* x_adv, const void* grad, const void* x_clean, int64_t n, float step,
                   float eps, float lower, float upper, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = ((reinterpret_cast<uintptr_t>(x_adv) | reinterpret_cast<uintptr_t>(grad) |
                         reinterpret_cast<uintptr_t>(x_clean)) & 15u) == 0;
  const int64_t work = aligned ? (n + kVec - 1) / kVec : n;
  // Enough blocks to fill every SM (8 blocks of 256 threads each), then grid-stride.
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 8;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  T* xa = static_cast<T*>(x_adv);
  const T* g = static_cast<const T*>(grad);
  const T* xc = static_cast<const T*>(x_clean);
  if (aligned) {
    pgd_step_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xa, g, xc, n, step, eps, lower, upper);
  } else {
    pgd_step_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xa, g, xc, n, step, eps, lower, upper);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pgd_step_cuda_launch(PgdDtype dtype, void* x_adv, const void* grad, const void* x_clean,
                                 int64_t n, float step, float eps, float lower, float upper,
                                 cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype) {
    case PgdDtype::kFloat32:
      return launch<float>(x_adv, grad, x_clean, n, step, eps, lower, upper, stream);
    case PgdDtype::kBFloat16:
      return launch<__nv_bfloat16>(x_adv, grad, x_clean, n, step, eps, lower, upper, stream);
    case PgdDtype::kFloat16:
      return launch<__half>(x_adv, grad, x_clean, n, step, eps, lower, upper, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace cbd_fast
