// Fused PGD step, CPU core: plain C++17 on raw pointers, no torch.
//
//   x_adv <- clamp(clamp(x_adv + step * sign(grad), x_clean - eps, x_clean + eps), lower, upper)
//
// evaluated elementwise in the compute type C (float for float/bfloat16/half storage, double for
// double storage) and rounded once, to nearest even, to the storage type T. The scalars arrive
// already rounded to C by the caller. sign(+-0) = 0. NaN in grad, x_adv or x_clean gives NaN at
// that element (the CBD loop's non-finite guard reports it): the clamps below are written so that
// NaN propagates explicitly, unlike std::min/std::max, which silently drop a NaN in one operand.
//
// bfloat16 and half are carried as their 16-bit patterns (Bf16Bits, HalfBits) with conversions
// that match c10's (round to nearest even; overflow to +-inf; subnormals kept).
#pragma once

#include <cstdint>
#include <cstring>

namespace cbd_fast {
namespace kernels {

// ---- 16-bit storage types and their exact conversions ----------------------------------------

struct Bf16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bfloat16 -> float: the bf16 pattern is the top half of the float pattern (exact).
inline float to_compute(Bf16Bits v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

// float -> bfloat16, round to nearest even; NaN -> the quiet NaN 0x7FC0 (as c10 does).
inline Bf16Bits bf16_from_float(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return Bf16Bits{0x7FC0u};
  // 1. Add half an ulp of bf16 minus one, plus the lowest kept bit: ties go to the even pattern.
  u += 0x7FFFu + ((u >> 16) & 1u);
  return Bf16Bits{static_cast<uint16_t>(u >> 16)};
}

// half -> float (exact): normal numbers re-bias the exponent, subnormals are mant * 2^-24.
inline float to_compute(HalfBits v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
  return sign ? -mag : mag;
}

// float -> half, round to nearest even; overflow -> inf; NaN -> quiet NaN (0x7E00 | sign).
inline HalfBits half_from_float(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return HalfBits{static_cast<uint16_t>(sign | 0x7E00u)};
  // 1. |f| >= 65520 (largest half 65504 plus half an ulp) rounds to inf; so does inf itself.
  if (a >= 0x477FF000u) return HalfBits{static_cast<uint16_t>(sign | 0x7C00u)};
  // 2. |f| < 2^-14: the result is subnormal (or zero). Adding 0.5f puts the half's ulp (2^-24) at
  //    the float's last mantissa bit, so the float adder does the round-to-nearest-even for us.
  if (a < 0x38800000u) {
    const float shifted = bits_float(a) + 0.5f;
    return HalfBits{static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3F000000u))};
  }
  // 3. Normal: re-bias the exponent (127 -> 15), add 0xFFF plus the lowest kept bit (ties to
  //    even), drop the 13 low mantissa bits. A carry out of the mantissa bumps the exponent.
  const uint32_t odd = (a >> 13) & 1u;
  a += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
  return HalfBits{static_cast<uint16_t>(sign | (a >> 13))};
}

inline float to_compute(float v) { return v; }
inline double to_compute(double v) { return v; }

template <typename T, typename C>
inline T from_compute(C v);
template <>
inline float from_compute<float, float>(float v) {
  return v;
}
template <>
inline double from_compute<double, double>(double v) {
  return v;
}
template <>
inline Bf16Bits from_compute<Bf16Bits, float>(float v) {
  return bf16_from_float(v);
}
template <>
inline HalfBits from_compute<HalfBits, float>(float v) {
  return half_from_float(v);
}

// The compute type of a storage type: float for 16/32-bit storage, double for double.
template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

// ---- the step ----------------------------------------------------------------------------------

// One element: all arithmetic in C, written branch-free (selects) so the loop vectorises.
template <typename C>
inline C pgd_step_value(C a, C g, C c, C step, C eps, C lower, C upper) {
  // 1. step * sign(g): +step, -step, 0 for +-0, and NaN for NaN (g == g is false only for NaN).
  const C d = g > C(0) ? step : (g < C(0) ? -step : (g == g ? C(0) : g));
  // 2. Ascent step. NaN in a or g makes y NaN.
  C y = a + d;
  // 3. Projection on the L-inf ball [c - eps, c + eps]. "y < lo ? lo : y" keeps a NaN y.
  const C lo = c - eps;
  const C hi = c + eps;
  y = y < lo ? lo : y;
  y = y > hi ? hi : y;
  // 4. Projection on the box [lower, upper] (finite scalars; a NaN y stays NaN).
  y = y < lower ? lower : y;
  y = y > upper ? upper : y;
  // 5. A NaN x_clean makes both ball bounds NaN, which the compares in 3 ignore: propagate it.
  return c != c ? c : y;
}

// x_adv[i] for i in [begin, end), in place. grad and x_clean are read-only and must either not
// overlap x_adv or alias it exactly (element i read before element i is written).
template <typename T>
inline void pgd_step_range(T* x_adv, const T* grad, const T* x_clean, int64_t begin, int64_t end,
                           typename ComputeOf<T>::type step, typename ComputeOf<T>::type eps,
                           typename ComputeOf<T>::type lower, typename ComputeOf<T>::type upper) {
  using C = typename ComputeOf<T>::type;
  for (int64_t i = begin; i < end; ++i) {
    const C y = pgd_step_value<C>(to_compute(x_adv[i]), to_compute(grad[i]), to_compute(x_clean[i]),
                                  step, eps, lower, upper);
    x_adv[i] = from_compute<T, C>(y);
  }
}

}  // namespace kernels
}  // namespace cbd_fast
