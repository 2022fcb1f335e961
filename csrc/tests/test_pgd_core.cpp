// Unit test of the fused PGD step's CPU core (csrc/kernels/pgd_cpu.h) against naive loops.
//
// The naive side is written differently on purpose: explicit NaN tests and std::fmin/std::fmax
// for the clamps, and rounding to bfloat16/half by searching the nearest representable value in
// double (ties to the even pattern) instead of the core's bit tricks. Checks:
//   1. half -> float for all 65536 patterns, against ldexp in double;
//   2. float -> bfloat16 / half rounding on special, tie, subnormal and random floats;
//   3. the step for float32/bfloat16/half/double on random data plus edge cases (sign(+-0) = 0,
//      values exactly on the ball and box edges, NaN in each input, +-inf, subnormals), compared
//      bit for bit (NaN matches NaN, +0 matches -0), and split ranges equal one whole range.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/pgd_cpu.h"
#include "testing.h"

namespace k = cbd_fast::kernels;

namespace {

// ---- naive conversions -----------------------------------------------------------------------

double half_value_naive(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  double v;
  if (exp == 0x1F) {
    v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);
  } else {
    v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  }
  return sign ? -v : v;
}

// Nearest of two neighbouring patterns lo < hi (by magnitude) to |x|; ties go to the even one.
uint16_t pick_nearest(double ax, uint16_t lo, double vlo, uint16_t hi, double vhi) {
  const double dlo = ax - vlo, dhi = vhi - ax;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

uint16_t bf16_naive(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t mag = u & 0x7FFFFFFF;
  if (mag == 0x7F800000) return sign | 0x7F80;
  const uint16_t lo = static_cast<uint16_t>(mag >> 16), hi = static_cast<uint16_t>(lo + 1);
  auto val = [](uint16_t b) {
    const uint32_t w = static_cast<uint32_t>(b) << 16;
    float v;
    std::memcpy(&v, &w, 4);
    return static_cast<double>(v);
  };
  const double ax = std::fabs(static_cast<double>(f));
  // hi may be the infinity pattern: its "value" for rounding is 2^128 (the next binade start).
  const double vhi = hi == 0x7F80 ? std::ldexp(1.0, 128) : val(hi);
  return sign | pick_nearest(ax, lo, val(lo), hi, vhi);
}

uint16_t half_naive(float f) {
  if (std::isnan(f)) return 0x7E00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double ax = std::fabs(static_cast<double>(f));
  if (ax >= 65520.0) return sign | 0x7C00;  // halfway between 65504 and 2^16 rounds to even (inf)
  // Binary search the largest finite pattern whose value is <= ax (positive patterns are ordered).
  uint16_t lo = 0, hi = 0x7BFF;
  while (lo < hi) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (half_value_naive(mid) <= ax) lo = mid; else hi = static_cast<uint16_t>(mid - 1);
  }
  if (lo == 0x7BFF) return sign | 0x7BFF;  // ax in [65504, 65520)
  const uint16_t up = static_cast<uint16_t>(lo + 1);
  return sign | pick_nearest(ax, lo, half_value_naive(lo), up, half_value_naive(up));
}

// ---- naive step --------------------------------------------------------------------------------

template <typename C>
C step_naive(C a, C g, C c, C s, C e, C lower, C upper) {
  if (std::isnan(a) || std::isnan(g) || std::isnan(c)) return std::numeric_limits<C>::quiet_NaN();
  C d = 0;
  if (g > 0) d = s;
  if (g < 0) d = -s;
  C y = a + d;
  y = std::fmin(std::fmax(y, c - e), c + e);
  return std::fmin(std::fmax(y, lower), upper);
}

bool same_value(double got, double want) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  return got == want;  // +0 == -0; otherwise equal doubles <=> equal patterns
}

