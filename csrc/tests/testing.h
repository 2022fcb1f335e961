// Minimal helpers for the C++ unit tests of the torch-free cores (no gtest needed).
//
//   #include "testing.h"
//   int main() {
//     CBD_CHECK(n == 3, "n=" << n);
//     CBD_CHECK_CLOSE(out.data(), want.data(), out.size(), 1e-6, 1e-5);
//     return cbd_test::finish("test_nt_xent_core");   // 0 when every check passed
//   }
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <iostream>
#include <sstream>

namespace cbd_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": FAILED " << what << "\n";
}

// Index of the first element where |got - want| > atol + rtol * |want| (NaN only matches NaN),
// or n when all match. Writes the worst absolute error to *max_err when given.
template <typename T, typename U>
std::size_t first_mismatch(const T* got, const U* want, std::size_t n, double atol, double rtol,
                           double* max_err = nullptr) {
  std::size_t bad = n;
  double worst = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]);
    const double w = static_cast<double>(want[i]);
    if (std::isnan(g) || std::isnan(w)) {
      if (std::isnan(g) != std::isnan(w) && bad == n) bad = i;
      continue;
    }
    const double err = std::fabs(g - w);
    if (err > worst) worst = err;
    if (!(err <= atol + rtol * std::fabs(w)) && bad == n) bad = i;
  }
  if (max_err != nullptr) *max_err = worst;
  return bad;
}

// Prints a summary line and returns the process exit status: 0 when no check failed.
inline int finish(const char* name) {
  if (failures() == 0) {
    std::cout << name << ": all checks passed\n";
    return 0;
  }
  std::cerr << name << ": " << failures() << " check(s) failed\n";
  return 1;
}

}  // namespace cbd_test

// CBD_CHECK(condition, message stream expression)
#define CBD_CHECK(cond, msg)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::ostringstream cbd_os_;                                              \
      cbd_os_ << #cond << ": " << msg;                                         \
      ::cbd_test::fail(__FILE__, __LINE__, cbd_os_.str());                     \
    }                                                                          \
  } while (0)

// CBD_CHECK_CLOSE(got_ptr, want_ptr, n, atol, rtol): elementwise, NaN matches NaN.
#define CBD_CHECK_CLOSE(got, want, n, atol, rtol)                              \
  do {                                                                         \
    double cbd_err_ = 0.0;                                                     \
    const std::size_t cbd_n_ = (n);                                            \
    const std::size_t cbd_i_ =                                                 \
        ::cbd_test::first_mismatch((got), (want), cbd_n_, (atol), (rtol), &cbd_err_); \
    if (cbd_i_ != cbd_n_) {                                                    \
      std::ostringstream cbd_os_;                                              \
      cbd_os_ << #got << " vs " << #want << ": first mismatch at " << cbd_i_   \
              << " (" << static_cast<double>((got)[cbd_i_]) << " vs "          \
              << static_cast<double>((want)[cbd_i_]) << "), max |err| "        \
              << cbd_err_;                                                     \
      ::cbd_test::fail(__FILE__, __LINE__, cbd_os_.str());                     \
    }                                                                          \
  } while (0)
