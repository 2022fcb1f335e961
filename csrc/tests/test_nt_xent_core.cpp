// Unit test of the torch-free NT-Xent CPU core (csrc/kernels/nt_xent_cpu.h) against a naive
// double-precision loop: forward lse/term and both gradients, odd shapes larger than one tile,
// float and double, identical rows, NaN propagation. Returns non-zero on failure.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/nt_xent_cpu.h"
#include "testing.h"

namespace ntx = cbd_fast::nt_xent_cpu;

namespace {

struct Naive {
  std::vector<double> lse, term, ga, gb;
};

// The definition, O(n^2 d) with the full score matrix: s_ij = it <u_i,u_j>, lse over j != i,
// dL/du_k = coef (sum_j (P_kj + P_jk) u_j - 2 u_p(k)).
Naive naive(const std::vector<double>& za, const std::vector<double>& zb, int64_t n, int64_t d, double it,
            double grad) {
  const int64_t m = 2 * n;
  auto row = [&](int64_t i) { return i < n ? &za[i * d] : &zb[(i - n) * d]; };
  std::vector<double> s(m * m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += row(i)[k] * row(j)[k];
      s[i * m + j] = it * acc;
    }
  Naive out;
  out.lse.resize(m);
  out.term.resize(m);
  for (int64_t i = 0; i < m; ++i) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < m; ++j)
      if (j != i) mx = std::max(mx, s[i * m + j]);
    double sum = 0;
    for (int64_t j = 0; j < m; ++j)
      if (j != i) sum += std::exp(s[i * m + j] - mx);
    out.lse[i] = mx + std::log(sum);
    out.term[i] = out.lse[i] - s[i * m + (i < n ? i + n : i - n)];
  }
  const double coef = grad * it / static_cast<double>(m);
  out.ga.assign(n * d, 0.0);
  out.gb.assign(n * d, 0.0);
  for (int64_t k = 0; k < m; ++k) {
    double* g = k < n ? &out.ga[k * d] : &out.gb[(k - n) * d];
    for (int64_t j = 0; j < m; ++j) {
      if (j == k) continue;
      const double w = std::exp(s[k * m + j] - out.lse[k]) + std::exp(s[k * m + j] - out.lse[j]);
      for (int64_t x = 0; x < d; ++x) g[x] += coef * w * row(j)[x];
    }
    const double* up = row(k < n ? k + n : k - n);
    for (int64_t x = 0; x < d; ++x) g[x] -= coef * 2.0 * up[x];
  }
  return out;
}

std::vector<double> normalized_rows(int64_t n, int64_t d, std::mt19937& gen) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> x(n * d);
  for (int64_t i = 0; i < n; ++i) {
    double nrm = 0;
    for (int64_t k = 0; k < d; ++k) {
      x[i * d + k] = dist(gen);
      nrm += x[i * d + k] * x[i * d + k];
    }
    nrm = std::max(std::sqrt(nrm), 1e-12);
    for (int64_t k = 0; k < d; ++k) x[i * d + k] /= nrm;
  }
  return x;
}

// The core's entry points at ISA `level` (float: each compiled variant; double has one).
void fwd(const float* a, const float* b, int64_t n, int64_t d, float it, int64_t r0, int64_t r1, float* lse,
         float* term, ntx::Isa level) {
  ntx::fwd_rows(a, b, n, d, it, r0, r1, lse, term, level);
}
void fwd(const double* a, const double* b, int64_t n, int64_t d, double it, int64_t r0, int64_t r1,
         double* lse, double* term, ntx::Isa) {
  ntx::fwd_rows(a, b, n, d, it, r0, r1, lse, term);
}
void bwd(const float* a, const float* b, int64_t n, int64_t d, float it, const float* lse, float coef,
         int64_t r0, int64_t r1, float* ga, float* gb, ntx::Isa level) {
  ntx::bwd_rows(a, b, n, d, it, lse, coef, r0, r1, ga, gb, level);
}
void bwd(const double* a, const double* b, int64_t n, int64_t d, double it, const double* lse, double coef,
         int64_t r0, int64_t r1, double* ga, double* gb, ntx::Isa) {
  ntx::bwd_rows(a, b, n, d, it, lse, coef, r0, r1, ga, gb);
}