// Storage helpers so one test body serves all dtypes.
template <typename T>
struct Store;
template <>
struct Store<float> {
  static float make(float v) { return v; }
  static double value(float v) { return v; }
  static float round(float v) { return v; }
};
template <>
struct Store<double> {
  static double make(double v) { return v; }
  static double value(double v) { return v; }
  static double round(double v) { return v; }
};
template <>
struct Store<k::Bf16Bits> {
  static k::Bf16Bits make(float v) { return k::Bf16Bits{bf16_naive(v)}; }
  static double value(k::Bf16Bits v) { return k::to_compute(v); }
  static k::Bf16Bits round(float v) { return k::Bf16Bits{bf16_naive(v)}; }
};
template <>
struct Store<k::HalfBits> {
  static k::HalfBits make(float v) { return k::HalfBits{half_naive(v)}; }
  static double value(k::HalfBits v) { return half_value_naive(v.bits); }
  static k::HalfBits round(float v) { return k::HalfBits{half_naive(v)}; }
};

template <typename T>
void check_step(const char* name, const std::vector<double>& xa0, const std::vector<double>& g0,
                const std::vector<double>& xc0, double s_in, double e_in, double lo_in, double hi_in) {
  using C = typename k::ComputeOf<T>::type;
  const size_t n = xa0.size();
  std::vector<T> xa(n), g(n), xc(n);
  for (size_t i = 0; i < n; ++i) {
    xa[i] = Store<T>::make(static_cast<C>(xa0[i]));
    g[i] = Store<T>::make(static_cast<C>(g0[i]));
    xc[i] = Store<T>::make(static_cast<C>(xc0[i]));
  }
  const C s = static_cast<C>(s_in), e = static_cast<C>(e_in);
  const C lo = static_cast<C>(lo_in), hi = static_cast<C>(hi_in);
  std::vector<T> want(n);
  for (size_t i = 0; i < n; ++i) {
    const C y = step_naive<C>(static_cast<C>(Store<T>::value(xa[i])), static_cast<C>(Store<T>::value(g[i])),
                              static_cast<C>(Store<T>::value(xc[i])), s, e, lo, hi);
    want[i] = Store<T>::round(y);
  }
  // Whole range in one call, and the same range split in uneven pieces.
  std::vector<T> got = xa, got_split = xa;
  k::pgd_step_range<T>(got.data(), g.data(), xc.data(), 0, static_cast<int64_t>(n), s, e, lo, hi);
  for (size_t b = 0; b < n; b += 37) {
    const size_t end = std::min(n, b + 37);
    k::pgd_step_range<T>(got_split.data(), g.data(), xc.data(), static_cast<int64_t>(b),
                         static_cast<int64_t>(end), s, e, lo, hi);
  }
  size_t bad = n, bad_split = n;
  for (size_t i = 0; i < n; ++i) {
    if (bad == n && !same_value(Store<T>::value(got[i]), Store<T>::value(want[i]))) bad = i;
    if (bad_split == n && !same_value(Store<T>::value(got_split[i]), Store<T>::value(want[i]))) bad_split = i;
  }
  CBD_CHECK(bad == n, name << ": first mismatch at " << bad << ": got "
                           << (bad < n ? Store<T>::value(got[bad]) : 0.0) << ", want "
                           << (bad < n ? Store<T>::value(want[bad]) : 0.0) << " (x_adv "
                           << (bad < n ? xa0[bad] : 0.0) << ", grad " << (bad < n ? g0[bad] : 0.0)
                           << ", x_clean " << (bad < n ? xc0[bad] : 0.0) << ")");
  CBD_CHECK(bad_split == n, name << ": split ranges differ from the naive loop at " << bad_split);
}

void test_conversions() {
  // 1. half -> float, all patterns.
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = half_value_naive(static_cast<uint16_t>(h));
    const double got = k::to_compute(k::HalfBits{static_cast<uint16_t>(h)});
    if (!same_value(got, want) || (want == 0 && std::signbit(got) != std::signbit(want))) ++bad;
  }
  CBD_CHECK(bad == 0, bad << " half patterns convert wrongly to float");

  // 2. float -> bf16 / half: specials, exact ties, subnormal ranges, and random bit patterns.
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 1e30f,
                           -1e30f, INFINITY, -INFINITY, NAN, 5.9604645e-8f, 2.9802322e-8f,
                           2.9802326e-8f, 8.940697e-8f, 6.097555e-5f, 6.1035156e-5f, 1e-40f, -1e-45f,
                           3.3895314e38f, 3.4028235e38f};
  for (int i = 0; i < 4096; ++i) xs.push_back(static_cast<float>(1 + i) * 2.9802322e-8f);  // half ties
  for (int i = 0; i < 4096; ++i) {
    uint32_t u = 0x3F800000u + (static_cast<uint32_t>(i) << 15) + 0x8000u;  // bf16 ties near 1
    float f;
    std::memcpy(&f, &u, 4);
    xs.push_back(f);
  }
  std::mt19937 rng(1234);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    xs.push_back(f);
  }
  int bad_bf = 0, bad_h = 0;
  for (float f : xs) {
    const uint16_t gb = k::bf16_from_float(f).bits, wb = bf16_naive(f);
    const uint16_t gh = k::half_from_float(f).bits, wh = half_naive(f);
    if (std::isnan(f)) {
      bad_bf += ((gb & 0x7FFF) <= 0x7F80);
      bad_h += ((gh & 0x7FFF) <= 0x7C00);
    } else {
      if (gb != wb && bad_bf++ < 3) std::cerr << "bf16(" << f << "): " << gb << " vs " << wb << "\n";
      if (gh != wh && bad_h++ < 3) std::cerr << "half(" << f << "): " << gh << " vs " << wh << "\n";
    }
  }
  CBD_CHECK(bad_bf == 0, bad_bf << " float -> bfloat16 roundings differ");
  CBD_CHECK(bad_h == 0, bad_h << " float -> half roundings differ");
}

void test_steps() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const double eps = 8.0 / 255.0, step = 2.0 / 255.0;
  // Edge cases: sign(+-0) = 0, exactly on the ball/box edges, NaN in each input, infinities.
  std::vector<double> xa = {0.5, 0.5, 0.5, 0.5 + eps, 0.5 - eps, 1.0, 0.0, nan, 0.5, 0.5, inf, -inf,
                            0.999, 0.001, 1e-40, -0.0, 0.3};
  std::vector<double> g = {0.0, -0.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, nan, 1.0, -1.0, 1.0, 1e-30, -1e-30,
                           1e-45, -0.0, -inf};
  std::vector<double> xc = {0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5, nan, 0.5, 0.5, 0.99, 0.01,
                            0.0, 0.0, 0.3};
  // Random images, gradients (a tenth exactly zero) and starts in and around the ball.
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int i = 0; i < 5003; ++i) {
    const double c = u01(rng);
    xc.push_back(c);
    xa.push_back(c + 1.5 * eps * (2.0 * u01(rng) - 1.0));
    g.push_back(i % 10 == 0 ? 0.0 : normal(rng));
  }
  check_step<float>("float32", xa, g, xc, step, eps, 0.0, 1.0);
  check_step<double>("float64", xa, g, xc, step, eps, 0.0, 1.0);
  check_step<k::Bf16Bits>("bfloat16", xa, g, xc, step, eps, 0.0, 1.0);
  check_step<k::HalfBits>("float16", xa, g, xc, step, eps, 0.0, 1.0);
  // A box that cuts through the ball, a zero radius, a zero step, and odd scalar values.
  check_step<float>("float32 box", xa, g, xc, 0.1, 0.3, 0.25, 0.75);
  check_step<float>("float32 eps=0", xa, g, xc, step, 0.0, 0.0, 1.0);
  check_step<k::HalfBits>("float16 step=0", xa, g, xc, 0.0, eps, -1.0, 2.0);
  check_step<k::Bf16Bits>("bfloat16 odd", xa, g, xc, 1.0 / 3.0, 0.1, -0.5, 0.7);
  // One element.
  check_step<float>("float32 n=1", {0.2}, {-3.0}, {0.25}, step, eps, 0.0, 1.0);
}

}  // namespace

int main() {
  test_conversions();
  test_steps();
  return cbd_test::finish("test_pgd_core");
}