template <typename T>
void check_case(int64_t n, int64_t d, double temperature, std::mt19937& gen, ntx::Isa level,
                bool identical_rows = false) {
  std::vector<double> za = normalized_rows(n, d, gen), zb = normalized_rows(n, d, gen);
  if (identical_rows)
    for (int64_t i = 1; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) za[i * d + k] = za[k];
  const double it = 1.0 / temperature, grad = 0.7;
  const Naive want = naive(za, zb, n, d, it, grad);

  std::vector<T> a(za.begin(), za.end()), b(zb.begin(), zb.end());
  std::vector<T> lse(2 * n, T(-999)), term(2 * n, T(-999)), ga(n * d, T(-999)), gb(n * d, T(-999));
  // two calls with a split that is not a block multiple: exercises range handling
  const int64_t mid = (2 * n) / 3;
  fwd(a.data(), b.data(), n, d, T(it), 0, mid, lse.data(), term.data(), level);
  fwd(a.data(), b.data(), n, d, T(it), mid, 2 * n, lse.data(), term.data(), level);
  const T coef = T(grad * it / (2.0 * n));
  bwd(a.data(), b.data(), n, d, T(it), lse.data(), coef, 0, mid, ga.data(), gb.data(), level);
  bwd(a.data(), b.data(), n, d, T(it), lse.data(), coef, mid, 2 * n, ga.data(), gb.data(), level);

  const bool f32 = sizeof(T) == 4;
  const double atol = f32 ? 2e-4 * it : 1e-10, rtol = f32 ? 1e-4 : 1e-10;
  double gscale = 0;  // gradients: absolute tolerance relative to their magnitude
  for (double g : want.ga) gscale = std::max(gscale, std::fabs(g));
  const double gtol = f32 ? 1e-4 * gscale + 1e-7 : 1e-10;
  std::printf("  n=%lld d=%lld tau=%g %s%s%s\n", static_cast<long long>(n), static_cast<long long>(d),
              temperature, f32 ? "float " : "double", f32 ? ntx::isa_name(level) : "",
              identical_rows ? " identical" : "");
  CBD_CHECK_CLOSE(lse.data(), want.lse.data(), static_cast<size_t>(2 * n), atol, rtol);
  CBD_CHECK_CLOSE(term.data(), want.term.data(), static_cast<size_t>(2 * n), atol, rtol);
  CBD_CHECK_CLOSE(ga.data(), want.ga.data(), static_cast<size_t>(n * d), gtol, rtol);
  CBD_CHECK_CLOSE(gb.data(), want.gb.data(), static_cast<size_t>(n * d), gtol, rtol);

  // only-a backward: rows [0, n) write ga and never touch gb
  std::vector<T> ga2(n * d, T(-999)), gb2(n * d, T(-999));
  bwd(a.data(), b.data(), n, d, T(it), lse.data(), coef, 0, n, ga2.data(), gb2.data(), level);
  CBD_CHECK_CLOSE(ga2.data(), want.ga.data(), static_cast<size_t>(n * d), gtol, rtol);
  bool untouched = true;
  for (T v : gb2) untouched = untouched && v == T(-999);
  CBD_CHECK(untouched, "the b side was written by an a-only backward");
}

void check_nan() {
  const int64_t n = 5, d = 7;
  std::vector<float> a(n * d, 0.1f), b(n * d, 0.2f), lse(2 * n), term(2 * n), ga(n * d), gb(n * d);
  a[3 * d + 2] = NAN;
  ntx::fwd_rows(a.data(), b.data(), n, d, 2.0f, 0, 2 * n, lse.data(), term.data());
  double total = 0;
  for (float t : term) total += t;
  CBD_CHECK(std::isnan(total), "a NaN input must give a NaN loss; got " << total);
  CBD_CHECK(std::isnan(lse[3]), "row 3 holds the NaN; lse[3]=" << lse[3]);
  ntx::bwd_rows(a.data(), b.data(), n, d, 2.0f, lse.data(), 0.1f, 0, 2 * n, ga.data(), gb.data());
  bool any_nan = false;
  for (float g : ga) any_nan = any_nan || std::isnan(g);
  CBD_CHECK(any_nan, "a NaN input must give NaN gradients");
}

void check_fast_exp() {
  double worst = 0;
  for (float x = -87.0f; x <= 0.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(ntx::fast_exp(x) - want) / want);
  }
  CBD_CHECK(worst < 5e-7, "fast_exp relative error " << worst);
  CBD_CHECK(ntx::fast_exp(-INFINITY) == 0.0f, "exp(-inf) must be 0");
  CBD_CHECK(ntx::fast_exp(-100.0f) == 0.0f, "exp(-100) flushes to 0");
  CBD_CHECK(std::isnan(ntx::fast_exp(NAN)), "exp(NaN) must be NaN");
}

}  // namespace

int main() {
  std::mt19937 gen(1234);
  std::printf("isa: %s\n", ntx::isa_name());
  check_fast_exp();
  check_nan();
  const int64_t shapes[][2] = {{2, 1}, {3, 3}, {17, 64}, {64, 128}, {70, 257}, {129, 33}};
  const double temps[] = {0.05, 0.1, 0.5, 1.0};
  int t = 0;
  for (const auto& sh : shapes) check_case<double>(sh[0], sh[1], temps[t++ % 4], gen, ntx::isa());
  // every float variant this machine can run (each has its own micro-tile)
  for (ntx::Isa level : {ntx::Isa::kBaseline, ntx::Isa::kAvx2, ntx::Isa::kAvx512}) {
    if (!ntx::supported(level)) {
      std::printf("  %s: not supported here, skipped\n", ntx::isa_name(level));
      continue;
    }
    for (const auto& sh : shapes) check_case<float>(sh[0], sh[1], temps[t++ % 4], gen, level);
    check_case<float>(40, 16, 0.1, gen, level, /*identical_rows=*/true);
  }
  return cbd_test::finish("test_nt_xent_core");
}
